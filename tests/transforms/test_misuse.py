"""What every aggregator promises beyond its paper: precision, faults and misuse.

* float64 gradients (x64) give float64 weights, states and updates, equal to a float64 NumPy
  computation of the method;
* a non-finite per-task gradient or task loss gives an update that is NaN on every leaf and
  leaves the transform's state as it was; ``optax.apply_if_finite`` after the aggregator, or
  ``jaxmtl.transforms.skip_nonfinite`` around the whole chain, then skips the step;
* updates whose task axes disagree with ``params`` and ``shared=`` are reported, naming the
  leaf, the expected and the received shape;
* optax wrappers and ``shared=`` specifications that cannot work say why;
* DB-MTL's state (task heads included) round-trips through ``jaxmtl.checkpoint``.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmtl.transforms as T
from jaxmtl import mtl
from jaxmtl.checkpoint import Checkpointer
from jaxmtl.transforms import weighting as W
from tests.transforms.aggregator_harness import P, is_trunk, make_shared, problem, split

A = importlib.import_module("jaxmtl.transforms.aggregate")  # the name is also a function
K = 2

# ----------------------------------------------------------------------------- float64

J64 = np.random.default_rng(0).normal(size=(3, P))
LOSSES64 = [np.array([0.7, 1.9, 1.3]), np.array([0.6, 1.7, 1.25]), np.array([0.5, 1.8, 1.1])]


def _run64(tx, steps: int, losses_dtype=np.float64):
    params = {"a": jnp.zeros(2, jnp.float64), "b": jnp.zeros(P - 2, jnp.float64)}
    state = tx.init(params)
    update = jax.jit(lambda u, s, losses: tx.update(u, s, params, task_losses=losses))
    for losses in LOSSES64[:steps]:
        out, state = update(split(J64), state, jnp.asarray(losses.astype(losses_dtype)))
    return np.concatenate([np.asarray(out["a"]), np.asarray(out["b"])]), out, state


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _uncertainty_weights(losses):
    g = 0.5 * (1.0 - losses[0])  # d/ds at s = 0; one Adam step: -lr g / (|g| + eps)
    s = -1e-3 * g / (np.abs(g) + 1e-8)
    return np.exp(-s) / 2


def _famo_weights(losses):
    scaled = (1 / 3) / (losses[0] + 1e-8)
    return scaled / scaled.sum()


def _db_mtl_direction(losses):
    h = J64 / losses[0][:, None]
    m = h + 0.9 * (0.0 - h)  # t = 1: decay beta / 1^beta_sigma
    norms = np.linalg.norm(m, axis=1)
    return (norms.max() / norms) @ m


# name -> (transform, steps, float64 direction from the task losses of each step)
FLOAT64 = {
    "mean": (lambda: T.mean(), 1, lambda L: J64.mean(0)),
    "constant": (
        lambda: T.constant(np.array([0.1, 0.7, 0.3])),
        1,
        lambda L: np.array([0.1, 0.7, 0.3]) @ J64,
    ),
    "dwa": (lambda: T.dwa(num_tasks=3), 3, lambda L: 3 * _softmax(L[1] / L[0] / 2.0) @ J64),
    "uncertainty": (lambda: T.uncertainty(num_tasks=3), 2, lambda L: _uncertainty_weights(L) @ J64),
    "famo": (lambda: T.famo(num_tasks=3), 1, lambda L: _famo_weights(L) @ J64),
    "gls": (lambda: T.gls(), 1, lambda L: np.exp(np.log(L[0]).mean()) / (3 * L[0]) @ J64),
    "stch": (lambda: T.stch(mu=0.5), 1, lambda L: _softmax(L[0] / 3 / 0.5) / 3 @ J64),
    "db_mtl": (lambda: T.db_mtl(num_tasks=3), 1, _db_mtl_direction),
}


def _floating_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("losses_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(FLOAT64))
def test_float64_gradients_give_float64_updates_and_states(x64, name, losses_dtype):
    """float64 gradients: a float64 update and state whatever the task losses' dtype."""
    make, steps, reference = FLOAT64[name]
    d, out, state = _run64(make(), steps, losses_dtype)
    assert {out["a"].dtype, out["b"].dtype} == {jnp.dtype(jnp.float64)}
    assert _floating_dtypes(state) <= {jnp.dtype(jnp.float64)}, state
    losses = [x.astype(losses_dtype).astype(np.float64) for x in LOSSES64]
    np.testing.assert_allclose(d, reference(losses), rtol=1e-14, atol=1e-14 * np.abs(d).max())


