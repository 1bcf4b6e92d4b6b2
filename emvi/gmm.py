r"""Gaussian mixtures fitted by exact EM, as pure JAX functions.

The model is

.. math::
    p(z = j) = \pi_j, \qquad p(x \mid z = j) = \mathcal N(x \mid \mu_j, \Sigma_j),

with the covariance layout of scikit-learn's ``covariances_``:

=============  ==============  ===============================================
``full``       (k, d, d)       one :math:`\Sigma_j` per component
``tied``       (d, d)          one :math:`\Sigma` shared by all components
``diag``       (k, d)          :math:`\Sigma_j = \operatorname{diag}(\sigma^2_{j\cdot})`
``spherical``  (k,)            :math:`\Sigma_j = \sigma_j^2 I`
=============  ==============  ===============================================

**E-step** (exact posterior, :func:`posterior`):
:math:`r_{ij} = \operatorname{softmax}_j \big(\log \pi_j + \log \mathcal N(x_i \mid \mu_j,
\Sigma_j)\big)`. :func:`e_step` returns the expected sufficient statistics summed over the
data with weights :math:`w_i` (:class:`GMMStats`),

.. math::
    N_j = \sum_i w_i r_{ij}, \qquad s_j = \sum_i w_i r_{ij} x_i, \qquad
    M_j = \sum_i w_i r_{ij} x_i x_i^\top \;(\text{or its diagonal / trace}),

and :math:`\sum_i w_i \log p(x_i)`.

**M-step** (:func:`m_step`, maximum likelihood): with :math:`\tilde N_j = N_j + 10\epsilon`
(scikit-learn's guard, :math:`\epsilon` the machine epsilon of the dtype),
:math:`\bar x_j = s_j / \tilde N_j` and the scatter :math:`S_j = M_j - \tilde N_j \bar x_j
\bar x_j^\top`,

.. math::
    \pi_j = \frac{\tilde N_j}{\sum_l \tilde N_l}, \quad \mu_j = \bar x_j, \quad
    \Sigma_j = \frac{S_j}{\tilde N_j} + \lambda I \;(\text{full}), \quad
    \Sigma = \frac{\sum_j S_j}{\sum_j \tilde N_j} + \lambda I \;(\text{tied}),

with the diagonal of :math:`S_j / \tilde N_j` for ``diag``, its mean over the d
coordinates for ``spherical``, and :math:`\lambda` = ``reg_covar``. A component that loses
all its points gets :math:`\mu_j = 0` of the (centred) data, i.e. the data mean, and
:math:`\Sigma_j = \lambda I` (plus the tiny floor below), so it stays proper.

**MAP-EM** (``prior=GMMPrior(...)``): with a Dirichlet(:math:`\alpha`) prior on the weights
and, per component, :math:`\mu_j \mid \Sigma_j \sim \mathcal N(m_0, \Sigma_j / \kappa_0)`,
:math:`\Sigma_j \sim \mathcal{IW}(\Psi_0, \nu_0)` (``full``; ``tied`` has one
:math:`\Sigma`), the M-step returns the joint posterior mode. Writing
:math:`\rho_j = \kappa_0 \tilde N_j / (\kappa_0 + \tilde N_j)` and
:math:`\delta_j = \bar x_j - m_0`:

.. math::
    \pi_j &= \frac{\tilde N_j + \alpha_j - 1}{\sum_l (\tilde N_l + \alpha_l - 1)}, \qquad
    \mu_j = \frac{s_j + \kappa_0 m_0}{\tilde N_j + \kappa_0}, \\
    \Sigma_j &= \frac{\Psi_0 + S_j + \rho_j \delta_j \delta_j^\top}{\nu_0 + \tilde N_j + d + 2}
        \;(\text{full}), \qquad
    \Sigma = \frac{\Psi_0 + \sum_j (S_j + \rho_j \delta_j \delta_j^\top)}
        {\nu_0 + \sum_j \tilde N_j + k + d + 1} \;(\text{tied}).

``diag`` puts an inverse-gamma :math:`\mathcal{IG}(\nu_0/2, \psi_{c}/2)` on each
:math:`\sigma^2_{jc}` (with :math:`\mu_{jc} \mid \sigma^2_{jc} \sim \mathcal N(m_{0c},
\sigma^2_{jc}/\kappa_0)`), ``spherical`` one :math:`\mathcal{IG}(\nu_0/2, \psi/2)` on
:math:`\sigma^2_j` (with :math:`\mu_j \sim \mathcal N(m_0, \sigma_j^2 I/\kappa_0)`):

.. math::
    \sigma^2_{jc} = \frac{\psi_c + S_{j,cc} + \rho_j \delta_{jc}^2}{\nu_0 + \tilde N_j + 3},
    \qquad
    \sigma^2_j = \frac{\psi + \operatorname{tr} S_j + \rho_j \lVert\delta_j\rVert^2}
        {d \tilde N_j + d + \nu_0 + 2}.

Each is the stationary point of the expected complete-data log-likelihood plus log-prior
(``tests/test_gmm_properties.py`` checks it with ``jax.grad``). An empty component
(:math:`N_j = 0`) gets :math:`\mu_j = m_0` and a covariance of the prior scale, so no fit
degenerates. ``reg_covar`` is added on top. With :math:`\alpha = 1`, :math:`\kappa_0 = 0`,
:math:`\Psi_0 = 0`, :math:`\nu_0 = -(d + 2)` the formulas reduce to maximum likelihood.

**Fast half-steps.** :func:`prepare` computes, once per fit, the features
:math:`\phi(x) = [\operatorname{vech}(x x^\top), x]` (n by d(d+1)/2 + d; ``diag`` uses
:math:`[x \odot x, x]`, ``spherical`` :math:`[\lVert x\rVert^2, x]`). Then every quadratic
form of the E-step is one matmul,
:math:`(x - \mu_j)^\top P_j (x - \mu_j) = \phi(x)^\top [\operatorname{vech}_2(P_j);
-2 P_j \mu_j] + \mu_j^\top P_j \mu_j` (:math:`P_j = \Sigma_j^{-1}`, off-diagonal entries
doubled), and the M-step statistics are one matmul :math:`R^\top \phi(X)`. This is about
:math:`4 n k d(d+1)/2` flops per full-covariance iteration instead of :math:`4 n k d^2` for
whitening each component, in two large matmuls.

*Error analysis.* Both half-steps use expanded squares, which cancel. The M-step's
:math:`S_j / \tilde N_j = M_j / \tilde N_j - \bar x_j \bar x_j^\top` has absolute error about
:math:`c\,\epsilon\, a_{j}` per entry with :math:`a_{j,c} = M_{j,cc}/\tilde N_j =
\sigma^2_{jc} + \bar x_{jc}^2`, i.e. relative error :math:`c\,\epsilon\,(1 + \bar x_{jc}^2
/ \sigma_{jc}^2)`; likewise the E-step's quadratic form has absolute error about
:math:`\epsilon (\lVert x\rVert_{P}^2 + \lVert \mu\rVert_{P}^2)`. Both are small only when
the data are centred, so :func:`fit` and :func:`fit_from_params` shift the data by their
weighted mean first (and the parameters with them, returning parameters in the original
coordinates); then :math:`\bar x_j^2 / \sigma_j^2` is a component's squared distance from
the data mean in units of its own spread (1e6 costs 6 of float64's 16 digits). To keep
every covariance positive definite even when a component collapses onto one point (where
the true scatter is 0 and the rounding noise has either sign), the packed M-step knows the
size of that noise, :math:`f_{j,c} = 4 d \epsilon\, a_{j,c} + \epsilon \bar v`
(:math:`\bar v` the mean per-coordinate second moment of the data; the :math:`4 d` turns
the entrywise bound into a bound on the eigenvalues), and adds it to the diagonal of a
component **only** when that component's Cholesky pivots (its conditional variances
:math:`\Sigma_{cc \mid 1..c-1}`) fall to :math:`f_{j,c}` or below, or the factorisation
fails: that is, only when the component has collapsed to within rounding. ``diag`` and
``spherical`` variances are raised to :math:`f` when below it. A well-determined component
is left unbiased. (Adding the floor to every component, as earlier versions did, biased
float32 full covariances by :math:`4 d \epsilon (1 + \bar x^2/\sigma^2)` relative, about
2e-4 at d = 16 with components 4 standard deviations from the data mean, and left float32
fits 2.4e-7 nats per point short of the float64 optimum at n = 1e5, d = k = 16; without
it they end 1.1e-8 short, within the accuracy of the textbook two-pass M-step in
float32, 2.1e-8. The measurement is ``scripts/bench_gmm.py --accuracy``.) Negative
quadratic forms from rounding are clipped to 0. :func:`emvi.testing.gmm_two_pass_em`
(per-component whitening, centred scatter) is the textbook path kept as the oracle for the
tests.

The :class:`ExactModel` from :func:`model` keeps parameters in whatever coordinates its data
are in (its ``prepare`` does not centre, because ``prepare`` sees neither the weights nor the
parameters); the centring is done around :func:`emvi.em.fit` by :func:`fit` and
:func:`fit_from_params`, which are what to call.

**The gradient face.** :func:`to_unconstrained` / :func:`from_unconstrained` (centred weight
logits, free means, softplus-diagonal Cholesky factors or softplus standard deviations),
:func:`log_prior` (the log density of :class:`GMMPrior`, the objective's second term for
MAP) and :func:`q_to_unconstrained` / :func:`q_from_unconstrained` (log responsibilities and
the softmax) are what gradient M-steps and local or amortized E-steps need; the closed-form
MAP M-step is the stationary point of :math:`\sum_i w_i \mathrm{ELBO}_i + \log p(\theta)`
in those coordinates. ``reg_covar`` is not a prior: only the closed-form M-step adds it.

**Missing values** (Ghahramani & Jordan, 1994). :func:`fit` marginalises entries that are
NaN in ``x`` (or False in its ``observed`` mask) exactly: :func:`masked_e_step` computes, for
every point and component at once (no loop over rows), the density of the observed
coordinates and the conditional mean and covariance of the missing ones, by a Cholesky
factorisation of the covariance with the identity in the missing rows and columns, and
returns the expected completed statistics that :func:`m_step` takes unchanged
(:func:`masked_model` is its :class:`emvi.em.ExactModel`). :func:`observed_log_prob` and
:func:`impute` score and complete new data. **Partial labels** (``fit(labels=...)``) hold the
responsibilities of labelled points fixed (:func:`emvi.missing.fixed_responsibilities`).

Shape letters: ``n`` data points, ``k`` components, ``d`` data dim, ``q`` feature columns,
``m`` second-moment columns (d(d+1)/2, d or 1), ``r`` restarts, ``t`` iterations.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, ArrayLike, Float, Int, Key

from emvi import _checks, em, missing
from emvi._checks import (
    check_choice,
    check_em_settings,
    check_nonnegative,
    check_positive_int,
    check_sample_weight,
)
from emvi.elbo import discrete_elbo
from emvi.kmeans import _random_indices, kmeans_plusplus_indices, lloyd

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
INITS = ("kmeans++", "kmeans", "random", "random_from_data")
_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------


class GMMParams(NamedTuple):
    """Mixture parameters; ``covariances`` has scikit-learn's layout for the covariance type.

    Attributes:
      weights: (k,) mixing weights, summing to one.
      means: (k, d) component means.
      covariances: (k, d, d) full, (d, d) tied, (k, d) diag or (k,) spherical.
    """

    weights: Float[Array, " k"]
    means: Float[Array, "k d"]
    covariances: Float[Array, "..."]


class GMMPrior(NamedTuple):
    r"""Conjugate prior for MAP-EM (formulas in the module docstring).

    Attributes:
      weight_concentration: Dirichlet :math:`\alpha`, scalar or (k,), each >= 1
        (1 is a flat prior on the weights).
      mean_prior: :math:`m_0`, (d,).
      mean_precision: :math:`\kappa_0 \ge 0`, scalar.
      covariance_prior: :math:`\Psi_0`: (d, d) positive definite for full/tied, (d,)
        positive for diag, positive scalar for spherical.
      degrees_of_freedom: :math:`\nu_0`, scalar; > d - 1 for full/tied, > 0 for
        diag/spherical.
    """

    weight_concentration: Float[Array, "..."]
    mean_prior: Float[Array, " d"]
    mean_precision: Float[Array, ""]
    covariance_prior: Float[Array, "..."]
    degrees_of_freedom: Float[Array, ""]


class GMMHyper(NamedTuple):
    """Array-valued hyperparameters of the M-step (what travels in ``hyper``)."""

    reg_covar: Float[Array, ""]
    prior: GMMPrior | None = None


class GMMStats(NamedTuple):
    """Expected sufficient statistics summed over the data (weighted by ``w_i r_ij``).

    Attributes:
      counts: (k,) :math:`N_j = \\sum_i w_i r_{ij}`.
      sums: (k, d) :math:`s_j = \\sum_i w_i r_{ij} x_i`.
      second: (k, m) :math:`\\sum_i w_i r_{ij} \\phi_2(x_i)` with :math:`\\phi_2(x)` the
        upper triangle of :math:`x x^\\top` row by row (full, tied; m = d(d+1)/2),
        :math:`x \\odot x` (diag; m = d) or :math:`\\lVert x\\rVert^2` (spherical; m = 1).
    """

    counts: Float[Array, " k"]
    sums: Float[Array, "k d"]
    second: Float[Array, "k m"]


class GMMData(NamedTuple):
    """Prepared data: ``features`` (n, q) = ``[phi_2(x), x]`` (see :class:`GMMStats`)."""

    features: Float[Array, "n q"]


GMMFit = em.FitResult
"""What :func:`fit` and :func:`fit_from_params` return: the one result type,
:class:`emvi.em.FitResult` (``params`` in the coordinates of the input data)."""


# ---------------------------------------------------------------------------------------
# Packing helpers
# ---------------------------------------------------------------------------------------


@functools.cache
def _triu(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row/column indices of the packed upper triangle, the doubling mask and the
    (d, d) matrix of packed positions (symmetric)."""
    iu, ju = np.triu_indices(d)
    pos = np.zeros((d, d), np.int32)
    pos[iu, ju] = np.arange(iu.size)
    pos[ju, iu] = np.arange(iu.size)
    mult = np.where(iu == ju, 1.0, 2.0)
    return iu, ju, mult, pos


