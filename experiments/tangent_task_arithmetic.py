"""Task arithmetic in the tangent space (linearized fine-tuning) and aTLAS, at CPU scale.

Checks the claims of "Task Arithmetic in the Tangent Space: Improved Editing of Pre-Trained
Models" (Ortiz-Jimenez, Favero & Frossard, NeurIPS 2023) on small offline tasks, with the
learned anisotropic scaling of "Knowledge Composition using Task Vectors with Learned
Anisotropic Scaling" (aTLAS; Zhang et al., NeurIPS 2024) as the alternative to one isotropic
alpha.

Set-up (everything offline, from ``jaxmtl.data``):

* Tasks: six by default, from five input sources: scikit-learn digits (8x8, upsampled),
  texture patches of scikit-image's bundled images (class = source image), MNIST-1D
  signals (embedded as a raster), two factors of the procedural shapes ("shape",
  "orientation": same inputs, different labels) and the left digit of two overlapping
  digits (``multi_digits``). Every input is brought to one format, 16x16 grayscale in
  [0, 1] (:func:`to_common_format`).
* Real benchmarks, for users who have prepared them (``--data tfds``): the standard
  task-arithmetic eight of Ilharco et al. (ICLR 2023), Cars, DTD, EuroSAT, GTSRB, MNIST,
  RESISC45, SUN397 and SVHN, as far as tensorflow-datasets provides them: ``cars196``,
  ``dtd``, ``eurosat/rgb``, ``mnist``, ``resisc45``, ``sun397``, ``svhn_cropped``
  (``--tfds-names``). GTSRB is not in the tfds catalog, so the suite has seven tasks here.
  They are read from prepared ArrayRecord copies (``jaxmtl.data.load_tfds``, under
  ``--tfds-dir`` or tfds' default folder; nothing is downloaded), resized to
  ``image_size`` when read and brought to the same common format (grayscale; ``--rgb``
  keeps the three channels). Splits: :data:`jaxmtl.data.tfds.TFDS_SPLITS` (EuroSAT and
  RESISC45 have one split: its last 20% is the test split), a validation split carved out
  of train (10%) where the set has none; pre-training takes the same
  ``pretrain_fraction`` of the training split as the offline path, so it never sees a
  test (or validation) image. A set that is not prepared fails before anything is loaded
  or trained, with :class:`jaxmtl.data.DataNotPreparedError` saying how to prepare it.
  ``--tfds-limit N`` reads at most N examples per split (a quick look; smoke mode reads at
  most 500).
* Pre-training: theta_0 (a backbone from ``jaxmtl.models``, an MLP by default, the CNN with
  ``--backbone cnn``) is trained multi-task, one head per task (then discarded), on a
  pre-training share of each source's training split (``pretrain_fraction``, 30%): the
  pre-trained model has seen the tasks' concepts, as CLIP has, on data that the
  fine-tuning split (the other 70%), the validation and the test split never contain.
  ``--pretrain-tasks`` pre-trains on other labels instead (e.g. ``photos shapes:scale
  shapes:position multi_digits:right``: related inputs, unseen labels).
  ``--pretrain-steps 0`` keeps the random initialization as theta_0 (the paper's point:
  disentanglement comes from pre-training). Cached between runs (``jexp.cached``) under
  ``<out_dir>/cache``, keyed by the settings that determine it.
* Frozen heads: one linear probe per task on the pre-trained features (fitted on the task's
  fine-tuning split, then frozen, as the paper freezes CLIP's zero-shot text heads).
* Fine-tuning: for each task, the backbone is fine-tuned through its frozen head,
  non-linearly and linearized (training the params of ``linearize(apply_fn, theta_0)``),
  with the identical recipe (Adam, warm-up + cosine, gradient clipping 1.0): task vectors
  ``tau = theta_t - theta_0``. Post-hoc linearization applies the non-linear vectors to
  the linearized model.

Reported, in the paper's format (test accuracy in %, mean ± std over seeds):

* single-task accuracies: pre-trained (probe), non-linear FT, linearized FT, post-hoc, and
  the non-linear advantage ``(err_lin - err_nl) K / (K - 1)``;
* task addition ``theta_0 + alpha sum_t tau_t``: absolute and normalized accuracy at the
  alpha maximizing the mean normalized validation accuracy, and at alpha = 1;
* task negation ``theta_0 - alpha tau_t`` for each target task, the control being the
  other tasks (their mean accuracy must stay >= 95% of the pre-trained one);
* the weight disentanglement error xi (Eq. 3) of every task pair on a grid of
  coefficients, with heat maps for the pairs of ``Config.heatmap_pairs``; the linearized
  model uses the cached form (one JVP per vector and batch);
* aTLAS (one learned coefficient per task vector and parameter block, fitted on the
  validation sets) against the isotropic alpha, for non-linear and linearized vectors.

Run: ``python -m experiments.tangent_task_arithmetic`` (default, minutes on 2 CPU cores),
``--smoke`` (seconds), ``--seeds 0 1 2 3 4`` for more seeds, ``--data tfds`` (optionally
``--tfds-dir DIR --tfds-limit 5000 --image-size 32 --rgb``) for the real benchmarks. Writes under
``runs/tangent_task_arithmetic/<timestamp>/``: config.json, metrics.jsonl, results.json,
summary.md, alpha_curves.png, disentanglement.png. Fine-tuned task vectors are stored as
checkpoints (``vectors/``) and each seed's evaluation as a cell of ``cells.jsonl``
(:func:`jaxmtl.experiment.run_cells`); ``--resume latest`` continues an interrupted run in
its directory and skips every finished cell.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmtl import data as jdata
from jaxmtl import experiment as jexp
from jaxmtl import models
from jaxmtl import taskvec as tv
from jaxmtl import train as jtrain
from jaxmtl.analysis.disentanglement import nonlinear_advantage, weight_disentanglement_error
from jaxmtl.analysis.ntk import eigenfunction_localization, ntk_gram

NAME = "tangent_task_arithmetic"
# method -> (which fine-tuning produced the task vectors, how edits are evaluated)
METHODS = {
    "nonlinear": ("nonlinear", "nonlinear"),
    "linear": ("linear", "linear"),
    "posthoc": ("nonlinear", "linear"),
}
LABELS = {
    "nonlinear": "Non-linear FT",
    "linear": "Linearized FT",
    "posthoc": "Post-hoc linearization",
}
ATLAS_METHODS = ("nonlinear", "linear")
_MASKED = -1e9  # bias of a padded (absent) class: never predicted, zero probability
# The standard task-arithmetic eight (Ilharco et al.) as far as tfds has them: cars196, dtd,
# eurosat/rgb, mnist, resisc45, sun397, svhn_cropped; GTSRB is not in the tfds catalog.
# jaxmtl.data.TASK_ARITHMETIC less its two extras.
TFDS_TASKS = tuple(n for n in jdata.TASK_ARITHMETIC if n not in ("fashion_mnist", "cifar10"))


@dataclasses.dataclass(frozen=True)
class Config:
    """Tangent task arithmetic settings; the defaults run in minutes on 2 CPU cores."""

    smoke: bool = False  # tiny data and a few steps, for tests (seconds)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # one theta_0 and fine-tuning run per seed
    out_dir: str = "runs/tangent_task_arithmetic"  # runs are written under it (and a cache/)
    resume: str | None = None  # "latest" or a run directory: finished cells are not redone
    # the ablation instead of the main run: (pre-training glyphs | tasks) x (MLP relu |
    # layernorm + gelu) x (inputs raw | standardized), first seed only; writes ablation.md
    ablation: bool = False
    # evaluated tasks: "source" or "source:task"; no two share inputs (the paper's
    # disentanglement is defined on disjoint task supports)
    tasks: tuple[str, ...] = ("digits", "textures", "mnist1d", "shapes:shape", "photos")
    # what theta_0 is pre-trained on: "glyphs" (jaxmtl.data.glyphs, no evaluated label) or
    # "tasks" (``pretrain_tasks``, or the evaluated tasks on a share of their training split)
    pretrain_data: str = "glyphs"
    glyphs_per_class: int = 70  # glyph images per class (177 classes)
    # pre-training tasks of pretrain_data="tasks"; () = the evaluated tasks themselves
    pretrain_tasks: tuple[str, ...] = ()
    image_size: int = 16  # the common input format: image_size x image_size grayscale
    rgb: bool = False  # keep three channels (offline sources are gray: copied channels)
    # "offline" (jaxmtl.data's bundled and procedural sources: ``tasks``) or "tfds" (the
    # prepared tfds sets ``tfds_names``, which then replace ``tasks``)
    data: str = "offline"
    # the standard task-arithmetic eight as far as tfds has them (GTSRB is not in it)
    tfds_names: tuple[str, ...] = TFDS_TASKS
    tfds_dir: str | None = None  # the tfds data folder (None: $TFDS_DATA_DIR or tfds' own)
    # read at most this many examples per split (>= 10 x eval_examples where validation is
    # carved out of train)
    tfds_limit: int | None = None
    backbone: str = "mlp"  # "mlp" or "cnn" (jaxmtl.models)
    hidden: tuple[int, ...] = (512, 512)  # MLP hidden widths / CNN channels
    features: int = 128  # backbone output width (the heads' input)
    activation: str = "gelu"  # the MLP's nonlinearity: "gelu" or "relu"
    norm: str | None = "layernorm"  # the MLP's norm before each activation: "layernorm" or None
    standardize: bool = True  # per-image (x - mean) / std inside the model
    # share of a pre-training source's train split it uses (pretrain_data="tasks")
    pretrain_fraction: float = 0.3
    pretrain_steps: int = 1500  # 0: theta_0 is the random initialization
    pretrain_lr: float = 1e-3  # Adam, warm-up + cosine
    probe_steps: int = 500  # the frozen linear heads: Adam steps on theta_0's features
    probe_lr: float = 1e-2
    finetune_steps: int = 300  # per task and mode (non-linear and linearized: one recipe)
    finetune_lr: float = 3e-4  # Adam peak learning rate, warm-up + cosine decay
    warmup_steps: int = 30  # linear warm-up steps of every schedule
    clip_norm: float = 1.0  # global gradient-norm clipping of every optimizer
    batch_size: int = 128  # pre-training and fine-tuning batch (probes: 4x)
    eval_examples: int = 256  # per task, from its validation split (alpha, aTLAS, xi)
    test_examples: int = 512  # per task, from its test split (every reported accuracy)
    # the shared addition coefficient: linspace(start, stop, num), chosen on validation
    addition_alphas: tuple[float, float, int] = (0.0, 1.0, 21)
    negation_alphas: tuple[float, float, int] = (0.0, 2.0, 21)  # theta_0 - alpha tau, linspace
    negation_threshold: float = 0.95  # control accuracy kept, relative to theta_0
    # xi of every pair on this grid (its [-1, 1]^2 points are the box)
    disentangle_alphas: tuple[float, float, int] = (-2.0, 2.0, 9)
    disentangle_examples: int = 128  # per task
    heatmap_alphas: tuple[float, float, int] = (-2.0, 2.0, 17)  # the finer heat-map grid
    # task pairs drawn as xi heat maps (disentanglement.png)
    heatmap_pairs: tuple[tuple[str, str], ...] = (
        ("digits", "textures"),
        ("mnist1d", "shapes:shape"),
    )
    kernel_examples: int = 32  # per task, for the empirical NTK and the gradient cosines
    kernel_eigenvectors: int = 10  # top NTK eigenvectors whose task mass is reported
    atlas_steps: int = 300  # aTLAS: AdamW steps fitting the per-block coefficients
    atlas_lr: float = 1e-2  # aTLAS learning rate (weight decay 0.1, clipping 1.0)
    atlas_batch: int = 256  # aTLAS batch of the pooled validation sets
    mesh: str = ""  # e.g. "data=4": jaxmtl.parallel.make_mesh; training batches split over data

    def effective(self) -> Config:
        """The configuration actually run (``smoke`` shrinks everything)."""
        lists = {
            f.name: tuple(tuple(v) if isinstance(v, list) else v for v in getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), list)
        }
        config = dataclasses.replace(self, **lists)
        if config.data not in ("offline", "tfds"):
            raise ValueError(f"data: expected 'offline' or 'tfds', got {config.data!r}")
        if config.pretrain_data not in ("glyphs", "tasks"):
            raise ValueError(
                f"pretrain_data: expected 'glyphs' or 'tasks', got {config.pretrain_data!r}"
            )
        if config.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {list(ACTIVATIONS)}, got {config.activation!r}"
            )
        if config.norm not in models.mlp.NORMS:
            raise ValueError(f"norm: expected one of {models.mlp.NORMS}, got {config.norm!r}")
        if config.data == "tfds":
            if not config.tfds_names:
                raise ValueError("tfds_names: name at least one tfds data set")
            if config.tfds_limit is not None and config.tfds_limit < 1:
                raise ValueError(f"tfds_limit: expected None or >= 1, got {config.tfds_limit}")
            limit = config.tfds_limit
            if self.smoke:
                limit = min(limit or _SMOKE_TFDS_LIMIT, _SMOKE_TFDS_LIMIT)
            config = dataclasses.replace(config, tasks=config.tfds_names, tfds_limit=limit)
        if not self.smoke:
            return config
        return dataclasses.replace(
            config,
            seeds=config.seeds[:1],
            tasks=config.tasks[:3],
            pretrain_tasks=config.pretrain_tasks[:2],
            glyphs_per_class=4,
            hidden=(32,),
            features=16,
            pretrain_steps=30,
            probe_steps=20,
            finetune_steps=10,
            warmup_steps=2,
            batch_size=32,
            eval_examples=32,
            test_examples=32,
            addition_alphas=(0.0, 1.0, 5),
            negation_alphas=(0.0, 2.0, 5),
            disentangle_alphas=(-1.0, 1.0, 3),
            disentangle_examples=16,
            heatmap_alphas=(-1.0, 1.0, 3),
            kernel_examples=8,
            kernel_eigenvectors=4,
            atlas_steps=5,
            atlas_batch=32,
        )


_SMOKE_TFDS_LIMIT = 500  # examples per split that smoke mode reads of a tfds set
ACTIVATIONS = {"gelu": nnx.gelu, "relu": nnx.relu}


def _grid(spec: tuple[float, float, int]) -> jax.Array:
    start, stop, num = spec
    return jnp.linspace(float(start), float(stop), int(num), dtype=jnp.float32)


# --------------------------------------------------------------------------- data


class TaskData(NamedTuple):
    """One task in the common input format; every split is ``{"x": (N, S, S), "y": (N,)}``
    (``x`` is ``(N, S, S, 3)`` with ``Config.rgb``)."""

    name: str
    num_classes: int
    pretrain: dict[str, np.ndarray]  # the pre-training pool's share of this task
    train: dict[str, np.ndarray]  # fine-tuning (and probe) split
    validation: dict[str, np.ndarray]  # eval_examples, for alpha selection and aTLAS
    test: dict[str, np.ndarray]  # eval_examples


def embed_signal(x: np.ndarray, size: int) -> np.ndarray:
    """1-D signals ``(N, D)`` in [0, 1] as ``(N, size, size)`` rasters.

    The signal is resampled (linear interpolation) to ``size * size`` points, laid out row
    by row: every input value survives (an MLP sees the signal itself; a line plot would
    throw most of its resolution away at 16 pixels).
    """
    n, d = x.shape
    grid = np.linspace(0, d - 1, size * size)
    points = np.stack([np.interp(grid, np.arange(d), s) for s in x])
    return points.reshape(n, size, size).astype(np.float32)


def to_common_format(x: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """Inputs of any ``jaxmtl.data`` source as ``(N, size, size)`` grayscale in [0, 1].

    Signals ``(N, D)`` are embedded as rasters (:func:`embed_signal`), RGB images averaged
    to gray, other sizes resized bilinearly. ``channels=3`` gives ``(N, size, size, 3)``
    instead: RGB kept, gray inputs copied to the three channels.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels}")
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = embed_signal(x, size)
        return x if channels == 1 else np.repeat(x[..., None], 3, axis=-1)
    if x.ndim == 4 and channels == 1:
        x = x.mean(axis=-1)
    elif x.ndim == 3 and channels == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    if x.ndim != (3 if channels == 1 else 4) or (channels == 3 and x.shape[-1] != 3):
        raise ValueError(
            f"inputs: expected (N, D), (N, H, W) or (N, H, W, {'3' if channels == 3 else 'C'})"
            f", got {x.shape}"
        )
    if x.shape[1:3] != (size, size):
        shape = (len(x), size, size, *x.shape[3:])
        x = np.asarray(jax.image.resize(jnp.asarray(x), shape, "linear"))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _channels(config: Config) -> int:
    return 3 if config.rgb else 1


