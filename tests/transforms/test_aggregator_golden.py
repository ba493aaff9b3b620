"""Golden values on ``J = [[-4, 1, 1], [6, 1, 1]]`` from independent float64 NumPy references.

Each reference is written from the paper's definition on the gradient *vectors* (never the
library's Gramian formulation): projections onto the dual cone and CAGrad's primal problem
are solved in parameter space with SciPy, Nash-MTL and FairGrad by SciPy root finding / least
squares, Aligned-MTL by an SVD of J. The library runs in float32, so tolerances are ~1e-5
relative (1e-4 for the fixed-iteration CAGrad solver). J is padded with two zero columns to
the harness's five parameters; zero columns change neither G nor the first three components.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so

from tests.transforms.aggregator_harness import direction, directions_over_steps

J = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
G1, G2 = J
LOSSES = np.array([1.0, 2.0])


def padded(j: np.ndarray) -> np.ndarray:
    return np.concatenate([j, np.zeros((j.shape[0], 2))], axis=1).astype(np.float32)


def library(name: str) -> np.ndarray:
    d = direction(name, padded(J), LOSSES.astype(np.float32))
    np.testing.assert_array_equal(d[3:], 0.0)
    return d[:3]


def project_onto_dual_cone(j: np.ndarray, g: np.ndarray) -> np.ndarray:
    """argmin_x ||x - g||^2 subject to J x >= 0 (SLSQP in parameter space)."""
    res = so.minimize(
        lambda x: np.sum((x - g) ** 2),
        g,
        jac=lambda x: 2 * (x - g),
        constraints=[{"type": "ineq", "fun": lambda x: j @ x, "jac": lambda x: j}],
        method="SLSQP",
        options={"ftol": 1e-13, "maxiter": 500},
    )
    assert np.all(j @ res.x >= -1e-9)
    return res.x


def numpy_adam_first_step(grad: np.ndarray, lr: float) -> np.ndarray:
    """Adam's first update: m_hat = g, v_hat = g^2, step = -lr g / (|g| + 1e-8)."""
    return -lr * grad / (np.abs(grad) + 1e-8)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference(name: str) -> np.ndarray:
    k = J.shape[0]
    if name == "mean":
        return J.mean(0)
    if name == "summed":
        return J.sum(0)
    if name == "constant":
        return np.array([0.5, 1.5]) @ J
    if name == "mgda":
        # Sener & Koltun (2018), Alg. 1: the two-task min-norm point in closed form.
        gamma = np.clip((G2 - G1) @ G2 / np.sum((G1 - G2) ** 2), 0.0, 1.0)
        return gamma * G1 + (1 - gamma) * G2
    if name == "upgrad":
        # Quinton & Rey (2024), Eq. 5: the mean of the projections onto the dual cone.
        return np.mean([project_onto_dual_cone(J, g) for g in J], axis=0)
    if name == "dualproj":
        return project_onto_dual_cone(J, J.mean(0))
    if name == "pcgrad":
        # Yu et al. (2020), Alg. 1 on vectors (with two tasks the order is irrelevant).
        out = []
        for i in range(k):
            g = J[i].copy()
            for j in range(k):
                if j != i and g @ J[j] < 0:
                    g = g - (g @ J[j]) / (J[j] @ J[j]) * J[j]
            out.append(g)
        return np.sum(out, axis=0)
    if name == "gradvac":
        # Wang et al. (2021), Eq. 3 with the initial targets phi_hat = 0.
        out = []
        for i in range(k):
            g = J[i].copy()
            for j in range(k):
                phi = g @ J[j] / (np.linalg.norm(g) * np.linalg.norm(J[j]))
                if j != i and phi < 0.0:
                    g = g + np.linalg.norm(g) * (0.0 - phi * 1.0) / np.linalg.norm(J[j]) * J[j]
            out.append(g)
        return np.sum(out, axis=0)
    if name == "cagrad":
        # Liu et al. (2021), Eq. 3 (primal): max_d min_i g_i.d  s.t. ||d - g0|| <= c ||g0||.
        c, g0 = 0.4, J.mean(0)
        radius2 = (c * np.linalg.norm(g0)) ** 2
        x0 = np.concatenate([g0, [min(J @ g0)]])
        res = so.minimize(
            lambda v: -v[-1],
            x0,
            jac=lambda v: np.concatenate([np.zeros(3), [-1.0]]),
            constraints=[
                {"type": "ineq", "fun": lambda v: J @ v[:-1] - v[-1]},
                {"type": "ineq", "fun": lambda v: radius2 - np.sum((v[:-1] - g0) ** 2)},
            ],
            method="SLSQP",
            options={"ftol": 1e-13, "maxiter": 1000},
        )
        assert np.sum((res.x[:-1] - g0) ** 2) <= radius2 * (1 + 1e-9)
        return res.x[:-1]
    if name == "imtl_g":
        # Liu et al. (2021), Eq. 11.
        u = J / np.linalg.norm(J, axis=1, keepdims=True)
        d_mat = J[0] - J[1:]
        u_mat = u[0] - u[1:]
        rest = J[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
        alpha = np.concatenate([[1 - rest.sum()], rest])
        return alpha @ J
    if name == "aligned_mtl":
        # Senushkin et al. (2023), Eqs. 7-10: sigma_min U V^T, summed over tasks.
        u, s, vt = np.linalg.svd(J, full_matrices=False)
        return (s.min() * u @ vt).T @ np.ones(k)
    if name == "nash_mtl":
        # Navon et al. (2022), Eq. 4: alpha_i (G alpha)_i = 1.
        # Minimise the convex potential 1/2 a^T G a - sum log a over a = exp(u) (BFGS).
        g = J @ J.T

        def potential(u):
            a = np.exp(u)
            return 0.5 * a @ g @ a - u.sum(), (g @ a) * a - 1.0

        res = so.minimize(potential, np.zeros(k), jac=True, method="BFGS", options={"gtol": 1e-12})
        alpha = np.exp(res.x)
        np.testing.assert_allclose(alpha * (g @ alpha), 1.0, atol=1e-9)
        return alpha @ J
    if name == "fairgrad":
        # Ban & Ji (2024), Eq. 9 with alpha = 2, by least squares as in the authors' code.
        g = J @ J.T
        res = so.least_squares(
            lambda w: g @ w - w ** (-1.0 / 2.0), np.ones(k), bounds=(1e-12, np.inf), xtol=1e-15
        )
        return res.x @ J
    if name == "gls":
        w = np.prod(LOSSES) ** (1 / k) / (k * LOSSES)
        return w @ J
    if name == "stch":
        p = np.full(k, 1 / k)
        return (p * softmax(p * LOSSES / 1.0)) @ J
    if name == "uncertainty":
        return (0.5 * np.exp(-np.zeros(k))) @ J
    if name == "dwa":
        return np.ones(k) @ J
    if name == "famo":
        z = softmax(np.zeros(k))
        return (z / (LOSSES + 1e-8)) / np.sum(z / (LOSSES + 1e-8)) @ J
    if name == "db_mtl":
        m = 0.1 * J / LOSSES[:, None]
        norms = np.linalg.norm(m, axis=1)
        return (norms.max() / norms) @ m
    raise KeyError(name)


GOLDEN = [
    "mean",
    "summed",
    "constant",
    "mgda",
    "upgrad",
    "dualproj",
    "pcgrad",
    "gradvac",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "nash_mtl",
    "fairgrad",
    "gls",
    "stch",
    "uncertainty",
    "dwa",
    "famo",
    "db_mtl",
]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_first_step(name):
    expected = reference(name)
    rtol = 1e-4 if name == "cagrad" else 2e-5
    np.testing.assert_allclose(
        library(name), expected, rtol=rtol, atol=rtol * np.abs(expected).max()
    )


def test_golden_values_are_not_all_alike():
    """The references discriminate: conflict-aware methods differ from the mean here."""
    mean = reference("mean")
    for name in ("mgda", "upgrad", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl"):
        assert not np.allclose(reference(name), mean * (reference(name) @ mean / (mean @ mean)))


def test_uncertainty_second_step():
    """Kendall et al. (2018): s takes one Adam step on sum exp(-s) L / 2 + s / 2."""
    ds = directions_over_steps("uncertainty", [padded(J)] * 2, [LOSSES] * 2)
    s = numpy_adam_first_step(0.5 * (1.0 - np.exp(0.0) * LOSSES), 1e-3)
    np.testing.assert_allclose(ds[1][:3], (0.5 * np.exp(-s)) @ J, rtol=2e-5)


def test_dwa_third_step():
    """Liu et al. (2019), Eq. 7: w = K softmax((L(t-1) / L(t-2)) / T), T = 2."""
    losses = [np.array([1.0, 2.0]), np.array([0.5, 1.8]), np.array([0.4, 1.0])]
    ds = directions_over_steps("dwa", [padded(J)] * 3, losses)
    w = 2 * softmax((losses[1] / losses[0]) / 2.0)
    np.testing.assert_allclose(ds[2][:3], w @ J, rtol=2e-5)
    np.testing.assert_allclose(ds[1][:3], np.ones(2) @ J, rtol=2e-5)


def test_famo_second_step():
    """Liu et al. (2023), Alg. 1: xi descends J_softmax^T (log L(t-1) - log L(t)) by Adam."""
    losses = [np.array([1.0, 2.0]), np.array([0.5, 1.8])]
    ds = directions_over_steps("famo", [padded(J)] * 2, losses)
    z0 = softmax(np.zeros(2))
    delta = np.log(losses[0] + 1e-8) - np.log(losses[1] + 1e-8)
    jac = np.diag(z0) - np.outer(z0, z0)
    grad = jac.T @ delta + 1e-3 * np.zeros(2)  # L2 weight decay on xi = 0
    xi = numpy_adam_first_step(grad, 0.025)
    z = softmax(xi)
    w = (z / (losses[1] + 1e-8)) / np.sum(z / (losses[1] + 1e-8))
    np.testing.assert_allclose(ds[1][:3], w @ J, rtol=2e-5)


def test_db_mtl_second_step():
    """Lin et al. (2023), Alg. 1: m <- h + (beta / t^sigma)(m - h), d = sum max|m|/|m_k| m_k."""
    js = [J, 0.5 * J[::-1]]
    losses = [np.array([1.0, 2.0]), np.array([0.5, 1.5])]
    ds = directions_over_steps("db_mtl", [padded(j) for j in js], losses)
    m = np.zeros_like(J)
    for t, (j, loss) in enumerate(zip(js, losses, strict=True), start=1):
        h = j / loss[:, None]
        m = h + 0.9 / t**0.5 * (m - h)
    norms = np.linalg.norm(m, axis=1)
    np.testing.assert_allclose(ds[1][:3], (norms.max() / norms) @ m, rtol=2e-5)


def test_gradvac_targets_follow_the_ema():
    """Wang et al. (2021), Eq. 4: at step 2 the target is beta * phi(step 1) = 0.01 phi."""
    ds = directions_over_steps("gradvac", [padded(J)] * 2, [LOSSES] * 2)
    phi = G1 @ G2 / (np.linalg.norm(G1) * np.linalg.norm(G2))
    target = 0.01 * phi
    out = []
    for i, j in ((0, 1), (1, 0)):
        g = J[i].copy()
        cos = g @ J[j] / (np.linalg.norm(g) * np.linalg.norm(J[j]))
        if cos < target:
            g = (
                g
                + np.linalg.norm(g)
                * (target * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - target**2))
                / (np.linalg.norm(J[j]) * np.sqrt(1 - target**2))
                * J[j]
            )
        out.append(g)
    np.testing.assert_allclose(ds[1][:3], np.sum(out, axis=0), rtol=2e-5)