def _unpack(v: Array, d: int) -> Array:
    """(..., d(d+1)/2) packed upper triangle -> (..., d, d) symmetric."""
    return v[..., _triu(d)[3]]


def _second_features(x: Array, covariance_type: str) -> Array:
    if covariance_type in ("full", "tied"):
        iu, ju, _, _ = _triu(x.shape[1])
        return x[:, iu] * x[:, ju]
    if covariance_type == "diag":
        return x * x
    return jnp.sum(x * x, axis=1, keepdims=True)


def _num_second(d: int, covariance_type: str) -> int:
    return {"full": d * (d + 1) // 2, "tied": d * (d + 1) // 2, "diag": d, "spherical": 1}[
        covariance_type
    ]


def _diag_add(mat: Array, v: Array) -> Array:
    """Adds ``v`` (..., d) to the diagonal of ``mat`` (..., d, d)."""
    d = mat.shape[-1]
    return mat + v[..., :, None] * jnp.broadcast_to(jnp.eye(d, dtype=mat.dtype), mat.shape)


def _symmetrize(mat: Array) -> Array:
    return 0.5 * (mat + jnp.swapaxes(mat, -1, -2))


# ---------------------------------------------------------------------------------------
# Densities (accurate path: whitening by the Cholesky factor)
# ---------------------------------------------------------------------------------------


