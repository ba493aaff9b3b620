"""One small generic train loop: a jitted step, periodic eval, progress, resumable checkpoints.

Pieces:

* :class:`TrainState` — ``(step, params, opt_state, rng)``, a pytree;
* :func:`init_state` and :func:`make_train_step` — the plain Optax step for a
  ``loss_fn(params, batch, rng) -> (loss, metrics)``; multi-task steps (per-task gradients and
  a ``jaxmtl.transforms`` aggregator) are written by hand with the same signature
  ``step_fn(state, batch) -> (state, metrics)``;
* :func:`fit` — runs ``step_fn`` on the batches ``jaxmtl.data.batch_at(train_data, step, ...)``
  and, given a ``run_dir``, writes ``metrics.jsonl`` and orbax checkpoints
  (``run_dir/checkpoints``, through :class:`jaxmtl.checkpoint.Checkpointer`) and resumes from
  the latest one.

Determinism. Everything a step consumes is a function of the step number: the batch
(``batch_at(train_data, step, batch_size=..., seed=...)``) and the randomness
(``fold_in(state.rng, state.step)``; ``state.rng`` never changes). So a run stopped after any
checkpoint and resumed ends bit-for-bit equal to an uninterrupted one (same parameters,
optimizer state and history), on the same machine and software.
"""

from __future__ import annotations

import json
import os
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmtl.checkpoint import Checkpointer, CheckpointReadError

PyTree = Any
Metrics = dict[str, jax.Array]
StepFn = Callable[[Any, dict[str, Any]], tuple[Any, Metrics]]

__all__ = ["TrainState", "fit", "init_state", "make_train_step"]


class TrainState(NamedTuple):
    """The whole state of a run; a pytree (checkpointed as is).

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      params: the parameter pytree.
      opt_state: the Optax optimizer state.
      rng: the run's base PRNG key (typed, ``jax.random.key``); it never changes: step ``k``
        draws from ``jax.random.fold_in(rng, k)``.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def init_state(params: PyTree, optimizer: optax.GradientTransformation, *, seed: int):
    """A fresh :class:`TrainState`: step 0, ``optimizer.init(params)``, ``jax.random.key(seed)``.

    >>> state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), seed=0)
    >>> int(state.step), state.rng.dtype
    (0, key<fry>)
    """
    seed = _check_int("seed", seed, minimum=0)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key(seed),
    )


def make_train_step(
    loss_fn: Callable[[PyTree, dict, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]],
    optimizer: optax.GradientTransformation,
) -> StepFn:
    """The pure step ``step_fn(state, batch) -> (state, metrics)`` of gradient descent on
    ``loss_fn`` with ``optimizer``.

    ``loss_fn(params, batch, rng) -> (loss, metrics)``: ``loss`` a float scalar (the value
    differentiated), ``metrics`` a dict of arrays (may be empty). ``rng`` is
    ``jax.random.fold_in(state.rng, state.step)``: a different key each step, the same key for
    the same step of a resumed run. The returned metrics are ``metrics`` plus ``"loss"`` (the
    differentiated value wins over a ``"loss"`` entry of ``metrics``). Not jitted: :func:`fit`
    jits it (or call ``jax.jit`` yourself).

    >>> opt = optax.sgd(0.5)
    >>> loss_fn = lambda p, b, rng: (jnp.sum((p["w"] - b["x"]) ** 2), {})
    >>> step = jax.jit(make_train_step(loss_fn, opt))
    >>> state, metrics = step(init_state({"w": jnp.zeros(2)}, opt, seed=0), {"x": jnp.ones(2)})
    >>> print(state.params["w"], float(metrics["loss"]), int(state.step))
    [1. 1.] 2.0 1
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )

    def checked_loss(params, batch, rng):
        out = loss_fn(params, batch, rng)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise TypeError(
                "loss_fn must return (loss, metrics dict), got "
                f"{type(out).__name__}{'' if not isinstance(out, tuple) else f' of {len(out)}'}"
            )
        loss, metrics = out
        if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
            raise ValueError(
                "loss_fn's loss must be a float scalar, got shape "
                f"{jnp.shape(loss)} dtype {jnp.result_type(loss)}"
            )
        return loss, dict(metrics)

    grad_fn = jax.value_and_grad(checked_loss, has_aux=True)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = grad_fn(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, opt_state, state.rng)
        return new_state, {**metrics, "loss": loss}

    return step_fn


