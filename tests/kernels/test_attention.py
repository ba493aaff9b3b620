"""Flash attention: Pallas kernels (interpret mode) against the jnp reference; lowering.

Forward and gradients of q, k, v on fresh random inputs per case, with lengths that are not
multiples of the block size, causal and not, segment and key-padding masks, fully masked
rows, grouped-query attention, float32 and bfloat16; then every kernel (forward, dq, dk/dv)
lowered for ``cuda`` (Triton) and ``tpu`` (Mosaic) through ``jax.export`` with no device.
Interpret mode is slow, so every size is tiny; blocks of 16 make even these multi-block.
"""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import api, attention_reference, flash_attention

BLOCKS = {"block_q": 16, "block_kv": 16, "block_q_bwd": 16, "block_kv_bwd": 16}
# Normalised max error: max |got - want| / max |want|.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
TRITON_CALL = "__gpu$xla.gpu.triton"


def rng_for(*key):
    """A generator seeded by the test case, so that every case draws fresh inputs."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def inputs(rng, *, batch=2, seq_q=40, seq_kv=None, heads=2, kv_heads=None, head_dim=64, dtype):
    seq_kv = seq_q if seq_kv is None else seq_kv
    kv_heads = heads if kv_heads is None else kv_heads
    q = rng.normal(size=(batch, seq_q, heads, head_dim))
    k = rng.normal(size=(batch, seq_kv, kv_heads, head_dim))
    v = rng.normal(size=(batch, seq_kv, kv_heads, head_dim))
    return tuple(jnp.asarray(x, jnp.float32).astype(dtype) for x in (q, k, v))


def segments(rng, batch, seq, count=3):
    """Sorted (packed-sequence) segment ids in [0, count)."""
    return jnp.asarray(np.sort(rng.integers(0, count, size=(batch, seq)), axis=1), jnp.int32)


def value_and_grads(fn, q, k, v, cotangent):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

    out = fn(q, k, v)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f"{what}: not finite"
    error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
    assert error <= TOLERANCE[dtype], f"{what}: normalised error {error:.2e}"


def check_against_reference(rng, q, k, v, *, backend="interpret", **kwargs):
    dtype = q.dtype.type
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def kernel(q, k, v):
        if backend == "interpret":
            return flash_attention(
                q, k, v, implementation="pallas", interpret=True, **kwargs, **BLOCKS
            )
        return api._pallas(
            q,
            k,
            v,
            *ids(kwargs, q, k),
            causal=kwargs.get("causal", False),
            scale=q.shape[-1] ** -0.5,
            block_sizes=(16,) * 4,
            backend_name=backend,
        )

    def reference(q, k, v):
        return flash_attention(q, k, v, implementation="reference", **kwargs)

    got, got_grads = jax.jit(lambda *a: value_and_grads(kernel, *a, cotangent))(q, k, v)
    want, want_grads = jax.jit(lambda *a: value_and_grads(reference, *a, cotangent))(q, k, v)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert_close(got, want, dtype, "out")
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        assert g.dtype == q.dtype
        assert_close(g, w, dtype, f"d{name}")
    return got, got_grads


def ids(kwargs, q, k):
    if "segment_ids" in kwargs:
        return kwargs["segment_ids"]
    return jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.int32)


CASES = {
    "f32": {"dtype": jnp.float32},
    "f32-causal-segments": {"dtype": jnp.float32, "causal": True, "segments": True},
    "f32-gqa-causal-hd128": {"dtype": jnp.float32, "causal": True, "kv_heads": 1, "head_dim": 128},
    "f32-cross-lengths": {"dtype": jnp.float32, "seq_q": 24, "seq_kv": 50, "segments": True},
    "bf16-causal": {"dtype": jnp.bfloat16, "causal": True},
    "bf16-key-mask": {"dtype": jnp.bfloat16, "key_mask": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_pallas_matches_reference_forward_and_gradients(case):
    spec = dict(CASES[case])
    rng = rng_for(case)
    dtype = spec.pop("dtype")
    causal = spec.pop("causal", False)
    use_segments = spec.pop("segments", False)
    use_key_mask = spec.pop("key_mask", False)
    q, k, v = inputs(rng, dtype=dtype, **spec)
    kwargs = {"causal": causal}
    if use_segments:
        kwargs["segment_ids"] = (segments(rng, 2, q.shape[1]), segments(rng, 2, k.shape[1]))
    if use_key_mask:
        kwargs["key_mask"] = jnp.asarray(rng.random((2, k.shape[1])) < 0.7)
    check_against_reference(rng, q, k, v, **kwargs)


def test_tpu_layout_in_interpret_mode_matches_reference():
    rng = rng_for("bhsd")
    q, k, v = inputs(rng, seq_q=33, dtype=jnp.float32)
    kwargs = {"causal": True, "segment_ids": (segments(rng, 2, 33), segments(rng, 2, 33))}
    check_against_reference(rng, q, k, v, backend="interpret_bhsd", **kwargs)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    rng = rng_for("masked")
    q, k, v = inputs(rng, seq_q=20, dtype=jnp.float32)
    key_mask = jnp.asarray(rng.random((2, 20)) < 0.5).at[1].set(False)  # batch 1: no key
    q_ids = jnp.zeros((2, 20), jnp.int32).at[0, :5].set(7)  # batch 0, rows 0-4: no key
    kv_ids = jnp.zeros((2, 20), jnp.int32)
    kwargs = {"causal": True, "segment_ids": (q_ids, kv_ids), "key_mask": key_mask}
    out, grads = check_against_reference(rng, q, k, v, **kwargs)
    assert np.all(np.asarray(out[1]) == 0.0)
    assert np.all(np.asarray(out[0, :5]) == 0.0)
    assert np.all(np.asarray(grads[0][1]) == 0.0)  # dq of rows that see nothing
    xla = flash_attention(q, k, v, implementation="xla", **kwargs)
    assert_close(xla, out, jnp.float32, "xla")


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_jax_nn_dot_product_attention(causal):
    rng = rng_for("xla", causal)
    q, k, v = inputs(rng, seq_q=12, heads=4, kv_heads=2, head_dim=8, dtype=jnp.float32)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    for implementation in ("reference", "xla", "auto"):  # "auto" is the reference on a CPU
        got = flash_attention(q, k, v, causal=causal, implementation=implementation)
        assert_close(got, want, jnp.float32, implementation)
    assert_close(attention_reference(q, k, v, causal=causal), want, jnp.float32, "attention")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"implementation": "cudnn"}, "implementation"),
        ({"block_q": 24}, "block_q"),
        ({"causal": 1}, "causal"),
        ({"scale": -1.0}, "scale"),
        ({"key_mask": jnp.ones((2, 5), bool)}, "key_mask"),
        ({"segment_ids": (jnp.zeros((2, 8), jnp.int32),)}, "segment_ids"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    q = jnp.zeros((2, 8, 2, 4))
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(q, q, q, **kwargs)


def test_bad_shapes_are_named():
    q = jnp.zeros((2, 8, 4, 4))
    with pytest.raises(ValueError, match="kv_heads"):
        flash_attention(q, jnp.zeros((2, 8, 3, 4)), jnp.zeros((2, 8, 3, 4)))
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="q:"):
        flash_attention(q[0], q, q)


# Lowering: every kernel, forward and backward, for each platform with no device present.
EXPORT_CASES = {
    "f32-hd64-causal-segments": (jnp.float32, 64, True, True, 2),
    "bf16-hd128-gqa": (jnp.bfloat16, 128, False, False, 1),
    "bf16-hd64-causal-segments": (jnp.bfloat16, 64, True, True, 2),
}
TARGETS = {"cuda": TRITON_CALL, "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_kernels_lower_for_gpu_and_tpu(platform, case):
    dtype, head_dim, causal, use_segments, kv_heads = EXPORT_CASES[case]
    seq = 384  # 3 TPU blocks of 128, 3 x 128 Triton query blocks
    q = jax.ShapeDtypeStruct((2, seq, 2, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, seq, kv_heads, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)

    def forward(q, k, v, q_ids, kv_ids):
        segment_ids = (q_ids, kv_ids) if use_segments else None
        return flash_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=segment_ids,
            implementation="pallas",
            interpret=False,
        )

    def backward(q, k, v, q_ids, kv_ids):
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, q_ids, kv_ids), q, k, v)
        return vjp(out)

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    for fn, kernels in ((forward, 1), (backward, 3)):  # forward; forward + dq + dk/dv
        exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
            q, kv, kv, ids, ids
        )
        text = exported.mlir_module()
        calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
        assert calls.count(TARGETS[platform]) == kernels, calls
        for name in ("forward", "dq", "dkdv")[: kernels if kernels == 1 else 3]:
            assert f"flash_attention_{name}" in text


def test_auto_lowers_to_the_kernel_on_accelerators_and_the_reference_on_cpu():
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    fn = jax.jit(lambda q: flash_attention(q, q, q, causal=True))
    for platform, target in (*TARGETS.items(), ("cpu", None)):
        text = jax.export.export(fn, platforms=[platform], disabled_checks=checks)(q).mlir_module()
        calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
        assert calls == ([target] if target else []), (platform, calls)


@pytest.mark.parametrize(("head_dim", "seq"), [(64, 200), (128, 40)])
def test_mosaic_gpu_kernels_lower_for_cuda(head_dim, seq):
    # Forward, dq and dk/dv kernels; lengths padded to whole blocks of 64 (never shrunk
    # below the wgmma tile); grouped-query heads.
    q = jax.ShapeDtypeStruct((2, seq, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, seq, 2, head_dim), jnp.bfloat16)  # grouped-query
    ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)

    def forward(q, k, v, q_ids, kv_ids):
        return flash_attention(
            q,
            k,
            v,
            causal=True,
            segment_ids=(q_ids, kv_ids),
            implementation="pallas",
            interpret=False,
            gpu_kernel="mosaic_gpu",
        )

    def backward(q, k, v, q_ids, kv_ids):
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, q_ids, kv_ids), q, k, v)
        return vjp(out)

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    expected = {forward: ["mosaic_gpu_v2"], backward: ["mosaic_gpu_v2"] * 3}
    for fn, calls in expected.items():
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(
            q, kv, kv, ids, ids
        )
        assert re.findall(r"stablehlo\.custom_call @([\w$.]+)", exported.mlir_module()) == calls


def test_mosaic_gpu_kernels_reject_what_they_cannot_run():
    q = jnp.zeros((1, 64, 2, 64))
    with pytest.raises(TypeError, match="gpu_kernel"):
        flash_attention(q, q, q, gpu_kernel="mosaic_gpu")
    narrow = q[..., :32].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="gpu_kernel"):
        flash_attention(narrow, narrow, narrow, gpu_kernel="mosaic_gpu")
    with pytest.raises(ValueError, match="gpu_kernel"):
        flash_attention(q, q, q, gpu_kernel="cudnn")
    half = q.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="block_kv"):
        api._pallas(
            half,
            half,
            half,
            *ids({}, q, q),
            causal=False,
            scale=1.0,
            block_sizes=(64, 96, None, None),
            backend_name="mosaic_gpu",
        )
