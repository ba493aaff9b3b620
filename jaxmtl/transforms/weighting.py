"""Weightings: pure maps from the K x K Gramian ``J J^T`` (or the task losses) to K weights.

A multi-task aggregator is, for most methods, a *weighting* composed with ``w @ J`` applied
leaf by leaf (the split torchjd makes): ``d = sum_k w_k g_k`` with ``w = weighting(J J^T)``.
Writing each method once as a weighting lets the same code serve

* the parameter form: ``jaxmtl.transforms.aggregate(weighting)`` on per-task gradients,
* the representation form: the Gramian of the feature gradients (MGDA-UB), and
* the Gramian-only path ``jaxmtl.mtl.gramian_path``, which never forms ``J``.

A :class:`Weighting` is a pair of pure functions, ``init() -> state`` and
``weights(gramian, state, **extra_args) -> (w, state)``; ``state`` is a NamedTuple of arrays.
Loss-based weightings (uncertainty, DWA, FAMO, GLS, STCH) ignore the Gramian
(``needs_gramian=False``) and read ``task_losses=`` from the extra arguments; every
``weights`` accepts ``num_tasks=`` (passed by the aggregator) and ignores unknown extras.

Solvers run inside ``jit`` with fixed iteration counts (see ``_solvers``); weights are in the
Gramian's dtype (float32 for float32 or bfloat16 parameters, float64 under x64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmtl.mtl import gradients as _mtl
from jaxmtl.transforms import _solvers

__all__ = [
    "DWAState",
    "FAMOState",
    "GradVacState",
    "KeyState",
    "UncertaintyState",
    "Weighting",
    "aligned_mtl",
    "cagrad",
    "constant",
    "dualproj",
    "dwa",
    "fairgrad",
    "famo",
    "gls",
    "gradvac",
    "imtl_g",
    "mean",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "rlw",
    "scaled_gramian",
    "stch",
    "summed",
    "uncertainty",
    "upgrad",
]


class Weighting(NamedTuple):
    """A method written once as ``G (K x K) -> w (K,)``, with optional state.

    Attributes:
      init: ``() -> state`` (a NamedTuple of arrays, or ``optax.EmptyState()``).
      weights: ``(gramian, state, **extra_args) -> (w, state)``; ``gramian`` is ``None`` when
        ``needs_gramian`` is False, and then the number of tasks comes from ``num_tasks=`` or
        ``task_losses=``, and the weights' dtype from ``dtype=`` (the aggregator passes its
        gradients' accumulation dtype, float32 or float64), else the task losses' (float32
        when neither is given). ``state`` keeps the dtypes ``init`` gave it (the aggregator
        casts a float32 state to float64 for float64 parameters).
      needs_gramian: whether ``weights`` reads the Gramian (aggregators skip computing it if not).
    """

    init: Callable[[], Any]
    weights: Callable[..., tuple[jax.Array, Any]]
    needs_gramian: bool = True


class KeyState(NamedTuple):
    """State of randomised weightings: a raw ``uint32[2]`` PRNG key, split every step."""

    key: jax.Array


class GradVacState(NamedTuple):
    """GradVac's EMA of pairwise cosine targets ``phi_hat`` (K x K) and a PRNG key."""

    targets: jax.Array
    key: jax.Array


class UncertaintyState(NamedTuple):
    """Learned log-variances ``s_k = log sigma_k^2`` (K,) and their optimizer's state."""

    log_variances: jax.Array
    opt_state: Any


class DWAState(NamedTuple):
    """The task losses of the last two steps (K,) each, and how many steps were seen."""

    previous: jax.Array
    before_previous: jax.Array
    count: jax.Array


class FAMOState(NamedTuple):
    """FAMO's task logits ``xi`` (K,), their optimizer's state, the last losses, a step count."""

    logits: jax.Array
    opt_state: Any
    previous_losses: jax.Array
    count: jax.Array


# ----------------------------------------------------------------------------- helpers


def _concrete_float(value: Any) -> float | None:
    """``float(value)`` if it is known at trace time, else None (traced under jit)."""
    try:
        return float(value)
    except TypeError:  # a tracer (jax's conversion errors are TypeErrors)
        return None


def _check_range(name: str, value: Any, low: float, high: float = float("inf"), *, open_low=False):
    v = _concrete_float(value)
    if v is None:
        return
    ok = (v > low if open_low else v >= low) and v <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}: expected a value in {bracket}{low}, {high}], got {v}")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive Python int, got {value!r}")
    return value


def _check_gramian(gramian: Any) -> jax.Array:
    if gramian is None:
        raise ValueError("gramian: expected a (K, K) array, got None")
    gramian = jnp.asarray(gramian)
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] < 1:
        raise ValueError(f"gramian: expected a square (K, K) array, got shape {gramian.shape}")
    if not jnp.issubdtype(gramian.dtype, jnp.floating):
        raise TypeError(f"gramian: expected a floating dtype, got {gramian.dtype}")
    if gramian.dtype not in (jnp.float32, jnp.float64):
        gramian = gramian.astype(jnp.float32)
    return gramian


