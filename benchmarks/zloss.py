"""One training step of a D-way output layer: dense softmax CE vs Z-loss (dense, Gram, factored).

The layer ``o = W h`` with ``W`` (D, d) on a batch of N = 512 (``--batch``) features ``h``
(N, d) with integer labels; one step = forward, backward (gradients w.r.t. ``W`` and ``h``,
the latter for a trunk) and an SGD update of ``W``:

* dense softmax CE -- ``optax.losses.softmax_cross_entropy_with_integer_labels`` on the
  (N, D) logits, ``jax.value_and_grad``; O(N D d);
* dense Z-loss -- ``jaxmtl.losses.classification.z_loss`` on the logits; O(N D d);
* Gram path -- ``jaxmtl.losses.spherical_output.gram_z_loss``; O(D d^2 + N d^2);
* factored -- ``spherical_output.factored_z_loss_sgd`` (Vincent et al., NeurIPS 2015):
  O(N d^2 + d^3), independent of D.

Times are medians (``ms``) and ratios to dense softmax CE at the same (D, d) measured in
the same run (``ratio`` < 1 is faster); ``min ratio`` is the same ratio of the fastest
steps, less sensitive to other processes on a shared CPU. ``peak MB`` is XLA's memory
analysis of the compiled step (arguments + outputs + temporaries - donated aliases);
``GFLOP`` is XLA's cost analysis (for the factored step it counts one trip of the
re-factorization loops, which run only when ``U`` is ill-conditioned). Parameters and
batches are jit arguments and the parameters are donated, so the update is in place as in
training. The dense cases of a size run back to back (each long enough to average over
other processes); the factored steps of all sizes are timed in interleaved rounds, so that
the flatness in D is not an artefact of the load on a shared CPU changing over the run.

    python -m benchmarks.zloss [--quick] [--repeats 100] [--budget 1.0] [--rounds 20]
        [--burst 5] [--batch N] [--log2-classes 12 17] [--dims 128] [--out PATH | --overwrite]

writes a fresh ``benchmarks/results/zloss-<timestamp>.json`` (``--overwrite``: the
committed ``zloss.json``; ``zloss_quick`` with ``--quick``, ``zloss_n<N>`` with a custom
grid, e.g. the Gram path's growing advantage at ``--batch 4096 --log2-classes 12 17 --dims
128``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import add_output_options, format_table, write_json
from jaxmtl.losses import classification, spherical_output

BATCH = 512
LEARNING_RATE = 0.1
FULL = {"log2_classes": tuple(range(12, 19)), "dims": (128, 256)}
QUICK = {"log2_classes": (12, 14, 16), "dims": (128,)}


def _dense_step(loss_fn: Callable[..., jax.Array]) -> Callable[..., Any]:
    def step(w, h, labels):
        mean_loss = lambda w_, h_: jnp.mean(loss_fn(w_, h_, labels))
        value, (g_w, g_h) = jax.value_and_grad(mean_loss, (0, 1))(w, h)
        return w - LEARNING_RATE * g_w, value, g_h

    return step


def _softmax_ce(w, h, labels):
    return optax.losses.softmax_cross_entropy_with_integer_labels(h @ w.T, labels)


def _dense_z(w, h, labels):
    return classification.z_loss(h @ w.T, labels)


def _gram_z(w, h, labels):
    return spherical_output.gram_z_loss(w, h, labels)


def _factored_step():
    opt = spherical_output.factored_z_loss_sgd(LEARNING_RATE)

    def step(state, h, labels):
        out = opt.update(h, labels, state)
        return out.state, jnp.mean(out.loss), out.h_grad

    return opt.init, step


def _compile(step: Callable[..., Any], *args: Any):
    """The compiled step (the parameters, argument 0, donated) and XLA's numbers for it."""
    compiled = jax.jit(step, donate_argnums=0).lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return compiled, float(cost.get("flops", float("nan"))), float(peak)


