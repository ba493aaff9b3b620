"""AnyLoss: confusion-matrix metrics turned into differentiable losses.

Han, Moniz & Chawla, "AnyLoss: Transforming Classification Metrics into Loss Functions",
KDD 2024, arXiv 2405.14745.

Contract. Unlike the per-example losses of this package, AnyLoss is defined over a **set**:
the soft confusion matrix sums over the examples of a batch, so every ``*anyloss*`` function
returns **one value per batch** (per set of examples), reducing the *last* example axis;
leading axes are independent sets (tasks, or one-vs-rest classes). Batch size matters
(the paper's notebooks use batches of 5% of the training set). In multi-task code treat
it as a task-level loss; do not average it over examples.

Inputs are probabilities ``p`` in (0, 1) (use the ``*_from_logits`` versions on logits) and
0/1 labels (bool, int or float). Any float dtype; 16-bit inputs are computed in float32 and
the result is cast back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmtl.losses.classification import (
    _check_scalar,
    _class_labels,
    _compute_dtype,
    _float_array,
)

__all__ = [
    "METRICS",
    "ConfusionMatrix",
    "accuracy",
    "amplify",
    "anyloss",
    "anyloss_from_logits",
    "balanced_accuracy",
    "f1",
    "f_beta",
    "g_mean",
    "multiclass_anyloss",
    "multiclass_anyloss_from_logits",
    "multiclass_soft_confusion",
    "soft_confusion",
]


class ConfusionMatrix(NamedTuple):
    """Soft confusion-matrix entries, each of the same shape (one per set)."""

    tp: jax.Array
    fn: jax.Array
    fp: jax.Array
    tn: jax.Array


def amplify(probs: jax.Array, *, scale: float = 73.0) -> jax.Array:
    """AnyLoss approximation (amplifying) function ``A(p) = 1 / (1 + exp(-L (p - 1/2)))``.

    Han et al., AnyLoss, KDD 2024, Sec. 3 (approximation function, ``L = scale``; 73 is
    the official default). Pushes ``p`` towards 0 or 1 without reaching them, so gradients
    survive; ``A(1/2) = 1/2``; ``dA/dp = L A (1 - A)``.

    Args:
      probs: float array of probabilities.
      scale: amplification ``L > 0``.

    Returns:
      Array of ``probs``' shape and dtype.

    >>> print(amplify(jnp.array([0.5, 0.6]), scale=73.0).round(4))
    [0.5    0.9993]
    """
    scale = _check_scalar("scale", scale, low=0.0, low_open=True)
    probs = _float_array("probs", probs)
    p = probs.astype(_compute_dtype(probs.dtype))
    return jax.nn.sigmoid(scale * (p - 0.5)).astype(probs.dtype)


def _binary_labels(labels: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"labels: expected the shape of probs {shape}, got {labels.shape}")
    if not (
        jnp.issubdtype(labels.dtype, jnp.floating)
        or jnp.issubdtype(labels.dtype, jnp.integer)
        or labels.dtype == jnp.bool_
    ):
        raise TypeError(f"labels: expected 0/1 labels (bool, int or float), got {labels.dtype}")
    return labels.astype(dtype)


def _mask(where: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array | None:
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.shape != shape:
        raise ValueError(f"where: expected shape {shape}, got {where.shape}")
    return where.astype(dtype)


def soft_confusion(
    probs: jax.Array,
    labels: jax.Array,
    *,
    scale: float = 73.0,
    where: jax.Array | None = None,
) -> ConfusionMatrix:
    """Soft confusion matrix of a set of binary predictions (sums over the last axis).

    Han et al., AnyLoss, KDD 2024, Sec. 3, with ``y^_i = A(p_i)``:
    ``TP = sum y y^``, ``FN = sum y (1 - y^)``, ``FP = sum (1 - y) y^``,
    ``TN = sum (1 - y)(1 - y^)``. ``TP + FN`` is the number of positives exactly.

    Args:
      probs: (..., N) probabilities. labels: (..., N) 0/1 labels.
      scale: amplification ``L``.
      where: optional (..., N) mask; masked-out examples (padding) do not count.

    Returns:
      ``ConfusionMatrix`` with entries of shape (...), float32 for 16-bit inputs.

    >>> cm = soft_confusion(jnp.array([0.9, 0.2, 0.6, 0.4]), jnp.array([1, 0, 1, 1]))
    >>> [round(float(v), 4) for v in cm]
    [2.0, 1.0, 0.0, 1.0]
    """
    probs = _float_array("probs", probs, min_ndim=1)
    dtype = _compute_dtype(probs.dtype)
    y = _binary_labels(labels, probs.shape, dtype)
    y_hat = amplify(probs.astype(dtype), scale=scale)
    mask = _mask(where, probs.shape, dtype)
    if mask is not None:
        y, y_hat = y * mask, y_hat * mask
        negatives = (1.0 - y) * mask
    else:
        negatives = 1.0 - y
    tp = jnp.sum(y * y_hat, axis=-1)
    fn = jnp.sum(y, axis=-1) - tp
    fp = jnp.sum(negatives * y_hat, axis=-1)
    tn = jnp.sum(negatives, axis=-1) - fp
    return ConfusionMatrix(tp, fn, fp, tn)


def _entries(cm: ConfusionMatrix) -> tuple[jax.Array, ...]:
    if len(cm) != 4:
        raise ValueError(f"cm: expected (tp, fn, fp, tn), got {len(cm)} entries")
    return tuple(
        _float_array(name, v) for name, v in zip(("tp", "fn", "fp", "tn"), cm, strict=True)
    )


def accuracy(cm: ConfusionMatrix, *, eps: float = 1e-5) -> jax.Array:
    """``(TP + TN) / (TP + TN + FP + FN + eps)`` (AnyLoss paper, accuracy).

    >>> round(float(accuracy(ConfusionMatrix(2.0, 1.0, 0.0, 1.0))), 4)
    0.75
    """
    tp, fn, fp, tn = _entries(cm)
    return (tp + tn) / (tp + tn + fp + fn + eps)


def f_beta(cm: ConfusionMatrix, *, beta: float = 1.0, eps: float = 1e-5) -> jax.Array:
    """``(1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP + eps)`` (AnyLoss paper, F-beta).

    >>> round(float(f_beta(ConfusionMatrix(2.0, 1.0, 0.0, 1.0), beta=1.0)), 4)
    0.8
    """
    beta = _check_scalar("beta", beta, low=0.0, low_open=True)
    tp, fn, fp, _ = _entries(cm)
    b2 = beta * beta
    return (1.0 + b2) * tp / ((1.0 + b2) * tp + b2 * fn + fp + eps)


def f1(cm: ConfusionMatrix, *, eps: float = 1e-5) -> jax.Array:
    """F1 = ``2 TP / (2 TP + FN + FP + eps)`` (``f_beta`` with beta = 1).

    >>> round(float(f1(ConfusionMatrix(2.0, 1.0, 0.0, 1.0))), 4)
    0.8
    """
    return f_beta(cm, beta=1.0, eps=eps)


def balanced_accuracy(cm: ConfusionMatrix, *, eps: float = 1e-5) -> jax.Array:
    """``(TP / (TP + FN + eps) + TN / (TN + FP + eps)) / 2`` (AnyLoss paper).

    >>> round(float(balanced_accuracy(ConfusionMatrix(2.0, 1.0, 0.0, 1.0))), 4)
    0.8333
    """
    tp, fn, fp, tn = _entries(cm)
    return 0.5 * (tp / (tp + fn + eps) + tn / (tn + fp + eps))


def g_mean(cm: ConfusionMatrix, *, eps: float = 1e-5) -> jax.Array:
    """``sqrt(TP / (TP + FN + eps) * TN / (TN + FP + eps))`` (AnyLoss paper, G-mean).

    The square root has a zero (not infinite) gradient where its argument is 0 (a set with no
    positives or no negatives), so such a set gives G-mean 0 and no NaN.

    >>> round(float(g_mean(ConfusionMatrix(2.0, 1.0, 0.0, 1.0))), 4)
    0.8165
    """
    tp, fn, fp, tn = _entries(cm)
    product = tp / (tp + fn + eps) * (tn / (tn + fp + eps))
    positive = product > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, product, 1.0)), 0.0)


METRICS: dict[str, Callable[..., jax.Array]] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "f1": f1,
    "f_beta": f_beta,
    "g_mean": g_mean,
}


def _metric_fn(metric: str | Callable[..., jax.Array], beta: float) -> Callable:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {sorted(METRICS)} or a callable, got {metric!r}")
    if metric == "f_beta":
        beta = _check_scalar("beta", beta, low=0.0, low_open=True)
        return lambda cm, eps: f_beta(cm, beta=beta, eps=eps)
    return METRICS[metric]


def anyloss(
    probs: jax.Array,
    labels: jax.Array,
    *,
    metric: str | Callable[..., jax.Array] = "f1",
    scale: float = 73.0,
    beta: float = 1.0,
    eps: float = 1e-5,
    where: jax.Array | None = None,
) -> jax.Array:
    """AnyLoss ``1 - f(soft confusion matrix)``: ONE value per set of examples.

    Han, Moniz & Chawla, "AnyLoss", KDD 2024, Eq. (AnyLoss) ``L = 1 - f(TP, FN, FP, TN)`` on
    the soft confusion matrix of amplified probabilities (``soft_confusion``). Metrics:
    ``"accuracy"``, ``"f1"``, ``"f_beta"`` (with ``beta``), ``"g_mean"``,
    ``"balanced_accuracy"``, or a callable ``f(cm, eps=eps)``. ``eps = 1e-5`` guards the
    denominators as in the official code. A set with no positives has F1 = G-mean = 0
    (loss 1) and zero gradient for those metrics: such batches teach nothing.

    Args:
      probs: (..., N) probabilities (sigmoid outputs). labels: (..., N) 0/1 labels.
      metric: metric name or callable. scale: amplification L > 0 (default 73).
      beta: F-beta's beta. eps: denominator guard >= 0.
      where: optional (..., N) mask of the examples that count.

    Returns:
      (...) one loss per set (a scalar for a single batch), in ``probs``' dtype.

    >>> p, y = jnp.array([0.9, 0.2, 0.6, 0.4]), jnp.array([1, 0, 1, 1])
    >>> [round(float(anyloss(p, y, metric=m)), 4) for m in ("f1", "accuracy", "g_mean")]
    [0.2, 0.25, 0.1835]
    """
    eps = _check_scalar("eps", eps, low=0.0)
    fn = _metric_fn(metric, beta)
    probs = _float_array("probs", probs, min_ndim=1)
    cm = soft_confusion(probs, labels, scale=scale, where=where)
    return (1.0 - fn(cm, eps=eps)).astype(probs.dtype)


def anyloss_from_logits(
    logits: jax.Array,
    labels: jax.Array,
    *,
    metric: str | Callable[..., jax.Array] = "f1",
    scale: float = 73.0,
    beta: float = 1.0,
    eps: float = 1e-5,
    where: jax.Array | None = None,
) -> jax.Array:
    """``anyloss(sigmoid(logits), labels, ...)``: one value per set (see ``anyloss``).

    >>> z, y = jnp.array([3.0, -3.0]), jnp.array([1.0, 0.0])
    >>> round(float(anyloss_from_logits(z, y, metric="balanced_accuracy")), 4)
    0.0
    """
    logits = _float_array("logits", logits, min_ndim=1)
    probs = jax.nn.sigmoid(logits.astype(_compute_dtype(logits.dtype)))
    out = anyloss(probs, labels, metric=metric, scale=scale, beta=beta, eps=eps, where=where)
    return out.astype(logits.dtype)


def multiclass_soft_confusion(
    probs: jax.Array,
    labels: jax.Array,
    *,
    scale: float = 73.0,
    where: jax.Array | None = None,
) -> ConfusionMatrix:
    """One-vs-rest soft confusion matrices of a multi-class set, one per class.

    Our extension of AnyLoss (the paper treats binary classification): class ``k`` is the
    binary problem "label == k" with probability ``probs[..., k]``.

    Args:
      probs: (..., N, C) class probabilities (softmax outputs).
      labels: (..., N) integer classes.
      scale, where: as in ``soft_confusion`` (``where`` of shape (..., N)).

    Returns:
      ``ConfusionMatrix`` with entries of shape (..., C).

    >>> p = jnp.array([[0.9, 0.1], [0.2, 0.8]])
    >>> print(multiclass_soft_confusion(p, jnp.array([0, 1])).tp.round(3))
    [1. 1.]
    """
    probs = _float_array("probs", probs, min_ndim=2)
    labels = _class_labels("labels", labels, probs.shape)
    one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=_compute_dtype(probs.dtype))
    mask = None
    if where is not None:
        where = jnp.asarray(where)
        if where.shape != probs.shape[:-1]:
            raise ValueError(f"where: expected shape {probs.shape[:-1]}, got {where.shape}")
        mask = jnp.broadcast_to(where[..., None], probs.shape)
    swap = lambda a: None if a is None else jnp.swapaxes(a, -1, -2)
    return soft_confusion(swap(probs), swap(one_hot), scale=scale, where=swap(mask))


def multiclass_anyloss(
    probs: jax.Array,
    labels: jax.Array,
    *,
    metric: str | Callable[..., jax.Array] = "f1",
    scale: float = 73.0,
    beta: float = 1.0,
    eps: float = 1e-5,
    where: jax.Array | None = None,
) -> jax.Array:
    """Macro-averaged one-vs-rest AnyLoss ``1 - mean_k f(cm_k)``: ONE value per set.

    Our extension of Han et al. (KDD 2024) to C classes (``multiclass_soft_confusion``);
    with ``metric="f1"`` it is one minus a soft macro-F1. Note that one-vs-rest "accuracy"
    is the per-class binary accuracy, not the multi-class accuracy.

    Args:
      probs: (..., N, C) probabilities. labels: (..., N) integers. Other arguments as in
        ``anyloss``.

    Returns:
      (...) one loss per set, in ``probs``' dtype.

    >>> p = jnp.array([[0.9, 0.1], [0.2, 0.8]])
    >>> round(float(multiclass_anyloss(p, jnp.array([0, 1]))), 3)
    0.0
    """
    eps = _check_scalar("eps", eps, low=0.0)
    fn = _metric_fn(metric, beta)
    probs = _float_array("probs", probs, min_ndim=2)
    cm = multiclass_soft_confusion(probs, labels, scale=scale, where=where)
    return (1.0 - jnp.mean(fn(cm, eps=eps), axis=-1)).astype(probs.dtype)


def multiclass_anyloss_from_logits(
    logits: jax.Array,
    labels: jax.Array,
    *,
    metric: str | Callable[..., jax.Array] = "f1",
    scale: float = 73.0,
    beta: float = 1.0,
    eps: float = 1e-5,
    where: jax.Array | None = None,
) -> jax.Array:
    """``multiclass_anyloss(softmax(logits), labels, ...)``: one value per set.

    >>> z = jnp.array([[4.0, -4.0], [-4.0, 4.0]])
    >>> round(float(multiclass_anyloss_from_logits(z, jnp.array([0, 1]))), 3)
    0.0
    """
    logits = _float_array("logits", logits, min_ndim=2)
    probs = jax.nn.softmax(logits.astype(_compute_dtype(logits.dtype)), axis=-1)
    out = multiclass_anyloss(
        probs, labels, metric=metric, scale=scale, beta=beta, eps=eps, where=where
    )
    return out.astype(logits.dtype)
