"""The experiment harness of jaxmtl.experiment: arms x seeds cells, aggregation, claims,
figures."""

import dataclasses
import json

import numpy as np
import pytest

from jaxmtl import experiment as jexp


@dataclasses.dataclass(frozen=True)
class Config:
    smoke: bool = True
    steps: int = 3
    out_dir: str = "unused"
    resume: str | None = None


def test_cells_are_computed_once_and_read_back_on_resume(tmp_path):
    calls = []

    def compute(arm, seed):
        calls.append((arm, seed))
        return {"acc": 0.5 + 0.1 * seed, "arm": list(arm) if isinstance(arm, tuple) else arm}

    arms = [("digits", "EW"), ("digits", "PCGrad")]
    run = jexp.RunDir(tmp_path, Config())
    cells = jexp.run_cells(run, arms, [0, 1], compute, progress=False)
    assert calls == [(a, s) for a in arms for s in (0, 1)]
    assert list(cells) == arms and list(cells[arms[0]]) == [0, 1]
    run.close()
    # A crash cut the last cell: a resumed run redoes that one only.
    path = run.path / jexp.CELLS_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    calls.clear()
    resumed = jexp.RunDir(tmp_path, Config(), resume="latest")
    again = jexp.run_cells(resumed, arms, [0, 1], compute, progress=False)
    assert calls == [(arms[1], 1)] and again == cells
    cell_lines = [r for r in resumed.read_metrics() if "cell_seconds" in r]
    assert [(*r["arm"], r["seed"]) for r in cell_lines][-1] == (*arms[1], 1)


def test_cells_of_another_config_are_not_reused(tmp_path):
    run = jexp.RunDir(tmp_path, Config())
    jexp.run_cells(run, ["a"], [0], lambda a, s: {"x": 1}, stamp="one", progress=False)
    out = jexp.run_cells(run, ["a"], [0], lambda a, s: {"x": 2}, stamp="two", progress=False)
    assert out == {"a": {0: {"x": 2}}}


def test_run_cells_rejects_duplicates_and_non_dicts(tmp_path):
    run = jexp.RunDir(tmp_path, Config())
    with pytest.raises(ValueError, match="distinct"):
        jexp.run_cells(run, ["a", "a"], [0], lambda a, s: {}, progress=False)
    with pytest.raises(TypeError, match="must return a dict"):
        jexp.run_cells(run, ["a"], [0], lambda a, s: 1.0, progress=False)


def test_aggregate_mean_std_and_count():
    table = jexp.seed_table({"EW": {0: {"acc": 0.5, "c": None}, 1: {"acc": 0.7, "c": 0.2}}})
    stats = jexp.aggregate(table)["EW"]
    assert stats["acc"].n == 2 and stats["acc"].mean == pytest.approx(0.6)
    assert stats["acc"].std == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert stats["c"] == jexp.Stat(0.2, 0.0, 1)
    assert stats["acc"].format(scale=100) == "60.0 ± 14.1"


TABLE = {
    "A": {"acc": [0.80, 0.82, 0.90], "time": [1.0, 1.0, 1.0]},
    "B": {"acc": [0.75, 0.83, 0.85], "time": [6.0, 5.5, 7.0]},
}


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        (jexp.Claim("P", "A beats B", "acc", "A", "B"), "same direction on average"),
        (jexp.Claim("P", "B beats A", "acc", "B", "A"), "does not reproduce (1/3 seeds)"),
        (
            jexp.Claim("P", "A within 2 pts", "acc", "A", "B", threshold=-2, scale=100),
            "reproduces (3/3 seeds)",
        ),
        (
            jexp.Claim("P", "A 5x faster", "time", "B", "A", ratio=True, threshold=5),
            "reproduces (3/3 seeds)",
        ),
        (
            jexp.Claim("P", "A's time < 2", "time", "A", direction="lower", threshold=2),
            "reproduces (3/3 seeds)",
        ),
        (jexp.Claim("P", "C beats A", "acc", "C", "A"), "not run (no arm C)"),
        (jexp.Claim("P", "A has loss", "loss", "A", "B"), "not run (no metric loss for A"),
    ],
)
def test_claim_verdicts(claim, expected):
    row = claim.check(TABLE)
    assert row["verdict"].startswith(expected), row
    assert set(row) == {"paper", "claim", "measured", "verdict"}


