"""Z-loss on a large output layer: next-word prediction over the Python standard library.

de Brebisson & Vincent, "The Z-loss: a shift and scale invariant classification loss
belonging to the Spherical Family" (2016), with the exact factored output layer of Vincent,
de Brebisson & Bouthillier, "Efficient Exact Gradient Update for training Deep Networks
with Very Large Sparse Targets" (NeurIPS 2015), and "An Exploration of Softmax Alternatives
Belonging to the Spherical Loss Family" (ICLR 2016). The claim checked: trained with the
factored layer, the Z-loss reaches top-k accuracies competitive with softmax
cross-entropy while an epoch is much faster, because its output-layer cost does not grow
with the vocabulary (O(d^2) instead of O(D d) per example).

Data (offline, ships with Python): the words (identifiers, keywords and the words of the
comments and docstrings, regex ``[A-Za-z_][A-Za-z0-9_]*``) of the standard library's ``.py``
sources under ``sysconfig.get_paths()["stdlib"]`` (site-packages excluded), files split
8:1:1 into train / validation / test by their sorted index (index mod 10: 0-7 train, 8
validation, 9 test; deterministic, disjoint files). Vocabulary: the ``vocab_size`` most
frequent training words plus ``<unk>`` (class 0), so D = ``vocab_size + 1``. Task: predict
word t from words t-3..t-1. Model: embeddings of the context words -> MLP -> d = 128
features ``h`` -> output layer ``o = W h`` (D x d, no bias; the Z-loss is shift invariant).

Methods (same trunk, same data order per seed):

* ``softmax CE`` -- dense logits, Adam on all parameters;
* ``Z-loss dense`` -- dense logits with ``jaxmtl.losses.classification.z_loss``, Adam on all;
* ``Z-loss factored`` -- ``jaxmtl.losses.spherical_output.factored_z_loss_sgd``: the output
  layer by exact SGD in O(N d^2) per batch (the paper's algorithm is SGD only), the trunk by
  Adam through the returned feature gradient.

Hyperparameters are chosen on the validation split, never on test: ``--tune`` runs a
budgeted pilot (seed ``tune_seed``, ``tune_epochs`` epoch(s), every method over its grid:
CE the Adam rate; dense Z-loss ``(a, b)`` x the Adam rate; factored Z-loss ``(a, b)`` x the
output-layer SGD rate at CE's chosen Adam rate, then the trunk's Adam rate), picks each
method's best validation top-1, writes the pilot table (``pilot.md``, ``pilot.json``) and
trains the main run with the winners. Without ``--tune`` the Config defaults are used;
they are the winners of such a pilot. The pilot is short (one epoch) and favours
aggressive rates, which can overfit over the main run's epochs (softmax CE at Adam 1e-2
peaks at epoch 2), so the main run also selects each cell's epoch by validation top-1
(``select_epoch``, early stopping); the last epoch's numbers are reported beside.

Metrics: top-1/5/20 validation and test accuracy (all targets, ``<unk>`` included) and the
wall time of a training epoch (compilation excluded), mean ± std over seeds.

Run: ``python -m experiments.zloss_large_output`` (about 2 minutes on 2 shared CPU cores),
``--tune`` (adds a pilot of 59 one-epoch runs, about 4-6 minutes) or ``--smoke`` (seconds).
Writes under ``runs/zloss_large_output/``: config.json, metrics.jsonl, results.json, summary.md,
zloss_large_output.png (and pilot.md / pilot.json with ``--tune``). Every (method, seed)
cell and every pilot cell is stored in the run directory when done and skipped when the
run is resumed (``--resume latest``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmtl import experiment as jexp
from jaxmtl.losses import classification, spherical_output

NAME = "zloss_large_output"
METHODS = ("softmax CE", "Z-loss dense", "Z-loss factored")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SPLITS = ("val", "test")  # the evaluation splits, in report order


@dataclasses.dataclass(frozen=True)
class Config:
    """Next-word prediction over the standard library; defaults run in ~2 min on 2 CPUs."""

    smoke: bool = False  # a tiny corpus, vocabulary, training and pilot grid (seconds)
    seeds: tuple[int, ...] = (0, 1)  # one cell per method and seed (init, data order)
    out_dir: str = "runs/zloss_large_output"  # where the run directories go
    resume: str | None = None  # "latest" or a run directory: skip the finished cells
    methods: tuple[str, ...] = METHODS  # any of "softmax CE", "Z-loss dense", "Z-loss factored"
    vocab_size: int = 20_000  # words; D = vocab_size + 1 (<unk>)
    context: int = 3  # previous words fed to the model
    embed_dim: int = 64  # word embedding dimension
    hidden: int = 256  # width of the MLP between the embeddings and the d features
    features: int = 128  # d
    train_examples: int = 32_768  # one epoch (fixed positions of the training files)
    val_examples: int = 8_192  # validation files: model selection (the pilot)
    test_examples: int = 8_192  # test files: reported only, never used for a choice
    epochs: int = 5  # training epochs of a main-run cell
    batch_size: int = 512  # examples per step
    # Early stopping on validation: every method is reported at the epoch of its best
    # validation top-1 (the 1-epoch pilot favours rates that overfit by epoch 5); False:
    # the last epoch. The last epoch's numbers are reported beside them either way.
    select_epoch: bool = True
    # Hyperparameters of each method: the winners of `--tune` on validation (the pilot
    # below with its default grids: seed 0, 1 epoch, best validation top-1 per method; the
    # test split played no part; runs/zloss_large_output/20261201-095032/pilot.md). CE's
    # 1e-2 overfits after epoch 2: the main run's early stopping (select_epoch) handles it.
    # Factored: (0.05, 80, 300) tied (0.1, 40, 100) at 15.8% (a plateau at the grid's corner).
    ce_learning_rate: float = 1e-2  # softmax CE: Adam on all parameters
    dense_z_learning_rate: float = 1e-2  # dense Z-loss: Adam on all parameters
    dense_z_a: float = 0.05  # dense Z-loss sharpness a
    dense_z_b: float = 80.0  # dense Z-loss offset b (a target z-score; sqrt(D - 1) = 141)
    factored_learning_rate: float = 1e-2  # factored Z-loss: Adam on the trunk
    factored_output_learning_rate: float = 300.0  # exact SGD of the factored output layer
    factored_z_a: float = 0.05  # factored Z-loss sharpness a
    factored_z_b: float = 80.0  # factored Z-loss offset b
    # The pilot (`--tune`): its winners replace the hyperparameters above for the main run.
    tune: bool = False  # run the pilot on validation first and train with its winners
    tune_seed: int = 0  # the pilot's seed
    tune_epochs: int = 1  # pilot training length (the main run trains `epochs`)
    tune_learning_rates: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # Adam rates
    tune_z_ab: tuple[tuple[float, float], ...] = (  # (a, b), incl. the paper's (1, 0)
        (1.0, 0.0),
        (0.5, 10.0),
        (0.2, 20.0),
        (0.1, 40.0),
        (0.05, 80.0),
    )
    tune_output_learning_rates: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0, 300.0)  # SGD
    top_k: tuple[int, ...] = (1, 5, 20)  # the k of the top-k accuracies reported
    max_files: int | None = None  # read only the first files (None: all)

    def effective(self) -> Config:
        """The configuration actually run (the smoke option shrinks everything)."""
        if not self.smoke:
            return self
        return dataclasses.replace(
            self,
            vocab_size=600,
            train_examples=2048,
            val_examples=512,
            test_examples=512,
            epochs=1,
            batch_size=256,
            hidden=64,
            features=32,
            embed_dim=16,
            max_files=40,
            tune_learning_rates=(1e-3, 1e-2),
            tune_z_ab=((1.0, 0.0), (0.1, 40.0)),
            tune_output_learning_rates=(5.0,),
        )


@dataclasses.dataclass(frozen=True)
class Hyper:
    """One method's hyperparameters (``None``: not used by the method)."""

    learning_rate: float  # Adam (all parameters; the trunk of the factored method)
    a: float | None = None
    b: float | None = None
    output_learning_rate: float | None = None


