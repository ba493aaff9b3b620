"""Tests of F-MTL (jaxmtl.transforms.flat) against hand-derived and independent references."""

import importlib

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmtl import mtl
from jaxmtl.transforms.flat import FlatMTLState, flat_mtl, sam_perturbation

# ---- stand-in aggregators (the library's own are tested where they exist) -----------------


def _mean():
    """Equal-weight mean over the task axis (a linear aggregator)."""

    def update(g, state, params=None):
        return jax.tree.map(lambda x: x.mean(0), g), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _mgda2_weights(gram):
    """Closed-form two-task min-norm weights (Sener & Koltun 2018, Alg. 1)."""
    a = gram[1, 1] - gram[0, 1]
    b = gram[0, 0] - 2 * gram[0, 1] + gram[1, 1]
    w = jnp.clip(a / jnp.maximum(b, 1e-30), 0.0, 1.0)
    return jnp.stack([w, 1.0 - w])


def _mgda2():
    def update(g, state, params=None):
        return mtl.combine(_mgda2_weights(mtl.gramian(g)), g), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _counting_mean():
    """A stateful aggregator: counts its calls (checks that both states are threaded)."""

    def update(g, count, params=None):
        return jax.tree.map(lambda x: x.mean(0), g), count + 1

    return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)


def _mgda2_np(g1, g2):
    a = g2 @ g2 - g1 @ g2
    b = (g1 - g2) @ (g1 - g2)
    w = np.clip(a / max(b, 1e-30), 0.0, 1.0)
    return w * g1 + (1 - w) * g2


# ---- a small two-task problem: shared trunk, stacked heads, plus a dict of per-task heads ---


def _problem(dtype, k=2):
    keys = jax.random.split(jax.random.key(3), 6)
    params = {
        "trunk": {
            "w": jax.random.normal(keys[0], (4, 5), dtype) / 2,
            "b": jax.random.normal(keys[1], (5,), dtype) / 4,
        },
        "heads": jax.random.normal(keys[2], (k, 5, 3), dtype),
        "bias": [jax.random.normal(kk, (3,), dtype) for kk in jax.random.split(keys[3], k)],
    }
    x = jax.random.normal(keys[4], (8, 4), dtype)
    y = jax.random.randint(keys[5], (8, k), 0, 3)
    return params, x, y


def _losses(params, x, y):
    z = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
    logits = jnp.einsum("nd,kdc->knc", z, params["heads"]) + jnp.stack(params["bias"])[:, None]
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, y.T[..., None], axis=-1)[..., 0].mean(axis=1)


_IS_TRUNK = lambda path: path[0].key == "trunk"


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def _reference(params, x, y, *, rho, rho_head, adaptive, aggregate, variant="paper"):
    """F-MTL written out task by task (Python loop, NumPy float64), for K = 2 tasks."""
    mask = mtl.shared_mask(params, _IS_TRUNK)
    is_shared = np.concatenate(
        [
            np.full(np.size(p), m)
            for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params), strict=True)
        ]
    )
    theta = _flat(params)
    unravel = jax.flatten_util.ravel_pytree(params)[1]
    k = 2
    loss_grads, sam_grads = [], []
    for t in range(k):
        grad_fn = jax.jit(jax.grad(lambda p, t=t: _losses(p, x, y)[t]))
        grad_t = lambda th, grad_fn=grad_fn: _flat(grad_fn(unravel(th)))
        g = grad_t(theta)
        scale = np.abs(theta) if adaptive else np.ones_like(theta)
        e = np.zeros_like(theta)
        for part, radius in ((is_shared, rho), (~is_shared, rho_head)):
            sg = np.where(part, scale * g, 0.0)
            e += radius * scale * sg / (np.linalg.norm(sg) + 1e-12)
        loss_grads.append(g)
        sam_grads.append(grad_t(theta + e))
    sh = is_shared
    if variant == "paper":
        loss_part = aggregate(*[g[sh] for g in loss_grads])
        flat_part = aggregate(*[(s - g)[sh] for s, g in zip(sam_grads, loss_grads, strict=True)])
        shared_update = loss_part + flat_part
    else:
        shared_update = aggregate(*[s[sh] for s in sam_grads])
    out = np.zeros_like(theta)
    out[sh] = shared_update
    out[~sh] = sum(sam_grads)[~sh]
    return out


