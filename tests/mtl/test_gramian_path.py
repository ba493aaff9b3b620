"""The Gramian-only path against the materialised Jacobian of ``jaxmtl.mtl.task_gradients``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl import mtl
from jaxmtl.mtl import gramian_path as gp
from jaxmtl.transforms import weighting as W


def _scale_layer(p, x):
    """A generic layer: a learned elementwise scale and shift."""
    return x * p["scale"] + p["shift"]


def _model(seed: int, k: int, *, sequence: bool = False):
    rng = np.random.default_rng(seed)
    d_in, hidden = 6, 5
    shape = (4, 3, d_in) if sequence else (7, d_in)
    x = jnp.asarray(rng.normal(size=shape))
    layers = [
        gp.dense(),
        gp.function(jnp.tanh),
        gp.generic(_scale_layer),
        gp.dense(),
        gp.function(jax.nn.relu),
    ]
    trunk = [
        {
            "w": jnp.asarray(rng.normal(size=(d_in, hidden))),
            "b": jnp.asarray(rng.normal(size=hidden)),
        },
        None,
        {
            "scale": jnp.asarray(rng.normal(size=hidden)),
            "shift": jnp.asarray(rng.normal(size=hidden)),
        },
        {"w": jnp.asarray(rng.normal(size=(hidden, hidden)))},  # no bias
        None,
    ]
    heads = jnp.asarray(rng.normal(size=(k, hidden)))
    targets = jnp.asarray(rng.normal(size=(k,)))

    def from_features(h, z, y):
        pooled = z.reshape(-1, z.shape[-1]).mean(0)
        return (h @ pooled - y) ** 2 + jnp.arange(k, dtype=pooled.dtype) * jnp.sum(pooled**2)

    def task_losses(params, x, y):
        z = x
        for layer, p in zip(layers, params["trunk"], strict=True):
            z = layer.apply(p, z)
        return from_features(params["heads"], z, y)

    params = {"trunk": trunk, "heads": heads}
    return layers, from_features, task_losses, params, x, targets


def _is_trunk(path) -> bool:
    return path[0].key == "trunk"


@pytest.mark.parametrize("strategy", ["kernel", "form", "auto"])
@pytest.mark.parametrize("sequence", [False, True])
def test_gramian_equals_the_materialised_one(x64, strategy, sequence):
    layers, from_features, task_losses, params, x, y = _model(0, 3, sequence=sequence)
    losses, grads = mtl.task_gradients(task_losses, params, x, y, shared=_is_trunk)
    expected = mtl.gramian(grads, _is_trunk)
    got_losses, got = gp.task_gramian(
        layers, from_features, params["trunk"], params["heads"], x, y, strategy=strategy
    )
    np.testing.assert_allclose(got_losses, losses, rtol=1e-12)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("strategy", ["kernel", "form"])
def test_weighted_gradients_equal_combine_of_the_jacobian(x64, strategy):
    layers, from_features, task_losses, params, x, y = _model(1, 3)
    _, grads = mtl.task_gradients(task_losses, params, x, y, shared=_is_trunk)
    weighting = W.upgrad()
    expected_w, _ = weighting.weights(mtl.gramian(grads, _is_trunk), ())
    expected = mtl.combine(expected_w, grads, _is_trunk)

    step = jax.jit(
        lambda p, x, y: gp.weighted_gradients(
            layers,
            from_features,
            p["trunk"],
            p["heads"],
            x,
            y,
            weigh=lambda g: weighting.weights(g, ()),
            strategy=strategy,
        )
    )(params, x, y)
    np.testing.assert_allclose(step.weights, expected_w, rtol=1e-8)
    for got, want in zip(
        jax.tree.leaves(step.trunk_grads), jax.tree.leaves(expected["trunk"]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(step.head_grads, expected["heads"], rtol=1e-10)
    assert jax.tree.structure(step.trunk_grads) == jax.tree.structure(params["trunk"])


def test_float32_inputs_accumulate_in_float32():
    layers, from_features, _, params, x, y = _model(2, 2)
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    _, g = gp.task_gramian(layers, from_features, params32["trunk"], params32["heads"], x, y)
    assert g.dtype == jnp.float32 and g.shape == (2, 2)


def test_strategy_follows_the_multiply_add_count():
    """The counts stated in the module docstring (batch 256, K = 4)."""
    assert gp._dense_strategy(256, 784, 256, 4, "auto") == "kernel"
    assert gp._dense_strategy(256, 256, 256, 4, "auto") == "form"
    assert gp._dense_strategy(16, 256, 256, 16, "auto") == "kernel"
    assert gp._dense_strategy(256, 784, 256, 4, "form") == "form"


def test_bad_input_is_reported():
    layers, from_features, _, params, x, y = _model(0, 2)
    with pytest.raises(ValueError, match="trunk_params"):
        gp.task_gramian(layers, from_features, params["trunk"][:2], params["heads"], x, y)
    with pytest.raises(TypeError, match="layers"):
        gp.task_gramian([jnp.tanh], from_features, [None], params["heads"], x, y)
    with pytest.raises(ValueError, match="strategy"):
        gp.task_gramian(layers, from_features, params["trunk"], params["heads"], x, y, strategy="x")
    bad = [{"w": jnp.ones((3, 5))}, *params["trunk"][1:]]
    with pytest.raises(ValueError, match="dense layer"):
        gp.task_gramian(layers, from_features, bad, params["heads"], x, y)
    with pytest.raises(ValueError, match="weigh"):
        gp.weighted_gradients(
            layers,
            from_features,
            params["trunk"],
            params["heads"],
            x,
            y,
            weigh=lambda g: (jnp.ones(3), None),
        )
    with pytest.raises(ValueError, match="task_losses_from_features"):
        gp.task_gramian(layers, lambda h, z, y: z.sum(), params["trunk"], params["heads"], x, y)
