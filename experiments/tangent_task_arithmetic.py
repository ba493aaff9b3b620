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
checkpoints (``vectors/``) and each seed's evaluation as JSON (``seeds/``); ``--resume
latest`` continues an interrupted run in its directory and skips every finished cell.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
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
    seeds: tuple[int, ...] = (0, 1, 2)
    out_dir: str = "runs/tangent_task_arithmetic"
    resume: str | None = None  # "latest" or a run directory: finished cells are not redone
    # evaluated tasks: "source" or "source:task" (a task of a multi-task source)
    tasks: tuple[str, ...] = (
        "digits",
        "textures",
        "mnist1d",
        "shapes:shape",
        "shapes:orientation",
        "multi_digits:left",
    )
    # pre-training tasks; () = the evaluated tasks themselves (on a disjoint share of data)
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
    pretrain_fraction: float = 0.3  # share of a pre-training source's train split it uses
    pretrain_steps: int = 500  # 0: theta_0 is the random initialization
    pretrain_lr: float = 1e-3
    probe_steps: int = 500
    probe_lr: float = 1e-2
    finetune_steps: int = 300
    finetune_lr: float = 3e-4
    warmup_steps: int = 30
    clip_norm: float = 1.0
    batch_size: int = 128
    eval_examples: int = 256  # per task, from its validation and from its test split
    addition_alphas: tuple[float, float, int] = (0.0, 1.0, 21)  # linspace(start, stop, num)
    negation_alphas: tuple[float, float, int] = (0.0, 2.0, 21)
    negation_threshold: float = 0.95  # control accuracy kept, relative to theta_0
    disentangle_alphas: tuple[float, float, int] = (-2.0, 2.0, 9)
    disentangle_examples: int = 128  # per task
    heatmap_pairs: tuple[tuple[str, str], ...] = (
        ("digits", "textures"),
        ("shapes:shape", "shapes:orientation"),
        ("digits", "multi_digits:left"),
    )
    atlas_steps: int = 300
    atlas_lr: float = 1e-2
    atlas_batch: int = 256
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
            hidden=(32,),
            features=16,
            pretrain_steps=30,
            probe_steps=20,
            finetune_steps=10,
            warmup_steps=2,
            batch_size=32,
            eval_examples=32,
            addition_alphas=(0.0, 1.0, 5),
            negation_alphas=(0.0, 2.0, 5),
            disentangle_alphas=(-1.0, 1.0, 3),
            disentangle_examples=16,
            atlas_steps=5,
            atlas_batch=32,
        )


