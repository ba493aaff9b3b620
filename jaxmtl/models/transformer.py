"""Small transformers (Flax NNX): a vision transformer and a causal language model.

Attention is pluggable so that a fused kernel (e.g. ``kernels.attention.api.flash_attention``)
can replace the default without touching the model. Two calling conventions, both on
``q, k, v`` of shape ``(batch, seq, heads, head_dim)`` (the layout of
``jax.nn.dot_product_attention``) and returning ``(batch, seq, heads, head_dim)``:

* :class:`ViT` (bidirectional) calls ``attention_fn(q, k, v)``;
* :class:`CausalTransformer` calls ``attention_fn(q, k, v, causal=True)``: the function must
  take a keyword-only ``causal: bool`` and, when it is True, let position ``t`` attend only to
  positions ``<= t``. Wrap a function that spells it differently, e.g.
  ``lambda q, k, v, *, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal)``.

Both must scale the logits by ``1 / sqrt(head_dim)``. The default for both is
:func:`dot_product_attention`. Instead of a function, every module also takes
``attention="flash"`` (or another name in :data:`ATTENTIONS`) to use
:func:`kernels.attention.flash_attention` with the implementation of that name; see
:func:`attention_function`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmtl.models import _checks
from jaxmtl.models.mlp import MLP

__all__ = [
    "ATTENTIONS",
    "CausalTransformer",
    "SelfAttention",
    "TransformerBlock",
    "ViT",
    "attention_function",
    "dot_product_attention",
]

AttentionFn = Callable[..., jax.Array]

_embedding_init = nnx.initializers.normal(stddev=0.02)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False
) -> jax.Array:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(d) + mask) v``, per head.

    Eq. (1) of Vaswani et al., "Attention Is All You Need" (NeurIPS 2017), with the causal
    mask of their Sec. 3.2.3 when ``causal``. Runs ``jax.nn.dot_product_attention`` under
    standard dtype promotion, because it computes bfloat16 logits in float32 by an implicit
    promotion that ``jax_numpy_dtype_promotion="strict"`` would reject.

    Args:
      q, k, v: ``(batch, seq, heads, head_dim)``, one float dtype.
      causal: mask out keys after each query position.

    Returns:
      ``(batch, seq, heads, head_dim)`` in the inputs' dtype.

    >>> q = jnp.zeros((1, 3, 1, 2))
    >>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)
    >>> dot_product_attention(q, q, v, causal=True)[0, :, 0, 0].tolist()
    [0.0, 1.0, 2.0]
    """
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


# name -> (flash_attention implementation, interpret); "default" is dot_product_attention.
_FLASH = {
    "flash": ("auto", None),
    "flash-pallas": ("pallas", None),
    "flash-interpret": ("pallas", True),
    "flash-xla": ("xla", None),
    "flash-reference": ("reference", None),
}
ATTENTIONS = ("default", *_FLASH)


def attention_function(name: str) -> AttentionFn:
    """The attention function called ``name``, in both calling conventions of this module.

    ``"default"`` is :func:`dot_product_attention`; ``"flash"`` is
    :func:`kernels.attention.flash_attention` with ``implementation="auto"`` (the Pallas
    kernels on GPU/TPU, the reference elsewhere), and ``"flash-pallas"``,
    ``"flash-interpret"`` (the kernels in interpret mode, any host), ``"flash-xla"``,
    ``"flash-reference"`` pick that implementation.

    >>> attention_function("flash-reference").keywords["implementation"]
    'reference'
    """
    if name == "default":
        return dot_product_attention
    if name not in _FLASH:
        raise ValueError(f"attention: expected one of {ATTENTIONS}, got {name!r}")
    from kernels.attention import flash_attention  # the kernels load only when asked for

    implementation, interpret = _FLASH[name]
    return functools.partial(flash_attention, implementation=implementation, interpret=interpret)


def _resolve_attention(attention: Any, attention_fn: Any) -> AttentionFn | None:
    """``attention_fn`` if given (then ``attention`` must stay "default"), else by name."""
    _check_attention_fn(attention_fn)
    if not isinstance(attention, str):
        raise TypeError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
    if attention_fn is not None:
        if attention != "default":
            raise ValueError(
                f"attention: expected 'default' when attention_fn is given, got {attention!r}"
            )
        return attention_fn
    return None if attention == "default" else attention_function(attention)


