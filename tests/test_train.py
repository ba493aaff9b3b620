"""Tests of jaxmtl.train: the step, resumption bit for bit, non-finite stops, logs."""

import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmtl import train
from jaxmtl.checkpoint import Checkpointer
from jaxmtl.data import batch_at

N, D, BATCH = 32, 3, 4  # 8 batches per epoch


def adam(learning_rate):
    """optax.adam whose update traces under standard promotion: optax 0.2.8 computes
    ``decay ** count`` (Python float ** int32), which the tests' strict promotion rejects."""
    inner = optax.adam(learning_rate)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
    return {"x": x, "y": y, "i": np.arange(N, dtype=np.int32)}


def _params():
    return {"w": jnp.zeros(D, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def dropout_loss(params, batch, rng):
    """Squared error of a linear model with dropout on the inputs: uses the step's rng."""
    keep = jax.random.bernoulli(rng, 0.7, batch["x"].shape)
    x = jnp.where(keep, batch["x"] / 0.7, 0.0)
    residual = x @ params["w"] + params["b"] - batch["y"]
    return jnp.mean(residual**2), {"mae": jnp.mean(jnp.abs(residual))}


def _identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- the step


def test_train_step_matches_a_hand_computed_sgd_step():
    opt = optax.sgd(0.1)
    state = train.init_state(_params(), opt, seed=0)
    batch = batch_at(_data(), 0, batch_size=BATCH, seed=0)
    loss_fn = lambda p, b, rng: (
        jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2),
        {"n": jnp.asarray(b["x"].shape[0])},
    )
    new, metrics = jax.jit(train.make_train_step(loss_fn, opt))(state, batch)

    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    residual = -y  # the parameters are zero
    grad_w, grad_b = 2 * x.T @ residual / BATCH, 2 * residual.mean()
    np.testing.assert_allclose(new.params["w"], -0.1 * grad_w, rtol=1e-5)
    np.testing.assert_allclose(new.params["b"], -0.1 * grad_b, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], np.mean(y**2), rtol=1e-6)
    assert int(metrics["n"]) == BATCH and int(new.step) == 1 and new.step.dtype == jnp.int32
    _identical(new.rng, state.rng)  # the base key never changes


def test_fit_reuses_the_compiled_step_across_calls():
    traces = []
    opt = optax.sgd(0.1)

    def counted_loss(params, batch, rng):
        traces.append(1)  # a Python side effect: runs once per trace
        return dropout_loss(params, batch, rng)

    step = train.make_train_step(counted_loss, opt)
    first, _ = train.fit(
        train.init_state(_params(), opt, seed=0),
        step,
        _data(),
        steps=3,
        batch_size=BATCH,
        progress=False,
    )
    count = len(traces)
    assert count >= 1
    # new parameters, a new seed, other data of the same shapes: no new trace
    state = train.init_state(jax.tree.map(lambda x: x + 1.0, _params()), opt, seed=1)
    second, _ = train.fit(state, step, _data(1), steps=5, batch_size=BATCH, seed=2, progress=False)
    assert len(traces) == count and int(second.step) == 5
    assert not np.allclose(first.params["w"], second.params["w"])
    # other shapes trace again
    train.fit(state, step, _data(), steps=1, batch_size=2 * BATCH, progress=False)
    assert len(traces) > count


def test_step_rng_is_fold_in_of_the_step():
    opt = optax.sgd(0.0)
    draw = lambda p, b, rng: (jnp.sum(p["w"]) * 0.0, {"u": jax.random.uniform(rng)})
    step = jax.jit(train.make_train_step(draw, opt))
    state = train.init_state(_params(), opt, seed=7)
    seen = []
    for _ in range(3):
        state, metrics = step(state, {})
        seen.append(float(metrics["u"]))
    expected = [
        float(jax.random.uniform(jax.random.fold_in(jax.random.key(7), k))) for k in range(3)
    ]
    assert seen == expected


def test_step_rejects_bad_loss_functions():
    opt = optax.sgd(0.1)
    state = train.init_state(_params(), opt, seed=0)
    scalar_only = train.make_train_step(lambda p, b, r: jnp.sum(p["w"]), opt)
    with pytest.raises(TypeError, match=r"\(loss, metrics dict\)"):
        scalar_only(state, {})
    vector_loss = train.make_train_step(lambda p, b, r: (p["w"], {}), opt)
    with pytest.raises(ValueError, match=r"float scalar.*\(3,\)"):
        vector_loss(state, {})
    with pytest.raises(TypeError, match="optimizer"):
        train.make_train_step(dropout_loss, object())
    with pytest.raises(ValueError, match="seed"):
        train.init_state(_params(), opt, seed=-1)


