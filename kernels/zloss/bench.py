"""Timing of the fused linear + Z-loss kernel against the dense reference.

``benchmark(sizes, dtype)`` returns one row (a dict) per size and implementation
(``"pallas"``: :func:`kernels.zloss.api.z_loss_linear` with the kernel; ``"reference"``: the
dense jnp reference, which writes the ``(N, D)`` logits) with the median time of the forward
and of forward + backward (gradients of ``h`` and ``W``) in milliseconds, and throughput from
the counted cost: FLOPs ``2 N D d`` forward and ``6 N D d`` forward + backward (``4 N D d``
backward); HBM bytes of ``h``, ``W``, the labels and the outputs only
(``(N d + D d) s + 16 N`` forward, twice the matrices for forward + backward), so ``GB/s``
is a lower bound on the traffic actually moved. ``max_rel_err`` compares the losses with the
reference's (the reference's row says ``0``).

On a CPU there is nothing to time: the rows come from a correctness pass in interpret mode
at tiny sizes (both kernel layouts, forward and gradients against the reference), the time
columns are None and ``note`` says that timings need an accelerator.

``python -m benchmarks.kernels`` imports this module (``SIZES``, ``benchmark``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.zloss import api

__all__ = ["SIZES", "benchmark", "counted_bytes", "counted_flops"]

SIZES = ((4096, 32768, 1024), (8192, 131072, 2048))  # (N tokens, D classes, d hidden)
_CPU_SIZES = ((37, 300, 20),)
_CPU_NOTE = "CPU: correctness pass in interpret mode only; timings need an accelerator"


def counted_flops(n: int, num_classes: int, dim: int, *, backward: bool) -> int:
    """``2 N D d`` forward; ``6 N D d`` forward + backward."""
    return (6 if backward else 2) * n * num_classes * dim


def counted_bytes(n: int, num_classes: int, dim: int, itemsize: int, *, backward: bool) -> int:
    """Bytes of ``h``, ``W`` and int32 labels read once, float32 losses written once; with
    the backward also ``h``, ``W`` read again and ``dh``, ``dW`` written."""
    matrices = (n + num_classes) * dim * itemsize
    return (3 if backward else 1) * matrices + 8 * n


def _median_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(n: int, num_classes: int, dim: int, dtype: Any, seed: int = 0):
    kh, kw, ky = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(kh, (n, dim), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (num_classes, dim), jnp.float32) / np.sqrt(dim)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, num_classes, jnp.int32)
    return h, w, y


def _fns(**kw: Any):
    def total(h, w, y):
        return jnp.sum(api.z_loss_linear(h, w, y, **kw).astype(jnp.float32))

    forward = jax.jit(lambda h, w, y: api.z_loss_linear(h, w, y, **kw))
    both = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    return forward, both


def _rel_err(got: Any, want: Any) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _base_row(n: int, num_classes: int, dim: int, dtype: Any, implementation: str):
    itemsize = jnp.dtype(dtype).itemsize
    return {
        "N": n,
        "D": num_classes,
        "d": dim,
        "dtype": jnp.dtype(dtype).name,
        "implementation": implementation,
        "backend": jax.default_backend(),
        "gflop_forward": counted_flops(n, num_classes, dim, backward=False) / 1e9,
        "gflop_forward_backward": counted_flops(n, num_classes, dim, backward=True) / 1e9,
        "mb_forward": counted_bytes(n, num_classes, dim, itemsize, backward=False) / 1e6,
        "mb_forward_backward": counted_bytes(n, num_classes, dim, itemsize, backward=True) / 1e6,
    }


def _correctness_pass(dtype: Any) -> list[dict[str, Any]]:
    rows = []
    for n, num_classes, dim in _CPU_SIZES:
        h, w, y = _inputs(n, num_classes, dim, dtype)
        ref_fwd, ref_both = _fns(implementation="reference")
        want, (_, want_grads) = ref_fwd(h, w, y), ref_both(h, w, y)
        for variant, blocks in (("gpu", (16, 64)), ("tpu", (16, 128))):
            fwd, both = _fns(
                implementation="pallas",
                interpret=True,
                variant=variant,
                block_rows=blocks[0],
                block_classes=blocks[1],
            )
            _, grads = both(h, w, y)
            row = _base_row(n, num_classes, dim, dtype, f"pallas ({variant} layout, interpret)")
            row.update(
                forward_ms=None,
                forward_backward_ms=None,
                max_rel_err=_rel_err(fwd(h, w, y), want),
                max_rel_err_dh=_rel_err(grads[0], want_grads[0]),
                max_rel_err_dw=_rel_err(grads[1], want_grads[1]),
                note=_CPU_NOTE,
            )
            rows.append(row)
    return rows


def benchmark(
    sizes: Sequence[tuple[int, int, int]] = SIZES,
    dtype: Any = jnp.bfloat16,
    *,
    repeats: int = 10,
) -> list[dict[str, Any]]:
    """Rows of timings (ms), TFLOP/s and GB/s of the kernel and the reference per size.

    Args:
      sizes: ``(N, D, d)`` triples (ignored on a CPU, which runs the correctness pass).
      dtype: input dtype of ``h`` and ``W``.
      repeats: timed calls per measurement (median).

    A size the reference cannot run (out of memory: it forms the logits) gets a row with
    ``error`` instead of times.
    """
    if jax.default_backend() == "cpu":
        return _correctness_pass(dtype)
    rows = []
    for n, num_classes, dim in sizes:
        h, w, y = _inputs(n, num_classes, dim, dtype)
        losses = {}
        for implementation in ("pallas", "reference"):
            row = _base_row(n, num_classes, dim, dtype, implementation)
            fwd, both = _fns(implementation=implementation)
            try:
                losses[implementation] = fwd(h, w, y)
                t_fwd = _median_seconds(fwd, h, w, y, repeats=repeats)
                t_both = _median_seconds(both, h, w, y, repeats=repeats)
            except Exception as error:  # e.g. the reference's logits do not fit
                row["error"] = f"{type(error).__name__}: {error}"[:300]
                rows.append(row)
                continue
            row.update(
                forward_ms=1e3 * t_fwd,
                forward_backward_ms=1e3 * t_both,
                tflops_forward=row["gflop_forward"] / t_fwd / 1e3,
                tflops_forward_backward=row["gflop_forward_backward"] / t_both / 1e3,
                gbps_forward=row["mb_forward"] / t_fwd / 1e3,
                gbps_forward_backward=row["mb_forward_backward"] / t_both / 1e3,
            )
            rows.append(row)
        if "pallas" in losses and "reference" in losses:
            err = _rel_err(losses["pallas"], losses["reference"])
            for row in rows[-2:]:
                row["max_rel_err"] = err if row["implementation"] == "pallas" else 0.0
    return rows


if __name__ == "__main__":
    for r in benchmark():
        print(r)
