"""Tests of jaxmtl.analysis.embedding: hand values and brute-force float64 references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl.analysis import embedding


def _unit(rng, n, d):
    z = rng.normal(size=(n, d))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_uniformity_hand_value_and_reference(x64):
    np.testing.assert_allclose(embedding.uniformity(jnp.array([[1.0, 0.0], [-1.0, 0.0]])), -8.0)
    z = _unit(np.random.default_rng(0), 7, 3)
    pairs = [(i, j) for i, j in itertools.permutations(range(7), 2)]
    want = np.log(np.mean([np.exp(-2.0 * np.sum((z[i] - z[j]) ** 2)) for i, j in pairs]))
    np.testing.assert_allclose(jax.jit(embedding.uniformity)(jnp.asarray(z)), want, rtol=1e-10)


def test_uniformity_prefers_spread_points():
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    spread = np.stack([np.cos(angles), np.sin(angles)], 1)
    bunched = np.stack([np.cos(angles / 8), np.sin(angles / 8)], 1)
    f = jax.jit(embedding.uniformity)
    assert float(f(jnp.asarray(spread, jnp.float32))) < float(f(jnp.asarray(bunched, jnp.float32)))
    far = jnp.asarray(spread * 100.0, jnp.float32)  # every exp underflows: still finite
    assert np.isfinite(float(f(far)))


def test_tolerance_values(x64):
    z = _unit(np.random.default_rng(1), 6, 3)
    labels = np.array([0, 0, 1, 1, 1, 2])
    pairs = [(i, j) for i, j in itertools.permutations(range(6), 2) if labels[i] == labels[j]]
    want = np.mean([z[i] @ z[j] for i, j in pairs])
    got = jax.jit(embedding.tolerance)(jnp.asarray(z), jnp.asarray(labels))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    same = jnp.tile(jnp.array([[0.6, 0.8]]), (4, 1))
    np.testing.assert_allclose(embedding.tolerance(same, jnp.zeros(4, jnp.int32)), 1.0, rtol=1e-6)
    assert float(embedding.tolerance(same, jnp.arange(4))) == 0.0  # no same-class pair


@pytest.mark.parametrize(
    ("tau", "expected"),
    [(0.1, [0.999089, 0.000911]), (0.5, [0.802184, 0.197816]), (1.0, [0.668188, 0.331812])],
)
def test_negative_penalty_hand_values(tau, expected):
    r = embedding.negative_penalty(jnp.array([[0.8, 0.1]]), temperature=tau)
    np.testing.assert_allclose(r[0], expected, atol=2e-6)


def test_penalty_entropy_grows_with_temperature():
    sims = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, 6)), jnp.float32)
    taus = [0.01, 0.05, 0.1, 0.3, 1.0, 10.0]
    entropy = np.stack([embedding.penalty_entropy(sims, temperature=t) for t in taus])
    assert np.all(np.diff(entropy, axis=0) > 0)
    np.testing.assert_allclose(
        embedding.penalty_entropy(sims, temperature=1e4), np.log(6.0), rtol=1e-4
    )


def test_recall_at_k_reference():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(20, 4))
    labels = rng.integers(0, 4, 20)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    sims = zn @ zn.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)
    want = [np.mean([np.any(labels[order[i, :k]] == labels[i]) for i in range(20)]) for k in (1, 3)]
    recall = jax.jit(embedding.recall_at_k, static_argnames=("ks",))
    got = recall(jnp.asarray(z, jnp.float32), jnp.asarray(labels, jnp.int32), ks=(1, 3))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_recall_excludes_the_query_itself():
    z = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3)), jnp.float32)
    np.testing.assert_allclose(embedding.recall_at_k(z, jnp.arange(5), ks=(1, 4)), [0.0, 0.0])
    np.testing.assert_allclose(embedding.recall_at_k(z, jnp.zeros(5, jnp.int32), ks=(1,)), [1.0])


def test_errors():
    z = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"ks: expected ints in \[1, 3\]"):
        embedding.recall_at_k(z, jnp.arange(4), ks=(4,))
    with pytest.raises(ValueError, match=r"labels: expected integer labels of shape \(4,\)"):
        embedding.tolerance(z, jnp.arange(3))
    with pytest.raises(ValueError, match=r"z: expected shape \(N, D\) with N >= 2"):
        embedding.uniformity(jnp.ones((1, 2)))
    with pytest.raises(TypeError, match=r"z: expected a floating-point array"):
        embedding.uniformity(jnp.ones((3, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"temperature: expected a value > 0, got -1"):
        embedding.negative_penalty(z, temperature=-1)
