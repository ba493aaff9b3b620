"""Pure-jnp reference of the fused linear layer + Z-loss, ``L_n = Z(h_n W^T + bias, y_n)``.

de Brebisson & Vincent, "The Z-loss: a shift and scale invariant classification loss belonging
to the Spherical Family", arXiv 1604.08859, 2016, Eq. (Z-loss):
``L = (1/a) softplus(a (b - z_y))`` with ``z_y = (o_y - mean(o)) / std(o)``, ``o = W h + bias``.

The reference forms the ``(N, D)`` logits densely (in float32) and calls
:func:`jaxmtl.losses.classification.z_loss`, whose z-score is computed without cancellation;
its gradients are plain autodiff. The Pallas kernels (:mod:`kernels.zloss.pallas`) compute the
same loss from per-row moments without ever writing the logits; this module also gives the
dense versions of those moments, for tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmtl.losses.classification import SphericalStatistics, spherical_statistics, z_loss

__all__ = ["dh", "dw", "logit_cotangent", "logits", "moments", "statistics", "z_loss_linear"]


def _precision(dtype: jnp.dtype) -> jax.lax.Precision:
    # float32 inputs get full-precision products (TF32 / bf16-pass matmuls would dominate the
    # error of the statistics); 16-bit inputs are exact in any f32-accumulating matmul.
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def logits(h: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``h @ w^T (+ bias)`` as an ``(N, D)`` float32 array (float32 accumulation)."""
    out = jax.lax.dot_general(
        h,
        w,
        (((1,), (1,)), ((), ())),
        precision=_precision(jnp.dtype(h.dtype)),
        preferred_element_type=jnp.float32,
    )
    if bias is not None:
        out = out + bias.astype(jnp.float32)[None, :]
    return out


def statistics(
    h: jax.Array, w: jax.Array, labels: jax.Array, bias: jax.Array | None = None
) -> SphericalStatistics:
    """Spherical statistics ``(s, q, o_y)`` of the logits (jaxmtl's ``spherical_statistics``)."""
    return spherical_statistics(logits(h, w, bias), labels)


def moments(
    h: jax.Array, w: jax.Array, labels: jax.Array, bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row ``(mean, M2, o_y)`` of the logits, ``M2 = sum_k (o_k - mean)^2`` (two passes).

    These are what the Pallas forward kernel accumulates (with Chan's pairwise merge).
    """
    o = logits(h, w, bias)
    mean = jnp.mean(o, axis=-1)
    centred = o - mean[:, None]
    m2 = jnp.sum(centred * centred, axis=-1)
    target = jnp.take_along_axis(o, labels[:, None], axis=-1)[:, 0]
    return mean, m2, target


def logit_cotangent(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    coef: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    bias: jax.Array | None = None,
) -> jax.Array:
    """Dense ``G = alpha + beta (O - mean) + gamma onehot(y)``, float32 ``(N, D)``, from
    ``coef = (mean, alpha, beta, gamma)`` (see ``pallas.logit_cotangent_coefficients``)."""
    mean, alpha, beta, gamma = (c.astype(jnp.float32)[:, None] for c in coef)
    o = logits(h, w, bias)
    onehot = jnp.arange(w.shape[0])[None, :] == labels[:, None]
    return alpha + beta * (o - mean) + jnp.where(onehot, gamma, 0.0)


def dh(h, w, labels, coef, bias=None) -> jax.Array:
    """Dense ``G W`` in ``h``'s dtype (what ``pallas.backward``'s dh kernel computes by tiles)."""
    g = logit_cotangent(h, w, labels, coef, bias)
    out = jnp.dot(g, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(h.dtype)


def dw(h, w, labels, coef, bias=None) -> tuple[jax.Array, jax.Array | None]:
    """Dense ``(G^T h, 1^T G)`` in the dtypes of ``w`` and ``bias`` (its dW kernel)."""
    g = logit_cotangent(h, w, labels, coef, bias)
    out = jnp.dot(g.T, h.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    dbias = None if bias is None else jnp.sum(g, axis=0).astype(bias.dtype)
    return out.astype(w.dtype), dbias


def z_loss_linear(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None = None,
    *,
    a: float = 1.0,
    b: float = 0.0,
) -> jax.Array:
    """Per-example Z-loss of the logits ``h @ w^T + bias``, shape ``(N,)``, in ``h``'s dtype.

    Memory O(N D) (the logits are formed); FLOPs 2 N D d forward, 4 N D d backward (autodiff).
    Hyperparameters as in :func:`jaxmtl.losses.classification.z_loss`.

    >>> h = jnp.eye(4)
    >>> w = jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0]))
    >>> print(z_loss_linear(h[3:], w, jnp.array([3])).round(6))
    [0.162902]
    """
    return z_loss(logits(h, w, bias), labels, a=a, b=b).astype(h.dtype)
