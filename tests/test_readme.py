"""The README's Python examples run as written."""

import re
from pathlib import Path

import jax
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    with jax.numpy_dtype_promotion("standard"):  # as a user runs it; optax's adam needs it
        exec(compile(BLOCKS[index], f"README.md[{index}]", "exec"), {})
