"""Step time of every ``jaxmtl.transforms`` method as a ratio to the plain summed-loss step.

The model of ``benchmarks/mtl_gradients.py``: an MLP trunk 784-256-256 (ReLU) with K linear
10-way heads, batch 256, float32, Adam. A step is forward, gradients, aggregation, the Adam
update and applying it, jitted with parameters and batch passed as arguments. Each method runs
through the paths it supports:

* ``jacobian``: ``jaxmtl.mtl.task_gradients`` (one forward, a K-wide backward) then
  ``optax.chain(method(shared=trunk), optax.adam)``;
* ``gramian``: ``jaxmtl.mtl.gramian_path.weighted_gradients`` (no per-task gradients of the
  trunk: K activation cotangents, ``J J^T`` layer by layer, weights, the weighted gradient
  from the stored cotangents) then ``optax.adam``; Gramian weightings only;
* ``losses``: ``jax.vjp`` of the task losses, weights from the losses, one VJP with them;
  weightings that ignore the Gramian only.

With the ``peers`` extra installed, the same model and method in torchjd run in the same
process on the same threads: ``torchjd.autojac.mtl_backward`` + ``jac_to_grad`` (its
Jacobian path) and, where the weighting supports it, the ``torchjd.autogram.Engine``
Gramian path; ``speedup`` is torchjd's faster step over jaxmtl's faster step.

Timing: every candidate of one K is timed in interleaved rounds (one untimed call, then
``--repeats`` timed calls, in each of ``--rounds`` rounds) and each ratio is the median over
rounds of the per-round ratio, which keeps a shared, noisy machine from biasing one method.
``flops`` is XLA's count as a ratio to the plain step's.

    python -m benchmarks.transforms [--tasks 2 4 8 16] [--methods upgrad mgda ...]
                                    [--rounds 5] [--repeats 10] [--no-torch]
                                    [--out PATH | --overwrite]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import optax

import jaxmtl.transforms as T
from benchmarks.common import add_output_options, format_table, write_json
from benchmarks.mtl_gradients import (
    BATCH,
    CLASSES,
    SIZES,
    init_params,
    is_shared,
    losses_from_features,
    task_losses,
)
from jaxmtl import mtl
from jaxmtl.mtl import gramian_path as gp
from jaxmtl.transforms import weighting as W

THREADS = 2
LEARNING_RATE = 1e-3

# name -> (transform factory (K -> transform), weighting factory (K -> Weighting) or None)
METHODS: dict[str, tuple[Callable[[int], Any], Callable[[int], Any] | None]] = {
    "mean": (lambda k: T.mean(shared=is_shared), lambda k: W.mean()),
    "mgda": (lambda k: T.mgda(shared=is_shared), lambda k: W.mgda()),
    "pcgrad": (lambda k: T.pcgrad(shared=is_shared), lambda k: W.pcgrad()),
    "upgrad": (lambda k: T.upgrad(shared=is_shared), lambda k: W.upgrad()),
    "cagrad": (lambda k: T.cagrad(shared=is_shared), lambda k: W.cagrad()),
    "dualproj": (lambda k: T.dualproj(shared=is_shared), lambda k: W.dualproj()),
    "imtl_g": (lambda k: T.imtl_g(shared=is_shared), lambda k: W.imtl_g()),
    "aligned_mtl": (lambda k: T.aligned_mtl(shared=is_shared), lambda k: W.aligned_mtl()),
    "nash_mtl": (lambda k: T.nash_mtl(shared=is_shared), lambda k: W.nash_mtl()),
    "fairgrad": (lambda k: T.fairgrad(shared=is_shared), lambda k: W.fairgrad()),
    "gradvac": (
        lambda k: T.gradvac(num_tasks=k, shared=is_shared),
        lambda k: W.gradvac(num_tasks=k),
    ),
    "graddrop": (lambda k: T.graddrop(shared=is_shared), None),
    "db_mtl": (lambda k: T.db_mtl(num_tasks=k, shared=is_shared), None),
    "rlw": (lambda k: T.rlw(shared=is_shared), lambda k: W.rlw()),
    "uncertainty": (
        lambda k: T.uncertainty(num_tasks=k, shared=is_shared),
        lambda k: W.uncertainty(num_tasks=k),
    ),
    "dwa": (lambda k: T.dwa(num_tasks=k, shared=is_shared), lambda k: W.dwa(num_tasks=k)),
    "famo": (lambda k: T.famo(num_tasks=k, shared=is_shared), lambda k: W.famo(num_tasks=k)),
    "gls": (lambda k: T.gls(shared=is_shared), lambda k: W.gls()),
    "stch": (lambda k: T.stch(shared=is_shared), lambda k: W.stch()),
}

LAYERS = [gp.dense(), gp.function(jax.nn.relu), gp.dense(), gp.function(jax.nn.relu)]


def trunk_list(params: dict) -> list:
    return [params["trunk"][0], None, params["trunk"][1], None]


# ----------------------------------------------------------------------------- jax steps


def plain_step(adam):
    def step(params, opt_state, x, y):
        grads = jax.grad(lambda p: task_losses(p, x, y).sum())(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def jacobian_step(tx):
    def step(params, opt_state, x, y):
        losses, grads = mtl.task_gradients(task_losses, params, x, y, shared=is_shared)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    return step


def gramian_step(weighting, adam):
    def step(params, state, x, y):
        weighting_state, adam_state = state
        out = gp.weighted_gradients(
            LAYERS,
            losses_from_features,
            trunk_list(params),
            params["heads"],
            x,
            y,
            weigh=lambda g: weighting.weights(g, weighting_state),
        )
        grads = {"trunk": [out.trunk_grads[0], out.trunk_grads[2]], "heads": out.head_grads}
        updates, adam_state = adam.update(grads, adam_state, params)
        return optax.apply_updates(params, updates), (out.aux, adam_state)

    return step


def losses_step(weighting, adam, num_tasks):
    def step(params, state, x, y):
        weighting_state, adam_state = state
        losses, vjp = jax.vjp(lambda p: task_losses(p, x, y), params)
        weights, weighting_state = weighting.weights(
            None, weighting_state, num_tasks=num_tasks, task_losses=losses
        )
        (grads,) = vjp(weights.astype(losses.dtype))
        updates, adam_state = adam.update(grads, adam_state, params)
        return optax.apply_updates(params, updates), (weighting_state, adam_state)

    return step


def compile_step(step, *args):
    """The compiled step (arguments passed, never closed over) and XLA's FLOP count."""
    compiled = jax.jit(step).lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return compiled, float(analysis.get("flops", float("nan")))


