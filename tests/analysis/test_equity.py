"""Tests of jaxmtl.analysis.equity: k-means, cluster likelihoods, appearance likelihoods."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxmtl.analysis import equity
from jaxmtl.losses import focal
from tests.losses.jitted import FAST_COMPILE


@functools.cache
def _jitted(fn, **static):
    return jax.jit(functools.partial(fn, **static), compiler_options=FAST_COMPILE)


def _blobs(sizes=(50, 25, 25), dim=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 20.0
    points = np.concatenate(
        [c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes, strict=True)]
    )
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return points.astype(np.float32), labels


def test_blobs_give_relative_cluster_sizes():
    # Sizes 50 / 25 / 25: p = 50/50, 25/50, 25/50 for their members.
    points, labels = _blobs()
    want = np.array([1.0, 0.5, 0.5])[labels]
    for components in (None, 2):
        likelihood = _jitted(
            equity.appearance_likelihood, num_clusters=3, num_components=components
        )(jnp.asarray(points), key=jax.random.key(0))
        np.testing.assert_allclose(np.asarray(likelihood), want)
    # Feeding the DatasetEquity weight: rare blobs weigh more (eta 1, gamma 5).
    w = np.asarray(focal.dequity_weight(likelihood))
    assert w[labels == 1].min() > w[labels == 0].max()


def test_kmeans_is_a_lloyd_fixed_point_and_deterministic():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(60, 3)).astype(np.float32)
    run = _jitted(equity.kmeans, num_clusters=4, num_iterations=30)
    result = run(jnp.asarray(points), key=jax.random.key(3))
    again = run(jnp.asarray(points), key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(result.assignments), np.asarray(again.assignments))
    centroids = np.asarray(result.centroids, np.float64)
    assign = np.asarray(result.assignments)
    d2 = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
    # Written independently: every point at its nearest centroid, every centroid the mean of
    # its points, inertia the sum of squared distances.
    np.testing.assert_array_equal(assign, d2.argmin(1))
    for k in range(4):
        members = points[assign == k]
        if len(members):
            np.testing.assert_allclose(centroids[k], members.mean(0), atol=1e-4)
    assert float(result.inertia) == pytest.approx(d2.min(1).sum(), rel=1e-4)


def test_cluster_likelihood_noise_options():
    # Clusters of 4 and 2 and two noise points (-1).
    labels = jnp.array([0, 0, 0, 0, 1, 1, -1, -1])
    likelihood = lambda v, **kw: _jitted(equity.cluster_likelihood, num_clusters=2, **kw)(v)
    own = likelihood(labels)
    np.testing.assert_allclose(np.asarray(own), [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25])
    grouped = likelihood(labels, noise="grouped")
    np.testing.assert_allclose(np.asarray(grouped), [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    total = likelihood(labels, normalize="total", noise="grouped")
    np.testing.assert_allclose(np.asarray(total), [0.5] * 4 + [0.25] * 4)
    # Noise outnumbering every cluster when grouped: it becomes the reference (p = 1).
    many = _jitted(equity.cluster_likelihood, num_clusters=1, noise="grouped")(
        jnp.array([0, -1, -1, -1])
    )
    np.testing.assert_allclose(np.asarray(many), [1 / 3, 1, 1, 1])
    assert equity.cluster_sizes(labels, 2).tolist() == [4, 2]


@given(
    hnp.arrays(np.int32, (12,), elements=st.integers(-1, 2)),
    st.sampled_from(["own_cluster", "grouped"]),
)
def test_cluster_likelihood_properties(labels, noise):
    p = np.asarray(_jitted(equity.cluster_likelihood, num_clusters=3, noise=noise)(labels))
    assert np.all((p > 0) & (p <= 1)) and p.max() == 1.0
    # Same cluster -> same likelihood; a bigger cluster -> a larger likelihood.
    sizes = {k: np.sum(labels == k) for k in range(3)}
    for i in range(12):
        for j in range(12):
            if labels[i] >= 0 and labels[j] >= 0 and sizes[labels[i]] >= sizes[labels[j]]:
                assert p[i] >= p[j]


def test_pca_project_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5))
    got = np.asarray(_jitted(equity.pca_project, num_components=2)(jnp.asarray(x, jnp.float32)))
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:2].T
    # Components are defined up to sign.
    for k in range(2):
        sign = np.sign(np.dot(got[:, k], want[:, k]))
        np.testing.assert_allclose(sign * got[:, k], want[:, k], rtol=1e-3, atol=1e-3)


def test_bad_input():
    points = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="num_clusters: expected at most N = 3"):
        equity.kmeans(points, 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="points: expected shape"):
        equity.kmeans(jnp.zeros((3, 2, 1)), 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="normalize: expected"):
        equity.cluster_likelihood(jnp.array([0, 1]), 2, normalize="max")
    with pytest.raises(ValueError, match="noise: expected"):
        equity.cluster_likelihood(jnp.array([0, 1]), 2, noise="drop")
    with pytest.raises(ValueError, match=r"assignments: expected labels in \[-1, 2\)"):
        equity.cluster_likelihood(jnp.array([0, 2]), 2)
    with pytest.raises(TypeError, match="assignments: expected a 1-D integer"):
        equity.cluster_sizes(jnp.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="num_components: expected at most"):
        equity.pca_project(points, 3)