# --------------------------------------------------------------------------- the window


class _Window(NamedTuple):
    """Device-side accumulator carried through the jitted step between two flushes."""

    sums: dict[str, jax.Array]  # running sums of the metrics (float32 for float metrics)
    count: jax.Array  # int32, steps since the last flush
    first_bad: jax.Array  # int32, index of the first update with a non-finite metric, or -1
    bad: jax.Array  # bool (number of float metrics,), which metrics were non-finite then


def _accumulator_dtype(dtype) -> jnp.dtype:
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
        return jnp.dtype(jnp.int32)
    raise TypeError(f"metrics must be float, int or bool arrays, got dtype {dtype}")


def _empty_window(metric_shapes: Mapping[str, jax.ShapeDtypeStruct]) -> _Window:
    sums = {k: jnp.zeros(s.shape, _accumulator_dtype(s.dtype)) for k, s in metric_shapes.items()}
    floats = [k for k, s in metric_shapes.items() if jnp.issubdtype(s.dtype, jnp.floating)]
    return _Window(
        sums, jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32), jnp.zeros(len(floats), bool)
    )


def _windowed(step_fn: StepFn, float_names: list[str]) -> Callable:
    """``step_fn`` plus the window bookkeeping (a few scalar ops fused into the step)."""

    def run(state, batch, window: _Window):
        new_state, metrics = step_fn(state, batch)
        sums = {k: window.sums[k] + metrics[k].astype(window.sums[k].dtype) for k in window.sums}
        if float_names:
            bad = jnp.stack([~jnp.all(jnp.isfinite(metrics[k])) for k in float_names])
        else:
            bad = jnp.zeros((0,), bool)
        first = (window.first_bad < 0) & jnp.any(bad)
        return new_state, _Window(
            sums,
            window.count + 1,
            jnp.where(first, jnp.asarray(state.step, jnp.int32), window.first_bad),
            jnp.where(first, bad, window.bad),
        )

    return run


def _to_python(value: Any) -> float | list:
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.tolist()


@jax.jit
def _finite_leaves(tree) -> list[jax.Array]:
    leaves = jax.tree.leaves(tree)
    return [
        jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
        for x in leaves
    ]


def _check_state_finite(state, done: int) -> None:
    """Raises FloatingPointError naming the leaves of ``state`` holding NaN or inf."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    flags = jax.device_get(_finite_leaves(state))
    bad = [p for p, ok in zip(paths, flags, strict=True) if not ok]
    if bad:
        raise FloatingPointError(
            f"non-finite values in the train state after step {done}, in {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''}; nothing was checkpointed at this step"
        )


# --------------------------------------------------------------------------- resuming


def _restore_newest_readable(
    ckpt: Checkpointer, state, identity: dict, steps: int
) -> tuple[Any, int | None]:
    """``(state, step)`` of the newest checkpoint that can be read, ``(None, None)`` if none.

    An unreadable checkpoint is reported on stderr and moved aside (kept, under
    ``checkpoints-unreadable/``; :meth:`Checkpointer.set_aside`), and the previous one is
    tried. A readable checkpoint of another run (seed, batch size, data size) or beyond
    ``steps`` raises ``ValueError``.
    """
    skipped = False
    for step in reversed(ckpt.all_steps()):
        path = ckpt.step_path(step)
        try:
            stored = ckpt.metadata(step)
            differ = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
            if differ:
                raise ValueError(
                    f"cannot resume from {path}: it was trained with a different "
                    + ", ".join(f"{k} (stored {a}, now {b})" for k, (a, b) in differ.items())
                    + "; use another run_dir"
                )
            if step > steps:
                raise ValueError(
                    f"{path} is at step {step}, beyond steps={steps}; "
                    "use another run_dir or more steps"
                )
            restored = ckpt.restore(step, state)
        except CheckpointReadError as error:
            cause = error.__cause__ or error
            kept = ckpt.set_aside(step)
            print(
                f"jaxmtl.train.fit: cannot read the checkpoint at {path} (step {step}; "
                f"{type(cause).__name__}: {str(cause)[:300]}); kept it at {kept}, "
                "trying the previous one",
                file=sys.stderr,
                flush=True,
            )
            skipped = True
            continue
        if skipped:
            print(f"jaxmtl.train.fit: resuming from step {step} ({path})", file=sys.stderr)
        return restored, step
    if skipped:
        print(
            "jaxmtl.train.fit: no readable checkpoint left; starting from step 0", file=sys.stderr
        )
    return None, None


# --------------------------------------------------------------------------- metrics file


def _read_history(path: Path, upto: int) -> list[dict]:
    """The entries of ``metrics.jsonl`` with ``step <= upto``; rewrites the file without the
    later ones (written after the checkpoint that the run resumes from, about to be redone).
    Lines without a ``step`` are kept in the file but are not history."""
    from jaxmtl.experiment import read_jsonl  # drops a last line cut by a crash

    if not path.exists():
        return []
    kept, history = [], []
    for entry in read_jsonl(path):
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            if entry["step"] > upto:
                continue
            history.append(entry)
        kept.append(json.dumps(entry))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return history


class _Progress:
    """A tqdm bar on a terminal; plain lines on stderr otherwise; nothing if disabled."""

    def __init__(self, enabled: bool, start: int, steps: int):
        self.enabled, self.steps = enabled, steps
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True)
        self.last_time, self.last_step = time.perf_counter(), start

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def report(self, entry: dict) -> None:
        if not self.enabled:
            return
        now, done = time.perf_counter(), entry["step"]
        rate = (done - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, done
        shown = {k: v for k, v in entry.items() if k != "step" and isinstance(v, float)}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        else:
            values = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            self.message(f"step {done}/{self.steps}  {values}  ({rate:.1f} steps/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the jit cache

# step_fn -> {(signature of (state, batch), mesh): (metric shapes, float names, jitted step)}.
# Weak keys: a step function that is no longer referenced frees its compiled steps.
_STEP_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(tree: Any) -> tuple:
    """The tree structure and every leaf's shape and dtype (what a jit trace depends on)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (np.shape(x), str(getattr(x, "dtype", type(x))), bool(getattr(x, "weak_type", False)))
        for x in leaves
    )


