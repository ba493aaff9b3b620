"""Attention: the default against NumPy, pluggable attention_fn, and the causal mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmtl.models import (
    SelfAttention,
    dot_product_attention,
    functional,
)
from tests.models import tiny


def normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_tokens(seed):
    tokens = np.random.default_rng(seed).integers(0, tiny.VOCAB, size=(2, tiny.MAX_LEN))
    return jnp.asarray(tokens, jnp.int32)


def numpy_attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(d)) v per head in float64, masking keys after the query if causal."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        seq = q.shape[1]
        logits = np.where(np.tril(np.ones((seq, seq), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def softmax_attention(q, k, v):
    """A hand-written jnp reference of scaled dot-product attention (no mask)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def uniform_attention(q, k, v):
    """Every query attends equally to every key: ignores q and k."""
    return jnp.broadcast_to(v.mean(axis=1, keepdims=True), v.shape)


def tiny_vit(attention_fn=None, pool="mean"):
    return tiny.vit(attention_fn=attention_fn, pool=pool)


def tiny_lm(attention_fn=None):
    return tiny.lm(attention_fn=attention_fn)


@pytest.mark.parametrize("causal", [False, True])
def test_dot_product_attention_matches_numpy(causal):
    q, k, v = normal((3, 2, tiny.MAX_LEN, 2, 4))
    out = dot_product_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_dot_product_attention_bfloat16_under_strict_promotion():
    q, k, v = normal((3, 2, tiny.MAX_LEN, 2, 4), seed=1)
    out = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), numpy_attention(q, k, v, True), rtol=0.05, atol=0.05
    )


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_with_reference_attention_equals_default(pool):
    x = normal((2, tiny.IMAGE, tiny.IMAGE, tiny.CHANNELS), seed=2)
    default = tiny_vit(pool=pool)(x)
    custom = tiny_vit(softmax_attention, pool=pool)(x)
    np.testing.assert_allclose(custom, default, rtol=1e-5, atol=1e-5)
    # ... and attention_fn is really used: a different attention changes the output.
    assert not np.allclose(tiny_vit(uniform_attention, pool=pool)(x), default, atol=1e-3)


def test_attention_fn_receives_the_documented_layout():
    seen = []

    def recording(q, k, v, **kwargs):
        seen.append((q.shape, k.shape, v.shape, kwargs))
        return softmax_attention(q, k, v)

    SelfAttention(8, 2, attention_fn=recording, rngs=nnx.Rngs(0))(jnp.ones((3, 5, 8)))
    SelfAttention(8, 2, causal=True, attention_fn=recording, rngs=nnx.Rngs(0))(jnp.ones((3, 5, 8)))
    layout = (3, 5, 2, 4)  # (batch, seq, heads, head_dim)
    assert seen == [(layout, layout, layout, {}), (layout, layout, layout, {"causal": True})]


def test_attention_fn_output_shape_is_checked():
    attention = SelfAttention(8, 2, attention_fn=lambda q, k, v: v[:, :1], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_fn"):
        attention(jnp.ones((1, 3, 8)))


def test_self_attention_matches_numpy_per_head_projections():
    attention = SelfAttention(tiny.DIM, 4, rngs=nnx.Rngs(4))  # head_dim 2
    x = np.random.default_rng(0).normal(size=(2, 5, tiny.DIM))

    def affine(layer, h):
        return h @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...])

    qkv = affine(attention.qkv, x)  # [q | k | v], each split into heads of 2
    q, k, v = (qkv[..., i * tiny.DIM : (i + 1) * tiny.DIM].reshape(2, 5, 4, 2) for i in range(3))
    expected = affine(attention.out, numpy_attention(q, k, v).reshape(2, 5, tiny.DIM))
    np.testing.assert_allclose(
        attention(jnp.asarray(x, jnp.float32)), expected, rtol=1e-5, atol=1e-5
    )


def _later_tokens_changed(tokens, t, vocab):
    """``tokens`` with every position after ``t`` replaced by a different token."""
    return tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % vocab)


def _leak(model, t):
    tokens = random_tokens(seed=5)
    before = model(tokens)
    after = model(_later_tokens_changed(tokens, t, tiny.VOCAB))
    return before, after


@pytest.mark.parametrize("t", [0, 3, 5])
def test_causal_output_at_t_ignores_later_tokens(t):
    before, after = _leak(tiny_lm(), t)
    np.testing.assert_array_equal(before[:, : t + 1], after[:, : t + 1])
    assert not np.allclose(before[:, t + 1 :], after[:, t + 1 :], atol=1e-4)


def test_the_causal_check_would_fail_without_the_mask():
    def ignores_causal(q, k, v, *, causal):
        del causal
        return dot_product_attention(q, k, v)

    before, after = _leak(tiny_lm(ignores_causal), 2)
    assert not np.allclose(before[:, :3], after[:, :3], atol=1e-4)


def test_causal_transformer_with_reference_attention_equals_default():
    def masked_softmax_attention(q, k, v, *, causal):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
        if causal:
            seq = q.shape[1]
            logits = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), logits, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)

    tokens = random_tokens(seed=6)
    np.testing.assert_allclose(
        tiny_lm(masked_softmax_attention)(tokens), tiny_lm()(tokens), rtol=1e-5, atol=1e-5
    )


def test_causal_gradient_of_position_t_is_zero_for_later_embeddings():
    apply_fn, params = functional(tiny_lm())
    tokens = jnp.array([[1, 4, 2, 7, 3]])  # distinct, so embedding row <-> position

    def logits_at_position_1(params):
        return apply_fn(params, tokens)[0, 1].sum()

    rows = jax.jit(jax.grad(logits_at_position_1))(params)["token_embedding"]["embedding"][
        tokens[0]
    ]
    assert bool(jnp.all(rows[2:] == 0.0))
    assert bool(jnp.all(jnp.any(rows[:2] != 0.0, axis=-1)))


@pytest.mark.parametrize("attention", ["flash-interpret", "flash-reference", "flash"])
def test_flash_attention_path_equals_default(attention):
    x = normal((2, tiny.IMAGE, tiny.IMAGE, tiny.CHANNELS), seed=7)
    np.testing.assert_allclose(
        tiny.vit(attention=attention)(x), tiny_vit()(x), rtol=1e-5, atol=1e-5
    )
    tokens = random_tokens(seed=8)
    np.testing.assert_allclose(
        tiny.lm(attention=attention)(tokens), tiny_lm()(tokens), rtol=1e-5, atol=1e-5
    )


def test_flash_attention_fn_equals_default_and_names_are_checked():
    import functools

    from kernels.attention import flash_attention

    tokens = random_tokens(seed=9)
    flash = functools.partial(flash_attention, implementation="pallas", interpret=True)
    np.testing.assert_allclose(tiny_lm(flash)(tokens), tiny_lm()(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        tiny.lm(attention="fast")
    with pytest.raises(ValueError, match="attention"):
        tiny.lm(attention="flash", attention_fn=flash)
