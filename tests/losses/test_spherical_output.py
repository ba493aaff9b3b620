"""Tests of jaxmtl.losses.spherical_output: the Gram path and the factored SGD output layer
against dense autodiff through the logits (``classification.z_loss``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxmtl.losses import classification as cl
from jaxmtl.losses import spherical_output as so
from tests.losses.jitted import FAST_COMPILE


def _jit(fn, **kwargs):
    """``jax.jit`` with fast compilation (eager dispatch compiles every op separately)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def _problem(seed, num_classes=40, dim=6, n=9, offset=0.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(num_classes, dim)) + offset * rng.normal(size=dim)[None, :]
    h = rng.normal(size=(n, dim))
    labels = rng.integers(0, num_classes, n)
    labels[1] = labels[0]  # a repeated class: the scatter-add must accumulate
    return jnp.asarray(w, dtype), jnp.asarray(h, dtype), jnp.asarray(labels, jnp.int32)


def _dense_total(w, h, labels, a=1.0, b=0.0):
    return jnp.sum(cl.z_loss(h @ w.T, labels, a=a, b=b))


def _gram_total(w, h, labels, a=1.0, b=0.0):
    return jnp.sum(so.gram_z_loss(w, h, labels, a=a, b=b))


def _reference_z_loss(w, h, labels, a=1.0, b=0.0):
    """Float64 NumPy two-pass reference: logits, their mean, the centred variance."""
    o = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    centred = o - o.mean(axis=1, keepdims=True)
    z = centred[np.arange(len(o)), np.asarray(labels)] / np.sqrt((centred**2).mean(axis=1))
    return np.logaddexp(0.0, a * (b - z)) / a


# ------------------------------------------------------------------------------ Gram path


@pytest.mark.parametrize("a, b", [(1.0, 0.0), (2.0, 1.5)])
def test_gram_matches_dense_autodiff(x64, a, b):
    w, h, labels = _problem(0)
    dense = _jit(jax.value_and_grad(functools.partial(_dense_total, a=a, b=b), (0, 1)))
    gram = _jit(jax.value_and_grad(functools.partial(_gram_total, a=a, b=b), (0, 1)))
    (v_dense, (gw_dense, gh_dense)), (v_gram, (gw_gram, gh_gram)) = (
        dense(w, h, labels),
        gram(w, h, labels),
    )
    np.testing.assert_allclose(v_gram, v_dense, rtol=1e-12)
    np.testing.assert_allclose(gw_gram, gw_dense, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gh_gram, gh_dense, rtol=0, atol=1e-10)
    per_example = so.gram_z_loss(w, h, labels, a=a, b=b)
    np.testing.assert_allclose(per_example, _reference_z_loss(w, h, labels, a, b), rtol=1e-12)


def test_gram_check_grads_and_statistics(x64):
    w, h, labels = _problem(1, num_classes=12, dim=4, n=5)
    check_grads(
        jax.jit(lambda w_, h_: so.gram_z_loss(w_, h_, labels, a=1.5, b=0.5)),
        (w, h),
        order=1,
        modes=["rev"],
    )
    stats = so.centred_output_statistics(w, h, labels)
    o = h @ w.T
    centred = o - o.mean(axis=1, keepdims=True)
    np.testing.assert_array_equal(stats.sum, 0.0)
    np.testing.assert_allclose(stats.sum_of_squares, jnp.sum(centred**2, axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.target, centred[jnp.arange(5), labels], rtol=1e-12)
    # The same loss as the raw statistics give (where those are well conditioned).
    raw = cl.z_loss_from_statistics(*cl.spherical_statistics(o, labels), 12)
    np.testing.assert_allclose(so.gram_z_loss(w, h, labels), raw, rtol=1e-12)


def test_gram_no_cancellation_with_large_common_offset(x64):
    # Rows of W share a component 1e7 times their spread: |mean(o)| / std(o) ~ 1e7, so the
    # raw q / D - mu^2 keeps no correct digit in float64, the centred Gram path keeps ~8.
    w, h, labels = _problem(2, num_classes=64, offset=1e7)
    reference = _reference_z_loss(w, h, labels)
    np.testing.assert_allclose(_jit(so.gram_z_loss)(w, h, labels), reference, rtol=1e-6)
    raw_fn = lambda o, y: cl.z_loss_from_statistics(*cl.spherical_statistics(o, y), 64)
    raw = _jit(raw_fn)(h @ w.T, labels)
    assert np.max(np.abs(np.asarray(raw) - reference) / reference) > 1e-2
    # Gradients too, against the dense (two-pass) autodiff reference.
    g_gram = _jit(jax.grad(_gram_total, (0, 1)))(w, h, labels)
    g_dense = _jit(jax.grad(_dense_total, (0, 1)))(w, h, labels)
    for ours, theirs in zip(g_gram, g_dense, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6 * float(jnp.max(jnp.abs(theirs))))
    # float32 with an offset 1e3 times the spread: still within a few float32 digits.
    w32, h32, l32 = _problem(3, num_classes=64, offset=1e3, dtype=np.float32)
    ours = _jit(so.gram_z_loss)(w32, h32, l32)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, _reference_z_loss(w32, h32, l32), rtol=2e-3)


