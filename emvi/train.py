r"""The optax training loop every experiment reuses: epochs, checkpoints, metrics.

Nothing here knows about models. A loss is any function

.. math::
    \mathcal{L}_t(\theta; \xi, x_{1:b}) \quad\text{returned as}\quad
    \texttt{loss\_fn(params, key, batch, step) -> (loss, aux)},

where ``params`` is any pytree (Flax linen param dicts, NamedTuples), ``key`` is the
per-step randomness :math:`\xi` (Monte Carlo samples of a VAE, dropout), ``batch`` holds
``b`` rows of the training matrix, ``step`` is the global step ``t`` (an int32 scalar, so
schedules such as KL annealing or a free-bits warm-up are functions of it), ``loss`` is a
scalar to minimise (a negative ELBO, say) and ``aux`` a dict of scalar diagnostics. The
steps themselves are :func:`emvi.optim.run_steps`, the one optimiser loop of emvi.

:func:`fit` is four pieces: argument checks, :func:`_open_run` (the run folder:
checkpoints, resume, metrics log), :func:`_run_epochs` (the epoch loop: train, check,
evaluate, log, save) and the result.

Shape letters: ``n`` training examples, ``d`` data dim, ``b`` batch size, ``m`` minibatches
per epoch (``m = n // b``).

Determinism. ``fit(key, ...)`` splits ``key`` once into a shuffle key and a step key. Epoch
``e`` visits the data in the order ``permutation(fold_in(shuffle_key, e), n)``; the step
with global index ``t`` (the number of updates made before it) gets
``fold_in(step_key, t)``. Nothing random is carried in the state, so a run resumed from a
checkpoint draws exactly the numbers the uninterrupted run drew and ends with
bit-identical parameters. (Two named subkeys rather than folding epoch and step into the
same key: otherwise epoch 0's permutation and step 0's samples would share a key.)

Dropped remainder. Each epoch runs ``m = n // b`` full minibatches; the ``n mod b``
examples that the permutation puts last are skipped that epoch (a different set each
epoch). Every step therefore sees the same batch shape, and one ``lax.scan`` runs the
whole epoch on device.

Run folder (``workdir``): one row per epoch in ``metrics.jsonl`` (via
:class:`emvi.runs.MetricsLog`) and orbax checkpoints in ``checkpoints/<epoch>/`` (epochs
count from 0; the directory is named after the last epoch it contains) holding the
:class:`TrainState` and a JSON record (epoch, config fingerprint, key, data shape, state
signature). Each epoch is trained, checked for NaN/inf, evaluated, logged, then saved.
Saves are synchronous; orbax writes each one into ``<epoch>.orbax-checkpoint-tmp`` and
renames it on commit, and only renamed directories count as checkpoints, so a run killed
at any moment resumes from its last complete one.

Damage. Beside each checkpoint, ``checkpoints/<epoch>.sha256.json`` records the SHA-256 of
every file in it, written after orbax's commit. A resume verifies the newest checkpoint
against it (and then that orbax can read it); a checkpoint that fails (a file changed,
truncated or missing, no checksum, or unreadable) is skipped with a
:class:`CheckpointSkippedWarning` naming it and the reason, moved aside to
``checkpoints/damaged-<epoch>[-i]``, and the next older one is tried. The run continues
from the newest intact checkpoint (or from scratch), so it still ends bit-identical to
the uninterrupted run.

One writer. ``fit`` holds :func:`emvi.runs.lock_run_folder` on the workdir while it runs:
a second process on the same folder gets a ``ValueError`` naming the holder's PID before
any work, as does a workdir that is a file or not writable.

Example:
  >>> import optax
  >>> def loss_fn(params, key, batch, step):
  ...     err = batch[:, :-1] @ params["w"] - batch[:, -1]
  ...     return jnp.mean(err**2), {}
  >>> data = jax.random.normal(jax.random.key(0), (64, 4))
  >>> result = fit(jax.random.key(1), loss_fn, {"w": jnp.zeros(3)}, optax.adam(0.1), data,
  ...              batch_size=16, num_epochs=3, progress=False)
  >>> [row["epoch"] for row in result.history]
  [0, 1, 2]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Int, PRNGKeyArray, Shaped
from tqdm.auto import tqdm

from emvi import _checks
from emvi.optim import run_steps
from emvi.runs import (
    MetricsLog,
    atomic_write_text,
    lock_run_folder,
    read_metrics,
    unlock_run_folder,
)

PyTree = Any
LossFn = Callable[[PyTree, PRNGKeyArray, Array, Array], tuple[Array, Mapping[str, Array]]]
EpochFn = Callable[[Any, PRNGKeyArray, Any, Array], tuple[Any, dict[str, Array]]]

CHECKPOINT_DIR = "checkpoints"


class TrainingDivergedError(ValueError):
    """The loss (or the parameters) became NaN or inf; the bad state was not saved.

    Attributes:
      step: the first global step whose loss was non-finite (for non-finite parameters
        with finite losses: the last step of the epoch).
      epoch: the epoch (0-based) that step belongs to.
    """

    def __init__(self, message: str, *, step: int, epoch: int):
        super().__init__(message)
        self.step = step
        self.epoch = epoch


class CheckpointSkippedWarning(UserWarning):
    """A checkpoint failed verification on restore and was skipped (the message says which
    and why); training continued from an older intact one, or from scratch."""


class TrainState(NamedTuple):
    """What a checkpoint holds: everything needed to continue training.

    Attributes:
      step: number of optimizer updates made so far, an int32 scalar array.
      params: the parameter pytree.
      opt_state: the optax state for ``params``.
    """

    step: Int[Array, ""]
    params: PyTree
    opt_state: PyTree


class TrainResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`TrainState`.
      history: one dict per epoch run by this call (resumed epochs are in
        ``metrics.jsonl``, not here): ``epoch`` (0-based), ``step`` (global step after the
        epoch), ``loss`` and each aux key (means over the epoch's steps), ``eval_<name>``
        for each eval metric when evaluated, ``epoch_time`` (seconds of training, eval
        excluded), ``includes_compile`` (True for the first epoch of the call) and
        ``elapsed`` (seconds since ``fit`` started).
      resumed_from: the epoch of the checkpoint training continued from, or None.
      examples_per_epoch: examples actually trained on per epoch (``m * b``).
      steady_epoch_time: mean ``epoch_time`` over this call's epochs after the first
        (which includes compilation), or None with fewer than two epochs. Throughput is
        ``examples_per_epoch / steady_epoch_time`` examples per second.
      skipped_checkpoints: ``(epoch, reason)`` for each damaged checkpoint skipped on
        resume, newest first (each also raised a :class:`CheckpointSkippedWarning`).
    """

    state: TrainState
    history: list[dict]
    resumed_from: int | None
    examples_per_epoch: int
    steady_epoch_time: float | None
    skipped_checkpoints: tuple[tuple[int, str], ...] = ()


