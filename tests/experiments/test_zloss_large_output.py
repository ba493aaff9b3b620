"""Smoke test of experiments.zloss_large_output: runs end to end, checks robust facts only."""

import json
import math

import pytest

from experiments import zloss_large_output as zl
from jaxmtl import experiment as jexp


def _check_table(results, config, seeds):
    assert set(results["table"]) == set(zl.METHODS)
    for method, metrics in results["table"].items():
        for split in ("val", "test"):
            for k in config.top_k:
                values = metrics[f"{split} top-{k}"]
                assert len(values) == seeds and all(0.0 <= v <= 1.0 for v in values), method
            # top-k accuracy is non-decreasing in k
            low, high = metrics[f"{split} top-1"], metrics[f"{split} top-20"]
            assert all(a <= b for a, b in zip(low, high, strict=True)), method
            assert len(metrics[f"last {split} top-1"]) == seeds, method
        assert all(1 <= e <= config.effective().epochs for e in metrics["selected_epoch"])
        assert all(math.isfinite(s) and s > 0 for s in metrics["epoch_seconds"]), method


# Numbers of the smoke run below (seeds 0 and 1) computed by the code BEFORE it moved onto
# the jaxmtl.experiment harness (commit 9f13c94's experiments/zloss_large_output.py): the move
# must not change any result. (per method: test top-1, validation top-5, per seed)
BEFORE_MOVE = {
    "softmax CE": ([0.37109375, 0.37109375], [0.494140625, 0.349609375]),
    "Z-loss dense": ([0.37109375, 0.37109375], [0.513671875, 0.50390625]),
    "Z-loss factored": ([0.376953125, 0.37109375], [0.53515625, 0.513671875]),
}


def test_zloss_large_output_smoke(tmp_path):
    config = zl.Config(smoke=True, seeds=(0, 1), out_dir=str(tmp_path / "zl"))
    results = zl.run(config)

    (run_dir,) = (tmp_path / "zl" / "smoke").iterdir()  # one timestamped run directory
    for name in ("config.json", "metrics.jsonl", "results.json", "summary.md", f"{zl.NAME}.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "pilot.json").exists()
    stored = json.loads((run_dir / "results.json").read_text())
    assert set(stored) >= {"data", "table", "claims", "seconds", "hyperparameters"}
    assert not stored["tuned"] and stored["pilot"] == []
    assert results["data"]["num_classes"] == config.effective().vocab_size + 1
    # train / validation / test are disjoint files (8:1:1 by sorted index)
    files = results["data"]["files_per_split"]
    assert files == {"train": 32, "val": 4, "test": 4}
    assert results["hyperparameters"]["softmax CE"]["learning_rate"] == config.ce_learning_rate
    _check_table(results, config, 2)
    for method, (test_top1, val_top5) in BEFORE_MOVE.items():
        assert results["table"][method]["test top-1"] == test_top1, method
        assert results["table"][method]["val top-5"] == val_top5, method
    summary = (run_dir / "summary.md").read_text()
    assert "| method |" in summary and "validation" in summary and "test split" in summary
    assert "Smoke run: numbers are not results" in summary and "| verdict |" not in summary

    # Resuming the finished run reuses every cell (no retraining) and gives the same table.
    again = zl.run(zl.Config(smoke=True, seeds=(0, 1), out_dir=config.out_dir, resume="latest"))
    assert again["table"] == results["table"]


def test_zloss_large_output_tune_smoke(tmp_path):
    config = zl.Config(smoke=True, tune=True, seeds=(0,), out_dir=str(tmp_path / "zl"))
    results = zl.run(config)

    (run_dir,) = (tmp_path / "zl" / "smoke").iterdir()
    small = config.effective()
    rows = json.loads((run_dir / "pilot.json").read_text())
    assert rows == results["pilot"] and "| method |" in (run_dir / "pilot.md").read_text()
    by_method = {m: [r for r in rows if r["method"] == m] for m in zl.METHODS}
    lrs, abs_, olrs = small.tune_learning_rates, small.tune_z_ab, small.tune_output_learning_rates
    assert len(by_method["softmax CE"]) == len(lrs)
    assert len(by_method["Z-loss dense"]) == len(abs_) * len(lrs)
    assert len(by_method["Z-loss factored"]) == len(abs_) * len(olrs) + len(lrs) - 1
    assert {(r["a"], r["b"]) for r in by_method["Z-loss dense"]} == set(abs_)
    for method, method_rows in by_method.items():
        (best,) = [r for r in method_rows if r["chosen"]]
        # the winner has the best validation top-1 and is what the main run used
        assert best["val top-1"] == max(r["val top-1"] for r in method_rows if r["finite"])
        hp = results["hyperparameters"][method]
        assert hp == {k: best[k] for k in hp}, method
    assert results["tuned"] and results["pilot_seconds"] > 0
    _check_table(results, config, 1)
    summary = (run_dir / "summary.md").read_text()
    assert "## Pilot" in summary and "Chosen in this run by the pilot" in summary


def test_zloss_large_output_bad_method(tmp_path):
    with pytest.raises(ValueError, match="methods: expected names in"):
        zl.run(zl.Config(smoke=True, methods=("hinge",), out_dir=str(tmp_path / "zl")))


def test_claims_on_fake_tables():
    config = zl.Config()
    table = {
        "softmax CE": {f"test top-{k}": [0.30, 0.32] for k in config.top_k},
        "Z-loss factored": {f"test top-{k}": [0.29, 0.33] for k in config.top_k},
    }
    table["softmax CE"]["epoch_seconds"] = [7.0, 4.0]
    table["Z-loss factored"]["epoch_seconds"] = [1.0, 1.0]
    rows = jexp.check_claims(zl.claims(config), table)
    assert [r["verdict"] for r in rows] == ["reproduces (2/2 seeds)"] * 3 + [
        "same direction on average, not in every seed (1/2 seeds)"
    ]
    assert rows[-1]["measured"] == "5.5x ± 2.1x"
    no_ce = jexp.check_claims(zl.claims(config), {"Z-loss factored": table["Z-loss factored"]})
    assert all(r["verdict"] == "not run (no arm softmax CE)" for r in no_ce)
