"""aTLAS: learned per-block coefficients (Zhang et al., NeurIPS 2024)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmtl import taskvec
from tests.taskvec.helpers import flat, float64, mlp_apply, mlp_params, random_like

SIZES = (3, 4, 2)


def _setup(dtype=jnp.float32, n=3):
    p0 = mlp_params(0, SIZES, dtype)
    return p0, [random_like(s + 1, p0, scale=0.5) for s in range(n)]


def test_init_is_zero_with_one_coefficient_per_block_and_vector():
    p0, taus = _setup()
    coefs = taskvec.atlas_init(p0, taus)
    assert jax.tree.structure(coefs) == jax.tree.structure(p0)
    assert all(c.shape == (3,) and not c.any() for c in jax.tree.leaves(coefs))
    assert sum(c.size for c in jax.tree.leaves(coefs)) == 3 * len(jax.tree.leaves(p0))
    np.testing.assert_array_equal(flat(taskvec.atlas_apply(p0, taus, coefs)), flat(p0))


@pytest.mark.parametrize("alpha", [0.3, -1.7, 1.0])
def test_equal_coefficients_reduce_exactly_to_isotropic_task_arithmetic(alpha):
    p0, taus = _setup()
    coefs = jax.tree.map(lambda c: jnp.full_like(c, alpha), taskvec.atlas_init(p0, taus))
    got = taskvec.atlas_apply(p0, taus, coefs)
    np.testing.assert_array_equal(flat(got), flat(taskvec.apply(p0, taus, alpha)))
    want = flat(p0) + alpha * sum(flat(t) for t in taus)  # float64 reference
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-5)


def test_blockwise_coefficients_scale_each_leaf_separately():
    p0, taus = _setup(n=2)
    rng = np.random.default_rng(0)
    coefs = jax.tree.map(
        lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32), taskvec.atlas_init(p0, taus)
    )
    got = taskvec.atlas_apply(p0, taus, coefs)
    leaves = (jax.tree.leaves(t) for t in (got, coefs, p0, taus[0], taus[1]))
    for leaf, c, p, t0, t1 in zip(*leaves, strict=True):
        c = np.asarray(c, np.float64)
        want = np.asarray(p, np.float64) + c[0] * np.asarray(t0) + c[1] * np.asarray(t1)
        np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-6)


def test_coefficient_gradient_is_the_blockwise_jvp():
    with float64():
        p0, taus = _setup(jnp.float64, n=2)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(5, SIZES[0])))
        model = taskvec.atlas_model(mlp_apply, p0, taus)
        coefs = jax.tree.map(lambda c: c + 0.3, taskvec.atlas_init(p0, taus))
        readout = lambda c: jnp.sum(model(c, x))
        grads = jax.jit(jax.grad(readout))(coefs)
        theta = taskvec.atlas_apply(p0, taus, coefs)
        for i, tau in enumerate(taus):
            for path, _ in jax.tree_util.tree_leaves_with_path(p0):
                # tau_i restricted to block j: zero everywhere else
                direction = jax.tree_util.tree_map_with_path(
                    lambda q, v, path=path: v if q == path else jnp.zeros_like(v), tau
                )
                _, tangent = jax.jvp(lambda p: jnp.sum(mlp_apply(p, x)), (theta,), (direction,))
                got = next(g for q, g in jax.tree_util.tree_leaves_with_path(grads) if q == path)
                np.testing.assert_allclose(got[i], tangent, rtol=1e-10, atol=1e-12)


def test_linear_mode_is_linearize_at_the_composed_weights():
    p0, taus = _setup()
    x = jnp.ones((4, SIZES[0]))
    coefs = jax.tree.map(lambda c: c + 0.5, taskvec.atlas_init(p0, taus))
    got = taskvec.atlas_model(mlp_apply, p0, taus, mode="linear")(coefs, x)
    want = taskvec.linearize(mlp_apply, p0)(taskvec.atlas_apply(p0, taus, coefs), x)
    np.testing.assert_array_equal(got, want)


def test_fit_converges_to_the_blockwise_least_squares_optimum():
    """Quadratic loss ||theta(Lambda) - theta*||^2: each block is an independent least-squares
    problem in its n coefficients, solved here with numpy.linalg.lstsq."""
    with float64():
        rng = np.random.default_rng(0)
        p0 = {"a": jnp.asarray(rng.normal(size=4)), "b": jnp.asarray(rng.normal(size=(2, 3)))}
        taus = [random_like(s, p0) for s in (1, 2)]
        target = random_like(9, p0)
        objective = lambda c, _: optax.tree.norm(
            optax.tree.sub(taskvec.atlas_apply(p0, taus, c), target), squared=True
        )
        # optax 0.2.8's adam computes `decay ** count` (Python float ** int32), which strict
        # promotion rejects: the library code itself is strict-clean.
        with jax.numpy_dtype_promotion("standard"):
            coefs, losses = taskvec.atlas_fit(
                objective, taskvec.atlas_init(p0, taus), optax.adam(0.05), jnp.zeros(1), steps=1500
            )
        assert losses.shape == (1500,) and losses[-1] < losses[0]
        for key in ("a", "b"):
            basis = np.stack([np.ravel(t[key]) for t in taus], axis=1)  # (size, n)
            rhs = np.ravel(target[key]) - np.ravel(p0[key])
            optimum = np.linalg.lstsq(basis, rhs, rcond=None)[0]
            np.testing.assert_allclose(coefs[key], optimum, rtol=1e-4, atol=1e-5)


def test_fit_cycles_through_batches():
    objective = lambda c, b: jnp.sum((c["w"] - b) ** 2)
    coefs, losses = taskvec.atlas_fit(
        objective, {"w": jnp.zeros(1)}, optax.sgd(0.0), jnp.array([[1.0], [2.0]]), steps=4
    )
    np.testing.assert_allclose(losses, [1.0, 4.0, 1.0, 4.0])
    np.testing.assert_array_equal(coefs["w"], [0.0])


def test_bad_inputs_are_reported():
    p0, taus = _setup()
    coefs = taskvec.atlas_init(p0, taus)
    with pytest.raises(ValueError, match="coefficients"):
        taskvec.atlas_apply(p0, taus, jax.tree.map(lambda c: c[:2], coefs))
    with pytest.raises(ValueError, match="coefficients"):
        taskvec.atlas_apply(p0, taus, {"l0": coefs["l0"]})
    with pytest.raises(ValueError, match="mode"):
        taskvec.atlas_model(mlp_apply, p0, taus, mode="both")
    with pytest.raises(ValueError, match="steps"):
        taskvec.atlas_fit(lambda c, b: 0.0, coefs, optax.sgd(1.0), jnp.zeros((2, 1)), steps=0)
    with pytest.raises(ValueError, match="batches"):
        taskvec.atlas_fit(lambda c, b: 0.0, coefs, optax.sgd(1.0), jnp.float32(1.0))
