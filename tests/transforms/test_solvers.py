"""The fixed-iteration solvers against brute-force float64 references."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxmtl.transforms import _solvers as S

K = 4


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def enumerate_nonnegative_qp(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """min 1/2 x^T q x + c^T x, x >= 0, by checking the KKT conditions on every support."""
    k = len(c)
    best, best_value = None, np.inf
    for size in range(k + 1):
        for support in itertools.combinations(range(k), size):
            x = np.zeros(k)
            if support:
                idx = list(support)
                x[idx] = np.linalg.solve(q[np.ix_(idx, idx)], -c[idx])
            grad = q @ x + c
            if np.all(x >= -1e-12) and np.all(grad >= -1e-9):
                value = 0.5 * x @ q @ x + c @ x
                if value < best_value:
                    best, best_value = x, value
    return best


@functools.cache
def _jitted(name):
    fns = {
        "nnqp": lambda q, c: S.nonnegative_qp(q, c, iterations=S.default_iterations(K)),
        "simplex": S.project_onto_simplex,
        "fair": lambda g, a: S.fair_allocation(g, alpha=a, iterations=30),
    }
    return jax.jit(fns[name])


@given(seed=st.integers(0, 2**31 - 1), rank=st.sampled_from([2, 4]))
def test_nonnegative_qp_matches_enumeration(x64, seed, rank):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(K, rank)) + rng.normal() * 0.5
    q = a @ a.T + 1e-3 * np.eye(K)
    c = rng.normal(size=K)
    expected = enumerate_nonnegative_qp(q, c)
    got = np.asarray(_jitted("nnqp")(jnp.asarray(q), jnp.asarray(c)))
    assert np.all(got >= 0)
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-8 * np.abs(expected).max())


@given(seed=st.integers(0, 2**31 - 1))
def test_simplex_projection_is_the_nearest_simplex_point(x64, seed):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=K) * 3
    p = np.asarray(_jitted("simplex")(jnp.asarray(v)))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    assert np.all(p >= 0)
    # Optimality: (v - p) . (s - p) <= 0 for every vertex s of the simplex.
    assert np.all((np.eye(K) - p) @ (v - p) <= 1e-10)


@given(seed=st.integers(0, 2**31 - 1), alpha=st.sampled_from([0.5, 1.0, 2.0, 5.0]))
def test_fair_allocation_solves_its_equation(x64, seed, alpha):
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(K, 6)) * np.exp(rng.uniform(-2, 2, size=(K, 1)))
    g = j @ j.T
    w = np.asarray(_jitted("fair")(jnp.asarray(g), alpha))
    assert np.all(w > 0)
    np.testing.assert_allclose(g @ w, w ** (-1.0 / alpha), rtol=1e-6)


def test_min_norm_in_simplex_two_tasks_closed_form(x64):
    """Sener & Koltun (2018), Alg. 1: gamma = clip((g2 - g1).g2 / ||g1 - g2||^2, 0, 1)."""
    g1, g2 = np.array([1.0, 2.0, -1.0]), np.array([-2.0, 0.5, 1.0])
    gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    j = np.stack([g1, g2])
    a = S.min_norm_in_simplex(jnp.asarray(j @ j.T), iterations=8)
    np.testing.assert_allclose(np.asarray(a), [gamma, 1 - gamma], rtol=1e-8)