def load_source(name: str, smoke: bool) -> jdata.Dataset:
    """The ``jaxmtl.data`` source by name (fewer examples in smoke mode)."""
    small = {
        "textures": {"per_image": 80},
        "photos": {"per_image": 40},
        "mnist1d": {"num_samples": 600},
        "shapes": {"num_samples": 600},
        "multi_digits": {"num_samples": 600},
    }
    # sizes with >= 512 test examples per task (digits: 35% of its 1,797 images for test)
    full = {
        "digits": {"fractions": (0.5, 0.15, 0.35)},
        "textures": {"per_image": 1000},
        "photos": {"per_image": 500},
    }
    if name not in ("digits", "textures", "photos", "mnist1d", "shapes", "multi_digits"):
        raise ValueError(f"tasks: unknown source {name!r}")
    return getattr(jdata, name)(**(small if smoke else full).get(name, {}))


def _tfds_names(config: Config) -> list[str]:
    """The tfds sets a ``data="tfds"`` run reads (evaluated and pre-training tasks)."""
    specs = (*config.tasks, *config.pretrain_tasks)
    return list(dict.fromkeys(spec.partition(":")[0] for spec in specs))


def load_tfds_source(name: str, config: Config) -> jdata.Dataset:
    """A prepared tfds set, resized to ``image_size`` as it is read (``tfds_limit`` per split).

    Raises:
      jaxmtl.data.DataNotPreparedError: the set is not on disk (the message says how to
        prepare it).
    """
    return jdata.load_tfds(
        name, data_dir=config.tfds_dir, image_size=config.image_size, limit=config.tfds_limit
    )


def check_tfds(config: Config) -> None:
    """Fails at once, before anything is loaded or trained, if a tfds set is not prepared.

    Reads one example of each split of every set (cheap), so that a missing seventh set is
    reported before six large ones are read and resized, and every missing set at once.

    Raises:
      jaxmtl.data.DataNotPreparedError: the message names each missing set and how to
        prepare it.
    """
    missing = []
    for name in _tfds_names(config):
        try:
            jdata.load_tfds(name, data_dir=config.tfds_dir, image_size=config.image_size, limit=1)
        except jdata.DataNotPreparedError as error:
            missing.append(error)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise jdata.DataNotPreparedError(
            f"{len(missing)} tfds data sets are not prepared:\n"
            + "\n".join(f"- {error}" for error in missing)
        ) from missing[0]


def _subset(split: dict[str, np.ndarray], index: np.ndarray, column: int | None) -> dict:
    y = split["y"][index]
    return {"x": split["x"][index], "y": (y if column is None else y[:, column]).astype(np.int32)}


def _column(ds: jdata.Dataset, spec: str) -> int | None:
    source, _, task_name = spec.partition(":")
    if task_name:
        if task_name not in ds.tasks:
            raise ValueError(f"tasks: {source} has tasks {ds.tasks}, got {task_name!r}")
        return ds.tasks.index(task_name)
    if len(ds.tasks) > 1:
        raise ValueError(f"tasks: {source} has several tasks, name one of {source}:{ds.tasks}")
    return None


def prepare_tasks(config: Config) -> tuple[list[TaskData], list[TaskData]]:
    """``(tasks, pretrain_tasks)`` in the common format, with their fixed splits.

    The training split of a source used for pre-training is permuted once (seed 0) and cut:
    the first ``pretrain_fraction`` is its pre-training share, the rest the fine-tuning
    split of its evaluated tasks (so an image is never both); a source used only for
    evaluation keeps its whole training split for fine-tuning. Validation and test keep
    ``eval_examples`` random examples each, so every task's evaluation arrays have one
    shape (one compilation for all tasks). Pre-training never touches a validation or test
    split (``multi_digits`` draws its digits within each split of ``digits``; a tfds set's
    validation and test splits are disjoint from its training split). With
    ``data="tfds"`` the sources are tfds sets (:func:`load_tfds_source`), all checked
    first (:func:`check_tfds`). With ``pretrain_data="glyphs"`` (the default) the one
    pre-training task is :func:`glyph_task` and every evaluated task keeps its whole
    training split.
    """
    if config.data == "tfds":
        check_tfds(config)
    glyphs = config.pretrain_data == "glyphs"
    pretrain_specs = () if glyphs else (config.pretrain_tasks or config.tasks)
    pretrain_sources = {spec.partition(":")[0] for spec in pretrain_specs}
    sources: dict[str, tuple[jdata.Dataset, dict[str, np.ndarray]]] = {}

    def source_of(spec: str):
        name = spec.partition(":")[0]
        if name not in sources:
            if config.data == "tfds":
                ds = load_tfds_source(name, config)
            else:
                ds = load_source(name, config.smoke)
            formatted = {
                split: to_common_format(
                    getattr(ds, split)["x"], config.image_size, _channels(config)
                )
                for split in ("train", "validation", "test")
            }
            sources[name] = (ds, formatted)
        return name, *sources[name]

    def task(spec: str) -> TaskData:
        name, ds, formatted = source_of(spec)
        column = _column(ds, spec)
        splits = {
            split: {**getattr(ds, split), "x": formatted[split]}
            for split in ("train", "validation", "test")
        }
        n_train = len(splits["train"]["y"])
        order = np.random.default_rng(0).permutation(n_train)
        cut = round(config.pretrain_fraction * n_train) if name in pretrain_sources else 0
        picks = {}
        for split, field in (("validation", "eval_examples"), ("test", "test_examples")):
            n, wanted = len(splits[split]["y"]), getattr(config, field)
            if n < wanted:
                raise ValueError(f"{field}={wanted} exceeds the {n} {split} examples of {spec}")
            picks[split] = np.random.default_rng(1).permutation(n)[:wanted]
        return TaskData(
            name=spec,
            num_classes=int(ds.num_classes[0 if column is None else column]),
            pretrain=_subset(splits["train"], np.sort(order[:cut]), column),
            train=_subset(splits["train"], np.sort(order[cut:]), column),
            validation=_subset(splits["validation"], picks["validation"], column),
            test=_subset(splits["test"], picks["test"], column),
        )

    tasks = [task(s) for s in config.tasks]
    if glyphs:
        return tasks, [glyph_task(config)]
    return tasks, [task(s) for s in pretrain_specs]


