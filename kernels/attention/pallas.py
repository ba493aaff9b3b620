"""Pallas flash-attention kernels: forward, and the FlashAttention-2 backward (dq; dk, dv).

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(ICLR 2024), Algorithm 1 (forward with online softmax, saving the row log-sum-exp
``L_i = m_i + log l_i``) and Algorithm 2 (backward, recomputing ``P_ij = exp(S_ij - L_i)``
from ``L``, with the precompute ``D_i = rowsum(dO_i * O_i)``), split as in the paper's
Sec. 3.2 into one kernel over query blocks for ``dQ`` and one over key blocks for ``dK, dV``,
so that no kernel needs atomics.

Every kernel runs on a grid ``(batch, heads, blocks)``; the block it owns comes in through a
``BlockSpec``, the other side (all keys for a query block, all queries for a key block) as a
whole-sequence ref that the kernel walks with ``pl.ds`` slices in a ``fori_loop``, skipping
the blocks a causal mask hides entirely. The same kernel bodies lower three ways:

* **GPU: Triton** (``pallas.triton.CompilerParams``), on the ``(batch, seq, heads, head_dim)``
  layout as given (strided loads, no transpose).
* **TPU: Mosaic TPU** (``pallas.tpu.CompilerParams``), on ``(batch, heads, seq, head_dim)``
  so that every block's last two dims are ``(rows, head_dim)`` tiles; row statistics are
  ``(rows, 1)`` and key segment ids ``(1, block_kv)``, never 1-D, for the (8, 128) tiling.
* **interpret mode** (``interpret=True``) on any host, for tests.

GPU lowering, decided on the installed jax 0.10.2 (read in ``jax/_src/pallas/``):

* Mosaic GPU is the upstream direction (``jax_pallas_use_mosaic_gpu`` defaults to True; the
  Triton lowering is being deprecated), but its Pallas lowering has no ``dot_general`` on
  register values: matmuls are ``plgpu.wgmma`` on swizzled shared-memory refs, data moves by
  TMA under explicit barriers, row vectors need WGMMA layouts, it is Hopper-only and f16/bf16
  only, and ``pl.pallas_call`` for it is deprecated in favour of ``plgpu.kernel``. So it
  cannot share a kernel body with the TPU and interpret paths. Its CPU interpreter
  (``InterpretGPUParams``) cannot run a flash-attention kernel either: it has no rule for
  ``layout_cast`` and its wgmma takes neither a transposed operand (``K^T``) nor a register
  operand (``P``), so a Mosaic GPU kernel can be lowered here but not checked numerically.
* The Triton lowering on this jax lowers every kernel below for ``cuda`` through
  ``jax.export`` with no device (tests/kernels/test_attention.py), for float32 and bfloat16,
  any mask, Ampere and Hopper, from the same body that interpret mode checks against the
  reference on the CPU.

So the GPU default is Triton, the path that is both lowered and numerically checked here.
Beside it, :func:`mosaic_gpu_forward` and :func:`mosaic_gpu_backward` are the same algorithm
as Mosaic GPU (Hopper wgmma) kernels, opt-in through ``flash_attention(...,
gpu_kernel="mosaic_gpu")`` (float16/bfloat16, head_dim 64 or 128): one warpgroup owns 64
rows, the walked side is double-buffered by TMA, ``S`` and the accumulators live in
registers in the WGMMA layout. They lower and export here (``mosaic_gpu_v2`` custom calls,
targeting sm_90) but await validation on an H100/H200: the benchmark checks every
implementation against XLA before timing it; once they pass there, they should become the
GPU default.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels.attention.reference import MASK_VALUE

__all__ = [
    "Backend",
    "flash_backward",
    "flash_forward",
    "mosaic_gpu_backward",
    "mosaic_gpu_forward",
]

MOSAIC_GPU_BLOCK_Q = 64  # one warpgroup's wgmma M
# The TPU kernels hold one side (K, V or Q, dO) whole in VMEM, double-buffered: 16k x 128
# bfloat16 is 4 MiB an array. Above the 16/32 MiB scoped defaults, within every TPU's VMEM.
TPU_VMEM_LIMIT = 48 * 1024 * 1024

_DOT_T = (((1,), (1,)), ((), ()))  # a @ b.T
_DOT = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Backend:
    """How the kernels are lowered: ``"triton"``, ``"tpu"``, ``"interpret"``, or
    ``"mosaic_gpu"`` (:func:`mosaic_gpu_forward`, :func:`mosaic_gpu_backward`), and the layout.

    ``layout`` is ``"bshd"`` (the public layout, used on GPUs) or ``"bhsd"`` (heads before
    sequence, needed by Mosaic TPU's tiling); interpret mode runs either.
    """

    name: str
    layout: str
    num_warps: int | None = None
    num_stages: int | None = None

    def compiler_params(self) -> Any:
        if self.name == "triton":
            return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.name == "tpu":
            return pltpu.CompilerParams(
                dimension_semantics=("parallel",) * 3, vmem_limit_bytes=TPU_VMEM_LIMIT
            )
        return None


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mask(qs, ks, q_start, k_start, shape, causal, *, keys_on_rows=False):
    """Boolean tile: same segment and, if causal, key position <= query position.

    ``(block_q, block_kv)`` from ids ``(block_q, 1)`` and ``(1, block_kv)``, or with
    ``keys_on_rows`` its transpose ``(block_kv, block_q)`` from ``(block_kv, 1)``, ``(1,
    block_q)``.
    """
    mask = qs == ks
    if causal:
        q_axis, k_axis = (1, 0) if keys_on_rows else (0, 1)
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
        mask = mask & (q_pos >= k_pos)
    return mask


def _kv_steps(q_index, *, block_q, block_kv, num_kv_blocks, causal):
    """Key blocks visible to query block ``q_index``: all, or up to the diagonal if causal."""
    if not causal:
        return num_kv_blocks
    last = lax.div((q_index + 1) * block_q + block_kv - 1, jnp.int32(block_kv))
    return jnp.minimum(last, jnp.int32(num_kv_blocks))


def _forward_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale, causal, block_kv, seq_kv
):
    block_q, head_dim = q_ref.shape
    q_index = pl.program_id(2)
    q_start = q_index * block_q
    q = q_ref[...]
    qs = qs_ref[...]
    shape = (block_q, block_kv)

    def body(j, carry):
        m, total, acc = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        ks = ks_ref[:, pl.ds(start, block_kv)]
        s = _dot(q, k, _DOT_T) * jnp.float32(scale)
        mask = _mask(qs, ks, q_start, start, shape, causal)
        s = jnp.where(mask, s, jnp.float32(MASK_VALUE))
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), jnp.float32(0.0))
        alpha = jnp.exp(m - m_new)
        total = alpha * total + p.sum(axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v, _DOT)
        return m_new, total, acc

    init = (
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, head_dim), jnp.float32),
    )
    steps = _kv_steps(
        q_index, block_q=block_q, block_kv=block_kv, num_kv_blocks=seq_kv // block_kv, causal=causal
    )
    m, total, acc = lax.fori_loop(0, steps, body, init)
    empty = total == 0.0  # no visible key: output 0, and L = +inf makes every P_ij = 0 backward
    safe_total = jnp.where(empty, jnp.float32(1.0), total)
    o_ref[...] = (acc / safe_total).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.float32(jnp.inf), m + jnp.log(safe_total))


def _probabilities_and_score_grads(q, k, v, do, lse, delta, mask, scale):
    """``P = exp(S - L)`` (0 where masked) and ``dS = P * (dO V^T - D)`` (FA-2, Alg. 2).

    ``S = q k^T``; called as ``(k, q, do, v, ...)`` with row vectors ``L, D`` it gives the
    transposes ``P^T, dS^T`` instead.
    """
    s = _dot(q, k, _DOT_T) * jnp.float32(scale)
    p = jnp.where(mask, jnp.exp(s - lse), jnp.float32(0.0))
    return p, p * (_dot(do, v, _DOT_T) - delta)


def _dq_kernel(*refs, scale, causal, block_kv, seq_kv):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref = refs
    block_q, head_dim = q_ref.shape
    q_index = pl.program_id(2)
    q_start = q_index * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta, qs = lse_ref[...], delta_ref[...], qs_ref[...]
    shape = (block_q, block_kv)

    def body(j, dq):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        ks = ks_ref[:, pl.ds(start, block_kv)]
        mask = _mask(qs, ks, q_start, start, shape, causal)
        _, ds = _probabilities_and_score_grads(q, k, v, do, lse, delta, mask, scale)
        return dq + _dot(ds.astype(k.dtype), k, _DOT)

    steps = _kv_steps(
        q_index, block_q=block_q, block_kv=block_kv, num_kv_blocks=seq_kv // block_kv, causal=causal
    )
    dq = lax.fori_loop(0, steps, body, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * jnp.float32(scale)).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, scale, causal, block_q, seq_q):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    # Works on transposed tiles, (block_kv, block_q): the query-side statistics and ids are
    # lane-dense rows (1, seq_q), and dV += P^T dO, dK += dS^T Q are plain matmuls.
    block_kv, head_dim = k_ref.shape
    k_index = pl.program_id(2)
    k_start = k_index * block_kv
    k, v, ks = k_ref[...], v_ref[...], ks_ref[...]  # ks: (block_kv, 1)
    shape = (block_kv, block_q)

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[:, pl.ds(start, block_q)]  # (1, block_q)
        delta = delta_ref[:, pl.ds(start, block_q)]
        qs = qs_ref[:, pl.ds(start, block_q)]
        mask = _mask(qs, ks, start, k_start, shape, causal, keys_on_rows=True)
        p_t, ds_t = _probabilities_and_score_grads(k, q, do, v, lse, delta, mask, scale)
        dv = dv + _dot(p_t.astype(do.dtype), do, _DOT)
        dk = dk + _dot(ds_t.astype(q.dtype), q, _DOT)
        return dk, dv

    first = lax.div(k_start, jnp.int32(block_q)) if causal else 0
    zeros = jnp.zeros((block_kv, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(first, seq_q // block_q, body, (zeros, zeros))
    dk_ref[...] = (dk * jnp.float32(scale)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _mosaic_gpu_smem(shape, dtype):
    """A swizzled shared-memory tile that wgmma and TMA accept (128-byte rows of the dtype)."""
    per_row = 128 // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, per_row)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _mosaic_gpu_mask(row_ids, col_ids, row_start, col_start, shape, causal, *, keys_on_rows):
    """The WGMMA-layout mask tile, from row ids (rows,) and column ids (cols,)."""
    mask = lax.broadcast_in_dim(row_ids, shape, [0]) == lax.broadcast_in_dim(col_ids, shape, [1])
    if causal:
        wgmma = plgpu.Layout.WGMMA
        row_pos = row_start + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wgmma)
        col_pos = col_start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma)
        mask = mask & ((row_pos <= col_pos) if keys_on_rows else (row_pos >= col_pos))
    return mask


def _mosaic_gpu_copy_in(pairs, barriers, first=0):
    """TMA ``(gmem source, smem destination)`` pairs in, each on its own barrier from ``first``."""
    for i, (src, dst) in enumerate(pairs):
        plgpu.copy_gmem_to_smem(src, dst, barriers.at[first + i])


def _mosaic_gpu_wait(barriers, count, first=0):
    for i in range(count):
        plgpu.barrier_wait(barriers.at[first + i])


def _mosaic_gpu_matmul(shape, a, b):
    """``a @ b`` by wgmma into a fresh float32 accumulator (b, and a unless in registers, SMEM)."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _mosaic_gpu_key_fetcher(gmem_refs, smem_refs, bars, b, kv_head, block_kv):
    """``fetch(j, slot)``: TMA key block ``j`` of K, V (b, seq, kv_heads, d) and the key ids
    (b, seq) into ``slot`` of their double buffers, on barriers ``3 slot .. 3 slot + 2``."""
    k_ref, v_ref, ks_ref = gmem_refs

    def fetch(j, slot):
        rows = pl.ds(j * block_kv, block_kv)
        sources = (k_ref.at[b, rows, kv_head], v_ref.at[b, rows, kv_head], ks_ref.at[b, rows])
        pairs = [(src, dst.at[slot]) for src, dst in zip(sources, smem_refs, strict=True)]
        _mosaic_gpu_copy_in(pairs, bars, 3 * slot)

    return fetch


def _mosaic_gpu_key_step(
    j, steps, fetch, bars, q_smem, k_smem, ks_smem, q_ids, q_start, *, block_kv, scale, causal
):
    """Step ``j`` over double-buffered key blocks: prefetch ``j + 1``, wait for ``j``'s K and
    ids (3 barriers a slot), and return ``(slot, S = scale q K^T, mask)`` in the WGMMA layout."""
    slot = lax.rem(j, jnp.int32(2))
    # Every thread is done reading the other slot (its key ids; the wgmma on it were
    # awaited) before TMA overwrites it: fence the proxies and sync the warpgroup.
    plgpu.commit_smem()

    @pl.when(j + 1 < steps)
    def _():
        fetch(j + 1, 1 - slot)

    _mosaic_gpu_wait(bars, 3, 3 * slot)
    rows = MOSAIC_GPU_BLOCK_Q
    shape = (rows, block_kv)
    k_t = plgpu.transpose_ref(k_smem.at[slot], (1, 0))
    s = _mosaic_gpu_matmul(shape, q_smem, k_t) * jnp.float32(scale)
    k_ids = plgpu.layout_cast(ks_smem[slot], plgpu.Layout.WGMMA.reduce(0))
    mask = _mosaic_gpu_mask(q_ids, k_ids, q_start, j * block_kv, shape, causal, keys_on_rows=False)
    return slot, s, mask


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_kv"))
def mosaic_gpu_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool,
    scale: float,
    block_kv: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """The forward of :func:`flash_forward` as a Mosaic GPU (Hopper wgmma) kernel.

    Same contract and padding as :func:`flash_forward` on the ``"bshd"`` layout, except
    that the segment ids are ``(batch, seq)`` and the query block is one warpgroup's 64
    rows. One warpgroup per (head, query block, batch); K, V and key ids are
    double-buffered in shared memory by TMA (the next block's copy is issued before this
    block's two wgmma), Q stays in shared memory, ``S`` and the output accumulate in
    registers (WGMMA layout) with the same online softmax and masking as the Triton/TPU
    body. float16/bfloat16 only, head_dim a multiple of 64.
    """
    block_q = MOSAIC_GPU_BLOCK_Q
    batch, seq_q, heads, head_dim = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    row = plgpu.Layout.WGMMA.reduce(1)
    shape = (block_q, block_kv)
    step_kw = {"block_kv": block_kv, "scale": scale, "causal": causal}
    steps_kw = {"block_kv": block_kv, "causal": causal}

    def kernel(*refs):
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs[:7]
        q_smem, k_smem, v_smem, qs_smem, ks_smem, lse_smem, own_bars, bars = refs[7:]
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        q_index = lax.axis_index("q_seq")
        q_start = q_index * block_q
        kv_head = lax.div(h, jnp.int32(group))
        rows = pl.ds(q_start, block_q)
        own = ((q_ref.at[b, rows, h], q_smem), (qs_ref.at[b, rows], qs_smem))
        _mosaic_gpu_copy_in(own, own_bars)
        steps = _kv_steps(
            lax.axis_index("q_seq"), block_q=block_q, num_kv_blocks=seq_kv // block_kv, **steps_kw
        )

        fetch = _mosaic_gpu_key_fetcher(
            (k_ref, v_ref, ks_ref), (k_smem, v_smem, ks_smem), bars, b, kv_head, block_kv
        )

        fetch(0, 0)  # every query block sees at least its first key block
        _mosaic_gpu_wait(own_bars, len(own))
        q_ids = plgpu.layout_cast(qs_smem[...], row)

        def body(j, carry):
            m, total, acc = carry
            slot, s, mask = _mosaic_gpu_key_step(
                j, steps, fetch, bars, q_smem, k_smem, ks_smem, q_ids, q_start, **step_kw
            )
            s = jnp.where(mask, s, jnp.float32(MASK_VALUE))
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.where(
                mask, jnp.exp(s - lax.broadcast_in_dim(m_new, shape, [0])), jnp.float32(0.0)
            )
            alpha = jnp.exp(m - m_new)
            total = alpha * total + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            pv = _mosaic_gpu_matmul((block_q, head_dim), p.astype(dtype), v_smem.at[slot])
            return m_new, total, acc + pv

        init = (
            plgpu.layout_cast(jnp.full((block_q,), MASK_VALUE, jnp.float32), row),
            plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), row),
            plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA),
        )
        m, total, acc = lax.fori_loop(0, steps, body, init)
        empty = total == 0.0  # no visible key: output 0, L = +inf (as the Triton/TPU body)
        safe = jnp.where(empty, jnp.float32(1.0), total)
        q_smem[...] = (acc / lax.broadcast_in_dim(safe, acc.shape, [0])).astype(dtype)
        lse_smem[...] = jnp.where(empty, jnp.float32(jnp.inf), m + jnp.log(safe))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)

    out, lse = plgpu.kernel(
        kernel,
        out_type=[
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32),
        ],
        scratch_types=[
            _mosaic_gpu_smem((block_q, head_dim), dtype),
            _mosaic_gpu_smem((2, block_kv, head_dim), dtype),
            _mosaic_gpu_smem((2, block_kv, head_dim), dtype),
            plgpu.SMEM((block_q,), jnp.int32),
            plgpu.SMEM((2, block_kv), jnp.int32),
            plgpu.SMEM((block_q,), jnp.float32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=6),
        ],
        grid=(heads, seq_q // block_q, batch),
        grid_names=("heads", "q_seq", "batch"),
        kernel_name="flash_attention_forward_mosaic_gpu",
    )(q, k, v, q_segment_ids, kv_segment_ids)
    return out, lse[..., None]


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv"))
def mosaic_gpu_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    *,
    causal: bool,
    scale: float,
    block_q: int = 64,
    block_kv: int = 64,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward of :func:`flash_backward` as two Mosaic GPU (Hopper wgmma) kernels.

    Inputs as for :func:`mosaic_gpu_forward` (``"bshd"``, ids ``(batch, seq)``) plus its
    ``out`` and ``lse (batch, heads, seq_q, 1)``. The dq kernel owns 64 query rows and walks
    the key blocks; the dk/dv kernel owns 64 key rows and walks the query blocks on
    transposed tiles (``S^T = K Q^T``), as the Triton kernels do; both double-buffer the
    walked side by TMA. float16/bfloat16 only, head_dim a multiple of 64.
    """
    batch, seq_q, heads, head_dim = q.shape
    seq_kv, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    row = plgpu.Layout.WGMMA.reduce(1)
    col = plgpu.Layout.WGMMA.reduce(0)
    lse = lse[..., 0]
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    wgmma_rows = MOSAIC_GPU_BLOCK_Q
    step_kw = {"block_kv": block_kv, "scale": scale, "causal": causal}
    steps_kw = {"block_kv": block_kv, "causal": causal}

    def dq_kernel(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref, dq_ref = refs[:9]
        q_smem, do_smem, k_smem, v_smem, stats_smem, qs_smem, ks_smem, own_bars, bars = refs[9:]
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        q_start = lax.axis_index("q_seq") * wgmma_rows
        kv_head = lax.div(h, jnp.int32(group))
        rows = pl.ds(q_start, wgmma_rows)
        own = (
            (q_ref.at[b, rows, h], q_smem),
            (do_ref.at[b, rows, h], do_smem),
            (lse_ref.at[b, h, rows], stats_smem.at[0]),
            (delta_ref.at[b, h, rows], stats_smem.at[1]),
            (qs_ref.at[b, rows], qs_smem),
        )
        _mosaic_gpu_copy_in(own, own_bars)
        steps = _kv_steps(
            lax.axis_index("q_seq"),
            block_q=wgmma_rows,
            num_kv_blocks=seq_kv // block_kv,
            **steps_kw,
        )

        fetch = _mosaic_gpu_key_fetcher(
            (k_ref, v_ref, ks_ref), (k_smem, v_smem, ks_smem), bars, b, kv_head, block_kv
        )

        fetch(0, 0)
        _mosaic_gpu_wait(own_bars, len(own))
        lse_rows = plgpu.layout_cast(stats_smem[0], row)
        delta_rows = plgpu.layout_cast(stats_smem[1], row)
        q_ids = plgpu.layout_cast(qs_smem[...], row)
        shape = (wgmma_rows, block_kv)

        def body(j, dq):
            slot, s, mask = _mosaic_gpu_key_step(
                j, steps, fetch, bars, q_smem, k_smem, ks_smem, q_ids, q_start, **step_kw
            )
            p = jnp.where(
                mask, jnp.exp(s - lax.broadcast_in_dim(lse_rows, shape, [0])), jnp.float32(0.0)
            )
            v_t = plgpu.transpose_ref(v_smem.at[slot], (1, 0))
            dp = _mosaic_gpu_matmul(shape, do_smem, v_t)
            ds = p * (dp - lax.broadcast_in_dim(delta_rows, shape, [0]))
            return dq + _mosaic_gpu_matmul(
                (wgmma_rows, head_dim), ds.astype(dtype), k_smem.at[slot]
            )

        zeros = jnp.full((wgmma_rows, head_dim), 0.0, jnp.float32)
        dq = lax.fori_loop(0, steps, body, plgpu.layout_cast(zeros, plgpu.Layout.WGMMA))
        q_smem[...] = (dq * jnp.float32(scale)).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    def dkdv_kernel(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, ks_ref = refs[:8]
        dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, stats_smem, qs_smem = refs[8:16]
        ks_smem, dk_smem, dv_smem, own_bars, bars = refs[16:]
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        k_start = lax.axis_index("kv_seq") * wgmma_rows
        kv_head = lax.div(h, jnp.int32(group))
        rows = pl.ds(k_start, wgmma_rows)
        own = (
            (k_ref.at[b, rows, kv_head], k_smem),
            (v_ref.at[b, rows, kv_head], v_smem),
            (ks_ref.at[b, rows], ks_smem),
        )
        _mosaic_gpu_copy_in(own, own_bars)
        num_q = seq_q // block_q
        first = lax.div(k_start, jnp.int32(block_q)) if causal else jnp.int32(0)

        def fetch(i, slot):
            q_rows = pl.ds(i * block_q, block_q)
            walked = (
                (q_ref.at[b, q_rows, h], q_smem),
                (do_ref.at[b, q_rows, h], do_smem),
                (lse_ref.at[b, h, q_rows], stats_smem.at[0]),
                (delta_ref.at[b, h, q_rows], stats_smem.at[1]),
                (qs_ref.at[b, q_rows], qs_smem),
            )
            _mosaic_gpu_copy_in([(src, dst.at[slot]) for src, dst in walked], bars, 5 * slot)

        @pl.when(first < num_q)
        def _():
            fetch(first, 0)

        _mosaic_gpu_wait(own_bars, len(own))
        k_ids = plgpu.layout_cast(ks_smem[...], row)
        shape = (wgmma_rows, block_q)

        def body(i, carry):
            dk, dv = carry
            slot = lax.rem(i - first, jnp.int32(2))
            plgpu.commit_smem()

            @pl.when(i + 1 < num_q)
            def _():
                fetch(i + 1, 1 - slot)

            _mosaic_gpu_wait(bars, 5, 5 * slot)
            q_t = plgpu.transpose_ref(q_smem.at[slot], (1, 0))
            s_t = _mosaic_gpu_matmul(shape, k_smem, q_t) * jnp.float32(scale)
            lse_cols = plgpu.layout_cast(stats_smem[0, slot], col)
            delta_cols = plgpu.layout_cast(stats_smem[1, slot], col)
            q_ids = plgpu.layout_cast(qs_smem[slot], col)
            mask = _mosaic_gpu_mask(
                k_ids, q_ids, k_start, i * block_q, shape, causal, keys_on_rows=True
            )
            p_t = jnp.where(
                mask, jnp.exp(s_t - lax.broadcast_in_dim(lse_cols, shape, [1])), jnp.float32(0.0)
            )
            tile = (wgmma_rows, head_dim)
            dv = dv + _mosaic_gpu_matmul(tile, p_t.astype(dtype), do_smem.at[slot])
            do_t = plgpu.transpose_ref(do_smem.at[slot], (1, 0))
            dp_t = _mosaic_gpu_matmul(shape, v_smem, do_t)
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta_cols, shape, [1]))
            dk = dk + _mosaic_gpu_matmul(tile, ds_t.astype(dtype), q_smem.at[slot])
            return dk, dv

        zeros = plgpu.layout_cast(
            jnp.full((wgmma_rows, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA
        )
        dk, dv = lax.fori_loop(first, num_q, body, (zeros, zeros))
        dk_smem[...] = (dk * jnp.float32(scale)).astype(grad_dtype)
        dv_smem[...] = dv.astype(grad_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    grad_dtype = k.dtype if group == 1 else jnp.float32
    operands = (q, k, v, d_out, lse, delta, q_segment_ids, kv_segment_ids)
    dq = plgpu.kernel(
        dq_kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[
            _mosaic_gpu_smem((wgmma_rows, head_dim), dtype),
            _mosaic_gpu_smem((wgmma_rows, head_dim), dtype),
            _mosaic_gpu_smem((2, block_kv, head_dim), dtype),
            _mosaic_gpu_smem((2, block_kv, head_dim), dtype),
            plgpu.SMEM((2, wgmma_rows), jnp.float32),
            plgpu.SMEM((wgmma_rows,), jnp.int32),
            plgpu.SMEM((2, block_kv), jnp.int32),
            plgpu.Barrier(num_barriers=5),
            plgpu.Barrier(num_barriers=6),
        ],
        grid=(heads, seq_q // wgmma_rows, batch),
        grid_names=("heads", "q_seq", "batch"),
        kernel_name="flash_attention_dq_mosaic_gpu",
    )(*operands)
    per_q_head = jax.ShapeDtypeStruct((batch, seq_kv, heads, head_dim), grad_dtype)
    dk, dv = plgpu.kernel(
        dkdv_kernel,
        out_type=[per_q_head, per_q_head],
        scratch_types=[
            _mosaic_gpu_smem((wgmma_rows, head_dim), dtype),
            _mosaic_gpu_smem((wgmma_rows, head_dim), dtype),
            _mosaic_gpu_smem((2, block_q, head_dim), dtype),
            _mosaic_gpu_smem((2, block_q, head_dim), dtype),
            plgpu.SMEM((2, 2, block_q), jnp.float32),
            plgpu.SMEM((2, block_q), jnp.int32),
            plgpu.SMEM((wgmma_rows,), jnp.int32),
            _mosaic_gpu_smem((wgmma_rows, head_dim), grad_dtype),
            _mosaic_gpu_smem((wgmma_rows, head_dim), grad_dtype),
            plgpu.Barrier(num_barriers=3),
            plgpu.Barrier(num_barriers=10),
        ],
        grid=(heads, seq_kv // wgmma_rows, batch),
        grid_names=("heads", "kv_seq", "batch"),
        kernel_name="flash_attention_dkdv_mosaic_gpu",
    )(*operands)
    if group > 1:
        shape = (batch, seq_kv, kv_heads, group, head_dim)
        dk = dk.reshape(shape).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(shape).sum(axis=3).astype(k.dtype)
    return dq, dk, dv


class _Specs:
    """BlockSpecs on the grid ``(batch, heads, block)`` for one layout and GQA group size."""

    def __init__(self, layout: str, group: int):
        self.layout = layout
        self.group = group

    def heads(self, block: int | None, head_dim: int, *, kv: bool, length: int | None = None):
        """A (seq block or whole seq) x head_dim view of a (b, s, h, d) or (b, h, s, d) array."""
        whole = block is None

        def index(b, h, i):
            head = lax.div(h, jnp.int32(self.group)) if kv and self.group > 1 else h
            row = 0 if whole else i
            return (b, row, head, 0) if self.layout == "bshd" else (b, head, row, 0)

        rows = length if whole else block
        shape = (
            (None, rows, None, head_dim) if self.layout == "bshd" else (None, None, rows, head_dim)
        )
        return pl.BlockSpec(shape, index)

    def backward_operands(self, block_q, block_kv, seq_q, seq_kv, head_dim):
        """Specs of ``(q, k, v, dO, lse, delta, q_ids, kv_ids)``: one side blocked (not None).

        For the dq kernel (queries blocked) row statistics are columns ``(b, h, seq_q, 1)``,
        q ids ``(b, seq_q, 1)`` and kv ids ``(b, 1, seq_kv)``; for the dk/dv kernel (keys
        blocked) everything is transposed: ``(b, h, 1, seq_q)``, ``(b, 1, seq_q)``, ``(b,
        seq_kv, 1)``, the same memory reshaped.
        """
        q_side = self.heads(block_q, head_dim, kv=False, length=seq_q)
        kv_side = self.heads(block_kv, head_dim, kv=True, length=seq_kv)
        if block_q is not None:
            rows = self.rows(block_q, seq_q)
            ids = [self.q_segments(block_q, seq_q), self.kv_segments(None, seq_kv)]
        else:
            rows = pl.BlockSpec((None, None, 1, seq_q), lambda b, h, i: (b, h, 0, 0))
            ids = [self.kv_segments(None, seq_q), self.q_segments(block_kv, seq_kv)]
        return [q_side, kv_side, kv_side, q_side, rows, rows, *ids]

    @staticmethod
    def rows(block: int | None, length: int):
        """Row statistics ``(b, h, s, 1)``: a block of rows, or all of them."""
        if block is None:
            return pl.BlockSpec((None, None, length, 1), lambda b, h, i: (b, h, 0, 0))
        return pl.BlockSpec((None, None, block, 1), lambda b, h, i: (b, h, i, 0))

    @staticmethod
    def q_segments(block: int | None, length: int):
        if block is None:
            return pl.BlockSpec((None, length, 1), lambda b, h, i: (b, 0, 0))
        return pl.BlockSpec((None, block, 1), lambda b, h, i: (b, i, 0))

    @staticmethod
    def kv_segments(block: int | None, length: int):
        if block is None:
            return pl.BlockSpec((None, 1, length), lambda b, h, i: (b, 0, 0))
        return pl.BlockSpec((None, 1, block), lambda b, h, i: (b, 0, i))


def _dims(q, k, layout):
    if layout == "bshd":
        batch, seq_q, heads, head_dim = q.shape
        seq_kv, kv_heads = k.shape[1], k.shape[2]
    else:
        batch, heads, seq_q, head_dim = q.shape
        kv_heads, seq_kv = k.shape[1], k.shape[2]
    return batch, heads, kv_heads, seq_q, seq_kv, head_dim


def _pallas_call(kernel, backend: Backend, **kwargs):
    return pl.pallas_call(
        kernel,
        interpret=backend.name == "interpret",
        compiler_params=backend.compiler_params(),
        **kwargs,
    )


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv", "backend"))
def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool,
    scale: float,
    block_q: int,
    block_kv: int,
    backend: Backend,
) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` for padded inputs: seq_q a multiple of block_q, seq_kv of block_kv.

    ``q, k, v`` in ``backend.layout``; ``q_segment_ids (batch, seq_q, 1)`` and
    ``kv_segment_ids (batch, 1, seq_kv)`` int32. ``lse`` is float32 ``(batch, heads, seq_q,
    1)``, ``+inf`` on rows that see no key.
    """
    if backend.name == "mosaic_gpu":
        if block_q != MOSAIC_GPU_BLOCK_Q:
            raise ValueError(f"block_q: the Mosaic GPU forward needs 64, got {block_q}")
        return mosaic_gpu_forward(
            q,
            k,
            v,
            q_segment_ids[:, :, 0],
            kv_segment_ids[:, 0, :],
            causal=causal,
            scale=scale,
            block_kv=block_kv,
        )
    batch, heads, kv_heads, seq_q, seq_kv, head_dim = _dims(q, k, backend.layout)
    specs = _Specs(backend.layout, heads // kv_heads)
    kernel = functools.partial(
        _forward_kernel, scale=scale, causal=causal, block_kv=block_kv, seq_kv=seq_kv
    )
    return _pallas_call(
        kernel,
        backend,
        grid=(batch, heads, seq_q // block_q),
        in_specs=[
            specs.heads(block_q, head_dim, kv=False),
            specs.heads(None, head_dim, kv=True, length=seq_kv),
            specs.heads(None, head_dim, kv=True, length=seq_kv),
            specs.q_segments(block_q, seq_q),
            specs.kv_segments(None, seq_kv),
        ],
        out_specs=[specs.heads(block_q, head_dim, kv=False), specs.rows(block_q, seq_q)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, seq_q, 1), jnp.float32),
        ],
        name="flash_attention_forward",
    )(q, k, v, q_segment_ids, kv_segment_ids)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv", "backend"))
