"""The task-addition and task-negation protocols of task arithmetic, model-agnostic.

"Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023, Sec. 3-4) and
"Task Arithmetic in the Tangent Space" (Ortiz-Jimenez, Favero & Frossard, NeurIPS 2023,
Sec. 6 and code ``eval_task_addition.py`` / ``eval_task_negation.py``):

* addition: one shared ``alpha`` for ``theta_0 + alpha sum_t tau_t``, chosen on validation
  data by the mean *normalized* accuracy (accuracy / that task's fine-tuned accuracy);
* negation: ``theta_0 - alpha tau_target``, the ``alpha`` that minimizes the target accuracy
  while the control accuracy stays ``>= 0.95 x`` the pre-trained control accuracy.

The selection rules take precomputed accuracy arrays (any model, any evaluation); the drivers
:func:`task_addition` and :func:`task_negation` compute them with
``jaxmtl.taskvec.coefficient_sweep`` (the cached linear form in ``mode="linear"``: one JVP per
batch and vector instead of one forward pass per alpha).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmtl.taskvec.tangent import check_mode, coefficient_sweep
from jaxmtl.taskvec.vector import as_stacked

PyTree = Any
ApplyFn = Callable[..., Any]

__all__ = [
    "AdditionResult",
    "NegationResult",
    "edit_accuracies",
    "normalized_accuracy",
    "padded_edit_accuracies",
    "select_addition_alpha",
    "select_negation_alpha",
    "task_addition",
    "task_negation",
]


def _float_array(name: str, value: Any, ndim: int) -> jax.Array:
    a = jnp.asarray(value)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {a.shape}")
    return a


def normalized_accuracy(accuracies: Any, finetuned_accuracies: Any) -> jax.Array:
    """``accuracy / finetuned_accuracy`` per task (Ortiz-Jimenez et al., NeurIPS 2023, Sec. 6).

    Args:
      accuracies: ``(..., T)`` accuracies of the edited model.
      finetuned_accuracies: ``(T,)`` accuracies of each task's own fine-tuned model.

    >>> normalized_accuracy(jnp.array([0.4, 0.9]), jnp.array([0.8, 0.9])).tolist()
    [0.5, 1.0]
    """
    acc = jnp.asarray(accuracies)
    ft = _float_array("finetuned_accuracies", finetuned_accuracies, 1)
    if acc.ndim < 1 or acc.shape[-1] != ft.shape[0]:
        raise ValueError(
            f"accuracies: expected shape (..., {ft.shape[0]}) (T from finetuned_accuracies), "
            f"got {acc.shape}"
        )
    return acc.astype(ft.dtype) / ft


def select_addition_alpha(alphas: Any, val_accuracies: Any, finetuned_accuracies: Any) -> jax.Array:
    """Index of the shared ``alpha`` with the best mean normalized validation accuracy.

    Task addition (Ilharco et al., ICLR 2023, Sec. 4; Ortiz-Jimenez et al., NeurIPS 2023,
    Sec. 6): ``argmax_a mean_t acc_t(a) / acc_t^ft``; ties go to the first (smallest index)
    alpha, as in the reference code.

    Args:
      alphas: ``(A,)`` the grid.
      val_accuracies: ``(A, T)`` validation accuracy of each task at each alpha.
      finetuned_accuracies: ``(T,)`` each task's fine-tuned validation accuracy.

    Returns:
      An int32 scalar index into ``alphas``.

    >>> acc = jnp.array([[0.5, 0.5], [0.8, 0.4], [0.6, 0.9]])
    >>> int(select_addition_alpha(jnp.array([0.0, 0.5, 1.0]), acc, jnp.array([1.0, 1.0])))
    2
    """
    a = _float_array("alphas", alphas, 1)
    acc = _float_array("val_accuracies", val_accuracies, 2)
    if acc.shape[0] != a.shape[0]:
        raise ValueError(
            f"val_accuracies: expected shape ({a.shape[0]}, T) (A = len(alphas)), got {acc.shape}"
        )
    score = jnp.mean(normalized_accuracy(acc, finetuned_accuracies), axis=-1)
    return jnp.argmax(score).astype(jnp.int32)


def select_negation_alpha(
    alphas: Any,
    target_accuracies: Any,
    control_accuracies: Any,
    pretrained_control_accuracy: Any,
    *,
    threshold: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Index of the alpha with the lowest target accuracy at an acceptable control accuracy.

    Task negation (Ilharco et al., ICLR 2023, Sec. 3; Ortiz-Jimenez et al., NeurIPS 2023,
    Sec. 6): among alphas with ``control >= threshold * pretrained_control``, minimize the
    target accuracy; ties go to the first alpha.

    Args:
      alphas: ``(A,)`` the grid (of ``theta_0 - alpha tau``).
      target_accuracies: ``(A,)`` validation accuracy on the task to forget.
      control_accuracies: ``(A,)`` validation accuracy on the control task.
      pretrained_control_accuracy: control accuracy of ``theta_0``.
      threshold: the kept fraction of the pre-trained control accuracy, in ``(0, 1]``.

    Returns:
      ``(index, found)``: an int32 index and whether any alpha met the constraint (when
      none does, ``index`` is 0).

    >>> idx, found = select_negation_alpha(jnp.array([0.0, 0.5, 1.0]), jnp.array([0.9, 0.4, 0.1]),
    ...                                    jnp.array([0.8, 0.78, 0.5]), 0.8)
    >>> int(idx), bool(found)
    (1, True)
    """
    if not isinstance(threshold, int | float) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a number in (0, 1], got {threshold!r}")
    a = _float_array("alphas", alphas, 1)
    target = _float_array("target_accuracies", target_accuracies, 1)
    control = _float_array("control_accuracies", control_accuracies, 1)
    for name, arr in (("target_accuracies", target), ("control_accuracies", control)):
        if arr.shape != a.shape:
            raise ValueError(f"{name}: expected shape {a.shape} (as alphas), got {arr.shape}")
    reference = jnp.asarray(pretrained_control_accuracy).astype(control.dtype)
    if reference.ndim != 0:
        raise ValueError(
            f"pretrained_control_accuracy: expected a scalar, got shape {reference.shape}"
        )
    feasible = control >= threshold * reference
    score = jnp.where(feasible, target.astype(control.dtype), jnp.inf)
    return jnp.argmin(score).astype(jnp.int32), jnp.any(feasible)


