"""Glyphs: ~160 classes of characters rendered from matplotlib's bundled fonts, offline.

A broad pre-training set with no overlap with the evaluated tasks' labels: Latin letters,
digits, Greek, Cyrillic and symbols, each image a random font (DejaVu Sans / Serif / Mono,
STIX, Computer Modern; several weights and slants), stroke weight, size, rotation, shift
and pixel noise. It plays the part of CLIP's broad pre-training in "Task Arithmetic in the
Tangent Space" (Ortiz-Jimenez et al., NeurIPS 2023, Sec. 6: weight disentanglement emerges
from pre-training) at CPU scale.

Rendering: every (font, character) is rasterized once by FreeType (``matplotlib.ft2font``)
at a high resolution, then each sample warps it (one affine map: scale, rotation, shift)
onto a ``2 * size`` canvas, averages 2x2 blocks (anti-aliasing) and adds Gaussian noise.
Everything is a function of ``seed``; :func:`glyphs` stores the arrays (``np.savez``,
written atomically) under ``cache_dir`` and reads them back on later calls.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxmtl.data.core import Dataset

__all__ = ["GLYPH_CLASSES", "GLYPH_FONTS", "glyphs", "render_glyphs"]

_LATIN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
# Greek and Cyrillic letters that are not homoglyphs of a Latin (or of each other's) letter
_GREEK = "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθλμξπστφχψω"
_CYRILLIC = "БДЖЗИЙЛЦЧШЩЪЫЬЭЮЯбвгджзийклмнптфцчшщъыьэюя"
_SYMBOLS = "+=<>%&@#$?!*/()[]{}~§¶€£¥±×÷≠≤≥∞√∫∂∇→←↑↓♠♣♥♦★"
#: The class characters, in label order.
GLYPH_CLASSES: tuple[str, ...] = tuple(_LATIN + _DIGITS + _GREEK + _CYRILLIC + _SYMBOLS)
_ALNUM = set(_LATIN + _DIGITS)
#: (font file in matplotlib's ``fonts/ttf``, whether it may render non-ASCII classes).
#: Computer Modern files use TeX encodings beyond ASCII letters and digits: alphanumerics only.
GLYPH_FONTS: tuple[tuple[str, bool], ...] = (
    ("DejaVuSans.ttf", True),
    ("DejaVuSans-Bold.ttf", True),
    ("DejaVuSans-Oblique.ttf", True),
    ("DejaVuSans-BoldOblique.ttf", True),
    ("DejaVuSansMono.ttf", True),
    ("DejaVuSansMono-Bold.ttf", True),
    ("DejaVuSerif.ttf", True),
    ("DejaVuSerif-Bold.ttf", True),
    ("DejaVuSerif-Italic.ttf", True),
    ("DejaVuSerif-BoldItalic.ttf", True),
    ("STIXGeneral.ttf", True),
    ("STIXGeneralBol.ttf", True),
    ("STIXGeneralItalic.ttf", True),
    ("cmr10.ttf", False),
    ("cmss10.ttf", False),
    ("cmtt10.ttf", False),
    ("cmb10.ttf", False),
)
_RENDER_PX = 48  # FreeType rendering size of the canonical bitmaps
_VERSION = 1  # bump when the rendering changes: it is part of the cache key


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _rasterize(font_file: str, char: str) -> np.ndarray | None:
    """The glyph's ink as a float32 bitmap in [0, 1] (cropped), or None if the font lacks it."""
    from matplotlib.ft2font import FT2Font

    font = FT2Font(str(_font_dir() / font_file))
    if font.get_char_index(ord(char)) == 0:
        return None
    font.set_size(_RENDER_PX, 72)
    font.set_text(char, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    image = np.asarray(font.get_image(), np.float32) / 255.0
    rows, cols = np.nonzero(image > 0.05)
    if len(rows) == 0:
        return None
    return image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


@functools.lru_cache(maxsize=1)
def _bitmaps() -> tuple[tuple[np.ndarray, ...], ...]:
    """Per class, the canonical bitmaps of every font that has the character."""
    out = []
    for char in GLYPH_CLASSES:
        found = []
        for font_file, unicode_ok in GLYPH_FONTS:
            if not unicode_ok and char not in _ALNUM:
                continue
            bitmap = _rasterize(font_file, char)
            if bitmap is not None:
                found.append(bitmap)
        if not found:
            raise RuntimeError(f"no bundled font renders the glyph {char!r}")
        out.append(tuple(found))
    return tuple(out)


def _warp(bitmap: np.ndarray, size: int, scale: float, angle: float, shift: np.ndarray):
    """``bitmap`` centered on a ``(2 size, 2 size)`` canvas: the font's em ``scale`` of the
    canvas (so that glyphs keep their relative sizes: ``l`` is taller than ``I``), rotated
    by ``angle`` (radians), shifted by ``shift`` canvas pixels; bilinear."""
    from scipy.ndimage import map_coordinates

    canvas = 2 * size
    h, w = bitmap.shape
    zoom = scale * canvas / _RENDER_PX  # canvas pixels per bitmap pixel
    cos, sin = np.cos(angle), np.sin(angle)
    grid = np.arange(canvas, dtype=np.float64) - (canvas - 1) / 2
    v, u = np.meshgrid(grid - shift[0], grid - shift[1], indexing="ij")
    # inverse map: canvas offset -> rotate back -> bitmap pixels around its center
    rows = (cos * v - sin * u) / zoom + (h - 1) / 2
    cols = (sin * v + cos * u) / zoom + (w - 1) / 2
    return map_coordinates(bitmap, [rows, cols], order=1, cval=0.0)


def render_glyphs(
    labels: np.ndarray, *, size: int = 16, seed: int = 0, augment: bool = True
) -> np.ndarray:
    """Images ``(N, size, size)`` float32 in [0, 1] of the classes ``labels`` (indices into
    :data:`GLYPH_CLASSES`).

    With ``augment`` each image draws a font (among those with the glyph), a stroke weight
    (grey dilation of 0-2 pixels at the rendering size), an em size (0.7-1.1 of the canvas),
    a rotation (±20 degrees), a shift (±12% of the canvas) and noise (std 0-0.08);
    without it, the first font, upright, centered, noiseless (the canonical render).
    """
    from scipy.ndimage import grey_dilation

    labels = np.asarray(labels)
    classes = len(GLYPH_CLASSES)
    if labels.ndim != 1 or (labels.size and not 0 <= labels.min() <= labels.max() < classes):
        raise ValueError(
            f"labels: expected (N,) class indices in [0, {len(GLYPH_CLASSES)}), got "
            f"shape {labels.shape}"
        )
    if int(size) != size or size < 4:
        raise ValueError(f"size: expected an integer >= 4, got {size!r}")
    bitmaps = _bitmaps()
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), size, size), np.float32)
    for n, label in enumerate(labels):
        fonts = bitmaps[int(label)]
        if not augment:
            image = _warp(fonts[0], size, 0.9, 0.0, np.zeros(2))
        else:
            bitmap = fonts[rng.integers(len(fonts))]
            weight = int(rng.integers(3))
            if weight:
                bitmap = grey_dilation(np.pad(bitmap, weight), size=(weight + 1, weight + 1))
            image = _warp(
                bitmap,
                size,
                rng.uniform(0.7, 1.1),
                np.deg2rad(rng.uniform(-20.0, 20.0)),
                rng.uniform(-0.12, 0.12, 2) * 2 * size,
            )
        image = image.reshape(size, 2, size, 2).mean(axis=(1, 3))
        if augment:
            image = image + rng.normal(0.0, rng.uniform(0.0, 0.08), image.shape)
        out[n] = np.clip(image, 0.0, 1.0)
    return out