def flash_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    *,
    causal: bool,
    scale: float,
    block_q: int,
    block_kv: int,
    backend: Backend,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv)`` for the padded inputs of :func:`flash_forward` and its outputs."""
    if backend.name == "mosaic_gpu":
        return mosaic_gpu_backward(
            q,
            k,
            v,
            q_segment_ids[:, :, 0],
            kv_segment_ids[:, 0, :],
            out,
            lse,
            d_out,
            causal=causal,
            scale=scale,
            block_q=block_q,
            block_kv=block_kv,
        )
    batch, heads, kv_heads, seq_q, seq_kv, head_dim = _dims(q, k, backend.layout)
    group = heads // kv_heads
    specs = _Specs(backend.layout, group)
    # D_i = rowsum(dO_i * O_i) (FlashAttention-2, Alg. 2 line 4), (batch, heads, seq_q, 1).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    if backend.layout == "bshd":
        delta = jnp.transpose(delta, (0, 2, 1, 3))
    common = {"scale": scale, "causal": causal}
    q_block = specs.heads(block_q, head_dim, kv=False)
    operands = (q, k, v, d_out, lse, delta, q_segment_ids, kv_segment_ids)

    dq = _pallas_call(
        functools.partial(_dq_kernel, block_kv=block_kv, seq_kv=seq_kv, **common),
        backend,
        grid=(batch, heads, seq_q // block_q),
        in_specs=specs.backward_operands(block_q, None, seq_q, seq_kv, head_dim),
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
    )(*operands)

    # One dk, dv per query head; with grouped-query attention the group is summed below.
    per_q_head = {
        "bshd": (batch, seq_kv, heads, head_dim),
        "bhsd": (batch, heads, seq_kv, head_dim),
    }[backend.layout]
    grad_dtype = k.dtype if group == 1 else jnp.float32
    own_kv_block = _Specs(backend.layout, 1).heads(block_kv, head_dim, kv=False)
    dk, dv = _pallas_call(
        functools.partial(_dkdv_kernel, block_q=block_q, seq_q=seq_q, **common),
        backend,
        grid=(batch, heads, seq_kv // block_kv),
        in_specs=specs.backward_operands(None, block_kv, seq_q, seq_kv, head_dim),
        out_specs=[own_kv_block, own_kv_block],
        out_shape=[jax.ShapeDtypeStruct(per_q_head, grad_dtype)] * 2,
        name="flash_attention_dkdv",
    )(
        q,
        k,
        v,
        d_out,
        lse.reshape(batch, heads, 1, seq_q),
        delta.reshape(batch, heads, 1, seq_q),
        q_segment_ids.reshape(batch, 1, seq_q),
        kv_segment_ids.reshape(batch, seq_kv, 1),
    )
    if group > 1:
        axis = 2 if backend.layout == "bshd" else 1

        def fold(g):
            shape = (*g.shape[:axis], kv_heads, group, *g.shape[axis + 1 :])
            return g.reshape(shape).sum(axis=axis + 1).astype(k.dtype)

        dk, dv = fold(dk), fold(dv)
    return dq, dk, dv
