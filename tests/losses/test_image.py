"""Tests of jaxmtl.losses.image against a float64 NumPy SSIM written from the definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from numpy.lib.stride_tricks import sliding_window_view
from skimage.metrics import structural_similarity

from jaxmtl.losses import image

_WEIGHTS = image.MS_SSIM_WEIGHTS


# ----------------------------------------------------------------- float64 NumPy reference


def _window(size, sigma):
    r = np.arange(size) - size // 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return np.outer(g, g) / np.outer(g, g).sum()


def _filter(img, w):
    """Valid-mode correlation of a 2-D image with a 2-D window."""
    return np.einsum("ijkl,kl->ij", sliding_window_view(img, w.shape), w)


def _maps(a, b, w, c1, c2):
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    var_a = _filter(a * a, w) - mu_a**2
    var_b = _filter(b * b, w) - mu_b**2
    cov = _filter(a * b, w) - mu_a * mu_b
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    return lum, cs


def _ssim_ref(x, y, max_val=1.0, size=11, sigma=1.5):
    w, c1, c2 = _window(size, sigma), (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    out = []
    for xi, yi in zip(x, y, strict=True):
        maps = [_maps(xi[..., c], yi[..., c], w, c1, c2) for c in range(x.shape[-1])]
        out.append(np.mean([np.mean(lum * cs) for lum, cs in maps]))
    return np.array(out)


def _ms_ssim_ref(x, y, weights=_WEIGHTS, max_val=1.0, size=11, sigma=1.5):
    w, c1, c2 = _window(size, sigma), (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    out = []
    for xi, yi in zip(x, y, strict=True):
        per_channel = []
        for c in range(x.shape[-1]):
            a, b, value = xi[..., c], yi[..., c], 1.0
            for j, beta in enumerate(weights):
                lum, cs = _maps(a, b, w, c1, c2)
                last = j == len(weights) - 1
                value *= max(np.mean(lum * cs) if last else np.mean(cs), 0.0) ** beta
                h, v = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
                a = a[:h, :v].reshape(h // 2, 2, v // 2, 2).mean((1, 3))
                b = b[:h, :v].reshape(h // 2, 2, v // 2, 2).mean((1, 3))
            per_channel.append(value)
        out.append(np.mean(per_channel))
    return np.array(out)


def _images(seed, shape):
    """A random image and a noisy, clipped copy (positively correlated), float64."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=shape)
    return x, np.clip(x + rng.normal(scale=0.2, size=shape), 0, 1)


_ssim = jax.jit(image.ssim, static_argnames=("max_val", "filter_size", "sigma"))
_ms_ssim = jax.jit(image.ms_ssim, static_argnames=("weights", "max_val", "filter_size", "sigma"))

# ----------------------------------------------------------------- tests


def test_gaussian_window_matches_definition():
    g = image.gaussian_window(11, 1.5)
    np.testing.assert_allclose(np.outer(g, g), _window(11, 1.5), rtol=1e-12)
    with pytest.raises(ValueError, match=r"sigma: expected a value > 0, got 0"):
        image.gaussian_window(11, 0)


def test_constant_images_hand_values():
    a, b = jnp.full((1, 176, 176, 1), 0.5), jnp.full((1, 176, 176, 1), 0.25)
    np.testing.assert_allclose(_ssim(a, b), [0.800064], atol=1e-6)
    np.testing.assert_allclose(_ms_ssim(a, b), [0.970703], atol=1e-6)


def test_identity_symmetry_and_range():
    x, y = (jnp.asarray(v, jnp.float32) for v in _images(0, (3, 32, 32, 2)))
    kw = dict(weights=(0.3, 0.3, 0.4), filter_size=7)
    np.testing.assert_allclose(_ssim(x, x), 1.0, atol=1e-5)
    np.testing.assert_allclose(_ms_ssim(x, x, **kw), 1.0, atol=1e-5)
    np.testing.assert_allclose(_ssim(x, y), _ssim(y, x), rtol=1e-6)
    np.testing.assert_allclose(_ms_ssim(x, y, **kw), _ms_ssim(y, x, **kw), rtol=1e-6)
    ms = np.asarray(_ms_ssim(x, y, **kw))
    assert np.all(ms > 0) and np.all(ms < 1)
    assert np.all(np.asarray(_ssim(x, y)) < 1)