_SMOKE_TFDS_LIMIT = 500  # examples per split that smoke mode reads of a tfds set


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
    if name not in ("digits", "textures", "photos", "mnist1d", "shapes", "multi_digits"):
        raise ValueError(f"tasks: unknown source {name!r}")
    return getattr(jdata, name)(**(small.get(name, {}) if smoke else {}))


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
    first (:func:`check_tfds`).
    """
    if config.data == "tfds":
        check_tfds(config)
    pretrain_specs = config.pretrain_tasks or config.tasks
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
        for split in ("validation", "test"):
            n = len(splits[split]["y"])
            if n < config.eval_examples:
                raise ValueError(
                    f"eval_examples={config.eval_examples} exceeds the {n} {split} examples "
                    f"of {spec}"
                )
            picks[split] = np.random.default_rng(1).permutation(n)[: config.eval_examples]
        return TaskData(
            name=spec,
            num_classes=int(ds.num_classes[0 if column is None else column]),
            pretrain=_subset(splits["train"], np.sort(order[:cut]), column),
            train=_subset(splits["train"], np.sort(order[cut:]), column),
            validation=_subset(splits["validation"], picks["validation"], column),
            test=_subset(splits["test"], picks["test"], column),
        )

    return [task(s) for s in config.tasks], [task(s) for s in pretrain_specs]


# --------------------------------------------------------------------------- model


def _module(config: Config, seed: int) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    channels = _channels(config)
    if config.backbone == "mlp":
        inputs = config.image_size**2 * channels
        return models.MLP(inputs, config.hidden, config.features, rngs=rngs)
    if config.backbone == "cnn":
        return models.CNN(channels, config.hidden, config.features, rngs=rngs)
    raise ValueError(f"backbone: expected 'mlp' or 'cnn', got {config.backbone!r}")


def make_backbone(config: Config) -> Callable[[Any, jax.Array], jax.Array]:
    """The backbone ``apply(params, x (N, S, S) or (N, S, S, 3)) -> features (N, F)``, one
    object per run.

    One function object for every seed, so that compiled evaluations are reused.
    """
    apply_fn, _ = models.functional(_module(config, 0))
    if config.backbone == "mlp":
        return lambda params, x: apply_fn(params, x.reshape(x.shape[0], -1))
    if config.rgb:
        return apply_fn
    return lambda params, x: apply_fn(params, x[..., None])


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


def _train(
    init: Any,
    loss_fn: Callable,
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
    """``jaxmtl.train.fit`` of ``loss_fn(params, batch) -> loss``; returns (params, history).

    optax 0.2.8's adam computes ``decay ** count`` (Python float ** int32), which strict
    dtype promotion (the test configuration) rejects: training uses the standard rules.
    """

    def with_metrics(params, batch, rng):
        del rng
        return loss_fn(params, batch), {}

    with jax.numpy_dtype_promotion("standard"):
        state, history = jtrain.fit(
            jtrain.init_state(init, optimizer, seed=seed),
            jtrain.make_train_step(with_metrics, optimizer),
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
    seed: int,
) -> dict:
    """theta_0 and the frozen heads: ``{"params0", "heads"}``.

    The backbone is trained multi-task on the pre-training tasks' shares (one head per
    pre-training task, then discarded), then one linear probe per evaluated task is fitted
    on its theta_0 features and frozen.
    """
    params0 = init_backbone(config, seed)
    if config.pretrain_steps > 0 and pretrain_tasks:
        width = max(t.num_classes for t in pretrain_tasks)
        mask = jnp.asarray(class_mask(pretrain_tasks))
        init = {
            "backbone": params0,
            "w": jax.random.normal(jax.random.key(seed), (len(mask), config.features, width))
            * 0.01,
            "b": jnp.zeros((len(mask), width)),
        }

        def pretrain_loss(params, batch):
            z = backbone(params["backbone"], batch["x"])
            logits = head_logits(z, {"w": params["w"], "b": params["b"] + mask}, batch["task"])
            return _cross_entropy(logits, batch["y"])

        trained, _ = _train(
            init,
            pretrain_loss,
            _optimizer(config, config.pretrain_lr, config.pretrain_steps),
            _pool(pretrain_tasks, "pretrain"),
            steps=config.pretrain_steps,
            batch_size=config.batch_size,
            seed=seed,
            log_every=max(config.pretrain_steps // 4, 1),
            progress=not config.smoke,
            mesh=config.mesh,
        )
        params0 = trained["backbone"]
    return {"params0": params0, "heads": fit_probes(config, tasks, backbone, params0, seed)}


def fit_probes(
    config: Config, tasks: list[TaskData], backbone: Callable, params0: Any, seed: int
) -> dict:
    """One linear probe per task on the theta_0 features of its fine-tuning split."""
    pool = _pool(tasks, "train")
    features = jax.jit(backbone)(params0, jnp.asarray(pool["x"]))
    data = {"z": np.asarray(features), "y": pool["y"], "task": pool["task"]}
    width = max(t.num_classes for t in tasks)
    mask = jnp.asarray(class_mask(tasks))
    init = {
        "w": jnp.zeros((len(tasks), config.features, width)),
        "b": jnp.zeros((len(tasks), width)),
    }

    def probe_loss(heads, batch):
        logits = head_logits(batch["z"], {"w": heads["w"], "b": heads["b"] + mask}, batch["task"])
        return _cross_entropy(logits, batch["y"])

    heads, _ = _train(
        init,
        probe_loss,
        optax.adam(config.probe_lr),
        data,
        steps=config.probe_steps,
        batch_size=min(4 * config.batch_size, len(data["y"])),
        seed=seed,
        mesh=config.mesh,
    )
    return {"w": heads["w"], "b": heads["b"] + mask}


def finetune(
    config: Config,
    backbone: Callable,
    params0: Any,
    heads: dict,
    index: int,
    data: dict[str, np.ndarray],
    mode: str,
    seed: int,
) -> tuple[Any, float]:
    """Fine-tunes task ``index`` through its frozen head; returns ``(tau, final loss)``.

    ``mode="linear"`` trains the params of ``linearize(backbone, theta_0)`` (Ortiz-Jimenez
    et al., NeurIPS 2023, Eq. 4); both modes share the recipe, steps, batches and seed.
    """
    model = backbone if mode == "nonlinear" else tv.linearize(backbone, params0)
    w, b = heads["w"][index], heads["b"][index]

    def loss_fn(params, batch):
        return _cross_entropy(model(params, batch["x"]) @ w + b, batch["y"])

    params, history = _train(
        params0,
        loss_fn,
        _optimizer(config, config.finetune_lr, config.finetune_steps),
        data,
        steps=config.finetune_steps,
        batch_size=config.batch_size,
        seed=seed,
        mesh=config.mesh,
    )
    return tv.task_vector(params, params0), float(history[-1]["loss"])


# --------------------------------------------------------------------------- evaluation


_edit_accuracies = jax.jit(
    tv.edit_accuracies, static_argnums=0, static_argnames=("head", "mode", "batch_size")
)
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
    out: dict[str, Any] = {"tasks": names}

    # Single-task accuracies: theta_0 and theta_0 + tau_t on task t (coefficients 0 and 1).
    single: dict[str, dict[str, list[float]]] = {}
    pre = {"validation": [], "test": []}
    for method, (kind, mode) in METHODS.items():
        single[method] = {"validation": [], "test": []}
        for i in range(num):
            for split, pairs in (("validation", val), ("test", test)):
                x, y = pairs[i]
                acc = _edit_accuracies(
                    logits_fn, params0, [vectors[kind][i]], jnp.array([0.0, 1.0]), x, y, mode=mode
                )
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

    # Weight disentanglement error of every pair (cached JVPs for the linearized model).
    pairs = list(itertools.combinations(range(num), 2))
    k = config.disentangle_examples
    dis_inputs = [task_inputs(t.validation["x"][:k], i, heads) for i, t in enumerate(tasks)]
    alphas = _grid(config.disentangle_alphas)
    disentanglement = {}
    for method, (kind, mode) in METHODS.items():
        grids = {}
        for i, j in pairs:
            xi = _disentanglement(
                logits_fn,
                params0,
                vectors[kind][i],
                vectors[kind][j],
                dis_inputs[i],
                dis_inputs[j],
                alphas,
                mode=mode,
            )
            grids[f"{names[i]}|{names[j]}"] = np.asarray(xi).tolist()
        disentanglement[method] = {
            "mean": float(np.mean([np.mean(g) for g in grids.values()])),
            "grids": grids,
        }
    out["disentanglement"] = {"alphas": _floats(alphas), **disentanglement}

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
            float(_edit_accuracies(logits_fn, params0, [edit], jnp.ones(1), x, y, mode=mode)[0])
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
    return out


# --------------------------------------------------------------------------- the study


def _cache_key(config: Config) -> str:
    """A hash of everything that determines theta_0 and the frozen heads.

    The fields added with the tfds path enter only when they differ from the offline
    default, so that the keys of offline runs (and their caches) stay what they were.
    """
    fields = (
        "smoke tasks pretrain_tasks image_size backbone hidden features pretrain_fraction "
        "pretrain_steps pretrain_lr probe_steps probe_lr warmup_steps clip_norm batch_size"
    ).split()
    values = {f: getattr(config, f) for f in fields}
    if config.data != "offline":
        values.update(data=config.data, tfds_limit=config.tfds_limit)
    if config.rgb:
        values["rgb"] = True
    text = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


def run_seed(
    config: Config,
    tasks: list[TaskData],
    pretrain_tasks: list[TaskData],
    backbone: Callable,
    logits_fn: Callable,
    seed: int,
    run_dir: jexp.RunDir,
    progress: Any,
) -> dict:
    """Pre-training (cached), the fine-tuning cells (stored), then the seed's evaluation."""
    seed_path = run_dir.subdir("seeds") / f"seed{seed}.json"
    if seed_path.exists():
        progress.update(2 * len(tasks))
        return json.loads(seed_path.read_text())
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
        cache.resolve(), lambda: pretrain(config, tasks, pretrain_tasks, backbone, seed), like=like
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
                tau, loss = finetune(
                    config, backbone, params0, heads, index, task.train, mode, seed
                )
                record.update(seconds=time.perf_counter() - cell_start, loss=loss)
                return tau

            vectors[mode].append(jexp.cached(path.resolve(), compute, like=tau_like))
            if record:
                run_dir.log({"seed": seed, "task": task.name, "mode": mode, **record})
            progress.update(1)
    progress.set_postfix_str(f"seed {seed}: evaluating")
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
    _write_json(seed_path, result)
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
            "mean_grids": {
                pair: np.mean(
                    [s["disentanglement"][method]["grids"][pair] for s in seeds], axis=0
                ).tolist()
                for pair in _heatmap_keys(config, names)
            },
        }
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


