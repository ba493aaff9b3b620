"""Tiny models, task vectors and a float64 switch shared by the task-vector and analysis tests."""

from __future__ import annotations

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def float64():
    """Enables float64 for the duration of a test, restoring the previous setting."""
    with jax.enable_x64(True):
        yield


def mlp_params(seed: int, sizes: tuple[int, ...], dtype=jnp.float32) -> dict:
    """A tanh MLP as a plain dict ``{"l0": {"w", "b"}, ...}`` with NumPy-generated weights."""
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": {
            "w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype),
            "b": jnp.asarray(0.1 * rng.normal(size=(b,)), dtype),
        }
        for i, (a, b) in enumerate(itertools.pairwise(sizes))
    }


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    """tanh hidden layers, linear output."""
    layers = [params[f"l{i}"] for i in range(len(params))]
    h = x
    for layer in layers[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ layers[-1]["w"] + layers[-1]["b"]


def random_like(seed: int, tree, scale: float = 1.0):
    """A pytree of standard normals (times ``scale``) shaped and typed like ``tree``."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype), tree
    )


def flat(tree) -> np.ndarray:
    """All leaves of ``tree`` raveled and concatenated (in float64), leaf order of jax.tree."""
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


D, HIDDEN, FEATURES = 2, 3, 4


def separable_apply(params, x):
    """f(x) = g1(x_a; theta_1) + g2(x_b; theta_2) with g(0; theta) = 0 (no biases)."""
    xa, xb = x[:, :D], x[:, D:]
    g1 = jnp.tanh(xa @ params["g1"]["w1"]) @ params["g1"]["w2"]
    g2 = jnp.tanh(xb @ params["g2"]["w1"]) @ params["g2"]["w2"]
    return g1 + g2


def separable_setup(seed=0):
    """theta_0, tau_1 (block 1 only), tau_2 (block 2 only), task-1 inputs (x_b = 0), task-2
    inputs (x_a = 0), all float64 (call under :func:`float64`)."""
    rng = np.random.default_rng(seed)
    block = lambda: {
        "w1": jnp.asarray(rng.normal(size=(D, HIDDEN)), jnp.float64),
        "w2": jnp.asarray(rng.normal(size=(HIDDEN, FEATURES)), jnp.float64),
    }
    p0 = {"g1": block(), "g2": block()}
    zeros = jax.tree.map(jnp.zeros_like, p0["g1"])
    tau1 = {"g1": random_like(seed + 1, p0["g1"]), "g2": zeros}  # acts on block 1 only
    tau2 = {"g1": zeros, "g2": random_like(seed + 2, p0["g2"])}
    x1 = np.zeros((10, 2 * D))
    x1[:, :D] = rng.normal(size=(10, D))  # task 1 lives on x_a (x_b = 0)
    x2 = np.zeros((8, 2 * D))
    x2[:, D:] = rng.normal(size=(8, D))  # task 2 lives on x_b (x_a = 0)
    return p0, tau1, tau2, jnp.asarray(x1), jnp.asarray(x2)