def test_ssim_matches_float64_reference(x64):
    x, y = _images(1, (2, 24, 20, 3))
    got = _ssim(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(got, _ssim_ref(x, y), rtol=1e-12)
    got255 = _ssim(jnp.asarray(x * 255), jnp.asarray(y * 255), max_val=255.0)
    np.testing.assert_allclose(got255, _ssim_ref(x * 255, y * 255, max_val=255.0), rtol=1e-12)


@pytest.mark.parametrize(
    ("shape", "kw"),
    [((1, 176, 180, 1), {}), ((2, 37, 33, 2), dict(weights=(0.2, 0.3, 0.5), filter_size=7))],
)
def test_ms_ssim_matches_float64_reference(x64, shape, kw):
    x, y = _images(2, shape)
    got = _ms_ssim(jnp.asarray(x), jnp.asarray(y), **kw)
    want = _ms_ssim_ref(x, y, weights=kw.get("weights", _WEIGHTS), size=kw.get("filter_size", 11))
    np.testing.assert_allclose(got, want, rtol=1e-11)


def test_ssim_agrees_with_skimage_on_valid_region():
    x, y = _images(3, (1, 64, 64, 1))
    want = structural_similarity(
        x[0, ..., 0], y[0, ..., 0], gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0,
    )  # fmt: skip
    got = _ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(got, [want], atol=1e-4)


def test_gradients_float64(x64):
    x, y = (jnp.asarray(v) for v in _images(4, (1, 20, 20, 1)))
    check_grads(jax.jit(lambda u: image.ssim_loss(u, y)), (x,), 1, modes=("rev",))
    ms = jax.jit(lambda u: image.ms_ssim_loss(u, y, weights=(0.3, 0.3, 0.4), filter_size=5))
    check_grads(ms, (x,), 1, modes=("rev",))
    grad_at_optimum = jax.jit(
        jax.grad(lambda u: image.ms_ssim_loss(u, x, weights=(0.3, 0.3, 0.4), filter_size=5)[0])
    )(x)
    np.testing.assert_allclose(grad_at_optimum, 0.0, atol=1e-10)


def test_negative_contrast_structure_is_clamped():
    x, _ = _images(5, (2, 44, 44, 1))
    x = jnp.asarray(x, jnp.float32)
    y = 1.0 - x  # anti-correlated: cs < 0 at the finest scale
    kw = dict(weights=(0.3, 0.3, 0.4), filter_size=11)
    value, grad = jax.jit(jax.value_and_grad(lambda u: jnp.sum(image.ms_ssim_loss(u, y, **kw))))(x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(_ms_ssim(x, y, **kw), 0.0, atol=1e-6)
    assert float(jnp.min(_ssim(x, y))) < 0  # SSIM itself may be negative


def test_bfloat16_and_extreme_values():
    x, y = _images(6, (1, 32, 32, 1))
    ref = _ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    low = _ssim(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=0.02)
    big = jnp.asarray(x * 1e4, jnp.float32)
    value, grad = jax.jit(jax.value_and_grad(lambda u: image.ssim_loss(u, big * 0.5)[0]))(big)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_errors():
    small = jnp.zeros((1, 100, 100, 1))
    with pytest.raises(ValueError, match=r"at least 176 x 176.*\(1, 100, 100, 1\)"):
        image.ms_ssim(small, small)
    with pytest.raises(ValueError, match=r"at least 11 x 11.*\(1, 8, 8, 1\)"):
        image.ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"y: expected the shape of x"):
        image.ssim(jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 2)))
    with pytest.raises(ValueError, match=r"x: expected images of shape \(N, H, W, C\)"):
        image.ssim(jnp.zeros((16, 16)), jnp.zeros((16, 16)))
    with pytest.raises(TypeError, match=r"x: expected a floating-point"):
        image.ssim(jnp.zeros((1, 16, 16, 1), jnp.int32), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match=r"max_val: expected the data range L > 0, got 0"):
        image.ssim(jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 1)), max_val=0)
    with pytest.raises(ValueError, match=r"weights: expected a non-empty sequence"):
        image.ms_ssim(small, small, weights=())
