"""Runs loss functions under ``jit`` in the tests: one compilation per signature.

``Jit(module).name(...)`` runs ``module.name`` under ``jit`` and ``Jit(module, grad=True)
.name(...)`` the gradient of its sum w.r.t. the first argument: arrays and floats traced,
everything else static. Eager dispatch compiles each op of every new shape separately, slow
on a shared CPU. Bad-input tests call the module directly, eagerly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _compiled(fn, static_argnums, fixed, grad):
    f = functools.partial(fn, **dict(fixed))
    if grad:
        f = jax.grad(lambda *args_, f_=f, **kwargs_: jnp.sum(f_(*args_, **kwargs_)))
    return jax.jit(f, static_argnums=static_argnums, compiler_options=FAST_COMPILE)


class Jit:
    """Attribute access gives the jitted (or gradient) version of the module's function."""

    def __init__(self, module, grad=False):
        self._module, self._grad = module, grad

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        dynamic = lambda v: isinstance(v, (jax.Array, np.ndarray, float))

        def call(*args, **kwargs):
            static = tuple(i for i, a in enumerate(args) if not dynamic(a))
            fixed = tuple(sorted((k, v) for k, v in kwargs.items() if not dynamic(v)))
            traced = {k: v for k, v in kwargs.items() if dynamic(v)}
            return _compiled(fn, static, fixed, self._grad)(*args, **traced)

        return call
