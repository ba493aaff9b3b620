"""Flat-region MTL (F-MTL) and representation saliency (Rep-MTL) against gradient aggregators.

Two papers checked at CPU scale on small multi-task image problems from ``jaxmtl.data``:

* F-MTL: Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions"
  (arXiv 2211.13723, 2022; ICCV 2025). Every aggregator AGG (EW = mean, MGDA, PCGrad, CAGrad,
  UPGrad) is trained plainly and wrapped as F-AGG = ``jaxmtl.transforms.flat_mtl(AGG)``
  (per-task SAM, ``AGG(g^loss) + AGG(g^SAM - g^loss)``), plus the "direct" ablation
  ``AGG(g^SAM)`` for the aggregators named in ``Config.direct``.
* Rep-MTL: Wang, Li & Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency
  for Multi-Task Learning" (ICCV 2025). Equal weighting plus the TSR and CSA regularizers on
  the saliency ``dL_t/dz`` of the conv trunk's feature map (``jaxmtl.transforms.rep_mtl``).
* STL: one network per task (same architecture, one head), the reference of the Delta
  summaries.

Model: a small hand-written conv trunk (two 3x3 convolutions, the second with stride 2, ReLU)
giving a feature map z (N, H', W', C) and one linear head per task on the flattened map.
Adam; all methods see the same data, steps and seeds (the seed sets the initialization and
the batch order).

Summaries (``baseline`` = the STL test accuracies, averaged over seeds):

* ``Delta_m`` (Maninis et al., CVPR 2019; Vandenhende et al., TPAMI 2021; the F-MTL and
  Nash-MTL tables) averages over ALL metrics i:
  ``Delta_m = (1/M) sum_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i * 100`` with ``l_i = 1`` when
  higher is better: LOWER is better (negative = better than single-task).
* ``Delta_p_task`` (Rep-MTL, after DB-MTL) averages within each task, then over tasks:
  ``Delta_p = (1/T) sum_t (1/n_t) sum_k (-1)^{s_tk} (M_m,tk - M_b,tk) / M_b,tk * 100`` with
  ``s_tk = 1`` when lower is better: HIGHER is better.

Here every task has one metric (accuracy), so ``Delta_p_task = -Delta_m`` exactly; both are
reported because the two papers use one each. Also measured: the fraction of training steps
whose shared-parameter task gradients conflict (some pair with negative cosine, the F-MTL
paper's Fig. 1 statistic), and the sharpness ``max_{||e|| <= rho} L(theta + e) - L(theta)``
of the summed training loss at the end (a few normalized ascent steps).

Run: ``python -m experiments.multitask_flat`` (default, minutes on 2 CPU cores) or
``python -m experiments.multitask_flat --smoke`` (seconds). Writes under
``runs/multitask_flat/<timestamp>/``: config.json, metrics.jsonl (one line per finished cell),
cells.jsonl, results.json, summary.md, multitask_flat.png. Every finished (dataset, method,
seed) cell is appended to cells.jsonl; ``--resume latest`` continues an interrupted run in
its directory and redoes only the missing cells (cells are short: they restart rather than
checkpoint mid-way).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmtl import data as jdata
from jaxmtl import experiment as jexp
from jaxmtl import mtl
from jaxmtl import train as jtrain
from jaxmtl import transforms as jtx

NAME = "multitask_flat"

_AGGREGATOR_LABELS = {
    "mean": "EW",
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "upgrad": "UPGrad",
    "imtl_g": "IMTL-G",
    "nash_mtl": "Nash-MTL",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """F-MTL / Rep-MTL study settings; the defaults run in minutes on 2 CPU cores."""

    smoke: bool = False  # a few steps on one data set, for tests (seconds)
    seeds: tuple[int, ...] = (0, 1, 2)  # each sets a cell's initialization and batch order
    out_dir: str = "runs/multitask_flat"  # where the run directories go (smoke: out_dir/smoke)
    resume: str | None = None  # "latest" or a run directory: finished cells are not redone
    datasets: tuple[str, ...] = ("multi_digits", "shapes")  # jaxmtl.data multi-task loaders
    aggregators: tuple[str, ...] = ("mean", "mgda", "pcgrad", "cagrad", "upgrad")  # AGG, F-AGG
    direct: tuple[str, ...] = ("mgda",)  # aggregators also run as F-AGG (direct); a subset
    rep_lambdas: tuple[tuple[float, float], ...] = ((0.9, 0.9), (0.1, 0.1))  # (TSR, CSA)
    single_task: bool = True  # also train one network per task (the Delta baseline)
    steps: int = 600  # Adam steps per cell
    batch_size: int = 64  # examples per step
    learning_rate: float = 1e-3  # Adam's learning rate
    channels: int = 16  # channels of the conv trunk's two layers
    rho: float = 0.05  # F-MTL radius (shared and heads); plain SAM, as the paper's CPU setting
    adaptive: bool = False  # F-MTL with adaptive SAM (ASAM) instead of plain SAM
    cagrad_c: float = 0.4  # CAGrad's c
    tau: float = 0.1  # Rep-MTL's CSA temperature (cross-task saliency alignment)
    sharpness_rho: float = 0.05  # radius of the final sharpness measurement
    sharpness_steps: int = 5  # normalized ascent steps of the sharpness measurement
    sharpness_samples: int = 512  # training examples the sharpness is measured on
    log_every: int = 100  # steps between metric lines
    mesh: str = ""  # e.g. "data=4": jaxmtl.parallel.make_mesh; batches split over "data"

    def effective(self) -> Config:
        """The configuration actually run (``smoke`` shrinks everything)."""
        lists = {
            f.name: tuple(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), list)
        }
        config = dataclasses.replace(self, **lists)  # hashable: steps are cached per config
        if not self.smoke:
            return config
        return dataclasses.replace(
            config,
            seeds=config.seeds[:1],
            datasets=config.datasets[:1],
            aggregators=config.aggregators[1:2] or config.aggregators[:1],
            direct=(config.aggregators[1:2] or config.aggregators[:1]) if config.direct else (),
            rep_lambdas=config.rep_lambdas[:1],
            steps=8,
            batch_size=16,
            channels=4,
            sharpness_steps=2,
            sharpness_samples=64,
            log_every=4,
        )


# --------------------------------------------------------------------------- summaries


def delta_m(metrics: list[float], baseline: list[float], higher_is_better: list[bool]) -> float:
    """Delta_m (%) over all metrics, lower is better (Maninis et al., CVPR 2019, Eq. 5).

    ``(1/M) sum_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i * 100``, ``l_i = 1`` if higher is better.

    >>> delta_m([0.9, 0.8], [0.8, 0.8], [True, True])
    -6.25
    """
    terms = [
        (-1.0 if hib else 1.0) * (m - b) / b * 100.0
        for m, b, hib in zip(metrics, baseline, higher_is_better, strict=True)
    ]
    return float(np.mean(terms))


def delta_p(
    metrics: list[list[float]], baseline: list[list[float]], lower_is_better: list[list[bool]]
) -> float:
    """Delta_p_task (%) averaged within each task then over tasks, higher is better.

    Rep-MTL (Wang, Li, Xu, ICCV 2025), Sec. 4: ``(1/T) sum_t (1/n_t) sum_k (-1)^{s_tk}
    (M_m,tk - M_b,tk) / M_b,tk * 100``, ``s_tk = 1`` if lower is better.

    >>> delta_p([[0.9], [0.8]], [[0.8], [0.8]], [[False], [False]])
    6.25
    """
    per_task = []
    for ms, bs, lows in zip(metrics, baseline, lower_is_better, strict=True):
        per_task.append(
            np.mean(
                [
                    (-1.0 if low else 1.0) * (m - b) / b * 100.0
                    for m, b, low in zip(ms, bs, lows, strict=True)
                ]
            )
        )
    return float(np.mean(per_task))


# --------------------------------------------------------------------------- model


def _conv(x: jax.Array, w: jax.Array, b: jax.Array, stride: int) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.relu(y + b)


def _as_images(x: jax.Array) -> jax.Array:
    """(N, H, W) or (N, H, W, C) float inputs as NHWC."""
    return x[..., None] if x.ndim == 3 else x


def encode(trunk: dict, x: jax.Array) -> jax.Array:
    """The shared trunk: two 3x3 conv layers (stride 1, then 2), ReLU -> (N, H', W', C)."""
    h = _conv(_as_images(x), trunk["w1"], trunk["b1"], 1)
    return _conv(h, trunk["w2"], trunk["b2"], 2)


def task_logits(heads: list[dict], z: jax.Array) -> list[jax.Array]:
    """One linear head per task on the flattened feature map."""
    flat = z.reshape(z.shape[0], -1)
    return [flat @ h["w"] + h["b"] for h in heads]


def losses_from_features(heads: list[dict], z: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy per task, (K,)."""
    logits = task_logits(heads, z)
    return jnp.stack(
        [
            optax.softmax_cross_entropy_with_integer_labels(lg, y[:, t]).mean()
            for t, lg in enumerate(logits)
        ]
    )


