"""Smoke test of experiments.tangent_task_arithmetic: end to end in seconds, robust facts only."""

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import tangent_task_arithmetic as tta
from jaxmtl import data as jdata
from jaxmtl import experiment as jexp
from jaxmtl import train as jtrain


def _one(root, name):
    found = sorted(root.rglob(name))
    assert found, f"{name} not written under {root}"
    return found[0]


def _in_unit(values):
    return all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)


def test_common_format():
    signals = np.linspace(0.0, 1.0, 2 * 40, dtype=np.float32).reshape(2, 40)
    images = tta.to_common_format(signals, 16)
    assert images.shape == (2, 16, 16) and images.dtype == np.float32
    # the raster keeps the signal: first and last samples survive the resampling
    assert images[0, 0, 0] == signals[0, 0] and images[1, -1, -1] == signals[1, -1]
    small = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)
    gray = tta.to_common_format(small, 16)
    assert gray.shape == (3, 16, 16) and 0.0 <= gray.min() and gray.max() <= 1.0


def test_prepare_tasks_splits():
    config = tta.Config(
        smoke=True,
        tasks=("digits", "shapes:shape"),
        pretrain_data="tasks",
        pretrain_tasks=("shapes:scale",),
    ).effective()
    (digits, shape), (scale,) = tta.prepare_tasks(config)
    # a source used only for evaluation fine-tunes on its whole training split ...
    assert len(digits.pretrain["y"]) == 0 and len(digits.train["y"]) > 0
    # ... one used for pre-training is cut: the two shares never hold the same image
    assert len(scale.pretrain["y"]) > 0 and len(shape.pretrain["y"]) == len(scale.pretrain["y"])
    seen = {row.tobytes() for row in scale.pretrain["x"]}
    assert not any(row.tobytes() in seen for row in shape.train["x"])
    for task in (digits, shape):
        assert task.validation["x"].shape == (config.eval_examples, 16, 16)
        assert task.test["x"].shape == (config.test_examples, 16, 16)
        assert task.train["y"].max() < task.num_classes


def test_glyph_pretraining_keeps_every_training_split():
    config = tta.Config(smoke=True, tasks=("digits", "photos")).effective()
    tasks, (glyphs,) = tta.prepare_tasks(config)
    assert glyphs.name == "glyphs" and glyphs.num_classes == len(jdata.GLYPH_CLASSES)
    assert glyphs.pretrain["x"].shape[1:] == (16, 16) and len(glyphs.pretrain["y"]) > 0
    for task in tasks:  # no evaluated task gives up training data (or labels) to theta_0
        assert len(task.pretrain["y"]) == 0
    assert {tuple(t.train["x"].shape[1:]) for t in tasks} == {(16, 16)}


def test_the_default_design_and_its_options():
    config = tta.Config()
    assert config.tasks == ("digits", "textures", "mnist1d", "shapes:shape", "photos")
    assert config.pretrain_data == "glyphs" and config.norm == "layernorm"
    assert config.activation == "gelu" and config.standardize and config.hidden == (512, 512)
    assert len(config.seeds) == 5 and config.test_examples == 512
    x = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32) * 5 + 2
    z = np.asarray(tta.standardize(x))
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="pretrain_data"):
        tta.Config(pretrain_data="imagenet").effective()
    with pytest.raises(ValueError, match="activation"):
        tta.Config(activation="tanh").effective()


# Numbers of the smoke run below computed by the code BEFORE it moved onto the
# jaxmtl.experiment harness (commit a293782's experiments/tangent_task_arithmetic.py): the
# move must not change any result. (part, method, metric) -> per-seed values.
BEFORE_MOVE = {
    ("addition", "nonlinear", "normalized"): [0.9333333373069763],
    ("addition", "linear", "absolute"): [0.3854166567325592],
    ("negation", "linear", "target"): [0.1875],
    ("disentanglement", "posthoc", "mean"): [0.020833333333333332],
}


