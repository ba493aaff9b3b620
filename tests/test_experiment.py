"""Tests of jaxmtl.experiment: run directories, resuming, the command line, tables, caching."""

import dataclasses
import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmtl import experiment as jexp


@dataclasses.dataclass(frozen=True)
class Config:
    """A tiny experiment."""

    smoke: bool = False  # seconds instead of minutes
    seeds: tuple[int, ...] = (0, 1)
    learning_rate: float = 1e-3
    resume: str | None = None


STAMP = "20250102-030405"


def test_run_dir_files(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = jexp.RunDir(tmp_path / "demo", Config(smoke=True), timestamp=STAMP)
    assert run.path == tmp_path / "demo" / STAMP and not run.resumed
    # config.json is there before anything else, as plain JSON.
    assert [p.name for p in run.path.iterdir()] == ["config.json"]
    assert json.loads((run.path / "config.json").read_text()) == {
        "smoke": True,
        "seeds": [0, 1],
        "learning_rate": 1e-3,
        "resume": None,
    }
    run.log({"step": 1, "loss": np.float32(0.5), "acc": jnp.asarray([0.25, 1.0])})
    run.log({"step": 2, "loss": 0.25})
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 0.5, "acc": [0.25, 1.0]},
        {"step": 2, "loss": 0.25},
    ]
    assert run.read_metrics() == [json.loads(line) for line in lines]
    run.write_results({"acc": np.float64(0.75), "per_seed": (1, 2)})
    run.write_results({"acc": 0.875})  # rewritten whole
    assert json.loads((run.path / "results.json").read_text()) == {"acc": 0.875}
    run.write_summary("# Title\n\n| a |\n| --- |\n| 1 |")
    assert (run.path / "summary.md").read_text().endswith("| 1 |\n")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = run.savefig(fig, "curve")
    assert png == run.path / "curve.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.subdir("cells").is_dir()
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in run.path.iterdir()) == [
        "cells",
        "config.json",
        "curve.png",
        "metrics.jsonl",
        "results.json",
        "summary.md",
    ]
    with pytest.raises(TypeError, match="cannot write a object"):
        run.write_results({"x": object()})
    assert json.loads((run.path / "results.json").read_text()) == {"acc": 0.875}
    with pytest.raises(ValueError, match="plain file name"):
        run.savefig(fig, "../escape")


def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path):
    first = jexp.RunDir(tmp_path, Config(), timestamp=STAMP)
    second = jexp.RunDir(tmp_path, Config(), timestamp=STAMP)
    assert first.path != second.path and second.path.name == f"{STAMP}-1"
    # "latest" is the newest by timestamp, then by counter.
    assert jexp.RunDir(tmp_path, Config(), resume="latest").path == second.path


def test_resume_reuses_the_directory(tmp_path):
    first = jexp.RunDir(tmp_path, Config(seeds=(3,)), timestamp=STAMP)
    first.log({"step": 1})
    later = jexp.RunDir(tmp_path, Config(seeds=(3,)), timestamp="20250102-030406")
    by_path = jexp.RunDir(tmp_path, Config(seeds=(3,), resume=str(first.path)))
    assert by_path.resumed and by_path.path == first.path
    assert by_path.read_metrics() == [{"step": 1}]
    # The config's own resume field is used, and ignored in the comparison.
    latest = jexp.RunDir(tmp_path, Config(seeds=(3,), resume="latest"))
    assert latest.path == later.path and latest.resumed
    # "latest" with no earlier run starts a new one.
    fresh = jexp.RunDir(tmp_path / "other", Config(), resume="latest")
    assert not fresh.resumed and (fresh.path / "config.json").exists()


def test_resume_refuses_a_different_config(tmp_path):
    run = jexp.RunDir(tmp_path, Config(seeds=(0, 1)), timestamp=STAMP)
    before = (run.path / "config.json").read_text()
    changed = Config(seeds=(0, 1, 2), learning_rate=0.1, resume="latest")
    with pytest.raises(ValueError, match="2 field") as error:
        jexp.RunDir(tmp_path, changed)
    assert "learning_rate: stored 0.001, new 0.1" in str(error.value)
    assert "seeds: stored [0, 1], new [0, 1, 2]" in str(error.value)
    assert (run.path / "config.json").read_text() == before
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        jexp.RunDir(tmp_path, Config(), resume=str(tmp_path / "nowhere"))


def test_cli_parses_a_tiny_config():
    assert jexp.cli(Config, lambda c: c, args=["--smoke"]) == Config(smoke=True)
    parsed = jexp.cli(Config, lambda c: c, args=["--seeds", "4", "5", "--learning-rate", "0.5"])
    assert parsed == Config(seeds=(4, 5), learning_rate=0.5)
    assert jexp.cli(Config, lambda c: c.resume, args=["--resume", "latest"]) == "latest"
    assert jexp.cli(Config, lambda c: c, args=[]) == Config()
    with pytest.raises(SystemExit):
        jexp.cli(Config, lambda c: c, args=["--no-such-option"])
    with pytest.raises(TypeError, match="dataclass type"):
        jexp.cli(dict, lambda c: c, args=[])


def test_markdown_table():
    rows = [{"method": "CE", "acc": 0.912345, "note": "a|b"}, {"method": "MAE", "acc": None}]
    assert jexp.markdown_table(rows) == (
        "| method | acc | note |\n| --- | --- | --- |\n| CE | 0.9123 | a\\|b |\n| MAE |  |  |"
    )
    assert jexp.markdown_table(rows, columns=["acc"]) == "| acc |\n| --- |\n| 0.9123 |\n|  |"
    assert jexp.markdown_table([{"x": float("nan")}]).endswith("| nan |")
    with pytest.raises(ValueError, match="column"):
        jexp.markdown_table([])


def test_mean_std_and_format():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, std = jexp.mean_std(values)
    deviations = [v - 3.5 for v in values]
    assert mean == 3.5
    assert std == pytest.approx(math.sqrt(sum(d * d for d in deviations) / 3), rel=1e-12)
    assert jexp.mean_std([2.5]) == (2.5, 0.0)
    assert jexp.mean_std(values, ddof=0)[1] == pytest.approx(np.std(values), rel=1e-12)
    assert jexp.format_mean_std([0.708, 0.712, 0.716], scale=100) == "71.2 ± 0.4"
    assert jexp.format_mean_std([1, 2], digits=3) == "1.500 ± 0.707"
    with pytest.raises(ValueError, match="non-empty"):
        jexp.mean_std([])


class Pair(NamedTuple):
    w: jax.Array
    key: jax.Array


def test_cached_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return Pair(jnp.arange(4, dtype=jnp.bfloat16), jax.random.key(5))

    like = jax.eval_shape(compute)
    calls.clear()
    first = jexp.cached(tmp_path / "backbone", compute, like=like)
    second = jexp.cached(tmp_path / "backbone", compute, like=like)
    assert len(calls) == 1
    for value in (first, second):
        assert isinstance(value, Pair) and value.w.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(value.w, np.float32), [0, 1, 2, 3])
        np.testing.assert_array_equal(
            jax.random.key_data(value.key), jax.random.key_data(jax.random.key(5))
        )
