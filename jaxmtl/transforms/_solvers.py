"""Small solvers over a K x K Gramian, run inside ``jit`` with fixed iteration counts.

Every Gramian weighting reduces to one of three problems on ``G = J J^T`` (K x K, PSD):

* a non-negative quadratic programme ``min_{x >= 0} 1/2 x^T Q x + c^T x``, solved exactly by
  the Lawson-Hanson active-set method (Lawson & Hanson, "Solving Least Squares Problems",
  1974, ch. 23) written as one flat ``fori_loop`` whose iterations are either "free one more
  variable" or "step back to the feasible set"; MGDA, UPGrad and DualProj are such QPs, and
  CAGrad's primal is a one-dimensional search over a family of them;
* the fair-allocation equation ``G w = w^(-1/alpha)`` (Nash-MTL at ``alpha = 1``, FairGrad),
  the stationarity condition of a strictly convex function, solved by damped Newton steps.

Scale. Tasks whose gradient norms differ by 1e6 (float32) or 1e8 (float64) are handled
alike: the QP is solved in variables rescaled to a unit-diagonal ``Q`` (Jacobi scaling, an
exact change of variables) with a ridge and tolerances relative to that unit scale, and its
linear term rescaled to unit largest entry; the fair allocation is solved in variables
scaled by its solution for orthogonal gradients. A zero row of ``G`` (a task with a zero
gradient) is detected relative to the largest diagonal entry and kept out of every solve.
Gradients so large or small that ``J J^T`` would leave the float range are divided by
:func:`gradient_scale` before the Gramian is formed (``weighting.scaled_gramian``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "cagrad_primal",
    "correlation_gramian",
    "default_iterations",
    "fair_allocation",
    "gradient_scale",
    "min_norm_in_simplex",
    "nonnegative_qp",
    "nonzero_rows",
    "normalized_gramian",
    "project_onto_dual_cone",
    "project_onto_simplex",
]


def default_iterations(num_tasks: int) -> int:
    """Active-set iterations that suffice for K tasks (each adds or drops one variable)."""
    return 3 * num_tasks + 2


def _ridge(dtype: jnp.dtype) -> float:
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def _tolerance(dtype: jnp.dtype) -> float:
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def gradient_scale(leaves: list[jax.Array]) -> jax.Array:
    """A power of two ``s >= max |x|`` over ``leaves`` (1 if they are all zero or not finite).

    Rows divided by ``s`` have entries in [-1, 1], so their Gramian neither overflows nor
    underflows, and the division is exact. The result is float64 if any leaf is, else float32.
    """
    dtype = jnp.float64 if any(leaf.dtype == jnp.float64 for leaf in leaves) else jnp.float32
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)).astype(dtype) for leaf in leaves]))
    _, exponent = jnp.frexp(top)
    scale = jnp.ldexp(jnp.ones((), dtype), exponent)
    return jnp.where((top > 0) & jnp.isfinite(top), scale, jnp.ones((), dtype))


def normalized_gramian(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(G / s, s)`` with ``s`` the largest diagonal entry of ``G`` (1 when ``G`` is zero)."""
    scale = jnp.max(jnp.diagonal(gramian))
    tiny = jnp.finfo(gramian.dtype).tiny
    scale = jnp.where(scale > tiny, scale, jnp.ones_like(scale))
    return gramian / scale, scale


def nonzero_rows(gramian: jax.Array) -> jax.Array:
    """(K,) bool: rows whose squared norm exceeds ``tiny`` times the largest one."""
    diag = jnp.diagonal(gramian)
    return diag > jnp.finfo(gramian.dtype).tiny * jnp.max(diag)


def _jacobi(q: jax.Array) -> jax.Array:
    """``1 / sqrt(q_kk)`` (K,), and ``1 / sqrt(max q_kk)`` on zero rows (1 when q is zero)."""
    diag = jnp.diagonal(q)
    top = jnp.max(diag)
    fill = jnp.where(top > 0, top, jnp.ones_like(top))
    return jax.lax.rsqrt(jnp.where(nonzero_rows(q), diag, fill))


