"""The Z-loss of a linear output layer over D classes, computed without the N x D logits.

A spherical-family loss depends on the outputs ``o = W h`` only through ``s = sum_k o_k``,
``q = sum_k o_k^2`` and the target output ``o_c`` (de Brebisson & Vincent, "An Exploration
of Softmax Alternatives Belonging to the Spherical Loss Family", ICLR 2016, Sec. 2), so
loss and gradients of such a layer need only d x d and d-sized summaries of ``W`` (Vincent,
de Brebisson & Bouthillier, "Efficient Exact Gradient Update for training Deep Networks
with Very Large Sparse Targets", NeurIPS 2015). This module applies that to the Z-loss of
de Brebisson & Vincent ("The Z-loss: a shift and scale invariant classification loss
belonging to the Spherical Family", 2016), reusing ``jaxmtl.losses.classification``
(``z_loss_from_statistics``) for the loss itself. Shapes: ``W`` (D, d) (row k is the
weight vector of class k, so ``o_n = W h_n``), features ``h`` (N, d), integer labels (N,).

Two paths, both exact (equal to the dense loss and its gradients up to rounding):

* :func:`gram_z_loss` -- any optimizer. A ``jax.custom_vjp`` loss of ``(W, h)`` whose
  forward and backward cost O(D d^2 + N d^2) instead of O(N D d): the dense ``dL/dW`` (D, d)
  is formed, but as ``W_c B + scatter-add of the N target rows + a rank-one term``.
* :func:`factored_z_loss_sgd` -- plain SGD only (the NeurIPS 2015 algorithm). ``W`` is kept
  factored as ``V U + 1 omega^T`` with d x d summaries maintained exactly under the update,
  so one step costs O(N d^2 + d^3) whatever D is (only the N target rows of ``V`` are read
  and written), plus rare O(D d^2) re-factorizations.

Centring (no catastrophic cancellation). ``sigma^2 = q / D - mu^2`` loses all its digits
when the outputs have a large common offset (``|mu| >> sigma``, e.g. rows of ``W`` with a
large shared component). Both paths instead use the statistics of the *centred* outputs
``o - mu 1 = W_c h`` with ``W_c = (I - 1 1^T / D) W``: ``s' = 0``, ``q' = h^T C h`` with the
centred Gram matrix ``C = W_c^T W_c = W^T W - w_bar w_bar^T / D`` (``w_bar = W^T 1``) and
``o'_c = (W[c] - w_bar / D) . h``. The Z-loss is shift invariant, so ``F(0, q', o'_c)`` is
the same function of ``(W, h)`` as ``F(s, q, o_c)`` -- values and gradients -- but its
variance ``q' / D`` is a sum of squares with no subtraction. ``C`` is computed from ``W_c``
(two passes: the column means, then the centred matrix), never as ``Q - w_bar w_bar^T / D``;
the factored path maintains ``C`` and ``w_bar`` in place of the paper's ``Q = W^T W``
(``Q = C + w_bar w_bar^T / D``, see :func:`factored_gram`).

The factored trainer lives here, not in ``jaxmtl.transforms``: it is not a gradient
transformation (it never sees a gradient of ``W``; its state *is* the parameter), and it
shares this module's centred statistics and their derivation with :func:`gram_z_loss`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmtl.losses.classification import (
    SphericalStatistics,
    _check_int,
    _check_scalar,
    _class_labels,
    _compute_dtype,
    _float_array,
    _is_concrete,
    z_loss_from_statistics,
)

__all__ = [
    "FactoredOutputState",
    "FactoredStep",
    "FactoredZLossSGD",
    "centred_output_statistics",
    "factored_gram",
    "factored_logits",
    "factored_output_matrix",
    "factored_unfactorize",
    "factored_z_loss_sgd",
    "gram_z_loss",
]


# --------------------------------------------------------------------------- checks


def _weights(name: str, w: Any) -> jax.Array:
    w = _float_array(name, w)
    if w.ndim != 2 or w.shape[0] < 2 or w.shape[1] < 1:
        raise ValueError(f"{name}: expected a (D, d) matrix with D >= 2 classes, got {w.shape}")
    return w


def _features(name: str, h: Any, d: int) -> jax.Array:
    h = _float_array(name, h)
    if h.ndim != 2 or h.shape[1] != d:
        raise ValueError(f"{name}: expected shape (N, {d}) (N examples, d = {d}), got {h.shape}")
    return h


def _labels(name: str, labels: Any, n: int, num_classes: int) -> jax.Array:
    return _class_labels(name, labels, (n, num_classes))


def _layer_inputs(w: Any, h: Any, labels: Any):
    """Checked ``(w, h, labels)`` of one output layer and the dtype to compute in."""
    w = _weights("w", w)
    h = _features("h", h, w.shape[1])
    labels = _labels("labels", labels, h.shape[0], w.shape[0])
    if w.dtype != h.dtype:
        raise TypeError(f"h: expected the dtype of w ({w.dtype}), got {h.dtype}")
    dtype = _compute_dtype(w.dtype)
    return w, h, labels, dtype


# --------------------------------------------------------------------------- Gram path


def _centred(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Column means ``w_bar / D`` (d,) and the centred matrix ``W_c`` (D, d)."""
    mean_row = jnp.mean(w, axis=0)
    return mean_row, w - mean_row