def _run(tx, params, x, y, shared, use_loss_fn=False):
    task_losses = lambda p: _losses(p, x, y)
    _, grads = mtl.task_gradients(task_losses, params)
    extra = (
        {"task_loss_fn": task_losses}
        if use_loss_fn
        else {"task_grad_fn": lambda p: mtl.task_gradients(task_losses, p)[1]}
    )
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
    return step(grads, tx.init(params), params)


@pytest.mark.parametrize(
    ("agg", "agg_np", "adaptive", "variant", "use_loss_fn"),
    [
        (_mean, lambda a, b: (a + b) / 2, False, "paper", False),
        (_mgda2, _mgda2_np, True, "paper", True),
        (_mgda2, _mgda2_np, False, "direct", False),
    ],
)
def test_flat_mtl_matches_task_by_task_reference(x64, agg, agg_np, adaptive, variant, use_loss_fn):
    params, x, y = _problem(jnp.float64)
    rho, rho_head = (0.3, 0.2) if not adaptive else (0.5, 0.4)
    tx = flat_mtl(
        agg(), rho=rho, rho_head=rho_head, adaptive=adaptive, variant=variant, shared=_IS_TRUNK
    )
    updates, state = _run(tx, params, x, y, _IS_TRUNK, use_loss_fn)
    assert isinstance(state, FlatMTLState)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
    want = _reference(
        params,
        x,
        y,
        rho=rho,
        rho_head=rho_head,
        adaptive=adaptive,
        aggregate=agg_np,
        variant=variant,
    )
    np.testing.assert_allclose(_flat(updates), want, rtol=1e-9, atol=1e-12)


def test_paper_and_direct_coincide_for_the_linear_mean(x64):
    # The paper's remark: with equal weights the decomposition is a no-op. (For MGDA both
    # variants are checked against the task-by-task reference above, and differ there.)
    params, x, y = _problem(jnp.float64)
    mean_paper, _ = _run(flat_mtl(_mean(), rho=0.5, shared=_IS_TRUNK), params, x, y, _IS_TRUNK)
    mean_direct, _ = _run(
        flat_mtl(_mean(), rho=0.5, variant="direct", shared=_IS_TRUNK), params, x, y, _IS_TRUNK
    )
    np.testing.assert_allclose(_flat(mean_paper), _flat(mean_direct), rtol=1e-10, atol=1e-14)


def _library_aggregators():
    try:
        transforms = importlib.import_module("jaxmtl.transforms")
    except ImportError:
        return []
    # A few representative ones (a projection solver, CAGrad's dual, a stateful degree-0 one):
    # every compile costs seconds on the shared CI cores.
    names = ["upgrad", "nash_mtl"]
    return [getattr(transforms, n) for n in names if hasattr(transforms, n)]


@pytest.mark.parametrize("make_agg", [_mean, _mgda2, *_library_aggregators()])
def test_rho_zero_is_the_plain_aggregator_and_small_rho_is_close(x64, make_agg):
    params, x, y = _problem(jnp.float64)
    task_losses = lambda p: _losses(p, x, y)
    plain = make_agg()
    _, full = mtl.task_gradients(task_losses, params)
    trunk_only = {"trunk": full["trunk"]}
    trunk_params = {"trunk": params["trunk"]}
    want, _ = jax.jit(plain.update)(trunk_only, plain.init(trunk_params), trunk_params)
    got, _ = _run(flat_mtl(make_agg(), rho=0.0, shared=_IS_TRUNK), params, x, y, _IS_TRUNK)
    np.testing.assert_allclose(_flat(got["trunk"]), _flat(want["trunk"]), rtol=1e-12, atol=1e-15)
    # Heads receive exactly their own task's gradient (the other task's row is zero).
    np.testing.assert_allclose(got["heads"], full["heads"].sum(0), rtol=1e-12)
    np.testing.assert_array_equal(full["heads"][0, 1], 0.0)
    # rho -> 0 through the whole machinery (rho = 0 skips it): the flat part vanishes with
    # rho. Not for Nash-MTL, whose update has degree 0 in the gradients: AGG(g^flat) keeps an
    # O(1) norm however small rho is (a property of Nash-MTL, not of F-MTL).
    if getattr(make_agg, "__name__", "") != "nash_mtl":
        small, _ = _run(flat_mtl(make_agg(), rho=1e-7, shared=_IS_TRUNK), params, x, y, None)
        scale = np.abs(_flat(got)).max()
        np.testing.assert_allclose(_flat(small), _flat(got), atol=1e-5 * scale)
        assert np.abs(_flat(small) - _flat(got)).max() > 0.0


