"""The bridge from a Flax NNX module to a pure ``apply_fn(params, *inputs)`` and its params.

jaxmtl's library functions (per-task gradients, transforms, task vectors, linearization)
never need NNX: they take a pure ``apply_fn`` and a params pytree. :func:`functional` makes
those from any ``nnx.Module`` by splitting it once with ``nnx.split(module, nnx.Param, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from flax.nnx import traversals

__all__ = ["functional"]

ApplyFn = Callable[..., Any]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _fresh_copy(state: nnx.State) -> nnx.State:
    """A State with new Variable objects, so a call that mutates it leaves ``state`` intact."""
    return jax.tree.map(lambda v: v.copy() if _is_variable(v) else v, state, is_leaf=_is_variable)


def _describe(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _param_state(template: list[tuple[tuple, nnx.Variable]], params: Any) -> nnx.State:
    """An ``nnx.State`` of Params: ``template``'s variables holding the leaves of ``params``."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params: expected the nested dict returned by functional(), got {type(params)}"
        )
    given = traversals.flatten_mapping(params)
    expected_paths = {path for path, _ in template}
    if set(given) != expected_paths:
        missing = sorted(map(_describe, expected_paths - set(given)))
        extra = sorted(map(_describe, set(given) - expected_paths))
        raise ValueError(
            "params: expected the structure returned by functional(); "
            f"missing {missing}, unexpected {extra}"
        )
    flat = []
    for path, variable in template:
        value = given[path]
        if getattr(value, "shape", None) != variable.shape:
            raise ValueError(
                f"params: expected shape {variable.shape} at {_describe(path)}, "
                f"got {getattr(value, 'shape', type(value))}"
            )
        flat.append((path, variable.replace(value)))
    return nnx.from_flat_state(flat)


def functional(module: nnx.Module, method: str = "__call__") -> tuple[ApplyFn, dict]:
    """Split an NNX module into a pure ``apply_fn(params, *inputs, **kwargs)`` and ``params``.

    The functional (pure-function) view of a model used throughout JAX: outputs are
    ``f(params, x)``, as in the parameter-space Jacobians of "Multi-Task Learning as
    Multi-Objective Optimization" (Sener & Koltun, NeurIPS 2018, Eq. 1-3) and the task
    vectors of "Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023, Eq. 1).

    ``params`` is a plain nested dict (string keys for attributes, int keys for list entries)
    of arrays: every ``nnx.Param`` of the module, e.g. ``{"layers": {0: {"kernel": (in, out),
    "bias": (out,)}, ...}}``. ``jax.tree.map``, ``jax.grad``, ``optax`` and ``vmap`` work on it
    directly; its key paths are ``jax.tree_util.DictKey`` s.

    ``apply_fn(params, *inputs, **kwargs)`` rebuilds the module from ``params`` (at trace time
    under ``jax.jit``) and returns ``module.<method>(*inputs, **kwargs)``. It is pure and
    jit-able and has no side effects on ``module``: ``params`` must have the structure and
    shapes of the returned dict (checked, ValueError otherwise); their dtype may differ.
    Everything in the module that is not an ``nnx.Param`` (RNG keys and counters, batch
    statistics, ...) is frozen at its value at the time of the split and any update a call
    makes to it is discarded. A stochastic layer (Dropout) therefore sees the same key on
    every call: models used through ``functional`` should be deterministic. Later changes to
    ``module`` are not seen by ``apply_fn`` (split again).

    Args:
      module: any ``nnx.Module``.
      method: the name of the method ``apply_fn`` calls, e.g. ``"features"`` or ``"heads"``
        of :class:`jaxmtl.models.MultiHead`.

    Returns:
      ``(apply_fn, params)``.

    >>> from flax import nnx
    >>> from jaxmtl.models import MLP
    >>> apply_fn, params = functional(MLP(2, [], 1, rngs=nnx.Rngs(0)))
    >>> jax.tree.map(jnp.shape, params)
    {'layers': {0: {'bias': (1,), 'kernel': (2, 1)}}}
    >>> zeroed = jax.tree.map(jnp.zeros_like, params)
    >>> apply_fn(zeroed, jnp.ones((3, 2))).tolist()
    [[0.0], [0.0], [0.0]]
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module: expected an nnx.Module, got {type(module).__name__}")
    if not isinstance(method, str) or not callable(getattr(module, method, None)):
        raise ValueError(
            f"method: expected the name of a method of {type(module).__name__}, got {method!r}"
        )
    graphdef, param_state, rest = nnx.split(module, nnx.Param, ...)
    template = list(nnx.to_flat_state(param_state))
    params = nnx.to_pure_dict(param_state)

    def apply_fn(params: dict, *inputs: Any, **kwargs: Any) -> Any:
        model = nnx.merge(graphdef, _param_state(template, params), _fresh_copy(rest))
        return getattr(model, method)(*inputs, **kwargs)

    return apply_fn, params
