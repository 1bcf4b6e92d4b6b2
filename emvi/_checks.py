"""Eager input validation shared by the public wrappers.

These run outside ``jit`` on concrete values and raise ``ValueError`` with a sentence a
user can act on. Inside jitted code nothing is validated: the wrappers guarantee clean
input, and the maths is written so clean input never produces NaN. Functions that may be
called inside ``jit`` (the ELBO toolkit, :mod:`emvi.vq`, :mod:`emvi.mmd`,
:mod:`emvi.metrics`) check shapes and dtypes always (they are static) and values only when
the array is concrete (:func:`is_concrete`).

Three rules hold everywhere in emvi:

* **Dtypes** (:func:`float_dtype`): float32 and float64 are kept (float64 becomes float32
  when JAX's x64 mode is off, which is what JAX would do anyway); integers and booleans
  become float32; complex numbers, float16, bfloat16 and extended precision are refused
  with a ``ValueError`` (a complex array would otherwise lose its imaginary part silently,
  and half precision fails deep inside the linear algebra).
* **Keys** (:func:`as_key`): where a PRNG key is expected, a typed key
  (``jax.random.key(seed)``), a raw ``uint32`` key of shape (2,) (``jax.random.PRNGKey``)
  or a plain integer seed (meaning ``jax.random.key(seed)``) is accepted; anything else
  is refused with a ``ValueError`` naming the argument.
* **Numbers** (:func:`check_number` and the range checks built on it): a numeric
  hyperparameter must be a real number; ``None``, strings and arrays of more than one
  element are refused with a ``ValueError`` naming it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """Whether every leaf's value can be read here: False for a value traced by
    ``jit``/``grad``/``vmap`` (unknown until run) and for an array spread over devices of
    other processes (only its local shards are here)."""
    for leaf in jax.tree_util.tree_leaves(x):
        if isinstance(leaf, jax.core.Tracer):
            return False
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return False
    return True


def float_dtype(dtype, *, name: str = "x") -> np.dtype:
    """The one dtype rule of emvi: the floating dtype an input of ``dtype`` is computed in.

    float32 and float64 are kept (float64 runs in float32 when x64 is off); integers and
    booleans become float32; anything else (complex, float16, bfloat16, longdouble,
    strings, objects) raises ``ValueError``.

    Example:
      >>> float_dtype(np.int64).name
      'float32'
      >>> float_dtype(np.complex64, name="x")
      Traceback (most recent call last):
        ...
      ValueError: x is complex (complex64); emvi works with real numbers: pass x.real or abs(x).
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name} must be numeric; got dtype {dtype!r}.") from err
    if dt == np.float64:
        return dt if jax.config.read("jax_enable_x64") else np.dtype(np.float32)
    if dt == np.float32:
        return dt
    if dt == np.bool_ or np.issubdtype(dt, np.integer):
        return np.dtype(np.float32)
    if np.issubdtype(dt, np.complexfloating):
        raise ValueError(
            f"{name} is complex ({dt}); emvi works with real numbers: pass {name}.real or "
            f"abs({name})."
        )
    if np.issubdtype(dt, np.floating) or jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name} has dtype {dt}; emvi computes in float32 or float64: cast it.")
    raise ValueError(f"{name} must be numeric; got dtype {dt}.")


def _describe_bad(bad: np.ndarray) -> str:
    if bad.ndim == 0:
        return ""
    rows = np.unique(np.nonzero(bad)[0])
    shown = ", ".join(str(r) for r in rows[:5]) + (" ..." if rows.size > 5 else "")
    return f" in row(s) {shown}"


def as_data_matrix(
    x, *, name: str = "x", min_rows: int = 1, allow_missing: bool = False
) -> np.ndarray:
    """Returns ``x`` as a finite 2-D floating NumPy array, or raises ``ValueError``.

    The dtype follows :func:`float_dtype`. With ``allow_missing=True`` NaN entries are
    kept (they mean "missing"; a row may not be entirely missing), but infinities are
    still refused.
    """
    if x is None:
        raise ValueError(f"{name} must be an array; got None.")
    try:
        arr = np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} could not be converted to an array: {err}") from err
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape (num_points, dim); got shape {arr.shape}.")
    dtype = float_dtype(arr.dtype, name=name)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows; got {arr.shape[0]}.")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least one column; got shape {arr.shape}.")
    bad = np.isinf(arr) if allow_missing else ~np.isfinite(arr)
    if bad.any():
        what = "infinite" if allow_missing else "non-finite"
        raise ValueError(
            f"{name} contains {int(bad.sum())} {what} value(s) (NaN or inf)"
            f"{_describe_bad(bad)}; remove or impute them first."
        )
    if allow_missing:
        empty = np.all(np.isnan(arr), axis=1)
        if empty.any():
            raise ValueError(
                f"{name} has {int(empty.sum())} row(s) with every entry missing (NaN)"
                f"{_describe_bad(empty)}; drop them."
            )
    return arr


