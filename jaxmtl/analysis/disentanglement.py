"""Weight disentanglement of task vectors and the non-linear advantage of fine-tuning.

"Task Arithmetic in the Tangent Space: Improved Editing of Pre-Trained Models"
(Ortiz-Jimenez, Favero & Frossard, NeurIPS 2023, Sec. 4, Eq. 3-4). Task vectors are weight
disentangled when each one changes the network only on its own task's inputs; the
disentanglement error of two tasks measures, on a grid of coefficients, how often adding the
other task's vector changes a task's predictions. Predictions are read through each task's own
(frozen) head, as in the paper where each task has its zero-shot text head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmtl.taskvec.tangent import check_mode, combine_outputs, tangent_outputs
from jaxmtl.taskvec.vector import apply, as_stacked

PyTree = Any
ApplyFn = Callable[..., Any]

__all__ = ["nonlinear_advantage", "weight_disentanglement_error"]


def _identity(z: Any) -> Any:
    return z


def _check_heads(heads: Any) -> tuple[Callable, Callable]:
    if heads is None:
        return _identity, _identity
    if isinstance(heads, Sequence) and len(heads) == 2 and all(callable(h) for h in heads):
        return heads[0], heads[1]
    raise ValueError(
        f"heads: expected None or a pair (head_1, head_2) of callables features -> logits, "
        f"got {heads!r}"
    )


def _labels(head: Callable, outputs: Any) -> jax.Array:
    """Argmax labels of ``head`` on one edit's outputs."""
    logits = head(outputs)
    if jnp.ndim(logits) != 2:
        raise ValueError(
            f"heads: expected logits of shape (batch, classes), got shape {jnp.shape(logits)}"
        )
    return jnp.argmax(logits, axis=-1)


def _disagreement(pred_grid: jax.Array, pred_single: jax.Array) -> jax.Array:
    # pred_grid: (A, A, N); pred_single: (A, N) broadcast along the other task's axis.
    return jnp.mean(pred_grid != pred_single, axis=-1, dtype=jnp.float32)


