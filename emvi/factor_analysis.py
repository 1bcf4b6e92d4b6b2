r"""Factor analysis, fitted by EM (Rubin & Thayer 1982; Ghahramani & Hinton 1996).

The generative model is probabilistic PCA with a separate noise variance per feature:

.. math::
    z \sim \mathcal N(0, I_l), \qquad x \mid z \sim \mathcal N(W z + \mu, \Psi),
    \quad \Psi = \mathrm{diag}(\psi_1, \dots, \psi_d),
    \qquad\text{so}\qquad x \sim \mathcal N(\mu, W W^\top + \Psi).

The posterior is exact,

.. math::
    p(z \mid x) = \mathcal N\big(K^{-1} W^\top \Psi^{-1} (x - \mu),\; K^{-1}\big),
    \qquad K = I_l + W^\top \Psi^{-1} W,

and EM needs the same expected statistics as pPCA (:class:`emvi.ppca.LinearGaussianStats`;
the maths lives in :mod:`emvi.ppca` with the noise as a (d,) vector). The M-step regresses x
on :math:`(z, 1)` for :math:`[W, \mu]` and sets

.. math::
    \psi_j = \max\Big(\frac{1}{\sum_i w_i} \sum_i w_i E\big[(x_{ij} - \mu_j - W_{j\cdot}
        z_i)^2\big],\ \epsilon\, v_j\Big),

where :math:`v_j` is the variance of feature j and :math:`\epsilon` = 1e-6 by default. The
floor keeps a *Heywood case* (a feature explained entirely by the factors, whose maximum
likelihood :math:`\psi_j` is 0 and log-likelihood unbounded) finite. scikit-learn's
``FactorAnalysis`` floors :math:`\psi` at the absolute value 1e-12 instead; a relative floor
does not depend on the units of the data. A constant feature (:math:`v_j = 0`) is floored
at :math:`\epsilon` times the mean variance over features.

Unlike pPCA there is no closed-form maximum, and the likelihood can have several local
maxima; :func:`fit` runs ``num_init`` random starts as one vmapped program.

Shape letters: ``n`` data points, ``d`` data dim, ``l`` latent dim, ``r`` restarts.

Example:
  >>> key_w, key_x, key_fit = jax.random.split(jax.random.key(0), 3)
  >>> w = jax.random.normal(key_w, (6, 2))
  >>> z, e = jnp.split(jax.random.normal(key_x, (300, 8)), [2], axis=1)
  >>> x = z @ w.T + e * jnp.linspace(0.5, 1.5, 6)
  >>> res = fit(key_fit, x, 2, max_iter=300)
  >>> res.params.noise_variance.shape
  (6,)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Key

from emvi import _checks, em
from emvi.ppca import (
    DEFAULT_NOISE_FLOOR,
    GaussianPosterior,
    LinearGaussianStats,
    NoiseFloor,
    linear_gaussian_e_step,
    linear_gaussian_elbo,
    linear_gaussian_log_prob,
    linear_gaussian_m_step,
    linear_gaussian_posterior,
    relative_floor,
    validate_inputs,
)

__all__ = [
    "FactorAnalysisParams",
    "GaussianPosterior",
    "LinearGaussianStats",
    "NoiseFloor",
    "e_step",
    "elbo",
    "fit",
    "init_params",
    "log_prob",
    "m_step",
    "model",
    "posterior",
    "sample",
]


class FactorAnalysisParams(NamedTuple):
    """Parameters of factor analysis.

    Attributes:
      loadings: :math:`W`, shape (d, l).
      mean: :math:`\\mu`, shape (d,).
      noise_variance: :math:`\\psi`, the diagonal of :math:`\\Psi`, shape (d,), all > 0.
    """

    loadings: Float[Array, "d l"]
    mean: Float[Array, " d"]
    noise_variance: Float[Array, " d"]


def log_prob(params: FactorAnalysisParams, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r""":math:`\log \mathcal N(x_i \mid \mu, W W^\top + \Psi)` in O(n d l + d l^2).

    Uses :math:`\log|C| = \sum_j \log\psi_j + \log|K|` and
    :math:`c^\top C^{-1} c = (c - W m)^\top \Psi^{-1} (c - W m) + m^\top m` with m the
    posterior mean (see :func:`emvi.ppca.linear_gaussian_log_prob`).

    Args:
      params: factor-analysis parameters.
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    return linear_gaussian_log_prob(params.loadings, params.mean, params.noise_variance, x)


