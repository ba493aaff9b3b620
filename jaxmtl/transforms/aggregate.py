"""Optax transforms over per-task gradients: ``optax.chain(upgrad(), optax.adam(1e-3))``.

Every factory returns an ``optax.experimental.aggregating.Aggregator`` (an
``optax.GradientTransformationExtraArgs``): ``update`` takes updates with a leading task axis
K on every shared leaf (as ``jaxmtl.mtl.task_gradients`` returns them) and returns
parameter-shaped updates; non-shared leaves (task heads) carry no task axis and pass through.
``init(params)`` takes the parameters (no task axis). Every ``update`` accepts and ignores
unknown ``**extra_args``; the loss-based methods read ``task_losses=`` (K,) from them.

Most methods are a weighting (``jaxmtl.transforms.weighting``) composed with
``weights @ J`` leaf by leaf: :func:`aggregate` does the composition, computing the Gramian
``J J^T`` leaf by leaf only when the weighting needs it. GradDrop and DB-MTL are not
weightings and have their own transforms here.

Composition with optax wrappers:

* ``jax.jit``: all of it; solvers have fixed iteration counts.
* ``optax.inject_hyperparams(jaxmtl.transforms.cagrad, static_args="iterations")(c=0.5)``:
  float hyperparameters become state; pass integer and structural ones (``num_tasks``,
  ``iterations``, ``seed``, a ``shared`` predicate) through ``static_args``. A predicate is a
  callable, which ``inject_hyperparams`` otherwise calls as a schedule with the step count
  (an IndexError or AttributeError from inside the predicate, or a ``shared:`` error here
  if it returns); a boolean-pytree ``shared`` mask needs no ``static_args``.
* ``optax.MultiSteps`` accumulates updates shaped like the parameters, so it wraps the part
  of the chain after the aggregator: ``optax.chain(upgrad(), optax.MultiSteps(optax.adam(1e-3),
  every_k_schedule=4))`` averages the aggregated directions of four micro-batches. Around
  the aggregator it would hand it parameter-shaped updates, which ``update`` reports.

Checks (at trace time): every shared leaf of ``updates`` has the same leading task axis K;
when ``update`` is given ``params``, a shared leaf's update has shape ``(K, *param.shape)``
and a task-specific one ``param.shape``. A mismatch (``shared=`` given to
``jaxmtl.mtl.task_gradients`` but not to the transform, or the other way round) raises a
``ValueError`` naming the leaf, the expected and the received shape.

Non-finite input: if any leaf of ``updates``, the ``task_losses=`` or the
``feature_gradients=`` extra argument holds a NaN or an infinity, the returned update is NaN
on every leaf (task heads included; never a partial update) and the returned state is the
input state, unchanged, so that no method's state (DB-MTL's EMAs, GradVac's targets, FAMO's
logits, DWA's losses, uncertainty's log-variances) ever absorbs the fault. To skip such a
step, put ``optax.apply_if_finite`` after the aggregator,
``optax.chain(upgrad(), optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=5))``,
or wrap the whole chain in :func:`skip_nonfinite`. ``optax.apply_if_finite`` itself cannot
wrap a chain that starts with an aggregator: for a rejected step it returns zeros shaped
like its input, the per-task gradients, which are not shaped like the chain's output.

Dtypes: weights, Gramians and states are float64 for float64 gradients (x64) and float32
otherwise (bfloat16 included); ``init(params)`` makes a float64 state for float64
parameters. Each output leaf has its update's dtype.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.experimental import aggregating

from jaxmtl.mtl import gradients as mtl
from jaxmtl.transforms import weighting as W

__all__ = [
    "DBMTLState",
    "aggregate",
    "aligned_mtl",
    "cagrad",
    "constant",
    "db_mtl",
    "dualproj",
    "dwa",
    "fairgrad",
    "famo",
    "gls",
    "graddrop",
    "gradvac",
    "imtl_g",
    "mean",
    "mgda",
    "mgda_ub",
    "nash_mtl",
    "pcgrad",
    "rlw",
    "skip_nonfinite",
    "stch",
    "summed",
    "uncertainty",
    "upgrad",
]

Aggregator = aggregating.Aggregator


_SAME_SHARED = "pass the same shared= to jaxmtl.mtl.task_gradients and to this transform"
_WRAPPERS = (
    "per-task gradients come from jaxmtl.mtl.task_gradients; optax wrappers that form updates "
    "shaped like params (optax.MultiSteps, optax.apply_if_finite) belong after the "
    "aggregator, e.g. optax.chain(aggregator, optax.MultiSteps(optax.adam(1e-3), 4)), or "
    "use jaxmtl.transforms.skip_nonfinite around the whole chain"
)


def _task_axis(updates: Any, shared: Any, params: Any = None) -> int:
    """K, the leading task axis of the shared leaves of ``updates``, after checking them.

    Without ``params``: every shared leaf has the same leading axis. With ``params``: the
    same structure, and a shared leaf's update has shape ``(K, *param.shape)``, a task-specific
    one ``param.shape``. Errors name the leaf (``updates['trunk']``), the expected and the
    received shape.
    """
    if params is None:
        return mtl._task_axis(updates, shared, name="updates")
    updates_def, params_def = jax.tree.structure(updates), jax.tree.structure(params)
    if updates_def != params_def:
        raise ValueError(
            f"updates: expected the structure of params {params_def}, got {updates_def}"
        )
    flags = jax.tree.leaves(mtl.shared_mask(updates, shared))
    rows = [
        (f"updates{jax.tree_util.keystr(path)}", is_shared, jnp.shape(u), jnp.shape(p))
        for (path, u), p, is_shared in zip(
            jax.tree_util.tree_flatten_with_path(updates)[0],
            jax.tree.leaves(params),
            flags,
            strict=True,
        )
    ]
    shared_rows = [row for row in rows if row[1]]
    if not shared_rows:
        raise ValueError("shared: expected at least one shared leaf, got none")
    with_axis = [u for _, _, u, p in shared_rows if len(u) == len(p) + 1]
    if not with_axis:
        name, _, u, p = shared_rows[0]
        raise ValueError(
            f"{name}: expected shape (K, {', '.join(map(str, p))}) (a shared leaf carries a "
            "leading task axis), "
            f"got {u}: every shared leaf is shaped like its parameter; {_WRAPPERS}"
        )
    k = with_axis[0][0]
    for name, is_shared, u, p in rows:
        expected = (k, *p) if is_shared else p
        if u == expected:
            continue
        if is_shared and u == p:
            why = (
                f"no task axis, but this transform's shared= makes the leaf shared: {_SAME_SHARED}"
            )
        elif not is_shared and u == (k, *p):
            why = (
                f"a task axis, but this transform's shared= makes the leaf task-specific: "
                f"{_SAME_SHARED}"
            )
        else:
            kind = "shared: (K, *param.shape)" if is_shared else "task-specific: param.shape"
            why = f"expected {kind} with K = {k}; {_SAME_SHARED}"
        raise ValueError(f"{name}: expected shape {expected}, got {u} ({why})")
    return k


def _all_finite(updates: Any, extra_args: dict[str, Any]) -> jax.Array:
    """Whether every leaf of ``updates`` and of the task losses / feature gradients is finite."""
    trees = [updates, extra_args.get("task_losses"), extra_args.get("feature_gradients")]
    checks = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _guarded(step, shared: Any):
    """The ``update`` of an aggregator from ``step(updates, state, k, **extra_args)``.

    Checks the task axes (:func:`_task_axis`) and applies the non-finite rule of the module
    docstring: an update that is NaN on every leaf and the input state, unchanged.
    """

    def update_fn(updates, state, params=None, **extra_args):
        k = _task_axis(updates, shared, params)
        out, new_state = step(updates, state, k, **extra_args)
        finite = _all_finite(updates, extra_args)
        out = jax.tree.map(lambda u: jnp.where(finite, u, jnp.asarray(jnp.nan, u.dtype)), out)
        new_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
        return out, new_state

    return update_fn


def _accumulation_dtype(tree: Any, shared: Any) -> jnp.dtype:
    """float64 if a shared leaf of ``tree`` (updates or params) is float64, else float32."""
    if tree is None:  # init(None)
        return jnp.dtype(jnp.float32)
    mask = jax.tree.leaves(mtl.shared_mask(tree, shared))
    dtypes = [
        getattr(x, "dtype", None) for m, x in zip(mask, jax.tree.leaves(tree), strict=True) if m
    ]
    return jnp.dtype(jnp.float64 if jnp.dtype(jnp.float64) in dtypes else jnp.float32)


def _cast_state(state: Any, dtype: jnp.dtype) -> Any:
    """``state`` with its float32 leaves in ``dtype`` (keys, counts and others unchanged)."""

    def cast(x):
        return x.astype(dtype) if getattr(x, "dtype", None) == jnp.float32 else x

    return jax.tree.map(cast, state)


def aggregate(
    weighting: W.Weighting,
    *,
    shared: Any = None,
    gramian_source: Literal["updates", "features"] = "updates",
) -> Aggregator:
    """The optax transform ``J -> w(J J^T) @ J`` of a weighting, leaf by leaf.

    ``update(updates, state, params=None, **extra_args)``: ``updates`` has a leading task axis
    K on every shared leaf; the Gramian of ``J / s`` (``s`` a power of two >= max |J|, see
    ``weighting.scaled_gramian``, so that float32 gradients of norm 1e-20 or 1e20 neither
    underflow nor overflow) is accumulated leaf by leaf in float32 (float64 for float64
    leaves), the weights come from ``weighting.weights(G, state, num_tasks=K, dtype=...,
    gradient_scale=s, **extra_args)`` (``dtype`` that accumulation dtype), and the output is
    ``sum_k w_k updates[k]`` per shared leaf (each leaf's dtype), non-shared leaves unchanged.
    ``init(params)`` is ``weighting.init()`` with float32 leaves made float64 for float64
    shared parameters. Checks and non-finite input: see the module docstring.

    Args:
      weighting: a :class:`jaxmtl.transforms.weighting.Weighting`.
      shared: which leaves carry the task axis (see ``jaxmtl.mtl.shared_mask``).
      gramian_source: ``"updates"`` (the parameter form) or ``"features"``: the Gramian of
        the extra argument ``feature_gradients`` (K, *z.shape), the gradients of the task
        losses with respect to the shared representation (``jaxmtl.mtl.representation_
        gradients``); with :func:`mgda` weighting this is MGDA-UB.

    >>> tx = aggregate(W.mean())
    >>> upd, _ = tx.update({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, tx.init({"w": jnp.zeros(2)}))
    >>> upd["w"].tolist()
    [2.0, 3.0]
    """
    if not isinstance(weighting, W.Weighting):
        raise TypeError(f"weighting: expected a Weighting, got {type(weighting).__name__}")
    if gramian_source not in ("updates", "features"):
        raise ValueError(
            f"gramian_source: expected 'updates' or 'features', got {gramian_source!r}"
        )

    def init_fn(params):
        return _cast_state(weighting.init(), _accumulation_dtype(params, shared))

    def step(updates, state, k, **extra_args):
        gramian, scale = None, None
        if weighting.needs_gramian:
            if gramian_source == "features":
                features = extra_args.pop("feature_gradients", None)
                if features is None:
                    raise ValueError(
                        "feature_gradients: gramian_source='features' needs "
                        "feature_gradients=(K, *z.shape) as an extra argument"
                    )
                gramian, scale = W.scaled_gramian(features)
                if gramian.shape[0] != k:
                    raise ValueError(
                        f"feature_gradients: expected leading task axis {k}, got {gramian.shape[0]}"
                    )
            else:
                gramian, scale = W.scaled_gramian(updates, shared)
        extra_args.pop("num_tasks", None)
        extra_args.pop("gradient_scale", None)
        extra_args["dtype"] = _accumulation_dtype(updates, shared)
        weights, new_state = weighting.weights(
            gramian, state, num_tasks=k, gradient_scale=scale, **extra_args
        )
        return mtl.combine(weights, updates, shared), optax.tree.cast_like(new_state, state)

    return Aggregator(init_fn, _guarded(step, shared))


# ----------------------------------------------------------------------------- weightings


def mean(*, shared: Any = None) -> Aggregator:
    """The mean of the task gradients (equal weighting), see ``weighting.mean``."""
    return aggregate(W.mean(), shared=shared)


def summed(*, shared: Any = None) -> Aggregator:
    """The sum of the task gradients (the summed loss), see ``weighting.summed``."""
    return aggregate(W.summed(), shared=shared)


def constant(weights: Any, *, shared: Any = None) -> Aggregator:
    """Fixed task weights (K,), see ``weighting.constant``."""
    return aggregate(W.constant(weights), shared=shared)


def rlw(*, seed: int = 0, shared: Any = None) -> Aggregator:
    """Random loss weighting (Lin et al., TMLR 2022), see ``weighting.rlw``."""
    return aggregate(W.rlw(seed=seed), shared=shared)


def mgda(*, iterations: int | None = None, shared: Any = None) -> Aggregator:
    """MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018, Eq. 3), see ``weighting.mgda``.

    >>> tx = mgda()
    >>> j = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> [round(x, 3) for x in tx.update(j, tx.init(None))[0]["w"].tolist()]
    [0.8, 0.4]
    """
    return aggregate(W.mgda(iterations=iterations), shared=shared)


def mgda_ub(*, iterations: int | None = None, shared: Any = None) -> Aggregator:
    """MGDA-UB: MGDA's weights from the Gramian of the representation gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018),
    Sec. 3.3, Eq. 6: ``w = argmin_{w in simplex} ||sum_k w_k dL_k/dz||^2``, applied to the
    parameter gradients. Needs ``feature_gradients=`` (K, *z.shape), e.g. the fourth output of
    ``jaxmtl.mtl.representation_gradients``.
    """
    return aggregate(W.mgda(iterations=iterations), shared=shared, gramian_source="features")


def upgrad(
    *, pref_vector: Any = None, iterations: int | None = None, shared: Any = None
) -> Aggregator:
    """UPGrad (Quinton & Rey 2024, Eq. 5), see ``weighting.upgrad``.

    >>> import optax
    >>> tx = optax.chain(upgrad(), optax.sgd(1.0))
    >>> j = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> [round(x, 3) for x in tx.update(j, tx.init({"w": jnp.zeros(2)}))[0]["w"].tolist()]
    [-0.25, -0.75]
    """
    return aggregate(W.upgrad(pref_vector=pref_vector, iterations=iterations), shared=shared)


def dualproj(
    *, pref_vector: Any = None, iterations: int | None = None, shared: Any = None
) -> Aggregator:
    """DualProj (Quinton & Rey 2024, Sec. 5), see ``weighting.dualproj``."""
    return aggregate(W.dualproj(pref_vector=pref_vector, iterations=iterations), shared=shared)


def cagrad(
    *, c: float = 0.4, rescale: bool = False, iterations: int = 100, shared: Any = None
) -> Aggregator:
    """CAGrad (Liu et al., NeurIPS 2021, Eqs. 3-4), see ``weighting.cagrad``."""
    return aggregate(W.cagrad(c=c, rescale=rescale, iterations=iterations), shared=shared)


def imtl_g(*, shared: Any = None) -> Aggregator:
    """IMTL-G (Liu et al., ICLR 2021, Eq. 11), see ``weighting.imtl_g``."""
    return aggregate(W.imtl_g(), shared=shared)


def aligned_mtl(
    *, pref_vector: Any = None, scale_mode: str = "min", shared: Any = None
) -> Aggregator:
    """Aligned-MTL (Senushkin et al., CVPR 2023, Eqs. 7-10), see ``weighting.aligned_mtl``."""
    return aggregate(W.aligned_mtl(pref_vector=pref_vector, scale_mode=scale_mode), shared=shared)


def fairgrad(*, alpha: float = 1.0, iterations: int = 25, shared: Any = None) -> Aggregator:
    """FairGrad (Ban & Ji, ICML 2024, Eq. 9), see ``weighting.fairgrad``."""
    return aggregate(W.fairgrad(alpha=alpha, iterations=iterations), shared=shared)


def nash_mtl(*, iterations: int = 25, shared: Any = None) -> Aggregator:
    """Nash-MTL (Navon et al., ICML 2022, Eq. 4), see ``weighting.nash_mtl``."""
    return aggregate(W.nash_mtl(iterations=iterations), shared=shared)


def pcgrad(*, seed: int = 0, shared: Any = None) -> Aggregator:
    """PCGrad (Yu et al., NeurIPS 2020, Alg. 1) as an exact Gramian weighting, see
    ``weighting.pcgrad``.

    >>> tx = pcgrad()
    >>> j = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> [round(x, 3) for x in tx.update(j, tx.init(None))[0]["w"].tolist()]
    [0.5, 1.5]
    """
    return aggregate(W.pcgrad(seed=seed), shared=shared)


def gradvac(*, num_tasks: int, beta: float = 0.01, seed: int = 0, shared: Any = None) -> Aggregator:
    """Gradient Vaccine (Wang et al., ICLR 2021, Eqs. 2-4), see ``weighting.gradvac``."""
    return aggregate(W.gradvac(num_tasks=num_tasks, beta=beta, seed=seed), shared=shared)


def uncertainty(
    *, num_tasks: int, optimizer: optax.GradientTransformation | None = None, shared: Any = None
) -> Aggregator:
    """Uncertainty weighting (Kendall et al., CVPR 2018, Eq. 7); needs ``task_losses=``."""
    return aggregate(W.uncertainty(num_tasks=num_tasks, optimizer=optimizer), shared=shared)


def dwa(*, num_tasks: int, temperature: float = 2.0, shared: Any = None) -> Aggregator:
    """Dynamic weight average (Liu et al., CVPR 2019, Eq. 7); needs ``task_losses=``."""
    return aggregate(W.dwa(num_tasks=num_tasks, temperature=temperature), shared=shared)


def famo(
    *,
    num_tasks: int,
    learning_rate: float = 0.025,
    weight_decay: float = 1e-3,
    min_losses: Any = 0.0,
    shared: Any = None,
) -> Aggregator:
    """FAMO (Liu et al., NeurIPS 2023, Alg. 1); needs ``task_losses=``."""
    return aggregate(
        W.famo(
            num_tasks=num_tasks,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            min_losses=min_losses,
        ),
        shared=shared,
    )


def gls(*, shared: Any = None) -> Aggregator:
    """Geometric loss strategy (Chennupati et al., CVPRW 2019, Eq. 2); needs ``task_losses=``."""
    return aggregate(W.gls(), shared=shared)


def stch(
    *, mu: float = 1.0, pref_vector: Any = None, ideal: Any = 0.0, shared: Any = None
) -> Aggregator:
    """Smooth Tchebycheff (Lin et al., ICML 2024, Eq. 10); needs ``task_losses=``."""
    return aggregate(W.stch(mu=mu, pref_vector=pref_vector, ideal=ideal), shared=shared)


# ----------------------------------------------------------------------------- not weightings


def _check_leak(leak: Any) -> None:
    try:
        values = np.atleast_1d(np.asarray(leak, dtype=np.float64))
    except TypeError:  # traced (inject_hyperparams under jit): checked at init instead
        return
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(f"leak: expected values in [0, 1], got {leak}")


def graddrop(*, leak: Any = 0.0, seed: int = 0, shared: Any = None) -> Aggregator:
    """GradDrop: keep, element by element, only the gradients of one randomly chosen sign.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout" (NeurIPS 2020), Eqs. 1-3, applied to each shared parameter element: the sign
    purity ``P = (1 + sum_k g_k / sum_k |g_k|) / 2``, ``U ~ Uniform(0, 1)`` per element,
    ``M_k = 1[P > U] 1[g_k > 0] + 1[P < U] 1[g_k < 0]``, and
    ``d = sum_k (l_k + (1 - l_k) M_k) g_k`` with leak ``l`` (scalar or (K,), default 0). The
    paper applies it to activation gradients; the per-parameter form is the common one
    (LibMTL, torchjd). Not a weighting: the mask is elementwise.

    >>> tx = graddrop()
    >>> j = {"w": jnp.array([[1.0, -2.0], [3.0, -1.0]])}
    >>> tx.update(j, tx.init(None))[0]["w"].tolist()
    [4.0, -3.0]
    """
    _check_leak(leak)

    def init_fn(params):
        del params
        return W.KeyState(jax.random.PRNGKey(seed))

    def step(updates, state, k, **extra_args):
        del extra_args
        mask = mtl.shared_mask(updates, shared)
        key, sub = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(updates)
        flags = jax.tree.leaves(mask)
        out = []
        for index, (is_shared, g) in enumerate(zip(flags, leaves, strict=True)):
            if not is_shared:
                out.append(g)
                continue
            dtype = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
            g32 = g.astype(dtype)
            lk = jnp.broadcast_to(jnp.asarray(leak, dtype), (k,))
            lk = lk.reshape((k,) + (1,) * (g.ndim - 1))
            # Sums over the task axis as contractions: XLA:CPU reduces a leading axis with
            # jnp.sum 20-50x slower than with a dot.
            ones = jnp.ones((k,), dtype)
            total = jnp.tensordot(ones, g32, axes=1)
            magnitude = jnp.tensordot(ones, jnp.abs(g32), axes=1)
            tiny = jnp.finfo(dtype).tiny
            purity = 0.5 * (1.0 + total / jnp.where(magnitude > tiny, magnitude, 1.0))
            u = jax.random.uniform(jax.random.fold_in(sub, index), g.shape[1:], dtype)
            keep = ((purity > u) & (g32 > 0.0)) | ((purity < u) & (g32 < 0.0))
            factor = lk + (1.0 - lk) * keep.astype(dtype)
            out.append(jnp.tensordot(ones, factor * g32, axes=1).astype(g.dtype))
        return jax.tree.unflatten(treedef, out), W.KeyState(key)

    return Aggregator(init_fn, _guarded(step, shared))


class DBMTLState(NamedTuple):
    """DB-MTL's step count and EMA of log-loss gradients.

    ``buffer`` is shaped like the parameters: ``(K, *param.shape)`` on shared leaves, ``None``
    on task-specific ones (no placeholder arrays, so checkpointers store it as is).
    """

    count: jax.Array
    buffer: Any


def db_mtl(
    *, num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.5, shared: Any = None
) -> Aggregator:
    """DB-MTL: log-loss gradients, averaged over time, rescaled to the largest norm.

    Lin et al., "Dual-Balancing for Multi-Task Learning" (2023), Eqs. 4-6 and Alg. 1:
    ``h_k = grad log L_k = g_k / L_k``; ``m_k <- h_k + (beta / t^beta_sigma) (m_k - h_k)``;
    ``d = sum_k (max_i ||m_i|| / ||m_k||) m_k``. Its state holds the K gradient EMAs (K times
    the shared parameters). Needs ``task_losses=``; non-shared leaves pass through.

    >>> tx = db_mtl(num_tasks=2)
    >>> j = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> out, _ = tx.update(j, tx.init({"w": jnp.zeros(2)}), task_losses=jnp.array([2.0, 1.0]))
    >>> [round(x, 3) for x in out["w"].tolist()]
    [0.1, 0.1]
    """
    W._check_positive_int("num_tasks", num_tasks)
    W._check_range("beta", beta, 0.0, 1.0)
    W._check_range("beta_sigma", beta_sigma, 0.0)

    def init_fn(params):
        def buffer(is_shared, p):
            if not is_shared:
                return None
            p = jnp.asarray(p)
            return jnp.zeros((num_tasks, *p.shape), W._float_dtype(p.dtype))

        mask = mtl.shared_mask(params, shared)
        return DBMTLState(jnp.zeros([], jnp.int32), jax.tree.map(buffer, mask, params))

    def step(updates, state, k, **extra_args):
        if k != num_tasks:
            raise ValueError(f"updates: expected leading task axis {num_tasks}, got {k}")
        treedef = jax.tree.structure(updates)
        flags = jax.tree.leaves(mtl.shared_mask(updates, shared))
        try:
            emas = treedef.flatten_up_to(state.buffer)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"state.buffer: expected the structure of updates {treedef} (init with the "
                f"same params), got {jax.tree.structure(state.buffer)}"
            ) from error
        dtype = _accumulation_dtype(updates, shared)
        losses = jax.lax.stop_gradient(W._task_losses(extra_args, num_tasks, dtype))
        count = optax.safe_increment(state.count)
        decay = jnp.asarray(beta, dtype) / count.astype(dtype) ** jnp.asarray(beta_sigma, dtype)
        inv_losses = 1.0 / jnp.maximum(losses, jnp.finfo(dtype).tiny)

        def ema(g, m):
            h = g.astype(m.dtype) * inv_losses.astype(m.dtype).reshape((k,) + (1,) * (g.ndim - 1))
            return h + decay.astype(m.dtype) * (m - h)

        grads = jax.tree.leaves(updates)
        emas = [ema(g, m) if f else None for f, g, m in zip(flags, grads, emas, strict=True)]
        squares = [
            jnp.sum(jnp.square(m.reshape(k, -1).astype(dtype)), axis=1)
            for m in emas
            if m is not None
        ]
        norms = jnp.sqrt(sum(squares[1:], squares[0]))
        # alpha_k = max_i ||m_i|| / ||m_k||; a zero m_k contributes nothing whatever alpha_k.
        positive = norms > jnp.finfo(dtype).tiny
        alpha = jnp.where(positive, jnp.max(norms) / jnp.where(positive, norms, 1.0), 0.0)
        out = [
            jnp.tensordot(alpha.astype(m.dtype), m, axes=1).astype(g.dtype) if f else g
            for f, g, m in zip(flags, grads, emas, strict=True)
        ]
        buffer = jax.tree.unflatten(treedef, emas)
        return jax.tree.unflatten(treedef, out), DBMTLState(count, buffer)

    return Aggregator(init_fn, _guarded(step, shared))


# ----------------------------------------------------------------------------- wrappers


def skip_nonfinite(
    inner: optax.GradientTransformation, *, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
    """``optax.apply_if_finite`` for a chain that starts with an aggregator.

    Skips a step (zero updates, ``inner``'s state kept) when the input updates, the
    ``task_losses=`` or ``feature_gradients=`` extra arguments, or ``inner``'s output hold a
    NaN or an infinity, unless more than ``max_consecutive_errors`` steps in a row did; the
    rule and the state (``optax.ApplyIfFiniteState``) are ``optax.apply_if_finite``'s. optax's
    own wrapper cannot take per-task gradients: for a rejected step it returns zeros shaped
    like its input (with the task axis), not like the chain's output.

    >>> tx = skip_nonfinite(optax.chain(mean(), optax.sgd(1.0)), max_consecutive_errors=3)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> out, state = tx.update({"w": jnp.array([[1.0, jnp.nan], [3.0, 4.0]])}, state)
    >>> out["w"].tolist(), int(state.total_notfinite)
    ([0.0, 0.0], 1)
    """
    if (
        isinstance(max_consecutive_errors, bool)
        or not isinstance(max_consecutive_errors, int)
        or max_consecutive_errors < 0
    ):
        raise ValueError(
            f"max_consecutive_errors: expected a non-negative Python int, "
            f"got {max_consecutive_errors!r}"
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        finite = _all_finite(updates, extra_args) & _all_finite(new_updates, {})
        zero = jnp.zeros([], jnp.int32)
        notfinite_count = jnp.where(finite, zero, optax.safe_increment(state.notfinite_count))
        accept = finite | (notfinite_count > max_consecutive_errors)
        new_updates = jax.tree.map(lambda u: jnp.where(accept, u, jnp.zeros_like(u)), new_updates)
        inner_state = jax.lax.cond(accept, lambda: inner_state, lambda: state.inner_state)
        total = jnp.where(
            finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)
        )
        return new_updates, optax.ApplyIfFiniteState(notfinite_count, finite, total, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
