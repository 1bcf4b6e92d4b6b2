r"""Bayesian Gaussian mixtures fitted by mean-field variational Bayes (CAVI).

MAP-EM (:func:`emvi.gmm.fit` with ``prior=``) keeps one point estimate of the parameters
:math:`\theta = (\pi, \mu, \Lambda)`; variational Bayes keeps a distribution over them. Both
climb an ELBO by coordinate ascent: for data :math:`x_{1:n}` and the mean-field family
:math:`q(z)\,q(\pi)\prod_j q(\mu_j, \Lambda_j)`,

.. math::
    \mathcal L(q) = E_q[\log p(x, z, \pi, \mu, \Lambda)] - E_q[\log q]
        \le \log p(x_{1:n}).

* **Local (E) step**: :math:`r_{ij} = \operatorname{softmax}_j \big(E[\log \pi_j]
  + E[\log \mathcal N(x_i \mid \mu_j, \Lambda_j^{-1})]\big)`, the exact GMM posterior with
  the log-parameters replaced by their expectations.
* **Global (M) step**: the closed-form conjugate update of :math:`q(\pi)` and
  :math:`q(\mu_j, \Lambda_j)` from the expected sufficient statistics
  :math:`N_j = \sum_i r_{ij}`, :math:`\bar x_j`, :math:`S_j` (computed by
  :func:`emvi.gmm.expected_stats`, the same statistics MAP-EM's M-step uses).

The parametrisation is scikit-learn's ``BayesianGaussianMixture``, and so are the updates
for every covariance type with the default ``family="sklearn"``
(``tests/test_bayesian_mixture.py`` matches it to 1e-8). With
prior :class:`emvi.gmm.GMMPrior` ``(alpha_0, m_0, beta_0, Psi_0, nu_0)`` — the very object
MAP-EM takes, read here as a Wishart on the precision with inverse scale :math:`\Psi_0`,
which is the inverse-Wishart :math:`\mathcal{IW}(\Psi_0, \nu_0)` on :math:`\Sigma` that
MAP-EM uses — and :math:`\tilde N_j = N_j + 10\epsilon`, :math:`\delta_j = \bar x_j - m_0`:

.. math::
    \beta_j = \beta_0 + \tilde N_j, \quad m_j = \frac{\beta_0 m_0 + \tilde N_j \bar x_j}{\beta_j},
    \quad \nu_j = \nu_0 + \tilde N_j, \quad
    C_j = \frac{\Psi_0 + \tilde N_j S_j + \tilde N_j \frac{\beta_0}{\beta_j} \delta_j
        \delta_j^\top}{\nu_j} \;(\text{full}),

where :math:`S_j` is the responsibility-weighted covariance plus ``reg_covar`` and
:math:`C_j` = ``covariances`` is the *normalised* Wishart scale, :math:`E[\Lambda_j] =
C_j^{-1}`. ``diag`` and ``spherical`` take the diagonal (or its mean over coordinates) of
the same formula; ``tied`` shares one :math:`C` with
:math:`\nu = \nu_0 + \sum_j \tilde N_j / k` and every statistic divided by k. The weights:

* ``"dirichlet_distribution"``: :math:`q(\pi) = \mathrm{Dir}(\alpha_0 + \tilde N)`;
* ``"dirichlet_process"`` (truncated stick-breaking, :math:`\pi_j = v_j \prod_{l<j}(1-v_l)`):
  :math:`q(v_j) = \mathrm{Beta}(1 + \tilde N_j, \alpha_0 + \sum_{l>j} \tilde N_l)`.

The expected log-density in the E-step is

.. math::
    E[\log \mathcal N(x \mid \mu_j, \Lambda_j^{-1})] = \log \mathcal N(x \mid m_j, C_j)
    + \tfrac12\Big(\sum_{c=0}^{d-1} \psi\big(\tfrac{\nu_j - c}{2}\big) + d \log 2
    - d \log \nu_j - \frac{d}{\beta_j}\Big).

**Which ELBO.** For ``full`` covariances these are the exact CAVI updates of the
Normal-Wishart mixture (Bishop 2006, sec. 10.2). scikit-learn's ``diag``, ``spherical`` and
``tied`` updates reuse the Wishart's :math:`E[\log|\Lambda|]` and a 1/k share of the data
for ``tied``, so they are not the exact CAVI of one model; with ``family="sklearn"`` (the
default) the loop tracks scikit-learn's bound :func:`lower_bound` for all four types
(for ``full`` it is :func:`elbo` minus a constant; tested). ``family="conjugate"`` fits
instead the exact conjugate model of each type, its prior read from the same
:class:`emvi.gmm.GMMPrior`:

* ``diag``: a Normal-Gamma per component and dimension, :math:`\tau_{jc} \sim
  \mathrm{Ga}(a_0 = \nu_0/2,\ b_{0c} = \Psi_{0c}/2)` (rate; the law of the Wishart's
  diagonal when :math:`\Psi_0` is diagonal), :math:`\mu_{jc} \mid \tau_{jc} \sim
  \mathcal N(m_{0c}, (\beta_0\tau_{jc})^{-1})`. Its q has :math:`a_j = \nu_j/2`,
  :math:`b_{jc} = a_j C_{jc}`: scikit-learn's :math:`(\nu_j, C_j)` are already this
  update, and only the local step changes, to :math:`E[\log\tau_{jc}] = \psi(a_j) -
  \log b_{jc}`.
* ``spherical``: one :math:`\tau_j \sim \mathrm{Ga}(d\nu_0/2,\ d\Psi_0/2)` (the law of
  :math:`\operatorname{tr}\Lambda/d` under the Wishart with scale :math:`\Psi_0 I`) shared
  by the d dimensions; :math:`a_j = d\nu_j/2` (the shape grows by :math:`N_j d/2`),
  :math:`b_j = a_j C_j`, again scikit-learn's :math:`(\nu_j, C_j)`.
* ``tied``: one :math:`\Lambda \sim \mathcal W(\Psi_0^{-1}, \nu_0)` shared by all
  components, :math:`\mu_j \mid \Lambda \sim \mathcal N(m_0, (\beta_0\Lambda)^{-1})`;
  :math:`q(\Lambda)\prod_j q(\mu_j\mid\Lambda)` is conjugate, with all the data:
  :math:`\nu = \nu_0 + \sum_j \tilde N_j`, :math:`C = (\Psi_0 + \sum_j \tilde N_j S_j +
  \sum_j \tilde N_j\frac{\beta_0}{\beta_j}\delta_j\delta_j^\top)/\nu`.
* ``full``: the same model and updates as ``"sklearn"``.

:class:`VBGMMPosterior` keeps its layout (``degrees_of_freedom`` :math:`\nu_j`,
``covariances`` :math:`C_j`, :math:`E[\Lambda_j] = C_j^{-1}`). :func:`elbo` is the exact
ELBO of this conjugate model, every constant kept, for any responsibilities and any q in
the family; with ``family="conjugate"`` it is computed after each iteration (from the
summed statistics, :func:`elbo_from_stats`, so without another pass over the data) and is
the stopping criterion and ``lower_bound``. Tested: it is :math:`\log p(x, z)` when q is
the exact posterior given one-hot q(z) (with one occupied component that is the k = 1
closed-form evidence: Normal-Gamma per dimension, shared Gamma, Normal-Wishart), it never
decreases under either half-step, the ``tied`` global step is where its gradient vanishes,
and updates and ELBO match a NumPy/SciPy implementation. The global step is the exact
CAVI update when ``reg_covar = 0`` (``reg_covar`` adds :math:`\tilde N_j` ``reg_covar`` to
each scatter's diagonal, as in scikit-learn).

**Where it sits.** :func:`vb_init` / :func:`vb_step` are the ``(init, step)`` pair over a
NamedTuple state, as :func:`emvi.em.em_init` / :func:`emvi.em.em_step`; :func:`run_vb` is
the ``lax.while_loop`` with scikit-learn's stopping rule. The switch from MAP-EM to VB is
the module: ``gmm.fit(key, x, k, prior=p)`` vs ``bayesian_mixture.fit(key, x, k, prior=p)``.

Shape letters: ``n`` data points, ``k`` components, ``d`` data dim, ``q`` feature columns.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import digamma, gammaln, multigammaln, xlogy
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Key

from emvi import _checks, gmm
from emvi import bernoulli_mixture as bmix
from emvi import kmeans as km
from emvi._checks import (
    as_data_matrix,
    check_choice,
    check_em_settings,
    check_nonnegative,
    check_positive,
    check_positive_int,
)

COVARIANCE_TYPES = gmm.COVARIANCE_TYPES
WEIGHT_PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")
INITS = ("kmeans", "random", "random_from_data")
FAMILIES = ("sklearn", "conjugate")
_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


class VBGMMPosterior(NamedTuple):
    """The variational posterior over the mixture parameters (scikit-learn's attributes).

    Attributes:
      weight_concentration: (k,) Dirichlet concentrations, or (2, k) the Beta parameters
        ``(a_j, b_j)`` of each stick for the Dirichlet process.
      mean_precision: (k,) :math:`\\beta_j`.
      means: (k, d) :math:`m_j`.
      degrees_of_freedom: (k,) :math:`\\nu_j`, or a scalar for ``tied``.
      covariances: the normalised Wishart scale :math:`C_j` (:math:`E[\\Lambda_j] =
        C_j^{-1}`) in :class:`emvi.gmm.GMMParams` layout: (k, d, d), (d, d), (k, d) or (k,).
    """

    weight_concentration: Float[Array, "..."]
    mean_precision: Float[Array, " k"]
    means: Float[Array, "k d"]
    degrees_of_freedom: Float[Array, "..."]
    covariances: Float[Array, "..."]


class VBGMMHyper(NamedTuple):
    """Array-valued hyperparameters of the global step: the prior and ``reg_covar``.

    ``prior.weight_concentration`` is the scalar :math:`\\alpha_0` (> 0) of either weight
    prior; the other fields as in :class:`emvi.gmm.GMMPrior`.
    """

    prior: gmm.GMMPrior
    reg_covar: Float[Array, ""]


class VBState(NamedTuple):
    """Loop state of :func:`vb_init` / :func:`vb_step`."""

    posterior: VBGMMPosterior
    lower_bound: Float[Array, ""]  # the family's bound after the last step (-inf at start)
    iteration: Int[Array, ""]
    converged: Bool[Array, ""]


class VBInfo(NamedTuple):
    """Diagnostics of one iteration (never fed back)."""

    lower_bound: Float[Array, ""]
    change: Float[Array, ""]
    log_prob_norm: Float[Array, ""]  # mean over points of logsumexp_j of the E-step logits


class VBGMMFit(NamedTuple):
    """What :func:`fit` and :func:`fit_from_resp` return.

    Attributes:
      posterior: the variational posterior after the last global step (input coordinates).
      lower_bound: the bound after the last iteration: scikit-learn's ``lower_bound_``
        for ``family="sklearn"``, the exact ELBO (= ``elbo``) for ``"conjugate"``.
      elbo: the exact ELBO (:func:`elbo`) of the last iteration's q (NaN for
        ``family="sklearn"`` with a covariance type other than full), in nats, summed over
        points.
      history: (max_iter,) the bound after each iteration; NaN from ``num_iter``.
      num_iter: iterations run.
      converged: whether the change of the bound fell below ``tol``.
    """

    posterior: VBGMMPosterior
    lower_bound: Float[Array, ""]
    elbo: Float[Array, ""]
    history: Float[Array, " t"]
    num_iter: Int[Array, ""]
    converged: Bool[Array, ""]


# ---------------------------------------------------------------------------------------
# Packed second moments (the layout of gmm.prepare / gmm.GMMStats: upper triangle by rows)
# ---------------------------------------------------------------------------------------


# The packed upper-triangle indices of gmm.prepare's features (one cached table per d).
_triu = gmm._triu


# ---------------------------------------------------------------------------------------
# Expectations under q
# ---------------------------------------------------------------------------------------


def expected_log_weights(post: VBGMMPosterior, *, weight_prior_type: str) -> Float[Array, " k"]:
    r""":math:`E_q[\log \pi_j]`.

    Dirichlet: :math:`\psi(\alpha_j) - \psi(\sum_l \alpha_l)`. Stick-breaking:
    :math:`E[\log v_j] + \sum_{l<j} E[\log(1 - v_l)]` with
    :math:`E[\log v] = \psi(a) - \psi(a + b)`, :math:`E[\log(1-v)] = \psi(b) - \psi(a+b)`.
    """
    wc = post.weight_concentration
    if weight_prior_type == "dirichlet_process":
        a, b = wc[0], wc[1]
        ds = digamma(a + b)
        log1m = digamma(b) - ds
        before = jnp.concatenate([jnp.zeros((1,), wc.dtype), jnp.cumsum(log1m)[:-1]])
        return digamma(a) - ds + before
    return digamma(wc) - digamma(jnp.sum(wc))


def mixture_weights(post: VBGMMPosterior, *, weight_prior_type: str) -> Float[Array, " k"]:
    r"""The posterior-mean weights (scikit-learn's ``weights_``): :math:`E[\pi]` for the
    Dirichlet, :math:`E[v_j]\prod_{l<j}E[1 - v_l]` renormalised for the stick-breaking prior."""
    wc = post.weight_concentration
    if weight_prior_type == "dirichlet_process":
        s = wc[0] + wc[1]
        rest = wc[1] / s
        w = wc[0] / s * jnp.concatenate([jnp.ones((1,), wc.dtype), jnp.cumprod(rest[:-1])])
        return w / jnp.sum(w)
    return wc / jnp.sum(wc)


def to_gmm_params(post: VBGMMPosterior, *, weight_prior_type: str) -> gmm.GMMParams:
    """The plug-in mixture: posterior-mean weights, means :math:`m_j`, covariances
    :math:`C_j` (a point estimate; scikit-learn's ``score_samples`` is instead
    :func:`expected_log_joint`'s logsumexp)."""
    return gmm.GMMParams(
        mixture_weights(post, weight_prior_type=weight_prior_type), post.means, post.covariances
    )


def _sum_digamma(nu: Array, d: int) -> Array:
    """:math:`\\sum_{c=0}^{d-1} \\psi((\\nu - c)/2)`, elementwise over ``nu``."""
    c = jnp.arange(d, dtype=nu.dtype)
    return jnp.sum(digamma(0.5 * (nu[..., None] - c.reshape((1,) * nu.ndim + (d,)))), axis=-1)


def _precision_terms(post: VBGMMPosterior, covariance_type: str):
    """(W (q, k), c (k,)) with quad_ij = features_i @ W[:, j] + c_j the Mahalanobis form
    :math:`(x_i - m_j)^\\top C_j^{-1} (x_i - m_j)`, and log det C_j (k,)."""
    m = post.means
    k, d = m.shape
    cov = post.covariances
    if covariance_type in ("full", "tied"):
        iu, ju, mult, _ = _triu(d)
        chol = jnp.linalg.cholesky(cov)
        eye = jnp.broadcast_to(jnp.eye(d, dtype=cov.dtype), cov.shape)
        inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
        prec = jnp.swapaxes(inv, -1, -2) @ inv
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        packed = prec[..., iu, ju]
        packed = packed * jnp.broadcast_to(jnp.asarray(mult, cov.dtype), packed.shape)
        if covariance_type == "full":
            pm = jnp.einsum("kij,kj->ki", prec, m)
        else:
            pm = m @ prec
            packed = jnp.broadcast_to(packed, (k, packed.shape[0]))
            logdet = jnp.broadcast_to(logdet, (k,))
        top = packed
    elif covariance_type == "diag":
        prec = 1.0 / cov
        pm = m * prec
        top = prec
        logdet = jnp.sum(jnp.log(cov), axis=1)
    else:
        prec = 1.0 / cov
        pm = m * prec[:, None]
        top = prec[:, None]
        logdet = d * jnp.log(cov)
    w = jnp.concatenate([top, -2.0 * pm], axis=1).T
    c = jnp.sum(m * pm, axis=1)
    return (w, c), logdet


def _log_lambda(post: VBGMMPosterior, covariance_type: str, family: str) -> Array:
    r""":math:`L_j = E_q[\log|\Lambda_j|] + \log|C_j|` (k,), the digamma part of the
    local step's logits.

    Wishart (``full``, ``tied`` and every type of ``family="sklearn"``):
    :math:`\sum_{c<d}\psi(\tfrac{\nu_j - c}2) + d\log 2 - d\log\nu_j`. Conjugate
    ``diag``: :math:`d\,(\psi(a_j) - \log a_j)` with :math:`a_j = \nu_j/2` (from
    :math:`E[\log\tau_{jc}] = \psi(a_j) - \log b_{jc}`, :math:`b_{jc} = a_j C_{jc}`);
    conjugate ``spherical``: the same with :math:`a_j = d\nu_j/2`.
    """
    d = post.means.shape[1]
    nu = jnp.broadcast_to(post.degrees_of_freedom, post.mean_precision.shape)
    if family == "conjugate" and covariance_type in ("diag", "spherical"):
        a = 0.5 * nu if covariance_type == "diag" else 0.5 * d * nu
        return d * (digamma(a) - jnp.log(a))
    return _sum_digamma(nu, d) + d * _LOG_2 - d * jnp.log(nu)


def _logit_terms(post: VBGMMPosterior, covariance_type: str, weight_prior_type: str, family: str):
    """(W (q, k), c (k,), const (k,)): logits_ij = const_j - (features_i @ W[:, j] + c_j) / 2."""
    d = post.means.shape[1]
    (w, c), logdet = _precision_terms(post, covariance_type)
    const = (
        expected_log_weights(post, weight_prior_type=weight_prior_type)
        - 0.5 * (d * _LOG_2PI + logdet)
        + 0.5 * (_log_lambda(post, covariance_type, family) - d / post.mean_precision)
    )
    return w, c, const


def expected_log_joint(
    post: VBGMMPosterior,
    data: gmm.GMMData,
    *,
    covariance_type: str,
    weight_prior_type: str,
    family: str = "sklearn",
) -> Float[Array, "n k"]:
    r"""The local step's logits :math:`E_q[\log \pi_j] + E_q[\log \mathcal N(x_i \mid \mu_j,
    \Lambda_j^{-1})]` (module docstring), one matmul against the prepared features.

    Args:
      post: the variational posterior (coordinates of ``data``).
      data: :func:`emvi.gmm.prepare` d data.
      covariance_type, weight_prior_type: static.
      family: ``"sklearn"`` (scikit-learn's Wishart digamma term for every type) or
        ``"conjugate"`` (the exact expectation under the conjugate family's q); static.

    Returns:
      (n, k).
    """
    w, c, const = _logit_terms(post, covariance_type, weight_prior_type, family)
    quad = jnp.maximum(data.features @ w + c[None, :], 0.0)
    return const[None, :] - 0.5 * quad


def local_step(
    post: VBGMMPosterior,
    data: gmm.GMMData,
    *,
    covariance_type: str,
    weight_prior_type: str,
    family: str = "sklearn",
) -> tuple[Float[Array, "n k"], Float[Array, " n"]]:
    """The local (E) step: responsibilities (n, k) and the per-point log normaliser (n,)."""
    lj = expected_log_joint(
        post,
        data,
        covariance_type=covariance_type,
        weight_prior_type=weight_prior_type,
        family=family,
    )
    return jax.nn.softmax(lj, axis=1), jax.nn.logsumexp(lj, axis=1)


# ---------------------------------------------------------------------------------------
# Global step
# ---------------------------------------------------------------------------------------


def _covariance_stats(stats: gmm.GMMStats, reg: Array, covariance_type: str):
    """(N~ (k,), x̄ (k, d), S) with S scikit-learn's ``sk``: the weighted covariance plus
    ``reg``, (k, d, d) full, (d, d) tied, (k, d) diag, (k,) spherical."""
    dtype = stats.sums.dtype
    d = stats.sums.shape[1]
    nk = stats.counts + 10.0 * jnp.finfo(dtype).eps
    xbar = stats.sums / nk[:, None]
    if covariance_type in ("full", "tied"):
        second = stats.second[:, _triu(d)[3]]  # (k, d, d)
        eye = jnp.eye(d, dtype=dtype)
        if covariance_type == "full":
            s = second / nk[:, None, None] - xbar[:, :, None] * xbar[:, None, :]
            s = 0.5 * (s + jnp.swapaxes(s, 1, 2)) + reg * eye[None]
        else:
            outer = jnp.einsum("k,ki,kj->ij", nk, xbar, xbar)
            s = (jnp.sum(second, axis=0) - outer) / jnp.sum(nk)
            s = 0.5 * (s + s.T) + reg * eye
    elif covariance_type == "diag":
        s = stats.second / nk[:, None] - xbar * xbar + reg
    else:
        s = (stats.second[:, 0] / nk - jnp.sum(xbar * xbar, axis=1)) / d + reg
    return nk, xbar, s


def global_step(
    stats: gmm.GMMStats,
    hyper: VBGMMHyper,
    *,
    covariance_type: str,
    weight_prior_type: str,
    family: str = "sklearn",
) -> VBGMMPosterior:
    r"""The global (M) step: the closed-form update of q(parameters) (module docstring).

    The two families differ only for ``tied``: the conjugate shared Wishart takes all the
    data, :math:`\nu = \nu_0 + \sum_j \tilde N_j` and :math:`C = (\Psi_0 + \sum_j \tilde N_j
    S + \sum_j \tilde N_j \frac{\beta_0}{\beta_j}\delta_j\delta_j^\top)/\nu` (scikit-learn:
    every statistic divided by k). For ``diag`` and ``spherical`` scikit-learn's
    :math:`(\nu_j, C_j)` are already the conjugate Normal-Gamma update read as
    :math:`a_j = \nu_j/2` (:math:`d\nu_j/2`), :math:`b_{j\cdot} = a_j C_{j\cdot}`.

    Args:
      stats: summed statistics, :func:`emvi.gmm.expected_stats` of the responsibilities.
      hyper: the prior and ``reg_covar``.
      covariance_type, weight_prior_type, family: static.

    Returns:
      The new :class:`VBGMMPosterior`.
    """
    dtype = stats.sums.dtype
    k = stats.sums.shape[0]
    p = gmm.GMMPrior(*(jnp.asarray(a, dtype) for a in hyper.prior))
    nk, xbar, s = _covariance_stats(stats, jnp.asarray(hyper.reg_covar, dtype), covariance_type)
    alpha0, m0, beta0, psi0, nu0 = p
    if weight_prior_type == "dirichlet_process":
        tail = jnp.concatenate([jnp.cumsum(nk[::-1])[-2::-1], jnp.zeros((1,), dtype)])
        wc = jnp.stack([1.0 + nk, alpha0 + tail])
    else:
        wc = alpha0 + nk
    beta = beta0 + nk
    means = (beta0 * m0[None, :] + nk[:, None] * xbar) / beta[:, None]
    diff = xbar - m0[None, :]
    shrink = nk * beta0 / beta
    if covariance_type == "full":
        nu = nu0 + nk
        outer = shrink[:, None, None] * diff[:, :, None] * diff[:, None, :]
        cov = (psi0[None] + nk[:, None, None] * s + outer) / nu[:, None, None]
    elif covariance_type == "tied":
        # scikit-learn gives the shared Wishart a 1/k share of the data; the conjugate
        # model all of it.
        outer = jnp.einsum("k,ki,kj->ij", shrink, diff, diff)
        if family == "conjugate":
            nu = nu0 + jnp.sum(nk)
            cov = (psi0 + s * jnp.sum(nk) + outer) / nu
        else:
            nu = nu0 + jnp.sum(nk) / k
            cov = (psi0 + s * jnp.sum(nk) / k + outer / k) / nu
    elif covariance_type == "diag":
        nu = nu0 + nk
        cov = (psi0[None, :] + nk[:, None] * s + shrink[:, None] * diff * diff) / nu[:, None]
    else:
        nu = nu0 + nk
        cov = (psi0 + nk * s + shrink * jnp.mean(diff * diff, axis=1)) / nu
    return VBGMMPosterior(wc, beta, means, nu, cov)


# ---------------------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------------------


def betaln(a: Array, b: Array) -> Array:
    r""":math:`\log B(a, b)` from ``gammaln`` (``jax.scipy.special.betaln`` is off by about
    1e-9 absolute at a = 50, b = 1.25 in float64; this is within 1e-13 there)."""
    return gammaln(a) + gammaln(b) - gammaln(a + b)


def _log_wishart_norm_sklearn(nu: Array, log_det_prec_chol: Array, d: int) -> Array:
    c = jnp.arange(d, dtype=nu.dtype)
    return -(
        nu * log_det_prec_chol
        + nu * d * 0.5 * _LOG_2
        + jnp.sum(gammaln(0.5 * (nu[..., None] - c.reshape((1,) * nu.ndim + (d,)))), axis=-1)
    )


def lower_bound(
    post: VBGMMPosterior,
    neg_entropy: Float[Array, ""],
    *,
    covariance_type: str,
    weight_prior_type: str,
) -> Float[Array, ""]:
    r"""scikit-learn's ``_compute_lower_bound``: the ELBO with the terms that are constant
    (given the prior and n) dropped and the rest simplified using the global step's
    optimality, so it is valid right after :func:`global_step` only.

    Args:
      post: the posterior returned by the global step.
      neg_entropy: :math:`\sum_{ij} r_{ij} \log r_{ij}` of the responsibilities that fed it.

    Returns:
      The bound, summed over points (scikit-learn's ``lower_bound_``).
    """
    k, d = post.means.shape
    nu = post.degrees_of_freedom
    _, logdet = _precision_terms(post, covariance_type)
    if covariance_type == "tied":
        logdet = logdet[0]
    ld = -0.5 * logdet - 0.5 * d * jnp.log(nu)
    log_wishart = _log_wishart_norm_sklearn(nu, ld, d)
    log_wishart = k * log_wishart if covariance_type == "tied" else jnp.sum(log_wishart)
    wc = post.weight_concentration
    if weight_prior_type == "dirichlet_process":
        log_norm_weight = -jnp.sum(betaln(wc[0], wc[1]))
    else:
        log_norm_weight = gammaln(jnp.sum(wc)) - jnp.sum(gammaln(wc))
    return (
        -neg_entropy
        - log_wishart
        - log_norm_weight
        - 0.5 * d * jnp.sum(jnp.log(post.mean_precision))
    )


def _wishart_log_norm(nu: Array, log_det_scale: Array, d: int) -> Array:
    """:math:`-\\log Z` of :math:`\\mathcal W(W, \\nu)`: :math:`-\\tfrac\\nu2\\log|W|
    - \\tfrac{\\nu d}{2}\\log 2 - \\log\\Gamma_d(\\nu/2)`."""
    return -0.5 * nu * log_det_scale - 0.5 * nu * d * _LOG_2 - multigammaln(0.5 * nu, d)


def _wishart_terms(nu: Array, cov: Array, psi0: Array, nu0: Array):
    r""":math:`E_q[\log\mathcal W(\Lambda\mid\Psi_0^{-1},\nu_0)] - E_q[\log\mathcal
    W(\Lambda\mid W,\nu)]` with :math:`W = (\nu C)^{-1}`, batched over a leading axis of
    ``cov`` (or none, for ``tied``); and the Cholesky factor of ``cov``."""
    d = cov.shape[-1]
    dtype = cov.dtype
    chol = jnp.linalg.cholesky(cov)
    logdet_c = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_det_w = -d * jnp.log(nu) - logdet_c
    e_logdet = _sum_digamma(nu, d) + d * _LOG_2 + log_det_w
    eye = jnp.broadcast_to(jnp.eye(d, dtype=dtype), cov.shape)
    inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    prec = jnp.swapaxes(inv_chol, -1, -2) @ inv_chol  # E[Lambda] = C^{-1}
    tr_psi_prec = jnp.einsum("ij,...ji->...", psi0, prec)
    logdet_psi0 = 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(psi0))))
    e_log_p = (
        _wishart_log_norm(nu0, -logdet_psi0, d)
        + 0.5 * (nu0 - d - 1.0) * e_logdet
        - 0.5 * tr_psi_prec
    )
    e_log_q = _wishart_log_norm(nu, log_det_w, d) + 0.5 * (nu - d - 1.0) * e_logdet - 0.5 * nu * d
    return e_log_p - e_log_q, chol