def _verdict(diffs: list[float], digits: int = 1) -> str:
    """Judges paired per-seed differences, positive in the paper's direction.

    "reproduces" needs every seed in the paper's direction; the mean ± std of the
    differences is given with every verdict, so that a tiny consistent gap reads as such.
    """
    wins, n = sum(d > 0 for d in diffs), len(diffs)
    mean, std = jexp.mean_std(diffs)
    gap = f"{wins}/{n} seeds, difference {mean:+.{digits}f} ± {std:.{digits}f}"
    if wins == n and mean > 0:
        return f"reproduces ({gap})"
    if mean > 0:
        return f"same direction on average, not in every seed ({gap})"
    return f"does not reproduce ({gap})"


def _diff(a: list[float], b: list[float], scale: float = 100.0) -> list[float]:
    return [scale * (x - y) for x, y in zip(a, b, strict=True)]


def claims(agg: dict) -> list[str]:
    """One sentence per claim of the two papers, judged on the per-seed numbers."""
    add, neg, dis = agg["addition"], agg["negation"], agg["disentanglement"]
    out = []

    def pm(values, scale=100.0, digits=1):
        return jexp.format_mean_std(values, digits=digits, scale=scale)

    d_norm = _diff(add["linear"]["normalized"], add["nonlinear"]["normalized"])
    d_abs = _diff(add["linear"]["absolute"], add["nonlinear"]["absolute"])
    out.append(
        "Task addition (tangent paper Table 2, ViT-B/32 74.7/85.2 vs 70.1/77.2 abs/norm): "
        f"linearized {pm(add['linear']['absolute'])} / {pm(add['linear']['normalized'])} vs "
        f"non-linear {pm(add['nonlinear']['absolute'])} / {pm(add['nonlinear']['normalized'])}"
        f" (theta_0: {pm(agg['single']['pretrained']['per_task'])} absolute); normalized: "
        f"{_verdict(d_norm)}; absolute: {_verdict(d_abs)}."
    )
    d_target = _diff(neg["nonlinear"]["target"], neg["linear"]["target"])
    kept = {m: int(min(neg[m]["control_kept"])) for m in ("nonlinear", "linear")}
    out.append(
        "Task negation (Table 2, target 11.5 vs 23.2 at control >= 95% of theta_0): target "
        f"linearized {pm(neg['linear']['target'])} vs non-linear {pm(neg['nonlinear']['target'])}"
        f" (control {pm(neg['linear']['control'])} vs {pm(neg['nonlinear']['control'])}, "
        f"pre-trained {pm(neg['nonlinear']['pretrained_control'])}; the 95% constraint, met "
        f"on validation, holds on test for >= {kept['linear']} (linearized) / "
        f"{kept['nonlinear']} (non-linear) of {len(agg['tasks'])} targets in every seed): "
        f"{_verdict(d_target)}."
    )
    d_xi = _diff(dis["nonlinear"]["mean"], dis["linear"]["mean"], 1.0)
    d_pos = _diff(dis["nonlinear"]["mean_positive"], dis["linear"]["mean_positive"], 1.0)
    pairs = dis["linear"]["pairs"]
    lower = [p for p in pairs if np.mean(pairs[p]) < np.mean(dis["nonlinear"]["pairs"][p])]
    out.append(
        "Weight disentanglement (Sec. 4-6, mean pairwise error 6.67% vs 5.69%): mean xi over "
        f"the grid and all pairs, linearized {pm(dis['linear']['mean'], 1.0, 3)} vs non-linear "
        f"{pm(dis['nonlinear']['mean'], 1.0, 3)}: {_verdict(d_xi, 3)}; lower for linearized FT "
        f"in {len(lower)}/{len(pairs)} pairs (seed means). Secondary, the addition quadrant "
        f"(alphas >= 0 only): {pm(dis['linear']['mean_positive'], 1.0, 3)} vs "
        f"{pm(dis['nonlinear']['mean_positive'], 1.0, 3)}: {_verdict(d_pos, 3)}."
    )
    single = agg["single"]
    d_single = _diff(single["nonlinear"]["per_task"], single["linear"]["per_task"])
    out.append(
        "Single-task accuracy (Sec. 6, linearized FT a little lower: positive non-linear "
        f"advantage): non-linear {pm(single['nonlinear']['per_task'])} vs linearized "
        f"{pm(single['linear']['per_task'])}, advantage "
        f"{pm(agg['nonlinear_advantage'], 1.0, 3)}: {_verdict(d_single)}."
    )
    for method in ATLAS_METHODS:
        at, iso = agg["atlas"][method], add[method]
        d = _diff(at["absolute"], iso["absolute"])
        out.append(
            f"aTLAS beats the isotropic alpha (aTLAS Table 1, {LABELS[method]} vectors; B/32 "
            f"{'+14.9' if method == 'nonlinear' else '+8.8'} points absolute): aTLAS "
            f"{pm(at['absolute'])} / {pm(at['normalized'])} vs isotropic "
            f"{pm(iso['absolute'])} / {pm(iso['normalized'])} (abs / norm): {_verdict(d)}."
        )
    out.append(
        "Post-hoc linearization (ablation: the non-linear vectors on the linearized model; no "
        f"direction stated in the notes): addition {pm(add['posthoc']['absolute'])} / "
        f"{pm(add['posthoc']['normalized'])} (abs / norm) vs non-linear "
        f"{pm(add['nonlinear']['absolute'])} / {pm(add['nonlinear']['normalized'])}, "
        f"single-task {pm(single['posthoc']['per_task'])}, xi {pm(dis['posthoc']['mean'], 1.0, 3)}."
    )
    return out


