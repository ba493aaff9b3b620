"""functional(): the pure apply_fn and params pytree, under jit, grad, vmap and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxmtl.models import MLP, functional
from tests.models import tiny


def normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


CASES = {
    "mlp": (tiny.mlp, lambda: normal((3, tiny.HIDDEN))),
    "cnn": (tiny.cnn, lambda: normal((2, 8, 8, tiny.CHANNELS))),
    "vit": (tiny.vit, lambda: normal((2, tiny.IMAGE, tiny.IMAGE, tiny.CHANNELS))),
    "lm": (tiny.lm, lambda: jnp.asarray([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], jnp.int32)),
    "multihead": (tiny.multihead, lambda: normal((3, tiny.HIDDEN))),
}

# test_modules.py::test_bfloat16_compute_with_float32_params jits these two.
JITTED_ELSEWHERE = ("cnn", "lm")


def assert_trees_close(actual, expected, **tolerance):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, **tolerance)


@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_equals_module_call_eager_and_jitted(name):
    build, make_input = CASES[name]
    module, x = build(), make_input()
    apply_fn, params = functional(module)
    expected = module(x)
    assert_trees_close(apply_fn(params, x), expected, rtol=0, atol=0)
    if name in JITTED_ELSEWHERE:  # each jit of a new model is one more compile
        return
    assert_trees_close(jax.jit(apply_fn)(params, x), expected, rtol=1e-5, atol=1e-6)


def test_params_are_a_plain_nested_dict_of_arrays():
    _, params = functional(tiny.mlp())
    assert type(params) is dict
    assert jax.tree.map(jnp.shape, params) == {
        "layers": {
            0: {"bias": (tiny.DIM,), "kernel": (tiny.HIDDEN, tiny.DIM)},
            1: {"bias": (tiny.OUT,), "kernel": (tiny.DIM, tiny.OUT)},
        }
    }
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert all(isinstance(k, jax.tree_util.DictKey) for path in paths for k in path)
    doubled = jax.tree.map(lambda p: 2 * p, params)
    assert type(doubled) is dict


def test_apply_has_no_side_effects_on_the_module():
    module = tiny.mlp()
    x = normal((3, tiny.HIDDEN))
    before = module(x)
    apply_fn, params = functional(module)
    zeroed = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_array_equal(apply_fn(zeroed, x), np.zeros((3, tiny.OUT), np.float32))
    np.testing.assert_array_equal(jax.jit(apply_fn)(zeroed, x), np.zeros((3, tiny.OUT)))
    np.testing.assert_array_equal(module(x), before)
    assert_trees_close(functional(module)[1], params, rtol=0, atol=0)


def test_non_param_state_is_frozen_at_the_split():
    class Noisy(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(tiny.HIDDEN, tiny.OUT, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.dropout(self.linear(x))

    module = Noisy(nnx.Rngs(0))
    x = normal((4, tiny.HIDDEN))
    apply_fn, params = functional(module)
    count = int(module.dropout.rngs.count[...])
    first = jax.jit(apply_fn)(params, x)
    np.testing.assert_array_equal(jax.jit(apply_fn)(params, x), first)  # the same key
    np.testing.assert_array_equal(apply_fn(params, x), first)
    assert int(module.dropout.rngs.count[...]) == count
    # Calling the module itself advances its RNG, so the masks differ: the freeze is real.
    assert not np.array_equal(module(x), module(x))


def test_method_option_applies_that_method():
    model = tiny.multihead()
    x = normal((3, tiny.HIDDEN))
    features_fn, params = functional(model, method="features")
    heads_fn, _ = functional(model, method="heads")
    z = features_fn(params, x)
    np.testing.assert_array_equal(z, model.features(x))
    assert_trees_close(heads_fn(params, z), model(x), rtol=0, atol=0)


def test_grad_through_apply_matches_hand_derivation():
    # y = x W + b and L = sum(y * c): dL/dW = x^T c, dL/db = sum_n c.
    apply_fn, params = functional(MLP(tiny.HIDDEN, [], tiny.OUT, rngs=nnx.Rngs(0)))
    x, c = normal((3, tiny.HIDDEN), seed=1), normal((3, tiny.OUT), seed=2)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply_fn(p, x) * c)))(params)
    layer = grads["layers"][0]
    np.testing.assert_allclose(layer["kernel"], np.asarray(x).T @ np.asarray(c), rtol=1e-5)
    np.testing.assert_allclose(layer["bias"], np.asarray(c).sum(axis=0), rtol=1e-5)


def test_check_grads_in_float64():
    with jax.enable_x64(True):
        mlp = MLP(3, [4], 2, activation=jnp.tanh, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        apply_fn, params = functional(mlp)
        x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 3)))
        loss = jax.jit(lambda p: jnp.sum(apply_fn(p, x) ** 2))
        check_grads(loss, (params,), order=1, modes=["rev"])


def test_optax_adam_on_params_under_jit():
    apply_fn, params = functional(tiny.mlp())
    x, y = normal((8, tiny.HIDDEN), seed=4), normal((8, tiny.OUT), seed=5)
    optimizer = optax.adam(1e-2)

    def loss_fn(p):
        return jnp.mean((apply_fn(p, x) - y) ** 2)

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        # optax 0.2.8's adam bias correction computes `decay ** count` (Python float ** int32),
        # which strict promotion rejects; the models and params are not involved.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss, grads

    state = optimizer.init(params)
    new_params, state, first_loss, grads = step(params, state)
    # Adam's first step is -lr * m / (sqrt(v) + eps) = -lr * g / (|g| + eps): a signed step.
    expected = jax.tree.map(lambda p, g: p - 1e-2 * g / (jnp.abs(g) + 1e-8), params, grads)
    assert_trees_close(new_params, expected, rtol=1e-5, atol=1e-7)
    for _ in range(20):
        new_params, state, loss, _ = step(new_params, state)
    assert float(loss) < 0.8 * float(first_loss)


def test_vmap_over_a_stack_of_params():
    apply_fn, params = functional(tiny.mlp())
    x = normal((3, tiny.HIDDEN), seed=6)
    scaled = jax.tree.map(lambda p: 0.5 * p, params)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, scaled)
    outputs = jax.jit(jax.vmap(apply_fn, in_axes=(0, None)))(stacked, x)
    np.testing.assert_allclose(outputs[0], apply_fn(params, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[1], apply_fn(scaled, x), rtol=1e-5, atol=1e-6)


def test_bad_params_and_arguments():
    apply_fn, params = functional(tiny.mlp())
    x = jnp.ones((1, tiny.HIDDEN))
    with pytest.raises(ValueError, match=r"missing \['layers/1/bias'\]"):
        apply_fn(
            {"layers": {0: params["layers"][0], 1: {"kernel": params["layers"][1]["kernel"]}}}, x
        )
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        apply_fn({**params, "extra": jnp.ones(2)}, x)
    wrong = jax.tree.map(lambda p: p, params)
    wrong["layers"][0]["bias"] = jnp.ones(tiny.DIM + 1)
    with pytest.raises(ValueError, match=r"shape \(8,\) at layers/0/bias, got \(9,\)"):
        apply_fn(wrong, x)
    with pytest.raises(TypeError, match="params"):
        apply_fn(list(jax.tree.leaves(params)), x)
    with pytest.raises(TypeError, match="module"):
        functional(lambda x: x)
    with pytest.raises(ValueError, match="method"):
        functional(tiny.mlp(), method="features")
