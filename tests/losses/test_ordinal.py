"""Tests of jaxmtl.losses.ordinal: CORAL logits, ordinal softmax, ordinal cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from jaxmtl.losses import ordinal
from tests.losses.jitted import Jit

J, G = Jit(ordinal), Jit(ordinal, grad=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _oce_reference(cum, y, w=None):
    """Loop over thresholds, float64."""
    cum = np.asarray(cum, np.float64)
    w = np.ones(cum.shape[-1]) if w is None else np.asarray(w)
    out = np.zeros(cum.shape[0])
    for i in range(cum.shape[0]):
        for k in range(cum.shape[1]):
            s = _sigmoid(cum[i, k])
            out[i] -= w[k] * (np.log(s) if y[i] > k else np.log(1 - s))
    return out


def test_hand_values():
    # cum = [2, 0, -2]: sigmoid = [0.880797, 0.5, 0.119203];
    # P = [1 - 0.880797, 0.880797 - 0.5, 0.5 - 0.119203, 0.119203]
    #   = [0.119203, 0.380797, 0.380797, 0.119203].
    cum = jnp.array([[2.0, 0.0, -2.0]])
    np.testing.assert_allclose(
        np.asarray(J.ordinal_softmax(cum))[0], [0.119203, 0.380797, 0.380797, 0.119203], atol=1e-6
    )
    # y = 2: -(log sigmoid(2) + log sigmoid(0) + log(1 - sigmoid(-2)))
    #      = 2 * 0.126928 + 0.693147 = 0.947003.
    assert float(J.ordinal_cross_entropy(cum, jnp.array([2]))[0]) == pytest.approx(0.947003, 1e-6)
    # E[y] = 0.880797 + 0.5 + 0.119203 = 1.5; CORAL rule: one logit > 0 -> class 1.
    assert float(J.ordinal_expected_value(cum)[0]) == pytest.approx(1.5)
    assert int(J.ordinal_predict(cum)[0]) == 1
    # CORAL head: s + b_k.
    out = J.coral_logits(jnp.array([0.5, -1.0]), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(out), [[1.5, 0.5], [0.0, -1.0]])
    assert J.ordinal_levels(jnp.array([0, 3, 1]), 4).tolist() == [
        [0, 0, 0],
        [1, 1, 1],
        [1, 0, 0],
    ]


@given(hnp.arrays(np.float64, (5,), elements=st.floats(-30.0, 30.0)))
def test_rows_sum_to_one_and_match_naive_differences(raw):
    with jax.enable_x64(True):
        monotone = -np.sort(-raw)  # non-increasing thresholds: a valid distribution
        probs = np.asarray(J.ordinal_softmax(jnp.asarray(np.stack([monotone, raw]))))
        value = float(J.ordinal_expected_value(jnp.asarray(monotone[None]))[0])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    assert np.all(probs[0] >= 0)
    cum = np.concatenate([[1.0], _sigmoid(raw), [0.0]])
    np.testing.assert_allclose(probs[1], cum[:-1] - cum[1:], atol=1e-12)
    assert value == pytest.approx(float(np.dot(np.arange(6), probs[0])), rel=1e-9, abs=1e-12)


def test_clip_option_gives_a_distribution():
    cum = jnp.array([[-1.0, 1.0, 0.0]])  # increasing: raw P(y = 1) < 0
    raw = np.asarray(J.ordinal_softmax(cum))
    assert raw.min() < 0
    clipped = np.asarray(J.ordinal_softmax(cum, clip=True))
    assert clipped.min() >= 0 and clipped.sum() == pytest.approx(1.0, rel=1e-6)


def test_oce_matches_reference_and_k2_is_bce(x64):
    rng = np.random.default_rng(0)
    cum = rng.normal(size=(6, 4)) * 3
    y = rng.integers(0, 5, size=6)
    w = rng.uniform(0.5, 2.0, size=4)
    got = J.ordinal_cross_entropy(jnp.asarray(cum), jnp.asarray(y), importance=jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got), _oce_reference(cum, y, w), rtol=1e-12)
    z = rng.normal(size=(6, 1)) * 3
    b = rng.integers(0, 2, size=6)
    bce = -(b * np.log(_sigmoid(z[:, 0])) + (1 - b) * np.log(1 - _sigmoid(z[:, 0])))
    np.testing.assert_allclose(
        np.asarray(J.ordinal_cross_entropy(jnp.asarray(z), jnp.asarray(b))), bce, rtol=1e-12
    )


def test_gradients(x64):
    rng = np.random.default_rng(1)
    cum = jnp.asarray(rng.normal(size=(3, 4)))
    y = jnp.asarray(rng.integers(0, 5, size=3))
    check_grads(jax.jit(lambda v: ordinal.ordinal_cross_entropy(v, y)), (cum,), order=1)
    check_grads(jax.jit(lambda v: ordinal.ordinal_softmax(v)), (cum,), order=1)


def test_extreme_logits_and_bfloat16():
    cum = jnp.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4]])
    y = jnp.array([0, 3, 0])
    for dtype in (jnp.float32, jnp.bfloat16):
        x = cum.astype(dtype)
        for out in (
            J.ordinal_cross_entropy(x, y),
            G.ordinal_cross_entropy(x, y),
            J.ordinal_softmax(x),
            G.ordinal_softmax(x),
        ):
            assert out.dtype == dtype
            assert np.all(np.isfinite(np.asarray(out, np.float32)))
    # Row 0, y = 0: -(log(1 - sigmoid(1e4)) + log(1 - sigmoid(0)) + log(1 - sigmoid(-1e4)))
    #   = 1e4 + log 2 + 0.
    assert float(J.ordinal_cross_entropy(cum, y)[0]) == pytest.approx(1e4 + np.log(2), rel=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 4\)"):
        ordinal.ordinal_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 4]))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        ordinal.ordinal_cross_entropy(jnp.zeros((2, 3)), jnp.array([0]))
    with pytest.raises(ValueError, match=r"importance: expected shape \(3,\)"):
        ordinal.ordinal_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1]), importance=jnp.ones(2))
    with pytest.raises(ValueError, match="cum_logits: expected at least one threshold"):
        ordinal.ordinal_softmax(jnp.zeros((2, 0)))
    with pytest.raises(ValueError, match="biases: expected shape"):
        ordinal.coral_logits(jnp.zeros(2), jnp.zeros((2, 2)))
    with pytest.raises(TypeError, match="biases: expected latent's dtype"):
        ordinal.coral_logits(jnp.zeros(2), jnp.zeros(2, jnp.bfloat16))
    with pytest.raises(ValueError, match="num_classes: expected an int >= 2"):
        ordinal.ordinal_levels(jnp.array([0]), 1)


def _softmax_reference(cum):
    """Naive differences of sigmoids in float64 (exact enough for |logits| <= 1e4)."""
    from scipy.special import expit

    cum = np.asarray(cum, np.float64)
    s = np.concatenate(
        [np.ones((*cum.shape[:-1], 1)), expit(cum), np.zeros((*cum.shape[:-1], 1))], -1
    )
    return s[..., :-1] - s[..., 1:]


# Non-monotone cumulative logits with gaps over 88 (exp overflows in float32), and 1e4.
_NON_MONOTONE = [
    [1.0, 100.0, 2.0],
    [-100.0, 100.0, -100.0],
    [-1e4, 1e4, 0.0],
    [0.0, 90.0, 90.0],
    [5.0, 5.0, 5.0],
]


def test_non_monotone_large_gaps_are_finite_and_exact():
    cum = jnp.asarray(_NON_MONOTONE, jnp.float32)
    expected = _softmax_reference(_NON_MONOTONE)
    raw = np.asarray(J.ordinal_softmax(cum), np.float64)
    assert np.all(np.isfinite(raw)), raw
    np.testing.assert_allclose(raw, expected, atol=1e-6)
    np.testing.assert_allclose(raw.sum(-1), 1.0, atol=1e-6)
    clipped = np.asarray(J.ordinal_softmax(cum, clip=True), np.float64)
    assert np.all(np.isfinite(clipped)), clipped
    positive = np.maximum(expected, 0.0)
    np.testing.assert_allclose(clipped, positive / positive.sum(-1, keepdims=True), atol=1e-6)
    for grads in (G.ordinal_softmax(cum), G.ordinal_softmax(cum, clip=True)):
        assert np.all(np.isfinite(np.asarray(grads))), grads
    for dtype in (jnp.float16, jnp.bfloat16):
        assert np.all(np.isfinite(np.asarray(J.ordinal_softmax(cum[:2].astype(dtype)), float)))


def test_non_monotone_and_tied_gradients(x64):
    # Ties (CORAL's initial biases are all 0) and a gap of 99 both ways; float64 check_grads.
    for row in ([1.0, 100.0, 2.0], [0.3, 0.3, 0.3], [2.0, -3.0, 40.0]):
        cum = jnp.asarray([row], jnp.float64)
        for clip in (False, True):
            check_grads(jax.jit(lambda v, c=clip: ordinal.ordinal_softmax(v, clip=c)), (cum,), 1)
    # At a tie, d/dl_0 of P(y = 1) = sigmoid(l_0) - sigmoid(l_1) is sigmoid'(l_0), not 0.
    grad = jax.grad(lambda v: ordinal.ordinal_softmax(v)[1])(jnp.zeros(3, jnp.float64))
    np.testing.assert_allclose(np.asarray(grad), [0.25, -0.25, 0.0], atol=1e-12)
