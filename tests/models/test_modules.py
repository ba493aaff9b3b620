"""Shapes, values (against NumPy), dtypes and argument checks of the jaxmtl.models modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmtl.models import (
    CNN,
    MLP,
    CausalTransformer,
    MultiHead,
    SelfAttention,
    TaskHeads,
    ViT,
    functional,
)
from tests.models import tiny


def numpy_params(module):
    return jax.tree.map(lambda p: np.asarray(p, np.float64), functional(module)[1])


def normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------- shapes (traced abstractly)


def shape_of(module, *inputs, method="__call__"):
    return jax.tree.map(lambda s: s.shape, tiny.output_struct(module, *inputs, method=method))


def test_mlp_shapes_with_leading_axes_and_no_hidden_layer():
    mlp = tiny.abstract(tiny.mlp)
    assert shape_of(mlp, (2, tiny.HIDDEN)) == (2, tiny.OUT)
    assert shape_of(mlp, (3, 2, tiny.HIDDEN)) == (3, 2, tiny.OUT)
    assert shape_of(mlp, (tiny.HIDDEN,)) == (tiny.OUT,)
    single = tiny.abstract(lambda: MLP(tiny.DIM, [], 3, rngs=nnx.Rngs(0)))
    assert len(single.layers) == 1
    assert shape_of(single, (2, tiny.DIM)) == (2, 3)
    deep = tiny.abstract(lambda: MLP(tiny.DIM, [4, 6, 2], 3, rngs=nnx.Rngs(0)))
    assert [layer.kernel.shape for layer in deep.layers] == [(8, 4), (4, 6), (6, 2), (2, 3)]


@pytest.mark.parametrize("side", [1, 3, 8])
def test_cnn_shapes_any_image_size(side):
    cnn = tiny.abstract(lambda: CNN(tiny.CHANNELS, [4, 6, 2], 7, rngs=nnx.Rngs(0)))
    assert shape_of(cnn, (2, side, side, tiny.CHANNELS)) == (2, 7)


@pytest.mark.parametrize("pool", ["mean", "cls"])
@pytest.mark.parametrize(("image_size", "tokens"), [(8, 4), ((8, 4), 2), ((4, 12), 3)])
def test_vit_shapes(pool, image_size, tokens):
    vit = tiny.abstract(lambda: ViT(image_size, 4, 1, 8, 2, 4, 8, 3, pool=pool, rngs=nnx.Rngs(0)))
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert shape_of(vit, (2, height, width, 1)) == (2, 3)
    tokens += pool == "cls"
    assert vit.position_embedding.shape == (1, tokens, 8)
    assert (vit.cls_token is None) == (pool == "mean")
    assert len(vit.blocks) == 2


@pytest.mark.parametrize("length", [1, tiny.MAX_LEN])
def test_causal_transformer_shapes(length):
    lm = tiny.abstract(tiny.lm)
    tokens = jax.ShapeDtypeStruct((2, length), jnp.int32)
    assert shape_of(lm, tokens) == (2, length, tiny.VOCAB)


def test_task_heads_and_multihead_shapes():
    heads = tiny.abstract(lambda: TaskHeads(tiny.DIM, [3, 1, 3], rngs=nnx.Rngs(0)))
    assert shape_of(heads, (5, tiny.DIM)) == ((5, 3), (5, 1), (5, 3))
    model = tiny.abstract(lambda: MultiHead(tiny.cnn(), tiny.OUT, [4, 2], rngs=nnx.Rngs(1)))
    images = (3, 8, 8, tiny.CHANNELS)
    assert shape_of(model, images) == ((3, 4), (3, 2))
    assert shape_of(model, images, method="features") == (3, tiny.OUT)
    assert shape_of(model, (3, tiny.OUT), method="heads") == ((3, 4), (3, 2))
    assert model.num_tasks == 2


# ---------------------------------------------------------------- values against NumPy


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(
    ("activation", "reference"),
    [(nnx.relu, lambda x: np.maximum(x, 0.0)), (nnx.gelu, _gelu_tanh)],
)
def test_mlp_matches_numpy(activation, reference):
    mlp = tiny.mlp(activation=activation)
    p = numpy_params(mlp)["layers"]
    x = normal((6, tiny.HIDDEN))
    hidden = reference(np.asarray(x, np.float64) @ p[0]["kernel"] + p[0]["bias"])
    expected = hidden @ p[1]["kernel"] + p[1]["bias"]
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_mlp_layernorm_before_the_activation_matches_numpy():
    mlp = MLP(tiny.HIDDEN, [7, 5], 3, activation=nnx.gelu, norm="layernorm", rngs=nnx.Rngs(1))
    # perturb the norms' scale and bias so that they are not the identity
    for i, norm in enumerate(mlp.norms):
        norm.scale[...] = norm.scale[...] + 0.1 * (i + 1)
        norm.bias[...] = norm.bias[...] - 0.2
    p = numpy_params(mlp)
    x = normal((6, tiny.HIDDEN))
    h = np.asarray(x, np.float64)
    for i in range(2):
        h = h @ p["layers"][i]["kernel"] + p["layers"][i]["bias"]
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        h = (h - mu) / np.sqrt(var + 1e-6) * p["norms"][i]["scale"] + p["norms"][i]["bias"]
        h = _gelu_tanh(h)
    expected = h @ p["layers"][2]["kernel"] + p["layers"][2]["bias"]
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-4, atol=1e-4)
    # the default has no norms (its parameters are unchanged)
    assert len(MLP(tiny.HIDDEN, [7, 5], 3, rngs=nnx.Rngs(1)).norms) == 0


def test_cnn_matches_numpy():
    cnn = tiny.cnn()
    p = numpy_params(cnn)
    x = normal((2, 4, 4, tiny.CHANNELS), seed=1)
    # 3x3 cross-correlation with one pixel of zero padding ("SAME"), then ReLU.
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = p["convs"][0]["kernel"]
    conv = sum(
        padded[:, i : i + 4, j : j + 4, :] @ kernel[i, j] for i in range(3) for j in range(3)
    )
    conv = np.maximum(conv + p["convs"][0]["bias"], 0.0)
    pooled = conv.reshape(2, 2, 2, 2, 2, tiny.DIM).max(axis=(2, 4))  # 2x2 windows, stride 2
    projection = p["projection"]
    expected = pooled.mean(axis=(1, 2)) @ projection["kernel"] + projection["bias"]
    np.testing.assert_allclose(cnn(x), expected, rtol=1e-5, atol=1e-5)


def test_task_heads_match_numpy():
    heads = TaskHeads(tiny.DIM, [tiny.OUT, tiny.HIDDEN], rngs=nnx.Rngs(3))
    p = numpy_params(heads)["layers"]
    z = normal((5, tiny.DIM), seed=2)
    for k, logits in enumerate(heads(z)):
        expected = np.asarray(z, np.float64) @ p[k]["kernel"] + p[k]["bias"]
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", [nnx.relu, None])
def test_multihead_features_apply_the_activation(activation):
    trunk = MLP(tiny.HIDDEN, [tiny.DIM], tiny.DIM, rngs=nnx.Rngs(0))
    model = MultiHead(trunk, tiny.DIM, [2], feature_activation=activation, rngs=nnx.Rngs(1))
    x = normal((6, tiny.HIDDEN), seed=3)
    raw = np.asarray(trunk(x))
    expected = raw if activation is None else np.maximum(raw, 0.0)
    assert (expected != raw).any() == (activation is not None)
    np.testing.assert_allclose(model.features(x), expected)


# ---------------------------------------------------------------- dtypes


ALL_MODULES = [
    ("mlp", tiny.mlp, (2, tiny.HIDDEN)),
    ("cnn", tiny.cnn, (2, 8, 8, tiny.CHANNELS)),
    ("vit", tiny.vit, (2, tiny.IMAGE, tiny.IMAGE, tiny.CHANNELS)),
]


@pytest.mark.parametrize(("name", "make", "x_shape"), ALL_MODULES)
def test_float32_default_and_bfloat16_inputs(name, make, x_shape):
    module = make()
    params = functional(module)[1]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x = normal(x_shape, seed=4)
    y32 = module(x)
    y16 = module(x.astype(jnp.bfloat16))
    assert y32.dtype == y16.dtype == jnp.float32
    # bfloat16 inputs are cast up: only their rounding error differs.
    np.testing.assert_allclose(y16, y32, rtol=0.05, atol=0.05)
    assert module(jnp.ones(x_shape, jnp.int32)).dtype == jnp.float32


def test_bfloat16_params_and_compute():
    module = tiny.mlp(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = functional(module)[1]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    x = normal((2, tiny.HIDDEN), seed=5)
    y = module(x)
    assert y.dtype == jnp.bfloat16
    # The same (bfloat16-valued) parameters in a float32 model: only rounding differs.
    reference_apply, _ = functional(tiny.mlp())
    reference = reference_apply(jax.tree.map(lambda p: p.astype(jnp.float32), params), x)
    np.testing.assert_allclose(np.asarray(y, np.float32), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (tiny.cnn, normal((2, 8, 8, tiny.CHANNELS), seed=6)),
        (tiny.lm, jnp.array([[1, 2, 3]], jnp.int32)),
    ],
)
def test_bfloat16_compute_with_float32_params(make, x):
    apply_fn, params = functional(make(dtype=jnp.bfloat16))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    y = jax.jit(apply_fn)(params, x)  # one compile instead of one per bfloat16 op
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), make()(x), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: MLP(0, [], 3, rngs=nnx.Rngs(0)), ValueError, "in_features"),
        (lambda: MLP(2.0, [], 3, rngs=nnx.Rngs(0)), TypeError, "in_features"),
        (lambda: MLP(2, [4, -1], 3, rngs=nnx.Rngs(0)), ValueError, r"hidden\[1\]"),
        (lambda: MLP(2, 4, 3, rngs=nnx.Rngs(0)), TypeError, "hidden"),
        (lambda: MLP(2, [], 3, activation="relu", rngs=nnx.Rngs(0)), TypeError, "activation"),
        (lambda: MLP(2, [], 3, param_dtype=jnp.int32, rngs=nnx.Rngs(0)), TypeError, "param_dtype"),
        (lambda: MLP(2, [4], 3, norm="batchnorm", rngs=nnx.Rngs(0)), ValueError, "norm"),
        (lambda: CNN(1, [], 3, rngs=nnx.Rngs(0)), ValueError, "channels"),
        (lambda: ViT(9, 4, 3, 8, 1, 2, 8, 5, rngs=nnx.Rngs(0)), ValueError, "patch_size"),
        (lambda: ViT(8, 4, 3, 9, 1, 2, 8, 5, rngs=nnx.Rngs(0)), ValueError, "heads"),
        (lambda: ViT(8, 4, 3, 8, 1, 2, 8, 5, pool="max", rngs=nnx.Rngs(0)), ValueError, "pool"),
        (lambda: ViT((8, 8, 1), 4, 3, 8, 1, 2, 8, 5, rngs=nnx.Rngs(0)), ValueError, "image_size"),
        (lambda: CausalTransformer(11, 8, 0, 2, 16, 6, rngs=nnx.Rngs(0)), ValueError, "depth"),
        (lambda: SelfAttention(8, 2, attention_fn=3, rngs=nnx.Rngs(0)), TypeError, "attention"),
        (lambda: TaskHeads(4, [], rngs=nnx.Rngs(0)), ValueError, "head_sizes"),
        (lambda: MultiHead(lambda x: x, 4, [2], rngs=nnx.Rngs(0)), TypeError, "trunk"),
    ],
)
def test_constructor_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


IMAGES = (1, tiny.IMAGE, tiny.IMAGE, tiny.CHANNELS)


def _struct(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize(
    ("make", "x", "error", "match"),
    [
        (tiny.mlp, _struct((2, tiny.DIM)), ValueError, "in_features = 16"),
        (tiny.mlp, _struct((2, tiny.HIDDEN), jnp.complex64), TypeError, "x"),
        (tiny.cnn, _struct(IMAGES[1:]), ValueError, "N, H, W"),
        (tiny.cnn, _struct((*IMAGES[:3], 2)), ValueError, "in_channels = 3"),
        (tiny.vit, _struct((1, 4, 4, tiny.CHANNELS)), ValueError, "8, 8, 3"),
        (tiny.lm, _struct((1, tiny.MAX_LEN + 1), jnp.int32), ValueError, "max_len = 7"),
        (tiny.lm, _struct((1, 3)), TypeError, "integer"),
        (tiny.lm, _struct((3,), jnp.int32), ValueError, "batch, T"),
        (tiny.multihead, _struct((2, tiny.DIM)), ValueError, "in_features"),
        (
            lambda: MultiHead(tiny.mlp(), tiny.DIM, [2], rngs=nnx.Rngs(0)),
            _struct((2, tiny.HIDDEN)),
            ValueError,
            "trunk output: expected last axis feature_dim = 8",
        ),
        (
            lambda: SelfAttention(tiny.DIM, 2, rngs=nnx.Rngs(0)),
            _struct((2, tiny.DIM)),
            ValueError,
            "batch, seq, 8",
        ),
    ],
)
def test_call_errors_at_trace_time(make, x, error, match):
    with pytest.raises(error, match=match):
        tiny.output_struct(tiny.abstract(make), x)


def test_heads_input_is_checked():
    with pytest.raises(ValueError, match="z: expected last axis feature_dim = 8"):
        tiny.output_struct(tiny.abstract(tiny.multihead), (2, tiny.DIM + 1), method="heads")