def glyph_task(config: Config) -> TaskData:
    """The broad pre-training set, ``jaxmtl.data.glyphs`` (its training split), in the
    common format; no evaluated task's label is in it."""
    ds = jdata.glyphs(num_per_class=config.glyphs_per_class, size=16)
    empty = {"x": np.zeros((0, *ds.train["x"].shape[1:]), np.float32), "y": np.zeros(0, np.int32)}
    train = {
        "x": to_common_format(ds.train["x"], config.image_size, _channels(config)),
        "y": ds.train["y"],
    }
    return TaskData("glyphs", ds.num_classes[0], train, empty, empty, empty)


# --------------------------------------------------------------------------- model


def _module(config: Config, seed: int) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    channels = _channels(config)
    if config.backbone == "mlp":
        inputs = config.image_size**2 * channels
        return models.MLP(
            inputs,
            config.hidden,
            config.features,
            activation=ACTIVATIONS[config.activation],
            norm=config.norm,
            rngs=rngs,
        )
    if config.backbone == "cnn":
        return models.CNN(channels, config.hidden, config.features, rngs=rngs)
    raise ValueError(f"backbone: expected 'mlp' or 'cnn', got {config.backbone!r}")


def make_backbone(config: Config) -> Callable[[Any, jax.Array], jax.Array]:
    """The backbone ``apply(params, x (N, S, S) or (N, S, S, 3)) -> features (N, F)``, one
    object per run.

    One function object for every seed, so that compiled evaluations are reused. With
    ``Config.standardize`` every image is standardized first (:func:`standardize`).
    """
    apply_fn, _ = models.functional(_module(config, 0))
    prepare = standardize if config.standardize else (lambda x: x)
    if config.backbone == "mlp":
        return lambda params, x: apply_fn(params, prepare(x).reshape(x.shape[0], -1))
    if config.rgb:
        return lambda params, x: apply_fn(params, prepare(x))
    return lambda params, x: apply_fn(params, prepare(x)[..., None])


def standardize(x: jax.Array) -> jax.Array:
    """Per-image standardization ``(x - mean) / sqrt(var + 1e-4)`` over all pixels (and
    channels) of each image ``x (N, ...)``: every source reaches the backbone at one scale."""
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-4)


def init_backbone(config: Config, seed: int) -> dict:
    """Freshly initialized backbone parameters (the seed sets them)."""
    return models.functional(_module(config, seed))[1]


def head_logits(z: jax.Array, heads: dict, task: jax.Array) -> jax.Array:
    """Logits of each example through its own task's linear head.

    ``heads = {"w": (T, F, C), "b": (T, C)}``, ``C`` the largest number of classes; a task
    with fewer classes has bias ``-1e9`` on the padded ones (never predicted).
    """
    return jnp.einsum("nf,nfc->nc", z, heads["w"][task]) + heads["b"][task]


def make_logits_fn(backbone: Callable) -> Callable[[Any, dict], jax.Array]:
    """``logits_fn(params, inputs)`` with ``inputs = {"x", "task", "w", "b"}``.

    The frozen heads travel with the inputs (not closed over): every task, seed and edit
    shares one compiled evaluation, and an input batch may mix tasks (the negation control
    set). ``jaxmtl.taskvec`` differentiates ``params`` only, so the heads stay frozen.
    """

    def logits_fn(params, inputs):
        z = backbone(params, inputs["x"])
        return head_logits(z, {"w": inputs["w"], "b": inputs["b"]}, inputs["task"])

    return logits_fn


def task_inputs(x: np.ndarray, task: int | np.ndarray, heads: dict) -> dict:
    """The ``inputs`` dict of :func:`make_logits_fn` for examples of one (or each) task."""
    ids = np.broadcast_to(np.asarray(task, np.int32), (len(x),))
    return {"x": jnp.asarray(x), "task": jnp.asarray(ids), "w": heads["w"], "b": heads["b"]}


def class_mask(tasks: list[TaskData]) -> np.ndarray:
    """``(T, C)``: 0 for a task's classes, ``-1e9`` for the padding up to ``C``."""
    width = max(t.num_classes for t in tasks)
    mask = np.zeros((len(tasks), width), np.float32)
    for i, t in enumerate(tasks):
        mask[i, t.num_classes :] = _MASKED
    return mask


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optimizer(config: Config, lr: float, steps: int) -> optax.GradientTransformation:
    """The shared recipe: gradient clipping, Adam with linear warm-up and cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, min(config.warmup_steps, max(steps - 1, 0)), max(steps, 1)
    )
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(schedule))


class Steps(NamedTuple):
    """The run's train steps and their optimizers, built once (``make_steps``): every seed,
    task and mode reuses one compiled step (``jaxmtl.train.fit`` keeps it per step object);
    what differs between cells (theta_0, the frozen head, the data) travels as arguments."""

    pretrain: Callable
    pretrain_optimizer: optax.GradientTransformation
    probe: Callable
    probe_optimizer: optax.GradientTransformation
    finetune: dict[str, Callable]  # "nonlinear" / "linear"
    finetune_optimizer: optax.GradientTransformation


def _frozen_labels(params: dict) -> dict:
    return {
        "theta": jax.tree.map(lambda _: "train", params["theta"]),
        "frozen": jax.tree.map(lambda _: "frozen", params["frozen"]),
    }


def make_steps(
    config: Config, backbone: Callable, tasks: list[TaskData], pretrain_tasks: list[TaskData]
) -> Steps:
    """The pre-training, probe and fine-tuning steps (``jaxmtl.train.make_train_step``).

    Fine-tuning trains ``params = {"theta", "frozen": {"params0", "w", "b"}}``: only
    ``theta`` is updated (the frozen part has zero updates and no gradient), so that theta_0
    and the task's head are step arguments, not constants of a per-cell function.
    ``mode="linear"`` trains ``theta`` of ``linearize(backbone, params0)`` (Ortiz-Jimenez et
    al., NeurIPS 2023, Eq. 4); both modes share the recipe (:func:`_optimizer`).
    """
    pretrain_mask = jnp.asarray(class_mask(pretrain_tasks)) if pretrain_tasks else None
    probe_mask = jnp.asarray(class_mask(tasks))

    def pretrain_loss(params, batch, rng):
        z = backbone(params["backbone"], batch["x"])
        heads = {"w": params["w"], "b": params["b"] + pretrain_mask}
        return _cross_entropy(head_logits(z, heads, batch["task"]), batch["y"]), {}

    def probe_loss(heads, batch, rng):
        logits = head_logits(
            batch["z"], {"w": heads["w"], "b": heads["b"] + probe_mask}, batch["task"]
        )
        return _cross_entropy(logits, batch["y"]), {}

    def finetune_loss(mode):
        def loss(params, batch, rng):
            frozen = jax.lax.stop_gradient(params["frozen"])
            model = backbone if mode == "nonlinear" else tv.linearize(backbone, frozen["params0"])
            logits = model(params["theta"], batch["x"]) @ frozen["w"] + frozen["b"]
            return _cross_entropy(logits, batch["y"]), {}

        return loss

    pre_opt = _optimizer(config, config.pretrain_lr, config.pretrain_steps)
    probe_opt = optax.adam(config.probe_lr)
    ft_opt = optax.multi_transform(
        {
            "train": _optimizer(config, config.finetune_lr, config.finetune_steps),
            "frozen": optax.set_to_zero(),
        },
        _frozen_labels,
    )
    return Steps(
        pretrain=jtrain.make_train_step(pretrain_loss, pre_opt),
        pretrain_optimizer=pre_opt,
        probe=jtrain.make_train_step(probe_loss, probe_opt),
        probe_optimizer=probe_opt,
        finetune={
            m: jtrain.make_train_step(finetune_loss(m), ft_opt) for m in ("nonlinear", "linear")
        },
        finetune_optimizer=ft_opt,
    )


def _train(
    init: Any,
    step: Callable,
    optimizer: optax.GradientTransformation,
    data: dict[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    log_every: int = 0,
    progress: bool = False,
    mesh: str = "",
) -> tuple[Any, list[dict]]:
    """``jaxmtl.train.fit`` of one of the run's :class:`Steps`; returns (params, history).

    optax 0.2.8's adam computes ``decay ** count`` (Python float ** int32), which strict
    dtype promotion (the test configuration) rejects: training uses the standard rules.
    """
    with jax.numpy_dtype_promotion("standard"):
        state, history = jtrain.fit(
            jtrain.init_state(init, optimizer, seed=seed),
            step,
            data,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            log_every=log_every,
            progress=progress,
            mesh=mesh or None,
        )
    return state.params, history


def _pool(tasks: list[TaskData], split: str) -> dict[str, np.ndarray]:
    """All tasks' examples of a split, with a ``task`` id per example."""
    parts = [getattr(t, split) for t in tasks]
    return {
        "x": np.concatenate([p["x"] for p in parts]),
        "y": np.concatenate([p["y"] for p in parts]),
        "task": np.concatenate([np.full(len(p["y"]), i, np.int32) for i, p in enumerate(parts)]),
    }


def pretrain(
    config: Config,
    tasks: list[TaskData],
    pretrain_tasks: list[TaskData],
    backbone: Callable,
    steps: Steps,
    seed: int,
) -> dict:
    """theta_0 and the frozen heads: ``{"params0", "heads"}``.

    The backbone is trained (multi-task, one head per pre-training task, then discarded)
    on the pre-training tasks' shares: the glyphs by default, so theta_0 never sees an
    evaluated task's label; then one linear probe per evaluated task is fitted on its
    theta_0 features and frozen (as the paper freezes CLIP's zero-shot heads).
    """
    params0 = init_backbone(config, seed)
    if config.pretrain_steps > 0 and pretrain_tasks:
        width = max(t.num_classes for t in pretrain_tasks)
        init = {
            "backbone": params0,
            "w": jax.random.normal(
                jax.random.key(seed), (len(pretrain_tasks), config.features, width)
            )
            * 0.01,
            "b": jnp.zeros((len(pretrain_tasks), width)),
        }
        trained, _ = _train(
            init,
            steps.pretrain,
            steps.pretrain_optimizer,
            _pool(pretrain_tasks, "pretrain"),
            steps=config.pretrain_steps,
            batch_size=config.batch_size,
            seed=seed,
            log_every=max(config.pretrain_steps // 4, 1),
            progress=not config.smoke,
            mesh=config.mesh,
        )
        params0 = trained["backbone"]
    return {"params0": params0, "heads": fit_probes(config, tasks, backbone, params0, steps, seed)}


def fit_probes(
    config: Config,
    tasks: list[TaskData],
    backbone: Callable,
    params0: Any,
    steps: Steps,
    seed: int,
) -> dict:
    """One linear probe per task on the theta_0 features of its fine-tuning split."""
    pool = _pool(tasks, "train")
    features = jax.jit(backbone)(params0, jnp.asarray(pool["x"]))
    data = {"z": np.asarray(features), "y": pool["y"], "task": pool["task"]}
    width = max(t.num_classes for t in tasks)
    init = {
        "w": jnp.zeros((len(tasks), config.features, width)),
        "b": jnp.zeros((len(tasks), width)),
    }
    heads, _ = _train(
        init,
        steps.probe,
        steps.probe_optimizer,
        data,
        steps=config.probe_steps,
        batch_size=min(4 * config.batch_size, len(data["y"])),
        seed=seed,
        mesh=config.mesh,
    )
    return {"w": heads["w"], "b": heads["b"] + jnp.asarray(class_mask(tasks))}


def finetune(
    config: Config,
    steps: Steps,
    params0: Any,
    heads: dict,
    index: int,
    data: dict[str, np.ndarray],
    mode: str,
    seed: int,
) -> tuple[Any, float]:
    """Fine-tunes task ``index`` through its frozen head; returns ``(tau, final loss)``.

    ``mode="linear"`` trains the params of ``linearize(backbone, theta_0)`` (Ortiz-Jimenez
    et al., NeurIPS 2023, Eq. 4); both modes share the recipe, steps, batches and seed, and
    every cell of a mode the compiled step (:func:`make_steps`).
    """
    init = {
        "theta": params0,
        "frozen": {"params0": params0, "w": heads["w"][index], "b": heads["b"][index]},
    }
    params, history = _train(
        init,
        steps.finetune[mode],
        steps.finetune_optimizer,
        data,
        steps=config.finetune_steps,
        batch_size=config.batch_size,
        seed=seed,
        mesh=config.mesh,
    )
    return tv.task_vector(params["theta"], params0), float(history[-1]["loss"])


# --------------------------------------------------------------------------- evaluation


_disentanglement = jax.jit(
    weight_disentanglement_error, static_argnums=0, static_argnames=("heads", "mode", "batch_size")
)


@functools.partial(jax.jit, static_argnames=("logits_fn", "mode", "steps", "lr"))
def _atlas(logits_fn, params0, stacked, heads, batches, *, mode, steps, lr):
    """aTLAS coefficients (zeros at the start) fitted by AdamW on the validation batches."""
    model = tv.atlas_model(logits_fn, params0, stacked, mode=mode)

    def objective(coefficients, batch):
        inputs = {"x": batch["x"], "task": batch["task"], "w": heads["w"], "b": heads["b"]}
        return _cross_entropy(model(coefficients, inputs), batch["y"])

    # Zhang et al.'s recipe: AdamW (weight decay 0.1), gradient clipping 1.0
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.1))
    return tv.atlas_fit(objective, tv.atlas_init(params0, stacked), optimizer, batches, steps=steps)