def _z_loss_centred(q: jax.Array, t: jax.Array, num_classes: int, a: float, b: float):
    """Z-loss of centred statistics ``(s' = 0, q', o'_c)``."""
    return z_loss_from_statistics(jnp.zeros_like(q), q, t, num_classes, a=a, b=b)


def _gram_forward(w, h, labels):
    mean_row, wc = _centred(w)
    gram = wc.T @ wc  # C (d, d), O(D d^2)
    rows = wc[labels]  # centred target rows (N, d)
    hc = h @ gram  # (N, d)
    q = jnp.sum(hc * h, axis=-1)
    t = jnp.sum(rows * h, axis=-1)
    return mean_row, rows, hc, q, t


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gram_z_loss(w, h, labels, a, b):
    _, _, _, q, t = _gram_forward(w, h, labels)
    return _z_loss_centred(q, t, w.shape[0], a, b)


def _gram_z_loss_fwd(w, h, labels, a, b):
    mean_row, rows, hc, q, t = _gram_forward(w, h, labels)
    loss = _z_loss_centred(q, t, w.shape[0], a, b)
    return loss, (w, h, labels, mean_row, rows, hc, q, t)


def _gram_z_loss_bwd(a, b, residuals, g):
    w, h, labels, mean_row, rows, hc, q, t = residuals
    num_classes = w.shape[0]
    _, vjp = jax.vjp(lambda q_, t_: _z_loss_centred(q_, t_, num_classes, a, b), q, t)
    gq, gt = vjp(g)  # dL/dq', dL/do'_c per example, (N,)
    # dL/dh_n = 2 gq_n C h_n + gt_n (W[y_n] - w_bar / D)
    dh = 2.0 * gq[:, None] * hc + gt[:, None] * rows
    # dL/dW = P (2 W_c B + S),  P = I - 1 1^T / D,  B = sum_n gq_n h_n h_n^T,
    # S = scatter-add of gt_n h_n into row y_n; P W_c = W_c, and P S = S - 1 r^T / D.
    weighted = gt[:, None] * h
    bmat = (gq[:, None] * h).T @ h
    r = jnp.sum(weighted, axis=0)
    dw = 2.0 * ((w - mean_row) @ bmat) - r / num_classes
    dw = dw.at[labels].add(weighted)
    return dw, dh, np.zeros(labels.shape, jax.dtypes.float0)


_gram_z_loss.defvjp(_gram_z_loss_fwd, _gram_z_loss_bwd)


def centred_output_statistics(w: jax.Array, h: jax.Array, labels: jax.Array) -> SphericalStatistics:
    """Spherical statistics of the centred outputs ``o_n - mean(o_n) 1``, from Gram matrices.

    With ``o_n = W h_n`` (Vincent et al., NeurIPS 2015, Sec. 3, in centred form, see the
    module docstring): ``s' = 0``, ``q'_n = h_n^T C h_n`` with ``C = W_c^T W_c`` and
    ``o'_{c_n} = (W[c_n] - W^T 1 / D) . h_n``. Cost O(D d^2 + N d^2); the N x D outputs are
    never formed. A shift-invariant spherical loss (the Z-loss) takes the same value on these
    as on the raw ``(s, q, o_c)``, without the cancellation of ``q / D - mu^2``.

    Args:
      w: (D, d) output weights, D >= 2.
      h: (N, d) features.
      labels: (N,) integer classes in [0, D).

    Returns:
      ``SphericalStatistics(sum, sum_of_squares, target)``, each (N,): ``sum`` is zeros.

    >>> w = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    >>> st = centred_output_statistics(w, jnp.array([[1.0]]), jnp.array([3]))
    >>> [float(v[0]) for v in st]
    [0.0, 5.0, 1.5]
    """
    w, h, labels, dtype = _layer_inputs(w, h, labels)
    _, _, _, q, t = _gram_forward(w.astype(dtype), h.astype(dtype), labels)
    return SphericalStatistics(jnp.zeros_like(q), q, t)