def _compiled_step(step_fn: StepFn, state: Any, batch: Any, mesh: Any):
    """``(metric_shapes, float_names, train_step)`` for :func:`fit`, made once per
    ``step_fn`` object, input shapes and mesh and reused by later ``fit`` calls.

    Calling ``fit`` again with the same ``step_fn`` (e.g. one fine-tuning cell per task,
    with parameters, heads and batches passed as arguments rather than closed over) neither
    traces nor compiles the step again. A step function that cannot be weakly referenced
    is not cached.
    """
    key = (_signature((state, batch)), mesh)
    try:
        entries = _STEP_CACHE.setdefault(step_fn, {})
    except TypeError:  # not weakly referenceable (e.g. a functools.partial of a builtin)
        entries = {}
    if key not in entries:
        _, metric_shapes = jax.eval_shape(step_fn, state, batch)
        if not isinstance(metric_shapes, Mapping) or not all(
            isinstance(k, str) for k in metric_shapes
        ):
            raise TypeError("step_fn must return (state, metrics) with metrics a dict keyed by str")
        float_names = [k for k, s in metric_shapes.items() if jnp.issubdtype(s.dtype, jnp.floating)]
        placement = {}
        if mesh is not None:
            from jaxmtl import parallel

            placement = {"out_shardings": parallel.replicated(mesh)}
        step = jax.jit(_windowed(step_fn, float_names), donate_argnums=(0, 2), **placement)
        entries[key] = (metric_shapes, float_names, step)
    return entries[key]


# --------------------------------------------------------------------------- fit


