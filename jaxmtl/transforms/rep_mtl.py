"""Rep-MTL: regularizers on representation-level task saliency.

Wang, Li and Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency for
Multi-Task Learning" (ICCV 2025, arXiv 2507.21049). The task saliency is the gradient of a
task loss with respect to the shared features, ``S_t = dL_t/dZ`` (Eq. 3). Two regularizers act
on it:

* task-specific saliency regulation (TSR, Eqs. 4-6): the entropy, over tasks, of the
  channel-averaged absolute saliency at each sample and position; minimizing it keeps each
  location salient for few tasks;
* cross-task saliency alignment (CSA, Eqs. 7-9): a contrastive loss pulling each task's
  per-sample channel affinity ``S_t[b] S_t[b]^T`` towards the sample's task-mixing anchor
  ``A_b A_b^T`` and away from other samples' anchors.

Both are pure functions of the saliency array ``(K, N, *feature_shape)`` (K tasks, N samples),
differentiable, so they can be added to any loss; gradients then flow through the saliency,
i.e. second order through the heads. :func:`rep_mtl_loss` computes the saliency with
``jaxmtl.mtl.representation_gradients`` and returns the regularized total (Eq. 10).

Features may be vectors ``(N, C)`` (then H'W' = 1: TSR works per sample and each affinity is
rank one) or maps with any number of spatial axes; ``channel_axis`` says which axis of the
saliency holds the channels (Flax's NHWC and vectors: ``-1``). Every task must be evaluated on
the same inputs: with one input set per task (Office-31 style) the saliency of a task is zero on
the other tasks' samples and the regularizers say nothing useful.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmtl.mtl import representation_gradients

PyTree = Any

__all__ = ["csa_loss", "rep_mtl_loss", "tsr_loss"]


def _check_float(name: str, value: float, *, positive: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: expected a Python number {bound}, got {value!r}")


def _channels_last(saliency: jax.Array, channel_axis: int) -> jax.Array:
    """Checks ``(K, N, *features)`` and returns it as ``(K, N, P, C)``, P = spatial size."""
    if not hasattr(saliency, "ndim") or saliency.ndim < 3:
        shape = getattr(saliency, "shape", type(saliency).__name__)
        raise ValueError(
            f"saliency: expected an array of shape (K, N, *feature_shape) with at least one "
            f"feature axis, got {shape}"
        )
    saliency = jnp.asarray(saliency)
    if not jnp.issubdtype(saliency.dtype, jnp.floating):
        raise TypeError(f"saliency: expected a floating dtype, got {saliency.dtype}")
    if not isinstance(channel_axis, int) or not -saliency.ndim <= channel_axis < saliency.ndim:
        raise ValueError(
            f"channel_axis: expected an int indexing the axes of a saliency of shape "
            f"{saliency.shape}, got {channel_axis!r}"
        )
    axis = channel_axis % saliency.ndim
    if axis < 2:
        raise ValueError(
            f"channel_axis: expected a feature axis (>= 2, the first two are tasks and "
            f"samples) of a saliency of shape {saliency.shape}, got {channel_axis}"
        )
    moved = jnp.moveaxis(saliency, axis, -1)
    k, n, c = moved.shape[0], moved.shape[1], moved.shape[-1]
    return moved.reshape(k, n, -1, c)


def _rescaled(s: jax.Array, eps: float, axis: tuple[int, ...] | None = None) -> jax.Array:
    # Both regularizers are invariant to a positive scale of S (TSR: per position, CSA: per
    # sample); saliencies of a batch-mean loss are O(1/N), and CSA uses fourth powers, so
    # bring S to unit RMS first (over `axis`) to keep float32 away from underflow.
    return s / jnp.sqrt(jnp.mean(jnp.square(s), axis=axis, keepdims=True) + eps**2)


def tsr_loss(saliency: jax.Array, *, channel_axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Task-specific saliency regulation: mean entropy over tasks of channel-averaged saliency.

    Rep-MTL (Wang, Li, Xu, ICCV 2025), Eqs. 4-6:
    ``S^_t = mean_c S_t``, ``P_{i,t} = |S^_{i,t}| / sum_k |S^_{i,k}|`` over the N * H'W'
    positions ``i``, ``L_tsr = mean_i sum_t -P_{i,t} log P_{i,t}``. Between 0 (each position
    salient for one task) and ``log K`` (equal saliency). ``eps`` is added to every
    ``|S^|`` (after scaling S to unit RMS, see the module note), so a position where all
    saliencies vanish counts as uniform and nothing is NaN.

    Args:
      saliency: ``(K, N, *feature_shape)`` float array, ``dL_t/dz`` per task.
      channel_axis: the channel axis of ``saliency`` (``>= 2`` or negative).
      eps: smoothing ``> 0``.

    Returns:
      A scalar in the saliency's dtype.

    >>> s = jnp.stack([jnp.ones((2, 3)), 3.0 * jnp.ones((2, 3))])  # K=2, N=2, C=3
    >>> round(float(tsr_loss(s)), 4)  # -(1/4 ln 1/4 + 3/4 ln 3/4)
    0.5623
    """
    _check_float("eps", eps, positive=True)
    s = _rescaled(_channels_last(saliency, channel_axis), eps)
    magnitude = jnp.abs(jnp.mean(s, axis=-1)) + eps  # (K, N, P)
    p = magnitude / jnp.sum(magnitude, axis=0, keepdims=True)
    entropy = -jnp.sum(p * jnp.log(p), axis=0)
    return jnp.mean(entropy)


