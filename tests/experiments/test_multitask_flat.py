"""Smoke test of experiments.multitask_flat: end to end in seconds, robust facts only."""

import dataclasses
import json
import math

import pytest

from experiments import multitask_flat
from jaxmtl import experiment as jexp


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


# Numbers of the smoke run below (multi_digits, seed 0) computed by the code BEFORE it moved
# onto the jaxmtl.experiment harness (commit 9f13c94's experiments/multitask_flat.py): the
# move must not change any result. (per method: per-task test accuracy, sharpness)
BEFORE_MOVE = {
    "MGDA": ([0.1111111111111111, 0.10666666666666667], 0.10062742233276367),
    "F-MGDA": ([0.10888889736599393, 0.10555555555555556], 0.09743881225585938),
    "F-MGDA (direct)": ([0.11222222222222222, 0.10666666666666667], 0.09795284271240234),
    "STL": ([0.11222222222222222, 0.10777777777777778], 0.0694890022277832),
}


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
    for name, (acc, sharp) in BEFORE_MOVE.items():
        assert rows[name]["acc"][0] == pytest.approx(acc, rel=1e-6), name
        assert rows[name]["sharpness"][0] == pytest.approx(sharp, rel=1e-5), name
    verdicts = {c["verdict"].split(" (")[0] for c in results["claims"]}
    assert verdicts == {jexp.NOT_CHECKED, jexp.NOT_RUN}  # no EW in a smoke run: not run
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
    assert jexp.read_cells(path, "s") == {("d", "EW", 0): {"acc": [0.5]}}
    assert path.read_text() == good + "\n"  # the cut line is gone: that cell is redone
    path.write_text(good + "\n{oops\n" + good + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2"):
        jexp.read_cells(path, "s")


def test_stamp_ignores_location_fields():
    config = multitask_flat.Config(smoke=True)
    moved = dataclasses.replace(config, out_dir="elsewhere", resume="latest")
    assert jexp.config_stamp(config) == jexp.config_stamp(moved)


def test_options_that_refer_to_aggregators_not_run_fail_before_training(tmp_path):
    """The new user's command of issue 13: ``--aggregators mean pcgrad upgrad`` with the
    default ``--direct mgda`` trained every cell and then crashed in ``claims`` with
    KeyError 'F-MGDA'. Now it fails at once, naming the option, and leaves no run dir."""
    config = multitask_flat.Config(
        datasets=("multi_digits",),
        aggregators=("mean", "pcgrad", "upgrad"),
        seeds=(31, 32, 33),
        out_dir=str(tmp_path / "mf"),
    )
    with pytest.raises(ValueError, match="direct: expected a subset of aggregators"):
        multitask_flat.run(config)
    assert not (tmp_path / "mf").exists()


def test_claims_whose_arms_did_not_run_are_reported_not_run():
    """Claims computed from the arms that ran: without ``mean`` (EW) the Rep-MTL claim and
    without single-task networks the Delta_m claim are "not run"; no KeyError."""
    config = multitask_flat.Config(aggregators=("pcgrad",), direct=(), single_task=False)
    seeds = [0.5, 0.6]
    row = {"acc": [[0.5], [0.6]], "avg_acc": seeds, "conflict": seeds, "sharpness": seeds}
    methods = ["PCGrad", "F-PCGrad", "Rep-MTL (EW, 0.9/0.9)", "Rep-MTL (EW, 0.1/0.1)"]
    results = {"datasets": {"shapes": {"methods": {m: dict(row) for m in methods}}}}
    rows = jexp.check_claims(
        multitask_flat.claims(results, config), multitask_flat.claim_table(results)
    )
    verdicts = {r["claim"]: r["verdict"] for r in rows}
    assert verdicts["[shapes] F-PCGrad beats PCGrad on average accuracy (points)"] == (
        "does not reproduce (0/2 seeds)"
    )
    rep = [v for c, v in verdicts.items() if "Rep-MTL" in c]
    assert rep and all(v.startswith("not run") and "no arm shapes / EW" in v for v in rep)
    stl = [v for c, v in verdicts.items() if "single-task" in c]
    assert stl == ["not run (no arm shapes / STL)"]
    assert "not run" in jexp.claims_markdown(rows)
