"""``flash_attention``: the public op; picks the Pallas kernel, XLA or the reference.

The Pallas path is a ``jax.custom_vjp``: the forward kernel returns the output and the row
log-sum-exp, the backward runs the FlashAttention-2 dq and dk/dv kernels on them (see
:mod:`kernels.attention.pallas` for the algorithm and why the GPU kernels lower through
Triton by default). Lengths that are not multiples of the block sizes are padded here, with
padded keys masked out and padded query rows dropped, so the kernels only see whole blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels.attention.pallas import Backend, flash_backward, flash_forward
from kernels.attention.reference import attention_mask, attention_reference

__all__ = ["GPU_KERNELS", "IMPLEMENTATIONS", "flash_attention"]

IMPLEMENTATIONS = ("auto", "pallas", "xla", "reference")

# Segment ids of padding: query rows -1 and keys -2 never match each other or a user's
# (non-negative) ids, so padded keys are invisible and padded queries see nothing.
_Q_PAD = -1
_KV_PAD = -2


@dataclasses.dataclass(frozen=True)
class _Blocks:
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int


_BLOCK_NAMES = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")
# Per backend: (block_q, block_kv, block_q_bwd, block_kv_bwd).
_DEFAULT_BLOCKS = {
    "triton": (128, 64, 64, 64),
    "mosaic_gpu": (64, 64, 64, 64),
    "tpu": (128, 128, 128, 128),
    "interpret": (128,) * 4,
}
GPU_KERNELS = ("triton", "mosaic_gpu")


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(requested: int | None, default: int, length: int) -> int:
    """The block size, shrunk (to a power of two >= 16) when the sequence is shorter."""
    block = default if requested is None else requested
    return min(block, max(16, _next_power_of_two(length)))


def _check_block(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two >= 16 or None, got {value!r}")


def _flash_fwd(q, k, v, qs, ks, causal, scale, blocks, backend):
    out, lse = flash_forward(
        q,
        k,
        v,
        qs,
        ks,
        causal=causal,
        scale=scale,
        block_q=blocks.block_q,
        block_kv=blocks.block_kv,
        backend=backend,
    )
    return out, (q, k, v, qs, ks, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, qs, ks, causal, scale, blocks, backend):
    return _flash_fwd(q, k, v, qs, ks, causal, scale, blocks, backend)[0]


def _flash_bwd(causal, scale, blocks, backend, residuals, d_out):
    q, k, v, qs, ks, out, lse = residuals
    dq, dk, dv = flash_backward(
        q,
        k,
        v,
        qs,
        ks,
        out,
        lse,
        d_out,
        causal=causal,
        scale=scale,
        block_q=blocks.block_q_bwd,
        block_kv=blocks.block_kv_bwd,
        backend=backend,
    )
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pallas(q, k, v, qs, ks, *, causal, scale, block_sizes, backend_name):
    """Pads and lays out for ``backend_name``, runs the custom_vjp kernels, and undoes both."""
    seq_q, head_dim = q.shape[1], q.shape[3]
    seq_kv = k.shape[1]
    defaults = _DEFAULT_BLOCKS.get(backend_name, _DEFAULT_BLOCKS["interpret"])
    bq, bkv, bq_bwd, bkv_bwd = (
        _block(req, default, length)
        for req, default, length in zip(
            block_sizes, defaults, (seq_q, seq_kv, seq_q, seq_kv), strict=True
        )
    )
    if backend_name == "mosaic_gpu":  # wgmma tiles: never shrunk, short sequences are padded
        bq, bkv, bq_bwd, bkv_bwd = (64 if req is None else req for req in block_sizes)
        for name, block in zip(_BLOCK_NAMES, (bq, bkv, bq_bwd, bkv_bwd), strict=True):
            if block % 64:  # a wgmma K (or the warpgroup's 64 rows)
                raise ValueError(
                    f"{name}: the Mosaic GPU kernels need a multiple of 64, got {block}"
                )
    blocks = _Blocks(bq, bkv, bq_bwd, bkv_bwd)
    padded_q = _round_up(seq_q, max(bq, bq_bwd))
    padded_kv = _round_up(seq_kv, max(bkv, bkv_bwd))
    if backend_name == "mosaic_gpu" and bq != 64:
        raise ValueError(f"block_q: the Mosaic GPU forward owns one warpgroup's 64 rows, got {bq}")
    if backend_name == "tpu":
        for name, block in (("block_kv", bkv), ("block_kv_bwd", bkv_bwd)):
            if block % 128 and block != padded_kv:
                raise ValueError(
                    f"{name}: the TPU kernel needs a multiple of 128 (or the whole padded "
                    f"key length {padded_kv}), got {block}"
                )
    # Triton needs power-of-two tiles: pad head_dim with zeros (no change to q k^T or to the
    # kept columns of the output).
    padded_d = max(16, _next_power_of_two(head_dim)) if backend_name == "triton" else head_dim
    if backend_name in GPU_KERNELS:
        warps = 4 if padded_d <= 64 else 8
        backend = Backend(backend_name, "bshd", num_warps=warps, num_stages=2)
    elif backend_name == "tpu":
        backend = Backend("tpu", "bhsd")
    else:  # "interpret" on the GPU layout, "interpret_bhsd" on the TPU one
        backend = Backend("interpret", "bhsd" if backend_name == "interpret_bhsd" else "bshd")

    def pad(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, padded_d - head_dim)))
        return jnp.transpose(x, (0, 2, 1, 3)) if backend.layout == "bhsd" else x

    qs = jnp.pad(qs, ((0, 0), (0, padded_q - seq_q)), constant_values=_Q_PAD)[:, :, None]
    ks = jnp.pad(ks, ((0, 0), (0, padded_kv - seq_kv)), constant_values=_KV_PAD)[:, None, :]
    out = _flash(
        pad(q, padded_q),
        pad(k, padded_kv),
        pad(v, padded_kv),
        qs,
        ks,
        causal,
        scale,
        blocks,
        backend,
    )
    if backend.layout == "bhsd":
        out = jnp.transpose(out, (0, 2, 1, 3))
    return out[:, :seq_q, :, :head_dim]


def _xla(q, k, v, qs, ks, *, causal, scale):
    """``jax.nn.dot_product_attention(implementation="xla")``, with fully masked rows set to 0."""
    mask = attention_mask(
        q.shape[1], k.shape[1], causal=causal, q_segment_ids=qs, kv_segment_ids=ks
    )
    with jax.numpy_dtype_promotion("standard"):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    if mask is None:
        return out
    visible = jnp.any(mask, axis=-1)  # (batch, 1, seq_q)
    return jnp.where(jnp.transpose(visible, (0, 2, 1))[..., None], out, jnp.zeros((), out.dtype))


def _check_inputs(q, k, v, causal, segment_ids, key_mask, scale, implementation, blocks):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name}: expected shape (batch, seq, heads, head_dim), got {jnp.shape(x)}"
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"{name}: expected a float dtype, got {jnp.result_type(x)}")
    if not jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v):
        raise TypeError(
            f"k, v: expected q's dtype {jnp.result_type(q)}, got {jnp.result_type(k)} and "
            f"{jnp.result_type(v)}"
        )
    batch, _, heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v: expected k's shape {k.shape}, got {v.shape}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k: expected shape ({batch}, seq_kv, kv_heads, {head_dim}) to match q {q.shape}, "
            f"got {k.shape}"
        )
    if heads % k.shape[2]:
        raise ValueError(
            f"k: expected kv_heads dividing q's heads = {heads}, got kv_heads = {k.shape[2]}"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    if segment_ids is not None:
        if not isinstance(segment_ids, tuple | list) or len(segment_ids) != 2:
            raise ValueError(
                "segment_ids: expected (q_segment_ids, kv_segment_ids) or None, "
                f"got {segment_ids!r}"
            )
        for name, ids, seq in zip(
            ("q_segment_ids", "kv_segment_ids"), segment_ids, (q.shape[1], k.shape[1]), strict=True
        ):
            if jnp.shape(ids) != (batch, seq):
                raise ValueError(f"{name}: expected shape {(batch, seq)}, got {jnp.shape(ids)}")
            if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
                raise TypeError(f"{name}: expected an integer dtype, got {jnp.result_type(ids)}")
    if key_mask is not None:
        if jnp.shape(key_mask) != (batch, k.shape[1]):
            raise ValueError(
                f"key_mask: expected shape {(batch, k.shape[1])}, got {jnp.shape(key_mask)}"
            )
        if jnp.result_type(key_mask) != jnp.bool_:
            raise TypeError(f"key_mask: expected a bool array, got {jnp.result_type(key_mask)}")
    if scale is not None and not (isinstance(scale, int | float) and scale > 0):
        raise ValueError(f"scale: expected a positive float or None, got {scale!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    for name, value in blocks.items():
        _check_block(name, value)


def _check_gpu_kernel(gpu_kernel: Any, q: jax.Array) -> None:
    if gpu_kernel not in GPU_KERNELS:
        raise ValueError(f"gpu_kernel: expected one of {GPU_KERNELS}, got {gpu_kernel!r}")
    if gpu_kernel == "mosaic_gpu":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise TypeError(f"gpu_kernel: 'mosaic_gpu' needs float16 or bfloat16, got {q.dtype}")
        if q.shape[-1] not in (64, 128):  # 256: the dk/dv kernel outgrows shared memory
            raise ValueError(
                f"gpu_kernel: 'mosaic_gpu' needs head_dim 64 or 128, got {q.shape[-1]}"
            )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    key_mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    gpu_kernel: str = "triton",
    block_q: int | None = None,
    block_kv: int | None = None,
    block_q_bwd: int | None = None,
    block_kv_bwd: int | None = None,
) -> jax.Array:
    """Memory-efficient exact attention, ``softmax(q k^T * scale + mask) v``.

    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
    (NeurIPS 2022) and Dao, "FlashAttention-2" (ICLR 2024), Algorithms 1-2; the function is
    Eq. 1 of Vaswani et al. (NeurIPS 2017) as in :func:`kernels.attention.reference`.

    Args:
      q: ``(batch, seq_q, heads, head_dim)``, float32 or bfloat16 (accumulation is float32).
      k, v: ``(batch, seq_kv, kv_heads, head_dim)`` in q's dtype; ``heads`` must be a multiple
        of ``kv_heads`` (grouped-query attention).
      causal: key ``j`` visible to query ``i`` only if ``j <= i`` (top-left aligned).
      segment_ids: ``(q_segment_ids (batch, seq_q), kv_segment_ids (batch, seq_kv))``,
        non-negative integers; a query sees only keys with its own id (packed sequences).
      key_mask: bool ``(batch, seq_kv)``, False for padding keys that nobody may see.
      scale: logit scale, ``1 / sqrt(head_dim)`` if None.
      implementation: ``"pallas"`` (the kernels), ``"xla"`` (``jax.nn.dot_product_attention``
        with ``implementation="xla"``), ``"reference"`` (pure jnp), or ``"auto"``: the Pallas
        kernels on GPU (Triton) and TPU (Mosaic), the reference elsewhere, chosen when the
        computation is lowered (``lax.platform_dependent``), so ``jax.export`` for another
        platform picks that platform's kernel.
      interpret: True runs the Pallas kernels in interpret mode (any host, slow); None runs
        them compiled on GPU/TPU and interpreted elsewhere (for ``"pallas"``); False compiled
        only (lowering for a CPU then fails).
      gpu_kernel: the GPU kernels, ``"triton"`` (default; checked in interpret mode) or
        ``"mosaic_gpu"``: Hopper (sm_90) wgmma kernels, forward and backward, for
        float16/bfloat16 and head_dim 64 or 128, which lower and export here but are not yet
        validated on a device (see :mod:`kernels.attention.pallas`).
      block_q, block_kv: forward block sizes (powers of two >= 16; None for the backend's
        default, shrunk for short sequences); ``block_q_bwd, block_kv_bwd`` for the backward.
        ``"mosaic_gpu"`` needs multiples of 64, and ``block_q = 64``.

    Returns:
      ``(batch, seq_q, heads, head_dim)`` in q's dtype. A query row that sees no key (all
      masked) is 0, with zero and finite gradients.

    >>> q = jnp.zeros((1, 3, 1, 2))
    >>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)
    >>> flash_attention(q, q, v, causal=True, implementation="reference")[0, :, 0, 0].tolist()
    [0.0, 1.0, 2.0]
    """
    blocks = {
        "block_q": block_q,
        "block_kv": block_kv,
        "block_q_bwd": block_q_bwd,
        "block_kv_bwd": block_kv_bwd,
    }
    _check_inputs(q, k, v, causal, segment_ids, key_mask, scale, implementation, blocks)
    _check_gpu_kernel(gpu_kernel, q)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    batch, seq_q, _, head_dim = q.shape
    seq_kv = k.shape[1]
    scale = float(head_dim**-0.5 if scale is None else scale)
    masked = segment_ids is not None or key_mask is not None
    if segment_ids is not None:
        qs = jnp.asarray(segment_ids[0]).astype(jnp.int32)
        ks = jnp.asarray(segment_ids[1]).astype(jnp.int32)
    else:
        qs = jnp.zeros((batch, seq_q), jnp.int32)
        ks = jnp.zeros((batch, seq_kv), jnp.int32)
    if key_mask is not None:
        ks = jnp.where(key_mask, ks, jnp.int32(_KV_PAD))

    def reference(q, k, v, qs, ks):
        ids = {"q_segment_ids": qs, "kv_segment_ids": ks} if masked else {}
        return attention_reference(q, k, v, causal=causal, scale=scale, **ids)

    if implementation == "reference":
        return reference(q, k, v, qs, ks)
    if implementation == "xla":
        return _xla(q, k, v, *((qs, ks) if masked else (None, None)), causal=causal, scale=scale)

    sizes = (block_q, block_kv, block_q_bwd, block_kv_bwd)
    kernel = functools.partial(_pallas, causal=causal, scale=scale, block_sizes=sizes)
    if interpret:
        return kernel(q, k, v, qs, ks, backend_name="interpret")
    compiled = {
        "cuda": functools.partial(kernel, backend_name=gpu_kernel),
        "rocm": functools.partial(kernel, backend_name="triton"),
        "tpu": functools.partial(kernel, backend_name="tpu"),
    }
    if implementation == "auto":
        default = reference
    elif interpret is None:
        default = functools.partial(kernel, backend_name="interpret")
    else:
        default = None
    return lax.platform_dependent(q, k, v, qs, ks, default=default, **compiled)
