"""Runs every ``>>>`` example in the installed packages' docstrings."""

import doctest
import importlib
import pkgutil

import pytest

import jaxmtl
import kernels


def _modules():
    for package in (jaxmtl, kernels):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {"jnp": importlib.import_module("jax.numpy"), "jax": importlib.import_module("jax")}
    globs["np"] = importlib.import_module("numpy")
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
