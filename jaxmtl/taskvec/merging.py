"""Interference-reducing merges of task vectors: TIES-merging and DARE.

* "TIES-Merging: Resolving Interference When Merging Models" (Yadav, Tam, Choshen, Raffel &
  Bansal, NeurIPS 2023, Algorithm 1): trim each task vector to its largest-magnitude entries,
  elect one sign per parameter by the summed trimmed values, and average only the entries that
  agree with the elected sign (disjoint mean).
* "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch" (Yu, Yu, Yu, Huang & Li, ICML 2024, Eq. 2-3), DARE: drop each entry of a task vector
  with probability ``p`` and rescale the survivors by ``1 / (1 - p)``, so the vector is
  unchanged in expectation.

Both return a merged *task vector*; apply it with ``jaxmtl.taskvec.apply(theta_0, [tau_m],
lam)`` (TIES's ``lambda``). Per-vector ``weights`` may be negative (negation inside a merge).

``vectors`` is a list or tuple of task-vector pytrees, or one stacked pytree (leading axis
``n`` on every leaf) whose top level is not a list or tuple (a dict, as ``functional`` gives).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmtl.taskvec.vector import _leading_size, stack

PyTree = Any

__all__ = ["dare", "dare_merge", "ties_elect_sign", "ties_merge", "ties_trim"]


def _stacked(vectors: PyTree | Sequence[PyTree]) -> tuple[PyTree, int]:
    """Stacked form of ``vectors``: a list or tuple is a sequence of task vectors (stacked
    here); anything else is taken as already stacked (leading axis ``n`` on every leaf)."""
    if isinstance(vectors, list | tuple):
        vectors = stack(vectors)
    leaves = jax.tree.leaves(vectors)
    return vectors, _leading_size("vectors", leaves)


def _weights(weights: Any, n: int) -> jax.Array | None:
    if weights is None:
        return None
    w = jnp.asarray(weights)
    if w.shape != (n,) or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"weights: expected a float array of shape ({n},), got {w.dtype}{w.shape}")
    return w


def _scale_rows(stacked: PyTree, w: jax.Array | None) -> PyTree:
    if w is None:
        return stacked
    return jax.tree.map(
        lambda v: v * w.astype(v.dtype).reshape((-1,) + (1,) * (v.ndim - 1)), stacked
    )


def ties_trim(vectors: PyTree | Sequence[PyTree], *, density: float = 0.2) -> PyTree:
    """Step 1 of TIES-merging (Yadav et al., NeurIPS 2023, Alg. 1, "trim"): keep the top-k.

    Per task vector, over *all* of its parameters: ``k = max(1, round(density * d))`` with
    ``d`` its size; entries whose magnitude is at least the ``k``-th largest magnitude are
    kept, the rest set to zero (ties at the threshold are all kept).

    Args:
      vectors: ``n`` task vectors, a list/tuple of pytrees or stacked (leading axis ``n``).
      density: fraction kept, in ``(0, 1]`` (the paper's ``k``% / 100; default 20%).

    Returns:
      Stacked trimmed vectors.

    >>> ties_trim([{"w": jnp.array([0.1, -3.0, 2.0, 0.5])}], density=0.5)["w"].tolist()
    [[0.0, -3.0, 2.0, 0.0]]
    """
    if not isinstance(density, int | float) or not 0.0 < density <= 1.0:
        raise ValueError(f"density: expected a number in (0, 1], got {density!r}")
    stacked, n = _stacked(vectors)
    leaves, treedef = jax.tree.flatten(stacked)
    dtype = jnp.float64 if any(leaf.dtype == jnp.float64 for leaf in leaves) else jnp.float32
    magnitudes = jnp.concatenate(
        [jnp.abs(leaf).reshape(n, -1).astype(dtype) for leaf in leaves], axis=1
    )
    d = magnitudes.shape[1]
    k = max(1, round(density * d))
    threshold = jnp.sort(magnitudes, axis=1)[:, d - k]  # the k-th largest magnitude, (n,)

    def trim(leaf: jax.Array) -> jax.Array:
        t = threshold.astype(leaf.dtype).reshape((n,) + (1,) * (leaf.ndim - 1))
        return jnp.where(jnp.abs(leaf) >= t, leaf, jnp.zeros_like(leaf))

    return treedef.unflatten([trim(leaf) for leaf in leaves])


def ties_elect_sign(trimmed: PyTree) -> PyTree:
    """Step 2 of TIES-merging (Yadav et al., NeurIPS 2023, Alg. 1, "elect"):
    ``gamma_m = sgn(sum_t tau_hat_t)``, the sign with the larger total magnitude.

    Args:
      trimmed: stacked trimmed task vectors (leading axis ``n``).

    Returns:
      A pytree of signs in ``{-1, 0, +1}`` without the leading axis (0 where the sum is 0).

    >>> ties_elect_sign({"w": jnp.array([[1.0, -1.0, 2.0], [-3.0, 0.0, -2.0]])})["w"].tolist()
    [-1.0, -1.0, 0.0]
    """
    return jax.tree.map(lambda v: jnp.sign(jnp.sum(v, axis=0)), trimmed)


def ties_merge(
    vectors: PyTree | Sequence[PyTree], *, density: float = 0.2, weights: Any = None
) -> PyTree:
    """TIES-merging (Yadav et al., NeurIPS 2023, Algorithm 1): trim, elect sign, disjoint mean.

    ``tau_m^p = mean over {t : sgn(tau_hat_t^p) = gamma_m^p} of tau_hat_t^p`` (0 when that set
    is empty), with ``tau_hat_t`` from :func:`ties_trim` and ``gamma_m`` from
    :func:`ties_elect_sign`. With ``weights``, the method runs on ``w_t tau_t`` (a negative
    weight negates a vector before the merge). The merged model is
    ``theta_0 + lambda tau_m`` (the paper tunes ``lambda`` on validation data).

    Where the summed trimmed values are exactly 0 this follows Algorithm 1 (``sgn(0) = 0``:
    the entry merges to 0); the reference code instead uses the model-wide majority sign.

    Args:
      vectors: ``n`` task vectors, a list/tuple of pytrees or stacked (leading axis ``n``).
      density: fraction of each vector kept by the trim step, in ``(0, 1]``.
      weights: optional ``(n,)`` per-vector weights.

    Returns:
      The merged task vector (no leading axis).

    >>> taus = [{"w": jnp.array([1.0, -2.0, 0.1])}, {"w": jnp.array([3.0, 1.0, -0.2])}]
    >>> ties_merge(taus, density=1.0)["w"].tolist()   # signs +, -, -: means 2, -2, -0.2
    [2.0, -2.0, -0.2...]
    """
    stacked, n = _stacked(vectors)
    stacked = _scale_rows(stacked, _weights(weights, n))
    trimmed = ties_trim(stacked, density=density)
    signs = ties_elect_sign(trimmed)

    def disjoint_mean(v: jax.Array, s: jax.Array) -> jax.Array:
        agree = (jnp.sign(v) == s[None]) & (v != 0)
        count = jnp.sum(agree, axis=0).astype(v.dtype)
        total = jnp.sum(jnp.where(agree, v, jnp.zeros_like(v)), axis=0)
        return total / jnp.maximum(count, 1)

    return jax.tree.map(disjoint_mean, trimmed, signs)


def _check_key(key: Any) -> None:
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed and key.ndim == 0) and not raw:
        raise TypeError(f"key: expected one JAX PRNG key (jax.random.key), got {key!r}")


def dare(vector: PyTree, key: jax.Array, *, rate: float) -> PyTree:
    """DARE (Yu et al., ICML 2024, Eq. 2-3): drop entries with probability ``rate``, rescale.

    ``m ~ Bernoulli(rate)`` independently per entry, ``tau_tilde = (1 - m) * tau / (1 - rate)``
    (unbiased: ``E[tau_tilde] = tau``). Leaf ``i`` uses ``jax.random.fold_in(key, i)`` (leaves
    in ``jax.tree.leaves`` order), so a key fixes the masks.

    Args:
      vector: one task vector.
      key: a JAX PRNG key.
      rate: drop probability ``p`` in ``[0, 1)``.

    >>> out = dare({"w": jnp.full((1000,), 2.0)}, jax.random.key(0), rate=0.5)["w"]
    >>> sorted(set(out.tolist())), bool(abs(float(out.mean()) - 2.0) < 0.2)
    ([0.0, 4.0], True)
    """
    if not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate: expected a number in [0, 1), got {rate!r}")
    _check_key(key)
    leaves, treedef = jax.tree.flatten(vector)

    def drop(i: int, leaf: jax.Array) -> jax.Array:
        keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, jnp.shape(leaf))
        scale = jnp.asarray(1.0 / (1.0 - rate), leaf.dtype)
        return jnp.where(keep, leaf * scale, jnp.zeros_like(leaf))

    return treedef.unflatten([drop(i, leaf) for i, leaf in enumerate(leaves)])


def dare_merge(
    vectors: PyTree | Sequence[PyTree], key: jax.Array, *, rate: float, weights: Any = None
) -> PyTree:
    """DARE then task arithmetic (Yu et al., ICML 2024, Sec. 4): ``sum_t w_t DARE(tau_t)``.

    Vector ``t`` is dropped with ``jax.random.fold_in(key, t)`` (:func:`dare`), independently
    of the others. ``weights`` default to ones and may be negative.

    Args:
      vectors: ``n`` task vectors, a list/tuple of pytrees or stacked (leading axis ``n``).
      key: a JAX PRNG key.
      rate: drop probability in ``[0, 1)``.
      weights: optional ``(n,)`` per-vector weights.

    Returns:
      The merged task vector (no leading axis).

    >>> taus = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([4.0, 8.0])}]
    >>> dare_merge(taus, jax.random.key(0), rate=0.0, weights=jnp.array([1.0, -0.5]))["w"].tolist()
    [-1.0, -2.0]
    """
    _check_key(key)
    stacked, n = _stacked(vectors)
    w = _weights(weights, n)
    if w is None:
        w = jnp.ones((n,), jnp.float32)
    keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(n))
    dropped = jax.vmap(lambda v, k: dare(v, k, rate=rate))(stacked, keys)
    return jax.tree.map(
        lambda v: jnp.tensordot(w.astype(v.dtype), v, axes=1, precision=jax.lax.Precision.HIGHEST),
        dropped,
    )
