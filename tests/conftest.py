"""Test-session set-up, applied before JAX is imported anywhere.

8 CPU devices (so mesh tests run on one host), strict dtype promotion (an implicit
float64/int promotion in library code is a bug), and warnings as errors (pyproject).
"""

import os

import hypothesis
import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats enabled (float64 references)."""
    with jax.enable_x64(True):
        yield
