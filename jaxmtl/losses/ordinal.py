"""Ordinal-regression outputs and losses: CORAL-form cumulative logits, ordinal softmax,
ordinal cross-entropy.

Kennedy, Bacon, Sahn & von Vacano, "Constructing interval variables via faceted Rasch
measurement and multitask deep learning: a hate speech application", arXiv 2009.10277,
2020: each survey item gets an ordinal head whose ``K - 1`` cumulative logits
``l_k = logit P(y > k)`` share one latent unit (the CORAL layer of Cao, Mirjalili &
Raschka, "Rank consistent ordinal regression for neural networks", Pattern Recognition
Letters 2020), trained with the ordinal cross-entropy; each item loss is a task loss.

Shapes: ``cum_logits`` (..., K - 1) for K ordered classes 0..K-1; integer ``labels`` (...).
Any float dtype (16-bit computed in float32, result cast back); log-sigmoids keep values and
gradients finite for logits of magnitude 1e4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmtl.losses.classification import (
    _check_int,
    _class_labels,
    _compute_dtype,
    _float_array,
)

__all__ = [
    "coral_logits",
    "ordinal_cross_entropy",
    "ordinal_expected_value",
    "ordinal_levels",
    "ordinal_predict",
    "ordinal_softmax",
]


def coral_logits(latent: jax.Array, biases: jax.Array) -> jax.Array:
    """Cumulative logits of a CORAL ordinal head, ``l_k = s + b_k``.

    Kennedy et al. 2020 (ordinal head: one latent unit ``s = v^T h`` and K - 1 biases,
    initialised at 0); Cao et al. 2020, CORAL. Rank-consistent (``l_k`` non-increasing in
    ``k``) when the biases are non-increasing.

    Args:
      latent: (...) latent scores (squeeze a Dense(1) output's last axis first).
      biases: (K - 1,) thresholds.

    Returns:
      (..., K - 1) cumulative logits.

    >>> print(coral_logits(jnp.array([0.5]), jnp.array([1.0, 0.0, -1.0])))
    [[ 1.5  0.5 -0.5]]
    """
    latent = _float_array("latent", latent)
    biases = _float_array("biases", biases, min_ndim=1)
    if biases.ndim != 1:
        raise ValueError(f"biases: expected shape (K - 1,), got {biases.shape}")
    if latent.dtype != biases.dtype:
        raise TypeError(f"biases: expected latent's dtype {latent.dtype}, got {biases.dtype}")
    return latent[..., None] + biases


def _cumulative(cum_logits: jax.Array) -> jax.Array:
    cum_logits = _float_array("cum_logits", cum_logits, min_ndim=1)
    if cum_logits.shape[-1] < 1:
        raise ValueError(
            f"cum_logits: expected at least one threshold (K >= 2), got shape {cum_logits.shape}"
        )
    return cum_logits


def _sigmoid_difference(upper: jax.Array, lower: jax.Array) -> jax.Array:
    """``sigmoid(upper) - sigmoid(lower)``, accurate in the tails and finite for any inputs.

    With ``hi, lo`` the larger and smaller of the two, the difference is
    ``sign * exp(log_sigmoid(hi) + log_sigmoid(-lo)) * -expm1(lo - hi)``: the sigmoids'
    product in log space, and ``lo - hi <= 0`` so ``expm1`` never overflows (the naive
    ``expm1(lower - upper)`` is inf for a gap over ~88 in float32, and ``0 * inf`` NaN).
    ``jnp.where`` (not max/min) picks the branch, so at a tie the gradient is the exact
    ``(sigmoid'(upper), -sigmoid'(lower))``.
    """
    swap = upper < lower
    hi, lo = jnp.where(swap, lower, upper), jnp.where(swap, upper, lower)
    log_product = jax.nn.log_sigmoid(hi) + jax.nn.log_sigmoid(-lo)
    magnitude = jnp.exp(log_product) * -jnp.expm1(lo - hi)
    return jnp.where(swap, -magnitude, magnitude)


def ordinal_softmax(cum_logits: jax.Array, *, clip: bool = False) -> jax.Array:
    """Class probabilities from cumulative logits ("ordinal softmax").

    Kennedy et al. 2020: ``P(y = 0) = 1 - sigmoid(l_0)``,
    ``P(y = k) = sigmoid(l_{k-1}) - sigmoid(l_k)``, ``P(y = K - 1) = sigmoid(l_{K-2})``. Each
    difference is evaluated in log space as ``sigmoid(hi) sigmoid(-lo) (1 - exp(lo - hi))``
    with ``hi, lo`` the larger and smaller logit (and the sign of ``l_{k-1} - l_k``):
    accurate in the tails and finite for any logits, also non-monotone ones with gaps of
    1e4. Rows sum to 1; entries are non-negative only when ``l_k`` is non-increasing in
    ``k``. ``clip=True`` clips negative entries at 0 and renormalizes (the clipped row sums
    to at least 1 before renormalizing, so this never divides by 0).

    Args:
      cum_logits: (..., K - 1).
      clip: see above.

    Returns:
      (..., K) probabilities in the input dtype.

    >>> print(ordinal_softmax(jnp.array([2.0, 0.0, -2.0])).round(6))
    [0.119203 0.380797 0.380797 0.119203]
    >>> print(ordinal_softmax(jnp.array([1.0, 100.0, 2.0]), clip=True).round(6))
    [0.211942 0.       0.093939 0.69412 ]
    """
    cum_logits = _cumulative(cum_logits)
    x = cum_logits.astype(_compute_dtype(cum_logits.dtype))
    first = jax.nn.sigmoid(-x[..., :1])
    last = jax.nn.sigmoid(x[..., -1:])
    middle = _sigmoid_difference(x[..., :-1], x[..., 1:])
    probs = jnp.concatenate([first, middle, last], axis=-1)
    if clip:
        probs = jnp.maximum(probs, 0.0)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return probs.astype(cum_logits.dtype)


def ordinal_levels(labels: jax.Array, num_classes: int) -> jax.Array:
    """Binary extended targets ``1(y > k)`` for ``k = 0..K-2``, shape (..., K - 1), int32.

    >>> ordinal_levels(jnp.array([0, 2]), 4).tolist()
    [[0, 0, 0], [1, 1, 0]]
    """
    num_classes = _check_int("num_classes", num_classes, low=2)
    labels = _class_labels("labels", labels, (*jnp.shape(labels), num_classes))
    return (labels[..., None] > jnp.arange(num_classes - 1)).astype(jnp.int32)


def ordinal_cross_entropy(
    cum_logits: jax.Array,
    labels: jax.Array,
    *,
    importance: jax.Array | None = None,
) -> jax.Array:
    """Ordinal cross-entropy, per example.

    Kennedy et al. 2020 (the CORAL loss of Cao et al. 2020):

        OCE(l, y) = - sum_{k=0}^{K-2} w_k [ 1(y > k) log sigmoid(l_k)
                                          + 1(y <= k) log(1 - sigmoid(l_k)) ],

    with optional per-threshold importance weights ``w`` (default 1), through
    ``log_sigmoid`` (``log(1 - sigmoid(l)) = log_sigmoid(-l)``). K = 2 is binary
    cross-entropy.

    Args:
      cum_logits: (..., K - 1). labels: (...) integers in [0, K).
      importance: optional (K - 1,) non-negative weights.

    Returns:
      (...) losses in the input dtype.

    >>> round(float(ordinal_cross_entropy(jnp.array([2.0, 0.0, -2.0]), jnp.array(2))), 6)
    0.947003
    """
    cum_logits = _cumulative(cum_logits)
    num_thresholds = cum_logits.shape[-1]
    labels = _class_labels("labels", labels, (*cum_logits.shape[:-1], num_thresholds + 1))
    x = cum_logits.astype(_compute_dtype(cum_logits.dtype))
    above = labels[..., None] > jnp.arange(num_thresholds)
    terms = jnp.where(above, jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x))
    if importance is not None:
        importance = _float_array("importance", importance)
        if importance.shape != (num_thresholds,):
            raise ValueError(
                f"importance: expected shape ({num_thresholds},), got {importance.shape}"
            )
        terms = terms * importance.astype(x.dtype)
    return (-jnp.sum(terms, axis=-1)).astype(cum_logits.dtype)


def ordinal_expected_value(cum_logits: jax.Array) -> jax.Array:
    """Expected class ``E[y] = sum_k P(y > k) = sum_k sigmoid(l_k)``, per example.

    The item prediction that Kennedy et al. 2020 feed to their final (score) layer; exact
    for any logits (no monotonicity needed).

    >>> round(float(ordinal_expected_value(jnp.array([2.0, 0.0, -2.0]))), 6)
    1.5
    """
    cum_logits = _cumulative(cum_logits)
    x = cum_logits.astype(_compute_dtype(cum_logits.dtype))
    return jnp.sum(jax.nn.sigmoid(x), axis=-1).astype(cum_logits.dtype)


def ordinal_predict(cum_logits: jax.Array) -> jax.Array:
    """Predicted class ``sum_k 1(l_k > 0)`` (the CORAL rank rule), int32, per example.

    >>> ordinal_predict(jnp.array([[2.0, 0.5, -2.0]])).tolist()
    [2]
    """
    cum_logits = _cumulative(cum_logits)
    return jnp.sum(cum_logits > 0, axis=-1).astype(jnp.int32)
