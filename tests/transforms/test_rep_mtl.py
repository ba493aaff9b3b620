"""Tests of the Rep-MTL regularizers (jaxmtl.transforms.rep_mtl)."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxmtl.transforms.rep_mtl import csa_loss, rep_mtl_loss, tsr_loss

# Jitted once per shape: eager evaluation compiles every primitive separately (slow).
_tsr = jax.jit(tsr_loss, static_argnames=("channel_axis", "eps"))
_csa = jax.jit(csa_loss, static_argnames=("tau", "channel_axis", "positive_in_denominator", "eps"))


# ---- independent NumPy float64 references, written from the paper's equations ------------


def _tsr_np(s, channel_axis=-1):
    """Eqs. 4-6 on an array (K, N, *features): channel mean, |.|, task distribution, entropy."""
    s = np.moveaxis(np.asarray(s, np.float64), channel_axis, -1)
    mean = np.abs(s.mean(-1)).reshape(s.shape[0], -1)  # (K, positions)
    p = mean / mean.sum(0, keepdims=True)
    return float(np.mean(-(p * np.log(p)).sum(0)))


def _csa_np(s, tau, channel_axis=-1, positive_in_denominator=False):
    """Eqs. 7-9 with the C x C matrices formed explicitly."""
    s = np.moveaxis(np.asarray(s, np.float64), channel_axis, -1)
    k, n, c = s.shape[0], s.shape[1], s.shape[-1]
    s = s.reshape(k, n, -1, c)  # (K, N, HW, C)
    unit = lambda v: v.ravel() / np.linalg.norm(v)
    anchors, affinities = [], []
    for b in range(n):
        a_b = s[:, b].mean(1).T  # C x K
        anchors.append(unit(a_b @ a_b.T))
        affinities.append([unit(s[t, b].T @ s[t, b]) for t in range(k)])
    terms = []
    for b in range(n):
        neg = [math.exp(anchors[b] @ anchors[j] / tau) for j in range(n) if j != b]
        for t in range(k):
            pos = math.exp(anchors[b] @ affinities[b][t] / tau)
            den = sum(neg) + (pos if positive_in_denominator else 0.0)
            terms.append(-math.log(pos / den))
    return float(np.mean(terms))


def _random_saliency(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


# ---- TSR ---------------------------------------------------------------------------------


def test_tsr_hand_values():
    ones = jnp.ones((2, 3))
    assert float(_tsr(jnp.stack([ones, 3.0 * ones]))) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-5
    )
    # Equal saliency for K = 3 tasks: log K.
    assert float(_tsr(jnp.stack([ones, -ones, ones]))) == pytest.approx(math.log(3), rel=1e-5)
    # One task salient everywhere: 0 (up to eps).
    assert float(_tsr(jnp.stack([ones, 0 * ones, 0 * ones]))) == pytest.approx(0.0, abs=1e-6)
    # The channel mean is signed: channels (1, -1) cancel, so that task has no saliency.
    cancel = jnp.array([[[1.0, -1.0]], [[0.5, 0.5]]])
    assert float(_tsr(cancel)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("shape", "channel_axis"), [((3, 4, 5), -1), ((2, 3, 4, 4, 3), -1), ((2, 3, 5, 2, 2), 2)]
)
def test_tsr_matches_numpy_reference(x64, shape, channel_axis):
    s = _random_saliency(0, shape)
    got = _tsr(jnp.asarray(s), channel_axis=channel_axis)
    assert float(got) == pytest.approx(_tsr_np(s, channel_axis), rel=1e-9)


def test_tsr_channel_axis_is_a_layout_choice(x64):
    s = _random_saliency(1, (2, 3, 4, 4, 5))  # NHWC
    nchw = np.moveaxis(s, -1, 2)
    assert float(_tsr(jnp.asarray(s))) == pytest.approx(
        float(_tsr(jnp.asarray(nchw), channel_axis=2)), rel=1e-12
    )


@hypothesis.settings(max_examples=10)
@hypothesis.given(seed=st.integers(0, 2**16), log_scale=st.floats(-6.0, 6.0))
def test_tsr_invariances(seed, log_scale):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        s = rng.normal(size=(3, 4, 2, 5))
        base = float(_tsr(jnp.asarray(s)))
        # A positive scale per position (the same for all tasks): unchanged.
        per_position = np.exp(log_scale + rng.normal(size=(1, 4, 2, 1)))
        assert float(_tsr(jnp.asarray(s * per_position))) == pytest.approx(base, rel=1e-7)
        # Permuting tasks, samples or positions: unchanged.
        perm = s[rng.permutation(3)][:, rng.permutation(4)][:, :, rng.permutation(2)]
        assert float(_tsr(jnp.asarray(perm))) == pytest.approx(base, rel=1e-10)
        assert 0.0 <= base <= math.log(3) + 1e-12


# ---- CSA ---------------------------------------------------------------------------------


def test_csa_hand_value():
    # Sample 0: tasks e1, e2 -> anchor I, affinities diag(1,0), diag(0,1): cosines 1/sqrt2.
    # Sample 1: tasks e1, e1 -> anchor diag(2,0), affinities diag(1,0): cosines 1.
    # Anchors: cos(I, diag(2,0)) = 1/sqrt2, the single negative of each sample.
    s = jnp.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    r = 1 / math.sqrt(2)
    for tau in (1.0, 0.5):
        want = np.mean([-r, -r, -1.0, -1.0]) / tau + r / tau
        assert float(_csa(s, tau=tau)) == pytest.approx(want, rel=1e-5)
    with_pos = np.mean([math.log(math.exp(p) + math.exp(r)) - p for p in (r, r, 1.0, 1.0)])
    got = _csa(s, tau=1.0, positive_in_denominator=True)
    assert float(got) == pytest.approx(with_pos, rel=1e-5)


@pytest.mark.parametrize(
    ("shape", "channel_axis", "positive"),
    [
        ((2, 4, 5), -1, False),  # vectors: H'W' = 1
        ((3, 3, 2, 2, 6), -1, False),  # HW = 4 < C = 6
        ((2, 3, 7, 3, 3), 2, True),  # NCHW, HW = 9 > C = 7
    ],
)
def test_csa_matches_numpy_reference(x64, shape, channel_axis, positive):
    s = _random_saliency(2, shape)
    got = _csa(jnp.asarray(s), tau=0.3, channel_axis=channel_axis, positive_in_denominator=positive)
    want = _csa_np(s, 0.3, channel_axis, positive)
    assert float(got) == pytest.approx(want, rel=1e-9)


@hypothesis.settings(max_examples=10)
@hypothesis.given(seed=st.integers(0, 2**16), log_scale=st.floats(-8.0, 8.0))
def test_csa_invariances(seed, log_scale):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        s = rng.normal(size=(2, 4, 3, 3))
        base = float(_csa(jnp.asarray(s)))
        per_sample = np.exp(log_scale + rng.normal(size=(1, 4, 1, 1)))
        assert float(_csa(jnp.asarray(s * per_sample))) == pytest.approx(base, rel=1e-7)
        permuted = s[:, rng.permutation(4)]
        assert float(_csa(jnp.asarray(permuted))) == pytest.approx(base, rel=1e-10)


def test_tiny_float32_saliencies_match_float64():
    """Saliency of a batch-mean loss is O(1/N); the unit-RMS rescaling keeps float32 exact."""
    s = _random_saliency(3, (3, 4, 2, 2, 5)) * 1e-7
    with jax.enable_x64(True):
        want_tsr, want_csa = float(_tsr(jnp.asarray(s))), float(_csa(jnp.asarray(s)))
    s32 = jnp.asarray(s, jnp.float32)
    assert _tsr(s32).dtype == jnp.float32
    assert float(_tsr(s32)) == pytest.approx(want_tsr, rel=1e-4)
    assert float(_csa(s32)) == pytest.approx(want_csa, rel=1e-4)


def test_zero_saliency_is_finite_with_finite_gradients():
    zero = jnp.zeros((2, 3, 4))
    one_task_silent = jnp.stack([jnp.ones((3, 4)), jnp.zeros((3, 4))])
    for fn in (tsr_loss, csa_loss):
        value_and_grad = jax.jit(jax.value_and_grad(fn))
        for s in (zero, one_task_silent):
            value, grad = value_and_grad(s)
            assert np.isfinite(float(value))
            assert np.all(np.isfinite(np.asarray(grad)))
    assert float(_tsr(zero)) == pytest.approx(math.log(2), rel=1e-6)


def test_regularizer_gradients(x64):
    s = jnp.asarray(_random_saliency(4, (2, 3, 2, 3)))
    check_grads(jax.jit(tsr_loss), (s,), order=1, modes=("rev",))
    check_grads(jax.jit(lambda v: _csa(v, tau=0.5)), (s,), order=1, modes=("rev",))


def test_bad_arguments():
    s = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="saliency"):
        tsr_loss(jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="saliency"):
        tsr_loss(jnp.ones((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="channel_axis"):
        tsr_loss(s, channel_axis=1)
    with pytest.raises(ValueError, match="channel_axis"):
        csa_loss(s, channel_axis=3)
    with pytest.raises(ValueError, match=r"N >= 2"):
        csa_loss(jnp.ones((2, 1, 4)))
    with pytest.raises(ValueError, match="tau"):
        csa_loss(s, tau=0.0)
    with pytest.raises(ValueError, match="eps"):
        tsr_loss(s, eps=-1.0)
    with pytest.raises(TypeError, match="positive_in_denominator"):
        csa_loss(s, positive_in_denominator=1)


# ---- the regularized objective ------------------------------------------------------------


def _model(dtype):
    keys = jax.random.split(jax.random.key(0), 5)
    trunk = {
        "w": jax.random.normal(keys[0], (3, 4), dtype),
        "b": jax.random.normal(keys[1], (4,), dtype) / 3,
    }
    heads = {
        "w": jax.random.normal(keys[2], (2, 4, 3), dtype),
        "v": jax.random.normal(keys[3], (2, 3), dtype),
    }
    x = jax.random.normal(keys[4], (5, 3), dtype)
    y = jnp.stack([jnp.sin(x[:, 0]), jnp.cos(x[:, 1])])  # (K, N) regression targets
    return trunk, heads, x, y


def _encode(trunk, x):
    return jnp.tanh(x @ trunk["w"] + trunk["b"])


def _heads(heads, z, y):
    # Nonlinear heads, so that the saliency depends on z and on the head parameters.
    hidden = jnp.tanh(jnp.einsum("nc,kcd->knd", z, heads["w"]))
    pred = jnp.einsum("knd,kd->kn", hidden, heads["v"])
    return jnp.mean((pred - y) ** 2, axis=1)


def _jitted_loss(**kwargs):
    return jax.jit(lambda t, h, x, y: rep_mtl_loss(_encode, _heads, t, h, x, y, **kwargs))


def test_saliency_is_the_feature_jacobian_and_lambda_zero_is_the_sum(x64):
    trunk, heads, x, y = _model(jnp.float64)
    weights = jnp.array([2.0, 0.5])
    total, aux = _jitted_loss(lambda_tsr=0.0, lambda_csa=0.0, task_weights=weights)(
        trunk, heads, x, y
    )
    # Exactly the weighted sum: the regularizers enter as 0 * (finite value).
    assert float(total) == float(jnp.sum(weights * aux["task_losses"]))
    z = _encode(trunk, x)
    np.testing.assert_allclose(aux["task_losses"], _heads(heads, z, y), rtol=1e-14)
    want = jax.jit(jax.jacrev(lambda f: _heads(heads, f, y)))(z)
    np.testing.assert_allclose(aux["saliency"], want, rtol=1e-12)


def test_total_matches_its_parts(x64):
    trunk, heads, x, y = _model(jnp.float64)
    total, aux = _jitted_loss(lambda_tsr=0.7, tau=0.2)(trunk, heads, x, y)
    s = np.asarray(aux["saliency"])
    assert float(aux["tsr"]) == pytest.approx(_tsr_np(s), rel=1e-10)
    assert float(aux["csa"]) == pytest.approx(_csa_np(s, 0.2), rel=1e-10)
    want = float(jnp.sum(aux["task_losses"])) + 0.7 * _tsr_np(s) + 0.9 * _csa_np(s, 0.2)
    assert float(total) == pytest.approx(want, rel=1e-10)


def test_second_order_gradients_through_heads_and_trunk(x64):
    trunk, heads, x, y = _model(jnp.float64)
    objective = jax.jit(lambda t, h: rep_mtl_loss(_encode, _heads, t, h, x, y, tau=0.5)[0])
    check_grads(objective, (trunk, heads), order=1, modes=("rev",))
    # The regularizers do move the head gradient (they depend on the heads via S_t).
    g_reg = jax.grad(objective, argnums=1)(trunk, heads)
    g_plain = jax.grad(lambda h: jnp.sum(_heads(h, _encode(trunk, x), y)))(heads)
    assert np.abs(g_reg["w"] - g_plain["w"]).max() > 1e-6


def test_rep_mtl_loss_bad_arguments():
    trunk, heads, x, y = _model(jnp.float32)
    with pytest.raises(ValueError, match="task_weights"):
        _jitted_loss(task_weights=jnp.ones(3))(trunk, heads, x, y)
    with pytest.raises(ValueError, match="lambda_tsr"):
        rep_mtl_loss(_encode, _heads, trunk, heads, x, y, lambda_tsr=-1.0)
    with pytest.raises(ValueError, match="N >= 2"):
        _jitted_loss()(trunk, heads, x[:1], y[:, :1])
    # N = 1 is fine when CSA is switched off.
    total, aux = _jitted_loss(lambda_csa=0.0)(trunk, heads, x[:1], y[:, :1])
    assert np.isfinite(float(total)) and float(aux["csa"]) == 0.0
