"""The guarantee each Gramian weighting claims, where solvers break: the property suite.

Families of Jacobians (K in {2, 3, 8}, 50 parameters): random rows (which conflict), mixed
task scales (norm ratios down to 1e-6 in float32, 1e-8 in float64), near-opposite rows
(``g1 = -g0 + eps noise``, eps in {1e-2, 1e-3, 1e-4, 0}), a zero row and a duplicated row.
Each weighting runs once per (K, dtype) under ``jit(vmap)`` over all families, on the Gramian
formed in the test's dtype; the guarantees are checked in float64 on the (cast) rows:

* UPGrad, DualProj: ``J d >= 0`` and the projections equal SciPy's ``nnls`` (float64);
* MGDA: ``d`` in the hull with ``g_k . d >= ||d||^2`` (the min-norm point's KKT conditions);
* CAGrad: the objective ``min_k g_k . d`` of the primal (Liu et al. 2021, Eq. 3) equals an
  independent SLSQP solution of it, ``d`` is feasible;
* IMTL-G: equal projections ``g_k . d / ||g_k||`` over the non-zero rows;
* Nash-MTL, FairGrad: ``G w = w^(-1/alpha)`` on the non-zero rows, FairGrad(1) = Nash-MTL;
* Aligned-MTL: ``d`` equals ``(sigma_min U V^T)^T 1`` from a float64 SVD of ``J``.

Then: a zero row leaves the others' update as it was (MGDA: d = 0, its definition); the
weightings' scale laws ``w(aG) = a^p w(G)`` for a in 1e-30..1e30; weights in the Gramian's
dtype; gradients of norm 1e20 or 1e-20 in float32 through ``scaled_gramian``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

import jaxmtl.transforms
from jaxmtl.transforms import weighting as W

N = 50
KS = (2, 3, 8)
C = 0.4  # CAGrad's default c

METHODS = {
    "mgda": W.mgda,
    "upgrad": W.upgrad,
    "dualproj": W.dualproj,
    "cagrad": lambda: W.cagrad(c=C),
    "imtl_g": W.imtl_g,
    "aligned_mtl": W.aligned_mtl,
    "nash_mtl": W.nash_mtl,
    "fairgrad_1": lambda: W.fairgrad(alpha=1.0),
    "fairgrad_2": lambda: W.fairgrad(alpha=2.0),
}
# Scale laws: w(a G) = a^p w(G).
EXPONENT = {name: 0.0 for name in METHODS} | {
    "nash_mtl": -0.5,
    "fairgrad_1": -0.5,
    "fairgrad_2": -2.0 / 3.0,
}


# ----------------------------------------------------------------------------- families


def _rows(rng: np.random.Generator, k: int) -> np.ndarray:
    """Random rows sharing a random component, so that some pairs conflict and some agree."""
    return rng.normal(size=(k, N)) + rng.normal(size=(1, N)) * rng.uniform(-0.5, 1.0, (k, 1))


def families(k: int, dtype) -> dict[str, np.ndarray]:
    """Name -> J (K x N), float64 values exactly representable in ``dtype``."""
    rng = np.random.default_rng(k)
    out = {f"random{i}": _rows(rng, k) for i in range(3)}
    ratios = (1e-3, 1e-6) if dtype == np.float32 else (1e-4, 1e-8)
    for ratio in ratios:
        j = _rows(rng, k)
        j /= np.linalg.norm(j, axis=1, keepdims=True)
        norms = ratio ** (np.arange(k) / max(k - 1, 1))
        out[f"mixed{ratio:g}"] = j * rng.permutation(norms)[:, None]
    for eps in (1e-2, 1e-3, 1e-4, 0.0):
        j = _rows(rng, k)
        j[1] = -j[0] + eps * np.linalg.norm(j[0]) * rng.normal(size=N) / np.sqrt(N)
        out[f"opposite{eps:g}"] = j
    if k > 2:
        j = _rows(rng, k)
        j[-1] = 0.0
        out["zero"] = j
    j = _rows(rng, k)
    j[1] = j[0]
    out["duplicate"] = j
    return {name: j.astype(dtype).astype(np.float64) for name, j in out.items()}


@functools.cache
def _batched(name: str):
    """``(gramians (B, K, K), gradient_scales (B,)) -> weights (B, K)``, jitted once per shape."""
    weighting = METHODS[name]()
    return jax.jit(jax.vmap(lambda g, s: weighting.weights(g, (), gradient_scale=s)[0]))


BATCH = 12  # every call padded to this many problems: one compilation per (method, K, dtype)


def batched(name: str, gramians: jax.Array, scales: jax.Array | None = None) -> np.ndarray:
    b = gramians.shape[0]
    if scales is None:
        scales = jnp.ones((b,), gramians.dtype)
    pad = jnp.zeros((BATCH - b,), int)
    gramians = jnp.concatenate([gramians, gramians[pad]])
    w = _batched(name)(gramians, jnp.concatenate([scales, scales[pad]]))[:b]
    assert w.dtype == gramians.dtype, (name, w.dtype)  # float64 in, float64 out
    w = np.asarray(w, np.float64)
    assert np.all(np.isfinite(w)), name
    return w


def weights_of(name: str, js: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    """Each family's weights, the Gramian formed in ``dtype`` from the rows in ``dtype``."""
    stacked = jnp.asarray(np.stack(list(js.values())), dtype)
    gramians = jnp.einsum("bkn,bln->bkl", stacked, stacked)
    return dict(zip(js, batched(name, gramians), strict=True))


