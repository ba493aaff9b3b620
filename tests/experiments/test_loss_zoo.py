"""Smoke test of experiments.loss_zoo: runs end to end in seconds, checks only robust facts."""

import json
import math

from experiments import loss_zoo


def _one(root, name):
    found = sorted(root.rglob(name))
    assert found, f"{name} not written under {root}"
    return found[0]


def test_loss_zoo_smoke(tmp_path):
    config = loss_zoo.Config(smoke=True, seeds=(0, 1), out_dir=str(tmp_path / "loss_zoo"))
    results = loss_zoo.run(config)

    for name in ("config.json", "metrics.jsonl", "results.json", "summary.md", "loss_zoo.png"):
        assert _one(tmp_path, name).stat().st_size > 0
    stored = json.loads(_one(tmp_path, "results.json").read_text())
    assert set(stored) >= {"noise", "imbalanced", "embeddings", "claims"}

    # (a) clean labels: every loss is finite and well above chance (0.1); CE learns well.
    for name, per_rate in results["noise"].items():
        clean = per_rate["0"]
        assert len(clean) == 2 and all(math.isfinite(a) and 0.3 < a <= 1.0 for a in clean), name
    assert min(results["noise"]["CE"]["0"]) > 0.5
    # (b) metrics are probabilities; (c) recall@1 is finite and above chance.
    for name, metrics in results["imbalanced"].items():
        if isinstance(metrics, dict):
            assert all(0.0 <= v <= 1.0 for v in metrics["f1"]), name
    for name, scores in results["embeddings"].items():
        assert all(0.25 < r <= 1.0 for r in scores["recall@1 seen"]), name
        assert all(math.isfinite(u) for u in scores["uniformity"]), name
    assert "| loss |" in _one(tmp_path, "summary.md").read_text()