def test_single_task_mean_is_sam(x64):
    """K = 1: the update is the SAM gradient at params + rho g / ||g|| (hand-written)."""
    a = np.array([1.0, -2.0, 0.5])
    h = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
    theta = np.array([0.2, 0.4, -0.3])
    loss = lambda p: jnp.stack([0.5 * (p["t"] - a) @ h @ (p["t"] - a) + jnp.sum(p["t"] ** 4)])
    grad = lambda t: h @ (t - a) + 4 * t**3
    g = grad(theta)
    want = grad(theta + 0.1 * g / np.linalg.norm(g))
    params = {"t": jnp.asarray(theta)}
    _, grads = mtl.task_gradients(loss, params)
    tx = flat_mtl(_mean(), rho=0.1)
    got, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, task_loss_fn=loss))(grads, params)
    np.testing.assert_allclose(got["t"], want, rtol=1e-12)


def test_quadratic_flat_gradient_closed_form(x64):
    """L_i = 0.5 (t - a_i)^T H_i (t - a_i): g^flat_i = rho H_i g_i / ||g_i|| exactly."""
    rng = np.random.default_rng(0)
    hs = [m @ m.T + np.eye(3) for m in rng.normal(size=(2, 3, 3))]
    anchors = rng.normal(size=(2, 3))
    theta = rng.normal(size=3)
    loss = lambda p: jnp.stack(
        [0.5 * (p - a) @ h @ (p - a) for a, h in zip(anchors, hs, strict=True)]
    )
    gs = [h @ (theta - a) for a, h in zip(anchors, hs, strict=True)]
    rho = 0.7
    flats = [rho * h @ g / np.linalg.norm(g) for h, g in zip(hs, gs, strict=True)]
    for make, agg_np in ((_mean, lambda u, v: (u + v) / 2), (_mgda2, _mgda2_np)):
        want = agg_np(*gs) + agg_np(*flats)
        params = jnp.asarray(theta)
        _, grads = mtl.task_gradients(loss, params)
        tx = flat_mtl(make(), rho=rho)
        got, _ = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p, task_loss_fn=loss))(
            grads, params
        )
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_sam_perturbation_norms(x64):
    rng = np.random.default_rng(1)
    g = {"a": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=4))}
    w = {"a": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=4))}
    e = sam_perturbation(g, w, rho=0.3)
    assert np.linalg.norm(_flat(e)) == pytest.approx(0.3, rel=1e-10)
    ea = sam_perturbation(g, w, rho=2.0, adaptive=True)
    assert np.linalg.norm(_flat(ea) / np.abs(_flat(w))) == pytest.approx(2.0, rel=1e-10)
    # ASAM direction: w^2 g, up to a positive scale.
    direction = _flat(w) ** 2 * _flat(g)
    np.testing.assert_allclose(_flat(ea) / direction, (_flat(ea) / direction)[0], rtol=1e-10)
    zero = sam_perturbation(jax.tree.map(jnp.zeros_like, g), w, rho=0.3)
    assert np.all(_flat(zero) == 0.0)


def test_per_task_perturbation_norms_through_update(x64):
    """||eps_sh^i|| == rho, ||eps_ns^i|| == rho_head, each task perturbs its own head only.

    A task_grad_fn returning the (perturbed) parameters themselves makes the "direct"
    variant hand the K perturbed trunks to the aggregator, and the head output the sum of
    the K perturbed heads.
    """
    params, x, y = _problem(jnp.float64)
    seen = {}

    def recording_update(g, state, p=None):
        seen["trunks"] = g
        return jax.tree.map(lambda v: v.mean(0), g), state

    recorder = optax.GradientTransformation(lambda p: optax.EmptyState(), recording_update)
    _, grads = mtl.task_gradients(lambda p: _losses(p, x, y), params)
    tx = flat_mtl(recorder, rho=0.3, rho_head=0.05, variant="direct", shared=_IS_TRUNK)
    copies = lambda p: jax.tree.map(lambda v: jnp.broadcast_to(v, (2, *v.shape)), p)
    out, _ = tx.update(grads, tx.init(params), params, task_grad_fn=copies)
    for i in range(2):
        trunk = jax.tree.map(lambda s, p: s[i] - p, seen["trunks"]["trunk"], params["trunk"])
        assert np.linalg.norm(_flat(trunk)) == pytest.approx(0.3, rel=1e-9)
        # Row i of the head output is p + eps_i (own head) + p (the other copy, unperturbed).
        head = np.concatenate(
            [
                np.ravel(out["heads"][i] - 2 * params["heads"][i]),
                np.ravel(out["bias"][i] - 2 * params["bias"][i]),
            ]
        )
        assert np.linalg.norm(head) == pytest.approx(0.05, rel=1e-9)
        # The direction is task i's own head gradient.
        own = np.concatenate([np.ravel(grads["heads"][i, i]), np.ravel(grads["bias"][i][i])])
        np.testing.assert_allclose(head, 0.05 * own / np.linalg.norm(own), rtol=1e-9)


