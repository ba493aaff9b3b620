"""Task vectors, task arithmetic, tangent-space linearization, merges and aTLAS.

* ``vector``: ``task_vector``, ``stack`` / ``unstack`` / ``as_stacked``, ``apply``
  (``theta_0 + sum_i alpha_i tau_i``), ``analogy``, ``cosine_similarities``; sums, scaling,
  dot products and norms are ``optax.tree.add / scale / vdot / norm``.
* ``tangent``: ``linearize(apply_fn, params0)`` (first-order Taylor model via ``jax.jvp``),
  ``linearize_batch`` (``jax.linearize``), and the cached form for many edits of one batch:
  ``tangent_outputs`` + ``combine_outputs``, packaged as ``coefficient_sweep``.
* ``protocols``: alpha selection for task addition and negation, ``edit_accuracies`` and the
  ``task_addition`` / ``task_negation`` drivers.
* ``merging``: TIES-merging (``ties_merge``) and DARE (``dare``, ``dare_merge``).
* ``atlas``: learned per-block coefficients (``atlas_init``, ``atlas_apply``, ``atlas_model``,
  ``atlas_fit``).

Disentanglement error and NTK diagnostics live in ``jaxmtl.analysis.disentanglement`` and
``jaxmtl.analysis.ntk``.
"""

from jaxmtl.taskvec.atlas import atlas_apply, atlas_fit, atlas_init, atlas_model
from jaxmtl.taskvec.merging import dare, dare_merge, ties_elect_sign, ties_merge, ties_trim
from jaxmtl.taskvec.protocols import (
    AdditionResult,
    NegationResult,
    edit_accuracies,
    normalized_accuracy,
    padded_edit_accuracies,
    select_addition_alpha,
    select_negation_alpha,
    task_addition,
    task_negation,
)
from jaxmtl.taskvec.tangent import (
    coefficient_sweep,
    combine_outputs,
    linearize,
    linearize_batch,
    tangent_outputs,
)
from jaxmtl.taskvec.vector import (
    analogy,
    apply,
    as_stacked,
    cosine_similarities,
    stack,
    task_vector,
    unstack,
)

__all__ = [
    "AdditionResult",
    "NegationResult",
    "analogy",
    "apply",
    "as_stacked",
    "atlas_apply",
    "atlas_fit",
    "atlas_init",
    "atlas_model",
    "coefficient_sweep",
    "combine_outputs",
    "cosine_similarities",
    "dare",
    "dare_merge",
    "edit_accuracies",
    "linearize",
    "linearize_batch",
    "normalized_accuracy",
    "padded_edit_accuracies",
    "select_addition_alpha",
    "select_negation_alpha",
    "stack",
    "tangent_outputs",
    "task_addition",
    "task_negation",
    "task_vector",
    "ties_elect_sign",
    "ties_merge",
    "ties_trim",
    "unstack",
]
