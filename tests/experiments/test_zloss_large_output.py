"""Smoke test of experiments.zloss_large_output: runs end to end, checks robust facts only."""

import json
import math

import pytest

from experiments import zloss_large_output as zl


def test_zloss_large_output_smoke(tmp_path):
    config = zl.Config(smoke=True, seeds=(0, 1), out_dir=str(tmp_path / "zl"))
    results = zl.run(config)

    (run_dir,) = (tmp_path / "zl").iterdir()  # one timestamped run directory
    for name in ("config.json", "metrics.jsonl", "results.json", "summary.md", f"{zl.NAME}.png"):
        assert (run_dir / name).stat().st_size > 0, name
    stored = json.loads((run_dir / "results.json").read_text())
    assert set(stored) >= {"data", "table", "claims", "seconds"}
    assert set(results["table"]) == set(zl.METHODS)
    assert results["data"]["num_classes"] == config.effective().vocab_size + 1
    for method, metrics in results["table"].items():
        for k in config.top_k:
            values = metrics[f"top-{k}"]
            assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values), method
        # top-k accuracy is non-decreasing in k
        assert all(a <= b for a, b in zip(metrics["top-1"], metrics["top-20"], strict=True)), method
        assert all(math.isfinite(s) and s > 0 for s in metrics["epoch_seconds"]), method
    assert "| method |" in (run_dir / "summary.md").read_text()

    # Resuming the finished run reuses every cell (no retraining) and gives the same table.
    again = zl.run(zl.Config(smoke=True, seeds=(0, 1), out_dir=config.out_dir, resume="latest"))
    assert again["table"] == results["table"]


def test_zloss_large_output_bad_method(tmp_path):
    with pytest.raises(ValueError, match="methods: expected names in"):
        zl.run(zl.Config(smoke=True, methods=("hinge",), out_dir=str(tmp_path / "zl")))