def _generate(num_per_class: int, size: int, seed: int, fractions) -> dict[str, np.ndarray]:
    classes = len(GLYPH_CLASSES)
    labels = np.tile(np.arange(classes, dtype=np.int32), num_per_class)
    labels = labels[np.random.default_rng(seed).permutation(len(labels))]
    x = render_glyphs(labels, size=size, seed=seed + 1)
    # balanced splits: each class's examples are cut in the same proportions
    split = np.empty(len(labels), np.int8)
    counts = [round(f * num_per_class) for f in fractions[:2]]
    for c in range(classes):
        where = np.flatnonzero(labels == c)
        split[where] = 2
        split[where[: counts[0]]] = 0
        split[where[counts[0] : counts[0] + counts[1]]] = 1
    return {"x": x, "y": labels, "split": split}


def glyphs(
    *,
    num_per_class: int = 70,
    size: int = 16,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    cache_dir: str | os.PathLike | None = "~/.cache/jaxmtl",
) -> Dataset:
    """The glyphs data set: ``len(GLYPH_CLASSES)`` (177) balanced classes, seeded.

    ``num_per_class=70`` gives 12,390 images (a few seconds to render on one core, once:
    the arrays are stored in ``cache_dir`` as ``glyphs-<key>.npz`` and read back on later
    calls; ``cache_dir=None`` renders every time). Each class's images are split by
    ``fractions`` (train, validation, test).

    Returns: x ``(N, size, size)`` float32 in [0, 1], y ``(N,)`` int32; ``class_names``
    holds the characters.

    >>> ds = glyphs(num_per_class=10, cache_dir=None)
    >>> ds.num_classes, ds.train["x"].shape, ds.test["y"].shape
    ((177,), (1416, 16, 16), (177,))
    """
    if int(num_per_class) != num_per_class or num_per_class < 1:
        raise ValueError(f"num_per_class: expected an integer >= 1, got {num_per_class!r}")
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions: expected three shares summing to 1, got {fractions!r}")
    settings = {
        "num_per_class": int(num_per_class),
        "size": int(size),
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "version": _VERSION,
        "classes": "".join(GLYPH_CLASSES),
        "fonts": [f for f, _ in GLYPH_FONTS],
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    arrays = None
    path = None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser() / f"glyphs-{key}.npz"
        if path.exists():
            with np.load(path) as stored:
                arrays = {k: stored[k] for k in ("x", "y", "split")}
    if arrays is None:
        arrays = _generate(int(num_per_class), int(size), int(seed), fractions)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    parts = [
        {"x": arrays["x"][arrays["split"] == s], "y": arrays["y"][arrays["split"] == s]}
        for s in range(3)
    ]
    return Dataset(
        "glyphs",
        *parts,
        num_classes=(len(GLYPH_CLASSES),),
        tasks=("glyph",),
        class_names=(GLYPH_CLASSES,),
    )