def edit_accuracies(
    apply_fn: ApplyFn,
    params0: PyTree,
    vectors: PyTree | Sequence[PyTree],
    coefficients: Any,
    x: Any,
    y: Any,
    *,
    head: Callable[[Any], jax.Array] | None = None,
    mode: str = "nonlinear",
    batch_size: int | None = None,
) -> jax.Array:
    """Accuracy of ``head(f(x; theta_0 + sum_i c_i tau_i))`` for each coefficient setting.

    The evaluation step of task arithmetic (Ilharco et al., ICLR 2023, Eq. 1-2), on the
    linearized model in ``mode="linear"`` (Ortiz-Jimenez et al., NeurIPS 2023, Eq. 4, via the
    cached form of ``jaxmtl.taskvec.coefficient_sweep``).

    Args:
      apply_fn: pure ``apply_fn(params, x) -> features`` (or logits without ``head``).
      params0, vectors: ``theta_0`` and ``n`` task vectors (stacked or a sequence).
      coefficients: ``(G,)`` shared alphas or ``(G, n)``.
      x, y: a batch and its integer labels ``(N,)``.
      head: frozen ``features -> logits (N, C)``; ``None`` reads outputs as logits.
      mode: ``"nonlinear"`` or ``"linear"``.
      batch_size: settings evaluated at once in non-linear mode.

    Returns:
      ``(G,)`` float32 accuracies.

    >>> f = lambda p, x: x * p                         # logits of 2 classes
    >>> acc = edit_accuracies(f, jnp.array([1.0, 0.0]), [jnp.array([-1.0, 1.0])],
    ...                       jnp.array([0.0, 1.0]), jnp.ones((4, 2)), jnp.ones(4, jnp.int32))
    >>> acc.tolist()
    [0.0, 1.0]
    """
    labels = jnp.asarray(y)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"y: expected integer labels of shape (N,), got {labels.dtype}{labels.shape}"
        )
    if head is not None and not callable(head):
        raise TypeError(f"head: expected a callable features -> logits or None, got {head!r}")
    outputs = coefficient_sweep(
        apply_fn, params0, vectors, coefficients, x, mode=check_mode(mode), batch_size=batch_size
    )
    logits = outputs if head is None else jax.vmap(head)(outputs)
    if logits.ndim != 3 or logits.shape[1] != labels.shape[0]:
        raise ValueError(
            f"head: expected logits of shape ({labels.shape[0]}, C) per setting, "
            f"got {logits.shape[1:]}"
        )
    predictions = jnp.argmax(logits, axis=-1).astype(labels.dtype)
    return jnp.mean(predictions == labels, axis=-1, dtype=jnp.float32)


