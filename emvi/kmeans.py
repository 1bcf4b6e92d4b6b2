r"""k-means (Lloyd's algorithm) and k-means++ seeding, as pure JAX functions.

k-means minimises the inertia

.. math::
    J(c, z) = \sum_{i=1}^n w_i \, \lVert x_i - c_{z_i} \rVert^2

by alternating a hard assignment :math:`z_i = \arg\min_j \lVert x_i - c_j\rVert^2` and a
centre update :math:`c_j = \sum_{i: z_i = j} w_i x_i / \sum_{i: z_i = j} w_i` (Lloyd).

**k-means is Gaussian-mixture EM in a limit.** Take a mixture with equal weights
:math:`\pi_j = 1/k` and one known isotropic covariance :math:`\Sigma_j = \sigma^2 I`
(``covariance_type="spherical"`` in :mod:`emvi.gmm`). Its E-step is

.. math::
    r_{ij} = \frac{\exp(-\lVert x_i - c_j\rVert^2 / 2\sigma^2)}
                  {\sum_l \exp(-\lVert x_i - c_l\rVert^2 / 2\sigma^2)}
    \;\xrightarrow[\sigma \to 0]{}\; \mathbb 1[j = z_i],

a softmax whose temperature :math:`2\sigma^2` goes to zero, so the responsibilities become
the one-hot nearest-centre assignment (away from ties), and the M-step for the means,
:math:`c_j = \sum_i w_i r_{ij} x_i / \sum_i w_i r_{ij}`, becomes Lloyd's centre update.
``tests/test_kmeans.py`` checks both statements numerically.

Shape letters: ``n`` data points, ``k`` clusters, ``d`` data dim, ``t`` local trials.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Key

from emvi import _checks
from emvi._checks import (
    as_data_matrix,
    check_nonnegative,
    check_positive_int,
    check_sample_weight,
)

KMEANS_INITS = ("kmeans++", "random")


class KMeansResult(NamedTuple):
    """What :func:`kmeans` returns.

    Attributes:
      centers: (k, d) final centres.
      labels: (n,) index of the nearest final centre of each point.
      inertia: :math:`\\sum_i w_i \\lVert x_i - c_{z_i}\\rVert^2` at the final centres.
      num_iter: Lloyd iterations run.
      converged: whether the stopping rule fired before ``max_iter``.
    """

    centers: Float[Array, "k d"]
    labels: Int[Array, " n"]
    inertia: Float[Array, ""]
    num_iter: Int[Array, ""]
    converged: Bool[Array, ""]


def squared_distances(x: Float[Array, "n d"], centers: Float[Array, "k d"]) -> Float[Array, "n k"]:
    r"""All squared distances :math:`\lVert x_i - c_j\rVert^2` by one matmul.

    Uses :math:`\lVert x\rVert^2 - 2 x^\top c + \lVert c\rVert^2` (clipped at 0). The
    expansion loses about :math:`\epsilon \lVert x\rVert^2` absolutely, so callers centre
    the data first; it is used to *compare* distances, and the inertia is recomputed
    directly from the differences.
    """
    xx = jnp.sum(x * x, axis=1, keepdims=True)
    cc = jnp.sum(centers * centers, axis=1)[None, :]
    return jnp.maximum(xx - 2.0 * (x @ centers.T) + cc, 0.0)


def _weighted_mean(x: Array, w: Array) -> Array:
    return (w @ x) / jnp.sum(w)


def _sampling_logits(pot: Array, w: Array) -> Array:
    """log(w * D^2); uniform by weight when every point sits on a centre (D^2 = 0)."""
    mass = w * pot
    logits = jnp.log(jnp.where(mass > 0, mass, 1.0))
    logits = jnp.where(mass > 0, logits, -jnp.inf)
    by_weight = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    return jnp.where(jnp.sum(mass) > 0, logits, by_weight)


def kmeans_plusplus_indices(
    key: Key[Array, ""], x: Float[Array, "n d"], k: int, w: Float[Array, " n"]
) -> Int[Array, " k"]:
    """Indices of the greedy k-means++ seeds (jittable core of :func:`kmeans_plusplus`).

    ``k`` is static; ``w`` are non-negative weights, not all zero.
    """
    key = _checks.as_key(key)
    num_trials = 2 + int(math.log(k))
    key_first, key_rest = jax.random.split(key)
    by_weight = jnp.log(jnp.where(w > 0, w, 1.0))
    by_weight = jnp.where(w > 0, by_weight, -jnp.inf)
    first = jax.random.categorical(key_first, by_weight)
    pot = jnp.sum((x - x[first][None, :]) ** 2, axis=1)
    idx0 = jnp.zeros((k,), jnp.int32).at[0].set(first.astype(jnp.int32))

    def body(j, carry):
        idx, pot = carry
        logits = _sampling_logits(pot, w)
        cand = jax.random.categorical(jax.random.fold_in(key_rest, j), logits, shape=(num_trials,))
        d_cand = jnp.sum((x[None, :, :] - x[cand][:, None, :]) ** 2, axis=2)  # (t, n)
        new_pot = jnp.minimum(pot[None, :], d_cand)
        best = jnp.argmin(new_pot @ w)
        return idx.at[j].set(cand[best].astype(jnp.int32)), new_pot[best]

    idx, _ = lax.fori_loop(1, k, body, (idx0, pot))
    return idx


def kmeans_plusplus(
    key: Key[Array, ""],
    x: ArrayLike,
    k: int,
    *,
    sample_weight: ArrayLike | None = None,
) -> Float[Array, "k d"]:
    r"""Greedy k-means++ seeds (Arthur & Vassilvitskii 2007, greedy variant as in scikit-learn).

    The first centre is a point drawn with probability proportional to its weight. Each
    further centre is chosen among :math:`t = 2 + \lfloor \log k \rfloor` candidates drawn
    with probability :math:`\propto w_i D(x_i)^2` (:math:`D` the distance to the nearest
    centre so far): the candidate that most lowers :math:`\sum_i w_i D(x_i)^2` wins. When
    every point already sits on a centre (duplicates), candidates are drawn by weight.
    The random stream differs from scikit-learn's, so seeds differ for the same integer seed.

    Args:
      key: typed PRNG key.
      x: data, shape (n, d).
      k: number of centres, 1 <= k <= n.
      sample_weight: optional non-negative weights (n,), not all zero.

    Returns:
      The seeds, shape (k, d), rows of ``x``.

    Raises:
      ValueError: on non-finite or non-2-D ``x``, ``k`` out of range or bad weights.

    Example:
      >>> c = kmeans_plusplus(jax.random.key(0), jnp.eye(3), 2)
      >>> c.shape
      (2, 3)
    """
    key = _checks.as_key(key)
    x_np = as_data_matrix(x)
    k = check_positive_int(k, name="k")
    if k > x_np.shape[0]:
        raise ValueError(f"k={k} is larger than the number of points ({x_np.shape[0]}).")
    w = check_sample_weight(sample_weight, x_np.shape[0])
    xj = jnp.asarray(x_np)
    wj = jnp.ones(x_np.shape[0], xj.dtype) if w is None else jnp.asarray(w, xj.dtype)
    idx = _kmeans_plusplus_jit(key, xj, k, wj)
    return xj[idx]


_kmeans_plusplus_jit = jax.jit(kmeans_plusplus_indices, static_argnames=("k",))


class _LloydState(NamedTuple):
    centers: Array
    labels: Array
    iteration: Array
    converged: Array


def lloyd(
    centers: Float[Array, "k d"],
    x: Float[Array, "n d"],
    w: Float[Array, " n"],
    *,
    max_iter: int,
    tol: float | Array = 0.0,
) -> KMeansResult:
    r"""Lloyd iterations from ``centers`` on device (``lax.while_loop``); jit- and vmap-able.

    Each iteration assigns every point to its nearest centre and moves each centre to the
    weighted mean of its points. A centre that gets no point (no weight) stays where it was
    (scikit-learn instead relocates it to a far point). The loop stops after ``max_iter``
    iterations, when no label changes, or when the total squared centre shift
    :math:`\sum_j \lVert c_j^{new} - c_j\rVert^2 \le` ``tol`` (an *absolute* threshold
    here; :func:`kmeans` scales its relative ``tol`` by the mean data variance).

    The data are centred on their weighted mean before the loop (translation does not change
    k-means) so the one-matmul distances lose no digits to a large offset.
    """
    k = centers.shape[0]
    shift = _weighted_mean(x, w)
    xc = x - shift[None, :]
    c0 = centers - shift[None, :]

    def assign(c):
        return jnp.argmin(squared_distances(xc, c), axis=1).astype(jnp.int32)

    def cond(s):
        return (s.iteration < max_iter) & ~s.converged

    def body(s):
        labels = assign(s.centers)
        onehot = jax.nn.one_hot(labels, k, dtype=x.dtype) * w[:, None]
        counts = jnp.sum(onehot, axis=0)
        sums = onehot.T @ xc
        safe = jnp.where(counts > 0, counts, 1.0)
        new = jnp.where((counts > 0)[:, None], sums / safe[:, None], s.centers)
        moved = jnp.sum((new - s.centers) ** 2)
        same = jnp.all(labels == s.labels)
        return _LloydState(new, labels, s.iteration + 1, same | (moved <= tol))

    n = x.shape[0]
    init = _LloydState(c0, jnp.full((n,), -1, jnp.int32), jnp.array(0, jnp.int32), jnp.array(False))
    s = lax.while_loop(cond, body, init)
    labels = assign(s.centers)
    inertia = jnp.sum(w * jnp.sum((xc - s.centers[labels]) ** 2, axis=1))
    return KMeansResult(s.centers + shift[None, :], labels, inertia, s.iteration, s.converged)


def _random_indices(key: Array, w: Array, k: int) -> Array:
    """k distinct points drawn with probability proportional to weight (Gumbel top-k)."""
    logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    g = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
    return lax.top_k(g, k)[1]


@functools.partial(jax.jit, static_argnames=("k", "init", "max_iter"))
def _kmeans_core(key, x, w, init_centers, tol_rel, *, k, init, max_iter):
    if init_centers is not None:
        centers = init_centers
    elif init == "kmeans++":
        centers = x[kmeans_plusplus_indices(key, x, k, w)]
    else:
        centers = x[_random_indices(key, w, k)]
    mean = _weighted_mean(x, w)
    var = jnp.mean((w @ (x - mean[None, :]) ** 2) / jnp.sum(w))
    return lloyd(centers, x, w, max_iter=max_iter, tol=tol_rel * var)


def kmeans(
    key: Key[Array, ""],
    x: ArrayLike,
    k: int,
    *,
    init: str | ArrayLike = "kmeans++",
    max_iter: int = 300,
    tol: float = 1e-4,
    sample_weight: ArrayLike | None = None,
) -> KMeansResult:
    r"""k-means by Lloyd's algorithm, run on device.

    Args:
      key: typed PRNG key (used by the ``"kmeans++"`` and ``"random"`` seedings).
      x: data, shape (n, d).
      k: number of clusters, 1 <= k <= n.
      init: ``"kmeans++"`` (greedy k-means++, :func:`kmeans_plusplus`), ``"random"`` (k
        distinct points drawn by weight) or an array of initial centres (k, d).
      max_iter: the most Lloyd iterations.
      tol: relative tolerance: stop once the total squared centre shift is at most
        ``tol`` times the mean (weighted) per-feature variance of ``x`` (scikit-learn's
        convention); ``tol=0`` stops only when no label changes or at ``max_iter``.
      sample_weight: optional non-negative weights (n,), not all zero.

    Returns:
      A :class:`KMeansResult` in the dtype of ``x``.

    Raises:
      ValueError: for non-finite or non-2-D ``x``, ``k`` out of range, unknown ``init``,
        centres of the wrong shape, ``max_iter < 1``, negative ``tol`` or bad weights.

    Example:
      >>> x = jnp.array([[0.0], [0.1], [5.0], [5.1]])
      >>> res = kmeans(jax.random.key(0), x, 2)
      >>> sorted(round(float(c), 2) for c in res.centers[:, 0])
      [0.05, 5.05]
    """
    key = _checks.as_key(key)
    x_np = as_data_matrix(x)
    n, d = x_np.shape
    k = check_positive_int(k, name="k")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of points ({n}).")
    max_iter = check_positive_int(max_iter, name="max_iter")
    tol = check_nonnegative(tol, name="tol")
    w = check_sample_weight(sample_weight, n)
    xj = jnp.asarray(x_np)
    init_centers = None
    if isinstance(init, str):
        if init not in KMEANS_INITS:
            raise ValueError(f"init must be one of {list(KMEANS_INITS)} or an array; got {init!r}.")
    else:
        c = np.asarray(init)
        if c.shape != (k, d):
            raise ValueError(f"init centres must have shape (k, d) = {(k, d)}; got {c.shape}.")
        if not np.all(np.isfinite(c)):
            raise ValueError("init centres contain NaN or inf.")
        init_centers = jnp.asarray(c, xj.dtype)
        init = "array"
    wj = jnp.ones(n, xj.dtype) if w is None else jnp.asarray(w, xj.dtype)
    return _kmeans_core(
        key, xj, wj, init_centers, jnp.asarray(tol, xj.dtype), k=k, init=init, max_iter=max_iter
    )
