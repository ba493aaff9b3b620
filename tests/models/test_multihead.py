"""MultiHead: features/heads, the shared/head split, and per-task gradients through jaxmtl.mtl."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmtl import mtl
from jaxmtl.models import (
    functional,
    is_shared,
    merge_multihead,
    multihead_functional,
    split_multihead,
)
from tests.models import tiny


def normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def assert_trees_close(actual, expected, **tolerance):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, **tolerance)


X = normal((4, tiny.HIDDEN), seed=1)
Y = (jnp.array([0, 1, 4, 2]), jnp.array([15, 3, 0, 7]))  # labels for the two heads


def task_losses_from_logits(logits):
    return jnp.stack(
        [
            optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
            for out, y in zip(logits, Y, strict=True)
        ]
    )


def test_features_then_heads_equals_call():
    model = tiny.multihead()
    logits = model(X)
    assert [y.shape for y in logits] == [(4, tiny.OUT), (4, tiny.HIDDEN)]
    for a, b in zip(model.heads(model.features(X)), logits, strict=True):
        np.testing.assert_array_equal(a, b)


def test_split_merge_and_the_shared_predicate():
    model = tiny.multihead()
    params = functional(model)[1]
    trunk_params, head_params = split_multihead(params)
    assert_trees_close(trunk_params, functional(model.trunk)[1], rtol=0, atol=0)
    assert_trees_close(head_params, functional(model.task_heads)[1], rtol=0, atol=0)
    assert merge_multihead(trunk_params, head_params) == params
    mask = jax.tree_util.tree_map_with_path(lambda path, _: is_shared(path), params)
    assert jax.tree.leaves(mask["trunk"]) == [True] * 4
    assert jax.tree.leaves(mask["task_heads"]) == [False] * 4
    assert not is_shared(())
    with pytest.raises(ValueError, match="trunk"):
        split_multihead(trunk_params)


def test_multihead_functional_pieces_match_the_module():
    model = tiny.multihead()
    encode, heads, trunk_params, head_params = multihead_functional(model)
    z = jax.jit(encode)(trunk_params, X)
    np.testing.assert_allclose(z, model.features(X), rtol=1e-6, atol=1e-6)
    assert_trees_close(jax.jit(heads)(head_params, z), model(X), rtol=1e-6, atol=1e-6)
    assert_trees_close(
        merge_multihead(trunk_params, head_params), functional(model)[1], rtol=0, atol=0
    )
    with pytest.raises(TypeError, match="MultiHead"):
        multihead_functional(tiny.mlp())


def test_per_task_gradients_through_jaxmtl_mtl():
    model = tiny.multihead()
    apply_fn, params = functional(model)
    encode, heads, trunk_params, head_params = multihead_functional(model)

    def task_losses(p):
        return task_losses_from_logits(apply_fn(p, X))

    @jax.jit
    def both_forms(params, trunk_params, head_params):
        losses, grads = mtl.task_gradients(task_losses, params, shared=is_shared)
        separate = [jax.grad(lambda p, k=k: task_losses(p)[k])(params) for k in range(len(Y))]
        representation = mtl.representation_gradients(
            encode,
            lambda h, z, _: task_losses_from_logits(heads(h, z)),
            trunk_params,
            head_params,
            X,
            None,
        )
        return losses, grads, separate, representation

    losses, grads, separate, (rep_losses, rep_trunk, rep_heads, _) = both_forms(
        params, trunk_params, head_params
    )
    # Shared (trunk) leaves carry the task axis; task k's row is the gradient of L_k alone.
    for k in range(len(Y)):
        assert_trees_close(
            jax.tree.map(lambda g, k=k: g[k], grads["trunk"]),
            separate[k]["trunk"],
            rtol=1e-5,
            atol=1e-6,
        )
        # Head k gets only its own task's gradient.
        np.testing.assert_allclose(
            grads["task_heads"]["layers"][k]["kernel"],
            separate[k]["task_heads"]["layers"][k]["kernel"],
            rtol=1e-5,
            atol=1e-6,
        )
    # The representation form gives the same per-task trunk gradients and head gradients.
    np.testing.assert_allclose(rep_losses, losses, rtol=1e-6)
    assert_trees_close(rep_trunk, grads["trunk"], rtol=1e-5, atol=1e-6)
    assert_trees_close(rep_heads, grads["task_heads"], rtol=1e-5, atol=1e-6)