def test_claim_measured_and_smoke():
    row = jexp.Claim("P", "A beats B", "acc", "A", "B", scale=100).check(TABLE)
    assert row["measured"] == "+3.0 ± 3.5"  # differences 5, -1, 5 points
    smoke = jexp.check_claims([jexp.Claim("P", "s", "acc", "A", "B")], TABLE, smoke=True)
    assert smoke[0]["verdict"] == jexp.NOT_CHECKED
    assert "| verdict |" in jexp.claims_markdown([row])
    assert "| verdict |" not in jexp.claims_markdown([row], smoke=True)
    json.dumps(row)  # rows go into results.json


def test_claim_checks_its_arguments():
    with pytest.raises(ValueError, match="direction"):
        jexp.Claim("P", "s", "acc", "A", "B", direction="up")
    with pytest.raises(ValueError, match="baseline"):
        jexp.Claim("P", "s", "acc", "A", ratio=True)
    with pytest.raises(ValueError, match="seeds"):
        jexp.Claim("P", "s", "acc", "A", "B").check({"A": {"acc": [1, 2]}, "B": {"acc": [1]}})


def test_figures_are_titled_labelled_and_heat_maps_share_one_scale(tmp_path):
    fig, axes = jexp.figure(2, 2)
    jexp.plot_curves(
        axes[0, 0],
        [0, 0.5, 1],
        {"linear": [[1, 2, 3], [1, 2.5, 3]]},
        xlabel="alpha",
        ylabel="accuracy (%)",
        title="(a) curves",
    )
    jexp.plot_bars(
        axes[0, 1],
        ["CE", "MAE"],
        [[0.5, 0.6], [0.7, 0.8]],
        scale=100,
        xlabel="accuracy (%)",
        ylabel="loss",
        title="(b) bars",
        horizontal=True,
    )
    jexp.plot_bars(
        axes[1, 0],
        ["top-1", "top-5"],
        {"CE": [[1, 2], [3, 4]], "Z": [[2], [5]]},
        xlabel="k",
        ylabel="accuracy",
        title="(c) grouped",
        points=True,
    )
    image = jexp.plot_heatmaps(
        [axes[1, 1]],
        {"(d) cosines": [[1.0, -0.5], [-0.5, 1.0]]},
        xlabel="task",
        ylabel="task",
        colorbar_label="cosine",
        cmap="RdBu_r",
    )
    assert image.get_clim() == (-1.0, 1.0)
    jexp.finish_figure(fig, "Harness figure", smoke=True)
    assert jexp.SMOKE_NOTE in fig.get_suptitle()
    for ax in axes.flat:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    run = jexp.RunDir(tmp_path, Config())
    assert run.savefig(fig, "harness").stat().st_size > 0
    with pytest.raises(ValueError, match="title and axis labels"):
        fig, axes = jexp.figure()
        jexp.plot_bars(axes[0, 0], ["a"], [[1.0]], xlabel="", ylabel="y", title="t")


def test_heat_maps_share_the_scale_of_all_matrices():
    _, axes = jexp.figure(1, 2)
    jexp.plot_heatmaps(
        axes[0],
        {"one": [[0.0, 1.0]], "two": [[2.0, 4.0]]},
        xlabel="x",
        ylabel="y",
        colorbar_label="v",
    )
    assert {im.get_clim() for ax in axes[0] for im in ax.get_images()} == {(0.0, 4.0)}


@pytest.mark.parametrize("name", ["loss_zoo", "multitask_flat", "zloss_large_output"])
def test_usage_line_names_the_module_and_every_option_is_documented(name, capsys):
    import importlib

    module = importlib.import_module(f"experiments.{name}")
    assert jexp.undocumented_fields(module.Config) == []
    with pytest.raises(SystemExit):
        jexp.cli(module.Config, module.run, args=["--help"])
    assert f"usage: python -m experiments.{name} " in capsys.readouterr().out


def test_bars_of_a_metric_no_arm_has_draw_nothing_without_warnings():
    _, axes = jexp.figure()
    for points in (False, True):  # e.g. Delta_p without single-task networks: all NaN
        jexp.plot_bars(
            axes[0, 0],
            ["a", "b"],
            [[np.nan], [np.nan]],
            points=points,
            xlabel="method",
            ylabel="Delta_p",
            title="no baseline",
        )
