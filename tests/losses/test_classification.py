"""Tests of jaxmtl.losses.classification: Z-loss and spherical family, comp-sum family,
smooth adversarial comp-sum losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from jaxmtl.losses import classification as cl
from tests.losses.jitted import Jit

J, G = Jit(cl), Jit(cl, grad=True)


def _logit_vectors(n=5, bound=10.0):
    return hnp.arrays(
        np.float64,
        (n,),
        elements=st.floats(-bound, bound, allow_nan=False, allow_subnormal=False),
    )


# ----------------------------------------------------------------- NumPy references (float64)


def _z_loss_reference(o, c, a=1.0, b=0.0):
    o = np.asarray(o, np.float64)
    z = (o[c] - o.mean()) / o.std()  # population std, as in the paper
    return np.logaddexp(0.0, a * (b - z)) / a


def _comp_sum_reference(h, y, tau):
    h = np.asarray(h, np.float64)
    u = sum(np.exp(h[k] - h[y]) for k in range(len(h)) if k != y)
    if tau == 1.0:
        return np.log1p(u)
    return ((1.0 + u) ** (1.0 - tau) - 1.0) / (1.0 - tau)


def _softmax(h):
    e = np.exp(h - h.max())
    return e / e.sum()


# ----------------------------------------------------------------- Z-loss: values


def test_z_loss_hand_value():
    # o = [1, 2, 3, 4], c = 3: mu = 2.5, var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25,
    # sigma = 1.118034, z = 1.5 / 1.118034 = 1.341641, loss = log(1 + e^-1.341641) = 0.232235.
    o, c = jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array(3)
    assert float(J.target_z_score(o, c)) == pytest.approx(1.341641, abs=1e-6)
    assert float(J.z_loss(o, c)) == pytest.approx(0.232235, abs=1e-6)
    # a = 2, b = 1: softplus(2 (1 - 1.341641)) / 2 = log(1 + e^-0.683282) / 2
    #   = log(1.504957) / 2 = 0.204382.
    assert float(J.z_loss(o, c, a=2.0, b=1.0)) == pytest.approx(0.204382, abs=1e-6)


def test_z_score_of_one_hot_is_sqrt_d_minus_1():
    # One-hot on c, D = 10: mu = 0.1, sigma = sqrt(0.1 - 0.01) = 0.3, z = 0.9 / 0.3 = 3.
    o = jnp.zeros(10).at[4].set(1.0)
    assert float(J.target_z_score(o, jnp.array(4))) == pytest.approx(3.0, abs=1e-6)
    st_ = J.spherical_statistics(o, jnp.array(4))
    assert float(J.z_score_from_statistics(*st_, 10).z) == pytest.approx(3.0, abs=1e-6)


def test_z_loss_equal_logits_is_documented_constant():
    # sigma = 0 -> z = 0 -> softplus(a b) / a = log(1 + e^1) / 2 = 0.656631 for a = 2, b = 0.5.
    for value in (0.0, 0.1, 1e4):
        o = jnp.full((2, 7), value)
        out = J.z_loss(o, jnp.array([0, 3]), a=2.0, b=0.5)
        np.testing.assert_allclose(np.asarray(out), 0.656631, atol=1e-6)
        g = G.z_loss(o, jnp.array([0, 3]), a=2.0, b=0.5)
        assert np.all(np.isfinite(np.asarray(g)))
    stats = J.spherical_statistics(jnp.full(7, 0.1), jnp.array(2))
    out = J.z_loss_from_statistics(*stats, 7, a=2.0, b=0.5)
    assert float(out) == pytest.approx(0.656631, abs=1e-3)
    zero = J.z_loss_from_statistics(jnp.array(0.0), jnp.array(0.0), jnp.array(0.0), 7)
    assert float(zero) == pytest.approx(math.log(2.0), abs=1e-6)


def test_z_loss_matches_numpy_reference(x64):
    rng = np.random.default_rng(0)
    o = rng.normal(size=(6, 5)) * 3.0
    c = rng.integers(0, 5, size=6)
    got = J.z_loss(jnp.asarray(o), jnp.asarray(c), a=1.5, b=0.7)
    want = [_z_loss_reference(o[i], c[i], 1.5, 0.7) for i in range(6)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def test_z_loss_equals_loss_from_statistics():
    rng = np.random.default_rng(1)
    o = jnp.asarray(rng.normal(size=(4, 3, 8)), jnp.float32)
    c = jnp.asarray(rng.integers(0, 8, size=(4, 3)))
    stats = J.spherical_statistics(o, c)
    dense = J.z_loss(o, c, a=2.0, b=1.0)
    factored = J.z_loss_from_statistics(*stats, 8, a=2.0, b=1.0)
    assert dense.shape == factored.shape == (4, 3)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(factored), rtol=1e-5, atol=1e-6)


@given(_logit_vectors(), st.floats(0.01, 100.0), st.floats(-1e3, 1e3), st.integers(0, 4))
def test_z_loss_is_shift_and_scale_invariant(o, alpha, beta, c):
    assume(np.ptp(o) > 1e-2)
    with jax.enable_x64(True):
        label = jnp.array(c)
        base = float(J.z_loss(jnp.asarray(o), label, a=1.3, b=0.4))
        moved = float(J.z_loss(jnp.asarray(alpha * o + beta), label, a=1.3, b=0.4))
    assert moved == pytest.approx(base, rel=1e-9, abs=1e-9)


def test_z_loss_is_not_invariant_to_negative_scaling():
    o, c = jnp.array([1.0, 2.0, 3.0, 10.0]), jnp.array(3)
    assert abs(float(J.z_loss(-o, c)) - float(J.z_loss(o, c))) > 0.5


def test_z_loss_gradients(x64):
    rng = np.random.default_rng(2)
    o = jnp.asarray(rng.normal(size=(3, 5)))
    c = jnp.asarray(rng.integers(0, 5, size=3))
    check_grads(jax.jit(lambda x: cl.z_loss(x, c, a=1.5, b=0.5)), (o,), order=2, modes=["rev"])
    stats = J.spherical_statistics(o, c)
    check_grads(
        jax.jit(lambda s, q, t: cl.z_loss_from_statistics(s, q, t, 5, b=0.5)), tuple(stats), 1
    )


def test_z_loss_gradient_needs_only_the_three_statistic_derivatives(x64):
    # dL/do = dL/ds * 1 + dL/dq * 2 o + dL/do_c * e_c (the spherical family's structure).
    rng = np.random.default_rng(3)
    o = jnp.asarray(rng.normal(size=6))
    c = jnp.array(2)
    direct = G.z_loss(o, c)
    stats_grad = jax.grad(lambda s, q, t: cl.z_loss_from_statistics(s, q, t, 6), (0, 1, 2))
    ds, dq, dt = jax.jit(stats_grad)(*J.spherical_statistics(o, c))
    rebuilt = ds + 2.0 * dq * o + dt * jax.nn.one_hot(c, 6, dtype=o.dtype)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(rebuilt), rtol=1e-9, atol=1e-12)


def test_dense_z_score_has_no_cancellation_but_statistics_path_does():
    # Outputs 1e4 + O(1) in float32: |mu| / sigma ~ 1e4, the s/q path loses ~8 digits.
    rng = np.random.default_rng(4)
    o32 = (1e4 + rng.normal(size=16)).astype(np.float32)
    o64 = o32.astype(np.float64)
    want = (o64[5] - o64.mean()) / o64.std()
    dense = float(J.target_z_score(jnp.asarray(o32), jnp.array(5)))
    assert dense == pytest.approx(want, rel=1e-5)
    stats = J.spherical_statistics(jnp.asarray(o32), jnp.array(5))
    z = float(J.z_score_from_statistics(*stats, 16).z)
    assert math.isfinite(z) and abs(z) <= math.sqrt(15) + 1e-6  # finite, clipped, not accurate


def test_z_loss_extreme_logits_and_bfloat16():
    rng = np.random.default_rng(5)
    o = jnp.asarray(rng.choice([-1e4, 1e4], size=(4, 6)) * rng.uniform(0.5, 1, (4, 6)))
    c = jnp.array([0, 1, 2, 3])
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = o.astype(dtype) if dtype != jnp.float16 else (o / 10).astype(dtype)
        out, grad = J.z_loss(x, c), G.z_loss(x, c)
        assert out.dtype == dtype and out.shape == (4,)
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    ref = J.z_loss(o, c)
    low = J.z_loss(o.astype(jnp.bfloat16), c).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(low), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_z_loss_bad_input():
    o = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="a: expected a value in"):
        cl.z_loss(o, jnp.array([0, 1]), a=0.0)
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        cl.z_loss(o, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 4\)"):
        cl.z_loss(o, jnp.array([0, 4]))
    with pytest.raises(TypeError, match="labels: expected integer"):
        cl.z_loss(o, jnp.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="logits: expected a floating-point"):
        cl.z_loss(jnp.ones((2, 4), jnp.int32), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="logits: expected at least 2 classes"):
        cl.z_loss(jnp.ones((2, 1)), jnp.array([0, 0]))
    with pytest.raises(ValueError, match="num_classes: expected an int >= 2"):
        cl.z_loss_from_statistics(jnp.array(1.0), jnp.array(1.0), jnp.array(1.0), 1)
    with pytest.raises(ValueError, match="eps: expected a value in"):
        cl.z_score_from_statistics(jnp.array(1.0), jnp.array(1.0), jnp.array(1.0), 3, eps=-1.0)


# ----------------------------------------------------------------- other spherical members


def test_spherical_family_members(x64):
    # o = [1, -2, 0.5], c = 0: MSE = 0^2 + 4 + 0.25 = 4.25;
    # spherical softmax (eps 0): -log(1 / (1 + 4 + 0.25)) = log 5.25 = 1.658228;
    # Taylor: t = [2.5, 1, 1.625], -log(2.5 / 5.125) = 0.717840.
    o, c = jnp.array([1.0, -2.0, 0.5]), jnp.array(0)
    assert float(J.spherical_mse(o, c)) == pytest.approx(4.25)
    assert float(J.log_spherical_softmax(o, c, eps=0.0)) == pytest.approx(1.658228, abs=1e-6)
    assert float(J.log_taylor_softmax(o, c)) == pytest.approx(0.717840, abs=1e-6)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 4)) * 2
    y = rng.integers(0, 4, size=5)
    onehot = np.eye(4)[y]
    stats = J.spherical_statistics(jnp.asarray(x), jnp.asarray(y))
    mse = ((x - onehot) ** 2).sum(1)
    sph = -np.log((x[np.arange(5), y] ** 2 + 1e-6) / (x**2 + 1e-6).sum(1))
    t = 1 + x + x**2 / 2
    tay = -np.log(t[np.arange(5), y] / t.sum(1))
    np.testing.assert_allclose(J.spherical_mse(jnp.asarray(x), jnp.asarray(y)), mse, rtol=1e-12)
    np.testing.assert_allclose(J.spherical_mse_from_statistics(*stats, 4), mse, rtol=1e-12)
    np.testing.assert_allclose(J.log_spherical_softmax_from_statistics(*stats, 4), sph, 1e-12)
    np.testing.assert_allclose(J.log_taylor_softmax(jnp.asarray(x), jnp.asarray(y)), tay, 1e-12)
    np.testing.assert_allclose(J.log_taylor_softmax_from_statistics(*stats, 4), tay, 1e-12)
    check_grads(jax.jit(lambda v: cl.log_taylor_softmax(v, jnp.asarray(y))), (jnp.asarray(x),), 1)


def test_logsumexp_penalty():
    # [0, 0]: log Z = log 2, penalty = weight (log 2)^2 = 1e-4 * 0.480453.
    out = J.logsumexp_penalty(jnp.zeros((3, 2)))
    np.testing.assert_allclose(np.asarray(out), 1e-4 * math.log(2) ** 2, rtol=1e-6)
    big = J.logsumexp_penalty(jnp.array([1e4, -1e4], jnp.bfloat16), weight=1.0)
    assert big.dtype == jnp.bfloat16 and np.isfinite(float(big))
    with pytest.raises(ValueError, match="weight"):
        cl.logsumexp_penalty(jnp.zeros(2), weight=-1.0)


# ----------------------------------------------------------------- comp-sum family


@pytest.mark.parametrize(
    ("tau", "want"),
    # logits 0, n = 3: p_y = 1/3, u = 2. tau 0: u = 2; 0.5: (3^0.5 - 1) / 0.5 = 1.464102;
    # 1: log 3 = 1.098612; 1.5: (3^-0.5 - 1) / -0.5 = 0.845299; 2: 1 - 1/3 = 0.666667.
    [(0.0, 2.0), (0.5, 1.464102), (1.0, 1.098612), (1.5, 0.845299), (2.0, 0.666667)],
)
def test_comp_sum_hand_values_uniform(tau, want):
    assert float(J.comp_sum_loss(jnp.zeros(3), jnp.array(1), tau=tau)) == pytest.approx(
        want, abs=1e-6
    )


def test_comp_sum_hand_values_and_aliases():
    # h = [2, 1, 0], y = 0: u = e^-1 + e^-2 = 0.503215 (tau 0); CE log(1 + u) = 0.407606;
    # p_y = 1 / 1.503215 = 0.665241: MAE 0.334759; GCE q = 0.5: (1 - p^0.5) / 0.5 = 0.368754.
    h, y = jnp.array([2.0, 1.0, 0.0]), jnp.array(0)
    assert float(J.sum_exponential_loss(h, y)) == pytest.approx(0.503215, abs=1e-6)
    assert float(J.cross_entropy(h, y)) == pytest.approx(0.407606, abs=1e-6)
    assert float(J.mae_loss(h, y)) == pytest.approx(0.334759, abs=1e-6)
    assert float(J.generalized_cross_entropy(h, y, q=0.5)) == pytest.approx(0.368754, abs=1e-6)
    assert float(J.comp_sum_loss(h, y, tau=1.5)) == pytest.approx(0.368754, abs=1e-6)


def test_comp_sum_matches_numpy_reference(x64):
    rng = np.random.default_rng(7)
    h = rng.normal(size=(5, 4)) * 2
    y = rng.integers(0, 4, size=5)
    for tau in (0.0, 0.3, 1.0, 1.7, 2.0, 3.5):
        got = J.comp_sum_loss(jnp.asarray(h), jnp.asarray(y), tau=tau)
        want = [_comp_sum_reference(h[i], y[i], tau) for i in range(5)]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10)


def test_comp_sum_continuity_at_cross_entropy_and_gce_limits(x64):
    h, y = jnp.array([0.3, -1.2, 2.0, 0.5]), jnp.array(1)
    ce = float(J.cross_entropy(h, y))
    for tau in (1.0 - 1e-5, 1.0 + 1e-5, 1.0 + 1e-7):
        assert float(J.comp_sum_loss(h, y, tau=tau)) == pytest.approx(ce, abs=1e-4)
    assert float(J.generalized_cross_entropy(h, y, q=1e-6)) == pytest.approx(ce, abs=1e-4)
    # q = 1 is MAE: 1 - p_y = ||softmax - e_y||_1 / 2.
    p = _softmax(np.asarray(h))
    half_l1 = 0.5 * np.abs(p - np.eye(4)[1]).sum()
    assert float(J.generalized_cross_entropy(h, y, q=1.0)) == pytest.approx(half_l1, rel=1e-12)
    assert float(J.mae_loss(h, y)) == pytest.approx(half_l1, rel=1e-12)


@given(_logit_vectors(4, 8.0), st.floats(0.0, 4.0), st.floats(0.0, 4.0), st.integers(0, 3))
def test_comp_sum_is_non_increasing_in_tau_and_bounded(h, t1, t2, y):
    lo, hi = min(t1, t2), max(t1, t2)
    with jax.enable_x64(True):
        label = jnp.array(y)
        a = float(J.comp_sum_loss(jnp.asarray(h), label, tau=lo))
        b = float(J.comp_sum_loss(jnp.asarray(h), label, tau=hi))
        shifted = float(J.comp_sum_loss(jnp.asarray(h + 3.7), label, tau=hi))
    assert b <= a * (1 + 1e-9) + 1e-12
    if hi > 1.0:
        assert b <= 1.0 / (hi - 1.0) + 1e-12
    assert shifted == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_comp_sum_gradient_identity_and_check_grads(x64):
    # grad_h l_tau = p_y^(tau - 1) (softmax(h) - e_y).
    rng = np.random.default_rng(8)
    h = jnp.asarray(rng.normal(size=(3, 5)))
    y = jnp.asarray(rng.integers(0, 5, size=3))
    loss = jax.jit(lambda v, t: cl.comp_sum_loss(v, y, tau=t))
    p = np.asarray(jax.nn.softmax(h))
    p_y = p[np.arange(3), np.asarray(y)][:, None]
    for tau in (0.0, 0.5, 1.0, 1.5, 2.0):
        want = p_y ** (tau - 1.0) * (p - np.eye(5)[np.asarray(y)])
        g = G.comp_sum_loss(h, y, tau=tau)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-9, atol=1e-12)
        check_grads(lambda v, t=tau: loss(v, t), (h,), order=1)


def test_comp_sum_soft_labels(x64):
    rng = np.random.default_rng(9)
    h = jnp.asarray(rng.normal(size=(4, 3)))
    y = jnp.asarray(rng.integers(0, 3, size=4))
    onehot = jax.nn.one_hot(y, 3, dtype=h.dtype)
    for tau in (0.0, 1.0, 1.7):
        np.testing.assert_allclose(
            J.comp_sum_loss(h, onehot, tau=tau), J.comp_sum_loss(h, y, tau=tau), rtol=1e-12
        )
    probs = jnp.asarray(rng.dirichlet(np.ones(3), size=4))
    per_class = jnp.stack(
        [J.comp_sum_loss(h, jnp.full((4,), k), tau=1.3) for k in range(3)], axis=1
    )
    np.testing.assert_allclose(
        J.comp_sum_loss(h, probs, tau=1.3), jnp.sum(probs * per_class, axis=1), rtol=1e-12
    )


def test_comp_sum_traced_tau_matches_static():
    h, y = jnp.array([[2.0, 1.0, 0.0]]), jnp.array([0])
    traced = jax.jit(lambda t: cl.comp_sum_loss(h, y, tau=t))
    for tau in (0.0, 1.0, 1.5):
        np.testing.assert_allclose(
            traced(jnp.float32(tau)), cl.comp_sum_loss(h, y, tau=tau), rtol=1e-6
        )


def test_numpy_scalar_hyperparameters_keep_strict_promotion():
    # np.float64 hyperparameters are converted to weak Python floats at the boundary.
    h, y = jnp.array([[2.0, 1.0, 0.0]]), jnp.array([0])
    out = cl.comp_sum_loss(h, y, tau=np.float64(1.5))
    assert out.dtype == jnp.float32
    assert float(out[0]) == pytest.approx(0.368754, abs=1e-6)
    assert cl.z_loss(h, y, a=np.float32(2.0), b=jnp.float32(1.0)).dtype == jnp.float32


def test_comp_sum_extreme_logits():
    h = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]])
    y = jnp.array([1, 0])  # wrong class by 2e4: r = 2e4
    for dtype in (jnp.float32, jnp.bfloat16):
        for tau in (0.0, 0.5, 1.0, 1.5, 2.0):
            x = h.astype(dtype)
            out = J.comp_sum_loss(x, y, tau=tau)
            g = G.comp_sum_loss(x, y, tau=tau)
            assert out.dtype == dtype
            assert np.all(np.isfinite(np.asarray(out, np.float32))), (dtype, tau)
            assert np.all(np.isfinite(np.asarray(g, np.float32))), (dtype, tau)
    # tau >= 1 exact at that scale: CE = r = 2e4 (first row), MAE = 1.
    np.testing.assert_allclose(J.cross_entropy(h, y)[0], 2e4, rtol=1e-6)
    np.testing.assert_allclose(J.mae_loss(h, y), 1.0, rtol=1e-6)
    # tau < 1 saturates at finfo.max / 4 (documented cap).
    cap = float(jnp.finfo(jnp.float32).max) / 4
    np.testing.assert_allclose(J.sum_exponential_loss(h, y)[0], cap, rtol=1e-5)


def test_comp_sum_bad_input():
    h = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="tau: expected a value in"):
        cl.comp_sum_loss(h, jnp.array([0, 1]), tau=-0.5)
    with pytest.raises(ValueError, match="q: expected a value in"):
        cl.generalized_cross_entropy(h, jnp.array([0, 1]), q=1.5)
    with pytest.raises(ValueError, match="labels: float"):
        cl.comp_sum_loss(h, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        cl.comp_sum_loss(h, jnp.array([0]))


# ----------------------------------------------------------------- smooth adversarial


def _linear(w, x):
    return x @ w


def test_margin_shift_regularizer_values(x64):
    rng = np.random.default_rng(10)
    a = rng.normal(size=(4, 5))
    b = rng.normal(size=(4, 5))
    y = rng.integers(0, 5, size=4)
    got = J.margin_shift_regularizer(jnp.asarray(a), jnp.asarray(b), jnp.asarray(y))
    # ||Delta(x') - Delta(x)||, Delta(x) = (h_y - h_y')_y', written out per example.
    want = [
        np.linalg.norm([(a[i, y[i]] - a[i, k]) - (b[i, y[i]] - b[i, k]) for k in range(5)])
        for i in range(4)
    ]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    zero = J.margin_shift_regularizer(jnp.asarray(b + 3.0), jnp.asarray(b), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(zero), 0.0, atol=1e-12)
    g = G.margin_shift_regularizer(jnp.asarray(b), jnp.asarray(b), jnp.asarray(y))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_increases_objective(norm):
    rng = np.random.default_rng(11)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    x = jnp.asarray(rng.uniform(0.2, 0.8, size=(5, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=5))
    clean = _linear(w, x)

    def objective(xp):
        return cl.margin_shift_regularizer(_linear(w, xp), clean, y)

    key = jax.random.key(0)
    x_adv = J.pgd_maximize(
        objective, x, key=key, epsilon=0.1, step_size=0.03, num_steps=10, norm=norm, clip=(0, 1)
    )
    delta = np.asarray(x_adv - x)
    if norm == "linf":
        assert np.abs(delta).max() <= 0.1 + 1e-6
    else:
        assert np.linalg.norm(delta, axis=1).max() <= 0.1 + 1e-6
    assert np.all((np.asarray(x_adv) >= 0) & (np.asarray(x_adv) <= 1))
    start = J.pgd_maximize(
        objective, x, key=key, epsilon=0.1, step_size=0.03, num_steps=0, norm=norm
    )
    assert np.all(np.asarray(objective(x_adv)) >= np.asarray(objective(start)) - 1e-6)
    assert np.all(np.asarray(objective(x_adv)) > 0)


def test_adversarial_comp_sum_loss():
    rng = np.random.default_rng(12)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=5))
    key = jax.random.key(1)
    plain = J.comp_sum_loss(_linear(w, x), y, tau=1.5)
    off = J.adversarial_comp_sum_loss(_linear, w, x, y, key=key, tau=1.5, nu=0.0)
    np.testing.assert_allclose(np.asarray(off), np.asarray(plain), rtol=1e-6)
    on = J.adversarial_comp_sum_loss(_linear, w, x, y, key=key, tau=1.5, nu=2.0, epsilon=0.1)
    assert on.shape == (5,) and np.all(np.asarray(on) > np.asarray(plain))

    # A model whose logits all move by the same constant under perturbation: regularizer 0.
    def shift_model(v, xp):
        return jnp.broadcast_to(jnp.sum(xp, axis=1, keepdims=True) * v, (xp.shape[0], 4))

    flat = J.adversarial_comp_sum_loss(
        shift_model, jnp.float32(1.0), x, y, key=key, nu=5.0, epsilon=0.1
    )
    np.testing.assert_allclose(flat, J.comp_sum_loss(shift_model(1.0, x), y), atol=1e-5)

    grad = jax.jit(
        jax.grad(lambda p: cl.adversarial_comp_sum_loss(_linear, p, x, y, key=key).mean())
    )(w)
    assert grad.shape == w.shape and np.all(np.isfinite(np.asarray(grad)))


def test_pgd_bad_input():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="epsilon"):
        cl.pgd_maximize(jnp.sum, x, key=jax.random.key(0), epsilon=0, step_size=1, num_steps=1)
    with pytest.raises(ValueError, match="norm"):
        cl.pgd_maximize(
            jnp.sum, x, key=jax.random.key(0), epsilon=1, step_size=1, num_steps=1, norm="l1"
        )
    with pytest.raises(ValueError, match="logits_clean: expected the shape"):
        cl.margin_shift_regularizer(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.array([0, 1]))
