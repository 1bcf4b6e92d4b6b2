r"""The linear-Gaussian latent model: probabilistic PCA and factor analysis in one.

The generative model, for data :math:`x \in \mathbb R^d` and a latent :math:`z \in \mathbb R^l`:

.. math::
    z \sim \mathcal N(0, I_l), \qquad x \mid z \sim \mathcal N(W z + \mu, \Psi),
    \qquad\text{so}\qquad x \sim \mathcal N(\mu, C), \quad C = W W^\top + \Psi,

with ``noise="isotropic"`` (:math:`\Psi = \sigma^2 I_d`: probabilistic PCA, Tipping & Bishop
1999) or ``noise="diagonal"`` (:math:`\Psi = \mathrm{diag}(\psi_1..\psi_d)`: factor analysis,
Rubin & Thayer 1982). :mod:`emvi.ppca` and :mod:`emvi.factor_analysis` are thin names for the
two cases. The noise variance is stored as a scalar (isotropic) or a (d,) vector (diagonal);
all the maths below uses the (d,) vector :math:`\psi` (the scalar broadcast).

**Posterior.** With :math:`K = I_l + W^\top \Psi^{-1} W` (eigenvalues >= 1),

.. math::
    p(z \mid x) = \mathcal N\big(K^{-1} W^\top \Psi^{-1} (x - \mu),\ K^{-1}\big),

one Cholesky factorisation of an (l, l) matrix; :math:`\log p(x)` follows from the determinant
lemma :math:`\log|C| = \sum_j \log\psi_j + \log|K|` and the Mahalanobis term as a sum of two
squares, :math:`c^\top C^{-1} c = (c - Wm)^\top \Psi^{-1}(c - Wm) + m^\top m` (no d x d matrix
is ever formed).

**EM** is coordinate ascent on the ELBO. The statistics (:class:`LinearGaussianStats`) are
sums over weighted examples of the first and second moments of :math:`\tilde z = (z, 1)` and
of :math:`c = x - r`, where :math:`r` is a fixed reference point (the data mean, set once by
:func:`prepare`, so the second moments are centred and sums over chunks add). The M-step
regresses x on :math:`\tilde z` for :math:`[W, \mu]` and sets the noise variances to the
expected squared residuals (pooled over features for pPCA), MAP under an inverse-gamma prior
(:class:`LinearGaussianPrior`) and kept above a relative floor.

**Gradient face** (:func:`model`): the loadings and mean are unconstrained and the noise
variances enter as logarithms; q is a :class:`GaussianPosterior` whose unconstrained form is
one (n, m) vector per example, the mean and the lower triangle of the Cholesky factor of the
covariance with a log diagonal, :math:`m = l + l(l+1)/2`, so the exact posterior lies in the
family. The ELBO (:func:`elbo`) is exact in closed form for any Gaussian q.

**Missing values.** :func:`fit` marginalises entries that are NaN (or False in ``observed``):
the noise is diagonal, so a point's posterior given its observed coordinates uses only the
observed rows of :math:`W` (:math:`K_i = I + W_O^\top \Psi_O^{-1} W_O`, one l x l
Cholesky per point, batched), and the M-step takes the expected completed statistics
(:func:`masked_e_step`, :func:`masked_model`); :func:`observed_log_prob` and :func:`impute`
score and complete new data.

Shape letters: ``n`` data points, ``d`` data dim, ``l`` latent dim, ``m`` = l + l(l+1)/2,
``r`` restarts, ``s`` samples.

Example:
  >>> x = jax.random.normal(jax.random.key(0), (200, 5)) * jnp.array([3.0, 2, 1, 1, 1])
  >>> res = fit(jax.random.key(1), x, 2, noise="isotropic", max_iter=300, tol=1e-8)
  >>> q = posterior(res.params, x)
  >>> bool(jnp.allclose(elbo(res.params, q, x), log_prob(res.params, x), atol=1e-4))
  True
  >>> mdl = model("diagonal")
  >>> u = mdl.q_to_unconstrained(q)
  >>> u.shape  # (n, l + l(l+1)/2)
  (200, 5)
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

from emvi import _checks, em, missing

NOISE_TYPES: tuple[str, ...] = ("isotropic", "diagonal")
INITS: tuple[str, ...] = ("random", "pca")
DEFAULT_NOISE_FLOOR = 1e-6
_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------


class LinearGaussianParams(NamedTuple):
    """Parameters of the linear-Gaussian model (pPCA or factor analysis).

    Attributes:
      loadings: :math:`W`, shape (d, l).
      mean: :math:`\\mu`, shape (d,).
      noise_variance: :math:`\\sigma^2 > 0`, shape () for ``noise="isotropic"``, or
        :math:`\\psi`, the diagonal of :math:`\\Psi`, shape (d,) for ``noise="diagonal"``.
    """

    loadings: Float[Array, "d l"]
    mean: Float[Array, " d"]
    noise_variance: Float[Array, "*noise"]


class UnconstrainedParams(NamedTuple):
    """:class:`LinearGaussianParams` on the real line: the noise variance as its logarithm."""

    loadings: Float[Array, "d l"]
    mean: Float[Array, " d"]
    log_noise_variance: Float[Array, "*noise"]


class GaussianPosterior(NamedTuple):
    """A Gaussian q(z | x_i) per example (the layout of :func:`posterior`).

    Attributes:
      mean: shape (n, l).
      cov: shape (n, l, l), symmetric positive definite. The exact posterior has the same
        covariance for every example; it is broadcast so that every leaf has axis n.
    """

    mean: Float[Array, "n l"]
    cov: Float[Array, "n l l"]


class LinearGaussianData(NamedTuple):
    """What :func:`prepare` returns: the data and the data about a fixed reference point.

    Attributes:
      x: the data, shape (n, d).
      centred: :math:`x_i - r` with :math:`r` the (unweighted) mean of the whole data set,
        shape (n, d). Every statistic is a sum over examples of moments of this, so sums
        over chunks add, and second moments are centred however far the data sit from 0.
    """

    x: Float[Array, "n d"]
    centred: Float[Array, "n d"]


class LinearGaussianStats(NamedTuple):
    """Expected sufficient statistics, summed over weighted data.

    With :math:`c_i = x_i - r` (``data.centred``), :math:`m_i = E_q[z_i]`:

    Attributes:
      weight_sum: :math:`\\sum_i w_i`.
      sum_x: :math:`\\sum_i w_i x_i`, shape (d,).
      sum_c: :math:`\\sum_i w_i c_i`, shape (d,).
      sum_z: :math:`\\sum_i w_i m_i`, shape (l,).
      sum_cz: :math:`\\sum_i w_i c_i m_i^\\top`, shape (d, l).
      sum_zz: :math:`\\sum_i w_i E_q[z_i z_i^\\top]`, shape (l, l).
      sum_cc: :math:`\\sum_i w_i c_i \\circ c_i` (the diagonal scatter), shape (d,).
    """

    weight_sum: Float[Array, ""]
    sum_x: Float[Array, " d"]
    sum_c: Float[Array, " d"]
    sum_z: Float[Array, " l"]
    sum_cz: Float[Array, "d l"]
    sum_zz: Float[Array, "l l"]
    sum_cc: Float[Array, " d"]


class LinearGaussianPrior(NamedTuple):
    r"""An inverse-gamma prior on each noise variance, for MAP-EM.

    .. math::
        p(\psi) \propto \psi^{-(a + 1)} e^{-b / \psi}, \qquad a > 0,\ b > 0,

    on :math:`\sigma^2` (isotropic) or on every :math:`\psi_j` (diagonal); its mode is
    :math:`b / (a + 1)`. It acts like :math:`2a + 2` pseudo-observations with squared residual
    :math:`b / (a + 1)` each, and keeps the noise away from 0 without a floor. The loadings and
    mean keep a flat prior.

    Attributes:
      concentration: a.
      scale: b (in the units of the data squared).
    """

    concentration: Float[Array, ""] | float
    scale: Float[Array, ""] | float


class LinearGaussianHyper(NamedTuple):
    """``hyper`` of the model: the prior's (a, b) and the relative noise floor, as arrays.

    Maximum likelihood is the flat limit ``a = -1, b = 0`` (the prior density is then 1), which
    is what :func:`make_hyper` builds for ``prior=None``.

    Attributes:
      concentration: a (-1 for maximum likelihood).
      scale: b (0 for maximum likelihood).
      noise_floor: every noise variance is kept >= ``noise_floor`` times the data variance
        (per feature for factor analysis, averaged over features for pPCA).
    """

    concentration: Float[Array, ""]
    scale: Float[Array, ""]
    noise_floor: Float[Array, ""]


def make_hyper(
    prior: LinearGaussianPrior | None = None,
    noise_floor: float = DEFAULT_NOISE_FLOOR,
    dtype=jnp.float32,
) -> LinearGaussianHyper:
    """Builds the model's ``hyper`` from a prior (None: maximum likelihood) and a noise floor."""
    a, b = (-1.0, 0.0) if prior is None else (prior.concentration, prior.scale)
    return LinearGaussianHyper(*(jnp.asarray(v, dtype) for v in (a, b, noise_floor)))


