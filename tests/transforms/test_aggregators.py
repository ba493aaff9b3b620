"""The shared property harness run over every aggregator of ``jaxmtl.transforms``.

Every method is described once by a :class:`Spec` (how to build it and which properties its
paper claims); every property test is parametrized over the specs. Properties: finite output
of the parameter shape; non-conflicting (``J d >= 0``) where claimed; invariance to the task
order; homogeneity under scaling all rows (``d(cJ) = c^p d(J)``) and, where claimed,
invariance to scaling one row; K = 1; zero, identical and opposite gradients; gradient scales
from 1e-8 to 1e8. Then: chained with ``optax.adam`` under ``jit``, ``inject_hyperparams``,
``MultiSteps``, ``shared=``, dtypes and bad input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxmtl.transforms as T
from jaxmtl import mtl
from jaxmtl.transforms import weighting as W
from tests.transforms.aggregator_harness import (
    IDS,
    SPECS,
    P,
    close,
    compiled,
    default_losses,
    direction,
    flat,
    is_trunk,
    make_shared,
    problem,
    random_jacobian,
    split,
)

# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@given(seed=st.integers(0, 2**31 - 1))
def test_finite_and_shaped(spec, seed):
    d = direction(spec.name, random_jacobian(seed, 3))
    assert np.all(np.isfinite(d))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.non_conflicting], ids=lambda s: s.name)
@given(seed=st.integers(0, 2**31 - 1))
def test_non_conflicting(spec, seed):
    j = random_jacobian(seed, 3).astype(np.float64)
    d = direction(spec.name, j)
    tol = 1e-4 * np.linalg.norm(j, axis=1) * np.linalg.norm(d)
    assert np.all(j @ d >= -tol), (j @ d, tol)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.order_invariant], ids=lambda s: s.name)
@given(seed=st.integers(0, 2**31 - 1))
def test_invariant_to_task_order(spec, seed):
    k = 3
    j = random_jacobian(seed, k)
    perm = np.random.default_rng(seed).permutation(k)
    d = direction(spec.name, j)
    d_perm = direction(spec.name, j[perm], default_losses(k)[perm])
    close(d_perm, d, 2e-3 if spec.name == "cagrad" else 2e-4, np.linalg.norm(d) + 1e-6)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.degree is not None], ids=lambda s: s.name)
@given(seed=st.integers(0, 2**31 - 1), exponent=st.sampled_from([-8, -4, 0, 4, 8]))
def test_homogeneous_under_common_scaling(spec, seed, exponent):
    """Scales 1e-8 to 1e8: ``d(cJ) = c^p d(J)`` and finite."""
    j = random_jacobian(seed, 3)
    c = 10.0**exponent
    d = direction(spec.name, j)
    d_scaled = direction(spec.name, (j.astype(np.float64) * c).astype(np.float32))
    assert np.all(np.isfinite(d_scaled))
    expected = d * c**spec.degree
    close(d_scaled, expected, 2e-3 if spec.name == "cagrad" else 2e-4, np.linalg.norm(expected))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.row_scale_invariant], ids=lambda s: s.name)
@given(seed=st.integers(0, 2**31 - 1), c=st.sampled_from([1e-3, 0.1, 7.0, 1e3]))
def test_invariant_to_scaling_one_row(spec, seed, c):
    j = random_jacobian(seed, 3)
    scaled = j.copy()
    scaled[1] *= c
    d = direction(spec.name, j)
    close(direction(spec.name, scaled), d, 1e-3, np.linalg.norm(d))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_single_task_gives_a_positive_multiple(spec):
    g = np.array([[3.0, -1.0, 0.5, 2.0, -2.0]], np.float32)
    d = direction(spec.name, g)
    coef = d @ g[0] / (g[0] @ g[0])
    assert coef > 0
    np.testing.assert_allclose(d, coef * g[0], rtol=1e-5, atol=1e-5 * np.abs(d).max())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_zero_gradients_give_zero(spec):
    d = direction(spec.name, np.zeros((3, P), np.float32))
    np.testing.assert_array_equal(d, np.zeros(P))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_one_zero_row_is_finite(spec):
    j = random_jacobian(7, 3)
    j[1] = 0.0
    d = direction(spec.name, j)
    assert np.all(np.isfinite(d))
    if spec.non_conflicting:
        assert np.all(j.astype(np.float64) @ d >= -1e-4 * np.linalg.norm(j) * np.linalg.norm(d))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.name != "graddrop"], ids=lambda s: s.name)
def test_identical_gradients_give_a_positive_multiple(spec):
    g = np.array([1.0, -2.0, 0.5, 3.0, 1.0], np.float32)
    d = direction(spec.name, np.stack([g, g, g]))
    coef = d @ g / (g @ g)
    assert np.all(np.isfinite(d)) and coef > 0
    np.testing.assert_allclose(d, coef * g, rtol=1e-4, atol=1e-4 * np.abs(d).max())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_opposite_gradients(spec):
    g = np.array([1.0, -2.0, 0.5, 3.0, 1.0], np.float32)
    d = direction(spec.name, np.stack([g, -g]))
    assert np.all(np.isfinite(d))
    if spec.non_conflicting or spec.name in ("pcgrad", "mean", "summed", "cagrad"):
        # The only non-conflicting direction is orthogonal to g; all these give 0 here.
        np.testing.assert_allclose(d, 0.0, atol=1e-4 * np.linalg.norm(g))


def test_graddrop_identical_gradients_pass_through():
    g = np.array([1.0, -2.0, 0.5, 3.0, 1.0], np.float32)
    np.testing.assert_allclose(direction("graddrop", np.stack([g, g, g])), 3 * g, rtol=1e-6)


# ----------------------------------------------------------------------------- paper claims


@given(seed=st.integers(0, 2**31 - 1))
def test_mgda_direction_is_in_the_polar_of_every_gradient(seed):
    """Désidéri (2012): the min-norm point d has g_k . d >= ||d||^2 for every k."""
    j = random_jacobian(seed, 3).astype(np.float64)
    d = direction("mgda", j)
    assert np.all(j @ d >= d @ d - 1e-4 * np.linalg.norm(j) * np.linalg.norm(d))


@given(seed=st.integers(0, 2**31 - 1))
def test_upgrad_and_pcgrad_without_conflict(seed):
    """With no conflict (G >= 0 entrywise) UPGrad is the mean and PCGrad the sum."""
    j = np.abs(random_jacobian(seed, 3))
    close(direction("upgrad", j), j.mean(0), 1e-4, np.abs(j).max())
    close(direction("pcgrad", j), j.sum(0), 1e-5, np.abs(j).max())


@given(seed=st.integers(0, 2**31 - 1))
def test_imtl_g_projects_equally_on_every_unit_gradient(seed):
    """Liu et al. (2021): d . u_k is the same for every task."""
    j = random_jacobian(seed, 3).astype(np.float64)
    d = direction("imtl_g", j)
    proj = j @ d / np.linalg.norm(j, axis=1)
    np.testing.assert_allclose(proj, proj[0], rtol=1e-3, atol=1e-4 * np.linalg.norm(d))


@given(seed=st.integers(0, 2**31 - 1))
def test_nash_mtl_solves_its_bargaining_equation(seed):
    """Navon et al. (2022): d = J^T a with a_k (J d)_k = 1, so ||d||^2 = K."""
    j = random_jacobian(seed, 3).astype(np.float64)
    d = direction("nash_mtl", j)
    np.testing.assert_allclose(d @ d, 3.0, rtol=1e-3)


def test_cagrad_with_c_zero_is_the_mean():
    j = random_jacobian(0, 3)
    w, _ = jax.jit(lambda g: W.cagrad(c=0.0).weights(g, ()))(jnp.asarray(j @ j.T))
    np.testing.assert_allclose(w, np.full(3, 1 / 3), rtol=1e-6)


def test_randomised_methods_draw_a_new_sample_each_step():
    j = np.array([[1, -1, 2, -2, 1], [-2, 1, -1, 3, -1], [1, 2, -3, -1, 2]], np.float32)
    for name in ("rlw", "graddrop", "pcgrad"):
        tx, params, update = compiled(name, 3)
        state = tx.init(params)
        outs = []
        for _ in range(6):
            out, state = update(split(j), state, jnp.asarray(default_losses(3)))
            outs.append(flat(out))
        assert not all(np.allclose(o, outs[0]) for o in outs[1:]), name


def test_rlw_weights_are_a_softmax_of_normals():
    wt = W.rlw(seed=0)
    state = wt.init()
    samples = []
    for _ in range(200):
        w, state = wt.weights(None, state, num_tasks=3)
        samples.append(np.asarray(w))
    samples = np.array(samples)
    np.testing.assert_allclose(samples.sum(1), 1.0, rtol=1e-5)
    assert np.all(samples > 0)
    np.testing.assert_allclose(samples.mean(0), 1 / 3, atol=0.05)


def test_graddrop_keeps_the_positive_sign_with_probability_purity():
    """Chen et al. (2020), Eq. 1-2: P = (1 + sum g / sum |g|) / 2 = 0.6 for g = (-4, 6)."""
    j = np.array([[-4.0, 1.0, 1.0, 0.0, 0.0], [6.0, 1.0, 1.0, 0.0, 0.0]], np.float32)
    tx, params, update = compiled("graddrop", 2)
    state = tx.init(params)
    firsts = []
    for _ in range(300):
        out, state = update(split(j), state, jnp.asarray(default_losses(2)))
        d = flat(out)
        np.testing.assert_allclose(d[1:], [2.0, 2.0, 0.0, 0.0])  # agreeing signs: always kept
        firsts.append(d[0])
    firsts = np.array(firsts)
    assert set(np.unique(firsts)) <= {-4.0, 6.0}
    assert abs(np.mean(firsts == 6.0) - 0.6) < 0.1


# ----------------------------------------------------------------------------- optax


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_chained_with_adam_under_jit(spec):
    k = 2
    params, x, y, task_losses = problem(k)
    tx = optax.chain(make_shared(spec.name, k), optax.adam(1e-2))

    @jax.jit
    def step(params, opt_state):
        losses, grads = mtl.task_gradients(task_losses, params, x, y, shared=is_trunk)
        with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes float and int32
            updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(params)
    first = None
    for _ in range(30):
        params, opt_state, losses = step(params, opt_state)
        first = losses if first is None else first
    assert np.all(np.isfinite(np.asarray(losses)))
    assert float(losses.sum()) < float(first.sum()), spec.name


def test_non_shared_leaves_pass_through():
    k = 2
    params, x, y, task_losses = problem(k)
    _, grads = mtl.task_gradients(task_losses, params, x, y, shared=is_trunk)
    tx = T.mean(shared=is_trunk)
    out, _ = jax.jit(tx.update)(grads, tx.init(params))
    assert out["trunk"].shape == params["trunk"].shape
    np.testing.assert_array_equal(out["heads"], grads["heads"])
    # The shared part is the weighting applied to the trunk's Jacobian alone.
    w = jnp.full((k,), 1.0 / k)
    np.testing.assert_allclose(out["trunk"], jnp.tensordot(w, grads["trunk"], axes=1), rtol=1e-6)


def test_inject_hyperparams():
    j = split(random_jacobian(1, 3))
    params = {"a": jnp.zeros(2), "b": jnp.zeros(P - 2)}
    tx = optax.inject_hyperparams(T.cagrad, static_args="iterations")(c=0.2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out, state = update(j, state, params)
    reference = jax.jit(lambda g, c: W.cagrad(c=c).weights(g, ())[0])
    ref = reference(mtl.gramian(j), 0.2)
    np.testing.assert_allclose(flat(out), flat(mtl.combine(ref, j)), rtol=1e-5)
    state.hyperparams["c"] = jnp.asarray(0.6)
    out, _ = update(j, state, params)
    ref = reference(mtl.gramian(j), 0.6)
    np.testing.assert_allclose(flat(out), flat(mtl.combine(ref, j)), rtol=1e-5)
    # Integer, structural arguments go through static_args.
    gv = optax.inject_hyperparams(T.gradvac, static_args=("num_tasks", "seed"))(
        num_tasks=3, beta=0.5
    )
    out, state = jax.jit(gv.update)(j, gv.init(params), params)
    assert np.all(np.isfinite(flat(out)))
    assert float(state.inner_state.targets[0, 1]) != 0.0


def test_multisteps_after_the_aggregator():
    j1, j2 = random_jacobian(1, 3), random_jacobian(2, 3)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(P - 2)}
    tx = optax.chain(T.upgrad(), optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2))
    with jax.numpy_dtype_promotion("standard"):  # MultiSteps mixes float and int32
        state = tx.init(params)
        update = jax.jit(tx.update)
        out1, state = update(split(j1), state, params)
        out2, state = update(split(j2), state, params)
    np.testing.assert_array_equal(flat(out1), 0.0)
    expected = -(direction("upgrad", j1) + direction("upgrad", j2)) / 2
    np.testing.assert_allclose(flat(out2), expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_updates_use_a_float32_gramian():
    j = random_jacobian(3, 3)
    updates = jax.tree.map(lambda a: a.astype(jnp.bfloat16), split(j))
    tx = T.upgrad()
    out, _ = jax.jit(tx.update)(updates, tx.init(None))
    assert out["a"].dtype == jnp.bfloat16
    ref = direction("upgrad", np.asarray(jnp.asarray(j).astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(flat(out), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_mgda_ub_takes_weights_from_the_feature_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    trunk = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    heads = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    encode = lambda p, x: jnp.tanh(x @ p)
    from_features = lambda h, z, y: jnp.mean((z @ h - y) ** 2, axis=0)
    _, shared_grads, _, feature_grads = mtl.representation_gradients(
        encode, from_features, trunk, heads, x, y
    )
    tx = T.mgda_ub()
    out, _ = jax.jit(tx.update)(shared_grads, tx.init(trunk), feature_gradients=feature_grads)
    w, _ = jax.jit(W.mgda().weights)(mtl.gramian(feature_grads), ())
    np.testing.assert_allclose(out, jnp.tensordot(w, shared_grads, axes=1), rtol=1e-5)
    with pytest.raises(ValueError, match="feature_gradients"):
        tx.update(shared_grads, tx.init(trunk))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_reported():
    j = split(random_jacobian(0, 3))
    with pytest.raises(ValueError, match="task_losses"):
        T.gls().update(j, T.gls().init(None))
    with pytest.raises(ValueError, match="task_losses"):
        T.gls().update(j, T.gls().init(None), task_losses=jnp.ones(2))
    with pytest.raises(ValueError, match="leading task axis"):
        T.upgrad().update({"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}, ())
    with pytest.raises(ValueError, match="weights"):
        T.constant([1.0, 2.0]).update(j, ())
    with pytest.raises(ValueError, match="c"):
        T.cagrad(c=-0.1)
    with pytest.raises(ValueError, match="beta"):
        T.gradvac(num_tasks=3, beta=1.5)
    with pytest.raises(ValueError, match="num_tasks"):
        T.dwa(num_tasks=0)
    with pytest.raises(ValueError, match="alpha"):
        T.fairgrad(alpha=0.0)
    with pytest.raises(ValueError, match="scale_mode"):
        T.aligned_mtl(scale_mode="max")
    with pytest.raises(ValueError, match="leak"):
        T.graddrop(leak=2.0)
    with pytest.raises(ValueError, match="gramian_source"):
        T.aggregate(W.mean(), gramian_source="losses")
    with pytest.raises(TypeError, match="weighting"):
        T.aggregate(lambda g: g)
    with pytest.raises(ValueError, match="pref_vector"):
        W.upgrad(pref_vector=[1.0, 2.0]).weights(jnp.eye(3), ())
    with pytest.raises(ValueError, match="gramian"):
        W.mgda().weights(jnp.ones((2, 3)), ())
    with pytest.raises(ValueError, match="gramian"):
        W.gradvac(num_tasks=2).weights(jnp.eye(3), W.gradvac(num_tasks=2).init())
