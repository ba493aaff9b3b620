"""Small solvers over a K x K Gramian, run inside ``jit`` with fixed iteration counts.

Every Gramian weighting reduces to one of three problems on ``G = J J^T`` (K x K, PSD):

* a non-negative quadratic programme ``min_{x >= 0} 1/2 x^T Q x + c^T x``, solved exactly by
  the Lawson-Hanson active-set method (Lawson & Hanson, "Solving Least Squares Problems",
  1974, ch. 23) written as one flat ``fori_loop`` whose iterations are either "free one more
  variable" or "step back to the feasible set"; MGDA, UPGrad and DualProj are such QPs;
* the fair-allocation equation ``G w = w^(-1/alpha)`` (Nash-MTL at ``alpha = 1``, FairGrad),
  the stationarity condition of a strictly convex function, solved by damped Newton steps;
* the CAGrad dual ``min_{w in simplex} b^T w + s ||J^T w||``, solved by accelerated projected
  gradient.

Each solver first rescales ``G`` by its largest diagonal entry (every weighting here is
invariant to that rescaling or transforms simply under it), so that gradients of norm 1e-8 and
1e8 are handled alike, and adds a small ridge that keeps the K x K solves regular when
gradients are identical, opposite or zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "default_iterations",
    "fair_allocation",
    "min_norm_in_simplex",
    "nonnegative_qp",
    "normalized_gramian",
    "project_onto_dual_cone",
    "project_onto_simplex",
    "simplex_cagrad",
]


def default_iterations(num_tasks: int) -> int:
    """Active-set iterations that suffice for K tasks (each adds or drops one variable)."""
    return 3 * num_tasks + 2


def _ridge(dtype: jnp.dtype) -> float:
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def regularized(g: jax.Array) -> jax.Array:
    """``g + eps diag(max(g_kk, eps))``: a ridge relative to each task's own squared norm.

    Relative per task, so that a task whose gradient is 1e3 times smaller than another's is
    perturbed no more than it (a uniform ridge would swamp it); the floor keeps zero
    gradients regular.
    """
    eps = _ridge(g.dtype)
    return g + jnp.diag(eps * jnp.maximum(jnp.diagonal(g), eps))


def _tolerance(dtype: jnp.dtype) -> float:
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def normalized_gramian(gramian: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(G / s, s)`` with ``s`` the largest diagonal entry of ``G`` (1 when ``G`` is zero)."""
    scale = jnp.max(jnp.diagonal(gramian))
    tiny = jnp.finfo(gramian.dtype).tiny
    scale = jnp.where(scale > tiny, scale, jnp.ones_like(scale))
    return gramian / scale, scale


def nonnegative_qp(q: jax.Array, c: jax.Array, *, iterations: int) -> jax.Array:
    """``argmin_{x >= 0} 1/2 x^T q x + c^T x`` for a symmetric positive-definite ``q`` (K x K).

    Lawson-Hanson active set (Lawson & Hanson 1974, Algorithm NNLS, ch. 23, stated for a
    quadratic form): keep a feasible ``x`` and a set of free variables; solve the
    equality-constrained problem on the free set; if its solution is positive, free the
    variable with the most negative gradient (stop when none is negative), else step back
    along the segment until a free variable reaches 0 and fix it. Every iterate is feasible,
    so stopping after ``iterations`` returns a feasible point; K-variable problems converge
    in about 2K iterations.

    Args:
      q: (K, K) symmetric positive definite.
      c: (K,) linear term.
      iterations: the fixed number of loop iterations.

    Returns:
      x: (K,), non-negative.
    """
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


def min_norm_in_simplex(gramian: jax.Array, *, iterations: int) -> jax.Array:
    """``argmin_{a in simplex} a^T G a``: the min-norm point of the convex hull of the rows.

    With ``x = argmin_{x >= 0} 1/2 x^T G x - 1^T x`` the KKT conditions of both problems match
    for ``a = x / sum(x)`` (Désidéri, "Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization", 2012), so the simplex QP is one non-negative QP.
    """
    g, _ = normalized_gramian(gramian)
    q = regularized(g)
    x = nonnegative_qp(q, -jnp.ones(g.shape[:1], g.dtype), iterations=iterations)
    return x / jnp.sum(x)


