"""Run folders: what every experiment writes, and nothing about models.

A run folder holds

* ``config.json``: the experiment config, git SHA, library versions and JAX backend;
* ``metrics.jsonl``: one JSON object per log call, line-buffered so a crash loses at most
  the line being written;
* ``results.json``: the final numbers, written atomically (temp file, then rename);
* ``checkpoints/``: orbax checkpoints (see ``emvi.train``);
* figures as PNG, remade from the files above by the plotting code;
* ``.emvi.lock``: the lock of the one process writing the folder (:func:`lock_run_folder`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import numpy as np

_LIBRARIES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "distrax",
    "chex",
    "orbax-checkpoint",
    "numpy",
    "scipy",
    "scikit-learn",
)


def load_script(path: str | os.PathLike):
    """Imports a script (``experiments/vae.py``, say) as a module, once per process.

    Experiment scripts are not package modules, and they never import each other (what
    they share lives in the library); the tests that call their ``main`` load them with
    this. The module is registered in
    ``sys.modules`` (as ``_emvi_script_<stem>``) before it runs, which dataclasses need.
    """
    import importlib.util

    path = Path(path).resolve()
    name = f"_emvi_script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def cli(config_cls, main, plot, argv: list[str] | None = None):
    """The command line of an experiment script: ``plot DIR`` or the config's flags.

    ``script.py plot DIR`` remakes the figures of the run folder DIR with ``plot(DIR)`` and
    prints the paths it wrote; anything else is parsed by ``tyro`` into ``config_cls`` and
    handed to ``main``. Every experiment ends with
    ``if __name__ == "__main__": runs.cli(Config, main, plot)``.

    Returns:
      What ``main`` or ``plot`` returned.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "plot":
        written = plot(argv[1])
        for path in written or ():
            print(path)
        return written
    import tyro

    return main(tyro.cli(config_cls, args=argv))


def git_sha(path: str | os.PathLike | None = None) -> str | None:
    """Returns the git commit of the source tree (with ``-dirty`` if modified), or None."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict:
    """Library versions, Python, platform and the JAX backend and devices."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_sha": git_sha(),
    }
    try:
        import jax

        info["backend"] = jax.default_backend()
        info["devices"] = [str(d) for d in jax.devices()]
        info["x64"] = bool(jax.config.read("jax_enable_x64"))
    except Exception as err:  # pragma: no cover - jax is a hard dependency
        info["backend"] = f"unavailable: {err}"
    return info


def to_jsonable(obj):
    """Converts configs, arrays and NumPy scalars into plain JSON values.

    Non-finite floats become the strings "nan", "inf", "-inf" so the file stays valid JSON.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return {k: to_jsonable(v) for k, v in obj._asdict().items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        arr = np.asarray(obj)
        return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` via a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically writes ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


LOCK_NAME = ".emvi.lock"

# Run folders this process holds: resolved path -> [file descriptor, holders]. flock locks
# belong to an open file description, so a second open in the same process would lock
# against itself; holders in one process share the one descriptor instead.
_HELD_LOCKS: dict[str, list[int]] = {}


class RunFolderLockedError(ValueError):
    """Another process is writing the run folder (its PID is in the message and ``pid``)."""

    def __init__(self, message: str, *, pid: int | None):
        super().__init__(message)
        self.pid = pid


def _writable_folder(path: Path) -> None:
    """Creates ``path`` if needed; a clear ``ValueError`` if it is a file or not writable."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir {path} exists and is not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"workdir {path} cannot be created: {err.strerror or err}.") from err


def lock_run_folder(workdir: str | os.PathLike) -> Path:
    """Makes this process the one writer of the run folder ``workdir`` (created if needed).

    An exclusive ``fcntl.flock`` on ``workdir/.emvi.lock``, which also records the holder's
    PID. The operating system releases it when the process ends, however it ends (a
    killed run leaves no stale lock). Calls from the same process nest: each is undone by
    one :func:`unlock_run_folder`.

    Raises:
      ValueError: if ``workdir`` is a file, cannot be created or is not writable.
      RunFolderLockedError: (a ``ValueError``) if another process holds the folder.
    """
    path = Path(workdir)
    _writable_folder(path)
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        return path
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(
            f"workdir {path} is not writable ({err.strerror or err}); choose a folder this "
            "process may write to."
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        pid = int(text) if text.isdigit() else None
        raise RunFolderLockedError(
            f"workdir {path} is in use by another process (PID {pid if pid else 'unknown'}); "
            "two runs writing one folder would mix their metrics and checkpoints. Wait for "
            "it to finish, stop it, or use another workdir.",
            pid=pid,
        ) from err
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = [fd, 1]
    return path


def unlock_run_folder(workdir: str | os.PathLike) -> None:
    """Undoes one :func:`lock_run_folder` of this process; the last one releases the lock."""
    key = str(Path(workdir).resolve())
    held = _HELD_LOCKS.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD_LOCKS[key]
        os.close(held[0])  # closing the descriptor releases the flock


def prepare_workdir(
    workdir: str | os.PathLike, *, overwrite: bool = False, resume: bool = False
) -> Path:
    """Creates a run folder, refusing to clobber an existing non-empty one, and locks it.

    The lock (:func:`lock_run_folder`) is taken before anything is deleted or written and
    held for the rest of the process: a second process on the same folder stops here,
    with the holder's PID in the message.

    Args:
      workdir: the run folder.
      overwrite: delete an existing folder's contents first.
      resume: keep an existing folder (for runs that resume from checkpoints).

    Raises:
      ValueError: if the folder exists, is not empty, and neither flag was given; if it is
        a file, cannot be created or is not writable; or if another process holds it
        (:class:`RunFolderLockedError`).
    """
    path = Path(workdir)
    if overwrite and resume:
        raise ValueError("Pass at most one of overwrite and resume.")
    existed = path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())
    if existed and not (overwrite or resume):
        raise ValueError(
            f"workdir {path} already holds a run; pass --overwrite to replace it"
            " (or --resume where the experiment supports it)."
        )
    lock_run_folder(path)
    if existed and overwrite:
        for child in path.iterdir():
            if child.name == LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    return path


