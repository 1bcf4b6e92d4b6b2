"""Tests of emvi.train: determinism, resume and crash equivalence, divergence, validation.

The model is noisy linear regression on 8 features (data matrix (72, 9): features then
target), 16 rows per batch, so an epoch is 4 steps and drops 8 rows. Most tests share one
loss, optimizer object and batch size, hence one compilation. Equality checks are exact
(bit-identical): resuming must reproduce the uninterrupted run exactly, not approximately.
"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emvi.runs import read_metrics
from emvi.train import (
    TrainingDivergedError,
    TrainState,
    fit,
    init_state,
    load_checkpoint,
    make_train_epoch,
)

NUM_POINTS, NUM_FEATURES, BATCH = 72, 8, 16


def make_data(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_POINTS, NUM_FEATURES))
    y = x @ np.linspace(-1.0, 1.0, NUM_FEATURES) + 0.5 + 0.1 * rng.normal(size=NUM_POINTS)
    return np.concatenate([x, y[:, None]], axis=1)


def init_params():
    return {"w": jnp.zeros(NUM_FEATURES), "b": jnp.asarray(0.0)}


def linear_loss(params, key, batch, step):
    """Squared error with input noise drawn from the per-step key (so the key matters)."""
    del step
    x, y = batch[:, :-1], batch[:, -1]
    x = x + 0.01 * jax.random.normal(key, x.shape, x.dtype)
    err = x @ params["w"] + params["b"] - y
    return jnp.mean(err**2), {"abs_err": jnp.mean(jnp.abs(err))}


# One optimizer object for the module: emvi.train shares compilations between fits whose
# loss function, optimizer object and batch size are the same.
_ADAM = optax.adam(0.05)


def optimizer():
    return _ADAM


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@contextlib.contextmanager
def epoch_compilations():
    """Collects the XLA compilations of the jitted epoch function made inside the block."""
    names = []

    def listener(event, duration, **kwargs):
        name = str(kwargs.get("fun_name"))
        if event == "/jax/core/compile/backend_compile_duration" and "train_epoch" in name:
            names.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def run(seed=0, loss_fn=linear_loss, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("batch_size", BATCH)
    return fit(jax.random.key(seed), loss_fn, init_params(), optimizer(), make_data(), **kwargs)


def test_loss_decreases_compiles_once_and_depends_only_on_seed(capsys):
    traces = []

    def counting_loss(params, key, batch, step):  # a fresh function: nothing cached for it
        traces.append(batch.shape)
        return linear_loss(params, key, batch, step)

    evals = []

    def eval_fn(params):
        evals.append(1)
        return {"w_norm": jnp.linalg.norm(params["w"])}

    with epoch_compilations() as compiled:
        a = run(0, counting_loss, num_epochs=5, eval_fn=eval_fn, eval_every=2, progress=True)
        b = run(0, counting_loss, num_epochs=5)
        c = run(1, counting_loss, num_epochs=5)

    losses = [row["loss"] for row in a.history]
    assert losses[-1] < 0.25 * losses[0]
    assert_trees_equal(a.state, b.state)
    assert not np.array_equal(np.asarray(a.state.params["w"]), np.asarray(c.state.params["w"]))
    # One trace and one compilation for 15 epochs in 3 fits ("b" starts weakly typed and
    # uncommitted, and the epochs return strongly typed, committed arrays).
    assert traces == [(BATCH, NUM_FEATURES + 1)]
    assert len(compiled) == 1

    # 72 rows in batches of 16: 4 steps per epoch, 8 rows dropped.
    assert [row["epoch"] for row in a.history] == [0, 1, 2, 3, 4]
    assert [row["step"] for row in a.history] == [4, 8, 12, 16, 20]
    assert int(a.state.step) == 20 and a.state.step.dtype == jnp.int32
    assert a.resumed_from is None and a.examples_per_epoch == 64
    # eval after epochs 1 and 3 (every 2nd) and after the last one.
    assert [("eval_w_norm" in row) for row in a.history] == [False, True, False, True, True]
    assert len(evals) == 3
    assert all(np.isfinite(row["abs_err"]) for row in a.history)
    assert [row["includes_compile"] for row in a.history] == [True] + [False] * 4
    assert a.steady_epoch_time is not None and a.steady_epoch_time > 0
    assert "loss=" in capsys.readouterr().err  # the tqdm postfix

    # The public epoch function reuses fit's compilation, also given a Python int epoch.
    epoch_fn = make_train_epoch(counting_loss, optimizer(), batch_size=BATCH)
    state = init_state(init_params(), optimizer())
    with epoch_compilations() as compiled:
        state, metrics = epoch_fn(state, jax.random.key(0), 0, jnp.asarray(make_data()))
    assert isinstance(state, TrainState) and int(state.step) == 4
    assert metrics["loss"].shape == (4,) and metrics["abs_err"].shape == (4,)
    assert len(traces) == 1 and compiled == []
    np.testing.assert_array_equal(np.mean(np.asarray(metrics["loss"])), a.history[0]["loss"])


def test_resume_equals_uninterrupted_run(tmp_path):
    full = run(0, num_epochs=4, workdir=tmp_path / "full")

    part = tmp_path / "part"
    first = run(0, num_epochs=2, workdir=part)
    assert first.resumed_from is None
    # What a run killed while saving epoch 2 leaves behind: an uncommitted tmp dir.
    junk = part / "checkpoints" / "2.orbax-checkpoint-tmp"
    junk.mkdir()
    (junk / "state").write_text("half written")
    with epoch_compilations() as compiled:
        resumed = run(0, num_epochs=4, workdir=part)

    assert compiled == []  # the restored state hits the cache of the runs above
    assert resumed.resumed_from == 1
    assert [row["epoch"] for row in resumed.history] == [2, 3]
    assert_trees_equal(resumed.state, full.state)  # params, opt_state and step
    assert [row["epoch"] for row in read_metrics(part)] == [0, 1, 2, 3]
    assert not junk.exists()
    # Only the latest max_checkpoints=2 are kept.
    assert sorted(p.name for p in (part / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "3",
    ]
    state, epoch = load_checkpoint(part, init_params(), optimizer())
    assert epoch == 3
    assert_trees_equal(state, full.state)

    # Asking for the same number of epochs again trains nothing and changes nothing.
    again = run(0, num_epochs=4, workdir=part)
    assert again.resumed_from == 3 and again.history == []
    assert_trees_equal(again.state, full.state)


def step_recording_loss(params, key, batch, step):
    """Linear loss whose aux reports the step it was given (a schedule's input)."""
    loss, aux = linear_loss(params, key, batch, step)
    return loss, {**aux, "t": step.astype(loss.dtype)}


def test_loss_receives_the_global_step_also_after_resume(tmp_path):
    # 4 steps per epoch: epoch e sees steps 4e .. 4e + 3, mean 4e + 1.5, whether it was
    # trained in one go or after a resume from the checkpoint of epoch 1.
    run(0, step_recording_loss, num_epochs=2, workdir=tmp_path)
    resumed = run(0, step_recording_loss, num_epochs=4, workdir=tmp_path)
    assert [row["t"] for row in resumed.history] == [9.5, 13.5]
    assert [row["t"] for row in read_metrics(tmp_path)] == [1.5, 5.5, 9.5, 13.5]


_CRASH_SCRIPT = """
import sys, time
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_train as t
from emvi.train import fit

def slow_eval(params):
    time.sleep(0.25)  # host-side, so the parent has time to kill us mid-run
    return {}

fit(jax.random.key(0), t.linear_loss, t.init_params(), t.optimizer(), t.make_data(),
    batch_size=t.BATCH, num_epochs=int(sys.argv[3]), workdir=sys.argv[2],
    eval_fn=slow_eval, progress=False)
print("finished")
"""


def committed_epochs(workdir):
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return [int(p.name) for p in directory.iterdir() if p.name.isdigit()]


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    num_epochs = 12
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(_CRASH_SCRIPT))
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(Path(__file__).parent), str(workdir), str(num_epochs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        deadline = time.monotonic() + 90
        # Wait for the second committed checkpoint (a renamed, non-tmp directory).
        while max(committed_epochs(workdir), default=-1) < 1:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the training subprocess made no checkpoint"
            time.sleep(0.02)
        time.sleep(0.4)  # land somewhere in a later epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rows_before = read_metrics(workdir)
    assert len(rows_before) >= 2
    assert [row["epoch"] for row in rows_before] == list(range(len(rows_before)))

    resumed = run(0, num_epochs=num_epochs, workdir=workdir)
    assert resumed.resumed_from is not None and 1 <= resumed.resumed_from < num_epochs - 1
    uninterrupted = run(0, num_epochs=num_epochs)
    assert_trees_equal(resumed.state, uninterrupted.state)
    assert [row["epoch"] for row in read_metrics(workdir)] == list(range(num_epochs))


def counter_loss(params, key, batch, step):
    """Linear loss plus a counter c that rises by exactly 0.125 per step (sgd, lr 0.125).

    The loss is NaN from the step where c exceeds 1.0625, that is global step 9 (the
    second step of epoch 2 at 4 steps per epoch); gradients stay finite throughout.
    """
    loss, aux = linear_loss({"w": params["w"], "b": params["b"]}, key, batch, step)
    c = params["c"]
    return loss - c + jnp.where(c > 1.0625, jnp.nan, 0.0), aux


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    params = {**init_params(), "c": jnp.asarray(0.0)}
    with pytest.raises(TrainingDivergedError, match=r"global step 9 \(epoch 2\)") as info:
        fit(
            jax.random.key(0),
            counter_loss,
            params,
            optax.sgd(0.125),
            make_data(),
            batch_size=BATCH,
            num_epochs=5,
            workdir=tmp_path,
            progress=False,
        )
    assert info.value.step == 9 and info.value.epoch == 2
    assert "epoch 1" in str(info.value)  # names the checkpoint that is kept
    assert [row["epoch"] for row in read_metrics(tmp_path)] == [0, 1]
    state, epoch = load_checkpoint(tmp_path, params, optax.sgd(0.125))
    assert epoch == 1 and int(state.step) == 8
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))
    np.testing.assert_array_equal(np.asarray(state.params["c"]), 1.0)