def _float_dtype(dtype: Any) -> jnp.dtype:
    """float64 for float64, float32 for every other dtype (bfloat16, float16, ...)."""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def _weights_dtype(gramian: jax.Array | None, dtype: Any) -> jnp.dtype:
    """The weights' dtype: the Gramian's, else ``dtype=`` (the gradients'), else float32."""
    if gramian is not None:
        return jnp.dtype(gramian.dtype)
    return _float_dtype(jnp.float32 if dtype is None else dtype)


def _task_losses(extra_args: dict[str, Any], num_tasks: int | None, dtype: Any = None) -> jax.Array:
    """``task_losses=`` (K,), checked, in ``dtype`` (the gradients'; default: its own)."""
    losses = extra_args.get("task_losses")
    if losses is None:
        raise ValueError("task_losses: this weighting needs task_losses=(K,) as an extra argument")
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
        raise ValueError(f"task_losses: expected shape (K,), got {losses.shape}")
    if num_tasks is not None and losses.shape[0] != num_tasks:
        raise ValueError(
            f"task_losses: expected {num_tasks} losses (one per task), got {losses.shape[0]}"
        )
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"task_losses: expected a floating dtype, got {losses.dtype}")
    return losses.astype(_float_dtype(losses.dtype if dtype is None else dtype))


def _preference(pref: Any, k: int, dtype: jnp.dtype, name: str) -> jax.Array:
    """The preference vector: ``1/K`` each when None, else ``pref`` (checked to be (K,))."""
    if pref is None:
        return jnp.full((k,), 1.0 / k, dtype)
    pref = jnp.asarray(pref)
    if pref.shape != (k,):
        raise ValueError(f"{name}: expected shape ({k},) (one entry per task), got {pref.shape}")
    return pref.astype(dtype)


def _num_tasks(gramian: jax.Array | None, num_tasks: int | None) -> int:
    if gramian is not None:
        return gramian.shape[0]
    if num_tasks is None:
        raise ValueError("num_tasks: expected the number of tasks when no gramian is given")
    return num_tasks


def _stateless(fn: Callable[[jax.Array], jax.Array]) -> Weighting:
    def weights(gramian, state, **extra_args):
        del extra_args
        return fn(_check_gramian(gramian)), state

    return Weighting(optax.EmptyState, weights)


def _new_key(seed: Any) -> jax.Array:
    return jax.random.PRNGKey(seed)


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    new_key, subkey = jax.random.split(key)
    return new_key, subkey


def scaled_gramian(grads: Any, shared: Any = None) -> tuple[jax.Array, jax.Array]:
    """``(G, s)``: the Gramian of ``J / s`` (K x K) and ``s``, a power of two >= max |J|.

    The Gramian every weighting should be given: ``J J^T`` of float32 gradients overflows
    beyond norms of about 2e19 and loses its digits below about 1e-18; ``J / s`` has entries
    in [-1, 1] and the division is exact. Pass ``gradient_scale=s`` to ``weights``: the
    scale-invariant weightings (``w(a G) = w(G)``: MGDA, UPGrad, DualProj, CAGrad, IMTL-G,
    Aligned-MTL, PCGrad, GradVac, and those that ignore ``G``) ignore it; Nash-MTL and
    FairGrad (``w(a G) = a^p w(G)``) multiply by ``s^(2p)``. Arguments as in
    ``jaxmtl.mtl.gramian``.

    >>> g, s = scaled_gramian({"w": jnp.array([[3e20, 0.0], [0.0, 1e20]])})
    >>> float(s), bool(jnp.all(jnp.isfinite(g)))
    (5.902958103587057e+20, True)
    """
    mask = _mtl.shared_mask(grads, shared)
    leaves = [x for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(grads), strict=True) if m]
    if not leaves:
        return _mtl.gramian(grads, shared), jnp.ones((), jnp.float32)  # raises, naming grads
    scale = _solvers.gradient_scale(leaves)
    scaled = jax.tree.map(lambda m, x: x / scale.astype(x.dtype) if m else x, mask, grads)
    return _mtl.gramian(scaled, shared), scale


# ----------------------------------------------------------------------------- fixed


def mean() -> Weighting:
    """``w_k = 1/K``: the average gradient (plain multi-task learning, "equal weighting").

    >>> w, _ = mean().weights(None, (), num_tasks=4)
    >>> w.tolist()
    [0.25, 0.25, 0.25, 0.25]
    """

    def weights(gramian, state, *, num_tasks=None, dtype=None, **extra_args):
        del extra_args
        k = _num_tasks(gramian, num_tasks)
        return jnp.full((k,), 1.0 / k, _weights_dtype(gramian, dtype)), state

    return Weighting(optax.EmptyState, weights, needs_gramian=False)


