"""Task vectors as pytrees: ``tau = theta_ft - theta_0``, stacking, application, analogies.

"Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023, Eq. 1): a task vector is
the element-wise difference ``tau_t = theta_t - theta_0`` between fine-tuned and pre-trained
weights; an edit is ``theta_0 + sum_t alpha_t tau_t``. Task vectors are plain pytrees shaped
like the parameters, so the arithmetic is ``optax.tree`` arithmetic and is not repeated here:

* sum: ``optax.tree.add(tau_1, tau_2, ...)``; difference: ``optax.tree.sub(a, b)``;
* negation / scaling: ``optax.tree.scale(-1.0, tau)``, ``optax.tree.scale(alpha, tau)``;
* inner product and norms: ``optax.tree.vdot(a, b)``, ``optax.tree.norm(tau)`` (``ord=1``,
  ``"inf"``).

This module adds what optax lacks: a checked :func:`task_vector`, the two forms of a *set* of
task vectors (a sequence of pytrees, or one pytree whose leaves carry a leading axis ``n``,
see :func:`stack` / :func:`unstack`), :func:`apply` of a weighted set to the pre-trained
weights, :func:`analogy` and :func:`cosine_similarities`.

Memory: ``n`` task vectors are ``n`` model copies; stacking a sequence copies once more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxmtl import mtl

PyTree = Any

__all__ = [
    "analogy",
    "apply",
    "as_stacked",
    "cosine_similarities",
    "stack",
    "task_vector",
    "unstack",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_same_structure(name: str, tree: PyTree, ref_name: str, reference: PyTree) -> None:
    got, want = jax.tree.structure(tree), jax.tree.structure(reference)
    if got != want:
        raise ValueError(f"{name}: expected the pytree structure of {ref_name} {want}, got {got}")


def _check_same_shapes(name: str, tree: PyTree, ref_name: str, reference: PyTree) -> None:
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(reference), strict=True
    ):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{name}: expected shape {jnp.shape(b)} (as in {ref_name}) at "
                f"{jax.tree_util.keystr(path)}, got {jnp.shape(a)}"
            )


def task_vector(finetuned: PyTree, pretrained: PyTree) -> PyTree:
    """The task vector ``tau = theta_ft - theta_0`` (Ilharco et al., ICLR 2023, Eq. 1).

    Args:
      finetuned: fine-tuned parameters ``theta_ft``.
      pretrained: pre-trained parameters ``theta_0``, same structure and leaf shapes.

    Returns:
      A pytree shaped like ``pretrained``.

    >>> task_vector({"w": jnp.array([3.0, 1.0])}, {"w": jnp.array([1.0, 1.0])})["w"].tolist()
    [2.0, 0.0]
    """
    _check_same_structure("finetuned", finetuned, "pretrained", pretrained)
    _check_same_shapes("finetuned", finetuned, "pretrained", pretrained)
    return optax.tree.sub(finetuned, pretrained)


def stack(vectors: Sequence[PyTree]) -> PyTree:
    """One pytree whose leaves are the ``n`` vectors' leaves stacked on a new leading axis.

    Args:
      vectors: a non-empty sequence of pytrees with identical structure and leaf shapes.

    Returns:
      A pytree with leaves of shape ``(n, *leaf.shape)``.

    >>> stack([{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}])["w"].shape
    (2, 2)
    """
    if not isinstance(vectors, Sequence) or len(vectors) == 0:
        raise ValueError(f"vectors: expected a non-empty sequence of pytrees, got {vectors!r}")
    for i, vector in enumerate(vectors[1:], start=1):
        _check_same_structure(f"vectors[{i}]", vector, "vectors[0]", vectors[0])
        _check_same_shapes(f"vectors[{i}]", vector, "vectors[0]", vectors[0])
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *vectors)


def unstack(stacked: PyTree) -> list[PyTree]:
    """The inverse of :func:`stack`: a list of ``n`` pytrees.

    >>> [v["w"].tolist() for v in unstack({"w": jnp.array([[1.0], [2.0]])})]
    [[1.0], [2.0]]
    """
    leaves, treedef = jax.tree.flatten(stacked)
    n = _leading_size("stacked", leaves)
    return [treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(n)]


def _leading_size(name: str, leaves: list) -> int:
    if not leaves:
        raise ValueError(f"{name}: expected at least one array leaf, got none")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(leaf) for leaf in leaves]
        raise ValueError(f"{name}: expected a common leading axis n on every leaf, got {shapes}")
    return sizes.pop()


def as_stacked(vectors: PyTree | Sequence[PyTree], pretrained: PyTree) -> tuple[PyTree, int]:
    """Normalizes a set of task vectors to the stacked form, checked against ``pretrained``.

    ``vectors`` is either one pytree with the structure of ``pretrained`` whose leaves have
    shape ``(n, *leaf.shape)`` (stacked), or a sequence of ``n`` pytrees shaped like
    ``pretrained``. The two cannot be confused: a sequence of pytrees never has the structure
    of one of them.

    Returns:
      ``(stacked, n)``.

    >>> stacked, n = as_stacked([{"w": jnp.zeros(2)}] * 3, {"w": jnp.ones(2)})
    >>> n, stacked["w"].shape
    (3, (3, 2))
    """
    if jax.tree.structure(vectors) == jax.tree.structure(pretrained):
        leaves = jax.tree.leaves(vectors)
        n = _leading_size("vectors", leaves)
        for (path, v), p in zip(
            jax.tree_util.tree_leaves_with_path(vectors), jax.tree.leaves(pretrained), strict=True
        ):
            if jnp.shape(v) != (n, *jnp.shape(p)):
                raise ValueError(
                    f"vectors: expected stacked shape {(n, *jnp.shape(p))} at "
                    f"{jax.tree_util.keystr(path)}, got {jnp.shape(v)}"
                )
        return vectors, n
    if isinstance(vectors, Sequence) and not isinstance(vectors, str):
        if len(vectors) == 0:
            raise ValueError("vectors: expected at least one task vector, got an empty sequence")
        for i, vector in enumerate(vectors):
            _check_same_structure(f"vectors[{i}]", vector, "pretrained", pretrained)
            _check_same_shapes(f"vectors[{i}]", vector, "pretrained", pretrained)
        return stack(vectors), len(vectors)
    raise ValueError(
        "vectors: expected a sequence of pytrees shaped like pretrained, or one pytree with the "
        f"structure of pretrained {jax.tree.structure(pretrained)} and a leading axis n, "
        f"got {jax.tree.structure(vectors)}"
    )


def _coefficient_vector(coefficients: Any, n: int) -> jax.Array:
    c = jnp.asarray(coefficients)
    if not jnp.issubdtype(c.dtype, jnp.floating) and not jnp.issubdtype(c.dtype, jnp.integer):
        raise TypeError(f"coefficients: expected real numbers, got dtype {c.dtype}")
    if c.ndim == 0:
        return jnp.broadcast_to(c, (n,))
    if c.shape != (n,):
        raise ValueError(f"coefficients: expected a scalar or shape ({n},), got {c.shape}")
    return c


def combine_leaf(p0: jax.Array, c: jax.Array, v: jax.Array) -> jax.Array:
    """``p0 + sum_i c_i v_i`` for one leaf (``c (n,)``, ``v (n, *p0.shape)``), in p0's dtype.

    The single kernel behind :func:`apply` and ``atlas_apply``, so that aTLAS with equal
    coefficients reproduces isotropic task arithmetic bit for bit.
    """
    delta = jnp.einsum("n,n...->...", c.astype(v.dtype), v, precision=_HIGHEST)
    return p0 + delta.astype(p0.dtype)


def apply(pretrained: PyTree, vectors: PyTree | Sequence[PyTree], coefficients: Any = 1.0):
    """Task arithmetic: ``theta_0 + sum_i alpha_i tau_i`` (Ilharco et al., ICLR 2023, Eq. 1-2).

    Addition uses positive coefficients, negation (forgetting) negative ones.

    Args:
      pretrained: ``theta_0``.
      vectors: ``n`` task vectors, stacked (leading axis ``n``) or a sequence, see
        :func:`as_stacked`.
      coefficients: a scalar (one shared ``alpha``) or shape ``(n,)``.

    Returns:
      Parameters shaped like ``pretrained``, each leaf in its own dtype.

    >>> p0 = {"w": jnp.array([1.0, 1.0])}
    >>> taus = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}]
    >>> apply(p0, taus, jnp.array([0.5, -1.0]))["w"].tolist()
    [1.5, -1.0]
    """
    stacked, n = as_stacked(vectors, pretrained)
    c = _coefficient_vector(coefficients, n)
    return jax.tree.map(lambda p, v: combine_leaf(p, c, v), pretrained, stacked)


def analogy(tau_a: PyTree, tau_b: PyTree, tau_c: PyTree) -> PyTree:
    """The analogy task vector ``tau_a - tau_b + tau_c``.

    Ilharco et al. (ICLR 2023, Sec. 5) complete "A is to B as C is to D" with
    ``tau_D = tau_C + (tau_B - tau_A)``, i.e. ``analogy(tau_B, tau_A, tau_C)``.

    >>> analogy({"w": jnp.array(3.0)}, {"w": jnp.array(1.0)}, {"w": jnp.array(0.5)})["w"].item()
    2.5
    """
    _check_same_structure("tau_b", tau_b, "tau_a", tau_a)
    _check_same_structure("tau_c", tau_c, "tau_a", tau_a)
    _check_same_shapes("tau_b", tau_b, "tau_a", tau_a)
    _check_same_shapes("tau_c", tau_c, "tau_a", tau_a)
    return optax.tree.add(optax.tree.sub(tau_a, tau_b), tau_c)


def cosine_similarities(vectors: PyTree | Sequence[PyTree], pretrained: PyTree) -> jax.Array:
    """The ``(n, n)`` matrix of cosine similarities between task vectors.

    ``<tau_i, tau_j> / (||tau_i|| ||tau_j||)`` as in Ilharco et al. (ICLR 2023, Fig. 4):
    the Gramian is accumulated leaf by leaf (``jaxmtl.mtl.gramian``), never flattening the
    model. ``pretrained`` only fixes the structure. A zero vector has similarity 0.

    >>> taus = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}]
    >>> np.round(np.asarray(cosine_similarities(taus, {"w": jnp.zeros(2)}), float), 3).tolist()
    [[1.0, 0.707], [0.707, 1.0]]
    """
    stacked, _ = as_stacked(vectors, pretrained)
    gram = mtl.gramian(stacked)
    norms = jnp.sqrt(jnp.diagonal(gram))
    denom = norms[:, None] * norms[None, :]
    return jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)
