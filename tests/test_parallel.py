"""jaxmtl.parallel on the 8 CPU devices of tests/conftest.py (and two local processes).

Every sharded run is compared with the same run on one device: a shared MLP trunk with K = 4
linear heads, Adam, several aggregators, one and ten steps, meshes (8,), (4, 2), (2, 4) as
(data, task). Each (method, mesh, path) run is compiled once and shared by the one-step and
the ten-step checks.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxmtl import mtl, parallel
from jaxmtl import train as jtrain
from jaxmtl import transforms as jtx

K = 4
BATCH = 16
STEPS = 10
MESHES = {"8": "data=8", "4x2": "data=4,task=2", "2x4": "data=2,task=4"}
ROOT = Path(__file__).resolve().parents[1]
# Largest |sharded - one device| seen per check; printed by test_report (pytest -s).
OBSERVED: dict[str, float] = {}


# --------------------------------------------------------------------------- the problem


def _is_trunk(path) -> bool:
    return path[0].key == "trunk"


def task_losses(params, batch):
    """(K,) mean squared errors of K linear heads on a shared two-layer tanh trunk."""
    h = jnp.tanh(batch["x"] @ params["trunk"]["w1"] + params["trunk"]["b1"])
    z = jnp.tanh(h @ params["trunk"]["w2"])
    preds = jnp.stack([z @ head["w"] + head["b"] for head in params["heads"]], axis=1)
    return jnp.mean((preds - batch["y"]) ** 2, axis=0)


def init_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
    return {
        "trunk": {"w1": normal(6, 16), "b1": jnp.zeros(16, jnp.float32), "w2": normal(16, 8)},
        "heads": [{"w": normal(8), "b": jnp.zeros((), jnp.float32)} for _ in range(K)],
    }


@functools.cache
def dataset():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(STEPS * BATCH, 6)).astype(np.float32)
    # Targets pulling the shared trunk apart: conflicting task gradients.
    mix = rng.normal(size=(6, K)).astype(np.float32)
    mix[:, 1] = -mix[:, 0] + 0.3 * mix[:, 1]
    y = np.tanh(x @ mix) + 0.1 * rng.normal(size=(STEPS * BATCH, K)).astype(np.float32)
    return {"x": x, "y": y.astype(np.float32)}


def batch_at(step: int):
    return {k: v[step * BATCH : (step + 1) * BATCH] for k, v in dataset().items()}


METHODS = ("mean", "pcgrad", "upgrad", "mgda", "cagrad", "fmtl")


def optimizer(method: str) -> optax.GradientTransformation:
    if method == "fmtl":
        head = jtx.flat_mtl(jtx.upgrad(), rho=0.05, shared=_is_trunk)
    elif method == "pcgrad":
        head = jtx.pcgrad(seed=3, shared=_is_trunk)  # the same key in every run
    else:
        head = getattr(jtx, method)(shared=_is_trunk)
    return optax.chain(head, optax.adam(1e-2))


def make_step(method: str, grads_fn):
    """``step(state, batch)``; ``grads_fn(params, batch, shared) -> (losses, grads)``."""
    tx = optimizer(method)

    def step(state, batch):
        if method == "fmtl":
            losses, grads = grads_fn(state.params, batch, None)
            extra = {"task_grad_fn": lambda p: grads_fn(p, batch, None)[1]}
        else:
            losses, grads = grads_fn(state.params, batch, _is_trunk)
            extra = {}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), losses

    return step


def _one_device_grads(params, batch, shared):
    return mtl.task_gradients(task_losses, params, batch, shared=shared)


def _init_state(method: str):
    return jtrain.init_state(init_params(), optimizer(method), seed=0)


@functools.cache
def trajectory(method: str, mesh_name: str | None, path: str):
    """(state after 1 step, state after STEPS steps) as NumPy, on one device or a mesh.

    ``path``: ``"gspmd"``, the one-device step jitted with a data-sharded batch (XLA
    partitions it); ``"shard_map"``, per-task gradients from ``parallel.task_gradients``.
    """
    with jax.numpy_dtype_promotion("standard"):  # optax.adam: Python float ** int32
        state = _init_state(method)
        if mesh_name is None:
            run = jax.jit(make_step(method, _one_device_grads))
            place = lambda b: b
        else:
            mesh = parallel.make_mesh(MESHES[mesh_name])
            if path == "shard_map":
                grads_fn = lambda p, b, shared: parallel.task_gradients(
                    task_losses, p, b, mesh=mesh, shared=shared
                )
            else:
                grads_fn = _one_device_grads
            run = parallel.shard_step(make_step(method, grads_fn), mesh)
            place = lambda b: parallel.shard_batch(b, mesh)
            state = parallel.replicate(state, mesh)
        out = []
        for i in range(STEPS):
            state, _ = run(state, place(batch_at(i)))
            if i in (0, STEPS - 1):
                out.append(jax.device_get(jax.tree.map(_host, state)))
    return tuple(out)


def _host(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _max_diff(a, b) -> float:
    diffs = [
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(diffs)


def _close(got, want, *, atol: float, label: str) -> None:
    got_leaves = jax.tree.leaves(got)
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    OBSERVED[label] = _max_diff(got, want)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol, err_msg=label)


# --------------------------------------------------------------------------- agreement


CASES = [
    (method, mesh, path)
    for method in METHODS
    for mesh in MESHES
    for path in ("gspmd", "shard_map")
    # The plain jit path on the data-only mesh; task-parallel gradients on all three.
    if path == "shard_map" or mesh == "8"
]


@pytest.mark.parametrize(("method", "mesh", "path"), CASES)
def test_sharded_step_matches_one_device(method, mesh, path):
    """One step and ten steps: the parameters, optimizer state (PCGrad's key too) and step
    agree with the one-device run to float32 tolerance."""
    want_1, want_10 = trajectory(method, None, "one")
    got_1, got_10 = trajectory(method, mesh, path)
    label = f"{method}/{mesh}/{path}"
    _close(got_1.params, want_1.params, atol=1e-6, label=f"{label}/1 step")
    _close(got_10.params, want_10.params, atol=2e-5, label=f"{label}/{STEPS} steps")
    # Optimizer state: Adam moments, aggregator keys (exact), counters.
    _close(got_10.opt_state, want_10.opt_state, atol=1e-5, label=f"{label}/opt_state")
    assert int(got_10.step) == STEPS
    if method == "pcgrad":
        keys = lambda s: [x for x in jax.tree.leaves(s.opt_state) if x.dtype == np.uint32]
        assert keys(got_10) and all(
            np.array_equal(a, b) for a, b in zip(keys(got_10), keys(want_10), strict=True)
        )


def test_task_gradients_match_one_device_and_are_replicated():
    mesh = parallel.make_mesh("data=2,task=4")
    params, batch = init_params(), batch_at(0)
    want_losses, want = mtl.task_gradients(task_losses, params, batch, shared=_is_trunk)
    fn = jax.jit(
        lambda p, b: parallel.task_gradients(task_losses, p, b, mesh=mesh, shared=_is_trunk)
    )
    losses, got = fn(parallel.replicate(params, mesh), parallel.shard_batch(batch, mesh))
    assert got["trunk"]["w1"].shape == (K, 6, 16) and got["heads"][0]["w"].shape == (8,)
    for leaf in jax.tree.leaves((losses, got)):
        assert leaf.sharding.is_fully_replicated
    _close(losses, want_losses, atol=1e-6, label="task_gradients/losses")
    _close(got, want, atol=1e-6, label="task_gradients/grads")


def _per_shard_aggregate(tx, mesh):
    """The WRONG method: aggregate each shard's task gradients, then average the updates."""

    def local(params, state, batch):
        _, grads = mtl.task_gradients(task_losses, params, batch, shared=_is_trunk)
        updates, _ = tx.update(grads, state, params)
        return jax.lax.pmean(updates, "data")

    return jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P(), check_vma=False
        )
    )


