"""F-MTL: per-task sharpness-aware minimization around any multi-task aggregator.

Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions" (arXiv
2211.13723, 2022; ICCV 2025 as "Beyond Losses Reweighting: Empowering Multi-Task Learning via
the Generalization Perspective"). Every task ``i`` takes its own SAM step around the shared
parameters and its own head,

    eps_sh^i = rho_sh * T^2 g_sh^i / ||T g_sh^i||,    eps_ns^i = rho_ns * T^2 g_ns^i / ||T g_ns^i||

(``T = |w|`` elementwise for adaptive SAM, ``T = 1`` otherwise), the gradient of task ``i``
alone is re-evaluated at its perturbed point, ``g^{i,SAM}``, and the shared update is

    AGG(g_sh^{1..K,loss}) + AGG(g_sh^{1..K,SAM} - g_sh^{1..K,loss})          (Algorithm 1)

while each head takes its own SAM gradient ``g_ns^{i,SAM}``.

The transform threads a gradient function through ``update`` as an extra argument, the way
``optax.contrib.sam`` threads ``grad_fn`` in its opaque mode. Unlike SAM it needs no
synchronization period: the K perturbed evaluations happen inside one ``update`` call, batched
with ``jax.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmtl.mtl import shared_mask

PyTree = Any

__all__ = ["FlatMTLState", "flat_mtl", "sam_perturbation"]

_VARIANTS = ("paper", "direct")


class FlatMTLState(NamedTuple):
    """State of :func:`flat_mtl`: the aggregator's state for each of its two calls.

    Attributes:
      loss_state: aggregator state used on the loss gradients ``g^{i,loss}`` (``"paper"``)
        or on the SAM gradients (``"direct"``).
      flat_state: aggregator state used on the flat gradients ``g^{i,SAM} - g^{i,loss}``
        (unused and unchanged by ``"direct"``).
    """

    loss_state: optax.OptState
    flat_state: optax.OptState


def _accumulation_dtype(leaves: list[jax.Array]) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if any(x.dtype == jnp.float64 for x in leaves) else jnp.float32


def _scaled(grad: jax.Array, param: jax.Array, adaptive: bool) -> jax.Array:
    return grad * jnp.abs(param).astype(grad.dtype) if adaptive else grad


def sam_perturbation(
    grads: PyTree,
    params: PyTree,
    *,
    rho: float,
    adaptive: bool = False,
    eps: float = 1e-12,
) -> PyTree:
    """The first-order SAM / ASAM ascent step ``eps = rho * T^2 g / ||T g||_2``.

    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization"
    (ICLR 2021), Eq. 2 (``T = 1``); Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization"
    (ICML 2021), Eq. 9 with ``T = |w|`` elementwise (``adaptive=True``), as used per task by
    F-MTL (Phan et al., 2022, Sec. 4). The norm is taken over the whole pytree, so
    ``||eps|| = rho`` (``||eps / |w| || = rho`` when adaptive). A zero gradient gives a zero
    perturbation (``eps`` guards the division).

    Args:
      grads: gradient pytree, leaves of any shape (``None`` leaves are skipped).
      params: parameters with the structure and shapes of ``grads`` (read only when adaptive).
      rho: radius, ``>= 0``.
      adaptive: ASAM's parameter-scaled neighbourhood.
      eps: added to the norm before dividing, ``> 0``.

    Returns:
      The perturbation, shaped like ``grads``.

    >>> e = sam_perturbation({"w": jnp.array([3.0, 4.0])}, {"w": jnp.zeros(2)}, rho=0.5)
    >>> [round(v, 3) for v in e["w"].tolist()]
    [0.3, 0.4]
    """
    _check_nonnegative("rho", rho)
    _check_positive("eps", eps)
    leaves = jax.tree.leaves(grads)
    if not leaves:
        return grads
    acc = _accumulation_dtype(leaves)
    scaled = jax.tree.map(lambda g, w: _scaled(g, w, adaptive), grads, params)
    sq_norm = sum(jnp.sum(jnp.square(s.astype(acc))) for s in jax.tree.leaves(scaled))
    scale = rho / (jnp.sqrt(sq_norm) + eps)

    def step(g, w):
        direction = _scaled(_scaled(g, w, adaptive), w, adaptive)
        return direction * scale.astype(g.dtype)

    return jax.tree.map(step, grads, params)


def _check_nonnegative(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: expected a Python number >= 0, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a Python number > 0, got {value!r}")


def _select(mask: PyTree, tree: PyTree, keep: bool) -> PyTree:
    """``tree`` with the leaves whose mask differs from ``keep`` replaced by ``None``."""
    return jax.tree.map(lambda m, x: x if m == keep else None, mask, tree)


def _join(mask: PyTree, shared: PyTree, specific: PyTree) -> PyTree:
    return jax.tree.map(
        lambda m, a, b: a if m else b, mask, shared, specific, is_leaf=lambda x: x is None
    )


def _num_tasks(updates: PyTree, params: PyTree) -> int:
    """Checks that every leaf of ``updates`` is ``(K, *param.shape)`` and returns K."""
    u_def, p_def = jax.tree.structure(updates), jax.tree.structure(params)
    if u_def != p_def:
        raise ValueError(f"updates: expected the pytree structure of params {p_def}, got {u_def}")
    k = None
    with_paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, u), p in zip(with_paths, jax.tree.leaves(params), strict=True):
        name = jax.tree_util.keystr(path)
        if u.ndim != p.ndim + 1 or u.shape[1:] != p.shape or (k is not None and u.shape[0] != k):
            raise ValueError(
                f"updates: expected per-task gradients with a leading task axis on EVERY leaf "
                f"(jaxmtl.mtl.task_gradients with shared=None), shape (K, *{p.shape}) at "
                f"{name}, got {u.shape}"
            )
        k = u.shape[0]
    if k is None:
        raise ValueError("updates: expected at least one leaf, got an empty pytree")
    return k


def _check_leaf_shapes(tree: PyTree, params: PyTree, what: str) -> None:
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
        if got.shape != want.shape:
            raise ValueError(f"{what}: expected a leaf of shape {want.shape}, got {got.shape}")


def flat_mtl(
    aggregator: optax.GradientTransformation,
    *,
    rho: float = 0.05,
    rho_head: float | None = None,
    adaptive: bool = False,
    variant: str = "paper",
    shared: Any = None,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """F-MTL: per-task SAM perturbations, then ``AGG(g^loss) + AGG(g^SAM - g^loss)``.

    Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions" (arXiv
    2211.13723, 2022), Algorithm 1 / Eqs. 8-10. With ``variant="direct"`` the shared update is
    ``AGG(g^{1..K,SAM})`` (the paper's ablation, Table 6: much worse on Cityscapes).

    ``update(updates, state, params, *, task_grad_fn=None, task_loss_fn=None, **extra)``:

    * ``updates``: the per-task gradients at ``params``, a pytree shaped like ``params`` with
      a leading task axis K on EVERY leaf, row ``i`` = ``dL_i/dparams`` (what
      ``jaxmtl.mtl.task_gradients(task_losses, params, batch)`` returns with ``shared=None``).
      Rows of a task-specific leaf are zero outside its own task, which is how a head is
      matched to its task without naming it.
    * ``params``: the current parameters (required: they are perturbed).
    * ``task_grad_fn(params) -> grads``: the same per-task gradients evaluated at any
      ``params`` (same format as ``updates``). It is called once under ``jax.vmap`` over a
      stack of K perturbed copies of ``params``; only row ``i`` of the result at copy ``i``
      is kept. This costs K forward and K*K backward cotangents.
    * ``task_loss_fn(params) -> (K,)``: the alternative to ``task_grad_fn``; then
      ``grad(L_i)`` is taken at copy ``i`` only (K forward, K backward). Give exactly one.
    * other extra arguments (e.g. task losses) are passed on to ``aggregator``.

    Output: parameter-shaped updates: shared leaves ``AGG(g^loss) + AGG(g^flat)``,
    task-specific leaves the sum of the K rows of the SAM gradients, i.e. each head's own
    task's SAM gradient.

    The aggregator sees the shared leaves only (task-specific leaves replaced by ``None``,
    in both ``updates`` and ``params`` and at ``init``) with a leading task axis on each, so
    it needs no ``shared=`` of its own. It is called twice per step (``"paper"``) with two
    separate states; extra arguments other than the gradient functions are passed to it.

    Notes: with ``rho = rho_head = 0`` nothing is re-evaluated and the result is exactly the
    plain aggregator's. For a linear aggregator (EW) both variants equal the aggregated SAM
    gradients. An aggregator of degree 0 in its input (Nash-MTL: ``AGG(c g) = AGG(g)``) gives
    the flat part a norm independent of ``rho``. The paper's NYUv2 code also rescales each
    ``g^loss`` and ``g^flat`` to unit norm before MGDA; that is an aggregator choice, not
    done here.

    Args:
      aggregator: an Optax transform mapping per-task gradients (leading axis K) to one
        update (e.g. ``jaxmtl.transforms.upgrad()``).
      rho: SAM radius of the shared-parameter perturbation, ``>= 0``.
      rho_head: radius of each head's perturbation (default: ``rho``).
      adaptive: ASAM perturbation ``rho * w^2 g / || |w| g ||`` (the paper's code default,
        with ``rho=2``).
      variant: ``"paper"`` or ``"direct"``.
      shared: which leaves are shared (see ``jaxmtl.mtl.shared_mask``); ``None``: all.
      eps: added to every perturbation norm (no NaN for a zero gradient).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`FlatMTLState`.

    >>> import optax
    >>> from jaxmtl.mtl import task_gradients
    >>> def task_losses(p):  # two quadratic tasks on one shared vector
    ...     return jnp.stack([jnp.sum((p["w"] - 1.0) ** 2), jnp.sum((p["w"] + 1.0) ** 2)])
    >>> mean = optax.GradientTransformation(
    ...     lambda p: optax.EmptyState(), lambda g, s, p=None: (jax.tree.map(
    ...         lambda x: x.mean(0), g), s))
    >>> tx = flat_mtl(mean, rho=0.1)
    >>> params = {"w": jnp.array([0.5, 0.0])}
    >>> _, g = task_gradients(task_losses, params)
    >>> fn = lambda p: task_gradients(task_losses, p)[1]
    >>> u, _ = tx.update(g, tx.init(params), params, task_grad_fn=fn)
    >>> [round(v, 3) for v in u["w"].tolist()]
    [1.038, -0.034]
    """
    _check_nonnegative("rho", rho)
    rho_head = rho if rho_head is None else rho_head
    _check_nonnegative("rho_head", rho_head)
    _check_positive("eps", eps)
    if variant not in _VARIANTS:
        raise ValueError(f"variant: expected one of {_VARIANTS}, got {variant!r}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive: expected a bool, got {type(adaptive).__name__}")
    if not (hasattr(aggregator, "init") and hasattr(aggregator, "update")):
        raise TypeError(
            f"aggregator: expected an optax.GradientTransformation, got {type(aggregator).__name__}"
        )
    agg = optax.with_extra_args_support(aggregator)

    def init_fn(params: PyTree) -> FlatMTLState:
        mask = shared_mask(params, shared)
        shared_params = _select(mask, params, True)
        return FlatMTLState(agg.init(shared_params), agg.init(shared_params))

    def update_fn(
        updates: PyTree,
        state: FlatMTLState,
        params: PyTree | None = None,
        *,
        task_grad_fn: Callable[[PyTree], PyTree] | None = None,
        task_loss_fn: Callable[[PyTree], jax.Array] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, FlatMTLState]:
        if params is None:
            raise ValueError("params: flat_mtl perturbs the parameters; pass params to update")
        if (task_grad_fn is None) == (task_loss_fn is None):
            raise ValueError(
                "task_grad_fn, task_loss_fn: expected exactly one of them as an extra "
                f"argument to update, got task_grad_fn={task_grad_fn!r}, "
                f"task_loss_fn={task_loss_fn!r}"
            )
        k = _num_tasks(updates, params)
        mask = shared_mask(params, shared)
        if not any(jax.tree.leaves(mask)):
            raise ValueError("shared: expected at least one shared leaf, got none")
        shared_params = _select(mask, params, True)
        head_params = _select(mask, params, False)

        def perturbation(row):
            e_shared = sam_perturbation(
                _select(mask, row, True), shared_params, rho=rho, adaptive=adaptive, eps=eps
            )
            e_head = sam_perturbation(
                _select(mask, row, False), head_params, rho=rho_head, adaptive=adaptive, eps=eps
            )
            return _join(mask, e_shared, e_head)

        if rho == 0 and rho_head == 0:
            # No perturbation: the flat part is exactly zero. Not aggregating rounding noise
            # matters for aggregators of degree 0 (Nash-MTL returns an O(1) update from any
            # nonzero input, however small).
            sam_grads = updates
        else:
            perturbations = jax.vmap(perturbation)(updates)
            perturbed = jax.tree.map(lambda p, e: p[None] + e, params, perturbations)
            sam_grads = _sam_gradients(perturbed, k, params, task_grad_fn, task_loss_fn)

        def to_shared(grads):
            return _select(mask, grads, True)

        if variant == "paper" and sam_grads is updates:
            shared_update, loss_state = agg.update(
                to_shared(updates), state.loss_state, shared_params, **extra_args
            )
            _check_leaf_shapes(shared_update, shared_params, "aggregator output")
            flat_state = state.flat_state
        elif variant == "paper":
            loss_part, loss_state = agg.update(
                to_shared(updates), state.loss_state, shared_params, **extra_args
            )
            flat = jax.tree.map(jnp.subtract, sam_grads, updates)
            flat_part, flat_state = agg.update(
                to_shared(flat), state.flat_state, shared_params, **extra_args
            )
            _check_leaf_shapes(loss_part, shared_params, "aggregator output")
            _check_leaf_shapes(flat_part, shared_params, "aggregator output")
            shared_update = jax.tree.map(jnp.add, loss_part, flat_part)
        else:
            shared_update, loss_state = agg.update(
                to_shared(sam_grads), state.loss_state, shared_params, **extra_args
            )
            _check_leaf_shapes(shared_update, shared_params, "aggregator output")
            flat_state = state.flat_state
        head_update = jax.tree.map(lambda g: g.sum(0), _select(mask, sam_grads, False))
        new_updates = _join(mask, shared_update, head_update)
        return new_updates, FlatMTLState(loss_state, flat_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _sam_gradients(
    perturbed: PyTree,
    k: int,
    params: PyTree,
    task_grad_fn: Callable[[PyTree], PyTree] | None,
    task_loss_fn: Callable[[PyTree], jax.Array] | None,
) -> PyTree:
    """Row i = grad of L_i at perturbed copy i, a pytree with a leading K on every leaf."""
    tasks = jnp.arange(k)
    if task_loss_fn is not None:

        def own_loss(p, i):
            losses = task_loss_fn(p)
            if losses.shape != (k,):
                raise ValueError(
                    f"task_loss_fn: expected task losses of shape ({k},), got {losses.shape}"
                )
            return losses[i]

        return jax.vmap(jax.grad(own_loss))(perturbed, tasks)
    grids = jax.vmap(task_grad_fn)(perturbed)
    if jax.tree.structure(grids) != jax.tree.structure(params):
        raise ValueError(
            "task_grad_fn: expected per-task gradients with the structure of params "
            f"{jax.tree.structure(params)}, got {jax.tree.structure(grids)}"
        )
    for g, p in zip(jax.tree.leaves(grids), jax.tree.leaves(params), strict=True):
        if g.shape != (k, k, *p.shape):
            raise ValueError(
                f"task_grad_fn: expected a leading task axis {k} on every leaf, shape "
                f"({k}, *{p.shape}), got {g.shape[1:]}"
            )
    return jax.tree.map(lambda g: g[tasks, tasks], grids)