def _active_set(q: jax.Array, c: jax.Array, iterations: int) -> jax.Array:
    k = c.shape[-1]
    dtype = q.dtype
    tol = _tolerance(dtype)
    eye = jnp.eye(k, dtype=dtype)

    def solve_on(free):
        both = free[:, None] & free[None, :]
        matrix = jnp.where(both, q, 0.0) + jnp.where(free, 0.0, 1.0) * eye
        return jnp.linalg.solve(matrix, jnp.where(free, -c, 0.0))

    def body(_, carry):
        x, free = carry
        s = solve_on(free)
        feasible = jnp.all(jnp.where(free, s > 0.0, True))
        # Optimal on the face: free the variable whose gradient is most negative.
        slope = jnp.where(free, -jnp.inf, -(q @ s + c))
        j = jnp.argmax(slope)
        free_more = free.at[j].set(free[j] | (slope[j] > tol))
        # Infeasible: move towards s until the first free variable reaches zero.
        gap = x - s
        blocking = free & (s <= 0.0)
        ratios = jnp.where(blocking & (gap > 0.0), x / jnp.where(gap > 0.0, gap, 1.0), 0.0)
        step = jnp.min(jnp.where(blocking, ratios, 1.0))
        moved = jnp.where(free, x + step * (s - x), 0.0)
        still_free = free & (moved > tol * jnp.max(jnp.abs(moved)))
        moved = jnp.where(still_free, moved, 0.0)
        x = jnp.where(feasible, jnp.where(free, s, 0.0), moved)
        free = jnp.where(feasible, free_more, still_free)
        return x, free

    x0 = jnp.zeros((k,), dtype)
    free0 = jnp.zeros((k,), bool)
    x, _ = jax.lax.fori_loop(0, iterations, body, (x0, free0))
    return x


def nonnegative_qp(q: jax.Array, c: jax.Array, *, iterations: int, ridge: float = 0.0) -> jax.Array:
    """``argmin_{x >= 0} 1/2 x^T (q + ridge D) x + c^T x``, ``D = diag(q)``, for a PSD ``q``.

    Lawson-Hanson active set (Lawson & Hanson 1974, Algorithm NNLS, ch. 23, stated for a
    quadratic form): keep a feasible ``x`` and a set of free variables; solve the
    equality-constrained problem on the free set; if its solution is positive, free the
    variable with the most negative gradient (stop when none is negative), else step back
    along the segment until a free variable reaches 0 and fix it. Every iterate is feasible,
    so stopping after ``iterations`` returns a feasible point; K-variable problems converge
    in about 2K iterations.

    Solved in the variables ``y = D^(1/2) x`` (unit diagonal, so that the ridge and the
    tolerances are relative to each variable's own scale) with ``c`` divided by its most
    negative entry's size (the solution is positively homogeneous in ``c``). Zero rows of
    ``q`` get the ridge alone.

    Args:
      q: (K, K) symmetric positive semi-definite (definite when ``ridge`` is 0).
      c: (K,) linear term.
      iterations: the fixed number of loop iterations.
      ridge: relative ridge, e.g. 1e-6 in float32.

    Returns:
      x: (K,), non-negative.
    """
    k = c.shape[-1]
    s = _jacobi(q)
    qs = q * s[:, None] * s[None, :] + ridge * jnp.eye(k, dtype=q.dtype)
    cs = c * s
    # Only the negative entries of c move x off 0: the most negative one sets the scale.
    size = jnp.max(-cs)
    size = jnp.where(size > 0, size, jnp.ones_like(size))
    return s * _active_set(qs, cs / size, iterations) * size


