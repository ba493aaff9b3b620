"""Pallas kernels for jaxmtl's hot paths, each beside a pure-jnp reference.

* ``kernels.zloss``: fused ``h @ W^T`` -> Z-loss, forward and backward, never writing the
  N x D logits (``kernels.zloss.api.z_loss_linear``).
* ``kernels.attention``: flash attention, forward and FlashAttention-2 backward
  (``kernels.attention.flash_attention``).

The public ops pick the kernel on GPU/TPU and the reference elsewhere; tests run the kernels
in interpret mode on the CPU and lower them for ``cuda`` and ``tpu`` through ``jax.export``.
"""
