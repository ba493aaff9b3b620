"""A small convolutional network for images in NHWC layout (Flax NNX)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmtl.models import _checks

__all__ = ["CNN"]


class CNN(nnx.Module):
    """Conv blocks, global average pooling and a dense projection to features.

    A small LeNet-style network (LeCun et al., "Gradient-based learning applied to document
    recognition", Proc. IEEE 1998): for each entry ``c`` of ``channels`` one block
    ``h <- max_pool_2x2(act(conv_kxk(h)))`` ("SAME" padding, so any image size works, even
    1 x 1), then global average pooling over height and width (Lin et al., "Network In
    Network", ICLR 2014) and a linear layer ``y = W mean_hw(h) + b``.

    Args:
      in_channels: channels C of the input.
      channels: output channels of the conv blocks (at least one).
      out_features: size of the output feature vector.
      kernel_size: side of the square convolution kernels (3).
      activation: nonlinearity after each convolution (``nnx.relu``).
      dtype: computation dtype (``None``: ``param_dtype``); inputs are cast to it.
      param_dtype: parameter dtype, float32 by default.
      rngs: ``nnx.Rngs`` for initialization.

    Shapes: ``(N, H, W, in_channels) -> (N, out_features)`` in ``dtype``.

    >>> from flax import nnx
    >>> CNN(3, [8], 5, rngs=nnx.Rngs(0))(jnp.ones((2, 8, 8, 3))).shape
    (2, 5)
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        out_features: int,
        *,
        kernel_size: int = 3,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_channels = _checks.positive_int("in_channels", in_channels)
        channels = _checks.positive_ints("channels", channels, allow_empty=False)
        out_features = _checks.positive_int("out_features", out_features)
        kernel_size = _checks.positive_int("kernel_size", kernel_size)
        if not callable(activation):
            raise TypeError(f"activation: expected a callable, got {activation!r}")
        self.dtype, self.param_dtype = _checks.compute_dtypes(dtype, param_dtype)
        self.in_channels = in_channels
        self.out_features = out_features
        self.activation = activation
        kinds = {"dtype": self.dtype, "param_dtype": self.param_dtype, "rngs": rngs}
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (kernel_size, kernel_size), padding="SAME", **kinds)
                for a, b in zip((in_channels, *channels[:-1]), channels, strict=True)
            ]
        )
        self.projection = nnx.Linear(channels[-1], out_features, **kinds)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, in_channels) -> (N, out_features)``."""
        _checks.check_float_input("x", x)
        shape = jnp.shape(x)
        if len(shape) != 4:
            raise ValueError(f"x: expected shape (N, H, W, C), got shape {shape}")
        _checks.check_last_axis("x", shape, self.in_channels, "in_channels")
        h = jnp.asarray(x).astype(self.dtype)
        for conv in self.convs:
            h = self.activation(conv(h))
            h = nnx.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        return self.projection(h.mean(axis=(1, 2)))