def test_tangent_task_arithmetic_smoke(tmp_path, monkeypatch):
    built = []
    make_steps = tta.make_steps
    monkeypatch.setattr(tta, "make_steps", lambda *a: built.append(make_steps(*a)) or built[-1])
    config = tta.Config(smoke=True, out_dir=str(tmp_path / "tta"))
    results = tta.run(config)

    for name in ("config.json", "metrics.jsonl", "results.json", "summary.md"):
        assert _one(tmp_path, name).stat().st_size > 0
    for name in ("alpha_curves.png", "disentanglement.png", "kernel.png"):
        assert _one(tmp_path, name).stat().st_size > 0
    stored = json.loads(_one(tmp_path, "results.json").read_text())
    expected = {"tasks", "single", "addition", "negation", "disentanglement", "atlas", "claims"}
    assert set(stored) >= expected

    effective = config.effective()
    num_seeds, num_tasks = len(effective.seeds), len(effective.tasks)
    assert results["tasks"] == list(effective.tasks)
    for method in ("pretrained", "nonlinear", "linear", "posthoc"):
        row = results["single"][method]
        assert len(row["per_task"]) == num_seeds and _in_unit(row["per_task"]), method
        assert set(row["tasks"]) == set(effective.tasks)
    for method in ("nonlinear", "linear", "posthoc"):
        add = results["addition"][method]
        assert _in_unit(add["absolute"] + add["absolute_alpha_one"]), method
        assert all(math.isfinite(v) and v >= 0.0 for v in add["normalized"]), method
        lo, hi, _ = effective.addition_alphas
        assert all(lo <= a <= hi for a in add["alpha"])
        neg = results["negation"][method]
        assert _in_unit(neg["target"] + neg["control"] + neg["pretrained_control"]), method
        assert all(0 <= k <= num_tasks for k in neg["control_kept"])
        dis = results["disentanglement"][method]
        # xi sums two disagreement rates: in [0, 2]
        assert all(math.isfinite(v) and 0.0 <= v <= 2.0 for v in dis["mean"]), method
        size = effective.disentangle_alphas[2]
        for grid in dis["mean_grids"].values():
            assert np.asarray(grid).shape == (size, size)
    # alpha = 0 is theta_0 for every method: the curves start at the pre-trained accuracy
    seed0 = results["per_seed"][0]
    pretrained = np.mean(seed0["single"]["pretrained"]["validation"])
    for method in ("nonlinear", "linear", "posthoc"):
        assert math.isclose(
            seed0["addition"][method]["curve_absolute"][0], pretrained, abs_tol=1e-6
        )
    for method in ("nonlinear", "linear"):
        assert _in_unit(results["atlas"][method]["absolute"]), method
    for method in ("nonlinear", "linear", "posthoc"):
        dis = results["disentanglement"][method]
        assert all(0.0 <= v <= 2.0 for v in dis["mean_box"]), method
        assert all(0.0 <= v <= 1.0 for v in dis["deployed_flips"]), method
        loc = results["locality"][method]
        assert _in_unit(loc["own"] + loc["cross"]) and all(v >= 0 for v in loc["ratio"])
    kernel = results["kernel"]
    assert all(-1.0 <= v <= 1.0 for v in kernel["gradient_cosine_within"])
    mass = np.asarray(kernel["eigen_mass"][0])
    assert mass.shape == (effective.kernel_eigenvectors, num_tasks)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, atol=1e-4)
    for key in ("localization", "localization_normalized"):
        assert all(1.0 / num_tasks - 1e-6 <= v <= 1.0 + 1e-6 for v in kernel[key]), key
    assert results["commit"] and "tangent_task_arithmetic" in results["command"]
    # one jitted step per fine-tuning mode, reused by every task's cell
    (steps,) = built
    for mode in ("nonlinear", "linear"):
        assert len(jtrain._STEP_CACHE[steps.finetune[mode]]) == 1, mode
    assert all(math.isfinite(v) for v in results["nonlinear_advantage"])
    # the claims as jaxmtl.experiment.Claim rows: not judged in a smoke run
    assert results["claims"] and all(c["claim"] and c["measured"] for c in results["claims"])
    assert all(c["verdict"] == jexp.NOT_CHECKED for c in results["claims"])
    for (part, method, key), before in BEFORE_MOVE.items():
        assert results[part][method][key] == pytest.approx(before, rel=1e-6), (part, method)
    assert results["kernel"]["localization"] == pytest.approx([0.8797615766525269], rel=1e-5)
    summary = _one(tmp_path, "summary.md").read_text()
    assert "| task |" in summary and "| method |" in summary and "## Paper claims" in summary

    # Resuming the finished run finds every cell stored: nothing is fine-tuned again.
    lines = _one(tmp_path, "metrics.jsonl").read_text().splitlines()
    again = tta.run(dataclasses.replace(config, resume="latest"))
    assert _one(tmp_path, "metrics.jsonl").read_text().splitlines() == lines
    assert again["per_seed"] == json.loads(json.dumps(results["per_seed"]))
    assert again["addition"] == json.loads(json.dumps(results["addition"]))


# --------------------------------------------------------------------------- --data tfds