@pytest.mark.parametrize("method", ["pcgrad", "upgrad"])
def test_gradients_are_averaged_before_aggregation(method):
    """Each task's gradient is the mean over all shards before aggregation: the sharded
    update equals the one-device one (the agreement tests above check it through whole
    steps), which differs from aggregating per shard and averaging, so those could fail."""
    mesh = parallel.make_mesh("data=8")
    tx = getattr(jtx, method)(shared=_is_trunk)
    params, batch = init_params(), batch_at(0)
    state = tx.init(params)

    def aggregated(grads_fn):
        def fn(params, state, batch):
            _, grads = grads_fn(params, batch)
            return tx.update(grads, state, params)[0]

        return fn

    one = jax.jit(aggregated(lambda p, b: _one_device_grads(p, b, _is_trunk)))
    want = one(params, state, batch)
    placed = parallel.replicate((params, state), mesh)
    wrong = _per_shard_aggregate(tx, mesh)(*placed, parallel.shard_batch(batch, mesh))
    gap = _max_diff(wrong["trunk"], want["trunk"])
    scale = float(np.max(np.abs(np.asarray(want["trunk"]["w1"]))))
    OBSERVED[f"per-shard aggregation gap/{method}"] = gap
    assert gap > 1e-2 * scale, f"{method}: per-shard aggregation should differ, gap {gap}"


# --------------------------------------------------------------------------- meshes and errors


def test_make_mesh_forms():
    assert dict(parallel.make_mesh().shape) == {"data": 1}
    assert dict(parallel.make_mesh("").shape) == {"data": 1}
    mesh = parallel.make_mesh("data=4,task=2")
    assert mesh.axis_names == ("data", "task") and dict(mesh.shape) == {"data": 4, "task": 2}
    assert dict(parallel.make_mesh({"task": 2, "data": -1}).shape) == {"task": 2, "data": 4}
    assert parallel.make_mesh(mesh) is mesh
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("data=16", r"need 16 devices, got 8"),
        ("data4", r"'name=size'"),
        ("data=2,data=2", r"named twice"),
        ("data=0", r"'data' size must be >= 1"),
        ("data=-1,task=-1", r"at most one"),
        ("data=-1,task=3", r"do not split"),
    ],
)
def test_make_mesh_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(spec)