def _gamma_terms(a: Array, b: Array, a0: Array, b0: Array) -> Array:
    r""":math:`E_q[\log\mathrm{Ga}(\tau\mid a_0, b_0)] - E_q[\log\mathrm{Ga}(\tau\mid a, b)]`
    (rates; elementwise) with :math:`E[\tau] = a/b`, :math:`E[\log\tau] = \psi(a) - \log b`."""
    e_log_tau = digamma(a) - jnp.log(b)
    return (
        a0 * jnp.log(b0)
        - a * jnp.log(b)
        - gammaln(a0)
        + gammaln(a)
        + (a0 - a) * e_log_tau
        - b0 * a / b
        + a
    )


def elbo_from_stats(
    post: VBGMMPosterior,
    stats: gmm.GMMStats,
    neg_entropy: Float[Array, ""],
    hyper: VBGMMHyper,
    *,
    covariance_type: str = "full",
    weight_prior_type: str,
) -> Float[Array, ""]:
    r""":func:`elbo` from the responsibilities' summed statistics and
    :math:`\sum_{ij} r_{ij}\log r_{ij}` (the ELBO is linear in q(z) apart from the
    entropy, so this is exact for any q(z); the loop uses it after each global step
    without another pass over the data). ``hyper.reg_covar`` is not used."""
    dtype = post.means.dtype
    d = post.means.shape[1]
    alpha0, m0, beta0, psi0, nu0 = (jnp.asarray(a, dtype) for a in hyper.prior)
    w, c, const = _logit_terms(post, covariance_type, weight_prior_type, "conjugate")
    feats = jnp.concatenate([stats.second, stats.sums], axis=1)  # (k, q), the features' sums
    quad = jnp.sum(feats * w.T, axis=1) + stats.counts * c
    local = jnp.sum(stats.counts * const - 0.5 * quad) - neg_entropy
    weights_term = _weights_elbo_term(post.weight_concentration, alpha0, weight_prior_type)
    nu, beta, cov = post.degrees_of_freedom, post.mean_precision, post.covariances
    delta = post.means - m0[None, :]
    mean_term = 0.5 * d * jnp.sum(jnp.log(beta0 / beta) + 1.0 - beta0 / beta)
    if covariance_type == "full":
        lam_term, chol = _wishart_terms(nu, cov, psi0, nu0)
        y = jax.scipy.linalg.solve_triangular(chol, delta[:, :, None], lower=True)[..., 0]
        maha = jnp.sum(y * y)
    elif covariance_type == "tied":
        lam_term, chol = _wishart_terms(nu, cov, psi0, nu0)
        y = jax.scipy.linalg.solve_triangular(chol, delta.T, lower=True)
        maha = jnp.sum(y * y)
    elif covariance_type == "diag":
        a = 0.5 * nu
        lam_term = _gamma_terms(a[:, None], a[:, None] * cov, 0.5 * nu0, 0.5 * psi0[None, :])
        maha = jnp.sum(delta * delta / cov)
    else:
        a = 0.5 * d * nu
        lam_term = _gamma_terms(a, a * cov, 0.5 * d * nu0, 0.5 * d * psi0)
        maha = jnp.sum(jnp.sum(delta * delta, axis=1) / cov)
    return local + weights_term + mean_term - 0.5 * beta0 * maha + jnp.sum(lam_term)


