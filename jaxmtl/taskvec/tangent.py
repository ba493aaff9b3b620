"""Tangent-space (linearized) models and the cached evaluation of many task-vector edits.

"Task Arithmetic in the Tangent Space: Improved Editing of Pre-Trained Models"
(Ortiz-Jimenez, Favero & Frossard, NeurIPS 2023, Eq. 4): the first-order Taylor expansion
of a network around its pre-trained weights,

    f_lin(x; theta) = f(x; theta_0) + J(x; theta_0) (theta - theta_0),

is computed with one Jacobian-vector product (``jax.jvp``) and trained like any model.

Because ``f_lin`` is exactly linear in ``theta``, an edit ``theta_0 + sum_i c_i tau_i``
evaluated on a fixed batch is ``f_0 + sum_i c_i (J tau_i)``: :func:`tangent_outputs` computes
``f_0`` and the ``n`` products ``J tau_i`` once (one ``jax.linearize``, one batched JVP per
vector) and :func:`combine_outputs` evaluates any number of coefficient settings as linear
combinations. :func:`coefficient_sweep` packages both, with the non-linear model as the
alternative that costs one forward pass per setting.

Counted cost, for a dense network (one forward pass = 1 unit of matmul FLOPs):
* ``apply_lin`` evaluation: primal (1) + tangent (about 2: ``dh W`` and ``h dW`` per layer;
  the first layer has ``dh = 0``) = about 3 forward passes.
* a training step through ``apply_lin`` (``jax.grad``): JAX transposes the tangent map, which
  is the VJP at ``theta_0`` (about 2 more; no backward pass through the primal, which does not
  depend on ``theta``) = about 5 units against 3 for an ordinary step, i.e. about 1.6x FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxmtl.taskvec.vector import (
    _check_same_shapes,
    _check_same_structure,
    apply,
    as_stacked,
    combine_leaf,
)

PyTree = Any
ApplyFn = Callable[..., Any]

__all__ = [
    "coefficient_sweep",
    "combine_outputs",
    "linearize",
    "linearize_batch",
    "tangent_outputs",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_UNROLL_MAX = 16  # combine_outputs: elementwise below this many vectors, tensordot above
MODES = ("nonlinear", "linear")


def check_mode(mode: str) -> str:
    """Validates a ``mode`` argument: ``"nonlinear"`` or ``"linear"``."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def _check_apply_fn(apply_fn: Any) -> None:
    if not callable(apply_fn):
        raise TypeError(
            f"apply_fn: expected a callable apply_fn(params, *inputs), got {apply_fn!r}"
        )


def linearize(apply_fn: ApplyFn, params0: PyTree) -> ApplyFn:
    """The linearized model ``apply_lin(params, *inputs)`` around ``params0``.

    Ortiz-Jimenez et al., NeurIPS 2023, Eq. 4: ``f(params0, x) + J(params0, x)
    (params - params0)``, evaluated as ``jax.jvp`` of ``apply_fn`` at ``params0`` along
    ``params - params0`` (primal + tangent). It is differentiable in ``params`` (``jax.grad``
    transposes the JVP), so linearized fine-tuning is ordinary training of ``params``; it
    equals ``apply_fn(params0, ...)`` exactly at ``params0`` and is exact for models linear in
    their parameters. ``params0`` may be a tracer: call ``linearize`` inside a jitted function
    that receives ``params0`` as an argument to avoid baking it in as a constant.

    Args:
      apply_fn: pure ``apply_fn(params, *inputs) -> outputs`` (an array or pytree of arrays).
      params0: the expansion point ``theta_0``.

    Returns:
      ``apply_lin(params, *inputs)`` with the signature and outputs of ``apply_fn``.

    >>> f = lambda p, x: jnp.sin(p["w"] * x)
    >>> f_lin = linearize(f, {"w": jnp.array(0.0)})
    >>> f_lin({"w": jnp.array(0.5)}, jnp.array(2.0)).item()  # sin(0) + cos(0) * 0.5 * 2
    1.0
    """
    _check_apply_fn(apply_fn)

    def apply_lin(params: PyTree, *inputs: Any) -> Any:
        _check_same_structure("params", params, "params0", params0)
        _check_same_shapes("params", params, "params0", params0)
        delta = optax.tree.sub(params, params0)
        out, tangent = jax.jvp(lambda p: apply_fn(p, *inputs), (params0,), (delta,))
        return jax.tree.map(jnp.add, out, tangent)

    return apply_lin