def init_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """Returns step 0: ``params`` (as strongly typed arrays) and ``optimizer.init(params)``.

    Leaves become arrays of their own dtype, which drops JAX's weak typing (a
    ``jnp.asarray(0.0)`` leaf would otherwise come back strongly typed from the first
    epoch and force a second compilation). When every leaf lives on one device, all are
    committed to it, as the arrays orbax restores are: the jit cache tells committed from
    uncommitted inputs, so a process that trains and then resumes would compile twice.
    """
    params = jax.tree.map(_strong_array, params)
    opt_state = jax.tree.map(_strong_array, optimizer.init(params))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    devices = {device for leaf in jax.tree.leaves(state) for device in leaf.sharding.device_set}
    if len(devices) == 1:
        state = jax.device_put(state, devices.pop())
    return state


def _strong_array(leaf):
    arr = jnp.asarray(leaf)
    return jnp.asarray(arr, dtype=arr.dtype)


def make_train_epoch(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int
) -> EpochFn:
    """Returns the jitted function that runs one epoch as a single ``lax.scan``.

    Args:
      loss_fn: ``loss_fn(params, key, batch, step) -> (loss, aux)`` with a scalar loss and a
        dict of scalar aux values (names used by the history rows, such as ``"loss"``
        and ``"step"``, are reserved).
      optimizer: an optax gradient transformation.
      batch_size: ``b``, rows per minibatch; the last ``n mod b`` rows of each epoch's
        permutation are dropped.

    Returns:
      ``train_epoch(state, run_key, epoch, data) -> (state, metrics)``: ``run_key`` is the
      key given to :func:`fit`, ``epoch`` an integer (traced, so epochs share one
      compilation), ``data`` the (n, d) training matrix, and ``metrics`` maps ``"loss"``
      and each aux name to an (m,) array of per-step values.

    ``loss_fn``, ``optimizer`` and ``batch_size`` are static arguments of one module-level
    jitted function, so calls with the same three objects (and data shapes) share one
    compilation across :func:`fit` calls. JAX's cache then keeps a reference to them;
    unhashable losses or optimizers get a private jitted closure instead.
    """
    batch_size = _checks.check_positive_int(batch_size, name="batch_size")
    static = {"loss_fn": loss_fn, "optimizer": optimizer, "batch_size": batch_size}
    try:
        hash((loss_fn, optimizer))
        jitted = functools.partial(_train_epoch_jit, **static)
    except TypeError:
        jitted = jax.jit(functools.partial(_train_epoch, **static))

    def train_epoch(state, run_key, epoch, data):
        # A Python int epoch would be weakly typed and trigger a second compilation.
        return jitted(state, run_key, jnp.asarray(epoch, jnp.int32), data)

    return train_epoch


