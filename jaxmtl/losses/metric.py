"""Metric-learning losses: Multi-Similarity, contrastive InfoNCE, Proto-Triplet and ICNN.

Contract. These losses are defined over a *set* of embeddings (pairs within a batch, or the
queries and prototypes of an episode), so the embedding-level functions return **one value
per batch (or per episode)**, a scalar, as DESIGN.md prescribes for set-based losses. Their
similarity-level building blocks (``*_from_similarities``) are per row: row ``i`` of a
similarity matrix holds everything anchor ``i``'s loss depends on, and they return ``(B,)``.

Every function accepts any float dtype; 16-bit inputs are computed in float32 internally and
the result is cast back. Hyperparameters are keyword-only with the papers' defaults.

Papers:

* Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair Weighting for Deep
  Metric Learning", CVPR 2019 (MS loss, Eq. 9-12 for mining and weighting).
* Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021 (InfoNCE with
  temperature, Eq. 1; hard contrastive loss, Eq. 10).
* Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
  Representations", ICML 2020 (NT-Xent, the 2N-view form).
* Mendez-Ruiz et al., "SuSana Distancia is all you need: Enforcing class separability in
  metric learning via two novel distance-based loss functions for few-shot image
  classification", arXiv 2023 (Proto-Triplet and ICNN losses).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

__all__ = [
    "class_prototypes",
    "hard_info_nce",
    "icnn_loss",
    "icnn_score",
    "info_nce",
    "info_nce_from_similarities",
    "l2_normalize",
    "ms_pair_weights",
    "multi_similarity_from_similarities",
    "multi_similarity_loss",
    "nt_xent",
    "pairwise_cosine",
    "proto_triplet_loss",
    "protonet_logits",
    "same_label_mask",
]


# --------------------------------------------------------------------------- checks


def _check_float_array(name: str, x: jax.Array, ndim: int | None = None) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {x.shape}")
    return x


def _check_labels(name: str, labels: jax.Array, n: int) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name}: expected integer class labels, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got shape {labels.shape}")
    return labels


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    # Only concrete Python numbers are checked; traced values (a learned temperature) pass.
    if isinstance(value, numbers.Real):
        bad = value < 0 if allow_zero else value <= 0
        if bad or value != value:
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name}: expected a value {bound}, got {value}")


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for 16-bit inputs (reductions and exponentials), the input dtype otherwise."""
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def _log1p_sum_exp(a: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """``log(1 + sum_{mask} exp(a))`` along ``axis``; 0 for an empty mask, no NaN gradients."""
    a = jnp.where(mask, a, -jnp.inf)
    shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(a, axis=axis, keepdims=True), 0.0))
    # shift >= 0 and the sum holds exp(-shift) + exp(max a - shift) >= 1, so the log is safe.
    total = jnp.exp(-shift) + jnp.sum(jnp.exp(a - shift), axis=axis, keepdims=True)
    return jnp.squeeze(shift + jnp.log(total), axis=axis)