def summary_markdown(agg: dict, config: Config, seconds: float) -> str:
    """The summary.md text: the paper's tables with mean ± std over seeds, then the claims."""

    def pm(values, scale=100.0, digits=1):
        return jexp.format_mean_std(values, digits=digits, scale=scale)

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
        f"{config.image_size} {'RGB' if config.rgb else 'grayscale'}; backbone "
        f"{config.backbone} {list(config.hidden)} -> {config.features}, "
        f"pre-trained {config.pretrain_steps} steps (multi-task) on "
        f"{', '.join(config.pretrain_tasks) if config.pretrain_tasks else 'the same tasks'} "
        f"using {config.pretrain_fraction:.0%} of their sources' training splits (the rest is "
        f"for fine-tuning); frozen linear-probe heads; fine-tuning {config.finetune_steps} Adam "
        f"steps (lr {config.finetune_lr}, warm-up {config.warmup_steps} + cosine, clip "
        f"{config.clip_norm}, batch {config.batch_size}), identical for non-linear and "
        f"linearized FT. Seeds {list(config.seeds)}; test accuracy in %, mean ± std over "
        f"seeds ({config.eval_examples} test examples per task). Wall time of this invocation "
        f"{seconds:.0f} s (cells resumed from an earlier one are read back, not recomputed).",
        "",
        "## Single-task accuracy",
        "",
    ]
    rows = []
    for name in names:
        row = {"task": name}
        for method in ("pretrained", *METHODS):
            label = "Pre-trained" if method == "pretrained" else LABELS[method]
            row[label] = pm(agg["single"][method]["tasks"][name])
        rows.append(row)
    avg = {"task": "**average**"}
    for method in ("pretrained", *METHODS):
        label = "Pre-trained" if method == "pretrained" else LABELS[method]
        avg[label] = pm(agg["single"][method]["per_task"])
    rows.append(avg)
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
            "all pairs": pm(dis[method]["mean"], 1.0, 3),
            "all pairs, alphas >= 0": pm(dis[method]["mean_positive"], 1.0, 3),
        }
        for pair in dis[method]["mean_grids"]:
            row[pair.replace("|", " / ")] = pm(dis[method]["pairs"][pair], 1.0, 3)
        rows.append(row)
    lines += [jexp.markdown_table(rows), "", "Every pair (mean over seeds):", ""]
    rows = [
        {"pair": pair.replace("|", " / ")}
        | {LABELS[m]: pm(dis[m]["pairs"][pair], 1.0, 3) for m in METHODS}
        for pair in dis["nonlinear"]["pairs"]
    ]
    lines += [jexp.markdown_table(rows), "", "## Paper claims", ""]
    lines += [f"- {c}" for c in agg["claims"]]
    lines.append("")
    return "\n".join(lines)