def elbo(
    post: VBGMMPosterior,
    resp: Float[Array, "n k"],
    data: gmm.GMMData,
    hyper: VBGMMHyper,
    *,
    covariance_type: str = "full",
    weight_prior_type: str,
) -> Float[Array, ""]:
    r"""The exact ELBO of the conjugate mixture (``family="conjugate"``), summed over points.

    .. math::
        \mathcal L = \sum_{ij} r_{ij}\big(E[\log\pi_j] + E[\log\mathcal N(x_i\mid\mu_j,
            \Lambda_j^{-1})] - \log r_{ij}\big) + E[\log p(\pi)] - E[\log q(\pi)]
            + E[\log p(\mu, \Lambda)] - E[\log q(\mu, \Lambda)],

    every constant kept, for any responsibilities ``resp`` and any posterior ``post``
    (not only after a global step), with ``post`` read as the conjugate family's q (module
    docstring; ``data`` prepared for ``covariance_type``). With :math:`\delta_j = m_j - m_0`
    the mean terms are, per component and (Normal-Gamma) per dimension,

    .. math::
        E[\log p(\mu\mid\Lambda)] - E[\log q(\mu\mid\Lambda)] = \tfrac d2\Big(\log
            \frac{\beta_0}{\beta} + 1 - \frac{\beta_0}{\beta}\Big)
            - \tfrac{\beta_0}2 \delta^\top C^{-1}\delta,

    and the precision terms: ``full``, k Wishart terms
    :math:`E_q[\log\mathcal W(\Lambda_j\mid \Psi_0^{-1}, \nu_0)] - E_q[\log\mathcal
    W(\Lambda_j\mid W_j, \nu_j)]` with :math:`W_j = (\nu_j C_j)^{-1}`,
    :math:`E[\log|\Lambda_j|] = \sum_c \psi(\tfrac{\nu_j - c}{2}) + d\log 2 + \log|W_j|`,
    :math:`E[\Lambda_j] = C_j^{-1}`; ``tied``, one such term for the shared
    :math:`\Lambda`; ``diag``, the k d Gamma terms

    .. math::
        E_q[\log\mathrm{Ga}(\tau\mid a_0, b_0)] - E_q[\log\mathrm{Ga}(\tau\mid a, b)]
            = a_0\log b_0 - a\log b - \log\frac{\Gamma(a_0)}{\Gamma(a)}
            + (a_0 - a)(\psi(a) - \log b) - b_0\frac ab + a

    with :math:`a_j = \nu_j / 2`, :math:`b_{jc} = a_j C_{jc}`, :math:`a_0 = \nu_0/2`,
    :math:`b_{0c} = \Psi_{0c}/2`; ``spherical``, k of them with :math:`a_j = d\nu_j/2`,
    :math:`b_j = a_j C_j`, :math:`a_0 = d\nu_0/2`, :math:`b_0 = d\Psi_0/2`.
    For the stick-breaking prior, :math:`p(v_j) = \mathrm{Beta}(1, \alpha_0)` and
    :math:`q(v_j) = \mathrm{Beta}(a_j, b_j)` for each of the k sticks.
    """
    w = jnp.ones(resp.shape[0], resp.dtype)
    stats = gmm.expected_stats(resp, data, w, covariance_type=covariance_type)
    return elbo_from_stats(
        post,
        stats,
        jnp.sum(xlogy(resp, resp)),
        hyper,
        covariance_type=covariance_type,
        weight_prior_type=weight_prior_type,
    )