def test_zero_gradient_task_gives_no_nan():
    params = {"w": jnp.array([1.0, 2.0])}
    loss = lambda p: jnp.stack([jnp.sum((p["w"] - 3.0) ** 2), 0.0 * jnp.sum(p["w"])])
    _, grads = mtl.task_gradients(loss, params)
    # Nash-MTL is the aggregator most exposed to a zero row (its weights solve G w = 1/w).
    cases = [
        (_mean, True),
        *[(a, False) for a in _library_aggregators() if a.__name__ == "nash_mtl"],
    ]
    for make, adaptive in cases:
        tx = flat_mtl(make(), rho=0.1, adaptive=adaptive)
        step = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p, task_loss_fn=loss)[0])
        assert np.all(np.isfinite(step(grads, params)["w"])), make


def test_chained_with_adam_under_jit_trains_and_threads_state():
    params, x, y = _problem(jnp.float32)
    task_losses = lambda p, xb, yb: _losses(p, xb, yb)
    tx = optax.chain(flat_mtl(_counting_mean(), rho=0.05, shared=_IS_TRUNK), optax.adam(0.05))
    opt_state = tx.init(params)

    @jax.jit
    def step(p, s):
        losses, grads = mtl.task_gradients(task_losses, p, x, y)
        fn = lambda q: mtl.task_gradients(task_losses, q, x, y)[1]
        updates, s = tx.update(grads, s, p, task_grad_fn=fn, unused_extra=1.0)
        return optax.apply_updates(p, updates), s, losses

    first = None
    # optax 0.2.8's adam computes `decay ** count` (Python float ** int32), which strict
    # promotion rejects: only the optax part needs the standard rules.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(15):
            params, opt_state, losses = step(params, opt_state)
            first = losses if first is None else first
    assert np.all(np.asarray(losses) < np.asarray(first))
    flat_state = opt_state[0]
    assert int(flat_state.loss_state) == 15 and int(flat_state.flat_state) == 15


def test_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        flat_mtl(_mean(), rho=-0.1)
    with pytest.raises(ValueError, match="rho_head"):
        flat_mtl(_mean(), rho_head=-1.0)
    with pytest.raises(ValueError, match="variant"):
        flat_mtl(_mean(), variant="sam")
    with pytest.raises(TypeError, match="adaptive"):
        flat_mtl(_mean(), adaptive="yes")
    with pytest.raises(TypeError, match="aggregator"):
        flat_mtl(lambda g: g)
    with pytest.raises(ValueError, match="eps"):
        sam_perturbation({"a": jnp.ones(2)}, {"a": jnp.ones(2)}, rho=1.0, eps=0.0)

    params = {"w": jnp.ones(3)}
    loss = lambda p: jnp.stack([jnp.sum(p["w"]), jnp.sum(p["w"] ** 2)])
    _, grads = mtl.task_gradients(loss, params)
    tx = flat_mtl(_mean())
    state = tx.init(params)
    with pytest.raises(ValueError, match="task_grad_fn, task_loss_fn"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="task_grad_fn, task_loss_fn"):
        tx.update(grads, state, params, task_grad_fn=loss, task_loss_fn=loss)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, state, None, task_loss_fn=loss)
    with pytest.raises(ValueError, match=r"updates: .*leading task axis"):
        tx.update(params, state, params, task_loss_fn=loss)
    with pytest.raises(ValueError, match=r"task_loss_fn: expected task losses of shape \(2,\)"):
        tx.update(grads, state, params, task_loss_fn=lambda p: jnp.sum(p["w"])[None])
    with pytest.raises(ValueError, match="task_grad_fn"):
        tx.update(grads, state, params, task_grad_fn=lambda p: p)
    # An aggregator that keeps the task axis is caught.
    keep = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g, s))
    tx = flat_mtl(keep)
    with pytest.raises(ValueError, match="aggregator output"):
        tx.update(grads, tx.init(params), params, task_loss_fn=loss)
    tx = flat_mtl(_mean(), shared=lambda path: False)
    with pytest.raises(ValueError, match="shared"):
        tx.update(grads, tx.init(params), params, task_loss_fn=loss)
