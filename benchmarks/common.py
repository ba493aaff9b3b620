"""Shared benchmark plumbing: timing jitted functions, printing a table, writing JSON.

Pass parameters and batches into jitted functions as arguments: closed-over arrays become
compile-time constants that XLA may fold, and the timing then measures nothing.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time in seconds of ``fn(*args)``, waiting for every output to be ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(
    fns: dict[str, Callable[..., Any]], *args: Any, rounds: int = 20, warmup: int = 2
) -> dict[str, float]:
    """Median wall time in seconds of each ``fn(*args)``, timed in interleaved rounds.

    Each round calls every function once in turn, so a change of load from other processes
    during the run (a shared CPU) reaches every method alike and the ratios stay fair.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def counted_flops(jitted: Callable[..., Any], *args: Any) -> float:
    """FLOPs of one call of a ``jax.jit``-ed function, as XLA's cost analysis counts them."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):  # older jax returns one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``; floats to 3 digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(
    name: str, rows: Sequence[dict[str, Any]], out: str | None = None, **meta: Any
) -> Path:
    """Writes environment, meta and rows to ``out`` or ``benchmarks/results/<name>.json``."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), "meta": meta, "rows": list(rows)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