def _inv_cholesky(cov: Array) -> tuple[Array, Array]:
    """Returns (L^{-1}, log det cov) for cov = L L^T (batched over leading axes)."""
    chol = jnp.linalg.cholesky(cov)
    eye = jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype), cov.shape)
    inv = solve_triangular(chol, eye, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    return inv, logdet


def _log_gaussians(params: GMMParams, x: Array, covariance_type: str) -> Array:
    """(n, k) log N(x_i | mu_j, Sigma_j) by whitening the differences."""
    d = x.shape[1]
    diff = x[None, :, :] - params.means[:, None, :]  # (k, n, d)
    cov = params.covariances
    if covariance_type == "full":
        inv, logdet = _inv_cholesky(cov)
        y = jnp.einsum("knd,ked->kne", diff, inv)
        quad = jnp.sum(y * y, axis=2)
    elif covariance_type == "tied":
        inv, ld = _inv_cholesky(cov)
        y = jnp.einsum("knd,ed->kne", diff, inv)
        quad = jnp.sum(y * y, axis=2)
        logdet = jnp.broadcast_to(ld, params.weights.shape)
    elif covariance_type == "diag":
        quad = jnp.sum(diff * diff / cov[:, None, :], axis=2)
        logdet = jnp.sum(jnp.log(cov), axis=1)
    else:
        quad = jnp.sum(diff * diff, axis=2) / cov[:, None]
        logdet = d * jnp.log(cov)
    return (-0.5 * (d * _LOG_2PI + logdet))[None, :] - 0.5 * quad.T


def _check_type(covariance_type: str) -> str:
    return check_choice(covariance_type, name="covariance_type", choices=COVARIANCE_TYPES)


def _check_points(params: GMMParams, x: Array) -> None:
    """Raises ``ValueError`` when ``x`` does not match ``params``.

    The shape check reads static shapes, so it runs once at trace time and costs nothing
    under ``jit``; the NaN check runs only when ``x`` is concrete (an eager call).
    """
    d = params.means.shape[-1]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(
            f"x must have shape (num_points, {d}) to match params.means of shape "
            f"{params.means.shape}; got {x.shape}."
        )
    if not isinstance(x, jax.core.Tracer):
        bad = np.isnan(np.asarray(x)).any(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            shown = ", ".join(str(r) for r in rows[:5]) + (" ..." if rows.size > 5 else "")
            raise ValueError(f"x contains NaN in row(s) {shown}; remove or impute them first.")


def log_joint(
    params: GMMParams, x: Float[Array, "n d"], *, covariance_type: str
) -> Float[Array, "n k"]:
    r"""Log joint density of every point with every component.

    .. math::
        \log p(x_i, z_i = j) = \log \pi_j - \tfrac12 \big(d \log 2\pi + \log\det \Sigma_j
            + \lVert L_j^{-1}(x_i - \mu_j)\rVert^2\big), \qquad \Sigma_j = L_j L_j^\top.

    Computed by whitening with the Cholesky factor (accurate for any offset of the data).

    Args:
      params: mixture parameters.
      x: points, shape (n, d).
      covariance_type: one of ``"full"``, ``"tied"``, ``"diag"``, ``"spherical"``.

    Returns:
      Shape (n, k), in the dtype of ``x``.

    Raises:
      ValueError: if ``x`` has a column count other than the means' d (at trace time, so
        also under ``jit``) or, in an eager call, NaN in any row.

    Example:
      >>> p = GMMParams(jnp.array([1.0]), jnp.zeros((1, 1)), jnp.ones((1,)))
      >>> float(log_joint(p, jnp.zeros((1, 1)), covariance_type="spherical")[0, 0])
      -0.918...
    """
    _check_type(covariance_type)
    _check_points(params, x)
    lw = jnp.log(params.weights)
    return lw[None, :] + _log_gaussians(params, x, covariance_type)


def log_prob(
    params: GMMParams, x: Float[Array, "n d"], *, covariance_type: str
) -> Float[Array, " n"]:
    r"""Log marginal density :math:`\log p(x_i) = \operatorname{logsumexp}_j \log p(x_i, j)`.

    Validates ``x`` as :func:`log_joint` does."""
    return jax.nn.logsumexp(log_joint(params, x, covariance_type=covariance_type), axis=1)


def posterior(
    params: GMMParams, x: Float[Array, "n d"], *, covariance_type: str
) -> Float[Array, "n k"]:
    r"""Responsibilities :math:`r_{ij} = p(z_i = j \mid x_i)` (softmax of :func:`log_joint`)."""
    return jax.nn.softmax(log_joint(params, x, covariance_type=covariance_type), axis=1)


def predict(params: GMMParams, x: Float[Array, "n d"], *, covariance_type: str) -> Int[Array, " n"]:
    """The most probable component of each point, :math:`\\arg\\max_j r_{ij}`."""
    return jnp.argmax(log_joint(params, x, covariance_type=covariance_type), axis=1)


def sample(
    key: Key[Array, ""], params: GMMParams, num_samples: int, *, covariance_type: str
) -> tuple[Float[Array, "s d"], Int[Array, " s"]]:
    r"""Draws ``num_samples`` points: :math:`z_i \sim \mathrm{Cat}(\pi)`,
    :math:`x_i = \mu_{z_i} + L_{z_i} \varepsilon_i`, :math:`\varepsilon_i \sim \mathcal N(0, I)`.

    Returns:
      ``(x, z)`` with x (s, d) in the dtype of the means and z (s,) the component labels
      (in random order, unlike scikit-learn's sorted ``sample``).

    Example:
      >>> p = GMMParams(jnp.array([0.5, 0.5]), jnp.array([[0.0], [9.0]]), jnp.ones(2))
      >>> x, z = sample(jax.random.key(0), p, 3, covariance_type="spherical")
      >>> x.shape, z.shape
      ((3, 1), (3,))
    """
    key = _checks.as_key(key)
    _check_type(covariance_type)
    num_samples = check_positive_int(num_samples, name="num_samples")
    key_z, key_x = jax.random.split(key)
    means = params.means
    z = jax.random.categorical(key_z, jnp.log(params.weights), shape=(num_samples,))
    eps = jax.random.normal(key_x, (num_samples, means.shape[1]), means.dtype)
    cov = params.covariances
    if covariance_type == "full":
        chol = jnp.linalg.cholesky(cov)
        noise = jnp.einsum("nij,nj->ni", chol[z], eps)
    elif covariance_type == "tied":
        noise = eps @ jnp.linalg.cholesky(cov).T
    elif covariance_type == "diag":
        noise = jnp.sqrt(cov)[z] * eps
    else:
        noise = jnp.sqrt(cov)[z][:, None] * eps
    return means[z] + noise, z


def num_parameters(num_components: int, dim: int, covariance_type: str) -> int:
    """Free parameters: k - 1 weights, k d means and the covariances of the type."""
    k, d = num_components, dim
    cov = {
        "full": k * d * (d + 1) // 2,
        "tied": d * (d + 1) // 2,
        "diag": k * d,
        "spherical": k,
    }[_check_type(covariance_type)]
    return cov + k * d + k - 1


def bic(params: GMMParams, x: Float[Array, "n d"], *, covariance_type: str) -> Float[Array, ""]:
    r"""Bayesian information criterion, :math:`-2 \sum_i \log p(x_i) + p \log n` (lower is
    better; :math:`p` = :func:`num_parameters`)."""
    n, d = x.shape
    total = jnp.sum(log_prob(params, x, covariance_type=covariance_type))
    p = num_parameters(params.weights.shape[0], d, covariance_type)
    return -2.0 * total + p * math.log(n)


def aic(params: GMMParams, x: Float[Array, "n d"], *, covariance_type: str) -> Float[Array, ""]:
    r"""Akaike information criterion, :math:`-2 \sum_i \log p(x_i) + 2 p`."""
    total = jnp.sum(log_prob(params, x, covariance_type=covariance_type))
    p = num_parameters(params.weights.shape[0], x.shape[1], covariance_type)
    return -2.0 * total + 2.0 * p


# ---------------------------------------------------------------------------------------
# Packed E-step
# ---------------------------------------------------------------------------------------


def prepare(x: Float[Array, "n d"], *, covariance_type: str) -> GMMData:
    """Features ``[phi_2(x), x]`` computed once per fit (see the module docstring).

    Does not centre ``x``: pass centred data (as :func:`fit_from_params` does) for accuracy.
    """
    return GMMData(jnp.concatenate([_second_features(x, covariance_type), x], axis=1))


def _quadratic_coefficients(params: GMMParams, covariance_type: str) -> tuple[Array, Array, Array]:
    """(W (q, k), c (k,), log det Sigma (k,)) with quad_ij = phi(x_i) @ W[:, j] + c_j."""
    means = params.means
    k, d = means.shape
    cov = params.covariances
    if covariance_type in ("full", "tied"):
        iu, ju, mult, _ = _triu(d)
        inv, logdet = _inv_cholesky(cov)
        prec = jnp.swapaxes(inv, -1, -2) @ inv
        packed = prec[..., iu, ju]
        packed = packed * jnp.broadcast_to(jnp.asarray(mult, cov.dtype), packed.shape)
        if covariance_type == "full":
            prec_mu = jnp.einsum("kij,kj->ki", prec, means)
        else:
            prec_mu = means @ prec
            packed = jnp.broadcast_to(packed, (k, packed.shape[0]))
            logdet = jnp.broadcast_to(logdet, (k,))
        c = jnp.sum(means * prec_mu, axis=1)
        top = packed
    elif covariance_type == "diag":
        prec = 1.0 / cov
        prec_mu = means * prec
        c = jnp.sum(means * prec_mu, axis=1)
        top = prec
        logdet = jnp.sum(jnp.log(cov), axis=1)
    else:
        prec = 1.0 / cov
        prec_mu = means * prec[:, None]
        c = jnp.sum(means * prec_mu, axis=1)
        top = prec[:, None]
        logdet = d * jnp.log(cov)
    w = jnp.concatenate([top, -2.0 * prec_mu], axis=1).T
    return w, c, logdet


def _log_joint_features(params: GMMParams, features: Array, covariance_type: str) -> Array:
    """(n, k) log joint from prepared features: one matmul for all quadratic forms."""
    d = params.means.shape[1]
    w, c, logdet = _quadratic_coefficients(params, covariance_type)
    quad = jnp.maximum(features @ w + c[None, :], 0.0)
    const = jnp.log(params.weights) - 0.5 * (d * _LOG_2PI + logdet)
    return const[None, :] - 0.5 * quad


def _stats_from_resp(weighted_resp: Array, features: Array, d: int) -> GMMStats:
    """Statistics for responsibilities already multiplied by the point weights."""
    t = weighted_resp.T @ features  # (k, q)
    m = features.shape[1] - d
    return GMMStats(jnp.sum(weighted_resp, axis=0), t[:, m:], t[:, :m])


def e_step(
    params: GMMParams, data: GMMData, weights: Float[Array, " n"], *, covariance_type: str
) -> tuple[GMMStats, Float[Array, ""]]:
    r"""Exact E-step: expected sufficient statistics and :math:`\sum_i w_i \log p(x_i)`.

    Args:
      params: current parameters (in the coordinates of ``data``).
      data: :func:`prepare` d data.
      weights: (n,) point weights.
      covariance_type: the covariance type (static).

    Returns:
      ``(GMMStats, log_lik_sum)``.
    """
    lj = _log_joint_features(params, data.features, covariance_type)
    ll = jax.nn.logsumexp(lj, axis=1)
    resp = jax.nn.softmax(lj, axis=1) * weights[:, None]
    stats = _stats_from_resp(resp, data.features, params.means.shape[1])
    return stats, jnp.sum(weights * ll)


def batched_e_step(
    params: GMMParams, data: GMMData, weights: Float[Array, " n"], *, covariance_type: str
) -> tuple[GMMStats, Float[Array, " r"]]:
    r"""The E-step of r restarts at once, restarts folded into the component axis.

    ``params`` carries a leading restart axis r on every leaf (weights (r, k), means
    (r, k, d), covariances (r, ...)). With each restart's coefficients :math:`W_\rho`
    (q, k) of :func:`_quadratic_coefficients` laid side by side, :math:`W = [W_1 \cdots
    W_r]` (q, r k), every quadratic form of every restart is one matmul,
    :math:`\phi(X) W` (n, r k); the log-sum-exp and the softmax run over the k columns of
    each restart's group, and the statistics of all restarts are one matmul back,
    :math:`R^\top \phi(X)` (r k, q) with :math:`R_{i, (\rho, j)} = w_i r^{(\rho)}_{ij}`.
    Each entry is the one :func:`e_step` computes for that restart (the same products,
    summed in another order), so the result equals ``jax.vmap(e_step, in_axes=(0, None,
    None))`` up to rounding. The rows are taken in blocks whose (rows, r k) intermediates
    hold about 2 MiB (:func:`emvi.em.sum_over_chunks`; the coefficients are computed once,
    outside the blocks), so memory does not grow with n.

    (``vmap`` of :func:`e_step` already turns the r matmuls against the shared features
    into one, so on a CPU this is about as fast as ``vmap``: the r E-steps' flops remain.
    See ``scripts/bench_batches.py``.)

    Args:
      params: r stacked :class:`GMMParams` (in the coordinates of ``data``).
      data: :func:`prepare` d data.
      weights: (n,) point weights.
      covariance_type: the covariance type (static).

    Returns:
      ``(GMMStats, log_lik_sums)``: statistics with leading axis r (counts (r, k), sums
      (r, k, d), second (r, k, m)) and the (r,) sums :math:`\sum_i w_i \log p_\rho(x_i)`.

    Example:
      >>> x = jnp.array([[0.0], [1.0], [4.0]])
      >>> p = GMMParams(jnp.full((2, 2), 0.5), jnp.array([[[0.0], [4.0]], [[1.0], [2.0]]]),
      ...               jnp.ones((2, 2)))
      >>> data = prepare(x, covariance_type="spherical")
      >>> stats, ll = batched_e_step(p, data, jnp.ones(3), covariance_type="spherical")
      >>> one, ll1 = e_step(jax.tree_util.tree_map(lambda a: a[1], p), data, jnp.ones(3),
      ...                   covariance_type="spherical")
      >>> bool(jnp.allclose(stats.counts[1], one.counts) and jnp.allclose(ll[1], ll1))
      True
    """
    features = data.features
    q = features.shape[1]
    r, k, d = params.means.shape
    w, c, logdet = jax.vmap(lambda p: _quadratic_coefficients(p, covariance_type))(params)
    const = jnp.log(params.weights) - 0.5 * (d * _LOG_2PI + logdet)  # (r, k)
    folded = (jnp.moveaxis(w, 0, 1).reshape(q, r * k), c.reshape(1, r * k), const)  # rho*k + j
    block = max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (r * k * features.dtype.itemsize))
    step = functools.partial(_folded_e_step, dim=d)
    return em.sum_over_chunks(step, folded, data, weights, chunk_size=block)


# The batched E-step runs over blocks of rows whose (rows, r k) intermediates take about
# this many bytes (2048 rows of 8 restarts of 16 components in float64), so its memory does
# not grow with n: in one block, n = 1e5 rows of those restarts make 100 MB per
# intermediate (vmap of e_step holds the same r n k arrays). Measured on 2 CPU cores
# (scripts/bench_batches.py sizes), blocks of 0.5 to 4 MiB ran the diag E-step about 10%
# faster than one block and the full one within the noise.
_BLOCK_BYTES = 1 << 21
_MIN_BLOCK_ROWS = 256


def _folded_e_step(
    folded: tuple[Array, Array, Array], data: GMMData, weights: Array, *, dim: int
) -> tuple[GMMStats, Array]:
    """:func:`batched_e_step` on a block of rows, from the folded coefficients
    ``(W (q, r k), c (1, r k), const (r, k))``."""
    w_all, c, const = folded
    features = data.features
    n = features.shape[0]
    r, k = const.shape
    quad = jnp.maximum(features @ w_all + c, 0.0)
    lj = (const.reshape(1, r * k) - 0.5 * quad).reshape(n, r, k)
    ll = jax.nn.logsumexp(lj, axis=2)  # (n, r)
    resp = jax.nn.softmax(lj, axis=2) * weights[:, None, None]
    flat = _stats_from_resp(resp.reshape(n, r * k), features, dim)  # components rho*k + j
    stats = jax.tree_util.tree_map(lambda a: a.reshape(r, k, *a.shape[1:]), flat)
    return stats, jnp.sum(weights[:, None] * ll, axis=0)


def expected_stats(
    q: Float[Array, "n k"], data: GMMData, weights: Float[Array, " n"], *, covariance_type: str
) -> GMMStats:
    r"""The statistics :func:`e_step` would return for an *arbitrary* q (not only the posterior).

    :math:`N_j = \sum_i w_i q_{ij}`, :math:`s_j = \sum_i w_i q_{ij} x_i`, and the second
    moments likewise, so ``m_step(expected_stats(q, data, w), hyper)`` maximises the ELBO of q
    over the parameters (the closed-form M-step of amortized EM, ``emvi.grid``).

    Args:
      q: (n, k) a distribution over components for each point.
      data: :func:`prepare` d data.
      weights: (n,) point weights.
      covariance_type: the covariance type (static).
    """
    num_cols = data.features.shape[1]
    d = next(d for d in range(1, num_cols + 1) if _num_second(d, covariance_type) + d == num_cols)
    return _stats_from_resp(q * weights[:, None], data.features, d)


# ---------------------------------------------------------------------------------------
# M-step
# ---------------------------------------------------------------------------------------


def _finish_m_step(
    counts: Array,
    sums: Array,
    scatter: Array,
    hyper: GMMHyper,
    covariance_type: str,
    floor: Array | None,
) -> GMMParams:
    """Weights, means and covariances from counts, sums and the scatter about x̄.

    ``scatter`` is (k, d, d) full, (d, d) tied (summed over components), (k, d) diag,
    (k,) spherical (trace); ``floor`` has the shape of the covariance diagonal.
    """
    dtype = sums.dtype
    k, d = sums.shape
    eps = jnp.finfo(dtype).eps
    nk = counts + 10.0 * eps
    xbar = sums / nk[:, None]
    prior = hyper.prior
    reg = jnp.asarray(hyper.reg_covar, dtype)
    if prior is None:
        weights = nk / jnp.sum(nk)
        means = xbar
        if covariance_type == "full":
            cov = scatter / nk[:, None, None]
        elif covariance_type == "tied":
            cov = scatter / jnp.sum(nk)
        elif covariance_type == "diag":
            cov = scatter / nk[:, None]
        else:
            cov = scatter / (d * nk)
    else:
        alpha = jnp.broadcast_to(jnp.asarray(prior.weight_concentration, dtype), (k,))
        kappa = jnp.asarray(prior.mean_precision, dtype)
        m0 = jnp.asarray(prior.mean_prior, dtype)
        psi = jnp.asarray(prior.covariance_prior, dtype)
        nu = jnp.asarray(prior.degrees_of_freedom, dtype)
        unnorm = nk + alpha - 1.0
        weights = unnorm / jnp.sum(unnorm)
        means = (sums + kappa * m0[None, :]) / (nk + kappa)[:, None]
        rho = kappa * nk / (kappa + nk)
        delta = xbar - m0[None, :]
        if covariance_type == "full":
            outer = rho[:, None, None] * delta[:, :, None] * delta[:, None, :]
            cov = (psi[None] + scatter + outer) / (nu + nk + d + 2.0)[:, None, None]
        elif covariance_type == "tied":
            outer = jnp.einsum("k,ki,kj->ij", rho, delta, delta)
            cov = (psi + scatter + outer) / (nu + jnp.sum(nk) + k + d + 1.0)
        elif covariance_type == "diag":
            cov = (psi[None, :] + scatter + rho[:, None] * delta * delta) / (nu + nk + 3.0)[:, None]
        else:
            cov = (psi + scatter + rho * jnp.sum(delta * delta, axis=1)) / (d * nk + d + nu + 2.0)
    if covariance_type in ("full", "tied"):
        cov = _diag_add(_symmetrize(cov), jnp.broadcast_to(reg, cov.shape[:-1]))
        if floor is not None:
            # Only a component whose Cholesky pivots (conditional variances) fall to the
            # rounding-noise level ``floor`` (or below zero: NaN) gets the floor; a
            # well-determined one is left unbiased.
            floor = jnp.broadcast_to(floor, cov.shape[:-1])
            pivots = jnp.square(jnp.diagonal(jnp.linalg.cholesky(cov), axis1=-2, axis2=-1))
            ok = jnp.all(pivots > floor, axis=-1)  # NaN compares False
            cov = jnp.where(ok[..., None, None], cov, _diag_add(cov, floor))
    else:
        # A variance below the rounding-noise level (or negative) is raised to it; any
        # other is left unbiased.
        cov = jnp.maximum(cov, 0.0 if floor is None else floor) + reg
    return GMMParams(weights, means, cov)


def m_step(stats: GMMStats, hyper: GMMHyper | None, *, covariance_type: str) -> GMMParams:
    r"""Closed-form M-step (maximum likelihood, or MAP with ``hyper.prior``).

    Formulas in the module docstring. ``hyper`` carries ``reg_covar`` (added to the
    covariance diagonal) and the optional :class:`GMMPrior`; ``None`` means no
    regularisation and no prior. The scatter is ``second - N x̄ x̄^T``; see the module's error
    analysis for the rounding-noise floor that keeps a collapsed component positive definite
    (and is not added to any other).

    Args:
      stats: summed statistics from :func:`e_step` (or from chunks of it, added).
      hyper: :class:`GMMHyper` or None.
      covariance_type: the covariance type (static).

    Returns:
      The new :class:`GMMParams`.
    """
    if hyper is None:
        hyper = GMMHyper(jnp.zeros((), stats.sums.dtype))
    dtype = stats.sums.dtype
    eps = jnp.finfo(dtype).eps
    d = stats.sums.shape[1]
    nk = stats.counts + 10.0 * eps
    xbar = stats.sums / nk[:, None]
    if covariance_type in ("full", "tied"):
        second = _unpack(stats.second, d)  # (k, d, d)
        scatter = second - nk[:, None, None] * xbar[:, :, None] * xbar[:, None, :]
        second_diag = jnp.diagonal(second, axis1=1, axis2=2)  # (k, d)
        vbar = jnp.sum(second_diag) / (d * jnp.sum(nk))
        if covariance_type == "full":
            a = second_diag / nk[:, None]
        else:
            scatter = jnp.sum(scatter, axis=0)
            a = jnp.sum(second_diag, axis=0) / jnp.sum(nk)
        floor = 4.0 * d * eps * a + eps * vbar
    elif covariance_type == "diag":
        scatter = stats.second - nk[:, None] * xbar * xbar
        vbar = jnp.sum(stats.second) / (d * jnp.sum(nk))
        floor = 4.0 * eps * stats.second / nk[:, None] + eps * vbar
    else:
        scatter = stats.second[:, 0] - nk * jnp.sum(xbar * xbar, axis=1)
        vbar = jnp.sum(stats.second) / (d * jnp.sum(nk))
        floor = 4.0 * eps * stats.second[:, 0] / (d * nk) + eps * vbar
    return _finish_m_step(stats.counts, stats.sums, scatter, hyper, covariance_type, floor)


# ---------------------------------------------------------------------------------------
# The gradient face: parameter bijection, log prior, q bijection
# ---------------------------------------------------------------------------------------


def _softplus_inverse(y: Array) -> Array:
    """The inverse of softplus for y > 0, :math:`\\log(e^y - 1) = y + \\log(1 - e^{-y})`."""
    return y + jnp.log(-jnp.expm1(-y))


def _diag_matrix(diag: Array) -> Array:
    """(..., d) -> (..., d, d) diagonal matrices (broadcasting written out)."""
    shape = (*diag.shape, diag.shape[-1])
    eye = jnp.broadcast_to(jnp.eye(diag.shape[-1], dtype=diag.dtype), shape)
    return eye * jnp.broadcast_to(diag[..., None, :], shape)


def _chol_to_raw(cov: Array) -> Array:
    """(..., d, d) SPD matrices -> unconstrained (..., d, d): strictly-lower entries of the
    Cholesky factor, softplus-inverse of its diagonal on the diagonal, zeros above."""
    chol = jnp.linalg.cholesky(cov)
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    return jnp.tril(chol, -1) + _diag_matrix(_softplus_inverse(diag))


def _raw_to_cov(raw: Array) -> Array:
    """Inverse of :func:`_chol_to_raw`: :math:`L L^T` with L lower, softplus diagonal (> 0).
    Entries of ``raw`` above the diagonal are ignored."""
    diag = jax.nn.softplus(jnp.diagonal(raw, axis1=-2, axis2=-1))
    chol = jnp.tril(raw, -1) + _diag_matrix(diag)
    return chol @ jnp.swapaxes(chol, -1, -2)


def to_unconstrained(params: GMMParams, *, covariance_type: str) -> GMMParams:
    r"""Maps parameters to a :class:`GMMParams` of unconstrained real arrays.

    * weights: centred logits :math:`u_\pi = \log\pi - \overline{\log\pi}` (k,);
    * means: as they are (k, d);
    * covariances: ``full`` / ``tied``: the Cholesky factor :math:`\Sigma = L L^\top` with
      :math:`u_{cc} = \mathrm{softplus}^{-1}(L_{cc})` on the diagonal, the strictly lower
      entries of :math:`L` below it and zeros above (the layout of the covariance);
      ``diag`` / ``spherical``: :math:`u = \mathrm{softplus}^{-1}(\sigma)` of the standard
      deviations.

    :func:`from_unconstrained` inverts it, and maps *every* real input to valid parameters
    (softmax weights, positive definite covariances), so an optimiser may move ``u`` freely.

    Example:
      >>> p = GMMParams(jnp.array([0.25, 0.75]), jnp.zeros((2, 1)), jnp.array([1.0, 4.0]))
      >>> u = to_unconstrained(p, covariance_type="spherical")
      >>> back = from_unconstrained(u, covariance_type="spherical")
      >>> [round(float(v), 4) for v in back.covariances]
      [1.0, 4.0]
    """
    ct = _check_type(covariance_type)
    log_w = jnp.log(params.weights)
    cov = params.covariances
    if ct in ("full", "tied"):
        raw = _chol_to_raw(cov)
    else:
        raw = _softplus_inverse(jnp.sqrt(cov))
    return GMMParams(log_w - jnp.mean(log_w), params.means, raw)


def from_unconstrained(u: GMMParams, *, covariance_type: str) -> GMMParams:
    """Inverse of :func:`to_unconstrained`: softmax weights, free means, covariances from the
    softplus-diagonal Cholesky factor (``full``, ``tied``) or softplus standard deviations."""
    ct = _check_type(covariance_type)
    if ct in ("full", "tied"):
        cov = _raw_to_cov(u.covariances)
    else:
        cov = jnp.square(jax.nn.softplus(u.covariances))
    return GMMParams(jax.nn.softmax(u.weights), u.means, cov)


def log_prior(params: GMMParams, hyper: GMMHyper | None, *, covariance_type: str) -> Array:
    r"""Log density of the MAP prior ``hyper.prior`` at ``params``, up to a constant.

    The prior of the module docstring, written out (:math:`\delta_j = \mu_j - m_0`):

    .. math::
        \log p(\theta) = \sum_j (\alpha_j - 1) \log \pi_j
            + \sum_j \big(-\tfrac12 \log\det\Sigma_j - \tfrac{\kappa_0}2
                \delta_j^\top \Sigma_j^{-1} \delta_j\big)
            + \sum_j \big(-\tfrac{\nu_0 + d + 1}2 \log\det\Sigma_j
                - \tfrac12 \operatorname{tr}(\Psi_0 \Sigma_j^{-1})\big)

    for ``full`` (``tied``: one :math:`\Sigma`, so the inverse-Wishart term once and the k
    normal terms on the shared :math:`\Sigma`); ``diag`` and ``spherical`` put
    :math:`-(\nu_0/2 + 1)\log\sigma^2 - \psi/(2\sigma^2)` on each variance and the normal
    terms on the means. The :math:`-\tfrac12\log\det\Sigma_j` of the mean's normal is kept
    even at :math:`\kappa_0 = 0` (a flat prior on the mean in the limit), exactly as
    :func:`m_step` keeps it, so that :func:`m_step` is the stationary point of
    :math:`\sum_i w_i \mathrm{ELBO}_i + \log p(\theta)` (``tests/test_gmm_properties.py``
    checks it with ``jax.grad``). ``reg_covar`` is not a prior: it is added to the
    covariances by the closed-form M-step only, and a gradient M-step ignores it.

    Returns 0 when ``hyper`` or ``hyper.prior`` is None (maximum likelihood).

    Args:
      params: mixture parameters (in the coordinates of the prior's ``mean_prior``).
      hyper: a :class:`GMMHyper` or None.
      covariance_type: the covariance type (static).

    Returns:
      A scalar in the dtype of the means.
    """
    ct = _check_type(covariance_type)
    dtype = params.means.dtype
    if hyper is None or hyper.prior is None:
        return jnp.zeros((), dtype)
    alpha, m0, kappa, psi, nu = (jnp.asarray(a, dtype) for a in hyper.prior)
    k, d = params.means.shape
    alpha = jnp.broadcast_to(alpha, (k,))
    out = jnp.sum((alpha - 1.0) * jnp.log(params.weights))
    dev = params.means - m0[None, :]
    cov = params.covariances
    if ct in ("full", "tied"):
        inv, logdet = _inv_cholesky(cov)  # inv = L^{-1}
        if ct == "full":
            white = jnp.einsum("kij,kj->ki", inv, dev)
            trace = jnp.einsum("kab,bc,kac->k", inv, psi, inv)  # tr(L^-1 Psi L^-T)
            out += jnp.sum(-0.5 * logdet - 0.5 * kappa * jnp.sum(white * white, axis=1))
            out += jnp.sum(-0.5 * (nu + d + 1.0) * logdet - 0.5 * trace)
        else:
            white = dev @ inv.T
            trace = jnp.einsum("ab,bc,ac->", inv, psi, inv)
            out += jnp.sum(-0.5 * logdet - 0.5 * kappa * jnp.sum(white * white, axis=1))
            out += -0.5 * (nu + d + 1.0) * logdet - 0.5 * trace
    elif ct == "diag":
        out += jnp.sum(-0.5 * jnp.log(cov) - 0.5 * kappa * dev * dev / cov)
        out += jnp.sum(-(0.5 * nu + 1.0) * jnp.log(cov) - 0.5 * psi[None, :] / cov)
    else:
        out += jnp.sum(-0.5 * d * jnp.log(cov) - 0.5 * kappa * jnp.sum(dev * dev, axis=1) / cov)
        out += jnp.sum(-(0.5 * nu + 1.0) * jnp.log(cov) - 0.5 * psi / cov)
    return out


def q_to_unconstrained(q: Float[Array, "n k"]) -> Float[Array, "n k"]:
    """Responsibilities -> unconstrained logits, :math:`\\log q` with zeros clipped to the
    smallest normal number (so every entry is finite); :func:`q_from_unconstrained` inverts
    it for rows that sum to one."""
    return jnp.log(jnp.maximum(q, jnp.finfo(q.dtype).tiny))


def q_from_unconstrained(u: Float[Array, "n k"]) -> Float[Array, "n k"]:
    """Logits -> responsibilities, the softmax over the k components."""
    return jax.nn.softmax(u, axis=-1)


# ---------------------------------------------------------------------------------------
# The ExactModel
# ---------------------------------------------------------------------------------------


@functools.cache
def model(covariance_type: str) -> em.ExactModel:
    """The mixture as an :class:`emvi.em.ExactModel`, with every field of the protocol.

    Cached: the same object each call, so jitted drivers do not recompile. ``hyper`` is a
    :class:`GMMHyper`; ``data`` is :func:`prepare` d; parameters live in the coordinates
    of that data (its ``prepare`` does not centre, because it sees neither the weights nor
    the parameters: :func:`fit` centres around :func:`emvi.em.fit`). ``q`` is the (n, k)
    responsibilities; ``elbo`` is differentiable in ``params`` and ``q``. The gradient face
    is :func:`to_unconstrained`, :func:`from_unconstrained`, :func:`log_prior`,
    :func:`q_to_unconstrained` and :func:`q_from_unconstrained`. The E-step is an
    :class:`emvi.em.BatchedEStep` carrying :func:`batched_e_step`, so :func:`emvi.em.fit`
    runs r > 1 restarts as one loop whose E-step folds them into the component axis.

    Example:
      >>> mdl = model("diag")
      >>> mdl is model("diag") and mdl.log_prior is not None
      True
      >>> mdl.batched_e_step is not None and masked_model("diag").batched_e_step is None
      True
    """
    ct = _check_type(covariance_type)

    def lj(params, data):
        return _log_joint_features(params, data.features, ct)

    return em.ExactModel(
        e_step=em.BatchedEStep(
            functools.partial(e_step, covariance_type=ct),
            functools.partial(batched_e_step, covariance_type=ct),
        ),
        m_step=functools.partial(m_step, covariance_type=ct),
        log_prob=lambda params, data: jax.nn.logsumexp(lj(params, data), axis=1),
        posterior=lambda params, data: jax.nn.softmax(lj(params, data), axis=1),
        elbo=lambda params, q, data: discrete_elbo(lj(params, data), q),
        prepare=functools.partial(prepare, covariance_type=ct),
        expected_stats=functools.partial(expected_stats, covariance_type=ct),
        to_unconstrained=functools.partial(to_unconstrained, covariance_type=ct),
        from_unconstrained=functools.partial(from_unconstrained, covariance_type=ct),
        log_prior=functools.partial(log_prior, covariance_type=ct),
        q_to_unconstrained=q_to_unconstrained,
        q_from_unconstrained=q_from_unconstrained,
    )


# ---------------------------------------------------------------------------------------
# Missing values: the conditional Gaussian of the missing entries (Ghahramani & Jordan)
# ---------------------------------------------------------------------------------------


def _masked_parts(
    params: GMMParams, x: Array, observed: Array, covariance_type: str, *, moments: bool
) -> tuple[Array, Array | None, Array | None]:
    r"""Log joint of the observed entries and, with ``moments``, the conditional moments of
    the missing ones, for every point and component, with no loop over rows.

    For ``full``/``tied`` each (point, component) pair gets the d x d matrix
    :math:`\tilde\Sigma = D \Sigma_j D + (I - D)`, :math:`D = \operatorname{diag}(o_i)`: the
    observed block of :math:`\Sigma_j` with the identity in the missing rows and columns
    (block diagonal after a permutation), and the residual :math:`\tilde r = D(x_i - \mu_j)`,
    0 in the missing entries. Then :math:`\log\det\tilde\Sigma = \log\det\Sigma_{OO}` and
    :math:`\tilde r^\top \tilde\Sigma^{-1} \tilde r = r_O^\top \Sigma_{OO}^{-1} r_O`: the
    marginal density of the observed coordinates, exactly. With :math:`\tilde\Sigma = L L^\top`,
    one triangular solve gives :math:`y = L^{-1} \tilde r` and :math:`V = L^{-1} D \Sigma_j`,
    and

    .. math::
        E[x \mid x_O, z = j] = \mu_j + V^\top y, \qquad
        \operatorname{Cov}[x \mid x_O, z = j] = \Sigma_j - V^\top V,

    which are :math:`x_O` and 0 on the observed block and
    :math:`\mu_M + \Sigma_{MO}\Sigma_{OO}^{-1} r_O`,
    :math:`\Sigma_{MM} - \Sigma_{MO}\Sigma_{OO}^{-1}\Sigma_{OM}` on the missing one (the
    observed entries are then set exactly). ``tied`` factorises one matrix per point.
    ``diag``/``spherical`` factorise: the missing coordinates drop out of the density, and
    their conditional mean and variance are the component's own.

    Returns:
      ``(log_joint (n, k), xhat (n, k, d), cond)`` with ``cond`` the conditional covariance
      (n, k, d, d) full, (n, 1, d, d) tied, or its diagonal (n, k, d) diag/spherical; the
      last two are None without ``moments``.
    """
    n, d = x.shape
    means = params.means
    k = means.shape[0]
    missing = 1.0 - observed
    diff = observed[:, None, :] * (x[:, None, :] - means[None, :, :])  # (n, k, d)
    const = jnp.log(params.weights)[None, :] - 0.5 * _LOG_2PI * jnp.sum(observed, axis=1)[:, None]
    if covariance_type in ("diag", "spherical"):
        cov = params.covariances
        var = cov if covariance_type == "diag" else cov[:, None] * jnp.ones((1, d), cov.dtype)
        quad = jnp.sum(diff * diff / var[None, :, :], axis=2)
        lj = const - 0.5 * (observed @ jnp.log(var).T + quad)
        if not moments:
            return lj, None, None
        xhat = observed[:, None, :] * x[:, None, :] + missing[:, None, :] * means[None, :, :]
        return lj, xhat, missing[:, None, :] * var[None, :, :]
    cov = params.covariances if covariance_type == "full" else params.covariances[None]
    kk = cov.shape[0]  # k (full) or 1 (tied)
    eye = jnp.eye(d, dtype=x.dtype)
    outer = observed[:, :, None] * observed[:, None, :]  # (n, d, d)
    sig = outer[:, None] * cov[None] + eye[None, None] * missing[:, None, None, :]
    chol = jnp.linalg.cholesky(sig)  # (n, kk, d, d)
    # The residuals as right-hand sides: (n, k, d, 1) full, (n, 1, d, k) tied.
    res = diff[..., None] if kk == k else jnp.swapaxes(diff, 1, 2)[:, None]
    r = res.shape[-1]
    rhs = res
    if moments:
        rhs = jnp.concatenate([res, observed[:, None, :, None] * cov[None]], axis=-1)
    # One solve for both right-hand sides: two independent LAPACK calls in the fit loop can
    # deadlock jaxlib 0.10.2 on XLA:CPU (issue 13).
    sol = solve_triangular(chol, rhs, lower=True)
    y = sol[..., :r]
    quad = jnp.sum(y * y, axis=2).reshape(n, k)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)  # (n, kk)
    lj = const - 0.5 * (jnp.broadcast_to(logdet, (n, k)) + quad)
    if not moments:
        return lj, None, None
    v = sol[..., r:]
    shift = jnp.moveaxis(jnp.einsum("nkij,nkir->nkjr", v, y), -1, 2).reshape(n, k, d)
    xhat = jnp.where(observed[:, None, :] > 0, x[:, None, :], means[None, :, :] + shift)
    cond = cov[None] - jnp.einsum("nkij,nkil->nkjl", v, v)
    miss_outer = missing[:, :, None] * missing[:, None, :]
    return lj, xhat, _symmetrize(cond * miss_outer[:, None])


