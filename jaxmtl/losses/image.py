"""Structural similarity (SSIM, MS-SSIM) and the perceptual losses built on them.

* Wang, Bovik, Sheikh, Simoncelli, "Image Quality Assessment: From Error Visibility to
  Structural Similarity", IEEE TIP 2004 (SSIM, Eq. 6-13).
* Wang, Simoncelli, Bovik, "Multiscale Structural Similarity for Image Quality Assessment",
  Asilomar 2003 (MS-SSIM, Eq. 7, and the five-scale weights).
* Snell, Ridgeway, Liao, Roads, Mozer, Zemel, "Learning to Generate Images with Perceptual
  Similarity Metrics", ICIP 2017 / arXiv 1511.06409 (2015): train with ``1 - MS-SSIM``.

Images are NHWC, ``(N, H, W, C)``, with values in ``[0, max_val]``. Local statistics use a
normalized Gaussian window (11 x 11, sigma 1.5, applied separably) in "valid" mode, i.e. only
where the window fits inside the image, like Wang's reference code and skimage on the region
it does not pad. Each function returns one value per image, shape (N,). 16-bit inputs are
computed in float32 and the result is cast back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for 16-bit inputs, the input dtype otherwise (strict promotion safe)."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


__all__ = [
    "MS_SSIM_WEIGHTS",
    "gaussian_window",
    "min_ms_ssim_size",
    "ms_ssim",
    "ms_ssim_loss",
    "ssim",
    "ssim_loss",
]

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Wang et al. (2003) five-scale exponents beta_1..beta_5 (alpha_5 = beta_5); they sum to 1.0001."""


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The 1-D normalized Gaussian ``g``; the 2-D SSIM window is ``outer(g, g)``.

    Wang et al., IEEE TIP 2004, Sec. III-C: circular-symmetric Gaussian weights,
    11 x 11, standard deviation 1.5 samples, normalized to unit sum.

    >>> w = gaussian_window(5, 1.0)
    >>> print(w.round(4), f"{w.sum():.4f}")
    [0.0545 0.2442 0.4026 0.2442 0.0545] 1.0000
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a value > 0, got {sigma}")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(offsets**2) / (2.0 * sigma * sigma))
    return g / g.sum()


def _check_images(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, y = jnp.asarray(x), jnp.asarray(y)
    for name, a in (("x", x), ("y", y)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a floating-point image array, got dtype {a.dtype}")
        if a.ndim != 4 or a.shape[-1] < 1:
            raise ValueError(f"{name}: expected images of shape (N, H, W, C), got shape {a.shape}")
    if x.shape != y.shape:
        raise ValueError(f"y: expected the shape of x {x.shape}, got {y.shape}")
    return x, y


def _check_constants(max_val: float, filter_size: int, sigma: float, k1: float, k2: float):
    if not max_val > 0:
        raise ValueError(f"max_val: expected the data range L > 0, got {max_val}")
    if not isinstance(filter_size, int) or filter_size < 1:
        raise ValueError(f"filter_size: expected a positive int, got {filter_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a value > 0, got {sigma}")
    for name, k in (("k1", k1), ("k2", k2)):
        if not k > 0:
            raise ValueError(f"{name}: expected a value > 0, got {k}")


def _blur(images: jax.Array, window: np.ndarray) -> jax.Array:
    """Separable 'valid' correlation of every channel with ``outer(window, window)``."""
    channels = images.shape[-1]
    taps = jnp.asarray(window, images.dtype)
    dims = ("NHWC", "HWIO", "NHWC")
    hp = jax.lax.Precision.HIGHEST
    kernel_h = jnp.tile(taps[:, None, None, None], (1, 1, 1, channels))
    kernel_w = jnp.tile(taps[None, :, None, None], (1, 1, 1, channels))
    out = jax.lax.conv_general_dilated(
        images, kernel_h, (1, 1), "VALID", dimension_numbers=dims,
        feature_group_count=channels, precision=hp,
    )  # fmt: skip
    return jax.lax.conv_general_dilated(
        out, kernel_w, (1, 1), "VALID", dimension_numbers=dims,
        feature_group_count=channels, precision=hp,
    )  # fmt: skip


def _ssim_maps(
    x: jax.Array, y: jax.Array, window: np.ndarray, c1: float, c2: float
) -> tuple[jax.Array, jax.Array]:
    """Luminance map ``l`` and contrast-structure map ``cs`` (Wang et al. 2004, Eq. 13)."""
    channels = x.shape[-1]
    stats = _blur(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), window)
    mu_x, mu_y, exx, eyy, exy = (stats[..., i * channels : (i + 1) * channels] for i in range(5))
    var_x = exx - mu_x * mu_x
    var_y = eyy - mu_y * mu_y
    cov = exy - mu_x * mu_y
    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2.0 * cov + c2) / (var_x + var_y + c2)
    return luminance, contrast_structure