def _check_noise(noise: str) -> str:
    return _checks.check_choice(noise, name="noise", choices=NOISE_TYPES)


def _psi(params: LinearGaussianParams) -> Array:
    """The noise variances as a (d,) vector (the isotropic scalar broadcast)."""
    return jnp.broadcast_to(params.noise_variance, params.mean.shape)


# ---------------------------------------------------------------------------------------
# Densities and the posterior
# ---------------------------------------------------------------------------------------


def prepare(x: Float[Array, "n d"]) -> LinearGaussianData:
    """The data and the data centred at their mean (see :class:`LinearGaussianData`)."""
    return LinearGaussianData(x, x - jnp.mean(x, axis=0)[None, :])


def _posterior_parts(params: LinearGaussianParams, x: Array) -> tuple[Array, Array, Array, Array]:
    """``(post_mean (n, l), post_cov (l, l), chol_k (l, l), c = x - mu (n, d))``."""
    w, psi = params.loadings, _psi(params)
    u = w / jnp.sqrt(psi)[:, None]
    eye = jnp.eye(w.shape[1], dtype=w.dtype)
    chol = jnp.linalg.cholesky(eye + u.T @ u)
    c = x - params.mean[None, :]
    # One solve, then a matmul: two independent solves against the same factor would be two
    # unordered LAPACK calls in the fit loop, which deadlock jaxlib 0.10.2's batched kernels
    # on XLA:CPU once they are large enough (issue 13; tests/test_hang_regression.py).
    post_cov = cho_solve((chol, True), eye)
    post_cov = 0.5 * (post_cov + post_cov.T)
    post_mean = c @ ((w / psi[:, None]) @ post_cov)
    return post_mean, post_cov, chol, c


def _log_prob_from_parts(params, post_mean, chol, c) -> Array:
    psi = _psi(params)
    resid = (c - post_mean @ params.loadings.T) / jnp.sqrt(psi)[None, :]
    maha = jnp.sum(resid**2, axis=1) + jnp.sum(post_mean**2, axis=1)
    log_det = jnp.sum(jnp.log(psi)) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (c.shape[1] * _LOG_2PI + log_det + maha)


def _check_scoring(params: LinearGaussianParams, x) -> None:
    """x matches the params' d columns; finite when concrete (see _checks.check_columns)."""
    _checks.check_columns(x, params.mean.shape[-1], what="the params (mean, loadings)")