def _masked_stats(wr: Array, xhat: Array, cond: Array, covariance_type: str) -> GMMStats:
    """Expected completed statistics from weighted responsibilities ``wr`` (n, k)."""
    d = xhat.shape[-1]
    sums = jnp.einsum("nk,nkd->kd", wr, xhat)
    if covariance_type in ("full", "tied"):
        second = jnp.einsum("nk,nkd,nke->kde", wr, xhat, xhat)
        if covariance_type == "full":
            second = second + jnp.einsum("nk,nkde->kde", wr, cond)
        else:
            second = second + jnp.einsum("nk,nde->kde", wr, cond[:, 0])
        iu, ju, _, _ = _triu(d)
        second = second[:, iu, ju]
    elif covariance_type == "diag":
        second = jnp.einsum("nk,nkd->kd", wr, xhat * xhat + cond)
    else:
        per = jnp.sum(xhat * xhat + cond, axis=2)
        second = jnp.sum(wr * per, axis=0)[:, None]
    return GMMStats(jnp.sum(wr, axis=0), sums, second)


def masked_e_step(
    params: GMMParams,
    data: missing.MaskedData,
    weights: Float[Array, " n"],
    *,
    covariance_type: str,
) -> tuple[GMMStats, Float[Array, ""]]:
    r"""Exact E-step with missing entries: expected *completed* statistics and
    :math:`\sum_i w_i \log p(x_{i,O_i})`.

    With :math:`\hat x_{ij} = E[x_i \mid x_{i,O}, z_i = j]` and :math:`C_{ij}` the
    conditional covariance (:func:`_masked_parts`), :math:`N_j = \sum_i w_i r_{ij}`,
    :math:`s_j = \sum_i w_i r_{ij} \hat x_{ij}` and
    :math:`M_j = \sum_i w_i r_{ij} (\hat x_{ij} \hat x_{ij}^\top + C_{ij})` (its diagonal or
    trace for diag/spherical), the statistics :func:`m_step` takes unchanged. Nothing
    missing gives the statistics of :func:`e_step` (up to rounding).

    Args:
      params: current parameters (in the coordinates of ``data``).
      data: :class:`emvi.missing.MaskedData`, values 0 (any finite value) where missing.
      weights: (n,) point weights.
      covariance_type: the covariance type (static).
    """
    lj, xhat, cond = _masked_parts(
        params, data.values, data.observed, covariance_type, moments=True
    )
    ll = jax.nn.logsumexp(lj, axis=1)
    wr = jax.nn.softmax(lj, axis=1) * weights[:, None]
    return _masked_stats(wr, xhat, cond, covariance_type), jnp.sum(weights * ll)