def _safe_power(base: jax.Array, exponent: float) -> jax.Array:
    """``max(base, 0) ** exponent`` with a zero (not NaN) gradient where ``base <= 0``."""
    positive = base > 0
    return jnp.where(positive, jnp.where(positive, base, 1.0) ** exponent, 0.0)


def ssim(
    x: jax.Array,
    y: jax.Array,
    *,
    max_val: float = 1.0,
    filter_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Mean structural similarity of each image pair, shape (N,).

    Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity",
    IEEE TIP 2004, Eq. 13 with Gaussian-weighted local statistics (Sec. III-C):

        SSIM = mean over pixels and channels of
               (2 mu_x mu_y + C1) (2 sigma_xy + C2)
             / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2)),

    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = max_val`` (the data range), over the
    ``(H - filter_size + 1) x (W - filter_size + 1)`` positions where the window fits.

    Args:
      x, y: (N, H, W, C) images with H, W >= filter_size.
      max_val: data range L (1 for images in [0, 1], 255 for 8-bit).

    >>> x = jnp.full((1, 11, 11, 1), 0.5)
    >>> print(ssim(x, x), ssim(x, jnp.full((1, 11, 11, 1), 0.25)).round(5))
    [1.] [0.80006]
    """
    x, y = _check_images(x, y)
    _check_constants(max_val, filter_size, sigma, k1, k2)
    h, w = x.shape[1:3]
    if min(h, w) < filter_size:
        raise ValueError(
            f"x: expected images of at least {filter_size} x {filter_size} pixels "
            f"(filter_size), got shape {x.shape}"
        )
    dtype = jnp.result_type(x.dtype, y.dtype)
    work = _compute_dtype(dtype)
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    luminance, cs = _ssim_maps(
        x.astype(work), y.astype(work), gaussian_window(filter_size, sigma), c1, c2
    )
    return jnp.mean(luminance * cs, axis=(1, 2, 3)).astype(dtype)


def ssim_loss(
    x: jax.Array,
    y: jax.Array,
    *,
    max_val: float = 1.0,
    filter_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """``1 - SSIM(x, y)`` per image, shape (N,).

    The single-scale perceptual loss of Snell et al., arXiv 1511.06409 (the ICLR 2016
    version); SSIM as in :func:`ssim` (Wang et al., IEEE TIP 2004, Eq. 13).

    >>> x = jnp.full((2, 11, 11, 3), 0.5)
    >>> print(ssim_loss(x, x))
    [0. 0.]
    """
    value = ssim(x, y, max_val=max_val, filter_size=filter_size, sigma=sigma, k1=k1, k2=k2)
    return 1.0 - value


def min_ms_ssim_size(num_scales: int, filter_size: int = 11) -> int:
    """Smallest side (pixels) for ``num_scales`` scales: ``filter_size * 2**(num_scales - 1)``.

    Wang, Simoncelli, Bovik 2003, Sec. 2: each scale halves the image, and the window must fit
    at the coarsest one ("valid" statistics).

    >>> min_ms_ssim_size(5)
    176
    """
    return filter_size * 2 ** (num_scales - 1)


def ms_ssim(
    x: jax.Array,
    y: jax.Array,
    *,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    max_val: float = 1.0,
    filter_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Multi-scale structural similarity of each image pair, in [0, 1], shape (N,).

    Wang, Simoncelli, Bovik, "Multiscale Structural Similarity for Image Quality
    Assessment", 2003, Eq. 7, per channel, then averaged over channels (Snell et al. 2015):

        MS-SSIM = [mean l_M cs_M]^{beta_M} * prod_{j < M} [mean cs_j]^{beta_j},

    M = ``len(weights)`` scales with a 2 x 2 average pooling (stride 2, odd edges dropped)
    between scales. At the coarsest scale the mean of ``l * cs`` is used, as in Wang's
    reference code ``msssim.m`` and TensorFlow (Eq. 7 writes ``[l_M]^alpha_M [cs_M]^beta_M``;
    the two agree when cs_M or l_M is constant). A negative mean at some scale would make the
    fractional power undefined; it is clamped at 0, as common implementations do.

    Args:
      x, y: (N, H, W, C) images; H, W >= ``filter_size * 2**(M - 1)`` (176 for 5 scales).
      weights: per-scale exponents (default: the published five, summing to 1.0001).
      max_val: data range L.

    >>> x = jnp.full((1, 176, 176, 1), 0.5)
    >>> print(f"{ms_ssim(x, jnp.full((1, 176, 176, 1), 0.25))[0]:.5f}")
    0.97070
    """
    x, y = _check_images(x, y)
    _check_constants(max_val, filter_size, sigma, k1, k2)
    weights = tuple(float(w) for w in weights)
    if not weights or any(not w > 0 or not math.isfinite(w) for w in weights):
        raise ValueError(
            f"weights: expected a non-empty sequence of positive floats, got {weights}"
        )
    minimum = min_ms_ssim_size(len(weights), filter_size)
    if min(x.shape[1:3]) < minimum:
        raise ValueError(
            f"x: expected images of at least {minimum} x {minimum} pixels for "
            f"{len(weights)} scales with filter_size {filter_size}, got shape {x.shape}"
        )
    dtype = jnp.result_type(x.dtype, y.dtype)
    work = _compute_dtype(dtype)
    x, y = x.astype(work), y.astype(work)
    window = gaussian_window(filter_size, sigma)
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    value = jnp.ones(x.shape[:1] + x.shape[3:], work)  # (N, C)
    for scale, weight in enumerate(weights):
        luminance, cs = _ssim_maps(x, y, window, c1, c2)
        if scale == len(weights) - 1:
            value = value * _safe_power(jnp.mean(luminance * cs, axis=(1, 2)), weight)
        else:
            value = value * _safe_power(jnp.mean(cs, axis=(1, 2)), weight)
            x, y = _average_pool(x), _average_pool(y)
    return jnp.mean(value, axis=-1).astype(dtype)