def posterior(params: FactorAnalysisParams, x: Float[Array, "n d"]) -> GaussianPosterior:
    r"""Exact posterior :math:`\mathcal N(K^{-1} W^\top \Psi^{-1}(x_i - \mu), K^{-1})`.

    Args:
      params: factor-analysis parameters.
      x: data, shape (n, d).

    Returns:
      A :class:`emvi.ppca.GaussianPosterior`, means (n, l) and covariances (n, l, l).
    """
    m, cov, _ = linear_gaussian_posterior(params.loadings, params.mean, params.noise_variance, x)
    return GaussianPosterior(m, jnp.broadcast_to(cov, (x.shape[0], *cov.shape)))


def elbo(
    params: FactorAnalysisParams, q: GaussianPosterior, x: Float[Array, "n d"]
) -> Float[Array, " n"]:
    r"""Closed-form ELBO of a Gaussian q (see :func:`emvi.ppca.linear_gaussian_elbo`).

    Equals :func:`log_prob` at :func:`posterior`, and is below it by
    :math:`\mathrm{KL}(q_i \,\|\, p(z \mid x_i))` otherwise.

    Args:
      params: factor-analysis parameters.
      q: Gaussian q per example.
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    return linear_gaussian_elbo(params.loadings, params.mean, params.noise_variance, q, x)


def e_step(
    params: FactorAnalysisParams, x: Float[Array, "n d"], weights: Float[Array, " n"]
) -> tuple[LinearGaussianStats, Float[Array, ""]]:
    """Exact E-step (see :func:`emvi.ppca.linear_gaussian_e_step`).

    Args:
      params: current parameters.
      x: data, shape (n, d).
      weights: per-example weights, shape (n,).

    Returns:
      ``(stats, sum_i w_i log p(x_i))``.
    """
    return linear_gaussian_e_step(params.loadings, params.mean, params.noise_variance, x, weights)


def _floor(var: Array, relative: Array) -> Array:
    """Per-feature floor: ``relative * var_j``, or ``relative * mean(var)`` where var_j = 0."""
    scale = jnp.where(var > 0, var, jnp.mean(var))
    return jnp.maximum(relative * scale, jnp.finfo(var.dtype).tiny)


def m_step(stats: LinearGaussianStats, hyper: NoiseFloor | None = None) -> FactorAnalysisParams:
    r"""Closed-form M-step.

    .. math::
        [W, b] = A B^{-1}, \qquad \mu' = \mu + b, \qquad
        \psi_j = \max\Big(\frac{1}{\sum_i w_i}\big[\textstyle\sum_i w_i c_{ij}^2
            - (A B^{-1} A^\top)_{jj}\big],\ \epsilon v_j\Big),

    with :math:`c_i = x_i - \mu`, A and B as in :func:`emvi.ppca.linear_gaussian_m_step`
    (for a fixed mean this is Ghahramani & Hinton's
    :math:`W = (\sum_i c_i m_i^\top)(\sum_i E[z_i z_i^\top])^{-1}`,
    :math:`\Psi = \mathrm{diag}(S - W \frac1n \sum_i m_i c_i^\top)`), and
    :math:`v_j = \sum_i w_i c_{ij}^2 / \sum_i w_i`.

    Args:
      stats: summed statistics.
      hyper: a :class:`emvi.ppca.NoiseFloor` (:math:`\epsilon`) or ``None`` (1e-6).

    Returns:
      New parameters.
    """
    loadings, mean, resid, var = linear_gaussian_m_step(stats)
    psi = jnp.maximum(resid, _floor(var, relative_floor(hyper, loadings.dtype)))
    return FactorAnalysisParams(loadings, mean, psi)


def sample(
    key: Key[Array, ""], params: FactorAnalysisParams, num_samples: int
) -> tuple[Float[Array, "n d"], Float[Array, "n l"]]:
    """Draws ``num_samples`` points by ancestral sampling; returns ``(x, z)``.

    Args:
      key: a typed PRNG key.
      params: factor-analysis parameters.
      num_samples: n, a static Python int.

    Returns:
      ``(x (n, d), z (n, l))`` in the dtype of the params.
    """
    key_z, key_e = jax.random.split(key)
    d, l_ = params.loadings.shape
    dtype = params.loadings.dtype
    z = jax.random.normal(key_z, (num_samples, l_), dtype)
    eps = jax.random.normal(key_e, (num_samples, d), dtype)
    scale = jnp.sqrt(params.noise_variance)[None, :]
    return z @ params.loadings.T + params.mean[None, :] + scale * eps, z


@functools.cache
def model() -> em.ExactModel:
    """Factor analysis as an :class:`emvi.em.ExactModel` (one cached instance).

    ``hyper`` is a :class:`emvi.ppca.NoiseFloor` or ``None``. No ``expected_stats``, for the
    reason given in :func:`emvi.ppca.model`.
    """
    return em.ExactModel(
        e_step=e_step, m_step=m_step, log_prob=log_prob, posterior=posterior, elbo=elbo
    )


def init_params(
    key: Key[Array, ""], x: Float[Array, "n d"], latent_dim: int
) -> FactorAnalysisParams:
    r"""Random initial parameters on the scale of each feature.

    :math:`\mu = \bar x`, :math:`\psi_j = v_j / 2` and
    :math:`W_{jk} \sim \mathcal N(0, v_j / (2 l))`, so that the initial model variance of
    every feature is about its data variance :math:`v_j` (a constant feature uses the mean
    variance instead).

    Args:
      key: a typed PRNG key.
      x: data, shape (n, d).
      latent_dim: l (static).

    Returns:
      :class:`FactorAnalysisParams` in the dtype of ``x``.
    """
    mean = jnp.mean(x, axis=0)
    var = jnp.mean((x - mean[None, :]) ** 2, axis=0)
    var = jnp.where(var > 0, var, jnp.mean(var))
    w = jax.random.normal(key, (x.shape[1], latent_dim), x.dtype)
    w = w * jnp.sqrt(var / (2.0 * latent_dim))[:, None]
    return FactorAnalysisParams(w, mean, 0.5 * var)


@functools.partial(jax.jit, static_argnames=("latent_dim", "num_init", "max_iter", "chunk_size"))
def _fit_device(key, x, hyper, tol, *, latent_dim, num_init, max_iter, chunk_size):
    keys = jax.random.split(key, num_init)
    p0 = jax.vmap(lambda k_: init_params(k_, x, latent_dim))(keys)
    best, _ = em.run_em_restarts(
        model(), p0, x, max_iter=max_iter, tol=tol, hyper=hyper, chunk_size=chunk_size
    )
    return best


def fit(
    key: Key[Array, ""],
    x,
    latent_dim: int,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    num_init: int = 1,
    noise_floor: float = DEFAULT_NOISE_FLOOR,
    chunk_size: int | None = None,
) -> em.EMResult:
    r"""Fits factor analysis by EM on device, keeping the best of ``num_init`` random starts.

    Args:
      key: a typed PRNG key (drives the initialisation).
      x: data, shape (n, d), n >= 2; integer arrays are cast to float32.
      latent_dim: l, 1 <= l < d.
      max_iter: the most EM iterations per start (>= 1).
      tol: stop once the mean log-likelihood changes by less than this (>= 0).
      num_init: number of random starts (>= 1), run as one vmapped program.
      noise_floor: :math:`\psi_j` is kept >= ``noise_floor`` times the variance of
        feature j (>= 0; see the module docstring).
      chunk_size: run the E-step over chunks of this many points.

    Returns:
      The best run's :class:`emvi.em.EMResult` (params, mean log-likelihood at the final
      params, history, num_iter, converged).

    Raises:
      ValueError: on non-finite or non-2-D ``x``, ``latent_dim`` outside [1, d), or bad
        settings.
    """
    arr = validate_inputs(x, latent_dim)
    max_iter, tol, num_init, chunk_size = _checks.check_em_settings(
        max_iter=max_iter, tol=tol, num_init=num_init, chunk_size=chunk_size
    )
    noise_floor = _checks.check_nonnegative(noise_floor, name="noise_floor")
    dtype = arr.dtype
    return _fit_device(
        key,
        jnp.asarray(arr),
        NoiseFloor(jnp.asarray(noise_floor, dtype)),
        jnp.asarray(tol, dtype),
        latent_dim=latent_dim,
        num_init=num_init,
        max_iter=max_iter,
        chunk_size=chunk_size,
    )
