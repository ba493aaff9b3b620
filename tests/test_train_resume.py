"""Tests of jaxmtl.train.fit's resumption after faults: an unreadable latest checkpoint, a
metrics line cut by a crash."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmtl import train
from jaxmtl.checkpoint import Checkpointer

N, D, BATCH = 16, 3, 4


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)}


def _loss(params, batch, rng):
    del rng
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}


OPT = optax.sgd(0.05)
STEP = train.make_train_step(_loss, OPT)
KWARGS = dict(steps=6, batch_size=BATCH, checkpoint_every=2, log_every=1, progress=False)


def _state():
    return train.init_state({"w": jnp.zeros(D, jnp.float32)}, OPT, seed=0)


def _corrupt(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00not a checkpoint")


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    straight, history = train.fit(_state(), STEP, _data(), run_dir=tmp_path / "a", **KWARGS)
    run = tmp_path / "b"
    train.fit(_state(), STEP, _data(), run_dir=run, **{**KWARGS, "steps": 4})
    _corrupt(run / "checkpoints" / "4")
    resumed, history_b = train.fit(_state(), STEP, _data(), run_dir=run, **KWARGS)
    err = capsys.readouterr().err
    assert f"cannot read the checkpoint at {run / 'checkpoints' / '4'}" in err
    assert "resuming from step 2" in err
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(straight.params["w"]))
    assert history_b == history
    # The unreadable one is kept, out of the way of the new step 4.
    (kept,) = (run / "checkpoints-unreadable").iterdir()
    assert kept.name.startswith("4-") and (kept / "state").is_dir()
    with Checkpointer(run / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4, 6]


def test_every_checkpoint_unreadable_starts_over(tmp_path, capsys):
    straight, _ = train.fit(_state(), STEP, _data(), run_dir=tmp_path / "a", **KWARGS)
    run = tmp_path / "b"
    train.fit(_state(), STEP, _data(), run_dir=run, **{**KWARGS, "steps": 2})
    _corrupt(run / "checkpoints" / "2")
    resumed, _ = train.fit(_state(), STEP, _data(), run_dir=run, **KWARGS)
    assert "starting from step 0" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(straight.params["w"]))


def test_a_metrics_line_cut_by_a_crash_is_dropped(tmp_path):
    _, history = train.fit(_state(), STEP, _data(), run_dir=tmp_path / "a", **KWARGS)
    run = tmp_path / "b"
    train.fit(_state(), STEP, _data(), run_dir=run, **{**KWARGS, "steps": 4})
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    _, history_b = train.fit(_state(), STEP, _data(), run_dir=run, **KWARGS)
    assert history_b == history
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        train.fit(_state(), STEP, _data(), run_dir=run, **KWARGS)


def test_fit_keeps_at_least_two_checkpoints(tmp_path):
    train.fit(_state(), STEP, _data(), run_dir=tmp_path, max_to_keep=1, **KWARGS)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 6]
    assert jax.tree.leaves(_state())  # the module's state helper is a pytree
