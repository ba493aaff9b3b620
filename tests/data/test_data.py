"""Tests of jaxmtl.data: splits, batching, the offline sets and the tfds loader (mock data)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import strategies as st

from jaxmtl import data

# --------------------------------------------------------------------------- splits, batches


@given(st.integers(3, 200), st.integers(0, 2**31 - 1))
def test_split_indices_partition_and_are_seeded(n, seed):
    parts = data.split_indices(n, (0.5, 0.25, 0.25), seed=seed)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(n))
    again = data.split_indices(n, (0.5, 0.25, 0.25), seed=seed)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_split_indices_rejects_bad_fractions():
    with pytest.raises(ValueError, match="summing to 1"):
        data.split_indices(10, (0.5, 0.5, 0.5), seed=0)


@given(st.integers(1, 50), st.integers(1, 50), st.integers(0, 10))
def test_each_epoch_visits_distinct_examples_in_full_batches(n, batch_size, seed):
    batch_size = min(batch_size, n)
    split = {"i": np.arange(n), "x": np.arange(n, dtype=np.float32) * 2}
    per_epoch = data.batches_per_epoch(n, batch_size)
    for epoch in range(2):
        seen = [
            data.batch_at(split, epoch * per_epoch + k, batch_size=batch_size, seed=seed)
            for k in range(per_epoch)
        ]
        rows = np.concatenate([b["i"] for b in seen])
        assert all(b["i"].shape == (batch_size,) for b in seen)
        assert len(np.unique(rows)) == len(rows) == per_epoch * batch_size
        for b in seen:  # keys stay aligned
            np.testing.assert_array_equal(b["x"], b["i"] * 2)


def test_epochs_are_reshuffled_and_seeds_differ():
    split = {"i": np.arange(100)}
    first = data.batch_at(split, 0, batch_size=100, seed=0)["i"]
    second = data.batch_at(split, 1, batch_size=100, seed=0)["i"]
    other = data.batch_at(split, 0, batch_size=100, seed=1)["i"]
    assert not np.array_equal(first, second) and not np.array_equal(first, other)


def test_batch_iterator_resumes_where_it_stopped():
    split = {"i": np.arange(23)}
    full = [b["i"] for b in data.BatchIterator(split, batch_size=4, seed=3, stop=12)]
    it = data.BatchIterator(split, batch_size=4, seed=3, stop=12)
    head = [next(it)["i"] for _ in range(7)]
    tail = [
        b["i"]
        for b in data.BatchIterator(split, batch_size=4, seed=3, position=it.position, stop=12)
    ]
    for a, b in zip(full, head + tail, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_errors_name_the_argument():
    split = {"x": np.zeros(5), "y": np.zeros(5)}
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 5\].*got 6"):
        data.batch_at(split, 0, batch_size=6, seed=0)
    with pytest.raises(ValueError, match="index must be a non-negative integer, got -1"):
        data.batch_at(split, -1, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="share their first axis"):
        data.batch_at({"x": np.zeros(5), "y": np.zeros(4)}, 0, batch_size=2, seed=0)


def test_dataset_checks_label_shapes_and_ranges():
    split = {"x": np.zeros((4, 2), np.float32), "y": np.array([0, 1, 2, 1], np.int32)}
    with pytest.raises(ValueError, match="outside"):
        data.Dataset("toy", split, split, split, (2,), ("t",))
    with pytest.raises(ValueError, match=r"must have shape \(N, 2\)"):
        data.Dataset("toy", split, split, split, (3, 3), ("a", "b"))


# --------------------------------------------------------------------------- offline sets


def _check_dataset(ds, input_shape, num_classes):
    assert ds.num_classes == num_classes and len(ds.tasks) == len(num_classes)
    for split in ds.splits.values():
        assert split["x"].shape[1:] == input_shape and split["x"].dtype == np.float32
        assert split["y"].dtype == np.int32
        assert 0.0 <= split["x"].min() and split["x"].max() <= 1.0
    labels = ds.train["y"].reshape(len(ds.train["y"]), -1)
    for t, k in enumerate(num_classes):  # every class occurs in training
        assert set(np.unique(labels[:, t])) == set(range(k))


def test_digits_splits_are_disjoint_and_fixed():
    ds = data.digits(seed=0)
    _check_dataset(ds, (8, 8), (10,))
    assert sum(len(s["y"]) for s in ds.splits.values()) == 1797
    flat = {k: {row.tobytes() for row in s["x"]} for k, s in ds.splits.items()}
    # the digits hold a few exact duplicate images; disjoint indices leave few shared
    assert len(flat["train"] & flat["test"]) < 10
    np.testing.assert_array_equal(ds.test["y"], data.digits(seed=0).test["y"])
    assert not np.array_equal(ds.test["y"], data.digits(seed=1).test["y"])


@pytest.mark.parametrize("loader", [data.textures, data.photos])
def test_patch_sets_draw_splits_from_disjoint_bands(loader):
    ds = loader(per_image=30)
    k = len(ds.class_names[0])
    _check_dataset(ds, (16, 16), (k,))
    assert np.bincount(ds.train["y"]).tolist() == [30] * k
    with pytest.raises(ValueError, match="too small"):
        loader(per_image=5, patch=64)


def test_textures_are_separable_by_simple_statistics():
    """A nearest-centroid rule on (mean, std, gradient energy) beats chance by far: the
    classes carry signal, the construction is not shuffled labels."""
    ds = data.textures(per_image=100)

    def features(x):
        grad = np.abs(np.diff(x, axis=1)).mean((1, 2)) + np.abs(np.diff(x, axis=2)).mean((1, 2))
        return np.stack([x.mean((1, 2)), x.std((1, 2)), grad], 1)

    f_train, f_test = features(ds.train["x"]), features(ds.test["x"])
    mu, sd = f_train.mean(0), f_train.std(0)
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    centroids = np.stack([f_train[ds.train["y"] == c].mean(0) for c in range(4)])
    pred = np.argmin(((f_test[:, None] - centroids) ** 2).sum(-1), 1)
    assert (pred == ds.test["y"]).mean() > 0.6


def test_mnist1d_is_local_and_leaves_global_numpy_state_alone():
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    ds = data.mnist1d(num_samples=300, seed=2)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    _check_dataset(ds, (40,), (10,))
    np.testing.assert_array_equal(ds.train["x"], data.mnist1d(num_samples=300, seed=2).train["x"])


def test_shapes_factors_are_rendered_where_the_labels_say():
    ds = data.shapes(num_samples=400, noise=0.0)
    _check_dataset(ds, (16, 16), (4, 3, 4, 4))
    x, y = ds.train["x"], ds.train["y"]
    # position: the quadrant holds most of the ink
    h = 8
    quads = np.stack([x[:, :h, :h], x[:, :h, h:], x[:, h:, :h], x[:, h:, h:]], 1).sum((2, 3))
    assert (quads.argmax(1) == y[:, 2]).mean() > 0.95
    # scale: ink grows with the radius class, for each shape
    ink = x.sum((1, 2)) / np.maximum(x.max((1, 2)), 1e-6)
    for s in range(4):
        means = [ink[(y[:, 0] == s) & (y[:, 1] == c)].mean() for c in range(3)]
        assert means[0] < means[1] < means[2]


def test_render_shapes_areas_match_closed_forms():
    """Pixel area of an unrotated shape at radius r: square (1.5 r)^2, ellipse pi r^2 / 2,
    triangle 3 sqrt(3) r^2 / 4, cross (2 * 2 r * 0.6 r - (0.6 r)^2)."""
    r = 5.0  # arm and side edges fall on sub-pixel boundaries
    expected = [
        (1.5 * r) ** 2,
        3 * np.sqrt(3) / 4 * r**2,
        np.pi * r**2 / 2,
        2.4 * r**2 - 0.36 * r**2,
    ]
    images = data.render_shapes(
        np.arange(4),
        np.full(4, r),
        np.full((4, 2), 16.0),
        np.zeros(4),
        np.ones(4),
        size=32,
        supersample=8,
    )
    np.testing.assert_allclose(images.sum((1, 2)), expected, rtol=0.02)


def test_multi_digits_overlays_two_digits_from_the_same_split():
    ds = data.multi_digits(num_samples=200, max_shift=0)
    _check_dataset(ds, (12, 12), (10, 10))
    base = data.digits(seed=0)
    x, y = ds.test["x"][0], ds.test["y"][0]
    left, right = x[:8, :8], x[4:, 4:]
    # with no shift, the left digit's top-left 4x4 corner is not covered by the right digit
    candidates = base.test["x"][base.test["y"] == y[0]]
    assert np.any(np.all(np.isclose(candidates[:, :4, :4], left[:4, :4]), axis=(1, 2)))
    candidates = base.test["x"][base.test["y"] == y[1]]
    assert np.any(np.all(np.isclose(candidates[:, 4:, 4:], right[4:, 4:]), axis=(1, 2)))
    assert ds.task(1).train["y"].shape == (140,) and ds.task(1).tasks == ("right",)


# --------------------------------------------------------------------------- tfds


def test_load_tfds_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_tfds("mnist", data_dir=str(tmp_path), validation_fraction=0.25)
        rgb = data.load_tfds("dtd", data_dir=str(tmp_path), image_size=16)
    assert ds.num_classes == (10,) and ds.train["x"].shape == (9, 28, 28)
    assert len(ds.validation["y"]) == 3 and len(ds.test["y"]) == 12
    assert ds.train["x"].dtype == np.float32 and ds.train["x"].max() <= 1.0
    assert rgb.num_classes == (47,) and rgb.train["x"].shape[1:] == (16, 16, 3)


def test_load_tfds_without_data_says_how_to_prepare(tmp_path):
    with pytest.raises(
        data.DataNotPreparedError, match="tfds build mnist --file_format=array_record"
    ):
        data.load_tfds("mnist", data_dir=str(tmp_path))
