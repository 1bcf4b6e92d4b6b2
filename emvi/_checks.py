"""Eager input validation shared by the public wrappers.

These run outside ``jit`` on concrete values and raise ``ValueError`` with a sentence a
user can act on. Inside jitted code nothing is validated: the wrappers guarantee clean
input, and the maths is written so clean input never produces NaN.
"""

from __future__ import annotations

import jax
import numpy as np


def as_data_matrix(x, *, name: str = "x", min_rows: int = 1) -> np.ndarray:
    """Returns ``x`` as a finite 2-D floating array, or raises ``ValueError``.

    Integer and boolean input becomes float32; float64 input stays float64 only when JAX's
    x64 mode is on (otherwise JAX would truncate it to float32 anyway, with a warning).
    """
    try:
        arr = np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} could not be converted to an array: {err}") from err
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape (num_points, dim); got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.floating):
        if np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
            arr = arr.astype(np.float32)
        else:
            raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}.")
    if arr.dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        # What JAX would do anyway, minus a warning per array: without x64, float64 input
        # runs in float32.
        arr = arr.astype(np.float32)
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows; got {arr.shape[0]}.")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least one column; got shape {arr.shape}.")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        shown = ", ".join(str(r) for r in rows[:5]) + (" ..." if rows.size > 5 else "")
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf) "
            f"in row(s) {shown}; remove or impute them first."
        )
    return arr


def check_positive_int(value, *, name: str, minimum: int = 1) -> int:
    """Checks an integer hyperparameter is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return int(value)


def check_nonnegative(value, *, name: str) -> float:
    """Checks a real hyperparameter is finite and >= 0."""
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")
    return v


def check_positive(value, *, name: str) -> float:
    """Checks a real hyperparameter is finite and > 0."""
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return v


def check_choice(value, *, name: str, choices) -> str:
    """Checks ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}.")
    return value


def check_sample_weight(sample_weight, num_points: int) -> np.ndarray | None:
    """Validates per-point weights: 1-D, length n, finite, >= 0, not all zero."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight)
    if w.ndim != 1 or w.shape[0] != num_points:
        raise ValueError(
            f"sample_weight must have shape ({num_points},) to match x; got {w.shape}."
        )
    if not np.issubdtype(w.dtype, np.number) or w.dtype == bool:
        raise ValueError(f"sample_weight must be numeric; got dtype {w.dtype}.")
    if not np.all(np.isfinite(w)):
        raise ValueError("sample_weight contains NaN or inf.")
    if np.any(w < 0):
        raise ValueError("sample_weight must be >= 0 everywhere.")
    if not np.any(w > 0):
        raise ValueError("sample_weight is zero everywhere; at least one point needs weight.")
    return w


def check_em_settings(*, max_iter, tol, num_init, chunk_size) -> tuple[int, float, int, int | None]:
    """Validates the loop settings every EM ``fit`` takes; returns them cleaned.

    ``max_iter`` and ``num_init`` are integers >= 1, ``tol`` a finite number >= 0 and
    ``chunk_size`` None or an integer >= 1.
    """
    max_iter = check_positive_int(max_iter, name="max_iter")
    num_init = check_positive_int(num_init, name="num_init")
    tol = check_nonnegative(tol, name="tol")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, name="chunk_size")
    return max_iter, tol, num_init, chunk_size