def _time_steps(
    compiled, params: Any, *batch: Any, repeats: int, budget: float
) -> tuple[float, float]:
    """Median and minimum seconds of one step, threading the (donated) parameters through the
    calls: at least 3 and at most ``repeats`` steps, stopping once ``budget`` seconds are
    spent (so fast steps get many repeats, which the median needs on a shared CPU)."""
    params = compiled(params, *batch)[0]  # warm-up
    jax.block_until_ready(params)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget):
        start = time.perf_counter()
        out = compiled(params, *batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        params = out[0]
    return statistics.median(times), min(times)


def _problem(log2_classes: int, dim: int, batch: int = BATCH):
    """Features, labels and a maker of fresh (D, d) weights for one size."""
    num_classes = 2**log2_classes
    kw, kh, ky = jax.random.split(jax.random.key(log2_classes * 1000 + dim), 3)
    h = jax.random.normal(kh, (batch, dim), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, num_classes, jnp.int32)

    def fresh_w():
        return jax.random.normal(kw, (num_classes, dim), jnp.float32) / np.sqrt(dim)

    return h, labels, fresh_w


def _row(num_classes, dim, method, seconds, fastest, flops, peak) -> dict:
    return {
        "D": num_classes,
        "d": dim,
        "method": method,
        "ms": seconds * 1e3,
        "min ms": fastest * 1e3,
        "GFLOP": flops / 1e9,
        "peak MB": peak / 2**20,
    }


def measure_dense(
    log2_classes: int, dim: int, repeats: int, budget: float, batch: int = BATCH
) -> list[dict]:
    """Dense softmax CE, dense Z-loss and the Gram path at one size."""
    h, labels, fresh_w = _problem(log2_classes, dim, batch)
    cases = {
        "dense softmax CE": _dense_step(_softmax_ce),
        "dense Z-loss": _dense_step(_dense_z),
        "Gram Z-loss": _dense_step(_gram_z),
    }
    rows = []
    for method, step in cases.items():
        params = fresh_w()
        compiled, flops, peak = _compile(step, params, h, labels)
        seconds, fastest = _time_steps(compiled, params, h, labels, repeats=repeats, budget=budget)
        rows.append(_row(2**log2_classes, dim, method, seconds, fastest, flops, peak))
        del params
    return rows


def measure_factored(
    log2s: tuple[int, ...], dim: int, rounds: int, burst: int, batch: int = BATCH
) -> list[dict]:
    """The factored step at every D, timed in interleaved rounds (``burst`` steps at each D
    per round) so that every D sees the same load from other processes on a shared CPU."""
    init, step = _factored_step()
    cases = []
    for log2_classes in log2s:
        h, labels, fresh_w = _problem(log2_classes, dim, batch)
        state = jax.jit(init)(fresh_w())
        compiled, flops, peak = _compile(step, state, h, labels)
        state = compiled(state, h, labels)[0]  # warm-up
        cases.append({"compiled": compiled, "state": state, "batch": (h, labels), "times": []})
        cases[-1].update(flops=flops, peak=peak, D=2**log2_classes)
    for _ in range(rounds):
        for case in cases:
            for _ in range(burst):
                start = time.perf_counter()
                out = case["compiled"](case["state"], *case["batch"])
                jax.block_until_ready(out)
                case["times"].append(time.perf_counter() - start)
                case["state"] = out[0]
    return [
        _row(
            c["D"],
            dim,
            "factored Z-loss",
            statistics.median(c["times"]),
            min(c["times"]),
            c["flops"],
            c["peak"],
        )
        for c in cases
    ]


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds the ratios to dense softmax CE of the same (D, d)."""
    base = {(r["D"], r["d"]): r for r in rows if r["method"] == "dense softmax CE"}
    for row in rows:
        ref = base[row["D"], row["d"]]
        row["ratio"] = row["ms"] / ref["ms"]
        row["min ratio"] = row["min ms"] / ref["min ms"]
        row["flop ratio"] = row["GFLOP"] / ref["GFLOP"]
        row["memory ratio"] = row["peak MB"] / ref["peak MB"]
    return rows


def targets(rows: list[dict]) -> dict[str, Any]:
    """The CPU targets: the factored step flat in D (<= 1.5x from the smallest to the
    largest D, per d) and >= 50x faster than dense softmax CE at D = 2^17, d = 128."""
    out: dict[str, Any] = {}
    factored = [r for r in rows if r["method"] == "factored Z-loss"]
    for dim in sorted({r["d"] for r in factored}):
        mine = sorted((r for r in factored if r["d"] == dim), key=lambda r: r["D"])
        growth = mine[-1]["ms"] / mine[0]["ms"]
        span = f"D={mine[0]['D']}->{mine[-1]['D']}, d={dim}"
        out[f"factored growth (median) {span}"] = growth
        out[f"factored growth (min) {span}"] = mine[-1]["min ms"] / mine[0]["min ms"]
        out[f"factored flat (<= 1.5x, median), d={dim}"] = growth <= 1.5
    at = [r for r in factored if r["D"] == 2**17 and r["d"] == 128]
    if at:
        speedup = 1.0 / at[0]["ratio"]
        out["factored speed-up vs CE at D=2^17, d=128"] = speedup
        out["factored speed-up vs CE at D=2^17, d=128 (min)"] = 1.0 / at[0]["min ratio"]
        out["factored >= 50x faster at D=2^17, d=128"] = speedup >= 50
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D = 2^12, 2^14, 2^16; d = 128")
    parser.add_argument("--repeats", type=int, default=100, help="timed steps per case (max)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per case (min 3 steps)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved factored rounds")
    parser.add_argument("--burst", type=int, default=5, help="factored steps per D per round")
    parser.add_argument("--batch", type=int, default=BATCH, help="N, features per step")
    parser.add_argument(
        "--log2-classes", type=int, nargs="+", default=None, help="override the D grid"
    )
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="override d")
    add_output_options(parser)
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    if args.log2_classes:
        sizes["log2_classes"] = tuple(args.log2_classes)
    if args.dims:
        sizes["dims"] = tuple(args.dims)
    custom = args.batch != BATCH or args.log2_classes or args.dims
    start = time.perf_counter()
    rows = []
    for dim in sizes["dims"]:
        factored = measure_factored(sizes["log2_classes"], dim, args.rounds, args.burst, args.batch)
        for log2_classes, row in zip(sizes["log2_classes"], factored, strict=True):
            dense = measure_dense(log2_classes, dim, args.repeats, args.budget, args.batch)
            rows += with_ratios([*dense, row])
            print(format_table(rows[-4:], ["D", "d", "method", "ms", "ratio"]), flush=True)
    columns = ["D", "d", "method", "ms", "ratio", "min ratio", "GFLOP", "flop ratio", "peak MB"]
    columns += ["memory ratio"]
    print(format_table(rows, columns))
    checks = targets(rows)
    for key, value in checks.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")
    # A quick or custom run does not overwrite the full run's results.
    name = "zloss_quick" if args.quick else "zloss"
    if custom:
        name = f"zloss_n{args.batch}"
    path = write_json(
        name,
        rows,
        args,
        batch=args.batch,
        quick=args.quick,
        targets=checks,
        seconds=round(seconds, 1),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