def test_gram_dtypes_and_jit():
    w, h, labels = _problem(4, dtype=np.float32)
    f = _jit(jax.grad(lambda w_, h_: _gram_total(w_, h_, labels), (0, 1)))
    gw, gh = f(w, h)
    assert gw.dtype == gh.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(gw)) & jnp.all(jnp.isfinite(gh)))
    wb, hb = w.astype(jnp.bfloat16), h.astype(jnp.bfloat16)
    out = _jit(so.gram_z_loss)(wb, hb, labels)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    # all outputs equal (W rows identical): finite, softplus(a b) / a, zero gradient.
    flat = jnp.ones((5, 3), jnp.float32)
    hs = jnp.ones((2, 3), jnp.float32)
    ys = jnp.array([0, 4])
    value, grad = _jit(jax.value_and_grad(lambda w_: _gram_total(w_, hs, ys, b=1.0)))(flat)
    np.testing.assert_allclose(value, 2 * np.logaddexp(0, 1.0), rtol=1e-6)
    assert bool(jnp.all(grad == 0))


def test_gram_with_adam_matches_dense(x64):
    w, _, labels = _problem(5, num_classes=30, dim=5, n=8)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 7)))
    params0 = {"trunk": jnp.asarray(rng.normal(size=(7, 5)) / 3), "w": w}

    def loss_fn(params, head):
        features = jnp.tanh(x @ params["trunk"])
        return jnp.mean(head(params["w"], features, labels))

    with jax.numpy_dtype_promotion("standard"):
        opt = optax.adam(0.05)
        trajectories = []
        for head in (
            lambda w_, f_, y_: cl.z_loss(f_ @ w_.T, y_),
            lambda w_, f_, y_: so.gram_z_loss(w_, f_, y_),
        ):
            params, state, losses = params0, opt.init(params0), []

            @jax.jit
            def step(params, state, head=head):
                value, grads = jax.value_and_grad(loss_fn)(params, head)
                updates, state = opt.update(grads, state, params)
                return optax.apply_updates(params, updates), state, value

            for _ in range(5):
                params, state, value = step(params, state)
                losses.append(value)
            trajectories.append((np.asarray(losses), params))
    (l_dense, p_dense), (l_gram, p_gram) = trajectories
    np.testing.assert_allclose(l_gram, l_dense, rtol=1e-10)
    for key in ("trunk", "w"):
        np.testing.assert_allclose(p_gram[key], p_dense[key], atol=1e-10)