def fit(
    state: TrainState,
    step_fn: StepFn,
    train_data: Mapping[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    eval_fn: Callable[[PyTree], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    run_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    max_to_keep: int = 3,
    log_every: int = 50,
    progress: bool = True,
    check_finite: bool = True,
    mesh: Any = None,
) -> tuple[TrainState, list[dict]]:
    """Trains until ``state.step == steps``; resumable, deterministic.

    Update ``k`` (0-based) applies ``step_fn`` (jitted once, state donated) to the batch
    ``jaxmtl.data.batch_at(train_data, k, batch_size=batch_size, seed=seed)``. The jitted
    step is kept per ``step_fn`` object, input shapes and mesh: a later ``fit`` with the same
    ``step_fn`` and shapes reuses it, with no new trace or compilation (pass what differs
    between runs, such as parameters or frozen heads, in the state or the batch rather than
    closing over it in a new function).

    Args:
      state: the initial state (:func:`init_state`); a pytree with an int ``step`` field. It
        is copied, not donated: the caller's arrays stay valid.
      step_fn: ``step_fn(state, batch) -> (state, metrics)``, metrics a dict of float (or int)
        arrays (:func:`make_train_step`, or a hand-written multi-task step).
      train_data: the training split, a dict of arrays with a common first axis.
      steps: the total number of updates (counted from step 0, also when resuming).
      batch_size, seed: the batch size and the data-order seed.
      eval_fn: ``eval_fn(params) -> dict`` of floats (or arrays), run every ``eval_every``
        steps and at the end; its keys must differ from the train metrics'.
      eval_every: 0 evaluates at the end only.
      run_dir: where to write ``metrics.jsonl`` (one JSON line per history entry) and orbax
        checkpoints (``run_dir/checkpoints``, at most ``max_to_keep``, at least 2). If it holds a
        checkpoint, the run resumes from the latest one (same ``seed``, ``batch_size`` and
        number of training examples required) and the history up to it is read back; lines
        of ``metrics.jsonl`` with a later ``step`` are dropped (they are redone). One training
        run per ``run_dir``: inside an experiment use ``RunDir.subdir(name)``.
      checkpoint_every: save every that many steps (0: only at the end; needs ``run_dir``).
      log_every: a history entry (and a progress line) every that many steps; 0: only at
        checkpoints, evals and the end.
      progress: show a tqdm bar on a terminal, plain lines on stderr otherwise.
      check_finite: stop on a non-finite metric or state (see below).
      mesh: a ``jax.sharding.Mesh`` (or a ``jaxmtl.parallel.make_mesh`` description such as
        ``"data=4,task=2"``): every batch is split over its ``data`` axis
        (``jaxmtl.parallel.shard_batch``; ``batch_size`` must be divisible by its size), the
        state is replicated, and the jitted step keeps its outputs replicated. The step is the
        one-device ``step_fn``: XLA computes every task's gradient over the whole batch before
        the aggregator. ``None``: no placement (one device).

    Returns:
      ``(state, history)``. ``history`` is a list of dicts, each with ``"step"`` (updates done),
      the train metrics averaged over the updates since the previous entry (every log,
      checkpoint and final step flushes this window; checkpoint steps flush it so that a
      resumed run's windows line up with an uninterrupted run's), and the eval metrics at eval
      steps, as Python floats (nested lists for array metrics).

    Raises:
      FloatingPointError: a float metric was NaN or inf at some update (named with its step)
        or the state holds NaN/inf at a checkpoint or at the end. The check is cheap and runs
        inside the jitted step (a sticky "first bad step" flag), so no host sync is added:
        it is *read* at the next log, eval or checkpoint boundary, always before anything is
        saved; the last good checkpoint is kept and no bad state is ever written.

    An unreadable checkpoint in ``run_dir`` (a crash while writing, a damaged disk) does not
    stop the run: it is reported on stderr, moved to ``run_dir/checkpoints-unreadable/``
    (kept), and the run resumes from the newest one that can be read (from step 0 if none).
    """
    from jaxmtl.data import batch_at  # imported here: the data package loads its loaders

    steps = _check_int("steps", steps, minimum=0)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    eval_every = _check_int("eval_every", eval_every, minimum=0)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, minimum=0)
    log_every = _check_int("log_every", log_every, minimum=0)
    if not hasattr(state, "step"):
        raise TypeError(f"state must be a TrainState (with a step), got {type(state).__name__}")
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    if eval_every and eval_fn is None:
        raise ValueError(f"eval_every={eval_every} needs an eval_fn")
    if checkpoint_every and run_dir is None:
        raise ValueError(f"checkpoint_every={checkpoint_every} needs a run_dir")
    if not isinstance(train_data, Mapping) or not train_data:
        raise TypeError("train_data must be a non-empty dict of arrays")
    sizes = {k: len(v) for k, v in train_data.items()}
    num_examples = min(sizes.values())
    if len(set(sizes.values())) != 1:
        raise ValueError(f"train_data arrays must share their first axis, got sizes {sizes}")
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples")
    if mesh is not None:
        from jaxmtl import parallel

        mesh = parallel.make_mesh(mesh)
        shards = int(dict(mesh.shape).get("data", 1))
        if batch_size % shards:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by the mesh's 'data' axis size {shards}"
            )

    run_path = None if run_dir is None else Path(run_dir)
    ckpt = None
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        # At least two: the previous checkpoint is the fallback for an unreadable latest one.
        ckpt = Checkpointer(run_path / "checkpoints", max_to_keep=max(2, max_to_keep))
    try:
        return _fit(
            state,
            step_fn,
            train_data,
            batch_at,
            ckpt=ckpt,
            run_path=run_path,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            num_examples=num_examples,
            eval_fn=eval_fn,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            progress=progress,
            check_finite=check_finite,
            mesh=mesh,
        )
    finally:
        if ckpt is not None:
            ckpt.close()  # waits for the last (good) asynchronous save


