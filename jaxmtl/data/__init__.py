"""Offline data sets, multi-task constructions, tfds loaders and deterministic batching.

* ``core``: :class:`Dataset` (train / validation / test dicts of NumPy arrays),
  ``split_indices``, ``batch_at`` (the batch of update ``k``: a pure function, so runs
  resume exactly) and :class:`BatchIterator`.
* ``offline``: ``digits``, ``textures``, ``photos``, ``mnist1d``, ``shapes`` (four tasks on
  one input), ``multi_digits`` (two tasks), all generated or bundled, never downloaded.
* ``glyphs``: ``glyphs``, ~12,000 characters (177 classes) rendered from matplotlib's
  bundled fonts: a broad pre-training set, seeded and cached on disk.
* ``tfds``: ``load_tfds`` for prepared ArrayRecord copies of MNIST, CIFAR-10, EuroSAT, ...
"""

from jaxmtl.data.core import BatchIterator, Dataset, batch_at, batches_per_epoch, split_indices
from jaxmtl.data.glyphs import GLYPH_CLASSES, glyphs, render_glyphs
from jaxmtl.data.offline import (
    PHOTOS,
    SHAPE_NAMES,
    TEXTURES,
    digits,
    mnist1d,
    multi_digits,
    photos,
    render_shapes,
    shapes,
    textures,
)
from jaxmtl.data.tfds import TASK_ARITHMETIC, DataNotPreparedError, load_tfds

__all__ = [
    "GLYPH_CLASSES",
    "PHOTOS",
    "SHAPE_NAMES",
    "TASK_ARITHMETIC",
    "TEXTURES",
    "BatchIterator",
    "DataNotPreparedError",
    "Dataset",
    "batch_at",
    "batches_per_epoch",
    "digits",
    "glyphs",
    "load_tfds",
    "mnist1d",
    "multi_digits",
    "photos",
    "render_glyphs",
    "render_shapes",
    "shapes",
    "split_indices",
    "textures",
]