def task_losses(params: dict, batch: dict) -> jax.Array:
    """(K,) task losses of the whole model on a batch."""
    return losses_from_features(params["heads"], encode(params["trunk"], batch["x"]), batch["y"])


def init_params(key: jax.Array, input_shape: tuple[int, ...], num_classes, channels: int):
    """He-normal trunk, LeCun-normal linear heads, zero biases.

    Heads are not zero-initialized: with zero heads the saliency ``dL_t/dz`` is exactly zero
    at the start and Rep-MTL's scale-invariant regularizers have gradients ~ 1/||S||.
    """
    in_ch = input_shape[-1] if len(input_shape) == 3 else 1
    k1, k2, k3 = jax.random.split(key, 3)
    trunk = {
        "w1": jax.random.normal(k1, (3, 3, in_ch, channels)) * np.sqrt(2.0 / (9 * in_ch)),
        "b1": jnp.zeros(channels),
        "w2": jax.random.normal(k2, (3, 3, channels, channels)) * np.sqrt(2.0 / (9 * channels)),
        "b2": jnp.zeros(channels),
    }
    z = jax.eval_shape(lambda t: encode(t, jnp.zeros((1, *input_shape))), trunk)
    features = int(np.prod(z.shape[1:]))
    heads = [
        {"w": jax.random.normal(k, (features, c)) / np.sqrt(features), "b": jnp.zeros(c)}
        for k, c in zip(jax.random.split(k3, len(num_classes)), num_classes, strict=True)
    ]
    return {"trunk": trunk, "heads": heads}