def test_tfds_tasks_with_mock_data(tmp_path):
    config = tta.Config(
        smoke=True,
        data="tfds",
        tfds_names=("mnist", "eurosat/rgb"),
        rgb=True,
        pretrain_data="tasks",
    ).effective()
    assert config.tasks == ("mnist", "eurosat/rgb") and config.tfds_limit == 500
    assert len(tta.Config().tfds_names) == 7 and "gtsrb" not in tta.Config().tfds_names
    # the offline default's cache key is untouched by the tfds fields; the tfds one differs
    assert tta._cache_key(config) != tta._cache_key(dataclasses.replace(config, data="offline"))
    with tfds.testing.mock_data(num_examples=60):
        tasks, pretrain_tasks = tta.prepare_tasks(
            dataclasses.replace(config, tfds_dir=str(tmp_path), eval_examples=4, test_examples=4)
        )
    assert [t.name for t in tasks] == [t.name for t in pretrain_tasks] == list(config.tasks)
    for task in tasks:
        # 10% of train is validation; the pre-training share is 30% of the rest, cut from
        # the training split only (the test split is never pre-trained on)
        assert len(task.pretrain["y"]) == round(0.3 * 54) and len(task.train["y"]) == 54 - 16
        assert task.test["x"].shape == (4, 16, 16, 3) and task.num_classes == 10
    # gray MNIST is copied to three channels; the backbone takes the RGB inputs
    assert np.array_equal(tasks[0].test["x"][..., 0], tasks[0].test["x"][..., 2])
    features = tta.make_backbone(config)(tta.init_backbone(config, 0), tasks[1].test["x"])
    assert features.shape == (4, config.features)


def test_tfds_smoke_with_mock_data(tmp_path):
    names = ("mnist", "dtd")
    config = tta.Config(
        smoke=True,
        data="tfds",
        tfds_names=names,
        tfds_dir=str(tmp_path / "tfds"),
        out_dir=str(tmp_path / "tta"),
    )
    with tfds.testing.mock_data(num_examples=400):
        results = tta.run(config)
    assert results["tasks"] == list(names)
    for method in ("pretrained", "nonlinear", "linear", "posthoc"):
        assert set(results["single"][method]["tasks"]) == set(names)
        assert _in_unit(results["single"][method]["per_task"]), method
    for method in ("nonlinear", "linear", "posthoc"):
        assert _in_unit(results["addition"][method]["absolute"]), method
        assert _in_unit(results["negation"][method]["target"]), method
        assert all(math.isfinite(v) for v in results["disentanglement"][method]["mean"])
    for method in ("nonlinear", "linear"):
        assert _in_unit(results["atlas"][method]["absolute"]), method
    summary = _one(tmp_path, "summary.md").read_text()
    assert "2 tasks (mnist, dtd)" in summary and "GTSRB is not in the tfds catalog" in summary


def test_tfds_missing_data_fails_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the data are missing")

    monkeypatch.setattr(tta, "pretrain", no_training)
    config = tta.Config(
        smoke=True,
        data="tfds",
        tfds_names=("mnist", "dtd"),
        tfds_dir=str(tmp_path / "empty"),
        out_dir=str(tmp_path / "tta"),
    )
    with pytest.raises(jdata.DataNotPreparedError, match="2 tfds data sets") as error:
        tta.run(config)
    for name in ("mnist", "dtd"):  # every missing set, with how to prepare it
        assert f"tfds build {name} --file_format=array_record" in str(error.value)
    assert not (tmp_path / "tta").exists()  # no run directory either
    with pytest.raises(ValueError, match="data: expected 'offline' or 'tfds'"):
        tta.Config(data="imagenet").effective()


def test_ablation_table():
    row = {
        "theta_0": 45.0,
        "ft": (60.0, 58.0),
        "addition": (85.0, 77.0),
        "negation": (20.0, 27.0),
        "xi": (0.39, 0.48),
        "locality": (0.7, 0.6),
        "cosine_ratio": 0.5,
        "localization": 0.8,
    }
    assert len(tta.ABLATION) == 8 and tta.ABLATION[0] == (
        "glyphs",
        "layernorm+gelu",
        "standardized",
    )
    text = tta.ablation_markdown([(tta.ABLATION[0], row)], seed=0)
    assert "85.0 vs 77.0 ✓" in text and "0.70 vs 0.60 |" in text and "3/4" in text
    sub = tta._ablation_config(tta.Config(out_dir="runs/x"), "tasks", "relu", "raw")
    assert (sub.pretrain_data, sub.activation, sub.norm, sub.standardize) == (
        "tasks",
        "relu",
        None,
        False,
    )
    assert sub.seeds == (0,) and not sub.ablation and sub.out_dir.endswith("tasks-relu-raw")