@functools.lru_cache(maxsize=64)
def _compiled_accuracies(
    apply_fn: ApplyFn, head: Callable | None, mode: str, batch_size: int | None
) -> Callable:
    """A jitted :func:`edit_accuracies` for one (model, head), reused across calls."""
    return jax.jit(
        functools.partial(edit_accuracies, apply_fn, head=head, mode=mode, batch_size=batch_size)
    )


def padded_edit_accuracies(
    apply_fn: ApplyFn,
    params0: PyTree,
    vectors: PyTree,
    coefficients: Any,
    x: Any,
    y: Any,
    *,
    head: Callable[[Any], jax.Array] | None = None,
    mode: str = "nonlinear",
    batch_size: int | None = None,
    pad_to: int | None = None,
) -> jax.Array | np.ndarray:
    """:func:`edit_accuracies` through one compiled program per (model, head, mode, shapes).

    With ``pad_to``, the ``(G, ...)`` coefficient grid is zero-padded on the host to ``pad_to``
    settings and the padding dropped from the result, so that grids of different lengths
    (a validation sweep, a two-point test grid) share one compilation. Each setting is
    evaluated on its own, so the padding leaves the real settings' values unchanged. Returns
    ``(G,)`` accuracies (NumPy when padded).

    >>> f = lambda p, x: x * p
    >>> acc = padded_edit_accuracies(f, jnp.array([1.0, 0.0]), jnp.array([[-1.0, 1.0]]),
    ...                              jnp.array([1.0]), jnp.ones((4, 2)), jnp.ones(4, jnp.int32),
    ...                              pad_to=3)
    >>> acc.tolist()
    [1.0]
    """
    compiled = _compiled_accuracies(apply_fn, head, check_mode(mode), batch_size)
    if pad_to is None:
        return compiled(params0, vectors, coefficients, x, y)
    grid = np.asarray(coefficients)
    if grid.ndim == 0 or pad_to < grid.shape[0]:
        raise ValueError(
            f"pad_to: expected at least the {grid.shape[:1]} coefficient settings, got {pad_to}"
        )
    padded = np.zeros((pad_to, *grid.shape[1:]), grid.dtype)
    padded[: grid.shape[0]] = grid
    return np.asarray(compiled(params0, vectors, padded, x, y))[: grid.shape[0]]


class AdditionResult(NamedTuple):
    """Outcome of :func:`task_addition`; accuracies are in ``[0, 1]``, ``T`` tasks."""

    alphas: np.ndarray  # (A,)
    index: int  # the selected alpha
    alpha: float
    validation_accuracies: np.ndarray  # (A, T)
    validation_normalized: np.ndarray  # (A, T)
    test_accuracies: np.ndarray  # (T,) at the selected alpha
    test_normalized: np.ndarray  # (T,)
    test_accuracies_alpha_one: np.ndarray  # (T,) at alpha = 1
    test_normalized_alpha_one: np.ndarray  # (T,)


