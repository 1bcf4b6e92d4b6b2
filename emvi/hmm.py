r"""Hidden Markov models fitted by exact EM (Baum-Welch), on the one model protocol.

The model, for a sequence :math:`x_{1:T}` with hidden states :math:`z_t \in \{1..k\}`:

.. math::
    p(z_1 = j) = \pi_j, \qquad p(z_t = j \mid z_{t-1} = i) = A_{ij}, \qquad
    p(x_t \mid z_t = j) = b_j(x_t),

with the emission :math:`b_j` a Gaussian (:class:`Gaussian`, all four covariance types of
:mod:`emvi.gmm`), a categorical (:class:`Categorical`), a product of Bernoullis
(:class:`Bernoulli`, the components of :mod:`emvi.bernoulli_mixture`), a product of
Poissons (:class:`Poisson`) or a Gaussian mixture per state (:class:`GaussianMixture`,
the GMM-HMM).

**In the grid.** Besides the exact face, the model has a q bijection: a chain-structured
:math:`q(z_{1:T})` given by per-step unary and pairwise log-potentials, normalised exactly
by forward-backward (:func:`chain_posterior`), so its ELBO is exact; a
:class:`ChainEncoder` outputs those potentials (the amortized E-step), a free array of them
per sequence is the local one (:func:`make_batch` builds the grid's batch).

**E-step** (forward-backward, in log space). With :math:`\ell_t(j) = \log b_j(x_t)`, the
filtered marginals :math:`\hat\alpha_t(j) = p(z_t = j \mid x_{1:t})` and the one-step
normalisers :math:`c_t = p(x_t \mid x_{1:t-1})` obey

.. math::
    \log \hat\alpha_t(j) = \operatorname{logsumexp}_i\big(\log\hat\alpha_{t-1}(i)
        + \log A_{ij}\big) + \ell_t(j) - \log c_t, \qquad \log p(x_{1:T}) = \sum_t \log c_t,

and the backward messages :math:`\beta_t(i) \propto p(x_{t+1:T} \mid z_t = i)` obey
:math:`\log\beta_t(i) = \operatorname{logsumexp}_j(\log A_{ij} + \ell_{t+1}(j) +
\log\beta_{t+1}(j))` (each normalised to its logsumexp; only ratios matter). Then

.. math::
    \gamma_t(j) = \operatorname{softmax}_j\big(\log\hat\alpha_t(j) + \log\beta_t(j)\big),
    \qquad \xi_t(i, j) = \operatorname{softmax}_{ij}\big(\log\hat\alpha_t(i) + \log A_{ij}
        + \ell_{t+1}(j) + \log\beta_{t+1}(j)\big),

the posterior marginals and pairwise marginals, each normalised per step (so no message
needs to be normalised exactly). The summed expected statistics (:class:`HMMStats`) are
:math:`\sum_n w_n \gamma^{(n)}_1`, :math:`\sum_n w_n \sum_t \xi^{(n)}_t` and the
*emission's mixture statistics with* :math:`w_n \gamma^{(n)}_t` *as responsibilities*:
the Gaussian emission calls :func:`emvi.gmm.expected_stats` / :func:`emvi.gmm.m_step`, the
Bernoulli emission :func:`emvi.bernoulli_mixture.expected_stats` / ``m_step``.

Two implementations of the messages give the same numbers (to rounding):

* ``parallel=False``: two ``lax.scan`` over time (depth T).
* ``parallel=True``: the associative scan of Särkkä and García-Fernández (2021; for HMMs
  Hassan, Särkkä and García-Fernández, 2021): with elements
  :math:`E_1(i, j) = \log\pi_j + \ell_1(j)`, :math:`E_t(i, j) = \log A_{ij} + \ell_t(j)`,
  the log-semiring matrix product :math:`(X \otimes Y)_{ik} = \operatorname{logsumexp}_j
  (X_{ij} + Y_{jk})` is associative, the prefix products give
  :math:`\log p(x_{1:t}, z_t)` and the suffix products :math:`\log p(x_{t+1:T} \mid z_t)`;
  ``lax.associative_scan`` computes them in depth O(log T) with O(T k^3) work (against
  O(T k^2) sequentially: the parallel form pays off on an accelerator, not on a CPU).
  Each element carries its log-scale separately so the matrices stay near 0.

**Ragged batches.** Sequences are padded to a common length T and described by ``lengths``
(a mask); a padded step contributes nothing (the identity element of the scan; emission and
transition statistics are masked). Nothing loops over sequences in Python.

**M-step** (:func:`m_step`): with Dirichlet priors :math:`\pi \sim \mathrm{Dir}(\alpha)`,
:math:`A_{i\cdot} \sim \mathrm{Dir}(\alpha^A_{i\cdot})` (entries >= 1; 1 is maximum
likelihood), :math:`\pi_j \propto N^1_j + \alpha_j - 1` and
:math:`A_{ij} \propto \Xi_{ij} + \alpha^A_{ij} - 1`; a state that is never left (a zero
row) gets a uniform row. The emission parameters are the mixture's M-step (with its own
prior: :class:`emvi.gmm.GMMHyper`, :class:`emvi.bernoulli_mixture.BernoulliMixturePrior`,
a Dirichlet for categorical, a Gamma for Poisson).

Shape letters: ``n`` sequences, ``t`` time steps (padded length), ``k`` states, ``d`` data
dim, ``m`` symbols (categorical), ``r`` restarts.

Example:
  >>> key = jax.random.key(0)
  >>> p = HMMParams(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
  ...               GaussianParams(jnp.array([[-2.0], [2.0]]), jnp.ones((2, 1))))
  >>> x, z = sample(key, p, 4, 50, emission=Gaussian("diag"))
  >>> res = fit(jax.random.key(1), x, 2, emission=Gaussian("diag"), max_iter=30)
  >>> sorted(round(float(m), 0) for m in res.params.emission.means[:, 0])
  [-2.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.scipy.special import gammaln, xlogy
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Key

from emvi import _checks, em, estep, gmm
from emvi import bernoulli_mixture as bm
from emvi import nn as emvi_nn

PyTree = Any

# ---------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------


class HMMParams(NamedTuple):
    """Parameters of an HMM.

    Attributes:
      initial: (k,) :math:`\\pi`, the distribution of the first state.
      transition: (k, k) :math:`A`, rows sum to one (row = from, column = to).
      emission: the emission's parameters (:class:`GaussianParams`,
        :class:`CategoricalParams`, :class:`BernoulliParams`, :class:`PoissonParams`).
    """

    initial: Float[Array, " k"]
    transition: Float[Array, "k k"]
    emission: PyTree


class HMMStats(NamedTuple):
    """Expected sufficient statistics summed over (weighted) sequences.

    Attributes:
      initial: (k,) :math:`\\sum_n w_n \\gamma^{(n)}_1`.
      transition: (k, k) :math:`\\sum_n w_n \\sum_{t} \\xi^{(n)}_t`.
      emission: the emission mixture's statistics with responsibilities
        :math:`w_n \\gamma^{(n)}_t` over every valid step.
    """

    initial: Float[Array, " k"]
    transition: Float[Array, "k k"]
    emission: PyTree


class HMMHyper(NamedTuple):
    """Array-valued hyperparameters of the M-step (the ``hyper`` of the driver).

    Attributes:
      initial_concentration: Dirichlet concentration on :math:`\\pi`, scalar or (k,), >= 1.
      transition_concentration: Dirichlet concentration on each row of :math:`A`: scalar,
        (k,) (the same for every row) or (k, k); >= 1. A large diagonal makes states sticky.
      emission: the emission's hyperparameters (see each emission class), or None.
    """

    initial_concentration: Float[Array, "..."] | float = 1.0
    transition_concentration: Float[Array, "..."] | float = 1.0
    emission: PyTree = None


class HMMSequences(NamedTuple):
    """A padded batch of sequences, what the :class:`~emvi.em.ExactModel` is given.

    Attributes:
      x: (n, t, ...) observations, padded after each sequence's end (any finite filler).
      mask: (n, t) True on valid steps; every row is a prefix (True then False).
    """

    x: Array
    mask: Bool[Array, "n t"]


class HMMData(NamedTuple):
    """Prepared sequences: the emission's prepared observations, leading axes (n, t)."""

    obs: PyTree
    mask: Bool[Array, "n t"]


class HMMPosterior(NamedTuple):
    """The exact posterior of a chain, by its marginals (the ``q`` of the protocol).

    Attributes:
      marginals: (n, t, k) :math:`\\gamma_t(j) = p(z_t = j \\mid x_{1:T})`; 0 on padded steps.
      pairwise: (n, t - 1, k, k) :math:`\\xi_t(i, j) = p(z_t = i, z_{t+1} = j \\mid x_{1:T})`;
        0 where step t + 1 is padded.
    """

    marginals: Float[Array, "n t k"]
    pairwise: Float[Array, "n s k k"]


class Messages(NamedTuple):
    """Forward-backward messages (log space, each normalised per step).

    Attributes:
      log_filtered: (n, t, k) :math:`\\log p(z_t \\mid x_{1:t})`.
      log_backward: (n, t, k) :math:`\\log\\beta_t`, up to a constant per step.
      log_likelihood: (n,) :math:`\\log p(x_{1:T_n})`.
    """

    log_filtered: Float[Array, "n t k"]
    log_backward: Float[Array, "n t k"]
    log_likelihood: Float[Array, " n"]


# ---------------------------------------------------------------------------------------
# Emissions: each one reuses a mixture of emvi (its statistics, M-step and densities)
# ---------------------------------------------------------------------------------------


class GaussianParams(NamedTuple):
    """Gaussian emission parameters, in :mod:`emvi.gmm`'s covariance layout.

    Attributes:
      means: (k, d).
      covariances: (k, d, d) full, (d, d) tied, (k, d) diag, (k,) spherical.
    """

    means: Float[Array, "k d"]
    covariances: Float[Array, "..."]


class GaussianObs(NamedTuple):
    """Prepared Gaussian observations: the points and :func:`emvi.gmm.prepare`'s features."""

    x: Array
    features: Array


class CategoricalParams(NamedTuple):
    """Categorical emission: ``probs`` (k, m), rows sum to one."""

    probs: Float[Array, "k m"]


class CategoricalPrior(NamedTuple):
    """Dirichlet concentration on each emission row (scalar or (k, m), >= 1)."""

    concentration: Float[Array, "..."] | float = 1.0


class BernoulliParams(NamedTuple):
    """Bernoulli emission: ``probs`` (k, d), :math:`p(x_c = 1 \\mid z = j)`."""

    probs: Float[Array, "k d"]


class PoissonParams(NamedTuple):
    """Poisson emission: ``rates`` (k, d), independent counts per coordinate."""

    rates: Float[Array, "k d"]


class PoissonPrior(NamedTuple):
    """Gamma(a, b) prior on every rate (shape a >= 1, rate b >= 0; a=1, b=0 is ML)."""

    a: Float[Array, ""] | float = 1.0
    b: Float[Array, ""] | float = 0.0


def _ones_like_states(a: Array) -> Array:
    return jnp.ones(a.shape[:1], a.dtype)


def _pick_points(key: Array, w: Array, k: int) -> Array:
    """k distinct indices drawn with probability proportional to ``w`` (padding has w=0)."""
    g = jax.random.gumbel(key, w.shape, w.dtype)
    score = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) + g, -jnp.inf)
    return lax.top_k(score, k)[1]


class _NoCentring:
    """What emissions without a location share: the data are not centred (no shift of the
    parameters or prior) and there is no default prior."""

    def responsibilities(self, p, obs, q):
        return q

    def shift(self, p, shift):
        return p

    def shift_hyper(self, hyper, shift):
        return hyper

    def default_hyper(self, dtype, reg_covar: float):
        return None


def _check_rows(arr: np.ndarray, name: str, k: int, d: int) -> None:
    """Checks an emission parameter of shape (k, d) against the states and the data."""
    if arr.ndim != 2 or arr.shape[0] != k:
        raise ValueError(f"init.emission.{name} must have shape ({k}, {d}); got {arr.shape}.")
    if arr.shape[1] != d:
        raise ValueError(
            f"init.emission.{name} has dimension {arr.shape[1]} but the data have {d}."
        )