# ---------------------------------------------------------------------------------------
# The (init, step) pair and the loop
# ---------------------------------------------------------------------------------------


def posterior_from_resp(
    resp: Float[Array, "n k"],
    data: gmm.GMMData,
    hyper: VBGMMHyper,
    *,
    covariance_type: str,
    weight_prior_type: str,
    family: str = "sklearn",
) -> VBGMMPosterior:
    """One global step from given responsibilities (scikit-learn's ``_initialize``)."""
    w = jnp.ones(resp.shape[0], resp.dtype)
    stats = gmm.expected_stats(resp, data, w, covariance_type=covariance_type)
    return global_step(
        stats,
        hyper,
        covariance_type=covariance_type,
        weight_prior_type=weight_prior_type,
        family=family,
    )


def vb_init(post: VBGMMPosterior) -> VBState:
    """The state before the first iteration."""
    dtype = post.means.dtype
    return VBState(post, jnp.array(-jnp.inf, dtype), jnp.array(0, jnp.int32), jnp.array(False))


def vb_step(
    state: VBState,
    data: gmm.GMMData,
    hyper: VBGMMHyper,
    *,
    tol: float | Array = 0.0,
    covariance_type: str,
    weight_prior_type: str,
    family: str = "sklearn",
) -> tuple[VBState, VBInfo]:
    """One CAVI iteration: local step (responsibilities), global step (closed form), and
    the bound: scikit-learn's for ``family="sklearn"``, the exact :func:`elbo` of the new
    pair for ``"conjugate"``; ``converged`` when the bound changed by less than ``tol``."""
    kw = dict(covariance_type=covariance_type, weight_prior_type=weight_prior_type)
    resp, log_norm = local_step(state.posterior, data, family=family, **kw)
    neg_entropy = jnp.sum(xlogy(resp, resp))
    if family == "conjugate":
        w = jnp.ones(resp.shape[0], resp.dtype)
        stats = gmm.expected_stats(resp, data, w, covariance_type=covariance_type)
        new = global_step(stats, hyper, family=family, **kw)
        lb = elbo_from_stats(new, stats, neg_entropy, hyper, **kw)
    else:
        new = posterior_from_resp(resp, data, hyper, **kw)
        lb = lower_bound(new, neg_entropy, **kw)
    change = lb - state.lower_bound
    new_state = VBState(new, lb, state.iteration + 1, jnp.abs(change) < tol)
    return new_state, VBInfo(lb, change, jnp.mean(log_norm))