@functools.lru_cache(maxsize=8)
def _predictor(logits_fn: Callable) -> Callable:
    """A jitted ``predict(params, inputs) -> (N,)`` argmax labels, one per ``logits_fn``."""
    return jax.jit(
        lambda params, inputs: jnp.argmax(logits_fn(params, inputs), -1).astype(jnp.int32)
    )


@functools.lru_cache(maxsize=8)
def _kernel_fns(logits_fn: Callable) -> tuple[Callable, Callable]:
    """Jitted ``(ntk(params0, inputs), loss_gram(params0, inputs))``, one pair per
    ``logits_fn``: the empirical NTK of the projected logits ``<r_n, f(x_n)>`` and the Gram
    matrix of the per-example loss gradients (both ``(N, N)``, ``jaxmtl.analysis.ntk``)."""

    def projected(params, inputs):
        return jnp.sum(logits_fn(params, inputs) * inputs["r"], axis=-1)

    def losses(params, inputs):
        logits = logits_fn(params, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, inputs["y"])

    return (
        jax.jit(lambda p, inputs: ntk_gram(projected, p, inputs)),
        jax.jit(lambda p, inputs: ntk_gram(losses, p, inputs)),
    )


def kernel_analysis(
    config: Config,
    tasks: list[TaskData],
    logits_fn: Callable,
    params0: Any,
    heads: dict,
    seed: int,
) -> dict:
    """What the paper's explanation rests on (Ortiz-Jimenez et al., NeurIPS 2023, Sec. 5):
    is the kernel at theta_0 localized on the task supports?

    On ``kernel_examples`` validation inputs per task (``N = T k``):

    * loss-gradient cosines at theta_0 between batch gradients (the mean of
      ``g_n = d loss_n / d theta`` over each half of a task's examples): their mean across
      tasks over their mean within a task (the two halves of one task); 1 = no task
      structure, 0 = gradients of different tasks orthogonal (``cosines`` keeps the
      per-example matrix for the figure);
    * the empirical NTK ``k(x_n, x_m) = <J_n r_n, J_m r_m>`` of the logits projected on a
      fixed Gaussian direction ``r_n`` per example (zero on padded classes; in expectation
      the trace kernel ``tr J_n J_m^T``, at ``N`` Jacobian rows instead of ``N C``), its top
      ``kernel_eigenvectors`` eigenvalues and each eigenvector's mass per task
      (``eigenfunction_localization``); ``localization`` is the mean over those
      eigenvectors of their largest task mass (1 = every eigenfunction on one task,
      ``1 / T`` = spread evenly). The raw kernel's top eigenvectors sit on the task whose
      kernel is largest in scale; ``localization_normalized`` repeats the measurement on
      the cosine-normalized kernel ``k(x, x') / sqrt(k(x, x) k(x', x'))``, where scale
      differences between tasks no longer decide.
    """
    k, num = config.kernel_examples, len(tasks)
    x = np.concatenate([t.validation["x"][:k] for t in tasks])
    y = np.concatenate([t.validation["y"][:k] for t in tasks])
    ids = np.repeat(np.arange(num, dtype=np.int32), k)
    valid = np.asarray(heads["b"])[ids] > _MASKED / 2
    r = np.random.default_rng(seed).normal(size=valid.shape).astype(np.float32) * valid
    inputs = {**task_inputs(x, ids, heads), "r": jnp.asarray(r), "y": jnp.asarray(y)}
    ntk_fn, loss_gram_fn = _kernel_fns(logits_fn)
    with jax.numpy_dtype_promotion("standard"):
        gram = np.asarray(loss_gram_fn(params0, inputs), np.float64)
        ntk = ntk_fn(params0, inputs)
    norms = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    cos = gram / np.outer(norms, norms)
    # batch gradients: the mean gradient of each half of a task's examples; their inner
    # products are block means of the per-example Gram matrix
    halves = np.repeat(np.arange(2 * num), (k + 1) // 2)[: len(ids)] if k > 1 else ids
    groups = int(halves.max()) + 1
    onehot = np.eye(groups)[halves] / np.bincount(halves, minlength=groups)[None, :]
    block = onehot.T @ gram @ onehot
    bnorm = np.sqrt(np.clip(np.diag(block), 1e-30, None))
    bcos = block / np.outer(bnorm, bnorm)
    task_of = np.arange(groups) // 2 if k > 1 else np.arange(groups)
    same = task_of[:, None] == task_of[None, :]
    off = ~np.eye(groups, dtype=bool)
    within = float(bcos[same & off].mean()) if (same & off).any() else float("nan")
    across = float(bcos[~same].mean())
    top = min(config.kernel_eigenvectors, len(ids))
    values, mass = eigenfunction_localization(ntk, jnp.asarray(ids), num, top=top)
    mass = np.asarray(mass)
    # the raw kernel's top eigenvectors follow the task with the largest kernel scale; the
    # normalized kernel k(x, x') / sqrt(k(x, x) k(x', x')) asks for task structure alone
    diag = jnp.sqrt(jnp.clip(jnp.diag(ntk), 1e-30, None))
    _, mass_n = eigenfunction_localization(
        ntk / jnp.outer(diag, diag), jnp.asarray(ids), num, top=top
    )
    mass_n = np.asarray(mass_n)
    return {
        "eigen_mass_normalized": mass_n.tolist(),
        "localization_normalized": float(mass_n.max(axis=1).mean()),
        "gradient_cosine_within": within,
        "gradient_cosine_across": across,
        "gradient_cosine_ratio": across / within if within > 0 else float("nan"),
        "eigenvalues": _floats(values),
        "eigen_mass": mass.tolist(),
        "localization": float(mass.max(axis=1).mean()),
        "cosines": cos.astype(np.float32).tolist() if k * num <= 200 else [],
    }


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values).reshape(-1)]