# --------------------------------------------------------------------------- helpers


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along ``axis`` (finite gradient at ``x = 0``).

    The embedding normalization of the MS loss (Wang et al., CVPR 2019, Sec. 3) and of the
    contrastive losses (Wang & Liu, CVPR 2021, Sec. 2: embeddings on the unit hypersphere).

    >>> [round(v, 4) for v in l2_normalize(jnp.array([3.0, 4.0])).tolist()]
    [0.6, 0.8]
    """
    x = _check_float_array("x", x)
    work = x.astype(_compute_dtype(x.dtype))
    sq = jnp.sum(work * work, axis=axis, keepdims=True)
    return (work * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


def pairwise_cosine(embeddings: jax.Array, *, normalize: bool = True) -> jax.Array:
    """Similarity matrix ``S_ij = <f_i, f_j>`` of L2-normalized embeddings, shape (B, B).

    Multi-Similarity loss (Wang et al., CVPR 2019), Sec. 3: cosine similarity of normalized
    embeddings. With ``normalize=False`` the plain dot product.

    >>> print(pairwise_cosine(jnp.array([[1.0, 0.0], [2.0, 2.0]])).round(4))
    [[1.     0.7071]
     [0.7071 1.    ]]
    """
    embeddings = _check_float_array("embeddings", embeddings, 2)
    z = l2_normalize(embeddings) if normalize else embeddings
    z = z.astype(_compute_dtype(z.dtype))
    return jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)


def same_label_mask(labels: jax.Array) -> jax.Array:
    """Boolean (B, B) matrix, True where ``labels[i] == labels[j]`` (diagonal included).

    >>> same_label_mask(jnp.array([0, 1, 0])).astype(int).tolist()
    [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected shape (B,), got shape {labels.shape}")
    return labels[:, None] == labels[None, :]


# --------------------------------------------------------------------------- Multi-Similarity


def _ms_masks(
    sims: jax.Array, labels: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hard positives P_i, hard negatives N_i (Eq. 9-10) and the anchors that keep both."""
    b = sims.shape[0]
    same = same_label_mask(labels)
    off_diagonal = ~jnp.eye(b, dtype=bool)  # self-pairs excluded by index
    positives = same & off_diagonal
    negatives = ~same
    min_pos = jnp.min(jnp.where(positives, sims, jnp.inf), axis=1, keepdims=True)
    max_neg = jnp.max(jnp.where(negatives, sims, -jnp.inf), axis=1, keepdims=True)
    hard_neg = negatives & (sims > min_pos - eps)
    hard_pos = positives & (sims < max_neg + eps)
    valid = jnp.any(hard_pos, axis=1) & jnp.any(hard_neg, axis=1)
    return hard_pos, hard_neg, valid


def _check_ms_hyperparameters(alpha: float, beta: float, eps: float) -> None:
    _check_positive("alpha", alpha)
    _check_positive("beta", beta)
    _check_positive("eps", eps, allow_zero=True)


def multi_similarity_from_similarities(
    similarities: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 40.0,
    lam: float = 0.5,
    eps: float = 0.1,
) -> jax.Array:
    """Per-anchor Multi-Similarity losses from a similarity matrix, shape (B,).

    Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019. Mining with relative similarity (Eq. 9-10, margin ``eps``)

        N_i = {j: y_j != y_i, S_ij > min_{k in pos(i)} S_ik - eps}
        P_i = {j: y_j == y_i, j != i, S_ij < max_{k in neg(i)} S_ik + eps}

    then weighting (Eq. 12)

        L_i = 1/alpha log(1 + sum_{P_i} exp(-alpha (S_ik - lam)))
            + 1/beta  log(1 + sum_{N_i} exp( beta (S_ik - lam))).

    Anchors with an empty ``P_i`` or ``N_i`` are skipped (loss 0), as in the released code;
    self-pairs are excluded by index (the code drops positives with ``S >= 1 - 1e-5``, which
    also drops exact duplicates). Row ``i`` depends only on ``similarities[i]`` and labels.
    Defaults are the released code's (``scale_pos=2, scale_neg=40, thresh=0.5, margin=0.1``).

    Args:
      similarities: (B, B) float similarity matrix (cosine similarities in the paper).
      labels: (B,) integer class labels.

    Returns:
      (B,) per-anchor losses in the similarities' dtype.

    >>> s = jnp.array([[1.0, 0.8, 0.75], [0.8, 1.0, 0.2], [0.75, 0.2, 1.0]])
    >>> print(multi_similarity_from_similarities(s, jnp.array([0, 0, 1])).round(4))
    [0.4687 0.     0.    ]
    """
    similarities = _check_float_array("similarities", similarities, 2)
    b = similarities.shape[0]
    if similarities.shape != (b, b):
        raise ValueError(f"similarities: expected a square (B, B) matrix, got {similarities.shape}")
    labels = _check_labels("labels", labels, b)
    _check_ms_hyperparameters(alpha, beta, eps)
    sims = similarities.astype(_compute_dtype(similarities.dtype))
    hard_pos, hard_neg, valid = _ms_masks(sims, labels, eps)
    pos_term = _log1p_sum_exp(-alpha * (sims - lam), hard_pos) / alpha
    neg_term = _log1p_sum_exp(beta * (sims - lam), hard_neg) / beta
    return jnp.where(valid, pos_term + neg_term, 0.0).astype(similarities.dtype)


def multi_similarity_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 40.0,
    lam: float = 0.5,
    eps: float = 0.1,
    normalize: bool = True,
) -> jax.Array:
    """Multi-Similarity loss of a batch: **one value per batch** (a scalar).

    Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019, Eq. 12: ``L_MS = (1/m) sum_i L_i`` with the per-anchor terms of
    :func:`multi_similarity_from_similarities` on ``S = pairwise_cosine(embeddings)``;
    skipped anchors count as zero in the mean over the full batch size ``m``, as in the
    released code.

    Args:
      embeddings: (B, D) float embeddings (L2-normalized inside unless ``normalize=False``).
      labels: (B,) integer class labels.
      alpha, beta, lam, eps: positive scale, negative scale, similarity threshold lambda and
        mining margin epsilon (defaults: released code).
      normalize: L2-normalize the embeddings first (cosine similarities).

    Returns:
      A scalar in the embeddings' dtype.

    >>> z = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.0, 1.0]])
    >>> print(f"{multi_similarity_loss(z, jnp.array([0, 0, 1, 1])):.4f}")
    0.1656
    """
    embeddings = _check_float_array("embeddings", embeddings, 2)
    labels = _check_labels("labels", labels, embeddings.shape[0])
    sims = pairwise_cosine(embeddings, normalize=normalize)
    per_anchor = multi_similarity_from_similarities(
        sims, labels, alpha=alpha, beta=beta, lam=lam, eps=eps
    )
    return jnp.mean(per_anchor).astype(embeddings.dtype)


def ms_pair_weights(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 2.0,
    beta: float = 40.0,
    lam: float = 0.5,
    eps: float = 0.1,
    normalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """General-Pair-Weighting weights of the MS loss, ``(w_pos, w_neg)``, each (B, B).

    Wang et al., CVPR 2019, Eq. 13-14 (closed form of ``|dL_i / dS_ij|``):

        w_ij^- = 1 / (exp(beta (lam - S_ij)) + sum_{k in N_i} exp(beta (S_ik - S_ij)))
        w_ij^+ = 1 / (exp(alpha (S_ij - lam)) + sum_{k in P_i} exp(-alpha (S_ik - S_ij)))

    on the mined pairs of kept anchors, zero elsewhere. For analysis: the gradient of
    ``sum_i L_i`` with respect to ``S`` is ``w_neg - w_pos``.

    >>> z = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.0, 1.0]])
    >>> w_pos, w_neg = ms_pair_weights(z, jnp.array([0, 0, 1, 1]))
    >>> [round(v, 3) for v in w_neg[2].tolist()]
    [0.079, 0.921, 0.0, 0.0]
    """
    embeddings = _check_float_array("embeddings", embeddings, 2)
    labels = _check_labels("labels", labels, embeddings.shape[0])
    _check_ms_hyperparameters(alpha, beta, eps)
    sims = pairwise_cosine(embeddings, normalize=normalize)
    hard_pos, hard_neg, valid = _ms_masks(sims, labels, eps)
    hard_pos = hard_pos & valid[:, None]
    hard_neg = hard_neg & valid[:, None]
    # Softmax-like forms of Eq. 13-14, written with a log-sum-exp per anchor for stability.
    neg_logits = beta * (sims - lam)
    neg_norm = _log1p_sum_exp(neg_logits, hard_neg)[:, None]
    w_neg = jnp.where(hard_neg, jnp.exp(jnp.where(hard_neg, neg_logits, 0.0) - neg_norm), 0.0)
    pos_logits = -alpha * (sims - lam)
    pos_norm = _log1p_sum_exp(pos_logits, hard_pos)[:, None]
    w_pos = jnp.where(hard_pos, jnp.exp(jnp.where(hard_pos, pos_logits, 0.0) - pos_norm), 0.0)
    return w_pos.astype(embeddings.dtype), w_neg.astype(embeddings.dtype)


# --------------------------------------------------------------------------- contrastive


def info_nce_from_similarities(
    positive_similarities: jax.Array,
    negative_similarities: jax.Array,
    *,
    temperature: float = 0.1,
) -> jax.Array:
    """Softmax contrastive (InfoNCE) loss per anchor from similarities, shape (B,).

    Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021, Eq. 1:

        L_i = -log( exp(s_ii / tau) / (exp(s_ii / tau) + sum_k exp(s_ik / tau)) ),

    computed as ``logsumexp([s_ii, s_i.] / tau) - s_ii / tau`` (stable for any tau > 0).

    Args:
      positive_similarities: (B,) similarity of each anchor to its positive.
      negative_similarities: (B, K) similarities of each anchor to its K negatives.
      temperature: tau > 0.

    >>> print(info_nce_from_similarities(jnp.array([0.9]), jnp.array([[0.8, 0.1]])).round(5))
    [0.31351]
    """
    pos = _check_float_array("positive_similarities", positive_similarities, 1)
    neg = _check_float_array("negative_similarities", negative_similarities, 2)
    if neg.shape[0] != pos.shape[0]:
        raise ValueError(
            "negative_similarities: expected shape (B, K) with B = "
            f"{pos.shape[0]} (from positive_similarities), got {neg.shape}"
        )
    _check_positive("temperature", temperature)
    dtype = jnp.result_type(pos.dtype, neg.dtype)
    work = _compute_dtype(dtype)
    logits = jnp.concatenate([pos[:, None].astype(work), neg.astype(work)], axis=1) / temperature
    return (jax.nn.logsumexp(logits, axis=1) - logits[:, 0]).astype(dtype)


def _contrastive_inputs(
    anchors: jax.Array, positives: jax.Array, negatives: jax.Array | None, normalize: bool
) -> tuple[jax.Array, jax.Array, jax.Array | None, jnp.dtype]:
    anchors = _check_float_array("anchors", anchors, 2)
    positives = _check_float_array("positives", positives, 2)
    if positives.shape != anchors.shape:
        raise ValueError(
            f"positives: expected the anchors' shape {anchors.shape}, got {positives.shape}"
        )
    if negatives is not None:
        negatives = _check_float_array("negatives", negatives)
        d = anchors.shape[1]
        ok = (negatives.ndim == 2 and negatives.shape[1] == d) or (
            negatives.ndim == 3 and negatives.shape[0] == anchors.shape[0]
        )
        if not ok or negatives.shape[-1] != d:
            raise ValueError(
                f"negatives: expected shape (K, {d}) or ({anchors.shape[0]}, K, {d}), "
                f"got {negatives.shape}"
            )
    arrays = [anchors, positives] + ([] if negatives is None else [negatives])
    dtype = jnp.result_type(*[a.dtype for a in arrays])
    work = _compute_dtype(dtype)
    prep = [(l2_normalize(a) if normalize else a).astype(work) for a in arrays]
    return prep[0], prep[1], (prep[2] if negatives is not None else None), dtype


def _negative_similarities(anchors: jax.Array, negatives: jax.Array) -> jax.Array:
    hp = jax.lax.Precision.HIGHEST
    if negatives.ndim == 2:
        return jnp.matmul(anchors, negatives.T, precision=hp)
    return jnp.einsum("bd,bkd->bk", anchors, negatives, precision=hp)


def info_nce(
    anchors: jax.Array,
    positives: jax.Array,
    negatives: jax.Array | None = None,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
) -> jax.Array:
    """InfoNCE / softmax contrastive loss of a batch: **one value per batch** (a scalar).

    Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021, Eq. 1, averaged
    over the B anchors: ``s_ii = f(x_i)^T g(x_i)`` is the positive, and the negatives are

    * ``negatives=None``: the other anchors' positives, ``s_ik = f(x_i)^T g(x_k)``, k != i
      (in-batch negatives; the loss is cross-entropy over the rows of ``A P^T / tau``);
    * ``negatives`` of shape (K, D): a shared bank (memory bank / queue);
    * ``negatives`` of shape (B, K, D): K negatives per anchor.

    Args:
      anchors, positives: (B, D) embeddings (L2-normalized inside unless ``normalize=False``).
      negatives: optional, see above.
      temperature: tau > 0 (small tau concentrates the penalty on the hardest negatives).

    >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> print(f"{info_nce(a, a, temperature=1.0):.5f}")
    0.31326
    """
    a, p, n, dtype = _contrastive_inputs(anchors, positives, negatives, normalize)
    _check_positive("temperature", temperature)
    hp = jax.lax.Precision.HIGHEST
    if n is None:
        logits = jnp.matmul(a, p.T, precision=hp) / temperature
        per_anchor = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
    else:
        pos = jnp.sum(a * p, axis=1)
        per_anchor = info_nce_from_similarities(
            pos, _negative_similarities(a, n), temperature=temperature
        )
    return jnp.mean(per_anchor).astype(dtype)


def hard_info_nce(
    anchors: jax.Array,
    positives: jax.Array,
    negatives: jax.Array | None = None,
    *,
    temperature: float = 0.1,
    num_hard: int,
    normalize: bool = True,
) -> jax.Array:
    """Hard contrastive loss, **one value per batch**: InfoNCE over the top-K negatives.

    Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021, Eq. 10: only
    the ``num_hard`` negatives most similar to each anchor enter the denominator (the paper
    keeps the informative ones above a per-anchor threshold; a static K keeps shapes fixed).
    With ``num_hard`` equal to the number of negatives it equals :func:`info_nce`.

    Args:
      anchors, positives, negatives, temperature, normalize: as in :func:`info_nce`.
      num_hard: K, 1 <= K <= number of negatives per anchor (B - 1 for in-batch negatives).

    >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    >>> print(f"{hard_info_nce(a, a, temperature=1.0, num_hard=1):.4f}")
    0.5698
    """
    a, p, n, dtype = _contrastive_inputs(anchors, positives, negatives, normalize)
    _check_positive("temperature", temperature)
    b = a.shape[0]
    available = b - 1 if n is None else n.shape[-2]
    if not isinstance(num_hard, int) or not 1 <= num_hard <= available:
        raise ValueError(f"num_hard: expected an int in [1, {available}], got {num_hard!r}")
    pos = jnp.sum(a * p, axis=1)
    if n is None:
        sims = jnp.matmul(a, p.T, precision=jax.lax.Precision.HIGHEST)
        neg = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, sims)
    else:
        neg = _negative_similarities(a, n)
    hardest, _ = jax.lax.top_k(neg, num_hard)
    per_anchor = info_nce_from_similarities(pos, hardest, temperature=temperature)
    return jnp.mean(per_anchor).astype(dtype)


def nt_xent(
    z1: jax.Array, z2: jax.Array, *, temperature: float = 0.1, normalize: bool = True
) -> jax.Array:
    """NT-Xent (SimCLR) loss of a batch of view pairs: **one value per batch** (a scalar).

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020, Eq. 1 (the loss analysed by Wang & Liu, CVPR 2021): the 2B views ``[z1; z2]``,
    each view's positive is the other view of its sample and its 2B - 2 negatives are all
    remaining views; the mean over the 2B views.

    Args:
      z1, z2: (B, D) embeddings of two views of the same B samples.
      temperature: tau > 0.

    >>> z = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> print(f"{nt_xent(z, z, temperature=1.0):.5f}")
    0.55144
    """
    a, p, _, dtype = _contrastive_inputs(z1, z2, None, normalize)
    _check_positive("temperature", temperature)
    b = a.shape[0]
    z = jnp.concatenate([a, p], axis=0)
    logits = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
    logits = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)
    partner = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)])
    positive = jnp.take_along_axis(logits, partner[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive).astype(dtype)


# --------------------------------------------------------------------------- prototypes


def _distances(u: jax.Array, v: jax.Array, eps: float) -> jax.Array:
    """``sqrt(||u_i - v_j||^2 + eps)``, shape (len(u), len(v)); the difference form is exact."""
    diff = u[:, None, :] - v[None, :, :]
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1) + eps)


def class_prototypes(
    support_embeddings: jax.Array, support_labels: jax.Array, num_classes: int
) -> jax.Array:
    """Class prototypes ``p_c`` = mean of the class-c support embeddings, shape (C, D).

    Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017,
    Eq. 1 (used by Mendez-Ruiz et al. 2023). A class without support gets a zero prototype.

    >>> s = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    >>> class_prototypes(s, jnp.array([0, 0, 1]), 2).tolist()
    [[1.0, 0.0], [0.0, 4.0]]
    """
    support = _check_float_array("support_embeddings", support_embeddings, 2)
    labels = _check_labels("support_labels", support_labels, support.shape[0])
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    work = _compute_dtype(support.dtype)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=work)
    sums = jnp.matmul(onehot.T, support.astype(work), precision=jax.lax.Precision.HIGHEST)
    counts = jnp.sum(onehot, axis=0)[:, None]
    return (sums / jnp.maximum(counts, 1.0)).astype(support.dtype)


def protonet_logits(
    query_embeddings: jax.Array, prototypes: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """ProtoNet logits ``-||f(q) - p_c||^2 / T``, shape (Q, C), for a softmax cross-entropy.

    Snell et al., NeurIPS 2017, Eq. 2; Mendez-Ruiz et al. 2023 use T = 1.

    >>> protonet_logits(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0], [1.0, 1.0]])).tolist()
    [[-1.0, -1.0]]
    """
    query = _check_float_array("query_embeddings", query_embeddings, 2)
    protos = _check_float_array("prototypes", prototypes, 2)
    if protos.shape[1] != query.shape[1]:
        raise ValueError(
            f"prototypes: expected shape (C, {query.shape[1]}), got shape {protos.shape}"
        )
    _check_positive("temperature", temperature)
    dtype = jnp.result_type(query.dtype, protos.dtype)
    work = _compute_dtype(dtype)
    diff = query.astype(work)[:, None, :] - protos.astype(work)[None, :, :]
    return (-jnp.sum(diff * diff, axis=-1) / temperature).astype(dtype)


def proto_triplet_loss(
    query_embeddings: jax.Array,
    query_labels: jax.Array,
    prototypes: jax.Array,
    *,
    margin: float = 0.5,
    eps: float = 1e-6,
) -> jax.Array:
    """Proto-Triplet loss of an episode: **one value per episode** (a scalar).

    Mendez-Ruiz et al., "SuSana Distancia is all you need", arXiv 2305.09062 (2023), Sec. 3:
    a triplet loss whose anchor is the query, positive its class prototype and negative the
    nearest other prototype, averaged over the Q queries,

        L_PT = mean_q max(0, d(f(q), p_{y_q}) - min_{c != y_q} d(f(q), p_c) + m),

    with ``d(u, v) = sqrt(||u - v||^2 + eps)`` as in the authors' code.

    Args:
      query_embeddings: (Q, D); query_labels: (Q,) ints in [0, C); prototypes: (C, D), C >= 2.
      margin: m >= 0.

    >>> q = jnp.array([[0.2], [0.4], [0.9]])
    >>> p = jnp.array([[0.0], [1.0]])
    >>> print(f"{proto_triplet_loss(q, jnp.array([0, 0, 0]), p):.5f}")
    0.53333
    """
    query = _check_float_array("query_embeddings", query_embeddings, 2)
    protos = _check_float_array("prototypes", prototypes, 2)
    labels = _check_labels("query_labels", query_labels, query.shape[0])
    if protos.shape[1] != query.shape[1] or protos.shape[0] < 2:
        raise ValueError(
            f"prototypes: expected shape (C, {query.shape[1]}) with C >= 2, got {protos.shape}"
        )
    _check_positive("margin", margin, allow_zero=True)
    _check_positive("eps", eps)
    dtype = jnp.result_type(query.dtype, protos.dtype)
    work = _compute_dtype(dtype)
    dist = _distances(query.astype(work), protos.astype(work), eps)
    own = jax.nn.one_hot(labels, protos.shape[0], dtype=bool)
    d_pos = jnp.sum(jnp.where(own, dist, 0.0), axis=1)
    d_neg = jnp.min(jnp.where(own, jnp.inf, dist), axis=1)
    return jnp.mean(jax.nn.relu(d_pos - d_neg + margin)).astype(dtype)


# --------------------------------------------------------------------------- ICNN


def _masked_mean(values: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    count = jnp.sum(mask, axis=axis)
    total = jnp.sum(jnp.where(mask, values, 0.0), axis=axis)
    return total / jnp.maximum(count, 1).astype(values.dtype)


def _icnn_components(
    x: jax.Array,
    labels: jax.Array,
    ref: jax.Array | None,
    ref_labels: jax.Array | None,
    k: int,
    drop_self: bool,
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lambda_same, lambda_diff, gamma) of the ICNN score."""
    work = _compute_dtype(x.dtype)
    x = x.astype(work)
    own_set = ref is None
    pool = x if own_set else ref.astype(work)
    pool_labels = labels if own_set else ref_labels
    dist = _distances(x, pool, eps)
    n_pool = pool.shape[0]
    if own_set and drop_self:
        # x_i itself is removed by index (the code drops the nearest point, same unless duplicates).
        dist_rank = jnp.where(jnp.eye(n_pool, dtype=bool), jnp.inf, dist)
        available, skip = n_pool - 1, 0
    else:
        # With a separate reference set the code still drops the nearest point; drop_self=True
        # reproduces that, drop_self=False keeps it.
        dist_rank = dist
        available, skip = n_pool - int(drop_self), int(drop_self)
    if available < 2:
        raise ValueError(
            f"ref: expected at least {2 + int(drop_self)} reference points for the ICNN score, "
            f"got {n_pool}"
        )
    pool_full = k + 1 >= available
    k_eff = available - 1 if pool_full else k
    _, idx = jax.lax.top_k(-jax.lax.stop_gradient(dist_rank), k_eff + 1 + skip)
    idx = idx[:, skip:]
    d = jnp.take_along_axis(dist, idx, axis=1)  # (n, k_eff + 1), ascending
    same = pool_labels[idx] == labels[:, None]
    diff = ~same
    has_diff = jnp.any(diff, axis=1, keepdims=True)
    nn_dc = jnp.min(jnp.where(diff, d, jnp.inf), axis=1, keepdims=True)
    nn_dc = jnp.where(has_diff, nn_dc, 1.0)

    d_k, same_k, diff_k = d[:, :k_eff], same[:, :k_eff], diff[:, :k_eff]
    ratio = jnp.where(has_diff, d_k / nn_dc, 0.0)
    ratio = ratio / jnp.maximum(jnp.max(ratio, axis=1, keepdims=True), 1.0)
    has_same = jnp.any(same_k, axis=1)
    per_point_same = _masked_mean(ratio, same_k, axis=1)
    # No point with a same-class neighbour (e.g. 1-shot support sets): lambda_same = 1.
    lambda_same = 1.0 - _masked_mean(per_point_same, has_same)

    any_diff = jnp.any(diff_k)
    largest = jnp.max(jnp.where(diff_k, d_k, 0.0))
    scaled = d_k / jnp.where(any_diff, largest, 1.0)
    has_diff_k = jnp.any(diff_k, axis=1)
    per_point_diff = _masked_mean(scaled, diff_k, axis=1)
    lambda_diff = jnp.where(any_diff, _masked_mean(per_point_diff, has_diff_k), 1.0)

    if pool_full:
        gamma = jnp.ones((), work)
    else:
        gamma = jnp.mean(jnp.sum(same_k, axis=1).astype(work)) / k_eff
    return lambda_same, lambda_diff, gamma


