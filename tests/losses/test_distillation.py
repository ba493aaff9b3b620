"""Tests of jaxmtl.losses.distillation: KD, BinaryKL, BinaryKL-Norm, DHKD objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from jaxmtl.losses import classification as cl
from jaxmtl.losses import distillation as kd
from tests.losses.jitted import Jit

J, G = Jit(kd), Jit(kd, grad=True)
JC, GC = Jit(cl), Jit(cl, grad=True)


def _binary_kl_reference(s, t, T):
    """Sum over classes of KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))), float64, times T^2."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(t, np.float64) / T))
    q = 1.0 / (1.0 + np.exp(-np.asarray(s, np.float64) / T))
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return T**2 * kl.sum(-1)


def _kd_reference(s, t, T):
    def log_softmax(x):
        x = np.asarray(x, np.float64) / T
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(t), log_softmax(s)
    return T**2 * (np.exp(lp) * (lp - lq)).sum(-1)


def test_binary_kl_norm_hand_values():
    # z - zt = [2, 0], T = 1: log cosh(1) + log cosh(0) = 0.433781 + 0.
    # T = 2: 4 * (log cosh(0.5) + 0) = 4 * 0.120115 = 0.480458.
    z, zt = jnp.array([[2.0, 0.0]]), jnp.zeros((1, 2))
    assert float(J.binary_kl_norm(z, zt, temperature=1.0)[0]) == pytest.approx(0.433781, 1e-6)
    assert float(J.binary_kl_norm(z, zt, temperature=2.0)[0]) == pytest.approx(0.480458, 1e-6)


def test_binary_kl_norm_is_the_kl_to_a_fair_coin(x64):
    # KL(Bern(1/2) || Bern(q)), q = sigmoid((z - zt) / T), summed over classes, times T^2.
    rng = np.random.default_rng(0)
    z, zt = rng.normal(size=(4, 5)) * 3, rng.normal(size=(4, 5)) * 3
    for T in (1.0, 2.0, 4.0):
        q = 1.0 / (1.0 + np.exp(-(z - zt) / T))
        want = T**2 * (0.5 * np.log(0.5 / q) + 0.5 * np.log(0.5 / (1 - q))).sum(-1)
        got = J.binary_kl_norm(jnp.asarray(z), jnp.asarray(zt), temperature=T)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)


def test_binary_kl_and_kd_match_numpy_reference(x64):
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 6)) * 4, rng.normal(size=(4, 6)) * 4
    for T in (1.0, 2.0, 4.0):
        got = J.binary_kl(jnp.asarray(s), jnp.asarray(t), temperature=T)
        np.testing.assert_allclose(np.asarray(got), _binary_kl_reference(s, t, T), rtol=1e-10)
        got = J.kd_kl(jnp.asarray(s), jnp.asarray(t), temperature=T)
        np.testing.assert_allclose(np.asarray(got), _kd_reference(s, t, T), rtol=1e-10)


@given(
    hnp.arrays(np.float64, (2, 4), elements=st.floats(-20, 20)),
    hnp.arrays(np.float64, (2, 4), elements=st.floats(-20, 20)),
    st.floats(-50, 50),
)
def test_zero_iff_equal_nonnegative_and_shift_behaviour(s, t, shift):
    with jax.enable_x64(True):
        s_, t_ = jnp.asarray(s), jnp.asarray(t)
        values = {name: np.asarray(getattr(J, name)(s_, t_)) for name in ("binary_kl", "kd_kl")}
        values["binary_kl_norm"] = np.asarray(J.binary_kl_norm(s_, t_))
        same = [np.asarray(getattr(J, n)(t_, t_)) for n in ("binary_kl", "binary_kl_norm", "kd_kl")]
        kd_shifted = np.asarray(J.kd_kl(s_ + shift, t_))
    for v in values.values():
        assert np.all(v >= -1e-12)
    for v in same:
        np.testing.assert_allclose(v, 0.0, atol=1e-12)
    # KD sees only softmax probabilities: invariant to a per-example shift of the student.
    np.testing.assert_allclose(kd_shifted, values["kd_kl"], rtol=1e-9, atol=1e-9)