def _train_epoch(
    state: TrainState,
    run_key: PRNGKeyArray,
    epoch: Int[Array, ""] | int,
    data: Array,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
) -> tuple[TrainState, dict[str, Array]]:
    num_points = data.shape[0]
    num_batches = num_points // batch_size
    if num_batches < 1:
        raise ValueError(
            f"batch_size ({batch_size}) is larger than the number of training examples "
            f"({num_points})."
        )
    shuffle_key, step_key = jax.random.split(run_key)
    order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_points)
    batches = order[: num_batches * batch_size].reshape(num_batches, batch_size)

    def step_loss(params: PyTree, step: Int[Array, ""]):
        batch = jnp.take(data, batches[step - state.step], axis=0)
        out = loss_fn(params, jax.random.fold_in(step_key, step), batch, step)
        _check_loss_output(out)
        return out

    params, opt_state, (losses, aux) = run_steps(
        step_loss,
        optimizer,
        state.params,
        state.opt_state,
        num_batches,
        step0=state.step,
        has_aux=True,
    )
    new_state = TrainState(step=state.step + num_batches, params=params, opt_state=opt_state)
    return new_state, {"loss": losses, **aux}


_train_epoch_jit = jax.jit(_train_epoch, static_argnames=("loss_fn", "optimizer", "batch_size"))


_RESERVED_KEYS = frozenset({"loss", "epoch", "step", "epoch_time", "includes_compile", "elapsed"})


def _check_optimizer_descends(optimizer, state: TrainState) -> None:
    """Refuses an optimizer that would train uphill or not at all.

    Two updates from the initial state, for a gradient of ones: a descent method's update
    has a negative inner product with the gradient. NaN or inf (a NaN learning rate), a
    positive inner product (a negative learning rate), or two exact zeros (a learning rate
    of 0; one zero alone is a warm-up schedule starting at 0) raise ``ValueError``. Only
    floating parameters are probed; an optimizer that needs extra arguments is not.
    """
    leaves = jax.tree.leaves(state.params)
    if not leaves or not all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves):
        return
    grads = jax.tree.map(jnp.ones_like, state.params)
    params, opt_state, totals = state.params, state.opt_state, []
    try:
        for _ in range(2):
            with jax.numpy_dtype_promotion("standard"):  # as emvi.optim.apply_update
                updates, opt_state = optimizer.update(grads, opt_state, params)
            values = [np.asarray(u, np.float64) for u in jax.tree.leaves(updates)]
            if not all(np.all(np.isfinite(v)) for v in values):
                raise ValueError(
                    "optimizer gives a NaN or inf update for a gradient of ones: "
                    "is the learning rate NaN or inf?"
                )
            totals.append(float(sum(np.sum(v) for v in values)))
            if totals[-1] > 0:
                raise ValueError(
                    "optimizer moves uphill: for a gradient of ones its update sums to "
                    f"{totals[-1]:.3g} > 0, so training would raise the loss. Is the learning "
                    "rate negative? (emvi minimises loss_fn.)"
                )
            with jax.numpy_dtype_promotion("standard"):
                params = optax.apply_updates(params, updates)
    except ValueError as err:
        if str(err).startswith("optimizer"):
            raise
        return
    except Exception:  # optimizers needing extra arguments are not probed
        return
    if all(t == 0 for t in totals):
        raise ValueError(
            "optimizer does not move: its first two updates are zero for a gradient of "
            "ones. Is the learning rate 0?"
        )


def _check_loss_output(out) -> None:
    """Trace-time checks on what a loss function returned (inside the traced loss, so they
    run before ``jax.grad`` looks at the output)."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "loss_fn must return a pair (loss, aux): a scalar loss and a dict of scalars; "
            f"got {type(out).__name__}"
            + (f" of length {len(out)}." if isinstance(out, tuple) else ".")
        )
    loss, aux = out
    if jnp.shape(loss) != ():
        raise ValueError(f"loss_fn must return a scalar loss; got shape {jnp.shape(loss)}.")
    if not isinstance(aux, Mapping):
        raise ValueError(f"loss_fn must return (loss, dict of scalars); got aux {type(aux)}.")
    clashes = sorted(set(aux) & _RESERVED_KEYS)
    if clashes:
        raise ValueError(
            f"The aux dict of loss_fn uses reserved key(s) {clashes}; rename them "
            f"(reserved: {sorted(_RESERVED_KEYS)})."
        )
    for name, value in aux.items():
        if jnp.shape(value) != ():
            raise ValueError(f"aux[{name!r}] must be a scalar; got shape {jnp.shape(value)}.")


@jax.jit
def _all_finite(tree: PyTree) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _signature(tree: PyTree) -> list[list]:
    """[path, shape, dtype] for each leaf: what must agree for a checkpoint to fit."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        [jax.tree_util.keystr(path), list(np.shape(leaf)), str(_dtype(leaf))] for path, leaf in flat
    ]