def run_vb(
    post: VBGMMPosterior,
    data: gmm.GMMData,
    hyper: VBGMMHyper,
    *,
    max_iter: int,
    tol: float | Array,
    covariance_type: str,
    weight_prior_type: str,
    family: str = "sklearn",
) -> VBGMMFit:
    """CAVI to convergence on device (``lax.while_loop``), scikit-learn's stopping rule:
    stop once the bound (:func:`vb_step`'s) changes by less than ``tol`` (``tol=0`` runs
    ``max_iter``)."""
    kw = dict(covariance_type=covariance_type, weight_prior_type=weight_prior_type)
    dtype = post.means.dtype
    history0 = jnp.full((max_iter,), jnp.nan, dtype)

    def cond(carry):
        state, _ = carry
        return (state.iteration < max_iter) & ~state.converged

    def body(carry):
        state, history = carry
        new, info = vb_step(state, data, hyper, tol=tol, family=family, **kw)
        return new, history.at[state.iteration].set(info.lower_bound)

    if family == "conjugate":
        # The bound the loop tracks is already the exact ELBO of the last (q(z), q(theta)).
        state, history = lax.while_loop(cond, body, (vb_init(post), history0))
        value = state.lower_bound
    else:
        # The exact ELBO pairs the last local step's q(z) with the posterior it produced; it
        # is recomputed from the state before the last step, which the loop does not keep,
        # so the loop carries the previous posterior along.
        def body2(carry):
            state, history, _ = carry
            prev = state.posterior
            state, history = body((state, history))
            return state, history, prev

        def cond2(carry):
            return cond(carry[:2])

        state, history, prev = lax.while_loop(cond2, body2, (vb_init(post), history0, post))
        if covariance_type == "full":
            resp, _ = local_step(prev, data, **kw)
            value = elbo(state.posterior, resp, data, hyper, weight_prior_type=weight_prior_type)
        else:
            value = jnp.array(jnp.nan, dtype)
    return VBGMMFit(
        state.posterior, state.lower_bound, value, history, state.iteration, state.converged
    )


# ---------------------------------------------------------------------------------------
# Public wrappers
# ---------------------------------------------------------------------------------------


def _centred_problem(x, prior, reg_covar, covariance_type):
    """Centre ``x`` (and the prior mean with it); prepared data, hyper and the shift."""
    shift = jnp.mean(x, axis=0)
    xc = x - shift[None, :]
    prior = gmm.GMMPrior(*(jnp.asarray(a, x.dtype) for a in prior))
    prior = prior._replace(mean_prior=prior.mean_prior - shift)
    hyper = VBGMMHyper(prior, jnp.asarray(reg_covar, x.dtype))
    return gmm.prepare(xc, covariance_type=covariance_type), hyper, shift