def hyper(method: str, config: Config) -> Hyper:
    """The hyperparameters of ``method`` in ``config``."""
    if method == "softmax CE":
        return Hyper(config.ce_learning_rate)
    if method == "Z-loss dense":
        return Hyper(config.dense_z_learning_rate, config.dense_z_a, config.dense_z_b)
    if method == "Z-loss factored":
        return Hyper(
            config.factored_learning_rate,
            config.factored_z_a,
            config.factored_z_b,
            config.factored_output_learning_rate,
        )
    raise ValueError(f"methods: expected names in {METHODS}, got {method!r}")


def with_hyper(config: Config, method: str, hp: Hyper) -> Config:
    """``config`` with ``method``'s hyperparameters replaced by ``hp``."""
    if method == "softmax CE":
        return dataclasses.replace(config, ce_learning_rate=hp.learning_rate)
    if method == "Z-loss dense":
        return dataclasses.replace(
            config, dense_z_learning_rate=hp.learning_rate, dense_z_a=hp.a, dense_z_b=hp.b
        )
    return dataclasses.replace(
        config,
        factored_learning_rate=hp.learning_rate,
        factored_output_learning_rate=hp.output_learning_rate,
        factored_z_a=hp.a,
        factored_z_b=hp.b,
    )


def _check_config(config: Config) -> None:
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"methods: expected names in {METHODS}, got {method!r}")
    for name in ("tune_learning_rates", "tune_output_learning_rates"):
        values = getattr(config, name)
        if not values or any(not v > 0 for v in values):
            raise ValueError(f"{name}: expected a non-empty tuple of rates > 0, got {values}")
    if not config.tune_z_ab or any(len(ab) != 2 or not ab[0] > 0 for ab in config.tune_z_ab):
        raise ValueError(f"tune_z_ab: expected (a, b) pairs with a > 0, got {config.tune_z_ab}")
    if config.tune_epochs < 1:
        raise ValueError(f"tune_epochs: expected >= 1, got {config.tune_epochs}")