def log_prob(params: LinearGaussianParams, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r""":math:`\log \mathcal N(x_i \mid \mu, W W^\top + \Psi)` in O(n d l + d l^2).

    .. math::
        \log p(x) = -\tfrac12\Big[d \log 2\pi + \textstyle\sum_j \log\psi_j + \log|K|
            + (c - W m)^\top \Psi^{-1} (c - W m) + m^\top m\Big],

    with :math:`c = x - \mu` and :math:`m = E[z \mid x]`: the determinant lemma and the
    Mahalanobis term as a sum of two squares (no cancellation, no d x d matrix).

    Args:
      params: the model's parameters.
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    _check_scoring(params, x)
    post_mean, _, chol, c = _posterior_parts(params, x)
    return _log_prob_from_parts(params, post_mean, chol, c)


def posterior(params: LinearGaussianParams, x: Float[Array, "n d"]) -> GaussianPosterior:
    r"""Exact posterior :math:`\mathcal N(K^{-1} W^\top \Psi^{-1}(x_i - \mu), K^{-1})`.

    With :math:`K = I_l + W^\top \Psi^{-1} W`; for pPCA this is Tipping & Bishop's
    :math:`\mathcal N(M^{-1} W^\top (x_i - \mu), \sigma^2 M^{-1})`, :math:`M = \sigma^2 K`.

    Args:
      params: the model's parameters.
      x: data, shape (n, d).

    Returns:
      A :class:`GaussianPosterior`, means (n, l) and covariances (n, l, l).
    """
    _check_scoring(params, x)
    m, cov, _, _ = _posterior_parts(params, x)
    return GaussianPosterior(m, jnp.broadcast_to(cov, (x.shape[0], *cov.shape)))


def log_joint(
    params: LinearGaussianParams, x: Float[Array, "n d"], z: Float[Array, "*s n l"]
) -> Float[Array, "*s n"]:
    r""":math:`\log p(x_i, z) = \log \mathcal N(x_i \mid W z + \mu, \Psi) + \log \mathcal N(z
    \mid 0, I)` at latent points z of shape (..., n, l), for Monte Carlo estimators."""
    _check_scoring(params, x)
    psi = _psi(params)
    lead = (1,) * (z.ndim - 2)
    c = (x - params.mean[None, :]).reshape(*lead, *x.shape)
    resid = (c - z @ params.loadings.T) / jnp.sqrt(psi).reshape(*lead, 1, -1)
    d, l_ = params.loadings.shape
    lik = -0.5 * (d * _LOG_2PI + jnp.sum(jnp.log(psi)) + jnp.sum(resid**2, axis=-1))
    return lik - 0.5 * (l_ * _LOG_2PI + jnp.sum(z**2, axis=-1))


def elbo(
    params: LinearGaussianParams, q: GaussianPosterior, x: Float[Array, "n d"]
) -> Float[Array, " n"]:
    r"""The ELBO of a Gaussian :math:`q_i = \mathcal N(m_i, S_i)`, exact in closed form.

    .. math::
        \mathrm{ELBO}_i = E_{q_i}[\log p(x_i \mid z) + \log p(z)] + \mathcal H[q_i]
        = -\tfrac12\Big[d \log 2\pi + \textstyle\sum_j \log\psi_j
          + (c_i - W m_i)^\top \Psi^{-1} (c_i - W m_i) + m_i^\top m_i
          + \operatorname{tr}(K S_i) - l - \log|S_i|\Big],

    with :math:`c_i = x_i - \mu` and :math:`K = I + W^\top \Psi^{-1} W`. At the exact posterior
    (:math:`S_i = K^{-1}`) the trace is l, :math:`-\log|S_i| = \log|K|`, and the ELBO equals
    :func:`log_prob`; elsewhere it is below by :math:`\mathrm{KL}(q_i \,\|\, p(z \mid x_i))`.
    Differentiable in ``params`` and in ``q``.

    Args:
      params: the model's parameters.
      q: Gaussian q per example.
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    _check_scoring(params, x)
    w, psi = params.loadings, _psi(params)
    d, l_ = w.shape
    c = x - params.mean[None, :]
    resid = (c - q.mean @ w.T) / jnp.sqrt(psi)[None, :]
    u = w / jnp.sqrt(psi)[:, None]
    k_mat = jnp.eye(l_, dtype=w.dtype) + u.T @ u
    trace = jnp.einsum("ab,nab->n", k_mat, q.cov)
    chol_s = jnp.linalg.cholesky(q.cov)
    log_det_s = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_s, axis1=1, axis2=2)), axis=1)
    quad = jnp.sum(resid**2, axis=1) + jnp.sum(q.mean**2, axis=1)
    return -0.5 * (d * _LOG_2PI + jnp.sum(jnp.log(psi)) + quad + trace - l_ - log_det_s)


# ---------------------------------------------------------------------------------------
# E-step, statistics, M-step
# ---------------------------------------------------------------------------------------


def _stats(mean_z: Array, cov_sum: Array, data: LinearGaussianData, w: Array):
    """Statistics from per-example means and the weighted sum of the q covariances."""
    c = data.centred
    wc = w[:, None] * c
    wm = w[:, None] * mean_z
    return LinearGaussianStats(
        weight_sum=jnp.sum(w),
        sum_x=w @ data.x,
        sum_c=jnp.sum(wc, axis=0),
        sum_z=jnp.sum(wm, axis=0),
        sum_cz=wc.T @ mean_z,
        sum_zz=cov_sum + wm.T @ mean_z,
        sum_cc=jnp.sum(wc * c, axis=0),
    )


def expected_stats(
    q: GaussianPosterior, data: LinearGaussianData, weights: Float[Array, " n"]
) -> LinearGaussianStats:
    r"""The statistics the E-step would return if the posterior were ``q``.

    :math:`E_q[z_i z_i^\top] = S_i + m_i m_i^\top`; the rest are weighted sums of
    :math:`m_i`, :math:`c_i` and their products (see :class:`LinearGaussianStats`). With
    these, any q (an encoder's, a local optimiser's) drives the closed-form :func:`m_step`.

    Args:
      q: Gaussian q per example.
      data: :func:`prepare` d data.
      weights: per-example weights, shape (n,).

    Returns:
      Summed statistics.
    """
    return _stats(q.mean, jnp.einsum("n,nab->ab", weights, q.cov), data, weights)


def e_step(
    params: LinearGaussianParams, data: LinearGaussianData, weights: Float[Array, " n"]
) -> tuple[LinearGaussianStats, Float[Array, ""]]:
    r"""Exact E-step: the statistics at the posterior, and :math:`\sum_i w_i \log p(x_i)`.

    The posterior covariance :math:`K^{-1}` is shared, so
    :math:`\sum_i w_i E[z_i z_i^\top] = (\sum_i w_i) K^{-1} + \sum_i w_i m_i m_i^\top`
    (equal to :func:`expected_stats` at :func:`posterior`).

    Args:
      params: current parameters.
      data: :func:`prepare` d data.
      weights: per-example weights, shape (n,).

    Returns:
      ``(stats, sum_i w_i log p(x_i))``.
    """
    post_mean, post_cov, chol, c = _posterior_parts(params, data.x)
    stats = _stats(post_mean, jnp.sum(weights) * post_cov, data, weights)
    ll = _log_prob_from_parts(params, post_mean, chol, c)
    return stats, jnp.sum(weights * ll)