def evaluate_seed(
    config: Config,
    tasks: list[TaskData],
    logits_fn: Callable,
    params0: Any,
    heads: dict,
    vectors: dict[str, list[Any]],
    seed: int,
) -> dict:
    """Every measurement of one seed: single-task, addition, negation, xi and aTLAS."""
    num = len(tasks)
    names = [t.name for t in tasks]
    val = [
        (task_inputs(t.validation["x"], i, heads), t.validation["y"]) for i, t in enumerate(tasks)
    ]
    test = [(task_inputs(t.test["x"], i, heads), t.test["y"]) for i, t in enumerate(tasks)]
    stacked = {kind: tv.stack(vs) for kind, vs in vectors.items()}
    singles = {kind: [tv.as_stacked([v], params0)[0] for v in vs] for kind, vs in vectors.items()}
    # Smoke runs pad every coefficient grid to one length, so that each mode's accuracy sweeps
    # share one compiled program (compilation is most of a smoke run's time); full runs do
    # not, since padding the 2-point test grids to the sweep's length cost more evaluation
    # than the compilations it saved (631 against 409 CPU-s for the default run). The values
    # are the same either way.
    size = None
    if config.smoke:
        alphas = (_grid(config.addition_alphas), _grid(config.negation_alphas))
        size = max(2, alphas[0].shape[0], alphas[1].shape[0] + 1)
    sweeps = {
        mode: functools.partial(tv.padded_edit_accuracies, logits_fn, mode=mode, pad_to=size)
        for _, mode in METHODS.values()
    }
    out: dict[str, Any] = {"tasks": names}
    clock = {"last": time.perf_counter()}
    timing: dict[str, float] = {}

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timing[stage], clock["last"] = now - clock["last"], now

    # Single-task accuracies: theta_0 and theta_0 + tau_t on task t (coefficients 0 and 1).
    single: dict[str, dict[str, list[float]]] = {}
    pre = {"validation": [], "test": []}
    for method, (kind, mode) in METHODS.items():
        single[method] = {"validation": [], "test": []}
        for i in range(num):
            for split, pairs in (("validation", val), ("test", test)):
                x, y = pairs[i]
                acc = sweeps[mode](params0, singles[kind][i], jnp.array([0.0, 1.0]), x, y)
                single[method][split].append(float(acc[1]))
                if method == "nonlinear":
                    pre[split].append(float(acc[0]))
    out["single"] = {"pretrained": pre, **single}
    out["nonlinear_advantage"] = _floats(
        nonlinear_advantage(
            jnp.asarray(single["linear"]["test"]),
            jnp.asarray(single["nonlinear"]["test"]),
            jnp.asarray([t.num_classes for t in tasks], jnp.int32),
        )
    )

    # Task addition: one shared alpha, chosen on validation by mean normalized accuracy.
    addition = {}
    for method, (kind, mode) in METHODS.items():
        res = tv.task_addition(
            logits_fn,
            params0,
            stacked[kind],
            validation=val,
            test=test,
            finetuned_validation_accuracies=jnp.asarray(single[method]["validation"]),
            finetuned_test_accuracies=jnp.asarray(single[method]["test"]),
            alphas=_grid(config.addition_alphas),
            mode=mode,
            pad_to=size,
        )
        addition[method] = {
            "alpha": res.alpha,
            "absolute": float(res.test_accuracies.mean()),
            "normalized": float(res.test_normalized.mean()),
            "absolute_alpha_one": float(res.test_accuracies_alpha_one.mean()),
            "normalized_alpha_one": float(res.test_normalized_alpha_one.mean()),
            "per_task": _floats(res.test_accuracies),
            "alphas": _floats(res.alphas),
            "curve_absolute": _floats(res.validation_accuracies.mean(axis=1)),
            "curve_normalized": _floats(res.validation_normalized.mean(axis=1)),
        }
    out["addition"] = addition
    lap("single+addition")

    # Task negation: forget task t, control = all other tasks (their mean accuracy).
    negation = {}
    for method, (kind, mode) in METHODS.items():
        rows = []
        for i in range(num):
            others = [j for j in range(num) if j != i]

            def control(pairs, others=others):
                x = np.concatenate([np.asarray(pairs[j][0]["x"]) for j in others])
                ids = np.concatenate([np.asarray(pairs[j][0]["task"]) for j in others])
                y = np.concatenate([pairs[j][1] for j in others])
                return task_inputs(x, ids, heads), y

            res = tv.task_negation(
                logits_fn,
                params0,
                vectors[kind][i],
                validation=val[i],
                control_validation=control(val),
                test=test[i],
                control_test=control(test),
                alphas=_grid(config.negation_alphas),
                threshold=config.negation_threshold,
                mode=mode,
                pad_to=size,
            )
            rows.append(res)
        negation[method] = {
            "target": float(np.mean([r.test_target for r in rows])),
            "control": float(np.mean([r.test_control for r in rows])),
            "pretrained_target": float(np.mean([r.pretrained_test_target for r in rows])),
            "pretrained_control": float(np.mean([r.pretrained_test_control for r in rows])),
            "alpha": float(np.mean([r.alpha for r in rows])),
            "found": int(sum(r.found for r in rows)),
            "control_kept": int(
                sum(
                    r.test_control >= config.negation_threshold * r.pretrained_test_control
                    for r in rows
                )
            ),
            "per_task_target": [r.test_target for r in rows],
            "per_task_control": [r.test_control for r in rows],
            "alphas": _floats(rows[0].alphas),
            "curve_target": _floats(np.mean([r.validation_target for r in rows], axis=0)),
            "curve_control": _floats(np.mean([r.validation_control for r in rows], axis=0)),
        }
    out["negation"] = negation
    lap("negation")

    # Weight disentanglement error of every pair (cached JVPs for the linearized model).
    pairs = list(itertools.combinations(range(num), 2))
    k = config.disentangle_examples
    dis_inputs = [task_inputs(t.validation["x"][:k], i, heads) for i, t in enumerate(tasks)]
    alphas = _grid(config.disentangle_alphas)
    disentanglement = {}
    for method, (kind, mode) in METHODS.items():

        def xi(i, j, grid, kind=kind, mode=mode):
            return _disentanglement(
                logits_fn,
                params0,
                vectors[kind][i],
                vectors[kind][j],
                dis_inputs[i],
                dis_inputs[j],
                grid,
                mode=mode,
            )

        grids = {f"{names[i]}|{names[j]}": np.asarray(xi(i, j, alphas)).tolist() for i, j in pairs}
        # the pairwise flip rate at the deployed coefficients: xi(alpha*, alpha*) / 2, the
        # share of a pair's inputs whose prediction the other task's vector changes
        # (padded to the grid's shape: one compiled program per mode; each cell on its own)
        deployed = jnp.full(alphas.shape, addition[method]["alpha"], jnp.float32)
        flips = {f"{names[i]}|{names[j]}": float(xi(i, j, deployed)[0, 0]) / 2 for i, j in pairs}
        # the heat-map pairs on the finer grid
        fine = {}
        for key in _heatmap_keys(config, names):
            i, j = (names.index(n) for n in key.split("|"))
            fine[key] = np.asarray(xi(i, j, _grid(config.heatmap_alphas))).tolist()
        box = np.abs(np.asarray(alphas)) <= 1.0 + 1e-6
        disentanglement[method] = {
            "mean": float(np.mean([np.mean(g) for g in grids.values()])),
            # the [-1, 1]^2 box of the grid
            "mean_box": float(
                np.mean([np.asarray(g)[np.ix_(box, box)].mean() for g in grids.values()])
            ),
            "deployed_flips": float(np.mean(list(flips.values()))),
            "pair_flips": flips,
            "grids": grids,
            "fine_grids": fine,
        }
    out["disentanglement"] = {
        "alphas": _floats(alphas),
        "fine_alphas": _floats(_grid(config.heatmap_alphas)),
        **disentanglement,
    }

    lap("disentanglement")
    # Locality of each task vector (alpha = 1): predictions it flips on the other tasks'
    # inputs over those it flips on its own task's (1 = no localization, 0 = local).
    locality = {}
    predict = _predictor(logits_fn)
    reference = [np.asarray(predict(params0, x)) for x, _ in test]
    for method, (kind, mode) in METHODS.items():
        own, cross = [], []
        for t in range(num):
            # coefficients (0, 1) as for the single-task accuracies: the same compiled sweep
            rates = [
                1.0
                - float(
                    sweeps[mode](
                        params0,
                        singles[kind][t],
                        jnp.array([0.0, 1.0]),
                        test[s][0],
                        jnp.asarray(reference[s]),
                    )[1]
                )
                for s in range(num)
            ]
            own.append(rates[t])
            cross.append(float(np.mean([r for s, r in enumerate(rates) if s != t])))
        locality[method] = {
            "own": own,
            "cross": cross,
            "ratio": float(np.mean(cross) / max(np.mean(own), 1e-9)),
        }
    out["locality"] = locality
    lap("locality")
    out["kernel"] = kernel_analysis(config, tasks, logits_fn, params0, heads, seed)
    lap("kernel")

    # aTLAS: per-block coefficients learned on the validation sets vs the isotropic alpha.
    pool = _pool(tasks, "validation")
    order = np.random.default_rng(seed).permutation(len(pool["y"]))
    batch = min(config.atlas_batch, len(order))
    count = len(order) // batch
    batches = {
        key: jnp.asarray(value[order[: count * batch]].reshape(count, batch, *value.shape[1:]))
        for key, value in pool.items()
    }
    atlas = {}
    for method in ATLAS_METHODS:
        kind, mode = METHODS[method]
        with jax.numpy_dtype_promotion("standard"):
            coefficients, losses = _atlas(
                logits_fn,
                params0,
                stacked[kind],
                heads,
                batches,
                mode=mode,
                steps=config.atlas_steps,
                lr=config.atlas_lr,
            )
        # the composed edit is itself a task vector, evaluated like any other
        edit = tv.task_vector(tv.atlas_apply(params0, stacked[kind], coefficients), params0)
        accs = [
            float(
                sweeps[mode](
                    params0, tv.as_stacked([edit], params0)[0], jnp.array([0.0, 1.0]), x, y
                )[1]
            )
            for x, y in test
        ]
        atlas[method] = {
            "absolute": float(np.mean(accs)),
            "normalized": float(np.mean(np.asarray(accs) / np.asarray(single[method]["test"]))),
            "per_task": accs,
            "final_loss": float(losses[-1]),
            "mean_coefficient": float(np.mean(jax.tree.leaves(coefficients))),
        }
    out["atlas"] = atlas
    lap("atlas")
    out["eval_stage_seconds"] = timing
    return out


# --------------------------------------------------------------------------- the study


def _cache_key(config: Config) -> str:
    """A hash of everything that determines theta_0 and the frozen heads.

    The tfds fields enter only when they differ from the offline default.
    """
    fields = (
        "smoke tasks pretrain_tasks image_size backbone hidden features pretrain_fraction "
        "pretrain_steps pretrain_lr probe_steps probe_lr warmup_steps clip_norm batch_size"
    ).split()
    values = {f: getattr(config, f) for f in fields}
    values.update(
        pretrain_data=config.pretrain_data,
        glyphs_per_class=config.glyphs_per_class if config.pretrain_data == "glyphs" else 0,
        activation=config.activation,
        norm=config.norm,
        standardize=config.standardize,
        fractions=[config.eval_examples, config.test_examples],
    )
    if config.data != "offline":
        values.update(data=config.data, tfds_limit=config.tfds_limit)
    if config.rgb:
        values["rgb"] = True
    text = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


def run_seed(
    config: Config,
    tasks: list[TaskData],
    pretrain_tasks: list[TaskData],
    backbone: Callable,
    logits_fn: Callable,
    steps: Steps,
    seed: int,
    run_dir: jexp.RunDir,
) -> dict:
    """One seed's cell of :func:`jaxmtl.experiment.run_cells`: pre-training (cached under
    ``<out_dir>/cache``), the fine-tuned task vectors (each an orbax checkpoint under the
    run's ``vectors/``, so a resumed run fine-tunes only the missing ones), then the seed's
    evaluation (:func:`evaluate_seed`)."""
    cache = Path(config.out_dir) / "cache" / f"pretrained-{_cache_key(config)}-seed{seed}"
    width = max(t.num_classes for t in tasks)
    like = {
        "params0": jax.eval_shape(lambda: init_backbone(config, seed)),
        "heads": {
            "w": jax.ShapeDtypeStruct((len(tasks), config.features, width), jnp.float32),
            "b": jax.ShapeDtypeStruct((len(tasks), width), jnp.float32),
        },
    }
    start = time.perf_counter()
    pre = jexp.cached(
        cache.resolve(),
        lambda: pretrain(config, tasks, pretrain_tasks, backbone, steps, seed),
        like=like,
    )
    params0, heads = pre["params0"], pre["heads"]
    run_dir.log({"seed": seed, "stage": "pretrained", "seconds": time.perf_counter() - start})
    vectors: dict[str, list[Any]] = {"nonlinear": [], "linear": []}
    tau_like = like["params0"]
    for index, task in enumerate(tasks):
        for mode in ("nonlinear", "linear"):
            path = run_dir.subdir("vectors") / f"seed{seed}-{_safe(task.name)}-{mode}"
            record: dict[str, Any] = {}

            def compute(index=index, task=task, mode=mode, record=record):
                cell_start = time.perf_counter()
                tau, loss = finetune(config, steps, params0, heads, index, task.train, mode, seed)
                record.update(seconds=time.perf_counter() - cell_start, loss=loss)
                return tau

            vectors[mode].append(jexp.cached(path.resolve(), compute, like=tau_like))
            if record:
                run_dir.log({"seed": seed, "task": task.name, "mode": mode, **record})
    start = time.perf_counter()
    result = evaluate_seed(config, tasks, logits_fn, params0, heads, vectors, seed)
    result["eval_seconds"] = time.perf_counter() - start
    run_dir.log(
        {
            "seed": seed,
            "stage": "evaluated",
            "seconds": result["eval_seconds"],
            **{f"addition_normalized_{m}": result["addition"][m]["normalized"] for m in METHODS},
        }
    )
    return result


def _per_seed(seeds: list[dict], *path: str) -> list[float]:
    values = []
    for result in seeds:
        value: Any = result
        for key in path:
            value = value[key]
        values.append(float(np.mean(value)))
    return values


# the per-seed scalars and curves that aggregate() collects
_SCALARS = {
    "addition": (
        "absolute",
        "normalized",
        "alpha",
        "absolute_alpha_one",
        "normalized_alpha_one",
    ),
    "negation": (
        "target",
        "control",
        "pretrained_target",
        "pretrained_control",
        "alpha",
        "control_kept",
    ),
}
_CURVES = (
    ("addition", "curve_normalized"),
    ("negation", "curve_target"),
    ("negation", "curve_control"),
)