def _shift(fit_: VBGMMFit, shift: Array) -> VBGMMFit:
    post = fit_.posterior
    return fit_._replace(posterior=post._replace(means=post.means + shift[..., None, :]))


@functools.partial(
    jax.jit, static_argnames=("covariance_type", "weight_prior_type", "max_iter", "family")
)
def fit_from_resp(
    resp: Float[Array, "n k"],
    x: Float[Array, "n d"],
    prior: gmm.GMMPrior,
    *,
    covariance_type: str = "full",
    weight_prior_type: str = "dirichlet_process",
    max_iter: int = 100,
    tol: float | Array = 1e-3,
    reg_covar: float | Array = 1e-6,
    family: str = "sklearn",
) -> VBGMMFit:
    """CAVI from initial responsibilities (the jittable core of :func:`fit`; no validation;
    ``family`` as in :func:`fit`).

    The first global step turns ``resp`` into q(parameters) (scikit-learn's
    ``_initialize(X, resp)``), then :func:`run_vb` iterates. The data are centred first (the
    posterior means are returned in the input coordinates).

    Example:
      >>> x = jnp.concatenate([jnp.zeros((30, 1)), jnp.full((30, 1), 6.0)])
      >>> x = x + 0.1 * jax.random.normal(jax.random.key(1), (60, 1))
      >>> resp = jnp.repeat(jnp.eye(2), 30, axis=0)
      >>> p = default_prior(x, covariance_type="spherical")
      >>> res = fit_from_resp(resp, x, p, covariance_type="spherical", max_iter=10)
      >>> [round(float(m), 1) for m in res.posterior.means[:, 0]]
      [0.1, 5.9]
    """
    data, hyper, shift = _centred_problem(x, prior, reg_covar, covariance_type)
    kw = dict(covariance_type=covariance_type, weight_prior_type=weight_prior_type, family=family)
    post0 = posterior_from_resp(resp.astype(x.dtype), data, hyper, **kw)
    res = run_vb(post0, data, hyper, max_iter=max_iter, tol=jnp.asarray(tol, x.dtype), **kw)
    return _shift(res, shift)


def default_prior(
    x: ArrayLike, *, covariance_type: str = "full", num_components: int | None = None
) -> gmm.GMMPrior:
    r"""scikit-learn's default prior: :math:`\alpha_0 = 1/k` (1 if ``num_components`` is
    None), :math:`m_0 = \bar x`, :math:`\beta_0 = 1`, :math:`\nu_0 = d` and :math:`\Psi_0` the
    sample covariance of ``x`` (ddof 1; its diagonal for ``diag``, the mean of that for
    ``spherical``)."""
    x = as_data_matrix(x, min_rows=2)
    d = x.shape[1]
    dtype = x.dtype
    var = np.var(x, axis=0, ddof=1)
    psi = {
        "full": np.atleast_2d(np.cov(x.T)),
        "tied": np.atleast_2d(np.cov(x.T)),
        "diag": var,
        "spherical": var.mean(),
    }[check_choice(covariance_type, name="covariance_type", choices=COVARIANCE_TYPES)]
    alpha = 1.0 if num_components is None else 1.0 / num_components
    return gmm.GMMPrior(
        *(jnp.asarray(a, dtype) for a in (alpha, x.mean(axis=0), 1.0, psi, float(d)))
    )


def _check_vb_prior(
    prior, d: int, covariance_type: str, dtype, family: str = "sklearn"
) -> gmm.GMMPrior:
    if not isinstance(prior, gmm.GMMPrior):
        raise ValueError(f"prior must be an emvi.gmm.GMMPrior or None; got {type(prior).__name__}.")
    alpha, m0, beta0, psi, nu = (np.asarray(a, np.float64) for a in prior)
    for name, arr in zip(gmm.GMMPrior._fields, (alpha, m0, beta0, psi, nu), strict=True):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"prior.{name} contains NaN or inf.")
    if alpha.shape != () or alpha <= 0:
        raise ValueError(
            f"prior.weight_concentration must be a scalar concentration > 0; got {alpha}."
        )
    if m0.shape != (d,):
        raise ValueError(f"prior.mean_prior must have shape ({d},); got {m0.shape}.")
    if beta0.shape != () or beta0 <= 0:
        raise ValueError(f"prior.mean_precision must be a scalar > 0; got {beta0}.")
    if family == "conjugate" and covariance_type in ("diag", "spherical"):
        if nu.shape != () or nu <= 0:
            raise ValueError(
                "prior.degrees_of_freedom must be a scalar > 0 (the Gamma shape is "
                f"nu_0 / 2 or d nu_0 / 2); got {nu}."
            )
    elif nu.shape != () or nu <= d - 1:
        raise ValueError(
            f"prior.degrees_of_freedom must be a scalar > d - 1 = {d - 1} (the Wishart "
            f"needs it); got {nu}."
        )
    if covariance_type in ("full", "tied"):
        if psi.shape != (d, d):
            raise ValueError(f"prior.covariance_prior must have shape ({d}, {d}); got {psi.shape}.")
        if not np.allclose(psi, psi.T) or np.any(np.linalg.eigvalsh(psi) <= 0):
            raise ValueError("prior.covariance_prior must be symmetric positive definite.")
    else:
        shape = (d,) if covariance_type == "diag" else ()
        if psi.shape != shape or np.any(psi <= 0):
            raise ValueError(
                f"prior.covariance_prior must be positive with shape {shape} for "
                f"covariance_type={covariance_type!r}; got {psi}."
            )
    return gmm.GMMPrior(*(jnp.asarray(a, dtype) for a in (alpha, m0, beta0, psi, nu)))


@functools.partial(jax.jit, static_argnames=("k", "init"))
def _initial_resp(key, x, *, k, init):
    n = x.shape[0]
    w = jnp.ones(n, x.dtype)
    if init == "random":
        r = jax.random.uniform(key, (n, k), x.dtype)
        return r / jnp.sum(r, axis=1, keepdims=True)
    if init == "random_from_data":
        idx = jax.random.choice(key, n, (k,), replace=False)
        return jnp.zeros((n, k), x.dtype).at[idx, jnp.arange(k)].set(1.0)
    seeds = km.kmeans_plusplus_indices(key, x, k, w)
    xc = x - jnp.mean(x, axis=0)[None, :]
    res = km.lloyd(xc[seeds], xc, w, max_iter=300, tol=1e-4 * jnp.mean(xc * xc))
    return jax.nn.one_hot(res.labels, k, dtype=x.dtype)


