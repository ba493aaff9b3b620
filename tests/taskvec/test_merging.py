"""TIES-merging (Yadav et al., NeurIPS 2023) and DARE (Yu et al., ICML 2024)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl import taskvec
from tests.taskvec.helpers import flat, float64, mlp_params, random_like


def _ties_numpy(rows: np.ndarray, density: float) -> np.ndarray:
    """Algorithm 1 of the TIES paper on flat vectors (n, d), written entry by entry."""
    n, d = rows.shape
    k = max(1, round(density * d))
    trimmed = np.zeros_like(rows)
    for t in range(n):
        threshold = sorted(np.abs(rows[t]), reverse=True)[k - 1]
        trimmed[t] = np.where(np.abs(rows[t]) >= threshold, rows[t], 0.0)
    merged = np.zeros(d)
    for p in range(d):
        elected = np.sign(trimmed[:, p].sum())
        agreeing = [v for v in trimmed[:, p] if v != 0 and np.sign(v) == elected]
        merged[p] = np.mean(agreeing) if agreeing else 0.0
    return merged


def _hand_vectors():
    return [
        {"a": jnp.array([4.0, -1.0]), "b": jnp.array([0.5, -3.0, 2.0])},
        {"a": jnp.array([-2.0, 3.0]), "b": jnp.array([1.0, -1.0, -5.0])},
        {"a": jnp.array([1.0, -0.5]), "b": jnp.array([-4.0, 2.0, 0.1])},
    ]


def test_ties_on_a_hand_checked_example():
    # keep 3 of 5 per vector: [4,0 | 0,-3,2], [-2,3 | 0,0,-5], [1,0 | -4,2,0]
    # elected signs: + + | - - -; disjoint means: (4+1)/2, 3 | -4, -3, -5
    merged = taskvec.ties_merge(_hand_vectors(), density=0.6)
    np.testing.assert_allclose(merged["a"], [2.5, 3.0])
    np.testing.assert_allclose(merged["b"], [-4.0, -3.0, -5.0])
    trimmed = taskvec.ties_trim(_hand_vectors(), density=0.6)
    np.testing.assert_array_equal(trimmed["a"], [[4, 0], [-2, 3], [1, 0]])
    np.testing.assert_array_equal(trimmed["b"], [[0, -3, 2], [0, 0, -5], [-4, 2, 0]])


def test_ties_negative_weight_negates_a_vector_before_merging():
    vectors = _hand_vectors()
    weights = np.array([1.0, -1.0, 1.0])
    rows = np.stack([flat(v) for v in vectors]) * weights[:, None]
    got = taskvec.ties_merge(vectors, density=0.6, weights=jnp.asarray(weights, jnp.float32))
    np.testing.assert_allclose(flat(got), _ties_numpy(rows, 0.6), rtol=1e-6)
    # worked by hand: [4,0|0,-3,2], [2,-3|0,0,5], [1,0|-4,2,0] -> [7/3, -3 | -4, -3, 3.5]
    np.testing.assert_allclose(flat(got), [7 / 3, -3.0, -4.0, -3.0, 3.5], rtol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
def test_ties_matches_numpy_reference_on_random_vectors(density):
    with float64():
        p0 = mlp_params(0, (3, 4, 2), jnp.float64)
        vectors = [random_like(s, p0) for s in range(4)]
        got = jax.jit(lambda v: taskvec.ties_merge(v, density=density))(taskvec.stack(vectors))
        rows = np.stack([flat(v) for v in vectors])
        np.testing.assert_allclose(flat(got), _ties_numpy(rows, density), rtol=1e-12)


def test_ties_zero_sum_and_ties_at_the_threshold():
    # entry 0 sums to zero (sgn 0): merged 0; both magnitudes 2 tie at the k=1 threshold: kept
    merged = taskvec.ties_merge(
        [{"w": jnp.array([2.0, 2.0])}, {"w": jnp.array([-2.0, 1.0])}], density=0.5
    )
    np.testing.assert_allclose(merged["w"], [0.0, 2.0])
    assert taskvec.ties_elect_sign({"w": jnp.array([[1.0], [-1.0]])})["w"].tolist() == [0.0]


def test_dare_rate_zero_is_the_identity():
    tau = random_like(0, mlp_params(0, (3, 4)))
    out = taskvec.dare(tau, jax.random.key(0), rate=0.0)
    np.testing.assert_array_equal(flat(out), flat(tau))


def test_dare_drops_and_rescales_by_one_over_one_minus_p():
    rate = 0.3
    tau = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(200, 100)), jnp.float32)}
    out = np.asarray(taskvec.dare(tau, jax.random.key(1), rate=rate)["w"])
    kept = out != 0
    reference = np.where(kept, np.asarray(tau["w"]) / (1.0 - rate), 0.0)
    np.testing.assert_allclose(out, reference, rtol=1e-6)
    assert abs((1.0 - kept.mean()) - rate) < 0.02  # binomial std ~ 0.003


def test_dare_is_keyed_and_unbiased():
    tau = {"a": jnp.full((50,), 2.0), "b": jnp.full((50,), 2.0)}
    one = taskvec.dare(tau, jax.random.key(3), rate=0.5)
    np.testing.assert_array_equal(flat(one), flat(taskvec.dare(tau, jax.random.key(3), rate=0.5)))
    assert not np.array_equal(flat(one), flat(taskvec.dare(tau, jax.random.key(4), rate=0.5)))
    assert not np.array_equal(one["a"], one["b"])  # each leaf its own mask
    keys = jax.random.split(jax.random.key(5), 400)
    many = jax.jit(jax.vmap(lambda k: taskvec.dare(tau, k, rate=0.5)))(keys)
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x.mean(0), many)), 2.0, atol=0.45)
    np.testing.assert_allclose(flat(many).mean(), 2.0, atol=0.05)


def test_dare_merge_is_the_weighted_sum_of_independently_dropped_vectors():
    p0 = mlp_params(0, (3, 4, 2))
    vectors = [random_like(s, p0) for s in range(3)]
    weights = jnp.array([1.0, -0.5, 2.0])
    key = jax.random.key(7)
    got = jax.jit(lambda v, k, w: taskvec.dare_merge(v, k, rate=0.4, weights=w))(
        vectors, key, weights
    )
    dare = jax.jit(lambda v, k: taskvec.dare(v, k, rate=0.4))
    want = sum(
        float(w) * flat(dare(v, jax.random.fold_in(key, t)))
        for t, (w, v) in enumerate(zip(weights, vectors, strict=True))
    )
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_reported():
    vectors = _hand_vectors()
    with pytest.raises(ValueError, match="density"):
        taskvec.ties_merge(vectors, density=0.0)
    with pytest.raises(ValueError, match="density"):
        taskvec.ties_merge(vectors, density=1.5)
    with pytest.raises(ValueError, match="weights"):
        taskvec.ties_merge(vectors, weights=jnp.ones(2))
    with pytest.raises(ValueError, match="rate"):
        taskvec.dare(vectors[0], jax.random.key(0), rate=1.0)
    with pytest.raises(ValueError, match="rate"):
        taskvec.dare_merge(vectors, jax.random.key(0), rate=-0.1)
    with pytest.raises(TypeError, match="key"):
        taskvec.dare(vectors[0], 0, rate=0.5)
    with pytest.raises(ValueError, match="vectors"):
        taskvec.ties_merge([vectors[0], {"a": jnp.ones(2)}])