def test_float64_rlw_weights_sum_to_one(x64):
    """RLW's softmax weights, read back from ``d = w @ J``, sum to 1 to float64 precision."""
    d, _, _ = _run64(T.rlw(seed=1), 1)
    w = np.linalg.lstsq(J64.T, d, rcond=None)[0]
    np.testing.assert_allclose(w @ J64, d, rtol=1e-14)
    assert abs(w.sum() - 1.0) < 1e-13, w.sum() - 1.0


def test_float64_gradvac_state_keeps_float64_targets(x64):
    """Two steps through the transform equal two steps of the weighting on a float64 state."""
    d, _, state = _run64(T.gradvac(num_tasks=3, beta=0.5, seed=1), 2)
    assert _floating_dtypes(state) == {jnp.dtype(jnp.float64)}
    wv = W.gradvac(num_tasks=3, beta=0.5, seed=1)
    ref_state = W.GradVacState(jnp.zeros((3, 3), jnp.float64), wv.init().key)
    gramian = jnp.asarray(J64 @ J64.T)
    weights = jax.jit(wv.weights)
    for _ in range(2):
        w, ref_state = weights(gramian, ref_state)
    np.testing.assert_allclose(d, np.asarray(w) @ J64, rtol=1e-14)


# ----------------------------------------------------------------------------- non-finite


def _factories(k: int) -> dict:
    """Every aggregator of ``jaxmtl.transforms.aggregate``, with the trunk shared."""
    names = [n for n in A.__all__ if n[0].islower() and n not in ("aggregate", "skip_nonfinite")]
    out = {name: functools.partial(make_shared, name, k) for name in names if name != "mgda_ub"}
    out["aggregate"] = lambda: T.aggregate(W.mean(), shared=is_trunk)
    out["mgda_ub"] = lambda: T.mgda_ub(shared=is_trunk)
    return out


def test_every_aggregator_is_covered():
    assert set(_factories(K)) == {n for n in A.__all__ if n[0].islower() and n != "skip_nonfinite"}


def _poisoned(tree, leaf: str, value: float):
    return {**tree, leaf: tree[leaf].at[(0,) * tree[leaf].ndim].set(value)}


@functools.cache
def _setup():
    params, x, y, task_losses = problem(K)
    losses, grads = jax.jit(lambda p: mtl.task_gradients(task_losses, p, x, y, shared=is_trunk))(
        params
    )
    features = jnp.asarray(np.random.default_rng(1).normal(size=(K, 6)), jnp.float32)
    return params, losses, grads, features


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(_factories(K)))
def test_non_finite_input_gives_all_nan_and_keeps_the_state(name):
    params, losses, grads, features = _setup()
    tx = _factories(K)[name]()
    update = jax.jit(
        lambda g, s, lo, f: tx.update(g, s, params, task_losses=lo, feature_gradients=f)
    )
    _, state = update(grads, tx.init(params), losses, features)  # a state that has moved
    out, new_state = update(grads, state, losses, features)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(out))
    cases = [
        (_poisoned(grads, "trunk", np.nan), losses, features),
        (_poisoned(grads, "trunk", np.inf), losses, features),
        (_poisoned(grads, "heads", -np.inf), losses, features),
        (grads, losses.at[1].set(np.nan), features),
        (grads, losses, features.at[0, 0].set(np.inf)),
    ]
    for g, lo, f in cases:
        out, new_state = update(g, state, lo, f)
        for leaf in jax.tree.leaves(out):
            assert np.all(np.isnan(np.asarray(leaf))), (name, out)
        _assert_trees_equal(new_state, state)


