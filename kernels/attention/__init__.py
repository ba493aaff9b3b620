"""Flash attention: Pallas kernels (GPU via Triton, TPU via Mosaic) beside a jnp reference.

``flash_attention(q, k, v, *, causal, segment_ids, key_mask, implementation, ...)`` on the
``(batch, seq, heads, head_dim)`` layout of ``jax.nn.dot_product_attention``.
"""

from kernels.attention.api import IMPLEMENTATIONS, flash_attention
from kernels.attention.reference import attention_reference

__all__ = ["IMPLEMENTATIONS", "attention_reference", "flash_attention"]
