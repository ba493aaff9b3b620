"""jaxmtl.data.glyphs: balanced, deterministic, cached, every class distinct."""

import importlib

import numpy as np
import pytest

from jaxmtl import data as jdata

glyph_module = importlib.import_module("jaxmtl.data.glyphs")


def test_balance_shapes_and_dtypes():
    ds = jdata.glyphs(num_per_class=10, cache_dir=None)
    classes = len(jdata.GLYPH_CLASSES)
    assert ds.num_classes == (classes,) and len(ds.class_names[0]) == classes
    assert len(set(jdata.GLYPH_CLASSES)) == classes >= 150
    for split, per_class in (("train", 8), ("validation", 1), ("test", 1)):
        part = getattr(ds, split)
        assert part["x"].shape == (classes * per_class, 16, 16)
        assert part["x"].dtype == np.float32 and part["y"].dtype == np.int32
        assert 0.0 <= part["x"].min() and part["x"].max() <= 1.0
        assert np.array_equal(
            np.bincount(part["y"], minlength=classes), np.full(classes, per_class)
        )


def test_deterministic_and_cached(tmp_path):
    first = jdata.glyphs(num_per_class=2, seed=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("glyphs-*.npz"))) == 1
    again = jdata.glyphs(num_per_class=2, seed=3, cache_dir=tmp_path)  # read back
    fresh = jdata.glyphs(num_per_class=2, seed=3, cache_dir=None)  # rendered again
    other = jdata.glyphs(num_per_class=2, seed=4, cache_dir=None)
    for split in ("train", "validation", "test"):
        for key in ("x", "y"):
            assert np.array_equal(getattr(first, split)[key], getattr(again, split)[key])
            assert np.array_equal(getattr(first, split)[key], getattr(fresh, split)[key])
    assert not np.array_equal(first.train["x"], other.train["x"])


def test_every_class_renders_distinctly():
    classes = len(jdata.GLYPH_CLASSES)
    canonical = jdata.render_glyphs(np.arange(classes), augment=False)
    assert canonical.shape == (classes, 16, 16)
    assert np.all(canonical.max(axis=(1, 2)) > 0.3), "a class renders blank"
    flat = canonical.reshape(classes, -1)
    dist = ((flat[:, None] - flat[None]) ** 2).mean(-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 0.0, "two classes render identically"
    # every class is rendered by several fonts, each of which has the glyph
    bitmaps = glyph_module._bitmaps()
    assert min(len(b) for b in bitmaps) >= 5
    # the augmented mean images differ too
    labels = np.repeat(np.arange(classes), 4)
    means = jdata.render_glyphs(labels, seed=0).reshape(classes, 4, -1).mean(1)
    dist = ((means[:, None] - means[None]) ** 2).mean(-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_per_class"):
        jdata.glyphs(num_per_class=0, cache_dir=None)
    with pytest.raises(ValueError, match="fractions"):
        jdata.glyphs(num_per_class=2, fractions=(0.5, 0.5, 0.5), cache_dir=None)
    with pytest.raises(ValueError, match="labels"):
        jdata.render_glyphs(np.array([len(jdata.GLYPH_CLASSES)]))
