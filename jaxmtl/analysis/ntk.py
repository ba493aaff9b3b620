"""The empirical neural tangent kernel at the pre-trained weights and its task localization.

"Task Arithmetic in the Tangent Space: Improved Editing of Pre-Trained Models"
(Ortiz-Jimenez, Favero & Frossard, NeurIPS 2023, Sec. 5): a linearized model acts through
the empirical NTK ``k(x, x') = J(x; theta_0) J(x'; theta_0)^T`` (Jacot et al., "Neural
Tangent Kernel", NeurIPS 2018), and task arithmetic holds when the kernel's eigenfunctions
are localized on single task supports (their Proposition 2). :func:`ntk_gram` computes the
Gram matrix on a batch, leaf by leaf; :func:`eigenfunction_localization` measures how much of
each eigenvector's mass lies on each task's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["eigenfunction_localization", "ntk_gram"]

_HIGHEST = jax.lax.Precision.HIGHEST
KINDS = ("trace", "full")


def ntk_gram(
    apply_fn: Callable[..., Any], params: PyTree, x: Any, *, kind: str = "trace"
) -> jax.Array:
    """The empirical NTK Gram matrix of ``apply_fn`` at ``params`` on the batch ``x``.

    ``Theta(x_n, x_m)_{cd} = sum_p d f_c(x_n) / d theta_p * d f_d(x_m) / d theta_p``
    (Jacot et al., NeurIPS 2018; Ortiz-Jimenez et al., NeurIPS 2023, Sec. 5), from the
    per-example Jacobian (``jax.jacrev``) contracted leaf by leaf, so the model is never
    flattened into one vector. Memory: ``N * C`` Jacobian rows of each leaf's size.

    Args:
      apply_fn: pure ``apply_fn(params, x) -> (N,)`` or ``(N, C)`` outputs (logits).
      params: the expansion point ``theta_0``.
      x: the batch of ``N`` inputs.
      kind: ``"trace"`` sums the per-logit kernels over outputs,
        ``sum_c Theta_{cc}`` of shape ``(N, N)`` (the "output-summed" kernel, neural-tangents'
        ``trace_axes=(-1,)``); ``"full"`` keeps every pair of logits, ``(N, N, C, C)``.
        Scalar outputs ``(N,)`` give ``(N, N)`` for both.

    Returns:
      The Gram matrix in float32 (float64 when a leaf is float64); symmetric PSD.

    >>> f = lambda p, x: x @ p["w"]              # linear: Theta = x x^T
    >>> ntk_gram(f, {"w": jnp.zeros(2)}, jnp.array([[1.0, 2.0], [0.0, 1.0]])).tolist()
    [[5.0, 2.0], [2.0, 1.0]]
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a callable apply_fn(params, x), got {apply_fn!r}")
    out_shape = jax.eval_shape(lambda p: apply_fn(p, x), params)
    if not hasattr(out_shape, "shape") or len(out_shape.shape) not in (1, 2):
        raise ValueError(
            "apply_fn: expected outputs of shape (N,) or (N, C), "
            f"got {getattr(out_shape, 'shape', out_shape)}"
        )
    scalar = len(out_shape.shape) == 1
    n = out_shape.shape[0]
    jac = jax.jacrev(lambda p: apply_fn(p, x))(params)
    leaves = jax.tree.leaves(jac)
    if not leaves:
        raise ValueError("params: expected at least one array leaf")
    dtype = jnp.float64 if any(leaf.dtype == jnp.float64 for leaf in leaves) else jnp.float32
    c = 1 if scalar else out_shape.shape[1]
    total = jnp.zeros((n, n) if kind == "trace" or scalar else (n, n, c, c), dtype)
    for leaf in leaves:
        rows = leaf.reshape(n, c, -1).astype(dtype)
        if kind == "trace" or scalar:
            total = total + jnp.einsum("ncp,mcp->nm", rows, rows, precision=_HIGHEST)
        else:
            total = total + jnp.einsum("ncp,mdp->nmcd", rows, rows, precision=_HIGHEST)
    return total


def eigenfunction_localization(
    gram: jax.Array, task_ids: jax.Array, num_tasks: int, *, top: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues of an (N, N) kernel Gram matrix and each eigenvector's mass per task.

    Ortiz-Jimenez et al., NeurIPS 2023, Sec. 5 (Proposition 2): task arithmetic in the
    tangent space holds when the NTK eigenfunctions are localized on single task supports.
    For a unit eigenvector ``v`` the mass on task ``t`` is ``sum_{n: task_ids[n] = t} v_n^2``;
    rows sum to one, and a one-hot row is a perfectly localized eigenfunction.

    Args:
      gram: symmetric ``(N, N)`` Gram matrix (e.g. :func:`ntk_gram` with ``kind="trace"``).
      task_ids: ``(N,)`` integers in ``[0, num_tasks)``: the task each input belongs to.
      num_tasks: ``T``.
      top: keep the ``top`` largest eigenvalues (default all ``N``).

    Returns:
      ``(eigenvalues (E,), mass (E, T))``, eigenvalues in decreasing order.

    >>> vals, mass = eigenfunction_localization(jnp.diag(jnp.array([1.0, 3.0])),
    ...                                         jnp.array([0, 1]), 2)
    >>> vals.tolist(), mass.tolist()
    ([3.0, 1.0], [[0.0, 1.0], [1.0, 0.0]])
    """
    gram = jnp.asarray(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram: expected a square (N, N) matrix, got shape {gram.shape}")
    if not jnp.issubdtype(gram.dtype, jnp.floating):
        raise TypeError(f"gram: expected a float matrix, got dtype {gram.dtype}")
    n = gram.shape[0]
    ids = jnp.asarray(task_ids)
    if ids.shape != (n,) or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"task_ids: expected integers of shape ({n},), got {ids.dtype}{ids.shape}")
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks: expected a positive int, got {num_tasks!r}")
    if top is None:
        top = n
    if not isinstance(top, int) or not 1 <= top <= n:
        raise ValueError(f"top: expected an int in [1, {n}], got {top!r}")
    values, vectors = jnp.linalg.eigh(gram)
    order = jnp.argsort(values, descending=True)[:top]
    values, vectors = values[order], vectors[:, order]
    one_hot = jax.nn.one_hot(ids, num_tasks, dtype=gram.dtype)
    mass = jnp.matmul(jnp.square(vectors).T, one_hot, precision=_HIGHEST)
    return values, mass
