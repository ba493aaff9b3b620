"""Tests of jaxmtl.experiment: run directories, resuming, the command line, tables, caching."""

import dataclasses
import json
import math
import os
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
    assert run.path == tmp_path / "demo" / "smoke" / STAMP and not run.resumed  # apart
    # config.json is there before anything else, as plain JSON, with the provenance and
    # the lock of the process using the directory.
    assert sorted(p.name for p in run.path.iterdir()) == [".lock", "config.json", "provenance.json"]
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
    summary = (run.path / "summary.md").read_text()
    assert summary.startswith(f"> **{jexp.SMOKE_NOTE}**") and summary.endswith("| 1 |\n")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = run.savefig(fig, "curve")
    assert png == run.path / "curve.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.subdir("cells").is_dir()
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in run.path.iterdir()) == [
        ".lock",
        "cells",
        "config.json",
        "curve.png",
        "metrics.jsonl",
        "provenance.json",
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


# --------------------------------------------------------------------------- faults (issue 11)


@dataclasses.dataclass(frozen=True)
class Located:
    """A config with location fields."""

    smoke: bool = False
    steps: int = 3
    out_dir: str = "runs/located"
    resume: str | None = None


_HOLDER = """
import sys, time, dataclasses
from jaxmtl import experiment as jexp

@dataclasses.dataclass(frozen=True)
class Config:
    smoke: bool = False
    steps: int = 3
    out_dir: str = "x"
    resume: str | None = None

run = jexp.RunDir(sys.argv[1], Config(), resume="latest")
print(run.path, flush=True)
time.sleep(60)
"""


def _holder(root):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(root)], stdout=subprocess.PIPE, text=True
    )
    return proc, proc.stdout.readline().strip()


def test_a_live_run_directory_is_locked_and_a_dead_owners_lock_is_stale(tmp_path):
    first = jexp.RunDir(tmp_path, Located(), timestamp=STAMP)
    first.log({"step": 1})
    first.close()
    proc, held = _holder(tmp_path)
    try:
        assert held == str(first.path)
        with pytest.raises(jexp.RunDirInUse, match=rf"{first.path} is in use by pid {proc.pid}"):
            jexp.RunDir(tmp_path, Located(), resume="latest")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert (first.path / ".lock").exists()  # left behind by the killed process: stale
    again = jexp.RunDir(tmp_path, Located(), resume="latest")
    assert again.path == first.path and again.resumed
    owner = json.loads((first.path / ".lock").read_text())
    assert owner["pid"] == os.getpid()
    again.close()
    assert not (first.path / ".lock").exists()


_RACER = """
import sys, time, dataclasses, json
import numpy as np
from pathlib import Path
from jaxmtl import experiment as jexp

@dataclasses.dataclass(frozen=True)
class Config:
    smoke: bool = False

root = Path(sys.argv[1])
run = jexp.RunDir(root / "runs", Config(), timestamp="20250102-030405")
def compute():
    with (root / "calls").open("a") as f:
        f.write("1")
    time.sleep(1.0)
    return {"w": np.arange(3.0)}
value = jexp.cached(root / "cache" / "pretrained", compute)
print(json.dumps({"path": str(run.path), "w": value["w"].tolist()}))
"""


def test_identical_runs_at_once_get_their_own_directories_and_share_one_cache(tmp_path):
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    results = [json.loads(out.splitlines()[-1]) for out, _ in outs]
    assert results[0]["path"] != results[1]["path"]
    assert results[0]["w"] == results[1]["w"] == [0.0, 1.0, 2.0]
    assert (tmp_path / "calls").read_text() == "1"  # computed once, the other run waited
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["pretrained"]