class NegationResult(NamedTuple):
    """Outcome of :func:`task_negation` (edits ``theta_0 - alpha tau``)."""

    alphas: np.ndarray  # (A,)
    index: int  # the selected alpha (0 when no alpha kept the control accuracy)
    alpha: float
    found: bool  # whether some alpha met the control constraint
    validation_target: np.ndarray  # (A,)
    validation_control: np.ndarray  # (A,)
    pretrained_validation_control: float
    test_target: float  # at the selected alpha
    test_control: float
    pretrained_test_target: float
    pretrained_test_control: float


def _check_task_data(name: str, data: Any, num: int) -> None:
    if not isinstance(data, Sequence) or len(data) != num:
        raise ValueError(f"{name}: expected a sequence of {num} (x, y) pairs, got {data!r}")
    for t, pair in enumerate(data):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"{name}[{t}]: expected an (x, y) pair, got {type(pair).__name__}")


def task_addition(
    apply_fn: ApplyFn,
    params0: PyTree,
    vectors: PyTree | Sequence[PyTree],
    *,
    validation: Sequence[tuple[Any, Any]],
    test: Sequence[tuple[Any, Any]],
    finetuned_validation_accuracies: Any,
    finetuned_test_accuracies: Any,
    alphas: Any,
    heads: Sequence[Callable] | None = None,
    mode: str = "nonlinear",
    batch_size: int | None = None,
    pad_to: int | None = None,
) -> AdditionResult:
    """The task-addition protocol: shared alpha on validation, report test at it and at 1.

    Ilharco et al. (ICLR 2023, Sec. 4) and Ortiz-Jimenez et al. (NeurIPS 2023, Sec. 6):
    ``theta_0 + alpha sum_t tau_t`` on every task's data through that task's head; ``alpha``
    maximizes the mean normalized validation accuracy (:func:`select_addition_alpha`). In
    ``mode="linear"`` each batch costs one primal pass and one JVP of the summed vector.
    Compiles one sweep per (model, head) and returns NumPy values.

    Args:
      apply_fn, params0: the model and ``theta_0``.
      vectors: the ``T`` task vectors (stacked or a sequence), in task order.
      validation, test: ``T`` pairs ``(x_t, y_t)``.
      finetuned_validation_accuracies, finetuned_test_accuracies: ``(T,)`` each task's
        fine-tuned accuracy on that split (the normalizers).
      alphas: ``(A,)`` grid, e.g. ``jnp.linspace(0, 1, 21)``.
      heads: ``T`` frozen heads ``features -> logits`` or ``None`` (outputs are logits).
      mode, batch_size: as in :func:`edit_accuracies`.
      pad_to: grids padded to this many settings (:func:`padded_edit_accuracies`): one
        compilation per (head, data shape) for the validation and the test grid.
    """
    check_mode(mode)
    stacked, n = as_stacked(vectors, params0)
    _check_task_data("validation", validation, n)
    _check_task_data("test", test, n)
    if heads is not None and (not isinstance(heads, Sequence) or len(heads) != n):
        raise ValueError(f"heads: expected None or {n} callables (one per task), got {heads!r}")
    a = _float_array("alphas", alphas, 1)
    head_of = (lambda t: None) if heads is None else (lambda t: heads[t])

    def accuracies(data, grid):
        columns = [
            padded_edit_accuracies(
                apply_fn, params0, stacked, grid, x, y,
                head=head_of(t), mode=mode, batch_size=batch_size, pad_to=pad_to,
            )
            for t, (x, y) in enumerate(data)
        ]  # fmt: skip
        return jnp.stack(columns, axis=-1)

    val_acc = accuracies(validation, a)
    index = int(select_addition_alpha(a, val_acc, finetuned_validation_accuracies))
    test_acc = accuracies(test, jnp.stack([a[index], jnp.ones_like(a[index])]))
    test_norm = normalized_accuracy(test_acc, finetuned_test_accuracies)
    return AdditionResult(
        alphas=np.asarray(a),
        index=index,
        alpha=float(a[index]),
        validation_accuracies=np.asarray(val_acc),
        validation_normalized=np.asarray(
            normalized_accuracy(val_acc, finetuned_validation_accuracies)
        ),
        test_accuracies=np.asarray(test_acc[0]),
        test_normalized=np.asarray(test_norm[0]),
        test_accuracies_alpha_one=np.asarray(test_acc[1]),
        test_normalized_alpha_one=np.asarray(test_norm[1]),
    )


