"""Tests of jaxmtl.losses.anyloss: amplifier, soft confusion matrix, metric losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from jaxmtl.losses import anyloss as al
from tests.losses.jitted import Jit

J, G = Jit(al), Jit(al, grad=True)

METRIC_NAMES = ("accuracy", "f1", "balanced_accuracy", "g_mean")


# ----------------------------------------------------------------- NumPy reference (float64)


def _anyloss_reference(p, y, metric, scale=73.0, beta=1.0, eps=1e-5):
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    a = 1.0 / (1.0 + np.exp(-scale * (p - 0.5)))
    tp = np.sum(y * a)
    fn = np.sum(y * (1 - a))
    fp = np.sum((1 - y) * a)
    tn = np.sum((1 - y) * (1 - a))
    if metric == "accuracy":
        value = (tp + tn) / (tp + tn + fp + fn + eps)
    elif metric in ("f1", "f_beta"):
        b2 = beta**2 if metric == "f_beta" else 1.0
        value = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp + eps)
    elif metric == "balanced_accuracy":
        value = 0.5 * (tp / (tp + fn + eps) + tn / (tn + fp + eps))
    else:
        value = math.sqrt(tp / (tp + fn + eps) * tn / (tn + fp + eps))
    return 1.0 - value


# ----------------------------------------------------------------- values


def test_hand_values():
    # p = [0.9, 0.2, 0.6, 0.4], y = [1, 0, 1, 1], L = 73: A(p) = sigmoid(73 (p - 0.5))
    #   = [sigmoid(29.2), sigmoid(-21.9), sigmoid(7.3), sigmoid(-7.3)]
    #   = [1.0, 3.1e-10, 0.999325, 6.75e-4];
    # TP = 1 + 0.999325 + 0.000675 = 2, FN = 3 - TP = 1, FP = 3.1e-10, TN = 1 - FP = 1.
    # 1 - F1 = 1 - 4/5 = 0.2; 1 - acc = 1 - 3/4 = 0.25; 1 - BAcc = 1 - (2/3 + 1)/2 = 0.166667;
    # 1 - G-mean = 1 - sqrt(2/3) = 0.183503.
    p, y = jnp.array([0.9, 0.2, 0.6, 0.4]), jnp.array([1, 0, 1, 1])
    np.testing.assert_allclose(
        np.asarray(J.amplify(p)), [1.0, 3.1e-10, 0.999325, 6.75e-4], rtol=2e-3, atol=1e-7
    )
    cm = J.soft_confusion(p, y)
    np.testing.assert_allclose([float(v) for v in cm], [2.0, 1.0, 0.0, 1.0], atol=1e-5)
    want = {"f1": 0.2, "accuracy": 0.25, "balanced_accuracy": 0.166667, "g_mean": 0.183503}
    for metric, value in want.items():
        assert float(J.anyloss(p, y, metric=metric)) == pytest.approx(value, abs=2e-5), metric


def test_matches_numpy_reference(x64):
    rng = np.random.default_rng(0)
    p = rng.uniform(0.3, 0.7, size=20)
    y = (rng.uniform(size=20) < 0.4).astype(np.float64)
    for metric in (*METRIC_NAMES, "f_beta"):
        got = float(J.anyloss(jnp.asarray(p), jnp.asarray(y), metric=metric, scale=9.0, beta=2.0))
        want = _anyloss_reference(p, y, metric, scale=9.0, beta=2.0)
        assert got == pytest.approx(want, rel=1e-12), metric


def test_amplifier_properties(x64):
    for scale in (1.0, 5.0, 73.0, 500.0):
        assert float(J.amplify(jnp.array(0.5), scale=scale)) == 0.5
    p = jnp.linspace(0.05, 0.95, 7)
    a = J.amplify(p, scale=7.0)
    np.testing.assert_allclose(np.asarray(G.amplify(p, scale=7.0)), 7.0 * a * (1 - a), rtol=1e-12)


def test_large_scale_gives_hard_confusion_matrix():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, size=50)
    p = np.where(np.abs(p - 0.5) < 0.05, p + 0.2, p).clip(0, 1).astype(np.float32)
    y = (rng.uniform(size=50) < 0.5).astype(np.float32)
    hard = p > 0.5
    want = [
        np.sum(hard & (y == 1)),
        np.sum(~hard & (y == 1)),
        np.sum(hard & (y == 0)),
        np.sum(~hard & (y == 0)),
    ]
    cm = J.soft_confusion(jnp.asarray(p), jnp.asarray(y), scale=5000.0)
    np.testing.assert_allclose([float(v) for v in cm], want, atol=1e-4)


def test_f_beta_one_is_f1_and_tp_plus_fn_is_positives():
    rng = np.random.default_rng(2)
    p = jnp.asarray(rng.uniform(size=16), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=16))
    f1 = J.anyloss(p, y, metric="f1", scale=11.0)
    fb = J.anyloss(p, y, metric="f_beta", beta=1.0, scale=11.0)
    assert float(f1) == pytest.approx(float(fb), rel=1e-6)
    cm = J.soft_confusion(p, y, scale=11.0)
    assert float(cm.tp + cm.fn) == float(jnp.sum(y))
    assert float(cm.fp + cm.tn) == float(16 - jnp.sum(y))


@given(
    hnp.arrays(np.float64, (12,), elements=st.floats(0.0, 1.0)),
    hnp.arrays(np.int32, (12,), elements=st.integers(0, 1)),
    st.permutations(list(range(12))),
)
def test_permutation_and_duplication_invariance(p, y, perm):
    perm = np.asarray(perm)
    with jax.enable_x64(True):
        for metric in METRIC_NAMES:
            base = float(J.anyloss(jnp.asarray(p), jnp.asarray(y), metric=metric, scale=13.0))
            permuted = float(
                J.anyloss(jnp.asarray(p[perm]), jnp.asarray(y[perm]), metric=metric, scale=13.0)
            )
            assert permuted == pytest.approx(base, rel=1e-9, abs=1e-12)
        # Duplicating the batch doubles every entry: ratios are unchanged (eps = 0).
        twice = J.anyloss(jnp.asarray(np.tile(p, 2)), jnp.asarray(np.tile(y, 2)), eps=0.0)
        once = J.anyloss(jnp.asarray(p), jnp.asarray(y), eps=0.0)
        if np.isfinite(float(once)):
            assert float(twice) == pytest.approx(float(once), rel=1e-9, abs=1e-12)


def test_no_positives_is_finite_with_zero_metric():
    p = jnp.array([0.2, 0.7, 0.4], jnp.float32)
    y = jnp.zeros(3, jnp.int32)
    for metric in METRIC_NAMES:
        loss = J.anyloss(p, y, metric=metric)
        grad = G.anyloss(p, y, metric=metric)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad))), metric
    assert float(J.anyloss(p, y, metric="f1")) == pytest.approx(1.0)
    assert float(J.anyloss(p, y, metric="g_mean")) == pytest.approx(1.0)


def test_gradients(x64):
    rng = np.random.default_rng(3)
    p = jnp.asarray(rng.uniform(0.35, 0.65, size=8))
    y = jnp.asarray([1, 0, 1, 1, 0, 0, 1, 0])
    loss = jax.jit(
        lambda v, m: jnp.stack([al.anyloss(v, y, metric=name, scale=6.0) for name in m]),
        static_argnums=1,
    )
    check_grads(lambda v: loss(v, METRIC_NAMES), (p,), order=1)


def test_where_mask_equals_subset():
    rng = np.random.default_rng(4)
    p = jnp.asarray(rng.uniform(size=10), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=10))
    mask = jnp.asarray(rng.uniform(size=10) < 0.6)
    keep = np.flatnonzero(np.asarray(mask))
    for metric in METRIC_NAMES:
        masked = J.anyloss(p, y, metric=metric, scale=9.0, where=mask)
        subset = _anyloss_reference(np.asarray(p)[keep], np.asarray(y)[keep], metric, 9.0)
        assert float(masked) == pytest.approx(subset, rel=1e-5, abs=1e-6)


def test_leading_task_axis_gives_one_loss_per_set():
    rng = np.random.default_rng(5)
    p = jnp.asarray(rng.uniform(size=(3, 10)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=(3, 10)))
    out = J.anyloss(p, y, metric="balanced_accuracy")
    assert out.shape == (3,)
    for k in range(3):
        want = _anyloss_reference(np.asarray(p[k]), np.asarray(y[k]), "balanced_accuracy")
        assert float(out[k]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_from_logits_extreme_and_bfloat16():
    z = jnp.array([1e4, -1e4, 3.0, -2.0, 1e4])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 0.0])
    for dtype in (jnp.float32, jnp.bfloat16):
        out = J.anyloss_from_logits(z.astype(dtype), y, metric="f1")
        grad = G.anyloss_from_logits(z.astype(dtype), y, metric="f1")
        assert out.dtype == dtype and out.shape == ()
        assert np.isfinite(float(out)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
    # sigmoid(logits) are [1, 0, 0.953, 0.119, 1]: TP = 1, FN = 1, FP = 2, F1 = 2/5.
    assert float(J.anyloss_from_logits(z, y, metric="f1")) == pytest.approx(0.6, abs=1e-4)


def test_multiclass_is_macro_average_of_one_vs_rest():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(12, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=12)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for metric in METRIC_NAMES:
        got = J.multiclass_anyloss_from_logits(jnp.asarray(logits), jnp.asarray(y), metric=metric)
        per_class = [
            _anyloss_reference(probs[:, k], (y == k).astype(float), metric) for k in range(3)
        ]
        assert float(got) == pytest.approx(np.mean(per_class), rel=1e-4, abs=1e-5), metric
    cm = J.multiclass_soft_confusion(jnp.asarray(probs), jnp.asarray(y))
    assert cm.tp.shape == (3,)
    np.testing.assert_allclose(np.asarray(cm.tp + cm.fn), np.bincount(y, minlength=3))


def test_custom_metric_callable():
    p, y = jnp.array([0.9, 0.1]), jnp.array([1, 0])
    recall = lambda cm, eps: cm.tp / (cm.tp + cm.fn + eps)
    assert float(al.anyloss(p, y, metric=recall)) == pytest.approx(0.0, abs=1e-4)


def test_bad_input():
    p, y = jnp.array([0.2, 0.8]), jnp.array([0, 1])
    with pytest.raises(ValueError, match="scale: expected a value in"):
        al.anyloss(p, y, scale=0.0)
    with pytest.raises(ValueError, match="metric: expected one of"):
        al.anyloss(p, y, metric="precision_at_k")
    with pytest.raises(ValueError, match="labels: expected the shape of probs"):
        al.anyloss(p, jnp.array([0, 1, 1]))
    with pytest.raises(ValueError, match="beta: expected a value in"):
        al.anyloss(p, y, metric="f_beta", beta=-1.0)
    with pytest.raises(ValueError, match="where: expected shape"):
        al.anyloss(p, y, where=jnp.array([True]))
    with pytest.raises(TypeError, match="probs: expected a floating-point"):
        al.anyloss(jnp.array([0, 1]), y)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 2\)"):
        al.multiclass_anyloss(jnp.full((2, 2), 0.5), jnp.array([0, 2]))
