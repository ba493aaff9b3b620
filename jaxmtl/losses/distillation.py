"""Knowledge-distillation losses: softmax KD, BinaryKL, BinaryKL-Norm and the dual-head
objective.

* Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015 (KD).
* Yang, Zong, Huang, Feng & An, "Dual-Head Knowledge Distillation: Enhancing Logits
  Utilization with an Auxiliary Head", arXiv 2411.08937, 2024 (BinaryKL, BinaryKL-Norm,
  DHKD). The DHKD student has a main head (trained with cross-entropy, used for prediction)
  and an auxiliary head (trained with the logit-level loss only): ``dhkd_loss`` takes both
  heads' logits. The optional gradient alignment of the paper (project the distillation
  gradient against the CE gradient when they conflict) is a transform over per-objective
  gradients, not a loss.

Per-example contract: ``(student_logits, teacher_logits)`` of shape (..., C) -> (...), summed
over classes, no mean over the batch (the paper's ``1/N``); the ``T^2`` factor of the paper
is included. Any float dtype (16-bit computed in float32, result cast back); finite for
logits of magnitude 1e4. The teacher gets no gradient (``stop_gradient``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxmtl.losses.classification import (
    _check_scalar,
    _compute_dtype,
    _logits,
    comp_sum_loss,
)

__all__ = [
    "binary_kl",
    "binary_kl_norm",
    "dhkd_loss",
    "kd_kl",
]


def _pair(student_logits: jax.Array, teacher_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    student = _logits("student_logits", student_logits)
    teacher = _logits("teacher_logits", teacher_logits)
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher_logits: expected the shape of student_logits {student.shape}, got "
            f"{teacher.shape}"
        )
    dtype = _compute_dtype(student.dtype)
    teacher = jax.lax.stop_gradient(teacher.astype(dtype))
    return student, teacher


def kd_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 4.0
) -> jax.Array:
    """Softmax distillation ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``, per example.

    Hinton et al. 2015; the KD baseline of Yang et al. 2024 (``L_KD``). Invariant to adding a
    per-example constant to either logit vector.

    Args:
      student_logits, teacher_logits: (..., C).
      temperature: T > 0.

    Returns:
      (...) losses in the student's dtype.

    >>> print(kd_kl(jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0])))
    0.0
    """
    temperature = _check_scalar("temperature", temperature, low=0.0, low_open=True)
    student, teacher = _pair(student_logits, teacher_logits)
    log_q = jax.nn.log_softmax(student.astype(teacher.dtype) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    p = jnp.exp(log_p)
    # p log p -> 0 where p underflows to 0 (log_p stays finite, so the product is 0 there).
    kl = jnp.sum(p * (log_p - log_q), axis=-1)
    return (temperature**2 * kl).astype(student.dtype)


def binary_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 2.0
) -> jax.Array:
    """BinaryKL: per-class Bernoulli KL between sigmoid probabilities, per example.

    Yang et al., "Dual-Head Knowledge Distillation", 2024, ``L_BKL``:

        T^2 sum_c KL( Bern(sigmoid(z_t,c / T)) || Bern(sigmoid(z_s,c / T)) ),

    in log-sigmoid form (no clamping; the reference clamps probabilities to
    ``[1e-8, 1 - 1e-8]``, so values differ once ``|z / T|`` exceeds about 18). Zero iff the
    logits are equal, non-negative; sees absolute logits (not shift invariant).

    Args:
      student_logits, teacher_logits: (..., C).
      temperature: T > 0.

    Returns:
      (...) losses in the student's dtype.

    >>> print(binary_kl(jnp.array([0.0]), jnp.array([0.0])))
    0.0
    """
    temperature = _check_scalar("temperature", temperature, low=0.0, low_open=True)
    student, teacher = _pair(student_logits, teacher_logits)
    s = student.astype(teacher.dtype) / temperature
    t = teacher / temperature
    p = jax.nn.sigmoid(t)
    kl = p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s)) + (1.0 - p) * (
        jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)
    )
    return (temperature**2 * jnp.sum(kl, axis=-1)).astype(student.dtype)


def _log_cosh(u: jax.Array) -> jax.Array:
    a = jnp.abs(u)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - math.log(2.0)


def binary_kl_norm(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 2.0
) -> jax.Array:
    """BinaryKL-Norm ``T^2 sum_c log cosh((z_s,c - z_t,c) / (2T))``, per example.

    Yang et al. 2024, ``L_BKLN = T^2 sum_c KL(Bern(1/2) || Bern(sigmoid((z_s - z_t)/T)))``
    (the variant the DHKD code trains with), written as a log-cosh:
    ``log cosh(u) = |u| + log1p(exp(-2|u|)) - log 2``. Zero iff ``z_s = z_t``; gradient
    ``(T/2) tanh((z_s - z_t) / (2T))`` per logit (bounded).

    Args:
      student_logits, teacher_logits: (..., C).
      temperature: T > 0.

    Returns:
      (...) losses in the student's dtype.

    >>> round(float(binary_kl_norm(jnp.array([2.0, 0.0]), jnp.zeros(2), temperature=1.0)), 6)
    0.433781
    """
    temperature = _check_scalar("temperature", temperature, low=0.0, low_open=True)
    student, teacher = _pair(student_logits, teacher_logits)
    u = (student.astype(teacher.dtype) - teacher) / (2.0 * temperature)
    return (temperature**2 * jnp.sum(_log_cosh(u), axis=-1)).astype(student.dtype)


def dhkd_loss(
    main_logits: jax.Array,
    aux_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    gamma: float = 1.0,
    alpha: float = 1.0,
    temperature: float = 2.0,
) -> jax.Array:
    """Dual-head KD objective ``gamma CE(z_main, y) + alpha L_BKLN(z_aux, z_t)``, per example.

    Yang et al. 2024, DHKD (as in the official code; CIFAR-100 defaults gamma = 1,
    alpha = 1, T = 2; ImageNet alpha = 0.1). The CE term touches only the main head and the
    BinaryKL-Norm term only the auxiliary head; both shape the shared backbone.

    Args:
      main_logits: (..., C) main-head logits. aux_logits: (..., C) auxiliary-head logits.
      teacher_logits: (..., C). labels: (...) integer classes (or one-hot, as in
        ``comp_sum_loss``).
      gamma, alpha: weights >= 0. temperature: T > 0.

    Returns:
      (...) losses in the main logits' dtype.

    >>> z = jnp.array([0.0, 0.0])
    >>> round(float(dhkd_loss(z, z, z, jnp.array(0))), 6)  # CE log 2 + 0
    0.693147
    """
    gamma = _check_scalar("gamma", gamma, low=0.0)
    alpha = _check_scalar("alpha", alpha, low=0.0)
    main_logits = _logits("main_logits", main_logits)
    aux_logits = _logits("aux_logits", aux_logits)
    if main_logits.shape != aux_logits.shape:
        raise ValueError(
            f"aux_logits: expected the shape of main_logits {main_logits.shape}, got "
            f"{aux_logits.shape}"
        )
    dtype = _compute_dtype(main_logits.dtype)
    ce = comp_sum_loss(main_logits, labels, tau=1.0).astype(dtype)
    bkln = binary_kl_norm(aux_logits, teacher_logits, temperature=temperature).astype(dtype)
    return (gamma * ce + alpha * bkln).astype(main_logits.dtype)