def task_negation(
    apply_fn: ApplyFn,
    params0: PyTree,
    vector: PyTree,
    *,
    validation: tuple[Any, Any],
    control_validation: tuple[Any, Any],
    test: tuple[Any, Any],
    control_test: tuple[Any, Any],
    alphas: Any,
    head: Callable | None = None,
    control_head: Callable | None = None,
    threshold: float = 0.95,
    mode: str = "nonlinear",
    batch_size: int | None = None,
    pad_to: int | None = None,
) -> NegationResult:
    """The task-negation protocol: forget a task while keeping control accuracy.

    Ilharco et al. (ICLR 2023, Sec. 3) and Ortiz-Jimenez et al. (NeurIPS 2023, Sec. 6):
    evaluate ``theta_0 - alpha tau`` for every ``alpha`` on the target and control validation
    data, choose with :func:`select_negation_alpha` (control ``>= threshold`` x the control
    accuracy of ``theta_0``), then report test accuracies at that ``alpha``.

    Args:
      apply_fn, params0: the model and ``theta_0``.
      vector: the task vector ``tau`` of the task to forget (pytree shaped like params0).
      validation, test: ``(x, y)`` of the target task; ``control_*``: of the control task.
      alphas: ``(A,)`` grid of non-negative magnitudes, e.g. ``jnp.linspace(0, 1, 21)``.
      head, control_head: frozen heads of the target and control tasks (or ``None``).
      threshold: kept fraction of the pre-trained control accuracy.
      mode, batch_size: as in :func:`edit_accuracies`.
      pad_to: grids padded to this many settings (at least ``A + 1``), as in
        :func:`task_addition`.
    """
    check_mode(mode)
    stacked, _ = as_stacked([vector], params0)
    a = _float_array("alphas", alphas, 1)
    grid = jnp.concatenate([jnp.zeros((1,), a.dtype), -a])  # coefficient 0 = theta_0

    def accuracies(data, task_head, coefficients):
        x, y = data
        return padded_edit_accuracies(
            apply_fn, params0, stacked, coefficients, x, y,
            head=task_head, mode=mode, batch_size=batch_size, pad_to=pad_to,
        )  # fmt: skip

    target_val = accuracies(validation, head, grid)
    control_val = accuracies(control_validation, control_head, grid)
    index, found = select_negation_alpha(
        a, target_val[1:], control_val[1:], control_val[0], threshold=threshold
    )
    index = int(index)
    test_grid = jnp.stack([jnp.zeros_like(a[index]), -a[index]])
    target_test = accuracies(test, head, test_grid)
    control_test_acc = accuracies(control_test, control_head, test_grid)
    return NegationResult(
        alphas=np.asarray(a),
        index=index,
        alpha=float(a[index]),
        found=bool(found),
        validation_target=np.asarray(target_val[1:]),
        validation_control=np.asarray(control_val[1:]),
        pretrained_validation_control=float(control_val[0]),
        test_target=float(target_test[1]),
        test_control=float(control_test_acc[1]),
        pretrained_test_target=float(target_test[0]),
        pretrained_test_control=float(control_test_acc[0]),
    )
