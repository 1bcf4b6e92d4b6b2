r"""Factor analysis (Rubin & Thayer 1982): the diagonal-noise case of :mod:`emvi.linear_gaussian`.

.. math::
    z \sim \mathcal N(0, I_l), \qquad x \mid z \sim \mathcal N(W z + \mu, \Psi),
    \quad \Psi = \mathrm{diag}(\psi_1, \dots, \psi_d).

The maths lives in :mod:`emvi.linear_gaussian`, shared with pPCA; this module is the thin
name with the noise fixed to ``"diagonal"``. The M-step sets each :math:`\psi_j` to the
expected squared residual of feature j (MAP under an inverse-gamma prior if one is given),
kept above ``noise_floor`` times the feature's variance: the floor keeps a *Heywood case* (a
feature explained entirely by the factors, whose maximum-likelihood :math:`\psi_j` is 0 and
log-likelihood unbounded) finite. scikit-learn's ``FactorAnalysis`` floors :math:`\psi` at the
absolute value 1e-12 instead; a relative floor does not depend on the units of the data. A
constant feature is floored at ``noise_floor`` times the mean variance over features.

Unlike pPCA there is no closed-form maximum, and the likelihood can have several local
maxima; :func:`fit` runs ``num_init`` random starts as one vmapped program.

Shape letters: ``n`` data points, ``d`` data dim, ``l`` latent dim.

Example:
  >>> import jax
  >>> import jax.numpy as jnp
  >>> key_w, key_x, key_fit = jax.random.split(jax.random.key(0), 3)
  >>> w = jax.random.normal(key_w, (6, 2))
  >>> z, e = jnp.split(jax.random.normal(key_x, (300, 8)), [2], axis=1)
  >>> x = z @ w.T + e * jnp.linspace(0.5, 1.5, 6)
  >>> res = fit(key_fit, x, 2, max_iter=300)
  >>> res.params.noise_variance.shape
  (6,)
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
    e_step,
    elbo,
    expected_stats,
    log_prob,
    make_hyper,
    posterior,
    prepare,
    sample,
)

__all__ = [
    "DEFAULT_NOISE_FLOOR",
    "FactorAnalysisParams",
    "GaussianPosterior",
    "LinearGaussianData",
    "LinearGaussianHyper",
    "LinearGaussianPrior",
    "LinearGaussianStats",
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
]

FactorAnalysisParams = LinearGaussianParams
"""Factor analysis' parameters: :class:`emvi.linear_gaussian.LinearGaussianParams` with a
(d,) ``noise_variance`` :math:`\\psi`."""

NOISE = "diagonal"


def model() -> em.ExactModel:
    """Factor analysis as an :class:`emvi.em.ExactModel`: ``linear_gaussian.model("diagonal")``."""
    return _lg.model(NOISE)


def m_step(
    stats: LinearGaussianStats, hyper: LinearGaussianHyper | None = None
) -> FactorAnalysisParams:
    r"""Closed-form M-step with one noise variance per feature (see
    :func:`emvi.linear_gaussian.m_step`): :math:`\psi_j = \max\big(\frac{1}{\sum_i w_i}
    \sum_i w_i E[(x_{ij} - \mu_j - W_{j\cdot} z_i)^2], \epsilon v_j\big)` for maximum
    likelihood."""
    return _lg.m_step(stats, hyper, noise=NOISE)


def init_params(
    key: Key[Array, ""], x: Float[Array, "n d"], latent_dim: int, *, method: str = "random"
) -> FactorAnalysisParams:
    """Initial parameters (see :func:`emvi.linear_gaussian.init_params`)."""
    return _lg.init_params(key, x, latent_dim, noise=NOISE, method=method)


def fit(
    key: Key[Array, ""],
    x,
    latent_dim: int,
    *,
    init: str | FactorAnalysisParams = "random",
    prior: LinearGaussianPrior | None = None,
    sample_weight=None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    num_init: int = 1,
    chunk_size: int | None = None,
    noise_floor: float = DEFAULT_NOISE_FLOOR,
) -> em.FitResult:
    """Fits factor analysis by EM (:func:`emvi.linear_gaussian.fit` with ``noise="diagonal"``).

    Arguments, result and errors as in :func:`emvi.linear_gaussian.fit`.
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
