"""Argument checks and dtype conventions shared by the model modules (private).

Dtype convention of every jaxmtl model: ``param_dtype`` (default float32) is the dtype the
parameters are stored in; ``dtype`` (default ``None``: the same as ``param_dtype``) is the
dtype the computation runs in. Inputs of any float dtype are cast to ``dtype`` on entry, so
bfloat16 inputs into a float32 model are fine under ``jax_numpy_dtype_promotion="strict"``.
Layer norms always compute in at least float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def positive_ints(name: str, values: Any, *, allow_empty: bool) -> tuple[int, ...]:
    """A tuple of positive ints from a sequence, or an error naming ``name``."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of positive ints, got {values!r}")
    if not values and not allow_empty:
        raise ValueError(f"{name}: expected at least one entry, got {values!r}")
    return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


def float_dtype(name: str, value: Any) -> jnp.dtype:
    """A floating numpy dtype, or a TypeError naming ``name``."""
    dtype = jnp.dtype(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {dtype}")
    return dtype


def compute_dtypes(dtype: Any, param_dtype: Any) -> tuple[jnp.dtype, jnp.dtype]:
    """``(dtype, param_dtype)`` with ``dtype=None`` meaning "the parameters' dtype"."""
    param = float_dtype("param_dtype", param_dtype)
    compute = param if dtype is None else float_dtype("dtype", dtype)
    return compute, param


def norm_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype a layer norm computes in: ``dtype`` widened to at least float32."""
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def check_float_input(name: str, x: Any) -> None:
    """Raise a TypeError unless ``x`` holds real numbers (float, int or bool)."""
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name}: expected a real (float or int) array, got dtype {dtype}")


def check_last_axis(name: str, shape: tuple[int, ...], expected: int, what: str) -> None:
    """Raise a ValueError unless ``shape[-1] == expected``."""
    if len(shape) == 0 or shape[-1] != expected:
        raise ValueError(f"{name}: expected last axis {what} = {expected}, got shape {shape}")