def _train(tx, *poisons):
    """One run of the problem per pattern of steps; True steps get NaN per-task gradients."""
    params0, x, y, task_losses = problem(K)

    @jax.jit
    def step(params, opt_state, poison):
        losses, grads = mtl.task_gradients(task_losses, params, x, y, shared=is_trunk)
        grads = {**grads, "trunk": jnp.where(poison, jnp.nan, grads["trunk"])}
        with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32
            updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    runs = []
    for poison in poisons:
        params = params0
        with jax.numpy_dtype_promotion("standard"):
            opt_state = tx.init(params)
        for bad in poison:
            params, opt_state = step(params, opt_state, jnp.asarray(bad))
        runs.append((params, opt_state))
    return runs


@pytest.mark.parametrize(
    "name, where",
    [("db_mtl", "after"), ("famo", "after"), ("upgrad", "around"), ("db_mtl", "around")],
)
def test_a_non_finite_step_is_skipped(name, where):
    """[finite, NaN, finite] steps end where two finite steps end, params finite throughout."""
    agg = make_shared(name, K)
    if where == "after":  # optax's wrapper on the part after the aggregator
        tx = optax.chain(agg, optax.apply_if_finite(optax.adam(1e-2), 3))
    else:
        tx = T.skip_nonfinite(optax.chain(agg, optax.adam(1e-2)), max_consecutive_errors=3)
    (skipped, state), (plain, _) = _train(tx, (False, True, False), (False, False))
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(plain), strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    wrapper = state if where == "around" else state[1]
    assert int(wrapper.total_notfinite) == 1


def test_skip_nonfinite_gives_up_after_max_consecutive_errors():
    tx = T.skip_nonfinite(
        optax.chain(make_shared("mean", K), optax.sgd(1.0)), max_consecutive_errors=1
    )
    [(params, state)] = _train(tx, (True, True))
    assert not np.all(np.isfinite(np.asarray(params["trunk"])))  # accepted on the second error
    assert int(state.total_notfinite) == 2


# ----------------------------------------------------------------------------- misuse


def _readme_model():
    """The README's two-task model: a shared trunk (8, 16) and heads stored as (K, 16)."""

    def task_losses(params, batch):
        z = jnp.tanh(batch["x"] @ params["trunk"])
        return jnp.stack(
            [jnp.mean((z @ params["heads"][k] - batch["y"][:, k]) ** 2) for k in (0, 1)]
        )

    keys = jax.random.split(jax.random.key(0), 3)
    params = {"trunk": jax.random.normal(keys[0], (8, 16)) / 3, "heads": jnp.zeros((2, 16))}
    batch = {"x": jax.random.normal(keys[1], (64, 8)), "y": jax.random.normal(keys[2], (64, 2))}
    return task_losses, params, batch


def test_shared_given_to_task_gradients_only_is_reported():
    task_losses, params, batch = _readme_model()
    _, grads = mtl.task_gradients(task_losses, params, batch, shared=is_trunk)
    tx = T.mean()  # every leaf shared: the heads' (2, 16) would be read as 2 tasks
    with pytest.raises(ValueError, match=r"heads.*\(2, 2, 16\).*\(2, 16\).*shared="):
        tx.update(grads, tx.init(params), params)
    # The other way round: a head with a task axis the transform does not expect.
    _, grads = mtl.task_gradients(task_losses, params, batch)
    tx = T.db_mtl(num_tasks=2, shared=is_trunk)
    with pytest.raises(ValueError, match=r"heads.*\(2, 16\).*\(2, 2, 16\).*shared="):
        tx.update(grads, tx.init(params), params, task_losses=jnp.ones(2))
    # Without params nothing can be checked against them; the task axes still must agree.
    T.mean().update(mtl.task_gradients(task_losses, params, batch, shared=is_trunk)[1], ())
    with pytest.raises(ValueError, match=r"\['b'\].*task axis 3.*shared="):
        T.mean().update({"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}, ())


def test_updates_with_the_structure_of_other_params_are_reported():
    tx = T.mean()
    params = {"a": jnp.zeros(2)}
    with pytest.raises(ValueError, match="structure"):
        tx.update({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 1))}, tx.init(params), params)