def _regression(stats: LinearGaussianStats) -> tuple[Array, Array, Array, Array]:
    r"""Least squares of x on :math:`\tilde z = (z, 1)`: loadings, mean, summed squared
    residuals per feature, and the weighted data variance per feature.

    In the centred coordinates :math:`c = x - r`, :math:`[W, b] = A B^{-1}` with
    :math:`A = [\sum w c m^\top, \sum w c]`,
    :math:`B = \begin{bmatrix}\sum w E[z z^\top] & \sum w m\\ \sum w m^\top & \sum w\end{bmatrix}`,
    :math:`\mu' = r + b = (\sum w x - W \sum w m) / \sum w`, and
    :math:`\sum_i w_i E[(x_{ij} - \mu'_j - W_{j\cdot} z_i)^2] = \sum_i w_i c_{ij}^2
    - (A B^{-1} A^\top)_{jj}`.
    """
    s0 = stats.weight_sum
    l_ = stats.sum_z.shape[0]
    a = jnp.concatenate([stats.sum_cz, stats.sum_c[:, None]], axis=1)  # (d, l+1)
    top = jnp.concatenate([stats.sum_zz, stats.sum_z[:, None]], axis=1)
    bottom = jnp.concatenate([stats.sum_z, s0[None]])[None, :]
    b = jnp.concatenate([top, bottom], axis=0)  # (l+1, l+1)
    chol = jnp.linalg.cholesky(0.5 * (b + b.T))
    w_aug = cho_solve((chol, True), a.T).T  # (d, l+1)
    loadings = w_aug[:, :l_]
    new_mean = (stats.sum_x - loadings @ stats.sum_z) / s0
    sq = jnp.maximum(stats.sum_cc - jnp.sum(w_aug * a, axis=1), 0.0)
    shift = stats.sum_c / s0
    var = jnp.maximum(stats.sum_cc / s0 - shift**2, 0.0)
    return loadings, new_mean, sq, var


def noise_floor_values(var: Float[Array, " d"], relative: Array, *, noise: str) -> Array:
    r"""The floor of the noise variances: ``relative`` times the data variance.

    Isotropic: times the variance averaged over features (a scalar). Diagonal: per feature,
    a constant feature using the average instead. Never below machine epsilon times that
    variance (so ``relative=0`` still keeps :math:`W^\top \Psi^{-1} W` representable: a
    Heywood case drives some :math:`\psi_j` to 0, and at the smallest normal number the
    posterior precision overflows), nor below the smallest normal number.
    """
    mean_var = jnp.mean(var)
    scale = mean_var if noise == "isotropic" else jnp.where(var > 0, var, mean_var)
    finfo = jnp.finfo(var.dtype)
    return jnp.maximum(jnp.maximum(relative, finfo.eps) * scale, finfo.tiny)


def m_step(
    stats: LinearGaussianStats, hyper: LinearGaussianHyper | None = None, *, noise: str
) -> LinearGaussianParams:
    r"""Closed-form (MAP-)M-step: regression for :math:`[W, \mu]`, then the noise.

    With :math:`R_j = \sum_i w_i E[(x_{ij} - \mu_j - W_{j\cdot} z_i)^2]`,
    :math:`s_0 = \sum_i w_i` and the inverse-gamma prior's (a, b),

    .. math::
        \sigma^2 = \frac{\sum_j R_j + 2b}{d\, s_0 + 2a + 2} \ \text{(isotropic)}, \qquad
        \psi_j = \frac{R_j + 2b}{s_0 + 2a + 2} \ \text{(diagonal)},

    each the maximiser of :math:`-\frac{N}{2}\log\psi - \frac{R}{2\psi} - (a+1)\log\psi
    - \frac{b}{\psi}`, then raised to the floor :func:`noise_floor_values` (the constrained
    maximiser, the objective being unimodal in :math:`\psi`). Maximum likelihood is a = -1,
    b = 0. For a fixed mean the loadings are Ghahramani & Hinton's
    :math:`W = (\sum_i c_i m_i^\top)(\sum_i E[z_i z_i^\top])^{-1}`.

    Args:
      stats: summed statistics.
      hyper: a :class:`LinearGaussianHyper`, or None (maximum likelihood, floor 1e-6).
      noise: ``"isotropic"`` or ``"diagonal"`` (static).

    Returns:
      New parameters.
    """
    loadings, mean, sq, var = _regression(stats)
    dtype = loadings.dtype
    if hyper is None:
        hyper = make_hyper(None, DEFAULT_NOISE_FLOOR, dtype)
    a, b = hyper.concentration.astype(dtype), hyper.scale.astype(dtype)
    s0 = stats.weight_sum
    if noise == "isotropic":
        psi = (jnp.sum(sq) + 2.0 * b) / (sq.shape[0] * s0 + 2.0 * a + 2.0)
    else:
        psi = (sq + 2.0 * b) / (s0 + 2.0 * a + 2.0)
    floor = noise_floor_values(var, hyper.noise_floor.astype(dtype), noise=noise)
    return LinearGaussianParams(loadings, mean, jnp.maximum(psi, floor))


def log_prior(params: LinearGaussianParams, hyper: LinearGaussianHyper | None) -> Array:
    r""":math:`\sum \log p(\psi) = \sum [-(a+1)\log\psi - b/\psi]` (up to a constant), over the
    one :math:`\sigma^2` or the d :math:`\psi_j`: what :func:`m_step` maximises with the
    expected log-likelihood. 0 for maximum likelihood (``hyper`` None or a = -1, b = 0)."""
    if hyper is None:
        return jnp.zeros((), params.mean.dtype)
    dtype = params.mean.dtype
    a, b = hyper.concentration.astype(dtype), hyper.scale.astype(dtype)
    v = params.noise_variance
    return jnp.sum(-(a + 1.0) * jnp.log(v) - b / v)


# ---------------------------------------------------------------------------------------
# Bijections (the gradient face)
# ---------------------------------------------------------------------------------------


def to_unconstrained(params: LinearGaussianParams) -> UnconstrainedParams:
    """Loadings and mean as they are, the noise variances as logarithms."""
    return UnconstrainedParams(params.loadings, params.mean, jnp.log(params.noise_variance))


def from_unconstrained(u: UnconstrainedParams) -> LinearGaussianParams:
    """The inverse of :func:`to_unconstrained`; every real ``u`` gives valid parameters."""
    return LinearGaussianParams(u.loadings, u.mean, jnp.exp(u.log_noise_variance))