def test_nonfinite_params_with_finite_losses_raise():
    def blow_up(params, key, batch, step):
        # A finite loss (2e300) whose sgd update (1e10 * 1e300) overflows to -inf.
        return jnp.sum(params["w"]) * 1e300, {}

    with pytest.raises(TrainingDivergedError, match="parameters are non-finite"):
        fit(
            jax.random.key(0),
            blow_up,
            {"w": jnp.ones(2)},
            optax.sgd(1e10),
            make_data(),
            batch_size=NUM_POINTS,
            num_epochs=1,
            progress=False,
        )


def test_resume_with_other_config_or_params_raises(tmp_path):
    run(0, num_epochs=1, workdir=tmp_path, config_fingerprint="cfg-aaa")
    with pytest.raises(ValueError, match=r"'cfg-aaa'.*'cfg-bbb'.*fresh workdir or --overwrite"):
        run(0, num_epochs=2, workdir=tmp_path, config_fingerprint="cfg-bbb")
    with pytest.raises(ValueError, match=r"key \(seed\)"):
        run(1, num_epochs=2, workdir=tmp_path, config_fingerprint="cfg-aaa")
    with pytest.raises(ValueError, match=r"pass resume=True"):
        run(0, num_epochs=2, workdir=tmp_path, config_fingerprint="cfg-aaa", resume=False)
    wrong = {"w": jnp.zeros(NUM_FEATURES - 1), "b": jnp.asarray(0.0)}
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(7,\).*\(8,\)"):
        fit(
            jax.random.key(0),
            linear_loss,
            wrong,
            optimizer(),
            make_data(),
            batch_size=BATCH,
            num_epochs=2,
            workdir=tmp_path,
            config_fingerprint="cfg-aaa",
            progress=False,
        )
    with pytest.raises(ValueError, match="different params/optimizer structure or shape"):
        load_checkpoint(tmp_path, wrong, optimizer())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": NUM_POINTS + 1}, "larger than the number of training examples"),
        ({"num_epochs": 0}, "num_epochs must be >= 1"),
        ({"eval_every": 0}, "eval_every must be >= 1"),
        ({"train_x": "nan"}, r"train_x contains 1 non-finite value"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    x = make_data()
    kwargs = dict(kwargs)
    if kwargs.pop("train_x", None) == "nan":
        x[3, 2] = np.nan
    args = {"batch_size": BATCH, "num_epochs": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit(jax.random.key(0), linear_loss, init_params(), optimizer(), x, **args)


def test_relative_workdir_checkpoints_and_resumes(tmp_path, monkeypatch):
    """orbax wants absolute paths; fit must accept a relative run folder all the same."""
    monkeypatch.chdir(tmp_path)
    data = make_data()
    kwargs = dict(batch_size=BATCH, progress=False, workdir="relative_run")
    first = fit(
        jax.random.key(0), linear_loss, init_params(), optimizer(), data, num_epochs=1, **kwargs
    )
    assert (tmp_path / "relative_run" / "checkpoints").is_dir()
    second = fit(
        jax.random.key(0), linear_loss, init_params(), optimizer(), data, num_epochs=2, **kwargs
    )
    assert second.resumed_from == 0
    assert int(second.state.step) == 2 * int(first.state.step)
    state, epoch = load_checkpoint("relative_run", init_params(), optimizer())
    assert epoch == 1
    assert_trees_equal(state.params, second.state.params)
