"""Pallas kernels on an accelerator: flash attention against XLA and cuDNN attention.

For each sequence length (512 ... 16k), head dim (64, 128) and causal or not, bfloat16,
``(batch, seq, heads, head_dim)`` with ``batch * seq = 16k`` tokens and ``heads * head_dim
= 2048``: the median time of the forward and of forward + backward (gradients of q, k, v) of
``kernels.attention.flash_attention(implementation="pallas")`` and of
``jax.nn.dot_product_attention`` with ``implementation="xla"`` and ``"cudnn"`` (GPU only),
and, on a GPU, the opt-in Mosaic GPU kernels (``gpu_kernel="mosaic_gpu"``). Each result is
first checked against XLA's (``error_vs_xla``: max |diff| / max |xla|), which is also the
on-device validation of kernels that a CPU can only lower. TFLOP/s are counted the
FlashAttention way (forward ``4 B H S^2 D``, halved if causal; backward 2.5 x forward) and
given as a fraction of the bfloat16 matmul peak measured in the same run (an 8192^3
``jnp.dot``). The Z-loss kernel's benchmark (``kernels.zloss.bench``) is
appended when that module is importable.

On a CPU there is nothing to time: it runs a correctness pass instead (the kernels in
interpret mode at tiny sizes against the reference, forward and gradients) and says so.

    python -m benchmarks.kernels [--seqs 512 1024 ...] [--head-dims 64 128] [--repeats 20]
                                 [--out PATH | --overwrite]
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import add_output_options, format_table, time_call, write_json
from kernels.attention import flash_attention

try:  # written separately; the harness works without it
    from kernels.zloss import bench as zloss_bench
except ImportError:
    zloss_bench = None

SEQS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
TOKENS = 16384
WIDTH = 2048
PEAK_SIZE = 8192
ZLOSS_SIZES = ((8192, 32768, 1024), (16384, 131072, 2048))  # (tokens, classes, hidden)


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool) -> float:
    """FlashAttention's count: 2 matmuls of 2 B H S^2 D each, halved by a causal mask."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def matmul_peak(repeats: int) -> float:
    """Measured bfloat16 matmul TFLOP/s (PEAK_SIZE^3), the yardstick for every row."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (PEAK_SIZE, PEAK_SIZE), jnp.bfloat16) for k in keys)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    seconds = time_call(matmul, a, b, repeats=repeats)
    return 2.0 * PEAK_SIZE**3 / seconds / 1e12


def attention_fns(causal: bool) -> dict[str, Any]:
    def xla_like(implementation):
        def fn(q, k, v):
            with jax.numpy_dtype_promotion("standard"):
                return jax.nn.dot_product_attention(
                    q, k, v, is_causal=causal, implementation=implementation
                )

        return fn

    fns = {  # XLA first: the others are checked against its results
        "xla": xla_like("xla"),
        "flash (pallas)": functools.partial(
            flash_attention, causal=causal, implementation="pallas"
        ),
    }
    if jax.default_backend() == "gpu":
        fns["flash (mosaic gpu)"] = functools.partial(
            flash_attention, causal=causal, implementation="pallas", gpu_kernel="mosaic_gpu"
        )
        fns["cudnn"] = xla_like("cudnn")
    return fns


def normalised_error(got: Any, want: Any) -> float:
    """max |got - want| / max |want| over all leaves, in float32."""
    errors = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        errors.append(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)))
    return max(errors)


def forward_backward(fn):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def measure(seq: int, head_dim: int, causal: bool, peak: float, repeats: int) -> list[dict]:
    batch, heads = max(1, TOKENS // seq), WIDTH // head_dim
    keys = jax.random.split(jax.random.key(seq + head_dim), 3)
    q, k, v = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16) for key in keys)
    flops = attention_flops(batch, seq, heads, head_dim, causal)
    rows = []
    want: dict[str, Any] = {}  # XLA's outputs: every other implementation is checked on them
    for name, fn in attention_fns(causal).items():
        for pass_name, jitted, count in (
            ("fwd", jax.jit(fn), flops),
            ("fwd+bwd", jax.jit(forward_backward(fn)), 3.5 * flops),
        ):
            row = {
                "op": "attention",
                "impl": name,
                "pass": pass_name,
                "seq": seq,
                "head_dim": head_dim,
                "causal": causal,
                "batch": batch,
                "heads": heads,
            }
            try:
                result = jitted(q, k, v)
                if name == "xla":
                    want[pass_name] = result
                elif pass_name in want:
                    row["error_vs_xla"] = normalised_error(result, want[pass_name])
                del result
                seconds = time_call(jitted, q, k, v, repeats=repeats)
            except Exception as error:  # unsupported config or out of memory: say so, go on
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            else:
                tflops = count / seconds / 1e12
                row.update(ms=seconds * 1e3, tflops=tflops, peak_fraction=tflops / peak)
            rows.append(row)
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


COLUMNS = [
    "impl",
    "pass",
    "seq",
    "head_dim",
    "causal",
    "ms",
    "tflops",
    "peak_fraction",
    "error_vs_xla",
    "error",
]


def correctness_pass() -> list[dict]:
    """Interpret-mode kernels against the reference at tiny sizes (for hosts without a GPU)."""
    rows = []
    rng = np.random.default_rng(0)
    blocks = {"block_q": 16, "block_kv": 16, "block_q_bwd": 16, "block_kv_bwd": 16}
    for dtype in (jnp.float32, jnp.bfloat16):
        for causal in (False, True):
            q, k, v = (
                jnp.asarray(rng.normal(size=(2, 40, 2, 64)), jnp.float32).astype(dtype)
                for _ in range(3)
            )
            kernel = functools.partial(
                flash_attention, causal=causal, implementation="pallas", interpret=True, **blocks
            )
            reference = functools.partial(
                flash_attention, causal=causal, implementation="reference"
            )
            row: dict[str, Any] = {"dtype": jnp.dtype(dtype).name, "causal": causal}
            for pass_name, make in (("fwd", lambda f: f), ("grad", forward_backward)):
                got = jax.tree.leaves(jax.jit(make(kernel))(q, k, v))
                want = jax.tree.leaves(jax.jit(make(reference))(q, k, v))
                row[f"{pass_name}_error"] = normalised_error(got, want)
            rows.append(row)
    return rows


def zloss_rows() -> list[dict]:
    if zloss_bench is None:
        return []
    sizes = getattr(zloss_bench, "SIZES", ZLOSS_SIZES)
    try:
        rows = zloss_bench.benchmark(sizes, jnp.bfloat16)
    except Exception as error:  # another module's failure must not lose the attention rows
        return [{"op": "zloss", "error": f"{type(error).__name__}: {error}"[:300]}]
    return [{"op": "zloss", **row} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--repeats", type=int, default=20)
    add_output_options(parser)
    args = parser.parse_args()

    if jax.default_backend() == "cpu":
        rows = correctness_pass()
        print(format_table(rows, ["dtype", "causal", "fwd_error", "grad_error"]))
        extra = zloss_rows()  # the Z-loss bench runs its own correctness pass on a CPU
        if extra:
            print(format_table(extra, sorted({key for row in extra for key in row})))
        print(
            "CPU only: ran the interpret-mode correctness pass above (normalised max error "
            "against the reference); timings need a GPU or TPU."
        )
        if args.out:  # never overwrite accelerator results with these by default
            path = write_json("kernels", rows + extra, args, mode="cpu correctness")
            print(f"wrote {path}")
        return

    peak = matmul_peak(args.repeats)
    print(f"measured bf16 matmul peak: {peak:.1f} TFLOP/s")
    print(format_table([], COLUMNS))
    rows = [
        row
        for seq in args.seqs
        for head_dim in args.head_dims
        for causal in (False, True)
        for row in measure(seq, head_dim, causal, peak, args.repeats)
    ]
    extra = zloss_rows()
    if extra:
        print(format_table(extra, sorted({key for row in extra for key in row})))
    path = write_json(
        "kernels",
        rows + extra,
        args,
        dtype="bfloat16",
        tokens=TOKENS,
        width=WIDTH,
        matmul_peak_tflops=peak,
        flop_convention="fwd 4BHS^2D (causal /2); fwd+bwd 3.5x fwd",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