def aggregate(seeds: list[dict], config: Config) -> dict:
    """Per-seed values of every reported number (lists over seeds) and the mean heat maps."""
    names = seeds[0]["tasks"]
    single = {
        method: {
            "per_task": _per_seed(seeds, "single", method, "test"),
            "tasks": {
                name: [s["single"][method]["test"][i] for s in seeds]
                for i, name in enumerate(names)
            },
        }
        for method in ("pretrained", *METHODS)
    }
    out: dict[str, Any] = {
        "tasks": names,
        "seeds": list(config.seeds),
        "single": single,
        "nonlinear_advantage": _per_seed(seeds, "nonlinear_advantage"),
        "addition": {},
        "negation": {},
        "disentanglement": {},
        "atlas": {},
    }
    for method in METHODS:
        for part, keys in _SCALARS.items():
            out[part][method] = {key: _per_seed(seeds, part, method, key) for key in keys}
        for part, key in _CURVES:
            out[part][method][key] = [s[part][method][key] for s in seeds]
        grids = seeds[0]["disentanglement"][method]["grids"]
        positive = np.asarray(seeds[0]["disentanglement"]["alphas"]) >= 0
        quadrant = np.ix_(positive, positive)
        out["disentanglement"][method] = {
            "mean": _per_seed(seeds, "disentanglement", method, "mean"),
            # the quadrant of task addition (both coefficients >= 0)
            "mean_positive": [
                float(
                    np.mean(
                        [
                            np.asarray(g)[quadrant].mean()
                            for g in s["disentanglement"][method]["grids"].values()
                        ]
                    )
                )
                for s in seeds
            ],
            "pairs": {
                pair: _per_seed(seeds, "disentanglement", method, "grids", pair) for pair in grids
            },
            "mean_box": _per_seed(seeds, "disentanglement", method, "mean_box"),
            "deployed_flips": _per_seed(seeds, "disentanglement", method, "deployed_flips"),
            "pair_flips": {
                pair: _per_seed(seeds, "disentanglement", method, "pair_flips", pair)
                for pair in grids
            },
            "mean_grids": {
                pair: np.mean(
                    [s["disentanglement"][method]["fine_grids"][pair] for s in seeds], axis=0
                ).tolist()
                for pair in seeds[0]["disentanglement"][method]["fine_grids"]
            },
        }
        out.setdefault("locality", {})[method] = {
            key: _per_seed(seeds, "locality", method, key) for key in ("ratio", "own", "cross")
        }
    out["kernel"] = {
        key: _per_seed(seeds, "kernel", key)
        for key in (
            "gradient_cosine_within",
            "gradient_cosine_across",
            "gradient_cosine_ratio",
            "localization",
            "localization_normalized",
        )
    }
    out["kernel"]["eigen_mass"] = [s["kernel"]["eigen_mass"] for s in seeds]
    out["kernel"]["eigen_mass_normalized"] = [s["kernel"]["eigen_mass_normalized"] for s in seeds]
    out["kernel"]["cosines"] = seeds[0]["kernel"]["cosines"]
    out["heatmap_alphas"] = seeds[0]["disentanglement"]["fine_alphas"]
    for method in ATLAS_METHODS:
        out["atlas"][method] = {
            key: _per_seed(seeds, "atlas", method, key) for key in ("absolute", "normalized")
        }
    out["addition_alphas"] = seeds[0]["addition"]["nonlinear"]["alphas"]
    out["negation_alphas"] = seeds[0]["negation"]["nonlinear"]["alphas"]
    out["disentangle_alphas"] = seeds[0]["disentanglement"]["alphas"]
    return out


def _heatmap_keys(config: Config, names: list[str]) -> list[str]:
    keys = []
    for a, b in config.heatmap_pairs:
        if a in names and b in names:
            i, j = sorted((names.index(a), names.index(b)))
            keys.append(f"{names[i]}|{names[j]}")
    if not keys and len(names) >= 2:
        keys.append(f"{names[0]}|{names[1]}")
    return keys


TANGENT = "Ortiz-Jimenez et al. 2023 (tangent)"
ATLAS = "Zhang et al. 2024 (aTLAS)"


def claim_table(agg: dict) -> dict[str, dict[str, list[float]]]:
    """The per-seed values the claims compare, as a :func:`jaxmtl.experiment.seed_table`:
    one arm per method (``"aTLAS <method>"`` for aTLAS, ``"theta_0"`` for the kernel)."""
    add, dis = agg["addition"], agg["disentanglement"]
    table: dict[str, dict[str, list[float]]] = {
        method: {
            "addition normalized": add[method]["normalized"],
            "addition absolute": add[method]["absolute"],
            "addition normalized alpha=1": add[method]["normalized_alpha_one"],
            "negation target": agg["negation"][method]["target"],
            "xi": dis[method]["mean"],
            "xi box": dis[method]["mean_box"],
            "flips": dis[method]["deployed_flips"],
            "locality": agg["locality"][method]["ratio"],
            "single": agg["single"][method]["per_task"],
        }
        for method in METHODS
    }
    for method in ATLAS_METHODS:
        table[f"aTLAS {method}"] = {"addition absolute": agg["atlas"][method]["absolute"]}
    table["theta_0"] = {"gradient cosine ratio": agg["kernel"]["gradient_cosine_ratio"]}
    return table


def _pm(values, scale=100.0, digits=1) -> str:
    return jexp.format_mean_std(values, digits=digits, scale=scale)


def claims(agg: dict) -> list[jexp.Claim]:
    """The claims of the two papers as :class:`jaxmtl.experiment.Claim` s over
    :func:`claim_table` (paired per-seed differences, in points where they are accuracies);
    each statement carries the published numbers and the measured values."""
    add, neg, dis = agg["addition"], agg["negation"], agg["disentanglement"]
    loc, kernel, single, pm = agg["locality"], agg["kernel"], agg["single"], _pm

    def lin(where, statement, metric, direction="higher", scale=100.0, digits=1):
        """Linearized against non-linear FT, in the paper's direction."""
        paper = {"": TANGENT, "aTLAS": ATLAS}.get(where, f"{TANGENT}, {where}")
        args = (direction, 0.0, False, scale, digits)
        return jexp.Claim(paper, statement, metric, "linear", "nonlinear", *args)

    kept = {m: int(min(neg[m]["control_kept"])) for m in ("nonlinear", "linear")}
    pairs = dis["linear"]["pairs"]
    lower = [p for p in pairs if np.mean(pairs[p]) < np.mean(dis["nonlinear"]["pairs"][p])]
    out = [
        lin(
            "Table 2",
            "Task addition, normalized accuracy higher for linearized FT (ViT-B/32 85.2 vs "
            f"77.2; absolute 74.7 vs 70.1): linearized {pm(add['linear']['absolute'])} / "
            f"{pm(add['linear']['normalized'])} vs non-linear {pm(add['nonlinear']['absolute'])}"
            f" / {pm(add['nonlinear']['normalized'])} (abs / norm; theta_0: "
            f"{pm(single['pretrained']['per_task'])} absolute; selected alpha "
            f"{pm(add['linear']['alpha'], 1.0, 2)} vs {pm(add['nonlinear']['alpha'], 1.0, 2)})",
            "addition normalized",
        ),
        lin("Table 2", "Task addition, absolute accuracy higher", "addition absolute"),
        lin(
            "",
            "Task addition at alpha = 1 (linear task vectors survive the plain sum): normalized "
            f"linearized {pm(add['linear']['normalized_alpha_one'])} vs non-linear "
            f"{pm(add['nonlinear']['normalized_alpha_one'])}",
            "addition normalized alpha=1",
        ),
        lin(
            "Table 2",
            "Task negation, target lower for linearized FT (11.5 vs 23.2 at control >= 95% of "
            f"theta_0): linearized {pm(neg['linear']['target'])} vs non-linear "
            f"{pm(neg['nonlinear']['target'])} (control {pm(neg['linear']['control'])} vs "
            f"{pm(neg['nonlinear']['control'])}, theta_0 target "
            f"{pm(neg['nonlinear']['pretrained_target'])}, control "
            f"{pm(neg['nonlinear']['pretrained_control'])}; the 95% constraint, met on "
            f"validation, holds on test for >= {kept['linear']} (linearized) / "
            f"{kept['nonlinear']} (non-linear) of {len(agg['tasks'])} targets in every seed)",
            "negation target",
            "lower",
        ),
        lin(
            "Sec. 4-6, Fig. 3",
            "Weight disentanglement, mean xi (in [0, 2]) over the full grid lower for "
            f"linearized FT: {pm(dis['linear']['mean'], 1.0, 3)} vs non-linear "
            f"{pm(dis['nonlinear']['mean'], 1.0, 3)}; lower in {len(lower)}/{len(pairs)} pairs "
            "(seed means)",
            "xi",
            "lower",
            1.0,
            3,
        ),
        lin(
            "Sec. 4-6, Fig. 3",
            f"Weight disentanglement on the [-1, 1]^2 box: {pm(dis['linear']['mean_box'], 1.0, 3)}"
            f" vs {pm(dis['nonlinear']['mean_box'], 1.0, 3)}",
            "xi box",
            "lower",
            1.0,
            3,
        ),
        lin(
            "aTLAS",
            "Pairwise flip rate at the deployed coefficients (aTLAS's disentanglement error, "
            "xi(alpha*, alpha*) / 2 per task; compared with its re-measured ViT-B/32 6.67% "
            f"non-linear vs 5.69% linearized): linearized {pm(dis['linear']['deployed_flips'])}%"
            f" vs non-linear {pm(dis['nonlinear']['deployed_flips'])}% (each method at its own "
            "selected alpha; points)",
            "flips",
            "lower",
        ),
        lin(
            "Sec. 5",
            "Locality (a linearized task vector acts on its own task's inputs): predictions a "
            "vector flips on the other tasks over those it flips on its own (alpha = 1), "
            f"linearized {pm(loc['linear']['ratio'], 1.0, 2)} vs non-linear "
            f"{pm(loc['nonlinear']['ratio'], 1.0, 2)}",
            "locality",
            "lower",
            1.0,
            2,
        ),
        jexp.Claim(
            f"{TANGENT}, Sec. 5, Prop. 2",
            "The kernel at theta_0 (task arithmetic needs eigenfunctions localized on single "
            "tasks): loss-gradient cosine across tasks / within a task below 1 (within "
            f"{pm(kernel['gradient_cosine_within'], 1.0, 3)}, across "
            f"{pm(kernel['gradient_cosine_across'], 1.0, 3)}); largest task mass of the top "
            f"NTK eigenvectors {pm(kernel['localization'], 1.0, 2)} raw, "
            f"{pm(kernel['localization_normalized'], 1.0, 2)} cosine-normalized (1 = "
            f"localized, {1 / len(agg['tasks']):.2f} = spread evenly). A property of theta_0, "
            "shared by both fine-tuning modes",
            "gradient cosine ratio",
            "theta_0",
            direction="lower",
            threshold=1.0,
            digits=2,
        ),
        jexp.Claim(
            f"{TANGENT}, Sec. 6",
            "Single-task accuracy a little lower for linearized FT (positive non-linear "
            f"advantage): non-linear {pm(single['nonlinear']['per_task'])} vs linearized "
            f"{pm(single['linear']['per_task'])}, advantage "
            f"{pm(agg['nonlinear_advantage'], 1.0, 3)}",
            "single",
            "nonlinear",
            "linear",
            scale=100,
        ),
    ]
    for method in ATLAS_METHODS:
        at, iso = agg["atlas"][method], add[method]
        statement = (
            f"aTLAS beats the isotropic alpha ({LABELS[method]} vectors; B/32 "
            f"{'+14.9' if method == 'nonlinear' else '+8.8'} points absolute): aTLAS "
            f"{pm(at['absolute'])} / {pm(at['normalized'])} vs isotropic "
            f"{pm(iso['absolute'])} / {pm(iso['normalized'])} (abs / norm)"
        )
        arms = ("addition absolute", f"aTLAS {method}", method)
        out.append(jexp.Claim(f"{ATLAS}, Table 1", statement, *arms, scale=100))
    return out