def _average_pool(images: jax.Array) -> jax.Array:
    n, h, w, c = images.shape
    h2, w2 = h // 2, w // 2
    cropped = images[:, : 2 * h2, : 2 * w2, :]
    return cropped.reshape(n, h2, 2, w2, 2, c).mean(axis=(2, 4))


def ms_ssim_loss(
    x: jax.Array,
    y: jax.Array,
    *,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    max_val: float = 1.0,
    filter_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """``1 - MS-SSIM(x, y)`` per image, shape (N,).

    Snell et al., "Learning to Generate Images with Perceptual Similarity Metrics", ICIP
    2017 / arXiv 1511.06409, Sec. 2 (the training loss), with MS-SSIM of :func:`ms_ssim`.
    For small images pass fewer ``weights`` (e.g. three renormalized scales) and/or a smaller
    ``filter_size``; the minimum size is ``filter_size * 2**(len(weights) - 1)``.

    >>> x = jnp.full((1, 28, 28, 1), 0.5)
    >>> print(ms_ssim_loss(x, x, weights=(0.5, 0.5), filter_size=7).round(5))
    [0.]
    """
    value = ms_ssim(
        x, y, weights=weights, max_val=max_val, filter_size=filter_size, sigma=sigma, k1=k1, k2=k2
    )
    return 1.0 - value
