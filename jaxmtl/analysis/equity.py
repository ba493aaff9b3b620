"""Appearance likelihoods for DatasetEquity: cluster embeddings, score each sample by the
size of its cluster.

Shrivastava, Zhang, Nagesh & Parchami, "DatasetEquity: Are All Samples Created Equal? In
The Quest For Equity Within Datasets", ICCV 2023 Workshops, arXiv 2308.09878, Sec. 3: embed
every training image, reduce, cluster, and set the sample likelihood to
``p_i = |C(i)| / max_k |C_k|`` (the "scaled likelihood"; ``|C(i)| / N`` is the other
normalization of the notebooks). The weights ``w(p)`` of ``jaxmtl.losses.focal.dequity_weight``
then up-weight rare appearances.

Substitutions, documented: the paper reduces ImageNet ResNet-101 features with t-SNE and
clusters with DBSCAN. Here the estimator is JAX-native and jittable: optional PCA
(``pca_project``) and k-means with a fixed number of Lloyd iterations (``kmeans``, k-means++
seeding). Clusters from any other method (scikit-learn's DBSCAN included, noise label -1)
go through ``cluster_likelihood``, whose ``noise`` option chooses how noise points count:
``"own_cluster"`` (each is a cluster of size 1, i.e. a rare appearance) or ``"grouped"``
(all noise points form one cluster, as the official code does, which can make them common).
The features are whatever the caller supplies (offline runs cannot download ResNet weights:
raw pixels, PCA of pixels, or an encoder trained in the repo).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmtl.losses.classification import _check_int, _compute_dtype, _float_array, _is_concrete

__all__ = [
    "KMeansResult",
    "appearance_likelihood",
    "cluster_likelihood",
    "cluster_sizes",
    "kmeans",
    "pca_project",
]


class KMeansResult(NamedTuple):
    """``centroids`` (k, D), ``assignments`` (N,) int32 in [0, k), ``inertia`` (the sum of
    squared distances of the points to their centroids, a scalar)."""

    centroids: jax.Array
    assignments: jax.Array
    inertia: jax.Array


def _squared_distances(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """(N, k) squared Euclidean distances (expanded form, clamped at 0; ``x`` is centred by
    the caller so that the expansion loses little)."""
    cross = jnp.matmul(x, centroids.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.sum(x * x, axis=1)[:, None] - 2.0 * cross + jnp.sum(centroids * centroids, axis=1)
    return jnp.maximum(d2, 0.0)


def _kmeans_plus_plus(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding (Arthur & Vassilvitskii, SODA 2007): each next centre is drawn with
    probability proportional to the squared distance to the nearest chosen centre."""
    n = x.shape[0]

    def body(i: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        centroids, nearest = carry
        all_covered = jnp.all(nearest <= 0)
        logits = jnp.where(
            (i == 0) | all_covered,
            jnp.zeros_like(nearest),
            jnp.log(jnp.where(nearest > 0, nearest, 0.0)),
        )
        index = jax.random.categorical(jax.random.fold_in(key, i), logits)
        centre = x[index]
        centroids = centroids.at[i].set(centre)
        d2 = jnp.sum((x - centre) ** 2, axis=1)
        return centroids, jnp.minimum(nearest, d2)

    init = (jnp.zeros((k, x.shape[1]), x.dtype), jnp.full((n,), jnp.inf, x.dtype))
    return jax.lax.fori_loop(0, k, body, init)[0]


def kmeans(
    points: jax.Array,
    num_clusters: int,
    *,
    key: jax.Array,
    num_iterations: int = 25,
) -> KMeansResult:
    """k-means clustering with k-means++ seeding and a fixed number of Lloyd iterations.

    Lloyd, "Least squares quantization in PCM", 1982; seeding of Arthur & Vassilvitskii,
    SODA 2007. Jittable (``num_clusters`` and ``num_iterations`` static); deterministic
    for a given ``key``. An empty cluster keeps its previous centroid.

    Args:
      points: (N, D) floats, N >= num_clusters.
      num_clusters: k >= 1.
      key: PRNG key (seeding).
      num_iterations: Lloyd iterations >= 0.

    Returns:
      ``KMeansResult(centroids (k, D), assignments (N,), inertia ())`` (float32 for 16-bit
      inputs).

    >>> pts = jnp.array([[0.0], [0.1], [5.0], [5.2]])
    >>> res = kmeans(pts, 2, key=jax.random.key(0))
    >>> bool(res.assignments[0] == res.assignments[1] != res.assignments[2])
    True
    """
    points = _float_array("points", points, min_ndim=2)
    if points.ndim != 2:
        raise ValueError(f"points: expected shape (N, D), got {points.shape}")
    k = _check_int("num_clusters", num_clusters, low=1)
    num_iterations = _check_int("num_iterations", num_iterations, low=0)
    if points.shape[0] < k:
        raise ValueError(
            f"num_clusters: expected at most N = {points.shape[0]} clusters, got {num_clusters}"
        )
    x = points.astype(_compute_dtype(points.dtype))
    offset = jnp.mean(x, axis=0)
    x = x - offset

    def lloyd(_: int, centroids: jax.Array) -> jax.Array:
        assign = jnp.argmin(_squared_distances(x, centroids), axis=1)
        sums = jax.ops.segment_sum(x, assign, num_segments=k)
        counts = jax.ops.segment_sum(jnp.ones_like(x[:, 0]), assign, num_segments=k)
        filled = counts > 0
        return jnp.where(filled[:, None], sums / jnp.where(filled, counts, 1.0)[:, None], centroids)

    centroids = jax.lax.fori_loop(0, num_iterations, lloyd, _kmeans_plus_plus(x, k, key))
    d2 = _squared_distances(x, centroids)
    assignments = jnp.argmin(d2, axis=1).astype(jnp.int32)
    inertia = jnp.sum(jnp.min(d2, axis=1))
    return KMeansResult(centroids + offset, assignments, inertia)


def cluster_sizes(assignments: jax.Array, num_clusters: int) -> jax.Array:
    """(num_clusters,) number of points in each cluster; labels outside [0, k) (DBSCAN's
    noise label -1) are not counted.

    >>> cluster_sizes(jnp.array([0, 0, 2, -1]), 3).tolist()
    [2, 0, 1]
    """
    assignments = jnp.asarray(assignments)
    if not jnp.issubdtype(assignments.dtype, jnp.integer) or assignments.ndim != 1:
        raise TypeError(
            f"assignments: expected a 1-D integer array, got {assignments.dtype} "
            f"shape {assignments.shape}"
        )
    k = _check_int("num_clusters", num_clusters, low=1)
    valid = (assignments >= 0) & (assignments < k)
    return jax.ops.segment_sum(
        valid.astype(jnp.int32), jnp.where(valid, assignments, 0), num_segments=k
    )


def cluster_likelihood(
    assignments: jax.Array,
    num_clusters: int,
    *,
    normalize: str = "largest",
    noise: str = "own_cluster",
) -> jax.Array:
    """Per-sample appearance likelihood from cluster labels (DatasetEquity, Sec. 3).

    ``normalize="largest"``: ``p_i = |C(i)| / max_k |C_k|`` in (0, 1] (the scaled likelihood
    used for training); ``"total"``: ``|C(i)| / N``. Label -1 marks noise (DBSCAN):
    ``noise="own_cluster"`` makes each noise point a cluster of size 1; ``"grouped"`` puts
    all of them in one cluster (the official code's behaviour).

    Args:
      assignments: (N,) integer labels in [-1, num_clusters).
      num_clusters: number of (non-noise) clusters.
      normalize: ``"largest"`` or ``"total"``. noise: ``"own_cluster"`` or ``"grouped"``.

    Returns:
      (N,) float32 likelihoods.

    >>> print(cluster_likelihood(jnp.array([0, 0, 0, 0, 1, 1, -1]), 2))
    [1.   1.   1.   1.   0.5  0.5  0.25]
    """
    if normalize not in ("largest", "total"):
        raise ValueError(f"normalize: expected 'largest' or 'total', got {normalize!r}")
    if noise not in ("own_cluster", "grouped"):
        raise ValueError(f"noise: expected 'own_cluster' or 'grouped', got {noise!r}")
    sizes = cluster_sizes(assignments, num_clusters).astype(jnp.float32)
    assignments = jnp.asarray(assignments)
    if _is_concrete(assignments) and assignments.size:
        lo, hi = int(jnp.min(assignments)), int(jnp.max(assignments))
        if lo < -1 or hi >= num_clusters:
            raise ValueError(
                f"assignments: expected labels in [-1, {num_clusters}), got values in [{lo}, {hi}]"
            )
    is_noise = assignments < 0
    noise_count = jnp.sum(is_noise).astype(jnp.float32)
    noise_size = noise_count if noise == "grouped" else jnp.minimum(noise_count, 1.0)
    own = jnp.where(is_noise, noise_size, sizes[jnp.clip(assignments, 0, num_clusters - 1)])
    if normalize == "largest":
        denominator = jnp.maximum(jnp.max(sizes), noise_size)
    else:
        denominator = jnp.asarray(assignments.shape[0], jnp.float32)
    return own / jnp.maximum(denominator, 1.0)


def pca_project(x: jax.Array, num_components: int) -> jax.Array:
    """Project centred data on its top principal components (SVD), (N, D) -> (N, m).

    A deterministic stand-in for the paper's t-SNE reduction. Component signs are fixed so
    that each component's largest-magnitude loading is positive.

    >>> pts = jnp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    >>> print(jnp.abs(pca_project(pts, 1)[:, 0]).round(4))
    [1.4142 0.     1.4142]
    """
    x = _float_array("x", x, min_ndim=2)
    if x.ndim != 2:
        raise ValueError(f"x: expected shape (N, D), got {x.shape}")
    m = _check_int("num_components", num_components, low=1)
    if m > min(x.shape):
        raise ValueError(f"num_components: expected at most {min(x.shape)}, got {m}")
    data = x.astype(_compute_dtype(x.dtype))
    centred = data - jnp.mean(data, axis=0)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    components = vt[:m]
    pivot = jnp.take_along_axis(
        components, jnp.argmax(jnp.abs(components), axis=1)[:, None], axis=1
    )
    components = components * jnp.where(pivot < 0, -1.0, 1.0)
    return jnp.matmul(centred, components.T, precision=jax.lax.Precision.HIGHEST)


def appearance_likelihood(
    embeddings: jax.Array,
    *,
    num_clusters: int,
    key: jax.Array,
    num_iterations: int = 25,
    num_components: int | None = None,
    normalize: str = "largest",
) -> jax.Array:
    """Appearance likelihood of each sample: (optional PCA) -> k-means -> cluster sizes.

    DatasetEquity (ICCV 2023 W), Sec. 3 with the JAX substitutions of this module (PCA for
    t-SNE, k-means for DBSCAN). The result feeds ``jaxmtl.losses.focal.dequity_weight``.

    Args:
      embeddings: (N, D) features of the training samples.
      num_clusters: k for k-means.
      key: PRNG key (k-means++ seeding).
      num_iterations: Lloyd iterations.
      num_components: PCA dimension, or None to cluster the raw embeddings.
      normalize: ``"largest"`` or ``"total"`` (see ``cluster_likelihood``).

    Returns:
      (N,) float32 likelihoods.

    >>> pts = jnp.array([[0.0], [0.1], [0.2], [5.0]])
    >>> print(appearance_likelihood(pts, num_clusters=2, key=jax.random.key(0)).round(4))
    [1.     1.     1.     0.3333]
    """
    features = embeddings
    if num_components is not None:
        features = pca_project(embeddings, num_components)
    result = kmeans(features, num_clusters, key=key, num_iterations=num_iterations)
    return cluster_likelihood(result.assignments, num_clusters, normalize=normalize)
