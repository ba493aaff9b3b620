"""Offline data sets: nothing is downloaded, every set is generated or ships with a package.

* :func:`digits` — scikit-learn's bundled 8x8 handwritten digits (1,797 images).
* :func:`textures`, :func:`photos` — patches of scikit-image's bundled images, the class
  being the source image; train, validation and test patches come from disjoint bands of
  each image, so no test pixel is ever seen in training.
* :func:`mnist1d` — the MNIST-1D generator (Greydanus & Kobak, "Scaling Down Deep
  Learning with MNIST-1D", ICML 2024), run locally.
* :func:`shapes` — procedural images with four labelled factors (shape, scale, position,
  orientation): four tasks on one input.
* :func:`multi_digits` — the Multi-MNIST recipe (Sabour et al. 2017; Sener & Koltun,
  "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018) on the digits: two
  digits overlapping on one canvas, tasks "left" and "right".

Every loader is deterministic in its ``seed`` and returns a :class:`~jaxmtl.data.Dataset`
with float32 inputs in ``[0, 1]`` and int32 labels.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxmtl.data.core import Dataset, split_indices

__all__ = [
    "PHOTOS",
    "SHAPE_NAMES",
    "TEXTURES",
    "digits",
    "mnist1d",
    "multi_digits",
    "photos",
    "shapes",
    "textures",
]

FRACTIONS = (0.7, 0.15, 0.15)
TEXTURES = ("brick", "grass", "gravel", "cell")
PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "coins", "moon", "rocket", "clock")
SHAPE_NAMES = ("square", "triangle", "ellipse", "cross")


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _from_indices(x: np.ndarray, y: np.ndarray, parts) -> list[dict[str, np.ndarray]]:
    return [{"x": x[p], "y": y[p]} for p in parts]


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int32)


def digits(*, seed: int = 0, fractions: tuple[float, float, float] = FRACTIONS) -> Dataset:
    """scikit-learn's 8x8 digits: x ``(N, 8, 8)`` in ``[0, 1]``, y ``(N,)`` in ``0..9``.

    >>> ds = digits()
    >>> ds.train["x"].shape[1:], ds.num_classes
    ((8, 8), (10,))
    """
    images, labels = _digit_images()
    train, val, test = _from_indices(
        images, labels, split_indices(len(labels), fractions, seed=seed)
    )
    names = tuple(str(d) for d in range(10))
    return Dataset("digits", train, val, test, (10,), ("digit",), (names,))


# --------------------------------------------------------------------------- image patches


@functools.lru_cache(maxsize=16)
def _gray_image(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.2125, 0.7154, 0.0721])  # luminance, as skimage
    return (image / 255.0).astype(np.float32)


def _patches(
    images: dict[str, np.ndarray],
    *,
    patch: int,
    zoom: int,
    per_image: int,
    seed: int,
    fractions: tuple[float, float, float],
) -> tuple[list[dict[str, np.ndarray]], tuple[str, ...]]:
    """Random patches per image from three disjoint horizontal bands (train, val, test)."""
    rng = np.random.default_rng(seed)
    size = patch * zoom
    splits: list[dict[str, list]] = [{"x": [], "y": []} for _ in range(3)]
    for label, (name, image) in enumerate(images.items()):
        height, width = image.shape
        bounds = np.round(np.cumsum((0.0, *fractions)) * height).astype(int)
        for s in range(3):
            top, bottom = bounds[s], bounds[s + 1]
            count = max(1, round(per_image * fractions[s] / fractions[0]))
            if bottom - top < size or width < size:
                raise ValueError(
                    f"image {name!r} ({height}x{width}) is too small for patches of "
                    f"{patch}x{zoom}={size} pixels in the split fractions {fractions}"
                )
            rows = rng.integers(top, bottom - size + 1, count)
            cols = rng.integers(0, width - size + 1, count)
            crops = np.stack(
                [image[r : r + size, c : c + size] for r, c in zip(rows, cols, strict=True)]
            )
            crops = crops.reshape(count, patch, zoom, patch, zoom).mean(axis=(2, 4))
            splits[s]["x"].append(crops.astype(np.float32))
            splits[s]["y"].append(np.full(count, label, np.int32))
    out = [{k: np.concatenate(v) for k, v in split.items()} for split in splits]
    for s, split in enumerate(out):  # interleave the classes
        order = np.random.default_rng([seed, s]).permutation(len(split["y"]))
        out[s] = {k: v[order] for k, v in split.items()}
    return out, tuple(images)


def _patch_dataset(
    kind: str, names, *, patch: int, zoom: int, per_image: int, seed: int, fractions
) -> Dataset:
    """The arguments of :func:`textures` and :func:`photos`, checked, and their data set."""
    names = tuple(names)
    unknown = [n for n in names if n not in TEXTURES + PHOTOS]
    if unknown or len(names) < 2:
        raise ValueError(f"{kind} needs >= 2 image names from {TEXTURES + PHOTOS}, got {names}")
    images = {n: _gray_image(n) for n in names}
    (train, val, test), classes = _patches(
        images,
        patch=_check_positive_int("patch", patch),
        zoom=_check_positive_int("zoom", zoom),
        per_image=_check_positive_int("per_image", per_image),
        seed=seed,
        fractions=fractions,
    )
    return Dataset(kind, train, val, test, (len(classes),), ("source",), (classes,))


def textures(
    *,
    names: tuple[str, ...] = TEXTURES,
    patch: int = 16,
    zoom: int = 2,
    per_image: int = 400,
    seed: int = 0,
    fractions: tuple[float, float, float] = FRACTIONS,
) -> Dataset:
    """Texture recognition on patches of scikit-image's brick, grass, gravel, cell images.

    Each patch covers ``patch * zoom`` pixels, averaged down ``zoom`` times to ``patch``.
    Train, validation and test patches lie in disjoint bands of rows of each image.

    Returns: x ``(N, patch, patch)`` in ``[0, 1]``, y ``(N,)`` the source image.

    >>> ds = textures(per_image=20)
    >>> ds.train["x"].shape, ds.class_names[0]
    ((80, 16, 16), ('brick', 'grass', 'gravel', 'cell'))
    """
    return _patch_dataset(
        "textures",
        names,
        patch=patch,
        zoom=zoom,
        per_image=per_image,
        seed=seed,
        fractions=fractions,
    )


def photos(
    *,
    names: tuple[str, ...] = PHOTOS,
    patch: int = 16,
    zoom: int = 2,
    per_image: int = 200,
    seed: int = 0,
    fractions: tuple[float, float, float] = FRACTIONS,
) -> Dataset:
    """Which photograph a patch comes from, on scikit-image's bundled photos (grayscale).

    Same construction as :func:`textures` (disjoint bands per split).

    >>> photos(per_image=10).num_classes
    (8,)
    """
    return _patch_dataset(
        "photos", names, patch=patch, zoom=zoom, per_image=per_image, seed=seed, fractions=fractions
    )


# --------------------------------------------------------------------------- mnist1d


def mnist1d(
    *, num_samples: int = 5000, seed: int = 0, fractions: tuple[float, float, float] = FRACTIONS
) -> Dataset:
    """MNIST-1D (generated locally by the ``mnist1d`` package, never downloaded).

    The generator's standardized signals are mapped to ``[0, 1]`` by the train split's
    range (clipped outside it). The generator seeds NumPy's global random state; that
    state is restored afterwards.

    Returns: x ``(N, 40)``, y ``(N,)`` in ``0..9``.

    >>> mnist1d(num_samples=200).train["x"].shape
    (140, 40)
    """
    from mnist1d.data import get_dataset_args, make_dataset

    num_samples = _check_positive_int("num_samples", num_samples, minimum=10)
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, 1.0
    saved = np.random.get_state()  # noqa: NPY002 (mnist1d seeds the global state)
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(saved)  # noqa: NPY002
    x, y = np.asarray(raw["x"], np.float64), np.asarray(raw["y"], np.int32)
    parts = split_indices(len(y), fractions, seed=seed)
    lo, hi = x[parts[0]].min(), x[parts[0]].max()
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    train, val, test = _from_indices(x, y, parts)
    return Dataset("mnist1d", train, val, test, (10,), ("digit",))


# --------------------------------------------------------------------------- shapes


def _inside(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether local coordinates (unit radius) fall inside each sample's shape."""
    square = np.maximum(np.abs(u), np.abs(v)) <= 0.75
    triangle = (v >= -0.5) & (np.sqrt(3) * u + v <= 1) & (-np.sqrt(3) * u + v <= 1)
    ellipse = u**2 + (v / 0.5) ** 2 <= 1
    cross = ((np.abs(u) <= 1) & (np.abs(v) <= 0.3)) | ((np.abs(u) <= 0.3) & (np.abs(v) <= 1))
    k = kind[:, None, None]
    return np.where(k == 0, square, np.where(k == 1, triangle, np.where(k == 2, ellipse, cross)))