# --------------------------------------------------------------------------- data


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted (site-packages and caches excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library {root}")
    return files[:max_files] if max_files is not None else files


def split_of(index: int) -> str:
    """The split of the file at sorted ``index``: 8 of 10 train, then validation, test."""
    return {8: "val", 9: "test"}.get(index % 10, "train")


def load_corpus(config: Config) -> dict[str, Any]:
    """Word ids of the train / validation / test files, the vocabulary and examples."""
    words: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    files = stdlib_files(config.max_files)
    for index, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        words[split_of(index)].extend(WORD.findall(text))
    counts = collections.Counter(words["train"])
    if len(counts) < config.vocab_size:
        raise ValueError(
            f"vocab_size: expected at most the {len(counts)} distinct training words, "
            f"got {config.vocab_size}"
        )
    vocab = ["<unk>"] + [w for w, _ in counts.most_common(config.vocab_size)]
    ids = {w: i for i, w in enumerate(vocab)}
    streams = {
        split: np.fromiter((ids.get(w, 0) for w in ws), np.int32, len(ws))
        for split, ws in words.items()
    }
    rng = np.random.default_rng(0)  # the same examples for every seed and method

    def examples(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        stream = streams[split]
        valid = len(stream) - config.context
        if valid < n:
            raise ValueError(f"{split}_examples: expected <= {valid} (the corpus), got {n}")
        at = np.sort(rng.choice(valid, n, replace=False)) + config.context
        x = np.stack([stream[at - config.context + j] for j in range(config.context)], axis=1)
        return x, stream[at]

    data: dict[str, Any] = {}
    sizes = {"train": config.train_examples, "val": config.val_examples}
    sizes["test"] = config.test_examples
    for split, n in sizes.items():
        data[f"x_{split}"], data[f"y_{split}"] = examples(split, n)
    data.update(
        num_classes=len(vocab),
        files=len(files),
        files_per_split={s: sum(split_of(i) == s for i in range(len(files))) for s in words},
        distinct_words=len(counts),
    )
    for split, stream in streams.items():
        data[f"{split}_words"] = len(stream)
        if split != "train":
            data[f"unk_rate_{split}"] = float(np.mean(stream == 0))
    return data


# --------------------------------------------------------------------------- model


def init_params(key: jax.Array, config: Config, num_classes: int) -> dict[str, jax.Array]:
    k_emb, k1, k2, k_out = jax.random.split(key, 4)
    fan_in = config.context * config.embed_dim
    return {
        "embed": jax.random.normal(k_emb, (num_classes, config.embed_dim)) * 0.1,
        "w1": jax.random.normal(k1, (fan_in, config.hidden)) / np.sqrt(fan_in),
        "b1": jnp.zeros(config.hidden),
        "w2": jax.random.normal(k2, (config.hidden, config.features)) / np.sqrt(config.hidden),
        "b2": jnp.zeros(config.features),
        "out": jax.random.normal(k_out, (num_classes, config.features)) / np.sqrt(config.features),
    }


def features(trunk: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Context word ids (B, context) -> features h (B, d)."""
    e = trunk["embed"][x].reshape(x.shape[0], -1)
    hidden = jax.nn.relu(e @ trunk["w1"] + trunk["b1"])
    return hidden @ trunk["w2"] + trunk["b2"]


def _split(params: dict) -> tuple[dict, jax.Array]:
    trunk = {k: v for k, v in params.items() if k != "out"}
    return trunk, params["out"]


def _adam(learning_rate: float) -> optax.GradientTransformation:
    """Adam with its rate in the optimizer state, so that one compiled step serves every
    rate of the pilot's grid."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def dense_logits(carry, x):
    """Logits of a dense method's carry ``(params, opt_state)``."""
    trunk, out = _split(carry[0])
    return features(trunk, x) @ out.T


def factored_logits(carry, x):
    """Logits of the factored method's carry ``(trunk, opt_state, out_state)``."""
    trunk, _, out_state = carry
    return spherical_output.factored_logits(features(trunk, x), out_state)


def dense_trainer(hp: Hyper, loss_name: str):
    """``(init, step, logits)`` for a method with dense logits and Adam on everything."""
    opt = _adam(hp.learning_rate)
    if loss_name == "softmax CE":
        loss_fn = optax.losses.softmax_cross_entropy_with_integer_labels
    else:
        loss_fn = lambda o, y: classification.z_loss(o, y, a=hp.a, b=hp.b)

    def init(params):
        return params, opt.init(params)

    def step(carry, x, y):
        params, opt_state = carry

        def mean_loss(p):
            trunk, out = _split(p)
            return jnp.mean(loss_fn(features(trunk, x) @ out.T, y))

        value, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return init, step, dense_logits


def factored_trainer(hp: Hyper):
    """``(init, step, logits)``: the trunk by Adam, the output layer by exact factored SGD."""
    opt = _adam(hp.learning_rate)
    layer = spherical_output.factored_z_loss_sgd(hp.output_learning_rate, a=hp.a, b=hp.b)

    def init(params):
        trunk, out = _split(params)
        return trunk, opt.init(trunk), layer.init(out)

    def step(carry, x, y):
        trunk, opt_state, out_state = carry
        h, pullback = jax.vjp(lambda t: features(t, x), trunk)
        result = layer.update(h, y, out_state)
        (grads,) = pullback(result.h_grad)
        updates, opt_state = opt.update(grads, opt_state, trunk)
        trunk = optax.apply_updates(trunk, updates)
        return (trunk, opt_state, result.state), jnp.mean(result.loss)

    return init, step, factored_logits


def trainer(method: str, hp: Hyper):
    """``(init, step, logits)`` of a method (see the module docstring)."""
    if method == "Z-loss factored":
        return factored_trainer(hp)
    if method in ("softmax CE", "Z-loss dense"):
        return dense_trainer(hp, method)
    raise ValueError(f"methods: expected names in {METHODS}, got {method!r}")


def topk_accuracy(logits: jax.Array, labels: jax.Array, ks: tuple[int, ...]) -> jax.Array:
    """Hit counts within the top k, for each k (ties count against the target), and the
    number of rows with a non-finite logit (counted as misses: a NaN compares false, and
    would otherwise rank the target first)."""
    target = jnp.take_along_axis(logits, labels[:, None], axis=1)
    rank = jnp.sum(logits > target, axis=1)
    finite = jnp.all(jnp.isfinite(logits), axis=1)
    hits = [jnp.sum((rank < k) & finite) for k in ks]
    return jnp.stack([*hits, jnp.sum(~finite)])


_HIT_FNS: dict[Any, Callable] = {}


def _hits(logits_fn, carry, x, y, ks):
    """Top-k hit counts of one chunk, jitted once per (logits function, ks)."""
    key = (logits_fn, ks)
    if key not in _HIT_FNS:
        _HIT_FNS[key] = jax.jit(lambda c, x_, y_: topk_accuracy(logits_fn(c, x_), y_, ks))
    return _HIT_FNS[key](carry, x, y)


def evaluate(logits_fn: Callable, carry: Any, data: dict, split: str, ks) -> dict[str, float]:
    """``{"top-k": accuracy}`` on ``split`` ("val" or "test"), and ``"nonfinite"``: the
    fraction of examples whose logits are not all finite."""
    counts = np.zeros(len(ks) + 1)
    x, y = data[f"x_{split}"], data[f"y_{split}"]
    chunk = 1024
    for start in range(0, len(y), chunk):
        xb, yb = jnp.asarray(x[start : start + chunk]), jnp.asarray(y[start : start + chunk])
        counts += np.asarray(_hits(logits_fn, carry, xb, yb, ks))
    scores = {f"top-{k}": float(v / len(y)) for k, v in zip(ks, counts[:-1], strict=True)}
    return {**scores, "nonfinite": float(counts[-1] / len(y))}


_STEPS: dict[Any, tuple] = {}


def compiled_trainer(method: str, hp: Hyper, data: dict, config: Config):
    """``(init, compiled step, logits, compile seconds)``; the step (carry donated) is
    compiled once per method, static hyperparameters and shapes: the Adam rate lives in the
    optimizer state, so seeds and the pilot's rates share it (0 s when reused)."""
    init, step, logits_fn = trainer(method, hp)
    static = dataclasses.replace(hp, learning_rate=0.0)
    shapes = (data["num_classes"], config.context, config.embed_dim, config.hidden)
    key = (method, static, shapes, config.features, config.batch_size)
    seconds = 0.0
    if key not in _STEPS:
        start = time.perf_counter()
        carry = init(init_params(jax.random.key(0), config, data["num_classes"]))
        xb = jnp.asarray(data["x_train"][: config.batch_size])
        yb = jnp.asarray(data["y_train"][: config.batch_size])
        _STEPS[key] = jax.jit(step, donate_argnums=0).lower(carry, xb, yb).compile()
        seconds = time.perf_counter() - start
    return init, _STEPS[key], logits_fn, seconds


def train_cell(
    method: str,
    hp: Hyper,
    seed: int,
    data: dict,
    config: Config,
    log: Callable,
    *,
    epochs: int,
    splits: tuple[str, ...] = SPLITS,
    phase: str = "main",
) -> dict:
    """Trains one (method, hyperparameters, seed) cell for ``epochs``, evaluating on
    ``splits`` (validation first) after every epoch; returns its metrics. ``"<split>
    top-k"`` are those of the selected epoch: the one with the best validation top-1 (then
    top-5) when ``config.select_epoch`` (early stopping on validation), else the last;
    ``"last <split> top-k"`` those of the last epoch."""
    if splits[0] != "val":
        raise ValueError(f"splits: expected 'val' first, got {splits}")
    init, compiled, logits_fn, compile_seconds = compiled_trainer(method, hp, data, config)
    carry = init(init_params(jax.random.key(seed), config, data["num_classes"]))
    steps = len(data["y_train"]) // config.batch_size
    rng = np.random.default_rng(seed)
    epoch_seconds, history = [], []
    for epoch in range(epochs):
        order = rng.permutation(len(data["y_train"]))[: steps * config.batch_size]
        batches = order.reshape(steps, config.batch_size)
        losses = []
        start = time.perf_counter()
        for index in batches:
            carry, value = compiled(
                carry, jnp.asarray(data["x_train"][index]), jnp.asarray(data["y_train"][index])
            )
            losses.append(value)
        jax.block_until_ready(carry)
        epoch_seconds.append(time.perf_counter() - start)
        record = {
            "phase": phase,
            "method": method,
            **{k: v for k, v in dataclasses.asdict(hp).items() if v is not None},
            "seed": seed,
            "epoch": epoch + 1,
            "train_loss": float(np.mean(np.asarray(losses))),
            "epoch_seconds": round(epoch_seconds[-1], 3),
        }
        for split in splits:
            result = evaluate(logits_fn, carry, data, split, config.top_k)
            record.update({f"{split} {k}": v for k, v in result.items()})
        log(record)
        history.append(record)
    finite = all(
        np.isfinite(r["train_loss"]) and all(r[f"{s} nonfinite"] == 0 for s in splits)
        for r in history
    )
    selected = history[-1]
    if config.select_epoch:
        selected = max(history, key=lambda r: (r["val top-1"], r["val top-5"]))
    keys = [f"{s} {k}" for s in splits for k in (*(f"top-{k}" for k in config.top_k), "nonfinite")]
    scores = {k: selected[k] for k in keys} | {f"last {k}": history[-1][k] for k in keys}
    extra = {}
    if method == "Z-loss factored":  # drift of the maintained summaries after training
        state = carry[2]
        w = spherical_output.factored_output_matrix(state)
        exact = w.T @ w
        drift = jnp.linalg.norm(spherical_output.factored_gram(state) - exact)
        extra = {
            "gram_relative_drift": float(drift / jnp.linalg.norm(exact)),
            "refactorizations": int(state.refactorizations),
        }
    return {
        **scores,
        **extra,
        "finite": bool(finite),
        "selected_epoch": selected["epoch"],
        "epoch_seconds": float(np.mean(epoch_seconds)),
        "best_epoch_seconds": float(np.min(epoch_seconds)),
        "compile_seconds": compile_seconds,
        "final_train_loss": history[-1]["train_loss"],
        "history": history,
    }


def _slug(method: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")


def _cached_cell(run_dir: jexp.RunDir, name: str, stamp: str, compute: Callable[[], dict]):
    """The cell stored as ``name`` in the run directory if it was computed with ``stamp``;
    else computes and stores it (``RunDir.cached_json``). optax's Adam mixes weak floats and
    int32 counts: standard promotion for it (the tests run under strict promotion)."""

    def promoted() -> dict:
        with jax.numpy_dtype_promotion("standard"):
            return compute()

    return run_dir.cached_json(name, stamp, promoted)


# --------------------------------------------------------------------------- pilot


def pilot_grid(method: str, config: Config, ce_rate: float) -> list[Hyper]:
    """The first-stage grid of ``method`` (see the module docstring)."""
    if method == "softmax CE":
        return [Hyper(lr) for lr in config.tune_learning_rates]
    if method == "Z-loss dense":
        return [Hyper(lr, a, b) for a, b in config.tune_z_ab for lr in config.tune_learning_rates]
    return [
        Hyper(ce_rate, a, b, olr)
        for a, b in config.tune_z_ab
        for olr in config.tune_output_learning_rates
    ]


def _best(rows: list[dict]) -> dict:
    """The row with the best validation top-1 (then top-5), among finite runs."""
    ok = [r for r in rows if r["finite"]]
    if not ok:
        raise FloatingPointError(f"pilot: every run of {rows[0]['method']} diverged")
    return max(ok, key=lambda r: (r["val top-1"], r["val top-5"]))


def tune(config: Config, data: dict, run_dir: jexp.RunDir, settings: dict) -> tuple[dict, list]:
    """Runs the pilot; returns ``({method: Hyper}, pilot rows)`` and writes pilot.json/md."""
    rows: list[dict] = []
    chosen: dict[str, Hyper] = {}
    ce_rate = config.ce_learning_rate
    # CE first: its chosen Adam rate is the factored trunk's rate in the first stage.
    order = sorted(config.methods, key=lambda m: m != "softmax CE")

    def pilot_cell(method: str, hp: Hyper, stage: int) -> dict:
        stamp = json.dumps({**settings, "hyper": dataclasses.asdict(hp), "pilot": method})
        digest = hashlib.sha1(stamp.encode()).hexdigest()[:12]
        name = f"pilot_{_slug(method)}_{digest}.json"
        kwargs = dict(epochs=config.tune_epochs, splits=("val",), phase="pilot")

        def compute() -> dict:
            return train_cell(method, hp, config.tune_seed, data, config, run_dir.log, **kwargs)

        cell = _cached_cell(run_dir, name, stamp, compute)
        row = {"method": method, "stage": stage, **dataclasses.asdict(hp)}
        row.update({k: cell[k] for k in cell if k.startswith("val top-")})
        row["train_loss"] = cell["final_train_loss"]
        row["finite"] = cell["finite"]
        row["seconds"] = cell["epoch_seconds"] * config.tune_epochs + cell["compile_seconds"]
        rows.append(row)
        return row

    for method in order:
        method_rows = [pilot_cell(method, hp, 1) for hp in pilot_grid(method, config, ce_rate)]
        best = _best(method_rows)
        if method == "Z-loss factored":  # second stage: the trunk's Adam rate
            for lr in config.tune_learning_rates:
                if lr != best["learning_rate"]:
                    hp = Hyper(lr, best["a"], best["b"], best["output_learning_rate"])
                    method_rows.append(pilot_cell(method, hp, 2))
            best = _best(method_rows)
        best["chosen"] = True
        chosen[method] = Hyper(
            best["learning_rate"], best["a"], best["b"], best["output_learning_rate"]
        )
        if method == "softmax CE":
            ce_rate = best["learning_rate"]
    for row in rows:
        row.setdefault("chosen", False)
    run_dir.write_text("pilot.json", json.dumps(rows, indent=1))
    run_dir.write_text("pilot.md", pilot_markdown(rows, config) + "\n")
    return chosen, rows


def pilot_markdown(rows: list[dict], config: Config) -> str:
    """The pilot table (validation accuracies; the chosen row of each method in bold)."""

    def g(v):
        return "–" if v is None else f"{v:g}"

    table = []
    for r in rows:
        row = {
            "method": r["method"],
            "stage": r["stage"],
            "Adam lr": g(r["learning_rate"]),
            "a": g(r["a"]),
            "b": g(r["b"]),
            "output SGD lr": g(r["output_learning_rate"]),
        }
        for k in config.top_k:
            row[f"val top-{k} (%)"] = f"{100 * r[f'val top-{k}']:.1f}"
        row["train loss"] = f"{r['train_loss']:.3f}" if r["finite"] else "diverged"
        row["s (incl. compile)"] = f"{r['seconds']:.1f}"
        if r.get("chosen"):
            row = {k: f"**{v}**" for k, v in row.items()}
        table.append(row)
    return "\n".join(
        [
            f"Pilot: seed {config.tune_seed}, {config.tune_epochs} epoch(s) of "
            f"{config.train_examples} examples, {config.val_examples} validation examples; "
            "each method's best validation top-1 (bold) is used for the main run. Stage 2 "
            "(factored): the trunk's Adam rate at the stage-1 winner (stage 1 uses CE's "
            "chosen rate).",
            "",
            jexp.markdown_table(table),
        ]
    )


# --------------------------------------------------------------------------- report


def claims(config: Config) -> list[jexp.Claim]:
    """The paper's claims on this run's test split (per seed, CE and the factored Z-loss
    paired): "competitive" is within 2 points (absolute) of CE's top-k accuracy; "much
    faster" is at least 5x CE's time per epoch."""
    paper = "Z-loss (de Brebisson & Vincent 2016; Vincent et al. 2015)"
    out = [
        jexp.Claim(
            paper,
            f"factored Z-loss test top-{k} competitive with CE (within 2 points)",
            f"test top-{k}",
            "Z-loss factored",
            "softmax CE",
            threshold=-2.0,
            scale=100,
        )
        for k in config.top_k
    ]
    out.append(
        jexp.Claim(
            paper,
            "an epoch with the factored Z-loss is much faster (>= 5x) than with CE",
            "epoch_seconds",
            "softmax CE",
            "Z-loss factored",
            ratio=True,
            threshold=5.0,
        )
    )
    return out


def _hyper_rows(hypers: dict[str, dict]) -> list[dict]:
    def g(v):
        return "–" if v is None else f"{v:g}"

    return [
        {
            "method": method,
            "Adam lr": g(hp["learning_rate"]),
            "a": g(hp["a"]),
            "b": g(hp["b"]),
            "output SGD lr": g(hp["output_learning_rate"]),
        }
        for method, hp in hypers.items()
    ]


def summary_markdown(results: dict, config: Config) -> str:
    data = results["data"]
    n = len(config.seeds)
    lines = [f"# Z-loss on a {data['num_classes']}-way output layer ({n} seeds, mean ± std)", ""]
    files = data["files_per_split"]
    lines += [
        f"Next-word prediction over {data['files']} standard-library files "
        f"({files['train']} / {files['val']} / {files['test']} train / validation / test "
        f"files; {data['train_words']} / {data['val_words']} / {data['test_words']} words; "
        f"{data['distinct_words']} distinct training words, vocabulary {config.vocab_size} + "
        f"<unk>; {100 * data['unk_rate_val']:.1f}% / {100 * data['unk_rate_test']:.1f}% of "
        f"validation / test words <unk>). Context {config.context} words, "
        f"d = {config.features}; {config.epochs} epochs of {config.train_examples} examples, "
        f"batch {config.batch_size}; {config.val_examples} validation and "
        f"{config.test_examples} test examples.",
        "",
        "## Hyperparameters",
        "",
    ]
    if results["tuned"]:
        lines += [
            f"Chosen in this run by the pilot below (`--tune`: seed {config.tune_seed}, "
            f"{config.tune_epochs} epoch(s), best validation top-1 per method; the test "
            f"split played no part; pilot {results['pilot_seconds']:.0f} s).",
            "",
        ]
    else:
        lines += [
            "The Config defaults, which are the winners of a `--tune` pilot (seed 0, 1 "
            "epoch, grid of every method, best validation top-1 per method); the test split "
            "played no part in any choice.",
            "",
        ]
    lines += [jexp.markdown_table(_hyper_rows(results["hyperparameters"])), ""]
    table = results["table"]
    ce_time = np.mean(table["softmax CE"]["epoch_seconds"]) if "softmax CE" in table else None
    topk = {
        f"{split} top-{k} (%)": (f"{split} top-{k}", 100, 1)
        for split in SPLITS
        for k in config.top_k
    }
    times = {"s / epoch": ("epoch_seconds", 1, 2), "best s / epoch": ("best_epoch_seconds", 1, 2)}
    rows = jexp.stat_rows(table, topk)
    for row, m, timing in zip(rows, table.values(), jexp.stat_rows(table, times), strict=True):
        row["epoch"] = f"{np.mean(m['selected_epoch']):g}"
        row.update({k: v for k, v in timing.items() if k != "method"})
        if ce_time is not None:
            row["speed-up vs CE"] = f"{ce_time / np.mean(m['epoch_seconds']):.1f}x"
            best = np.mean(table["softmax CE"]["best_epoch_seconds"])
            row["best-epoch speed-up"] = f"{best / np.mean(m['best_epoch_seconds']):.1f}x"
    if config.select_epoch:
        chosen_by = (
            "Every (method, seed) at the epoch of its best validation top-1 (early stopping "
            "on validation; `epoch`: mean of the selected epochs); the last epoch's numbers "
            "follow."
        )
    else:
        chosen_by = "Every (method, seed) at the last epoch."
    lines += ["## Results", "", chosen_by, "", jexp.markdown_table(rows), ""]
    if config.select_epoch:
        last = {
            f"last-epoch {name}": (f"last {metric}", *rest)
            for name, (metric, *rest) in topk.items()
        }
        lines += [jexp.markdown_table(jexp.stat_rows(table, last)), ""]
    if results["factored_gram_drift"]:
        lines += [
            "Exactness of the factored layer in float32: relative error of the maintained "
            "`W^T W` after training, max over seeds "
            f"{max(results['factored_gram_drift']):.1e}.",
            "",
        ]
    lines += ["## Paper claims at this scale (test split)", ""]
    lines += [jexp.claims_markdown(results["claims"], smoke=config.smoke), ""]
    lines += [
        "Epoch times are wall-clock on a CPU shared with other jobs: a factored step is a "
        "few milliseconds of many small kernels and suffers most from the load, so the best "
        "epoch (min over epochs, mean over seeds) is shown beside the mean.",
        "",
    ]
    if results["tuned"]:
        lines += ["## Pilot", "", pilot_markdown(results["pilot"], config), ""]
    flags = (" --smoke" if config.smoke else "") + (" --tune" if config.tune else "")
    lines += [
        f"Wall time {results['seconds']:.0f} s (compilation excluded from s / epoch). Command: "
        f"`python -m experiments.{NAME}{flags}`.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, config: Config, run_dir: jexp.RunDir) -> None:
    """zloss_large_output.png: test top-k accuracy per method (bars, ± std over seeds; marks:
    validation) and the time per epoch (points on a log axis, dashes: seeds)."""
    table = results["table"]
    fig, axes = jexp.figure(1, 2, size=(5.5, 4.0))
    ax_acc, ax_time = axes[0]
    labels = [f"top-{k}" for k in config.top_k]
    jexp.plot_bars(
        ax_acc,
        labels,
        {f"{m} (test)": [row[f"test top-{k}"] for k in config.top_k] for m, row in table.items()},
        scale=100,
        xlabel="top-k",
        ylabel="accuracy (%)",
        title="next-word accuracy (bars: test, marks: validation)",
    )
    width = 0.8 / max(1, len(table))
    for i, row in enumerate(table.values()):
        where = np.arange(len(labels)) + (i - (len(table) - 1) / 2) * width
        val = [100 * np.mean(row[f"val top-{k}"]) for k in config.top_k]
        ax_acc.plot(where, val, "k_", markersize=12, label="validation" if i == 0 else None)
    ax_acc.legend(fontsize=8)
    names = list(table)
    # Points, not bars: a bar's height on a log axis depends on where the axis starts.
    for i, n in enumerate(names):
        seconds = table[n]["epoch_seconds"]
        ax_time.plot(i, np.mean(seconds), "o", color=f"C{i}", markersize=9)
        ax_time.plot([i] * len(seconds), seconds, "_", color="black", markersize=10)
    ax_time.set_xticks(range(len(names)), names, fontsize=8)
    ax_time.set_xlim(-0.5, len(names) - 0.5)
    ax_time.set_yscale("log")
    ax_time.grid(axis="y", which="both", alpha=0.3)
    ax_time.set(
        xlabel="method",
        ylabel="seconds per epoch (log scale)",
        title="training time per epoch (dots: mean, dashes: seeds)",
    )
    n = len(config.seeds)
    title = (
        f"Z-loss on a {results['data']['num_classes']}-way output layer "
        f"(mean ± std over {n} seed{'s' if n > 1 else ''})"
    )
    run_dir.savefig(jexp.finish_figure(fig, title, smoke=config.smoke), f"{NAME}.png")


# --------------------------------------------------------------------------- entry points


def run(config: Config) -> dict:
    """Runs the pilot (``tune``), then every (method, seed) cell; writes the run directory
    and returns the results."""
    start = time.perf_counter()
    effective = config.effective()
    _check_config(effective)
    data = load_corpus(effective)  # before the run directory: a failure leaves none
    run_dir = jexp.RunDir(config.out_dir, config)
    settings = json.loads(jexp.config_stamp(effective))  # without out_dir / resume
    pilot, pilot_seconds = [], 0.0
    if effective.tune:
        pilot_start = time.perf_counter()
        chosen, pilot = tune(effective, data, run_dir, settings)
        pilot_seconds = time.perf_counter() - pilot_start
        for method, hp in chosen.items():
            effective = with_hyper(effective, method, hp)
        settings = json.loads(jexp.config_stamp(effective))  # without out_dir / resume
    stamp = json.dumps(settings, sort_keys=True)
    hypers = {m: hyper(m, effective) for m in effective.methods}

    def compute(method: str, seed: int) -> dict:
        hp = hypers[method]
        # optax's Adam mixes weak floats and int32 counts: standard promotion for it.
        with jax.numpy_dtype_promotion("standard"):
            result = train_cell(
                method, hp, seed, data, effective, run_dir.log, epochs=effective.epochs
            )
        if not result["finite"]:
            raise FloatingPointError(
                f"{method} seed {seed} with {hp} diverged (non-finite loss or logits)"
            )
        return result

    cells = jexp.run_cells(
        run_dir,
        effective.methods,
        effective.seeds,
        compute,
        stamp=stamp,
        progress=not effective.smoke,
    )
    metric_keys = [f"{split} top-{k}" for split in SPLITS for k in effective.top_k]
    metric_keys += [f"last {key}" for key in metric_keys]
    metric_keys += ["selected_epoch", "epoch_seconds", "best_epoch_seconds", "compile_seconds"]
    table = {
        method: {key: [per_seed[s][key] for s in effective.seeds] for key in metric_keys}
        for method, per_seed in cells.items()
    }
    info = {k: v for k, v in data.items() if not k.startswith(("x_", "y_"))}
    factored = cells.get("Z-loss factored", {})
    results = {
        "data": info,
        "tuned": effective.tune,
        "hyperparameters": {m: dataclasses.asdict(hp) for m, hp in hypers.items()},
        "pilot": pilot,
        "pilot_seconds": pilot_seconds,
        "table": table,
        "factored_gram_drift": [factored[s]["gram_relative_drift"] for s in factored],
        "claims": jexp.check_claims(claims(effective), table, smoke=effective.smoke),
        "seconds": time.perf_counter() - start,
    }
    run_dir.write_results(results)
    run_dir.write_summary(summary_markdown(results, effective))
    plot(results, effective, run_dir)
    return results


def main() -> None:
    jexp.cli(Config, run)


if __name__ == "__main__":
    main()
