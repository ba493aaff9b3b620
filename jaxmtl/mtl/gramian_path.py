"""The Gramian-only path: ``J J^T`` layer by layer from activations and cotangents.

A Gramian weighting (MGDA, UPGrad, CAGrad, PCGrad, ...) needs only ``G = J J^T`` (K x K) to
choose its weights ``w``, and then only ``w @ J``, which is the gradient of the weighted loss
``sum_k w_k L_k``. This module computes both without materialising the K per-task gradients
of the shared trunk:

1. one forward pass through a sequential trunk, keeping each layer's input;
2. the K task cotangents ``D_k = dL_k / dz`` at the shared features (a K-wide backward through
   the heads only), then propagated down the trunk as K activation cotangents per layer
   (K "input halves" of a backward pass, never the weight halves);
3. each dense layer ``y = x W + b`` adds its block of the Gramian,
   ``<dL_i/dW, dL_j/dW> = sum_{n,m} (x_n . x_m + 1) (d_in . d_jm)``, from the inputs ``X`` and
   cotangents ``D`` — either through the N x N kernel ``X X^T + 1`` (cost ``N^2 d_in +
   K N^2 d_out``) or by forming the K layer gradients ``X^T D_k`` (cost ``K N d_in d_out``),
   whichever is cheaper for the layer's shapes;
4. ``w = weighting(G)``, then the weighted gradient of every layer from the stored cotangents by
   linearity, ``dW = X^T (sum_k w_k D_k)`` (or ``sum_k w_k X^T D_k`` where formed): no second
   backward pass through the network.

Which is cheaper is a matter of shapes. For a dense layer, forming costs ``K N d_in d_out``
multiply-adds; the kernel route ``N^2 (d_in + K d_out)`` plus ``N d_in d_out`` for the
weighted gradient. For the 784-256-256 MLP at N = 256, K = 4: the first layer (784 -> 256)
costs 206M by forming and 170M by the kernel, the second (256 -> 256) 68M by forming and
101M by the kernel; at K >= 8 forming wins everywhere except for small batches. So for
batch 256 the saving over materialising J is modest; it grows when ``N`` is small compared
with the layer widths (large layers, small batches) — see ``benchmarks/transforms.py`` for
measured times.

Limits: the trunk is a sequence of layers declared with :func:`dense`, :func:`function`
(parameter-free, e.g. an activation) or :func:`generic` (any ``fn(params, x)``; its per-task
parameter gradients are formed transiently by a vmapped VJP). All trunk parameters are
shared; head parameters are task-specific and receive the gradient of the summed loss, as in
``jaxmtl.mtl.task_gradients`` with the trunk shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxmtl.mtl.gradients import combine, gramian

__all__ = [
    "GramianStep",
    "Layer",
    "dense",
    "function",
    "generic",
    "task_gramian",
    "weighted_gradients",
]

PyTree = Any
Strategy = Literal["auto", "kernel", "form"]


class Layer(NamedTuple):
    """One layer of a sequential shared trunk.

    Attributes:
      apply: ``(params, x) -> y``.
      kind: ``"dense"`` (``y = x @ params["w"] + params["b"]``, bias optional), ``"function"``
        (parameter-free, params ignored) or ``"generic"`` (any differentiable function).
    """

    apply: Callable[[PyTree, jax.Array], jax.Array]
    kind: str


class GramianStep(NamedTuple):
    """What :func:`weighted_gradients` returns.

    Attributes:
      losses: (K,) task losses.
      gramian: (K, K) ``J J^T`` over the trunk parameters (float32, float64 under x64 inputs).
      weights: (K,) the weights chosen by ``weigh``.
      trunk_grads: ``sum_k w_k dL_k/dtrunk``, shaped like ``trunk_params``.
      head_grads: ``d(sum_k L_k)/dheads``, shaped like ``head_params``.
      aux: the second output of ``weigh`` (e.g. the weighting's new state).
    """

    losses: jax.Array
    gramian: jax.Array
    weights: jax.Array
    trunk_grads: list
    head_grads: PyTree
    aux: Any


def _dense_apply(params: PyTree, x: jax.Array) -> jax.Array:
    y = x @ params["w"]
    if "b" in params:
        y = y + params["b"]
    return y


def dense() -> Layer:
    """A dense layer ``y = x @ w + b`` on the last axis; params ``{"w": (d_in, d_out), "b"?}``.

    >>> layer = dense()
    >>> layer.apply({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, jnp.ones((1, 2))).tolist()
    [[2.0, 2.0, 2.0]]
    """
    return Layer(_dense_apply, "dense")


def function(fn: Callable[[jax.Array], jax.Array]) -> Layer:
    """A parameter-free layer ``y = fn(x)`` (an activation, a reshape, a normalisation).

    >>> function(jax.nn.relu).apply(None, jnp.array([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """
    return Layer(lambda params, x: fn(x), "function")


def generic(fn: Callable[[PyTree, jax.Array], jax.Array]) -> Layer:
    """Any layer ``y = fn(params, x)``; its K per-task parameter gradients are formed.

    >>> generic(lambda p, x: p * x).apply(jnp.array(3.0), jnp.array([1.0])).tolist()
    [3.0]
    """
    return Layer(fn, "generic")


def _accumulation_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if x.dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _dense_strategy(n: int, d_in: int, d_out: int, k: int, strategy: Strategy) -> str:
    """``"kernel"`` or ``"form"``: the cheaper way (in multiply-adds) for this layer."""
    if strategy != "auto":
        return strategy
    form = k * n * d_in * d_out + k * k * d_in * d_out + k * d_in * d_out
    kernel = n * n * (d_in + 1) + k * n * n * d_out + k * k * n * d_out + n * d_in * d_out
    return "kernel" if kernel < form else "form"


class _Record(NamedTuple):
    kind: str
    inputs: Any  # (N, d_in) for kernel-dense, None otherwise
    cotangents: Any  # (K, N, d_out) for kernel-dense
    formed: Any  # per-task parameter gradients (K leading axis) for form-dense / generic
    has_bias: bool
    shape: Any  # the input's shape (for reshaping back)


def _check_layers(layers: Sequence[Layer], trunk_params: Sequence[PyTree]) -> None:
    if len(layers) != len(trunk_params):
        raise ValueError(
            f"trunk_params: expected one entry per layer ({len(layers)}), got {len(trunk_params)}"
        )
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer) or layer.kind not in ("dense", "function", "generic"):
            raise TypeError(
                f"layers[{i}]: expected a Layer from dense/function/generic, got {layer!r}"
            )


def _backward(
    layers: Sequence[Layer],
    task_losses_from_features: Callable[..., jax.Array],
    trunk_params: Sequence[PyTree],
    head_params: PyTree,
    inputs: jax.Array,
    args: tuple,
    strategy: Strategy,
) -> tuple[jax.Array, jax.Array, list[_Record], PyTree]:
    """Forward, K-wide activation backward, and the Gramian; records for the weighted step."""
    _check_layers(layers, trunk_params)
    if strategy not in ("auto", "kernel", "form"):
        raise ValueError(f"strategy: expected 'auto', 'kernel' or 'form', got {strategy!r}")
    xs = []
    vjps = []
    x = inputs
    for layer, p in zip(layers, trunk_params, strict=True):
        xs.append(x)
        if layer.kind == "dense":
            w = p["w"]
            if w.ndim != 2 or x.shape[-1] != w.shape[0]:
                raise ValueError(
                    f"trunk_params: a dense layer expects w of shape ({x.shape[-1]}, d_out), "
                    f"got {w.shape}"
                )
            vjps.append(None)
            x = _dense_apply(p, x)
        else:
            x, vjp = jax.vjp(layer.apply, p, x)
            vjps.append(vjp)
    z = x
    losses, head_vjp = jax.vjp(
        lambda h, feats: task_losses_from_features(h, feats, *args), head_params, z
    )
    if losses.ndim != 1:
        raise ValueError(
            f"task_losses_from_features: expected losses of shape (K,), got {losses.shape}"
        )
    k = losses.shape[0]
    one_hots = jnp.eye(k, dtype=losses.dtype)
    cotangents = jax.vmap(lambda c: head_vjp(c)[1])(one_hots)
    head_grads = head_vjp(jnp.ones_like(losses))[0]

    total = jnp.zeros((k, k), _accumulation_dtype(z))
    records: list[_Record] = [None] * len(layers)  # type: ignore[list-item]
    for index in reversed(range(len(layers))):
        layer, p, x = layers[index], trunk_params[index], xs[index]
        need_input_cotangent = index > 0
        if layer.kind == "dense":
            w = p["w"]
            d_in, d_out = w.shape
            n = math.prod(x.shape[:-1])
            flat_x = x.reshape(n, d_in)
            flat_d = cotangents.reshape(k, n, d_out)
            acc = _accumulation_dtype(flat_d)
            has_bias = "b" in p
            how = _dense_strategy(n, d_in, d_out, k, strategy)
            if how == "kernel":
                kernel = jnp.matmul(flat_x, flat_x.T, preferred_element_type=acc)
                if has_bias:
                    kernel = kernel + 1.0
                mixed = jnp.einsum("nm,kme->kne", kernel.astype(flat_d.dtype), flat_d)
                total = total + jnp.einsum(
                    "kne,lne->kl", mixed, flat_d, preferred_element_type=acc
                ).astype(total.dtype)
                records[index] = _Record("kernel", flat_x, flat_d, None, has_bias, x.shape)
            else:
                formed = {"w": jnp.einsum("nd,kne->kde", flat_x, flat_d)}
                if has_bias:
                    formed["b"] = jnp.sum(flat_d, axis=1)
                total = total + gramian(formed).astype(total.dtype)
                records[index] = _Record("form", None, None, formed, has_bias, x.shape)
            if need_input_cotangent:
                cotangents = jnp.einsum("kne,de->knd", flat_d, w).reshape((k, *x.shape))
        elif layer.kind == "function":
            records[index] = _Record("function", None, None, None, False, x.shape)
            if need_input_cotangent:
                cotangents = jax.vmap(lambda c, vjp=vjps[index]: vjp(c)[1])(cotangents)
        else:
            param_grads, new_cotangents = jax.vmap(vjps[index])(cotangents)
            if jax.tree.leaves(param_grads):
                total = total + gramian(param_grads).astype(total.dtype)
            records[index] = _Record("generic", None, None, param_grads, False, x.shape)
            cotangents = new_cotangents
    return losses, total, records, head_grads


def _weighted_trunk_grads(
    records: list[_Record], trunk_params: Sequence[PyTree], weights: jax.Array
) -> list:
    grads = []
    for record, p in zip(records, trunk_params, strict=True):
        if record.kind == "kernel":
            mixed = jnp.tensordot(
                weights.astype(record.cotangents.dtype), record.cotangents, axes=1
            )
            g = {"w": (record.inputs.T @ mixed).astype(p["w"].dtype)}
            if record.has_bias:
                g["b"] = jnp.sum(mixed, axis=0).astype(p["b"].dtype)
            grads.append(g)
        elif record.kind == "form":
            g = combine(weights, record.formed)
            grads.append({name: g[name].astype(p[name].dtype) for name in g})
        elif record.kind == "function":
            grads.append(jax.tree.map(jnp.zeros_like, p))
        else:
            grads.append(combine(weights, record.formed))
    return grads


def task_gramian(
    layers: Sequence[Layer],
    task_losses_from_features: Callable[..., jax.Array],
    trunk_params: Sequence[PyTree],
    head_params: PyTree,
    inputs: jax.Array,
    *args: Any,
    strategy: Strategy = "auto",
) -> tuple[jax.Array, jax.Array]:
    """``(losses (K,), J J^T (K, K))`` over the trunk parameters, never forming ``J``.

    Equals ``jaxmtl.mtl.gramian(task_gradients(...)[1])`` restricted to the trunk.

    Args:
      layers: the trunk, a sequence of :class:`Layer`.
      task_losses_from_features: ``(head_params, z, *args) -> losses (K,)``.
      trunk_params: one params pytree per layer (``None`` for parameter-free ones).
      head_params: the task heads' parameters.
      inputs: the trunk's input ``x`` (N, ..., d_in).
      *args: passed on to ``task_losses_from_features`` (targets, ...).
      strategy: per dense layer, ``"kernel"`` (N x N input kernel), ``"form"`` (per-task
        layer gradients) or ``"auto"`` (the one with fewer multiply-adds).

    >>> layers = [dense()]
    >>> heads = lambda h, z, y: jnp.stack([z.sum(), (z * y).sum()])
    >>> p = [{"w": jnp.ones((2, 1)), "b": jnp.zeros(1)}]
    >>> _, g = task_gramian(layers, heads, p, None, jnp.array([[1.0, 2.0]]), jnp.array([[3.0]]))
    >>> g.tolist()
    [[6.0, 18.0], [18.0, 54.0]]
    """
    losses, total, _, _ = _backward(
        layers, task_losses_from_features, trunk_params, head_params, inputs, args, strategy
    )
    return losses, total


def weighted_gradients(
    layers: Sequence[Layer],
    task_losses_from_features: Callable[..., jax.Array],
    trunk_params: Sequence[PyTree],
    head_params: PyTree,
    inputs: jax.Array,
    *args: Any,
    weigh: Callable[[jax.Array], tuple[jax.Array, Any]],
    strategy: Strategy = "auto",
) -> GramianStep:
    """The gradient ``sum_k w_k dL_k/dtrunk`` with ``w, aux = weigh(J J^T)``, ``J`` never formed.

    The trunk gradient equals ``jaxmtl.mtl.combine(w, J)``, i.e. what
    ``jaxmtl.transforms.aggregate(weighting)`` returns from materialised per-task gradients;
    heads get the gradient of the summed loss. ``weigh`` is typically
    ``lambda g: weighting.weights(g, state)`` for a ``jaxmtl.transforms.weighting`` weighting,
    so that ``aux`` is its new state. Arguments as in :func:`task_gramian`.

    >>> layers = [dense()]
    >>> heads = lambda h, z, y: jnp.stack([z.sum(), -z.sum() / 2])
    >>> p = [{"w": jnp.ones((2, 1))}]
    >>> out = weighted_gradients(layers, heads, p, None, jnp.array([[1.0, 2.0]]), None,
    ...                          weigh=lambda g: (jnp.array([1.0, 1.0]), None))
    >>> out.trunk_grads[0]["w"].tolist()
    [[0.5], [1.0]]
    """
    losses, total, records, head_grads = _backward(
        layers, task_losses_from_features, trunk_params, head_params, inputs, args, strategy
    )
    weights, aux = weigh(total)
    weights = jnp.asarray(weights)
    if weights.shape != losses.shape:
        raise ValueError(f"weigh: expected weights of shape {losses.shape}, got {weights.shape}")
    trunk_grads = _weighted_trunk_grads(records, trunk_params, weights)
    return GramianStep(losses, total, weights, trunk_grads, head_grads, aux)