def test_an_unreadable_cache_is_reported_moved_aside_and_recomputed(tmp_path, capsys):
    path = tmp_path / "cache" / "pretrained"
    jexp.cached(path, lambda: {"w": np.arange(3.0)})
    for f in (path / "0" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    value = jexp.cached(path, lambda: {"w": np.ones(3)})
    np.testing.assert_array_equal(value["w"], np.ones(3))
    err = capsys.readouterr().err
    assert f"cannot read the cache {path}" in err
    (aside,) = [p for p in path.parent.iterdir() if p.name.startswith("pretrained.unreadable")]
    assert str(aside) in err
    assert jexp.cached(path, lambda: 1 / 0)["w"].tolist() == [1.0, 1.0, 1.0]  # stored again
    # A computation that fails leaves no half-written cache behind.
    with pytest.raises(ZeroDivisionError):
        jexp.cached(tmp_path / "cache" / "other", lambda: 1 / 0)
    assert not (tmp_path / "cache" / "other").exists()


def test_truncated_last_jsonl_line_is_dropped_and_a_corrupt_middle_line_named(tmp_path):
    run = jexp.RunDir(tmp_path, Located(), timestamp=STAMP)
    run.log({"step": 1})
    run.log({"step": 2})
    with (run.path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a crash in the middle of a write
    run.close()
    resumed = jexp.RunDir(tmp_path, Located(), resume="latest")
    assert resumed.read_metrics() == [{"step": 1}, {"step": 2}]
    resumed.log({"step": 3})
    assert resumed.read_metrics() == [{"step": 1}, {"step": 2}, {"step": 3}]
    path = resumed.path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}, line 2"):
        resumed.read_metrics()
    with pytest.raises(ValueError, match=rf"{path}, line 2"):
        jexp.read_jsonl(path)


def test_a_moved_run_directory_resumes(tmp_path):
    run = jexp.RunDir(tmp_path / "a", Located(out_dir=str(tmp_path / "a")), timestamp=STAMP)
    run.log({"step": 1})
    run.close()
    moved = tmp_path / "b" / STAMP
    moved.parent.mkdir()
    run.path.rename(moved)
    config = Located(out_dir=str(tmp_path / "b"), resume="latest")
    again = jexp.RunDir(config.out_dir, config)
    assert again.path == moved and again.resumed and again.read_metrics() == [{"step": 1}]
    assert jexp.config_stamp(config) == jexp.config_stamp(Located())


def test_latest_skips_runs_that_never_started_and_cli_removes_them(tmp_path, capsys):
    started = jexp.RunDir(tmp_path, Located(), timestamp=STAMP)
    started.log({"step": 1})
    started.close()
    failed = jexp.RunDir(tmp_path, Located(steps=30), timestamp="20250102-030406")
    failed.close()  # a mistyped command: nothing written beyond config.json
    assert jexp.RunDir(tmp_path, Located(), resume="latest").path == started.path

    def bad_run(config):
        jexp.RunDir(tmp_path, config)
        raise ValueError("datasets: no such data set 'mnits'")

    with pytest.raises(ValueError, match="mnits"):
        jexp.cli(Located, bad_run, args=["--steps", "4"])
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == [STAMP, "20250102-030406"]  # the cli's failed run left nothing behind


def test_provenance_smoke_directory_and_announced_paths(tmp_path, capsys):
    def run(config):
        directory = jexp.RunDir(tmp_path, config)
        directory.write_summary("# Title")
        return directory.path

    path = jexp.cli(Located, run, args=["--smoke"])
    assert path.parent == tmp_path / "smoke"
    out = capsys.readouterr().out
    assert out.count(str(path)) == 2  # at the start and at the end
    assert "smoke run: numbers are not results" in (path / "summary.md").read_text().lower()
    record = json.loads((path / "provenance.json").read_text())["invocations"][0]
    assert set(record["versions"]) >= {"jax", "jaxlib", "flax", "optax", "numpy", "orbax", "python"}
    assert set(record["git"]) == {"commit", "dirty"}
    assert isinstance(record["command"], list) and record["pid"] == os.getpid()