# ----------------------------------------------------------------------------- torchjd


def torch_candidates(num_tasks: int, methods: list[str]) -> dict[str, Callable[[], None]]:
    """Steps of the same model in PyTorch: plain, and each method through torchjd."""
    import torch
    from torch import nn
    from torchjd import aggregation as A
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(SIZES[0], SIZES[1]), nn.ReLU(), nn.Linear(SIZES[1], SIZES[2]), nn.ReLU()
    )
    heads = nn.ModuleList([nn.Linear(SIZES[2], CLASSES) for _ in range(num_tasks)])
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    x = torch.randn(BATCH, SIZES[0])
    y = torch.randint(0, CLASSES, (BATCH, num_tasks))
    criterion = nn.CrossEntropyLoss()

    def forward():
        features = trunk(x)
        losses = [criterion(head(features), y[:, k]) for k, head in enumerate(heads)]
        return features, losses

    def plain():
        optimizer.zero_grad()
        _, losses = forward()
        torch.stack(losses).sum().backward()
        optimizer.step()

    aggregators = {
        "mean": lambda: (A.Mean(), A.MeanWeighting()),
        "mgda": lambda: (A.MGDA(), A.MGDAWeighting()),
        "pcgrad": lambda: (A.PCGrad(), A.PCGradWeighting()),
        "upgrad": lambda: (A.UPGrad(), A.UPGradWeighting()),
        "cagrad": lambda: (A.CAGrad(c=0.4), A.CAGradWeighting(c=0.4)),
        "dualproj": lambda: (A.DualProj(), A.DualProjWeighting()),
        "imtl_g": lambda: (A.IMTLG(), A.IMTLGWeighting()),
        "aligned_mtl": lambda: (A.AlignedMTL(), A.AlignedMTLWeighting()),
        "nash_mtl": lambda: (A.NashMTL(n_tasks=num_tasks), None),
        "fairgrad": lambda: (A.FairGrad(alpha=1.0), A.FairGradWeighting(alpha=1.0)),
        "gradvac": lambda: (A.GradVac(), A.GradVacWeighting()),
        "graddrop": lambda: (A.GradDrop(), None),
        "rlw": lambda: (A.Random(), A.RandomWeighting()),
    }
    # The autogram engine hooks every forward of the modules it watches: it gets its own copy.
    gram_trunk = copy.deepcopy(trunk)
    gram_heads = copy.deepcopy(heads)
    gram_optimizer = torch.optim.Adam(
        [*gram_trunk.parameters(), *gram_heads.parameters()], lr=LEARNING_RATE
    )
    engine = Engine(gram_trunk, batch_dim=None)
    shared_params = list(trunk.parameters())
    candidates: dict[str, Callable[[], None]] = {"plain": plain}
    for name in methods:
        if name not in aggregators:
            continue
        try:
            aggregator, weighting = aggregators[name]()
        except (ImportError, TypeError) as error:  # a missing optional solver
            print(f"torchjd {name}: skipped ({error})")
            continue

        def autojac(aggregator=aggregator):
            optimizer.zero_grad()
            features, losses = forward()
            mtl_backward(losses, features)
            jac_to_grad(shared_params, aggregator)
            optimizer.step()

        candidates[f"{name}/autojac"] = autojac
        if weighting is not None:

            def autogram(weighting=weighting):
                gram_optimizer.zero_grad()
                features = gram_trunk(x)
                losses = [criterion(h(features), y[:, k]) for k, h in enumerate(gram_heads)]
                stacked = torch.stack(losses)
                gramian = engine.compute_gramian(stacked)
                stacked.backward(weighting(gramian))
                gram_optimizer.step()

            candidates[f"{name}/autogram"] = autogram
    return candidates