@functools.cache
def _tril(l_: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.tril_indices(l_)
    return rows, cols, rows == cols


def _latent_dim_of(m: int) -> int:
    l_ = (math.isqrt(9 + 8 * m) - 3) // 2
    if l_ + l_ * (l_ + 1) // 2 != m:
        raise ValueError(f"an unconstrained q has l + l(l+1)/2 columns; got {m}.")
    return l_


def q_to_unconstrained(q: GaussianPosterior) -> Float[Array, "n m"]:
    r"""``[mean, tril(L)]`` per example, :math:`S = L L^\top` (Cholesky) with
    :math:`\log L_{jj}` in place of the diagonal; shape (n, l + l(l+1)/2)."""
    rows, cols, diag = _tril(q.mean.shape[1])
    chol = jnp.linalg.cholesky(q.cov)
    tri = chol[:, rows, cols]
    tri = jnp.where(diag[None, :], jnp.log(jnp.where(diag[None, :], tri, 1.0)), tri)
    return jnp.concatenate([q.mean, tri], axis=1)


def q_from_unconstrained(u: Float[Array, "n m"]) -> GaussianPosterior:
    """The inverse of :func:`q_to_unconstrained`: any real (n, m) array is a valid q."""
    l_ = _latent_dim_of(u.shape[1])
    rows, cols, diag = _tril(l_)
    tri = u[:, l_:]
    tri = jnp.where(diag[None, :], jnp.exp(tri), tri)
    chol = jnp.zeros((u.shape[0], l_, l_), u.dtype).at[:, rows, cols].set(tri)
    return GaussianPosterior(u[:, :l_], chol @ jnp.swapaxes(chol, 1, 2))


# ---------------------------------------------------------------------------------------
# The ExactModel
# ---------------------------------------------------------------------------------------


@functools.cache
def model(noise: str) -> em.ExactModel:
    """The linear-Gaussian model as an :class:`emvi.em.ExactModel`, every field filled.

    Cached: the same object for each ``noise``, so jitted drivers do not recompile. ``data`` is
    :func:`prepare` d (the model's ``log_prob``/``posterior``/``elbo`` read ``data.x``);
    ``hyper`` is a :class:`LinearGaussianHyper` or None; ``q`` a :class:`GaussianPosterior`.

    Args:
      noise: ``"isotropic"`` (pPCA) or ``"diagonal"`` (factor analysis).
    """
    noise = _check_noise(noise)
    return em.ExactModel(
        e_step=e_step,
        m_step=functools.partial(m_step, noise=noise),
        log_prob=lambda params, data: log_prob(params, data.x),
        posterior=lambda params, data: posterior(params, data.x),
        elbo=lambda params, q, data: elbo(params, q, data.x),
        prepare=prepare,
        expected_stats=expected_stats,
        to_unconstrained=to_unconstrained,
        from_unconstrained=from_unconstrained,
        log_prior=log_prior,
        q_to_unconstrained=q_to_unconstrained,
        q_from_unconstrained=q_from_unconstrained,
    )


# ---------------------------------------------------------------------------------------
# Missing values: the posterior given the observed coordinates
# ---------------------------------------------------------------------------------------


class LinearGaussianMissingData(NamedTuple):
    """What :func:`prepare_missing` returns.

    Attributes:
      x: the data with each missing entry replaced by the reference point's entry, (n, d).
      centred: :math:`o_i \\circ (x_i - r)`, 0 where missing, (n, d); :math:`r` is the mean
        of each column's observed entries.
      observed: (n, d) 1.0 where observed, 0.0 where missing.
    """

    x: Float[Array, "n d"]
    centred: Float[Array, "n d"]
    observed: Float[Array, "n d"]


def prepare_missing(values: Float[Array, "n d"], observed: Float[Array, "n d"]):
    """The data for :func:`masked_model` (see :class:`LinearGaussianMissingData`)."""
    ref = missing.column_means(values, observed, jnp.ones(values.shape[0], values.dtype))
    x = observed * values + (1.0 - observed) * ref[None, :]
    return LinearGaussianMissingData(x, x - ref[None, :], observed)


def _masked_posterior_parts(params: LinearGaussianParams, x: Array, observed: Array):
    r"""Per-point posterior given the observed coordinates :math:`O_i`:
    :math:`K_i = I + W_O^\top \Psi_O^{-1} W_O`, :math:`S_i = K_i^{-1}`,
    :math:`m_i = S_i W_O^\top \Psi_O^{-1} (x_O - \mu_O)`: the missing rows of W are masked
    out (the noise is diagonal, so the missing coordinates are dropped factors). Returns
    ``(m (n, l), S (n, l, l), chol_K (n, l, l), c (n, d))`` with ``c`` = o (x - mu)."""
    w, psi = params.loadings, _psi(params)
    l_ = w.shape[1]
    u = w / jnp.sqrt(psi)[:, None]
    eye = jnp.eye(l_, dtype=w.dtype)
    k_mat = eye[None] + jnp.einsum("nd,da,db->nab", observed, u, u)
    chol = jnp.linalg.cholesky(k_mat)
    # One (batched) solve and a matmul, as in _posterior_parts (issue 13).
    post_cov = cho_solve((chol, True), jnp.broadcast_to(eye, k_mat.shape))
    post_cov = 0.5 * (post_cov + jnp.swapaxes(post_cov, 1, 2))
    c = observed * (x - params.mean[None, :])
    post_mean = jnp.einsum("nab,nb->na", post_cov, (c / psi[None, :]) @ w)
    return post_mean, post_cov, chol, c


def _masked_log_prob_from_parts(params, observed, post_mean, chol, c) -> Array:
    psi = _psi(params)
    resid = observed * (c - post_mean @ params.loadings.T) / jnp.sqrt(psi)[None, :]
    maha = jnp.sum(resid**2, axis=1) + jnp.sum(post_mean**2, axis=1)
    log_det = observed @ jnp.log(psi) + 2.0 * jnp.sum(
        jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), axis=1
    )
    return -0.5 * (jnp.sum(observed, axis=1) * _LOG_2PI + log_det + maha)