def test_binary_losses_see_absolute_logits():
    z = jnp.array([[1.0, 2.0, 3.0]])
    assert float(J.kd_kl(z + 5.0, z)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(J.binary_kl(z + 5.0, z)[0]) > 0.1
    assert float(J.binary_kl_norm(z + 5.0, z)[0]) > 0.1


def test_gradients(x64):
    rng = np.random.default_rng(2)
    z, zt = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(3, 4)))
    for T in (1.0, 2.0):
        # d/dz of T^2 log cosh((z - zt) / (2T)) = (T / 2) tanh((z - zt) / (2T)).
        want = T / 2 * np.tanh((np.asarray(z) - np.asarray(zt)) / (2 * T))
        np.testing.assert_allclose(
            np.asarray(G.binary_kl_norm(z, zt, temperature=T)), want, rtol=1e-12
        )
    for fn in (kd.kd_kl, kd.binary_kl, kd.binary_kl_norm):
        check_grads(jax.jit(lambda v, f=fn: f(v, zt, temperature=2.0)), (z,), order=1)
    # The teacher gets no gradient.
    teacher_grad = jax.jit(jax.grad(lambda t: kd.binary_kl(z, t).sum()))(zt)
    np.testing.assert_array_equal(np.asarray(teacher_grad), 0.0)


def test_extreme_logits_and_bfloat16():
    s = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]])
    t = jnp.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -5.0]])
    for dtype in (jnp.float32, jnp.bfloat16):
        for name in ("kd_kl", "binary_kl", "binary_kl_norm"):
            out = getattr(J, name)(s.astype(dtype), t.astype(dtype))
            grad = getattr(G, name)(s.astype(dtype), t.astype(dtype))
            assert out.dtype == dtype and out.shape == (2,)
            assert np.all(np.isfinite(np.asarray(out, np.float32))), (name, dtype)
            assert np.all(np.isfinite(np.asarray(grad, np.float32))), (name, dtype)
    # Row 0 of BinaryKL-Norm, T = 2: 4 (2 log cosh(5000) + 0) = 8 (5000 - log 2).
    assert float(J.binary_kl_norm(s, t)[0]) == pytest.approx(8 * (5000 - math.log(2)), 1e-6)


def test_dhkd_loss_routes_gradients_to_its_heads(x64):
    rng = np.random.default_rng(3)
    main, aux, teacher = (jnp.asarray(rng.normal(size=(4, 5))) for _ in range(3))
    y = jnp.asarray(rng.integers(0, 5, size=4))
    total = J.dhkd_loss(main, aux, teacher, y, gamma=0.7, alpha=0.3, temperature=2.0)
    want = 0.7 * JC.cross_entropy(main, y) + 0.3 * J.binary_kl_norm(aux, teacher)
    np.testing.assert_allclose(np.asarray(total), np.asarray(want), rtol=1e-12)
    grads = jax.jit(
        jax.grad(lambda m, a: kd.dhkd_loss(m, a, teacher, y, gamma=0.7, alpha=0.3).sum(), (0, 1))
    )(main, aux)
    ce_grad = 0.7 * GC.cross_entropy(main, y)
    kd_grad = 0.3 * G.binary_kl_norm(aux, teacher)
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(ce_grad), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(kd_grad), rtol=1e-12)


def test_bad_input():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="temperature: expected a value in"):
        kd.kd_kl(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="teacher_logits: expected the shape of student"):
        kd.binary_kl(z, jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match="student_logits: expected a floating-point"):
        kd.binary_kl_norm(jnp.zeros((2, 3), jnp.int32), z)
    with pytest.raises(ValueError, match="aux_logits: expected the shape of main_logits"):
        kd.dhkd_loss(z, jnp.zeros((2, 4)), z, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="alpha: expected a value in"):
        kd.dhkd_loss(z, z, z, jnp.array([0, 1]), alpha=-1.0)
