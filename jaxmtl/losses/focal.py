"""Focal losses and the DatasetEquity ("generalized focal loss") per-sample weight.

* Lin, Goyal, Girshick, He & Dollar, "Focal Loss for Dense Object Detection", ICCV 2017:
  the focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (Eq. 5), sigmoid and softmax forms.
* Shrivastava, Zhang, Nagesh & Parchami, "DatasetEquity: Are All Samples Created Equal? In
  The Quest For Equity Within Datasets", ICCV 2023 Workshops, arXiv 2308.09878: the weight
  ``w(p) = (eta + (1 - p)^gamma) / (eta + 1)`` of a sample whose *appearance* likelihood is
  ``p`` (the paper calls ``w(p) * loss`` its "Generalized Focal Loss"; it is unrelated to the
  detection loss of that name by Li et al. 2020, hence the ``dequity`` names here). The
  likelihoods come from clustering embeddings, see ``jaxmtl.analysis.equity``.

Per-example contract as in ``jaxmtl.losses.classification``: no reduction, any float dtype
(16-bit computed in float32, result cast back), finite for logits of magnitude 1e4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmtl.losses.classification import (
    _check_scalar,
    _class_labels,
    _compute_dtype,
    _float_array,
    _is_concrete,
    _logits,
    _take_class,
)

__all__ = [
    "dequity_weight",
    "dequity_weighted_loss",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
]


def _safe_power(base: jax.Array, gamma: Any) -> jax.Array:
    """``base ** gamma`` for ``base >= 0`` with ``0 ** 0 = 1`` and finite gradients at 0."""
    positive = base > 0
    powered = jnp.power(jnp.where(positive, base, 1.0), gamma)
    at_zero = jnp.where(jnp.asarray(gamma, base.dtype) == 0, 1.0, 0.0)
    return jnp.where(positive, powered, at_zero)


def sigmoid_focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
) -> jax.Array:
    """Binary (sigmoid) focal loss, elementwise.

    Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. 5:
    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(z)``,
    ``p_t = p y + (1 - p)(1 - y)`` and ``alpha_t = alpha y + (1 - alpha)(1 - y)``. Soft labels
    in [0, 1] use the cross-entropy ``-(y log p + (1 - y) log(1 - p))`` in place of
    ``-log p_t``. ``gamma = 0`` and ``alpha = None`` give binary cross-entropy. Logs are
    taken with ``log_sigmoid``, so saturated logits give finite values and gradients.

    Args:
      logits: float array (any shape).
      labels: same shape, 0/1 (or soft) targets, any real or bool dtype.
      gamma: focusing parameter >= 0.
      alpha: optional class-1 weight in [0, 1] (the paper uses 0.25 with gamma = 2).

    Returns:
      Elementwise losses of ``logits``' shape and dtype.

    >>> print(sigmoid_focal_loss(jnp.array([0.0]), jnp.array([1.0]), gamma=2.0).round(6))
    [0.173287]
    """
    gamma = _check_scalar("gamma", gamma, low=0.0)
    if alpha is not None:
        alpha = _check_scalar("alpha", alpha, low=0.0, high=1.0)
    logits = _float_array("logits", logits)
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape:
        raise ValueError(f"labels: expected the shape of logits {logits.shape}, got {labels.shape}")
    dtype = _compute_dtype(logits.dtype)
    z = logits.astype(dtype)
    y = labels.astype(dtype)
    log_p, log_not_p = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    ce = -(y * log_p + (1.0 - y) * log_not_p)
    one_minus_pt = y * jax.nn.sigmoid(-z) + (1.0 - y) * jax.nn.sigmoid(z)
    loss = _safe_power(one_minus_pt, gamma) * ce
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss.astype(logits.dtype)


def softmax_focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    gamma: float = 2.0,
    alpha: jax.Array | None = None,
) -> jax.Array:
    """Multi-class (softmax) focal loss ``-alpha_y (1 - p_y)^gamma log p_y``, per example.

    Lin et al., ICCV 2017, Eq. 5 applied to ``p = softmax(h)``. ``1 - p_y`` is computed as
    ``sum_{k != y} p_k`` in log space, so it keeps full relative precision when ``p_y`` is
    close to 1. ``gamma = 0`` and ``alpha = None`` give cross-entropy.

    Args:
      logits: (..., C) scores, C >= 2.
      labels: (...) integer classes.
      gamma: focusing parameter >= 0.
      alpha: optional (C,) non-negative per-class weights.

    Returns:
      (...) losses in the logits' dtype.

    >>> print(softmax_focal_loss(jnp.array([0.0, 0.0]), jnp.array(0), gamma=2.0).round(6))
    0.173287
    """
    gamma = _check_scalar("gamma", gamma, low=0.0)
    logits = _logits("logits", logits, min_classes=2)
    labels = _class_labels("labels", labels, logits.shape)
    dtype = _compute_dtype(logits.dtype)
    x = logits.astype(dtype)
    log_p = jax.nn.log_softmax(x, axis=-1)
    log_p_y = _take_class(log_p, labels)
    others = jnp.arange(x.shape[-1]) != labels[..., None]
    log_rest = jax.nn.logsumexp(jnp.where(others, log_p, -jnp.inf), axis=-1)
    loss = -jnp.exp(gamma * log_rest) * log_p_y
    if alpha is not None:
        alpha = _float_array("alpha", alpha)
        if alpha.shape != (x.shape[-1],):
            raise ValueError(f"alpha: expected shape ({x.shape[-1]},), got {alpha.shape}")
        loss = alpha.astype(dtype)[labels] * loss
    return loss.astype(logits.dtype)


def _check_likelihood(likelihood: jax.Array) -> None:
    if _is_concrete(likelihood) and likelihood.size:
        host = np.asarray(likelihood, np.float64)
        lo, hi = float(np.min(host)), float(np.max(host))
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"likelihood: expected values in [0, 1], got values in [{lo}, {hi}]")


def dequity_weight(likelihood: jax.Array, *, eta: float = 1.0, gamma: float = 5.0) -> jax.Array:
    """DatasetEquity sample weight ``w(p) = (eta + (1 - p)^gamma) / (eta + 1)``.

    Shrivastava et al., "DatasetEquity", ICCV 2023 Workshops (Generalized Focal Loss weight,
    README defaults eta = 1, gamma = 5). ``p`` is the sample's appearance likelihood
    (``jaxmtl.analysis.equity.cluster_likelihood``: its cluster's size over the largest
    cluster's). ``w`` is 1 for the rarest appearance (``p -> 0``), ``eta / (eta + 1)`` for
    the most common (``p = 1``), non-increasing in ``p``; ``gamma = 0`` gives 1.

    Args:
      likelihood: float array with values in [0, 1] (checked when concrete).
      eta: floor >= 0. gamma: decay >= 0.

    Returns:
      Weights of ``likelihood``'s shape and dtype.

    >>> print(dequity_weight(jnp.array([0.0, 0.5, 1.0])).round(6))
    [1.       0.515625 0.5     ]
    """
    eta = _check_scalar("eta", eta, low=0.0)
    gamma = _check_scalar("gamma", gamma, low=0.0)
    likelihood = _float_array("likelihood", likelihood)
    _check_likelihood(likelihood)
    p = likelihood.astype(_compute_dtype(likelihood.dtype))
    w = (eta + _safe_power(1.0 - p, gamma)) / (eta + 1.0)
    return w.astype(likelihood.dtype)


def dequity_weighted_loss(
    per_example_loss: jax.Array,
    likelihood: jax.Array,
    *,
    eta: float = 1.0,
    gamma: float = 5.0,
) -> jax.Array:
    """DatasetEquity's per-sample reweighting ``L_i = w(p_i) l_i`` (the paper's "GFL").

    Shrivastava et al., ICCV 2023 Workshops: any per-example loss times ``dequity_weight``
    of the example's appearance likelihood (per sample, as in the README pseudo-code; the
    likelihood is data, so it gets no gradient). Per task in MTL: give each task's loss its
    own likelihoods.

    Args:
      per_example_loss: float array of losses, e.g. (B,) or (B, K).
      likelihood: likelihoods broadcastable to the loss's shape, in [0, 1].
      eta, gamma: see ``dequity_weight``.

    Returns:
      Weighted losses of the loss's shape and dtype.

    >>> print(dequity_weighted_loss(jnp.array([2.0, 2.0]), jnp.array([0.0, 1.0])))
    [2. 1.]
    """
    per_example_loss = _float_array("per_example_loss", per_example_loss)
    likelihood = _float_array("likelihood", likelihood)
    try:
        shape = np.broadcast_shapes(likelihood.shape, per_example_loss.shape)
    except ValueError:
        shape = None
    if shape != per_example_loss.shape:
        raise ValueError(
            f"likelihood: expected a shape broadcastable to per_example_loss's "
            f"{per_example_loss.shape}, got {likelihood.shape}"
        )
    weight = jax.lax.stop_gradient(dequity_weight(likelihood, eta=eta, gamma=gamma))
    dtype = _compute_dtype(per_example_loss.dtype)
    out = weight.astype(dtype) * per_example_loss.astype(dtype)
    return out.astype(per_example_loss.dtype)
