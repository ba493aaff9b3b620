"""Tests of jaxmtl.checkpoint: exact round trips, retention, strictness and unreadable files."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmtl.checkpoint import Checkpointer, CheckpointReadError


class State(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: tuple
    rng: jax.Array


def _state(seed: int = 0) -> State:
    params = {
        "w": jax.random.normal(jax.random.key(seed), (3, 4), jnp.bfloat16),
        "b": jnp.arange(4, dtype=jnp.float32) + seed,
        "count": jnp.array([seed, 7], jnp.int8),
    }
    return State(
        step=jnp.asarray(5 + seed, jnp.int32),
        params=params,
        opt_state=optax.adam(1e-3).init(params),  # includes optax.EmptyState()
        rng=jax.random.key(seed),
    )


def _assert_identical(a, b):
    """Same structure, and leaf by leaf the same dtype, shape and bits (keys by key data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, (x, y)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact_dtypes_and_prng_keys(tmp_path):
    state = _state()
    extra = {
        "raw_key": jax.random.PRNGKey(3),  # raw uint32 key: an ordinary array
        "keys": jax.random.split(jax.random.key(1), 3),  # typed key array
        "rbg": jax.random.key(2, impl="rbg"),  # another key implementation
        "host": np.arange(5, dtype=np.uint16),
        "scalar": 3,
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, metadata={"seed": 0, "note": "x"})
        ckpt.save(6, extra)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 6]
        _assert_identical(ckpt.restore(5, _state(seed=1)), state)  # target: structure only
        assert ckpt.metadata(5) == {"seed": 0, "note": "x"}
        assert ckpt.metadata(6) == {}
        # Abstract targets work too; the PRNG keys come back typed with their implementation.
        restored = ckpt.restore(6, jax.eval_shape(lambda: extra))
        _assert_identical(
            {k: v for k, v in restored.items() if k != "scalar"},
            {k: v for k, v in extra.items() if k != "scalar"},
        )
        assert int(restored["scalar"]) == 3
        # Without a target: dicts in place of NamedTuples, same arrays and keys.
        untargeted = ckpt.restore(5)
        _assert_identical(untargeted["params"], state.params)
        _assert_identical(untargeted["rng"], state.rng)
    # A new process (a new Checkpointer) reads the same.
    with Checkpointer(tmp_path) as again:
        assert again.latest_step() == 6
        _assert_identical(again.restore(5, state), state)


def test_restore_keeps_the_target_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    tree = {"x": jax.device_put(jnp.arange(16.0), sharding)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, tree)
        ckpt.wait()
        target = {"x": jax.device_put(jnp.zeros(16), sharding)}
        restored = ckpt.restore(0, target)
    assert restored["x"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(16.0))


def test_max_to_keep_is_honoured(tmp_path):
    tree = {"a": jnp.ones(2)}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 3, 4, 7, 9):
            ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, tree))
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [7, 9]
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [7, 9]
        np.testing.assert_array_equal(ckpt.restore(9, tree)["a"], [9.0, 9.0])
        ckpt.save(10, tree)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [9, 10]


def test_save_copies_arrays_before_returning(tmp_path):
    """The async write must not see a buffer that the caller donates right after save()."""
    x = jnp.arange(1000.0)
    clobber = jax.jit(lambda a: a * 0.0 - 1.0, donate_argnums=0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": x})
        clobber(x)
        ckpt.wait()
        np.testing.assert_array_equal(
            ckpt.restore(0, {"x": jnp.zeros(1000)})["x"], np.arange(1000.0)
        )


def test_existing_step_is_never_overwritten(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, {"a": jnp.ones(2)})
        ckpt.wait()
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(2, {"a": jnp.zeros(2)})
        np.testing.assert_array_equal(ckpt.restore(2, {"a": jnp.zeros(2)})["a"], [1.0, 1.0])


def test_unreadable_checkpoint_is_reported_and_left_alone(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, _state())
    state_dir = tmp_path / "3" / "state"
    for f in state_dir.rglob("*"):  # corrupt every data and metadata file of the arrays
        if f.is_file():
            f.write_bytes(b"\x00not a checkpoint")
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        with pytest.raises(CheckpointReadError, match=str(tmp_path / "3")):
            ckpt.restore(3, _state())
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(3, _state())
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before


def test_missing_step(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(1, {"a": jnp.ones(2)})
        ckpt.wait()
        with pytest.raises(FileNotFoundError, match=r"step 4 .*\[1\]"):
            ckpt.restore(4, {"a": jnp.ones(2)})


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"a": jnp.ones(3), "k": jax.random.key(0)}, r"'a'.*shape \(2,\).*shape \(3,\)"),
        ({"a": jnp.ones(2, jnp.bfloat16), "k": jax.random.key(0)}, "'a'.*float32.*bfloat16"),
        ({"a": jnp.ones(2), "k": jax.random.key(0), "b": jnp.ones(1)}, r"not stored: \['b'\]"),
        ({"a": jnp.ones(2), "k": jnp.zeros(2, jnp.uint32)}, "'k'.*typed PRNG key"),
    ],
)
def test_restore_refuses_a_different_target(tmp_path, target, message):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"a": jnp.ones(2), "k": jax.random.key(0)})
        ckpt.wait()
        with pytest.raises(ValueError, match=message):
            ckpt.restore(0, target)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, {"a": jnp.ones(2)})
        with pytest.raises(TypeError, match="metadata"):
            ckpt.save(0, {"a": jnp.ones(2)}, metadata=[1, 2])


def _with_empty_leaves() -> dict:
    return {
        "empty": jnp.zeros((0,), jnp.float32),
        "matrix": jnp.zeros((3, 0), jnp.bfloat16),
        "host": np.zeros((0, 2), np.int16),
        "keys": jax.random.split(jax.random.key(0), 0),  # a typed key array of size 0
        "none": None,
        "empty_state": optax.EmptyState(),
        "full": jnp.arange(3.0),
    }


def test_zero_size_and_none_leaves_round_trip(tmp_path):
    tree = _with_empty_leaves()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, tree)
        ckpt.wait()
        _assert_identical(ckpt.restore(1, tree), tree)
        _assert_identical(ckpt.restore(1, jax.eval_shape(lambda: tree)), tree)
        untargeted = ckpt.restore(1)
        for name in ("empty", "matrix", "host", "keys", "full"):
            _assert_identical(untargeted[name], tree[name])
        with pytest.raises(ValueError, match=r"'matrix'.*shape \(3, 0\).*shape \(0, 3\)"):
            ckpt.restore(1, {**tree, "matrix": jnp.zeros((0, 3), jnp.bfloat16)})
    with Checkpointer(tmp_path) as again:  # another process reads the same
        _assert_identical(again.restore(1, tree), tree)


def test_db_mtl_state_with_heads_round_trips(tmp_path):
    from jaxmtl import transforms

    params = {"trunk": {"w": jnp.ones((3, 2))}, "heads": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}]}
    shared = lambda path: path[0].key == "trunk"
    tx = optax.chain(transforms.db_mtl(num_tasks=2, shared=shared), optax.adam(1e-3))
    state = tx.init(params)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"params": params, "opt_state": state})
        ckpt.wait()
        restored = ckpt.restore(0, {"params": params, "opt_state": state})
    _assert_identical(restored["opt_state"], state)