def gram_z_loss(
    w: jax.Array, h: jax.Array, labels: jax.Array, *, a: float = 1.0, b: float = 0.0
) -> jax.Array:
    """Z-loss of the linear output layer ``o_n = W h_n``, per example, from Gram matrices.

    Equal to ``z_loss(h @ W.T, labels, a=a, b=b)`` (de Brebisson & Vincent 2016:
    ``L = softplus(a (b - z_c)) / a``, ``z_c = (o_c - mean(o)) / std(o)``) and differentiable
    in ``w`` and ``h`` with any optimizer, but never forms the (N, D) logits: forward from the
    centred Gram matrix ``C = W_c^T W_c`` (d, d), the column means and the N target rows
    (``centred_output_statistics``); backward (a ``jax.custom_vjp``) from the cotangents
    ``(dL/dq', dL/do'_c)`` of the spherical statistics (ICLR 2016, Sec. 2):

        dL/dh_n = 2 g_q,n C h_n + g_t,n (W[c_n] - W^T 1 / D)
        dL/dW   = 2 W_c (sum_n g_q,n h_n h_n^T) + sum_n g_t,n (e_{c_n} - 1 / D) h_n^T

    (the NeurIPS 2015 paper's structured gradient ``G H^T`` of Vincent et al., Sec. 3, with
    the sum ``1 ds^T`` term fixed by the shift invariance). Both cost O(D d^2 + N d^2),
    against O(N D d) for dense logits: a speed-up of about ``1.5 N / d`` for the layer. The
    variance is computed without cancellation (module docstring). 16-bit inputs are computed
    in float32. ``a`` and ``b`` are static (Python floats). A bias ``o = W h + beta`` is
    handled by appending a constant 1 feature to ``h`` and ``beta`` as a column of ``W``.

    Args:
      w: (D, d) output weights, D >= 2.
      h: (N, d) features, the dtype of ``w``.
      labels: (N,) integer classes in [0, D).
      a: sharpness, > 0.
      b: target z-score offset.

    Returns:
      (N,) losses in the dtype of ``w``.

    >>> w = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    >>> print(gram_z_loss(w, jnp.array([[1.0]]), jnp.array([3])).round(6))
    [0.232235]
    """
    a = _check_scalar("a", a, low=0.0, low_open=True)
    b = _check_scalar("b", b)
    if not (_is_concrete(a) and _is_concrete(b)):
        raise TypeError("a, b: gram_z_loss takes them as static Python floats, got tracers")
    w, h, labels, dtype = _layer_inputs(w, h, labels)
    loss = _gram_z_loss(w.astype(dtype), h.astype(dtype), labels, a, b)
    return loss.astype(w.dtype)


# --------------------------------------------------------------------------- factored SGD


class FactoredOutputState(NamedTuple):
    """An output layer ``W = V U + 1 omega^T`` (D, d) with exact d x d summaries.

    Vincent, de Brebisson & Bouthillier, NeurIPS 2015, Sec. 3 (with the centred Gram matrix
    in place of ``Q = W^T W``, see the module docstring).

    Attributes:
      v: (D, d) ``V``; only target rows are touched by an update.
      u: (d, d) ``U``.
      u_inv: (d, d) ``U^{-1}`` (the paper keeps its transpose, ``U^{-T}``).
      omega: (d,) ``omega``: row offset shared by all classes.
      centred_gram: (d, d) ``C = W^T (I - 1 1^T / D) W``.
      column_sum: (d,) ``w_bar = W^T 1``.
      count: () int32 number of updates applied.
      refactorizations: () int32 number of O(D d^2) re-factorizations so far.
    """

    v: jax.Array
    u: jax.Array
    u_inv: jax.Array
    omega: jax.Array
    centred_gram: jax.Array
    column_sum: jax.Array
    count: jax.Array
    refactorizations: jax.Array


