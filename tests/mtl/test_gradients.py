import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl import mtl


def _mlp_params(key, sizes, k_tasks, dtype):
    keys = jax.random.split(key, len(sizes) + k_tasks)
    trunk = [
        {"w": jax.random.normal(kk, (a, b), dtype) / np.sqrt(a), "b": jnp.zeros(b, dtype)}
        for kk, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]
    heads = jax.random.normal(keys[-1], (k_tasks, sizes[-1], 3), dtype)
    return {"trunk": trunk, "heads": heads}


def _encode(trunk, x):
    for layer in trunk:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x


def _losses_from_features(heads, z, y):
    logits = jnp.einsum("nd,kdc->knc", z, heads)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, y.T[..., None], axis=-1)[..., 0].mean(axis=1)


def _task_losses(params, x, y):
    return _losses_from_features(params["heads"], _encode(params["trunk"], x), y)


def _problem(dtype, k_tasks=3):
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    params = _mlp_params(kp, [5, 7, 4], k_tasks, dtype)
    x = jax.random.normal(kx, (6, 5), dtype)
    y = jax.random.randint(ky, (6, k_tasks), 0, 3)
    return params, x, y


def _separate_grads(params, x, y, k_tasks):
    rows = [jax.grad(lambda p, t=t: _task_losses(p, x, y)[t])(params) for t in range(k_tasks)]
    return jax.tree.map(lambda *r: jnp.stack(r), *rows)


def test_task_gradients_equal_separate_grads_float64(x64):
    params, x, y = _problem(jnp.float64)
    losses, grads = jax.jit(lambda p: mtl.task_gradients(_task_losses, p, x, y))(params)
    expected = _separate_grads(params, x, y, 3)
    np.testing.assert_allclose(losses, _task_losses(params, x, y), rtol=1e-14)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_task_gradients_with_heads_not_shared(x64):
    params, x, y = _problem(jnp.float64)
    is_shared = lambda path: path[0].key == "trunk"
    _, grads = mtl.task_gradients(_task_losses, params, x, y, shared=is_shared)
    expected = _separate_grads(params, x, y, 3)
    # Heads: one gradient (no task axis), the sum of the rows = each head's own task's row.
    assert grads["heads"].shape == params["heads"].shape
    np.testing.assert_allclose(grads["heads"], expected["heads"].sum(0), rtol=1e-12)
    np.testing.assert_allclose(grads["trunk"][0]["w"], expected["trunk"][0]["w"], rtol=1e-12)
    # The same mask given as a boolean pytree.
    mask = {"trunk": [{"w": True, "b": True}] * 2, "heads": False}
    _, grads2 = mtl.task_gradients(_task_losses, params, x, y, shared=mask)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_has_aux_returns_aux():
    params, x, y = _problem(jnp.float32)

    def with_aux(p, x, y):
        losses = _task_losses(p, x, y)
        return losses, {"total": losses.sum()}

    (losses, aux), _ = mtl.task_gradients(with_aux, params, x, y, has_aux=True)
    np.testing.assert_allclose(aux["total"], losses.sum(), rtol=1e-6)


def test_representation_form_matches_parameter_form(x64):
    params, x, y = _problem(jnp.float64)
    losses, shared_g, head_g, feat_g = jax.jit(
        lambda t, h: mtl.representation_gradients(
            _encode,
            _losses_from_features,
            t,
            h,
            x,
            y,
        )
    )(params["trunk"], params["heads"])
    expected = _separate_grads(params, x, y, 3)
    np.testing.assert_allclose(losses, _task_losses(params, x, y), rtol=1e-14)
    for got, want in zip(
        jax.tree.leaves(shared_g), jax.tree.leaves(expected["trunk"]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(head_g, expected["heads"].sum(0), rtol=1e-12)
    z = _encode(params["trunk"], x)
    for t in range(3):
        want = jax.grad(lambda z, t=t: _losses_from_features(params["heads"], z, y)[t])(z)
        np.testing.assert_allclose(feat_g[t], want, rtol=1e-12)


def test_gramian_and_combine_against_flattened_jacobian(x64):
    params, x, y = _problem(jnp.float64)
    _, grads = mtl.task_gradients(_task_losses, params, x, y)
    jac = np.concatenate([np.asarray(g).reshape(3, -1) for g in jax.tree.leaves(grads)], axis=1)
    np.testing.assert_allclose(mtl.gramian(grads), jac @ jac.T, rtol=1e-12)
    w = np.array([0.2, -1.0, 3.0])
    combined = mtl.combine(jnp.asarray(w), grads)
    flat = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(combined)])
    np.testing.assert_allclose(flat, w @ jac, rtol=1e-12, atol=1e-14)


def test_gramian_only_counts_shared_leaves_and_combine_passes_heads():
    grads = {"trunk": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "head": jnp.array([7.0, 7.0, 7.0])}
    is_shared = lambda path: path[0].key == "trunk"
    np.testing.assert_allclose(mtl.gramian(grads, is_shared), [[5.0, 11.0], [11.0, 25.0]])
    out = mtl.combine(jnp.array([1.0, -1.0]), grads, is_shared)
    np.testing.assert_allclose(out["trunk"], [-2.0, -2.0])
    np.testing.assert_array_equal(out["head"], grads["head"])


def test_gramian_of_bfloat16_is_float32():
    grads = {"w": jnp.full((2, 300), 1.0 / 3, jnp.bfloat16)}
    g = mtl.gramian(grads)
    assert g.dtype == jnp.float32
    bf_third = float(jnp.asarray(1.0 / 3, jnp.bfloat16))
    np.testing.assert_allclose(g, np.full((2, 2), 300 * bf_third**2), rtol=1e-6)


def test_errors_name_the_argument():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"task_losses: expected task losses of shape \(K,\)"):
        mtl.task_gradients(lambda p: p["w"].sum(), params)
    with pytest.raises(ValueError, match="shared: expected a boolean pytree"):
        mtl.task_gradients(lambda p: p["w"], params, shared={"v": True})
    with pytest.raises(ValueError, match="leading task axis 2"):
        mtl.combine(jnp.ones(2), {"w": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match=r"weights: expected shape \(K,\)"):
        mtl.combine(jnp.ones((2, 2)), {"w": jnp.ones((2, 4))})
    with pytest.raises(ValueError, match="leading task axis 2"):
        mtl.gramian({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})