def summed() -> Weighting:
    """``w_k = 1``: the gradient of the summed loss.

    >>> summed().weights(None, (), num_tasks=2)[0].tolist()
    [1.0, 1.0]
    """

    def weights(gramian, state, *, num_tasks=None, dtype=None, **extra_args):
        del extra_args
        k = _num_tasks(gramian, num_tasks)
        return jnp.ones((k,), _weights_dtype(gramian, dtype)), state

    return Weighting(optax.EmptyState, weights, needs_gramian=False)


def constant(weights: Any) -> Weighting:
    """Fixed task weights ``w`` (K,): the classical static linear scalarisation.

    >>> constant([0.5, 2.0]).weights(None, (), num_tasks=2)[0].tolist()
    [0.5, 2.0]
    """
    fixed = jnp.asarray(weights)
    if fixed.ndim != 1:
        raise ValueError(f"weights: expected shape (K,), got {fixed.shape}")

    def weigh(gramian, state, *, num_tasks=None, dtype=None, **extra_args):
        del extra_args
        k = _num_tasks(gramian, num_tasks)
        if fixed.shape[0] != k:
            raise ValueError(f"weights: expected {k} weights (one per task), got {fixed.shape[0]}")
        return fixed.astype(_weights_dtype(gramian, dtype)), state

    return Weighting(optax.EmptyState, weigh, needs_gramian=False)


def rlw(*, seed: int = 0) -> Weighting:
    """Random loss weighting: ``w = softmax(z)``, ``z ~ N(0, I_K)`` drawn afresh every step.

    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning" (TMLR 2022), Sec. 3 (RLW with the normal distribution and softmax).

    >>> w, _ = rlw(seed=0).weights(None, rlw(seed=0).init(), num_tasks=3)
    >>> round(float(w.sum()), 5)
    1.0
    """

    def init():
        return KeyState(_new_key(seed))

    def weights(gramian, state, *, num_tasks=None, dtype=None, **extra_args):
        del extra_args
        k = _num_tasks(gramian, num_tasks)
        key, sub = _split(state.key)
        z = jax.random.normal(sub, (k,), _weights_dtype(gramian, dtype))
        return jax.nn.softmax(z), KeyState(key)

    return Weighting(init, weights, needs_gramian=False)


# ----------------------------------------------------------------------------- QP-based


def mgda(*, iterations: int | None = None) -> Weighting:
    """MGDA: the min-norm point of the convex hull of the task gradients.

    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization"
    (2012); Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS
    2018), Eq. 3: ``w = argmin_{w in simplex} ||sum_k w_k g_k||^2 = argmin w^T G w``. Solved
    exactly (active set, ``iterations`` defaults to ``3K + 2``). The direction satisfies
    ``g_k . d >= ||d||^2 >= 0`` for every task. Applied to the Gramian of the feature
    gradients ``dL_k/dz`` it is MGDA-UB (Sener & Koltun, Sec. 3.3).

    >>> w, _ = mgda().weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]), ())
    >>> [round(x, 4) for x in w.tolist()]
    [0.8, 0.2]
    """

    def fn(gramian):
        it = iterations or _solvers.default_iterations(gramian.shape[0])
        return _solvers.min_norm_in_simplex(gramian, iterations=it)

    return _stateless(fn)


def upgrad(*, pref_vector: Any = None, iterations: int | None = None) -> Weighting:
    """UPGrad: the preference-weighted sum of each gradient's projection onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024), Eq. 5:
    ``A(J) = sum_i p_i pi_J(g_i)`` with ``pi_J`` the projection onto ``{x : J x >= 0}``.
    By their Prop. 1, ``pi_J(J^T u) = J^T v``, ``v = argmin_{v >= u} v^T G v``, so
    ``w = sum_i p_i v_i`` (``v_i`` for ``u = e_i``). ``pref_vector`` defaults to ``1/K``.
    Non-conflicting: ``J d >= 0``.

    >>> w, _ = upgrad().weights(jnp.array([[1.0, -1.0], [-1.0, 4.0]]), ())
    >>> [round(x, 4) for x in w.tolist()]
    [1.0, 0.625]
    """

    def fn(gramian):
        k = gramian.shape[0]
        it = iterations or _solvers.default_iterations(k)
        pref = _preference(pref_vector, k, gramian.dtype, "pref_vector")
        eye = jnp.eye(k, dtype=gramian.dtype)
        v = _solvers.project_onto_dual_cone(gramian, eye, iterations=it)
        return pref @ v

    return _stateless(fn)