@functools.cache
def masked_model(covariance_type: str) -> em.ExactModel:
    """The mixture with missing entries as an :class:`emvi.em.ExactModel` (cached).

    ``data`` is an :class:`emvi.missing.MaskedData`; ``log_prob`` is the log density of the
    observed entries, ``posterior`` the responsibilities given them, ``elbo`` the bound on
    that log density. It has no ``expected_stats`` (the completed statistics depend on the
    parameters, not on q alone) and no ``prepare``; the gradient face is :func:`model`'s.

    Example:
      >>> masked_model("diag").expected_stats is None
      True
    """
    ct = _check_type(covariance_type)

    def lj(params, data):
        return _masked_parts(params, data.values, data.observed, ct, moments=False)[0]

    return model(ct)._replace(
        e_step=functools.partial(masked_e_step, covariance_type=ct),
        log_prob=lambda params, data: jax.nn.logsumexp(lj(params, data), axis=1),
        posterior=lambda params, data: jax.nn.softmax(lj(params, data), axis=1),
        elbo=lambda params, q, data: discrete_elbo(lj(params, data), q),
        prepare=None,
        expected_stats=None,
    )


def observed_log_prob(
    params: GMMParams, x: ArrayLike, observed: ArrayLike | None = None, *, covariance_type: str
) -> Float[Array, " n"]:
    r"""Log density of the observed entries of each point, :math:`\log p(x_{i,O_i}) =
    \operatorname{logsumexp}_j [\log\pi_j + \log\mathcal N(x_{i,O} \mid \mu_{j,O},
    \Sigma_{j,OO})]`.

    An entry is missing where ``x`` is NaN or ``observed`` is False (see
    :func:`emvi.missing.check_observed`). With nothing missing this is :func:`log_prob`.

    Raises:
      ValueError: for a bad ``x`` or ``observed`` (wrong shape, a row with every entry
        missing, NaN where observed) or a column count other than the params'.

    Example:
      >>> p = GMMParams(jnp.array([1.0]), jnp.zeros((1, 2)), jnp.eye(2)[None])
      >>> float(observed_log_prob(p, np.array([[0.0, np.nan]]), covariance_type="full")[0])
      -0.918...
    """
    ct = _check_type(covariance_type)
    values, obs = missing.scoring_input(x, observed, lambda v: _check_points(params, v))
    lj, _, _ = _masked_parts(params, values, obs, ct, moments=False)
    return jax.nn.logsumexp(lj, axis=1)


