"""Smoke test of experiments.loss_zoo: runs end to end in seconds, checks only robust facts."""

import dataclasses
import json
import math

import pytest

from experiments import loss_zoo
from jaxmtl import experiment as jexp


def _one(root, name):
    found = sorted(root.rglob(name))
    assert found, f"{name} not written under {root}"
    return found[0]


# Numbers of the smoke run below (seeds 0 and 1) computed by the code BEFORE it moved onto
# the jaxmtl.experiment harness (commit 9f13c94's experiments/loss_zoo.py): the move must not
# change any result.
BEFORE_MOVE = {
    ("noise", "CE", "0.4"): [0.8104089219330854, 0.7992565055762082],
    ("noise", "MAE", "0"): [0.7620817843866171, 0.8066914498141264],
    ("imbalanced", "AnyLoss-F1", "f1"): [0.7222222222222222, 0.6666666666666666],
    ("embeddings", "multi-similarity", "recall@1 unseen"): [0.8659793734550476, 0.8969072103500366],
    ("embeddings", "ProtoNet + Proto-Triplet", "uniformity"): [
        -0.9696321487426758,
        -0.9141578674316406,
    ],
}


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
    for (part, name, key), before in BEFORE_MOVE.items():
        assert results[part][name][key] == pytest.approx(before, rel=1e-6, abs=1e-7), key
    assert all(c["verdict"] == jexp.NOT_CHECKED for c in results["claims"])
    summary = _one(tmp_path, "summary.md").read_text()
    assert "| loss |" in summary
    assert "Smoke run: numbers are not results" in summary and "| verdict |" not in summary
    assert _one(tmp_path, "loss_zoo.png").parent.parent.name == "smoke"

    # Resuming the finished run reuses every part (no training: the same part times).
    again = loss_zoo.run(dataclasses.replace(config, resume="latest"))
    assert again["part_seconds"] == results["part_seconds"]
    assert again["noise"] == json.loads(json.dumps(results["noise"]))


def _fake_results(config):
    seeds = [0.5, 0.6]
    noise = {name: {f"{r:g}": seeds for r in config.noise_rates} for name in ("CE", "GCE", "MAE")}
    metrics = {"f1": seeds, "precision": seeds, "recall": seeds, "balanced_accuracy": seeds}
    imbalanced = {name: metrics for name in loss_zoo.binary_losses(config)}
    imbalanced.update(train_positive_fraction=0.03, test_positive_fraction=0.1)
    names = ["raw pixels (no training)", "multi-similarity", "ProtoNet + Proto-Triplet"]
    names += [loss_zoo.nt_xent_name(t) for t in config.temperatures] + ["ProtoNet (CE)"]
    scores = ("recall@1 unseen", "recall@1 seen", "uniformity", "tolerance", "ICNN unseen")
    embeddings = {name: {k: seeds for k in scores} for name in names}
    return {"noise": noise, "imbalanced": imbalanced, "embeddings": embeddings}


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_figure_panels_are_distinct_labelled_and_ticks_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = loss_zoo.Config(smoke=True)
    fig = loss_zoo.figure(_fake_results(config), config)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        titles = [ax.get_title() for ax in fig.axes if ax.has_data()]
        assert all(titles), titles
        letters = [t.split()[0] for t in titles]  # "(a)", "(b)", ...: one panel each
        assert len(letters) == len(set(letters)), titles
        for ax in fig.axes:
            if not ax.has_data():
                continue
            assert ax.get_xlabel() or ax.get_xticklabels(), ax.get_title()
            assert ax.get_ylabel(), ax.get_title()
            boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
            for i, box in enumerate(boxes):
                for other in boxes[i + 1 :]:
                    assert not _overlap(box, other), (ax.get_title(), box, other)
        # No text of one panel runs into another panel's tick labels.
        labels = [
            (ax, t.get_window_extent(renderer)) for ax in fig.axes for t in ax.get_xticklabels()
        ]
        for ax in fig.axes:
            area = ax.get_window_extent(renderer)
            assert not any(o is not ax and _overlap(area, box) for o, box in labels)
        assert fig.get_suptitle()
    finally:
        plt.close(fig)


def test_claims_on_fake_results_use_the_shared_verdicts():
    config = loss_zoo.Config()
    results = _fake_results(config)
    results["noise"]["GCE"]["0.4"] = [0.7, 0.7]  # GCE beats CE (0.5, 0.6) in both seeds
    rows = jexp.check_claims(loss_zoo.claims(results, config), loss_zoo.claim_table(results))
    by_claim = {row["claim"]: row["verdict"] for row in rows}
    assert by_claim["GCE (tau > 1) beats CE at 0.4 symmetric label noise"] == (
        "reproduces (2/2 seeds)"
    )
    assert by_claim["MAE (tau > 1) beats CE at 0.4 symmetric label noise"] == (
        "does not reproduce (0/2 seeds)"
    )