def project_onto_dual_cone(gramian: jax.Array, u: jax.Array, *, iterations: int) -> jax.Array:
    """Weights ``v`` such that ``J^T v`` is the projection of ``J^T u`` onto ``{x: J x >= 0}``.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024), Prop. 1: the
    projection is ``J^T v`` with ``v = argmin_{v >= u} v^T G v``. Solved as a non-negative QP
    in ``lambda = v - u``: ``min 1/2 l^T G l + (G u)^T l``. ``u`` may carry leading batch axes
    (one problem per row, solved under ``vmap``).
    """
    g, _ = normalized_gramian(gramian)
    q = regularized(g)

    def one(u_row):
        return u_row + nonnegative_qp(q, g @ u_row, iterations=iterations)

    if u.ndim == 1:
        return one(u)
    return jax.vmap(one)(u)


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
    minimised by Newton steps with a backtracking line search on ``phi`` (twelve halvings
    tried at once, ``w > 0`` kept), from the solution for orthogonal gradients, on ``G``
    rescaled to unit largest diagonal; the solution for ``G`` is the rescaled one
    times ``s^(-alpha / (alpha + 1))``.

    With ``correlation=True`` (valid for ``alpha = 1`` only) it solves instead on the
    correlation matrix ``C = S^-1 G S^-1``, ``S = diag(||g_k||)``, and returns ``S^-1 a``
    for ``C a = 1 / a``: the same solution, but every task conditioned alike whatever the
    spread of gradient norms (Nash-MTL is invariant to rescaling one task).
    """
    if correlation:
        dtype = gramian.dtype
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
        tiny = jnp.finfo(dtype).tiny
        inv = jnp.where(norms > tiny, 1.0 / jnp.where(norms > tiny, norms, 1.0), 1.0)
        corr = gramian * inv[:, None] * inv[None, :]
        return inv * fair_allocation(corr, alpha=1.0, iterations=iterations)
    g, scale = normalized_gramian(gramian)
    dtype = g.dtype
    q = regularized(g)
    alpha = jnp.asarray(alpha, dtype)
    power = -1.0 / alpha
    # h(w) = w^(1 + power) / (1 + power), or log w at alpha = 1.
    exponent = 1.0 + power
    is_log = jnp.abs(exponent) < 1e-6
    safe_exponent = jnp.where(is_log, 1.0, exponent)
    steps = 0.5 ** jnp.arange(12, dtype=dtype)

    def potential(w):
        h = jnp.where(is_log, jnp.log(w), w**safe_exponent / safe_exponent)
        return 0.5 * jnp.einsum("...i,ij,...j->...", w, q, w) - jnp.sum(h, axis=-1)

    def body(_, w):
        residual = q @ w - w**power
        hessian = q + jnp.diag(-power * w ** (power - 1.0))
        delta = jnp.linalg.solve(hessian, residual)
        # Backtracking done in parallel: the best of 1, 1/2, ..., 1/2^11 that stays in w > 0.
        candidates = w[None, :] - steps[:, None] * delta[None, :]
        feasible = jnp.all(candidates > 0.0, axis=1)
        values = jnp.where(
            feasible, potential(jnp.where(feasible[:, None], candidates, 1.0)), jnp.inf
        )
        best = jnp.argmin(values)
        searched = jnp.where(values[best] <= potential(w), candidates[best], w)
        # Near the solution phi's decrease drowns in rounding (float32): there the full Newton
        # step is taken whenever it shrinks the residual.
        full = candidates[0]
        new_residual = q @ full - jnp.where(feasible[0], full, 1.0) ** power
        shrinks = feasible[0] & (jnp.sum(new_residual**2) < jnp.sum(residual**2))
        return jnp.where(shrinks, full, searched)

    # Exact when the gradients are orthogonal: q_kk w_k = w_k^power.
    w0 = jnp.diagonal(q) ** (-alpha / (alpha + 1.0))
    w = jax.lax.fori_loop(0, iterations, body, w0)
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


def simplex_cagrad(
    gramian: jax.Array, *, c: jax.Array | float, iterations: int
) -> tuple[jax.Array, jax.Array]:
    """CAGrad's dual ``w* = argmin_{w in simplex} w^T G 1/K + c ||g0|| ||J^T w||``.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS 2021),
    Eq. 4 (dual of Eq. 3), with ``g0 = J^T 1/K``. Accelerated projected gradient (Nesterov
    momentum, restarted when the objective rises) on the Gramian rescaled to unit largest
    diagonal, step ``1 / L`` from the Lipschitz bound ``c ||g0|| lambda_max / r`` where ``r``
    lower-bounds ``||J^T w||`` by the min-norm point's norm (floored).

    Returns:
      ``(w, scale)``: the simplex weights and the rescaling ``s`` of ``G``.
    """
    g, scale = normalized_gramian(gramian)
    dtype = g.dtype
    k = g.shape[0]
    c = jnp.asarray(c, dtype)
    mean = jnp.full((k,), 1.0 / k, dtype)
    b = g @ mean
    g0_norm = jnp.sqrt(jnp.maximum(mean @ b, 0.0))
    radius = c * g0_norm
    floor = 1e-3
    hull = min_norm_in_simplex(g, iterations=default_iterations(k))
    r_min = jnp.maximum(jnp.sqrt(jnp.maximum(hull @ g @ hull, 0.0)), floor)
    lipschitz = jnp.maximum(radius * jnp.trace(g) / r_min, floor)
    eps = floor * floor

    def objective(w):
        return b @ w + radius * jnp.sqrt(w @ g @ w + eps)

    def gradient(w):
        gw = g @ w
        return b + radius * gw / jnp.sqrt(w @ gw + eps)

    def body(i, carry):
        w, w_prev, value_prev = carry
        momentum = i.astype(dtype) / (i.astype(dtype) + 3.0)
        y = project_onto_simplex(w + momentum * (w - w_prev))
        w_next = project_onto_simplex(y - gradient(y) / lipschitz)
        value = objective(w_next)
        rose = value > value_prev
        # Restart: on a rise, take a plain projected-gradient step from w instead.
        plain = project_onto_simplex(w - gradient(w) / lipschitz)
        w_next = jnp.where(rose, plain, w_next)
        return w_next, w, jnp.minimum(objective(w_next), value_prev)

    w0 = hull
    w, _, _ = jax.lax.fori_loop(0, iterations, body, (w0, w0, objective(w0)))
    return w, scale