def masked_e_step(
    params: LinearGaussianParams, data: LinearGaussianMissingData, weights: Float[Array, " n"]
) -> tuple[LinearGaussianStats, Float[Array, ""]]:
    r"""Exact E-step with missing entries: expected completed statistics and
    :math:`\sum_i w_i \log p(x_{i,O_i})`.

    Given :math:`x_O`, :math:`z \sim \mathcal N(m_i, S_i)` and a missing coordinate is
    :math:`x_c = W_{c\cdot} z + \mu_c + \epsilon_c`, so with :math:`\hat c_{ic} = W_{c\cdot}
    m_i + \mu_c - r_c` there: :math:`E[c_{ic} z^\top] = \hat c_{ic} m_i^\top + W_{c\cdot} S_i`
    and :math:`E[c_{ic}^2] = \hat c_{ic}^2 + W_{c\cdot} S_i W_{c\cdot}^\top + \psi_c`; observed
    coordinates enter as they are. :func:`m_step` takes the sums unchanged.
    """
    o = data.observed
    mean_z, cov_z, chol, c = _masked_posterior_parts(params, data.x, o)
    w = params.loadings
    miss = 1.0 - o
    # data.x holds r where missing, and data.centred holds 0 there.
    fill = mean_z @ w.T + params.mean[None, :] - data.x
    c_hat = data.centred + miss * fill
    ws = jnp.einsum("dl,nlk->ndk", w, cov_z)  # W S_i, (n, d, l)
    var_miss = jnp.einsum("ndk,dk->nd", ws, w) + _psi(params)[None, :]
    wt = weights[:, None]
    stats = LinearGaussianStats(
        weight_sum=jnp.sum(weights),
        sum_x=weights @ (data.x + miss * fill),
        sum_c=jnp.sum(wt * c_hat, axis=0),
        sum_z=jnp.sum(wt * mean_z, axis=0),
        sum_cz=(wt * c_hat).T @ mean_z + jnp.einsum("nd,ndk->dk", wt * miss, ws),
        sum_zz=jnp.einsum("n,nab->ab", weights, cov_z) + (wt * mean_z).T @ mean_z,
        sum_cc=jnp.sum(wt * (c_hat * c_hat + miss * var_miss), axis=0),
    )
    ll = _masked_log_prob_from_parts(params, o, mean_z, chol, c)
    return stats, jnp.sum(weights * ll)


def _masked_elbo(params, q: GaussianPosterior, data: LinearGaussianMissingData) -> Array:
    """:func:`elbo` of the observed coordinates (the ELBO of :math:`\\log p(x_O)`)."""
    w, psi = params.loadings, _psi(params)
    l_ = w.shape[1]
    o = data.observed
    c = o * (data.x - params.mean[None, :])
    resid = o * (c - q.mean @ w.T) / jnp.sqrt(psi)[None, :]
    u = w / jnp.sqrt(psi)[:, None]
    k_mat = jnp.eye(l_, dtype=w.dtype)[None] + jnp.einsum("nd,da,db->nab", o, u, u)
    trace = jnp.einsum("nab,nab->n", k_mat, q.cov)
    chol_s = jnp.linalg.cholesky(q.cov)
    log_det_s = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_s, axis1=1, axis2=2)), axis=1)
    quad = jnp.sum(resid**2, axis=1) + jnp.sum(q.mean**2, axis=1)
    const = jnp.sum(o, axis=1) * _LOG_2PI + o @ jnp.log(psi)
    return -0.5 * (const + quad + trace - l_ - log_det_s)


@functools.cache
def masked_model(noise: str) -> em.ExactModel:
    """The model with missing entries as an :class:`emvi.em.ExactModel` (cached).

    ``data`` is :func:`prepare_missing` d; ``log_prob`` is :math:`\\log p(x_O)`, ``posterior``
    the per-point Gaussian given the observed coordinates, ``elbo`` the bound on
    :math:`\\log p(x_O)`. No ``expected_stats`` (the completed statistics depend on the
    parameters) and no ``prepare``; the gradient face is :func:`model`'s.
    """

    def log_prob_(params, data):
        m, _, chol, c = _masked_posterior_parts(params, data.x, data.observed)
        return _masked_log_prob_from_parts(params, data.observed, m, chol, c)

    def posterior_(params, data):
        m, s, _, _ = _masked_posterior_parts(params, data.x, data.observed)
        return GaussianPosterior(m, s)

    return model(noise)._replace(
        e_step=masked_e_step,
        log_prob=log_prob_,
        posterior=posterior_,
        elbo=_masked_elbo,
        prepare=None,
        expected_stats=None,
    )


def observed_log_prob(params: LinearGaussianParams, x, observed=None) -> Float[Array, " n"]:
    r""":math:`\log \mathcal N(x_{i,O} \mid \mu_O, (W W^\top + \Psi)_{OO})` of each point's
    observed coordinates (missing where ``x`` is NaN or ``observed`` is False; see
    :func:`emvi.missing.check_observed`), in O(n d l^2), no d x d matrix.

    Raises:
      ValueError: for a bad ``x`` or ``observed`` or a column count other than the params'.

    Example:
      >>> p = LinearGaussianParams(jnp.ones((2, 1)), jnp.zeros(2), jnp.array(1.0))
      >>> float(observed_log_prob(p, np.array([[0.0, np.nan]]))[0])  # log N(0 | 0, 2)
      -1.265...
    """
    values, obs = missing.scoring_input(
        x, observed, lambda v: _checks.check_columns(v, params.mean.shape[0])
    )
    m, _, chol, c = _masked_posterior_parts(params, values, obs)
    return _masked_log_prob_from_parts(params, obs, m, chol, c)


def impute(params: LinearGaussianParams, x, observed=None) -> Float[Array, "n d"]:
    r"""``x`` with each missing entry replaced by its conditional mean
    :math:`E[x_{i,M} \mid x_{i,O}] = W_M m_i + \mu_M`, :math:`m_i = E[z \mid x_{i,O}]`;
    observed entries are returned as they are.

    Raises:
      ValueError: as :func:`observed_log_prob`.

    Example:
      >>> p = LinearGaussianParams(jnp.ones((2, 1)), jnp.zeros(2), jnp.array(1.0))
      >>> [round(v, 4) for v in impute(p, np.array([[2.0, np.nan]]))[0].tolist()]  # 2 * 1 / 2
      [2.0, 1.0]
    """
    values, obs = missing.scoring_input(
        x, observed, lambda v: _checks.check_columns(v, params.mean.shape[0])
    )
    m, _, _, _ = _masked_posterior_parts(params, values, obs)
    return jnp.where(obs > 0, values, m @ params.loadings.T + params.mean[None, :])


# ---------------------------------------------------------------------------------------
# Sampling, initialisation, closed form, fit
# ---------------------------------------------------------------------------------------