def nonzero(j: np.ndarray) -> np.ndarray:
    return np.linalg.norm(j, axis=1) > 0


# ----------------------------------------------------------------------------- oracles


def dual_cone_weights(j: np.ndarray, u: np.ndarray) -> np.ndarray:
    """v = u + argmin_{l >= 0} ||J^T (u + l)||^2 (Quinton & Rey 2024, Prop. 1), by nnls."""
    lam, _ = so.nnls(j.T, -j.T @ u, maxiter=50 * len(u))
    return u + lam


def cagrad_bounds(j: np.ndarray, c: float) -> tuple[float, float]:
    """Bounds on CAGrad's optimum ``max_d min_k g_k . d`` s.t. ``||d - g0|| <= c ||g0||``.

    Liu et al. (2021): the primal (Eq. 3) and its dual ``min_{w in simplex} g_w . g0 +
    c ||g0|| ||g_w||`` (Eq. 4) have the same value, so any feasible primal point bounds it
    below and any simplex point above. Both by SLSQP in float64 on rows rescaled to unit
    largest norm, the primal in the rows' span from g0 and from the ball's point towards each
    row, the dual from the centre; zero rows are left out of the min. In the rows' units.
    """
    s = np.linalg.norm(j, axis=1).max()
    rows = (j / s)[nonzero(j)]
    g0 = (j / s).mean(0)
    r = c * np.linalg.norm(g0)
    # The optimal d is in the rows' span: d = g0 + rows^T x (K + 1 variables with t).
    g = rows @ rows.T
    b = rows @ g0
    m = len(rows)
    lower = np.min(b)
    for start in [np.zeros(m), *(r * np.eye(m) / np.sqrt(np.diag(g)))]:
        res = so.minimize(
            lambda v: -v[-1],
            np.concatenate([start, [np.min(b + g @ start)]]),
            jac=lambda v: np.concatenate([np.zeros(m), [-1.0]]),
            constraints=[
                {"type": "ineq", "fun": lambda v: b + g @ v[:-1] - v[-1]},
                {"type": "ineq", "fun": lambda v: r**2 - v[:-1] @ g @ v[:-1]},
            ],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 200},
        )
        x = res.x[:-1]
        d = g0 + rows.T @ x
        if np.sum((d - g0) ** 2) <= r**2:
            lower = max(lower, np.min(rows @ d))

    def dual(w):
        return b @ w + r * np.sqrt(max(w @ g @ w, 0.0))

    upper = np.inf
    for start in [np.full(m, 1.0 / m)]:
        res = so.minimize(
            dual,
            start,
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        w = np.maximum(res.x, 0.0)
        upper = min(upper, dual(w / w.sum()), dual(start))
    return lower * s**2, upper * s**2


# ----------------------------------------------------------------------------- guarantees

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-5, np.float64: 1e-9}


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    if request.param == np.float64:
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