class FactoredStep(NamedTuple):
    """What one factored step returns: per-example ``loss`` (N,), ``h_grad`` (N, d), the
    gradient of the *mean* loss w.r.t. the features (to back-propagate into a trunk), and
    the updated ``state``."""

    loss: jax.Array
    h_grad: jax.Array
    state: FactoredOutputState


class FactoredZLossSGD(NamedTuple):
    """The factored trainer (see :func:`factored_z_loss_sgd`).

    Attributes:
      init: ``init(w) -> FactoredOutputState`` from dense (D, d) weights (O(D d^2), once).
      update: ``update(h, labels, state) -> FactoredStep``: loss, feature gradient and one
        exact SGD step on ``W``, O(N d^2 + d^3) independent of D.
      loss_and_h_grad: ``loss_and_h_grad(h, labels, state) -> (loss (N,), h_grad (N, d))``
        without updating (O(N d^2)).
    """

    init: Callable[[jax.Array], FactoredOutputState]
    update: Callable[[jax.Array, jax.Array, FactoredOutputState], FactoredStep]
    loss_and_h_grad: Callable[
        [jax.Array, jax.Array, FactoredOutputState], tuple[jax.Array, jax.Array]
    ]


def _state_from_dense(w: jax.Array, refactorizations: jax.Array, count: jax.Array):
    d = w.shape[1]
    mean_row, wc = _centred(w)
    # Distinct buffers everywhere (a donated state must not alias itself).
    return FactoredOutputState(
        v=w,
        u=jnp.eye(d, dtype=w.dtype),
        u_inv=jnp.eye(d, dtype=w.dtype),
        omega=jnp.zeros(d, w.dtype),
        centred_gram=wc.T @ wc,
        column_sum=w.shape[0] * mean_row,
        count=count,
        refactorizations=refactorizations,
    )


def _check_state(state: Any) -> FactoredOutputState:
    if not isinstance(state, FactoredOutputState):
        raise TypeError(f"state: expected a FactoredOutputState, got {type(state).__name__}")
    return state


def factored_output_matrix(state: FactoredOutputState) -> jax.Array:
    """The dense weights ``W = V U + 1 omega^T`` (D, d), O(D d^2) (evaluation, export).

    >>> opt = factored_z_loss_sgd(0.1)
    >>> w = jnp.arange(6.0).reshape(3, 2)
    >>> bool(jnp.allclose(factored_output_matrix(opt.init(w)), w))
    True
    """
    state = _check_state(state)
    return state.v @ state.u + state.omega


def factored_gram(state: FactoredOutputState) -> jax.Array:
    """``Q = W^T W`` (d, d) of the factored layer, from the maintained ``C`` and ``w_bar``:
    ``Q = C + w_bar w_bar^T / D`` (the paper's maintained matrix)."""
    state = _check_state(state)
    num_classes = state.v.shape[0]
    return state.centred_gram + jnp.outer(state.column_sum, state.column_sum) / num_classes


def factored_logits(h: jax.Array, state: FactoredOutputState) -> jax.Array:
    """The outputs ``o_n = V (U h_n) + omega . h_n`` (N, D) of the factored layer without
    forming ``W`` (O(N D d), for evaluation: top-k accuracy and the like)."""
    state = _check_state(state)
    h = _features("h", h, state.u.shape[0]).astype(state.v.dtype)
    return (h @ state.u.T) @ state.v.T + (h @ state.omega)[:, None]


def factored_unfactorize(state: FactoredOutputState) -> FactoredOutputState:
    """``V <- W``, ``U <- I``, ``omega <- 0`` and ``C``, ``w_bar`` recomputed exactly from
    ``W`` (O(D d^2)). Leaves ``W`` unchanged up to rounding; clears the drift of ``U``'s
    conditioning and of the maintained summaries (NeurIPS 2015, numerical stability)."""
    state = _check_state(state)
    return _state_from_dense(factored_output_matrix(state), state.refactorizations + 1, state.count)


def _unique_rows_sum(labels: jax.Array, rows: jax.Array) -> jax.Array:
    """``R`` (N, d): ``rows`` summed over examples with equal labels (zeros padding), so that
    ``R^T R = sum_k (sum_{n: c_n = k} rows_n)(...)^T`` without a D-sized buffer."""
    n = labels.shape[0]
    _, inverse = jnp.unique(labels, size=n, fill_value=-1, return_inverse=True)
    return jax.ops.segment_sum(rows, inverse.reshape(-1), num_segments=n)