def dualproj(*, pref_vector: Any = None, iterations: int | None = None) -> Weighting:
    """DualProj: the projection of the preference-weighted gradient onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024), Sec. 5 (after
    Lopez-Paz & Ranzato, "Gradient Episodic Memory", 2017): ``d = pi_J(J^T p)``,
    ``w = argmin_{w >= p} w^T G w``; ``p`` defaults to ``1/K``. Non-conflicting.

    >>> w, _ = dualproj().weights(jnp.array([[1.0, -2.0], [-2.0, 5.0]]), ())
    >>> [round(x, 4) for x in w.tolist()]
    [1.0, 0.5]
    """

    def fn(gramian):
        k = gramian.shape[0]
        it = iterations or _solvers.default_iterations(k)
        pref = _preference(pref_vector, k, gramian.dtype, "pref_vector")
        return _solvers.project_onto_dual_cone(gramian, pref, iterations=it)

    return _stateless(fn)


def cagrad(*, c: float = 0.4, rescale: bool = False, iterations: int = 100) -> Weighting:
    """CAGrad: the direction within ``c ||g0||`` of the mean that maximises the worst task.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS 2021),
    Eq. 3 (primal): ``max_d min_k g_k . d`` s.t. ``||d - g0|| <= c ||g0||``, ``g0 = mean_k
    g_k``; at the optimum ``d = g0 + J^T l``, ``l >= 0``, the paper's
    ``g0 + (c ||g0|| / ||g_w||) g_w`` (Eq. 4, Alg. 1). Solved on the primal (see
    ``_solvers.cagrad_primal``: ``iterations`` levels of the objective tried, 8 at a time),
    which stays exact when the dual's ``g_w`` vanishes (nearly opposite gradients). Returned
    as weights on the rows: ``1/K + l``. ``c >= 0`` (``c = 0`` is the mean); ``rescale=True``
    divides by ``1 + c^2`` as the authors' code does. Zero rows are left out of the ``min``.
    Scale-invariant: ``w(a G) = w(G)``.

    >>> w, _ = cagrad(c=0.0).weights(jnp.array([[1.0, 0.0], [0.0, 1.0]]), ())
    >>> [round(x, 4) for x in w.tolist()]
    [0.5, 0.5]
    """
    _check_range("c", c, 0.0)
    _check_positive_int("iterations", iterations)

    def fn(gramian):
        cc = jnp.asarray(c, gramian.dtype)
        out = _solvers.cagrad_primal(gramian, c=cc, iterations=iterations)
        if rescale:
            out = out / (1.0 + cc**2)
        return out

    return _stateless(fn)


# ----------------------------------------------------------------------------- closed form


def imtl_g() -> Weighting:
    """IMTL-G: the direction with equal projections onto every task's unit gradient.

    Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021), Eq. 11: ``d = alpha J``
    with ``sum alpha = 1`` and ``d . u_k`` equal for all ``k``, ``u_k = g_k / ||g_k||``. With
    ``C = S^-1 G S^-1`` the correlation matrix (``S = diag ||g_k||``) that is
    ``alpha = S^-1 C^+ 1 / (1^T S^-1 C^+ 1)``, the paper's Eq. 11 solved in unit-norm
    coordinates, so tasks whose norms differ by 1e8 are treated alike; ``C^+`` (eigenvalues
    below ``10 K eps`` of the largest dropped) handles identical gradients. Zero rows are left
    out (``alpha_k = 0``). Scale-invariant: ``w(a G) = w(G)``.

    >>> w, _ = imtl_g().weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]), ())
    >>> [round(x, 4) for x in w.tolist()]
    [0.6667, 0.3333]
    """

    def fn(gramian):
        dtype = gramian.dtype
        k = gramian.shape[0]
        corr, inv_norms, live = _solvers.correlation_gramian(gramian)
        eigenvalues, vectors = jnp.linalg.eigh(corr)
        kept = eigenvalues > jnp.max(eigenvalues) * k * jnp.finfo(dtype).eps * 10
        inverse = jnp.where(kept, 1.0 / jnp.where(kept, eigenvalues, 1.0), 0.0)
        x = vectors @ (inverse * (vectors.T @ live.astype(dtype)))
        alpha = inv_norms * x
        total = jnp.sum(alpha)
        ok = jnp.abs(total) > 0
        return jnp.where(ok, alpha / jnp.where(ok, total, 1.0), jnp.full((k,), 1.0 / k, dtype))

    return _stateless(fn)


