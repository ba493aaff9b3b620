"""Task vectors and task arithmetic as pytree operations (Ilharco et al., ICLR 2023, Eq. 1-2)."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmtl import taskvec
from tests.taskvec.helpers import flat, float64, mlp_params, random_like


def _params(seed=0):
    return mlp_params(seed, (3, 4, 2))


def test_task_vector_is_the_difference_and_applies_back():
    p0 = _params(0)
    ft = random_like(1, p0)
    tau = taskvec.task_vector(ft, p0)
    np.testing.assert_allclose(flat(tau), flat(ft) - flat(p0), rtol=1e-6)
    back = taskvec.apply(p0, [tau], 1.0)
    np.testing.assert_allclose(flat(back), flat(ft), rtol=1e-6, atol=1e-6)


def test_apply_matches_numpy_reference_in_both_forms():
    with float64():
        p0 = mlp_params(0, (3, 4, 2), jnp.float64)
        taus = [random_like(s, p0) for s in (1, 2, 3)]
        coefficients = np.array([0.5, -1.25, 2.0])
        want = flat(p0) + sum(c * flat(t) for c, t in zip(coefficients, taus, strict=True))
        from_sequence = taskvec.apply(p0, taus, jnp.asarray(coefficients))
        from_stacked = taskvec.apply(p0, taskvec.stack(taus), jnp.asarray(coefficients))
        np.testing.assert_allclose(flat(from_sequence), want, rtol=1e-13)
        np.testing.assert_array_equal(flat(from_stacked), flat(from_sequence))
        shared = taskvec.apply(p0, taus, 0.5)
        np.testing.assert_allclose(
            flat(shared), flat(p0) + 0.5 * sum(flat(t) for t in taus), rtol=1e-13
        )


def test_apply_jits_with_traced_coefficients_and_keeps_leaf_dtypes():
    p0 = {"w": jnp.ones(3, jnp.float32), "h": jnp.ones(2, jnp.bfloat16)}
    taus = taskvec.stack([jax.tree.map(jnp.ones_like, p0)] * 2)
    out = jax.jit(taskvec.apply)(p0, taus, jnp.array([1.0, -3.0]))
    assert out["w"].dtype == jnp.float32 and out["h"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["w"], -np.ones(3))


@hypothesis.given(
    st.floats(-3, 3, allow_nan=False, width=32), st.floats(-3, 3, allow_nan=False, width=32)
)
@hypothesis.settings(max_examples=10)
def test_apply_is_affine_in_the_coefficients(a, b):
    with float64():
        p0 = mlp_params(0, (2, 3), jnp.float64)
        taus = taskvec.stack([random_like(1, p0)])
        delta = lambda c: flat(taskvec.apply(p0, taus, jnp.asarray([c]))) - flat(p0)
        np.testing.assert_allclose(delta(a + b), delta(a) + delta(b), atol=1e-12)


def test_stack_unstack_round_trip():
    taus = [random_like(s, _params()) for s in range(3)]
    stacked = taskvec.stack(taus)
    assert jax.tree.leaves(stacked)[0].shape[0] == 3
    for original, back in zip(taus, taskvec.unstack(stacked), strict=True):
        np.testing.assert_array_equal(flat(original), flat(back))


def test_analogy_and_optax_arithmetic():
    a, b, c = (random_like(s, _params()) for s in range(3))
    np.testing.assert_allclose(
        flat(taskvec.analogy(a, b, c)), flat(a) - flat(b) + flat(c), rtol=1e-6, atol=1e-6
    )
    # the documented optax.tree equivalents of negation, dot and norm
    np.testing.assert_allclose(flat(optax.tree.scale(-1.0, a)), -flat(a))
    np.testing.assert_allclose(float(optax.tree.vdot(a, b)), flat(a) @ flat(b), rtol=1e-5)
    np.testing.assert_allclose(float(optax.tree.norm(a)), np.linalg.norm(flat(a)), rtol=1e-5)


def test_cosine_similarities_match_numpy():
    p0 = _params()
    taus = [random_like(s, p0) for s in range(3)] + [jax.tree.map(jnp.zeros_like, p0)]
    got = np.asarray(taskvec.cosine_similarities(taus, p0))
    rows = np.stack([flat(t) for t in taus])
    norms = np.linalg.norm(rows, axis=1)
    want = np.zeros((4, 4))
    want[:3, :3] = rows[:3] @ rows[:3].T / np.outer(norms[:3], norms[:3])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_reported():
    p0 = _params()
    tau = random_like(0, p0)
    with pytest.raises(ValueError, match="finetuned"):
        taskvec.task_vector({"l0": p0["l0"]}, p0)
    with pytest.raises(ValueError, match="finetuned: expected shape"):
        taskvec.task_vector(jax.tree.map(lambda a: a[..., :1], p0), p0)
    with pytest.raises(ValueError, match="coefficients"):
        taskvec.apply(p0, [tau, tau], jnp.ones(3))
    with pytest.raises(TypeError, match="coefficients"):
        taskvec.apply(p0, [tau], jnp.array([True]))
    with pytest.raises(ValueError, match="vectors"):
        taskvec.apply(p0, [], 1.0)
    with pytest.raises(ValueError, match="vectors"):  # a stacked leaf without the leading axis
        taskvec.apply(p0, jax.tree.map(lambda a: a[None], p0) | {"l0": p0["l0"]}, 1.0)
    with pytest.raises(ValueError, match="vectors"):
        taskvec.apply(p0, {"w": jnp.ones(3)}, 1.0)
    with pytest.raises(ValueError, match="vectors"):
        taskvec.stack([])