def linearize_batch(apply_fn: ApplyFn, params0: PyTree, *inputs: Any) -> tuple[Any, ApplyFn]:
    """``(f_0, jvp)`` for one batch: ``f(params0, inputs)`` and ``delta -> J(params0) delta``.

    A wrapper of ``jax.linearize`` (Ortiz-Jimenez et al., NeurIPS 2023, Eq. 4) for evaluating
    the linearized model of one batch at many parameter values: the primal pass runs once and
    each ``jvp(delta)`` costs only the tangent pass, so ``f_0 + jvp(theta - params0)`` is
    ``f_lin`` at ``theta``.

    >>> f0, jvp = linearize_batch(lambda p, x: p ** 2 * x, jnp.array(3.0), jnp.array(2.0))
    >>> f0.item(), jvp(jnp.array(1.0)).item()
    (18.0, 12.0)
    """
    _check_apply_fn(apply_fn)
    return jax.linearize(lambda p: apply_fn(p, *inputs), params0)


def tangent_outputs(
    apply_fn: ApplyFn, params0: PyTree, vectors: PyTree | Sequence[PyTree], *inputs: Any
) -> tuple[Any, Any]:
    """The cached form of the linearized model on one batch: ``f_0`` and ``J tau_i`` for all i.

    One primal pass and one JVP per task vector (batched with ``vmap`` over the vectors).
    Every edit ``theta_0 + sum_i c_i tau_i`` of the linearized model (Ortiz-Jimenez et al.,
    NeurIPS 2023, Eq. 4 and Sec. 5) is then ``f_0 + sum_i c_i (J tau_i)``, see
    :func:`combine_outputs`.

    Args:
      apply_fn: pure ``apply_fn(params, *inputs)``.
      params0: ``theta_0``.
      vectors: ``n`` task vectors, stacked or a sequence (``jaxmtl.taskvec.as_stacked``).
      *inputs: the batch.

    Returns:
      ``(f0, jvps)``: ``f0`` shaped like the outputs, ``jvps`` with a leading axis ``n``.

    >>> f = lambda p, x: p["w"] * x
    >>> f0, jvps = tangent_outputs(f, {"w": jnp.array(1.0)}, {"w": jnp.array([1.0, -2.0])},
    ...                            jnp.array([1.0, 3.0]))
    >>> f0.tolist(), jvps.tolist()
    ([1.0, 3.0], [[1.0, 3.0], [-2.0, -6.0]])
    """
    stacked, _ = as_stacked(vectors, params0)
    f0, jvp = linearize_batch(apply_fn, params0, *inputs)
    return f0, jax.vmap(jvp)(stacked)


def combine_outputs(f0: Any, jvps: Any, coefficients: Any) -> Any:
    """Linearized outputs of edits: ``f0 + sum_i coefficients[..., i] * jvps[i]``.

    Exact for the linearized model (Ortiz-Jimenez et al., NeurIPS 2023, Eq. 4 is linear in
    ``theta``), so a whole grid of edits costs no further network evaluation.

    Args:
      f0: outputs at ``theta_0`` (array or pytree).
      jvps: matching pytree with a leading axis ``n`` (from :func:`tangent_outputs`).
      coefficients: shape ``(..., n)``; leading axes form the grid.

    Returns:
      Outputs with shape ``(*coefficients.shape[:-1], *f0.shape)`` per leaf.

    >>> combine_outputs(jnp.array([1.0]), jnp.array([[1.0], [10.0]]),
    ...                 jnp.array([[0.0, 0.0], [1.0, 0.5]])).tolist()
    [[1.0], [7.0]]
    """
    c = jnp.asarray(coefficients)
    leaves = jax.tree.leaves(jvps)
    if not leaves:
        raise ValueError("jvps: expected at least one array leaf")
    n = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
    if c.ndim < 1 or c.shape[-1] != n:
        raise ValueError(f"coefficients: expected shape (..., {n}) (n = len(jvps)), got {c.shape}")

    def leaf(f, j):
        if jnp.shape(j) != (n, *jnp.shape(f)):
            raise ValueError(f"jvps: expected shape {(n, *jnp.shape(f))}, got {jnp.shape(j)}")
        cj = c.astype(j.dtype)
        if n > _UNROLL_MAX:
            delta = jnp.tensordot(cj, j, axes=1, precision=_HIGHEST)
            return f + delta.astype(f.dtype)
        # few vectors: one fused multiply-add per vector; a matmul with contraction size n
        # this small is several times slower (measured on XLA:CPU)
        expand = (...,) + (None,) * jnp.ndim(f)
        out = jnp.broadcast_to(f, (*c.shape[:-1], *jnp.shape(f)))
        for i in range(n):
            out = out + (cj[..., i][expand] * j[i]).astype(f.dtype)
        return out

    return jax.tree.map(leaf, f0, jvps)


