"""Public op: the fused linear layer + Z-loss, ``z_loss_linear(h, W, labels)``.

de Brebisson & Vincent, "The Z-loss: a shift and scale invariant classification loss belonging
to the Spherical Family", arXiv 1604.08859, 2016, Eq. (Z-loss), on the logits
``o = h W^T + bias`` of an output layer, computed without writing the ``(N, D)`` logits
(:mod:`kernels.zloss.pallas`), differentiable through ``jax.custom_vjp`` in ``h``, ``W``
and ``bias``.

Counted cost: FLOPs ``2 N D d`` forward and ``4 N D d`` backward; HBM bytes those of ``h``,
``W`` (``bias``, ``labels``) and of the outputs only (see :mod:`kernels.zloss.pallas`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.zloss import pallas as _pallas
from kernels.zloss import reference as _reference

__all__ = ["z_loss_linear"]

_IMPLEMENTATIONS = ("auto", "pallas", "reference")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one op instance.

    ``variant``: the kernel layout forced for every platform (None: the platform's own).
    ``interpret``: run the kernel in interpret mode everywhere. Otherwise the kernel runs
    where it is lowered for cuda / rocm (Triton layout) or tpu (Mosaic layout), and
    ``fallback`` says what runs on any other platform: ``"dense"`` (the jnp versions of the
    same forward and backward, ``kernels.zloss.reference``), ``"interpret"`` or None (an
    error at lowering).
    """

    a: float
    b: float
    variant: str | None
    block_rows: int | None
    block_classes: int | None
    interpret: bool
    fallback: str | None

    def kernel(self, fn, variant: str, interpret: bool):
        blocks = _blocks(self.block_rows, self.block_classes)
        return functools.partial(
            fn, variant=self.variant or variant, blocks=blocks, interpret=interpret
        )

    def dispatch(self, fn, dense, *args):
        """``fn`` (a kernel builder of kernels.zloss.pallas) for the lowering platform."""
        if self.interpret:
            return self.kernel(fn, "tpu", True)(*args)
        fallback = {"dense": dense, "interpret": self.kernel(fn, "tpu", True), None: None}
        gpu = self.kernel(fn, "gpu", False)
        # The switch is resolved at lowering (one branch per platform) and never
        # differentiated (custom_vjp), so no branch's intermediates reach another's.
        return jax.lax.platform_dependent(
            *args,
            cuda=gpu,
            rocm=gpu,
            tpu=self.kernel(fn, "tpu", False),
            default=fallback[self.fallback],
        )