def aligned_mtl(*, pref_vector: Any = None, scale_mode: str = "min") -> Weighting:
    """Aligned-MTL: the Gramian whitened to the condition number 1, scaled back by ``sigma``.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning" (CVPR 2023),
    Eqs. 7-10: with ``J = U S V^T``, the aligned Jacobian is ``sigma U V^T`` and
    ``d = (sigma U V^T)^T p``. From ``G = V L V^T`` on its range,
    ``w = sigma V L^(-1/2) V^T p`` with ``sigma = sqrt(lambda_min)`` (``scale_mode="min"``),
    ``sqrt(median lambda)`` ("median") or ``sqrt(mean lambda)`` ("rmse"); eigenvalues below
    ``10 lambda_max K eps`` are treated as 0 (ten times the usual rank tolerance, for
    safety). ``pref_vector`` defaults to ones (the authors' code sums the aligned gradients).

    >>> w, _ = aligned_mtl().weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]), ())
    >>> [round(x, 4) for x in w.tolist()]
    [1.0, 0.5]
    """
    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(f"scale_mode: expected 'min', 'median' or 'rmse', got {scale_mode!r}")

    def fn(gramian):
        dtype = gramian.dtype
        k = gramian.shape[0]
        pref = jnp.ones((k,), dtype) if pref_vector is None else None
        if pref is None:
            pref = _preference(pref_vector, k, dtype, "pref_vector")
        g, scale = _solvers.normalized_gramian(gramian)
        eigenvalues, vectors = jnp.linalg.eigh(g)
        tol = jnp.max(eigenvalues) * k * jnp.finfo(dtype).eps * 10
        kept = eigenvalues > tol
        safe = jnp.where(kept, eigenvalues, 1.0)
        if scale_mode == "min":
            sigma2 = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
        elif scale_mode == "median":
            sigma2 = jnp.nanmedian(jnp.where(kept, eigenvalues, jnp.nan))
        else:
            count = jnp.maximum(jnp.sum(kept), 1).astype(dtype)
            sigma2 = jnp.sum(jnp.where(kept, eigenvalues, 0.0)) / count
        sigma2 = jnp.where(jnp.any(kept), sigma2, 0.0)
        inv_sqrt = jnp.where(kept, 1.0 / jnp.sqrt(safe), 0.0)
        b = (vectors * inv_sqrt[None, :]) @ vectors.T
        # sigma and L^(-1/2) were computed on G / s: their product is invariant to s.
        del scale
        return jnp.sqrt(sigma2) * (b @ pref)

    return _stateless(fn)


# ----------------------------------------------------------------------------- Newton


def _covariant(fn: Callable[[jax.Array], jax.Array], exponent: Any) -> Weighting:
    """A stateless weighting with ``w(a G) = a^exponent w(G)`` that reads ``gradient_scale=``.

    ``gradient_scale=s`` says that ``gramian`` is that of ``J / s`` (see :func:`scaled_gramian`):
    the weights for ``J`` are then ``s^(2 exponent) w(gramian)``.
    """

    def weights(gramian, state, *, gradient_scale=None, **extra_args):
        del extra_args
        w = fn(_check_gramian(gramian))
        if gradient_scale is None:
            return w, state
        s = jnp.asarray(gradient_scale, w.dtype)
        return w * jnp.exp2(2.0 * jnp.asarray(exponent, w.dtype) * jnp.log2(s)), state

    return Weighting(optax.EmptyState, weights)


def fairgrad(*, alpha: float = 1.0, iterations: int = 25) -> Weighting:
    """FairGrad: alpha-fair allocation, the positive ``w`` with ``G w = w^(-1/alpha)``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning" (ICML 2024), Eq. 9 (solved
    there with SciPy's least squares; here with damped Newton steps on the convex potential,
    ``iterations`` of them). ``alpha = 1`` is Nash-MTL. Non-conflicting: ``J d = G w > 0``.
    Zero rows are left out (``w_k = 0``). Scale-covariant: ``w(a G) = a^(-alpha / (alpha + 1))
    w(G)``, so ``d(cJ) = c^((1 - alpha) / (1 + alpha)) d(J)``; reads ``gradient_scale=``.

    >>> w, _ = fairgrad(alpha=1.0).weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]), ())
    >>> [round(x, 3) for x in w.tolist()]
    [1.0, 0.5]
    """
    _check_range("alpha", alpha, 0.0, open_low=True)

    def fn(gramian):
        return _solvers.fair_allocation(gramian, alpha=alpha, iterations=iterations)

    return _covariant(fn, -jnp.asarray(alpha) / (jnp.asarray(alpha) + 1.0))


def nash_mtl(*, iterations: int = 25) -> Weighting:
    """Nash-MTL: the Nash bargaining solution, the positive ``w`` with ``G w = 1 / w``.

    Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022), Eq. 4 /
    Thm. 5.1 (their code approximates it by sequential convex programmes; here damped Newton
    on the convex potential ``1/2 w^T G w - sum log w``). The direction is invariant to
    rescaling any task's gradient and has ``||d||^2 = K``. The authors' gradient clipping
    (``max_norm``) is left to ``optax.clip_by_global_norm``. Zero rows are left out
    (``w_k = 0``). Scale-covariant: ``w(a G) = a^(-1/2) w(G)``; reads ``gradient_scale=``.

    >>> w, _ = nash_mtl().weights(jnp.array([[1.0, 0.0], [0.0, 4.0]]), ())
    >>> [round(x, 3) for x in w.tolist()]
    [1.0, 0.5]
    """

    def fn(gramian):
        return _solvers.fair_allocation(gramian, alpha=1.0, iterations=iterations, correlation=True)

    return _covariant(fn, -0.5)


# ----------------------------------------------------------------------------- sequential


