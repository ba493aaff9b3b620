"""Fused linear + Z-loss kernels (kernels.zloss): interpret mode vs the dense reference,
forward and gradients, and lowering for ``cuda`` / ``tpu`` through ``jax.export``."""

import re
import zlib

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxmtl.losses.classification import z_loss_from_statistics
from kernels.zloss import api, pallas, reference

# Tiny shapes (interpret mode is slow) that are not multiples of any block: N = 37 rows,
# D = 300 classes, d = 20 features (padded to 32 by the Triton layout; the float32 cases use
# d = 80, padded to 128, so that the Triton logits loop takes two feature chunks).
N, D, DIM = 37, 300, 20
BLOCKS = {"gpu": (16, 64), "tpu": (16, 128)}  # (block_rows, block_classes): 3 row blocks
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # relative to the largest magnitude


def _key(*parts) -> jax.Array:
    """A fresh key per test case (deterministic, different for each parametrization)."""
    return jax.random.key(zlib.crc32(repr(parts).encode()))


def _inputs(key, dtype, *, bias=True, n=N, num_classes=D, dim=DIM):
    kh, kw, ky, kb = jax.random.split(key, 4)
    h = jax.random.normal(kh, (n, dim), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (num_classes, dim), jnp.float32) / np.sqrt(dim)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, num_classes, jnp.int32)
    b = jax.random.normal(kb, (num_classes,), jnp.float32).astype(dtype) if bias else None
    return h, w, y, b


def _kernel_fn(variant, **kw):
    rows, classes = BLOCKS[variant]
    return lambda h, w, y, b: api.z_loss_linear(
        h,
        w,
        y,
        b,
        implementation="pallas",
        interpret=True,
        variant=variant,
        block_rows=rows,
        block_classes=classes,
        **kw,
    )


def _value_and_grads(fn, h, w, y, b, weights):
    """Per-example losses and the gradients in h, W (and bias) of ``sum(weights * loss)``,
    from one jitted VJP (one forward, one backward)."""

    @jax.jit
    def run(h, w, y, b):
        f = lambda h, w, b: fn(h, w, y, b)
        losses, vjp = jax.vjp(f, h, w, b)
        grads = vjp(jnp.broadcast_to(weights, losses.shape).astype(losses.dtype))
        return losses, grads if b is not None else grads[:2]

    return run(h, w, y, b)


def _close(got, want, tol, what):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), f"{what}: non-finite values (padding leaked?)"
    scale = max(float(np.max(np.abs(want))), 1e-6)
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matches_reference_forward_and_gradients(variant, dtype):
    with_bias = dtype == jnp.float32 or variant == "tpu"
    dim = 80 if dtype == jnp.float32 else DIM
    h, w, y, b = _inputs(_key("ref", variant, dtype), dtype, bias=with_bias, dim=dim)
    weights = jnp.linspace(0.5, 1.5, N, dtype=jnp.float32)
    ref = lambda h, w, y, b: reference.z_loss_linear(h, w, y, b)
    loss, grads = _value_and_grads(_kernel_fn(variant), h, w, y, b, weights)
    loss_ref, grads_ref = _value_and_grads(ref, h, w, y, b, weights)
    assert loss.dtype == dtype and loss.shape == (N,)
    tol = TOL[dtype]
    _close(loss, loss_ref, tol, "loss")
    for name, g, g_ref, x in zip(("dh", "dW", "dbias"), grads, grads_ref, (h, w, b), strict=False):
        assert g.dtype == x.dtype, name
        _close(g, g_ref, tol, name)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_forward_moments_match_dense_statistics(variant):
    h, w, y, b = _inputs(_key("moments", variant), jnp.float32)
    rows, classes = BLOCKS[variant]
    got = pallas.forward(
        h, w, y, b, variant=variant, blocks=pallas.Blocks(rows, classes), interpret=True
    )
    want = reference.moments(h, w, y, b)
    for name, g, r in zip(("mean", "M2", "target"), got, want, strict=True):
        _close(g, r, 1e-5, name)
    # The moments give jaxmtl's spherical statistics back: s = D mean, q = M2 + D mean^2.
    s, q, _ = reference.statistics(h, w, y, b)
    _close(D * got[0], s, 1e-5, "s")
    _close(got[1] + D * got[0] ** 2, q, 1e-5, "q")


