"""Checkpoints: the one small jaxmtl helper around ``orbax.checkpoint`` (0.12).

:class:`Checkpointer` wraps an ``orbax.checkpoint.CheckpointManager`` with the few choices
every jaxmtl run makes the same way:

* a preservation policy is always set (``LatestN(max_to_keep)``; orbax's default keeps every
  checkpoint);
* saves are asynchronous (written on background threads); the class is a context manager, and
  leaving it (or :meth:`Checkpointer.close`) waits for them, so the interpreter never exits
  with a save in flight;
* each step directory holds two items: ``state`` (the pytree, orbax ``StandardSave``) and
  ``metadata`` (JSON: the caller's metadata and the PRNG key implementations);
* typed PRNG keys (``jax.random.key``) cannot be serialized as such: they are stored as their
  raw ``uint32`` key data (``jax.random.key_data``) and wrapped back with the same
  implementation on restore (``jax.random.wrap_key_data``). Raw ``uint32`` keys
  (``jax.random.PRNGKey``) are ordinary arrays and round-trip unchanged;
* zero-size arrays (orbax refuses them; e.g. the placeholders that per-task transforms
  keep for task-specific leaves) are stored as ``None`` with their shape and dtype in the
  metadata, and come back as zeros of that shape and dtype (with the target's sharding);
  ``None`` and empty nodes (``optax.EmptyState``) round-trip as they are;
* :meth:`Checkpointer.restore` is strict: the target's tree structure, shapes and dtypes must
  equal the stored ones (orbax alone would silently cast dtypes), and a checkpoint that cannot
  be read raises :class:`CheckpointReadError` naming its path. Nothing is ever overwritten:
  saving a step that exists raises.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

__all__ = ["CheckpointReadError", "Checkpointer"]

_STATE = "state"
_METADATA = "metadata"


class CheckpointReadError(RuntimeError):
    """A checkpoint exists but cannot be read (missing or corrupted files)."""


def _leaf_name(path: tuple) -> str:
    """``"opt_state/0/mu/w"`` for a key path; the same string for a NamedTuple field and the
    dict key orbax gives it when restoring without a target."""
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _is_prng_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_empty_array(leaf: Any) -> bool:
    shape = getattr(leaf, "shape", None)
    return shape is not None and hasattr(leaf, "dtype") and 0 in tuple(shape)


def _zeros_like_record(record: Mapping[str, Any], like: Any = None) -> Any:
    """The zero-size array described by ``record`` (``{"shape", "dtype"}``); a NumPy array
    when ``like`` is one, else a jax.Array (on ``like``'s sharding when it has one)."""
    zeros = np.zeros(tuple(record["shape"]), jnp.dtype(record["dtype"]))
    if isinstance(like, np.ndarray | np.generic):
        return zeros
    sharding = getattr(like, "sharding", None)
    return jax.device_put(zeros, sharding) if sharding is not None else jax.device_put(zeros)


def _abstract(leaf: Any) -> Any:
    """Shape/dtype view of a target leaf: an array, a ``jax.ShapeDtypeStruct`` or a scalar."""
    if isinstance(leaf, jax.ShapeDtypeStruct | jax.Array | np.ndarray | np.generic):
        return leaf
    return np.asarray(leaf)


class Checkpointer:
    """Numbered checkpoints of a pytree in ``directory`` (orbax), at most ``max_to_keep`` kept.

    Args:
      directory: the checkpoint directory (created if absent); each step is a subdirectory
        named by its step number.
      max_to_keep: how many of the latest checkpoints to keep (older ones are deleted after a
        newer save completes); ``None`` keeps all.
      async_save: write on background threads (default); :meth:`wait` or leaving the context
        blocks until they are done.

    Use it as a context manager (or call :meth:`close`): pending asynchronous saves must
    finish before the interpreter exits.

    >>> import tempfile
    >>> params = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
    >>> with tempfile.TemporaryDirectory() as d, Checkpointer(d) as ckpt:
    ...     ckpt.save(10, params, metadata={"note": "demo"})
    ...     ckpt.wait()
    ...     restored = ckpt.restore(ckpt.latest_step(), params)
    ...     print(ckpt.latest_step(), restored["w"], ckpt.metadata(10))
    10 [0. 1. 2.] {'note': 'demo'}
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save=True
    ):
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        # Handlers named up front, so that a fresh manager can read metadata before any save.
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads; idempotent."""
        self._manager.close()

    def wait(self) -> None:
        """Blocks until every asynchronous save has been written (and old steps deleted)."""
        self._manager.wait_until_finished()

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """The steps with a finished checkpoint, ascending."""
        # No reload(): re-reading the directory while an asynchronous save is in flight
        # makes orbax lose track of the steps it is about to delete.
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The largest saved step, or ``None`` when the directory holds no checkpoint."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> Path:
        """The directory of checkpoint ``step``."""
        return self.directory / str(int(step))

    def set_aside(self, step: int) -> Path:
        """Moves checkpoint ``step`` (one that cannot be read, say) out of the way, to
        ``<directory>-unreadable/<step>-<time>``, where it is kept for inspection; returns
        that path. The step can then be saved again."""
        step = int(step)
        self._check_exists(step)
        self.wait()
        aside_dir = self.directory.with_name(self.directory.name + "-unreadable")
        aside_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = aside_dir / f"{step}-{stamp}"
        n = 0
        while target.exists():
            n += 1
            target = aside_dir / f"{step}-{stamp}-{n}"
        self.step_path(step).rename(target)
        self._manager.reload()
        return target

    # ------------------------------------------------------------------ save

    def save(self, step: int, pytree: PyTree, *, metadata: Mapping[str, Any] | None = None):
        """Starts writing ``pytree`` as checkpoint ``step`` (asynchronously by default).

        Args:
          step: a non-negative int not saved before (checkpoints are never overwritten).
          pytree: arrays (any dtype, bfloat16 and typed PRNG keys included), NumPy arrays,
            Python scalars, ``None`` and empty nodes, in dicts, lists, tuples, NamedTuples or
            registered dataclasses.
          metadata: a JSON-serializable dict stored beside the arrays (see :meth:`metadata`).

        The arrays are copied to host memory before the call returns (orbax's blocking part),
        so the caller may donate them to a jitted step while the files are written.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if step in self.all_steps() or self.step_path(step).exists():
            raise ValueError(
                f"a checkpoint for step {step} already exists at {self.step_path(step)}; "
                "checkpoints are never overwritten"
            )
        keys: dict[str, str] = {}
        empty: dict[str, dict[str, Any]] = {}

        def storable(path, leaf):
            if _is_prng_key(leaf):
                keys[_leaf_name(path)] = str(jax.random.key_impl(leaf))
                leaf = jax.random.key_data(leaf)
            if _is_empty_array(leaf):  # orbax cannot save zero-size arrays
                empty[_leaf_name(path)] = {
                    "shape": list(leaf.shape),
                    "dtype": np.dtype(leaf.dtype).name,
                }
                return None
            return leaf

        stored = jax.tree_util.tree_map_with_path(storable, pytree)
        record = {"user": dict(metadata or {}), "prng_keys": keys, "empty_arrays": empty}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(stored), _METADATA: ocp.args.JsonSave(record)}
            ),
            force=True,
        )
        if not saved:  # pragma: no cover - orbax declined; should not happen with force=True
            raise RuntimeError(f"orbax did not save step {step} in {self.directory}")

    # ------------------------------------------------------------------ restore

    def _read_record(self, step: int) -> dict:
        self._check_exists(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
            )
            record = restored[_METADATA]
            if not isinstance(record, dict) or not {"user", "prng_keys"} <= set(record):
                raise ValueError(f"unexpected metadata content {record!r}")
        except Exception as error:
            raise self._read_error(step, error) from error
        return record

    def _check_exists(self, step: int) -> None:
        steps = self.all_steps()
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} at {self.step_path(step)} "
                f"(saved steps in {self.directory}: {steps})"
            )

    def _read_error(self, step: int, error: Exception) -> CheckpointReadError:
        detail = f"{type(error).__name__}: {error}"
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        return CheckpointReadError(
            f"cannot read the checkpoint at {self.step_path(step)} (step {step}); it was left "
            f"untouched. Cause: {detail}"
        )

    def metadata(self, step: int) -> dict:
        """The ``metadata`` dict given to :meth:`save` for ``step`` (``{}`` if none)."""
        return dict(self._read_record(int(step))["user"])

    def restore(self, step: int, target: PyTree | None = None) -> PyTree:
        """Reads checkpoint ``step``.

        Args:
          step: a saved step (see :meth:`latest_step`).
          target: a pytree like the saved one (concrete arrays or ``jax.ShapeDtypeStruct``
            leaves). Its structure, shapes and dtypes must equal the stored ones, else
            ``ValueError`` naming the leaf; arrays come back with the target's sharding. With
            ``None``, the stored tree is returned as orbax rebuilds it (dicts and lists in place
            of NamedTuples and custom nodes); typed PRNG keys are rewrapped either way.

        Raises:
          FileNotFoundError: no checkpoint for ``step``.
          CheckpointReadError: the checkpoint exists but cannot be read.
          ValueError: ``target`` does not match the stored tree.
        """
        step = int(step)
        record = self._read_record(step)
        keys: dict[str, str] = record["prng_keys"]
        empty: dict[str, dict] = record.get("empty_arrays", {})  # absent before jaxmtl 0.2
        try:
            stored_tree = self._manager.item_metadata(step)[_STATE].tree
        except Exception as error:
            raise self._read_error(step, error) from error
        if target is None:
            args = ocp.args.StandardRestore()
        else:
            abstract = self._abstract_target(step, target, stored_tree, keys, empty)
            args = ocp.args.StandardRestore(abstract)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))
            tree = restored[_STATE]
        except Exception as error:
            raise self._read_error(step, error) from error
        tree = _fill_empty_arrays(tree, target, empty)

        def rewrap(path, leaf):
            impl = keys.get(_leaf_name(path))
            return leaf if impl is None else jax.random.wrap_key_data(leaf, impl=impl)

        return jax.tree_util.tree_map_with_path(rewrap, tree)

    def _abstract_target(
        self, step: int, target, stored_tree, keys: dict[str, str], empty: dict[str, dict]
    ) -> PyTree:
        """The restore target with typed keys replaced by their key data and zero-size arrays
        by ``None`` (as saved), checked leaf by leaf against the stored metadata."""
        where = f"checkpoint {self.step_path(step)}"
        # None and empty nodes (optax's EmptyState is stored as None) hold no leaves; orbax
        # checks the full structure itself.
        flat = jax.tree_util.tree_flatten_with_path
        stored_leaves = {_leaf_name(p): m for p, m in flat(stored_tree)[0]}
        for name, shape_dtype in empty.items():
            stored_leaves[name] = jax.ShapeDtypeStruct(
                tuple(shape_dtype["shape"]), jnp.dtype(shape_dtype["dtype"])
            )
        target_leaves = {_leaf_name(p): leaf for p, leaf in flat(target)[0]}
        missing = sorted(set(stored_leaves) - set(target_leaves))
        extra = sorted(set(target_leaves) - set(stored_leaves))
        if missing or extra:
            raise ValueError(
                f"target does not match the tree stored in {where}: leaves stored but not in "
                f"target: {missing}; leaves in target but not stored: {extra}"
            )

        def convert(path, leaf):
            name = _leaf_name(path)
            meta = stored_leaves[name]
            if _is_prng_key(leaf):
                if name not in keys:
                    raise ValueError(
                        f"leaf {name!r} of {where}: target is a typed PRNG key, stored is not"
                    )
                leaf = jax.eval_shape(jax.random.key_data, leaf)
            elif name in keys:
                raise ValueError(
                    f"leaf {name!r} of {where}: stored is a typed PRNG key ({keys[name]}), "
                    f"target is {getattr(leaf, 'dtype', type(leaf).__name__)}"
                )
            view = _abstract(leaf)
            shape, dtype = tuple(view.shape), np.dtype(view.dtype)
            stored_shape = tuple(getattr(meta, "shape", ()) or ())
            stored_dtype = getattr(meta, "dtype", None)
            if isinstance(meta, ocp.metadata.ScalarMetadata):
                # A Python scalar has no fixed width (int64 on disk, int32 in a jnp target).
                stored_dtype = None
            if stored_shape != shape or (stored_dtype is not None and stored_dtype != dtype):
                raise ValueError(
                    f"leaf {name!r} of {where}: stored shape {stored_shape} dtype {stored_dtype}, "
                    f"target shape {shape} dtype {dtype}"
                )
            if name in empty:
                return None  # saved as None (see save)
            # orbax restores into arrays, ShapeDtypeStructs and Python scalars only.
            return np.asarray(leaf) if isinstance(leaf, np.generic) else leaf

        return jax.tree_util.tree_map_with_path(convert, target)


def _fill_empty_arrays(tree: PyTree, target: PyTree | None, empty: dict[str, dict]) -> PyTree:
    """``tree`` as restored by orbax with the zero-size arrays (restored as ``None``) put
    back: shaped like ``target`` when there is one, else in place of the ``None`` leaves."""
    if not empty:
        return tree
    if target is None:

        def fill(path, leaf):
            name = _leaf_name(path)
            return _zeros_like_record(empty[name]) if leaf is None and name in empty else leaf

        return jax.tree_util.tree_map_with_path(fill, tree, is_leaf=lambda x: x is None)
    restored = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def rebuild(path, leaf):
        name = _leaf_name(path)
        if name in empty:
            like = jax.eval_shape(jax.random.key_data, leaf) if _is_prng_key(leaf) else leaf
            return _zeros_like_record(empty[name], like)
        return restored[name]

    return jax.tree_util.tree_map_with_path(rebuild, target)