def impute(
    params: GMMParams, x: ArrayLike, observed: ArrayLike | None = None, *, covariance_type: str
) -> Float[Array, "n d"]:
    r"""``x`` with each missing entry replaced by its conditional mean
    :math:`E[x_{i,M} \mid x_{i,O}] = \sum_j r_{ij}\, \big(\mu_{j,M} + \Sigma_{j,MO}
    \Sigma_{j,OO}^{-1} (x_{i,O} - \mu_{j,O})\big)`, with :math:`r_{ij} = p(z_i = j \mid
    x_{i,O})`; observed entries are returned as they are.

    Raises:
      ValueError: as :func:`observed_log_prob`.

    Example:
      >>> cov = jnp.array([[[1.0, 0.5], [0.5, 1.0]]])
      >>> p = GMMParams(jnp.array([1.0]), jnp.zeros((1, 2)), cov)
      >>> out = impute(p, np.array([[2.0, np.nan]]), covariance_type="full")
      >>> [round(v, 4) for v in out[0].tolist()]  # 0.5 * 2 / 1
      [2.0, 1.0]
    """
    ct = _check_type(covariance_type)
    values, obs = missing.scoring_input(x, observed, lambda v: _check_points(params, v))
    lj, xhat, _ = _masked_parts(params, values, obs, ct, moments=True)
    resp = jax.nn.softmax(lj, axis=1)
    return jnp.where(obs > 0, values, jnp.einsum("nk,nkd->nd", resp, xhat))


# ---------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------


def _shift_params(params: GMMParams, shift: Array) -> GMMParams:
    """Moves the means by ``shift`` (d,); works on a batch with leading restart axes."""
    return params._replace(means=params.means + jnp.broadcast_to(shift, params.means.shape))


def _make_hyper(reg_covar, prior: GMMPrior | None, shift: Array, dtype) -> GMMHyper:
    if prior is not None:
        prior = GMMPrior(*(jnp.asarray(a, dtype) for a in prior))
        prior = prior._replace(mean_prior=prior.mean_prior - shift)
    return GMMHyper(jnp.asarray(reg_covar, dtype), prior)


def _centre(x: Array, w: Array) -> tuple[Array, Array]:
    shift = (w @ x) / jnp.sum(w)
    return x - shift[None, :], shift


def _initial_responsibilities(
    key: Array, xc: Array, w: Array, num_components: int, init: str
) -> Array:
    n = xc.shape[0]
    k = num_components
    if init == "random":
        r = jax.random.uniform(key, (n, k), xc.dtype)
        return r / jnp.sum(r, axis=1, keepdims=True)
    if init == "kmeans":
        seeds = kmeans_plusplus_indices(key, xc, k, w)
        mean_var = jnp.mean((w @ (xc * xc)) / jnp.sum(w))
        res = lloyd(xc[seeds], xc, w, max_iter=300, tol=1e-4 * mean_var)
        return jax.nn.one_hot(res.labels, k, dtype=xc.dtype)
    if init == "kmeans++":
        idx = kmeans_plusplus_indices(key, xc, k, w)
    else:
        idx = _random_indices(key, w, k)
    return jnp.zeros((n, k), xc.dtype).at[idx, jnp.arange(k)].set(1.0)


def initial_params(
    key: Key[Array, ""],
    x: Float[Array, "n d"],
    w: Float[Array, " n"],
    hyper: GMMHyper,
    *,
    num_components: int,
    covariance_type: str,
    init: str,
) -> GMMParams:
    """Initial parameters for *centred* data, in its coordinates (jittable).

    The form of :func:`init_params` that takes the weights and a ready :class:`GMMHyper`
    and does no centring (what experiments that centre their data themselves call).
    """
    key = _checks.as_key(key)
    resp = _initial_responsibilities(key, x, w, num_components, init)
    stats = expected_stats(
        resp, prepare(x, covariance_type=covariance_type), w, covariance_type=covariance_type
    )
    return m_step(stats, hyper, covariance_type=covariance_type)


def init_params(
    key: Key[Array, ""],
    x: Float[Array, "n d"],
    num_components: int,
    *,
    covariance_type: str = "full",
    method: str = "kmeans++",
    reg_covar: float | Array = 1e-6,
    sample_weight: Float[Array, " n"] | None = None,
    prior: GMMPrior | None = None,
) -> GMMParams:
    """Initial parameters from initial responsibilities and one M-step (jittable).

    ``method`` as in scikit-learn's ``init_params``: ``"kmeans"`` (one-hot labels of a
    k-means run seeded by k-means++), ``"kmeans++"`` (one-hot on the k-means++ seeds only,
    so each component starts on one point with covariance ``reg_covar``),
    ``"random_from_data"`` (one-hot on k distinct points drawn by weight) or ``"random"``
    (uniform random responsibilities). The M-step runs on the data centred on their
    weighted mean (for accuracy; see the module docstring), and the means are shifted back.
    :func:`fit` makes its ``num_init`` restarts by vmapping this over split keys.

    Args:
      key: typed PRNG key.
      x: data (n, d), in the coordinates the parameters should have.
      num_components: k (static).
      covariance_type: the covariance type (static).
      method: the initialisation (static).
      reg_covar: added to every covariance diagonal.
      sample_weight: optional (n,) non-negative point weights.
      prior: optional :class:`GMMPrior` (the first M-step is then a MAP step).

    Returns:
      One :class:`GMMParams` in the dtype of ``x``.

    Example:
      >>> x = jnp.array([[0.0], [0.1], [5.0], [5.1]])
      >>> p = init_params(jax.random.key(0), x, 2, covariance_type="diag")
      >>> p.means.shape, p.covariances.shape
      ((2, 1), (2, 1))
    """
    key = _checks.as_key(key)
    ct = _check_type(covariance_type)
    check_choice(method, name="method", choices=INITS)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D with shape (num_points, dim); got shape {x.shape}.")
    dtype = x.dtype
    w = jnp.ones(x.shape[0], dtype) if sample_weight is None else sample_weight.astype(dtype)
    xc, shift = _centre(x, w)
    hyper = _make_hyper(reg_covar, prior, shift, dtype)
    p = initial_params(
        key, xc, w, hyper, num_components=num_components, covariance_type=ct, init=method
    )
    return _shift_params(p, shift)