def fit(
    key: Key[Array, ""],
    x: ArrayLike,
    num_components: int,
    *,
    covariance_type: str = "full",
    weight_concentration_prior_type: str = "dirichlet_process",
    prior: gmm.GMMPrior | None = None,
    init: str = "kmeans",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    family: str = "sklearn",
) -> VBGMMFit:
    r"""Fits a Bayesian Gaussian mixture by CAVI, validating the inputs eagerly.

    The switch from MAP-EM: ``gmm.fit(key, x, k, prior=p)`` returns the posterior *mode*,
    ``bayesian_mixture.fit(key, x, k, prior=p)`` the mean-field posterior, from the same
    :class:`emvi.gmm.GMMPrior` (VB also accepts :math:`0 < \alpha_0 < 1`, which prunes
    components). The default prior is :func:`default_prior` (scikit-learn's).

    Args:
      key: typed PRNG key (initial responsibilities).
      x: data (n, d); float32 in gives float32 out.
      num_components: the truncation level k, 1 <= k <= n.
      covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
      weight_concentration_prior_type: ``"dirichlet_process"`` or
        ``"dirichlet_distribution"``.
      prior: a :class:`emvi.gmm.GMMPrior` with scalar weight concentration > 0, mean
        precision > 0 and degrees of freedom > d - 1; None for :func:`default_prior`.
      init: initial responsibilities: ``"kmeans"`` (one-hot k-means labels),
        ``"random"`` or ``"random_from_data"`` (one-hot on k random points).
      max_iter: the most iterations (>= 1).
      tol: stop when the bound changes by less than this (>= 0).
      reg_covar: added to the diagonal of each weighted covariance (>= 0; 0 makes the
        global step the exact CAVI update).
      family: ``"sklearn"`` (scikit-learn's updates and bound) or ``"conjugate"`` (the
        exact CAVI of the Normal-Gamma (``diag``), shared-Gamma (``spherical``) or
        shared-Wishart (``tied``) mixture, stopped on its exact :func:`elbo`; for ``full``
        the same updates as ``"sklearn"``). See the module docstring.

    Returns:
      A :class:`VBGMMFit`.

    Raises:
      ValueError: with a sentence, for bad data, settings or prior.

    Example:
      >>> x = jnp.concatenate([jnp.zeros((20, 1)), jnp.full((20, 1), 6.0)])
      >>> x = x + 0.1 * jax.random.normal(jax.random.key(1), (40, 1))
      >>> res = fit(jax.random.key(0), x, 5, covariance_type="diag")
      >>> w = mixture_weights(res.posterior, weight_prior_type="dirichlet_process")
      >>> int(jnp.sum(w > 0.05))
      2
    """
    key = _checks.as_key(key)
    covariance_type = check_choice(
        covariance_type, name="covariance_type", choices=COVARIANCE_TYPES
    )
    wpt = check_choice(
        weight_concentration_prior_type,
        name="weight_concentration_prior_type",
        choices=WEIGHT_PRIOR_TYPES,
    )
    check_choice(init, name="init", choices=INITS)
    family = check_choice(family, name="family", choices=FAMILIES)
    x_np = as_data_matrix(x, min_rows=2)
    n, d = x_np.shape
    k = check_positive_int(num_components, name="num_components")
    if k > n:
        raise ValueError(f"num_components={k} is larger than the number of points ({n}).")
    max_iter, tol, _, _ = check_em_settings(max_iter=max_iter, tol=tol, num_init=1, chunk_size=None)
    reg_covar = check_nonnegative(reg_covar, name="reg_covar")
    if prior is None:
        prior = default_prior(x_np, covariance_type=covariance_type, num_components=k)
    prior = _check_vb_prior(prior, d, covariance_type, x_np.dtype, family)
    xj = jnp.asarray(x_np)
    resp = _initial_resp(key, xj, k=k, init=init)
    return fit_from_resp(
        resp,
        xj,
        prior,
        covariance_type=covariance_type,
        weight_prior_type=wpt,
        max_iter=max_iter,
        tol=jnp.asarray(tol, x_np.dtype),
        reg_covar=jnp.asarray(reg_covar, x_np.dtype),
        family=family,
    )


def effective_components(
    post: VBGMMPosterior, *, weight_prior_type: str, threshold: float = 0.01
) -> Int[Array, ""]:
    """How many components have posterior-mean weight above ``threshold``."""
    check_positive(threshold, name="threshold")
    return jnp.sum(mixture_weights(post, weight_prior_type=weight_prior_type) > threshold)


# ---------------------------------------------------------------------------------------
# Bayesian Bernoulli mixture (Beta-Dirichlet variational posterior)
# ---------------------------------------------------------------------------------------


class VBBernoulliPosterior(NamedTuple):
    r"""q(pi) q(mu) for the Bernoulli mixture.

    Attributes:
      weight_concentration: (k,) Dirichlet :math:`\alpha_j`, or (2, k) stick-breaking
        Beta parameters.
      a, b: (k, d) :math:`q(\mu_{jc}) = \mathrm{Beta}(a_{jc}, b_{jc})`.
    """

    weight_concentration: Float[Array, "..."]
    a: Float[Array, "k d"]
    b: Float[Array, "k d"]


class VBBernoulliPrior(NamedTuple):
    r"""Prior :math:`\pi \sim \mathrm{Dir}(\alpha_0)` (or sticks :math:`\mathrm{Beta}(1,
    \alpha_0)`), :math:`\mu_{jc} \sim \mathrm{Beta}(a_0, b_0)`; all > 0 (the MAP prior of
    :class:`emvi.bernoulli_mixture.BernoulliMixturePrior` needs >= 1, VB does not)."""

    alpha: Float[Array, ""] | float = 1.0
    a: Float[Array, ""] | float = 1.0
    b: Float[Array, ""] | float = 1.0


class VBBernoulliFit(NamedTuple):
    """What :func:`fit_bernoulli` returns: the posterior, the exact ELBO (summed over
    images) after the last iteration, its history (NaN from ``num_iter``), ``num_iter`` and
    ``converged``."""

    posterior: VBBernoulliPosterior
    elbo: Float[Array, ""]
    history: Float[Array, " t"]
    num_iter: Int[Array, ""]
    converged: Bool[Array, ""]


def _as_dirichlet_like(post: VBBernoulliPosterior) -> VBGMMPosterior:
    """Borrow the weight expectations of the Gaussian mixture's posterior."""
    k = post.a.shape[0]
    z = jnp.zeros((k,), post.a.dtype)
    return VBGMMPosterior(post.weight_concentration, z, post.a, z, z)


def bernoulli_expected_log_joint(
    post: VBBernoulliPosterior, x: Float[Array, "n d"], *, weight_prior_type: str
) -> Float[Array, "n k"]:
    r"""Local-step logits :math:`E[\log\pi_j] + \sum_c x_{ic} E[\log\mu_{jc}]
    + (1 - x_{ic}) E[\log(1 - \mu_{jc})]`, with :math:`E[\log\mu] = \psi(a) - \psi(a + b)`."""
    ds = digamma(post.a + post.b)
    e_log_mu, e_log_1mmu = digamma(post.a) - ds, digamma(post.b) - ds
    elog_w = expected_log_weights(_as_dirichlet_like(post), weight_prior_type=weight_prior_type)
    return x @ e_log_mu.T + (1.0 - x) @ e_log_1mmu.T + elog_w[None, :]


def bernoulli_global_step(
    stats: bmix.BernoulliMixtureStats, prior: VBBernoulliPrior, *, weight_prior_type: str
) -> VBBernoulliPosterior:
    r"""Closed-form global step from :func:`emvi.bernoulli_mixture.expected_stats`:
    :math:`a_{jc} = a_0 + S_{jc}`, :math:`b_{jc} = b_0 + N_j - S_{jc}`, and
    :math:`\alpha_j = \alpha_0 + N_j` (or the sticks' :math:`(1 + N_j, \alpha_0 +
    \sum_{l>j} N_l)`)."""
    dtype = stats.sum_x.dtype
    alpha0, a0, b0 = (jnp.asarray(v, dtype) for v in prior)
    nk, sk = stats.counts, stats.sum_x
    if weight_prior_type == "dirichlet_process":
        tail = jnp.concatenate([jnp.cumsum(nk[::-1])[-2::-1], jnp.zeros((1,), dtype)])
        wc = jnp.stack([1.0 + nk, alpha0 + tail])
    else:
        wc = alpha0 + nk
    # Rounding can push S a hair above N; keep b > b0 - tiny.
    return VBBernoulliPosterior(wc, a0 + sk, b0 + jnp.maximum(nk[:, None] - sk, 0.0))


def bernoulli_elbo(
    post: VBBernoulliPosterior,
    resp: Float[Array, "n k"],
    x: Float[Array, "n d"],
    prior: VBBernoulliPrior,
    *,
    weight_prior_type: str,
) -> Float[Array, ""]:
    r"""The exact ELBO (summed over images) for any responsibilities and any posterior:

    .. math::
        \sum_{ij} r_{ij}(\text{logit}_{ij} - \log r_{ij}) + E[\log p(\pi)] - E[\log q(\pi)]
        + \sum_{jc} \Big(\log\frac{B(a_{jc}, b_{jc})}{B(a_0, b_0)}
        + (a_0 - a_{jc}) E[\log\mu_{jc}] + (b_0 - b_{jc}) E[\log(1-\mu_{jc})]\Big).
    """
    dtype = post.a.dtype
    alpha0, a0, b0 = (jnp.asarray(v, dtype) for v in prior)
    lj = bernoulli_expected_log_joint(post, x, weight_prior_type=weight_prior_type)
    local = jnp.sum(resp * lj) - jnp.sum(xlogy(resp, resp))
    ds = digamma(post.a + post.b)
    e_log_mu, e_log_1mmu = digamma(post.a) - ds, digamma(post.b) - ds
    beta_term = jnp.sum(
        betaln(post.a, post.b)
        - betaln(a0, b0)
        + (a0 - post.a) * e_log_mu
        + (b0 - post.b) * e_log_1mmu
    )
    return (
        local + beta_term + _weights_elbo_term(post.weight_concentration, alpha0, weight_prior_type)
    )


