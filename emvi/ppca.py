r"""Probabilistic PCA (Tipping & Bishop, 1999), fitted by EM or in closed form.

The generative model:

.. math::
    z \sim \mathcal N(0, I_l), \qquad x \mid z \sim \mathcal N(W z + \mu, \sigma^2 I_d),
    \qquad\text{so}\qquad x \sim \mathcal N(\mu, C), \quad C = W W^\top + \sigma^2 I_d.

The posterior is Gaussian and exact,

.. math::
    p(z \mid x) = \mathcal N\big(M^{-1} W^\top (x - \mu),\; \sigma^2 M^{-1}\big),
    \qquad M = W^\top W + \sigma^2 I_l,

so EM is coordinate ascent on the ELBO. The E-step sums, with :math:`c_i = x_i - \mu`
(centred at the current mean, so no second moment is formed as
:math:`E[x^2] - \mu^2`), the statistics :math:`\sum_i w_i`, :math:`\sum_i w_i x_i`,
:math:`\sum_i w_i c_i`, :math:`\sum_i w_i E[z_i]`, :math:`\sum_i w_i c_i E[z_i]^\top`,
:math:`\sum_i w_i E[z_i z_i^\top]` and the diagonal scatter :math:`\sum_i w_i c_i \circ c_i`.
The M-step is a least-squares regression of x on :math:`\tilde z = (z, 1)` (loadings and
mean together), followed by the residual variance; it never needs the old mean (see
:func:`linear_gaussian_m_step`). Started at the sample mean, :math:`\mu` stays there, as
the maximum-likelihood :math:`\mu` is the (weighted) sample mean.

The maximum-likelihood solution is also available in closed form
(:func:`closed_form_ml`): with :math:`S = U \Lambda U^\top` the sample covariance,
:math:`\sigma^2_{ML} = \frac{1}{d - l}\sum_{j > l} \lambda_j` and
:math:`W_{ML} = U_l (\Lambda_l - \sigma^2_{ML} I)^{1/2}` (up to a rotation of z).

This module also holds the linear-Gaussian maths shared with
:mod:`emvi.factor_analysis` (functions taking the noise as a (d,) vector :math:`\psi`):
pPCA is the case :math:`\psi = \sigma^2 \mathbf 1`, and with
:math:`K = I_l + W^\top \Psi^{-1} W` (:math:`= M / \sigma^2`) the posterior is
:math:`\mathcal N(K^{-1} W^\top \Psi^{-1} c, K^{-1})`.

Shape letters: ``n`` data points, ``d`` data dim, ``l`` latent dim, ``r`` restarts.

Example:
  >>> x = jax.random.normal(jax.random.key(0), (200, 5)) @ jnp.diag(jnp.array([3.0, 2, 1, 1, 1]))
  >>> res = fit(jax.random.key(1), x, 2, max_iter=200, tol=1e-8)
  >>> ml = closed_form_ml(x, 2)
  >>> bool(jnp.abs(res.log_likelihood - jnp.mean(log_prob(ml, x))) < 1e-5)
  True
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve
from jaxtyping import Array, Float, Key

from emvi import _checks, em


class PPCAParams(NamedTuple):
    """Parameters of probabilistic PCA.

    Attributes:
      loadings: :math:`W`, shape (d, l).
      mean: :math:`\\mu`, shape (d,).
      noise_variance: :math:`\\sigma^2 > 0`, a scalar.
    """

    loadings: Float[Array, "d l"]
    mean: Float[Array, " d"]
    noise_variance: Float[Array, ""]


class GaussianPosterior(NamedTuple):
    """A Gaussian q(z | x_i) per example (the posterior of pPCA and factor analysis).

    Attributes:
      mean: shape (n, l).
      cov: shape (n, l, l), symmetric positive definite. The exact posterior has the same
        covariance for every example; it is broadcast so that every leaf has axis n.
    """

    mean: Float[Array, "n l"]
    cov: Float[Array, "n l l"]


class LinearGaussianStats(NamedTuple):
    """Expected sufficient statistics of pPCA / factor analysis, summed over weighted data.

    With :math:`c_i = x_i - \\mu` (``mu`` the mean the E-step ran at) and
    :math:`m_i = E[z_i]`:

    Attributes:
      weight_sum: :math:`\\sum_i w_i`.
      sum_x: :math:`\\sum_i w_i x_i`, shape (d,).
      sum_c: :math:`\\sum_i w_i c_i`, shape (d,).
      sum_z: :math:`\\sum_i w_i m_i`, shape (l,).
      sum_cz: :math:`\\sum_i w_i c_i m_i^\\top`, shape (d, l).
      sum_zz: :math:`\\sum_i w_i E[z_i z_i^\\top]`, shape (l, l).
      sum_cc: :math:`\\sum_i w_i c_i \\circ c_i` (the diagonal scatter), shape (d,).
    """

    weight_sum: Float[Array, ""]
    sum_x: Float[Array, " d"]
    sum_c: Float[Array, " d"]
    sum_z: Float[Array, " l"]
    sum_cz: Float[Array, "d l"]
    sum_zz: Float[Array, "l l"]
    sum_cc: Float[Array, " d"]


class NoiseFloor(NamedTuple):
    """``hyper`` of the EM driver for pPCA and factor analysis.

    Attributes:
      relative: the noise variance is kept at or above ``relative`` times the data
        variance (per feature for factor analysis; the mean over features for pPCA),
        measured about the mean the E-step ran at. ``None`` as ``hyper`` means 1e-6.
    """

    relative: Float[Array, ""] | float = 1e-6


DEFAULT_NOISE_FLOOR = 1e-6
_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------
# Linear-Gaussian maths shared with factor analysis (noise given as a (d,) vector psi)
# ---------------------------------------------------------------------------------------


def _precision_factor(loadings: Array, psi: Array) -> Array:
    """Lower Cholesky factor of :math:`K = I + W^\\top \\Psi^{-1} W` (l, l), eigenvalues >= 1."""
    u = loadings / jnp.sqrt(psi)[:, None]
    l_ = loadings.shape[1]
    return jnp.linalg.cholesky(jnp.eye(l_, dtype=loadings.dtype) + u.T @ u)


def linear_gaussian_posterior(
    loadings: Float[Array, "d l"],
    mean: Float[Array, " d"],
    psi: Float[Array, " d"],
    x: Float[Array, "n d"],
) -> tuple[Float[Array, "n l"], Float[Array, "l l"], Float[Array, "l l"]]:
    r"""Posterior mean, covariance and precision factor for :math:`x = Wz + \mu + \epsilon`.

    .. math::
        K = I_l + W^\top \Psi^{-1} W, \qquad
        E[z_i \mid x_i] = K^{-1} W^\top \Psi^{-1} (x_i - \mu), \qquad
        \mathrm{Cov}[z_i \mid x_i] = K^{-1},

    computed with one Cholesky factorisation of the (l, l) matrix K, in O(n d l + d l^2).

    Args:
      loadings: W, shape (d, l).
      mean: :math:`\mu`, shape (d,).
      psi: noise variances, shape (d,), all > 0.
      x: data, shape (n, d).

    Returns:
      ``(post_mean (n, l), post_cov (l, l), chol_k (l, l))``.
    """
    chol = _precision_factor(loadings, psi)
    c = x - mean[None, :]
    rhs = (loadings / psi[:, None]).T @ c.T  # (l, n)
    post_mean = cho_solve((chol, True), rhs).T
    eye = jnp.eye(loadings.shape[1], dtype=loadings.dtype)
    post_cov = cho_solve((chol, True), eye)
    return post_mean, 0.5 * (post_cov + post_cov.T), chol


def linear_gaussian_log_prob(
    loadings: Float[Array, "d l"],
    mean: Float[Array, " d"],
    psi: Float[Array, " d"],
    x: Float[Array, "n d"],
) -> Float[Array, " n"]:
    r""":math:`\log \mathcal N(x_i \mid \mu, W W^\top + \Psi)` in O(n d l + d l^2).

    The determinant lemma gives :math:`\log|C| = \sum_j \log \psi_j + \log |K|`, and the
    Mahalanobis term is written as a sum of two non-negative squares (no cancellation),

    .. math::
        c^\top C^{-1} c = (c - W m)^\top \Psi^{-1} (c - W m) + m^\top m,
        \qquad m = E[z \mid x] = K^{-1} W^\top \Psi^{-1} c, \quad c = x - \mu.

    Args:
      loadings: W, shape (d, l).
      mean: :math:`\mu`, shape (d,).
      psi: noise variances, shape (d,).
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    post_mean, _, chol = linear_gaussian_posterior(loadings, mean, psi, x)
    c = x - mean[None, :]
    resid = (c - post_mean @ loadings.T) / jnp.sqrt(psi)[None, :]
    maha = jnp.sum(resid**2, axis=1) + jnp.sum(post_mean**2, axis=1)
    log_det = jnp.sum(jnp.log(psi)) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    d = x.shape[1]
    return -0.5 * (d * _LOG_2PI + log_det + maha)