def _random_orders(key: jax.Array, k: int) -> jax.Array:
    """K independent random permutations of ``range(K)``, one per task, (K, K) int32."""
    keys = jax.random.split(key, k)
    return jax.vmap(lambda kk: jax.random.permutation(kk, k))(keys)


def pcgrad(*, seed: int = 0) -> Weighting:
    """PCGrad: project each gradient off the others it conflicts with, in random order; sum.

    Yu et al., "Gradient Surgery for Multi-Task Learning" (NeurIPS 2020), Alg. 1: for each
    task i, ``g_i^PC = g_i``; for ``j != i`` in a random order, if ``g_i^PC . g_j < 0`` then
    ``g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j``; ``d = sum_i g_i^PC``. Every ``g_i^PC`` is a
    combination ``c_i^T J`` of the rows and ``g_i^PC . g_j = (c_i^T G)_j``, so the method is
    exact as a weighting of the Gramian. A fresh order per task and step comes from the key
    in the state.

    >>> w, _ = pcgrad().weights(jnp.array([[1.0, -1.0], [-1.0, 2.0]]), pcgrad().init())
    >>> [round(x, 4) for x in w.tolist()]
    [2.0, 1.5]
    """

    def init():
        return KeyState(_new_key(seed))

    def weights(gramian, state, **extra_args):
        del extra_args
        gramian = _check_gramian(gramian)
        k = gramian.shape[0]
        dtype = gramian.dtype
        key, sub = _split(state.key)
        orders = _random_orders(sub, k)
        diag = jnp.diagonal(gramian)
        tiny = jnp.finfo(dtype).tiny

        def one_task(i, order):
            def step(t, coefs):
                j = order[t]
                inner = coefs @ gramian[:, j]
                conflict = (j != i) & (inner < 0.0) & (diag[j] > tiny)
                shift = jnp.where(conflict, inner / jnp.where(diag[j] > tiny, diag[j], 1.0), 0.0)
                return coefs.at[j].add(-shift)

            start = jnp.zeros((k,), dtype).at[i].set(1.0)
            return jax.lax.fori_loop(0, k, step, start)

        coefs = jax.vmap(one_task)(jnp.arange(k), orders)
        return jnp.sum(coefs, axis=0), KeyState(key)

    return Weighting(init, weights)


def gradvac(*, num_tasks: int, beta: float = 0.01, seed: int = 0) -> Weighting:
    """Gradient Vaccine: raise each pairwise cosine up to an EMA target, in random order; sum.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models" (ICLR 2021), Eqs. 2-4 (whole-model granularity): for each
    task i and ``j != i`` in random order, with ``phi = cos(g_i^GV, g_j)`` and target
    ``phi_hat_ij``: if ``phi < phi_hat``, ``g_i^GV += ||g_i^GV|| (phi_hat sqrt(1 - phi^2) -
    phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)) g_j``; then
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``. ``d = sum_i g_i^GV``. All of it is a
    weighting of the Gramian; the targets (K x K, zeros at first) and a key are the state.

    >>> wv = gradvac(num_tasks=2)
    >>> w, _ = wv.weights(jnp.array([[1.0, 0.0], [0.0, 1.0]]), wv.init())
    >>> [round(x, 4) for x in w.tolist()]
    [1.0, 1.0]
    """
    _check_positive_int("num_tasks", num_tasks)
    _check_range("beta", beta, 0.0, 1.0)

    def init():
        return GradVacState(jnp.zeros((num_tasks, num_tasks), jnp.float32), _new_key(seed))

    def weights(gramian, state, **extra_args):
        del extra_args
        gramian = _check_gramian(gramian)
        k = gramian.shape[0]
        if k != num_tasks:
            raise ValueError(f"gramian: expected ({num_tasks}, {num_tasks}), got {gramian.shape}")
        dtype = gramian.dtype
        g, _ = _solvers.normalized_gramian(gramian)
        b = jnp.asarray(beta, dtype)
        key, sub = _split(state.key)
        orders = _random_orders(sub, k)
        targets = state.targets.astype(dtype)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
        tiny = jnp.finfo(dtype).tiny
        bound = 1.0 - 1e-6

        def one_task(i, order, target_row):
            def step(t, carry):
                coefs, row = carry
                j = order[t]
                norm_i = jnp.sqrt(jnp.maximum(coefs @ g @ coefs, 0.0))
                denom = norm_i * norms[j]
                phi = jnp.where(
                    denom > tiny, (coefs @ g[:, j]) / jnp.where(denom > tiny, denom, 1.0), 0.0
                )
                phi = jnp.clip(phi, -bound, bound)
                phi_hat = jnp.clip(row[j], -bound, bound)
                active = (j != i) & (phi < phi_hat) & (denom > tiny)
                root_hat = jnp.sqrt(1.0 - phi_hat**2)
                shift = (
                    norm_i
                    * (phi_hat * jnp.sqrt(1.0 - phi**2) - phi * root_hat)
                    / (jnp.where(norms[j] > tiny, norms[j], 1.0) * root_hat)
                )
                coefs = coefs.at[j].add(jnp.where(active, shift, 0.0))
                new_target = jnp.where(j != i, (1.0 - b) * row[j] + b * phi, row[j])
                return coefs, row.at[j].set(new_target)

            start = jnp.zeros((k,), dtype).at[i].set(1.0)
            return jax.lax.fori_loop(0, k, step, (start, target_row))

        coefs, new_targets = jax.vmap(one_task)(jnp.arange(k), orders, targets)
        new_state = GradVacState(new_targets.astype(state.targets.dtype), key)
        return jnp.sum(coefs, axis=0), new_state

    return Weighting(init, weights)


