r"""EM on data larger than memory: chunk sources, streamed batch EM, online and incremental EM.

Exact EM scales the way its maths allows. The E-step's expected sufficient statistics are
sums over examples,

.. math::
    S(\theta) = \sum_{i=1}^n w_i\, E_{p_\theta(z \mid x_i)}[T(x_i, z)]
              = \sum_{c} \underbrace{\sum_{i \in c} w_i\, E[T(x_i, z)]}_{S_c(\theta)},

so a pass over the data in chunks ``c`` that adds the :math:`S_c` gives the same statistics
as one pass over all of it, while only one chunk (and the arrays derived from it:
responsibilities, packed outer products) is ever in memory. Three algorithms use that,
generic over every :class:`emvi.em.ExactModel`:

* :func:`fit_source`, **batch EM** over a :class:`Source`: each iteration streams every chunk
  through the jitted E-step and adds the statistics, then takes the closed-form M-step. Equal
  to in-memory EM (:func:`emvi.em.fit` with the same ``chunk_size``) up to reassociation.
* :func:`online_em`, **stepwise online EM** (Cappé & Moulines, 2009): running *mean*
  statistics :math:`\bar s_t = (1 - \rho_t)\, \bar s_{t-1} + \rho_t\, \bar s(\text{batch}_t)`
  with :math:`\rho_t = (t + t_0)^{-\alpha}`, :math:`\alpha \in (0.5, 1]`, and an M-step after
  every minibatch (on :math:`n \bar s_t`, so a MAP prior keeps its weight against n points).
* :func:`incremental_em`, **incremental EM** (Neal & Hinton, 1998): the statistics of every
  chunk are kept; visiting chunk c swaps its old :math:`S_c` for the new one,
  :math:`S \leftarrow S - S_c^{old} + S_c(\theta)`, and the M-step follows at once. Each
  visit raises the free energy :math:`F(q_{1:C}, \theta) = \sum_c \mathrm{ELBO}_c(q_c, \theta)`
  (the partial E-step raises it in :math:`q_c`, the M-step in :math:`\theta`).

A :class:`Source` yields fixed-size chunks (the last one padded with zero-weight copies of its
first row, so one compiled E-step serves every chunk) from an in-memory array, a
memory-mapped ``.npy`` file, or a callable that returns an iterator of chunks; with a
``seed`` it shuffles per epoch (the order of chunk-sized blocks and the rows inside each
chunk, so a memory-mapped file is still read in contiguous blocks).

Statistics are accumulated on the device in the dtype of the parameters; the loops over
chunks and iterations run in Python (each chunk is a host-to-device copy), which is what a
data set that does not fit requires.

Shape letters: ``n`` data points, ``c`` chunk size, ``d`` data dimension.

Example:
  >>> import numpy as np
  >>> from emvi import bernoulli_mixture as bm, em
  >>> x = (np.random.default_rng(0).random((300, 6)) < 0.3).astype(np.float32)
  >>> p0 = bm.init_params(jax.random.key(0), jnp.asarray(x), 3)
  >>> res = fit_source(bm.model(), p0, from_array(x, chunk_size=64), max_iter=5, tol=0.0)
  >>> ref = em.fit(bm.model(), jax.tree_util.tree_map(lambda a: a[None], p0), jnp.asarray(x),
  ...              max_iter=5, tol=0.0, chunk_size=64)
  >>> bool(jnp.allclose(res.log_likelihood, ref.log_likelihood, rtol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from emvi import _checks, em

PyTree = Any


# ---------------------------------------------------------------------------------------
# Sources of chunks
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """A re-iterable source of fixed-size data chunks.

    Build one with :func:`from_array`, :func:`from_npy` or :func:`from_callable`.

    Attributes:
      chunk_size: rows per chunk (every chunk has exactly this many; the last is padded
        with zero-weight rows).
      dim: columns of every chunk.
      dtype: floating dtype of every chunk.
      num_points: total rows, or None when the source cannot tell before a pass (a
        callable source).
      seed: shuffle per epoch with this seed (None: in order).
    """

    chunk_size: int
    dim: int
    dtype: np.dtype
    num_points: int | None
    seed: int | None
    _chunks: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]
    _describe: str = ""

    def chunks(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(x_chunk, w_chunk)`` of shapes (c, d) and (c,) for one pass (epoch).

        Raises:
          ValueError: when a chunk differs in dimension or dtype from the first, holds
            NaN or inf, or the source is empty.
        """
        count = 0
        for x, w in self._chunks(epoch):
            count += 1
            yield x, w
        if count == 0:
            raise ValueError(f"the data source {self._describe} yielded no chunks (it is empty).")


