"""Hard parameter sharing: a shared trunk and one linear head per task (Flax NNX).

Params of a :class:`MultiHead` under :func:`jaxmtl.models.functional` are
``{"trunk": <trunk params>, "task_heads": {"layers": {k: {"kernel", "bias"}}}}``; the
helpers here split them into the shared and task-specific halves that ``jaxmtl.mtl`` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmtl.models import _checks
from jaxmtl.models.functional import functional

__all__ = [
    "MultiHead",
    "TaskHeads",
    "is_shared",
    "merge_multihead",
    "multihead_functional",
    "split_multihead",
]

TRUNK = "trunk"
HEADS = "task_heads"


def _features(
    trunk_output: jax.Array,
    feature_dim: int,
    activation: Callable[[jax.Array], jax.Array] | None,
) -> jax.Array:
    _checks.check_last_axis("trunk output", jnp.shape(trunk_output), feature_dim, "feature_dim")
    return trunk_output if activation is None else activation(trunk_output)


class TaskHeads(nnx.Module):
    """One linear head per task on shared features: ``logits_k = z W_k + b_k``.

    Args:
      feature_dim: size of the last axis of ``z``.
      head_sizes: output size of each task's head (one entry per task, K >= 1).
      dtype, param_dtype, rngs: as in :class:`jaxmtl.models.MLP`.

    Shapes: ``z (..., feature_dim) ->`` a K-tuple of ``(..., head_sizes[k])``. Heads may
    differ in size, so they are separate layers rather than one stacked (vmapped) weight.

    >>> from flax import nnx
    >>> [y.shape for y in TaskHeads(4, [2, 3], rngs=nnx.Rngs(0))(jnp.ones((5, 4)))]
    [(5, 2), (5, 3)]
    """

    def __init__(
        self,
        feature_dim: int,
        head_sizes: Sequence[int],
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.feature_dim = _checks.positive_int("feature_dim", feature_dim)
        self.head_sizes = _checks.positive_ints("head_sizes", head_sizes, allow_empty=False)
        self.dtype, self.param_dtype = _checks.compute_dtypes(dtype, param_dtype)
        self.layers = nnx.List(
            [
                nnx.Linear(
                    self.feature_dim,
                    size,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    rngs=rngs,
                )
                for size in self.head_sizes
            ]
        )

    def __call__(self, z: jax.Array) -> tuple[jax.Array, ...]:
        """``(..., feature_dim) ->`` K-tuple of ``(..., head_sizes[k])``."""
        _checks.check_float_input("z", z)
        _checks.check_last_axis("z", jnp.shape(z), self.feature_dim, "feature_dim")
        z = jnp.asarray(z).astype(self.dtype)
        return tuple(layer(z) for layer in self.layers)


class MultiHead(nnx.Module):
    """A shared trunk and one linear head per task (hard parameter sharing).

    Caruana, "Multitask Learning" (Machine Learning, 1997), Sec. 2: tasks share the hidden
    representation ``z = act(trunk(x))`` and each has its own output layer,
    ``logits_k = z W_k + b_k``. This is the encoder/decoder split ``f^t(x) = f^t(g(x))`` of
    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018,
    Sec. 3.3), whose representation form of per-task gradients needs ``features`` and
    ``heads`` separately.

    Args:
      trunk: any ``nnx.Module`` mapping inputs to ``(..., feature_dim)`` (an :class:`MLP`,
        :class:`CNN` or :class:`ViT` with ``out_features=feature_dim``, ...).
      feature_dim: size of the trunk's output.
      head_sizes: number of outputs (classes) of each task, K >= 1 entries.
      feature_activation: applied to the trunk output to give ``z`` (``nnx.relu``; ``None``
        for the identity), so that a trunk ending in a linear layer does not collapse into
        the linear heads.
      dtype, param_dtype, rngs: for the heads, as in :class:`jaxmtl.models.MLP`.

    Shapes: ``__call__(x) ->`` a K-tuple of ``(N, head_sizes[k])``; ``features(x) -> z``
    ``(N, feature_dim)``; ``heads(z) ->`` the K-tuple; ``heads(features(x)) == __call__(x)``.

    >>> from flax import nnx
    >>> from jaxmtl.models import MLP
    >>> model = MultiHead(MLP(3, [8], 4, rngs=nnx.Rngs(0)), 4, [2, 5], rngs=nnx.Rngs(1))
    >>> [y.shape for y in model(jnp.ones((6, 3)))]
    [(6, 2), (6, 5)]
    """

    def __init__(
        self,
        trunk: nnx.Module,
        feature_dim: int,
        head_sizes: Sequence[int],
        *,
        feature_activation: Callable[[jax.Array], jax.Array] | None = nnx.relu,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(trunk, nnx.Module):
            raise TypeError(f"trunk: expected an nnx.Module, got {type(trunk).__name__}")
        if feature_activation is not None and not callable(feature_activation):
            raise TypeError(
                f"feature_activation: expected a callable or None, got {feature_activation!r}"
            )
        self.trunk = trunk
        self.feature_activation = feature_activation
        self.task_heads = TaskHeads(
            feature_dim, head_sizes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.feature_dim = self.task_heads.feature_dim
        self.head_sizes = self.task_heads.head_sizes

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks (heads)."""
        return len(self.head_sizes)

    def features(self, x: Any) -> jax.Array:
        """The shared representation ``z = act(trunk(x))``, ``(N, feature_dim)``."""
        return _features(self.trunk(x), self.feature_dim, self.feature_activation)

    def heads(self, z: jax.Array) -> tuple[jax.Array, ...]:
        """Per-task logits from shared features: K-tuple of ``(N, head_sizes[k])``."""
        return self.task_heads(z)

    def __call__(self, x: Any) -> tuple[jax.Array, ...]:
        """Per-task logits ``heads(features(x))``: K-tuple of ``(N, head_sizes[k])``."""
        return self.heads(self.features(x))


