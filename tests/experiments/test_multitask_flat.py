"""Smoke test of experiments.multitask_flat: end to end in seconds, robust facts only."""

import dataclasses
import json
import math

import pytest

from experiments import multitask_flat


def _one(root, name):
    found = sorted(root.rglob(name))
    assert found, f"{name} not written under {root}"
    return found[0]


def test_delta_summaries_hand_values():
    # Two accuracies, +10% and -5% relative to the baseline: Delta_m = mean(-10, +5) = -2.5.
    assert multitask_flat.delta_m([0.88, 0.76], [0.8, 0.8], [True, True]) == pytest.approx(-2.5)
    # A lower-is-better metric counts with the opposite sign.
    assert multitask_flat.delta_m([0.9], [1.0], [False]) == pytest.approx(-10.0)
    # Delta_p averages within a task first: task 0 has (+10%, -20% on a loss => +20%) -> +15,
    # task 1 has -5 -> mean +5.
    got = multitask_flat.delta_p(
        [[0.88, 0.8], [0.76]], [[0.8, 1.0], [0.8]], [[False, True], [False]]
    )
    assert got == pytest.approx(5.0)


def test_multitask_flat_smoke(tmp_path):
    config = multitask_flat.Config(smoke=True, out_dir=str(tmp_path / "multitask_flat"))
    results = multitask_flat.run(config)

    for name in ("config.json", "metrics.jsonl", "results.json", "summary.md"):
        assert _one(tmp_path, name).stat().st_size > 0
    assert _one(tmp_path, "multitask_flat.png").stat().st_size > 0
    stored = json.loads(_one(tmp_path, "results.json").read_text())
    assert set(stored) >= {"datasets", "claims"}

    effective = config.effective()
    (dataset,) = results["datasets"].values()
    rows = dataset["methods"]
    assert {"STL", "MGDA", "F-MGDA", "F-MGDA (direct)"} <= set(rows)
    assert any(name.startswith("Rep-MTL") for name in rows)
    num_tasks = len(dataset["tasks"])
    for name, row in rows.items():
        assert len(row["acc"]) == len(effective.seeds), name
        for per_seed in row["acc"]:
            assert len(per_seed) == num_tasks
            assert all(0.0 <= a <= 1.0 for a in per_seed), name
        # With one metric per task the two conventions are exact negatives.
        for dm, dp in zip(row["delta_m"], row["delta_p"], strict=True):
            assert math.isfinite(dm) and dp == pytest.approx(-dm, abs=1e-9)
        assert all(math.isfinite(s) for s in row["sharpness"]), name
    for name in ("MGDA", "F-MGDA"):
        assert all(0.0 <= c <= 1.0 for c in rows[name]["conflict"])
    assert all(isinstance(c, str) and c for c in results["claims"])
    assert "| method |" in _one(tmp_path, "summary.md").read_text()

    # Resuming the finished run finds every cell stored and retrains nothing.
    cells = _one(tmp_path, "cells.jsonl").read_text().splitlines()
    again = multitask_flat.run(dataclasses.replace(config, resume="latest"))
    assert _one(tmp_path, "cells.jsonl").read_text().splitlines() == cells
    assert again["datasets"] == json.loads(json.dumps(results["datasets"]))


def test_cells_file_cut_by_a_crash_and_a_corrupt_line(tmp_path):
    path = tmp_path / "cells.jsonl"
    good = json.dumps({"key": ["d", "EW", 0], "stamp": "s", "result": {"acc": [0.5]}})
    path.write_text(good + "\n" + good.replace('"EW"', '"MGDA"')[:25])  # crash mid-write
    assert multitask_flat._load_cells(path, "s") == {("d", "EW", 0): {"acc": [0.5]}}
    assert path.read_text() == good + "\n"  # the cut line is gone: that cell is redone
    path.write_text(good + "\n{oops\n" + good + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2"):
        multitask_flat._load_cells(path, "s")


def test_stamp_ignores_location_fields():
    config = multitask_flat.Config(smoke=True)
    moved = dataclasses.replace(config, out_dir="elsewhere", resume="latest")
    assert multitask_flat._stamp(config) == multitask_flat._stamp(moved)