def _is_trunk(path: tuple) -> bool:
    return path[0].key == "trunk"


# --------------------------------------------------------------------------- methods


class Method(NamedTuple):
    """A training method: its label, optimizer and how it computes one update."""

    name: str
    kind: str  # "plain", "flat", "direct", "rep", "stl"
    aggregator: str | None = None
    task: int | None = None  # for "stl"
    lambdas: tuple[float, float] = (0.0, 0.0)  # for "rep": (lambda_tsr, lambda_csa)


def methods(config: Config, num_tasks: int) -> list[Method]:
    """Every method of the study, in table order."""
    out = []
    for agg in config.aggregators:
        label = _AGGREGATOR_LABELS.get(agg, agg)
        out.append(Method(label, "plain", agg))
        out.append(Method(f"F-{label}", "flat", agg))
        if agg in config.direct:
            out.append(Method(f"F-{label} (direct)", "direct", agg))
    for tsr, csa in config.rep_lambdas:
        out.append(Method(f"Rep-MTL (EW, {tsr:g}/{csa:g})", "rep", lambdas=(tsr, csa)))
    if config.single_task:
        out.extend(Method(f"STL-{t}", "stl", task=t) for t in range(num_tasks))
    return out


def _make_aggregator(name: str, config: Config, shared: Any) -> optax.GradientTransformation:
    factory = getattr(jtx, name)
    kwargs: dict[str, Any] = {"shared": shared}
    if name == "cagrad":
        kwargs["c"] = config.cagrad_c
    return factory(**kwargs)