def _fit(
    state,
    step_fn,
    train_data,
    batch_at,
    *,
    ckpt: Checkpointer | None,
    run_path: Path | None,
    steps,
    batch_size,
    seed,
    num_examples,
    eval_fn,
    eval_every,
    checkpoint_every,
    log_every,
    progress,
    check_finite,
    mesh=None,
):
    if mesh is not None:
        from jaxmtl import parallel

        unsharded_batch_at = batch_at

        def batch_at(*args, **kwargs):
            return parallel.shard_batch(unsharded_batch_at(*args, **kwargs), mesh)

    identity = {"seed": seed, "batch_size": batch_size, "num_examples": num_examples}
    restored = None
    if ckpt is not None:
        restored_state, restored = _restore_newest_readable(ckpt, state, identity, steps)
    if restored is not None:
        state = restored_state
    else:
        # A private copy, donated to the jitted step: the caller's arrays stay valid.
        state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    start = int(state.step)
    if start > steps:
        raise ValueError(f"state.step={start} is beyond steps={steps}")
    metrics_path = None if run_path is None else run_path / "metrics.jsonl"
    history = [] if metrics_path is None else _read_history(metrics_path, upto=start)

    report = _Progress(progress, start, steps)
    if restored is not None:
        report.message(f"resumed from step {restored} ({ckpt.step_path(restored)})")

    def record(entry: dict) -> None:
        history.append(entry)
        if metrics_path is not None:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        report.report(entry)

    def evaluate(params, done: int) -> dict:
        values = {k: _to_python(v) for k, v in dict(eval_fn(params)).items()}
        clash = sorted(set(values) & (set(metric_shapes) | {"step"}))
        if clash:
            raise ValueError(f"eval_fn's keys {clash} clash with the train metrics at step {done}")
        return values

    if start == steps:
        report.close()
        return state, history

    first_batch = batch_at(train_data, start, batch_size=batch_size, seed=seed)
    metric_shapes, float_names, train_step = _compiled_step(step_fn, state, first_batch, mesh)
    window = _empty_window(metric_shapes)

    def check_window(done: int) -> None:
        first_bad, bad = jax.device_get((window.first_bad, window.bad))
        if check_finite and first_bad >= 0:
            names = [k for k, flag in zip(float_names, bad, strict=True) if flag]
            kept = ""
            if ckpt is not None:
                kept = f"; last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}"
            raise FloatingPointError(
                f"non-finite {', '.join(repr(n) for n in names)} at step {int(first_bad) + 1} "
                f"(the update from step {int(first_bad)}; seen at step {done}){kept}"
            )

    try:
        for index in range(start, steps):
            batch = first_batch if index == start else None
            if batch is None:
                batch = batch_at(train_data, index, batch_size=batch_size, seed=seed)
            state, window = train_step(state, batch, window)
            report.advance()
            done = index + 1
            last = done == steps
            saving = ckpt is not None and (
                last or (checkpoint_every > 0 and done % checkpoint_every == 0)
            )
            flushing = last or saving or (log_every > 0 and done % log_every == 0)
            evaluating = eval_fn is not None and (
                last or (eval_every > 0 and done % eval_every == 0)
            )
            if not (flushing or evaluating):
                continue
            check_window(done)
            entry: dict[str, Any] = {"step": done}
            if flushing:
                count = int(window.count)
                sums = jax.device_get(window.sums)
                entry.update({k: _to_python(np.asarray(v) / count) for k, v in sums.items()})
                window = _empty_window(metric_shapes)
            if evaluating:
                entry.update(evaluate(state.params, done))
            if saving:
                if check_finite:
                    _check_state_finite(state, done)
                ckpt.save(done, state, metadata={**identity, "steps": steps})
            elif last and check_finite:
                _check_state_finite(state, done)
            record(entry)
    finally:
        report.close()
    return state, history
