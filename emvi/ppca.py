r"""Probabilistic PCA (Tipping & Bishop, 1999): the isotropic case of :mod:`emvi.linear_gaussian`.

.. math::
    z \sim \mathcal N(0, I_l), \qquad x \mid z \sim \mathcal N(W z + \mu, \sigma^2 I_d),
    \qquad\text{so}\qquad x \sim \mathcal N(\mu, W W^\top + \sigma^2 I_d).

The maths (posterior, log-likelihood, ELBO, E- and M-step, bijections) lives in
:mod:`emvi.linear_gaussian`, shared with factor analysis; this module is the thin name with
the noise fixed to ``"isotropic"``: :func:`model`, :func:`fit`, :func:`init_params`, and
:func:`closed_form_ml`, the maximum-likelihood solution from the eigendecomposition of the
covariance, which EM reaches too.

Shape letters: ``n`` data points, ``d`` data dim, ``l`` latent dim.

Example:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> x = jax.random.normal(jax.random.key(0), (200, 5)) @ jnp.diag(jnp.array([3.0, 2, 1, 1, 1]))
  >>> res = fit(jax.random.key(1), x, 2, max_iter=200, tol=1e-8)
  >>> ml = closed_form_ml(x, 2)
  >>> bool(jnp.abs(res.log_likelihood - jnp.mean(log_prob(ml, x))) < 1e-5)
  True
"""

from __future__ import annotations

from jaxtyping import Array, Float, Key

from emvi import em
from emvi import linear_gaussian as _lg
from emvi.linear_gaussian import (
    DEFAULT_NOISE_FLOOR,
    GaussianPosterior,
    LinearGaussianData,
    LinearGaussianHyper,
    LinearGaussianParams,
    LinearGaussianPrior,
    LinearGaussianStats,
    closed_form_ml,
    e_step,
    elbo,
    expected_stats,
    log_prob,
    make_hyper,
    posterior,
    prepare,
    sample,
    validate_inputs,
)

__all__ = [
    "DEFAULT_NOISE_FLOOR",
    "GaussianPosterior",
    "LinearGaussianData",
    "LinearGaussianHyper",
    "LinearGaussianPrior",
    "LinearGaussianStats",
    "PPCAParams",
    "closed_form_ml",
    "e_step",
    "elbo",
    "expected_stats",
    "fit",
    "init_params",
    "log_prob",
    "m_step",
    "make_hyper",
    "model",
    "posterior",
    "prepare",
    "sample",
    "validate_inputs",
]

PPCAParams = LinearGaussianParams
"""pPCA's parameters: :class:`emvi.linear_gaussian.LinearGaussianParams` with a scalar
``noise_variance`` :math:`\\sigma^2`."""

NOISE = "isotropic"


def model() -> em.ExactModel:
    """pPCA as an :class:`emvi.em.ExactModel`: ``linear_gaussian.model("isotropic")``."""
    return _lg.model(NOISE)


def m_step(stats: LinearGaussianStats, hyper: LinearGaussianHyper | None = None) -> PPCAParams:
    r"""Closed-form M-step with one pooled noise variance (see
    :func:`emvi.linear_gaussian.m_step`):
    :math:`\sigma^2 = \max\big(\frac{1}{d \sum_i w_i}\sum_i w_i E\|x_i - \mu - W z_i\|^2,
    \epsilon \bar v\big)` for maximum likelihood."""
    return _lg.m_step(stats, hyper, noise=NOISE)


def init_params(
    key: Key[Array, ""], x: Float[Array, "n d"], latent_dim: int, *, method: str = "random"
) -> PPCAParams:
    """Initial parameters (see :func:`emvi.linear_gaussian.init_params`)."""
    return _lg.init_params(key, x, latent_dim, noise=NOISE, method=method)


def fit(
    key: Key[Array, ""],
    x,
    latent_dim: int,
    *,
    init: str | PPCAParams = "random",
    prior: LinearGaussianPrior | None = None,
    sample_weight=None,
    max_iter: int = 500,
    tol: float = 1e-6,
    num_init: int = 1,
    chunk_size: int | None = None,
    noise_floor: float = DEFAULT_NOISE_FLOOR,
) -> em.FitResult:
    """Fits pPCA by EM (:func:`emvi.linear_gaussian.fit` with ``noise="isotropic"``).

    The likelihood has no local maxima other than the global one, so one start suffices in
    principle; :func:`closed_form_ml` gives the answer directly. Arguments, result and errors
    as in :func:`emvi.linear_gaussian.fit`.
    """
    return _lg.fit(
        key,
        x,
        latent_dim,
        noise=NOISE,
        init=init,
        prior=prior,
        sample_weight=sample_weight,
        max_iter=max_iter,
        tol=tol,
        num_init=num_init,
        chunk_size=chunk_size,
        noise_floor=noise_floor,
    )
