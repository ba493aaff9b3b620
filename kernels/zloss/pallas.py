"""Pallas kernels: fused ``h @ W^T`` -> per-row moments -> Z-loss, forward and backward.

de Brebisson & Vincent, "The Z-loss: a shift and scale invariant classification loss belonging
to the Spherical Family", arXiv 1604.08859, 2016. A spherical-family loss depends on the
logits ``o = W h + bias`` only through three per-row statistics, so the ``(N, D)`` logits
are never written to memory: they are recomputed tile by tile, in on-chip memory, by each
kernel.

Forward (``forward``): over row blocks x class blocks, each ``(bn, bd)`` logit tile
is reduced to its block mean and centred sum of squares (two passes over the tile in
registers), merged into the running row moments with Chan's pairwise formula
``M2 = M2_a + M2_b + delta^2 n_a n_b / n``, and the target logit is picked out with a
comparison (no gather). The result is ``(mean, M2, o_y)`` in float32; a large common offset
of the logits never meets ``sum o^2`` and cannot cancel. The loss is then
``z_loss_from_statistics(0, M2, o_y - mean, D)`` (jaxmtl's spherical form, evaluated in the
frame centred on the row mean), an ``O(N)`` computation in XLA.

Backward: the Z-loss is invariant to a constant shift ``c`` of a row, so at ``c = mean``
``dL/do_k = F_s + 2 F_q (o_k - mean) + F_t [k == y]`` with ``(F_s, F_q, F_t)`` the gradient of
``z_loss_from_statistics`` at ``(0, M2, o_y - mean)``: ``alpha = F_s``, ``beta = 2 F_q``,
``gamma = F_t`` (times the incoming cotangent; ``logit_cotangent_coefficients``). Then
``dh = G W``, ``dW = G^T h``, ``dbias = 1^T G`` with ``G = alpha + beta (O - mean) +
gamma Y``; ``G`` is rebuilt tile by tile from recomputed logits: the ``dh`` kernel is tiled
over rows (reduction over class blocks), the ``dW`` kernel over classes (reduction over row
blocks, also giving ``dbias``); ``backward`` runs both.

Counted cost (the numbers the benchmark reports): FLOPs ``2 N D d`` forward and ``4 N D d``
backward (two kernels, each recomputing the logits for ``2 N D d`` and doing one more
``2 N D d`` product: ``8 N D d`` executed, ``4 N D d`` counted, the convention of flash
attention's recomputation). HBM bytes: ``h``, ``W`` (and ``bias``, ``labels``) read once and
the outputs written once: forward ``(N d + D d) s + 16 N`` (``s`` bytes per element; int32
labels in, three float32 row statistics out), backward ``2 (N d + D d) s`` (``h, W`` in,
``dh, dW`` out) plus its ``O(N + D)`` vectors. The actual traffic is larger: each row block
re-reads ``W`` and each class block re-reads ``h``.

Two kernel layouts, the same tile arithmetic:

* ``variant="gpu"``: the Triton lowering of ``pl.pallas_call``, selected explicitly with
  ``jax.experimental.pallas.triton.CompilerParams`` (on jax 0.10.2 a ``pallas_call`` without
  it goes to Mosaic GPU). Chosen over Mosaic GPU because it is what lowers reliably for this
  kind of kernel from a plain ``pallas_call`` grid: Mosaic GPU wants ``plgpu.kernel`` with
  explicit shared-memory staging, barriers and warpgroup MMAs (a ``pallas_call`` lowered to
  Mosaic GPU emits a deprecation warning, an error under this project's test settings),
  whereas Triton takes masked loads and stores, ``dot_general`` with transposed operands and
  ``fori_loop`` over ref slices, and lowers through ``jax.export(..., platforms=["cuda"])``
  with no device (tested; the Triton-to-PTX compilation itself happens in XLA on a GPU and
  is not covered by that check). Triton programs run in parallel, so a reduction cannot
  span grid steps: the grid covers the output's blocks (row blocks for the forward and
  ``dh``, class blocks for ``dW``) and ``fori_loop`` walks the reduced axis with ``pl.ds``
  slices of a whole-array ref. Logit tiles are accumulated over the feature axis in chunks
  of 64 columns, so the forward holds only a (bn, bd) tile in registers for any ``d``; the
  backward kernels also hold their float32 (bn, d) or (bd, d) accumulator, so large ``d``
  needs small blocks (Triton's ``dot`` wants every block dimension >= 16 and a power of
  two; ``d`` is padded to one by masking). Ragged edges are handled by masked loads
  (``other=0``) and masked stores, never by padding copies in HBM.
* ``variant="tpu"``: Mosaic TPU with a two-dimensional grid whose last axis is the reduction
  (``"arbitrary"``), accumulating into the resident output block or a float32 VMEM scratch.
  Block shapes: ``(block_rows, d)``, ``(block_classes, d)`` (``d`` whole), per-row vectors
  as ``(N, 1)`` arrays and the bias as ``(1, D)``, so ``block_rows`` must be a multiple of 8
  (16 for bfloat16) and ``block_classes`` a multiple of 128. Partial edge blocks read
  unspecified values; every such value is removed with ``jnp.where`` (never a multiply:
  ``0 * NaN`` is NaN) before it can reach a statistic or a product.

Both layouts run in interpret mode on the CPU (``interpret=True``), which pads edge blocks
and fresh outputs with NaN, so the tests see any leak of padding. On TPU whole feature
rows sit in VMEM: about ``2 (bn + bd) d`` input elements (double-buffered) plus a float32
``(bn, d)`` or ``(bd, d)`` accumulator in the backward, which bounds ``d`` for given blocks.

Precision: float32 inputs use ``Precision.HIGHEST`` products (IEEE float32 on Triton,
``fp32`` contraction on Mosaic; no TF32 / bf16 passes, which would swamp the statistics of
offset logits, at the price of the slow float32 matmul path); bfloat16 (and float16) inputs
multiply natively with float32 accumulation (the fast path), and ``G`` is cast to the input
dtype for the two backward products, as flash attention casts ``P``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from jaxmtl.losses.classification import z_loss_from_statistics

__all__ = [
    "DEFAULT_BLOCKS",
    "Blocks",
    "backward",
    "forward",
    "logit_cotangent_coefficients",
    "loss_from_moments",
]

_F32 = jnp.float32
_VARIANTS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: ``rows`` (examples per block) and ``classes`` (classes per block); None
    takes the layout's default."""

    rows: int | None = None
    classes: int | None = None