def test_multisteps_around_the_aggregator_says_where_it_belongs():
    task_losses, params, batch = _readme_model()
    _, grads = mtl.task_gradients(task_losses, params, batch)
    tx = optax.MultiSteps(optax.chain(T.upgrad(), optax.adam(1e-2)), every_k_schedule=2)
    with jax.numpy_dtype_promotion("standard"), pytest.raises(ValueError, match="MultiSteps"):
        tx.update(grads, tx.init(params), params)


def test_inject_hyperparams_with_a_shared_predicate():
    task_losses, params, batch = _readme_model()
    _, grads = mtl.task_gradients(task_losses, params, batch, shared=is_trunk)
    # A predicate is a callable: inject_hyperparams calls it as a schedule unless static.
    static = ("shared", "iterations")
    tx = optax.inject_hyperparams(T.cagrad, static_args=static)(c=0.3, shared=is_trunk)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert out["heads"].shape == (2, 16)
    # A boolean-pytree mask is not callable: it needs no static_args.
    tx = optax.inject_hyperparams(T.mean)(shared={"trunk": True, "heads": False})
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["heads"], grads["heads"])
    # A predicate that survives being called with the step count reaches the factory as its
    # value: the error says what happened.
    tx = optax.inject_hyperparams(T.upgrad)(shared=lambda path: True)
    with pytest.raises(ValueError, match=r"shared.*static_args"):
        tx.init(params)


class _Module:
    """A stand-in for an equinox module: a pytree with attribute keys and a ``__call__``."""

    def __init__(self, trunk, head):
        self.trunk, self.head = trunk, head

    def __call__(self, x):
        return x @ self.trunk @ self.head


jax.tree_util.register_pytree_with_keys(
    _Module,
    lambda m: (
        ((jax.tree_util.GetAttrKey("trunk"), m.trunk), (jax.tree_util.GetAttrKey("head"), m.head)),
        None,
    ),
    lambda _, children: _Module(*children),
)


def test_module_shaped_shared_specs():
    params = _Module(jnp.ones((3, 2)), jnp.ones(2))
    grads = _Module(jnp.ones((K, 3, 2)), jnp.ones(2))
    # A boolean pytree of the module's structure is a mask, though the module is callable.
    tx = T.mean(shared=_Module(True, False))
    out, _ = tx.update(grads, tx.init(params), params)
    assert out.trunk.shape == (3, 2) and out.head.shape == (2,)
    # A predicate written for dict keys fails on attribute keys: the message says so.
    tx = T.mean(shared=lambda path: path[0].key == "trunk")
    with pytest.raises(ValueError, match=r"shared.*\.trunk.*GetAttrKey.*name"):
        tx.update(grads, tx.init(params), params)
    with pytest.raises(ValueError, match=r"shared.*bool.*\.trunk"):
        mtl.shared_mask(params, lambda path: jnp.ones(3))


# ----------------------------------------------------------------------------- checkpoints


def test_db_mtl_state_with_heads_round_trips_through_the_checkpointer(tmp_path):
    params, losses, grads, _ = _setup()
    tx = T.db_mtl(num_tasks=K, shared=is_trunk)
    _, state = tx.update(grads, tx.init(params), params, task_losses=losses)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        restored = ckpt.restore(1, tx.init(params))
    _assert_trees_equal(restored, state)
    a, _ = tx.update(grads, restored, params, task_losses=losses)
    b, _ = tx.update(grads, state, params, task_losses=losses)
    _assert_trees_equal(a, b)