def _check_sequences_of_vectors(x: np.ndarray, kind: str) -> np.ndarray:
    """(num_sequences, length, dim) float data for vector emissions (NaN kept for padding)."""
    if x.ndim != 3:
        raise ValueError(
            f"x must have shape (num_sequences, length, dim) for {kind} emissions; got "
            f"shape {x.shape}."
        )
    return _float_array(x)


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Gaussian emissions, the components of :mod:`emvi.gmm`.

    ``hyper`` is an :class:`emvi.gmm.GMMHyper` (``reg_covar`` and an optional
    :class:`emvi.gmm.GMMPrior`, whose weight concentration is unused here).
    """

    covariance_type: str = "full"

    def __post_init__(self):
        _checks.check_choice(
            self.covariance_type, name="covariance_type", choices=gmm.COVARIANCE_TYPES
        )

    event_ndim = 1

    def _gmm(self, p: GaussianParams) -> gmm.GMMParams:
        return gmm.GMMParams(_ones_like_states(p.means), p.means, p.covariances)

    def prepare(self, x: Array) -> GaussianObs:
        return GaussianObs(x, gmm.prepare(x, covariance_type=self.covariance_type).features)

    def log_likelihood(self, p: GaussianParams, obs: GaussianObs) -> Array:
        return gmm.log_joint(self._gmm(p), obs.x, covariance_type=self.covariance_type)

    def expected_stats(self, q: Array, obs: GaussianObs, w: Array) -> gmm.GMMStats:
        return gmm.expected_stats(
            q, gmm.GMMData(obs.features), w, covariance_type=self.covariance_type
        )

    def m_step(self, stats: gmm.GMMStats, hyper) -> GaussianParams:
        new = gmm.m_step(stats, hyper, covariance_type=self.covariance_type)
        return GaussianParams(new.means, new.covariances)

    def log_prior(self, p: GaussianParams, hyper) -> Array:
        return gmm.log_prior(self._gmm(p), hyper, covariance_type=self.covariance_type)

    def sample(self, key: Array, p: GaussianParams, z: Array) -> Array:
        d = p.means.shape[1]
        eps = jax.random.normal(key, (*z.shape, d), p.means.dtype)
        cov = p.covariances
        ct = self.covariance_type
        if ct == "full":
            noise = jnp.einsum("...ij,...j->...i", jnp.linalg.cholesky(cov)[z], eps)
        elif ct == "tied":
            noise = eps @ jnp.linalg.cholesky(cov).T
        elif ct == "diag":
            noise = jnp.sqrt(cov)[z] * eps
        else:
            noise = jnp.sqrt(cov)[z][..., None] * eps
        return p.means[z] + noise

    def init(self, key: Array, x: Array, w: Array, k: int, hyper) -> GaussianParams:
        """k-means (seeded by k-means++ on the valid steps) labels, then one M-step."""
        p = gmm.initial_params(
            key, x, w, hyper, num_components=k, covariance_type=self.covariance_type, init="kmeans"
        )
        return GaussianParams(p.means, p.covariances)

    def to_unconstrained(self, p: GaussianParams) -> GaussianParams:
        u = gmm.to_unconstrained(self._gmm(p), covariance_type=self.covariance_type)
        return GaussianParams(u.means, u.covariances)

    def from_unconstrained(self, u: GaussianParams) -> GaussianParams:
        raw = gmm.GMMParams(jnp.zeros(u.means.shape[:1], u.means.dtype), u.means, u.covariances)
        p = gmm.from_unconstrained(raw, covariance_type=self.covariance_type)
        return GaussianParams(p.means, p.covariances)

    def responsibilities(self, p, obs: GaussianObs, q: Array) -> Array:
        """The responsibilities the mixture statistics take: the state marginals q (N, k)."""
        return q

    def shift(self, p: GaussianParams, shift: Array) -> GaussianParams:
        return p._replace(means=p.means + shift[None, :])

    def shift_hyper(self, hyper, shift: Array):
        if hyper is None or hyper.prior is None:
            return hyper
        return hyper._replace(prior=hyper.prior._replace(mean_prior=hyper.prior.mean_prior + shift))

    def default_hyper(self, dtype, reg_covar: float):
        return gmm.GMMHyper(jnp.asarray(reg_covar, dtype))

    def check_params(self, p: Any, k: int, d: int, dtype) -> GaussianParams:
        if not isinstance(p, GaussianParams):
            raise ValueError(f"init.emission must be a GaussianParams; got {type(p).__name__}.")
        means = np.asarray(p.means, np.float64)
        if means.ndim != 2 or means.shape[0] != k:
            raise ValueError(f"init.emission.means must have shape ({k}, {d}); got {means.shape}.")
        if means.shape[1] != d:
            raise ValueError(
                f"init.emission.means has dimension {means.shape[1]} but the data have {d}."
            )
        checked = gmm._check_params(
            gmm.GMMParams(np.full(k, 1.0 / k), means, p.covariances),
            k,
            d,
            self.covariance_type,
            dtype,
        )
        return GaussianParams(checked.means, checked.covariances)

    def check_data(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 3:
            raise ValueError(
                f"x must have shape (num_sequences, length, dim) for Gaussian emissions; "
                f"got shape {x.shape}."
            )
        return _float_array(x)


class GaussianMixtureParams(NamedTuple):
    """Gaussian-mixture emission parameters: M components per state.

    Attributes:
      weights: (k, M) :math:`c_{jm}`, rows sum to one.
      means: (k, M, d).
      covariances: (k, M, d, d) full, (k, d, d) tied (one :math:`\\Sigma_j` per state,
        shared by its M components), (k, M, d) diag, (k, M) spherical.
    """

    weights: Float[Array, "k mix"]
    means: Float[Array, "k mix d"]
    covariances: Float[Array, "..."]


@dataclasses.dataclass(frozen=True)
class GaussianMixture(Gaussian):
    r"""Gaussian-mixture emissions (GMM-HMM): :math:`b_j(x) = \sum_m c_{jm}
    \mathcal N(x; \mu_{jm}, \Sigma_{jm})`, M = ``num_mix`` components per state.

    The k·M components are one :mod:`emvi.gmm` mixture: the densities are
    :func:`emvi.gmm.log_joint`, and the statistics are :func:`emvi.gmm.expected_stats` with
    the responsibilities :math:`\gamma_t(j)\, r_t(j, m)`, the state marginal times the
    within-state component responsibility :math:`r_t(j, m) = c_{jm}\mathcal N(x_t;
    \mu_{jm}, \Sigma_{jm}) / b_j(x_t)` (:meth:`responsibilities`), so the M-step is
    :func:`emvi.gmm.m_step` (means, covariances, ``reg_covar``) with the weights renormalised
    within each state, :math:`c_{jm} = N_{jm} / \sum_{m'} N_{jm'}`. Covariance types:
    ``"full"``, ``"diag"``, ``"spherical"`` (per component) and ``"tied"``, hmmlearn's
    ``GMMHMM`` tied type: the M components of state j share one full :math:`\Sigma_j`
    (covariances (k, d, d)). Its M-step is :func:`emvi.gmm.m_step`'s tied type applied to
    each state's M components (vmapped over states): with the scatter
    :math:`S_{jm} = M_{jm} - \tilde N_{jm} \bar x_{jm} \bar x_{jm}^\top` of component (j, m)
    about its new mean,

    .. math::
        \Sigma_j = \frac{\sum_m S_{jm}}{\sum_m \tilde N_{jm}} + \lambda I, \qquad
        \Sigma_j = \frac{\Psi_0 + \sum_m (S_{jm} + \rho_{jm} \delta_{jm} \delta_{jm}^\top)}
            {\nu_0 + \sum_m \tilde N_{jm} + M + d + 1} + \lambda I \;(\text{MAP}),

    the MAP form for :math:`\Sigma_j \sim \mathcal{IW}(\Psi_0, \nu_0)` per state and
    :math:`\mu_{jm} \mid \Sigma_j \sim \mathcal N(m_0, \Sigma_j / \kappa_0)` (the notation of
    :mod:`emvi.gmm`). The densities, sampling and the bijection treat a tied state as M full
    components with the same covariance. ``hyper`` is an :class:`emvi.gmm.GMMHyper`; its
    prior's weight concentration is unused (the weights are maximum likelihood).

    Those statistics depend on the parameters (through r), so the model has no
    ``expected_stats`` for an arbitrary chain q: the exact E-step and both M-steps after it
    (EM, generalised EM) are available, the closed M-step after a local or amortized q is not.
    """

    num_mix: int = 2

    def __post_init__(self):
        super().__post_init__()
        _checks.check_positive_int(self.num_mix, name="num_mix")

    @property
    def _flat_type(self) -> str:
        """The :mod:`emvi.gmm` covariance type of the k·M flat components (a tied state's
        components are full ones with the same covariance)."""
        return "full" if self.covariance_type == "tied" else self.covariance_type

    def _flat(self, p: GaussianMixtureParams) -> gmm.GMMParams:
        k, m = p.weights.shape
        if self.covariance_type == "tied":
            cov = jnp.repeat(p.covariances, m, axis=0)  # (k·M, d, d)
        else:
            cov = p.covariances.reshape(k * m, *p.covariances.shape[2:])
        return gmm.GMMParams(p.weights.reshape(-1), p.means.reshape(k * m, -1), cov)

    def _unflat(self, g: gmm.GMMParams, weights: Array) -> GaussianMixtureParams:
        k, m = weights.shape
        cov = g.covariances.reshape(k, m, *g.covariances.shape[1:])
        if self.covariance_type == "tied":
            cov = cov[:, 0]  # the M copies of a state's covariance are one
        return GaussianMixtureParams(weights, g.means.reshape(k, m, -1), cov)

    def _log_joint(self, p: GaussianMixtureParams, obs: GaussianObs) -> Array:
        """(N, k, M) :math:`\\log c_{jm} + \\log \\mathcal N(x; \\mu_{jm}, \\Sigma_{jm})`."""
        lj = gmm.log_joint(self._flat(p), obs.x, covariance_type=self._flat_type)
        return lj.reshape(lj.shape[0], *p.weights.shape)

    def log_likelihood(self, p: GaussianMixtureParams, obs: GaussianObs) -> Array:
        return jax.nn.logsumexp(self._log_joint(p, obs), axis=-1)

    def responsibilities(self, p: GaussianMixtureParams, obs: GaussianObs, q: Array) -> Array:
        """(N, k·M) :math:`\\gamma_t(j) r_t(j, m)` from the state marginals q (N, k)."""
        r = jax.nn.softmax(self._log_joint(p, obs), axis=-1)
        return (q[:, :, None] * r).reshape(q.shape[0], -1)

    def _component_hyper(self, hyper):
        """``hyper`` without the prior's weight concentration (the weights are maximum
        likelihood here; a (k,) concentration would not broadcast to k·M or M components)."""
        if hyper is None or hyper.prior is None:
            return hyper
        return hyper._replace(prior=hyper.prior._replace(weight_concentration=1.0))

    def _per_state(self, tree):
        """Splits the leading k·M axis of every leaf into (k, M)."""
        return jax.tree_util.tree_map(lambda a: a.reshape(-1, self.num_mix, *a.shape[1:]), tree)

    def m_step(self, stats: gmm.GMMStats, hyper) -> GaussianMixtureParams:
        hyper = self._component_hyper(hyper)
        weights = _normalise_rows(stats.counts.reshape(-1, self.num_mix))
        if self.covariance_type == "tied":
            new = jax.vmap(lambda s: gmm.m_step(s, hyper, covariance_type="tied"))(
                self._per_state(stats)
            )
            return GaussianMixtureParams(weights, new.means, new.covariances)
        new = gmm.m_step(stats, hyper, covariance_type=self.covariance_type)
        return self._unflat(new, weights)

    def log_prior(self, p: GaussianMixtureParams, hyper) -> Array:
        hyper = self._component_hyper(hyper)
        ones = jnp.ones_like(p.weights)
        if self.covariance_type == "tied":
            per_state = jax.vmap(
                lambda w, mu, cov: gmm.log_prior(
                    gmm.GMMParams(w, mu, cov), hyper, covariance_type="tied"
                )
            )(ones, p.means, p.covariances)
            return jnp.sum(per_state)
        flat = self._flat(p)._replace(weights=ones.reshape(-1))
        return gmm.log_prior(flat, hyper, covariance_type=self.covariance_type)

    def sample(self, key: Array, p: GaussianMixtureParams, z: Array) -> Array:
        key_m, key_x = jax.random.split(key)
        comp = jax.random.categorical(key_m, jnp.log(p.weights)[z])
        flat = self._flat(p)
        gauss = Gaussian(self._flat_type)
        return gauss.sample(
            key_x, GaussianParams(flat.means, flat.covariances), z * self.num_mix + comp
        )

    def init(self, key: Array, x: Array, w: Array, k: int, hyper) -> GaussianMixtureParams:
        """k·M k-means clusters of the valid steps, M to a state, then one M-step (a tied
        state pools its M clusters' scatters); uniform weights."""
        key = _checks.as_key(key)
        resp = gmm._initial_responsibilities(key, x, w, k * self.num_mix, "kmeans")
        p = self.m_step(self.expected_stats(resp, self.prepare(x), w), hyper)
        return p._replace(weights=jnp.full((k, self.num_mix), 1.0 / self.num_mix, x.dtype))

    def to_unconstrained(self, p: GaussianMixtureParams) -> GaussianMixtureParams:
        u = gmm.to_unconstrained(self._flat(p), covariance_type=self._flat_type)
        return self._unflat(u, jnp.log(p.weights))

    def from_unconstrained(self, u: GaussianMixtureParams) -> GaussianMixtureParams:
        p = gmm.from_unconstrained(self._flat(u), covariance_type=self._flat_type)
        return self._unflat(p, jax.nn.softmax(u.weights, axis=-1))

    def shift(self, p: GaussianMixtureParams, shift: Array) -> GaussianMixtureParams:
        return p._replace(means=p.means + shift[None, None, :])

    def check_params(self, p: Any, k: int, d: int, dtype) -> GaussianMixtureParams:
        if not isinstance(p, GaussianMixtureParams):
            raise ValueError(
                f"init.emission must be a GaussianMixtureParams; got {type(p).__name__}."
            )
        m = self.num_mix
        weights = np.asarray(p.weights, np.float64)
        means = np.asarray(p.means, np.float64)
        cov = np.asarray(p.covariances, np.float64)
        if weights.shape != (k, m):
            raise ValueError(
                f"init.emission.weights must have shape ({k}, {m}); got {weights.shape}."
            )
        _check_stochastic(weights, "init.emission.weights", dtype)
        if means.ndim != 3 or means.shape[:2] != (k, m):
            raise ValueError(
                f"init.emission.means must have shape ({k}, {m}, {d}); got {means.shape}."
            )
        if means.shape[2] != d:
            raise ValueError(
                f"init.emission.means has dimension {means.shape[2]} but the data have {d}."
            )
        cov_shape = {
            "full": (k, m, d, d),
            "tied": (k, d, d),
            "diag": (k, m, d),
            "spherical": (k, m),
        }
        if cov.shape != cov_shape[self.covariance_type]:
            raise ValueError(
                f"init.emission.covariances must have shape {cov_shape[self.covariance_type]} "
                f"for {k} states of {m} components in {d} dimensions with "
                f"covariance_type={self.covariance_type!r}; got {cov.shape}."
            )
        flat = self._flat(GaussianMixtureParams(weights / k, means, cov))
        checked = gmm._check_params(flat, k * m, d, self._flat_type, dtype)
        return self._unflat(checked, jnp.asarray(weights, dtype))


def _float_array(x: np.ndarray) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if x.dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        x = x.astype(np.float32)
    return x


def _normalise_rows(num: Array) -> Array:
    """Rows divided by their sums; a row that sums to 0 becomes uniform."""
    tot = jnp.sum(num, axis=-1, keepdims=True)
    m = num.shape[-1]
    return jnp.where(tot > 0, num / jnp.where(tot > 0, tot, 1.0), 1.0 / m)


@dataclasses.dataclass(frozen=True)
class Categorical(_NoCentring):
    """Categorical emissions over ``num_symbols`` symbols; x holds integer symbols (n, t).

    ``hyper`` is a :class:`CategoricalPrior` (or None: maximum likelihood). The statistics
    are :func:`emvi.bernoulli_mixture.expected_stats` of the one-hot symbols (the expected
    count of each symbol in each state).
    """

    num_symbols: int

    event_ndim = 0

    def prepare(self, x: Array) -> Array:
        return x

    def log_likelihood(self, p: CategoricalParams, obs: Array) -> Array:
        # log B[j, x] by a gather (a matmul with one-hot rows would turn 0 * log 0 into NaN).
        return jnp.log(p.probs).T[obs]

    def expected_stats(self, q: Array, obs: Array, w: Array) -> bm.BernoulliMixtureStats:
        return bm.expected_stats(q, jax.nn.one_hot(obs, self.num_symbols, dtype=q.dtype), w)

    def m_step(self, stats: bm.BernoulliMixtureStats, hyper) -> CategoricalParams:
        conc = 1.0 if hyper is None else jnp.asarray(hyper.concentration, stats.sum_x.dtype)
        return CategoricalParams(_normalise_rows(jnp.maximum(stats.sum_x + conc - 1.0, 0.0)))

    def log_prior(self, p: CategoricalParams, hyper) -> Array:
        if hyper is None:
            return jnp.zeros((), p.probs.dtype)
        conc = jnp.asarray(hyper.concentration, p.probs.dtype)
        return jnp.sum(xlogy(jnp.broadcast_to(conc - 1.0, p.probs.shape), p.probs))

    def sample(self, key: Array, p: CategoricalParams, z: Array) -> Array:
        return jax.random.categorical(key, jnp.log(p.probs)[z])

    def init(self, key: Array, x: Array, w: Array, k: int, hyper) -> CategoricalParams:
        """Rows drawn uniformly on the simplex (hmmlearn draws uniform entries, normalised)."""
        e = jax.random.exponential(key, (k, self.num_symbols), w.dtype)
        return CategoricalParams(e / jnp.sum(e, axis=1, keepdims=True))

    def to_unconstrained(self, p: CategoricalParams) -> CategoricalParams:
        return CategoricalParams(jnp.log(p.probs))

    def from_unconstrained(self, u: CategoricalParams) -> CategoricalParams:
        return CategoricalParams(jax.nn.softmax(u.probs, axis=-1))

    def check_params(self, p: Any, k: int, d: int, dtype) -> CategoricalParams:
        if not isinstance(p, CategoricalParams):
            raise ValueError(f"init.emission must be a CategoricalParams; got {type(p).__name__}.")
        probs = np.asarray(p.probs, np.float64)
        if probs.shape != (k, self.num_symbols):
            raise ValueError(
                f"init.emission.probs must have shape ({k}, {self.num_symbols}); got {probs.shape}."
            )
        _check_stochastic(probs, "init.emission.probs", dtype)
        return CategoricalParams(jnp.asarray(probs, dtype))

    def check_data(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2:
            raise ValueError(
                f"x must have shape (num_sequences, length) of integer symbols for categorical "
                f"emissions; got shape {x.shape}."
            )
        if np.issubdtype(x.dtype, np.floating):
            if not np.all(np.isfinite(x)):
                raise ValueError("x contains NaN or inf.")
            if np.any(x != np.round(x)):
                raise ValueError("x must hold integer symbols for categorical emissions.")
        elif not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"x must hold integer symbols; got dtype {x.dtype}.")
        return x.astype(np.int32)


def _default_float():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


@dataclasses.dataclass(frozen=True)
class Bernoulli(_NoCentring):
    """Binary-vector emissions, the components of :mod:`emvi.bernoulli_mixture`.

    ``hyper`` is a :class:`emvi.bernoulli_mixture.BernoulliMixturePrior` (its ``alpha`` is
    unused here) or None (maximum likelihood).
    """

    event_ndim = 1

    def _bm(self, p: BernoulliParams) -> bm.BernoulliMixtureParams:
        return bm.BernoulliMixtureParams(_ones_like_states(p.probs), p.probs)

    def prepare(self, x: Array) -> Array:
        return x

    def log_likelihood(self, p: BernoulliParams, obs: Array) -> Array:
        return bm.log_joint(self._bm(p), obs)

    def expected_stats(self, q: Array, obs: Array, w: Array) -> bm.BernoulliMixtureStats:
        return bm.expected_stats(q, obs, w)

    def m_step(self, stats: bm.BernoulliMixtureStats, hyper) -> BernoulliParams:
        return BernoulliParams(bm.m_step(stats, hyper).probs)

    def log_prior(self, p: BernoulliParams, hyper) -> Array:
        if hyper is None:
            return jnp.zeros((), p.probs.dtype)
        flat = hyper._replace(alpha=1.0)
        return bm.log_prior(self._bm(p), flat)

    def sample(self, key: Array, p: BernoulliParams, z: Array) -> Array:
        return jax.random.bernoulli(key, p.probs[z]).astype(p.probs.dtype)

    def init(self, key: Array, x: Array, w: Array, k: int, hyper) -> BernoulliParams:
        """k distinct valid steps, smoothed halfway to 1/2 (as the Bernoulli mixture)."""
        idx = _pick_points(key, w, k)
        return BernoulliParams(0.25 + 0.5 * x[idx])

    def to_unconstrained(self, p: BernoulliParams) -> BernoulliParams:
        return BernoulliParams(bm.to_unconstrained(self._bm(p)).probs)

    def from_unconstrained(self, u: BernoulliParams) -> BernoulliParams:
        return BernoulliParams(bm.from_unconstrained(self._bm(u)).probs)

    def check_params(self, p: Any, k: int, d: int, dtype) -> BernoulliParams:
        if not isinstance(p, BernoulliParams):
            raise ValueError(f"init.emission must be a BernoulliParams; got {type(p).__name__}.")
        probs = np.asarray(p.probs, np.float64)
        _check_rows(probs, "probs", k, d)
        if not np.all(np.isfinite(probs)) or np.any(probs < 0) or np.any(probs > 1):
            raise ValueError("init.emission.probs must be probabilities in [0, 1].")
        return BernoulliParams(jnp.asarray(probs, dtype))

    def check_data(self, x: np.ndarray) -> np.ndarray:
        x = _check_sequences_of_vectors(x, "Bernoulli")
        finite = x[np.isfinite(x)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise ValueError("x must hold values in [0, 1] for Bernoulli emissions.")
        return x


@dataclasses.dataclass(frozen=True)
class Poisson(_NoCentring):
    r"""Count emissions, :math:`x_c \sim \mathrm{Poisson}(\lambda_{jc})` independently.

    The statistics are the Bernoulli mixture's (:math:`N_j = \sum q_j`,
    :math:`S_{jc} = \sum q_j x_c`, :func:`emvi.bernoulli_mixture.expected_stats`); the
    M-step with a Gamma(a, b) prior is :math:`\lambda_{jc} = (S_{jc} + a - 1) / (N_j + b)`
    (``hyper`` a :class:`PoissonPrior` or None).
    """

    event_ndim = 1

    def prepare(self, x: Array) -> Array:
        return x

    def log_likelihood(self, p: PoissonParams, obs: Array) -> Array:
        lam = p.rates
        return (
            xlogy(obs[:, None, :], lam[None]).sum(-1)
            - jnp.sum(lam, axis=1)[None]
            - jnp.sum(gammaln(obs + 1.0), axis=1, keepdims=True)
        )

    def expected_stats(self, q: Array, obs: Array, w: Array) -> bm.BernoulliMixtureStats:
        return bm.expected_stats(q, obs, w)

    def m_step(self, stats: bm.BernoulliMixtureStats, hyper) -> PoissonParams:
        hyper = PoissonPrior() if hyper is None else hyper
        dtype = stats.sum_x.dtype
        a, b = jnp.asarray(hyper.a, dtype), jnp.asarray(hyper.b, dtype)
        den = stats.counts + b
        pooled = jnp.sum(stats.sum_x, axis=0) / jnp.maximum(jnp.sum(stats.counts), 1e-300)
        has = den > 0
        rates = jnp.where(
            has[:, None], (stats.sum_x + a - 1.0) / jnp.where(has, den, 1.0)[:, None], pooled
        )
        return PoissonParams(jnp.maximum(rates, 0.0))

    def log_prior(self, p: PoissonParams, hyper) -> Array:
        if hyper is None:
            return jnp.zeros((), p.rates.dtype)
        dtype = p.rates.dtype
        a, b = jnp.asarray(hyper.a, dtype), jnp.asarray(hyper.b, dtype)
        return jnp.sum(xlogy(a - 1.0, p.rates) - b * p.rates)

    def sample(self, key: Array, p: PoissonParams, z: Array) -> Array:
        return jax.random.poisson(key, p.rates[z]).astype(p.rates.dtype)

    def init(self, key: Array, x: Array, w: Array, k: int, hyper) -> PoissonParams:
        """k distinct valid steps, averaged with the overall mean (so no rate is 0)."""
        idx = _pick_points(key, w, k)
        mean = (w @ x) / jnp.sum(w)
        return PoissonParams(0.5 * x[idx] + 0.5 * mean[None, :] + 1e-3)

    def to_unconstrained(self, p: PoissonParams) -> PoissonParams:
        return PoissonParams(jnp.log(p.rates))

    def from_unconstrained(self, u: PoissonParams) -> PoissonParams:
        return PoissonParams(jnp.exp(u.rates))

    def check_params(self, p: Any, k: int, d: int, dtype) -> PoissonParams:
        if not isinstance(p, PoissonParams):
            raise ValueError(f"init.emission must be a PoissonParams; got {type(p).__name__}.")
        rates = np.asarray(p.rates, np.float64)
        _check_rows(rates, "rates", k, d)
        if not np.all(np.isfinite(rates)) or np.any(rates <= 0):
            raise ValueError("init.emission.rates must be positive.")
        return PoissonParams(jnp.asarray(rates, dtype))

    def check_data(self, x: np.ndarray) -> np.ndarray:
        x = _check_sequences_of_vectors(x, "Poisson")
        finite = x[np.isfinite(x)]
        if finite.size and (finite.min() < 0 or np.any(finite != np.round(finite))):
            raise ValueError("x must hold non-negative integer counts for Poisson emissions.")
        return x


EMISSIONS = {
    "gaussian": Gaussian,
    "categorical": Categorical,
    "bernoulli": Bernoulli,
    "poisson": Poisson,
}


# ---------------------------------------------------------------------------------------
# Messages: sequential and parallel
# ---------------------------------------------------------------------------------------


def _log_matmul(x: Array, y: Array, semiring: str) -> Array:
    """(..., k, k) x (..., k, k) in the log (logsumexp) or max-plus semiring."""
    s = x[..., :, :, None] + y[..., None, :, :]
    if semiring == "max":
        return jnp.max(s, axis=-2)
    return jax.nn.logsumexp(s, axis=-2)


def _reduce(v: Array, axis, semiring: str) -> Array:
    if semiring == "max":
        return jnp.max(v, axis=axis)
    return jax.nn.logsumexp(v, axis=axis)


def _log_identity(k: int, dtype) -> Array:
    return jnp.where(jnp.eye(k, dtype=bool), 0.0, -jnp.inf).astype(dtype)


# Time steps per iteration of the sequential scans' loops. Each step's work is a few small
# ops on (n, k) arrays, so on a CPU the loop's own per-iteration cost rivals it; measured
# (forward-backward, float64, 2-core CPU, shared): 100 sequences x T = 1000, K = 10: 325 ms
# at 1, 165 ms at 2, 174 ms at 4, 207 ms at 8; one sequence T = 100,000, K = 25: 1728, 1036,
# 707 and 804 ms.
_UNROLL = 4


def _forward_sequential(log_pi, log_a, lb, mask):
    """Filtered log-marginals (n, t, k) and log-likelihoods (n,) by a ``lax.scan``."""
    lb_t = jnp.swapaxes(lb, 0, 1)  # (t, n, k)
    m_t = mask.T
    k = log_pi.shape[0]
    a0 = log_pi[None, :] + lb_t[0]
    c0 = jax.nn.logsumexp(a0, axis=1)
    alpha0 = _normalise_log(a0, c0, k)

    a_mat = jnp.exp(log_a)

    def step(carry, inp):
        alpha, ll = carry
        lbt, mt = inp
        pred = _log_matvec(alpha, a_mat, left=True)
        a = pred + lbt
        c = jax.nn.logsumexp(a, axis=1)
        new = _normalise_log(a, c, k)
        alpha = jnp.where(mt[:, None], new, alpha)
        ll = ll + jnp.where(mt, c, 0.0)
        return (alpha, ll), alpha

    (_, ll), alphas = lax.scan(step, (alpha0, c0), (lb_t[1:], m_t[1:]), unroll=_UNROLL)
    alphas = jnp.concatenate([alpha0[None], alphas], axis=0)
    return jnp.swapaxes(alphas, 0, 1), ll


def _row_max(v: Array) -> Array:
    """(n, k) -> (n, 1) row maxima, 0 for a row that is -inf everywhere (so v - max is -inf,
    not NaN)."""
    m = jnp.max(v, axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _log_matvec(v: Array, a_mat: Array, *, left: bool) -> Array:
    r"""Log of a matrix-vector product from log vectors, one matmul instead of k^2 exps.

    ``left``: :math:`\log \sum_i e^{v_i} A_{ij}`; else :math:`\log \sum_j A_{ij} e^{v_j}`,
    computed as :math:`m + \log(e^{v - m} A)` with :math:`m = \max_i v_i`. Exact to rounding
    whenever the largest term is representable: the term of :math:`i^* = rg\max v` is
    :math:`A_{i^* j}`, so the result can only underflow to -inf where every :math:`A_{ij}
    e^{v_i - m}` is below the dtype's smallest normal number (about 1e-308 in float64, 1e-38
    in float32), i.e. where the state is unreachable to that precision anyway.
    """
    m = _row_max(v)
    e = jnp.exp(v - m)
    prod = e @ a_mat if left else e @ a_mat.T
    return jnp.log(prod) + m


def _normalise_log(a: Array, c: Array, k: int) -> Array:
    """a - c, or uniform where the step is impossible (c = -inf), so nothing goes NaN."""
    ok = jnp.isfinite(c)[:, None]
    return jnp.where(ok, a - jnp.where(ok, c[:, None], 0.0), -math.log(k))


def _backward_sequential(log_a, lb, mask):
    """Backward log-messages (n, t, k), normalised per step, by a reversed ``lax.scan``."""
    lb_t = jnp.swapaxes(lb, 0, 1)
    m_t = mask.T
    n, k = lb_t.shape[1], lb_t.shape[2]
    last = jnp.zeros((n, k), lb.dtype)

    a_mat = jnp.exp(log_a)

    def step(beta_next, inp):
        lb_next, m_next = inp
        b = _normalise(_log_matvec(lb_next + beta_next, a_mat, left=False))
        beta = jnp.where(m_next[:, None], b, 0.0)
        return beta, beta

    _, betas = lax.scan(step, last, (lb_t[1:], m_t[1:]), reverse=True, unroll=_UNROLL)
    betas = jnp.concatenate([betas, last[None]], axis=0)
    return jnp.swapaxes(betas, 0, 1)


def _forward_backward_sequential(log_pi, log_a, lb, mask):
    """Both passes in one ``lax.scan``: step s runs the forward recursion at time s and the
    backward one at time t - 1 - s (they are independent), halving the loop's overhead.
    Returns the outputs of :func:`_forward_sequential` and :func:`_backward_sequential`."""
    lb_t = jnp.swapaxes(lb, 0, 1)  # (t, n, k)
    m_t = mask.T
    n, k = lb_t.shape[1], lb_t.shape[2]
    a_mat = jnp.exp(log_a)
    a0 = log_pi[None, :] + lb_t[0]
    c0 = jax.nn.logsumexp(a0, axis=1)
    alpha0 = _normalise_log(a0, c0, k)
    beta_last = jnp.zeros((n, k), lb.dtype)

    def step(carry, inp):
        alpha, ll, beta_next = carry
        lbt, mt, lb_next, m_next = inp
        a = _log_matvec(alpha, a_mat, left=True) + lbt
        c = jax.nn.logsumexp(a, axis=1)
        alpha = jnp.where(mt[:, None], _normalise_log(a, c, k), alpha)
        ll = ll + jnp.where(mt, c, 0.0)
        b = _normalise(_log_matvec(lb_next + beta_next, a_mat, left=False))
        beta = jnp.where(m_next[:, None], b, 0.0)
        return (alpha, ll, beta), (alpha, beta)

    rev = (lb_t[1:][::-1], m_t[1:][::-1])
    (_, ll, _), (alphas, betas) = lax.scan(
        step, (alpha0, c0, beta_last), (lb_t[1:], m_t[1:], *rev), unroll=_UNROLL
    )
    alphas = jnp.concatenate([alpha0[None], alphas], axis=0)
    betas = jnp.concatenate([betas[::-1], beta_last[None]], axis=0)
    return jnp.swapaxes(alphas, 0, 1), jnp.swapaxes(betas, 0, 1), ll


def _scan_elements(log_pi, log_a, lb, mask):
    """(n, t, k, k) elements of the forward scan; identity on padded steps."""
    n, _t, k = lb.shape
    trans = log_a[None, None] + lb[:, :, None, :]
    first = jnp.broadcast_to((log_pi[None, None, :] + lb[:, :1, :])[:, :, None, :], (n, 1, k, k))
    elems = jnp.concatenate([first, trans[:, 1:]], axis=1)
    return jnp.where(mask[:, :, None, None], elems, _log_identity(k, lb.dtype))


def _combine(semiring: str):
    """The associative operator on (log-matrix, log-scale) pairs: a ⊗ b, rescaled."""

    def op(a, b):
        (ma, sa), (mb, sb) = a, b
        m = _log_matmul(ma, mb, semiring)
        top = jnp.max(m, axis=(-2, -1))
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        return m - top[..., None, None], sa + sb + top

    return op


def _parallel_messages(log_pi, log_a, lb, mask, semiring: str = "log"):
    """Forward values (n, t, k) (up to a constant per step), backward values (n, t, k) (up to
    a constant per step) and the total (n,) by two ``lax.associative_scan`` (depth O(log t))."""
    n, t, k = lb.shape
    op = _combine(semiring)
    elems = _scan_elements(log_pi, log_a, lb, mask)
    scale = jnp.zeros((n, t), lb.dtype)
    fwd, fwd_s = lax.associative_scan(op, (elems, scale), axis=1)
    alpha = fwd[:, :, 0, :]  # every row of the first element is the same
    total = _reduce(alpha[:, -1, :], -1, semiring) + fwd_s[:, -1]
    # Backward: suffix products of the elements of steps 2..t, closed by a vector of zeros.
    closing = jnp.broadcast_to(_log_identity(k, lb.dtype), (n, 1, k, k))
    back_elems = jnp.concatenate([elems[:, 1:], closing], axis=1)
    rev_op = lambda a, b: op(b, a)
    suf, _ = lax.associative_scan(rev_op, (back_elems, scale), axis=1, reverse=True)
    beta = _reduce(suf, -1, semiring)
    return alpha, beta, total


def _normalise(v: Array) -> Array:
    return v - _row_max(v)


def messages(
    params: HMMParams,
    log_lik: Float[Array, "n t k"],
    mask: Bool[Array, "n t"],
    *,
    parallel: bool = False,
) -> Messages:
    r"""Forward-backward messages from the emission log-likelihoods.

    Args:
      params: the HMM (its emission part is not used here).
      log_lik: (n, t, k) :math:`\log b_j(x_t)` (anything on padded steps: it is masked).
      mask: (n, t) valid steps.
      parallel: use the associative scan (O(log t) depth) instead of ``lax.scan``.

    Returns:
      :class:`Messages`.
    """
    log_pi = jnp.log(params.initial)
    log_a = jnp.log(params.transition)
    lb = jnp.where(mask[:, :, None], log_lik, 0.0)
    if parallel:
        alpha, beta, ll = _parallel_messages(log_pi, log_a, lb, mask)
        k = log_pi.shape[0]
        c = jax.nn.logsumexp(alpha, axis=-1)
        ok = jnp.isfinite(c)[..., None]
        log_f = jnp.where(ok, alpha - jnp.where(ok, c[..., None], 0.0), -math.log(k))
        return Messages(log_f, _normalise(beta), ll)
    log_f, log_b, ll = _forward_backward_sequential(log_pi, log_a, lb, mask)
    return Messages(log_f, log_b, ll)


def _pairwise_logits(log_f, log_b, log_a, lb):
    """(..., k, k) unnormalised log xi for consecutive steps (t, t+1)."""
    right = lb[:, 1:] + log_b[:, 1:]
    return log_f[:, :-1, :, None] + log_a[None, None] + right[:, :, None, :]


def _softmax2(v: Array) -> Array:
    sh = v.shape
    return jax.nn.softmax(v.reshape(*sh[:-2], -1), axis=-1).reshape(sh)


def _transition_counts(log_f, log_b, log_a, lb, w_pair) -> Array:
    r""":math:`\sum_{n, t} w_{n,t} \xi^{(n)}_t` as one matmul.

    With :math:`u = \log\hat\alpha_t`, :math:`v = \ell_{t+1} + \log\beta_{t+1}`, each
    shifted by its maximum, :math:`\xi_t = e^{u} (e^{v})^\top \odot A / Z_t` with
    :math:`Z_t = (e^u)^\top A e^v \ge A_{i^* j^*}` (the term of the two maxima), so

    .. math::
        \sum_t w_t \xi_t = A \odot \big(E_u^\top \operatorname{diag}(w / Z) E_v\big),

    2 k exps per step instead of k^2. A step whose :math:`Z_t` underflows (possible only if
    :math:`A_{i^* j^*}` is below the smallest normal number) contributes nothing rather than NaN.
    """
    k = log_f.shape[-1]
    if log_f.shape[1] < 2:
        return jnp.zeros((k, k), log_f.dtype)
    a_mat = jnp.exp(log_a)
    u = log_f[:, :-1].reshape(-1, k)
    v = (lb[:, 1:] + log_b[:, 1:]).reshape(-1, k)
    eu = jnp.exp(u - _row_max(u))
    ev = jnp.exp(v - _row_max(v))
    z = jnp.sum((eu @ a_mat) * ev, axis=1)
    ok = z > 0
    scale = jnp.where(ok, w_pair.reshape(-1) / jnp.where(ok, z, 1.0), 0.0)
    return a_mat * ((eu * scale[:, None]).T @ ev)


# ---------------------------------------------------------------------------------------
# The exact face
# ---------------------------------------------------------------------------------------


def _flat(tree: PyTree, lead: int = 2) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[lead:]), tree)


def emission_log_likelihood(params: HMMParams, data: HMMData, *, emission) -> Float[Array, "n t k"]:
    """(n, t, k) :math:`\\log b_j(x_t)` from the emission's mixture density."""
    n, t = data.mask.shape
    ll = emission.log_likelihood(params.emission, _flat(data.obs))
    return ll.reshape(n, t, -1)


def prepare(seqs: HMMSequences, *, emission) -> HMMData:
    """The emission's ``prepare`` on every step (leading axes (n, t) kept)."""
    n, t = seqs.mask.shape
    obs = emission.prepare(_flat(seqs.x))
    obs = jax.tree_util.tree_map(lambda a: a.reshape(n, t, *a.shape[1:]), obs)
    return HMMData(obs, seqs.mask)


def _smooth(params, data, emission, parallel):
    lb = emission_log_likelihood(params, data, emission=emission)
    lb = jnp.where(data.mask[:, :, None], lb, 0.0)
    msg = messages(params, lb, data.mask, parallel=parallel)
    gamma = jax.nn.softmax(msg.log_filtered + msg.log_backward, axis=-1)
    gamma = gamma * data.mask[:, :, None].astype(gamma.dtype)
    return lb, msg, gamma


def e_step(
    params: HMMParams,
    data: HMMData,
    weights: Float[Array, " n"],
    *,
    emission,
    parallel: bool = False,
) -> tuple[HMMStats, Float[Array, ""]]:
    r"""Exact E-step: summed expected statistics and :math:`\sum_n w_n \log p(x^{(n)})`.

    The emission statistics are the mixture's ``expected_stats`` with responsibilities
    :math:`\gamma_t` over all (n, t) steps and weights :math:`w_n` on valid steps.
    """
    lb, msg, gamma = _smooth(params, data, emission, parallel)
    dtype = gamma.dtype
    w = weights.astype(dtype)
    step_w = w[:, None] * data.mask.astype(dtype)
    initial = w @ gamma[:, 0]
    pair_w = step_w[:, 1:]
    trans = _transition_counts(
        msg.log_filtered, msg.log_backward, jnp.log(params.transition), lb, pair_w
    )
    k = gamma.shape[-1]
    obs = _flat(data.obs)
    resp = emission.responsibilities(params.emission, obs, gamma.reshape(-1, k))
    em_stats = emission.expected_stats(resp, obs, step_w.reshape(-1))
    # a zero-weight sequence may be impossible under the model (log p = -inf): it adds 0
    ll = jnp.sum(jnp.where(w > 0, w * msg.log_likelihood, 0.0))
    return HMMStats(initial, trans, em_stats), ll


@functools.partial(jax.jit, static_argnames=("emission", "parallel"))
def posterior(
    params: HMMParams, data: HMMData, *, emission, parallel: bool = False
) -> HMMPosterior:
    """Posterior marginals and pairwise marginals of every sequence (see :class:`HMMPosterior`)."""
    lb, msg, gamma = _smooth(params, data, emission, parallel)
    xi = _softmax2(
        _pairwise_logits(msg.log_filtered, msg.log_backward, jnp.log(params.transition), lb)
    )
    xi = xi * data.mask[:, 1:, None, None].astype(xi.dtype)
    return HMMPosterior(gamma, xi)


@functools.partial(jax.jit, static_argnames=("emission", "parallel"))
def log_prob(params: HMMParams, data: HMMData, *, emission, parallel: bool = False) -> Array:
    """(n,) :math:`\\log p(x^{(n)}_{1:T_n})` (the forward pass only)."""
    lb = emission_log_likelihood(params, data, emission=emission)
    lb = jnp.where(data.mask[:, :, None], lb, 0.0)
    if parallel:
        _, _, ll = _parallel_messages(
            jnp.log(params.initial), jnp.log(params.transition), lb, data.mask
        )
        return ll
    _, ll = _forward_sequential(jnp.log(params.initial), jnp.log(params.transition), lb, data.mask)
    return ll


def expected_stats(q: HMMPosterior, data: HMMData, weights: Float[Array, " n"], *, emission):
    """The statistics :func:`e_step` returns, for an arbitrary chain ``q`` (its marginals).

    Raises:
      ValueError: for :class:`GaussianMixture` emissions, whose statistics also need the
        within-state component responsibilities (parameter-dependent; see :func:`e_step`).
    """
    if isinstance(emission, GaussianMixture):
        raise ValueError(
            "expected_stats needs the component responsibilities of GaussianMixture "
            "emissions, which depend on the parameters; use e_step(params, data, weights)."
        )
    dtype = q.marginals.dtype
    w = weights.astype(dtype)
    step_w = w[:, None] * data.mask.astype(dtype)
    k = q.marginals.shape[-1]
    initial = w @ q.marginals[:, 0]
    trans = jnp.einsum("ns,nsij->ij", step_w[:, 1:], q.pairwise)
    em_stats = emission.expected_stats(
        q.marginals.reshape(-1, k), _flat(data.obs), step_w.reshape(-1)
    )
    return HMMStats(initial, trans, em_stats)


def elbo(params: HMMParams, q: HMMPosterior, data: HMMData, *, emission) -> Array:
    r"""(n,) :math:`E_q[\log p(x, z)] + H(q)` for a chain-structured q given by its marginals.

    .. math::
        H(q) = -\sum_i \gamma_1(i)\log\gamma_1(i)
            - \sum_{t}\sum_{ij} \xi_t(i,j) \log\frac{\xi_t(i,j)}{\gamma_t(i)},

    exact for any Markov chain q (its entropy is that of the first state plus the
    conditional entropies). Equals :func:`log_prob` at the exact posterior.
    """
    m = data.mask.astype(q.marginals.dtype)
    lb = emission_log_likelihood(params, data, emission=emission)
    g, xi = q.marginals, q.pairwise
    e_emit = jnp.sum(jnp.sum(xlogy_safe(g, lb), axis=-1) * m, axis=-1)
    e_init = jnp.sum(xlogy(g[:, 0], params.initial[None]), axis=-1)
    e_trans = jnp.sum(xlogy(xi, params.transition[None, None]), axis=(-2, -1))
    e_trans = jnp.sum(e_trans * m[:, 1:], axis=-1)
    h1 = -jnp.sum(_xlogx(g[:, 0]), axis=-1)
    log_g = jnp.log(jnp.where(g > 0, g, 1.0))
    cond = _xlogx(xi) - xlogy_safe(xi, jnp.broadcast_to(log_g[:, :-1, :, None], xi.shape))
    h_rest = -jnp.sum(jnp.sum(cond, axis=(-2, -1)) * m[:, 1:], axis=-1)
    return e_init + e_trans + e_emit + h1 + h_rest


def xlogy_safe(q: Array, log_p: Array) -> Array:
    """:math:`q \\log p` given :math:`\\log p`, with 0 where q = 0 (even if log p = -inf)."""
    return jnp.where(q > 0, q * jnp.where(q > 0, log_p, 0.0), 0.0)


def _xlogx(q: Array) -> Array:
    """:math:`q \\log q`, 0 at q = 0 with a finite gradient there (xlogy's is NaN)."""
    return xlogy_safe(q, jnp.log(jnp.where(q > 0, q, 1.0)))


def m_step(stats: HMMStats, hyper: HMMHyper | None, *, emission) -> HMMParams:
    r"""Closed-form (MAP) M-step: normalised counts plus the emission mixture's M-step.

    .. math::
        \pi_j \propto N^1_j + \alpha_j - 1, \qquad A_{ij} \propto \Xi_{ij} + \alpha^A_{ij} - 1.
    """
    hyper = HMMHyper() if hyper is None else hyper
    dtype = stats.transition.dtype
    k = stats.initial.shape[0]
    a0 = jnp.broadcast_to(jnp.asarray(hyper.initial_concentration, dtype), (k,))
    aa = jnp.broadcast_to(jnp.asarray(hyper.transition_concentration, dtype), (k, k))
    initial = _normalise_rows(jnp.maximum(stats.initial + a0 - 1.0, 0.0))
    transition = _normalise_rows(jnp.maximum(stats.transition + aa - 1.0, 0.0))
    return HMMParams(initial, transition, emission.m_step(stats.emission, hyper.emission))


def log_prior(params: HMMParams, hyper: HMMHyper | None, *, emission) -> Array:
    r"""Unnormalised log prior: the Dirichlet terms plus the emission's log prior.

    .. math::
        \sum_j (\alpha_j - 1)\log\pi_j + \sum_{ij} (\alpha^A_{ij} - 1)\log A_{ij}
            + \log p(\text{emission}).
    """
    hyper = HMMHyper() if hyper is None else hyper
    dtype = params.transition.dtype
    k = params.initial.shape[0]
    a0 = jnp.broadcast_to(jnp.asarray(hyper.initial_concentration, dtype), (k,))
    aa = jnp.broadcast_to(jnp.asarray(hyper.transition_concentration, dtype), (k, k))
    return (
        jnp.sum(xlogy(a0 - 1.0, params.initial))
        + jnp.sum(xlogy(aa - 1.0, params.transition))
        + emission.log_prior(params.emission, hyper.emission)
    )


def to_unconstrained(params: HMMParams, *, emission) -> HMMParams:
    """Log-probabilities for the softmax rows, the emission's own bijection for the rest."""
    return HMMParams(
        jnp.log(params.initial),
        jnp.log(params.transition),
        emission.to_unconstrained(params.emission),
    )


def from_unconstrained(u: HMMParams, *, emission) -> HMMParams:
    """Softmax of each row: every real ``u`` gives a valid HMM."""
    return HMMParams(
        jax.nn.softmax(u.initial),
        jax.nn.softmax(u.transition, axis=-1),
        emission.from_unconstrained(u.emission),
    )


# ---------------------------------------------------------------------------------------
# A chain-structured q from potentials: the local and amortized E-steps of the grid
# ---------------------------------------------------------------------------------------


def _num_states_of(m: int) -> int:
    """k from the size k + k^2 of one step's potentials."""
    k = (math.isqrt(1 + 4 * m) - 1) // 2
    if k < 1 or k * (k + 1) != m:
        raise ValueError(f"the last axis of the potentials must be k + k^2 for some k; got {m}.")
    return k


def chain_posterior(u: Float[Array, "n t m"]) -> HMMPosterior:
    r"""The chain :math:`q(z_{1:T}) \propto \exp\big(\sum_t \phi_t(z_t) + \sum_{t<T}
    \psi_t(z_t, z_{t+1})\big)`, normalised exactly by forward-backward (the HMM's
    ``q_from_unconstrained``).

    ``u[:, t, :k]`` holds the unary log-potentials :math:`\phi_t` and ``u[:, t, k:]`` the
    pairwise :math:`\psi_t` (row-major (k, k), from :math:`z_t` to :math:`z_{t+1}`; unused at
    the last step), so m = k + k². Every real u gives a Markov chain; its marginals and
    pairwise marginals come from

    .. math::
        \log\alpha_{t+1}(j) = \operatorname{logsumexp}_i\big(\log\alpha_t(i) + \psi_t(i, j)\big)
            + \phi_{t+1}(j), \qquad
        \log\beta_t(i) = \operatorname{logsumexp}_j\big(\psi_t(i, j) + \phi_{t+1}(j)
            + \log\beta_{t+1}(j)\big),

    each normalised per step, :math:`\gamma_t = \operatorname{softmax}(\log\alpha_t +
    \log\beta_t)` and :math:`\xi_t = \operatorname{softmax}_{ij}(\log\alpha_t(i) + \psi_t(i,j)
    + \phi_{t+1}(j) + \log\beta_{t+1}(j))`. With zero potentials on padded steps (what
    :class:`ChainEncoder` outputs) the valid prefix is the chain of its own potentials; in
    any case :func:`elbo` and :func:`expected_stats` read only the valid steps, and the
    prefix of a Markov chain is a Markov chain with the same marginals, so the ELBO is exact.
    Differentiable in u (the encoder's gradient flows through both scans).
    """
    n, t, m = u.shape
    k = _num_states_of(m)
    unary = u[..., :k]
    pair = u[:, :-1, k:].reshape(n, t - 1, k, k)
    pair_t, next_t = jnp.swapaxes(pair, 0, 1), jnp.swapaxes(unary[:, 1:], 0, 1)

    def forward(log_alpha, inp):
        psi, phi = inp
        a = jax.nn.logsumexp(log_alpha[:, :, None] + psi, axis=1) + phi
        a = a - jax.nn.logsumexp(a, axis=1, keepdims=True)
        return a, a

    def backward(log_beta, inp):
        psi, phi = inp
        b = jax.nn.logsumexp(psi + (phi + log_beta)[:, None, :], axis=2)
        b = b - jax.nn.logsumexp(b, axis=1, keepdims=True)
        return b, b

    a1 = unary[:, 0] - jax.nn.logsumexp(unary[:, 0], axis=1, keepdims=True)
    _, alphas = lax.scan(forward, a1, (pair_t, next_t))
    last = jnp.zeros((n, k), u.dtype)
    _, betas = lax.scan(backward, last, (pair_t, next_t), reverse=True)
    log_alpha = jnp.swapaxes(jnp.concatenate([a1[None], alphas], axis=0), 0, 1)
    log_beta = jnp.swapaxes(jnp.concatenate([betas, last[None]], axis=0), 0, 1)
    gamma = jax.nn.softmax(log_alpha + log_beta, axis=-1)
    right = unary[:, 1:] + log_beta[:, 1:]
    xi = _softmax2(log_alpha[:, :-1, :, None] + pair + right[:, :, None, :])
    return HMMPosterior(gamma, xi)


def chain_potentials(q: HMMPosterior) -> Float[Array, "n t m"]:
    r"""Potentials whose :func:`chain_posterior` is the chain q (the HMM's
    ``q_to_unconstrained``): :math:`\phi_1 = \log\gamma_1`, :math:`\phi_t = 0` for t > 1 and
    :math:`\psi_t(i, j) = \log q(z_{t+1} = j \mid z_t = i)`, the rows of :math:`\xi_t`
    normalised. Probabilities are clipped at the dtype's smallest normal number (so every
    potential is finite) and a zero row (a padded step) becomes uniform, so the round trip is
    exact up to that clipping on the valid steps.
    """
    g, xi = q.marginals, q.pairwise
    n, t, k = g.shape
    tiny = jnp.finfo(g.dtype).tiny
    unary = jnp.zeros_like(g).at[:, 0].set(jnp.log(jnp.maximum(g[:, 0], tiny)))
    log_xi = jnp.log(jnp.maximum(xi, tiny))
    cond = log_xi - jax.nn.logsumexp(log_xi, axis=-1, keepdims=True)
    pair = jnp.concatenate([cond.reshape(n, t - 1, k * k), jnp.zeros((n, 1, k * k), g.dtype)], 1)
    return jnp.concatenate([unary, pair], axis=-1)


def encoder_inputs(seqs: HMMSequences, *, emission) -> Float[Array, "n t c"]:
    """What :class:`ChainEncoder` reads: each step's observation as floats (one-hot symbols
    for :class:`Categorical`), 0 on padded steps, with the mask as the last channel."""
    x = seqs.x
    if isinstance(emission, Categorical):
        x = jax.nn.one_hot(x, emission.num_symbols, dtype=_default_float())
    elif emission.event_ndim == 0:
        x = x[..., None]
    m = seqs.mask[..., None].astype(x.dtype)
    return jnp.concatenate([x * m, m], axis=-1)


class ChainEncoder(nn.Module):
    """A 1-D convolutional encoder from :func:`encoder_inputs` (n, t, c) to the (n, t, k + k²)
    potentials of :func:`chain_posterior`: the amortized E-step of the HMM.

    ``len(hidden)`` 'same'-padded convolutions over time (:class:`emvi.nn.Conv1D`, width
    ``kernel_size``, so the receptive field is ``len(hidden) * (kernel_size - 1) + 1``
    steps), then a dense unary head on each step's features and a dense pairwise head on the
    features of steps t and t + 1.
    Padded steps are zeroed at every layer and their potentials are 0.

    Attributes:
      num_states: k.
      hidden: channels of each convolution.
      kernel_size: width of each convolution (odd).
      activation: a name in :data:`emvi.nn.ACTIVATIONS`.
    """

    num_states: int
    hidden: tuple[int, ...] = (32, 32)
    kernel_size: int = 3
    activation: str = "relu"

    @nn.compact
    def __call__(self, inputs: Float[Array, "n t c"]) -> Float[Array, "n t m"]:
        k = self.num_states
        act = emvi_nn.ACTIVATIONS[self.activation]
        mask = inputs[..., -1:]
        h = inputs[..., :-1]
        for i, width in enumerate(self.hidden):
            conv = emvi_nn.Conv1D(width, self.kernel_size, name=f"conv_{i}")
            h = act(conv(h)) * mask
        nxt = jnp.concatenate([h[:, 1:], jnp.zeros_like(h[:, :1])], axis=1)
        next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
        unary = nn.Dense(k, name="unary")(h) * mask
        pair = nn.Dense(k * k, name="pairwise")(jnp.concatenate([h, nxt], axis=-1)) * next_mask
        return jnp.concatenate([unary, pair], axis=-1)


def make_batch(
    x: Any,
    lengths: ArrayLike | None = None,
    *,
    emission,
    weights: ArrayLike | None = None,
) -> estep.Batch:
    """A padded batch as the grid's pieces receive it (:class:`emvi.estep.Batch`): ``x`` the
    :func:`encoder_inputs` (what an encoder sees), ``data`` the prepared sequences (what the
    model sees), unit weights if None. Validated as :func:`fit`'s input.

    Example:
      >>> from emvi import estep
      >>> e = Categorical(3)
      >>> b = make_batch(jnp.array([[0, 2, 1], [1, 1, 0]]), np.array([3, 2]), emission=e)
      >>> b.x.shape, b.data.mask.tolist()
      ((2, 3, 4), [[True, True, True], [True, True, False]])
      >>> enc = estep.amortized(model(e), ChainEncoder(2, hidden=(4,)))
      >>> q = enc.init(jax.random.key(0), None, b).q
      >>> q.marginals.shape, q.pairwise.shape
      ((2, 3, 2), (2, 2, 2, 2))
    """
    x_np, mask = check_sequences(x, lengths, emission)
    seqs = HMMSequences(jnp.asarray(x_np), jnp.asarray(mask))
    inputs = encoder_inputs(seqs, emission=emission)
    n = x_np.shape[0]
    w = _checks.check_sample_weight(weights, n)
    w = jnp.ones((n,), inputs.dtype) if w is None else jnp.asarray(w, inputs.dtype)
    return estep.Batch(inputs, prepare(seqs, emission=emission), w)


@functools.cache
def model(emission, *, parallel: bool = False) -> em.ExactModel:
    """The HMM as an :class:`emvi.em.ExactModel` (cached per emission and scan).

    ``data`` is an :class:`HMMSequences` before ``prepare`` (leading axis = sequences), and
    ``hyper`` an :class:`HMMHyper`. The gradient face holds the softmax-row bijection,
    :func:`log_prior` and the q bijection :func:`chain_potentials` / :func:`chain_posterior`
    between a chain q and its (n, t, k + k²) potentials (a local optimiser's variable, a
    :class:`ChainEncoder`'s output; a batch for the grid comes from :func:`make_batch`).
    """
    kw = dict(emission=emission)
    return em.ExactModel(
        e_step=functools.partial(e_step, parallel=parallel, **kw),
        m_step=functools.partial(m_step, **kw),
        log_prob=functools.partial(log_prob, parallel=parallel, **kw),
        posterior=functools.partial(posterior, parallel=parallel, **kw),
        elbo=functools.partial(elbo, **kw),
        prepare=functools.partial(prepare, **kw),
        expected_stats=None
        if isinstance(emission, GaussianMixture)
        else functools.partial(expected_stats, **kw),
        to_unconstrained=functools.partial(to_unconstrained, **kw),
        from_unconstrained=functools.partial(from_unconstrained, **kw),
        log_prior=functools.partial(log_prior, **kw),
        q_to_unconstrained=chain_potentials,
        q_from_unconstrained=chain_posterior,
    )


# ---------------------------------------------------------------------------------------
# Decoding, filtering, sampling
# ---------------------------------------------------------------------------------------


def _viterbi_sequential(log_pi, log_a, lb, mask):
    n, _t, k = lb.shape
    lb_t = jnp.swapaxes(lb, 0, 1)
    m_t = mask.T
    d0 = log_pi[None] + lb_t[0]
    keep = jnp.broadcast_to(jnp.arange(k), (n, k))

    def fwd(delta, inp):
        lbt, mt = inp
        s = delta[:, :, None] + log_a[None]
        bp = jnp.argmax(s, axis=1)
        new = jnp.max(s, axis=1) + lbt
        delta = jnp.where(mt[:, None], new, delta)
        bp = jnp.where(mt[:, None], bp, keep)
        return delta, bp

    delta, bps = lax.scan(fwd, d0, (lb_t[1:], m_t[1:]), unroll=_UNROLL)
    last = jnp.argmax(delta, axis=1)

    def back(state, bp):
        prev = jnp.take_along_axis(bp, state[:, None], axis=1)[:, 0]
        return prev, prev

    _, path = lax.scan(back, last, bps, reverse=True)
    path = jnp.concatenate([path, last[None]], axis=0).T
    return path, jnp.max(delta, axis=1)


def _viterbi_parallel(log_pi, log_a, lb, mask):
    fwd, bwd, score = _parallel_messages(log_pi, log_a, lb, mask, semiring="max")
    return jnp.argmax(fwd + bwd, axis=-1), score


@functools.partial(jax.jit, static_argnames=("emission", "parallel"))
def viterbi(
    params: HMMParams, data: HMMData, *, emission, parallel: bool = False
) -> tuple[Int[Array, "n t"], Float[Array, " n"]]:
    r"""The most probable state path of each sequence and its log joint probability.

    ``parallel=False``: max-product forward pass with back-pointers and a backtrack (two
    ``lax.scan``). ``parallel=True``: the max-plus associative scans give the max-marginals
    :math:`\max_{z: z_t = j} \log p(x, z)`, whose argmax at each step is the path (the same
    path when the maximiser is unique). Padded steps are -1.
    """
    lb = emission_log_likelihood(params, data, emission=emission)
    lb = jnp.where(data.mask[:, :, None], lb, 0.0)
    fn = _viterbi_parallel if parallel else _viterbi_sequential
    path, score = fn(jnp.log(params.initial), jnp.log(params.transition), lb, data.mask)
    return jnp.where(data.mask, path, -1), score


@functools.partial(jax.jit, static_argnames=("emission", "parallel"))
def filter_marginals(
    params: HMMParams, data: HMMData, *, emission, parallel: bool = False
) -> tuple[Float[Array, "n t k"], Float[Array, " n"]]:
    """Filtered marginals :math:`p(z_t \\mid x_{1:t})` (n, t, k) and log-likelihoods (n,)."""
    lb = emission_log_likelihood(params, data, emission=emission)
    lb = jnp.where(data.mask[:, :, None], lb, 0.0)
    log_pi, log_a = jnp.log(params.initial), jnp.log(params.transition)
    if parallel:
        msg = messages(params, lb, data.mask, parallel=True)
        log_f, ll = msg.log_filtered, msg.log_likelihood
    else:
        log_f, ll = _forward_sequential(log_pi, log_a, lb, data.mask)
    f = jax.nn.softmax(log_f, axis=-1) * data.mask[:, :, None].astype(lb.dtype)
    return f, ll


def sample(
    key: Key[Array, ""], params: HMMParams, num_sequences: int, length: int, *, emission
) -> tuple[Array, Int[Array, "n t"]]:
    """Draws ``num_sequences`` sequences of ``length`` steps by ancestral sampling.

    Returns:
      ``(x, z)``: observations (n, t, ...) and states (n, t).
    """
    key = _checks.as_key(key)
    num_sequences = _checks.check_positive_int(num_sequences, name="num_sequences")
    length = _checks.check_positive_int(length, name="length")
    return _sample(key, params, num_sequences, length, emission=emission)


@functools.partial(jax.jit, static_argnums=(2, 3), static_argnames=("emission",))
def _sample(key, params, num_sequences, length, *, emission):
    key_z, key_x = jax.random.split(key)
    log_a = jnp.log(params.transition)
    k0, kr = jax.random.split(key_z)
    z0 = jax.random.categorical(k0, jnp.log(params.initial), shape=(num_sequences,))

    def step(z, kk):
        nz = jax.random.categorical(kk, log_a[z])
        return nz, nz

    _, zs = lax.scan(step, z0, jax.random.split(kr, length - 1))
    z = jnp.concatenate([z0[None], zs], axis=0).T
    x = emission.sample(key_x, params.emission, z)
    return x, z


def permute_states(params: HMMParams, order: ArrayLike, *, emission) -> HMMParams:
    """The same HMM with state ``order[j]`` renamed j: :math:`\\pi' = \\pi[o]`,
    :math:`A' = A[o][:, o]` and every emission array with a state axis indexed by o (a
    Gaussian emission's tied covariance has none; a GMM-HMM's tied one has)."""
    o = jnp.asarray(order)
    e = params.emission
    if emission.__class__ is Gaussian and emission.covariance_type == "tied":
        e = e._replace(means=e.means[o])
    else:
        e = jax.tree_util.tree_map(lambda a: a[o], e)
    return HMMParams(params.initial[o], params.transition[o][:, o], e)


def match_states(params: HMMParams, reference: HMMParams) -> np.ndarray:
    """The order of ``params``' states that best matches ``reference``'s: the assignment
    (Hungarian, :func:`scipy.optimize.linear_sum_assignment`) minimising the summed squared
    distances between the emission means (flattened per state; else the first emission
    arrays: probabilities, rates), so that ``permute_states(params, order)`` has
    ``reference``'s labels (label switching undone; a GMM-HMM's components within a state
    are not reordered).

    Example:
      >>> ref = HMMParams(jnp.ones(2) / 2, jnp.eye(2), PoissonParams(jnp.array([[1.0], [5.0]])))
      >>> fitted = ref._replace(emission=PoissonParams(jnp.array([[4.8], [1.1]])))
      >>> match_states(fitted, ref).tolist()
      [1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    def locations(p):  # the means if the emission has them, else its first array
        e = p.emission
        arr = e.means if hasattr(e, "means") else jax.tree_util.tree_leaves(e)[0]
        arr = np.asarray(arr, np.float64)
        return arr.reshape(arr.shape[0], -1)

    a, b = locations(params), locations(reference)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return rows[np.argsort(cols)]


def recovery_errors(
    fitted: HMMParams, true: HMMParams, *, emission
) -> tuple[dict[str, float], np.ndarray]:
    """Largest absolute error of each parameter array of ``fitted`` against ``true``, after
    :func:`match_states` has undone label switching.

    Returns:
      ``(errors, order)``: a dict from field name (``initial``, ``transition``, then the
      emission's fields, e.g. ``means``, ``covariances``) to ``max |fitted - true|``, and the
      order of :func:`match_states` (fitted state ``order[j]`` is true state j).
    """
    order = match_states(fitted, true)
    p = permute_states(fitted, order, emission=emission)
    names = ("initial", "transition", *type(p.emission)._fields)
    pairs = zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(true), strict=True)
    errors = {
        name: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
        for name, (a, b) in zip(names, pairs, strict=True)
    }
    return errors, order


class RecoveryReport(NamedTuple):
    """How well a fit recovers known parameters (:func:`recovery_report`).

    Attributes:
      max_abs_error: field name -> largest absolute error (:func:`recovery_errors`).
      state_accuracy: fraction of valid steps whose Viterbi state (under the fit, in the
        true labels) is the true state.
      true_log_likelihood: mean log p(x) per sequence under the true parameters.
      params: the fit with its states renamed to the true labels.
      paths: (n, t) Viterbi paths in the true labels, -1 on padded steps.
    """

    max_abs_error: dict
    state_accuracy: float
    true_log_likelihood: float
    params: HMMParams
    paths: np.ndarray


def recovery_report(
    fitted: HMMParams,
    true: HMMParams,
    x: Any,
    states: ArrayLike,
    lengths: ArrayLike | None = None,
    *,
    emission,
) -> RecoveryReport:
    """Compares a fit with the parameters that generated ``x`` (and its states), label
    switching undone by :func:`match_states`: parameter errors, Viterbi state accuracy and
    the true parameters' log-likelihood."""
    errors, order = recovery_errors(fitted, true, emission=emission)
    data = as_data(x, lengths, emission=emission)
    mask = np.asarray(data.mask)
    path = np.asarray(viterbi(fitted, data, emission=emission)[0])
    path = np.where(mask, np.argsort(order)[path], -1)
    accuracy = float(np.mean(path[mask] == np.asarray(states)[mask]))
    true_ll = float(np.mean(np.asarray(log_prob(true, data, emission=emission))))
    aligned = permute_states(fitted, order, emission=emission)
    return RecoveryReport(errors, accuracy, true_ll, aligned, path)


def inference_gaps(
    key: Key[Array, ""],
    params: HMMParams,
    q: HMMPosterior,
    batch: estep.Batch,
    local_steps: dict[str, estep.EStep] | None = None,
    *,
    emission,
) -> dict[str, np.ndarray]:
    r"""Per-sequence gaps :math:`\log p(x) - \mathrm{ELBO}(q)` of a chain q (an encoder's),
    and of q after each local E-step started from it (semi-amortized; Kim et al., 2018).

    The sequence version of :func:`emvi.grid.gap_decomposition`: the chain family holds the
    exact posterior, so a converged local E-step's gap is 0 and the encoder's whole gap is
    its amortization gap (Cremer et al., 2018). Both ELBOs are exact (no sampling).

    Args:
      key: a typed PRNG key for the local steps.
      params: the HMM.
      q: a chain q for ``batch`` (e.g. ``amortized.q_of(variables, batch)``).
      batch: from :func:`make_batch`.
      local_steps: names -> :func:`emvi.estep.local` E-steps of :func:`model` (emission).
      emission: the emission object.

    Returns:
      A dict of (n,) NumPy arrays: ``"amortized"`` for q itself, then one per local step.
    """
    key = _checks.as_key(key)
    local_steps = local_steps or {}
    names, steps = tuple(local_steps), tuple(local_steps.values())
    gaps = _gaps(key, params, q, batch, steps=steps, emission=emission)
    return {name: np.asarray(g) for name, g in zip(("amortized", *names), gaps, strict=True)}


@functools.partial(jax.jit, static_argnames=("steps", "emission"))
def _gaps(key, params, q, batch, *, steps, emission):
    """One program: log p(x) - ELBO of q and of q after each local E-step in ``steps``."""
    mdl = model(emission)
    ll = log_prob(params, batch.data, emission=emission)
    qs = [q] + [estep.ascend_from(key, step, q, params, batch)[0] for step in steps]
    return [ll - mdl.elbo(params, qq, batch.data) for qq in qs]


def fit_chain_encoder(
    key: Key[Array, ""],
    params: HMMParams,
    batch: estep.Batch,
    *,
    emission,
    hidden: tuple[int, ...] = (32, 32),
    kernel_size: int = 3,
    num_steps: int = 1000,
    learning_rate: float = 1e-3,
) -> tuple[estep.EStep, estep.GradientEState]:
    r"""Trains a :class:`ChainEncoder` as the amortized E-step of a fixed HMM: ``num_steps``
    full-batch Adam steps on the mean ELBO of ``batch`` (jitted, one ``lax.scan``).

    The encoder's chain gives every state path positive probability, so the HMM must too:
    a zero in its initial distribution or transition matrix (maximum-likelihood EM can set
    one) makes the ELBO :math:`-\infty` for every q of the family. Fit the HMM with a
    Dirichlet prior above 1 (``prior=HMMHyper(1.01, 1.01)``) to keep every entry positive.

    Args:
      key: typed PRNG key (the encoder's initialisation).
      params: the HMM, fixed.
      batch: from :func:`make_batch`.
      emission: the emission object.
      hidden, kernel_size: the :class:`ChainEncoder`'s convolutions.
      num_steps: Adam steps (>= 1).
      learning_rate: Adam's step size.

    Returns:
      ``(amortized, state)``: the :func:`emvi.estep.amortized` E-step and its state; the
      encoder's q for any batch from :func:`make_batch` is
      ``amortized.q_of(state.variables, batch)``.

    Raises:
      ValueError: when the ELBO of the first q is not finite (a zero-probability path, see
        above), or when training diverges.
    """
    key = _checks.as_key(key)
    num_steps = _checks.check_positive_int(num_steps, name="num_steps")
    encoder = ChainEncoder(
        int(params.initial.shape[0]), hidden=tuple(hidden), kernel_size=kernel_size
    )
    amortized = estep.amortized(
        model(emission), encoder, optimizer=optax.adam(learning_rate), num_steps=num_steps
    )
    state = jax.jit(amortized.init)(key, params, batch)
    start = np.asarray(_chain_elbo(params, state.q, batch.data, emission=emission))
    if not np.all(np.isfinite(start)):
        bad = int(np.sum(~np.isfinite(start)))
        zeros = int(np.sum(np.asarray(params.initial) == 0)) + int(
            np.sum(np.asarray(params.transition) == 0)
        )
        raise ValueError(
            f"the ELBO of the encoder's first q is -inf or NaN for {bad} of {start.size} "
            f"sequences. A chain q from finite potentials gives every path positive mass, so "
            f"its ELBO is -inf wherever the model gives a path probability 0: the HMM has "
            f"{zeros} zero entries in its initial distribution and transition matrix (or an "
            "emission density is 0 on the data). Fit it with a Dirichlet prior above 1, e.g. "
            "fit(..., prior=hmm.HMMHyper(1.01, 1.01)), so that every entry is positive."
        )
    state, info = jax.jit(amortized.step)(key, state, params, batch)
    if not np.isfinite(float(info.elbo)):
        raise ValueError(
            f"training the encoder diverged (mean ELBO {float(info.elbo)} after {num_steps} "
            f"steps); lower learning_rate (now {learning_rate})."
        )
    return amortized, state


@functools.partial(jax.jit, static_argnames=("emission",))
def _chain_elbo(params, q, data, *, emission):
    return model(emission).elbo(params, q, data)


# ---------------------------------------------------------------------------------------
# Input handling, initialisation and fit
# ---------------------------------------------------------------------------------------


def pad_sequences(seqs, *, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A list of arrays (t_i, ...) -> (padded (n, max t, ...), lengths (n,))."""
    arrs = [np.asarray(s) for s in seqs]
    if not arrs:
        raise ValueError("pad_sequences needs at least one sequence.")
    lengths = np.array([a.shape[0] for a in arrs], np.int32)
    t = int(lengths.max())
    out = np.full((len(arrs), t, *arrs[0].shape[1:]), fill, dtype=arrs[0].dtype)
    for i, a in enumerate(arrs):
        out[i, : a.shape[0]] = a
    return out, lengths


def _as_emission(emission, x_np) -> Any:
    if isinstance(emission, Gaussian | Categorical | Bernoulli | Poisson):
        return emission
    if isinstance(emission, str):
        _checks.check_choice(emission, name="emission", choices=EMISSIONS)
        if emission == "categorical":
            arr = np.asarray(x_np)
            return Categorical(int(np.max(arr)) + 1)
        return EMISSIONS[emission]()
    raise ValueError(
        "emission must be one of 'gaussian', 'categorical', 'bernoulli', 'poisson' or an "
        f"emission object (hmm.Gaussian(...), ...); got {emission!r}."
    )


def check_sequences(x, lengths, emission) -> tuple[np.ndarray, np.ndarray]:
    """Validates a padded batch and its lengths; returns (x, mask) as NumPy arrays.

    Raises:
      ValueError: for ragged input (a list of unequal sequences) without ``lengths``, wrong
        dimensions, ``lengths`` outside [1, t], or NaN/inf on a valid step.
    """
    if isinstance(x, list | tuple):
        shapes = {np.shape(s) for s in x}
        if len(shapes) > 1:
            raise ValueError(
                "x is ragged (sequences of different lengths); pad it to one array with "
                "hmm.pad_sequences(list_of_sequences) and pass the lengths it returns."
            )
    try:
        x_np = np.asarray(x)
    except ValueError as err:
        raise ValueError(
            "x is ragged (sequences of different lengths); pad it to one array with "
            "hmm.pad_sequences(list_of_sequences) and pass the lengths it returns."
        ) from err
    if x_np.dtype == object:
        raise ValueError(
            "x is ragged or not numeric; pad it with hmm.pad_sequences and pass lengths."
        )
    if x_np.ndim < 2 or x_np.shape[0] < 1 or x_np.shape[1] < 1:
        raise ValueError(
            f"x must have shape (num_sequences, length, ...) with both >= 1; got {x_np.shape}."
        )
    n, t = x_np.shape[:2]
    if lengths is None:
        lens = np.full(n, t, np.int64)
    else:
        lens = np.asarray(lengths)
        if lens.shape != (n,) or not np.issubdtype(lens.dtype, np.integer):
            raise ValueError(
                f"lengths must be {n} integers, one per sequence; got shape {lens.shape} and "
                f"dtype {lens.dtype}."
            )
        if np.any(lens < 1):
            raise ValueError("lengths must all be >= 1 (every sequence needs one step).")
        if np.any(lens > t):
            raise ValueError(
                f"lengths must be <= the padded length t = {t}; got max {int(lens.max())}."
            )
    mask = np.arange(t)[None, :] < lens[:, None]
    x_np = emission.check_data(x_np)
    valid = x_np[mask]
    if np.issubdtype(valid.dtype, np.floating) and not np.all(np.isfinite(valid)):
        raise ValueError(
            "x contains NaN or inf on a valid step; remove or impute them (padding after a "
            "sequence's length may hold anything)."
        )
    if emission.__class__ is Categorical:
        if np.any(valid < 0) or np.any(valid >= emission.num_symbols):
            raise ValueError(
                f"x must hold symbols in [0, {emission.num_symbols}) for "
                f"Categorical({emission.num_symbols})."
            )
    # padding gets a harmless filler (a copy of a valid value), never evaluated as data
    fill = x_np[0, 0]
    x_np = np.where(mask.reshape(n, t, *([1] * (x_np.ndim - 2))), x_np, fill)
    return x_np, mask


def _check_stochastic(arr: np.ndarray, name: str, dtype) -> None:
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf.")
    if np.any(arr < 0):
        raise ValueError(f"{name} has negative entries; it must hold probabilities.")
    tol = max(1e-6, 100 * float(np.finfo(dtype).eps))
    sums = arr.sum(axis=-1)
    if np.any(np.abs(sums - 1.0) > tol):
        raise ValueError(f"the rows of {name} must sum to one; they sum to {sums}.")


def check_params(params: Any, k: int, d: int, emission, dtype) -> HMMParams:
    """Validates an :class:`HMMParams` for k states and data dimension d; raises ValueError."""
    if not isinstance(params, HMMParams):
        raise ValueError(f"init must be 'kmeans', 'random' or an HMMParams; got {params!r}.")
    pi = np.asarray(params.initial, np.float64)
    a = np.asarray(params.transition, np.float64)
    if pi.shape != (k,):
        raise ValueError(f"init.initial must have shape ({k},); got {pi.shape}.")
    if a.shape != (k, k):
        raise ValueError(f"init.transition must have shape ({k}, {k}); got {a.shape}.")
    _check_stochastic(pi, "init.initial", dtype)
    _check_stochastic(a, "init.transition", dtype)
    em_params = emission.check_params(params.emission, k, d, dtype)
    return HMMParams(jnp.asarray(pi, dtype), jnp.asarray(a, dtype), em_params)


def _check_hyper(prior: Any, k: int, emission, dtype, reg_covar: float) -> HMMHyper:
    base = emission.default_hyper(dtype, reg_covar)
    if prior is None:
        return HMMHyper(jnp.ones((), dtype), jnp.ones((), dtype), base)
    if not isinstance(prior, HMMHyper):
        raise ValueError(f"prior must be an HMMHyper or None; got {type(prior).__name__}.")
    a0 = np.asarray(prior.initial_concentration, np.float64)
    aa = np.asarray(prior.transition_concentration, np.float64)
    if a0.shape not in ((), (k,)) or not np.all(np.isfinite(a0)) or np.any(a0 < 1):
        raise ValueError(
            f"prior.initial_concentration must be a scalar or shape ({k},), every entry >= 1."
        )
    if aa.shape not in ((), (k,), (k, k)) or not np.all(np.isfinite(aa)) or np.any(aa < 1):
        raise ValueError(
            f"prior.transition_concentration must be a scalar, ({k},) or ({k}, {k}), every "
            "entry >= 1."
        )
    em_hyper = prior.emission
    if isinstance(emission, Gaussian):
        if em_hyper is None:
            em_hyper = base
        elif isinstance(em_hyper, gmm.GMMPrior):
            em_hyper = gmm.GMMHyper(jnp.asarray(reg_covar, dtype), em_hyper)
        if em_hyper.prior is not None:
            d = np.shape(em_hyper.prior.mean_prior)[0]
            checked = gmm._check_prior(em_hyper.prior, k, d, emission.covariance_type, dtype)
            em_hyper = gmm.GMMHyper(jnp.asarray(em_hyper.reg_covar, dtype), checked)
    elif em_hyper is not None:
        em_hyper = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), em_hyper)
    return HMMHyper(jnp.asarray(a0, dtype), jnp.asarray(aa, dtype), em_hyper)


INITS = ("kmeans", "random")


def init_params(
    key: Key[Array, ""],
    data: HMMData,
    weights: Float[Array, " n"],
    hyper: HMMHyper,
    *,
    num_states: int,
    emission,
    init: str = "kmeans",
) -> HMMParams:
    """Initial parameters (jittable): uniform :math:`\\pi`, a transition matrix near uniform
    (rows Dirichlet(10 k) draws, so restarts differ), and emissions from the emission's
    ``init`` on the valid steps (``"kmeans"``) or from one M-step under random
    responsibilities (``"random"``)."""
    key = _checks.as_key(key)
    k = num_states
    dtype = weights.dtype
    key_a, key_e = jax.random.split(key)
    pi = jnp.full((k,), 1.0 / k, dtype)
    g = jax.random.gamma(key_a, 10.0 * k, (k, k), dtype)
    a = g / jnp.sum(g, axis=1, keepdims=True)
    step_w = (weights[:, None] * data.mask.astype(dtype)).reshape(-1)
    obs = _flat(data.obs)
    if init == "random":
        per_state = getattr(emission, "num_mix", 1)  # a GMM emission's components
        e = jax.random.exponential(key_e, (step_w.shape[0], k * per_state), dtype)
        q = e / jnp.sum(e, axis=1, keepdims=True)
        eparams = emission.m_step(emission.expected_stats(q, obs, step_w), hyper.emission)
    else:
        raw = obs.x if isinstance(emission, Gaussian) else obs
        eparams = emission.init(key_e, raw, step_w, k, hyper.emission)
    return HMMParams(pi, a, eparams)


def _centre(x, mask, w):
    sw = w[:, None] * mask.astype(x.dtype)
    shift = jnp.einsum("nt,ntd->d", sw, x) / jnp.sum(sw)
    return x - shift[None, None, :], shift


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_states",
        "emission",
        "init",
        "num_init",
        "max_iter",
        "chunk_size",
        "parallel",
    ),
)
def _fit_device(
    key,
    x,
    mask,
    w,
    p0,
    tol,
    hyper,
    *,
    num_states,
    emission,
    init,
    num_init,
    max_iter,
    chunk_size,
    parallel,
):
    if isinstance(emission, Gaussian):
        x, shift = _centre(x, mask, w)
        hyper = hyper._replace(emission=emission.shift_hyper(hyper.emission, -shift))
    mdl = model(emission, parallel=parallel)
    seqs = HMMSequences(x, mask)
    if p0 is None:
        data = mdl.prepare(seqs)
        keys = jax.random.split(key, num_init)
        p0 = jax.vmap(
            lambda kk: init_params(
                kk, data, w, hyper, num_states=num_states, emission=emission, init=init
            )
        )(keys)
    else:
        if isinstance(emission, Gaussian):
            p0 = p0._replace(emission=emission.shift(p0.emission, -shift))
        p0 = jax.tree_util.tree_map(lambda a: a[None], p0)
    res = em.fit(mdl, p0, seqs, w, max_iter=max_iter, tol=tol, hyper=hyper, chunk_size=chunk_size)
    if isinstance(emission, Gaussian):
        res = res._replace(
            params=res.params._replace(emission=emission.shift(res.params.emission, shift))
        )
    return res


def fit(
    key: Key[Array, ""],
    x: Any,
    num_states: int,
    *,
    emission: Any = "gaussian",
    lengths: ArrayLike | None = None,
    init: str | HMMParams = "kmeans",
    prior: HMMHyper | None = None,
    sample_weight: ArrayLike | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    num_init: int = 1,
    chunk_size: int | None = None,
    reg_covar: float = 1e-6,
    parallel: bool = False,
) -> em.FitResult:
    r"""Fits an HMM by (MAP-)EM through the one driver :func:`emvi.em.fit`.

    Restarts are one ``vmap``; each runs on device until the mean log-likelihood per
    sequence changes by less than ``tol``. Gaussian data are centred on their weighted mean
    first (and the parameters shifted back), for the accuracy of :mod:`emvi.gmm`'s packed
    statistics.

    Args:
      key: typed PRNG key (the initialisation).
      x: (n, t, d) padded sequences (categorical: (n, t) integer symbols).
      num_states: k >= 1.
      emission: ``hmm.Gaussian(covariance_type)``, ``hmm.GaussianMixture(covariance_type,
        num_mix=M)``, ``hmm.Categorical(num_symbols)``,
        ``hmm.Bernoulli()``, ``hmm.Poisson()``, or one of the names ``"gaussian"`` (full),
        ``"categorical"`` (symbols 0..max), ``"bernoulli"``, ``"poisson"``.
      lengths: (n,) valid length of each sequence (1 <= length <= t); None: all t.
      init: ``"kmeans"``, ``"random"`` (see :func:`init_params`) or an :class:`HMMParams`.
      prior: optional :class:`HMMHyper` (Dirichlet concentrations and the emission prior:
        a :class:`emvi.gmm.GMMPrior`, a :class:`emvi.bernoulli_mixture.BernoulliMixturePrior`,
        a :class:`CategoricalPrior` or a :class:`PoissonPrior`).
      sample_weight: optional (n,) non-negative per-sequence weights.
      max_iter, tol, num_init, chunk_size: as for every emvi fit (``chunk_size`` counts
        sequences).
      reg_covar: added to every Gaussian covariance diagonal.
      parallel: run the E-step with the associative scan (O(log t) depth).

    Returns:
      An :class:`emvi.em.FitResult`; ``log_likelihood`` is per sequence (weighted mean).

    Raises:
      ValueError: for NaN on a valid step, ragged input without ``lengths``, lengths outside
        [1, t], ``num_states`` < 1, an ``init`` whose shapes, dimension or probabilities are
        wrong (rows not summing to one, negative entries), or bad settings.
    """
    key = _checks.as_key(key)
    emission = _as_emission(emission, x)
    k = _checks.check_positive_int(num_states, name="num_states")
    x_np, mask = check_sequences(x, lengths, emission)
    n = x_np.shape[0]
    max_iter, tol, num_init, chunk_size = _checks.check_em_settings(
        max_iter=max_iter, tol=tol, num_init=num_init, chunk_size=chunk_size
    )
    reg_covar = _checks.check_nonnegative(reg_covar, name="reg_covar")
    _checks.check_choice(init if isinstance(init, str) else "kmeans", name="init", choices=INITS)
    w = _checks.check_sample_weight(sample_weight, n)
    dtype = x_np.dtype if np.issubdtype(x_np.dtype, np.floating) else np.dtype(_default_float())
    d = x_np.shape[2] if x_np.ndim == 3 else 1
    hyper = _check_hyper(prior, k, emission, dtype, reg_covar)
    p0 = None
    if not isinstance(init, str):
        p0 = check_params(init, k, d, emission, dtype)
        init = "kmeans"
        num_init = 1
    elif mask.sum() < k and init == "kmeans":
        raise ValueError(f"num_states={k} is larger than the number of valid steps ({mask.sum()}).")
    wj = jnp.ones(n, dtype) if w is None else jnp.asarray(w, dtype)
    return _fit_device(
        key,
        jnp.asarray(x_np),
        jnp.asarray(mask),
        wj,
        p0,
        jnp.asarray(tol, dtype),
        hyper,
        num_states=k,
        emission=emission,
        init=init,
        num_init=num_init,
        max_iter=max_iter,
        chunk_size=chunk_size,
        parallel=parallel,
    )


def as_data(x: Any, lengths: ArrayLike | None = None, *, emission) -> HMMData:
    """Validates and prepares a padded batch for :func:`posterior`, :func:`viterbi`, ...

    Args:
      x: (n, t, ...) padded sequences.
      lengths: (n,) or None.
      emission: the emission object.
    """
    x_np, mask = check_sequences(x, lengths, emission)
    return prepare(HMMSequences(jnp.asarray(x_np), jnp.asarray(mask)), emission=emission)