def render_shapes(
    shape: np.ndarray,
    radius: np.ndarray,
    center: np.ndarray,
    angle: np.ndarray,
    intensity: np.ndarray,
    *,
    size: int,
    supersample: int = 4,
) -> np.ndarray:
    """Anti-aliased grayscale images of shapes, ``(N, size, size)`` float32 in [0, 1].

    Args:
      shape: ``(N,)`` int, an index into :data:`SHAPE_NAMES`.
      radius: ``(N,)`` the circumradius in pixels.
      center: ``(N, 2)`` (row, column) in pixels.
      angle: ``(N,)`` rotation in radians.
      intensity: ``(N,)`` foreground value.
      size: the canvas side; supersample: sub-pixels per pixel side.
    """
    grid = (np.arange(size * supersample) + 0.5) / supersample
    rows, cols = grid[None, :, None], grid[None, None, :]
    dr, dc = rows - center[:, 0, None, None], cols - center[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    r = radius[:, None, None]
    u, v = (cos * dc + sin * dr) / r, (-sin * dc + cos * dr) / r
    mask = _inside(shape, u, -v).astype(np.float32)
    n = len(shape)
    mask = mask.reshape(n, size, supersample, size, supersample).mean(axis=(2, 4))
    return (mask * intensity[:, None, None]).astype(np.float32)


def _shape_factors(rng: np.random.Generator, n: int, size: int) -> tuple[dict, np.ndarray]:
    labels = np.stack(
        [
            rng.integers(0, 4, n),  # shape
            rng.integers(0, 3, n),  # scale
            rng.integers(0, 4, n),  # position: quadrant
            rng.integers(0, 4, n),  # orientation: quarter of [0, 90) degrees
        ],
        axis=1,
    ).astype(np.int32)
    radius = size * np.array([0.12, 0.17, 0.22])[labels[:, 1]]
    quadrant = np.stack([labels[:, 2] // 2, labels[:, 2] % 2], axis=1)
    center = (quadrant + 0.5) * size / 2 + rng.uniform(-0.06, 0.06, (n, 2)) * size
    angle = np.deg2rad(22.5 * (labels[:, 3] + rng.uniform(0.1, 0.9, n)))
    factors = {
        "shape": labels[:, 0],
        "radius": radius,
        "center": center,
        "angle": angle,
        "intensity": rng.uniform(0.6, 1.0, n),
    }
    return factors, labels


def shapes(
    *,
    num_samples: int = 6000,
    size: int = 16,
    noise: float = 0.05,
    seed: int = 0,
    fractions: tuple[float, float, float] = FRACTIONS,
) -> Dataset:
    """Procedural shapes with four labelled factors: four tasks on one input.

    Tasks: ``shape`` (square, triangle, ellipse, cross), ``scale`` (three radii),
    ``position`` (the quadrant of the centre, jittered) and ``orientation`` (which quarter
    of [0, 90) degrees the rotation falls in; no shape has a symmetry under a rotation of
    less than 90 degrees, so the factor is visible). Factors are drawn independently;
    Gaussian pixel noise of std ``noise``, clipped to ``[0, 1]``.

    Returns: x ``(N, size, size)``, y ``(N, 4)``.

    >>> ds = shapes(num_samples=100)
    >>> ds.tasks, ds.num_classes, ds.train["y"].shape
    (('shape', 'scale', 'position', 'orientation'), (4, 3, 4, 4), (70, 4))
    """
    num_samples = _check_positive_int("num_samples", num_samples, minimum=10)
    size = _check_positive_int("size", size, minimum=8)
    if not 0 <= noise <= 0.5:
        raise ValueError(f"noise must be in [0, 0.5], got {noise}")
    rng = np.random.default_rng(seed)
    factors, labels = _shape_factors(rng, num_samples, size)
    images = render_shapes(
        **{k: factors[k] for k in ("radius", "center", "angle", "intensity")},
        shape=factors["shape"],
        size=size,
    )
    images = np.clip(images + rng.normal(0, noise, images.shape), 0, 1).astype(np.float32)
    train, val, test = _from_indices(
        images, labels, split_indices(num_samples, fractions, seed=seed)
    )
    names = (
        SHAPE_NAMES,
        ("small", "medium", "large"),
        ("top-left", "top-right", "bottom-left", "bottom-right"),
        ("0-22", "22-45", "45-67", "67-90"),
    )
    return Dataset(
        "shapes",
        train,
        val,
        test,
        (4, 3, 4, 4),
        ("shape", "scale", "position", "orientation"),
        names,
    )


# --------------------------------------------------------------------------- multi digits


def _overlay(left: np.ndarray, right: np.ndarray, shifts: np.ndarray, canvas: int) -> np.ndarray:
    """Left digit near the top-left corner, right digit near the bottom-right; pixelwise max."""
    n, h, w = left.shape
    out = np.zeros((n, canvas, canvas), np.float32)
    far = canvas - h
    for i in range(n):
        r0, c0, r1, c1 = shifts[i]
        a = np.zeros((canvas, canvas), np.float32)
        b = np.zeros((canvas, canvas), np.float32)
        a[r0 : r0 + h, c0 : c0 + w] = left[i]
        b[far - r1 : far - r1 + h, far - c1 : far - c1 + w] = right[i]
        out[i] = np.maximum(a, b)
    return out


def multi_digits(
    *,
    num_samples: int = 6000,
    canvas: int = 12,
    max_shift: int = 1,
    seed: int = 0,
    fractions: tuple[float, float, float] = FRACTIONS,
) -> Dataset:
    """MultiDigits: the Multi-MNIST construction on scikit-learn's 8x8 digits.

    Each example overlays two digits on a ``canvas x canvas`` image, one placed at the
    top-left and one at the bottom-right corner, each shifted by up to ``max_shift``
    pixels, so that they overlap (a 12 pixel canvas holds 8 pixel digits with a 4 pixel
    offset, the 36/28 proportion of Multi-MNIST). Pairs are drawn within each split of
    :func:`digits` (same ``seed``), so no test digit image appears in training.

    Returns: x ``(N, canvas, canvas)``, y ``(N, 2)``: tasks ``left`` and ``right``.

    >>> ds = multi_digits(num_samples=100)
    >>> ds.train["x"].shape, ds.tasks
    ((70, 12, 12), ('left', 'right'))
    """
    num_samples = _check_positive_int("num_samples", num_samples, minimum=10)
    if not 8 <= canvas <= 16:
        raise ValueError(f"canvas must be in [8, 16] for 8x8 digits, got {canvas}")
    far = canvas - 8
    if not 0 <= max_shift <= far:
        raise ValueError(f"max_shift must be in [0, {far}] for canvas={canvas}, got {max_shift}")
    base = digits(seed=seed, fractions=fractions)
    rng = np.random.default_rng([seed, 1])
    out = []
    for s, split in enumerate(base.splits.values()):
        n = max(1, round(num_samples * fractions[s]))
        pick = rng.integers(0, len(split["y"]), (n, 2))
        shifts = rng.integers(0, max_shift + 1, (n, 4))
        x = _overlay(split["x"][pick[:, 0]], split["x"][pick[:, 1]], shifts, canvas)
        out.append({"x": x, "y": split["y"][pick].astype(np.int32)})
    names = base.class_names * 2
    return Dataset("multi_digits", *out, (10, 10), ("left", "right"), names)