class ConflictCount(NamedTuple):
    """Steps seen and steps whose shared task gradients conflicted."""

    steps: jax.Array
    conflicts: jax.Array


def count_conflicts(shared: Any) -> optax.GradientTransformation:
    """A pass-through transform over per-task gradients that counts conflicting steps.

    A step conflicts when some pair of tasks has a negative inner product on the shared
    parameters (the statistic of the F-MTL paper's Fig. 1).
    """

    def init_fn(params):
        del params
        return ConflictCount(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        g = mtl.gramian(updates, shared)
        off = ~jnp.eye(g.shape[0], dtype=bool)
        conflict = jnp.any((g < 0) & off).astype(jnp.int32)
        return updates, ConflictCount(state.steps + 1, state.conflicts + conflict)

    return optax.GradientTransformation(init_fn, update_fn)


def conflict_fraction(opt_state: Any) -> float | None:
    """The fraction counted by :func:`count_conflicts` in an optimizer state, if any."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ConflictCount)):
        if isinstance(node, ConflictCount):
            return float(node.conflicts) / max(int(node.steps), 1)
    return None


@functools.lru_cache(maxsize=64)
def make_step(method: Method, config: Config, num_tasks: int) -> tuple[Callable, Any]:
    """``(step_fn(state, batch) -> (state, metrics), optimizer)`` for one method, jitted.

    Cached, so that every seed of a method reuses one compiled step.
    """
    adam = optax.adam(config.learning_rate)
    if method.kind in ("plain", "flat", "direct"):
        if method.kind == "plain":
            head = _make_aggregator(method.aggregator, config, _is_trunk)
        else:
            head = jtx.flat_mtl(
                _make_aggregator(method.aggregator, config, None),
                rho=config.rho,
                adaptive=config.adaptive,
                variant="paper" if method.kind == "flat" else "direct",
                shared=_is_trunk,
            )
        optimizer = optax.chain(count_conflicts(_is_trunk), head, adam)

        def step_fn(state, batch):
            if method.kind == "plain":
                losses, grads = mtl.task_gradients(
                    task_losses, state.params, batch, shared=_is_trunk
                )
                extra = {}
            else:
                losses, grads = mtl.task_gradients(task_losses, state.params, batch)
                extra = {"task_loss_fn": lambda p: task_losses(p, batch)}
            updates, opt_state = optimizer.update(
                grads, state.opt_state, state.params, task_losses=losses, **extra
            )
            params = optax.apply_updates(state.params, updates)
            new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
            return new_state, {"loss": losses.sum(), "losses": losses}

        return jax.jit(step_fn), optimizer

    optimizer = adam
    if method.kind == "rep":

        def objective(params, batch):
            return jtx.rep_mtl_loss(
                encode,
                losses_from_features,
                params["trunk"],
                params["heads"],
                batch["x"],
                batch["y"],
                lambda_tsr=method.lambdas[0],
                lambda_csa=method.lambdas[1],
                tau=config.tau,
            )

    else:
        weights = jnp.zeros(num_tasks).at[method.task].set(1.0)

        def objective(params, batch):
            losses = task_losses(params, batch)
            return jnp.sum(weights * losses), {"task_losses": losses}

    def step_fn(state, batch):
        (total, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": total, "losses": aux["task_losses"]}
        if method.kind == "rep":
            metrics.update(tsr=aux["tsr"], csa=aux["csa"])
        return new_state, metrics

    return jax.jit(step_fn), optimizer


# --------------------------------------------------------------------------- evaluation


@jax.jit
def _accuracies(params, x, y):
    logits = task_logits(params["heads"], encode(params["trunk"], x))
    return jnp.stack([jnp.mean(jnp.argmax(lg, -1) == y[:, t]) for t, lg in enumerate(logits)])


def accuracies(params, split: dict[str, np.ndarray], chunk: int = 1024) -> np.ndarray:
    """Per-task accuracy on a split, (K,)."""
    n = split["x"].shape[0]
    total = np.zeros(split["y"].shape[1])
    for start in range(0, n, chunk):
        x, y = split["x"][start : start + chunk], split["y"][start : start + chunk]
        total += np.asarray(_accuracies(params, x, y)) * x.shape[0]
    return total / n


def sharpness(params, batch: dict, weights: jax.Array, *, rho: float, steps: int) -> float:
    """``max_k L(theta + e_k) - L(theta)`` for ``L = weights @ task losses``.

    ``e_{k+1} = rho grad L(theta + e_k) / ||grad||``: normalized gradient ascent on the sphere
    of radius rho (the sharpness of Foret et al., ICLR 2021, measured on one batch as in the
    F-MTL paper's sharpness plots). STL networks use their own task's weight only.
    """
    e = jax.tree.map(jnp.zeros_like, params)
    base, e = _ascend(params, e, batch, weights, rho)
    worst = float(base)
    for _ in range(steps):
        value, e = _ascend(params, e, batch, weights, rho)
        worst = max(worst, float(value))
    return worst - float(base)


@jax.jit
def _ascend(params, e, batch, weights, rho):
    """The weighted loss at ``params + e`` and the next perturbation ``rho g / ||g||``."""
    total = lambda p: jnp.sum(weights * task_losses(p, batch))
    value, g = jax.value_and_grad(total)(jax.tree.map(jnp.add, params, e))
    norm = optax.tree.norm(g)
    return value, jax.tree.map(lambda v: rho * v / (norm + 1e-12), g)


# --------------------------------------------------------------------------- one cell


def load_dataset(name: str, smoke: bool) -> Any:
    """A jaxmtl.data multi-task data set by name."""
    loader = getattr(jdata, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"datasets: expected names of jaxmtl.data loaders, got {name!r}")
    return loader()


def _check_config(config: Config) -> None:
    """Names and sizes, checked before the run directory is created."""
    unknown = [a for a in (*config.aggregators, *config.direct) if not hasattr(jtx, a)]
    if unknown:
        raise ValueError(f"aggregators: expected jaxmtl.transforms names, got {unknown}")
    missing = [a for a in config.direct if a not in config.aggregators]
    if missing:
        raise ValueError(
            f"direct: expected a subset of aggregators {config.aggregators}, got {missing} "
            f"(the F-AGG (direct) ablation needs AGG run: add {missing} to --aggregators, or "
            "pass --direct with a subset of them, or --direct with no names for none)"
        )
    if not config.seeds or not config.datasets:
        raise ValueError(
            f"seeds and datasets: expected non-empty, got {config.seeds}, {config.datasets}"
        )


def run_cell(method: Method, dataset: Any, seed: int, config: Config, log) -> dict:
    """Trains one method with one seed; returns per-task test accuracy and diagnostics."""
    num_tasks = len(dataset.num_classes)
    input_shape = tuple(dataset.train["x"].shape[1:])
    params = init_params(jax.random.key(seed), input_shape, dataset.num_classes, config.channels)
    step_fn, optimizer = make_step(method, config, num_tasks)
    state = jtrain.init_state(params, optimizer, seed=seed)
    start = time.perf_counter()
    # optax 0.2.8's adam computes `decay ** count` (Python float ** int32), which strict
    # dtype promotion (the test configuration) rejects; training uses the standard rules.
    with jax.numpy_dtype_promotion("standard"):
        state, _ = jtrain.fit(
            state,
            step_fn,
            dataset.train,
            steps=config.steps,
            batch_size=config.batch_size,
            seed=seed,
            log_every=config.log_every,
            progress=False,
            mesh=config.mesh or None,
        )
    seconds = time.perf_counter() - start
    acc = accuracies(state.params, dataset.test)
    sample = {k: v[: config.sharpness_samples] for k, v in dataset.train.items()}
    weights = np.ones(num_tasks, np.float32)
    if method.kind == "stl":
        weights = np.eye(num_tasks, dtype=np.float32)[method.task]
    sharp = sharpness(
        state.params, sample, weights, rho=config.sharpness_rho, steps=config.sharpness_steps
    )
    return {
        "acc": [float(a) for a in acc],
        "conflict": conflict_fraction(state.opt_state),
        "sharpness": sharp,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- the study


def _pct(values) -> list[float]:
    return [100.0 * v for v in values]


def summarize(
    cells: dict[tuple, dict],
    dataset: str,
    tasks: list[str],
    ms: list[Method],
    seeds: tuple[int, ...],
) -> dict:
    """Per-method per-seed accuracies and the Delta summaries against the STL networks."""
    rows: dict[str, dict] = {}
    stl = [m for m in ms if m.kind == "stl"]
    if stl:
        stl_acc = [[cells[(dataset, m.name, s)]["acc"][m.task] for m in stl] for s in seeds]
        rows["STL"] = {
            "acc": stl_acc,
            "conflict": [None] * len(seeds),
            "sharpness": [
                float(np.mean([cells[(dataset, m.name, s)]["sharpness"] for m in stl]))
                for s in seeds
            ],
            "seconds": [sum(cells[(dataset, m.name, s)]["seconds"] for m in stl) for s in seeds],
        }
    for m in ms:
        if m.kind == "stl":
            continue
        per_seed = [cells[(dataset, m.name, s)] for s in seeds]
        rows[m.name] = {key: [c[key] for c in per_seed] for key in per_seed[0]}
    baseline = np.mean(rows["STL"]["acc"], axis=0).tolist() if "STL" in rows else None
    for row in rows.values():
        row["avg_acc"] = [float(np.mean(a)) for a in row["acc"]]
        if baseline is not None:
            k = len(baseline)
            row["delta_m"] = [delta_m(a, baseline, [True] * k) for a in row["acc"]]
            row["delta_p"] = [
                delta_p([[v] for v in a], [[b] for b in baseline], [[False]] * k)
                for a in row["acc"]
            ]
    return {"tasks": tasks, "baseline": baseline, "methods": rows}


def _mean(row: dict, key: str) -> float:
    return float(np.mean([v for v in row[key] if v is not None]))


def _std(row: dict, key: str) -> float:
    return jexp.mean_std([v for v in row[key] if v is not None])[1]


def claim_table(results: dict) -> dict[tuple[str, str], dict[str, list]]:
    """``{(data set, method): {metric: [value per seed]}}``: what the claims read."""
    return {
        (name, method): row
        for name, ds in results["datasets"].items()
        for method, row in ds["methods"].items()
    }


def claims(results: dict, config: Config) -> list[jexp.Claim]:
    """The two papers' claims on each data set, as :class:`jaxmtl.experiment.Claim` s over
    :func:`claim_table`; a claim whose arms did not run is reported as not run."""
    f_mtl, rep_mtl = "F-MTL (Phan et al. 2022)", "Rep-MTL (Wang et al. 2025)"
    out = []
    for name, ds in results["datasets"].items():
        rows = ds["methods"]
        for agg in config.aggregators:
            label = _AGGREGATOR_LABELS.get(agg, agg)
            plain, flat = (name, label), (name, f"F-{label}")
            out += [
                jexp.Claim(
                    f"{f_mtl}, Tables 1-3",
                    f"[{name}] F-{label} beats {label} on average accuracy (points)",
                    "avg_acc",
                    flat,
                    plain,
                    scale=100,
                    digits=2,
                ),
                jexp.Claim(
                    f"{f_mtl}, Fig. 1",
                    f"[{name}] flat regions cut the share of steps "
                    f"with conflicting task gradients: F-{label} vs {label} (points)",
                    "conflict",
                    flat,
                    plain,
                    direction="lower",
                    scale=100,
                ),
                jexp.Claim(
                    f"{f_mtl}, Sec. 5",
                    f"[{name}] F-{label} ends in a flatter minimum "
                    f"than {label} (sharpness at rho={config.sharpness_rho})",
                    "sharpness",
                    flat,
                    plain,
                    direction="lower",
                    digits=3,
                ),
            ]
        for agg in config.direct:
            label = _AGGREGATOR_LABELS.get(agg, agg)
            out.append(
                jexp.Claim(
                    f"{f_mtl}, Table 6",
                    f"[{name}] aggregating loss and flat parts "
                    f"separately (F-{label}) beats aggregating the SAM gradients "
                    f"directly (points)",
                    "avg_acc",
                    (name, f"F-{label}"),
                    (name, f"F-{label} (direct)"),
                    scale=100,
                    digits=2,
                )
            )
        for tsr, csa in config.rep_lambdas:
            method = f"Rep-MTL (EW, {tsr:g}/{csa:g})"
            out.append(
                jexp.Claim(
                    f"{rep_mtl}, Tables 1-4",
                    f"[{name}] {method} improves on EW in Delta_p_task (points)",
                    "delta_p",
                    (name, method),
                    (name, "EW"),
                    digits=2,
                )
            )
        mtl = [k for k, row in rows.items() if k != "STL" and "delta_m" in row]
        best = min(mtl, key=lambda k: _mean(rows[k], "delta_m")) if mtl else "STL"
        out.append(
            jexp.Claim(
                f"{f_mtl}; {rep_mtl}",
                f"[{name}] the best MTL method{f' ({best})' if mtl else ''} beats "
                "single-task learning: Delta_m < 0 (%)",
                "delta_m",
                (name, best),
                direction="lower",
                digits=2,
            )
        )
    return out


SUMMARY_COLUMNS = {  # summary.md header -> (metric, scale, decimals)
    "avg acc": ("avg_acc", 100, 2),
    "Delta_m % (↓)": ("delta_m", 1, 2),
    "Delta_p % (↑)": ("delta_p", 1, 2),
    "conflict %": ("conflict", 100, 0),
    "sharpness": ("sharpness", 1, 3),
    "s / run": ("seconds", 1, 1),
}


def summary_markdown(results: dict, config: Config, seconds: float) -> str:
    """The summary.md text: one table per data set and the claims."""
    lines = [
        "# F-MTL and Rep-MTL on small multi-task image problems",
        "",
        f"Seeds {list(config.seeds)}, {config.steps} Adam steps (lr {config.learning_rate}, "
        f"batch {config.batch_size}), conv trunk with {config.channels} channels, F-MTL "
        f"rho {config.rho}{' (ASAM)' if config.adaptive else ''}, Rep-MTL lambda_tsr/"
        f"lambda_csa as named, tau {config.tau}. Test accuracy in %, "
        "mean ± std over seeds. Delta_m: lower is better; Delta_p_task: higher is better "
        "(both against the STL networks; with one metric per task Delta_p_task = -Delta_m). "
        "conflict: share of training steps with a negative inner product between two tasks' "
        "shared-parameter gradients. sharpness: worst increase of the summed training loss "
        f"within radius {config.sharpness_rho} (STL: of its own task's loss). "
        f"Total time {seconds:.0f} s.",
        "",
    ]
    for name, ds in results["datasets"].items():
        tasks = ds["tasks"]
        table = {
            method: {**row, **{f"acc {t}": [a[i] for a in row["acc"]] for i, t in enumerate(tasks)}}
            for method, row in ds["methods"].items()
        }
        columns = {f"{t} acc": (f"acc {t}", 100, 2) for t in tasks} | SUMMARY_COLUMNS
        lines += [f"## {name}", "", jexp.markdown_table(jexp.stat_rows(table, columns)), ""]
    lines += ["## Paper claims", "", jexp.claims_markdown(results["claims"], smoke=config.smoke)]
    lines.append("")
    return "\n".join(lines)


_FAMILIES = {  # method-name prefix -> (legend label, colour); the rest are plain aggregators
    "F-": ("F-MTL (flat regions)", "tab:orange"),
    "Rep": ("Rep-MTL", "tab:green"),
    "STL": ("single-task (baseline)", "tab:gray"),
}


def _family(name: str) -> tuple[str, str]:
    for prefix, family in _FAMILIES.items():
        if name.startswith(prefix):
            return family
    return ("plain aggregator", "tab:blue")


def plot(results: dict, run_dir: Any) -> None:
    """Average test accuracy (points, mean ± std over seeds: the axis is zoomed, so no bars)
    and Delta_p_task against STL (bars from 0) per method, one row per data set."""
    from matplotlib.lines import Line2D

    datasets = results["datasets"]
    fig, axes = jexp.figure(len(datasets), 2, size=(7.0, 4.4))
    for (name, ds), (ax_acc, ax_delta) in zip(datasets.items(), axes, strict=True):
        names = list(ds["methods"])
        rows = [ds["methods"][n] for n in names]
        colors = [_family(n)[1] for n in names]
        jexp.plot_bars(
            ax_acc,
            names,
            [r["avg_acc"] for r in rows],
            scale=100,
            points=True,
            colors=colors,
            xlabel="method",
            ylabel="average test accuracy (%)",
            title=f"{name}: accuracy (mean ± std over seeds; zoomed axis)",
        )
        if "STL" in ds["methods"]:
            stl = 100 * _mean(ds["methods"]["STL"], "avg_acc")
            ax_acc.axhline(stl, color="tab:gray", ls="--", lw=0.8)
        jexp.plot_bars(
            ax_delta,
            names,
            [r.get("delta_p", [np.nan]) for r in rows],
            colors=colors,
            xlabel="method",
            ylabel="Delta_p_task vs STL (%)",
            title=f"{name}: Delta_p_task against STL (higher is better; STL = 0)",
        )
        ax_delta.axhline(0.0, color="black", linewidth=0.8)
    legend = {
        label: color for label, color in map(_family, next(iter(datasets.values()))["methods"])
    }
    handles = [Line2D([], [], marker="o", ls="", color=c, label=lbl) for lbl, c in legend.items()]
    axes[0][0].legend(handles=handles, loc="best", fontsize=8)
    title = "F-MTL and Rep-MTL against gradient aggregators"
    run_dir.savefig(jexp.finish_figure(fig, title, smoke=results.get("smoke", False)), NAME)


def run(config: Config) -> dict:
    """Runs every (data set, method, seed) cell, writes the run directory, returns results."""
    start = time.perf_counter()
    effective = config.effective()
    _check_config(effective)
    # The data first: a misspelled data set fails before the run directory exists.
    loaded = {name: load_dataset(name, effective.smoke) for name in effective.datasets}
    run_dir = jexp.RunDir(effective.out_dir, config)
    plan = {
        (name, m.name): m
        for name, ds in loaded.items()
        for m in methods(effective, len(ds.num_classes))
    }

    def compute(arm: tuple[str, str], seed: int) -> dict:
        cell = run_cell(plan[arm], loaded[arm[0]], seed, effective, run_dir.log)
        run_dir.log({"dataset": arm[0], "method": arm[1], "seed": seed, **cell})
        return cell

    stamp = jexp.config_stamp(effective)  # without out_dir / resume: a moved run resumes
    stored = jexp.run_cells(
        run_dir, list(plan), effective.seeds, compute, stamp=stamp, progress=not effective.smoke
    )
    cells = {
        (*arm, seed): cell for arm, per_seed in stored.items() for seed, cell in per_seed.items()
    }
    results: dict[str, Any] = {"datasets": {}, "smoke": effective.smoke}
    for name, ds in loaded.items():
        ms = methods(effective, len(ds.num_classes))
        results["datasets"][name] = summarize(cells, name, list(ds.tasks), ms, effective.seeds)
    results["claims"] = jexp.check_claims(
        claims(results, effective), claim_table(results), smoke=effective.smoke
    )
    seconds = time.perf_counter() - start
    results["seconds"] = seconds
    run_dir.write_results(results)
    run_dir.write_summary(summary_markdown(results, effective, seconds))
    plot(results, run_dir)
    return results


def main() -> None:
    jexp.cli(Config, run)


if __name__ == "__main__":
    main()