def _pad(x: np.ndarray, w: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads a short chunk to ``size`` rows with zero-weight copies of its first row."""
    short = size - x.shape[0]
    if short == 0:
        return x, w
    x = np.concatenate([x, np.broadcast_to(x[:1], (short, x.shape[1]))], axis=0)
    w = np.concatenate([w, np.zeros(short, w.dtype)])
    return x, w


def _check_chunk(x: np.ndarray, *, dim: int, dtype, where: str) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"{where} has shape {x.shape}, but the source's chunks have {dim} columns; every "
            "chunk must be 2-D with the same number of columns."
        )
    if x.dtype != dtype:
        raise ValueError(
            f"{where} has dtype {x.dtype}, but the source's chunks are {np.dtype(dtype)}; every "
            "chunk must have the same dtype."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where} contains NaN or inf; remove or impute them first.")


def _float_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float32)
    if dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        dtype = np.dtype(np.float32)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"data must be float32 or float64 (or integer/boolean); got {dtype}.")
    return dtype


def _row_source(
    rows: Any, weights: np.ndarray | None, chunk_size: int, seed: int | None, describe: str
) -> Source:
    """A source over a 2-D array-like with random access by row blocks (array or memmap)."""
    n, d = rows.shape
    dtype = _float_dtype(rows.dtype)
    num_chunks = -(-n // chunk_size)

    def chunks(epoch: int):
        order = np.arange(num_chunks)
        rng = None
        if seed is not None:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(num_chunks)
        for j, c in enumerate(order):
            lo, hi = int(c) * chunk_size, min(n, (int(c) + 1) * chunk_size)
            x = np.asarray(rows[lo:hi]).astype(dtype, copy=False)
            w = np.ones(hi - lo, dtype) if weights is None else weights[lo:hi].astype(dtype)
            if rng is not None:
                perm = rng.permutation(hi - lo)
                x, w = x[perm], w[perm]
            _check_chunk(x, dim=d, dtype=dtype, where=f"chunk {j} of {describe}")
            yield _pad(x, w, chunk_size)

    return Source(chunk_size, d, dtype, n, seed, chunks, describe)


def from_array(x, *, chunk_size: int, sample_weight=None, seed: int | None = None) -> Source:
    """A source over an in-memory array (n, d), in chunks of ``chunk_size`` rows.

    Args:
      x: data (n, d); integers and booleans become float32.
      chunk_size: rows per chunk (>= 1).
      sample_weight: optional (n,) non-negative weights.
      seed: shuffle the chunk order and the rows inside each chunk every epoch.
    """
    chunk_size = _checks.check_positive_int(chunk_size, name="chunk_size")
    arr = _checks.as_data_matrix(x)
    w = _checks.check_sample_weight(sample_weight, arr.shape[0])
    return _row_source(arr, w, chunk_size, seed, "the array")


class _NpyBlocks:
    """Row blocks of a C-ordered ``.npy`` file, read with ``seek`` + ``fromfile``.

    Unlike a memory map, whose pages stay resident (and count as the process's memory)
    once touched, each read here allocates just the block, which is freed with it: the
    process holds O(chunk) of the data however large the file.
    """

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, offset: int):
        self.path, self.shape, self.dtype, self.offset = path, shape, dtype, offset

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi, _ = rows.indices(self.shape[0])
        d = self.shape[1]
        with open(self.path, "rb") as f:
            f.seek(self.offset + lo * d * self.dtype.itemsize)
            block = np.fromfile(f, dtype=self.dtype, count=(hi - lo) * d)
        return block.reshape(hi - lo, d)


def from_npy(path: str | os.PathLike, *, chunk_size: int, seed: int | None = None) -> Source:
    """A source over a ``.npy`` file: only one chunk of it is read into memory at a time.

    C-ordered files are read block by block with ``seek`` and ``fromfile`` (so the process's
    resident memory stays O(chunk)); Fortran-ordered ones through a memory map.

    Raises:
      ValueError: when the file does not exist, is not a ``.npy`` array, or is not a 2-D
        numeric array.
    """
    chunk_size = _checks.check_positive_int(chunk_size, name="chunk_size")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file.")
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable .npy array: {err}") from err
    if not isinstance(rows, np.ndarray) or rows.ndim != 2:
        shape = getattr(rows, "shape", None)
        raise ValueError(f"{path} must hold a 2-D array (num_points, dim); it holds shape {shape}.")
    if not (np.issubdtype(rows.dtype, np.number) or rows.dtype == bool):
        raise ValueError(f"{path} must hold a numeric array; it holds dtype {rows.dtype}.")
    if rows.shape[0] < 1 or rows.shape[1] < 1:
        raise ValueError(f"{path} holds an empty array of shape {rows.shape}.")
    if rows.flags.c_contiguous and rows.dtype.hasobject is False:
        rows = _NpyBlocks(path, rows.shape, rows.dtype, int(rows.offset))
    return _row_source(rows, None, chunk_size, seed, str(path))


def from_callable(
    make_chunks: Callable[[int], Iterable], *, chunk_size: int, num_points: int | None = None
) -> Source:
    """A source over a user's generator of chunks.

    ``make_chunks(epoch)`` returns an iterable of chunks, each an array (m, d) with
    ``m <= chunk_size``, or a pair ``(x, w)`` with per-row weights; it is called once per
    pass, so it must be able to start again (read a file anew, re-seed a generator). Chunks
    longer than ``chunk_size`` are split. The first chunk fixes the dimension and dtype.
    Shuffling is the callable's business (it receives the epoch).
    """
    chunk_size = _checks.check_positive_int(chunk_size, name="chunk_size")
    if not callable(make_chunks):
        raise ValueError("make_chunks must be a callable epoch -> iterable of chunks.")
    first = next(iter(make_chunks(0)), None)
    if first is None:
        raise ValueError("the data source (a callable) yielded no chunks (it is empty).")
    first_x = np.asarray(first[0] if isinstance(first, tuple) else first)
    if first_x.ndim != 2:
        raise ValueError(
            f"each chunk must be 2-D (rows, dim); the first has shape {first_x.shape}."
        )
    d = first_x.shape[1]
    dtype = _float_dtype(first_x.dtype)

    def chunks(epoch: int):
        for j, item in enumerate(make_chunks(epoch)):
            x, w = item if isinstance(item, tuple) else (item, None)
            x = np.asarray(x)
            where = f"chunk {j} of the callable source"
            if x.ndim != 2 or x.shape[1] != d:
                _check_chunk(x, dim=d, dtype=dtype, where=where)
            if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
                x = x.astype(dtype)
            _check_chunk(x, dim=d, dtype=dtype, where=where)
            w = np.ones(x.shape[0], dtype) if w is None else np.asarray(w, dtype)
            if w.shape != (x.shape[0],) or np.any(w < 0) or not np.all(np.isfinite(w)):
                raise ValueError(
                    f"the weights of {where} must be finite, >= 0, shape ({x.shape[0]},)."
                )
            for lo in range(0, x.shape[0], chunk_size):
                yield _pad(x[lo : lo + chunk_size], w[lo : lo + chunk_size], chunk_size)

    return Source(chunk_size, d, dtype, num_points, None, chunks, "(a callable)")


def as_source(data, *, chunk_size: int, seed: int | None = None) -> Source:
    """A :class:`Source` from an array, a ``.npy`` path, a memmap, a callable, or a Source."""
    if isinstance(data, Source):
        return data
    if isinstance(data, str | os.PathLike):
        return from_npy(data, chunk_size=chunk_size, seed=seed)
    if isinstance(data, np.memmap):
        chunk_size = _checks.check_positive_int(chunk_size, name="chunk_size")
        if data.ndim != 2:
            raise ValueError(f"the memmap must be 2-D (num_points, dim); got shape {data.shape}.")
        return _row_source(data, None, chunk_size, seed, "the memmap")
    if callable(data):
        return from_callable(data, chunk_size=chunk_size)
    return from_array(data, chunk_size=chunk_size, seed=seed)


# ---------------------------------------------------------------------------------------
# Jitted pieces shared by the three algorithms
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model",))
def _chunk_e_step(model: em.ExactModel, params, x, w):
    return model.e_step(params, model.prepare_data(x), w)


@functools.partial(jax.jit, static_argnames=("model",))
def _chunk_log_lik(model: em.ExactModel, params, x, w):
    return jnp.sum(w * model.log_prob(params, model.prepare_data(x)))


@jax.jit
def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


@jax.jit
def _tree_axpy(a, x, b):
    """``(1 - a) * x + a * b`` leaf by leaf (the stepwise update)."""
    return jax.tree_util.tree_map(lambda u, v: (1 - a) * u + a * v, x, b)


@jax.jit
def _tree_swap(total, old, new):
    return jax.tree_util.tree_map(lambda t, o, n_: t - o + n_, total, old, new)


@jax.jit
def _tree_scale(a, x):
    return jax.tree_util.tree_map(lambda u: a * u, x)


@functools.partial(jax.jit, static_argnames=("model",))
def _m_step(model: em.ExactModel, stats, hyper):
    return model.m_step(stats, hyper)


def _dtype_of(params) -> np.dtype:
    return np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)


def _check_source_matches(source: Source, params) -> None:
    if source.dtype != _dtype_of(params):
        raise ValueError(
            f"the source's chunks are {source.dtype} but the parameters are "
            f"{_dtype_of(params)}; cast one to the other."
        )


def _e_pass(model, params, source: Source, epoch: int, progress) -> tuple[PyTree, Array, float]:
    """One full pass: summed statistics, summed log-likelihood and total weight."""
    stats = ll = None
    wsum = 0.0
    for x, w in source.chunks(epoch):
        s, l_ = _chunk_e_step(model, params, jnp.asarray(x), jnp.asarray(w))
        stats = s if stats is None else _tree_add(stats, s)
        ll = l_ if ll is None else ll + l_
        wsum += float(np.sum(w, dtype=np.float64))
        if progress is not None:
            progress.update(1)
    return stats, ll, wsum


def _progress(enabled: bool, total: int | None, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------
# Batch EM over a source, with resumable checkpoints of the statistics
# ---------------------------------------------------------------------------------------


class StreamState(NamedTuple):
    """What :func:`fit_source` checkpoints after every iteration (enough to resume)."""

    params: PyTree
    iteration: int
    history: list[float]


def _save_state(path: Path, state: StreamState) -> None:
    """Atomic checkpoint: leaves in an ``.npz``, the rest in JSON, both via rename."""
    path.mkdir(parents=True, exist_ok=True)
    leaves, _ = jax.tree_util.tree_flatten(state.params)
    tmp = path / "params.tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, *[np.asarray(a) for a in leaves])
    os.replace(tmp, path / "params.npz")
    meta = {"iteration": state.iteration, "history": state.history}
    (path / "state.tmp.json").write_text(json.dumps(meta))
    os.replace(path / "state.tmp.json", path / "state.json")


def _load_state(path: Path, like: PyTree) -> StreamState | None:
    if not (path / "state.json").is_file() or not (path / "params.npz").is_file():
        return None
    try:
        meta = json.loads((path / "state.json").read_text())
        with np.load(path / "params.npz") as z:
            arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    except Exception as err:
        raise ValueError(f"the stream checkpoint in {path} is damaged: {err}") from err
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if len(arrays) != len(leaves) or any(
        a.shape != np.shape(b) or a.dtype != np.asarray(b).dtype
        for a, b in zip(arrays, leaves, strict=True)
    ):
        raise ValueError(
            f"the stream checkpoint in {path} holds parameters of other shapes or dtypes than "
            "the initial parameters given; resume with the same model and settings."
        )
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])
    return StreamState(params, int(meta["iteration"]), [float(v) for v in meta["history"]])


def fit_source(
    model: em.ExactModel,
    params: PyTree,
    source: Source,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    hyper: PyTree = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> em.FitResult:
    """Batch EM over a :class:`Source`, holding one chunk at a time.

    The same iteration and stopping rule as :func:`emvi.em.run_em` (iteration t records the
    mean log-likelihood of the parameters it starts from; stop when two records differ by
    less than ``tol``), with the E-step streamed over the chunks. With ``checkpoint_dir``
    the parameters and history are written after every iteration (atomically), and a call
    with the same directory resumes from the last one: a fit interrupted mid-stream loses at
    most the pass it was in.

    Args:
      model: an :class:`emvi.em.ExactModel`.
      params: initial parameters (one restart), in the dtype of the source's chunks.
      source: the data (:func:`from_array`, :func:`from_npy`, :func:`from_callable`).
      max_iter: the most iterations (>= 1).
      tol: the stopping tolerance (>= 0; 0 runs exactly ``max_iter``).
      hyper: the model's hyperparameters for ``m_step``.
      checkpoint_dir: where to keep the resumable state (None: nowhere).
      progress: a tqdm bar over chunks.

    Returns:
      An :class:`emvi.em.FitResult` (``restart_log_likelihoods`` has one entry).
    """
    max_iter, tol, _, _ = _checks.check_em_settings(
        max_iter=max_iter, tol=tol, num_init=1, chunk_size=None
    )
    if not isinstance(source, Source):
        raise ValueError("source must be a emvi.stream.Source (see from_array / from_npy).")
    _check_source_matches(source, params)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    history: list[float] = []
    start = 0
    if ckpt is not None:
        resumed = _load_state(ckpt, params)
        if resumed is not None:
            params, start, history = resumed.params, resumed.iteration, resumed.history
    converged = len(history) >= 2 and abs(history[-1] - history[-2]) < tol
    num_chunks = None if source.num_points is None else -(-source.num_points // source.chunk_size)
    bar = _progress(progress, None if num_chunks is None else num_chunks * max_iter, "EM pass")
    it = start
    while it < max_iter and not converged:
        stats, ll_sum, wsum = _e_pass(model, params, source, it, bar)
        ll = float(ll_sum) / wsum
        converged = bool(history) and abs(ll - history[-1]) < tol
        history.append(ll)
        params = _m_step(model, stats, hyper)
        it += 1
        if ckpt is not None:
            _save_state(ckpt, StreamState(params, it, history))
    if bar is not None:
        bar.close()
    final = final_log_likelihood(model, params, source)
    dtype = _dtype_of(params)
    hist = np.full(max_iter, np.nan, dtype)
    hist[: len(history)] = history
    return em.FitResult(
        params,
        jnp.asarray(final, dtype),
        jnp.asarray(hist),
        jnp.asarray(it, jnp.int32),
        jnp.asarray(converged),
        jnp.asarray([final], dtype),
    )


def final_log_likelihood(model: em.ExactModel, params: PyTree, source: Source) -> float:
    """The weighted mean :math:`\\log p(x_i)` over a source, in one streamed pass."""
    total, wsum = 0.0, 0.0
    for x, w in source.chunks(0):
        total += float(_chunk_log_lik(model, params, jnp.asarray(x), jnp.asarray(w)))
        wsum += float(np.sum(w, dtype=np.float64))
    return total / wsum


# ---------------------------------------------------------------------------------------
# Stepwise online EM (Cappé & Moulines, 2009)
# ---------------------------------------------------------------------------------------


class OnlineInfo(NamedTuple):
    """What :func:`online_em` records after every minibatch (host-side lists)."""

    step: list[int]
    step_size: list[float]
    batch_log_likelihood: list[float]  # mean log p(x) of the minibatch at the params before it


def step_size(t: int | Array, *, alpha: float, t0: float) -> Float[Array, ""] | float:
    r""":math:`\rho_t = (t + t_0)^{-\alpha}`, the stepwise-EM step size for minibatch t >= 1."""
    return (t + t0) ** (-alpha)


def check_step_exponent(alpha: float, *, name: str = "alpha") -> float:
    """Checks a Robbins-Monro exponent lies in (0.5, 1] (so sum rho = inf, sum rho^2 < inf)."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0.5, 1]; got {alpha!r}.") from None
    if not (0.5 < a <= 1.0):
        raise ValueError(
            f"{name} must lie in (0.5, 1] (so that the step sizes sum to infinity while their "
            f"squares do not); got {alpha!r}."
        )
    return a


def online_em(
    model: em.ExactModel,
    params: PyTree,
    source: Source,
    *,
    num_epochs: int = 1,
    alpha: float = 0.6,
    t0: float = 2.0,
    hyper: PyTree = None,
    num_points: int | None = None,
    callback: Callable[[int, PyTree], None] | None = None,
) -> tuple[PyTree, OnlineInfo]:
    r"""Stepwise online EM: an M-step after every minibatch (chunk) of the source.

    With :math:`\bar s(\text{batch})` the minibatch's statistics divided by its total weight,

    .. math::
        \bar s_1 = \bar s(\text{batch}_1), \qquad
        \bar s_t = (1 - \rho_t)\, \bar s_{t-1} + \rho_t\, \bar s(\text{batch}_t), \qquad
        \theta_t = \text{m\_step}(N \bar s_t),

    :math:`\rho_t = (t + t_0)^{-\alpha}`. :math:`N` is the source's total weight when known
    (``num_points``, else the source's row count, else the minibatch weight), so that a MAP
    prior is weighed against the whole data set as in batch EM.

    Args:
      model: an :class:`emvi.em.ExactModel`.
      params: initial parameters.
      source: the stream; its chunks are the minibatches (shuffle with its ``seed``).
      num_epochs: passes over the source (>= 1).
      alpha: step-size exponent in (0.5, 1].
      t0: step-size offset (>= 0; larger forgets the start more slowly).
      hyper: the model's hyperparameters for ``m_step``.
      num_points: N, the data set's total weight (None: the source's).
      callback: called as ``callback(t, params)`` after every M-step (for curves).

    Returns:
      ``(params, info)``.
    """
    alpha = check_step_exponent(alpha)
    t0 = _checks.check_nonnegative(t0, name="t0")
    num_epochs = _checks.check_positive_int(num_epochs, name="num_epochs")
    _check_source_matches(source, params)
    total = num_points if num_points is not None else source.num_points
    dtype = _dtype_of(params)
    mean_stats = None
    t = 0
    info = OnlineInfo([], [], [])
    for epoch in range(num_epochs):
        for x, w in source.chunks(epoch):
            t += 1
            s, ll = _chunk_e_step(model, params, jnp.asarray(x), jnp.asarray(w))
            wsum = float(np.sum(w, dtype=np.float64))
            batch_mean = _tree_scale(jnp.asarray(1.0 / wsum, dtype), s)
            rho = 1.0 if mean_stats is None else float(step_size(t, alpha=alpha, t0=t0))
            mean_stats = (
                batch_mean
                if mean_stats is None
                else _tree_axpy(jnp.asarray(rho, dtype), mean_stats, batch_mean)
            )
            scale = float(total) if total is not None else wsum
            params = _m_step(model, _tree_scale(jnp.asarray(scale, dtype), mean_stats), hyper)
            info.step.append(t)
            info.step_size.append(rho)
            info.batch_log_likelihood.append(float(ll) / wsum)
            if callback is not None:
                callback(t, params)
    return params, info


# ---------------------------------------------------------------------------------------
# Incremental EM (Neal & Hinton, 1998)
# ---------------------------------------------------------------------------------------


class IncrementalState(NamedTuple):
    """Per-chunk statistics (leading axis = chunk), their sum, and the parameters."""

    params: PyTree
    chunk_stats: list[PyTree]
    total: PyTree


def incremental_em(
    model: em.ExactModel,
    params: PyTree,
    source: Source,
    *,
    num_epochs: int = 1,
    hyper: PyTree = None,
    callback: Callable[[int, PyTree], None] | None = None,
) -> tuple[PyTree, IncrementalState]:
    r"""Incremental EM: a partial E-step on one chunk, then the M-step, chunk after chunk.

    A first full pass stores every chunk's statistics :math:`S_c` and their sum :math:`S`;
    then for each chunk in turn :math:`S \leftarrow S - S_c + S_c(\theta)` and
    :math:`\theta \leftarrow \text{m\_step}(S)`. Only the statistics (one small pytree per
    chunk) are kept, never the data. The chunk order is fixed (it must be: a chunk's stored
    statistics are swapped for its own new ones), so ``source`` must not shuffle.

    Args:
      model: an :class:`emvi.em.ExactModel`.
      params: initial parameters.
      source: the data, not shuffled (``seed=None``).
      num_epochs: passes of partial E-steps after the initial full pass (>= 1).
      hyper: the model's hyperparameters for ``m_step``.
      callback: called as ``callback(t, params)`` after every M-step.

    Returns:
      ``(params, state)``.
    """
    num_epochs = _checks.check_positive_int(num_epochs, name="num_epochs")
    if source.seed is not None:
        raise ValueError(
            "incremental EM swaps each chunk's own statistics, so the source must yield the "
            "same chunks in the same order every pass: build it with seed=None."
        )
    _check_source_matches(source, params)
    chunk_stats, total = [], None
    for x, w in source.chunks(0):
        s, _ = _chunk_e_step(model, params, jnp.asarray(x), jnp.asarray(w))
        chunk_stats.append(s)
        total = s if total is None else _tree_add(total, s)
    params = _m_step(model, total, hyper)
    t = 0
    for epoch in range(num_epochs):
        for c, (x, w) in enumerate(source.chunks(epoch)):
            if c >= len(chunk_stats):
                raise ValueError("the source yielded more chunks than on its first pass.")
            s, _ = _chunk_e_step(model, params, jnp.asarray(x), jnp.asarray(w))
            total = _tree_swap(total, chunk_stats[c], s)
            chunk_stats[c] = s
            params = _m_step(model, total, hyper)
            t += 1
            if callback is not None:
                callback(t, params)
    return params, IncrementalState(params, chunk_stats, total)


# ---------------------------------------------------------------------------------------
# Gradient training (a VAE, say) from the same sources
# ---------------------------------------------------------------------------------------


class SourceTrainInfo(NamedTuple):
    """Mean loss of every epoch and the number of steps taken."""

    epoch_loss: list[float]
    num_steps: int


def train_on_source(
    key,
    loss_fn: Callable[[PyTree, Array, Array, Array], Array],
    optimizer,
    params: PyTree,
    source: Source,
    *,
    num_epochs: int,
    opt_state: PyTree = None,
) -> tuple[PyTree, PyTree, SourceTrainInfo]:
    """Minibatch training with every minibatch read from a :class:`Source` (one chunk each).

    Each chunk is one optax step on ``loss_fn(params, key_t, x_chunk, w_chunk)`` (a scalar
    to minimise; ``w_chunk`` is 0 on padding rows, so weight the per-example losses with it),
    with ``key_t = fold_in(key, t)`` for global step t: a rerun draws the same numbers. Only
    one chunk is in memory at a time, so a VAE trains on a memory-mapped file larger than
    memory exactly as on an array (:func:`from_array` with the same chunks gives the same
    steps bit for bit).

    Returns:
      ``(params, opt_state, info)``.
    """
    key = _checks.as_key(key)
    from emvi import optim

    num_epochs = _checks.check_positive_int(num_epochs, name="num_epochs")
    if opt_state is None:
        opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, t, x, w):
        loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, t), x, w)
        params, opt_state = optim.apply_update(optimizer, grads, opt_state, params)
        return params, opt_state, loss

    t = 0
    epoch_loss = []
    for epoch in range(num_epochs):
        total, count = 0.0, 0
        for x, w in source.chunks(epoch):
            params, opt_state, loss = step(params, opt_state, t, jnp.asarray(x), jnp.asarray(w))
            total += float(loss)
            count += 1
            t += 1
        epoch_loss.append(total / count)
    return params, opt_state, SourceTrainInfo(epoch_loss, t)


__all__ = [
    "IncrementalState",
    "OnlineInfo",
    "Source",
    "SourceTrainInfo",
    "StreamState",
    "as_source",
    "check_step_exponent",
    "final_log_likelihood",
    "fit_source",
    "from_array",
    "from_callable",
    "from_npy",
    "incremental_em",
    "online_em",
    "step_size",
    "train_on_source",
]
