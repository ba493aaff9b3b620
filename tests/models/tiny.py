"""Tiny model configurations shared by the model tests.

On a CPU most of the test time is XLA compiling the initializers and ops once per distinct
shape, so every test builds its models from these few configurations, which share kernel
shapes: (HIDDEN, DIM), (DIM, OUT), (DIM, HIDDEN), (HIDDEN, DIM), (DIM, 3 DIM), (DIM, DIM).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmtl.models import CNN, MLP, CausalTransformer, MultiHead, ViT

DIM = 8
HIDDEN = 16
OUT = 5
VOCAB = 16
MAX_LEN = 7
IMAGE = 8
CHANNELS = 3
HEAD_SIZES = (OUT, HIDDEN)


def mlp(seed=0, **kwargs):
    """``(..., HIDDEN) -> (..., OUT)``."""
    return MLP(HIDDEN, [DIM], OUT, rngs=nnx.Rngs(seed), **kwargs)


def cnn(seed=0, **kwargs):
    """``(N, H, W, CHANNELS) -> (N, OUT)``."""
    return CNN(CHANNELS, [DIM], OUT, rngs=nnx.Rngs(seed), **kwargs)


def vit(seed=0, **kwargs):
    """``(N, IMAGE, IMAGE, CHANNELS) -> (N, OUT)``: 4 patches of 4 x 4."""
    return ViT(IMAGE, 4, CHANNELS, DIM, 1, 2, HIDDEN, OUT, rngs=nnx.Rngs(seed), **kwargs)


def lm(seed=0, **kwargs):
    """Integer ``(B, T <= MAX_LEN) -> (B, T, VOCAB)``, two blocks."""
    return CausalTransformer(VOCAB, DIM, 2, 2, HIDDEN, MAX_LEN, rngs=nnx.Rngs(seed), **kwargs)


def multihead(seed=0, **kwargs):
    """``(N, HIDDEN) ->`` logits ``((N, OUT), (N, HIDDEN))`` over features ``(N, DIM)``."""
    trunk = MLP(HIDDEN, [DIM], DIM, rngs=nnx.Rngs(seed))
    return MultiHead(trunk, DIM, HEAD_SIZES, rngs=nnx.Rngs(seed + 1), **kwargs)


def abstract(build):
    """The module ``build()`` with shape-only parameters (nothing compiled).

    ``build`` must create its own ``nnx.Rngs`` (they are mutated inside the trace).
    """
    return nnx.eval_shape(build)


def output_struct(module, *inputs, method="__call__"):
    """Shapes and dtypes of ``module.<method>(*inputs)``, traced abstractly (nothing compiled).

    ``inputs`` are shapes (float32), ``jax.ShapeDtypeStruct`` s or arrays.
    """
    structs = [jax.ShapeDtypeStruct(x, jnp.float32) if isinstance(x, tuple) else x for x in inputs]
    return nnx.eval_shape(lambda m, *xs: getattr(m, method)(*xs), module, *structs)
