"""Weight disentanglement error (Ortiz-Jimenez et al., NeurIPS 2023, Eq. 3) and the
non-linear advantage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl import taskvec
from jaxmtl.analysis import disentanglement
from jaxmtl.analysis.disentanglement import nonlinear_advantage
from tests.taskvec.helpers import (
    FEATURES,
    float64,
    mlp_apply,
    mlp_params,
    random_like,
    separable_apply,
    separable_setup,
)

# jitted (model, heads, mode and chunking static): eager dispatch would dominate the run time
weight_disentanglement_error = jax.jit(
    disentanglement.weight_disentanglement_error,
    static_argnums=0,
    static_argnames=("heads", "mode", "batch_size"),
)


def _heads(seed, features=FEATURES, classes=(3, 5)):
    rng = np.random.default_rng(seed)
    ws = [jnp.asarray(rng.normal(size=(features, c)), jnp.float64) for c in classes]
    return tuple(lambda z, w=w: z @ w for w in ws)


@pytest.mark.parametrize("mode", ["nonlinear", "linear"])
def test_block_separable_model_has_zero_error_on_the_whole_grid(mode):
    with float64():
        p0, tau1, tau2, x1, x2 = separable_setup()
        alphas = jnp.linspace(-3.0, 3.0, 7)
        xi = weight_disentanglement_error(
            separable_apply, p0, tau1, tau2, x1, x2, alphas, heads=_heads(0), mode=mode
        )
        assert xi.shape == (7, 7)
        np.testing.assert_array_equal(xi, 0.0)


def _reference_xi(model, p0, tau1, tau2, x1, x2, alphas, heads):
    """Eq. 3 evaluated point by point: one model evaluation per (alpha pair, task)."""
    predict = jax.jit(lambda z, w: jnp.argmax(z @ w, -1))
    head_w = [h(jnp.eye(FEATURES)) for h in heads]  # the heads are linear: recover matrices
    out = np.zeros((len(alphas), len(alphas)))
    for i, a1 in enumerate(alphas):
        for j, a2 in enumerate(alphas):
            both = taskvec.apply(p0, [tau1, tau2], jnp.array([a1, a2]))
            only1 = taskvec.apply(p0, [tau1], a1)
            only2 = taskvec.apply(p0, [tau2], a2)
            err1 = np.mean(
                np.asarray(predict(model(only1, x1), head_w[0]))
                != np.asarray(predict(model(both, x1), head_w[0]))
            )
            err2 = np.mean(
                np.asarray(predict(model(only2, x2), head_w[1]))
                != np.asarray(predict(model(both, x2), head_w[1]))
            )
            out[i, j] = err1 + err2
    return out


@pytest.mark.parametrize("mode", ["nonlinear", "linear"])
def test_coupled_mlp_matches_the_definition_and_is_not_disentangled(mode):
    with float64():
        p0 = mlp_params(0, (4, 6, FEATURES), jnp.float64)
        tau1, tau2 = random_like(1, p0, scale=0.8), random_like(2, p0, scale=0.8)
        rng = np.random.default_rng(3)
        x1 = jnp.asarray(rng.normal(size=(16, 4)))
        x2 = jnp.asarray(rng.normal(size=(12, 4)))
        alphas = jnp.array([-2.0, 0.0, 1.0, 2.5])
        heads = _heads(4)
        xi = weight_disentanglement_error(
            mlp_apply, p0, tau1, tau2, x1, x2, alphas, heads=heads, mode=mode
        )
        model = mlp_apply if mode == "nonlinear" else taskvec.linearize(mlp_apply, p0)
        want = _reference_xi(jax.jit(model), p0, tau1, tau2, x1, x2, np.asarray(alphas), heads)
        np.testing.assert_allclose(xi, want, atol=1e-6)
        assert xi[1, 1] == 0.0  # alpha = (0, 0): both models are theta_0
        assert float(xi.max()) > 0.1
        assert float(xi.max()) <= 2.0


def test_linear_mode_on_a_model_linear_in_its_parameters_equals_nonlinear_mode():
    with float64():
        rng = np.random.default_rng(0)
        f = lambda p, x: x @ p["w"]
        p0 = {"w": jnp.asarray(rng.normal(size=(3, 4)))}
        tau1, tau2 = random_like(1, p0), random_like(2, p0)
        x1, x2 = (jnp.asarray(rng.normal(size=(9, 3))) for _ in range(2))
        alphas = jnp.linspace(-1.0, 1.0, 5)
        args = (f, p0, tau1, tau2, x1, x2, alphas)
        nonlinear = weight_disentanglement_error(*args, mode="nonlinear", batch_size=4)
        np.testing.assert_allclose(weight_disentanglement_error(*args, mode="linear"), nonlinear)
        assert float(nonlinear.max()) > 0.0


def test_nonlinear_advantage_by_hand():
    # K = 10: (err_lin - err_nonlin) * 10 / 9
    np.testing.assert_allclose(float(nonlinear_advantage(0.82, 0.91, 10)), 0.09 * 10 / 9, 1e-6)
    np.testing.assert_allclose(float(nonlinear_advantage(1.0, 0.5, 2)), -1.0)
    np.testing.assert_allclose(
        nonlinear_advantage(jnp.array([0.5, 0.9]), jnp.array([0.5, 1.0]), 2), [0.0, 0.2], 1e-6
    )


def test_bad_inputs_are_reported():
    with float64():
        p0, tau1, tau2, x1, x2 = separable_setup()
        args = (separable_apply, p0, tau1, tau2, x1, x2)
        with pytest.raises(ValueError, match="mode"):
            weight_disentanglement_error(*args, jnp.zeros(3), mode="tangent")
        with pytest.raises(ValueError, match="alphas"):
            weight_disentanglement_error(*args, jnp.zeros((3, 3)))
        with pytest.raises(ValueError, match="batch_size"):
            weight_disentanglement_error(*args, jnp.zeros(3), batch_size=0)
        with pytest.raises(TypeError, match="alphas"):
            weight_disentanglement_error(*args, jnp.arange(3))
        with pytest.raises(ValueError, match="heads"):
            weight_disentanglement_error(*args, jnp.zeros(3), heads=(_heads(0)[0],))
        with pytest.raises(ValueError, match="heads"):  # outputs are not (batch, classes) logits
            weight_disentanglement_error(
                lambda p, x: separable_apply(p, x)[:, 0], *args[1:], jnp.zeros(3)
            )
        with pytest.raises(ValueError, match="vectors"):
            weight_disentanglement_error(separable_apply, p0, tau1, {"g1": tau2["g1"]}, x1, x2,
                                         jnp.zeros(3))  # fmt: skip
    with pytest.raises(ValueError, match="num_classes"):
        nonlinear_advantage(0.5, 0.5, 1)
    with pytest.raises(TypeError, match="num_classes"):
        nonlinear_advantage(0.5, 0.5, 2.0)