def test_interpret_mode_poisons_padding_and_outputs():
    """The premise of the padding tests: interpret mode reads NaN outside the array and
    leaves unwritten output entries NaN, so a finite, correct kernel result shows that no
    padding leaked into the statistics or the gradients."""

    def kernel(x_ref, o_ref, never_ref):
        o_ref[...] = x_ref[...]
        del never_ref

    x = jnp.ones((10, 128), jnp.float32)
    out, never = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((16, 128), jnp.float32)] * 2,
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))] * 2,
        interpret=True,
    )(x)
    assert np.all(np.asarray(out[:10]) == 1.0)
    assert np.all(np.isnan(np.asarray(out[10:])))
    assert np.all(np.isnan(np.asarray(never)))


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_large_common_offset_does_not_cancel(variant):
    """Logits ~ 3000 + N(0, 1): sum o^2 / D - mean^2 in float32 loses the variance; the
    kernel's Chan-merged moments do not."""
    h, w, y, _ = _inputs(_key("offset", variant), jnp.float32, bias=False)
    b = jnp.full((D,), 3000.0, jnp.float32) + jax.random.normal(_key("b", variant), (D,))
    weights = jnp.ones((N,), jnp.float32)
    loss, grads = _value_and_grads(_kernel_fn(variant), h, w, y, b, weights)
    # The reference centres the logits before squaring (jaxmtl's dense z-score).
    loss_ref, grads_ref = _value_and_grads(reference.z_loss_linear, h, w, y, b, weights)
    _close(loss, loss_ref, 2e-4, "loss")
    for name, g, g_ref in zip(("dh", "dW", "dbias"), grads, grads_ref, strict=True):
        _close(g, g_ref, 2e-3, name)
    # The naive float32 statistics route is visibly wrong here: the test is sensitive.
    naive = z_loss_from_statistics(*reference.statistics(h, w, y, b), D)
    naive_err = float(jnp.max(jnp.abs(naive - loss_ref)) / jnp.max(jnp.abs(loss_ref)))
    assert naive_err > 1e-2


def test_constant_logits_give_finite_loss_and_zero_gradient():
    h, _, y, _ = _inputs(_key("constant"), jnp.float32, bias=False, n=5, num_classes=130)
    w = jnp.zeros((130, DIM), jnp.float32)
    loss, grads = _value_and_grads(_kernel_fn("tpu", a=2.0, b=0.5), h, w, y, None, 1.0)
    np.testing.assert_allclose(loss, np.log1p(np.exp(1.0)) / 2.0, rtol=1e-6)
    for g in grads:
        assert np.all(np.asarray(g) == 0.0)


def test_auto_on_cpu_matches_the_reference():
    """Off an accelerator ``"auto"`` runs the dense jnp forms of the kernels' forward and
    backward (same custom_vjp): values and gradients equal the autodiff reference."""
    h, w, y, b = _inputs(_key("auto"), jnp.float32)
    weights = jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32)
    auto = lambda h, w, y, b: api.z_loss_linear(h, w, y, b, a=1.5, b=0.5)
    ref = lambda h, w, y, b: reference.z_loss_linear(h, w, y, b, a=1.5, b=0.5)
    loss, grads = _value_and_grads(auto, h, w, y, b, weights)
    loss_ref, grads_ref = _value_and_grads(ref, h, w, y, b, weights)
    _close(loss, loss_ref, 1e-6, "loss")
    for name, g, g_ref in zip(("dh", "dW", "dbias"), grads, grads_ref, strict=True):
        _close(g, g_ref, 1e-5, name)


def test_custom_vjp_matches_finite_differences():
    h, w, y, b = _inputs(_key("check_grads"), jnp.float32, n=6, num_classes=9, dim=5)
    f = lambda h, w, b: api.z_loss_linear(h, w, y, b, a=2.0, b=1.0)
    jax.test_util.check_grads(f, (h, w, b), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(a=0.0), "a: expected"),
        (dict(implementation="triton"), "implementation"),
        (dict(variant="cpu"), "variant"),
        (dict(implementation="pallas", interpret=True, variant="tpu", block_classes=100), "128"),
        (dict(implementation="pallas", interpret=True, variant="gpu", block_rows=24), "power"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    h, w, y, b = _inputs(_key("bad"), jnp.float32, n=4, num_classes=8, dim=4)
    with pytest.raises(ValueError, match=match):
        api.z_loss_linear(h, w, y, b, **kwargs)


def test_bad_inputs_are_named():
    h, w, y, b = _inputs(_key("bad-inputs"), jnp.float32, n=4, num_classes=8, dim=4)
    with pytest.raises(TypeError, match="W: expected the dtype of h"):
        api.z_loss_linear(h, w.astype(jnp.bfloat16), y)
    with pytest.raises(ValueError, match="labels: expected values in"):
        api.z_loss_linear(h, w, y.at[0].set(8))
    with pytest.raises(ValueError, match="bias: expected"):
        api.z_loss_linear(h, w, y, b[:3])
    with pytest.raises(ValueError, match="W: expected shape"):
        api.z_loss_linear(h, w[:, :3], y)


# --------------------------------------------------------------------------- lowering

_CUSTOM_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_lowers_for_accelerators_via_export(platform, dtype, with_bias):
    """``implementation="auto"`` exported for ``cuda`` (Triton) and ``tpu`` (Mosaic) from this
    CPU-only host: the forward is one kernel, the gradient three (forward, dh, dW), and no
    (N, D) logits array appears in the exported program."""
    n, num_classes, dim = 200, 1000, 96
    args = [
        jax.ShapeDtypeStruct((n, dim), dtype),
        jax.ShapeDtypeStruct((num_classes, dim), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((num_classes,), dtype) if with_bias else None,
    ]

    def loss(h, w, y, b):
        return jnp.sum(api.z_loss_linear(h, w, y, b, a=1.0, b=1.0).astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 3) if with_bias else (0, 1))
    target = _CUSTOM_CALL[platform]
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else []
    for fn, kernels in ((loss, 1), (grad, 3)):
        exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)
        text = exported(*args).mlir_module()
        assert len(re.findall(rf"custom_call @{re.escape(target)}\(", text)) == kernels
        assert f"{n}x{num_classes}x" not in text