def _smooth_norm(sq: jax.Array, eps: float) -> jax.Array:
    # eps (not eps**2) under the root: products of two norms stay >= eps, so the derivative
    # of the cosine's division does not overflow in float32 when a saliency vanishes.
    return jnp.sqrt(sq + eps)


def _gram_sq(x: jax.Array, y: jax.Array) -> jax.Array:
    """``<x^T x, y^T y>_F = ||x y^T||_F^2`` over the last two axes (rows index samples)."""
    return jnp.sum(jnp.square(jnp.einsum("...pc,...qc->...pq", x, y)), axis=(-2, -1))


def csa_loss(
    saliency: jax.Array,
    *,
    tau: float = 0.1,
    channel_axis: int = -1,
    positive_in_denominator: bool = False,
    eps: float = 1e-12,
) -> jax.Array:
    """Cross-task saliency alignment: contrast each task's channel affinity with sample anchors.

    Rep-MTL (Wang, Li, Xu, ICCV 2025), Eqs. 7-9. For sample ``b`` and task ``t``, with
    ``S_t[b]`` as a ``C x H'W'`` matrix:
    ``M_t[b] = S_t[b] S_t[b]^T``, ``A_b = [mean_{hw} S_1[b], ..., mean_{hw} S_K[b]]`` (C x K),
    ``A^_b = A_b A_b^T``, ``z`` = L2-normalized ``vec``, ``sim`` = cosine, and

        L_csa = mean_{b,t} [ -sim(z_a^b, z_t^b)/tau + log sum_{k != b} exp(sim(z_a^b, z_a^k)/tau) ]

    The paper leaves the sum over ``t`` implicit (averaged here) and prints no positive term in
    the denominator (kept; ``positive_in_denominator=True`` gives the InfoNCE form). The C x C
    matrices are never formed: ``<X X^T, Y Y^T>_F = ||X^T Y||_F^2`` on the small side.
    Invariant to a positive scale per sample (hence globally) and to permuting the batch.

    Args:
      saliency: ``(K, N, *feature_shape)`` float array, N >= 2 (the negatives are the other
        samples of the batch).
      tau: temperature ``> 0`` (not reported in the paper; 0.1).
      channel_axis: the channel axis of ``saliency``.
      positive_in_denominator: add the positive pair to the denominator.
      eps: guards the L2 normalizations: after scaling each sample's saliency to unit RMS,
        a norm is ``sqrt(||v||^2 + eps)``, so a vanishing saliency gives finite values and
        gradients.

    Returns:
      A scalar in the saliency's dtype.

    >>> s = jnp.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # K=2, N=2, C=2
    >>> round(float(csa_loss(s, tau=1.0)), 4)  # mean(-.7071, -.7071, -1, -1) + .7071
    -0.1464
    """
    _check_float("tau", tau, positive=True)
    _check_float("eps", eps, positive=True)
    if not isinstance(positive_in_denominator, bool):
        raise TypeError(
            "positive_in_denominator: expected a bool, "
            f"got {type(positive_in_denominator).__name__}"
        )
    s = _channels_last(saliency, channel_axis)
    n = s.shape[1]
    if n < 2:
        raise ValueError(
            f"saliency: CSA contrasts each sample with the others, expected N >= 2 samples "
            f"(axis 1), got shape {saliency.shape}"
        )
    x = _rescaled(jnp.swapaxes(s, 0, 1), eps, axis=(1, 2, 3))  # (N, K, P, C), unit RMS/sample
    anchors = jnp.mean(x, axis=2)  # (N, K, C): rows of A_b^T
    p, c = x.shape[-2], x.shape[-1]
    if p <= c:  # ||M||_F^2 from the smaller Gram matrix
        m_sq = _gram_sq(x, x)
    else:
        xt = jnp.swapaxes(x, -1, -2)
        m_sq = _gram_sq(xt, xt)
    a_sq = _gram_sq(anchors, anchors)  # (N,)
    m_a = _gram_sq(x, anchors[:, None])  # (N, K): <M_t[b], A^_b>
    a_a = jnp.sum(jnp.square(jnp.einsum("bkc,dlc->bdkl", anchors, anchors)), axis=(-2, -1))
    a_norm = _smooth_norm(a_sq, eps)
    positive = m_a / (_smooth_norm(m_sq, eps) * a_norm[:, None]) / tau  # (N, K)
    between = a_a / (a_norm[:, None] * a_norm[None, :]) / tau  # (N, N)
    others = ~jnp.eye(n, dtype=bool)
    negatives = jax.nn.logsumexp(between, axis=1, where=others)  # (N,)
    if positive_in_denominator:
        denominator = jnp.logaddexp(positive, negatives[:, None])
    else:
        denominator = jnp.broadcast_to(negatives[:, None], positive.shape)
    return jnp.mean(denominator - positive)