def coefficient_sweep(
    apply_fn: ApplyFn,
    params0: PyTree,
    vectors: PyTree | Sequence[PyTree],
    coefficients: Any,
    *inputs: Any,
    mode: str = "linear",
    batch_size: int | None = None,
) -> Any:
    """Outputs of many task-arithmetic edits ``theta_0 + sum_i c_i tau_i`` on one batch.

    ``mode="linear"`` evaluates the linearized model (Ortiz-Jimenez et al., NeurIPS 2023,
    Eq. 4) through the cached form: one JVP per task vector, then linear combinations (a
    1-D sweep with one shared coefficient sums the vectors first: a single JVP). With
    ``mode="nonlinear"`` every setting is a forward pass of ``apply_fn`` at the edited weights
    (``jax.lax.map`` in chunks of ``batch_size``; ``None`` evaluates all at once).

    Args:
      apply_fn: pure ``apply_fn(params, *inputs)``.
      params0: ``theta_0``.
      vectors: ``n`` task vectors, stacked or a sequence.
      coefficients: ``(G,)`` (one shared alpha per setting: ``theta_0 + alpha sum_i tau_i``)
        or ``(G, n)`` (one coefficient per vector).
      *inputs: the batch.
      mode: ``"linear"`` or ``"nonlinear"``.
      batch_size: settings evaluated at once in non-linear mode.

    Returns:
      Outputs with a leading axis ``G``.

    >>> f = lambda p, x: p ** 2 * x
    >>> coefficient_sweep(f, jnp.array(1.0), [jnp.array(1.0)], jnp.array([0.0, 1.0]),
    ...                   jnp.array(1.0)).tolist()  # 1 + 2 * alpha
    [1.0, 3.0]
    >>> coefficient_sweep(f, jnp.array(1.0), [jnp.array(1.0)], jnp.array([0.0, 1.0]),
    ...                   jnp.array(1.0), mode="nonlinear").tolist()  # (1 + alpha) ** 2
    [1.0, 4.0]
    """
    check_mode(mode)
    stacked, n = as_stacked(vectors, params0)
    c = jnp.asarray(coefficients)
    if c.ndim == 1:
        shared = True
    elif c.ndim == 2 and c.shape[1] == n:
        shared = False
    else:
        raise ValueError(f"coefficients: expected shape (G,) or (G, {n}), got {c.shape}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
    if mode == "linear":
        if shared:
            # sum_i tau_i with the weighted-sum kernel of `apply` (a dot over the vector axis):
            # on XLA:CPU ~10x faster than jnp.sum over a leading axis
            ones = jnp.ones((n,), jnp.float32)
            total = jax.tree.map(
                lambda v: combine_leaf(jnp.zeros(v.shape[1:], v.dtype), ones, v)[None], stacked
            )
            f0, jvps = tangent_outputs(apply_fn, params0, total, *inputs)
            return combine_outputs(f0, jvps, c[:, None])
        f0, jvps = tangent_outputs(apply_fn, params0, stacked, *inputs)
        return combine_outputs(f0, jvps, c)
    rows = jnp.broadcast_to(c[:, None], (c.shape[0], n)) if shared else c

    def forward(row: jax.Array) -> Any:
        return apply_fn(apply(params0, stacked, row), *inputs)

    if batch_size is None:
        return jax.vmap(forward)(rows)
    return jax.lax.map(forward, rows, batch_size=batch_size)