# --------------------------------------------------------------------------- resumption


def lines_of(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_resumed_run_is_bit_for_bit_the_uninterrupted_run(tmp_path):
    data, opt = _data(), adam(0.05)
    step_fn = train.make_train_step(dropout_loss, opt)
    eval_fn = lambda p: {"w_norm": jnp.linalg.norm(p["w"])}
    kwargs = dict(
        steps=10, batch_size=BATCH, seed=3, eval_fn=eval_fn, eval_every=5,
        checkpoint_every=3, log_every=2, progress=False,
    )  # fmt: skip
    initial = train.init_state(_params(), opt, seed=1)
    straight, history = train.fit(initial, step_fn, data, run_dir=tmp_path / "a", **kwargs)

    # (1) A clean stop after 6 steps, then a restart asking for 10. The restart is handed a
    # different initial state: only the checkpoint can make it end where the first run did.
    other = train.init_state({"w": jnp.ones(D), "b": jnp.ones(())}, opt, seed=99)
    train.fit(initial, step_fn, data, run_dir=tmp_path / "b", **{**kwargs, "steps": 6})
    resumed, history_b = train.fit(other, step_fn, data, run_dir=tmp_path / "b", **kwargs)
    _identical(resumed, straight)
    assert [e["step"] for e in history] == [2, 3, 4, 5, 6, 8, 9, 10]
    # The same entries, plus the final evaluation of the 6-step run.
    assert history_b[4] == {**history[4], "w_norm": history_b[4]["w_norm"]}
    assert history_b[:4] + history_b[5:] == history[:4] + history[5:]

    # (2) A crash at step 5, after the checkpoint at 3 and the log line of step 4: the
    # resumed run redoes that line instead of duplicating it. (Checkpoints flush the metric
    # window, so windows line up: entries at steps 2, 3, 4, 6, 8, 9, 10.)
    class Crash(Exception):
        pass

    def crashing_eval(params):
        if crashing_eval.calls == 0:  # the eval at step 5
            raise Crash
        crashing_eval.calls += 1
        return eval_fn(params)

    crashing_eval.calls = 0
    with pytest.raises(Crash):
        train.fit(
            initial, step_fn, data, run_dir=tmp_path / "c", **{**kwargs, "eval_fn": crashing_eval}
        )
    with Checkpointer(tmp_path / "c" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]
    assert [json.loads(line)["step"] for line in lines_of(tmp_path / "c")] == [2, 3, 4]
    resumed_c, history_c = train.fit(other, step_fn, data, run_dir=tmp_path / "c", **kwargs)
    _identical(resumed_c, straight)
    assert history_c == history
    assert lines_of(tmp_path / "c") == lines_of(tmp_path / "a")

    # The caller's initial state was not donated; a run that is already done is a no-op.
    assert int(initial.step) == 0
    done, history_done = train.fit(other, step_fn, data, run_dir=tmp_path / "a", **kwargs)
    _identical(done, straight)
    assert history_done == history


def test_resume_refuses_a_different_data_order(tmp_path):
    opt = optax.sgd(0.1)
    step_fn = train.make_train_step(dropout_loss, opt)
    state = train.init_state(_params(), opt, seed=0)
    common = dict(steps=2, batch_size=BATCH, run_dir=tmp_path, progress=False)
    train.fit(state, step_fn, _data(), seed=0, **common)
    with pytest.raises(ValueError, match=r"seed \(stored 0, now 1\)"):
        train.fit(state, step_fn, _data(), seed=1, **{**common, "steps": 4})
    with pytest.raises(ValueError, match="beyond steps=1"):
        train.fit(state, step_fn, _data(), seed=0, **{**common, "steps": 1})


# --------------------------------------------------------------------------- non-finite


def _first_step_using(data, row, seed):
    return next(k for k in range(N) if row in batch_at(data, k, batch_size=BATCH, seed=seed)["i"])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    data, opt = _data(), optax.sgd(0.05)
    bad_index = 5  # 0-based update that first sees the NaN example
    row = int(batch_at(data, bad_index, batch_size=BATCH, seed=0)["i"][0])
    assert _first_step_using(data, row, seed=0) == bad_index
    data["y"][row] = np.nan  # (dropout could hide a NaN input)
    step_fn = train.make_train_step(dropout_loss, opt)
    state = train.init_state(_params(), opt, seed=0)
    with pytest.raises(FloatingPointError, match=r"non-finite 'loss', 'mae' at step 6 .*step 4"):
        train.fit(
            state, step_fn, data, steps=8, batch_size=BATCH, run_dir=tmp_path,
            checkpoint_every=2, log_every=0, progress=False,
        )  # fmt: skip
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
        good = ckpt.restore(4, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(good.params))
    assert [json.loads(line)["step"] for line in lines_of(tmp_path)] == [2, 4]
    # Without a run_dir the check still runs (at the end here: no boundary before).
    with pytest.raises(FloatingPointError, match="at step 6"):
        train.fit(state, step_fn, data, steps=8, batch_size=BATCH, log_every=0, progress=False)


def test_non_finite_state_with_finite_loss_is_never_checkpointed(tmp_path):
    def poisoning_step(state, batch):
        params = jax.tree.map(lambda p: jnp.where(state.step >= 2, jnp.nan, p + 1.0), state.params)
        return state._replace(step=state.step + 1, params=params), {"loss": jnp.float32(1.0)}

    state = train.init_state(_params(), optax.sgd(0.1), seed=0)
    with pytest.raises(FloatingPointError, match=r"train state after step 4.*\['b'\]"):
        train.fit(
            state, poisoning_step, _data(), steps=6, batch_size=BATCH, run_dir=tmp_path,
            checkpoint_every=2, progress=False,
        )  # fmt: skip
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2]