def _conflict(j: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``g_k . d / (||g_k|| (|w| . ||g||))`` over the non-zero rows: the cosine, except that
    the denominator is the size of ``d`` before cancellation, to which the rounding of a
    Gramian-based solve is proportional (nearly opposite rows cancel to a tiny ``d``)."""
    norms = np.linalg.norm(j, axis=1)
    live = norms > 0
    return (j @ (w @ j))[live] / (norms[live] * (np.abs(w) @ norms))


@pytest.mark.parametrize("k", KS)
def test_upgrad_and_dualproj_are_non_conflicting_and_exact(dtype, k):
    """Quinton & Rey (2024): J d >= 0; d equals the nnls projections (float64)."""
    js = families(k, dtype)
    tol = TOL[dtype]
    for name in ("upgrad", "dualproj"):
        for family, w in weights_of(name, js, dtype).items():
            j = js[family]
            d = w @ j
            assert np.min(_conflict(j, w)) >= -tol, (name, family, _conflict(j, w))
            if family.startswith("opposite"):
                continue  # d cancels to ~eps |g|: the weights are ill-determined, d is not
            if name == "upgrad":
                ref = np.mean([dual_cone_weights(j, e) for e in np.eye(k)], axis=0) @ j
            else:
                ref = dual_cone_weights(j, np.full(k, 1.0 / k)) @ j
            size = np.abs(w) @ np.linalg.norm(j, axis=1)
            assert np.linalg.norm(d - ref) <= 1e2 * tol * size, (name, family, d, ref)


@pytest.mark.parametrize("k", KS)
def test_mgda_is_the_min_norm_point(dtype, k):
    """Désidéri (2012): w in the simplex, g_k . d >= ||d||^2 for every k (the KKT conditions)."""
    js = families(k, dtype)
    tol = TOL[dtype]
    for family, w in weights_of("mgda", js, dtype).items():
        j = js[family]
        d = w @ j
        assert np.all(w >= 0) and abs(w.sum() - 1) <= 10 * tol, (family, w)
        norms = np.linalg.norm(j, axis=1)
        slack = j @ d - d @ d
        assert np.all(slack >= -tol * norms * (w @ norms)), (family, slack)


@pytest.mark.parametrize("k", KS)
def test_cagrad_matches_the_primal(dtype, k):
    """Liu et al. (2021), Eq. 3: d in the ball, min_k g_k . d between the SLSQP bounds."""
    js = families(k, dtype)
    tol = TOL[dtype]
    for family, w in weights_of("cagrad", js, dtype).items():
        j = js[family]
        d = w @ j
        g0 = j.mean(0)
        top = np.max(np.sum(j**2, axis=1))
        # The Gramian's rounding: about tol * (|w| . norms)^2 in ||d - g0||^2.
        size = np.abs(w - 1 / k) @ np.linalg.norm(j, axis=1)
        radius = C * np.linalg.norm(g0)
        assert np.linalg.norm(d - g0) ** 2 <= radius**2 * (1 + 10 * tol) + 10 * tol * size**2
        got = np.min(j[nonzero(j)] @ d)
        lower, upper = cagrad_bounds(j, C)
        slack = max(10 * tol, 1e-7) * top
        assert lower - slack <= got <= upper + slack, (family, lower, got, upper, top)


@pytest.mark.parametrize("k", KS)
def test_imtl_g_projects_equally(dtype, k):
    """Liu et al. (2021), Eq. 11: g_k . d / ||g_k|| equal over the non-zero rows, sum w = 1."""
    js = families(k, dtype)
    tol = TOL[dtype]
    for family, w in weights_of("imtl_g", js, dtype).items():
        j = js[family]
        d = w @ j
        if family == "opposite0" or (dtype == np.float32 and family.startswith("opposite0.0")):
            # u_1 = -u_0: only d = 0 projects equally (C^+ gives a least-squares d); in
            # float32, 1 + cos(g_0, g_1) <= 1e-6 is below C's rounding.
            continue
        rows = j[nonzero(j)]
        proj = rows @ d / np.linalg.norm(rows, axis=1)
        size = np.abs(w) @ np.linalg.norm(j, axis=1)
        assert np.ptp(proj) <= 1e2 * tol * size, (family, proj)
        assert np.min(proj) >= -1e2 * tol * size, (family, proj)
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e2 * tol)
        assert np.all(w[~nonzero(j)] == 0), (family, w)


@pytest.mark.parametrize("k", KS)
def test_fair_allocation_solves_its_equation(dtype, k):
    """Ban & Ji (2024), Eq. 9: (G w)_k w_k^(1/alpha) = 1 on non-zero rows; FairGrad(1) = Nash."""
    js = families(k, dtype)
    tol = TOL[dtype]
    nash = weights_of("nash_mtl", js, dtype)
    for name, alpha in (("nash_mtl", 1.0), ("fairgrad_1", 1.0), ("fairgrad_2", 2.0)):
        for family, w in weights_of(name, js, dtype).items():
            j = js[family]
            live = nonzero(j)
            if family.startswith("opposite") or family == "duplicate":
                continue  # no positive solution when g1 = -g0; duplicates: checked below
            g = j @ j.T
            residual = (g @ w)[live] * w[live] ** (1 / alpha) - 1
            assert np.all(w[live] > 0) and np.max(np.abs(residual)) <= 1e2 * tol, (
                name,
                family,
                residual,
            )
            if alpha == 1.0:
                d, d_nash = w @ j, nash[family] @ j
                assert np.linalg.norm(d - d_nash) <= 1e2 * tol * np.linalg.norm(d_nash), (
                    name,
                    family,
                )


@pytest.mark.parametrize("k", KS)
def test_aligned_mtl_matches_the_svd(dtype, k):
    """Senushkin et al. (2023), Eqs. 7-10: d = (sigma_min U V^T)^T 1 on J's range."""
    js = families(k, dtype)
    for family, w in weights_of("aligned_mtl", js, dtype).items():
        if family.startswith("mixed") or family.startswith("opposite"):
            continue  # sigma_min below the Gramian's precision: no float32 claim
        j = js[family]
        u, s, vt = np.linalg.svd(j, full_matrices=False)
        kept = s > s.max() * 1e-6
        ref = (s[kept].min() * u[:, kept] @ vt[kept]).T @ np.ones(k)
        np.testing.assert_allclose(w @ j, ref, atol=1e2 * TOL[dtype] * np.abs(ref).max())


# ----------------------------------------------------------------------------- zero rows

# d(J with a zero row) = factor * d(J without it): the zero row drops out.
ZERO_ROW_FACTOR = {
    "mgda": 0.0,  # the min-norm point of a hull that contains 0 is 0 (MGDA's definition)
    "upgrad": 2 / 3,
    "dualproj": 2 / 3,
    "cagrad": 2 / 3,
    "imtl_g": 1.0,
    "aligned_mtl": 1.0,
    "nash_mtl": 1.0,
    "fairgrad_2": 1.0,
}


@pytest.mark.parametrize("name", list(ZERO_ROW_FACTOR))
def test_a_zero_row_drops_out(dtype, name):
    rng = np.random.default_rng(7)
    j2 = _rows(rng, 2).astype(dtype).astype(np.float64)
    j3 = np.concatenate([j2, np.zeros((1, N))])
    with_zero = weights_of(name, {"3": j3}, dtype)["3"] @ j3
    without = weights_of(name, {"2": j2}, dtype)["2"] @ j2
    expected = ZERO_ROW_FACTOR[name] * without
    np.testing.assert_allclose(with_zero, expected, atol=1e2 * TOL[dtype] * np.abs(without).max())


# ----------------------------------------------------------------------------- scale and dtype

SCALES = {np.float32: (1e-20, 1e-10, 1e10, 1e20), np.float64: (1e-30, 1e-10, 1e10, 1e30)}


def test_scale_laws_and_dtype(dtype):
    """w(a G) = a^p w(G): p = 0 (scale-invariant), -1/2 (Nash-MTL), -alpha/(alpha+1); the
    weights are in the Gramian's dtype (checked by ``batched``)."""
    j = families(3, dtype)["random0"]
    scales = SCALES[dtype]
    g = j @ j.T
    stacked = jnp.asarray(np.stack([g] + [a * g for a in scales]), dtype)
    for name, p in EXPONENT.items():
        w = batched(name, stacked)
        for a, w_a in zip(scales, w[1:], strict=True):
            np.testing.assert_allclose(w_a, a**p * w[0], rtol=1e2 * TOL[dtype], err_msg=name)


def test_float32_gradients_far_from_one_through_scaled_gramian():
    """Norms 1e20 overflow J J^T in float32, 1e-20 underflow it: scaled_gramian divides first
    and ``gradient_scale=`` carries the scale to the covariant weightings."""
    j = families(3, np.float32)["random0"]
    factors = (1.0, 1e20, 1e-20)
    pairs = [
        W.scaled_gramian({"a": jnp.asarray(j[:, :20] * c), "b": jnp.asarray(j[:, 20:] * c)})
        for c in factors
    ]
    gramians = jnp.stack([g.astype(jnp.float32) for g, _ in pairs])
    scales = jnp.stack([s.astype(jnp.float32) for _, s in pairs])
    for name, p in EXPONENT.items():
        w = batched(name, gramians, scales)
        for c, w_c in zip(factors[1:], w[1:], strict=True):
            # d(cJ) = c^(1 + 2p) d(J), i.e. w(c^2 G) = c^(2p) w(G).
            np.testing.assert_allclose(w_c, c ** (2 * p) * w[0], rtol=1e-4, err_msg=name)


TRANSFORMS = {
    "mgda": jaxmtl.transforms.mgda,
    "upgrad": jaxmtl.transforms.upgrad,
    "dualproj": jaxmtl.transforms.dualproj,
    "cagrad": lambda: jaxmtl.transforms.cagrad(c=C),
    "imtl_g": jaxmtl.transforms.imtl_g,
    "aligned_mtl": jaxmtl.transforms.aligned_mtl,
    "nash_mtl": jaxmtl.transforms.nash_mtl,
    "fairgrad_1": lambda: jaxmtl.transforms.fairgrad(alpha=1.0),
    "fairgrad_2": lambda: jaxmtl.transforms.fairgrad(alpha=2.0),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_aggregators_on_float32_gradients_far_from_one(name):
    """End to end through the optax transform: ``d(cJ) = c^(1 + 2p) d(J)`` for float32
    gradients scaled by c = 1e20 (J J^T would overflow) and 1e-20 (it would underflow)."""
    assert set(TRANSFORMS) == set(METHODS)
    j = families(3, np.float32)["random0"]
    tx = TRANSFORMS[name]()
    params = {"a": jnp.zeros(20), "b": jnp.zeros(N - 20)}

    @jax.jit
    def direction(j):
        updates, _ = tx.update({"a": j[:, :20], "b": j[:, 20:]}, tx.init(params), params)
        return jnp.concatenate([updates["a"], updates["b"]])

    d = np.asarray(direction(jnp.asarray(j)), np.float64)
    for c in (1e20, 1e-20):
        d_c = np.asarray(direction(jnp.asarray(j * np.float32(c))), np.float64)
        assert np.all(np.isfinite(d_c)), (name, c)
        expected = c ** (1.0 + 2.0 * EXPONENT[name]) * d
        np.testing.assert_allclose(d_c, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