# ----------------------------------------------------------------------------- loss-based


def uncertainty(
    *, num_tasks: int, optimizer: optax.GradientTransformation | None = None
) -> Weighting:
    """Homoscedastic uncertainty weighting with learned log-variances ``s_k``.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics" (CVPR 2018), Eq. 7 in the log-variance form used by LibMTL:
    ``L = sum_k exp(-s_k) L_k / 2 + s_k / 2``. The model's gradient weights are
    ``w_k = exp(-s_k) / 2``; ``s`` takes one ``optimizer`` step (default ``optax.adam(1e-3)``)
    on ``L`` per call, with ``dL/ds_k = (1 - exp(-s_k) L_k) / 2``. Needs ``task_losses=``.

    >>> u = uncertainty(num_tasks=2)
    >>> u.weights(None, u.init(), task_losses=jnp.array([1.0, 2.0]))[0].tolist()
    [0.5, 0.5]
    """
    _check_positive_int("num_tasks", num_tasks)
    opt = optimizer if optimizer is not None else optax.adam(1e-3)

    def init():
        s = jnp.zeros((num_tasks,), jnp.float32)
        return UncertaintyState(s, opt.init(s))

    def weights(gramian, state, *, dtype=None, **extra_args):
        del gramian
        losses = jax.lax.stop_gradient(_task_losses(extra_args, num_tasks, dtype))
        s = state.log_variances  # the optimizer steps in the state's dtype
        precision = jnp.exp(-s.astype(losses.dtype))
        grad_s = (0.5 * (1.0 - precision * losses)).astype(s.dtype)
        with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32
            updates, opt_state = opt.update(grad_s, state.opt_state, s)
        new_s = optax.apply_updates(s, updates)
        return 0.5 * precision, UncertaintyState(new_s, opt_state)

    return Weighting(init, weights, needs_gramian=False)


def dwa(*, num_tasks: int, temperature: float = 2.0) -> Weighting:
    """Dynamic weight average: weights from the rate at which each loss fell.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention" (CVPR 2019), Eq. 7:
    ``w_k(t) = K exp(r_k / T) / sum_i exp(r_i / T)``, ``r_k = L_k(t-1) / L_k(t-2)``, and
    ``w = 1`` for the first two steps. The paper uses epoch-averaged losses; here ``t``
    counts calls (pass averaged losses to reproduce the epoch form). Needs ``task_losses=``.

    >>> d = dwa(num_tasks=2)
    >>> d.weights(None, d.init(), task_losses=jnp.array([1.0, 2.0]))[0].tolist()
    [1.0, 1.0]
    """
    _check_positive_int("num_tasks", num_tasks)
    _check_range("temperature", temperature, 0.0, open_low=True)

    def init():
        zeros = jnp.zeros((num_tasks,), jnp.float32)
        return DWAState(zeros, zeros, jnp.zeros([], jnp.int32))

    def weights(gramian, state, *, dtype=None, **extra_args):
        del gramian
        losses = jax.lax.stop_gradient(_task_losses(extra_args, num_tasks, dtype))
        dtype = losses.dtype
        prev = state.previous.astype(dtype)
        before = state.before_previous.astype(dtype)
        tiny = jnp.finfo(dtype).tiny
        ratio = prev / jnp.where(before > tiny, before, 1.0)
        w = num_tasks * jax.nn.softmax(ratio / jnp.asarray(temperature, dtype))
        w = jnp.where(state.count >= 2, w, jnp.ones_like(w))
        new_state = DWAState(
            losses.astype(state.previous.dtype), state.previous, optax.safe_increment(state.count)
        )
        return w, new_state

    return Weighting(init, weights, needs_gramian=False)


