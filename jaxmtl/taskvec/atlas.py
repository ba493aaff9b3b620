"""aTLAS: task vectors composed with learned anisotropic (per-block) coefficients.

"Knowledge Composition using Task Vectors with Learned Anisotropic Scaling" (Zhang, Albert,
Rodriguez-Opazo, van den Hengel & Abbasnejad, NeurIPS 2024, Eq. 3-5): one learnable scalar per
(task vector, parameter block), here one per pytree leaf,

    theta(Lambda) = theta_0 + sum_i Lambda_i tau_i,   (Lambda_i tau_i)^(j) = lambda_i^(j) tau_i^(j)

trained by gradient descent on a task loss (``n * m`` parameters for ``n`` vectors and ``m``
leaves). Coefficients start at 0 (``theta(0) = theta_0``), as in the reference code
(``src/composition.py``: ``torch.zeros(len(task_vectors), len(params))``). The linearized
variant (Eq. 5) evaluates ``f_lin`` of Ortiz-Jimenez et al. (NeurIPS 2023) at
``theta(Lambda)``: one JVP along the composed direction per step.

Coefficients are a pytree shaped like the parameters with a ``(n,)`` array per leaf, so any
optax optimizer trains them; :func:`atlas_fit` is a minimal ``lax.scan`` loop and
``jaxmtl.train`` works as well (the coefficients are the ``params``). ``theta_0`` and the task
vectors are constants of the objective; pass them as arguments of a jitted function (not
closed over) when they are large.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxmtl.taskvec.tangent import check_mode, linearize
from jaxmtl.taskvec.vector import as_stacked, combine_leaf

PyTree = Any

__all__ = ["atlas_apply", "atlas_fit", "atlas_init", "atlas_model"]


def _coefficient_dtype(leaf: jax.Array) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if leaf.dtype == jnp.float64 else jnp.dtype(jnp.float32)


def atlas_init(pretrained: PyTree, vectors: PyTree | Sequence[PyTree]) -> PyTree:
    """Blockwise aTLAS coefficients, all zero (Zhang et al., NeurIPS 2024, Eq. 4; code default).

    Args:
      pretrained: ``theta_0`` (fixes the blocks: one per leaf).
      vectors: ``n`` task vectors, stacked or a sequence (``jaxmtl.taskvec.as_stacked``).

    Returns:
      A pytree shaped like ``pretrained`` with a zero ``(n,)`` array per leaf (float32, or
      float64 for float64 leaves): ``n * m`` learnable scalars.

    >>> coefs = atlas_init({"w": jnp.ones(3), "b": jnp.ones(())}, [{"w": jnp.ones(3),
    ...                     "b": jnp.ones(())}] * 2)
    >>> jax.tree.map(jnp.shape, coefs)
    {'b': (2,), 'w': (2,)}
    """
    _, n = as_stacked(vectors, pretrained)
    return jax.tree.map(lambda p: jnp.zeros((n,), _coefficient_dtype(jnp.asarray(p))), pretrained)


def atlas_apply(
    pretrained: PyTree, vectors: PyTree | Sequence[PyTree], coefficients: PyTree
) -> PyTree:
    """``theta(Lambda) = theta_0 + sum_i Lambda_i tau_i`` (Zhang et al., NeurIPS 2024, Eq. 3).

    Leaf ``j`` is ``theta_0^(j) + sum_i lambda_i^(j) tau_i^(j)``, computed by the same kernel
    as ``jaxmtl.taskvec.apply``: with every coefficient equal to ``alpha`` the result is
    bit-for-bit isotropic task arithmetic ``apply(pretrained, vectors, alpha)``.

    Args:
      pretrained: ``theta_0``.
      vectors: ``n`` task vectors, stacked or a sequence.
      coefficients: pytree shaped like ``pretrained`` with a ``(n,)`` array per leaf.

    >>> p0 = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    >>> taus = [{"a": jnp.ones(2), "b": jnp.ones(1)}, {"a": jnp.ones(2), "b": 2 * jnp.ones(1)}]
    >>> out = atlas_apply(p0, taus, {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.5, 1.0])})
    >>> out["a"].tolist(), out["b"].tolist()
    ([1.0, 1.0], [2.5])
    """
    stacked, n = as_stacked(vectors, pretrained)
    if jax.tree.structure(coefficients) != jax.tree.structure(pretrained):
        raise ValueError(
            "coefficients: expected the pytree structure of pretrained "
            f"{jax.tree.structure(pretrained)}, got {jax.tree.structure(coefficients)}"
        )
    for path, c in jax.tree_util.tree_leaves_with_path(coefficients):
        if jnp.shape(c) != (n,):
            raise ValueError(
                f"coefficients: expected shape ({n},) at {jax.tree_util.keystr(path)}, "
                f"got {jnp.shape(c)}"
            )
    return jax.tree.map(
        lambda p, c, v: combine_leaf(p, jnp.asarray(c), v), pretrained, coefficients, stacked
    )


def atlas_model(
    apply_fn: Callable[..., Any],
    pretrained: PyTree,
    vectors: PyTree | Sequence[PyTree],
    *,
    mode: str = "nonlinear",
) -> Callable[..., Any]:
    """``f(coefficients, *inputs)``: the network at ``theta(Lambda)``, for training Lambda.

    Zhang et al., NeurIPS 2024, Eq. 4 (``mode="nonlinear"``) and Eq. 5 (``mode="linear"``:
    the linearized model of Ortiz-Jimenez et al., NeurIPS 2023, around ``theta_0``, i.e.
    ``jaxmtl.taskvec.linearize(apply_fn, pretrained)`` evaluated at ``theta(Lambda)``).

    >>> f = atlas_model(lambda p, x: p["w"] ** 2 * x, {"w": jnp.array(1.0)},
    ...                 [{"w": jnp.array(1.0)}], mode="linear")
    >>> f({"w": jnp.array([0.5])}, jnp.array(1.0)).item()   # 1 + 2 * 0.5
    2.0
    """
    check_mode(mode)
    stacked, _ = as_stacked(vectors, pretrained)
    model = linearize(apply_fn, pretrained) if mode == "linear" else apply_fn

    def composed(coefficients: PyTree, *inputs: Any) -> Any:
        return model(atlas_apply(pretrained, stacked, coefficients), *inputs)

    return composed


def atlas_fit(
    objective: Callable[[PyTree, Any], jax.Array],
    coefficients: PyTree,
    optimizer: optax.GradientTransformation,
    batches: Any,
    *,
    steps: int | None = None,
) -> tuple[PyTree, jax.Array]:
    """Trains aTLAS coefficients with ``optimizer`` (Zhang et al., NeurIPS 2024, Eq. 4).

    A ``jax.lax.scan`` over steps: step ``s`` uses batch ``s % B`` of ``batches`` (a pytree
    of arrays with a leading axis ``B``; ``B = 1`` is full-batch training).

    Args:
      objective: ``objective(coefficients, batch) -> scalar loss``, e.g. cross-entropy of
        ``atlas_model(...)(coefficients, batch["x"])``.
      coefficients: the initial coefficients (:func:`atlas_init`).
      optimizer: any optax transformation (the paper: AdamW, lr 1e-3, weight decay 0.1,
        gradient clipping 1.0).
      batches: pytree of arrays with a leading axis ``B``.
      steps: number of steps (default ``B``: one pass).

    Returns:
      ``(coefficients, losses (steps,))``.

    >>> import optax
    >>> loss = lambda c, b: jnp.sum((c["w"] - b) ** 2)
    >>> coefs, losses = atlas_fit(loss, {"w": jnp.zeros(1)}, optax.sgd(0.25),
    ...                           jnp.array([[2.0]]), steps=20)
    >>> round(float(coefs["w"][0]), 3)
    2.0
    """
    if not callable(objective):
        raise TypeError(
            f"objective: expected a callable (coefficients, batch) -> loss, got {objective!r}"
        )
    leaves = jax.tree.leaves(batches)
    if not leaves or any(jnp.ndim(leaf) < 1 for leaf in leaves):
        raise ValueError("batches: expected a pytree of arrays with a leading axis B")
    num_batches = jnp.shape(leaves[0])[0]
    if any(jnp.shape(leaf)[0] != num_batches for leaf in leaves):
        raise ValueError(
            f"batches: expected a common leading axis, got {[jnp.shape(x) for x in leaves]}"
        )
    steps = num_batches if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")

    def step(carry, s):
        coefs, opt_state = carry
        batch = jax.tree.map(lambda b: b[s % num_batches], batches)
        loss, grads = jax.value_and_grad(objective)(coefs, batch)
        updates, opt_state = optimizer.update(grads, opt_state, coefs)
        return (optax.apply_updates(coefs, updates), opt_state), loss

    init = (coefficients, optimizer.init(coefficients))
    (coefs, _), losses = jax.lax.scan(step, init, jnp.arange(steps))
    return coefs, losses