def weight_disentanglement_error(
    apply_fn: ApplyFn,
    params0: PyTree,
    tau1: PyTree,
    tau2: PyTree,
    x1: Any,
    x2: Any,
    alphas: Any,
    *,
    heads: Sequence[Callable] | None = None,
    mode: str = "nonlinear",
    batch_size: int | None = None,
) -> jax.Array:
    """The weight disentanglement error ``xi(alpha_1, alpha_2)`` on a grid of coefficients.

    Ortiz-Jimenez et al., NeurIPS 2023, Eq. 3 with ``dist`` = prediction disagreement:

        xi(a1, a2) = sum_{t=1,2} E_{x ~ D_t} 1[ h_t(f(x; theta_0 + a_t tau_t))
                                                != h_t(f(x; theta_0 + a1 tau1 + a2 tau2)) ]

    where ``h_t`` is the argmax of task ``t``'s own head. ``xi = 0`` everywhere means the two
    task vectors act on disjoint input supports; values lie in ``[0, 2]``.

    ``mode="linear"`` uses the linearized model ``f_lin`` (Eq. 4) in its cached form: one JVP
    per (task vector, batch) and every grid point as a linear combination in output space.
    ``mode="nonlinear"`` runs one forward pass per grid point. Both evaluate ``batch_size``
    grid points at a time (``jax.lax.map``; default one row of the grid, ``A`` points): on a
    CPU this is ~4x faster than the whole grid at once for the benchmark MLP; on an
    accelerator a larger ``batch_size`` may pay.

    Args:
      apply_fn: pure ``apply_fn(params, x) -> features`` (or logits when ``heads`` is None).
      params0: ``theta_0``.
      tau1, tau2: the two task vectors (pytrees shaped like ``params0``).
      x1, x2: input batches of task 1 and task 2 (``D_1``, ``D_2``).
      alphas: ``(A,)`` coefficients; the grid is ``alphas x alphas``.
      heads: ``(head_1, head_2)``, frozen functions ``features (N, ...) -> logits (N, C_t)``;
        ``None`` reads ``apply_fn``'s outputs as logits for both tasks.
      mode: ``"nonlinear"`` or ``"linear"``.
      batch_size: grid points evaluated at once (default ``A``).

    Returns:
      ``xi`` of shape ``(A, A)`` (float32), row ``i`` for ``alphas[i]`` on task 1, column
      ``j`` for ``alphas[j]`` on task 2.

    >>> f = lambda p, x: x * p                   # logits; coordinate k belongs to "task" k
    >>> p0, t1, t2 = jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> weight_disentanglement_error(f, p0, t1, t2, x[:1], x[1:], jnp.array([-2.0, 1.0])).tolist()
    [[0.0, 0.0], [0.0, 0.0]]
    """
    check_mode(mode)
    head1, head2 = _check_heads(heads)
    a = jnp.asarray(alphas)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ValueError(f"alphas: expected shape (A,) with A >= 1, got {a.shape}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"alphas: expected a float array, got dtype {a.dtype}")
    stacked, _ = as_stacked([tau1, tau2], params0)
    num = a.shape[0]
    grid = jnp.stack(jnp.meshgrid(a, a, indexing="ij"), axis=-1).reshape(num * num, 2)
    zeros = jnp.zeros_like(a)
    single1 = jnp.stack([a, zeros], axis=-1)  # theta_0 + a tau_1
    single2 = jnp.stack([zeros, a], axis=-1)  # theta_0 + a tau_2

    chunk = num if batch_size is None else batch_size
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")

    batches = (x1, x2)
    if mode == "linear":
        caches = [tangent_outputs(apply_fn, params0, stacked, x) for x in batches]

        def outputs(task: int, c: jax.Array) -> Any:
            return jax.tree.map(lambda o: o[0], combine_outputs(*caches[task], c[None]))

    else:

        def outputs(task: int, c: jax.Array) -> Any:
            return apply_fn(apply(params0, stacked, c), batches[task])

    def predictions(task: int, coefficients: jax.Array) -> jax.Array:
        head = (head1, head2)[task]
        # a chunk of grid points at a time keeps the (points, batch, features) block in cache
        return jax.lax.map(
            lambda c: _labels(head, outputs(task, c)), coefficients, batch_size=chunk
        )

    grid1 = predictions(0, grid).reshape(num, num, -1)
    grid2 = predictions(1, grid).reshape(num, num, -1)
    ref1 = predictions(0, single1)  # (A, N1), indexed by alpha_1 (rows)
    ref2 = predictions(1, single2)  # (A, N2), indexed by alpha_2 (columns)
    err1 = _disagreement(grid1, ref1[:, None, :])
    err2 = _disagreement(grid2, ref2[None, :, :])
    return err1 + err2


def nonlinear_advantage(acc_linear: Any, acc_nonlinear: Any, num_classes: Any) -> jax.Array:
    """The normalized non-linear advantage of a fine-tuned model.

    Ortiz-Jimenez et al., NeurIPS 2023, Sec. 6 (code ``eval.py``):
    ``(err_lin - err_nonlin) * K / (K - 1)`` with ``err = 1 - acc`` and ``K`` classes, i.e.
    the accuracy gap divided by that of a perfect over a chance-level classifier: 1 for a
    perfect non-linear model over a chance-level linear one, within ``[-K/(K-1), K/(K-1)]``
    for arbitrary accuracies, positive when the non-linear model fits the task better.

    Args:
      acc_linear, acc_nonlinear: accuracies in ``[0, 1]`` (scalars or matching arrays).
      num_classes: ``K >= 2`` (scalar or matching array).

    >>> round(float(nonlinear_advantage(0.8, 0.9, 2)), 3)
    0.2
    """
    lin = jnp.asarray(acc_linear)
    if not jnp.issubdtype(lin.dtype, jnp.floating):
        lin = lin.astype(jnp.float32)
    nonlin = jnp.asarray(acc_nonlinear).astype(lin.dtype)
    k = jnp.asarray(num_classes)
    if not jnp.issubdtype(k.dtype, jnp.integer):
        raise TypeError(f"num_classes: expected an integer, got dtype {k.dtype}")
    if not isinstance(num_classes, jax.core.Tracer) and bool(jnp.any(k < 2)):
        raise ValueError(f"num_classes: expected K >= 2, got {num_classes}")
    kf = k.astype(lin.dtype)
    return ((1.0 - lin) - (1.0 - nonlin)) * kf / (kf - 1.0)