# --------------------------------------------------------------------------- logs


def test_history_and_metrics_file(tmp_path, capsys):
    opt = optax.sgd(0.05)
    step_fn = train.make_train_step(dropout_loss, opt)
    state = train.init_state(_params(), opt, seed=0)
    seen_losses = []

    def recording_step(state, batch):
        new, metrics = step_fn(state, batch)
        return new, {**metrics, "per_example": jnp.zeros(2)}

    final, history = train.fit(
        state, recording_step, _data(), steps=7, batch_size=BATCH, eval_fn=lambda p: {"b": p["b"]},
        eval_every=4, run_dir=tmp_path, log_every=3, progress=True,
    )  # fmt: skip
    assert int(final.step) == 7
    # Entries at log steps (3, 6), the eval step (4: eval only), the end (7: both).
    assert [e["step"] for e in history] == [3, 4, 6, 7]
    assert set(history[1]) == {"step", "b"}
    assert set(history[3]) == {"step", "loss", "mae", "per_example", "b"}
    assert all(
        isinstance(v, float)
        for e in history
        for k, v in e.items()
        if k not in ("step", "per_example")
    )
    assert history[0]["per_example"] == [0.0, 0.0]
    assert history[3]["b"] == float(final.params["b"])
    # Train metrics are window means: recompute the losses of steps 4..6 from the checkpoint.
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [7]
    replay = train.init_state(_params(), opt, seed=0)
    jitted = jax.jit(step_fn)
    for k in range(6):
        replay, metrics = jitted(replay, batch_at(_data(), k, batch_size=BATCH, seed=0))
        seen_losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(history[2]["loss"], np.mean(seen_losses[3:6]), rtol=1e-6)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    err = capsys.readouterr().err
    assert "step 3/7" in err and "step 7/7" in err and "loss" in err


def test_progress_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    opt = optax.sgd(0.05)
    state = train.init_state(_params(), opt, seed=0)
    train.fit(
        state, train.make_train_step(dropout_loss, opt), _data(), steps=3, batch_size=BATCH,
        log_every=1,
    )  # fmt: skip
    assert "train" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_fit_checks_its_arguments(tmp_path):
    opt = optax.sgd(0.05)
    step_fn = train.make_train_step(dropout_loss, opt)
    state = train.init_state(_params(), opt, seed=0)
    data = _data()
    fit = lambda **kw: train.fit(state, step_fn, data, **{"steps": 2, "batch_size": BATCH, **kw})
    with pytest.raises(ValueError, match="steps must be an int >= 0, got -1"):
        fit(steps=-1)
    with pytest.raises(ValueError, match="batch_size"):
        fit(batch_size=0)
    with pytest.raises(ValueError, match="exceeds the 32"):
        fit(batch_size=33)
    with pytest.raises(ValueError, match="eval_every=2 needs an eval_fn"):
        fit(eval_every=2)
    with pytest.raises(ValueError, match="needs a run_dir"):
        fit(checkpoint_every=2)
    with pytest.raises(ValueError, match="share their first axis"):
        train.fit(state, step_fn, {"x": data["x"], "y": data["y"][:5]}, steps=1, batch_size=2)
    with pytest.raises(ValueError, match=r"\['mae'\] clash"):
        fit(eval_fn=lambda p: {"mae": 0.0}, progress=False)