def plot(agg: dict, run_dir: jexp.RunDir) -> None:
    """alpha_curves.png (addition and negation on validation) and disentanglement.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"nonlinear": "tab:blue", "linear": "tab:orange", "posthoc": "tab:green"}
    fig, (ax_add, ax_neg) = plt.subplots(1, 2, figsize=(12, 4.2))
    alphas = np.asarray(agg["addition_alphas"])
    for method in METHODS:
        curves = 100 * np.asarray(agg["addition"][method]["curve_normalized"])
        mean, std = curves.mean(0), curves.std(0)
        ax_add.plot(alphas, mean, color=colors[method], label=LABELS[method])
        ax_add.fill_between(alphas, mean - std, mean + std, color=colors[method], alpha=0.2)
    ax_add.set(
        xlabel="alpha", ylabel="mean normalized accuracy (%)", title="Task addition (validation)"
    )
    ax_add.legend()
    alphas = np.asarray(agg["negation_alphas"])
    for method in METHODS:
        for key, style in (("curve_target", "-"), ("curve_control", "--")):
            curve = 100 * np.asarray(agg["negation"][method][key]).mean(0)
            label = f"{LABELS[method]}, {key.split('_')[1]}"
            ax_neg.plot(alphas, curve, style, color=colors[method], label=label)
    ax_neg.set(
        xlabel="alpha (theta_0 - alpha tau)",
        ylabel="accuracy (%)",
        title="Task negation (validation; control = other tasks)",
    )
    ax_neg.legend(fontsize=7)
    fig.tight_layout()
    run_dir.savefig(fig, "alpha_curves")

    dis = agg["disentanglement"]
    pairs = list(dis["nonlinear"]["mean_grids"])
    alphas = np.asarray(agg["disentangle_alphas"])
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
        for ax, method in zip(row, METHODS, strict=True):
            image = ax.imshow(
                np.asarray(dis[method]["mean_grids"][pair]).T,
                origin="lower",
                extent=extent,
                vmin=0.0,
                vmax=top,
                cmap="viridis",
            )
            ax.set(xlabel=f"alpha {first}", ylabel=f"alpha {second}", title=LABELS[method])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="xi (mean over seeds)")
    run_dir.savefig(fig, "disentanglement")


def run(config: Config) -> dict:
    """Runs every seed (pre-training, fine-tuning cells, evaluation), writes the run
    directory and returns the results."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    effective = config.effective()
    # the data first: a set that is missing (or too small) fails before the run directory
    tasks, pretrain_tasks = prepare_tasks(effective)
    run_dir = jexp.RunDir(effective.out_dir, config)
    backbone = make_backbone(effective)
    logits_fn = make_logits_fn(backbone)
    total = 2 * len(tasks) * len(effective.seeds)
    per_seed = []
    with tqdm(total=total, desc=f"{NAME} fine-tuning", disable=effective.smoke) as progress:
        for seed in effective.seeds:
            per_seed.append(
                run_seed(
                    effective, tasks, pretrain_tasks, backbone, logits_fn, seed, run_dir, progress
                )
            )
    agg = aggregate(per_seed, effective)
    agg["claims"] = claims(agg)
    seconds = time.perf_counter() - start
    agg["seconds"] = seconds
    agg["per_seed"] = per_seed
    run_dir.write_results(agg)
    run_dir.write_summary(summary_markdown(agg, effective, seconds))
    plot(agg, run_dir)
    return agg


def main() -> None:
    jexp.cli(Config, run)


if __name__ == "__main__":
    main()