def _block_rows(num_classes: int, largest: int) -> int:
    """The largest divisor of ``num_classes`` that is <= ``largest``."""
    return max(k for k in range(1, min(num_classes, largest) + 1) if num_classes % k == 0)


def _refactor_in_place(state: FactoredOutputState, bad: jax.Array) -> FactoredOutputState:
    """``factored_unfactorize(state)`` if ``bad`` else ``state``, updating ``V`` in place.

    A ``lax.cond`` whose one branch computes a new (D, d) ``V`` makes XLA copy ``V`` on every
    step (O(D d)), even when the branch is not taken. Here ``V <- V U + 1 omega^T`` and the
    centred Gram matrix are computed by row blocks in two ``fori_loop``s whose trip count is
    0 unless ``bad``: the loop-carried ``V`` is aliased, so a normal step touches only the
    target rows. Blocks are the largest divisor of D up to 2048 rows.
    """
    num_classes, d = state.v.shape
    block = _block_rows(num_classes, 2048)
    trips = jnp.where(bad, num_classes // block, 0)

    def transform(i, carry):
        v, column_sum = carry
        rows = jax.lax.dynamic_slice_in_dim(v, i * block, block, 0) @ state.u + state.omega
        return jax.lax.dynamic_update_slice_in_dim(v, rows, i * block, 0), column_sum + jnp.sum(
            rows, axis=0
        )

    dtype = state.v.dtype
    v, column_sum = jax.lax.fori_loop(0, trips, transform, (state.v, jnp.zeros(d, dtype)))
    mean_row = column_sum / num_classes

    def centred_gram(i, gram):
        rows = jax.lax.dynamic_slice_in_dim(v, i * block, block, 0) - mean_row
        return gram + rows.T @ rows

    gram = jax.lax.fori_loop(0, trips, centred_gram, jnp.zeros((d, d), dtype))
    eye = jnp.eye(d, dtype=dtype)
    return FactoredOutputState(
        v=v,
        u=jnp.where(bad, eye, state.u),
        u_inv=jnp.where(bad, eye, state.u_inv),
        omega=jnp.where(bad, 0.0, state.omega),
        centred_gram=jnp.where(bad, gram, state.centred_gram),
        column_sum=jnp.where(bad, column_sum, state.column_sum),
        count=state.count,
        refactorizations=state.refactorizations + bad.astype(jnp.int32),
    )


def factored_z_loss_sgd(
    learning_rate: float | Callable[[jax.Array], Any],
    *,
    a: float = 1.0,
    b: float = 0.0,
    weight_decay: float = 0.0,
    check_every: int = 10,
    max_condition: float = 100.0,
    max_scale: float = 100.0,
    refactor_every: int | None = None,
) -> FactoredZLossSGD:
    """Exact SGD on the Z-loss of a (D, d) output layer at O(N d^2 + d^3) per step, any D.

    **SGD only.** This is the algorithm of Vincent, de Brebisson & Bouthillier, "Efficient
    Exact Gradient Update for training Deep Networks with Very Large Sparse Targets",
    NeurIPS 2015, Sec. 3-4, for the Z-loss of de Brebisson & Vincent (2016): the update
    ``W <- (1 - eta lambda) W - eta dL/dW`` of the mean loss over the batch is applied
    exactly to ``W = V U + 1 omega^T`` without forming ``W`` or its gradient. Momentum or
    Adam on ``W`` need the dense D x d gradient (use :func:`gram_z_loss` then); the trunk that
    produces ``h`` can use any optax optimizer through ``h_grad`` (this asymmetry is the
    paper's). With ``G = 2 O diag(g_q) + Y + 1 ds^T`` the (never formed) output gradient,
    ``B = H diag(g_q) H^T`` and ``c = 1 - eta lambda`` (our row-major notation, ``h_n``
    rows of ``H``), one step is, in the paper's order:

        A = c I - 2 eta B                 U <- U A,  U^{-1} <- A^{-1} U^{-1}
        omega <- c omega - eta H^T (2 g_q * (H omega) + ds)
        V[c_n] <- V[c_n] - eta g_t,n h_n^T U^{-1}        (only the N target rows)
        C <- c^2 C - c eta (dH^T H + H^T dH) + eta^2 H^T M H,   w_bar <- c w_bar

    with ``dH`` the feature gradient and ``H^T M H = 4 B C B + 2 (B E + E^T B) + R^T R -
    r r^T / D`` (``E = sum_n g_t,n (W[c_n] - w_bar / D) h_n^T``, ``R`` the per-class sums of
    ``g_t,n h_n``, ``r`` their total): O(N d^2 + d^3), no N x N or D-sized temporary (``A^{-1}``
    by Woodbury in O(N^2 d + N^3) when N < d). ``w_bar`` only decays because the Z-loss's
    output gradient sums to zero. Every ``check_every`` steps ``U^{-1}`` is recomputed from
    ``U`` (O(d^3)) and, when ``U``'s condition number exceeds ``max_condition`` or a singular
    value leaves ``[1 / max_scale, max_scale]``, the layer is re-factorized
    (:func:`factored_unfactorize`, O(D d^2), rare); ``refactor_every`` forces that
    periodically. The rounding errors of the maintained summaries grow like ``u cond(U)``
    (``u`` the unit roundoff), so in float32 keep ``max_condition`` small: SGD on the Z-loss
    shrinks ``U`` along the feature directions quickly (on the next-word experiment of
    ``experiments/zloss_large_output.py``, cond(U) reached 1e5 in 200 steps and the
    maintained ``W^T W`` was 1 % off; with the defaults, one re-factorization in about 60
    steps keeps it within 3e-6). Donate the state
    to ``jax.jit`` (``donate_argnums``) so that ``V`` is updated in place.

    Args:
      learning_rate: ``eta`` > 0, or an optax-style schedule ``count -> eta``.
      a, b: Z-loss sharpness (> 0) and offset (static).
      weight_decay: ``lambda`` >= 0 (decoupled: ``W <- (1 - eta lambda) W - eta g``).
      check_every: period (>= 1) of the O(d^3) inverse refresh and conditioning check.
      max_condition: condition number of ``U`` that triggers a re-factorization (> 1).
      max_scale: singular-value range of ``U`` that triggers one (> 1).
      refactor_every: optional period (>= 1) of forced re-factorizations.

    Returns:
      A :class:`FactoredZLossSGD` ``(init, update, loss_and_h_grad)``.

    >>> opt = factored_z_loss_sgd(0.5)
    >>> state = opt.init(jnp.array([[1.0], [2.0], [3.0], [4.0]]))
    >>> step = opt.update(jnp.array([[1.0]]), jnp.array([3]), state)
    >>> print(step.loss.round(6), int(step.state.count))
    [0.232235] 1
    """
    if not callable(learning_rate):
        learning_rate = _check_scalar("learning_rate", learning_rate, low=0.0, low_open=True)
    a = _check_scalar("a", a, low=0.0, low_open=True)
    b = _check_scalar("b", b)
    weight_decay = _check_scalar("weight_decay", weight_decay, low=0.0)
    check_every = _check_int("check_every", check_every, low=1)
    max_condition = _check_scalar("max_condition", max_condition, low=1.0, low_open=True)
    max_scale = _check_scalar("max_scale", max_scale, low=1.0, low_open=True)
    if refactor_every is not None:
        refactor_every = _check_int("refactor_every", refactor_every, low=1)

    def init(w: jax.Array) -> FactoredOutputState:
        w = _weights("w", w)
        count, refactorizations = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
        return _state_from_dense(w.astype(_compute_dtype(w.dtype)), refactorizations, count)

    def _inputs(h, labels, state):
        state = _check_state(state)
        num_classes, d = state.v.shape
        h = _features("h", h, d)
        labels = _labels("labels", labels, h.shape[0], num_classes)
        return h, labels, state

    def _forward(h, labels, state):
        """Loss, statistics' cotangents and feature gradient of the mean loss."""
        num_classes = state.v.shape[0]
        mean_row = state.column_sum / num_classes
        rows = state.v[labels] @ state.u + state.omega - mean_row  # centred target rows
        hc = h @ state.centred_gram
        q = jnp.sum(hc * h, axis=-1)
        t = jnp.sum(rows * h, axis=-1)
        loss, vjp = jax.vjp(lambda q_, t_: _z_loss_centred(q_, t_, num_classes, a, b), q, t)
        gq, gt = vjp(jnp.full_like(loss, 1.0 / h.shape[0]))
        h_grad = 2.0 * gq[:, None] * hc + gt[:, None] * rows
        return loss, gq, gt, rows, h_grad

    def loss_and_h_grad(h, labels, state):
        h_in = h
        h, labels, state = _inputs(h, labels, state)
        loss, _, _, _, h_grad = _forward(h.astype(state.v.dtype), labels, state)
        return loss.astype(h_in.dtype), h_grad.astype(h_in.dtype)

    def _inverse_factor(h, gq, eta, c, u_inv):
        """``A^{-1} U^{-1}`` with ``A = c I - 2 eta H^T diag(gq) H``."""
        n, d = h.shape
        if n >= d:
            amat = c * jnp.eye(d, dtype=h.dtype) - 2.0 * eta * ((gq[:, None] * h).T @ h)
            return jnp.linalg.solve(amat, u_inv)
        # Woodbury: (I + H^T K H)^{-1} = I - H^T K (I + H H^T K)^{-1} H, K = -(2 eta/c) diag(gq)
        k = -(2.0 * eta / c) * gq
        small = jnp.eye(n, dtype=h.dtype) + (h @ h.T) * k[None, :]
        hu = h @ u_inv  # (N, d)
        return (u_inv - (h.T * k[None, :]) @ jnp.linalg.solve(small, hu)) / c

    def _check(u, count):
        """``(U^{-1} recomputed, whether to re-factorize)``, O(d^3)."""
        singular = jnp.linalg.svd(u, compute_uv=False)
        top, bottom = singular[0], singular[-1]
        bad = (top > max_condition * bottom) | (top > max_scale) | (bottom * max_scale < 1.0)
        bad = bad | ~jnp.all(jnp.isfinite(singular))
        if refactor_every is not None:
            bad = bad | (count % refactor_every == 0)
        return jnp.linalg.inv(u), bad

    def _maintain(state: FactoredOutputState) -> FactoredOutputState:
        due = state.count % check_every == 0
        if refactor_every is not None:
            due = due | (state.count % refactor_every == 0)
        u_inv, bad = jax.lax.cond(
            due, _check, lambda u, _: (state.u_inv, jnp.zeros((), bool)), state.u, state.count
        )
        return _refactor_in_place(state._replace(u_inv=u_inv), bad)

    def update(h, labels, state) -> FactoredStep:
        h_in = h
        h, labels, state = _inputs(h, labels, state)
        h = h.astype(state.v.dtype)
        num_classes = state.v.shape[0]
        loss, gq, gt, rows, h_grad = _forward(h, labels, state)
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        eta = jnp.asarray(eta, h.dtype)
        c = 1.0 - eta * weight_decay
        # ds_n of the paper: the centred gradient 2 g_q P o + g_t P e_c puts
        # ds = -(2 g_q s + g_t) / D on the 1 direction.
        s = h @ state.column_sum
        ds = -(2.0 * gq * s + gt) / num_classes
        bmat = (gq[:, None] * h).T @ h  # B (d, d)
        u_new = c * state.u - 2.0 * eta * (state.u @ bmat)
        u_inv_new = _inverse_factor(h, gq, eta, c, state.u_inv)
        omega_new = c * state.omega - eta * (h.T @ (2.0 * gq * (h @ state.omega) + ds))
        weighted = gt[:, None] * h  # rows g_t,n h_n of Y^T H
        v_new = state.v.at[labels].add(-eta * (weighted @ u_inv_new))
        emat = (gt[:, None] * rows).T @ h
        per_class = _unique_rows_sum(labels, weighted)
        r = jnp.sum(weighted, axis=0)
        cross = bmat @ emat
        second = (
            4.0 * (bmat @ state.centred_gram @ bmat)
            + 2.0 * (cross + cross.T)
            + per_class.T @ per_class
            - jnp.outer(r, r) / num_classes
        )
        first = h_grad.T @ h
        gram_new = (
            (c * c) * state.centred_gram - (c * eta) * (first + first.T) + (eta * eta) * second
        )
        gram_new = 0.5 * (gram_new + gram_new.T)
        new = FactoredOutputState(
            v=v_new,
            u=u_new,
            u_inv=u_inv_new,
            omega=omega_new,
            centred_gram=gram_new,
            column_sum=c * state.column_sum,
            count=state.count + 1,
            refactorizations=state.refactorizations,
        )
        new = _maintain(new)
        return FactoredStep(loss.astype(h_in.dtype), h_grad.astype(h_in.dtype), new)

    return FactoredZLossSGD(init=init, update=update, loss_and_h_grad=loss_and_h_grad)