def _dim_and_heads(dim: Any, heads: Any) -> tuple[int, int]:
    dim = _checks.positive_int("dim", dim)
    heads = _checks.positive_int("heads", heads)
    if dim % heads:
        raise ValueError(f"dim: expected a multiple of heads = {heads}, got {dim}")
    return dim, heads


def _check_attention_fn(attention_fn: Any) -> None:
    if attention_fn is not None and not callable(attention_fn):
        raise TypeError(f"attention_fn: expected a callable or None, got {attention_fn!r}")


def _layer_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    # nnx.LayerNorm promotes bfloat16 statistics to float32 implicitly (rejected under strict
    # promotion); feed it its own (>= float32) dtype and cast back.
    return norm(x.astype(norm.dtype)).astype(x.dtype)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a pluggable attention function.

    ``MultiHead(X) = Concat(head_1..head_h) W^O``, ``head_i = Attention(X W_i^Q, X W_i^K,
    X W_i^V)`` (Vaswani et al., "Attention Is All You Need", NeurIPS 2017, Sec. 3.2.2); the
    per-head projections are one ``Linear(dim, 3 dim)``.

    Args:
      dim: model width; must be divisible by ``heads``.
      heads: number of attention heads.
      causal: call ``attention_fn(q, k, v, causal=True)`` instead of ``attention_fn(q, k, v)``
        (see the module docstring for both conventions).
      attention_fn: ``None`` for :func:`dot_product_attention`.
      attention: a name from :data:`ATTENTIONS` (e.g. ``"flash"``), used when
        ``attention_fn`` is None (see :func:`attention_function`).
      dtype, param_dtype, rngs: as in :class:`jaxmtl.models.MLP`.

    Shapes: ``(batch, seq, dim) -> (batch, seq, dim)``.

    >>> from flax import nnx
    >>> SelfAttention(8, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 8))).shape
    (1, 5, 8)
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        causal: bool = False,
        attention_fn: AttentionFn | None = None,
        attention: str = "default",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        dim, heads = _dim_and_heads(dim, heads)
        attention_fn = _resolve_attention(attention, attention_fn)
        self.dtype, self.param_dtype = _checks.compute_dtypes(dtype, param_dtype)
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.causal = bool(causal)
        self.attention_fn = dot_product_attention if attention_fn is None else attention_fn
        kinds = {"dtype": self.dtype, "param_dtype": self.param_dtype, "rngs": rngs}
        self.qkv = nnx.Linear(dim, 3 * dim, **kinds)
        self.out = nnx.Linear(dim, dim, **kinds)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(batch, seq, dim) -> (batch, seq, dim)``."""
        shape = jnp.shape(x)
        if len(shape) != 3 or shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (batch, seq, {self.dim}), got shape {shape}")
        batch, seq, _ = shape
        qkv = self.qkv(x.astype(self.dtype)).reshape(batch, seq, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.causal:
            attended = self.attention_fn(q, k, v, causal=True)
        else:
            attended = self.attention_fn(q, k, v)
        if jnp.shape(attended) != q.shape:
            raise ValueError(
                f"attention_fn: expected an output of shape {q.shape} (batch, seq, heads, "
                f"head_dim), got shape {jnp.shape(attended)}"
            )
        return self.out(attended.astype(self.dtype).reshape(batch, seq, self.dim))


class TransformerBlock(nnx.Module):
    """A pre-LN transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    The Pre-LN placement of Xiong et al., "On Layer Normalization in the Transformer
    Architecture" (ICML 2020), Fig. 1(b), as in ViT (Dosovitskiy et al., ICLR 2021, Eq. 2-3);
    the MLP is ``Linear(dim, mlp_dim) -> GELU -> Linear(mlp_dim, dim)``.

    Args:
      dim, heads, causal, attention_fn, attention: as in :class:`SelfAttention`.
      mlp_dim: hidden width of the MLP.
      dtype, param_dtype, rngs: as in :class:`jaxmtl.models.MLP`.

    Shapes: ``(batch, seq, dim) -> (batch, seq, dim)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        causal: bool = False,
        attention_fn: AttentionFn | None = None,
        attention: str = "default",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype, self.param_dtype = _checks.compute_dtypes(dtype, param_dtype)
        mlp_dim = _checks.positive_int("mlp_dim", mlp_dim)
        kinds = {"dtype": self.dtype, "param_dtype": self.param_dtype, "rngs": rngs}
        norm_kinds = {"dtype": _checks.norm_dtype(self.dtype), "param_dtype": self.param_dtype}
        self.attention = SelfAttention(
            dim,
            heads,
            causal=causal,
            attention_fn=_resolve_attention(attention, attention_fn),
            **kinds,
        )
        self.attention_norm = nnx.LayerNorm(dim, **norm_kinds, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(dim, **norm_kinds, rngs=rngs)
        self.mlp = MLP(dim, [mlp_dim], dim, activation=nnx.gelu, **kinds)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(batch, seq, dim) -> (batch, seq, dim)``."""
        x = x + self.attention(_layer_norm(self.attention_norm, x))
        return x + self.mlp(_layer_norm(self.mlp_norm, x))


def _image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"image_size: expected an int or (height, width), got {value!r}")
        return (
            _checks.positive_int("image_size[0]", value[0]),
            _checks.positive_int("image_size[1]", value[1]),
        )
    side = _checks.positive_int("image_size", value)
    return side, side


class ViT(nnx.Module):
    """A small vision transformer.

    Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
    Scale" (ICLR 2021), Eq. 1-4: non-overlapping ``patch_size`` patches linearly embedded
    (a strided convolution), plus learned position embeddings ``E_pos``, ``depth`` pre-LN
    blocks, a final layer norm, then the pooled token through a linear head. ``pool="cls"``
    prepends a learned class token and reads it out (Eq. 1, 4); ``pool="mean"`` (default)
    averages all tokens.

    Args:
      image_size: input side (int) or ``(height, width)``; divisible by ``patch_size``.
      patch_size: side of the square patches.
      in_channels: channels C of the input.
      dim: token width; divisible by ``heads``.
      depth: number of transformer blocks.
      heads: attention heads.
      mlp_dim: hidden width of each block's MLP.
      out_features: size of the output.
      pool: ``"mean"`` or ``"cls"``.
      attention_fn: ``attention_fn(q, k, v) -> out``, all ``(batch, seq, heads, head_dim)``;
        ``None`` for :func:`dot_product_attention`.
      attention: as in :class:`SelfAttention`: ``"flash"`` etc. when ``attention_fn`` is None.
      dtype, param_dtype, rngs: as in :class:`jaxmtl.models.MLP`.

    Shapes: ``(N, H, W, in_channels) -> (N, out_features)`` in ``dtype``.

    >>> from flax import nnx
    >>> vit = ViT(8, 4, 3, dim=8, depth=1, heads=2, mlp_dim=16, out_features=5, rngs=nnx.Rngs(0))
    >>> vit(jnp.ones((2, 8, 8, 3))).shape
    (2, 5)
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int,
        in_channels: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        out_features: int,
        *,
        pool: str = "mean",
        attention_fn: AttentionFn | None = None,
        attention: str = "default",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        height, width = _image_size(image_size)
        patch_size = _checks.positive_int("patch_size", patch_size)
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"image_size: expected multiples of patch_size = {patch_size}, "
                f"got {(height, width)}"
            )
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool: expected 'mean' or 'cls', got {pool!r}")
        in_channels = _checks.positive_int("in_channels", in_channels)
        dim, heads = _dim_and_heads(dim, heads)
        mlp_dim = _checks.positive_int("mlp_dim", mlp_dim)
        attention_fn = _resolve_attention(attention, attention_fn)
        depth = _checks.positive_int("depth", depth)
        out_features = _checks.positive_int("out_features", out_features)
        self.dtype, self.param_dtype = _checks.compute_dtypes(dtype, param_dtype)
        self.image_size = (height, width)
        self.in_channels = in_channels
        self.dim = dim
        self.pool = pool
        kinds = {"dtype": self.dtype, "param_dtype": self.param_dtype, "rngs": rngs}
        self.patch_embedding = nnx.Conv(
            in_channels,
            dim,
            (patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            **kinds,
        )
        tokens = (height // patch_size) * (width // patch_size) + (pool == "cls")
        self.cls_token = (
            nnx.Param(jnp.zeros((1, 1, dim), self.param_dtype)) if pool == "cls" else None
        )
        self.position_embedding = nnx.Param(
            _embedding_init(rngs.params(), (1, tokens, dim), self.param_dtype)
        )
        self.blocks = nnx.List(
            [
                TransformerBlock(dim, heads, mlp_dim, attention_fn=attention_fn, **kinds)
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(
            dim, dtype=_checks.norm_dtype(self.dtype), param_dtype=self.param_dtype, rngs=rngs
        )
        self.head = nnx.Linear(dim, out_features, **kinds)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, in_channels) -> (N, out_features)``."""
        _checks.check_float_input("x", x)
        shape = jnp.shape(x)
        expected = (*self.image_size, self.in_channels)
        if len(shape) != 4 or shape[1:] != expected:
            raise ValueError(f"x: expected shape (N, {', '.join(map(str, expected))}), got {shape}")
        h = self.patch_embedding(jnp.asarray(x).astype(self.dtype))
        h = h.reshape(shape[0], -1, self.dim)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (shape[0], 1, self.dim))
            h = jnp.concatenate([cls, h], axis=1)
        h = h + self.position_embedding[...].astype(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = _layer_norm(self.norm, h)
        pooled = h[:, 0] if self.cls_token is not None else h.mean(axis=1)
        return self.head(pooled)


class CausalTransformer(nnx.Module):
    """A small decoder-only (GPT-style) language model.

    Radford et al., "Improving Language Understanding by Generative Pre-Training" (2018),
    Eq. 2: ``h_0 = U W_e + W_p``, ``h_l = block(h_{l-1})`` with causally masked self-attention,
    logits ``= LN(h_n) W_out`` (an untied output projection instead of ``W_e^T``). Blocks are
    pre-LN (Xiong et al., ICML 2020). Attention is called as
    ``attention_fn(q, k, v, causal=True)``; see the module docstring for that convention.

    Args:
      vocab: vocabulary size.
      dim: token width; divisible by ``heads``.
      depth: number of transformer blocks.
      heads: attention heads.
      mlp_dim: hidden width of each block's MLP.
      max_len: longest sequence (number of learned positions).
      attention_fn: ``attention_fn(q, k, v, *, causal) -> out``; ``None`` for
        :func:`dot_product_attention`.
      attention: as in :class:`SelfAttention`: ``"flash"`` etc. when ``attention_fn`` is None.
      dtype, param_dtype, rngs: as in :class:`jaxmtl.models.MLP`.

    Shapes: integer tokens ``(batch, T)`` in ``[0, vocab)`` with ``T <= max_len`` -> logits
    ``(batch, T, vocab)`` in ``dtype``; the logits at position ``t`` depend on tokens
    ``0..t`` only.

    >>> from flax import nnx
    >>> lm = CausalTransformer(16, 8, 1, 2, 16, max_len=7, rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((2, 4), jnp.int32)).shape
    (2, 4, 16)
    """

    def __init__(
        self,
        vocab: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        max_len: int,
        *,
        attention_fn: AttentionFn | None = None,
        attention: str = "default",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        vocab = _checks.positive_int("vocab", vocab)
        dim, heads = _dim_and_heads(dim, heads)
        mlp_dim = _checks.positive_int("mlp_dim", mlp_dim)
        attention_fn = _resolve_attention(attention, attention_fn)
        depth = _checks.positive_int("depth", depth)
        max_len = _checks.positive_int("max_len", max_len)
        self.dtype, self.param_dtype = _checks.compute_dtypes(dtype, param_dtype)
        self.vocab = vocab
        self.max_len = max_len
        kinds = {"dtype": self.dtype, "param_dtype": self.param_dtype, "rngs": rngs}
        self.token_embedding = nnx.Embed(vocab, dim, **kinds)
        self.position_embedding = nnx.Param(
            _embedding_init(rngs.params(), (max_len, dim), self.param_dtype)
        )
        self.blocks = nnx.List(
            [
                TransformerBlock(
                    dim, heads, mlp_dim, causal=True, attention_fn=attention_fn, **kinds
                )
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(
            dim, dtype=_checks.norm_dtype(self.dtype), param_dtype=self.param_dtype, rngs=rngs
        )
        self.head = nnx.Linear(dim, vocab, **kinds)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Integer ``(batch, T)`` -> logits ``(batch, T, vocab)``."""
        shape = jnp.shape(tokens)
        dtype = jnp.result_type(tokens)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"tokens: expected an integer array, got dtype {dtype}")
        if len(shape) != 2:
            raise ValueError(f"tokens: expected shape (batch, T), got shape {shape}")
        if shape[1] > self.max_len:
            raise ValueError(f"tokens: expected T <= max_len = {self.max_len}, got T = {shape[1]}")
        h = self.token_embedding(tokens).astype(self.dtype)
        h = h + self.position_embedding[: shape[1]].astype(self.dtype)
        for block in self.blocks:
            h = block(h)
        return self.head(_layer_norm(self.norm, h))
