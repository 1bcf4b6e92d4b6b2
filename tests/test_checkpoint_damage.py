"""Checkpoints that detect damage, and one writer per run folder (issue 12).

Each damage test trains 3 epochs into a run folder (checkpoints of epochs 1 and 2 kept),
damages the newest checkpoint one way, and resumes to 4 epochs: the resume must skip the
damaged checkpoint with a warning that names it and the reason, continue from epoch 1, and
end bit-identical to the uninterrupted 4-epoch run (the oracle: the same fit without a
workdir). The model is test_train's: linear regression, 72 rows, batches of 16.
"""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emvi import runs, train

NUM_POINTS, NUM_FEATURES, BATCH = 72, 8, 16
_ADAM = optax.adam(0.05)  # one object: the epochs of every fit share one compilation


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_POINTS, NUM_FEATURES))
    y = x @ np.linspace(-1.0, 1.0, NUM_FEATURES) + 0.1 * rng.normal(size=NUM_POINTS)
    return np.concatenate([x, y[:, None]], axis=1)


def _loss(params, key, batch, step):
    x, y = batch[:, :-1], batch[:, -1]
    x = x + 0.01 * jax.random.normal(key, x.shape, x.dtype)
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2), {}


def _fit(num_epochs, workdir=None):
    params = {"w": jnp.zeros(NUM_FEATURES), "b": jnp.asarray(0.0)}
    return train.fit(
        jax.random.key(0),
        _loss,
        params,
        _ADAM,
        _data(),
        batch_size=BATCH,
        num_epochs=num_epochs,
        workdir=workdir,
        progress=False,
    )


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted():
    return _fit(4).state


def _truncate_metadata(step: Path):
    meta = step / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:10])


def _flip_bytes(step: Path):
    # The largest file of the state: array data (orbax may or may not notice by itself).
    target = max(
        (p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    target.write_bytes(bytes(raw))


def _empty_folder(step: Path):
    for child in step.iterdir():
        if child.is_dir():
            import shutil

            shutil.rmtree(child)
        else:
            child.unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate_metadata, r"meta/metadata differs from its checksum"),
        (_flip_bytes, r"state/.* differs from its checksum"),
        (_empty_folder, r"is missing"),
    ],
    ids=["truncated metadata", "flipped bytes", "emptied step folder"],
)
def test_damaged_checkpoint_is_skipped_and_the_resume_is_bit_identical(
    tmp_path, uninterrupted, damage, reason
):
    _fit(3, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (checkpoints / "2.sha256.json").is_file()
    damage(checkpoints / "2")
    with pytest.warns(train.CheckpointSkippedWarning, match=f"epoch 2 .*: .*{reason}") as rec:
        resumed = _fit(4, tmp_path)
    assert len(rec) == 1 and "moved to" in str(rec[0].message)
    assert resumed.resumed_from == 1
    assert [epoch for epoch, _ in resumed.skipped_checkpoints] == [2]
    assert [row["epoch"] for row in resumed.history] == [2, 3]
    _assert_trees_equal(resumed.state, uninterrupted)
    # The damaged folder is kept aside for inspection, not deleted.
    assert (checkpoints / "damaged-2").is_dir()


def test_load_checkpoint_verifies_too(tmp_path):
    _fit(2, tmp_path)
    params = {"w": jnp.zeros(NUM_FEATURES), "b": jnp.asarray(0.0)}
    _flip_bytes(tmp_path / "checkpoints" / "1")
    with pytest.raises(ValueError, match=r"epoch 1 .* is damaged: .*differs from its checksum"):
        train.load_checkpoint(tmp_path, params, _ADAM, epoch=1)
    with pytest.warns(train.CheckpointSkippedWarning, match="epoch 1"):
        state, epoch = train.load_checkpoint(tmp_path, params, _ADAM)
    assert epoch == 0 and int(state.step) == NUM_POINTS // BATCH


def test_every_checkpoint_damaged_starts_from_scratch(tmp_path, uninterrupted):
    _fit(2, tmp_path)
    for name in ("0", "1"):
        _flip_bytes(tmp_path / "checkpoints" / name)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        resumed = _fit(4, tmp_path)
    assert sum(issubclass(w.category, train.CheckpointSkippedWarning) for w in rec) == 2
    assert resumed.resumed_from is None
    _assert_trees_equal(resumed.state, uninterrupted)


# ---------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from emvi import runs
runs.lock_run_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def other_process_holds(tmp_path):
    """A second process that holds the lock on ``tmp_path / 'run'``; yields its PID."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield workdir, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_with_the_holders_pid(other_process_holds):
    workdir, pid = other_process_holds
    with pytest.raises(
        runs.RunFolderLockedError, match=f"in use by another process \\(PID {pid}\\)"
    ):
        _fit(1, workdir)
    with pytest.raises(runs.RunFolderLockedError, match=f"PID {pid}") as info:
        runs.prepare_workdir(workdir, resume=True)
    assert info.value.pid == pid
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_the_lock_is_released_with_the_process_and_nests_within_one(tmp_path):
    workdir = tmp_path / "run"
    # After the holder died (killed, not unlocked), the folder is free again.
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait()
    runs.prepare_workdir(workdir, resume=True)  # this process now holds it ...
    result = _fit(1, workdir)  # ... and fit, in the same process, nests inside
    assert result.history[0]["epoch"] == 0
    assert (workdir / runs.LOCK_NAME).read_text().strip() == str(os.getpid())
    runs.unlock_run_folder(workdir)


def test_a_file_or_unwritable_workdir_fails_before_any_work(tmp_path):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        _fit(1, a_file)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        runs.prepare_workdir(a_file)
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
    else:
        # root ignores permission bits; /sys refuses writes even to root.
        read_only = Path("/sys/kernel")
    try:
        (read_only / ".probe").write_text("x")
        pytest.skip(f"{read_only} is writable here; no read-only folder to test with")
    except OSError:
        pass
    with pytest.raises(ValueError, match=r"not writable|cannot be created"):
        _fit(1, read_only)
    with pytest.raises(ValueError, match=r"not writable|cannot be created"):
        _fit(1, read_only / "run")