def linear_gaussian_elbo(
    loadings: Float[Array, "d l"],
    mean: Float[Array, " d"],
    psi: Float[Array, " d"],
    q: GaussianPosterior,
    x: Float[Array, "n d"],
) -> Float[Array, " n"]:
    r"""ELBO of a Gaussian :math:`q_i = \mathcal N(m_i, S_i)` in closed form.

    .. math::
        \mathrm{ELBO}_i = E_{q_i}[\log p(x_i \mid z) + \log p(z)] + \mathcal H[q_i]
        = -\tfrac12\Big[d \log 2\pi + \textstyle\sum_j \log\psi_j
          + (c_i - W m_i)^\top \Psi^{-1} (c_i - W m_i) + m_i^\top m_i
          + \operatorname{tr}(K S_i) - l - \log|S_i|\Big],

    with :math:`K = I + W^\top \Psi^{-1} W`. At the exact posterior
    (:math:`S_i = K^{-1}`) the trace is l, :math:`-\log|S_i| = \log|K|`, and the ELBO equals
    :func:`linear_gaussian_log_prob`.

    Args:
      loadings: W, shape (d, l).
      mean: :math:`\mu`, shape (d,).
      psi: noise variances, shape (d,).
      q: Gaussian q per example (means (n, l), covariances (n, l, l)).
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    d, l_ = loadings.shape
    c = x - mean[None, :]
    resid = (c - q.mean @ loadings.T) / jnp.sqrt(psi)[None, :]
    u = loadings / jnp.sqrt(psi)[:, None]
    k_mat = jnp.eye(l_, dtype=loadings.dtype) + u.T @ u
    trace = jnp.einsum("ab,nab->n", k_mat, q.cov)
    chol_s = jnp.linalg.cholesky(q.cov)
    log_det_s = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_s, axis1=1, axis2=2)), axis=1)
    quad = jnp.sum(resid**2, axis=1) + jnp.sum(q.mean**2, axis=1)
    return -0.5 * (d * _LOG_2PI + jnp.sum(jnp.log(psi)) + quad + trace - l_ - log_det_s)


def linear_gaussian_e_step(
    loadings: Float[Array, "d l"],
    mean: Float[Array, " d"],
    psi: Float[Array, " d"],
    x: Float[Array, "n d"],
    weights: Float[Array, " n"],
) -> tuple[LinearGaussianStats, Float[Array, ""]]:
    r"""Exact E-step: summed statistics (see :class:`LinearGaussianStats`) and log-likelihood.

    .. math::
        E[z_i z_i^\top] = K^{-1} + m_i m_i^\top, \qquad
        \textstyle\sum_i w_i E[z_i z_i^\top] = (\sum_i w_i) K^{-1} + \sum_i w_i m_i m_i^\top.

    Args:
      loadings: W, shape (d, l).
      mean: :math:`\mu`, shape (d,).
      psi: noise variances, shape (d,).
      x: data, shape (n, d).
      weights: per-example weights, shape (n,).

    Returns:
      ``(stats, sum_i w_i log p(x_i))``.
    """
    post_mean, post_cov, chol = linear_gaussian_posterior(loadings, mean, psi, x)
    c = x - mean[None, :]
    wc = weights[:, None] * c
    wm = weights[:, None] * post_mean
    s0 = jnp.sum(weights)
    stats = LinearGaussianStats(
        weight_sum=s0,
        sum_x=weights @ x,
        sum_c=jnp.sum(wc, axis=0),
        sum_z=jnp.sum(wm, axis=0),
        sum_cz=wc.T @ post_mean,
        sum_zz=s0 * post_cov + wm.T @ post_mean,
        sum_cc=jnp.sum(wc * c, axis=0),
    )
    resid = (c - post_mean @ loadings.T) / jnp.sqrt(psi)[None, :]
    maha = jnp.sum(resid**2, axis=1) + jnp.sum(post_mean**2, axis=1)
    log_det = jnp.sum(jnp.log(psi)) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    ll = -0.5 * (x.shape[1] * _LOG_2PI + log_det + maha)
    return stats, jnp.sum(weights * ll)


def linear_gaussian_m_step(
    stats: LinearGaussianStats,
) -> tuple[Float[Array, "d l"], Float[Array, " d"], Float[Array, " d"], Float[Array, " d"]]:
    r"""Closed-form M-step for loadings and mean, and the per-feature residual variance.

    Regressing x on :math:`\tilde z = (z, 1)` in the centred coordinates :math:`c = x - \mu`
    of the E-step gives :math:`[W, b] = A B^{-1}` with

    .. math::
        A = \Big[\textstyle\sum_i w_i c_i m_i^\top,\ \sum_i w_i c_i\Big], \qquad
        B = \begin{bmatrix} \sum_i w_i E[z_i z_i^\top] & \sum_i w_i m_i \\
            \sum_i w_i m_i^\top & \sum_i w_i \end{bmatrix},

    the new mean :math:`\mu' = \mu + b = (\sum_i w_i x_i - W \sum_i w_i m_i) / \sum_i w_i`
    (so the old mean is not needed), and the residual variance per feature

    .. math::
        \rho_j = \frac{1}{\sum_i w_i}\Big[\sum_i w_i c_{ij}^2 - (A B^{-1} A^\top)_{jj}\Big]
               = \frac{1}{\sum_i w_i}\sum_i w_i
                 E\big[(x_{ij} - \mu'_j - W_{j\cdot} z_i)^2\big].

    Factor analysis sets :math:`\Psi = \mathrm{diag}(\rho)` and pPCA
    :math:`\sigma^2 = \frac1d \sum_j \rho_j` (each then floored).

    Args:
      stats: summed statistics.

    Returns:
      ``(loadings (d, l), mean (d,), residual_variance (d,), data_variance (d,))``, the
      last being :math:`\sum_i w_i c_{ij}^2 / \sum_i w_i` (used for the noise floor).
    """
    s0 = stats.weight_sum
    l_ = stats.sum_z.shape[0]
    a = jnp.concatenate([stats.sum_cz, stats.sum_c[:, None]], axis=1)  # (d, l+1)
    top = jnp.concatenate([stats.sum_zz, stats.sum_z[:, None]], axis=1)
    bottom = jnp.concatenate([stats.sum_z, s0[None]])[None, :]
    b = jnp.concatenate([top, bottom], axis=0)  # (l+1, l+1)
    b = 0.5 * (b + b.T)
    chol = jnp.linalg.cholesky(b)
    w_aug = cho_solve((chol, True), a.T).T  # (d, l+1)
    loadings = w_aug[:, :l_]
    new_mean = (stats.sum_x - loadings @ stats.sum_z) / s0
    resid = (stats.sum_cc - jnp.sum(w_aug * a, axis=1)) / s0
    return loadings, new_mean, resid, stats.sum_cc / s0


def relative_floor(hyper: NoiseFloor | None, dtype) -> Array:
    """The relative noise floor of ``hyper`` (1e-6 when ``hyper`` is None) as a 0-d array."""
    rel = DEFAULT_NOISE_FLOOR if hyper is None else hyper.relative
    return jnp.asarray(rel, dtype)


# ---------------------------------------------------------------------------------------
# pPCA
# ---------------------------------------------------------------------------------------


def _psi(params: PPCAParams) -> Array:
    d = params.mean.shape[0]
    return jnp.full((d,), params.noise_variance, params.mean.dtype)


def log_prob(params: PPCAParams, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r"""Marginal log-likelihood :math:`\log \mathcal N(x_i \mid \mu, W W^\top + \sigma^2 I)`.

    O(n d l + d l^2) via the determinant lemma and Woodbury identity (see
    :func:`linear_gaussian_log_prob`); the d x d covariance is never formed.

    Args:
      params: pPCA parameters.
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    return linear_gaussian_log_prob(params.loadings, params.mean, _psi(params), x)


def posterior(params: PPCAParams, x: Float[Array, "n d"]) -> GaussianPosterior:
    r"""Exact posterior :math:`\mathcal N(M^{-1} W^\top (x_i - \mu), \sigma^2 M^{-1})`.

    With :math:`M = W^\top W + \sigma^2 I_l`.

    Args:
      params: pPCA parameters.
      x: data, shape (n, d).

    Returns:
      A :class:`GaussianPosterior` with means (n, l) and covariances (n, l, l).
    """
    m, cov, _ = linear_gaussian_posterior(params.loadings, params.mean, _psi(params), x)
    return GaussianPosterior(m, jnp.broadcast_to(cov, (x.shape[0], *cov.shape)))


def elbo(params: PPCAParams, q: GaussianPosterior, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r"""Closed-form ELBO :math:`E_q[\log p(x_i, z)] + \mathcal H[q_i]` of a Gaussian q.

    Equals :func:`log_prob` at :func:`posterior`; below it by
    :math:`\mathrm{KL}(q_i \,\|\, p(z \mid x_i))` otherwise (see
    :func:`linear_gaussian_elbo` for the formula).

    Args:
      params: pPCA parameters.
      q: Gaussian q per example.
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    return linear_gaussian_elbo(params.loadings, params.mean, _psi(params), q, x)


def e_step(
    params: PPCAParams, x: Float[Array, "n d"], weights: Float[Array, " n"]
) -> tuple[LinearGaussianStats, Float[Array, ""]]:
    """Exact E-step (see :func:`linear_gaussian_e_step`).

    Args:
      params: current parameters.
      x: data, shape (n, d).
      weights: per-example weights, shape (n,).

    Returns:
      ``(stats, sum_i w_i log p(x_i))``.
    """
    return linear_gaussian_e_step(params.loadings, params.mean, _psi(params), x, weights)


def m_step(stats: LinearGaussianStats, hyper: NoiseFloor | None = None) -> PPCAParams:
    r"""Closed-form M-step (Tipping & Bishop, with the mean re-estimated jointly).

    .. math::
        [W, b] = A B^{-1}, \qquad \mu' = \mu + b, \qquad
        \sigma^2 = \max\Big(\frac{1}{d \sum_i w_i} \sum_i w_i
            E\|x_i - \mu' - W z_i\|^2,\ \epsilon \bar v\Big),

    (A, B as in :func:`linear_gaussian_m_step`), where :math:`\bar v` is the data variance
    averaged over features and :math:`\epsilon` = ``hyper.relative`` (1e-6 by default). The
    floor only binds when the data lie (almost) in an l-dimensional affine subspace.

    Args:
      stats: summed statistics.
      hyper: a :class:`NoiseFloor` or ``None``.

    Returns:
      New parameters.
    """
    loadings, mean, resid, var = linear_gaussian_m_step(stats)
    dtype = loadings.dtype
    floor = relative_floor(hyper, dtype) * jnp.mean(var)
    sigma2 = jnp.maximum(jnp.mean(resid), jnp.maximum(floor, jnp.finfo(dtype).tiny))
    return PPCAParams(loadings, mean, sigma2)


def sample(
    key: Key[Array, ""], params: PPCAParams, num_samples: int
) -> tuple[Float[Array, "n d"], Float[Array, "n l"]]:
    """Draws ``num_samples`` points by ancestral sampling; returns ``(x, z)``.

    Args:
      key: a typed PRNG key.
      params: pPCA parameters.
      num_samples: n, a static Python int.

    Returns:
      ``(x (n, d), z (n, l))`` in the dtype of the params.
    """
    key_z, key_e = jax.random.split(key)
    d, l_ = params.loadings.shape
    dtype = params.loadings.dtype
    z = jax.random.normal(key_z, (num_samples, l_), dtype)
    eps = jax.random.normal(key_e, (num_samples, d), dtype)
    x = z @ params.loadings.T + params.mean[None, :] + jnp.sqrt(params.noise_variance) * eps
    return x, z


@functools.cache
def model() -> em.ExactModel:
    """pPCA as an :class:`emvi.em.ExactModel` (one cached instance).

    ``hyper`` is a :class:`NoiseFloor` or ``None``. There is no ``expected_stats``: the
    statistics are centred at the mean the E-step runs at, which a bare q does not carry.
    """
    return em.ExactModel(
        e_step=e_step, m_step=m_step, log_prob=log_prob, posterior=posterior, elbo=elbo
    )


# ---------------------------------------------------------------------------------------
# Closed form, initialisation and the public fitting wrapper
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("latent_dim",))
def _closed_form_ml(x, latent_dim):
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    c = x - mean[None, :]
    cov = (c.T @ c) / n
    evals, evecs = jnp.linalg.eigh(cov)  # ascending
    evals, evecs = evals[::-1], evecs[:, ::-1]
    sigma2 = jnp.mean(evals[latent_dim:])
    scale = jnp.sqrt(jnp.maximum(evals[:latent_dim] - sigma2, 0.0))
    return PPCAParams(evecs[:, :latent_dim] * scale[None, :], mean, sigma2)


def closed_form_ml(x, latent_dim: int) -> PPCAParams:
    r"""The maximum-likelihood pPCA parameters from the eigendecomposition of the covariance.

    With the (biased, two-pass) sample covariance :math:`S = U \Lambda U^\top`,
    eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_d`:

    .. math::
        \mu = \bar x, \qquad \sigma^2 = \frac{1}{d - l} \sum_{j=l+1}^{d} \lambda_j, \qquad
        W = U_l (\Lambda_l - \sigma^2 I_l)^{1/2}

    (Tipping & Bishop 1999; W is unique up to a rotation of z, here R = I). Costs one
    d x d eigendecomposition.

    Args:
      x: data, shape (n, d).
      latent_dim: l, 1 <= l < d.

    Returns:
      :class:`PPCAParams` in the dtype of ``x``.

    Raises:
      ValueError: on invalid ``x`` or ``latent_dim``.
    """
    arr = validate_inputs(x, latent_dim)
    return _closed_form_ml(jnp.asarray(arr), latent_dim)


def init_params(key: Key[Array, ""], x: Float[Array, "n d"], latent_dim: int) -> PPCAParams:
    r"""Random initial parameters: :math:`\mu = \bar x`, :math:`\sigma^2 = \bar v`,
    :math:`W_{jk} \sim \mathcal N(0, \bar v)`, with :math:`\bar v` the mean per-feature
    variance of ``x`` (so the initial model has the scale of the data).

    Args:
      key: a typed PRNG key.
      x: data, shape (n, d).
      latent_dim: l (static).

    Returns:
      :class:`PPCAParams` in the dtype of ``x``.
    """
    mean = jnp.mean(x, axis=0)
    v = jnp.mean(jnp.mean((x - mean[None, :]) ** 2, axis=0))
    w = jax.random.normal(key, (x.shape[1], latent_dim), x.dtype) * jnp.sqrt(v)
    return PPCAParams(w, mean, v)


def validate_inputs(x, latent_dim) -> np.ndarray:
    """Eager checks shared by the pPCA and factor-analysis wrappers; returns ``x`` as NumPy.

    Raises:
      ValueError: if ``x`` is not a finite 2-D array with >= 2 rows and some variance, or
        ``latent_dim`` is not an integer in [1, d).
    """
    arr = _checks.as_data_matrix(x, min_rows=2)
    d = arr.shape[1]
    latent_dim = _checks.check_positive_int(latent_dim, name="latent_dim")
    if latent_dim >= d:
        raise ValueError(
            f"latent_dim must be smaller than the data dimension ({d}); got {latent_dim}."
        )
    if not np.any(np.var(arr, axis=0) > 0):
        raise ValueError("x is constant (zero variance in every column); nothing to fit.")
    return arr


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
    max_iter: int = 500,
    tol: float = 1e-6,
    num_init: int = 1,
    noise_floor: float = DEFAULT_NOISE_FLOOR,
    chunk_size: int | None = None,
) -> em.EMResult:
    r"""Fits pPCA by EM on device, keeping the best of ``num_init`` random starts.

    The likelihood of pPCA has no local maxima other than the global one (Tipping & Bishop),
    so one start suffices in principle; EM converges slowly when the l-th and (l+1)-th
    covariance eigenvalues are close. :func:`closed_form_ml` gives the answer directly.

    Args:
      key: a typed PRNG key (drives the initialisation).
      x: data, shape (n, d), n >= 2; integer arrays are cast to float32.
      latent_dim: l, 1 <= l < d.
      max_iter: the most EM iterations per start (>= 1).
      tol: stop once the mean log-likelihood changes by less than this (>= 0).
      num_init: number of random starts (>= 1), run as one vmapped program.
      noise_floor: :math:`\sigma^2` is kept >= ``noise_floor`` times the mean per-feature
        variance (>= 0).
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
