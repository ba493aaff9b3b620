"""Measurements of models and training: weight disentanglement, NTK, embeddings, equity.

* ``disentanglement``: weight disentanglement error (Ortiz-Jimenez et al., NeurIPS 2023);
* ``ntk``: empirical NTK Gram matrices and eigenfunction localization;
* ``embedding``: uniformity and tolerance (Wang & Liu 2021), recall@k;
* ``equity``: k-means in JAX and appearance likelihoods (DatasetEquity).
"""

from jaxmtl.analysis.disentanglement import (
    nonlinear_advantage,
    weight_disentanglement_error,
)
from jaxmtl.analysis.embedding import (
    negative_penalty,
    penalty_entropy,
    recall_at_k,
    tolerance,
    uniformity,
)
from jaxmtl.analysis.equity import (
    KMeansResult,
    appearance_likelihood,
    cluster_likelihood,
    cluster_sizes,
    kmeans,
    pca_project,
)
from jaxmtl.analysis.ntk import (
    eigenfunction_localization,
    ntk_gram,
)

__all__ = [
    "KMeansResult",
    "appearance_likelihood",
    "cluster_likelihood",
    "cluster_sizes",
    "eigenfunction_localization",
    "kmeans",
    "negative_penalty",
    "nonlinear_advantage",
    "ntk_gram",
    "pca_project",
    "penalty_entropy",
    "recall_at_k",
    "tolerance",
    "uniformity",
    "weight_disentanglement_error",
]
