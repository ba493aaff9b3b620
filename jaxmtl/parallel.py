"""Device meshes and sharding for multi-task training: data-parallel and task-parallel.

Two mesh axes, by convention:

* ``data``: the batch is split over it (:func:`shard_batch`); every task's gradient is the
  mean over ALL shards *before* any aggregation. Aggregating per shard and averaging the
  aggregated updates is a different method (PCGrad, UPGrad, MGDA, ... are not linear in the
  gradients) and is never done here.
* ``task``: the per-task gradients (the Jacobian rows) are split over it
  (:func:`task_gradients` under ``jax.shard_map``): each device runs the backward pass of
  its own K / T tasks, then the rows are all-gathered, so that the Gramian ``J J^T`` and any
  ``jaxmtl.transforms`` aggregator run unchanged on the full Jacobian.

Parameters and optimizer state are replicated (:func:`replicate`). The simplest
data-parallel step needs nothing from this module but placement: ``jax.jit`` of an ordinary
multi-task step, given a batch sharded over ``data`` and a replicated state, computes the
global-batch gradients (XLA inserts the all-reduce); :func:`shard_step` jits it with those
shardings, and ``jaxmtl.train.fit(..., mesh=...)`` does the placement for every batch.

Multi-host: call :func:`initialize` in every process before anything else touches JAX,
then build the mesh over ``jax.devices()`` (all processes' devices); every process feeds the
same global batch and :func:`shard_batch` keeps the shards its own devices hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmtl.mtl import shared_mask
from jaxmtl.mtl.gradients import _merge, _partition  # the split into shared / specific

PyTree = Any
MeshSpec = None | str | Mapping[str, int] | Mesh

__all__ = [
    "batch_sharding",
    "initialize",
    "make_mesh",
    "parse_mesh",
    "replicate",
    "replicated",
    "shard_batch",
    "shard_step",
    "task_gradients",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------- meshes


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """The ``{axis name: size}`` of a mesh description, in order.

    ``spec`` is a string ``"data=4,task=2"`` (the ``--mesh`` command-line form), a mapping
    ``{"data": 4, "task": 2}``, or ``None`` / ``""`` (one device: ``{"data": 1}``). One size
    may be ``-1``: whatever the others leave of the devices (see :func:`make_mesh`).

    >>> parse_mesh("data=4, task=2")
    {'data': 4, 'task': 2}
    >>> parse_mesh(None)
    {'data': 1}
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {"data": 1}
    if isinstance(spec, str):
        axes: dict[str, int] = {}
        for part in spec.split(","):
            name, sep, size = part.partition("=")
            name, size = name.strip(), size.strip()
            if not sep or not re.fullmatch(r"-?\d+", size):
                raise ValueError(
                    f"mesh: expected comma-separated 'name=size' entries like 'data=4,task=2', "
                    f"got {spec!r} (entry {part.strip()!r})"
                )
            if name in axes:
                raise ValueError(f"mesh: axis {name!r} named twice in {spec!r}")
            axes[name] = int(size)
    elif isinstance(spec, Mapping):
        axes = dict(spec)
    else:
        raise TypeError(
            f"mesh: expected a 'name=size,...' string, a dict or None, got {type(spec).__name__}"
        )
    if not axes:
        raise ValueError(f"mesh: expected at least one axis, got {spec!r}")
    for name, size in axes.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"mesh: axis names must be identifiers, got {name!r} in {spec!r}")
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"mesh: axis {name!r} size must be an int, got {size!r}")
        if size < 1 and size != -1:
            raise ValueError(f"mesh: axis {name!r} size must be >= 1 or -1, got {size}")
    if sum(size == -1 for size in axes.values()) > 1:
        raise ValueError(f"mesh: at most one axis size may be -1, got {spec!r}")
    return {name: int(size) for name, size in axes.items()}


def make_mesh(
    spec: MeshSpec = None,
    *,
    devices: list | None = None,
    axis_types: tuple[AxisType, ...] | None = None,
) -> Mesh:
    """A ``jax.sharding.Mesh`` from a description (``"data=4,task=2"``, a dict, or ``None``).

    Built with ``jax.make_mesh`` over ``devices`` (default ``jax.devices()``: in a multi-host
    run, every process's devices), taking the first ``prod(sizes)`` of them; a ``-1`` size
    takes all that the other axes leave. ``None`` / ``""`` gives a one-device mesh
    ``{"data": 1}``. The axes are ``AxisType.Auto`` unless ``axis_types`` says otherwise:
    XLA propagates the shardings through code that was written for one device (explicit
    axes would type every intermediate's sharding). A ``Mesh`` is returned as is.

    >>> mesh = make_mesh()
    >>> dict(mesh.shape)
    {'data': 1}
    """
    if isinstance(spec, Mesh):
        return spec
    axes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    known = int(np.prod([s for s in axes.values() if s != -1]))
    if -1 in axes.values():
        if len(devices) % known:
            raise ValueError(
                f"mesh: the {len(devices)} devices do not split into axes {axes} "
                f"(the others' product {known} must divide the device count)"
            )
        axes = {name: len(devices) // known if s == -1 else s for name, s in axes.items()}
    size = int(np.prod(list(axes.values())))
    if size > len(devices):
        raise ValueError(
            f"mesh: axes {axes} need {size} devices, got {len(devices)} "
            f"({devices[0].platform if devices else 'none'})"
        )
    if axis_types is None:
        axis_types = (AxisType.Auto,) * len(axes)
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), axis_types=axis_types, devices=devices[:size]
    )


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    return 1 if axis is None or axis not in mesh.axis_names else int(mesh.shape[axis])