def _dtype(leaf) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def _key_record(key) -> list[int]:
    """The raw bits of a key, to recognise a resume with another seed."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).ravel().tolist()


class _Checkpoints:
    """Thin wrapper over ``ocp.CheckpointManager``: one step per epoch, synchronous saves.

    Each checkpoint holds two items: ``state`` (the TrainState, StandardSave) and ``meta``
    (a JSON record). Orbax is imported here so that code using only the jitted epoch
    does not pay for it.
    """

    def __init__(self, directory: Path, *, max_to_keep: int | None, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory)
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0
            )
        else:
            options = ocp.CheckpointManagerOptions(
                # A returned save is complete: written to a tmp dir, then renamed.
                enable_async_checkpointing=False,
                preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
                # Remove tmp dirs left by a run killed mid-save (never restored anyway).
                cleanup_tmp_directories=True,
            )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def all_epochs(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, epoch: int, state: TrainState, meta: dict) -> None:
        ocp = self._ocp
        self._manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        atomic_write_text(
            _checksum_path(self.directory, epoch),
            json.dumps({"epoch": epoch, "sha256": _file_digests(self.directory / str(epoch))}),
        )
        # Checksums of checkpoints the preservation policy has deleted.
        kept = set(self._manager.all_steps())
        for path in self.directory.glob("*" + _CHECKSUM_SUFFIX):
            stem = path.name[: -len(_CHECKSUM_SUFFIX)]
            if stem.isdigit() and int(stem) not in kept:
                path.unlink(missing_ok=True)

    def verify(self, epoch: int) -> str | None:
        """Why the checkpoint of ``epoch`` is not intact, or None if its files match."""
        folder = self.directory / str(epoch)
        try:
            record = json.loads(_checksum_path(self.directory, epoch).read_text())
            expected = dict(record["sha256"])
        except FileNotFoundError:
            return "it has no checksum file (written by an older emvi, or killed before it)"
        except (ValueError, KeyError, TypeError) as err:
            return f"its checksum file is unreadable ({type(err).__name__})"
        found = _file_digests(folder)
        missing = sorted(set(expected) - set(found))
        changed = sorted(
            name for name in expected if name in found and found[name] != expected[name]
        )
        extra = sorted(set(found) - set(expected))
        problems = [f"{name} is missing" for name in missing]
        problems += [f"{name} differs from its checksum" for name in changed]
        problems += [f"{name} is not in its checksum" for name in extra]
        if not problems:
            return None
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        return f"its files do not match their SHA-256 checksums: {shown}"

    def set_aside(self, epoch: int) -> Path:
        """Moves a damaged checkpoint out of orbax's sight (never deletes it)."""
        target = self.directory / f"damaged-{epoch}"
        i = 1
        while target.exists():
            target = self.directory / f"damaged-{epoch}-{i}"
            i += 1
        os.replace(self.directory / str(epoch), target)
        _checksum_path(self.directory, epoch).unlink(missing_ok=True)
        self._manager.reload()
        return target

    def restore_meta(self, epoch: int) -> dict:
        ocp = self._ocp
        if epoch not in self._manager.all_steps():
            raise ValueError(
                f"No complete checkpoint of epoch {epoch} in {self.directory}; found epochs "
                f"{list(self._manager.all_steps())}."
            )
        out = self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore_state(self, epoch: int, like: TrainState) -> TrainState:
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self._manager.restore(
                epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"The checkpoint of epoch {epoch} in {self.directory} does not fit the given "
                f"params and optimizer ({type(err).__name__}: {str(err)[:300]}). Use a fresh "
                "workdir or --overwrite."
            ) from err
        return TrainState(*out["state"])

    def close(self) -> None:
        self._manager.close()


_CHECKSUM_SUFFIX = ".sha256.json"


def _checksum_path(directory: Path, epoch: int) -> Path:
    return directory / f"{epoch}{_CHECKSUM_SUFFIX}"


