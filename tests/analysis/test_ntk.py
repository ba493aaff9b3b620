"""Empirical NTK Gram matrix and eigenfunction localization (Ortiz-Jimenez et al., 2023, Sec. 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxmtl.analysis import ntk
from tests.taskvec.helpers import float64, mlp_apply, mlp_params, separable_apply, separable_setup

# jitted once per model: eager dispatch of many tiny ops dominates these tests otherwise
ntk_gram = jax.jit(ntk.ntk_gram, static_argnums=0, static_argnames="kind")
eigenfunction_localization = jax.jit(
    ntk.eigenfunction_localization, static_argnums=2, static_argnames="top"
)


SIZES = (3, 5, 2)


def _jacobian_matrix(apply_fn, params, x):
    """(N, C, P) Jacobian of the flattened parameter vector, by jax.jacrev."""
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.jacrev(lambda v: apply_fn(unravel(v), x)))(flat))


def test_gram_equals_j_jt_and_is_symmetric_psd():
    with float64():
        p0 = mlp_params(0, SIZES, jnp.float64)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(6, SIZES[0])))
        jac = _jacobian_matrix(mlp_apply, p0, x)
        trace = np.asarray(ntk_gram(mlp_apply, p0, x))
        full = np.asarray(ntk_gram(mlp_apply, p0, x, kind="full"))
        np.testing.assert_allclose(trace, np.einsum("ncp,mcp->nm", jac, jac), rtol=1e-12)
        np.testing.assert_allclose(full, np.einsum("ncp,mdp->nmcd", jac, jac), rtol=1e-12)
        np.testing.assert_allclose(trace, trace.T, rtol=1e-13)
        assert np.linalg.eigvalsh(trace).min() > -1e-10 * np.abs(trace).max()
        np.testing.assert_allclose(np.einsum("nmcc->nm", full), trace, rtol=1e-12)


def test_linear_model_kernel_by_hand():
    # f(x) = x @ W, W (d, C): Theta_cd(x, x') = [c == d] <x, x'>; the trace is C <x, x'>
    x = jnp.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])
    params = {"w": jnp.zeros((2, 3))}
    f = lambda p, x: x @ p["w"]
    np.testing.assert_allclose(ntk_gram(f, params, x), 3.0 * np.asarray(x @ x.T))
    full = np.asarray(ntk_gram(f, params, x, kind="full"))
    np.testing.assert_allclose(full[:, :, 0, 1], 0.0)
    np.testing.assert_allclose(full[:, :, 2, 2], np.asarray(x @ x.T))
    scalar = ntk_gram(lambda p, x: x @ p["w"][:, 0], params, x)
    np.testing.assert_allclose(scalar, np.asarray(x @ x.T))


def test_block_separable_model_has_one_hot_localization():
    with float64():
        p0, _, _, x1, x2 = separable_setup()
        x = jnp.concatenate([x1, x2])
        task_ids = jnp.asarray([0] * len(x1) + [1] * len(x2), jnp.int32)
        gram = ntk_gram(separable_apply, p0, x)
        np.testing.assert_allclose(gram[: len(x1), len(x1) :], 0.0, atol=1e-12)
        values, mass = eigenfunction_localization(gram, task_ids, 2, top=8)
        assert values.shape == (8,) and mass.shape == (8, 2)
        assert np.all(np.diff(np.asarray(values)) <= 0)
        assert np.min(np.abs(np.diff(np.asarray(values)))) > 1e-6  # non-degenerate spectrum
        np.testing.assert_allclose(mass.sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(np.max(mass, axis=1), 1.0, atol=1e-9)


def test_coupled_model_eigenvectors_spread_over_tasks():
    with float64():
        p0 = mlp_params(0, SIZES, jnp.float64)
        x = jnp.asarray(np.random.default_rng(2).normal(size=(8, SIZES[0])))
        task_ids = jnp.asarray([0, 1] * 4, jnp.int32)
        _, mass = eigenfunction_localization(ntk_gram(mlp_apply, p0, x), task_ids, 2, top=2)
        assert float(jnp.max(mass[0])) < 0.99


def test_localization_by_hand():
    gram = jnp.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]])
    values, mass = eigenfunction_localization(gram, jnp.array([0, 0, 1]), 2)
    np.testing.assert_allclose(values, [5.0, 3.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(mass, [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], atol=1e-6)
    values, mass = eigenfunction_localization(gram, jnp.array([0, 1, 1]), 2, top=2)
    np.testing.assert_allclose(mass, [[0.0, 1.0], [0.5, 0.5]], atol=1e-6)


def test_bad_inputs_are_reported():
    params = {"w": jnp.zeros((2, 3))}
    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="kind"):
        ntk_gram(lambda p, x: x @ p["w"], params, x, kind="diag")
    with pytest.raises(ValueError, match="apply_fn"):
        ntk_gram(lambda p, x: (x @ p["w"])[None], params, x)
    with pytest.raises(TypeError, match="apply_fn"):
        ntk_gram(None, params, x)
    with pytest.raises(ValueError, match="gram"):
        eigenfunction_localization(jnp.ones((2, 3)), jnp.array([0, 1]), 2)
    with pytest.raises(ValueError, match="task_ids"):
        eigenfunction_localization(jnp.eye(2), jnp.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="num_tasks"):
        eigenfunction_localization(jnp.eye(2), jnp.array([0, 1]), 0)
    with pytest.raises(ValueError, match="top"):
        eigenfunction_localization(jnp.eye(2), jnp.array([0, 1]), 2, top=3)
