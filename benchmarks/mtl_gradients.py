"""Per-task gradients: ``jaxmtl.mtl.task_gradients`` vs K separate ``jax.grad`` vs ``jax.jacrev``.

An MLP trunk 784-256-256 with K linear 10-way heads, batch 256. Every time is a ratio to one
``jax.grad`` of the summed loss measured in the same run, beside the same ratio of FLOPs as
XLA counts them. The nominal floor for materialising K per-task gradients is one forward plus
K backwards, each backward about two forwards: (1 + 2K) / 3 gradient-equivalents; the real
count is lower because the first layer needs no input gradient.

    python -m benchmarks.mtl_gradients [--tasks 2 4 8 16] [--repeats 20] [--out PATH | --overwrite]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    add_output_options,
    counted_flops,
    format_table,
    time_interleaved,
    write_json,
)
from jaxmtl import mtl

SIZES = (784, 256, 256)
CLASSES = 10
BATCH = 256


def init_params(key: jax.Array, num_tasks: int) -> dict:
    keys = jax.random.split(key, len(SIZES))
    trunk = [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, SIZES[:-1], SIZES[1:], strict=False)
    ]
    heads = {
        "w": jax.random.normal(keys[-1], (num_tasks, SIZES[-1], CLASSES)) / np.sqrt(SIZES[-1]),
        "b": jnp.zeros((num_tasks, CLASSES)),
    }
    return {"trunk": trunk, "heads": heads}


def encode(trunk: list, x: jax.Array) -> jax.Array:
    for layer in trunk:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x


def losses_from_features(heads: dict, z: jax.Array, labels: jax.Array) -> jax.Array:
    logits = jnp.einsum("nd,kdc->knc", z, heads["w"]) + heads["b"][:, None, :]
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels.T[..., None], axis=-1)[..., 0].mean(axis=1)


def task_losses(params: dict, x: jax.Array, labels: jax.Array) -> jax.Array:
    return losses_from_features(params["heads"], encode(params["trunk"], x), labels)


def is_shared(path) -> bool:
    return path[0].key == "trunk"


def measure(num_tasks: int, repeats: int) -> list[dict]:
    kp, kx, ky = jax.random.split(jax.random.key(num_tasks), 3)
    params = init_params(kp, num_tasks)
    x = jax.random.normal(kx, (BATCH, SIZES[0]))
    labels = jax.random.randint(ky, (BATCH, num_tasks), 0, CLASSES)

    summed_grad = jax.jit(jax.grad(lambda p, x, y: task_losses(p, x, y).sum()))
    one_task_grad = jax.jit(lambda p, x, y, t: jax.grad(lambda q: task_losses(q, x, y)[t])(p))
    per_task = jax.jit(lambda p, x, y: mtl.task_gradients(task_losses, p, x, y))
    per_task_heads = jax.jit(
        lambda p, x, y: mtl.task_gradients(task_losses, p, x, y, shared=is_shared)
    )
    representation = jax.jit(
        lambda p, x, y: mtl.representation_gradients(
            encode, losses_from_features, p["trunk"], p["heads"], x, y
        )
    )
    jacrev = jax.jit(jax.jacrev(task_losses))

    def separate(p, x, y):
        return [one_task_grad(p, x, y, t) for t in range(num_tasks)]

    args = (params, x, labels)
    base_flops = counted_flops(summed_grad, *args)
    candidates = {
        "task_gradients": (per_task, counted_flops(per_task, *args)),
        "task_gradients, heads unshared": (per_task_heads, counted_flops(per_task_heads, *args)),
        "representation_gradients": (representation, counted_flops(representation, *args)),
        "K x jax.grad": (separate, num_tasks * counted_flops(one_task_grad, *args, 0)),
        "jax.jacrev": (jacrev, counted_flops(jacrev, *args)),
    }
    floor = (1 + 2 * num_tasks) / 3
    fns = {"jax.grad(sum)": summed_grad, **{name: fn for name, (fn, _) in candidates.items()}}
    timed = time_interleaved(fns, *args, rounds=repeats)
    base = timed["jax.grad(sum)"]
    rows = [
        {"K": num_tasks, "method": "jax.grad(sum)", "ms": base * 1e3, "ratio": 1.0, "flops": 1.0}
    ]
    for name, (_, flops) in candidates.items():
        seconds = timed[name]
        rows.append(
            {
                "K": num_tasks,
                "method": name,
                "ms": seconds * 1e3,
                "ratio": seconds / base,
                "flops": flops / base_flops,
                "floor": floor,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    add_output_options(parser)
    args = parser.parse_args()
    rows = [row for k in args.tasks for row in measure(k, args.repeats)]
    print(format_table(rows, ["K", "method", "ms", "ratio", "flops", "floor"]))
    path = write_json("mtl_gradients", rows, args, batch=BATCH, sizes=SIZES)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
