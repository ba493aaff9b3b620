"""Linearized models and the cached form (Ortiz-Jimenez et al., NeurIPS 2023, Sec. 6 tests)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from jaxmtl import taskvec
from jaxmtl.models import MLP, functional
from tests.taskvec.helpers import float64, mlp_apply, mlp_params, random_like

SIZES = (3, 5, 4, 2)
N = 6


def _setup(dtype=jnp.float32, seed=0):
    p0 = mlp_params(seed, SIZES, dtype)
    x = jnp.asarray(np.random.default_rng(seed + 100).normal(size=(N, SIZES[0])), dtype)
    return p0, x


def test_apply_lin_at_params0_is_apply_fn_exactly():
    p0, x = _setup()
    f_lin = taskvec.linearize(mlp_apply, p0)
    np.testing.assert_array_equal(f_lin(p0, x), mlp_apply(p0, x))
    np.testing.assert_array_equal(jax.jit(f_lin)(p0, x), jax.jit(mlp_apply)(p0, x))


def test_model_linear_in_params_is_its_own_linearization():
    with float64():
        rng = np.random.default_rng(1)
        f = lambda p, x: x @ p["w"] + p["b"]
        p0 = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
        x = jnp.asarray(rng.normal(size=(7, 4)))
        f_lin = taskvec.linearize(f, p0)
        for seed in range(3):
            p = random_like(seed, p0, scale=3.0)
            np.testing.assert_allclose(f_lin(p, x), f(p, x), rtol=1e-12, atol=1e-12)


def test_linearization_is_the_jacobian_times_the_displacement():
    with float64():
        p0, x = _setup(jnp.float64)
        d = random_like(7, p0, scale=0.3)
        f_lin = jax.jit(taskvec.linearize(mlp_apply, p0))
        got = f_lin(optax.tree.add(p0, d), x) - mlp_apply(p0, x)
        jac = jax.jit(jax.jacfwd(mlp_apply))(p0, x)  # leaves (N, C, *leaf.shape)
        want = sum(
            np.tensordot(np.asarray(j), np.asarray(v), axes=v.ndim)
            for j, v in zip(jax.tree.leaves(jac), jax.tree.leaves(d), strict=True)
        )
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_taylor_remainder_is_second_order():
    with float64():
        p0, x = _setup(jnp.float64)
        d = random_like(3, p0)
        f_lin = taskvec.linearize(mlp_apply, p0)

        def remainder(t):
            p = jax.tree.map(lambda a, b: a + t * b, p0, d)
            return float(jnp.linalg.norm(mlp_apply(p, x) - f_lin(p, x)))

        ratios = [remainder(t) / remainder(t / 2) for t in (4e-2, 2e-2, 1e-2)]
        np.testing.assert_allclose(ratios, 4.0, rtol=0.05)


def test_linearize_batch_matches_linearize():
    with float64():
        p0, x = _setup(jnp.float64)
        d = random_like(4, p0, scale=0.5)
        f0, jvp = taskvec.linearize_batch(mlp_apply, p0, x)
        want = taskvec.linearize(mlp_apply, p0)(optax.tree.add(p0, d), x)
        np.testing.assert_allclose(f0 + jvp(d), want, rtol=1e-12, atol=1e-12)


def test_cached_sweep_equals_per_alpha_apply_lin():
    with float64():
        p0, x = _setup(jnp.float64)
        taus = [random_like(s, p0, scale=0.5) for s in (10, 11)]
        f_lin = taskvec.linearize(mlp_apply, p0)
        # the reference: apply_lin evaluated once per setting (vmapped), no cached form
        per_setting = jax.jit(jax.vmap(lambda c: f_lin(taskvec.apply(p0, taus, c), x)))
        sweep = jax.jit(
            lambda c: taskvec.coefficient_sweep(mlp_apply, p0, taus, c, x, mode="linear")
        )
        alphas = jnp.linspace(-1.5, 1.5, 31)
        shared = sweep(alphas)
        assert shared.shape == (31, N, SIZES[-1])
        np.testing.assert_allclose(shared, per_setting(alphas), rtol=1e-11, atol=1e-12)
        grid = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)))
        np.testing.assert_allclose(sweep(grid), per_setting(grid), rtol=1e-11, atol=1e-12)


def test_nonlinear_sweep_is_one_forward_per_setting_and_chunks_agree():
    with float64():
        p0, x = _setup(jnp.float64)
        taus = taskvec.stack([random_like(s, p0) for s in (1, 2, 3)])
        grid = jnp.asarray(np.random.default_rng(5).normal(size=(7, 3)))
        sweep = jax.jit(
            lambda c, size: taskvec.coefficient_sweep(
                mlp_apply, p0, taus, c, x, mode="nonlinear", batch_size=size
            ),
            static_argnums=1,
        )
        full, chunked = sweep(grid, None), sweep(grid, 3)
        for i, c in enumerate(np.asarray(grid)):
            want = mlp_apply(taskvec.apply(p0, taus, c), x)
            np.testing.assert_allclose(full[i], want, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(chunked[i], want, rtol=1e-12, atol=1e-12)


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _sub_jaxprs(item)


def _dot_general_flops(jaxpr) -> int:
    """Sum of 2 * (output size) * (contracted size) over every dot_general, nested included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = int(np.prod([lhs[d] for d in contract]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                total += _dot_general_flops(sub)
    return total


def _matmul_flops_by_hand(num_vectors: int, num_settings: int) -> int:
    layers = list(itertools.pairwise(SIZES))
    primal = sum(2 * N * a * b for a, b in layers)
    # tangent of layer l: h_{l-1} dW_l (every layer) + dh_{l-1} W_l (not the first: dx = 0)
    tangent = primal + sum(2 * N * a * b for a, b in layers[1:])
    # the combination f0 + sum_i c_i J tau_i is elementwise for few vectors: no matmul at all,
    # so the count cannot depend on the number of settings
    del num_settings
    return primal + num_vectors * tangent


@pytest.mark.parametrize("num_vectors", [1, 2, 3])
def test_cached_sweep_costs_one_jvp_per_vector(num_vectors):
    p0, x = _setup()
    taus = taskvec.stack([random_like(s, p0) for s in range(num_vectors)])
    traces = []

    def counted_apply(params, inputs):
        traces.append(1)  # runs at trace time only
        return mlp_apply(params, inputs)

    for settings in (1, 31):
        traces.clear()
        grid = jnp.zeros((settings, num_vectors))
        jaxpr = jax.make_jaxpr(
            lambda p, v, c, x: taskvec.coefficient_sweep(counted_apply, p, v, c, x)
        )(p0, taus, grid, x)
        assert len(traces) == 1, "apply_fn must be traced once for the whole sweep"
        assert _dot_general_flops(jaxpr.jaxpr) == _matmul_flops_by_hand(num_vectors, settings)


def test_per_alpha_evaluation_costs_one_jvp_per_setting():
    """The contrast the cached form removes: apply_lin per setting re-runs primal and tangent."""
    p0, x = _setup()
    tau = random_like(0, p0)
    f_lin = taskvec.linearize(mlp_apply, p0)
    jaxpr = jax.make_jaxpr(
        lambda a: jnp.stack([f_lin(taskvec.apply(p0, [tau], a[i]), x) for i in range(4)])
    )(jnp.linspace(0.0, 1.0, 4))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(p0))
    # per setting: primal + one tangent, plus the n=1 weighted sum of apply (2 flops a weight)
    want = 4 * (_matmul_flops_by_hand(1, 0) + 2 * num_params)
    assert _dot_general_flops(jaxpr.jaxpr) == want


def test_one_sgd_step_of_apply_lin_is_one_step_of_the_explicit_linear_model():
    with float64():
        p0, x = _setup(jnp.float64)
        y = jnp.asarray(np.random.default_rng(9).normal(size=(N, SIZES[-1])))
        p = optax.tree.add(p0, random_like(2, p0, scale=0.2))
        f_lin = taskvec.linearize(mlp_apply, p0)
        loss_lin = lambda q: jnp.mean((f_lin(q, x) - y) ** 2)

        flat0, unravel = ravel_pytree(p0)
        jac = jax.jit(jax.jacrev(lambda v: mlp_apply(unravel(v), x)))(flat0)  # (N, C, P)
        f0 = np.asarray(mlp_apply(p0, x))

        def loss_explicit(v):
            out = f0 + jnp.tensordot(jac, v - flat0, axes=1)
            return jnp.mean((out - y) ** 2)

        lr = 0.1
        opt = optax.sgd(lr)
        grads = jax.jit(jax.grad(loss_lin))(p)
        updates, _ = opt.update(grads, opt.init(p), p)
        stepped = optax.apply_updates(p, updates)
        flat_p = ravel_pytree(p)[0]
        stepped_explicit = flat_p - lr * jax.jit(jax.grad(loss_explicit))(flat_p)
        np.testing.assert_allclose(
            ravel_pytree(stepped)[0], stepped_explicit, rtol=1e-12, atol=1e-12
        )


def test_apply_lin_gradients_are_correct():
    with float64():
        p0, x = _setup(jnp.float64)
        f_lin = taskvec.linearize(mlp_apply, p0)
        p = optax.tree.add(p0, random_like(5, p0, scale=0.2))
        check_grads(jax.jit(lambda q: jnp.sum(jnp.sin(f_lin(q, x)))), (p,), order=1)


def test_linearize_a_flax_nnx_model_through_functional():
    apply_fn, p0 = functional(MLP(3, [8], 2, rngs=nnx.Rngs(0)))
    x = jnp.ones((4, 3))
    f_lin = jax.jit(taskvec.linearize(apply_fn, p0))
    np.testing.assert_allclose(f_lin(p0, x), apply_fn(p0, x), rtol=1e-6)
    tau = random_like(0, p0, scale=1e-3)
    sweep = jax.jit(lambda c: taskvec.coefficient_sweep(apply_fn, p0, [tau], c, x))
    outs = sweep(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(outs[1], f_lin(optax.tree.add(p0, tau), x), rtol=1e-5, atol=1e-6)


def test_linearize_inside_jit_with_params0_as_argument():
    p0, x = _setup()
    tau = random_like(3, p0, scale=0.1)
    f = jax.jit(lambda q0, q, x: taskvec.linearize(mlp_apply, q0)(q, x))
    want = taskvec.linearize(mlp_apply, p0)(optax.tree.add(p0, tau), x)
    np.testing.assert_allclose(f(p0, optax.tree.add(p0, tau), x), want, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_reported():
    p0, x = _setup()
    taus = [random_like(0, p0)]
    with pytest.raises(TypeError, match="apply_fn"):
        taskvec.linearize("not a function", p0)
    with pytest.raises(ValueError, match="params"):
        taskvec.linearize(mlp_apply, p0)({"l0": p0["l0"]}, x)
    with pytest.raises(ValueError, match="shape"):
        taskvec.linearize(mlp_apply, p0)(jax.tree.map(lambda a: a[..., :1], p0), x)
    with pytest.raises(ValueError, match="mode"):
        taskvec.coefficient_sweep(mlp_apply, p0, taus, jnp.zeros(3), x, mode="tangent")
    with pytest.raises(ValueError, match="coefficients"):
        taskvec.coefficient_sweep(mlp_apply, p0, taus, jnp.zeros((3, 2)), x)
    with pytest.raises(ValueError, match="batch_size"):
        taskvec.coefficient_sweep(mlp_apply, p0, taus, jnp.zeros(3), x, batch_size=0)
    with pytest.raises(ValueError, match="coefficients"):
        taskvec.combine_outputs(jnp.zeros(2), jnp.zeros((3, 2)), jnp.zeros((4, 2)))


@pytest.mark.parametrize("num_vectors", [3, 20])  # the elementwise and the tensordot branch
def test_combine_outputs_matches_numpy(num_vectors):
    with float64():
        rng = np.random.default_rng(num_vectors)
        f0 = rng.normal(size=(4, 3))
        jvps = rng.normal(size=(num_vectors, 4, 3))
        coefficients = rng.normal(size=(2, 5, num_vectors))
        got = jax.jit(taskvec.combine_outputs)(f0, jvps, coefficients)
        want = f0 + np.einsum("abn,nij->abij", coefficients, jvps)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