def as_array(x, *, name: str, ndim: int | None = None, min_ndim: int | None = None):
    """Checks an array argument of a function that may run under ``jit``.

    Always (static information): the dtype rule (:func:`float_dtype`; integers and
    booleans are cast to float32) and the number of axes. Only for concrete arrays:
    every entry is finite. Returns a JAX array (NumPy input and lists are converted).
    """
    if x is None:
        raise ValueError(f"{name} must be an array; got None.")
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        try:
            x = np.asarray(x)
        except Exception as err:  # pragma: no cover - exotic inputs
            raise ValueError(f"{name} could not be converted to an array: {err}") from err
    dtype = float_dtype(x.dtype, name=name)
    if isinstance(x, jax.core.Tracer):
        x = x.astype(dtype) if x.dtype != dtype else x
    else:
        x = jnp.asarray(x, dtype)
    if ndim is not None and x.ndim != ndim:
        axes = {1: "1-D", 2: "2-D with shape (num_points, dim)"}.get(ndim, f"{ndim}-D")
        raise ValueError(f"{name} must be {axes}; got shape {tuple(x.shape)}.")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} needs at least {min_ndim} axes; got shape {tuple(x.shape)}.")
    if is_concrete(x):
        bad = ~np.isfinite(np.asarray(x))
        if bad.any():
            raise ValueError(
                f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf)"
                f"{_describe_bad(bad)}."
            )
    return x


def check_columns(x, dim: int, *, name: str = "x", what: str = "the params") -> None:
    """Data given to a scoring function (``log_prob``, ``posterior``, ...): 2-D with ``dim``
    columns to match ``what`` (static, so also under ``jit``), and finite when concrete
    (NaN rows would otherwise score NaN, or silently land in some component)."""
    shape = tuple(jnp.shape(x))
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D with shape (n, {dim}); got shape {shape}.")
    if shape[1] != dim:
        raise ValueError(f"{name} has {shape[1]} columns but {what} have {dim}.")
    if is_concrete(x):
        bad = ~np.isfinite(np.asarray(x))
        if bad.any():
            raise ValueError(
                f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf)"
                f"{_describe_bad(bad)}; score observed entries with observed_log_prob, or "
                "impute them first."
            )


def check_positive_array(x, *, name: str, what: str = "") -> None:
    """For a concrete array: every entry > 0 (traced arrays are not checked)."""
    if is_concrete(x) and not bool(np.all(np.asarray(x) > 0)):
        bad = int(np.sum(~(np.asarray(x) > 0)))
        raise ValueError(f"{name} must be > 0 everywhere{what}; {bad} entr(y/ies) are not.")


def check_same_shape(*arrays_and_names) -> None:
    """Raises ``ValueError`` unless the ``(array, name)`` pairs all have one shape."""
    shapes = [(name, tuple(a.shape)) for a, name in arrays_and_names]
    if len({s for _, s in shapes}) > 1:
        listed = ", ".join(f"{name} {s}" for name, s in shapes)
        raise ValueError(
            f"{' and '.join(n for n, _ in shapes)} must have the same shape; got {listed}."
        )


def as_key(key, *, name: str = "key"):
    """The one key rule: returns a typed PRNG key, or raises ``ValueError``.

    A typed key (``jax.random.key(seed)``, traced or not) is returned as it is; a raw
    ``uint32`` key of shape (..., 2) (``jax.random.PRNGKey(seed)``) is wrapped; a plain
    integer is the seed of ``jax.random.key``. Anything else is refused.

    Example:
      >>> as_key(0) == jax.random.key(0)
      Array(True, dtype=bool)
      >>> as_key(0.5)
      Traceback (most recent call last):
        ...
      ValueError: key must be a JAX PRNG key (jax.random.key(seed)) or an integer seed; got 0.5.
    """
    if isinstance(key, bool | np.bool_):
        pass
    elif isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    elif hasattr(key, "dtype") and hasattr(key, "shape"):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            return key
        if key.dtype == np.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
            return jax.random.wrap_key_data(key)
        if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer) and is_concrete(key):
            return jax.random.key(int(key))
    shown = repr(key) if not hasattr(key, "shape") else f"an array of {key.dtype}{tuple(key.shape)}"
    raise ValueError(
        f"{name} must be a JAX PRNG key (jax.random.key(seed)) or an integer seed; got {shown}."
    )


def check_number(value, *, name: str) -> float:
    """Returns ``value`` as a Python float, or raises ``ValueError`` (None, strings, complex,
    arrays of more than one element)."""
    if value is None or isinstance(value, str | bytes | complex):
        raise ValueError(f"{name} must be a real number; got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a real number; got {value!r}.") from err


def check_positive_int(value, *, name: str, minimum: int = 1) -> int:
    """Checks an integer hyperparameter is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return int(value)


def check_nonnegative(value, *, name: str) -> float:
    """Checks a real hyperparameter is finite and >= 0."""
    v = check_number(value, name=name)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")
    return v


def check_positive(value, *, name: str) -> float:
    """Checks a real hyperparameter is finite and > 0."""
    v = check_number(value, name=name)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return v


def check_choice(value, *, name: str, choices) -> str:
    """Checks ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}.")
    return value


def check_sample_weight(
    sample_weight, num_points: int, *, name: str = "sample_weight"
) -> np.ndarray | None:
    """Validates per-point weights: 1-D, length n, finite, >= 0, not all zero."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight)
    if w.ndim != 1 or w.shape[0] != num_points:
        raise ValueError(f"{name} must have shape ({num_points},) to match x; got {w.shape}.")
    if not np.issubdtype(w.dtype, np.number) or w.dtype == bool:
        raise ValueError(f"{name} must be numeric; got dtype {w.dtype}.")
    if np.issubdtype(w.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real; got dtype {w.dtype}.")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} contains NaN or inf.")
    if np.any(w < 0):
        raise ValueError(f"{name} must be >= 0 everywhere.")
    if not np.any(w > 0):
        raise ValueError(f"{name} is zero everywhere; at least one point needs weight.")
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