def test_gram_bad_input():
    w, h, labels = _problem(6, dtype=np.float32)
    with pytest.raises(ValueError, match=r"w: expected a \(D, d\) matrix.*got \(40,\)"):
        so.gram_z_loss(w[:, 0], h, labels)
    with pytest.raises(ValueError, match=r"h: expected shape \(N, 6\).*got \(9, 5\)"):
        so.gram_z_loss(w, h[:, :5], labels)
    with pytest.raises(TypeError, match="labels: expected integer class indices, got dtype"):
        so.gram_z_loss(w, h, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 40\)"):
        so.gram_z_loss(w, h, labels.at[0].set(40))
    with pytest.raises(ValueError, match=r"labels: expected shape \(9,\)"):
        so.gram_z_loss(w, h, labels[:3])
    with pytest.raises(TypeError, match="h: expected the dtype of w"):
        so.gram_z_loss(w, h.astype(jnp.bfloat16), labels)
    with pytest.raises(ValueError, match=r"a: expected a value in \(0, inf\), got -1"):
        so.gram_z_loss(w, h, labels, a=-1.0)
    with pytest.raises(TypeError, match="w: expected a floating-point array"):
        so.gram_z_loss(jnp.ones((4, 2), jnp.int32), h[:, :2], labels % 4)


# ------------------------------------------------------------------------------ factored SGD


def _dense_sgd_step(w, h, labels, lr, weight_decay):
    loss_fn = lambda w_, h_: jnp.mean(cl.z_loss(h_ @ w_.T, labels))
    value, (gw, gh) = jax.value_and_grad(loss_fn, (0, 1))(w, h)
    return w - lr * (gw + weight_decay * w), value, gh


@pytest.mark.parametrize(
    "n, refactor",
    [
        (9, {"check_every": 5, "refactor_every": 20}),
        (4, {"check_every": 3, "max_condition": 1.001}),
    ],
    ids=["N>=d, forced refactor", "N<d Woodbury, condition-triggered refactor"],
)
def test_factored_matches_dense_sgd_over_50_steps(x64, n, refactor):
    num_classes, dim, lr, wd = 40, 6, 0.5, 0.02
    w, _, _ = _problem(7, num_classes, dim)
    rng = np.random.default_rng(8)
    opt = so.factored_z_loss_sgd(lr, weight_decay=wd, **refactor)
    update = _jit(opt.update, donate_argnums=2)
    dense = _jit(_dense_sgd_step, static_argnums=(3, 4))
    state, w_dense = opt.init(w), w
    for _ in range(50):
        h = jnp.asarray(rng.normal(size=(n, dim)))
        labels = rng.integers(0, num_classes, n)
        labels[0] = labels[-1]
        labels = jnp.asarray(labels, jnp.int32)
        w_dense, loss_dense, gh_dense = dense(w_dense, h, labels, lr, wd)
        step = update(h, labels, state)
        state = step.state
        np.testing.assert_allclose(jnp.mean(step.loss), loss_dense, rtol=1e-10)
        np.testing.assert_allclose(step.h_grad, gh_dense, atol=1e-10)
    assert int(state.count) == 50
    assert int(state.refactorizations) >= 2
    np.testing.assert_allclose(so.factored_output_matrix(state), w_dense, atol=1e-10)
    np.testing.assert_allclose(so.factored_gram(state), w_dense.T @ w_dense, atol=1e-9)
    np.testing.assert_allclose(state.column_sum, w_dense.sum(axis=0), atol=1e-10)
    np.testing.assert_allclose(state.u_inv @ state.u, jnp.eye(dim), atol=1e-10)
    h = jnp.asarray(rng.normal(size=(3, dim)))
    np.testing.assert_allclose(_jit(so.factored_logits)(h, state), h @ w_dense.T, atol=1e-10)
    again = _jit(so.factored_unfactorize)(state)
    np.testing.assert_allclose(so.factored_output_matrix(again), w_dense, atol=1e-10)
    assert int(again.refactorizations) == int(state.refactorizations) + 1