def _file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, keyed by its path relative to ``folder``."""
    digests = {}
    if not folder.is_dir():
        return digests
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        digests[path.relative_to(folder).as_posix()] = h.hexdigest()
    return digests


def _restore_intact(checkpoints: _Checkpoints, meta: dict, state: TrainState, num_epochs: int):
    """The newest checkpoint that passes :meth:`_Checkpoints.verify` and restores, as
    ``(state, epoch, skipped)``; damaged ones are set aside, with a warning each. A
    checkpoint of another setup (config, key, shapes) is an error, not damage."""
    skipped = []
    for epoch in reversed(checkpoints.all_epochs()):
        reason = checkpoints.verify(epoch)
        if reason is None:
            try:
                stored = checkpoints.restore_meta(epoch)
            except Exception as err:  # any failure to read is damage here
                reason = f"its metadata cannot be read ({type(err).__name__}: {str(err)[:200]})"
        if reason is None:
            if epoch > num_epochs - 1:
                raise ValueError(
                    f"{checkpoints.directory} holds a checkpoint of epoch {epoch}, past "
                    f"the {num_epochs} epochs asked for; use a fresh workdir or "
                    "--overwrite, or ask for more epochs."
                )
            _check_meta(stored, meta, checkpoints.directory)
            try:
                return checkpoints.restore_state(epoch, state), epoch, skipped
            except ValueError:
                raise  # does not fit the params: not damage
            except Exception as err:  # a TensorStore or decoding failure
                reason = f"its state cannot be read ({type(err).__name__}: {str(err)[:200]})"
        moved = checkpoints.set_aside(epoch)
        skipped.append((epoch, reason))
        warnings.warn(
            f"Skipped the checkpoint of epoch {epoch} in {checkpoints.directory}: {reason}. "
            f"It was moved to {moved}; trying the next older one.",
            CheckpointSkippedWarning,
            stacklevel=4,
        )
    return state, None, skipped


def _check_signature(stored: list, expected: list, directory: Path) -> None:
    if stored == expected:
        return
    stored_by_path = {p: (s, d) for p, s, d in stored}
    expected_by_path = {p: (s, d) for p, s, d in expected}
    problems = []
    for path, (shape, dtype) in expected_by_path.items():
        if path not in stored_by_path:
            problems.append(f"{path} is missing from the checkpoint")
        elif stored_by_path[path] != (shape, dtype):
            old_shape, old_dtype = stored_by_path[path]
            problems.append(
                f"{path} has shape {tuple(shape)} {dtype} here but {tuple(old_shape)} "
                f"{old_dtype} in the checkpoint"
            )
    problems += [
        f"{path} is in the checkpoint but not in the params"
        for path in stored_by_path
        if path not in expected_by_path
    ]
    if not problems:  # same leaves, different order
        problems = ["the leaves are in a different order"]
    shown = "; ".join(problems[:4])
    if len(problems) > 4:
        shown += f"; and {len(problems) - 4} more"
    raise ValueError(
        f"The checkpoint in {directory} was written for a different params/optimizer "
        f"structure or shape: {shown}. Use a fresh workdir or --overwrite."
    )


def _check_meta(meta: dict, expected: dict, directory: Path) -> None:
    """Raises ValueError when a checkpoint was written by a different run setup."""
    if meta.get("config_fingerprint") != expected["config_fingerprint"]:
        raise ValueError(
            f"The checkpoint in {directory} was written with config fingerprint "
            f"{meta.get('config_fingerprint')!r}, but this run's fingerprint is "
            f"{expected['config_fingerprint']!r}. Use a fresh workdir or --overwrite."
        )
    for field, what in [
        ("num_examples", "number of training examples"),
        ("data_dim", "data dimension"),
        ("batch_size", "batch size"),
        ("run_key", "key (seed)"),
    ]:
        if meta.get(field) != expected[field]:
            raise ValueError(
                f"The checkpoint in {directory} was written with {what} {meta.get(field)!r}, "
                f"but this run has {expected[field]!r}; resuming would not reproduce the "
                "uninterrupted run. Use a fresh workdir or --overwrite."
            )
    _check_signature(meta.get("state_signature"), expected["state_signature"], directory)


def _trim_metrics(workdir: Path, *, last_epoch: int) -> None:
    """Drops ``metrics.jsonl`` rows of epochs after the checkpoint being resumed from.

    A run killed after logging epoch ``e`` but before checkpointing it repeats ``e`` on
    resume; dropping the stale rows keeps one row per epoch. Rows without an integer
    ``epoch`` field are kept. A torn last line is removed too, so appends start on a
    fresh line. The file is rewritten atomically, and only when something must change.
    """
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return
    text = path.read_text()
    rows = read_metrics(workdir)
    keep = [
        row for row in rows if not (isinstance(row.get("epoch"), int) and row["epoch"] > last_epoch)
    ]
    num_lines = len([line for line in text.splitlines() if line.strip()])
    clean = len(keep) == len(rows) == num_lines and (not text or text.endswith("\n"))
    if not clean:
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def _epoch_row(
    epoch: int, step: int, metrics: Mapping[str, np.ndarray], evals: Mapping[str, Any] | None
) -> dict:
    row: dict[str, Any] = {"epoch": epoch, "step": step}
    row.update({name: float(np.mean(values)) for name, values in metrics.items()})
    if evals is not None:
        row.update({f"eval_{name}": _to_float(value) for name, value in evals.items()})
    return row


def _to_float(value) -> float:
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"eval_fn must return a dict of scalars; got {value!r}.") from err


def _every(epoch: int, every: int, num_epochs: int) -> bool:
    """True on every ``every``-th epoch (1-based count) and on the last one."""
    return (epoch + 1) % every == 0 or epoch == num_epochs - 1


def fit(
    key: PRNGKeyArray,
    loss_fn: LossFn,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    train_x: Shaped[ArrayLike, "n d"],
    *,
    batch_size: int,
    num_epochs: int,
    workdir: str | Path | None = None,
    eval_fn: Callable[[PyTree], Mapping[str, Any]] | None = None,
    eval_every: int = 1,
    checkpoint_every: int = 1,
    max_checkpoints: int = 2,
    progress: bool = True,
    resume: bool = True,
    config_fingerprint: str | None = None,
    log_fn: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Minimises ``loss_fn`` over ``num_epochs`` shuffled passes through ``train_x``.

    Args:
      key: the run key; the result depends only on it (and the inputs).
      loss_fn: ``loss_fn(params, key, batch, step) -> (loss, aux)``, see the module docstring.
      params: initial parameters, any pytree of arrays.
      optimizer: an optax gradient transformation.
      train_x: the (n, d) training matrix, finite.
      batch_size: rows per minibatch, ``1 <= batch_size <= n``; each epoch drops the
        ``n mod batch_size`` rows its permutation puts last.
      num_epochs: total epochs of the run (including any resumed ones).
      workdir: run folder for ``metrics.jsonl`` and ``checkpoints/``; None keeps
        everything in memory. Rows of ``metrics.jsonl`` with an integer ``epoch`` later
        than the checkpoint resumed from (all of them when starting from scratch) are
        dropped first, so the file holds one row per epoch even after a crash.
      eval_fn: ``eval_fn(params) -> dict of scalars``, run on the host after every
        ``eval_every``-th epoch and after the last; logged as ``eval_<name>``.
      eval_every: epochs between evaluations.
      checkpoint_every: epochs between checkpoints (the last epoch is always saved).
      max_checkpoints: checkpoints kept on disk (the most recent ones).
      progress: show a tqdm bar over epochs with the loss in its postfix.
      resume: continue from the latest checkpoint in ``workdir`` if there is one. With
        False, a workdir that already holds checkpoints is an error.
      config_fingerprint: a string identifying the experiment config (e.g. a hash),
        stored with each checkpoint; resuming under another fingerprint is an error.
      log_fn: called with each epoch's history row (for printing).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: on bad arguments (among them a ``key`` that is neither a PRNG key nor
        an integer seed, an optimizer whose first update on a gradient of ones is NaN,
        uphill or, twice running, zero: a NaN, negative or zero learning rate; a
        ``loss_fn`` that does not return a scalar and a dict of scalars, found when the
        epoch is traced, before ``jax.grad`` sees it), a workdir that is a file, not
        writable or held by another process (its PID is named), or a checkpoint from
        another config, key, data shape or params structure. Damaged checkpoints are skipped with a
        :class:`CheckpointSkippedWarning` (see the module docstring).
      TrainingDivergedError: when a loss (or the parameters) becomes NaN or inf. The
        epoch that produced it is neither logged nor saved.
    """
    key = _checks.as_key(key)
    data_np = _checks.as_data_matrix(train_x, name="train_x")
    num_points, data_dim = data_np.shape
    batch_size = _checks.check_positive_int(batch_size, name="batch_size")
    if batch_size > num_points:
        raise ValueError(
            f"batch_size ({batch_size}) is larger than the number of training examples "
            f"({num_points}); use a batch_size of at most {num_points}."
        )
    num_epochs = _checks.check_positive_int(num_epochs, name="num_epochs")
    eval_every = _checks.check_positive_int(eval_every, name="eval_every")
    checkpoint_every = _checks.check_positive_int(checkpoint_every, name="checkpoint_every")
    max_checkpoints = _checks.check_positive_int(max_checkpoints, name="max_checkpoints")
    if config_fingerprint is not None and not isinstance(config_fingerprint, str):
        raise ValueError(f"config_fingerprint must be a string; got {config_fingerprint!r}.")

    if workdir is not None and Path(workdir).exists() and not Path(workdir).is_dir():
        raise ValueError(f"workdir {workdir} exists and is not a directory.")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable; got {type(loss_fn).__name__}.")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise ValueError(
            f"optimizer must be an optax GradientTransformation; got {type(optimizer).__name__}."
        )

    started = time.perf_counter()
    state = init_state(params, optimizer)
    _check_optimizer_descends(optimizer, state)
    meta = {
        "config_fingerprint": config_fingerprint,
        "num_examples": num_points,
        "data_dim": data_dim,
        "batch_size": batch_size,
        "run_key": _key_record(key),
        "state_signature": _signature(state),
    }
    run = _Run(checkpoints=None, log=None, state=state, resumed_from=None)
    try:
        if workdir is not None:
            run = _open_run(
                Path(workdir), run.state, meta, num_epochs, resume=resume, keep=max_checkpoints
            )
        schedule = _Schedule(num_epochs, eval_every, checkpoint_every)
        state, history = _run_epochs(
            run,
            make_train_epoch(loss_fn, optimizer, batch_size=batch_size),
            key,
            jnp.asarray(data_np),
            schedule,
            meta=meta,
            eval_fn=eval_fn,
            started=started,
            progress=progress,
            log_fn=log_fn,
        )
    finally:
        run.close()

    steady = [row["epoch_time"] for row in history[1:]]
    return TrainResult(
        state=state,
        history=history,
        resumed_from=run.resumed_from,
        examples_per_epoch=(num_points // batch_size) * batch_size,
        steady_epoch_time=float(np.mean(steady)) if steady else None,
        skipped_checkpoints=run.skipped,
    )


class _Run(NamedTuple):
    """An open run: its checkpoints and metrics log (None without a workdir), the state to
    start from and the epoch of the checkpoint it was restored from (None: a fresh start)."""

    checkpoints: _Checkpoints | None
    log: MetricsLog | None
    state: TrainState
    resumed_from: int | None
    workdir: Path | None = None  # locked by this run (emvi.runs.lock_run_folder)
    skipped: tuple[tuple[int, str], ...] = ()

    def close(self) -> None:
        try:
            if self.log is not None:
                self.log.close()
            if self.checkpoints is not None:
                self.checkpoints.close()
        finally:
            if self.workdir is not None:
                unlock_run_folder(self.workdir)


class _Schedule(NamedTuple):
    """When to evaluate and to checkpoint (every k-th epoch, and always after the last)."""

    num_epochs: int
    eval_every: int
    checkpoint_every: int

    def evaluate(self, epoch: int) -> bool:
        return _every(epoch, self.eval_every, self.num_epochs)

    def save(self, epoch: int) -> bool:
        return _every(epoch, self.checkpoint_every, self.num_epochs)


def _open_run(
    workdir: Path, state: TrainState, meta: dict, num_epochs: int, *, resume: bool, keep: int
) -> _Run:
    """Opens ``workdir`` and resumes from its latest checkpoint if there is one.

    The checkpoint must have been written by the same setup (``meta``: config fingerprint,
    data shape, batch size, key, state signature) and lie within ``num_epochs``; metrics rows
    of later epochs are dropped so that ``metrics.jsonl`` keeps one row per epoch.
    """
    workdir = workdir.absolute()  # orbax needs absolute paths
    lock_run_folder(workdir)  # before anything is read or written
    checkpoints = None
    try:
        checkpoints = _Checkpoints(workdir / CHECKPOINT_DIR, max_to_keep=keep)
        latest = checkpoints.latest_epoch()
        skipped = []
        if latest is not None:
            if not resume:
                raise ValueError(
                    f"{checkpoints.directory} already holds checkpoints (latest: epoch "
                    f"{latest}); pass resume=True to continue that run, or use a fresh "
                    "workdir or --overwrite."
                )
            state, latest, skipped = _restore_intact(checkpoints, meta, state, num_epochs)
        _trim_metrics(workdir, last_epoch=-1 if latest is None else latest)
        log = MetricsLog(workdir)
    except BaseException:
        if checkpoints is not None:
            checkpoints.close()
        unlock_run_folder(workdir)
        raise
    return _Run(checkpoints, log, state, latest, workdir, tuple(skipped))


def _run_epochs(
    run: _Run,
    train_epoch: EpochFn,
    key: PRNGKeyArray,
    data: Array,
    schedule: _Schedule,
    *,
    meta: dict,
    eval_fn: Callable[[PyTree], Mapping[str, Any]] | None,
    started: float,
    progress: bool,
    log_fn: Callable[[dict], None] | None,
) -> tuple[TrainState, list[dict]]:
    """The epoch loop: train one epoch, refuse a diverged one, evaluate, log, checkpoint."""
    state = run.state
    first_epoch = 0 if run.resumed_from is None else run.resumed_from + 1
    num_batches = meta["num_examples"] // meta["batch_size"]
    history: list[dict] = []
    bar = tqdm(
        range(first_epoch, schedule.num_epochs),
        initial=first_epoch,
        total=schedule.num_epochs,
        desc="epochs",
        unit="epoch",
        disable=not progress,
    )
    try:
        for epoch in bar:
            tic = time.perf_counter()
            first_step = int(state.step)
            new_state, step_metrics = train_epoch(state, key, epoch, data)
            step_metrics = {name: np.asarray(v) for name, v in step_metrics.items()}
            epoch_time = time.perf_counter() - tic
            _raise_if_diverged(
                step_metrics["loss"], new_state, epoch, first_step, num_batches, run.checkpoints
            )
            state = new_state
            evals = eval_fn(state.params) if eval_fn and schedule.evaluate(epoch) else None
            row = _epoch_row(epoch, first_step + num_batches, step_metrics, evals)
            row["epoch_time"] = epoch_time
            row["includes_compile"] = epoch == first_epoch
            row["elapsed"] = time.perf_counter() - started
            history.append(row)
            if run.log is not None:
                run.log.write(**row)
            if run.checkpoints is not None and schedule.save(epoch):
                run.checkpoints.save(
                    epoch, state, {**meta, "epoch": epoch, "step": int(state.step)}
                )
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            if log_fn is not None:
                log_fn(row)
    finally:
        bar.close()
    return state, history


def _raise_if_diverged(
    losses: np.ndarray,
    state: TrainState,
    epoch: int,
    first_step: int,
    num_batches: int,
    checkpoints: _Checkpoints | None,
) -> None:
    bad = ~np.isfinite(losses)
    if bad.any():
        index = int(np.argmax(bad))
        step = first_step + index
        what = f"the loss is {losses[index]} at global step {step}"
    elif not bool(_all_finite(state.params)):
        step = first_step + num_batches - 1
        what = f"the parameters are non-finite after global step {step}"
    else:
        return
    if checkpoints is None:
        kept = "no workdir was given, so nothing was saved"
    else:
        latest = checkpoints.latest_epoch()
        kept = (
            f"the last good checkpoint (epoch {latest}) is kept in {checkpoints.directory}"
            if latest is not None
            else "no checkpoint had been written yet"
        )
    raise TrainingDivergedError(
        f"Training diverged: {what} (epoch {epoch}). That epoch was not saved; {kept}. "
        "Lower the learning rate or check the loss for log(0) or division by zero.",
        step=step,
        epoch=epoch,
    )


def load_checkpoint(
    workdir: str | Path,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    epoch: int | None = None,
) -> tuple[TrainState, int]:
    """Restores a :class:`TrainState` written by :func:`fit`, e.g. for evaluation scripts.

    Args:
      workdir: the run folder given to :func:`fit`.
      params: a params pytree of the right structure (arrays or ``jax.ShapeDtypeStruct``).
      optimizer: the optimizer of the run (its state structure is needed to restore).
      epoch: which checkpoint; None for the latest.

    Returns:
      ``(state, epoch)``.

    Raises:
      ValueError: if there is no such checkpoint, it does not fit ``params``, or it fails
        its SHA-256 checksums. With ``epoch=None`` damaged checkpoints are skipped (with a
        :class:`CheckpointSkippedWarning`; nothing is moved) and the newest intact one is
        loaded.
    """
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    if not directory.is_dir():
        raise ValueError(f"No checkpoints in {workdir}: {directory} does not exist.")
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), _dtype(p)), params)
    like = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(optimizer.init, params),
    )
    checkpoints = _Checkpoints(directory, max_to_keep=None, read_only=True)
    try:
        if epoch is None:
            for candidate in reversed(checkpoints.all_epochs()):
                reason = checkpoints.verify(candidate)
                if reason is None:
                    epoch = candidate
                    break
                warnings.warn(
                    f"Skipped the checkpoint of epoch {candidate} in {directory}: {reason}.",
                    CheckpointSkippedWarning,
                    stacklevel=2,
                )
            if epoch is None:
                raise ValueError(f"No complete, intact checkpoint in {directory}.")
        else:
            reason = checkpoints.verify(epoch) if epoch in checkpoints.all_epochs() else None
            if reason is not None:
                raise ValueError(
                    f"The checkpoint of epoch {epoch} in {directory} is damaged: {reason}."
                )
        meta = checkpoints.restore_meta(epoch)
        _check_signature(meta.get("state_signature"), _signature(like), directory)
        state = checkpoints.restore_state(epoch, like)
    finally:
        checkpoints.close()
    return state, epoch