def famo(
    *,
    num_tasks: int,
    learning_rate: float = 0.025,
    weight_decay: float = 1e-3,
    min_losses: Any = 0.0,
) -> Weighting:
    """FAMO: fast adaptive multitask optimisation, balancing the tasks' log-loss decrease.

    Liu et al., "FAMO: Fast Adaptive Multitask Optimization" (NeurIPS 2023), Eqs. 6-9 and
    Alg. 1: ``z = softmax(xi)``, ``D_k = L_k - L_k^*``; the update is
    ``sum_k c z_k / D_k grad L_k`` with ``c = (sum_i z_i / D_i)^(-1)``; after the step,
    ``xi`` descends ``J_softmax^T delta`` with ``delta_k = log D_k(t-1) - log D_k(t)``, by
    Adam (``learning_rate``) with L2 ``weight_decay``. The paper re-evaluates the losses on
    the same batch after the step; this transform uses the next call's losses instead (one
    forward per step). Needs ``task_losses=``.

    >>> f = famo(num_tasks=2)
    >>> w, _ = f.weights(None, f.init(), task_losses=jnp.array([1.0, 3.0]))
    >>> [round(x, 4) for x in w.tolist()]
    [0.75, 0.25]
    """
    _check_positive_int("num_tasks", num_tasks)
    _check_range("learning_rate", learning_rate, 0.0)
    _check_range("weight_decay", weight_decay, 0.0)
    opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

    def init():
        xi = jnp.zeros((num_tasks,), jnp.float32)
        return FAMOState(
            xi, opt.init(xi), jnp.ones((num_tasks,), jnp.float32), jnp.zeros([], jnp.int32)
        )

    def weights(gramian, state, *, dtype=None, **extra_args):
        del gramian
        losses = jax.lax.stop_gradient(_task_losses(extra_args, num_tasks, dtype))
        dtype = losses.dtype
        tiny = jnp.finfo(dtype).tiny
        gaps = jnp.maximum(losses - jnp.asarray(min_losses, dtype), 0.0) + 1e-8
        xi = state.logits
        # Logit update from the last step's loss change (skipped on the first call).
        delta = jnp.log(state.previous_losses.astype(dtype)) - jnp.log(gaps)
        _, softmax_vjp = jax.vjp(jax.nn.softmax, xi)
        (grad_xi,) = softmax_vjp(delta.astype(xi.dtype))
        with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32
            updates, opt_state = opt.update(grad_xi, state.opt_state, xi)
        first = state.count == 0
        xi = jnp.where(first, xi, optax.apply_updates(xi, updates))
        opt_state = jax.tree.map(
            lambda new, old: jnp.where(first, old, new), opt_state, state.opt_state
        )
        z = jax.nn.softmax(xi.astype(dtype))
        scaled = z / gaps
        w = scaled / jnp.maximum(jnp.sum(scaled), tiny)
        new_state = FAMOState(
            xi,
            opt_state,
            gaps.astype(state.previous_losses.dtype),
            optax.safe_increment(state.count),
        )
        return w, new_state

    return Weighting(init, weights, needs_gramian=False)


def gls() -> Weighting:
    """Geometric loss strategy: the gradient of ``(prod_k L_k)^(1/K)``.

    Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning" (CVPR Workshops 2019), Eq. 2:
    ``w_k = (prod_i L_i)^(1/K) / (K L_k)`` (computed in log space). Needs ``task_losses=``.

    >>> w, _ = gls().weights(None, (), task_losses=jnp.array([1.0, 4.0]))
    >>> [round(x, 4) for x in w.tolist()]
    [1.0, 0.25]
    """

    def weights(gramian, state, *, num_tasks=None, dtype=None, **extra_args):
        del gramian
        losses = jax.lax.stop_gradient(_task_losses(extra_args, num_tasks, dtype))
        k = losses.shape[0]
        tiny = jnp.finfo(losses.dtype).tiny
        logs = jnp.log(jnp.maximum(losses, tiny))
        geometric = jnp.exp(jnp.mean(logs))
        return geometric / (k * jnp.maximum(losses, tiny)), state

    return Weighting(optax.EmptyState, weights, needs_gramian=False)


def stch(*, mu: float = 1.0, pref_vector: Any = None, ideal: Any = 0.0) -> Weighting:
    """Smooth Tchebycheff scalarisation: the gradient of ``mu log sum_k exp(p_k (L_k - z_k) / mu)``.

    Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization" (ICML
    2024), Eq. 10: ``w_k = p_k softmax(p (L - z) / mu)_k`` with preference ``p`` (default
    ``1/K``) and ideal point ``z`` (default 0). Needs ``task_losses=``.

    >>> w, _ = stch(mu=1.0).weights(None, (), task_losses=jnp.array([0.0, 0.0]))
    >>> [round(x, 4) for x in w.tolist()]
    [0.25, 0.25]
    """
    _check_range("mu", mu, 0.0, open_low=True)

    def weights(gramian, state, *, num_tasks=None, dtype=None, **extra_args):
        del gramian
        losses = jax.lax.stop_gradient(_task_losses(extra_args, num_tasks, dtype))
        k = losses.shape[0]
        dtype = losses.dtype
        pref = _preference(pref_vector, k, dtype, "pref_vector")
        z = jnp.asarray(ideal, dtype)
        scores = pref * (losses - z) / jnp.asarray(mu, dtype)
        return pref * jax.nn.softmax(scores), state

    return Weighting(optax.EmptyState, weights, needs_gramian=False)
