"""Pure-jnp scaled dot-product attention: the definition the kernels are tested against.

``out = softmax(q k^T * scale + mask) v`` per head (Vaswani et al., "Attention Is All You
Need", NeurIPS 2017, Eq. 1), computed in float32 and cast back to the inputs' dtype. The mask
keeps key ``j`` for query ``i`` when ``q_segment_ids[i] == kv_segment_ids[j]`` and, if
``causal``, ``j <= i`` (top-left aligned, as ``jax.nn.dot_product_attention(is_causal=True)``).
A query row that keeps no key at all attends to nothing: its output is 0, and so are its
gradients (no NaN), where a plain softmax over ``-inf`` would give NaN.

Layout: ``q (batch, seq_q, heads, head_dim)``, ``k, v (batch, seq_kv, kv_heads, head_dim)``
with ``heads`` a multiple of ``kv_heads`` (grouped-query attention, Ainslie et al., "GQA",
EMNLP 2023: query head ``h`` reads kv head ``h // (heads // kv_heads)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention_mask", "attention_reference"]

# A finite stand-in for -inf: exp(MASK_VALUE - m) underflows to 0 for any real logit m, and
# MASK_VALUE - MASK_VALUE = 0 stays finite where -inf - -inf would be NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    seq_q: int,
    seq_kv: int,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
) -> jax.Array | None:
    """Boolean ``(batch or 1, 1, seq_q, seq_kv)`` mask (True: attend), or None for no mask."""
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    if causal:
        tril = jnp.arange(seq_q)[:, None] >= jnp.arange(seq_kv)[None, :]
        mask = tril[None, None] if mask is None else mask & tril
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Masked scaled dot-product attention in float32 (see the module docstring).

    Args:
      q: ``(batch, seq_q, heads, head_dim)``.
      k, v: ``(batch, seq_kv, kv_heads, head_dim)``, same dtype as ``q``.
      causal: key ``j`` is visible to query ``i`` only if ``j <= i``.
      q_segment_ids, kv_segment_ids: integer ``(batch, seq_q)`` and ``(batch, seq_kv)``, both
        or neither; a query sees only keys of its own segment.
      scale: logit scale; ``1 / sqrt(head_dim)`` if None.

    Returns:
      ``(batch, seq_q, heads, head_dim)`` in ``q.dtype``; rows with no visible key are 0.

    >>> q = jnp.zeros((1, 3, 1, 2))
    >>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)
    >>> attention_reference(q, q, v, causal=True)[0, :, 0, 0].tolist()
    [0.0, 1.0, 2.0]
    """
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    if scale is None:
        scale = head_dim**-0.5
    qf = q.astype(jnp.float32).reshape(batch, seq_q, kv_heads, group, head_dim)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision="highest") * jnp.float32(scale)
    mask = attention_mask(
        seq_q,
        k.shape[1],
        causal=causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    if mask is not None:
        mask = mask[:, :, None]  # (batch, 1, 1, seq_q, seq_kv) over (kv_heads, group)
        logits = jnp.where(mask, logits, jnp.float32(MASK_VALUE))
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    if mask is not None:
        weights = jnp.where(mask, weights, jnp.float32(0.0))
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / jnp.where(total == 0.0, jnp.float32(1.0), total)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, vf, precision="highest")
    return out.reshape(batch, seq_q, heads, head_dim).astype(q.dtype)