def test_bad_batch_size_is_named():
    mesh = parallel.make_mesh("data=8")
    batch = {"x": np.zeros((12, 6), np.float32), "y": np.zeros((12, K), np.float32)}
    with pytest.raises(ValueError, match=r"batch\['x'\].*'data' axis size 8, got batch size 12"):
        parallel.shard_batch(batch, mesh)
    with pytest.raises(ValueError, match=r"batch\['x'\].*'data' axis size 8, got batch size 12"):
        parallel.task_gradients(task_losses, init_params(), batch, mesh=mesh)


def test_tasks_not_divisible_by_task_axis():
    mesh = parallel.make_mesh("data=2,task=4")
    three = lambda p, b: task_losses(p, b)[:3]
    with pytest.raises(ValueError, match=r"'task' axis size 4, got K=3"):
        parallel.task_gradients(three, init_params(), batch_at(0), mesh=mesh)


def test_fit_with_mesh():
    """``fit(mesh=...)`` shards each batch, replicates the state, and matches one device."""
    pytest.importorskip("jaxmtl.data")
    step = make_step("mean", _one_device_grads)

    def metric_step(state, batch):
        state, losses = step(state, batch)
        return state, {"loss": jnp.sum(losses)}

    data = dataset()
    runs = {}
    with jax.numpy_dtype_promotion("standard"):
        for name, mesh in (("one", None), ("mesh", parallel.make_mesh("data=4,task=2"))):
            state, history = jtrain.fit(
                _init_state("mean"),
                metric_step,
                data,
                steps=3,
                batch_size=BATCH,
                mesh=mesh,
                progress=False,
            )
            runs[name] = (state, history)
        assert runs["mesh"][0].params["trunk"]["w1"].sharding.is_fully_replicated
        _close(runs["mesh"][0].params, runs["one"][0].params, atol=1e-6, label="fit/params")
        np.testing.assert_allclose(
            runs["mesh"][1][-1]["loss"], runs["one"][1][-1]["loss"], rtol=1e-5
        )
        with pytest.raises(ValueError, match=r"batch_size=10.*'data' axis size 4"):
            jtrain.fit(
                _init_state("mean"),
                metric_step,
                data,
                steps=1,
                batch_size=10,
                mesh=parallel.make_mesh("data=4,task=2"),
                progress=False,
            )


# --------------------------------------------------------------------------- two processes


def worker(coordinator: str, num_processes: int, process_id: int, out: str) -> None:
    """One process of the two-process test: UPGrad + Adam on a global (data=2, task=2) mesh,
    with task-parallel gradients; writes the replicated parameters to ``out`` (.npz)."""
    parallel.initialize(coordinator, num_processes, process_id, initialization_timeout=60)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    assert jax.process_count() == num_processes and len(jax.devices()) == 2 * num_processes
    mesh = parallel.make_mesh("data=2,task=2")
    with jax.numpy_dtype_promotion("standard"):
        grads_fn = lambda p, b, shared: parallel.task_gradients(
            task_losses, p, b, mesh=mesh, shared=shared
        )
        run = parallel.shard_step(make_step("upgrad", grads_fn), mesh)
        state = parallel.replicate(_init_state("upgrad"), mesh)
        for i in range(3):
            state, losses = run(state, parallel.shard_batch(batch_at(i), mesh))
    leaves = jax.tree.leaves(state.params)
    np.savez(out, *[np.asarray(x) for x in leaves])
    print(f"process {process_id}: devices {len(jax.devices())}, losses {np.asarray(losses)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(ROOT),
    }
    procs = []
    for pid in range(2):
        code = (
            "from tests.test_parallel import worker; "
            f"worker({coordinator!r}, 2, {pid}, {str(tmp_path / f'p{pid}.npz')!r})"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for pid, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {pid} failed:\n{text[-4000:]}"
        print(text.strip().splitlines()[-1])
    with jax.numpy_dtype_promotion("standard"):
        state = _init_state("upgrad")
        run = jax.jit(make_step("upgrad", _one_device_grads))
        for i in range(3):
            state, _ = run(state, batch_at(i))
    want = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    got = [np.load(tmp_path / f"p{pid}.npz") for pid in range(2)]
    for pid in range(2):
        arrays = [got[pid][f"arr_{i}"] for i in range(len(want))]
        _close(arrays, want, atol=1e-6, label=f"two processes/process {pid}")
        for a, b in zip(arrays, [got[0][f"arr_{i}"] for i in range(len(want))], strict=True):
            np.testing.assert_array_equal(a, b)


def test_report():
    """Prints the largest differences observed (run with -s); runs last in this file."""
    for label, value in sorted(OBSERVED.items()):
        print(f"{label:45s} {value:.3g}")