def sample(
    key: Key[Array, ""], params: LinearGaussianParams, num_samples: int
) -> tuple[Float[Array, "n d"], Float[Array, "n l"]]:
    """Draws ``num_samples`` points by ancestral sampling; returns ``(x, z)``.

    Args:
      key: a typed PRNG key.
      params: the model's parameters.
      num_samples: n, a static Python int.

    Returns:
      ``(x (n, d), z (n, l))`` in the dtype of the params.
    """
    key = _checks.as_key(key)
    key_z, key_e = jax.random.split(key)
    d, l_ = params.loadings.shape
    dtype = params.loadings.dtype
    z = jax.random.normal(key_z, (num_samples, l_), dtype)
    eps = jax.random.normal(key_e, (num_samples, d), dtype)
    scale = jnp.sqrt(_psi(params))[None, :]
    return z @ params.loadings.T + params.mean[None, :] + scale * eps, z


def _pca_params(x: Array, latent_dim: int, noise: str) -> LinearGaussianParams:
    """Principal components of the (biased, two-pass) covariance: the pPCA maximum."""
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    c = x - mean[None, :]
    cov = (c.T @ c) / n
    evals, evecs = jnp.linalg.eigh(cov)  # ascending
    evals, evecs = evals[::-1], evecs[:, ::-1]
    sigma2 = jnp.mean(evals[latent_dim:])
    scale = jnp.sqrt(jnp.maximum(evals[:latent_dim] - sigma2, 0.0))
    w = evecs[:, :latent_dim] * scale[None, :]
    if noise == "isotropic":
        return LinearGaussianParams(w, mean, sigma2)
    # Factor analysis: what the components leave of each feature's variance.
    var = jnp.diagonal(cov)
    floor = noise_floor_values(var, jnp.asarray(DEFAULT_NOISE_FLOOR, x.dtype), noise=noise)
    return LinearGaussianParams(w, mean, jnp.maximum(var - jnp.sum(w**2, axis=1), floor))


def init_params(
    key: Key[Array, ""],
    x: Float[Array, "n d"],
    latent_dim: int,
    *,
    noise: str,
    method: str = "random",
) -> LinearGaussianParams:
    r"""Initial parameters.

    * ``"random"``: :math:`\mu = \bar x`, noise variance :math:`v / 2` and
      :math:`W_{jk} \sim \mathcal N(0, v / (2 l))`, with v the variance of each feature
      (diagonal; a constant feature uses the mean variance) or the mean variance over features
      (isotropic), so the initial model has about the variance of the data.
    * ``"pca"``: the principal components (:func:`closed_form_ml`'s solution, which for pPCA
      *is* the maximum); for factor analysis with :math:`\psi_j` what the components leave of
      each feature's variance. Deterministic: ``key`` is not used.

    Args:
      key: a typed PRNG key.
      x: data, shape (n, d).
      latent_dim: l (static).
      noise: ``"isotropic"`` or ``"diagonal"`` (static).
      method: one of :data:`INITS` (static).

    Returns:
      :class:`LinearGaussianParams` in the dtype of ``x``.
    """
    key = _checks.as_key(key)
    noise = _check_noise(noise)
    _checks.check_choice(method, name="method", choices=INITS)
    if method == "pca":
        return _pca_params(x, latent_dim, noise)
    mean = jnp.mean(x, axis=0)
    var = jnp.mean((x - mean[None, :]) ** 2, axis=0)
    var = jnp.where(var > 0, var, jnp.mean(var))
    if noise == "isotropic":
        var = jnp.broadcast_to(jnp.mean(var), var.shape)
    w = jax.random.normal(key, (x.shape[1], latent_dim), x.dtype)
    w = w * jnp.sqrt(var / (2.0 * latent_dim))[:, None]
    psi = 0.5 * var
    return LinearGaussianParams(w, mean, psi[0] if noise == "isotropic" else psi)


_pca_params_jit = jax.jit(_pca_params, static_argnames=("latent_dim", "noise"))


def closed_form_ml(x, latent_dim: int) -> LinearGaussianParams:
    r"""The maximum-likelihood pPCA parameters from the eigendecomposition of the covariance.

    With the (biased, two-pass) sample covariance :math:`S = U \Lambda U^\top`,
    eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_d`:

    .. math::
        \mu = \bar x, \qquad \sigma^2 = \frac{1}{d - l} \sum_{j=l+1}^{d} \lambda_j, \qquad
        W = U_l (\Lambda_l - \sigma^2 I_l)^{1/2}

    (Tipping & Bishop 1999; W is unique up to a rotation of z, here R = I). Costs one
    d x d eigendecomposition. Factor analysis has no closed form.

    Args:
      x: data, shape (n, d).
      latent_dim: l, 1 <= l < d.

    Returns:
      Isotropic :class:`LinearGaussianParams` in the dtype of ``x``.

    Raises:
      ValueError: on invalid ``x`` or ``latent_dim``.
    """
    arr = validate_inputs(x, latent_dim)
    return _pca_params_jit(jnp.asarray(arr), latent_dim=latent_dim, noise="isotropic")


