"""Shared benchmark plumbing: timing jitted functions, printing a table, writing JSON.

Pass parameters and batches into jitted functions as arguments: closed-over arrays become
compile-time constants that XLA may fold, and the timing then measures nothing.

Output: every benchmark takes ``--out PATH`` and ``--overwrite`` (:func:`add_output_options`).
By default a run writes a fresh ``benchmarks/results/<name>-<timestamp>.json``; only
``--overwrite`` replaces the committed ``benchmarks/results/<name>.json`` (the numbers the
README quotes), and ``--out`` writes exactly there. Each file records the environment and
the provenance (versions, git commit, command line: ``jaxmtl.experiment.provenance``).
"""

from __future__ import annotations

import argparse
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
    """What the numbers were measured on, and by which code and command."""
    from jaxmtl.experiment import provenance

    device = jax.devices()[0]
    record = provenance()
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": record["versions"],
        "git": record["git"],
        "command": record["command"],
        "time": record["time"],
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


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Adds ``--out PATH`` and ``--overwrite`` (see the module docstring) to ``parser``."""
    parser.add_argument(
        "--out", default=None, help="write the JSON here (default: a fresh timestamped file)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the committed benchmarks/results/<name>.json",
    )


def output_path(name: str, out: str | None = None, *, overwrite: bool = False) -> Path:
    """``out``; else ``benchmarks/results/<name>.json`` with ``overwrite``; else a new
    ``benchmarks/results/<name>-<timestamp>[-n].json``."""
    if out:
        return Path(out)
    if overwrite:
        return RESULTS_DIR / f"{name}.json"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = RESULTS_DIR / f"{name}-{stamp}.json", 0
    while path.exists():
        n += 1
        path = RESULTS_DIR / f"{name}-{stamp}-{n}.json"
    return path


def write_json(
    name: str,
    rows: Sequence[dict[str, Any]],
    out: str | argparse.Namespace | None = None,
    **meta: Any,
) -> Path:
    """Writes environment, meta and rows as JSON (atomically) and returns the path.

    ``out``: the parsed command line of :func:`add_output_options` (its ``--out`` and
    ``--overwrite``), or a path, or None (a fresh timestamped file; see :func:`output_path`).
    """
    if isinstance(out, argparse.Namespace):
        path = output_path(name, out.out, overwrite=out.overwrite)
    else:
        path = output_path(name, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), "meta": meta, "rows": list(rows)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
