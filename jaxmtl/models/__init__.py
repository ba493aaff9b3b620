"""Small Flax NNX models, multi-task architectures and the ``functional`` bridge.

Modules (all take ``rngs=nnx.Rngs(...)``, ``dtype`` = computation dtype, default the
parameters' dtype, and ``param_dtype`` = float32 by default; inputs are cast to ``dtype``):

* :class:`MLP` ``(..., in) -> (..., out)``; :class:`CNN` ``(N, H, W, C) -> (N, out)``;
* :class:`ViT` ``(N, H, W, C) -> (N, out)`` and :class:`CausalTransformer`
  ``(B, T) int -> (B, T, vocab)``, with a pluggable ``attention_fn`` (see
  :mod:`jaxmtl.models.transformer` for its two calling conventions);
* :class:`MultiHead` (shared trunk + one linear head per task) with ``features``/``heads``.

:func:`functional` turns any module into ``(apply_fn, params)``, a pure function and a
nested-dict params pytree; :func:`split_multihead`, :func:`merge_multihead`,
:func:`is_shared` and :func:`multihead_functional` serve ``jaxmtl.mtl``.
"""

from jaxmtl.models.cnn import CNN
from jaxmtl.models.functional import functional
from jaxmtl.models.mlp import MLP
from jaxmtl.models.multihead import (
    MultiHead,
    TaskHeads,
    is_shared,
    merge_multihead,
    multihead_functional,
    split_multihead,
)
from jaxmtl.models.transformer import (
    CausalTransformer,
    SelfAttention,
    TransformerBlock,
    ViT,
    dot_product_attention,
)

__all__ = [
    "CNN",
    "MLP",
    "CausalTransformer",
    "MultiHead",
    "SelfAttention",
    "TaskHeads",
    "TransformerBlock",
    "ViT",
    "dot_product_attention",
    "functional",
    "is_shared",
    "merge_multihead",
    "multihead_functional",
    "split_multihead",
]