def posthoc_note(agg: dict) -> str:
    """Post-hoc linearization, an ablation of the tangent paper with no direction stated."""
    add, pm = agg["addition"], _pm
    return (
        "Post-hoc linearization (ablation: the non-linear vectors on the linearized model; no "
        f"direction stated in the notes): addition {pm(add['posthoc']['absolute'])} / "
        f"{pm(add['posthoc']['normalized'])} (abs / norm) vs non-linear "
        f"{pm(add['nonlinear']['absolute'])} / {pm(add['nonlinear']['normalized'])}, single-"
        f"task {pm(agg['single']['posthoc']['per_task'])}, xi "
        f"{pm(agg['disentanglement']['posthoc']['mean'], 1.0, 3)}."
    )


def summary_markdown(agg: dict, config: Config, seconds: float) -> str:
    """The summary.md text: the paper's tables with mean ± std over seeds, then the claims."""
    pm = _pm
    names = agg["tasks"]
    source = ""
    if config.data == "tfds":
        limit = "" if config.tfds_limit is None else f", at most {config.tfds_limit} per split"
        source = (
            f"prepared tfds data sets{limit} (the standard task-arithmetic eight as far as "
            "tfds has them: GTSRB is not in the tfds catalog); "
        )
    lines = [
        "# Task arithmetic in the tangent space (and aTLAS) at CPU scale",
        "",
        f"{len(names)} tasks ({', '.join(names)}), {source}{config.image_size}x"
        f"{config.image_size} {'RGB' if config.rgb else 'grayscale'}"
        f"{', standardized per image' if config.standardize else ''}; backbone "
        f"{_backbone_text(config)}, pre-trained {config.pretrain_steps} steps (Adam "
        f"{config.pretrain_lr}) on {_pretrain_text(config)}; frozen linear-probe heads; "
        f"fine-tuning {config.finetune_steps} Adam "
        f"steps (lr {config.finetune_lr}, warm-up {config.warmup_steps} + cosine, clip "
        f"{config.clip_norm}, batch {config.batch_size}), identical for non-linear and "
        f"linearized FT. Seeds {list(config.seeds)}; test accuracy in %, mean ± std over "
        f"seeds ({config.test_examples} test and {config.eval_examples} validation examples "
        f"per task). Wall time of this invocation {seconds:.0f} s, CPU time "
        f"{agg.get('cpu_seconds', float('nan')):.0f} s (cells resumed from an earlier "
        "invocation are read back, not recomputed).",
        "",
        f"Code: commit {agg.get('commit', 'unknown')}; command: `{agg.get('command', '')}`.",
        "",
        "## Single-task accuracy",
        "",
    ]
    labels = {"pretrained": "Pre-trained", **LABELS}
    rows = [
        {"task": name} | {labels[m]: pm(agg["single"][m]["tasks"][name]) for m in labels}
        for name in names
    ]
    rows.append(
        {"task": "**average**"} | {labels[m]: pm(agg["single"][m]["per_task"]) for m in labels}
    )
    lines += [
        jexp.markdown_table(rows),
        "",
        f"Non-linear advantage (mean over tasks, K/(K-1)-normalized error gap): "
        f"{pm(agg['nonlinear_advantage'], 1.0, 3)}.",
        "",
        "## Task addition",
        "",
        f"alpha in linspace{tuple(config.addition_alphas)} chosen on validation by the mean "
        "normalized accuracy (accuracy / the method's own single-task accuracy).",
        "",
    ]
    rows = []
    for method in METHODS:
        a = agg["addition"][method]
        rows.append(
            {
                "method": LABELS[method],
                "abs. acc": pm(a["absolute"]),
                "norm. acc": pm(a["normalized"]),
                "alpha": pm(a["alpha"], 1.0, 2),
                "abs. acc (alpha=1)": pm(a["absolute_alpha_one"]),
                "norm. acc (alpha=1)": pm(a["normalized_alpha_one"]),
            }
        )
    for method in ATLAS_METHODS:
        a = agg["atlas"][method]
        rows.append(
            {
                "method": f"{LABELS[method]} + aTLAS",
                "abs. acc": pm(a["absolute"]),
                "norm. acc": pm(a["normalized"]),
                "alpha": "learned per block",
            }
        )
    lines += [jexp.markdown_table(rows), "", "## Task negation", ""]
    lines += [
        f"theta_0 - alpha tau_t, alpha in linspace{tuple(config.negation_alphas)}: the lowest "
        f"validation target accuracy with control (the other tasks) >= "
        f"{config.negation_threshold} x theta_0's; means over the {len(names)} targets.",
        "",
    ]
    neg = agg["negation"]
    rows = [
        {
            "method": "Pre-trained",
            "target (↓)": pm(neg["nonlinear"]["pretrained_target"]),
            "control": pm(neg["nonlinear"]["pretrained_control"]),
        }
    ]
    for method in METHODS:
        n = neg[method]
        rows.append(
            {
                "method": LABELS[method],
                "target (↓)": pm(n["target"]),
                "control": pm(n["control"]),
                "mean alpha": pm(n["alpha"], 1.0, 2),
                "targets with test control kept": pm(n["control_kept"], 1.0, 1)
                + f" / {len(names)}",
            }
        )
    lines += [jexp.markdown_table(rows), "", "## Weight disentanglement", ""]
    lines += [
        f"xi(alpha_1, alpha_2) (Eq. 3, prediction disagreement summed over the two tasks, in "
        f"[0, 2]) on the grid linspace{tuple(config.disentangle_alphas)}^2, "
        f"{config.disentangle_examples} validation inputs per task; mean over the grid.",
        "",
    ]
    dis = agg["disentanglement"]
    rows = []
    for method in METHODS:
        row = {
            "method": LABELS[method],
            "xi, full grid": pm(dis[method]["mean"], 1.0, 3),
            "xi, [-1, 1]^2 box": pm(dis[method]["mean_box"], 1.0, 3),
            "xi, alphas >= 0": pm(dis[method]["mean_positive"], 1.0, 3),
            "flip rate at alpha* (%)": pm(dis[method]["deployed_flips"]),
        }
        rows.append(row)
    lines += [
        jexp.markdown_table(rows),
        "",
        "The flip rate at alpha* is xi(alpha*, alpha*) / 2 at each method's selected addition "
        "coefficient: the share of a pair's inputs whose prediction the other task's vector "
        "changes (aTLAS's pairwise disentanglement error). Every pair (xi over the full grid; "
        "flip rate at alpha* in %):",
        "",
    ]
    rows = [
        {"pair": pair.replace("|", " / ")}
        | {f"xi {LABELS[m]}": pm(dis[m]["pairs"][pair], 1.0, 3) for m in METHODS}
        | {f"flips {LABELS[m]}": pm(dis[m]["pair_flips"][pair]) for m in ("nonlinear", "linear")}
        for pair in dis["nonlinear"]["pairs"]
    ]
    loc, kernel = agg["locality"], agg["kernel"]
    lines += [jexp.markdown_table(rows), "", "## Locality and the kernel at theta_0", ""]
    lines += [
        "Flips of task vector t (alpha = 1) against theta_0's predictions: on its own test "
        "inputs and on the other tasks' (through their heads); ratio cross / own (1 = no "
        "localization).",
        "",
        jexp.markdown_table(
            [
                {
                    "method": LABELS[m],
                    "own flips (%)": pm(loc[m]["own"]),
                    "cross flips (%)": pm(loc[m]["cross"]),
                    "cross / own": pm(loc[m]["ratio"], 1.0, 2),
                }
                for m in METHODS
            ]
        ),
        "",
        f"Kernel at theta_0 on {config.kernel_examples} validation inputs per task: "
        "per-example loss-gradient cosines within a task and across tasks, and the largest "
        f"task mass of the top {config.kernel_eigenvectors} eigenvectors of the empirical NTK "
        "(logits projected on a Gaussian direction per example; 1 = localized, "
        f"{1 / len(names):.2f} = spread evenly), of the raw kernel (whose top eigenvectors "
        "follow the task with the largest kernel scale) and of the cosine-normalized kernel "
        "k(x, x') / sqrt(k(x, x) k(x', x')); see kernel.png.",
        "",
        jexp.markdown_table(
            [
                {
                    "cosine within": pm(kernel["gradient_cosine_within"], 1.0, 3),
                    "cosine across": pm(kernel["gradient_cosine_across"], 1.0, 3),
                    "across / within": pm(kernel["gradient_cosine_ratio"], 1.0, 2),
                    "NTK eigenvector localization": pm(kernel["localization"], 1.0, 2),
                    "normalized NTK": pm(kernel["localization_normalized"], 1.0, 2),
                }
            ]
        ),
        "",
        "## Paper claims",
        "",
    ]
    lines += [jexp.claims_markdown(agg["claims"], smoke=config.smoke), "", posthoc_note(agg), ""]
    return "\n".join(lines)


def _backbone_text(config: Config) -> str:
    if config.backbone != "mlp":
        return f"{config.backbone} {list(config.hidden)} -> {config.features}"
    widths = "-".join(
        str(w) for w in (config.image_size**2 * _channels(config), *config.hidden, config.features)
    )
    norm = "LayerNorm + " if config.norm == "layernorm" else ""
    return f"MLP {widths} ({norm}{config.activation.upper()})"


def _pretrain_text(config: Config) -> str:
    if config.pretrain_steps == 0:
        return "nothing (theta_0 is the random initialization)"
    if config.pretrain_data == "glyphs":
        return (
            f"jaxmtl.data.glyphs ({config.glyphs_per_class} x 177 classes of rendered "
            "characters, 80% of them; no evaluated task's label)"
        )
    tasks = ", ".join(config.pretrain_tasks) if config.pretrain_tasks else "the evaluated tasks"
    return (
        f"{tasks} (multi-task), using {config.pretrain_fraction:.0%} of their sources' training "
        "splits (the rest is for fine-tuning)"
    )


