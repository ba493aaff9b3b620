"""The data set container, fixed seeded splits and deterministic, resumable batching.

A :class:`Dataset` holds three splits as dicts of NumPy arrays with a common first axis
(``"x"`` the inputs, ``"y"`` the labels: ``(N,)`` for one task, ``(N, K)`` for K tasks
that share the input). Batches are a pure function of ``(split, index, batch_size, seed)``
(:func:`batch_at`), so a run that resumes at update ``k`` sees exactly the batches an
uninterrupted run would have seen — no iterator state to save beyond ``k`` itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["BatchIterator", "Dataset", "batch_at", "batches_per_epoch", "split_indices"]

Split = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits of one (possibly multi-task) data set.

    Attributes:
      name: what it is, e.g. ``"digits"``.
      train, validation, test: dicts of arrays sharing their first axis; ``"x"`` float32
        inputs (images ``(N, H, W)`` or ``(N, H, W, C)`` in ``[0, 1]``, or vectors ``(N, D)``),
        ``"y"`` int32 labels, ``(N,)`` for one task or ``(N, K)`` for K tasks.
      num_classes: the number of classes of each task, ``(K,)``.
      tasks: the name of each task, ``(K,)``.
      class_names: per task, the name of each class (empty where there are none).
    """

    name: str
    train: Split
    validation: Split
    test: Split
    num_classes: tuple[int, ...]
    tasks: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        if len(self.num_classes) != len(self.tasks):
            raise ValueError(
                f"num_classes has {len(self.num_classes)} entries but tasks has "
                f"{len(self.tasks)} ({self.tasks})"
            )
        for split in ("train", "validation", "test"):
            arrays = getattr(self, split)
            _check_split(f"{self.name}.{split}", arrays)
            y = arrays["y"]
            expected = 1 if len(self.tasks) == 1 else 2
            if y.ndim != expected or (y.ndim == 2 and y.shape[1] != len(self.tasks)):
                raise ValueError(
                    f"{self.name}.{split}['y'] must have shape "
                    f"{'(N,)' if expected == 1 else f'(N, {len(self.tasks)})'}, got {y.shape}"
                )
            bound = np.asarray(self.num_classes)
            if y.size and (y.min() < 0 or np.any(y.reshape(len(y), -1).max(0) >= bound)):
                raise ValueError(
                    f"{self.name}.{split}['y'] holds labels outside [0, num_classes) for "
                    f"num_classes={self.num_classes}"
                )

    @property
    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "validation": self.validation, "test": self.test}

    def task(self, index: int) -> Dataset:
        """The single-task data set of task ``index`` (same inputs, labels ``(N,)``)."""
        if not 0 <= index < len(self.tasks):
            raise IndexError(f"task index must be in [0, {len(self.tasks)}), got {index}")
        if len(self.tasks) == 1:
            return self

        def pick(split: Split) -> Split:
            return {**split, "y": split["y"][:, index]}

        names = self.class_names[index : index + 1] if self.class_names else ()
        return Dataset(
            name=f"{self.name}/{self.tasks[index]}",
            train=pick(self.train),
            validation=pick(self.validation),
            test=pick(self.test),
            num_classes=(self.num_classes[index],),
            tasks=(self.tasks[index],),
            class_names=names,
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v['y'])}" for k, v in self.splits.items())
        return (
            f"Dataset({self.name!r}, x={self.train['x'].shape[1:]}, tasks={self.tasks}, "
            f"num_classes={self.num_classes}, {sizes})"
        )


def _check_split(name: str, arrays: Mapping[str, np.ndarray]) -> None:
    if not isinstance(arrays, Mapping) or "x" not in arrays or "y" not in arrays:
        raise ValueError(f"{name} must be a dict with keys 'x' and 'y', got {type(arrays)}")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name} arrays must share their first axis, got sizes {sizes}")


def split_indices(
    num_examples: int, fractions: tuple[float, float, float], *, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded permutation of ``range(num_examples)`` cut into train/validation/test.

    Args:
      num_examples: how many examples there are.
      fractions: the (train, validation, test) shares, non-negative, summing to 1.
      seed: the permutation's seed; the same seed always gives the same splits.

    Returns:
      three sorted int64 index arrays that partition ``range(num_examples)``.

    >>> train, val, test = split_indices(10, (0.6, 0.2, 0.2), seed=0)
    >>> len(train), len(val), len(test)
    (6, 2, 2)
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative shares summing to 1, got {fractions}"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    n_train = round(fractions[0] * num_examples)
    n_val = round(fractions[1] * num_examples)
    parts = np.split(order, [n_train, n_train + n_val])
    return tuple(np.sort(p) for p in parts)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one pass (the remainder is dropped so every batch has one shape)."""
    if batch_size < 1 or batch_size > num_examples:
        raise ValueError(
            f"batch_size must be in [1, {num_examples}] (the number of examples), got {batch_size}"
        )
    return num_examples // batch_size


@functools.lru_cache(maxsize=8)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def batch_at(
    data: Mapping[str, np.ndarray], index: int, *, batch_size: int, seed: int
) -> dict[str, np.ndarray]:
    """The batch of update ``index``: a pure function of its arguments.

    Epoch ``e = index // (N // batch_size)`` visits the examples in the order of a
    permutation seeded by ``(seed, e)``; the last ``N mod batch_size`` of each epoch's
    order are skipped, so every batch has the static shape ``(batch_size, ...)``.

    Args:
      data: a split, a dict of arrays with a common first axis N.
      index: the 0-based update index (any non-negative int).
      batch_size: examples per batch, ``1 <= batch_size <= N``.
      seed: the data-order seed.

    Returns:
      a dict with the same keys, each ``(batch_size, ...)``.

    >>> data = {"x": np.arange(6.0), "y": np.arange(6)}
    >>> batch_at(data, 0, batch_size=4, seed=0)["x"].shape
    (4,)
    """
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"data must be a non-empty dict of arrays, got {type(data).__name__}")
    sizes = {k: len(v) for k, v in data.items()}
    num_examples = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1:
        raise ValueError(f"data arrays must share their first axis, got sizes {sizes}")
    if int(index) != index or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index}")
    per_epoch = batches_per_epoch(num_examples, batch_size)
    epoch, position = divmod(int(index), per_epoch)
    rows = _epoch_order(num_examples, int(seed), epoch)
    rows = rows[position * batch_size : (position + 1) * batch_size]
    return {k: np.asarray(v)[rows] for k, v in data.items()}


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Iterates :func:`batch_at` from ``position`` on; ``position`` is all there is to save.

    >>> data = {"x": np.arange(10.0)}
    >>> it = BatchIterator(data, batch_size=3, seed=0)
    >>> first = next(it); it.position
    1
    >>> resumed = BatchIterator(data, batch_size=3, seed=0, position=1)
    >>> bool(np.array_equal(next(resumed)["x"], next(it)["x"]))
    True
    """

    def __init__(
        self,
        data: Mapping[str, np.ndarray],
        *,
        batch_size: int,
        seed: int,
        position: int = 0,
        stop: int | None = None,
    ):
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.position, self.stop = int(position), stop
        batch_at(data, 0, batch_size=batch_size, seed=seed)  # validates the arguments now

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional."""
        n = len(next(iter(self.data.values())))
        return self.position / batches_per_epoch(n, self.batch_size)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.stop is not None and self.position >= self.stop:
            raise StopIteration
        batch = batch_at(self.data, self.position, batch_size=self.batch_size, seed=self.seed)
        self.position += 1
        return batch