# Forward tiles per layout. The Triton backward keeps a float32 (block, d) accumulator in
# registers, so its default blocks shrink with d (``_default_blocks``).
DEFAULT_BLOCKS = {"gpu": Blocks(rows=64, classes=64), "tpu": Blocks(rows=256, classes=512)}


# --------------------------------------------------------------------------- O(N) parts (XLA)


def loss_from_moments(
    mean: jax.Array, m2: jax.Array, target: jax.Array, num_classes: int, *, a: float, b: float
) -> jax.Array:
    """Z-loss from the row moments: ``z_loss_from_statistics`` in the row-centred frame.

    With ``s' = 0``, ``q' = M2``, ``o_y' = o_y - mean``, jaxmtl's spherical form gives
    ``z = (o_y - mean) / sqrt(M2 / D)`` with no cancellation (its variance floor and
    clipping to ``[-sqrt(D-1), sqrt(D-1)]`` apply; ``M2 = 0`` gives ``z = 0``).
    """
    return z_loss_from_statistics(
        jnp.zeros_like(m2), m2, target - mean, num_classes, a=a, b=b
    ).astype(_F32)


def logit_cotangent_coefficients(
    mean: jax.Array,
    m2: jax.Array,
    target: jax.Array,
    cotangent: jax.Array,
    num_classes: int,
    *,
    a: float,
    b: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(alpha, beta, gamma)`` with ``g_n dL_n/do_nk = alpha_n + beta_n (o_nk - mean_n) +
    gamma_n [k == y_n]`` (``g`` the incoming per-example cotangent), all float32 ``(N,)``."""
    shift = jnp.zeros_like(m2)
    f = lambda s, q, t: z_loss_from_statistics(s, q, t, num_classes, a=a, b=b).astype(_F32)
    _, vjp = jax.vjp(f, shift, m2, target - mean)
    f_s, f_q, f_t = vjp(cotangent.astype(_F32))
    return f_s, 2.0 * f_q, f_t


# --------------------------------------------------------------------------- tile arithmetic
# Shared by both layouts. Per-row vectors are (bn,) on the GPU layout and (bn, 1) on TPU.


def _col(v: jax.Array) -> jax.Array:
    """A per-row vector as a (bn, 1) column."""
    return v if v.ndim == 2 else v[:, None]


def _row(v: jax.Array) -> jax.Array:
    """A per-class vector as a (1, bd) row."""
    return v if v.ndim == 2 else v[None, :]


def _precision(dtype: Any) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _tile_logits(h: jax.Array, w: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``h (bn, d) @ w (bd, d)^T (+ bias)`` in float32, shape (bn, bd)."""
    o = lax.dot_general(
        h,
        w,
        (((1,), (1,)), ((), ())),
        precision=_precision(h.dtype),
        preferred_element_type=_F32,
    )
    if bias is not None:
        o = o + _row(bias).astype(_F32)
    return o


def _merge_moments(
    stats: tuple[jax.Array, jax.Array, jax.Array],
    o: jax.Array,
    valid: jax.Array,
    is_target: jax.Array,
    n_seen: jax.Array,
    n_block: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chan et al.'s pairwise merge of a tile's ``(mean, M2)`` into the running row moments.

    ``valid`` (1, bd) marks real classes, ``n_seen`` classes are already merged, the tile
    holds ``n_block >= 1`` real ones (integer scalars, or (1, 1) arrays). Padded classes are
    removed by ``where`` (their logits may be garbage or NaN).
    """
    mean, m2, target = stats
    keep = mean.ndim == 2
    n_a = n_seen.astype(_F32)
    n_b = n_block.astype(_F32)
    frac = n_b / (n_a + n_b)
    block_mean = jnp.sum(jnp.where(valid, o, 0.0), axis=1, keepdims=keep) / n_b
    dev = jnp.where(valid, o - _col(block_mean), 0.0)
    block_m2 = jnp.sum(dev * dev, axis=1, keepdims=keep)
    delta = block_mean - mean
    new_mean = mean + delta * frac
    new_m2 = m2 + block_m2 + delta * delta * (n_a * frac)
    picked = jnp.where(jnp.logical_and(valid, is_target), o, 0.0)
    new_target = target + jnp.sum(picked, axis=1, keepdims=keep)
    return new_mean, new_m2, new_target


def _cotangent_tile(
    o: jax.Array,
    valid: jax.Array,
    is_target: jax.Array,
    coef: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
) -> jax.Array:
    """``G = alpha + beta (o - mean) + gamma [k == y]`` on the valid entries, 0 elsewhere."""
    mean, alpha, beta, gamma = (_col(c) for c in coef)
    g = alpha + beta * (o - mean) + jnp.where(is_target, gamma, 0.0)
    return jnp.where(valid, g, 0.0)


def _product_dtype(dtype: Any) -> Any:
    return _F32 if jnp.dtype(dtype) == jnp.float32 else dtype


# --------------------------------------------------------------------------- GPU (Triton) layout


_GPU_CHUNK = 64  # feature columns per step of the Triton logits loop


def _gpu_logits(h_ref, w_ref, row_start, cls_start, row_ok, cls_ok, bias, *, dim, bn, bd):
    """``h[rows] @ w[classes]^T (+ bias)`` as a float32 (bn, bd) tile, walking the feature
    axis in chunks of ``_GPU_CHUNK`` columns so that no whole (block, d) operand has to sit in
    registers; masked loads give 0 outside the arrays."""
    chunk = min(_GPU_CHUNK, h_ref.shape[-1])
    rows, classes = pl.ds(row_start, bn), pl.ds(cls_start, bd)

    def step(k, o):
        cols = k * chunk + jnp.arange(chunk)
        col_ok = (cols < dim)[None, :]
        part = pl.ds(k * chunk, chunk)
        h = plgpu.load(h_ref.at[rows, part], mask=row_ok[:, None] & col_ok, other=0.0)
        w = plgpu.load(w_ref.at[classes, part], mask=cls_ok[:, None] & col_ok, other=0.0)
        return o + _tile_logits(h, w, None)

    o = lax.fori_loop(0, pl.cdiv(dim, chunk), step, jnp.zeros((bn, bd), _F32))
    return o if bias is None else o + _row(bias).astype(_F32)


def _gpu_class_step(h_ref, w_ref, b_ref, j, row_ok, *, num_classes, dim, bn, bd):
    """Class block ``j`` of a row-gridded Triton kernel: its start, class ids, validity and
    the (bn, bd) logit tile of this program's rows."""
    start = j * bd
    cls = start + jnp.arange(bd)
    cls_ok = cls < num_classes
    bias = None
    if b_ref is not None:
        bias = plgpu.load(b_ref.at[pl.ds(start, bd)], mask=cls_ok, other=0.0)
    o = _gpu_logits(h_ref, w_ref, 0, start, row_ok, cls_ok, bias, dim=dim, bn=bn, bd=bd)
    return start, cls, cls_ok, o


def _gpu_forward_kernel(h_ref, w_ref, y_ref, *refs, n, num_classes, dim, bn, bd, has_bias):
    b_ref = refs[0] if has_bias else None
    mean_ref, m2_ref, t_ref = refs[1:] if has_bias else refs
    rows = pl.program_id(0) * bn + jnp.arange(bn)
    row_ok = rows < n
    y = plgpu.load(y_ref, mask=row_ok, other=0)

    step = functools.partial(_gpu_class_step, num_classes=num_classes, dim=dim, bn=bn, bd=bd)

    def body(j, stats):
        start, cls, cls_ok, o = step(h_ref, w_ref, b_ref, j, row_ok)
        is_target = cls[None, :] == y[:, None]
        n_block = jnp.minimum(bd, num_classes - start)
        return _merge_moments(stats, o, cls_ok[None, :], is_target, start, n_block)

    zero = jnp.zeros((bn,), _F32)
    mean, m2, target = lax.fori_loop(0, pl.cdiv(num_classes, bd), body, (zero, zero, zero))
    plgpu.store(mean_ref, mean, mask=row_ok)
    plgpu.store(m2_ref, m2, mask=row_ok)
    plgpu.store(t_ref, target, mask=row_ok)


def _gpu_dh_kernel(h_ref, w_ref, y_ref, *refs, n, num_classes, dim, bn, bd, has_bias):
    coef_refs = refs[:4]
    b_ref = refs[4] if has_bias else None
    dh_ref = refs[-1]
    rows = pl.program_id(0) * bn + jnp.arange(bn)
    row_ok = rows < n
    col_ok = jnp.arange(h_ref.shape[-1]) < dim
    y = plgpu.load(y_ref, mask=row_ok, other=0)
    coef = tuple(plgpu.load(r, mask=row_ok, other=0.0) for r in coef_refs)
    pdt = _product_dtype(h_ref.dtype)

    step = functools.partial(_gpu_class_step, num_classes=num_classes, dim=dim, bn=bn, bd=bd)

    def body(j, acc):
        start, cls, cls_ok, o = step(h_ref, w_ref, b_ref, j, row_ok)
        g = _cotangent_tile(o, cls_ok[None, :], cls[None, :] == y[:, None], coef)
        w = plgpu.load(
            w_ref.at[pl.ds(start, bd), :], mask=cls_ok[:, None] & col_ok[None, :], other=0.0
        )
        return acc + lax.dot_general(
            g.astype(pdt),
            w,
            (((1,), (0,)), ((), ())),
            precision=_precision(pdt),
            preferred_element_type=_F32,
        )

    acc = jnp.zeros((bn, h_ref.shape[-1]), _F32)
    acc = lax.fori_loop(0, pl.cdiv(num_classes, bd), body, acc)
    plgpu.store(dh_ref, acc.astype(dh_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _gpu_dw_kernel(h_ref, w_ref, y_ref, *refs, n, num_classes, dim, bn, bd, has_bias):
    coef_refs = refs[:4]
    b_ref = refs[4] if has_bias else None
    dw_ref = refs[-2] if has_bias else refs[-1]
    db_ref = refs[-1] if has_bias else None
    cls = pl.program_id(0) * bd + jnp.arange(bd)
    cls_ok = cls < num_classes
    col_ok = jnp.arange(w_ref.shape[-1]) < dim
    bias = plgpu.load(b_ref, mask=cls_ok, other=0.0) if has_bias else None
    pdt = _product_dtype(w_ref.dtype)

    def body(i, carry):
        acc_w, acc_b = carry
        start = i * bn
        row_ok = start + jnp.arange(bn) < n
        rs = pl.ds(start, bn)
        y = plgpu.load(y_ref.at[rs], mask=row_ok, other=0)
        coef = tuple(plgpu.load(r.at[rs], mask=row_ok, other=0.0) for r in coef_refs)
        o = _gpu_logits(h_ref, w_ref, start, 0, row_ok, cls_ok, bias, dim=dim, bn=bn, bd=bd)
        valid = row_ok[:, None] & cls_ok[None, :]
        g = _cotangent_tile(o, valid, cls[None, :] == y[:, None], coef)
        h = plgpu.load(h_ref.at[rs, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc_w = acc_w + lax.dot_general(
            g.astype(pdt),
            h,
            (((0,), (0,)), ((), ())),
            precision=_precision(pdt),
            preferred_element_type=_F32,
        )
        return acc_w, acc_b + jnp.sum(g, axis=0)

    init = (jnp.zeros((bd, w_ref.shape[-1]), _F32), jnp.zeros((bd,), _F32))
    acc_w, acc_b = lax.fori_loop(0, pl.cdiv(n, bn), body, init)
    plgpu.store(dw_ref, acc_w.astype(dw_ref.dtype), mask=cls_ok[:, None] & col_ok[None, :])
    if has_bias:
        plgpu.store(db_ref, acc_b.astype(db_ref.dtype), mask=cls_ok)


# --------------------------------------------------------------------------- TPU (Mosaic) layout


def _iota(shape: tuple[int, int], axis: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _tpu_forward_kernel(h_ref, w_ref, y_ref, *refs, n, num_classes, dim, bn, bd, has_bias):
    del n, dim, bn
    b_ref = refs[0] if has_bias else None
    mean_ref, m2_ref, t_ref = refs[1:] if has_bias else refs
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        mean_ref[...] = jnp.zeros_like(mean_ref)
        m2_ref[...] = jnp.zeros_like(m2_ref)
        t_ref[...] = jnp.zeros_like(t_ref)

    start = j * bd
    cls = start + _iota((1, bd), 1)
    cls_ok = cls < num_classes
    o = _tile_logits(h_ref[...], w_ref[...], b_ref[...] if has_bias else None)
    # Counts as (1, 1) vectors: no scalar int -> float conversion or division on the TPU's
    # scalar unit.
    n_seen = jnp.full((1, 1), start, jnp.int32)
    n_block = jnp.sum(cls_ok.astype(jnp.int32), axis=1, keepdims=True)
    stats = (mean_ref[...], m2_ref[...], t_ref[...])
    mean, m2, target = _merge_moments(stats, o, cls_ok, cls == y_ref[...], n_seen, n_block)
    mean_ref[...] = mean
    m2_ref[...] = m2
    t_ref[...] = target


def _tpu_dh_kernel(h_ref, w_ref, y_ref, *refs, n, num_classes, dim, bn, bd, has_bias):
    del n, dim, bn
    coef_refs = refs[:4]
    b_ref = refs[4] if has_bias else None
    dh_ref, acc_ref = refs[-2:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    start = j * bd
    cls = start + _iota((1, bd), 1)
    cls_ok = cls < num_classes
    w = jnp.where(start + _iota((bd, 1), 0) < num_classes, w_ref[...], 0)
    o = _tile_logits(h_ref[...], w, b_ref[...] if has_bias else None)
    coef = tuple(r[...] for r in coef_refs)
    g = _cotangent_tile(o, cls_ok, cls == y_ref[...], coef)
    pdt = _product_dtype(w.dtype)
    acc_ref[...] += lax.dot_general(
        g.astype(pdt),
        w,
        (((1,), (0,)), ((), ())),
        precision=_precision(pdt),
        preferred_element_type=_F32,
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _store():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _tpu_dw_kernel(h_ref, w_ref, y_ref, *refs, n, num_classes, dim, bn, bd, has_bias):
    del dim
    coef_refs = refs[:4]
    b_ref = refs[4] if has_bias else None
    if has_bias:
        dw_ref, db_ref, acc_w_ref, acc_b_ref = refs[5:]
    else:
        dw_ref, acc_w_ref = refs[4:]
        db_ref = acc_b_ref = None
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_w_ref[...] = jnp.zeros_like(acc_w_ref)
        if has_bias:
            acc_b_ref[...] = jnp.zeros_like(acc_b_ref)

    row_ok = i * bn + _iota((bn, 1), 0) < n
    cls = j * bd + _iota((1, bd), 1)
    cls_ok = cls < num_classes
    h = jnp.where(row_ok, h_ref[...], 0)
    o = _tile_logits(h, w_ref[...], b_ref[...] if has_bias else None)
    coef = tuple(r[...] for r in coef_refs)
    g = _cotangent_tile(o, jnp.logical_and(row_ok, cls_ok), cls == y_ref[...], coef)
    pdt = _product_dtype(h.dtype)
    acc_w_ref[...] += lax.dot_general(
        g.astype(pdt),
        h,
        (((0,), (0,)), ((), ())),
        precision=_precision(pdt),
        preferred_element_type=_F32,
    )
    if has_bias:
        acc_b_ref[...] += jnp.sum(g, axis=0, keepdims=True)

    @pl.when(i == pl.num_programs(1) - 1)
    def _store():
        dw_ref[...] = acc_w_ref[...].astype(dw_ref.dtype)
        if has_bias:
            db_ref[...] = acc_b_ref[...].astype(db_ref.dtype)


# --------------------------------------------------------------------------- pallas_call builders


def _check_variant(variant: str) -> str:
    if variant not in _VARIANTS:
        raise ValueError(f"variant: expected one of {_VARIANTS}, got {variant!r}")
    return variant


def _gpu_width(dim: int) -> int:
    """The feature width of a Triton block: ``d`` rounded up to a power of two >= 16."""
    return max(16, pl.next_power_of_2(dim))


_TPU_VMEM_BUDGET = 12 * 2**20  # bytes; under the 16 MiB default scoped VMEM of TPU v4 / v5e


def _default_blocks(variant: str, kind: str, dim: int, itemsize: int) -> Blocks:
    if variant == "gpu":
        if kind == "forward":
            return DEFAULT_BLOCKS["gpu"]
        # About 8K float32 accumulator entries per program (64 registers a thread at 4 warps).
        side = max(16, min(64, 8192 // _gpu_width(dim)))
        return Blocks(side, side)
    rows, classes = DEFAULT_BLOCKS["tpu"].rows, DEFAULT_BLOCKS["tpu"].classes

    def vmem(rows: int, classes: int) -> int:
        # Double-buffered h and W blocks, a float32 (block, d) accumulator, logit temporaries.
        return (
            2 * (rows + classes) * dim * itemsize
            + (max(rows, classes) + 4 * rows * classes / dim) * dim * 4
        )

    while vmem(rows, classes) > _TPU_VMEM_BUDGET and classes > 128:
        rows, classes = max(16, rows // 2), classes // 2
    return Blocks(rows, classes)


def _resolve_blocks(variant, kind, blocks, n, num_classes, dim, dtype) -> Blocks:
    """Given or default tiles, shrunk to the problem and checked against the layout's rules."""
    default = _default_blocks(variant, kind, dim, jnp.dtype(dtype).itemsize)
    blocks = blocks or default
    rows = default.rows if blocks.rows is None else blocks.rows
    classes = default.classes if blocks.classes is None else blocks.classes
    if variant == "gpu":
        for name, v in (("block_rows", rows), ("block_classes", classes)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}: expected a power of two >= 16 (Triton), got {v}")
        rows = min(rows, max(16, pl.next_power_of_2(n)))
        classes = min(classes, max(16, pl.next_power_of_2(num_classes)))
    else:
        sub = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
        if rows % sub:
            raise ValueError(f"block_rows: expected a multiple of {sub} for {dtype}, got {rows}")
        if classes % 128:
            raise ValueError(f"block_classes: expected a multiple of 128, got {classes}")
        rows = min(rows, pl.cdiv(n, sub) * sub)
        classes = min(classes, pl.cdiv(num_classes, 128) * 128)
    return Blocks(rows, classes)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Grid and BlockSpecs of one kernel: ``h`` (and ``dh``), ``W`` (and ``dW``), the per-row
    vectors (labels, moments, coefficients), and the bias (and ``dbias``)."""

    grid: tuple[int, ...]
    h: pl.BlockSpec
    w: pl.BlockSpec
    row: pl.BlockSpec
    bias: pl.BlockSpec


def _layout(variant, n, num_classes, dim, bn, bd, *, over_classes: bool) -> _Layout:
    """``over_classes=False``: the grid walks row blocks (forward, ``dh``); True: class
    blocks (``dW``). The other axis is a ``fori_loop`` over a whole-array ref (Triton) or
    the last, sequential grid axis (Mosaic TPU)."""
    nr, nc = pl.cdiv(n, bn), pl.cdiv(num_classes, bd)
    spec = pl.BlockSpec
    if variant == "gpu":
        width = _gpu_width(dim)
        grid = (nc,) if over_classes else (nr,)
        rows, classes = (nr * bn, bd) if over_classes else (bn, nc * bd)
        row_at = (lambda g: (0, 0)) if over_classes else (lambda g: (g, 0))
        class_at = (lambda g: (g, 0)) if over_classes else (lambda g: (0, 0))
        row = spec((rows,), lambda g: row_at(g)[:1])
        bias = spec((classes,), lambda g: class_at(g)[:1])
    else:
        width, rows, classes = dim, bn, bd
        if over_classes:
            grid, row_at, class_at = (nc, nr), (lambda j, i: (i, 0)), (lambda j, i: (j, 0))
        else:
            grid, row_at, class_at = (nr, nc), (lambda i, j: (i, 0)), (lambda i, j: (j, 0))
        row = spec((bn, 1), row_at)
        bias = spec((1, bd), lambda *g: class_at(*g)[::-1])
    return _Layout(grid, spec((rows, width), row_at), spec((classes, width), class_at), row, bias)


def _cost(n: int, num_classes: int, dim: int, itemsize: int, products: int, out_bytes: int):
    """XLA's scheduling hint: executed FLOPs (``products`` matmuls of ``2 N D d``), bytes of
    the inputs read once and the outputs written once."""
    return pl.CostEstimate(
        flops=products * 2 * n * num_classes * dim,
        transcendentals=0,
        bytes_accessed=(n + num_classes) * dim * itemsize + 4 * n + out_bytes,
    )


_KERNELS = {
    ("gpu", "forward"): _gpu_forward_kernel,
    ("gpu", "dh"): _gpu_dh_kernel,
    ("gpu", "dw"): _gpu_dw_kernel,
    ("tpu", "forward"): _tpu_forward_kernel,
    ("tpu", "dh"): _tpu_dh_kernel,
    ("tpu", "dw"): _tpu_dw_kernel,
}


def _run(kind, h, w, labels, coef, bias, *, variant, blocks, interpret):
    """Builds and calls one of the three kernels; returns its outputs as a list."""
    variant = _check_variant(variant)
    n, dim = h.shape
    num_classes = w.shape[0]
    blk = _resolve_blocks(variant, kind, blocks, n, num_classes, dim, h.dtype)
    bn, bd = blk.rows, blk.classes
    lay = _layout(variant, n, num_classes, dim, bn, bd, over_classes=kind == "dw")
    gpu = variant == "gpu"
    vector = (lambda v: v) if gpu else (lambda v: v[:, None])
    args = [h, w, vector(labels.astype(jnp.int32)), *(vector(c.astype(_F32)) for c in coef)]
    in_specs = [lay.h, lay.w, *[lay.row] * (1 + len(coef))]
    if bias is not None:
        args.append(bias if gpu else bias[None, :])
        in_specs.append(lay.bias)
    scratch = []
    if kind == "forward":
        out_shape = [jax.ShapeDtypeStruct((n,) if gpu else (n, 1), _F32)] * 3
        out_specs = [lay.row] * 3
        products, out_bytes = 1, 12 * n
    elif kind == "dh":
        out_shape, out_specs = [jax.ShapeDtypeStruct(h.shape, h.dtype)], [lay.h]
        scratch = [] if gpu else [pltpu.VMEM((bn, dim), _F32)]
        products, out_bytes = 2, h.size * h.dtype.itemsize
    else:
        out_shape, out_specs = [jax.ShapeDtypeStruct(w.shape, w.dtype)], [lay.w]
        scratch = [] if gpu else [pltpu.VMEM((bd, dim), _F32)]
        if bias is not None:
            out_shape.append(
                jax.ShapeDtypeStruct(bias.shape if gpu else (1, num_classes), bias.dtype)
            )
            out_specs.append(lay.bias)
            scratch += [] if gpu else [pltpu.VMEM((1, bd), _F32)]
        products, out_bytes = 2, w.size * w.dtype.itemsize
    kernel = functools.partial(
        _KERNELS[variant, kind],
        n=n,
        num_classes=num_classes,
        dim=dim,
        bn=bn,
        bd=bd,
        has_bias=bias is not None,
    )
    if gpu:
        params = plgpu.CompilerParams(num_warps=4, num_stages=2)  # untuned (no GPU at hand)
    else:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=lay.grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=params,
        cost_estimate=_cost(n, num_classes, dim, h.dtype.itemsize, products, out_bytes),
        interpret=interpret,
        name=f"zloss_{kind}",
    )(*args)


_STATIC = ("variant", "blocks", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None = None,
    *,
    variant: str = "tpu",
    blocks: Blocks | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row moments ``(mean, M2, o_y)`` of ``h @ w^T + bias``, each float32 ``(N,)``.

    FLOPs ``2 N D d``; HBM bytes (counted) ``(N d + D d) s + 16 N``. Inputs are not checked
    here (see :func:`kernels.zloss.api.z_loss_linear`).
    """
    outs = _run(
        "forward", h, w, labels, (), bias, variant=variant, blocks=blocks, interpret=interpret
    )
    return tuple(o.reshape(h.shape[0]) for o in outs)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    coef: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    bias: jax.Array | None = None,
    *,
    variant: str = "tpu",
    blocks: Blocks | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(dh, dW, dbias) = (G W, G^T h, 1^T G)``, ``G`` rebuilt tile by tile from
    ``coef = (mean, alpha, beta, gamma)`` (``logit_cotangent_coefficients``), in the dtypes
    of ``h``, ``w`` and ``bias`` (``dbias`` is None without a bias).

    Two kernels: ``dh`` tiled over rows (reducing over class blocks), ``dW`` and ``dbias``
    tiled over classes (reducing over row blocks). Each recomputes the logits, so ``8 N D d``
    FLOPs are executed for the ``4 N D d`` counted; HBM bytes (counted) ``(N d + D d) s``
    read and as many written.
    """
    kw = dict(variant=variant, blocks=blocks, interpret=interpret)
    coef = tuple(coef)
    [dh] = _run("dh", h, w, labels, coef, bias, **kw)
    dw, *db = _run("dw", h, w, labels, coef, bias, **kw)
    return dh, dw, (db[0].reshape(w.shape[0]) if bias is not None else None)