def params_from_responsibilities(
    x: Float[Array, "n d"],
    resp: Float[Array, "n k"],
    *,
    covariance_type: str,
    reg_covar: float | Array = 1e-6,
) -> GMMParams:
    r"""One maximum-likelihood M-step from given responsibilities (one-hot labels, say).

    This is scikit-learn's ``init_params="kmeans"`` start when ``resp`` is the one-hot
    k-means labels: :math:`\pi_j \propto N_j`, :math:`\mu_j = s_j / N_j`, and the
    covariances of :func:`m_step` (with ``reg_covar`` on the diagonal). The statistics are
    taken on the data centred on their mean (for accuracy; see the module docstring) and
    the means shifted back. A component with no responsibility gets ``10 * eps`` mass, as
    in scikit-learn, and starts at the data mean (scikit-learn: the origin).

    Args:
      x: data (n, d).
      resp: responsibilities (n, k), rows summing to 1.
      covariance_type: the covariance type (static).
      reg_covar: added to every covariance diagonal.

    Returns:
      :class:`GMMParams` in the dtype of ``x``.

    Example:
      >>> x = jnp.array([[0.0], [2.0], [10.0]])
      >>> p = params_from_responsibilities(x, jnp.eye(2)[jnp.array([0, 0, 1])],
      ...                                  covariance_type="diag", reg_covar=0.0)
      >>> [round(float(v), 3) for v in (*p.means[:, 0], *p.covariances[:, 0])]
      [1.0, 10.0, 1.0, 0.0]
    """
    ct = _check_type(covariance_type)
    x = jnp.asarray(x)
    resp = jnp.asarray(resp, x.dtype)
    if x.ndim != 2 or resp.ndim != 2 or resp.shape[0] != x.shape[0]:
        raise ValueError(
            f"x (n, d) and resp (n, k) must share n; got shapes {x.shape} and {resp.shape}."
        )
    shift = jnp.mean(x, axis=0)
    data = prepare(x - shift[None, :], covariance_type=ct)
    stats = expected_stats(resp, data, jnp.ones(x.shape[0], x.dtype), covariance_type=ct)
    p = m_step(stats, GMMHyper(jnp.asarray(reg_covar, x.dtype)), covariance_type=ct)
    return _shift_params(p, shift)


def parameter_error(true: GMMParams, fitted: GMMParams) -> dict:
    """How far fitted full-covariance parameters are from the true ones, up to relabelling.

    Fitted components are matched to true ones by the assignment that minimises the summed
    squared distance between means (Hungarian algorithm, ``scipy.optimize``), then compared
    in float64 NumPy.

    Returns:
      ``weights_max_abs_error`` (max_j |w_j - w'_j|), ``means_max_euclidean_error``
      (max_j ||mu_j - mu'_j||), ``covariances_max_relative_frobenius_error`` (max_j
      ||S_j - S'_j||_F / ||S_j||_F) and ``matching``: ``perm`` with fitted component
      ``perm[j]`` matched to true component ``j``.
    """
    from scipy.optimize import linear_sum_assignment

    tw, tm, tc = (np.asarray(a, np.float64) for a in true)
    fw, fm, fc = (np.asarray(a, np.float64) for a in fitted)
    if fc.ndim != 3 or tc.shape != fc.shape:
        raise ValueError(
            "true and fitted must be full-covariance GMMParams of one shape; got covariances"
            f" of shapes {tc.shape} and {fc.shape}."
        )
    _, perm = linear_sum_assignment(((tm[:, None, :] - fm[None, :, :]) ** 2).sum(-1))
    fw, fm, fc = fw[perm], fm[perm], fc[perm]
    rel_cov = np.linalg.norm(fc - tc, axis=(1, 2)) / np.linalg.norm(tc, axis=(1, 2))
    return {
        "weights_max_abs_error": float(np.abs(fw - tw).max()),
        "means_max_euclidean_error": float(np.linalg.norm(fm - tm, axis=1).max()),
        "covariances_max_relative_frobenius_error": float(rel_cov.max()),
        "matching": perm.tolist(),
    }


@functools.partial(jax.jit, static_argnames=("num_components", "covariance_type", "method"))
def _init_batch(keys, x, w, reg_covar, prior, *, num_components, covariance_type, method):
    """``init_params`` vmapped over keys: (r, ...) parameters, one restart per key."""
    return jax.vmap(
        lambda kk: init_params(
            kk,
            x,
            num_components,
            covariance_type=covariance_type,
            method=method,
            reg_covar=reg_covar,
            sample_weight=w,
            prior=prior,
        )
    )(keys)


@functools.partial(jax.jit, static_argnames=("num_components", "covariance_type", "method"))
def _init_batch_labelled(
    keys, x, w, reg_covar, prior, label_probs, labelled, *, num_components, covariance_type, method
):
    """:func:`_init_batch` with partial labels: the initial M-step uses
    :func:`emvi.missing.label_init_responsibilities`, so component j starts as class j."""
    xc, shift = _centre(x, w)
    hyper = _make_hyper(reg_covar, prior, shift, x.dtype)
    data = prepare(xc, covariance_type=covariance_type)

    def one(key):
        resp = _initial_responsibilities(key, xc, w, num_components, method)
        resp = missing.label_init_responsibilities(resp, label_probs, labelled)
        stats = expected_stats(resp, data, w, covariance_type=covariance_type)
        return _shift_params(m_step(stats, hyper, covariance_type=covariance_type), shift)

    return jax.vmap(one)(keys)


# ---------------------------------------------------------------------------------------
# Fitting: centre, run the one driver (emvi.em.fit), shift back
# ---------------------------------------------------------------------------------------


@jax.jit
def _centre_jit(x, w):
    return _centre(x, w)


def _fit_batch(p0, x, w, tol, reg_covar, prior, *, covariance_type, max_iter, chunk_size):
    """Centres the data on their weighted mean, shifts the restart batch ``p0`` (leading axis
    r) and the prior with them, runs :func:`emvi.em.fit` and shifts the result back.

    The driver does not know about centring (``prepare`` sees neither the weights nor the
    parameters), so it is done around it here. Jittable and vmappable.
    """
    dtype = x.dtype
    xc, shift = _centre_jit(x, w)
    hyper = _make_hyper(reg_covar, prior, shift, dtype)
    res = em.fit(
        model(covariance_type),
        _shift_params(p0, -shift),
        xc,
        w,
        max_iter=max_iter,
        tol=tol,
        hyper=hyper,
        chunk_size=chunk_size,
    )
    return res._replace(params=_shift_params(res.params, shift))


def _fit_batch_missing(
    p0, x, observed, w, tol, reg_covar, prior, *, covariance_type, max_iter, chunk_size
):
    """:func:`_fit_batch` for data with missing entries (``observed`` (n, d) of 0/1): the data
    are centred on the weighted means of their observed entries, 0 put in the missing ones,
    and the one driver runs :func:`masked_model`."""
    dtype = x.dtype
    shift = missing.column_means(x, observed, w)
    xc = observed * (x - shift[None, :])
    hyper = _make_hyper(reg_covar, prior, shift, dtype)
    res = em.fit(
        masked_model(covariance_type),
        _shift_params(p0, -shift),
        missing.MaskedData(xc, observed),
        w,
        max_iter=max_iter,
        tol=tol,
        hyper=hyper,
        chunk_size=chunk_size,
    )
    return res._replace(params=_shift_params(res.params, shift))


def _fit_batch_labelled(
    p0, x, labels, w, tol, reg_covar, prior, *, covariance_type, max_iter, chunk_size
):
    """:func:`_fit_batch` with partial labels (an :class:`emvi.missing.LabelledData` whose
    ``data`` is unused): the driver runs :func:`emvi.missing.fixed_responsibilities` of
    :func:`model`."""
    dtype = x.dtype
    xc, shift = _centre_jit(x, w)
    hyper = _make_hyper(reg_covar, prior, shift, dtype)
    res = em.fit(
        missing.fixed_responsibilities(model(covariance_type)),
        _shift_params(p0, -shift),
        labels._replace(data=xc),
        w,
        max_iter=max_iter,
        tol=tol,
        hyper=hyper,
        chunk_size=chunk_size,
    )
    return res._replace(params=_shift_params(res.params, shift))


def _fit_from_params(
    params: GMMParams,
    x: Float[Array, "n d"],
    *,
    covariance_type: str = "full",
    max_iter: int = 100,
    tol: float | Array = 1e-3,
    reg_covar: float | Array = 1e-6,
    sample_weight: Float[Array, " n"] | None = None,
    prior: GMMPrior | None = None,
    chunk_size: int | None = None,
) -> GMMFit:
    r"""Runs EM from given parameters: the jittable, vmappable core of :func:`fit`.

    No validation (use :func:`fit` for that). The data are centred on their weighted mean,
    the parameters (and the prior mean) shifted with them, EM runs on device through the
    one driver :func:`emvi.em.fit` (packed half-steps), and the result is shifted back. To
    fit a batch of datasets or of initialisations in one call, ``jax.vmap`` it.

    Args:
      params: initial :class:`GMMParams` (valid: normalised weights, PD covariances).
      x: data (n, d).
      covariance_type: static.
      max_iter: the most iterations (static).
      tol: stop when the mean log-likelihood changes by less (0: run ``max_iter``).
      reg_covar: added to every covariance diagonal.
      sample_weight: optional (n,) non-negative weights.
      prior: optional :class:`GMMPrior` for MAP-EM.
      chunk_size: run the E-step over chunks of this many points (static).

    Returns:
      A :class:`emvi.em.FitResult` (``restart_log_likelihoods`` has one entry).

    Example:
      >>> x = jnp.array([[0.0], [0.2], [5.0], [5.2]])
      >>> p0 = GMMParams(jnp.array([0.5, 0.5]), jnp.array([[1.0], [4.0]]), jnp.ones(2))
      >>> res = fit_from_params(p0, x, covariance_type="spherical", max_iter=20)
      >>> [round(float(m), 2) for m in res.params.means[:, 0]]
      [0.1, 5.1]
    """
    dtype = x.dtype
    w = jnp.ones(x.shape[0], dtype) if sample_weight is None else sample_weight.astype(dtype)
    p0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype)[None], GMMParams(*params))
    return _fit_batch(
        p0,
        x,
        w,
        jnp.asarray(tol, dtype),
        jnp.asarray(reg_covar, dtype),
        prior,
        covariance_type=covariance_type,
        max_iter=max_iter,
        chunk_size=chunk_size,
    )


fit_from_params = jax.jit(
    _fit_from_params, static_argnames=("covariance_type", "max_iter", "chunk_size")
)


# ---------------------------------------------------------------------------------------
# Eager validation
# ---------------------------------------------------------------------------------------


