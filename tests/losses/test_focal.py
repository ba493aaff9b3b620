"""Tests of jaxmtl.losses.focal: focal losses and the DatasetEquity sample weight."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxmtl.losses import classification as cl
from jaxmtl.losses import focal
from tests.losses.jitted import Jit

J, G = Jit(focal), Jit(focal, grad=True)


# ----------------------------------------------------------------- NumPy references (float64)


def _sigmoid_focal_reference(z, y, gamma, alpha=None):
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    loss = (1 - p_t) ** gamma * ce
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


def _softmax_focal_reference(h, y, gamma, alpha=None):
    h = np.asarray(h, np.float64)
    p = np.exp(h - h.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_y = p[np.arange(len(y)), y]
    loss = -((1 - p_y) ** gamma) * np.log(p_y)
    return loss if alpha is None else np.asarray(alpha)[y] * loss


# ----------------------------------------------------------------- focal losses


def test_focal_hand_values():
    # Sigmoid, z = 0, y = 1, gamma = 2: p_t = 0.5, (1 - 0.5)^2 * log 2 = 0.25 * 0.693147
    # = 0.173287; with alpha = 0.25: 0.043322. z = 0, y = 0, alpha = 0.25: 0.75 * 0.173287
    # = 0.129965.
    z = jnp.zeros(3)
    y = jnp.array([1.0, 1.0, 0.0])
    out = J.sigmoid_focal_loss(z, y, gamma=2.0)
    np.testing.assert_allclose(np.asarray(out), 0.173287, atol=1e-6)
    out = J.sigmoid_focal_loss(z, y, gamma=2.0, alpha=0.25)
    np.testing.assert_allclose(np.asarray(out), [0.043322, 0.043322, 0.129965], atol=1e-6)
    # Softmax, h = [2, 0], y = 1: p_y = 1 / (1 + e^2) = 0.119203, -log p_y = 2.126928,
    # (1 - p_y)^2 = 0.775803, loss = 0.775803 * 2.126928 = 1.650078.
    out = J.softmax_focal_loss(jnp.array([[2.0, 0.0]]), jnp.array([1]), gamma=2.0)
    assert float(out[0]) == pytest.approx(1.650078, abs=1e-5)


def test_focal_matches_numpy_reference(x64):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 5)) * 3
    y = rng.uniform(size=(4, 5))  # soft labels too
    for gamma, alpha in ((0.0, None), (0.5, None), (2.0, 0.25), (3.0, 0.9)):
        got = J.sigmoid_focal_loss(jnp.asarray(z), jnp.asarray(y), gamma=gamma, alpha=alpha)
        want = _sigmoid_focal_reference(z, y, gamma, alpha)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)
    h = rng.normal(size=(6, 4)) * 2
    c = rng.integers(0, 4, size=6)
    alpha = np.array([0.1, 0.2, 0.3, 0.4])
    for gamma, a in ((0.0, None), (1.5, None), (2.0, alpha)):
        got = J.softmax_focal_loss(
            jnp.asarray(h), jnp.asarray(c), gamma=gamma, alpha=None if a is None else jnp.asarray(a)
        )
        np.testing.assert_allclose(np.asarray(got), _softmax_focal_reference(h, c, gamma, a), 1e-10)


def test_gamma_zero_is_cross_entropy(x64):
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(5, 3)))
    c = jnp.asarray(rng.integers(0, 3, size=5))
    ce = jax.jit(cl.cross_entropy)(h, c)
    np.testing.assert_allclose(J.softmax_focal_loss(h, c, gamma=0.0), ce, rtol=1e-12)


def test_softmax_focal_keeps_precision_when_confident():
    # p_y = 1 - e^-20: 1 - p_y ~ 2.06e-9 is lost as 1 - p_y in float32, kept as sum_{k!=y} p_k.
    h = jnp.array([[20.0, 0.0]], jnp.float32)
    got = float(J.softmax_focal_loss(h, jnp.array([0]), gamma=2.0)[0])
    want = float(_softmax_focal_reference(np.array([[20.0, 0.0]]), np.array([0]), 2.0)[0])
    assert want > 0 and got == pytest.approx(want, rel=1e-4)


def test_focal_gradients(x64):
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=6))
    y = jnp.asarray(rng.uniform(size=6))
    h = jnp.asarray(rng.normal(size=(3, 4)))
    c = jnp.asarray(rng.integers(0, 4, size=3))
    sig = jax.jit(lambda v, g: focal.sigmoid_focal_loss(v, y, gamma=g))
    soft = jax.jit(lambda v, g: focal.softmax_focal_loss(v, c, gamma=g))
    for gamma in (0.5, 2.0):
        check_grads(lambda v, g=gamma: sig(v, g), (z,), order=1)
        check_grads(lambda v, g=gamma: soft(v, g), (h,), order=1)


def test_focal_extreme_logits_and_bfloat16():
    z = jnp.array([1e4, -1e4, 1e4, -1e4, 0.5])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0])
    h = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]])
    c = jnp.array([0, 0])
    for dtype in (jnp.float32, jnp.bfloat16):
        for gamma in (0.5, 2.0):
            outs = [
                J.sigmoid_focal_loss(z.astype(dtype), y, gamma=gamma),
                G.sigmoid_focal_loss(z.astype(dtype), y, gamma=gamma),
                J.softmax_focal_loss(h.astype(dtype), c, gamma=gamma),
                G.softmax_focal_loss(h.astype(dtype), c, gamma=gamma),
            ]
            for out in outs:
                assert out.dtype == dtype
                assert np.all(np.isfinite(np.asarray(out, np.float32))), (dtype, gamma)
    # Wrong by 2e4 with gamma = 2: (1 - p_t)^2 = 1, loss = 2e4 (second softmax row).
    assert float(J.softmax_focal_loss(h, c, gamma=2.0)[1]) == pytest.approx(2e4, rel=1e-6)


def test_focal_bad_input():
    with pytest.raises(ValueError, match="gamma: expected a value in"):
        focal.sigmoid_focal_loss(jnp.zeros(2), jnp.zeros(2), gamma=-1.0)
    with pytest.raises(ValueError, match="alpha: expected a value in"):
        focal.sigmoid_focal_loss(jnp.zeros(2), jnp.zeros(2), alpha=1.5)
    with pytest.raises(ValueError, match="labels: expected the shape of logits"):
        focal.sigmoid_focal_loss(jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"alpha: expected shape \(3,\)"):
        focal.softmax_focal_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), alpha=jnp.ones(2))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        focal.softmax_focal_loss(jnp.zeros((2, 3)), jnp.array([0, 1, 2]))


# ----------------------------------------------------------------- DatasetEquity weight


def test_dequity_weight_values():
    # eta 1, gamma 5: w(1) = 1/2, w(0) = 2/2 = 1, w(0.5) = (1 + 1/32) / 2 = 0.515625.
    p = jnp.array([1.0, 0.0, 0.5])
    np.testing.assert_allclose(np.asarray(J.dequity_weight(p)), [0.5, 1.0, 0.515625], rtol=1e-6)
    # eta 0.5, gamma 2, p 0.5: (0.5 + 0.25) / 1.5 = 0.5.
    w = J.dequity_weight(jnp.array([0.5]), eta=0.5, gamma=2.0)
    assert float(w[0]) == pytest.approx(0.5)
    grid = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(np.asarray(J.dequity_weight(grid, gamma=0.0)), 1.0)
    np.testing.assert_allclose(
        np.asarray(J.dequity_weight(grid, eta=0.0, gamma=3.0)), (1 - np.asarray(grid)) ** 3, 1e-6
    )


@given(st.floats(0.0, 5.0), st.floats(0.0, 8.0))
def test_dequity_weight_monotone_and_bounded(eta, gamma):
    grid = jnp.linspace(0.0, 1.0, 21)
    w = np.asarray(J.dequity_weight(grid, eta=eta, gamma=gamma), np.float64)
    assert np.all(np.diff(w) <= 1e-6)
    assert np.all(w >= eta / (eta + 1) - 1e-6) and np.all(w <= 1 + 1e-6)


def test_dequity_weighted_loss_gradient_is_weighted(x64):
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(5, 3)))
    c = jnp.asarray(rng.integers(0, 3, size=5))
    p = jnp.asarray(rng.uniform(size=5))
    weighted = lambda v: focal.dequity_weighted_loss(cl.cross_entropy(v, c), p, eta=0.3)
    plain = lambda v: cl.cross_entropy(v, c)
    jac_w = jax.jit(jax.jacrev(lambda v: weighted(v)))(h)  # (5, 5, 3)
    jac = jax.jit(jax.jacrev(plain))(h)
    w = np.asarray(J.dequity_weight(p, eta=0.3))
    np.testing.assert_allclose(np.asarray(jac_w), w[:, None, None] * np.asarray(jac), 1e-12)
    # Per task in MTL: (B, K) losses with (B, 1) likelihoods broadcast.
    losses = jnp.ones((5, 2))
    out = J.dequity_weighted_loss(losses, p[:, None])
    np.testing.assert_allclose(np.asarray(out), np.repeat(J.dequity_weight(p)[:, None], 2, 1))


def test_dequity_bad_input():
    with pytest.raises(ValueError, match=r"likelihood: expected values in \[0, 1\]"):
        focal.dequity_weight(jnp.array([0.5, 1.2]))
    with pytest.raises(ValueError, match="eta: expected a value in"):
        focal.dequity_weight(jnp.array([0.5]), eta=-0.1)
    with pytest.raises(ValueError, match="gamma: expected a value in"):
        focal.dequity_weight(jnp.array([0.5]), gamma=math.nan)
    with pytest.raises(ValueError, match="likelihood: expected a shape broadcastable"):
        focal.dequity_weighted_loss(jnp.ones(4), jnp.ones(3) * 0.5)
