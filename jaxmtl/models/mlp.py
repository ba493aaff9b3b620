"""A multi-layer perceptron (Flax NNX)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmtl.models import _checks

__all__ = ["MLP"]

NORMS = (None, "layernorm")


class MLP(nnx.Module):
    """A fully connected network: ``Linear -> activation -> ... -> Linear``.

    The multi-layer perceptron of Rumelhart, Hinton & Williams, "Learning representations by
    back-propagating errors" (Nature, 1986): ``h_0 = x``, ``h_l = act(W_l h_{l-1} + b_l)`` for
    the hidden layers and a final affine map ``y = W_L h_{L-1} + b_L`` with no activation.
    ``norm="layernorm"`` normalizes every hidden pre-activation first,
    ``h_l = act(LayerNorm(W_l h_{l-1} + b_l))`` (Ba, Kiros & Hinton, "Layer Normalization",
    2016; with ``activation=nnx.gelu`` the normalization and nonlinearity of a ViT block,
    Dosovitskiy et al., ICLR 2021).

    Args:
      in_features: size of the last input axis.
      hidden: sizes of the hidden layers (may be empty: a single linear layer).
      out_features: size of the last output axis.
      activation: elementwise nonlinearity between layers (``nnx.relu``, ``nnx.gelu``, ...).
      norm: ``None`` (default) or ``"layernorm"``: a LayerNorm (learned scale and bias,
        epsilon 1e-6) before each activation.
      dtype: computation dtype (``None``: ``param_dtype``); inputs are cast to it.
      param_dtype: parameter dtype, float32 by default.
      rngs: ``nnx.Rngs`` for initialization.

    Shapes: ``(..., in_features) -> (..., out_features)`` in ``dtype``.

    >>> from flax import nnx
    >>> MLP(16, [8], 5, rngs=nnx.Rngs(0))(jnp.ones((2, 16))).shape
    (2, 5)
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        norm: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = (
            _checks.positive_int("in_features", in_features),
            *_checks.positive_ints("hidden", hidden, allow_empty=True),
            _checks.positive_int("out_features", out_features),
        )
        if not callable(activation):
            raise TypeError(f"activation: expected a callable, got {activation!r}")
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        self.dtype, self.param_dtype = _checks.compute_dtypes(dtype, param_dtype)
        self.in_features = sizes[0]
        self.out_features = sizes[-1]
        self.activation = activation
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
                for a, b in itertools.pairwise(sizes)
            ]
        )
        self.norm = norm
        self.norms = nnx.List(
            [
                nnx.LayerNorm(
                    width,
                    epsilon=1e-6,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    rngs=rngs,
                )
                for width in (sizes[1:-1] if norm == "layernorm" else ())
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., in_features) -> (..., out_features)``."""
        _checks.check_float_input("x", x)
        _checks.check_last_axis("x", jnp.shape(x), self.in_features, "in_features")
        h = jnp.asarray(x).astype(self.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < last:
                if self.norm is not None:
                    h = self.norms[i](h)
                h = self.activation(h)
        return h