def _check_params(params: Any, k: int, d: int, covariance_type: str, dtype) -> GMMParams:
    if not isinstance(params, GMMParams):
        raise ValueError(f"init must be one of {list(INITS)} or a GMMParams; got {params!r}.")
    weights, means, cov = (np.asarray(a, np.float64) for a in params)
    cov_shape = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[
        covariance_type
    ]
    for name, arr, shape in (
        ("weights", weights, (k,)),
        ("means", means, (k, d)),
        ("covariances", cov, cov_shape),
    ):
        if arr.shape != shape:
            raise ValueError(
                f"init.{name} must have shape {shape} for {k} components in {d} dimensions "
                f"with covariance_type={covariance_type!r}; got {arr.shape}."
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"init.{name} contains NaN or inf.")
    if np.any(weights < 0):
        raise ValueError("init.weights must be non-negative.")
    tol = max(1e-6, 100 * float(np.finfo(dtype).eps))
    if abs(weights.sum() - 1.0) > tol:
        raise ValueError(f"init.weights must sum to 1; they sum to {weights.sum():.8g}.")
    if covariance_type in ("full", "tied"):
        mats = cov.reshape(-1, d, d)
        if not np.allclose(mats, np.swapaxes(mats, 1, 2), rtol=1e-6, atol=0):
            raise ValueError("init.covariances must be symmetric.")
        try:
            np.linalg.cholesky(mats)
        except np.linalg.LinAlgError:
            raise ValueError("init.covariances must be positive definite.") from None
    elif np.any(cov <= 0):
        raise ValueError("init.covariances must be positive (variances > 0).")
    return GMMParams(
        jnp.asarray(weights / weights.sum(), dtype),
        jnp.asarray(means, dtype),
        jnp.asarray(cov, dtype),
    )


def _check_prior(prior: Any, k: int, d: int, covariance_type: str, dtype) -> GMMPrior:
    if not isinstance(prior, GMMPrior):
        raise ValueError(f"prior must be a GMMPrior or None; got {type(prior).__name__}.")
    alpha, m0, kappa, psi, nu = (np.asarray(a, np.float64) for a in prior)
    for name, arr in zip(GMMPrior._fields, (alpha, m0, kappa, psi, nu), strict=True):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"prior.{name} contains NaN or inf.")
    if alpha.shape not in ((), (k,)) or np.any(alpha < 1):
        raise ValueError(
            f"prior.weight_concentration must be a scalar or shape ({k},) with every entry "
            f">= 1 (below 1 the MAP weights can be negative); got {alpha}."
        )
    if m0.shape != (d,):
        raise ValueError(f"prior.mean_prior must have shape ({d},); got {m0.shape}.")
    if kappa.shape != () or kappa < 0:
        raise ValueError(f"prior.mean_precision must be a scalar >= 0; got {kappa}.")
    if covariance_type in ("full", "tied"):
        if psi.shape != (d, d):
            raise ValueError(f"prior.covariance_prior must have shape ({d}, {d}); got {psi.shape}.")
        try:
            np.linalg.cholesky(psi)
        except np.linalg.LinAlgError:
            raise ValueError("prior.covariance_prior must be positive definite.") from None
        if nu.shape != () or nu <= d - 1:
            raise ValueError(f"prior.degrees_of_freedom must be a scalar > d - 1 = {d - 1}.")
    else:
        shape = (d,) if covariance_type == "diag" else ()
        if psi.shape != shape or np.any(psi <= 0):
            raise ValueError(
                f"prior.covariance_prior must be positive with shape {shape} for "
                f"covariance_type={covariance_type!r}; got shape {psi.shape}."
            )
        if nu.shape != () or nu <= 0:
            raise ValueError("prior.degrees_of_freedom must be a scalar > 0.")
    return GMMPrior(*(jnp.asarray(a, dtype) for a in (alpha, m0, kappa, psi, nu)))


def fit(
    key: Key[Array, ""],
    x: ArrayLike,
    num_components: int,
    *,
    covariance_type: str = "full",
    init: str | GMMParams = "kmeans++",
    prior: GMMPrior | None = None,
    sample_weight: ArrayLike | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    num_init: int = 1,
    chunk_size: int | None = None,
    reg_covar: float = 1e-6,
    observed: ArrayLike | None = None,
    labels: ArrayLike | None = None,
) -> GMMFit:
    r"""Fits a Gaussian mixture by EM (or MAP-EM with ``prior``), validating inputs eagerly.

    A thin call of the one driver: the ``num_init`` initialisations are :func:`init_params`
    vmapped over split keys, and :func:`emvi.em.fit` runs them as one vmapped program on
    device and keeps the best (highest final log-likelihood; with a prior, highest log
    posterior). The data are centred on their weighted mean around the driver (the packed
    half-steps of the module docstring want it) and the result is shifted back.

    Args:
      key: typed PRNG key (for the initialisation).
      x: data (n, d); float32 in gives float32 out.
      num_components: k, 1 <= k <= n.
      covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
      init: ``"kmeans++"``, ``"kmeans"``, ``"random"``, ``"random_from_data"`` (see
        :func:`init_params`) or a :class:`GMMParams` to start from (then every restart
        would be the same, so one run is made and its value reported for each).
      prior: optional :class:`GMMPrior` for MAP-EM.
      sample_weight: optional (n,) non-negative weights, not all zero.
      max_iter: the most EM iterations (>= 1).
      tol: stop when the mean log-likelihood per point changes by less than this (>= 0;
        0 runs exactly ``max_iter`` iterations).
      num_init: number of restarts (>= 1).
      chunk_size: run the E-step over chunks of this many points to bound memory.
      reg_covar: non-negative value added to every covariance diagonal (not a prior: see
        :func:`log_prior`).
      observed: optional (n, d) boolean mask, False where an entry of ``x`` is missing.
        Missing entries (there, and wherever ``x`` is NaN) are marginalised exactly
        (:func:`masked_e_step`); the result is then the maximum of the likelihood of the
        observed entries, ``log_likelihood`` its mean per point, and the initialisation
        sees the missing entries filled with the observed column means. With nothing
        missing (no NaN, ``observed`` all True) the fit is the ordinary one, bit for bit.
      labels: optional partial labels for semi-supervised EM: integers (n,) with the
        component of each labelled point and -1 elsewhere, or (n, k) floats with a
        distribution over components per labelled row and all-NaN rows elsewhere
        (:func:`emvi.missing.check_labels`). Labelled points keep those responsibilities;
        ``log_likelihood`` is then the objective of :mod:`emvi.missing` per point. The
        initial M-step puts the labelled points in their components
        (:func:`emvi.missing.label_init_responsibilities`), so component j is class j. Not
        combined with missing entries.

    Returns:
      An :class:`emvi.em.FitResult` (also named :data:`GMMFit`).

    Raises:
      ValueError: with a sentence saying what is wrong, for non-finite or non-2-D ``x``,
        ``num_components`` outside [1, n], negative ``tol`` or ``reg_covar``,
        ``max_iter`` or ``num_init`` < 1, unknown ``covariance_type`` or ``init``, bad
        ``sample_weight``, malformed ``init`` parameters (shapes, dimension, weights not
        summing to one, covariances not positive definite) or a malformed ``prior``.

    Example:
      >>> x = jnp.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.3]])
      >>> res = fit(jax.random.key(0), x, 2, covariance_type="diag")
      >>> res.params.weights.shape
      (2,)
    """
    key = _checks.as_key(key)
    covariance_type = _check_type(covariance_type)
    x_np, mask = missing.check_observed(x, observed)
    n, d = x_np.shape
    dtype = x_np.dtype
    num_components = check_positive_int(num_components, name="num_components")
    if num_components > n:
        raise ValueError(
            f"num_components={num_components} is larger than the number of points ({n})."
        )
    max_iter, tol, num_init, chunk_size = check_em_settings(
        max_iter=max_iter, tol=tol, num_init=num_init, chunk_size=chunk_size
    )
    reg_covar = check_nonnegative(reg_covar, name="reg_covar")
    w = check_sample_weight(sample_weight, n)
    lab = missing.check_labels(labels, n, num_components, dtype)
    if mask is not None:
        if lab is not None:
            raise ValueError("labels cannot be combined with missing entries in x (yet).")
        wts = np.ones(n) if w is None else w
        obs_w = wts[:, None] * mask
        if np.any(obs_w.sum(axis=0) <= 0):
            raise ValueError("x has a column whose observed entries all have weight 0.")
        col_mean = (obs_w * x_np).sum(axis=0) / obs_w.sum(axis=0)
        x_np = np.where(mask, x_np, col_mean.astype(dtype)).astype(dtype)
    start = None
    if isinstance(init, str):
        check_choice(init, name="init", choices=INITS)
    else:
        if isinstance(init, GMMParams):
            init_d = np.shape(init.means)[-1] if np.ndim(init.means) == 2 else None
            if init_d is not None and init_d != d:
                raise ValueError(
                    f"init.means has dimension {init_d} but the data have {d} columns."
                )
            init_k = np.shape(init.weights)[0] if np.ndim(init.weights) == 1 else None
            if init_k is not None and init_k != num_components:
                raise ValueError(
                    f"init has {init_k} components but num_components={num_components}."
                )
        start = _check_params(init, num_components, d, covariance_type, dtype)
    if prior is not None:
        prior = _check_prior(prior, num_components, d, covariance_type, dtype)
    if reg_covar == 0 and prior is None and not np.any(np.ptp(x_np, axis=0) > 0):
        raise ValueError(
            "x has no variance in any column, so with reg_covar=0 every covariance would "
            "be singular; use reg_covar > 0 or a prior."
        )
    xj = jnp.asarray(x_np)
    wj = jnp.ones(n, dtype) if w is None else jnp.asarray(w, dtype)
    reg = jnp.asarray(reg_covar, dtype)
    if start is not None:
        p0 = jax.tree_util.tree_map(lambda a: a[None], start)
    else:
        keys = jax.random.split(key, num_init)
        init_kw = dict(num_components=num_components, covariance_type=covariance_type, method=init)
        if lab is None:
            p0 = _init_batch(keys, xj, wj, reg, prior, **init_kw)
        else:
            p0 = _init_batch_labelled(
                keys, xj, wj, reg, prior, lab.label_probs, lab.labelled, **init_kw
            )
    settings = dict(covariance_type=covariance_type, max_iter=max_iter, chunk_size=chunk_size)
    if mask is not None:
        obs = jnp.asarray(mask, dtype)
        res = _fit_batch_missing(p0, xj, obs, wj, jnp.asarray(tol, dtype), reg, prior, **settings)
    elif lab is not None:
        res = _fit_batch_labelled(p0, xj, lab, wj, jnp.asarray(tol, dtype), reg, prior, **settings)
    else:
        res = _fit_batch(
            p0,
            xj,
            wj,
            jnp.asarray(tol, dtype),
            reg,
            prior,
            covariance_type=covariance_type,
            max_iter=max_iter,
            chunk_size=chunk_size,
        )
    return res._replace(
        restart_log_likelihoods=jnp.broadcast_to(res.restart_log_likelihoods, (num_init,))
    )
