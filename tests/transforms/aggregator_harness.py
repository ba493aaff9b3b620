"""The aggregator harness: one :class:`Spec` per method, and a jitted, cached ``direction``.

Shared by ``test_aggregators.py`` (properties) and ``test_aggregator_golden.py`` (golden
values), so that each method compiles once per number of tasks in a test session.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmtl.transforms as T

P = 5  # parameters per task gradient: leaves "a" (2,) and "b" (3,)


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    make: Callable[[int], optax.GradientTransformationExtraArgs]
    non_conflicting: bool = False
    order_invariant: bool = True
    degree: float | None = 1.0  # d(cJ) = c^degree d(J); None: no claim
    row_scale_invariant: bool = False
    random: bool = False


SPECS = [
    Spec("mean", lambda k: T.mean()),
    Spec("summed", lambda k: T.summed()),
    Spec(
        "constant",
        lambda k: T.constant(np.linspace(0.5, 1.5, k).astype(np.float32)),
        order_invariant=False,
    ),
    Spec("rlw", lambda k: T.rlw(seed=1), order_invariant=False, degree=None, random=True),
    Spec("mgda", lambda k: T.mgda(), non_conflicting=True),
    Spec("upgrad", lambda k: T.upgrad(), non_conflicting=True),
    Spec("dualproj", lambda k: T.dualproj(), non_conflicting=True),
    Spec("cagrad", lambda k: T.cagrad()),
    Spec("imtl_g", lambda k: T.imtl_g()),
    Spec("aligned_mtl", lambda k: T.aligned_mtl()),
    Spec(
        "nash_mtl",
        lambda k: T.nash_mtl(),
        non_conflicting=True,
        degree=0.0,
        row_scale_invariant=True,
    ),
    Spec("fairgrad", lambda k: T.fairgrad(alpha=2.0), non_conflicting=True, degree=-1.0 / 3.0),
    Spec("pcgrad", lambda k: T.pcgrad(seed=3), order_invariant=False, random=True),
    Spec("gradvac", lambda k: T.gradvac(num_tasks=k, seed=3), order_invariant=False, random=True),
    Spec("graddrop", lambda k: T.graddrop(seed=3), order_invariant=False, degree=None, random=True),
    Spec("uncertainty", lambda k: T.uncertainty(num_tasks=k)),
    Spec("dwa", lambda k: T.dwa(num_tasks=k)),
    Spec("famo", lambda k: T.famo(num_tasks=k)),
    Spec("gls", lambda k: T.gls()),
    Spec("stch", lambda k: T.stch()),
    Spec("db_mtl", lambda k: T.db_mtl(num_tasks=k), degree=1.0),
]
IDS = [s.name for s in SPECS]
BY_NAME = {s.name: s for s in SPECS}


def default_losses(k: int) -> np.ndarray:
    return np.array([1.0, 2.0, 0.5, 3.0, 1.5][:k], np.float32)


def split(j: np.ndarray) -> dict:
    return {"a": jnp.asarray(j[:, :2]), "b": jnp.asarray(j[:, 2:])}


def flat(d: dict) -> np.ndarray:
    return np.concatenate([np.asarray(d["a"], np.float64), np.asarray(d["b"], np.float64)])


@functools.cache
def compiled(name: str, k: int):
    tx = BY_NAME[name].make(k)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(P - 2)}
    # An unknown extra argument rides along in every call: transforms must ignore it.
    update = jax.jit(lambda u, s, losses: tx.update(u, s, None, task_losses=losses, unrelated=1))
    return tx, params, update


def direction(name: str, j: np.ndarray, losses: np.ndarray | None = None) -> np.ndarray:
    """The aggregated direction for ``J`` (K x P) from a freshly initialised transform."""
    j = np.asarray(j, np.float32)
    k = j.shape[0]
    tx, params, update = compiled(name, k)
    state = tx.init(params)
    losses = default_losses(k) if losses is None else losses
    out, _ = update(split(j), state, jnp.asarray(losses))
    assert out["a"].shape == (2,) and out["b"].shape == (P - 2,)
    return flat(out)


def random_jacobian(seed: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-1.0, 1.0, size=(k, 1)))
    shift = rng.normal(size=(1, P)) * rng.uniform(0.0, 1.5)
    return ((rng.normal(size=(k, P)) + shift) * scales).astype(np.float32)


def close(a, b, rtol, scale):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def directions_over_steps(name: str, js: list, losses: list) -> list[np.ndarray]:
    """The directions of consecutive calls of one transform (its state carried along)."""
    k = np.asarray(js[0]).shape[0]
    tx, params, update = compiled(name, k)
    state = tx.init(params)
    out = []
    for j, loss in zip(js, losses, strict=True):
        d, state = update(split(np.asarray(j, np.float32)), state, jnp.asarray(loss, jnp.float32))
        out.append(flat(d))
    return out


# ----------------------------------------------------------------------------- with heads

STATEFUL = ("gradvac", "uncertainty", "dwa", "famo", "db_mtl")  # take num_tasks=


def problem(k: int, dtype=jnp.float32):
    """A tiny multi-task regression: a shared linear trunk and one scalar head per task."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 4)), dtype)
    y = jnp.asarray(rng.normal(size=(16, k)), dtype)
    params = {
        "trunk": jnp.asarray(rng.normal(size=(4, 3)) * 0.5, dtype),
        "heads": jnp.asarray(rng.normal(size=(3, k)) * 0.5, dtype),
    }

    def task_losses(p, x, y):
        return jnp.mean((x @ p["trunk"] @ p["heads"] - y) ** 2, axis=0)

    return params, x, y, task_losses


def is_trunk(path) -> bool:
    return path[0].key == "trunk"


def make_shared(name: str, k: int, shared=is_trunk):
    """The named method's transform, built with ``shared=`` (the trunk by default)."""
    if name == "constant":
        return T.constant(np.linspace(0.5, 1.5, k).astype(np.float32), shared=shared)
    kwargs = {"num_tasks": k} if name in STATEFUL else {}
    return getattr(T, name)(shared=shared, **kwargs)