def plot(agg: dict, run_dir: jexp.RunDir, config: Config) -> None:
    """alpha_curves.png (addition and negation), disentanglement.png (xi heat maps on the
    finer grid) and kernel.png (gradient cosines and the NTK eigenvectors' task mass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"nonlinear": "tab:blue", "linear": "tab:orange", "posthoc": "tab:green"}
    fig, ((ax_add, ax_neg),) = jexp.figure(1, 2, size=(6.0, 4.4))
    alphas = np.asarray(agg["addition_alphas"])
    jexp.plot_curves(
        ax_add,
        alphas,
        {LABELS[m]: agg["addition"][m]["curve_normalized"] for m in METHODS},
        scale=100,
        colors={LABELS[m]: c for m, c in colors.items()},
        marker=None,
        xlabel="alpha (dotted: the selected alpha, mean over seeds)",
        ylabel="mean normalized accuracy (%)",
        title="Task addition (validation; mean ± std over seeds)",
    )
    for method in METHODS:
        chosen = float(np.mean(agg["addition"][method]["alpha"]))
        ax_add.axvline(chosen, color=colors[method], ls=":", lw=1)
    level = 100 * np.mean([c[0] for c in agg["addition"]["nonlinear"]["curve_normalized"]])
    ax_add.axhline(level, color="gray", ls="--", lw=1, label="theta_0 (alpha = 0)")
    ax_add.legend(fontsize=8)
    for method in METHODS:
        neg = agg["negation"][method]
        base = np.mean(neg["pretrained_control"])
        control = 100 * np.asarray(neg["curve_control"]).mean(0) / max(base, 1e-9)
        target = 100 * np.asarray(neg["curve_target"]).mean(0)
        ax_neg.plot(control, target, "o-", ms=3, color=colors[method], label=LABELS[method])
    ax_neg.axvline(
        100 * config.negation_threshold, color="gray", ls="--", lw=1, label="control threshold"
    )
    ax_neg.invert_xaxis()
    ax_neg.set(
        xlabel="control accuracy, % of theta_0's (other tasks; alpha grows to the right)",
        ylabel="target accuracy (%)",
        title="Task negation (validation): target vs control",
    )
    ax_neg.legend(fontsize=8)
    title = f"Task arithmetic along alpha ({len(agg['tasks'])} tasks)"
    run_dir.savefig(jexp.finish_figure(fig, title, smoke=config.smoke), "alpha_curves")

    dis = agg["disentanglement"]
    pairs = list(dis["nonlinear"]["mean_grids"])
    alphas = np.asarray(agg["heatmap_alphas"])
    if pairs:
        fig, axes = plt.subplots(
            len(pairs),
            len(METHODS),
            figsize=(3.9 * len(METHODS) + 1.0, 3.4 * len(pairs)),
            squeeze=False,
            layout="constrained",
        )
        top = max(float(np.max(dis[m]["mean_grids"][p])) for m in METHODS for p in pairs) or 1.0
        extent = (alphas[0], alphas[-1], alphas[0], alphas[-1])
        for row, pair in zip(axes, pairs, strict=True):
            first, second = pair.split("|")
            grids = {LABELS[m]: np.asarray(dis[m]["mean_grids"][pair]).T for m in METHODS}
            image = jexp.plot_heatmaps(
                row,
                grids,
                xlabel=f"alpha {first}",
                ylabel=f"alpha {second}",
                colorbar_label="xi (mean over seeds)",
                limits=(0.0, top),
                extent=extent,
                colorbar=False,  # one bar for every row (one colour scale)
            )
            for ax in row:
                ax.plot([-1, 1, 1, -1, -1], [-1, -1, 1, 1, -1], "w:", lw=1)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="xi (mean over seeds)")
        title = "Weight disentanglement xi over two tasks' alphas (dotted: the box [-1, 1]^2)"
        run_dir.savefig(jexp.finish_figure(fig, title, smoke=config.smoke), "disentanglement")

    kernel, names = agg["kernel"], agg["tasks"]
    fig, (ax_cos, ax_mass, ax_norm) = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    if kernel["cosines"]:
        image = ax_cos.imshow(np.asarray(kernel["cosines"]), cmap="RdBu_r", vmin=-1, vmax=1)
        k = config.kernel_examples
        ticks = [k * i + k / 2 - 0.5 for i in range(len(names))]
        ax_cos.set(xticks=ticks, yticks=ticks, title="Loss-gradient cosines at theta_0 (seed 0)")
        ax_cos.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax_cos.set_yticklabels(names, fontsize=7)
        k_text = f"{config.kernel_examples} examples per task"
        ax_cos.set(xlabel=f"example ({k_text})", ylabel=f"example ({k_text})")
        fig.colorbar(image, ax=ax_cos, shrink=0.8, label="cosine")
    panels = (
        (ax_mass, "eigen_mass", "NTK eigenvectors' task mass at theta_0 (seed 0)"),
        (ax_norm, "eigen_mass_normalized", "the same, cosine-normalized NTK"),
    )
    for ax, key, title in panels:
        mass = np.asarray(kernel[key][0])
        bottom = np.zeros(len(mass))
        for t, name in enumerate(names):
            ax.bar(np.arange(1, len(mass) + 1), mass[:, t], bottom=bottom, label=name)
            bottom += mass[:, t]
        ax.set(
            xlabel="eigenvector (by decreasing eigenvalue)",
            ylabel="mass on each task's inputs",
            title=title,
        )
        ax.legend(fontsize=7)
    title = "Kernel at theta_0: gradient cosines and task localization of the NTK"
    run_dir.savefig(jexp.finish_figure(fig, title, smoke=config.smoke), "kernel")


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _commit() -> str:
    """The git commit of the code (12 digits, ``+dirty`` with uncommitted changes to tracked
    files), from :func:`jaxmtl.experiment.provenance`."""
    git = jexp.provenance()["git"]
    return git["commit"][:12] + ("+dirty" if git["dirty"] is True else "")


PROG = "python -m experiments.tangent_task_arithmetic"


def _command() -> str:
    """The command line of this run (from :func:`main`), else how it was called."""
    if sys.argv and sys.argv[0] == PROG:
        return " ".join([PROG, *sys.argv[1:]])
    return "experiments.tangent_task_arithmetic.run(config) (the config: config.json)"


def run(config: Config) -> dict:
    """Runs every seed (pre-training, fine-tuning cells, evaluation), writes the run
    directory and returns the results; with ``Config.ablation``, the ablation instead
    (:func:`run_ablation`)."""
    if config.ablation:
        return run_ablation(config)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    effective = config.effective()
    # the data first: a set that is missing (or too small) fails before the run directory
    tasks, pretrain_tasks = prepare_tasks(effective)
    run_dir = jexp.RunDir(effective.out_dir, config)
    backbone = make_backbone(effective)
    logits_fn = make_logits_fn(backbone)
    steps = make_steps(effective, backbone, tasks, pretrain_tasks)

    def compute(arm: str, seed: int) -> dict:
        args = (effective, tasks, pretrain_tasks, backbone, logits_fn, steps, seed, run_dir)
        return run_seed(*args)

    stamp = jexp.config_stamp(effective)  # without out_dir / resume: a moved run resumes
    cells = jexp.run_cells(
        run_dir, [NAME], effective.seeds, compute, stamp=stamp, progress=not effective.smoke
    )
    per_seed = list(cells[NAME].values())
    agg = aggregate(per_seed, effective)
    agg["claims"] = jexp.check_claims(claims(agg), claim_table(agg), smoke=effective.smoke)
    seconds = time.perf_counter() - start
    agg["seconds"] = seconds
    agg["cpu_seconds"] = _cpu_seconds() - cpu_start
    agg["commit"], agg["command"] = _commit(), _command()
    agg["per_seed"] = per_seed
    run_dir.write_results(agg)
    run_dir.write_summary(summary_markdown(agg, effective, seconds))
    plot(agg, run_dir, effective)
    return agg


# (pre-training, MLP, inputs) of the ablation; the first is the default design
ABLATION = tuple(
    itertools.product(("glyphs", "tasks"), ("layernorm+gelu", "relu"), ("standardized", "raw"))
)


def _ablation_config(config: Config, pretrain: str, mlp: str, inputs: str) -> Config:
    name = f"{pretrain}-{mlp.replace('+', '-')}-{inputs}"
    return dataclasses.replace(
        config,
        ablation=False,
        seeds=config.seeds[:1],
        out_dir=str(Path(config.out_dir) / "ablation" / name),
        pretrain_data=pretrain,
        activation="gelu" if mlp == "layernorm+gelu" else "relu",
        norm="layernorm" if mlp == "layernorm+gelu" else None,
        standardize=inputs == "standardized",
    )


def ablation_row(agg: dict) -> dict[str, Any]:
    """One seed's headline numbers, each a (linearized, non-linear) pair where it compares."""

    def both(part, key, scale=100.0):
        lin, nl = agg[part]["linear"][key][0] * scale, agg[part]["nonlinear"][key][0] * scale
        return lin, nl

    return {
        "theta_0": 100 * agg["single"]["pretrained"]["per_task"][0],
        "ft": both("single", "per_task")[::-1],
        "addition": both("addition", "normalized"),
        "negation": both("negation", "target"),
        "xi": both("disentanglement", "mean", 1.0),
        "locality": both("locality", "ratio", 1.0),
        "cosine_ratio": agg["kernel"]["gradient_cosine_ratio"][0],
        "localization": agg["kernel"]["localization"][0],
    }


def ablation_markdown(rows: list[tuple[tuple[str, str, str], dict]], seed: int) -> str:
    """The ablation table: one row per variant; a claim cell is starred where it goes the
    paper's way (addition higher, negation target, xi and cross/own flips lower for
    linearized FT)."""
    table = []
    wins_total = []
    for (pretrain, mlp, inputs), r in rows:
        wins = {
            "addition": r["addition"][0] > r["addition"][1],
            "negation": r["negation"][0] < r["negation"][1],
            "xi": r["xi"][0] < r["xi"][1],
            "locality": r["locality"][0] < r["locality"][1],
        }
        wins_total.append(sum(wins.values()))

        def cell(key, digits=1):
            lin, nl = r[key]
            return f"{lin:.{digits}f} vs {nl:.{digits}f}{' ✓' if wins[key] else ''}"

        table.append(
            {
                "pre-training": pretrain,
                "MLP": mlp,
                "inputs": inputs,
                "theta_0 / FT nl / lin": (
                    f"{r['theta_0']:.1f} / {r['ft'][0]:.1f} / {r['ft'][1]:.1f}"
                ),
                "addition norm. lin vs nl": cell("addition"),
                "negation target lin vs nl": cell("negation"),
                "xi lin vs nl": cell("xi", 3),
                "cross/own flips lin vs nl": cell("locality", 2),
                "grad. cosine across/within": f"{r['cosine_ratio']:.2f}",
                "NTK localization": f"{r['localization']:.2f}",
                "claims won": f"{wins_total[-1]}/4",
            }
        )
    return "\n".join(
        [
            "# Ablation: which ingredient carries which claim",
            "",
            f"Seed {seed}, one run per variant (test %, the default settings otherwise). "
            "Each claim cell reads linearized vs non-linear FT; ✓ where it goes the paper's "
            "way (normalized addition higher; negation target, xi and cross/own flips lower). "
            "The last two columns describe the kernel at theta_0 (the same for both modes).",
            "",
            jexp.markdown_table(table),
            "",
        ]
    )


def run_ablation(config: Config) -> dict:
    """(pre-training: glyphs | the tasks' labels) x (MLP: LayerNorm + GELU | ReLU) x
    (inputs: standardized | raw), the first seed, each variant a run of its own under
    ``<out_dir>/ablation/<variant>`` (resumable like any run); writes ablation.md and
    ablation.json in a run directory of its own."""
    run_dir = jexp.RunDir(Path(config.out_dir) / "ablation", config)
    rows = []
    for variant in ABLATION:
        sub = _ablation_config(config, *variant)
        if config.resume is not None:
            sub = dataclasses.replace(sub, resume="latest")
        rows.append((variant, ablation_row(run(sub))))
    seed = config.effective().seeds[0]
    markdown = ablation_markdown(rows, seed)
    run_dir.write_summary(markdown)
    (run_dir.path / "ablation.md").write_text(markdown)
    result = {"ablation": [{"variant": list(v), **r} for v, r in rows]}
    run_dir.write_results(result)
    return result


def main() -> None:
    """``python -m experiments.tangent_task_arithmetic [OPTIONS]`` (``--help`` lists them)."""
    sys.argv[0] = PROG  # the usage line of --help, and the command in summary.md
    jexp.cli(Config, run)


if __name__ == "__main__":
    main()