# ----------------------------------------------------------------------------- timing


def interleaved_medians(
    candidates: dict[str, Callable[[], Any]], rounds: int, repeats: int
) -> dict[str, list[float]]:
    """Per-round median seconds of each candidate, the candidates interleaved round by round."""
    for fn in candidates.values():  # warm-up
        fn()
        fn()
    per_round: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            # One untimed call first: the switch from the previous candidate (another
            # framework's thread pool still spinning, cold caches) must not be timed.
            fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(times))
    return per_round


def ratio(per_round: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(per_round[name], per_round[base], strict=True))


def measure(
    num_tasks: int, methods: list[str], rounds: int, repeats: int, torch: bool
) -> list[dict]:
    kp, kx, ky = jax.random.split(jax.random.key(num_tasks), 3)
    params = init_params(kp, num_tasks)
    x = jax.random.normal(kx, (BATCH, SIZES[0]))
    y = jax.random.randint(ky, (BATCH, num_tasks), 0, CLASSES)
    adam = optax.adam(LEARNING_RATE)

    compiled: dict[str, tuple[Any, tuple, float]] = {}
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32 scalars
        adam_state = adam.init(params)
        fn, flops = compile_step(plain_step(adam), params, adam_state, x, y)
        compiled["plain"] = (fn, (params, adam_state, x, y), flops)
        for name in methods:
            make_tx, make_weighting = METHODS[name]
            tx = optax.chain(make_tx(num_tasks), adam)
            state = tx.init(params)
            fn, flops = compile_step(jacobian_step(tx), params, state, x, y)
            compiled[f"{name}/jacobian"] = (fn, (params, state, x, y), flops)
            if make_weighting is None:
                continue
            weighting = make_weighting(num_tasks)
            state = (weighting.init(), adam_state)
            if weighting.needs_gramian:
                fn, flops = compile_step(gramian_step(weighting, adam), params, state, x, y)
                compiled[f"{name}/gramian"] = (fn, (params, state, x, y), flops)
            else:
                step = losses_step(weighting, adam, num_tasks)
                fn, flops = compile_step(step, params, state, x, y)
                compiled[f"{name}/losses"] = (fn, (params, state, x, y), flops)

    def runner(fn, args):
        return lambda: jax.block_until_ready(fn(*args))

    candidates = {name: runner(fn, args) for name, (fn, args, _) in compiled.items()}
    torch_names: set[str] = set()
    if torch:
        for name, fn in torch_candidates(num_tasks, methods).items():
            candidates[f"torch:{name}"] = fn
            torch_names.add(f"torch:{name}")
    per_round = interleaved_medians(candidates, rounds, repeats)

    def ms(name: str) -> float:
        return statistics.median(per_round[name]) * 1e3

    base_flops = compiled["plain"][2]
    rows = [
        {
            "K": num_tasks,
            "method": "plain (sum)",
            "ms": ms("plain"),
            "jacobian": 1.0,
            "torch ms": ms("torch:plain") if torch else None,
        }
    ]
    for name in methods:
        row: dict[str, Any] = {"K": num_tasks, "method": name}
        ours = {}
        for path in ("jacobian", "gramian", "losses"):
            key = f"{name}/{path}"
            if key in per_round:
                row[path] = ratio(per_round, key, "plain")
                row[f"flops {path}"] = compiled[key][2] / base_flops
                ours[path] = ms(key)
        best_path = min(ours, key=ours.get)
        row["ms"] = ours[best_path]
        row["best"] = best_path
        peers = {p: f"torch:{name}/{p}" for p in ("autojac", "autogram")}
        peers = {p: key for p, key in peers.items() if key in torch_names}
        for path, key in peers.items():
            row[f"torchjd {path}"] = ratio(per_round, key, "torch:plain")
        if peers:
            best_peer = min(peers.values(), key=ms)
            row["torch ms"] = ms(best_peer)
            row["speedup"] = ms(best_peer) / row["ms"]
        rows.append(row)
    return rows


COLUMNS = [
    "K",
    "method",
    "ms",
    "jacobian",
    "gramian",
    "losses",
    "flops jacobian",
    "flops gramian",
    "torch ms",
    "torchjd autojac",
    "torchjd autogram",
    "speedup",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true", help="skip the torchjd peers")
    add_output_options(parser)
    args = parser.parse_args()
    torch = not args.no_torch
    if torch:
        try:
            import torchjd  # noqa: F401
        except ImportError:
            print("torchjd not installed (pip install -e '.[peers]'): jaxmtl only")
            torch = False
    rows = []
    for k in args.tasks:
        rows += measure(k, args.methods, args.rounds, args.repeats, torch)
        print(format_table([r for r in rows if r["K"] == k], COLUMNS), flush=True)
    print()
    print(format_table(rows, COLUMNS))
    path = write_json(
        "transforms",
        rows,
        args,
        batch=BATCH,
        sizes=SIZES,
        threads=THREADS,
        rounds=args.rounds,
        repeats=args.repeats,
        ratios="median over rounds of (method step / plain step of the same framework)",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