def _icnn_score(x, labels, ref, ref_labels, k, drop_self, eps) -> jax.Array:
    lambda_same, lambda_diff, gamma = _icnn_components(
        x, labels, ref, ref_labels, k, drop_self, eps
    )
    return ((lambda_same + lambda_diff) / 2.0 + gamma) / 2.0


def _check_icnn_inputs(x, labels, ref, ref_labels, k):
    x = _check_float_array("x", x, 2)
    labels = _check_labels("labels", labels, x.shape[0])
    if (ref is None) != (ref_labels is None):
        raise ValueError("ref, ref_labels: expected both or neither, got only one of them")
    if ref is not None:
        ref = _check_float_array("ref", ref, 2)
        if ref.shape[1] != x.shape[1]:
            raise ValueError(f"ref: expected shape (M, {x.shape[1]}), got shape {ref.shape}")
        ref_labels = _check_labels("ref_labels", ref_labels, ref.shape[0])
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    return x, labels, ref, ref_labels


def icnn_score(
    x: jax.Array,
    labels: jax.Array,
    ref: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    *,
    k: int = 4,
    drop_self: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
    """ICNN (intra/inter-class nearest-neighbour) score of a set, in [0, 1]: a scalar.

    Mendez-Ruiz et al., "SuSana Distancia is all you need", arXiv 2305.09062 (2023), Sec. 3
    (the authors' ``modified_score``). For each point its k + 1 nearest neighbours in ``ref``
    (``x`` itself by default) are taken with ``d(u, v) = sqrt(||u - v||^2 + eps)``:

    * lambda_same = 1 - mean over points with a same-class neighbour of the mean, over those
      neighbours among the first k, of ``d_ij / nn_dc(i)`` (``nn_dc``: nearest different-class
      neighbour of the k + 1; each row divided by ``max(1, max_j ratio)``);
    * lambda_diff = mean over points with a different-class neighbour among the first k of
      their mean distance to them, divided by the largest such distance in the set (1 if
      none);
    * gamma = mean fraction of same-class points among the first k neighbours (no gradient);
    * score = ((lambda_same + lambda_diff) / 2 + gamma) / 2.

    As in the code, k is reduced to (number of candidate neighbours - 1) when the pool is
    too small, and then gamma = 1. When no point has a same-class neighbour (a 1-shot support
    set) lambda_same is 1 (our guard; the definition is empty there).

    Args:
      x: (N, D) embeddings; labels: (N,) ints.
      ref, ref_labels: optional reference set (M, D), (M,) (e.g. support points or prototypes
        for the query variant). Default: ``x`` itself.
      k: neighbourhood size (paper: 4).
      drop_self: with ``ref=None``, exclude each point itself (by index). With a reference
        set, ``True`` drops each point's nearest reference point as the authors' code does
        (a quirk: that point is a genuine neighbour), ``False`` keeps it.
      eps: the constant inside the square root of the distance.

    >>> x = jnp.array([[0.043], [0.118], [0.291], [0.401], [1.056], [1.096], [1.26], [1.287]])
    >>> print(f"{icnn_score(x, jnp.array([0, 0, 0, 0, 1, 1, 1, 1])):.5f}")
    0.76885
    """
    x, labels, ref, ref_labels = _check_icnn_inputs(x, labels, ref, ref_labels, k)
    _check_positive("eps", eps)
    return _icnn_score(x, labels, ref, ref_labels, k, drop_self, eps).astype(x.dtype)


def icnn_loss(
    x: jax.Array,
    labels: jax.Array,
    ref: jax.Array | None = None,
    ref_labels: jax.Array | None = None,
    *,
    k: int = 4,
    drop_self: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
    """ICNN loss ``-log(icnn_score)`` of a set: **one value per episode** (a scalar).

    Mendez-Ruiz et al., "SuSana Distancia is all you need", arXiv 2305.09062 (2023), Sec. 3.
    The paper's variants choose the set: support only, queries against the support (or the
    prototypes), or all support and query embeddings together ("full"). Gradients flow
    through the distances in lambda; the neighbour ranking and gamma are constant.

    >>> x = jnp.array([[0.043], [0.118], [0.291], [0.401], [1.056], [1.096], [1.26], [1.287]])
    >>> print(f"{icnn_loss(x, jnp.array([0, 0, 0, 0, 1, 1, 1, 1])):.5f}")
    0.26286
    """
    x, labels, ref, ref_labels = _check_icnn_inputs(x, labels, ref, ref_labels, k)
    _check_positive("eps", eps)
    score = _icnn_score(x, labels, ref, ref_labels, k, drop_self, eps)
    return (-jnp.log(jnp.maximum(score, jnp.finfo(score.dtype).tiny))).astype(x.dtype)
