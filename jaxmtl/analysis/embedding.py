"""Measurements of an embedding: uniformity, tolerance, hardness of the negatives, recall@k.

* Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and
  Uniformity on the Hypersphere", ICML 2020 (the uniformity loss, Eq. 6).
* Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021 (uniformity
  Eq. 11, tolerance Eq. 12, the relative penalty on negatives Eq. 5).
* Recall@K as used for zero-shot retrieval in deep metric learning (Song et al., "Deep
  Metric Learning via Lifted Structured Feature Embedding", CVPR 2016; Wang et al., MS loss,
  CVPR 2019).

All functions take embeddings as given (pass L2-normalized embeddings where the papers do),
except :func:`recall_at_k`, which ranks by cosine similarity by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for 16-bit inputs, the input dtype otherwise (strict promotion safe)."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


__all__ = [
    "negative_penalty",
    "penalty_entropy",
    "recall_at_k",
    "tolerance",
    "uniformity",
]


def _check_embeddings(name: str, z: jax.Array, min_rows: int = 1) -> jax.Array:
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {z.dtype}")
    if z.ndim != 2 or z.shape[0] < min_rows:
        raise ValueError(f"{name}: expected shape (N, D) with N >= {min_rows}, got {z.shape}")
    return z.astype(_compute_dtype(z.dtype))


def _check_labels(labels: jax.Array, n: int) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != (n,):
        raise ValueError(
            f"labels: expected integer labels of shape ({n},), got {labels.dtype} {labels.shape}"
        )
    return labels


def _squared_distances(z: jax.Array) -> jax.Array:
    sq = jnp.sum(z * z, axis=1)
    gram = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)


def uniformity(z: jax.Array, *, t: float = 2.0) -> jax.Array:
    """Uniformity ``log E_{i != j} exp(-t ||z_i - z_j||^2)`` over distinct pairs (lower = more
    uniform), a scalar.

    Wang & Isola, ICML 2020, Eq. 6, as used by Wang & Liu, CVPR 2021, Eq. 11 (t = 2), computed
    with a log-sum-exp over the N (N - 1) ordered distinct pairs.

    Args:
      z: (N, D) embeddings (unit vectors in the papers), N >= 2.
      t: the Gaussian-potential scale, > 0.

    >>> print(f"{uniformity(jnp.array([[1.0, 0.0], [-1.0, 0.0]])):.3f}")
    -8.000
    """
    z = _check_embeddings("z", z, min_rows=2)
    if not t > 0:
        raise ValueError(f"t: expected a value > 0, got {t}")
    n = z.shape[0]
    off_diagonal = ~jnp.eye(n, dtype=bool)
    logits = -t * _squared_distances(z)
    total = jax.nn.logsumexp(jnp.where(off_diagonal, logits, -jnp.inf))
    return total - jnp.log(float(n * (n - 1)))


def tolerance(z: jax.Array, labels: jax.Array) -> jax.Array:
    """Tolerance: mean similarity ``z_i^T z_j`` over same-class pairs i != j, a scalar.

    Wang & Liu, CVPR 2021, Eq. 12 (higher = semantically similar samples stay closer; labels
    are used for the analysis only). The expectation is taken over same-class pairs, which is
    how the paper reports it; 0 if no class has two members.

    >>> z = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> print(f"{tolerance(z, jnp.array([0, 0, 1])):.3f}")
    1.000
    """
    z = _check_embeddings("z", z)
    labels = _check_labels(labels, z.shape[0])
    n = z.shape[0]
    pairs = (labels[:, None] == labels[None, :]) & ~jnp.eye(n, dtype=bool)
    sims = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
    count = jnp.sum(pairs)
    return jnp.sum(jnp.where(pairs, sims, 0.0)) / jnp.maximum(count, 1).astype(sims.dtype)


def negative_penalty(negative_similarities: jax.Array, *, temperature: float) -> jax.Array:
    """Relative penalty on each negative, ``r_i(s_ij) = softmax_j(s_ij / tau)``, shape (B, K).

    Wang & Liu, CVPR 2021, Eq. 5: the ratio of the gradient on negative j to the gradient on
    the positive is a Boltzmann distribution over the negatives with temperature tau.

    >>> r = negative_penalty(jnp.array([[0.8, 0.1]]), temperature=0.5)
    >>> [round(v, 4) for v in r[0].tolist()]
    [0.8022, 0.1978]
    """
    sims = jnp.asarray(negative_similarities)
    if not jnp.issubdtype(sims.dtype, jnp.floating) or sims.ndim != 2:
        raise ValueError(
            "negative_similarities: expected a float array of shape (B, K), "
            f"got {sims.dtype} {sims.shape}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature}")
    work = _compute_dtype(sims.dtype)
    return jax.nn.softmax(sims.astype(work) / temperature, axis=1).astype(sims.dtype)


def penalty_entropy(negative_similarities: jax.Array, *, temperature: float) -> jax.Array:
    """Entropy of the relative-penalty distribution of :func:`negative_penalty`, shape (B,).

    Wang & Liu, CVPR 2021, Sec. 3.1: the entropy grows with tau (tau -> inf: log K, uniform
    weights; tau -> 0: 0, only the hardest negative is penalized).

    >>> print(penalty_entropy(jnp.array([[0.5, 0.5]]), temperature=0.1).round(4))
    [0.6931]
    """
    sims = jnp.asarray(negative_similarities)
    r = negative_penalty(sims, temperature=temperature)
    work = _compute_dtype(sims.dtype)
    log_r = jax.nn.log_softmax(sims.astype(work) / temperature, axis=1)
    return (-jnp.sum(r.astype(work) * log_r, axis=1)).astype(sims.dtype)


def recall_at_k(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    normalize: bool = True,
) -> jax.Array:
    """Recall@K for retrieval within a set, one value per K, shape (len(ks),).

    Song et al., CVPR 2016, Sec. 5 (used by Wang et al., MS loss, CVPR 2019): each sample
    queries all the *others*; a query scores 1 at K if one of its K nearest neighbours
    has its label. Neighbours by cosine similarity (``normalize=True``) or by Euclidean
    distance on the embeddings as given. Ties are broken by index.

    Args:
      embeddings: (N, D); labels: (N,) ints.
      ks: neighbourhood sizes, each in [1, N - 1].

    >>> z = jnp.array([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, -0.2]])
    >>> print(recall_at_k(z, jnp.array([0, 0, 1, 1]), ks=(1,)))
    [1.]
    """
    z = _check_embeddings("embeddings", embeddings, min_rows=2)
    n = z.shape[0]
    labels = _check_labels(labels, n)
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or not 1 <= k <= n - 1 for k in ks):
        raise ValueError(f"ks: expected ints in [1, {n - 1}], got {ks}")
    if normalize:
        z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), 1e-24))
    scores = -_squared_distances(z)
    scores = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, scores)
    _, neighbours = jax.lax.top_k(scores, max(ks))
    hits = labels[neighbours] == labels[:, None]  # (N, max K), nearest first
    found = jnp.cumsum(hits, axis=1) > 0
    return jnp.stack([jnp.mean(found[:, k - 1].astype(jnp.float32)) for k in ks])