def _key_name(key: Any) -> Any:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return key


def is_shared(path: tuple) -> bool:
    """Whether a :class:`MultiHead` parameter at key ``path`` belongs to the shared trunk.

    The shared/task-specific split of hard parameter sharing (Caruana, "Multitask Learning",
    1997, Sec. 2). A predicate on ``jax.tree_util`` key paths, usable as
    ``jaxmtl.mtl.task_gradients(..., shared=is_shared)`` or to build an ``optax`` mask.

    >>> params = {"trunk": {"w": 1.0}, "task_heads": {"layers": {0: {"b": 2.0}}}}
    >>> jax.tree_util.tree_map_with_path(lambda p, _: is_shared(p), params)
    {'task_heads': {'layers': {0: {'b': False}}}, 'trunk': {'w': True}}
    """
    return len(path) > 0 and _key_name(path[0]) == TRUNK


def split_multihead(params: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(trunk_params, head_params)`` of :class:`MultiHead` params from ``functional``.

    The shared and task-specific halves of hard parameter sharing (Caruana, 1997, Sec. 2).
    ``trunk_params`` has the structure of ``functional(model.trunk)[1]``, ``head_params``
    that of ``functional(model.task_heads)[1]``. Inverse: :func:`merge_multihead`.

    >>> split_multihead({"trunk": {"w": 1.0}, "task_heads": {"layers": {}}})
    ({'w': 1.0}, {'layers': {}})
    """
    if not isinstance(params, Mapping) or set(params) != {TRUNK, HEADS}:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"params: expected MultiHead params with keys ['{HEADS}', '{TRUNK}'], got {keys}"
        )
    return params[TRUNK], params[HEADS]


def merge_multihead(trunk_params: Any, head_params: Any) -> dict[str, Any]:
    """The inverse of :func:`split_multihead`: full :class:`MultiHead` params.

    >>> merge_multihead({"w": 1.0}, {"layers": {}})
    {'trunk': {'w': 1.0}, 'task_heads': {'layers': {}}}
    """
    return {TRUNK: trunk_params, HEADS: head_params}


def multihead_functional(
    model: MultiHead,
) -> tuple[Callable[..., jax.Array], Callable[..., tuple[jax.Array, ...]], Any, Any]:
    """Pure functions for the representation form of per-task gradients of a :class:`MultiHead`.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018,
    Sec. 3.3): per-task gradients with respect to the shared representation ``z = g(x)``,
    then one backward pass through the trunk ``g``. Returns
    ``(encode, heads, trunk_params, head_params)`` with

    * ``encode(trunk_params, x) -> z (N, feature_dim)`` (= ``model.features(x)``),
    * ``heads(head_params, z) ->`` K-tuple of ``(N, head_sizes[k])`` (= ``model.heads(z)``),

    both pure and jit-able (see :func:`jaxmtl.models.functional`), and the two parameter
    halves, equal to ``split_multihead(functional(model)[1])``. They fit
    ``jaxmtl.mtl.representation_gradients(encode, losses_from_features, trunk_params,
    head_params, x, y)`` where ``losses_from_features`` calls ``heads``.

    >>> from flax import nnx
    >>> from jaxmtl.models import MLP
    >>> model = MultiHead(MLP(3, [], 4, rngs=nnx.Rngs(0)), 4, [2, 5], rngs=nnx.Rngs(1))
    >>> encode, heads, trunk_params, head_params = multihead_functional(model)
    >>> [y.shape for y in heads(head_params, encode(trunk_params, jnp.ones((6, 3))))]
    [(6, 2), (6, 5)]
    """
    if not isinstance(model, MultiHead):
        raise TypeError(f"model: expected a MultiHead, got {type(model).__name__}")
    trunk_apply, trunk_params = functional(model.trunk)
    heads_apply, head_params = functional(model.task_heads)
    feature_dim, activation = model.feature_dim, model.feature_activation

    def encode(trunk_params: Any, x: Any) -> jax.Array:
        return _features(trunk_apply(trunk_params, x), feature_dim, activation)

    return encode, heads_apply, trunk_params, head_params