def _weights_elbo_term(wc: Array, alpha0: Array, weight_prior_type: str) -> Array:
    """:math:`E[\\log p(\\pi)] - E[\\log q(\\pi)]` (Dirichlet, or the k sticks)."""
    if weight_prior_type == "dirichlet_process":
        a, b = wc[0], wc[1]
        ds = digamma(a + b)
        e_log_v, e_log_1mv = digamma(a) - ds, digamma(b) - ds
        log_p = -betaln(jnp.ones_like(a), alpha0) + (alpha0 - 1.0) * e_log_1mv
        log_q = -betaln(a, b) + (a - 1.0) * e_log_v + (b - 1.0) * e_log_1mv
        return jnp.sum(log_p - log_q)
    k = wc.shape[0]
    elog = digamma(wc) - digamma(jnp.sum(wc))
    log_c = gammaln(jnp.sum(wc)) - jnp.sum(gammaln(wc))
    log_c0 = gammaln(k * alpha0) - k * gammaln(alpha0)
    return log_c0 - log_c + jnp.sum((alpha0 - wc) * elog)


def bernoulli_posterior_from_resp(
    resp: Float[Array, "n k"],
    x: Float[Array, "n d"],
    prior: VBBernoulliPrior,
    *,
    weight_prior_type: str,
) -> VBBernoulliPosterior:
    """One global step from given responsibilities."""
    stats = bmix.expected_stats(resp, x, jnp.ones(x.shape[0], x.dtype))
    return bernoulli_global_step(stats, prior, weight_prior_type=weight_prior_type)


class VBBernoulliState(NamedTuple):
    """Loop state of :func:`bernoulli_vb_step`."""

    posterior: VBBernoulliPosterior
    elbo: Float[Array, ""]
    iteration: Int[Array, ""]
    converged: Bool[Array, ""]


def bernoulli_vb_init(post: VBBernoulliPosterior) -> VBBernoulliState:
    """The state before the first iteration."""
    return VBBernoulliState(
        post, jnp.array(-jnp.inf, post.a.dtype), jnp.array(0, jnp.int32), jnp.array(False)
    )


def bernoulli_vb_step(
    state: VBBernoulliState,
    x: Float[Array, "n d"],
    prior: VBBernoulliPrior,
    *,
    tol: float | Array = 0.0,
    weight_prior_type: str,
) -> tuple[VBBernoulliState, VBInfo]:
    """Local step, global step, then the exact ELBO of the pair; ``converged`` when it
    changed by less than ``tol``."""
    lj = bernoulli_expected_log_joint(state.posterior, x, weight_prior_type=weight_prior_type)
    resp = jax.nn.softmax(lj, axis=1)
    new = bernoulli_posterior_from_resp(resp, x, prior, weight_prior_type=weight_prior_type)
    value = bernoulli_elbo(new, resp, x, prior, weight_prior_type=weight_prior_type)
    change = value - state.elbo
    new_state = VBBernoulliState(new, value, state.iteration + 1, jnp.abs(change) < tol)
    return new_state, VBInfo(value, change, jnp.mean(jax.nn.logsumexp(lj, axis=1)))


@functools.partial(jax.jit, static_argnames=("weight_prior_type", "max_iter"))
def bernoulli_fit_from_resp(
    resp: Float[Array, "n k"],
    x: Float[Array, "n d"],
    prior: VBBernoulliPrior,
    *,
    weight_prior_type: str = "dirichlet_distribution",
    max_iter: int = 100,
    tol: float | Array = 1e-3,
) -> VBBernoulliFit:
    """CAVI for the Bernoulli mixture from initial responsibilities, on device
    (``lax.while_loop``; stop once the ELBO changes by less than ``tol``)."""
    post0 = bernoulli_posterior_from_resp(
        resp.astype(x.dtype), x, prior, weight_prior_type=weight_prior_type
    )
    history0 = jnp.full((max_iter,), jnp.nan, x.dtype)
    tol = jnp.asarray(tol, x.dtype)

    def cond(carry):
        state, _ = carry
        return (state.iteration < max_iter) & ~state.converged

    def body(carry):
        state, history = carry
        new, info = bernoulli_vb_step(state, x, prior, tol=tol, weight_prior_type=weight_prior_type)
        return new, history.at[state.iteration].set(info.lower_bound)

    state, history = lax.while_loop(cond, body, (bernoulli_vb_init(post0), history0))
    return VBBernoulliFit(state.posterior, state.elbo, history, state.iteration, state.converged)


def bernoulli_mixture_weights(
    post: VBBernoulliPosterior, *, weight_prior_type: str
) -> Float[Array, " k"]:
    """Posterior-mean weights (as :func:`mixture_weights`)."""
    return mixture_weights(_as_dirichlet_like(post), weight_prior_type=weight_prior_type)


def bernoulli_to_params(
    post: VBBernoulliPosterior, *, weight_prior_type: str
) -> bmix.BernoulliMixtureParams:
    """The posterior-mean mixture (weights and :math:`a / (a + b)`), for
    :func:`emvi.bernoulli_mixture.log_prob` (a point estimate; the exact posterior
    predictive of one image is the same, since each pixel enters once)."""
    return bmix.BernoulliMixtureParams(
        bernoulli_mixture_weights(post, weight_prior_type=weight_prior_type),
        post.a / (post.a + post.b),
    )


def fit_bernoulli(
    key: Key[Array, ""],
    x: ArrayLike,
    num_components: int,
    *,
    weight_concentration_prior_type: str = "dirichlet_distribution",
    alpha: float = 1.0,
    a: float = 1.0,
    b: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> VBBernoulliFit:
    r"""Fits a Bayesian Bernoulli mixture by CAVI (random Dirichlet(1) initial
    responsibilities), validating the inputs eagerly. The MAP-EM counterpart is
    :func:`emvi.bernoulli_mixture.fit` with the same ``alpha``, ``a``, ``b``.

    Raises:
      ValueError: for data outside [0, 1], NaN, ``num_components`` outside [1, n], or a
        concentration ``alpha``, ``a``, ``b`` that is not > 0.

    Example:
      >>> x = (jax.random.uniform(jax.random.key(0), (40, 6)) < 0.5).astype(jnp.float32)
      >>> res = fit_bernoulli(jax.random.key(1), x, 3, a=2.0, b=2.0)
      >>> res.posterior.a.shape
      (3, 6)
    """
    key = _checks.as_key(key)
    wpt = check_choice(
        weight_concentration_prior_type,
        name="weight_concentration_prior_type",
        choices=WEIGHT_PRIOR_TYPES,
    )
    arr = as_data_matrix(x)
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(
            f"x must hold values in [0, 1] (binary pixels); got values in [{arr.min()}, "
            f"{arr.max()}]."
        )
    n = arr.shape[0]
    k = check_positive_int(num_components, name="num_components")
    if k > n:
        raise ValueError(f"num_components must be <= the number of points ({n}); got {k}.")
    max_iter, tol, _, _ = check_em_settings(max_iter=max_iter, tol=tol, num_init=1, chunk_size=None)
    for name, value in (("alpha", alpha), ("a", a), ("b", b)):
        check_positive(value, name=name)
    dtype = arr.dtype
    prior = VBBernoulliPrior(*(jnp.asarray(v, dtype) for v in (alpha, a, b)))
    e = jax.random.exponential(key, (n, k), dtype)
    resp = e / jnp.sum(e, axis=1, keepdims=True)
    return bernoulli_fit_from_resp(
        resp,
        jnp.asarray(arr),
        prior,
        weight_prior_type=wpt,
        max_iter=max_iter,
        tol=jnp.asarray(tol, dtype),
    )