def validate_inputs(x, latent_dim) -> np.ndarray:
    """Eager checks of the data and latent dimension; returns ``x`` as NumPy.

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


def _check_prior(prior) -> LinearGaussianPrior | None:
    if prior is None:
        return None
    if not isinstance(prior, LinearGaussianPrior):
        raise ValueError(f"prior must be a LinearGaussianPrior or None; got {type(prior)}.")
    a = _checks.check_positive(prior.concentration, name="prior.concentration")
    b = _checks.check_positive(prior.scale, name="prior.scale")
    return LinearGaussianPrior(a, b)


def _check_init_params(init, d: int, latent_dim: int, noise: str, dtype) -> LinearGaussianParams:
    try:
        w, mu, v = (np.asarray(a, dtype) for a in init)
    except (TypeError, ValueError) as err:
        raise ValueError(f"init must be one of {INITS} or LinearGaussianParams: {err}") from err
    noise_shape = () if noise == "isotropic" else (d,)
    for name, arr, shape in (
        ("loadings", w, (d, latent_dim)),
        ("mean", mu, (d,)),
        ("noise_variance", v, noise_shape),
    ):
        if arr.shape != shape:
            raise ValueError(f"init.{name} must have shape {shape}; got {arr.shape}.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"init.{name} contains NaN or inf.")
    if np.any(v <= 0):
        raise ValueError("init.noise_variance must be > 0.")
    return LinearGaussianParams(*(jnp.asarray(a) for a in (w, mu, v)))


def _rank_deficiency_error(arr: np.ndarray, w: np.ndarray | None, latent_dim: int) -> None:
    """With no noise floor, data in an affine subspace of dimension <= l make the likelihood
    unbounded (the noise variance's maximum is 0): refuse them."""
    wts = np.ones(arr.shape[0]) if w is None else w
    keep = wts > 0
    xw, ww = arr[keep].astype(np.float64), wts[keep] / wts[keep].sum()
    centred = xw - ww @ xw
    cov = (centred * ww[:, None]).T @ centred  # d x d: cheaper than an SVD of the data
    evals = np.linalg.eigvalsh(0.5 * (cov + cov.T))
    # A zero eigenvalue of a computed covariance comes out at ~d eps lambda_max.
    tol = 100 * cov.shape[0] * np.finfo(arr.dtype).eps * max(evals[-1], 0.0)
    rank = int(np.sum(evals > tol))
    if rank <= latent_dim:
        raise ValueError(
            f"x (with its weights) spans an affine subspace of dimension {rank} <= latent_dim "
            f"({latent_dim}), so the maximum-likelihood noise variance is 0 and the likelihood "
            "is unbounded; use noise_floor > 0, a prior, or a smaller latent_dim."
        )


@functools.partial(jax.jit, static_argnames=("latent_dim", "num_init", "noise", "method"))
def _init_batch(key, x, *, latent_dim, num_init, noise, method):
    keys = jax.random.split(key, num_init)
    return jax.vmap(lambda k: init_params(k, x, latent_dim, noise=noise, method=method))(keys)


def fit(
    key: Key[Array, ""],
    x,
    latent_dim: int,
    *,
    noise: str,
    init: str | LinearGaussianParams = "random",
    prior: LinearGaussianPrior | None = None,
    sample_weight=None,
    max_iter: int = 500,
    tol: float = 1e-6,
    num_init: int = 1,
    chunk_size: int | None = None,
    noise_floor: float = DEFAULT_NOISE_FLOOR,
    observed=None,
) -> em.FitResult:
    r"""Fits the model by (MAP-)EM on device through :func:`emvi.em.fit`, best of ``num_init``.

    pPCA's likelihood has no local maxima but the global one (Tipping & Bishop), and EM crawls
    when the l-th and (l+1)-th covariance eigenvalues are close (:func:`closed_form_ml` gives
    the answer directly); factor analysis can have several maxima and Heywood cases (a
    feature explained entirely by the factors, maximum-likelihood :math:`\psi_j = 0`), which
    the relative ``noise_floor`` or a ``prior`` keep finite.

    Args:
      key: a typed PRNG key (drives the initialisation).
      x: data, shape (n, d), n >= 2; integer arrays are cast to float32.
      latent_dim: l, 1 <= l < d.
      noise: ``"isotropic"`` (pPCA) or ``"diagonal"`` (factor analysis).
      init: a method of :func:`init_params` (``"random"``, ``"pca"``), or parameters to start
        every restart from.
      prior: a :class:`LinearGaussianPrior` on the noise variances (MAP-EM), or None (maximum
        likelihood).
      sample_weight: per-point weights (n,), >= 0, not all 0; an integer weight counts as
        that many copies of the point.
      max_iter: the most EM iterations per start (>= 1).
      tol: stop once the mean log-likelihood changes by less than this (>= 0).
      num_init: number of starts (>= 1), run as one vmapped program.
      chunk_size: run the E-step over chunks of this many points.
      noise_floor: every noise variance is kept >= ``noise_floor`` times the data variance
        (per feature for factor analysis, averaged over features for pPCA); >= 0. With 0 and
        no prior, data in an affine subspace of dimension <= l are refused.
      observed: optional (n, d) boolean mask, False where an entry of ``x`` is missing.
        Missing entries (there, and wherever ``x`` is NaN) are marginalised exactly
        (:func:`masked_e_step`): ``log_likelihood`` is then the mean log density of the
        observed entries. The initialisation, and the checks on the data's variance and
        rank, see the missing entries filled with the observed column means. With nothing
        missing the fit is the ordinary one, bit for bit.

    Returns:
      An :class:`emvi.em.FitResult` (params, mean log-likelihood at the final params,
      history, num_iter, converged, every restart's final log-likelihood).

    Raises:
      ValueError: on non-finite or non-2-D ``x``, ``latent_dim`` outside [1, d), bad
        weights, prior, init or settings, or rank-deficient data with no floor and no prior.
    """
    key = _checks.as_key(key)
    noise = _check_noise(noise)
    values, mask = missing.check_observed(x, observed)
    if mask is None:
        arr = validate_inputs(x, latent_dim)
    else:
        col_mean = np.sum(values * mask, axis=0) / np.sum(mask, axis=0)
        arr = validate_inputs(np.where(mask, values, col_mean).astype(values.dtype), latent_dim)
    n, d = arr.shape
    dtype = arr.dtype
    max_iter, tol, num_init, chunk_size = _checks.check_em_settings(
        max_iter=max_iter, tol=tol, num_init=num_init, chunk_size=chunk_size
    )
    noise_floor = _checks.check_nonnegative(noise_floor, name="noise_floor")
    prior = _check_prior(prior)
    w = _checks.check_sample_weight(sample_weight, n)
    if noise_floor == 0 and prior is None:
        _rank_deficiency_error(arr, w, latent_dim)
    xj = jnp.asarray(arr)
    if isinstance(init, str):
        _checks.check_choice(init, name="init", choices=INITS)
        p0 = _init_batch(
            key, xj, latent_dim=latent_dim, num_init=num_init, noise=noise, method=init
        )
    else:
        start = _check_init_params(init, d, latent_dim, noise, dtype)
        p0 = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_init, *a.shape)), start)
    weights = None if w is None else jnp.asarray(w, dtype)
    mdl, data = model(noise), xj
    if mask is not None:
        mdl = masked_model(noise)
        data = prepare_missing(jnp.asarray(values), jnp.asarray(mask, dtype))
    return em.fit(
        mdl,
        p0,
        data,
        weights,
        max_iter=max_iter,
        tol=jnp.asarray(tol, dtype),
        hyper=make_hyper(prior, noise_floor, dtype),
        chunk_size=chunk_size,
    )