def write_config(workdir: str | os.PathLike, config) -> dict:
    """Writes ``config.json``: the config plus git SHA, versions and backend."""
    record = {"config": to_jsonable(config), "environment": environment_info()}
    record["environment"]["command"] = sys.argv
    record["environment"]["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(Path(workdir) / "config.json", record)
    return record


class MetricsLog:
    """Appends one JSON object per ``write`` call to ``metrics.jsonl`` (line-buffered).

    Example:
      >>> with MetricsLog(workdir) as log:  # doctest: +SKIP
      ...     log.write(step=10, loss=1.5)
    """

    def __init__(self, workdir: str | os.PathLike, name: str = "metrics.jsonl"):
        self.path = Path(workdir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def write(self, **row) -> None:
        self._f.write(json.dumps(to_jsonable(row)) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(workdir: str | os.PathLike, name: str = "metrics.jsonl") -> list[dict]:
    """Reads ``metrics.jsonl`` back, skipping a torn final line left by a crash."""
    rows = []
    path = Path(workdir) / name
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def mean_and_sem(values) -> tuple[float, float]:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)`` (NaN for n < 2), in
    float64.

    Example:
      >>> mean_and_sem([1.0, 2.0, 3.0])
      (2.0, 0.5773502691896258)
    """
    v = np.asarray(values, np.float64).reshape(-1)
    sem = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(np.mean(v)), sem


def format_number(value, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, without the sign of a rounded zero ("-0.00" is
    "0.00"); strings and None are returned as text.

    Example:
      >>> format_number(-0.0004, 3), format_number(-1.236), format_number(None)
      ('0.000', '-1.24', 'None')
    """
    if isinstance(value, str) or value is None:
        return str(value)
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def markdown_table(rows, columns, *, align: str | None = None) -> str:
    """A GitHub markdown table: one line per row, one column per ``(header, cell)`` pair.

    Args:
      rows: the items to tabulate (dicts, say).
      columns: ``(header, cell)`` pairs; ``cell(row)`` returns the cell's text.
      align: one letter per column, ``l`` (left) or ``r`` (right); None: all left.

    Returns:
      The table, ending in a newline.

    Example:
      >>> print(markdown_table([{"k": 1}], [("k", lambda r: str(r["k"]))], align="r"), end="")
      | k |
      |---:|
      | 1 |
    """
    align = "l" * len(columns) if align is None else align
    if len(align) != len(columns) or set(align) - {"l", "r"}:
        raise ValueError(f"align must be one of 'l'/'r' per column; got {align!r}.")
    rule = "|".join("---:" if a == "r" else "---" for a in align)
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded to 0.01 (None where unavailable)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def summarise(rows: list[Mapping]) -> dict:
    """Mean and standard deviation over runs (seeds, say) of every number in the rows.

    For each key of the first row holding a number, ``{"mean": float, "std": float}``; for
    one holding a list of numbers, the same element by element (lists). Other values are
    left out. ``std`` is the population standard deviation (``ddof=0``), so one run gives 0.

    Example:
      >>> summarise([{"a": 1.0, "b": [1, 2], "s": "x"}, {"a": 3.0, "b": [3, 2], "s": "y"}])
      {'a': {'mean': 2.0, 'std': 1.0}, 'b': {'mean': [2.0, 2.0], 'std': [1.0, 0.0]}}
    """
    if not rows:
        raise ValueError("rows must hold at least one run.")
    summary = {}
    for name, value in rows[0].items():
        if isinstance(value, list | int | float):
            arr = np.asarray([row[name] for row in rows], dtype=float)
            mean, std = arr.mean(0), arr.std(0)
            summary[name] = (
                {"mean": mean.tolist(), "std": std.tolist()}
                if isinstance(value, list)
                else {"mean": float(mean), "std": float(std)}
            )
    return summary


def fingerprint(config, *, skip=(), **extra) -> str:
    """A short hash (16 hex digits) of a config's fields, less ``skip``, plus ``extra``.

    A run that resumes from checkpoints stores it (``emvi.train.fit``'s
    ``config_fingerprint``), so a resume under other settings is refused; ``skip`` names
    the fields that do not change what is trained (paths, flags, evaluation settings).
    """
    import hashlib

    fields = {k: v for k, v in to_jsonable(config).items() if k not in set(skip)}
    fields.update(to_jsonable(extra))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
