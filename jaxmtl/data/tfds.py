"""Real image benchmarks through ``tfds.data_source`` (ArrayRecord; no TensorFlow needed).

Nothing is downloaded at run time. Prepare a data set once on a machine with TensorFlow::

    tfds build mnist --file_format=array_record --data_dir ~/tensorflow_datasets

and copy the folder; then ``load_tfds("mnist")`` reads it. The standard task-arithmetic
suite (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) is eight data
sets; :data:`TASK_ARITHMETIC` lists those tfds offers (GTSRB is not in the tfds catalog;
RESISC45 needs a manual download there), plus Fashion-MNIST and CIFAR-10.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxmtl.data.core import Dataset, split_indices

__all__ = ["TASK_ARITHMETIC", "TFDS_SPLITS", "DataNotPreparedError", "load_tfds"]

TASK_ARITHMETIC = (
    "cars196",
    "dtd",
    "eurosat/rgb",
    "mnist",
    "resisc45",
    "sun397",
    "svhn_cropped",
    "fashion_mnist",
    "cifar10",
)

# (train split, validation split or None to carve it out of train, test split)
TFDS_SPLITS = {
    "dtd": ("train", "validation", "test"),
    "eurosat/rgb": ("train[:80%]", None, "train[80%:]"),  # EuroSAT has one split
    "resisc45": ("train[:80%]", None, "train[80%:]"),
    "sun397": ("train", "validation", "test"),
}


class DataNotPreparedError(FileNotFoundError):
    """A tfds data set is not on disk in ArrayRecord form."""


def _source(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds raises several types for "not prepared"
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise DataNotPreparedError(
            f"tfds data set {name!r} (split {split!r}) is not prepared as ArrayRecord under "
            f"{where}. On a machine with TensorFlow run `tfds build {name} "
            f"--file_format=array_record --data_dir {where}` and copy the folder here "
            f"(jaxmtl never downloads at run time). Cause: {type(error).__name__}: "
            f"{str(error)[:200]}"
        ) from error


def _to_arrays(source, image_size: int | None, limit: int | None) -> dict[str, np.ndarray]:
    count = len(source) if limit is None else min(limit, len(source))
    images, labels = [], []
    for i in range(count):
        example = source[i]
        image = np.asarray(example["image"])
        if image_size is not None and image.shape[:2] != (image_size, image_size):
            from skimage.transform import resize

            image = resize(image, (image_size, image_size), preserve_range=True, anti_aliasing=True)
        images.append(np.asarray(image, np.float32) / 255.0)
        labels.append(int(example["label"]))
    if not images:
        raise ValueError(f"the split holds no examples (len {len(source)}, limit {limit})")
    x = np.stack(images)
    if x.shape[-1] == 1:
        x = x[..., 0]
    return {"x": x, "y": np.asarray(labels, np.int32)}


def load_tfds(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    validation_fraction: float = 0.1,
    limit: int | None = None,
    seed: int = 0,
    splits: Sequence[str | None] | None = None,
) -> Dataset:
    """A prepared tfds image classification set as a :class:`~jaxmtl.data.Dataset`.

    Args:
      name: a tfds name, e.g. ``"mnist"``, ``"eurosat/rgb"`` (see :data:`TASK_ARITHMETIC`).
      data_dir: the tfds data folder (default: tfds' own, ``$TFDS_DATA_DIR``).
      image_size: resize every image to ``image_size x image_size`` (needed where image
        sizes vary: DTD, SUN397, Cars); None keeps them.
      validation_fraction: the share of train held out as validation where the data set
        has no validation split.
      limit: read at most this many examples per split (a quick look at a big set).
      seed: the seed of the held-out validation draw.
      splits: (train, validation or None, test) tfds split names; the default is
        :data:`TFDS_SPLITS` or ``("train", None, "test")``.

    Returns: x float32 in ``[0, 1]``, ``(N, H, W)`` for grayscale or ``(N, H, W, 3)``;
      y int32 ``(N,)``.

    Raises:
      DataNotPreparedError: the data are not on disk; the message says how to prepare them.
    """
    import tensorflow_datasets as tfds

    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    train_split, val_split, test_split = splits or TFDS_SPLITS.get(name, ("train", None, "test"))
    train = _to_arrays(_source(name, train_split, data_dir), image_size, limit)
    test = _to_arrays(_source(name, test_split, data_dir), image_size, limit)
    if val_split is None:
        fractions = (1 - validation_fraction, validation_fraction, 0.0)
        keep, held, _ = split_indices(len(train["y"]), fractions, seed=seed)
        validation = {k: v[held] for k, v in train.items()}
        train = {k: v[keep] for k, v in train.items()}
    else:
        validation = _to_arrays(_source(name, val_split, data_dir), image_size, limit)
    num_classes = tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes
    return Dataset(name, train, validation, test, (int(num_classes),), ("label",))