def _present(mesh: Mesh, axis: str | None) -> str | None:
    return axis if axis is not None and axis in mesh.axis_names else None


# --------------------------------------------------------------------------- placement


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that holds a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
    """The sharding that splits the leading (batch) axis over ``data_axis`` (replicated over
    the other axes; fully replicated if ``mesh`` has no such axis)."""
    return NamedSharding(mesh, P(_present(mesh, data_axis)))


def _to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` placed with ``sharding``; in a multi-process run, from the host value (which
    must be the same in every process)."""
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _to_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of ``tree`` (parameters, optimizer state, a ``TrainState``) copied to
    every device of ``mesh``. Non-array leaves (Python numbers, ``None``) are left as they are.
    In a multi-process run every process must pass the same values.
    """
    sharding = replicated(mesh)

    def place(x):
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            return _to_global(x, sharding)
        return x

    return jax.tree.map(place, tree)


def _check_batch(batch: PyTree, mesh: Mesh, data_axis: str | None, name: str) -> None:
    size = _axis_size(mesh, data_axis)
    with_paths = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not with_paths:
        raise ValueError(f"{name}: expected a pytree of arrays, got no leaves")
    for path, leaf in with_paths:
        shape = np.shape(leaf)
        where = f"{name}{jax.tree_util.keystr(path)}"
        if not shape:
            raise ValueError(f"{where}: expected an array with a leading batch axis, got a scalar")
        if shape[0] % size:
            raise ValueError(
                f"{where}: the batch size must be divisible by the mesh's {data_axis!r} axis "
                f"size {size}, got batch size {shape[0]} (shape {shape})"
            )


def shard_batch(batch: PyTree, mesh: Mesh, *, data_axis: str = "data") -> PyTree:
    """Every leaf of ``batch`` split along its leading axis over ``data_axis`` of ``mesh``.

    Leaves are NumPy or JAX arrays of the global batch, the same in every process of a
    multi-host run: each device receives only its slice
    (``jax.make_array_from_callback``), so no process ever sends data to another.

    Raises:
      ValueError: a leaf's leading axis is not divisible by the ``data_axis`` size (the
        message names the leaf, the axis size and the batch size).

    >>> mesh = make_mesh()
    >>> x = shard_batch({"x": np.ones((4, 3), np.float32)}, mesh)["x"]
    >>> x.shape, x.sharding.spec
    ((4, 3), P('data',))
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    _check_batch(batch, mesh, _present(mesh, data_axis), "batch")
    sharding = batch_sharding(mesh, data_axis)

    def place(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, batch)


def shard_step(
    step_fn: Callable, mesh: Mesh, *, data_axis: str = "data", donate_state: bool = False
) -> Callable:
    """``jax.jit(step_fn)`` for ``step_fn(state, batch) -> (state, metrics)`` on ``mesh``:
    the state (first argument) replicated, the batch split over ``data_axis``, every output
    replicated.

    The step itself is the one-device code: XLA partitions it, so every reduction over the
    batch (the task losses' means, hence each task's gradient) is over the whole global batch
    before the aggregator sees the gradients. Pass arrays placed with :func:`replicate` and
    :func:`shard_batch` (required in a multi-host run).
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn: expected a callable, got {type(step_fn).__name__}")
    return jax.jit(
        step_fn,
        in_shardings=(replicated(mesh), batch_sharding(mesh, data_axis)),
        out_shardings=replicated(mesh),
        donate_argnums=(0,) if donate_state else (),
    )


# --------------------------------------------------------------------------- per-task gradients


def task_gradients(
    task_losses: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    mesh: Mesh,
    shared: Any = None,
    data_axis: str = "data",
    task_axis: str = "task",
) -> tuple[jax.Array, PyTree]:
    """Per-task gradients of ``task_losses(params, batch) -> (K,)`` on a mesh (``shard_map``).

    The sharded counterpart of ``jaxmtl.mtl.task_gradients`` with the same output: the K
    task losses and the Jacobian, a pytree shaped like ``params`` with a leading K axis on
    every shared leaf (task-specific leaves: the gradient of the summed loss). Every device
    holds the parameters and its ``data_axis`` shard of the batch:

    1. one forward pass of all K losses on the local shard;
    2. the VJP of only the K / T one-hot cotangents of the device's own tasks (``T`` the
       ``task_axis`` size), batched with ``vmap``; task-specific leaves: the VJP of the
       indicator of the own tasks;
    3. ``pmean`` over ``data_axis``: each task's gradient of the mean loss over the global
       batch (``task_losses`` must average over the batch, as mean losses do), before any
       aggregation;
    4. the rows all-gathered over ``task_axis`` (task-specific parts ``psum``-ed), so the
       result is replicated and any ``jaxmtl.transforms`` aggregator runs unchanged.

    Under ``jax.jit`` the result equals the one-device ``jaxmtl.mtl.task_gradients`` up to
    float rounding. A mesh without ``task_axis`` (or ``data_axis``) just skips that split.
    Works under ``jax.vmap`` (F-MTL's ``task_grad_fn``).

    Args:
      task_losses: ``(params, batch) -> (K,)``, each a mean over the batch.
      params: the parameters (replicated; see :func:`replicate`).
      batch: a pytree of arrays with a leading batch axis divisible by the ``data_axis``
        size (see :func:`shard_batch`).
      mesh: the device mesh.
      shared: which leaves are shared (``jaxmtl.mtl.shared_mask``).
      data_axis, task_axis: the mesh axis names.

    Raises:
      ValueError: the batch size is not divisible by the ``data_axis`` size, or K by the
        ``task_axis`` size (the messages name both values).

    >>> mesh = make_mesh()
    >>> f = lambda p, b: jnp.stack([jnp.mean(b["x"] @ p["w"]), jnp.mean((b["x"] @ p["w"]) ** 2)])
    >>> losses, g = task_gradients(f, {"w": jnp.ones(2)}, {"x": jnp.ones((4, 2))}, mesh=mesh)
    >>> g["w"].tolist()
    [[1.0, 1.0], [4.0, 4.0]]
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    data = _present(mesh, data_axis)
    tasks = _present(mesh, task_axis)
    num_shards = _axis_size(mesh, tasks)
    _check_batch(batch, mesh, data, "batch")
    mask = shared_mask(params, shared)
    axes = tuple(a for a in (data, tasks) if a is not None)

    def local(params, batch):
        # Every value is made varying over all the mesh axes up front, so that the VJP inserts
        # no implicit psum: the reductions below are the only cross-device ones.
        if tasks is not None:
            batch = jax.lax.pcast(batch, (tasks,), to="varying")
        if axes:
            params = jax.lax.pcast(params, axes, to="varying")
        shared_p, specific_p = _partition(params, mask)
        losses, vjp_fn = jax.vjp(
            lambda s, t: task_losses(_merge(s, t, mask), batch), shared_p, specific_p
        )
        if losses.ndim != 1:
            raise ValueError(
                f"task_losses: expected task losses of shape (K,), got shape {losses.shape}"
            )
        k = losses.shape[0]
        if k % num_shards:
            raise ValueError(
                f"task_losses: the number of tasks K must be divisible by the mesh's "
                f"{task_axis!r} axis size {num_shards}, got K={k}"
            )
        rows = jnp.eye(k, dtype=losses.dtype)
        if tasks is not None:
            own = k // num_shards
            start = jax.lax.axis_index(tasks) * own
            rows = jax.lax.dynamic_slice_in_dim(rows, start, own, axis=0)
        if data is not None:
            rows = jax.lax.pcast(rows, (data,), to="varying")
        indicator = jnp.sum(rows, axis=0)  # 1 at the device's own tasks
        shared_g = jax.vmap(lambda c: vjp_fn(c)[0])(rows)
        specific_g = vjp_fn(indicator)[1]
        losses = losses * indicator  # each task's loss from the devices that own it
        if data is not None:
            losses, shared_g, specific_g = jax.lax.pmean((losses, shared_g, specific_g), data)
        if tasks is not None:
            shared_g = jax.lax.all_gather(shared_g, tasks, axis=0, tiled=True, to="invarying")
            losses, specific_g = jax.lax.psum((losses, specific_g), tasks)
        return losses, _merge(shared_g, specific_g, mask)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(data)), out_specs=(P(), P()))(
        params, batch
    )


# --------------------------------------------------------------------------- multi-host


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_ids: list[int] | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> None:
    """Joins a multi-process (multi-host) run: ``jax.distributed.initialize``.

    Call it in every process, first, before anything creates arrays or lists devices. Then
    ``jax.devices()`` lists all processes' devices and :func:`make_mesh` spans them.

    Args:
      coordinator_address: ``"host:port"`` of process 0 (which starts the coordinator).
      num_processes: the number of processes.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: the local devices this process uses (default all).
      cpu_collectives: the cross-process collectives of the CPU backend, set as
        ``jax_cpu_collectives_implementation`` (``"gloo"``, also JAX 0.10's default, or
        ``"mpi"``); ``None`` leaves the option alone. Without it, CPU processes could not
        all-reduce across each other.
      initialization_timeout: seconds to wait for the other processes.
    """
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise ValueError(f"coordinator_address: expected 'host:port', got {coordinator_address!r}")
    checks = (("num_processes", num_processes, 1), ("process_id", process_id, 0))
    for name, value, minimum in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if process_id >= num_processes:
        raise ValueError(f"process_id: expected < num_processes={num_processes}, got {process_id}")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