def rep_mtl_loss(
    encode: Callable[[PyTree, Any], jax.Array],
    task_losses_from_features: Callable[[PyTree, jax.Array, Any], jax.Array],
    shared_params: PyTree,
    head_params: PyTree,
    inputs: Any,
    targets: Any,
    *,
    lambda_tsr: float = 0.9,
    lambda_csa: float = 0.9,
    tau: float = 0.1,
    task_weights: jax.Array | None = None,
    channel_axis: int = -1,
    positive_in_denominator: bool = False,
    eps: float = 1e-12,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Rep-MTL objective ``sum_t w_t L_t + lambda_tsr L_tsr + lambda_csa L_csa``.

    Rep-MTL (Wang, Li, Xu, ICCV 2025), Eq. 10. The saliencies ``S_t = dL_t/dz`` come from
    ``jaxmtl.mtl.representation_gradients`` (K backward passes through the heads, batched);
    differentiating the result (``jax.grad``) goes through them, second order in the heads.
    The signature mirrors ``representation_gradients``.

    Args:
      encode: ``(shared_params, inputs) -> z``, z an array ``(N, *feature_shape)``.
      task_losses_from_features: ``(head_params, z, targets) -> (K,)`` task losses.
      shared_params, head_params: the trunk's and the heads' parameters.
      inputs, targets: passed to the two functions.
      lambda_tsr, lambda_csa: regularizer weights ``>= 0`` (paper: 0.9 / 0.9; a zero weight
        skips its term's computation only when it could not be computed, i.e. CSA with N = 1).
      tau, channel_axis, positive_in_denominator, eps: see :func:`csa_loss`, :func:`tsr_loss`.
      task_weights: ``(K,)`` loss weights (default: ones, equal weighting).

    Returns:
      ``(total, aux)``; ``aux`` holds ``task_losses (K,)``, ``tsr``, ``csa`` and
      ``saliency (K, *z.shape)``.

    >>> encode = lambda w, x: x * w
    >>> heads = lambda h, z, y: jnp.stack([jnp.mean(z @ h[0]), jnp.mean(z @ h[1])])
    >>> total, aux = rep_mtl_loss(encode, heads, 1.0, jnp.eye(2), jnp.array([[1.0, 2.0],
    ...     [3.0, 4.0]]), None, lambda_csa=0.0)
    >>> aux["saliency"][0].tolist()  # dL_1/dz = e_1 / N for every sample
    [[0.5, 0.0], [0.5, 0.0]]
    >>> round(float(aux["tsr"]), 4)  # equal channel means for both tasks: ln 2
    0.6931
    >>> round(float(total), 4)  # 2 + 3 + 0.9 ln 2
    5.6238
    """
    _check_float("lambda_tsr", lambda_tsr, positive=False)
    _check_float("lambda_csa", lambda_csa, positive=False)
    losses, _, _, saliency = representation_gradients(
        encode, task_losses_from_features, shared_params, head_params, inputs, targets
    )
    if not isinstance(saliency, jax.Array):
        raise ValueError(
            f"encode: expected features z as one array (N, *feature_shape), got "
            f"{type(saliency).__name__}"
        )
    k = losses.shape[0]
    if task_weights is None:
        weighted = jnp.sum(losses)
    else:
        task_weights = jnp.asarray(task_weights)
        if task_weights.shape != (k,):
            raise ValueError(f"task_weights: expected shape ({k},), got {task_weights.shape}")
        weighted = jnp.sum(task_weights.astype(losses.dtype) * losses)
    tsr = tsr_loss(saliency, channel_axis=channel_axis, eps=eps).astype(losses.dtype)
    if lambda_csa == 0 and saliency.shape[1] < 2:
        csa = jnp.zeros((), losses.dtype)
    else:
        csa = csa_loss(
            saliency,
            tau=tau,
            channel_axis=channel_axis,
            positive_in_denominator=positive_in_denominator,
            eps=eps,
        ).astype(losses.dtype)
    total = weighted + lambda_tsr * tsr + lambda_csa * csa
    aux = {"task_losses": losses, "tsr": tsr, "csa": csa, "saliency": saliency}
    return total, aux
