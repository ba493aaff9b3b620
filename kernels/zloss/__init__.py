"""Fused output layer + Z-loss: ``h @ W^T`` -> per-row moments -> Z-loss, forward and
backward in Pallas, never writing the ``(N, D)`` logits.

de Brebisson & Vincent, "The Z-loss: a shift and scale invariant classification loss
belonging to the Spherical Family", arXiv 1604.08859, 2016.

* :func:`z_loss_linear` (``api``): the public op (``jax.custom_vjp``), which picks the kernel
  when lowered for GPU (Triton) or TPU (Mosaic) and the jnp forms elsewhere;
* ``reference``: the dense jnp reference (jaxmtl's ``z_loss`` on the formed logits);
* ``pallas``: the kernels; ``bench``: timings against the reference.
"""

from kernels.zloss.api import z_loss_linear

__all__ = ["z_loss_linear"]
