"""Per-task gradients (the Jacobian of a multi-task objective) from one forward pass.

A multi-task objective is ``task_losses(params, *args) -> (K,)``. Its Jacobian ``J`` has one
row per task; jaxmtl keeps it as a pytree shaped like ``params`` with a leading axis ``K`` on
every *shared* leaf. Aggregators mostly need only the Gramian ``J J^T`` (K x K) and a
weighted sum ``w @ J``, both computed here leaf by leaf, never flattening the model.

Two forms:

* parameter form, :func:`task_gradients`: one forward pass, then the VJP applied to the K
  one-hot cotangents under ``vmap`` (one batched backward pass);
* representation form, :func:`representation_gradients`: gradients of each task loss with
  respect to the shared features ``z`` (K backward passes through the heads only), then one
  batched VJP through the shared trunk. This is also what MGDA-UB (Sener & Koltun, "Multi-Task
  Learning as Multi-Objective Optimization", NeurIPS 2018, Sec. 3.3) aggregates.

Which parameters are shared is said with ``shared``: ``None`` (all), a pytree of booleans
shaped like ``params``, or a predicate ``shared(path) -> bool`` on key paths. Task-specific
parameters (heads) receive the gradient of the *summed* loss, which equals their own task's
gradient because no other task depends on them, without a K-fold copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
SharedSpec = None | PyTree | Callable[[tuple], bool]

__all__ = [
    "combine",
    "gramian",
    "representation_gradients",
    "shared_mask",
    "task_gradients",
]


def shared_mask(params: PyTree, shared: SharedSpec = None) -> PyTree:
    """A pytree of Python booleans shaped like ``params``: True where a leaf is shared.

    Args:
      params: the parameter pytree.
      shared: ``None`` (every leaf shared), a pytree of booleans with the structure of
        ``params`` (a mask; also when the pytree is callable, as an equinox module is), or a
        predicate called with each leaf's key path (a tuple of ``jax.tree_util`` keys:
        ``DictKey`` has ``.key``, ``GetAttrKey`` (modules, dataclasses) ``.name``,
        ``SequenceKey`` ``.idx``) returning whether it is shared.

    Raises:
      ValueError: naming ``shared``, when a mask has another structure or non-boolean
        values, or a predicate raises or returns a non-boolean (with the leaf's path).

    >>> params = {"trunk": {"w": 1.0}, "heads": {"a": 2.0}}
    >>> shared_mask(params, lambda path: path[0].key == "trunk")
    {'heads': {'a': False}, 'trunk': {'w': True}}
    """
    if shared is None:
        return jax.tree.map(lambda _: True, params)
    params_def = jax.tree.structure(params)
    mask_def = jax.tree.structure(shared)
    if mask_def == params_def and not any(callable(m) for m in jax.tree.leaves(shared)):
        return jax.tree_util.tree_map_with_path(_mask_value, shared)
    if callable(shared):
        return jax.tree_util.tree_map_with_path(lambda path, _: _predicate(shared, path), params)
    hint = ""
    if mask_def.num_leaves == 1 and params_def.num_leaves != 1:
        hint = (
            "; a single value where a predicate was meant happens under "
            "optax.inject_hyperparams, which calls callables as schedules: pass "
            "static_args=('shared',)"
        )
    raise ValueError(
        f"shared: expected a boolean pytree with the structure of params {params_def} (or "
        f"None, or a predicate on key paths), got {mask_def} ({_short_repr(shared)}){hint}"
    )


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mask_value(path: tuple, value: Any) -> bool:
    try:
        return bool(value)
    except Exception as error:  # an array of several values, a tracer
        raise ValueError(
            f"shared{jax.tree_util.keystr(path)}: expected a Python bool, got {_short_repr(value)}"
        ) from error


def _predicate(shared: Callable[[tuple], Any], path: tuple) -> bool:
    """``bool(shared(path))``, or a ValueError naming the leaf and what paths are made of."""
    leaf = jax.tree_util.keystr(path) or "<root>"
    try:
        result = shared(path)
    except Exception as error:
        raise ValueError(
            f"shared: the predicate raised {type(error).__name__}: {error} on leaf {leaf}; "
            f"it is called with the key path {path!r}, a tuple of jax.tree_util keys "
            "(DictKey has .key, GetAttrKey (modules, dataclasses) .name, SequenceKey .idx; "
            "jax.tree_util.keystr(path) gives a string)"
        ) from error
    try:
        return bool(result)
    except Exception as error:
        raise ValueError(
            f"shared: expected the predicate to return a bool on leaf {leaf}, "
            f"got {_short_repr(result)}"
        ) from error


def _partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    shared = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    specific = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return shared, specific


def _merge(shared: PyTree, specific: PyTree, mask: PyTree) -> PyTree:
    return jax.tree.map(
        lambda m, a, b: a if m else b, mask, shared, specific, is_leaf=lambda x: x is None
    )


def _num_tasks(losses: jax.Array, name: str) -> int:
    if losses.ndim != 1:
        raise ValueError(f"{name}: expected task losses of shape (K,), got shape {losses.shape}")
    return losses.shape[0]


def _task_cotangents(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    k = losses.shape[0]
    return jnp.eye(k, dtype=losses.dtype), jnp.ones_like(losses)


def task_gradients(
    task_losses: Callable[..., Any],
    params: PyTree,
    *args: Any,
    shared: SharedSpec = None,
    has_aux: bool = False,
) -> tuple[jax.Array, PyTree] | tuple[tuple[jax.Array, Any], PyTree]:
    """Per-task gradients of ``task_losses(params, *args) -> (K,)`` from one forward pass.

    The Jacobian rows ``J_k = d L_k / d params`` are the VJP of the K one-hot cotangents,
    evaluated as one batched backward pass (``vmap`` over the VJP). This equals K separate
    ``jax.grad`` calls at the cost of one forward and one K-wide backward.

    Args:
      task_losses: ``(params, *args) -> losses (K,)`` or ``(losses, aux)`` with ``has_aux``.
      params: parameter pytree.
      *args: passed to ``task_losses`` (a batch, keys, ...).
      shared: which leaves are shared, see :func:`shared_mask`. Non-shared leaves get the
        gradient of ``sum(losses)``, with no leading task axis.
      has_aux: whether ``task_losses`` returns ``(losses, aux)``.

    Returns:
      ``(losses, grads)`` (or ``((losses, aux), grads)``): ``grads`` is shaped like ``params``
      with a leading axis K on every shared leaf.

    >>> f = lambda p, x: jnp.stack([p["w"] @ x, (p["w"] ** 2).sum()])
    >>> losses, g = task_gradients(f, {"w": jnp.array([1.0, 2.0])}, jnp.array([3.0, 4.0]))
    >>> g["w"].tolist()
    [[3.0, 4.0], [2.0, 4.0]]
    """
    mask = shared_mask(params, shared)
    shared_p, specific_p = _partition(params, mask)

    def losses_of(shared_part, specific_part):
        return task_losses(_merge(shared_part, specific_part, mask), *args)

    if has_aux:
        losses, vjp_fn, aux = jax.vjp(losses_of, shared_p, specific_p, has_aux=True)
    else:
        losses, vjp_fn = jax.vjp(losses_of, shared_p, specific_p)
    _num_tasks(losses, "task_losses")
    one_hots, ones = _task_cotangents(losses)
    # Under jit, XLA prunes the unused halves: the vmapped VJP keeps only the shared
    # leaves, the summed VJP only the task-specific ones (a backward through the heads).
    shared_grads = jax.vmap(lambda c: vjp_fn(c)[0])(one_hots)
    specific_grads = vjp_fn(ones)[1]
    grads = _merge(shared_grads, specific_grads, mask)
    return ((losses, aux), grads) if has_aux else (losses, grads)


def representation_gradients(
    encode: Callable[[PyTree, Any], PyTree],
    task_losses_from_features: Callable[[PyTree, PyTree, Any], jax.Array],
    shared_params: PyTree,
    head_params: PyTree,
    inputs: Any,
    targets: Any,
) -> tuple[jax.Array, PyTree, PyTree, PyTree]:
    """Per-task gradients through the shared representation ``z = encode(shared_params, inputs)``.

    The feature gradients ``dL_k/dz`` come from K backward passes through the heads only
    (batched), then the shared parameters' per-task gradients from ONE batched VJP of the
    trunk applied to them. Heads get the gradient of the summed loss (their own task's).

    Args:
      encode: ``(shared_params, inputs) -> z`` (an array or pytree of arrays).
      task_losses_from_features: ``(head_params, z, targets) -> losses (K,)``.
      shared_params, head_params: the two halves of the model's parameters.
      inputs, targets: anything the two functions take (arrays, dicts, tuples).

    Returns:
      ``(losses (K,), shared_grads, head_grads, feature_grads)``: ``shared_grads`` shaped like
      ``shared_params`` with a leading K axis, ``head_grads`` shaped like ``head_params``,
      ``feature_grads`` shaped like ``z`` with a leading K axis.

    >>> encode = lambda w, x: w * x
    >>> heads = lambda h, z, y: jnp.stack([h[0] * z.sum(), h[1] * (z ** 2).sum()])
    >>> out = representation_gradients(encode, heads, jnp.array(2.0), jnp.array([1.0, 1.0]),
    ...                                jnp.array([1.0, 3.0]), None)
    >>> out[1].tolist()
    [4.0, 40.0]
    """
    z, trunk_vjp = jax.vjp(lambda p: encode(p, inputs), shared_params)
    losses, head_vjp = jax.vjp(
        lambda h, feats: task_losses_from_features(h, feats, targets), head_params, z
    )
    _num_tasks(losses, "task_losses_from_features")
    one_hots, ones = _task_cotangents(losses)
    feature_grads = jax.vmap(lambda c: head_vjp(c)[1])(one_hots)
    head_grads = head_vjp(ones)[0]
    (shared_grads,) = jax.vmap(trunk_vjp)(feature_grads)
    return losses, shared_grads, head_grads, feature_grads


def _shared_leaves(grads: PyTree, shared: SharedSpec) -> list[tuple[tuple, jax.Array]]:
    """``(key path, leaf)`` of every shared leaf."""
    mask = jax.tree.leaves(shared_mask(grads, shared))
    pairs = jax.tree_util.tree_flatten_with_path(grads)[0]
    return [pair for m, pair in zip(mask, pairs, strict=True) if m]


def _task_axis(grads: PyTree, shared: SharedSpec = None, name: str = "grads") -> int:
    """K, the leading axis every shared leaf of ``grads`` must have; a ValueError naming the
    first leaf that lacks it (``name`` + its key path), the expected and the received shape."""
    leaves = _shared_leaves(grads, shared)
    if not leaves:
        raise ValueError(f"{name}: expected at least one shared leaf with a leading task axis")
    first_path, first = leaves[0]
    if jnp.ndim(first) == 0:
        raise ValueError(
            f"{name}{jax.tree_util.keystr(first_path)}: expected a leading task axis K on a "
            "shared leaf, got a scalar; if it is task-specific, say so with shared= (the "
            "same shared= as for jaxmtl.mtl.task_gradients)"
        )
    k = jnp.shape(first)[0]
    for path, leaf in leaves:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != k:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)}: expected a leading task axis {k} (that "
                f"of {name}{jax.tree_util.keystr(first_path)}) on every shared leaf, got shape "
                f"{jnp.shape(leaf)}; pass the same shared= to jaxmtl.mtl.task_gradients and "
                "to the transform"
            )
    return k


def _accumulation_dtype(leaves: list[jax.Array]) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if any(x.dtype == jnp.float64 for x in leaves) else jnp.float32


def gramian(grads: PyTree, shared: SharedSpec = None) -> jax.Array:
    """The Gramian ``J J^T`` (K x K) of per-task gradients, accumulated leaf by leaf.

    Accumulates in float32 (float64 for float64 leaves), so bfloat16 gradients give an f32
    Gramian. Only shared leaves (with their leading task axis) contribute.

    >>> gramian({"a": jnp.array([[1.0, 0.0], [1.0, 1.0]]), "b": jnp.array([[2.0], [0.0]])}).tolist()
    [[5.0, 1.0], [1.0, 2.0]]
    """
    k = _task_axis(grads, shared)
    leaves = [leaf for _, leaf in _shared_leaves(grads, shared)]
    dtype = _accumulation_dtype(leaves)
    total = jnp.zeros((k, k), dtype)
    for leaf in leaves:
        rows = leaf.reshape(k, -1)
        total = total + jnp.matmul(rows, rows.T, preferred_element_type=dtype)
    return total


def combine(weights: jax.Array, grads: PyTree, shared: SharedSpec = None) -> PyTree:
    """``weights @ J`` leaf by leaf: a parameter-shaped update from per-task gradients.

    Shared leaves (leading task axis K) are contracted with ``weights (K,)``; non-shared leaves
    pass through unchanged. The result has each leaf's own dtype.

    >>> combine(jnp.array([0.5, 2.0]), {"w": jnp.array([[2.0, 4.0], [1.0, 0.0]])})["w"].tolist()
    [3.0, 2.0]
    """
    weights = jnp.asarray(weights)
    if weights.ndim != 1:
        raise ValueError(f"weights: expected shape (K,), got {weights.shape}")
    mask = shared_mask(grads, shared)

    def contract(path, is_shared, leaf):
        if not is_shared:
            return leaf
        if leaf.ndim == 0 or leaf.shape[0] != weights.shape[0]:
            raise ValueError(
                f"grads{jax.tree_util.keystr(path)}: expected a leading task axis "
                f"{weights.shape[0]} (len(weights)) on a shared leaf, got shape {leaf.shape}; "
                "pass the same shared= as to jaxmtl.mtl.task_gradients"
            )
        return jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1)

    return jax.tree_util.tree_map_with_path(contract, mask, grads)