def _moments(h, w, labels, bias, cfg: _Config):
    return cfg.dispatch(_pallas.forward, _reference.moments, h, w, labels, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(h, w, labels, bias, cfg: _Config):
    return _fused_fwd(h, w, labels, bias, cfg)[0]


def _fused_fwd(h, w, labels, bias, cfg: _Config):
    mean, m2, target = _moments(h, w, labels, bias, cfg)
    loss = _pallas.loss_from_moments(mean, m2, target, w.shape[0], a=cfg.a, b=cfg.b)
    return loss.astype(h.dtype), (h, w, labels, bias, (mean, m2, target))


def _dense_backward(h, w, labels, coef, bias):
    dw, dbias = _reference.dw(h, w, labels, coef, bias)
    return _reference.dh(h, w, labels, coef, bias), dw, dbias


def _fused_bwd(cfg: _Config, residuals, cotangent):
    h, w, labels, bias, (mean, m2, target) = residuals
    alpha, beta, gamma = _pallas.logit_cotangent_coefficients(
        mean, m2, target, cotangent, w.shape[0], a=cfg.a, b=cfg.b
    )
    coef = (mean, alpha, beta, gamma)
    dh, dw, dbias = cfg.dispatch(_pallas.backward, _dense_backward, h, w, labels, coef, bias)
    dlabels = np.zeros(labels.shape, dtype=jax.dtypes.float0)
    return dh, dw, dlabels, dbias


_fused.defvjp(_fused_fwd, _fused_bwd)


# --------------------------------------------------------------------------- boundary checks


def _real(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a Python real number (static), got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name}: expected {want}, got {value}")
    return value


def _check_inputs(h, w, labels, bias):
    h, w, labels = jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels)
    for name, x in (("h", h), ("W", w)):
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a 2-d float array, got {x.dtype}{list(x.shape)}")
    if w.dtype != h.dtype:
        raise TypeError(f"W: expected the dtype of h ({h.dtype}), got {w.dtype}")
    if w.shape[1] != h.shape[1]:
        raise ValueError(f"W: expected shape (D, {h.shape[1]}) (h is {h.shape}), got {w.shape}")
    if w.shape[0] < 2:
        raise ValueError(f"W: expected at least 2 classes (rows), got shape {w.shape}")
    if labels.shape != (h.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels: expected integer class indices of shape ({h.shape[0]},), got "
            f"{labels.dtype}{list(labels.shape)}"
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi >= w.shape[0]:
            raise ValueError(
                f"labels: expected values in [0, {w.shape[0]}), got values in [{lo}, {hi}]"
            )
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (w.shape[0],) or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(
                f"bias: expected a float array of shape ({w.shape[0]},), got "
                f"{bias.dtype}{list(bias.shape)}"
            )
    return h, w, labels, bias


def _blocks(block_rows: int | None, block_classes: int | None) -> _pallas.Blocks | None:
    for name, v in (("block_rows", block_rows), ("block_classes", block_classes)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if block_rows is None and block_classes is None:
        return None
    return _pallas.Blocks(block_rows, block_classes)


# --------------------------------------------------------------------------- public op


def z_loss_linear(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    bias: jax.Array | None = None,
    *,
    a: float = 1.0,
    b: float = 0.0,
    implementation: str = "auto",
    interpret: bool | None = None,
    variant: str | None = None,
    block_rows: int | None = None,
    block_classes: int | None = None,
) -> jax.Array:
    """Per-example Z-loss of the logits ``h @ W^T + bias``, never materializing the logits.

    de Brebisson & Vincent, "The Z-loss", 2016:
    ``L_n = (1/a) softplus(a (b - z_n))``, ``z_n = (o_{n y_n} - mean_k o_nk) / std_k o_nk``
    with ``o = h W^T + bias``; the same value as
    ``jaxmtl.losses.classification.z_loss(h @ W.T + bias, labels, a=a, b=b)``.

    Args:
      h: (N, d) float features (float32 or bfloat16; float32 accumulation).
      w: (D, d) output weights, same dtype as ``h``, D >= 2.
      labels: (N,) integer targets in [0, D), range checked when concrete (under ``jit`` an
        out-of-range label is not caught: the kernel then sees a target logit of 0).
      bias: optional (D,) float bias.
      a: sharpness > 0; b: target z-score offset (static Python numbers).
      implementation: ``"auto"`` runs the Pallas kernel where the op is lowered for GPU
        (Triton layout) or TPU (Mosaic layout) and, elsewhere, the dense jnp forms of the
        same forward and backward (``kernels.zloss.reference``); the choice is made at
        lowering (``jax.lax.platform_dependent`` inside the ``custom_vjp``), so
        ``jax.export`` for ``cuda`` / ``tpu`` from a CPU host gets the kernel.
        ``"pallas"``: the kernel, in interpret mode off an accelerator (unless
        ``interpret=False``, which makes lowering for a CPU an error). ``"reference"``:
        ``kernels.zloss.reference.z_loss_linear``, dense, plain autodiff.
      interpret: run the kernel in Pallas interpret mode (the only way on a CPU). None: only
        where no accelerator lowering applies.
      variant: kernel layout, ``"gpu"`` or ``"tpu"``; None: the lowering platform's, and
        ``"tpu"`` in interpret mode.
      block_rows, block_classes: tile sizes of all three kernels (None: per layout and
        kernel, see ``kernels.zloss.pallas.DEFAULT_BLOCKS``); Triton wants powers of two
        >= 16, Mosaic TPU multiples of 8 (16 for bfloat16) rows and of 128 classes.

    Returns:
      (N,) losses in ``h``'s dtype.

    Cost: FLOPs ``2 N D d`` forward, ``4 N D d`` backward; HBM bytes of ``h``, ``W`` and the
    outputs (the reference also writes and reads the ``(N, D)`` logits).

    >>> h = jnp.eye(4)[3:]
    >>> w = jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0]))
    >>> loss = z_loss_linear(h, w, jnp.array([3]), implementation="pallas")
    >>> print(loss.round(5))
    [0.1629]
    """
    a = _real("a", a, positive=True)
    b = _real("b", b)
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: expected one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if variant is not None and variant not in ("gpu", "tpu"):
        raise ValueError(f"variant: expected 'gpu', 'tpu' or None, got {variant!r}")
    if interpret is not None and not isinstance(interpret, bool):
        raise TypeError(f"interpret: expected a bool or None, got {interpret!r}")
    h, w, labels, bias = _check_inputs(h, w, labels, bias)
    if implementation == "reference":
        return _reference.z_loss_linear(h, w, labels, bias, a=a, b=b)
    if implementation == "auto":
        fallback = "dense"
    else:
        fallback = None if interpret is False else "interpret"
    _blocks(block_rows, block_classes)
    cfg = _Config(a, b, variant, block_rows, block_classes, bool(interpret), fallback)
    return _fused(h, w, labels, bias, cfg)