def test_factored_trunk_with_adam_and_schedule(x64):
    # The trunk is trained by adam through h_grad, the output layer by exact factored SGD
    # with a schedule; equal to dense autodiff + the same optimizers.
    num_classes, dim, n = 30, 5, 8
    w, _, _ = _problem(9, num_classes, dim)
    rng = np.random.default_rng(9)
    trunk0 = jnp.asarray(rng.normal(size=(7, dim)) / 3)
    schedule = optax.linear_schedule(0.4, 0.1, 10)
    with jax.numpy_dtype_promotion("standard"):
        adam = optax.adam(0.02)
        factored = so.factored_z_loss_sgd(schedule, check_every=4)

        @jax.jit
        def factored_step(trunk, adam_state, out_state, x, labels):
            h, pullback = jax.vjp(lambda p: jnp.tanh(x @ p), trunk)
            step = factored.update(h, labels, out_state)
            (g_trunk,) = pullback(step.h_grad)
            updates, adam_state = adam.update(g_trunk, adam_state, trunk)
            return optax.apply_updates(trunk, updates), adam_state, step.state, step.loss

        @jax.jit
        def dense_step(trunk, adam_state, w, count, x, labels):
            loss_fn = lambda p, w_: jnp.mean(cl.z_loss(jnp.tanh(x @ p) @ w_.T, labels))
            value, (g_trunk, g_w) = jax.value_and_grad(loss_fn, (0, 1))(trunk, w)
            updates, adam_state = adam.update(g_trunk, adam_state, trunk)
            w = w - schedule(count) * g_w
            return optax.apply_updates(trunk, updates), adam_state, w, value

        t_f, s_f, out = trunk0, adam.init(trunk0), factored.init(w)
        t_d, s_d, w_d = trunk0, adam.init(trunk0), w
        for i in range(12):
            x = jnp.asarray(rng.normal(size=(n, 7)))
            labels = jnp.asarray(rng.integers(0, num_classes, n), jnp.int32)
            t_f, s_f, out, loss_f = factored_step(t_f, s_f, out, x, labels)
            t_d, s_d, w_d, loss_d = dense_step(t_d, s_d, w_d, i, x, labels)
            np.testing.assert_allclose(jnp.mean(loss_f), loss_d, rtol=1e-10)
    np.testing.assert_allclose(t_f, t_d, atol=1e-10)
    np.testing.assert_allclose(so.factored_output_matrix(out), w_d, atol=1e-10)
    features = jnp.tanh(x @ t_f)
    loss, h_grad = _jit(factored.loss_and_h_grad)(features, labels, out)
    dense_h_grad = jax.grad(lambda h_, w_: jnp.mean(cl.z_loss(h_ @ w_.T, labels)))
    expected = _jit(dense_h_grad)(features, w_d)
    np.testing.assert_allclose(h_grad, expected, atol=1e-10)
    assert loss.shape == (n,)


def test_factored_float32_and_bad_input():
    w, h, labels = _problem(10, dtype=np.float32)
    opt = so.factored_z_loss_sgd(0.1)
    state = opt.init(w)
    step = _jit(opt.update)(h, labels, state)
    assert step.loss.dtype == step.h_grad.dtype == jnp.float32
    assert step.state.v.dtype == jnp.float32 and step.state.count.dtype == jnp.int32
    with pytest.raises(ValueError, match=r"learning_rate: expected a value in \(0, inf\)"):
        so.factored_z_loss_sgd(0.0)
    with pytest.raises(ValueError, match=r"weight_decay: expected a value in \[0, inf\)"):
        so.factored_z_loss_sgd(0.1, weight_decay=-1.0)
    with pytest.raises(TypeError, match="check_every: expected a Python int"):
        so.factored_z_loss_sgd(0.1, check_every=2.5)
    with pytest.raises(ValueError, match=r"max_condition: expected a value in \(1, inf\)"):
        so.factored_z_loss_sgd(0.1, max_condition=1.0)
    with pytest.raises(TypeError, match="state: expected a FactoredOutputState, got dict"):
        opt.update(h, labels, {"v": w})
    with pytest.raises(ValueError, match=r"h: expected shape \(N, 6\).*got \(9, 2\)"):
        opt.update(h[:, :2], labels, state)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 40\)"):
        opt.loss_and_h_grad(h, labels.at[2].set(-1), state)
    with pytest.raises(ValueError, match=r"w: expected a \(D, d\) matrix with D >= 2"):
        opt.init(w[:1])