def min_norm_in_simplex(gramian: jax.Array, *, iterations: int) -> jax.Array:
    """``argmin_{a in simplex} a^T G a``: the min-norm point of the convex hull of the rows.

    With ``x = argmin_{x >= 0} 1/2 x^T G x - 1^T x`` the KKT conditions of both problems match
    for ``a = x / sum(x)`` (Désidéri, "Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization", 2012), so the simplex QP is one non-negative QP. When a row
    is zero the hull contains 0: the weights are spread evenly over the zero rows (``d = 0``).
    """
    dtype = gramian.dtype
    live = nonzero_rows(gramian)
    ones = jnp.ones(gramian.shape[:1], dtype)
    x = nonnegative_qp(gramian, -ones, iterations=iterations, ridge=_ridge(dtype))
    dead = jnp.where(live, 0.0, ones)
    return jnp.where(jnp.all(live), x / jnp.sum(x), dead / jnp.maximum(jnp.sum(dead), 1.0))


def project_onto_dual_cone(gramian: jax.Array, u: jax.Array, *, iterations: int) -> jax.Array:
    """Weights ``v`` such that ``J^T v`` is the projection of ``J^T u`` onto ``{x: J x >= 0}``.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024), Prop. 1: the
    projection is ``J^T v`` with ``v = argmin_{v >= u} v^T G v``. Solved as a non-negative QP
    in ``lambda = v - u``: ``min 1/2 l^T G l + (G u)^T l``. ``u`` may carry leading batch axes
    (one problem per row, solved under ``vmap``).
    """
    ridge = _ridge(gramian.dtype)

    def one(u_row):
        return u_row + nonnegative_qp(gramian, gramian @ u_row, iterations=iterations, ridge=ridge)

    if u.ndim == 1:
        return one(u)
    return jax.vmap(one)(u)


def correlation_gramian(gramian: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(C, 1/||g||, live)``: ``C = S^-1 G S^-1`` with zero rows replaced by the identity's."""
    live = nonzero_rows(gramian)
    norms = jnp.sqrt(jnp.where(live, jnp.diagonal(gramian), 1.0))
    inv = jnp.where(live, 1.0 / norms, 0.0)
    both = live[:, None] & live[None, :]
    eye = jnp.eye(gramian.shape[0], dtype=gramian.dtype)
    corr = jnp.where(both, gramian * inv[:, None] * inv[None, :], eye)
    return corr, inv, live


def fair_allocation(
    gramian: jax.Array,
    *,
    alpha: jax.Array | float,
    iterations: int,
    correlation: bool = False,
) -> jax.Array:
    """The positive solution ``w`` of ``G w = w^(-1/alpha)`` (elementwise power).

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning" (ICML 2024), Eq. 9; at
    ``alpha = 1`` it is Nash-MTL's ``G w = 1 / w`` (Navon et al., "Multi-Task Learning as a
    Bargaining Game", ICML 2022, Eq. 4). The equation is the stationarity condition of the
    strictly convex ``phi(w) = 1/2 w^T G w - sum_i h(w_i)`` with ``h'(w) = w^(-1/alpha)``,
    minimised by Newton steps (Jacobi-preconditioned solves) with a backtracking line search
    on ``phi`` (twelve halvings tried at once, ``w > 0`` kept), in the variables
    ``z = w / w0``, ``w0`` the solution for orthogonal gradients, on ``G`` rescaled to unit
    largest diagonal; the solution for ``G`` is the rescaled one times
    ``s^(-alpha / (alpha + 1))``. Zero rows of ``G`` are left out and get ``w_k = 0``.

    With ``correlation=True`` (valid for ``alpha = 1`` only) it solves instead on the
    correlation matrix ``C = S^-1 G S^-1``, ``S = diag(||g_k||)``, and returns ``S^-1 a``
    for ``C a = 1 / a``: the same solution, but every task conditioned alike whatever the
    spread of gradient norms (Nash-MTL is invariant to rescaling one task).
    """
    if correlation:
        corr, inv, _ = correlation_gramian(gramian)
        return inv * fair_allocation(corr, alpha=1.0, iterations=iterations)
    dtype = gramian.dtype
    live = nonzero_rows(gramian)
    g, scale = normalized_gramian(gramian)
    eye = jnp.eye(g.shape[0], dtype=dtype)
    g = jnp.where(live[:, None] & live[None, :], g, eye)
    diag = jnp.diagonal(g)
    q = g + _ridge(dtype) * jnp.diag(diag)
    alpha = jnp.asarray(alpha, dtype)
    power = -1.0 / alpha
    # Exact when the gradients are orthogonal: q_kk w_k = w_k^power.
    w0 = diag ** (-alpha / (alpha + 1.0))
    qz = q * w0[:, None] * w0[None, :]
    # h(w) = w^(1 + power) / (1 + power), or log w at alpha = 1.
    exponent = 1.0 + power
    is_log = jnp.abs(exponent) < 1e-6
    safe_exponent = jnp.where(is_log, 1.0, exponent)
    steps = 0.5 ** jnp.arange(12, dtype=dtype)

    def potential(z):
        w = w0 * z
        h = jnp.where(is_log, jnp.log(w), w**safe_exponent / safe_exponent)
        return 0.5 * jnp.einsum("...i,ij,...j->...", z, qz, z) - jnp.sum(h, axis=-1)

    def relative_residual(z):
        """``(G w)_k / w_k^power - 1``: zero at the solution, free of the tasks' scales."""
        return (qz @ z) / (w0 * (w0 * z) ** power) - 1.0

    def body(_, z):
        w = w0 * z
        gradient = qz @ z - w0 * w**power
        hessian = qz + jnp.diag(-power * w0**2 * w ** (power - 1.0))
        pre = jax.lax.rsqrt(jnp.diagonal(hessian))
        delta = pre * jnp.linalg.solve(hessian * pre[:, None] * pre[None, :], pre * gradient)
        # Backtracking done in parallel: the best of 1, 1/2, ..., 1/2^11 that stays in z > 0.
        candidates = z[None, :] - steps[:, None] * delta[None, :]
        feasible = jnp.all(candidates > 0.0, axis=1)
        values = jnp.where(
            feasible, potential(jnp.where(feasible[:, None], candidates, 1.0)), jnp.inf
        )
        best = jnp.argmin(values)
        searched = jnp.where(values[best] <= potential(z), candidates[best], z)
        # Near the solution phi's decrease drowns in rounding (float32): there the full Newton
        # step is taken whenever it shrinks the relative residual.
        full = jnp.where(feasible[0], candidates[0], 1.0)
        shrinks = feasible[0] & (
            jnp.sum(relative_residual(full) ** 2) < jnp.sum(relative_residual(z) ** 2)
        )
        return jnp.where(shrinks, full, searched)

    z = jax.lax.fori_loop(0, iterations, body, jnp.ones_like(w0))
    w = jnp.where(live, w0 * z, 0.0)
    return w * scale ** (-alpha / (alpha + 1.0))


def project_onto_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` (K,) onto the probability simplex (sort-based).

    Duchi et al., "Efficient Projections onto the l1-Ball for Learning in High Dimensions"
    (ICML 2008), Fig. 1.
    """
    k = v.shape[-1]
    sorted_desc = jnp.sort(v)[::-1]
    cumulative = jnp.cumsum(sorted_desc) - 1.0
    index = jnp.arange(1, k + 1, dtype=v.dtype)
    support = sorted_desc - cumulative / index > 0.0
    rho = jnp.sum(support)
    theta = cumulative[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def cagrad_primal(
    gramian: jax.Array, *, c: jax.Array | float, iterations: int, points: int = 8
) -> jax.Array:
    """Weights ``x`` (K,) with ``d = J^T x`` solving CAGrad's primal problem.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS 2021),
    Eq. 3: ``max_d min_k g_k . d`` subject to ``||d - g0|| <= c ||g0||``, ``g0 = J^T 1/K``.
    For a level ``t``, the point of ``{d : J d >= t}`` nearest to ``g0`` is
    ``g0 + J^T l(t)`` with ``l(t) = argmin_{l >= 0} 1/2 l^T G l + (G 1/K - t)^T l`` (one
    non-negative QP); its distance to ``g0`` grows with ``t``, and the optimum is the largest
    ``t`` at which the nearest point lies in the ball. That ``t`` is found by multisection
    between ``min_k g_k . g0`` (``d = g0``) and ``min_k g_k . g0 + c ||g0|| ||g_k||``:
    ``points`` levels in parallel per round, ``ceil(iterations / points)`` rounds, each
    shrinking the bracket ``points + 1``-fold; a level counts as reached only if the QP's
    point is in the ball and attains it (so the ridge cannot fake an infeasible level). Unlike
    the dual ``d = g0 + c ||g0|| g_w / ||g_w||``, this stays exact when ``g_w -> 0`` (nearly
    opposite gradients). Zero rows are left out of the ``min``. Returns ``x = 1/K + l``.
    """
    dtype = gramian.dtype
    k = gramian.shape[0]
    g, _ = normalized_gramian(gramian)
    live = nonzero_rows(g)
    mean = jnp.full((k,), 1.0 / k, dtype)
    b = g @ mean
    radius = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(mean @ b, 0.0))
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
    low = jnp.min(jnp.where(live, b, jnp.inf))
    high = jnp.min(jnp.where(live, b + radius * norms, jnp.inf))
    low = jnp.where(jnp.isfinite(low), low, 0.0)
    high = jnp.where(jnp.isfinite(high), high, 0.0)
    eps = jnp.finfo(dtype).eps
    slack = 10.0 * eps * (jnp.maximum(jnp.abs(low), jnp.abs(high)) + radius)
    qp_iterations = default_iterations(k)
    jacobi = _jacobi(g)
    unit = g * jacobi[:, None] * jacobi[None, :]
    eye = jnp.eye(k, dtype=dtype)

    def exact_on_support(lam, linear):
        """The QP re-solved on the support the ridged solve found, with a rounding-size ridge.

        The ridge shifts the constraints by ``ridge * l``; at ``10 eps`` that is rounding.
        """
        free = lam > 0.0
        matrix = jnp.where(free[:, None] & free[None, :], unit, 0.0) + jnp.where(free, 0.0, eye)
        matrix = matrix + 10.0 * eps * eye
        exact = jacobi * jnp.linalg.solve(matrix, jnp.where(free, -linear * jacobi, 0.0))
        return jnp.where(jnp.all(jnp.isfinite(exact) & (exact >= 0.0)), exact, lam)

    def reach(t):
        linear = jnp.where(live, b - t, 1.0)
        lam = nonnegative_qp(g, linear, iterations=qp_iterations, ridge=_ridge(dtype))
        lam = exact_on_support(lam, linear)
        attained = jnp.min(jnp.where(live, b + g @ lam, jnp.inf))
        inside = lam @ g @ lam <= radius**2 * (1.0 + 10.0 * eps) + slack**2
        # Rounding in b + G l: a backward-stable solve leaves about eps |G| |l|.
        rounding = slack + 100.0 * eps * jnp.max(jnp.abs(g) @ lam)
        return lam, inside & (attained >= t - rounding)

    fractions = jnp.arange(1, points + 1, dtype=dtype) / (points + 1)

    def round_(_, carry):
        lo, hi, best = carry
        levels = lo + (hi - lo) * fractions
        lams, ok = jax.vmap(reach)(levels)
        # The first level not reached; the one before it is the new lower end.
        first = jnp.argmin(jnp.append(ok, False))
        reached = first > 0
        before = jnp.maximum(first - 1, 0)
        new_lo = jnp.where(reached, levels[before], lo)
        new_hi = jnp.where(first < points, levels[jnp.minimum(first, points - 1)], hi)
        return new_lo, new_hi, jnp.where(reached, lams[before], best)

    rounds = math.ceil(iterations / points)
    _, _, lam = jax.lax.fori_loop(0, rounds, round_, (low, high, jnp.zeros((k,), dtype)))
    return mean + lam
