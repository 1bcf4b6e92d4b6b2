r"""Mixture of multivariate Bernoulli distributions (binary images), fitted by EM.

The generative model, for a binary vector :math:`x \in \{0, 1\}^d`:

.. math::
    z \sim \mathrm{Cat}(\pi), \qquad
    p(x \mid z = k) = \prod_{j=1}^{d} \mu_{kj}^{x_j} (1 - \mu_{kj})^{1 - x_j}.

The posterior over the k components is exact (a softmax of the log-joint), so EM is
coordinate ascent on the ELBO: the E-step returns responsibilities
:math:`r_{ik} = p(z = k \mid x_i)` summarised as expected sufficient statistics

.. math::
    N_k = \sum_i w_i r_{ik}, \qquad S_{kj} = \sum_i w_i r_{ik} x_{ij},

and the M-step is closed form. With the conjugate priors
:math:`\pi \sim \mathrm{Dir}(\alpha, \dots, \alpha)` and
:math:`\mu_{kj} \sim \mathrm{Beta}(a, b)` it returns the MAP estimate

.. math::
    \pi_k = \frac{N_k + \alpha - 1}{N + k(\alpha - 1)}, \qquad
    \mu_{kj} = \frac{S_{kj} + a - 1}{N_k + a + b - 2},

with :math:`N = \sum_k N_k`: the maximiser of :math:`\sum_i w_i \mathrm{ELBO}_i +`
:func:`log_prior`. :math:`\alpha = a = b = 1` (flat priors, ``prior=None``) is maximum
likelihood. With :math:`a, b > 1` every :math:`\mu_{kj}` lies strictly inside (0, 1), so
every binary vector has positive probability; under maximum likelihood a pixel that is
never on in a component gets :math:`\mu_{kj} = 0` and an unseen image that has it on gets
log-probability :math:`-\infty` (never NaN: see :func:`log_joint`). MAP-EM never lowers
the log-posterior :func:`log_prior` + :math:`\sum_i w_i \log p(x_i)`.

**Non-binary data.** Any :math:`x_{ij} \in [0, 1]` (grey levels, probabilities) enters the
same formulas: :math:`\log p(x \mid z = k)` becomes the negative cross-entropy
:math:`\sum_j x_j \log \mu_{kj} + (1 - x_j) \log(1 - \mu_{kj})`, which is not the log of a
normalised density over [0, 1]^d (it is over {0, 1}^d), and EM still ascends it: the
statistics and M-step are unchanged. :func:`fit` rejects values outside [0, 1]; the
scoring functions apply the formula to whatever they are given.

**The model protocol.** :func:`model` returns the :class:`emvi.em.ExactModel` with every
field: the exact face (:func:`e_step`, :func:`m_step`, :func:`log_prob`, :func:`posterior`,
:func:`elbo`, :func:`expected_stats`, :func:`prepare`) and the gradient face
(:func:`to_unconstrained` / :func:`from_unconstrained`: centred weight logits and pixel
logits; :func:`log_prior`; :func:`q_to_unconstrained` / :func:`q_from_unconstrained`: log
responsibilities and a softmax over k). :func:`init_params`, :func:`sample` and :func:`fit`
(a thin call of the one driver :func:`emvi.em.fit`) complete the face.

**Checks.** The scoring functions (:func:`log_joint`, :func:`log_prob`, :func:`posterior`,
:func:`elbo`, :func:`e_step`) raise ``ValueError`` when ``x`` does not have the params'
number of pixels (a shape check, free under ``jit``) and, when called eagerly on concrete
arrays, when ``x`` holds NaN or infinite values (inside ``jit`` values are not inspected).

**Missing pixels and partial labels.** :func:`fit` marginalises pixels that are NaN (or
False in ``observed``): their factors drop out of :math:`p(x \mid z)`, and the M-step takes
the completed counts :math:`S_{kj} = \sum_i w_i r_{ik} (o_{ij} x_{ij} + (1 - o_{ij})
\mu_{kj})` (:func:`masked_e_step`, :func:`masked_model`); :func:`observed_log_prob` and
:func:`impute` score and complete new images. ``fit(labels=...)`` holds the responsibilities
of labelled images fixed (:func:`emvi.missing.fixed_responsibilities`).

Shape letters: ``n`` data points, ``d`` pixels, ``k`` components, ``r`` restarts.

Example:
  >>> from emvi.data import digits_bin
  >>> split = digits_bin()
  >>> res = fit(jax.random.key(0), split.train_x, 10, max_iter=50)
  >>> res.params.probs.shape
  (10, 64)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlog1py, xlogy
from jaxtyping import Array, Float, Int, Key

from emvi import _checks, em, missing
from emvi.elbo import discrete_elbo


class BernoulliMixtureParams(NamedTuple):
    """Parameters of a Bernoulli mixture.

    Attributes:
      weights: mixing proportions :math:`\\pi`, shape (k,), summing to one.
      probs: pixel probabilities :math:`\\mu_{kj} = p(x_j = 1 \\mid z = k)`, shape (k, d).
    """

    weights: Float[Array, " k"]
    probs: Float[Array, "k d"]


class BernoulliMixtureStats(NamedTuple):
    """Expected sufficient statistics, summed over (weighted) data.

    Attributes:
      counts: :math:`N_k = \\sum_i w_i r_{ik}`, shape (k,).
      sum_x: :math:`S_{kj} = \\sum_i w_i r_{ik} x_{ij}`, shape (k, d).
    """

    counts: Float[Array, " k"]
    sum_x: Float[Array, "k d"]


class BernoulliMixturePrior(NamedTuple):
    """Conjugate prior hyperparameters (the ``hyper`` of the EM driver).

    Attributes:
      alpha: symmetric Dirichlet concentration on the weights, >= 1.
      a: Beta prior pseudo-count for :math:`x_j = 1`, >= 1.
      b: Beta prior pseudo-count for :math:`x_j = 0`, >= 1.

    ``alpha = a = b = 1`` is maximum likelihood (as is ``prior=None`` everywhere);
    ``a = b = 2`` is Laplace (add-one) smoothing of the pixel probabilities. A Beta(a, b)
    prior acts like ``a + b - 2`` extra images per component, so a strong one flattens
    small components until they lose all their data (see :data:`DEFAULT_PRIOR`).
    """

    alpha: Float[Array, ""] | float = 1.0
    a: Float[Array, ""] | float = 1.0
    b: Float[Array, ""] | float = 1.0


DEFAULT_PRIOR = BernoulliMixturePrior(alpha=1.0, a=1.2, b=1.2)
"""The prior :func:`fit` uses unless told otherwise: flat on the weights and Beta(1.2, 1.2)
on every pixel probability. It keeps every probability inside (0, 1), so held-out images
never get :math:`-\\infty`, while adding only 0.4 pseudo-images per component. On
digits-bin (validation log-likelihood of the last 300 training images, mixtures fitted to
the other 1,200 with the headline's settings, k = 10, 25, 50, 100) a = 1.2 was the best or
within 0.015 nats of the best of a in {1.01, 1.03, 1.1, 1.2, 1.5, 2} at every k, while
Laplace smoothing, Beta(2, 2) (the default before), was the worst or next to worst at every
k and emptied components once k was large (k = 100 kept 39 of 100): a strong prior flattens
a small component towards 1/2 until it loses all its data. For a given data set choose a
on a validation split, as the headline experiment ``experiments/em_vs_vi.py`` does."""


BernoulliMixtureFit = em.FitResult
"""What :func:`fit` returns: the one result type, :class:`emvi.em.FitResult`."""


# ---------------------------------------------------------------------------------------
# Input checks for the scoring functions
# ---------------------------------------------------------------------------------------


def _check_data(params: BernoulliMixtureParams, x: Array, *, name: str = "x") -> None:
    """Raises ``ValueError`` if ``x`` does not match ``params`` or (eagerly) holds NaN/inf.

    The shape check reads static shapes only, so it costs nothing under ``jit``; the value
    check runs only on concrete arrays (an eager call), never on tracers.
    """
    d = params.probs.shape[-1]
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} must be 2-D with shape (n, {d}); got shape {jnp.shape(x)}.")
    if x.shape[1] != d:
        raise ValueError(
            f"{name} has {x.shape[1]} columns but the params have {d} pixels per component."
        )
    if isinstance(x, jax.core.Tracer):
        return
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        shown = ", ".join(str(r) for r in rows[:5]) + (" ..." if rows.size > 5 else "")
        raise ValueError(
            f"{name} contains NaN or infinite values in row(s) {shown}; remove or impute them."
        )


# ---------------------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------------------


def _log_bernoulli(x: Array, probs: Array) -> Array:
    """:math:`\\sum_j x_j \\log \\mu_{kj} + (1 - x_j) \\log(1 - \\mu_{kj})` as an (n, k) matmul.

    ``0 * log 0`` is taken as 0, and a pixel that is (partly) on where :math:`\\mu = 0` (or
    off where :math:`\\mu = 1`) makes the entry exactly ``-inf``; no NaN either way, in the
    value or in its gradient.
    """
    zero, one = probs <= 0, probs >= 1
    log_p = jnp.log(jnp.where(zero, 1.0, probs))
    log_1mp = jnp.log1p(-jnp.where(one, 0.0, probs))
    finite = x @ log_p.T + (1.0 - x) @ log_1mp.T
    impossible = x @ zero.astype(x.dtype).T + (1.0 - x) @ one.astype(x.dtype).T
    return jnp.where(impossible > 0, -jnp.inf, finite)


def _log_joint(params: BernoulliMixtureParams, x: Array) -> Array:
    """:func:`log_joint` without the input checks."""
    return _log_bernoulli(x, params.probs) + jnp.log(params.weights)[None, :]


def log_joint(params: BernoulliMixtureParams, x: Float[Array, "n d"]) -> Float[Array, "n k"]:
    r"""Log-joint :math:`\log p(x_i, z = k) = \log \pi_k + \log p(x_i \mid z = k)`.

    .. math::
        \log p(x_i, z=k) = \log \pi_k + \sum_{j=1}^{d} \big[x_{ij} \log \mu_{kj}
            + (1 - x_{ij}) \log(1 - \mu_{kj})\big],

    computed as two (n, d) x (d, k) products. Probabilities of exactly 0 or 1 are allowed
    (maximum likelihood produces them): :math:`0 \log 0 = 0`, and an impossible
    (image, component) pair gets ``-inf`` rather than NaN. For :math:`x_{ij} \in [0, 1]`
    that is not binary the bracket is a negative cross-entropy (see the module docstring).

    Args:
      params: mixture parameters (weights (k,), probs (k, d)).
      x: data, shape (n, d), binary or in [0, 1].

    Returns:
      Shape (n, k).

    Raises:
      ValueError: if ``x`` does not have d columns, or (eager calls) holds NaN or inf.
    """
    _check_data(params, x)
    return _log_joint(params, x)


def log_prob(params: BernoulliMixtureParams, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r"""Marginal log-likelihood :math:`\log p(x_i) = \log \sum_k \pi_k p(x_i \mid z=k)`.

    Args:
      params: mixture parameters.
      x: data, shape (n, d).

    Returns:
      Shape (n,); ``-inf`` for an image that every component rules out.

    Raises:
      ValueError: as :func:`log_joint`.
    """
    _check_data(params, x)
    return jax.nn.logsumexp(_log_joint(params, x), axis=1)


def _safe_softmax(lj: Array) -> Array:
    """Row softmax; a row that is ``-inf`` everywhere (impossible point) becomes uniform."""
    dead = jnp.all(lj == -jnp.inf, axis=1, keepdims=True)
    return jax.nn.softmax(jnp.where(dead, 0.0, lj), axis=1)


def posterior(params: BernoulliMixtureParams, x: Float[Array, "n d"]) -> Float[Array, "n k"]:
    r"""Responsibilities :math:`r_{ik} = p(z = k \mid x_i) = \mathrm{softmax}_k \log p(x_i, k)`.

    Rows sum to one. For an image with :math:`p(x_i) = 0` (possible only under maximum
    likelihood) the posterior is undefined; it is returned as uniform, not NaN.

    Args:
      params: mixture parameters.
      x: data, shape (n, d).

    Returns:
      Shape (n, k).

    Raises:
      ValueError: as :func:`log_joint`.
    """
    _check_data(params, x)
    return _safe_softmax(_log_joint(params, x))


def elbo(
    params: BernoulliMixtureParams, q: Float[Array, "n k"], x: Float[Array, "n d"]
) -> Float[Array, " n"]:
    r"""Per-example ELBO :math:`\sum_k q_{ik} (\log p(x_i, k) - \log q_{ik})`.

    Equals :func:`log_prob` when ``q`` is :func:`posterior` and is below it otherwise, by
    :math:`\mathrm{KL}(q_i \,\|\, p(z \mid x_i))`. Differentiable in ``q`` (where
    :math:`q_{ik} > 0`: :math:`\partial / \partial q_{ik} = \log p(x_i, k) - \log q_{ik} - 1`)
    and in ``params`` (where the probabilities lie inside (0, 1)), so the gradient M-step
    and the local variational E-step climb it.

    Args:
      params: mixture parameters.
      q: a distribution over components for each example, shape (n, k).
      x: data, shape (n, d).

    Returns:
      Shape (n,).

    Raises:
      ValueError: as :func:`log_joint`.
    """
    _check_data(params, x)
    return discrete_elbo(_log_joint(params, x), q)


def log_prior(
    params: BernoulliMixtureParams, prior: BernoulliMixturePrior | None = None
) -> Float[Array, ""]:
    r"""Unnormalised log prior density of the parameters (0 under flat priors).

    .. math::
        \log p(\pi, \mu) = (\alpha - 1)\sum_k \log \pi_k + \sum_{k,j} \big[(a - 1)\log\mu_{kj}
            + (b - 1) \log(1 - \mu_{kj})\big] + \text{const}.

    This is the term :func:`m_step` adds: its output maximises
    :math:`\sum_i w_i \mathrm{ELBO}_i(q_i, \theta) + \log p(\theta)` for the ``q`` whose
    statistics it is given. MAP-EM never decreases ``log_prior(params) + sum_i w_i log
    p(x_i)``. Terms with a zero coefficient vanish even where the parameter is 0 or 1.

    Args:
      params: mixture parameters.
      prior: hyperparameters; ``None`` means flat (maximum likelihood).

    Returns:
      A scalar.
    """
    if prior is None:
        return jnp.zeros((), params.probs.dtype)
    dtype = params.probs.dtype
    alpha, a, b = (jnp.asarray(v, dtype) for v in prior)
    return (
        jnp.sum(xlogy(alpha - 1.0, params.weights))
        + jnp.sum(xlogy(a - 1.0, params.probs))
        + jnp.sum(xlog1py(b - 1.0, -params.probs))
    )


# ---------------------------------------------------------------------------------------
# The gradient face: bijections to unconstrained space
# ---------------------------------------------------------------------------------------


def _clipped_log(v: Array) -> Array:
    """:math:`\\log \\max(v, \\text{tiny})`: finite, and with a finite gradient, at v = 0."""
    return jnp.log(jnp.maximum(v, jnp.finfo(v.dtype).tiny))


def to_unconstrained(params: BernoulliMixtureParams) -> BernoulliMixtureParams:
    r"""Parameters as unconstrained logits (a ``BernoulliMixtureParams`` of real arrays).

    .. math::
        u_{\pi} = \log \pi - \overline{\log \pi}, \qquad
        u_{\mu} = \log \mu - \log(1 - \mu),

    the centred weight logits (they sum to zero, which removes the softmax's shift
    redundancy) and the pixel logits. A weight or probability of exactly 0 or 1 (which
    maximum likelihood produces) is clipped at the smallest normal number before the log,
    so every entry is finite: ``log(tiny)`` is about -708 in float64 and -87 in float32, and
    :func:`from_unconstrained` maps it back to within ``tiny`` of 0 or 1.

    Args:
      params: mixture parameters.

    Returns:
      ``BernoulliMixtureParams(weights=u_pi (k,), probs=u_mu (k, d))``.
    """
    log_w = _clipped_log(params.weights)
    probs = params.probs
    return BernoulliMixtureParams(
        weights=log_w - jnp.mean(log_w),
        probs=_clipped_log(probs) - _clipped_log(1.0 - probs),
    )


def from_unconstrained(u: BernoulliMixtureParams) -> BernoulliMixtureParams:
    r"""The inverse of :func:`to_unconstrained`: :math:`\pi = \mathrm{softmax}(u_\pi)`,
    :math:`\mu = \sigma(u_\mu)`; every real ``u`` gives valid parameters.

    Args:
      u: unconstrained logits (weights (k,), probs (k, d)).

    Returns:
      Mixture parameters.
    """
    return BernoulliMixtureParams(weights=jax.nn.softmax(u.weights), probs=jax.nn.sigmoid(u.probs))


def q_to_unconstrained(q: Float[Array, "n k"]) -> Float[Array, "n k"]:
    r"""Responsibilities as unconstrained vectors: :math:`\log q_{ik}`, clipped below at
    ``log(tiny)`` so that a zero responsibility gives a finite value.

    :func:`q_from_unconstrained` (a softmax over k) inverts it up to that clipping (any
    shift of a row is allowed, so no centring is needed).

    Args:
      q: a distribution over components for each example, shape (n, k).

    Returns:
      Shape (n, k).
    """
    return _clipped_log(q)


def q_from_unconstrained(u: Float[Array, "n k"]) -> Float[Array, "n k"]:
    r""":math:`q_{ik} = \mathrm{softmax}_k(u_i)`, the inverse of :func:`q_to_unconstrained`.

    Args:
      u: unconstrained per-example vectors (an encoder's logits), shape (n, k).

    Returns:
      Rows on the simplex, shape (n, k).
    """
    return jax.nn.softmax(u, axis=-1)


# ---------------------------------------------------------------------------------------
# EM pieces
# ---------------------------------------------------------------------------------------


def expected_stats(
    q: Float[Array, "n k"], x: Float[Array, "n d"], weights: Float[Array, " n"]
) -> BernoulliMixtureStats:
    r"""Sufficient statistics expected under any responsibilities ``q`` (not only the posterior).

    .. math::
        N_k = \sum_i w_i q_{ik}, \qquad S_{kj} = \sum_i w_i q_{ik} x_{ij}.

    ``m_step(expected_stats(q, x, w), prior)`` maximises the ELBO of ``q`` (plus the log
    prior) over the parameters, for example with ``q`` from an amortized encoder.

    Args:
      q: a distribution over components for each example, shape (n, k).
      x: data, shape (n, d).
      weights: per-example weights, shape (n,).

    Returns:
      The summed statistics.
    """
    r = q * weights[:, None]
    return BernoulliMixtureStats(counts=jnp.sum(r, axis=0), sum_x=r.T @ x)


def e_step(
    params: BernoulliMixtureParams, x: Float[Array, "n d"], weights: Float[Array, " n"]
) -> tuple[BernoulliMixtureStats, Float[Array, ""]]:
    r"""Exact E-step: expected sufficient statistics and the weighted log-likelihood.

    .. math::
        N_k = \sum_i w_i r_{ik}, \qquad S_{kj} = \sum_i w_i r_{ik} x_{ij}, \qquad
        \mathcal{L} = \sum_i w_i \log p(x_i),

    that is :func:`expected_stats` at the exact posterior :math:`r = p(z \mid x)`.

    Args:
      params: current parameters.
      x: data, shape (n, d).
      weights: per-example weights, shape (n,).

    Returns:
      ``(stats, log_lik_sum)``.

    Raises:
      ValueError: as :func:`log_joint`.
    """
    _check_data(params, x)
    lj = _log_joint(params, x)
    ll = jax.nn.logsumexp(lj, axis=1)
    return expected_stats(_safe_softmax(lj), x, weights), jnp.sum(weights * ll)


def m_step(
    stats: BernoulliMixtureStats, prior: BernoulliMixturePrior | None = None
) -> BernoulliMixtureParams:
    r"""Closed-form (MAP) M-step.

    .. math::
        \pi_k = \frac{N_k + \alpha - 1}{N + k(\alpha - 1)}, \qquad
        \mu_{kj} = \frac{S_{kj} + a - 1}{N_k + a + b - 2}.

    This maximises :math:`\sum_k N_k \log \pi_k + \sum_{kj} [S_{kj} \log \mu_{kj}
    + (N_k - S_{kj}) \log(1 - \mu_{kj})] +` :func:`log_prior`, the ELBO's parameter-dependent
    part plus the log prior. Under maximum likelihood a component with :math:`N_k = 0` has
    no data to estimate :math:`\mu_k` from; it then gets the pooled frequencies
    :math:`\sum_k S_{kj} / N` (and weight 0) instead of 0/0.

    Args:
      stats: summed statistics from :func:`e_step` or :func:`expected_stats`.
      prior: hyperparameters; ``None`` means flat (maximum likelihood).

    Returns:
      New parameters, in the dtype of the statistics.
    """
    prior = BernoulliMixturePrior() if prior is None else prior
    dtype = stats.sum_x.dtype
    alpha, a, b = (jnp.asarray(v, dtype) for v in prior)
    nk, sk = stats.counts, stats.sum_x
    k = nk.shape[0]
    w_num = nk + (alpha - 1.0)
    weights = w_num / jnp.sum(w_num)
    den = nk + (a + b - 2.0)
    pooled = (jnp.sum(sk, axis=0) + (a - 1.0)) / (jnp.sum(nk) + (a + b - 2.0) * k)
    has_data = den > 0
    probs = jnp.where(
        has_data[:, None],
        (sk + (a - 1.0)) / jnp.where(has_data, den, 1.0)[:, None],
        pooled[None, :],
    )
    # Rounding can push S_kj a hair above N_k; keep probs a probability.
    probs = jnp.clip(probs, 0.0, 1.0)
    return BernoulliMixtureParams(weights=weights, probs=probs)


def sample(
    key: Key[Array, ""], params: BernoulliMixtureParams, num_samples: int
) -> tuple[Float[Array, "n d"], Int[Array, " n"]]:
    r"""Draws ``num_samples`` images by ancestral sampling.

    Args:
      key: a typed PRNG key.
      params: mixture parameters.
      num_samples: n, a static Python int.

    Returns:
      ``(x, z)``: binary images (n, d) in the dtype of ``params.probs``, and components (n,).
    """
    key = _checks.as_key(key)
    key_z, key_x = jax.random.split(key)
    z = jax.random.categorical(key_z, jnp.log(params.weights), shape=(num_samples,))
    x = jax.random.bernoulli(key_x, params.probs[z]).astype(params.probs.dtype)
    return x, z


def prepare(x: Float[Array, "n d"]) -> Float[Array, "n d"]:
    """The data as the EM pieces take it: ``x`` itself (nothing to precompute)."""
    return x


@functools.cache
def model() -> em.ExactModel:
    """The Bernoulli mixture as an :class:`emvi.em.ExactModel` (one cached instance), with
    every field of the protocol filled.

    ``hyper`` for the driver is a :class:`BernoulliMixturePrior` (or ``None``: maximum
    likelihood). The number of components and pixels come from the shapes of the params.

    Example:
      >>> x = jnp.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
      >>> p0 = BernoulliMixtureParams(jnp.array([0.5, 0.5]), jnp.array([[0.2, 0.7], [0.6, 0.4]]))
      >>> prior = BernoulliMixturePrior(1.0, 2.0, 2.0)
      >>> res = em.fit(model(), jax.tree.map(lambda v: v[None], p0), x, hyper=prior)
      >>> res.params.probs.shape
      (2, 2)
    """
    return em.ExactModel(
        e_step=e_step,
        m_step=m_step,
        log_prob=log_prob,
        posterior=posterior,
        elbo=elbo,
        prepare=prepare,
        expected_stats=expected_stats,
        to_unconstrained=to_unconstrained,
        from_unconstrained=from_unconstrained,
        log_prior=log_prior,
        q_to_unconstrained=q_to_unconstrained,
        q_from_unconstrained=q_from_unconstrained,
    )


# ---------------------------------------------------------------------------------------
# Missing values: the factors of the missing pixels drop out
# ---------------------------------------------------------------------------------------


def _masked_log_joint(params: BernoulliMixtureParams, x: Array, observed: Array) -> Array:
    r""":math:`\log \pi_k + \sum_{j \in O_i} [x_{ij}\log\mu_{kj} + (1 - x_{ij})\log(1 - \mu_{kj})]`
    as two (n, d) x (d, k) products: a missing pixel's factor sums to one over its values,
    so it drops out of the marginal. Impossible pairs give ``-inf`` as in :func:`log_joint`."""
    probs = params.probs
    on, off = observed * x, observed * (1.0 - x)
    zero, one = probs <= 0, probs >= 1
    log_p = jnp.log(jnp.where(zero, 1.0, probs))
    log_1mp = jnp.log1p(-jnp.where(one, 0.0, probs))
    finite = on @ log_p.T + off @ log_1mp.T
    impossible = on @ zero.astype(x.dtype).T + off @ one.astype(x.dtype).T
    lj = jnp.where(impossible > 0, -jnp.inf, finite)
    return lj + jnp.log(params.weights)[None, :]


def masked_e_step(
    params: BernoulliMixtureParams, data: missing.MaskedData, weights: Float[Array, " n"]
) -> tuple[BernoulliMixtureStats, Float[Array, ""]]:
    r"""Exact E-step with missing pixels: expected completed statistics and
    :math:`\sum_i w_i \log p(x_{i,O_i})`.

    A missing pixel's expectation given :math:`z_i = k` (and the observed pixels) is
    :math:`\mu_{kj}`, so :math:`N_k = \sum_i w_i r_{ik}` and
    :math:`S_{kj} = \sum_i w_i r_{ik} (o_{ij} x_{ij} + (1 - o_{ij}) \mu_{kj})`, with
    :math:`r_{ik} = p(z_i = k \mid x_{i,O})`; :func:`m_step` takes them unchanged.

    Args:
      params: current parameters.
      data: :class:`emvi.missing.MaskedData` (values 0 where missing).
      weights: per-example weights, shape (n,).
    """
    lj = _masked_log_joint(params, data.values, data.observed)
    ll = jax.nn.logsumexp(lj, axis=1)
    r = _safe_softmax(lj) * weights[:, None]
    sum_x = r.T @ (data.observed * data.values) + params.probs * (r.T @ (1.0 - data.observed))
    return BernoulliMixtureStats(jnp.sum(r, axis=0), sum_x), jnp.sum(weights * ll)


@functools.cache
def masked_model() -> em.ExactModel:
    """The Bernoulli mixture with missing pixels as an :class:`emvi.em.ExactModel` (cached).

    ``data`` is an :class:`emvi.missing.MaskedData`; ``log_prob`` is the log-probability of
    the observed pixels. No ``expected_stats`` (the completed statistics depend on the
    parameters) and no ``prepare``; the gradient face is :func:`model`'s.
    """

    def lj(params, data):
        return _masked_log_joint(params, data.values, data.observed)

    return model()._replace(
        e_step=masked_e_step,
        log_prob=lambda params, data: jax.nn.logsumexp(lj(params, data), axis=1),
        posterior=lambda params, data: _safe_softmax(lj(params, data)),
        elbo=lambda params, q, data: discrete_elbo(lj(params, data), q),
        prepare=None,
        expected_stats=None,
    )


def observed_log_prob(params: BernoulliMixtureParams, x, observed=None) -> Float[Array, " n"]:
    r"""Log-probability of the observed pixels of each image,
    :math:`\log \sum_k \pi_k \prod_{j \in O_i} \mu_{kj}^{x_{ij}} (1 - \mu_{kj})^{1 - x_{ij}}`.

    A pixel is missing where ``x`` is NaN or ``observed`` is False
    (:func:`emvi.missing.check_observed`). With nothing missing this is :func:`log_prob`.

    Raises:
      ValueError: for a bad ``x`` or ``observed`` or a pixel count other than the params'.

    Example:
      >>> p = BernoulliMixtureParams(jnp.array([1.0]), jnp.array([[0.25, 0.5]]))
      >>> float(observed_log_prob(p, np.array([[1.0, np.nan]]))[0])  # log 0.25
      -1.386...
    """
    values, obs = missing.scoring_input(x, observed, lambda v: _check_data(params, v))
    return jax.nn.logsumexp(_masked_log_joint(params, values, obs), axis=1)


def impute(params: BernoulliMixtureParams, x, observed=None) -> Float[Array, "n d"]:
    r"""``x`` with each missing pixel replaced by its conditional mean
    :math:`p(x_{ij} = 1 \mid x_{i,O}) = \sum_k r_{ik} \mu_{kj}`, :math:`r_{ik} = p(z_i = k
    \mid x_{i,O})`; observed pixels are returned as they are.

    Raises:
      ValueError: as :func:`observed_log_prob`.

    Example:
      >>> p = BernoulliMixtureParams(jnp.array([0.5, 0.5]), jnp.array([[0.1, 0.2], [0.9, 0.8]]))
      >>> [round(v, 3) for v in impute(p, np.array([[1.0, np.nan]]))[0].tolist()]
      [1.0, 0.74]
    """
    values, obs = missing.scoring_input(x, observed, lambda v: _check_data(params, v))
    r = _safe_softmax(_masked_log_joint(params, values, obs))
    return jnp.where(obs > 0, values, r @ params.probs)


# ---------------------------------------------------------------------------------------
# Initialisation and the public fitting wrapper
# ---------------------------------------------------------------------------------------

INITS = ("points", "responsibilities")


def init_params(
    key: Key[Array, ""],
    x: Float[Array, "n d"],
    num_components: int,
    *,
    method: str = "points",
    prior: BernoulliMixturePrior | None = None,
    sample_weight: Float[Array, " n"] | None = None,
) -> BernoulliMixtureParams:
    r"""Random initial parameters (one set; vmap over keys for a batch of restarts).

    * ``"points"``: k distinct data points chosen at random (with probability proportional
      to ``sample_weight`` when given, so zero-weight rows are never chosen), smoothed
      halfway towards 1/2, :math:`\mu_k = \tfrac14 + \tfrac12 x_{i_k}` (so every probability
      of a binary point lies in [1/4, 3/4]), with uniform weights.
    * ``"responsibilities"``: responsibilities drawn uniformly at random on the simplex
      (Dirichlet(1)), followed by one M-step (weighted by ``sample_weight``, with ``prior``).

    Args:
      key: a typed PRNG key.
      x: data, shape (n, d), with at least k rows of positive weight.
      num_components: k (static).
      method: one of :data:`INITS`.
      prior: used by the ``"responsibilities"`` M-step.
      sample_weight: per-example weights (n,), in the dtype of ``x``; ones if None.

    Returns:
      Parameters in the dtype of ``x``.

    Example:
      >>> x = jnp.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
      >>> keys = jax.random.split(jax.random.key(0), 4)
      >>> batch = jax.vmap(lambda kk: init_params(kk, x, 2))(keys)  # 4 restarts
      >>> batch.probs.shape
      (4, 2, 2)
    """
    key = _checks.as_key(key)
    n = x.shape[0]
    k = num_components
    if method == "points":
        p = None if sample_weight is None else sample_weight / jnp.sum(sample_weight)
        idx = jax.random.choice(key, n, shape=(k,), replace=False, p=p)
        probs = 0.25 + 0.5 * x[idx]
        return BernoulliMixtureParams(jnp.full((k,), 1.0 / k, x.dtype), probs)
    if method == "responsibilities":
        # Normalised standard exponentials are Dirichlet(1, ..., 1) draws.
        e = jax.random.exponential(key, (n, k), x.dtype)
        r = e / jnp.sum(e, axis=1, keepdims=True)
        w = jnp.ones(n, x.dtype) if sample_weight is None else sample_weight
        return m_step(expected_stats(r, x, w), prior)
    raise ValueError(f"method must be one of {INITS}; got {method!r}.")


@functools.partial(jax.jit, static_argnames=("num_components", "num_init", "method"))
def _init_batch(key, x, prior, sample_weight, *, num_components, num_init, method):
    keys = jax.random.split(key, num_init)
    return jax.vmap(
        lambda kk: init_params(
            kk, x, num_components, method=method, prior=prior, sample_weight=sample_weight
        )
    )(keys)


@functools.partial(jax.jit, static_argnames=("num_components", "num_init", "method"))
def _init_batch_labelled(
    key, x, prior, sample_weight, label_probs, labelled, *, num_components, num_init, method
):
    """Initial parameters with partial labels: the initial responsibilities (one-hot on the
    chosen points for ``"points"``, random for ``"responsibilities"``) pass through
    :func:`emvi.missing.label_init_responsibilities`, so component j starts as class j,
    then one M-step (for ``"points"`` smoothed halfway to 1/2 as :func:`init_params` does)."""
    n, k = x.shape[0], num_components
    w = jnp.ones(n, x.dtype) if sample_weight is None else sample_weight

    def one(kk):
        if method == "points":
            p = None if sample_weight is None else sample_weight / jnp.sum(sample_weight)
            idx = jax.random.choice(kk, n, shape=(k,), replace=False, p=p)
            resp = jnp.zeros((n, k), x.dtype).at[idx, jnp.arange(k)].set(1.0)
        else:
            e = jax.random.exponential(kk, (n, k), x.dtype)
            resp = e / jnp.sum(e, axis=1, keepdims=True)
        resp = missing.label_init_responsibilities(resp, label_probs, labelled)
        params = m_step(expected_stats(resp, x, w), prior)
        if method == "points":
            params = params._replace(probs=0.25 + 0.5 * params.probs)
        return params

    return jax.vmap(one)(jax.random.split(key, num_init))


def _check_prior(prior, dtype) -> BernoulliMixturePrior | None:
    if prior is None:
        return None
    if not isinstance(prior, BernoulliMixturePrior):
        raise ValueError(
            f"prior must be a BernoulliMixturePrior or None; got {type(prior).__name__}."
        )
    for name, value in zip(prior._fields, prior, strict=True):
        v = np.asarray(value, np.float64)
        if v.shape != () or not np.isfinite(v) or v < 1:
            raise ValueError(
                f"prior.{name} must be a finite scalar >= 1 (1 means a flat prior; below 1 the "
                f"MAP estimate does not exist); got {value!r}."
            )
    return BernoulliMixturePrior(*(jnp.asarray(v, dtype) for v in prior))


def _check_init_params(init: BernoulliMixtureParams, k: int, d: int, dtype):
    w, p = (np.asarray(v, np.float64) for v in init)
    if w.shape != (k,) or p.shape != (k, d):
        raise ValueError(
            f"init params must have weights of shape ({k},) and probs of shape ({k}, {d}) to "
            f"match num_components and x; got {w.shape} and {p.shape}."
        )
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(p))):
        raise ValueError("init params contain NaN or infinite values.")
    if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6 or np.any(p < 0) or np.any(p > 1):
        raise ValueError(
            "init params must have non-negative weights summing to one and probs in [0, 1]."
        )
    return BernoulliMixtureParams(*(jnp.asarray(v, dtype)[None] for v in init))


def fit(
    key: Key[Array, ""],
    x,
    num_components: int,
    *,
    init: str | BernoulliMixtureParams = "points",
    prior: BernoulliMixturePrior | None = DEFAULT_PRIOR,
    sample_weight=None,
    max_iter: int = 100,
    tol: float = 1e-3,
    num_init: int = 1,
    chunk_size: int | None = None,
    observed=None,
    labels=None,
) -> em.FitResult:
    r"""Fits a Bernoulli mixture by (MAP-)EM on device, keeping the best of ``num_init`` runs.

    A thin call of the one driver :func:`emvi.em.fit`: the inputs are validated here, the
    ``num_init`` initialisations are drawn by :func:`init_params` (one key each, split from
    ``key``), and all restarts run as one vmapped program; the kept one has the highest log
    posterior, ``log_likelihood + log_prior(params, prior) / sum(sample_weight)`` (the
    objective MAP-EM climbs; the log-likelihood itself under ``prior=None``).

    The default prior is :data:`DEFAULT_PRIOR` (flat on the weights, Beta(1.2, 1.2) on each
    pixel probability, so held-out images never get :math:`-\infty`); ``prior=None`` is
    maximum likelihood.

    Args:
      key: a typed PRNG key (drives the initialisation).
      x: data in [0, 1] (binary images), shape (n, d); bool and integer arrays are cast to
        float32, floating arrays keep their dtype. Values strictly between 0 and 1 are
        allowed (a cross-entropy likelihood, see the module docstring).
      num_components: k, 1 <= k <= the number of rows with positive weight.
      init: ``"points"`` or ``"responsibilities"`` (see :func:`init_params`), or a
        :class:`BernoulliMixtureParams` to start from (then every restart would be the
        same, so one run is made and ``num_init`` is not used).
      prior: a :class:`BernoulliMixturePrior` (every field a scalar >= 1) or None.
      sample_weight: per-example weights (n,), >= 0 and not all zero; an integer weight
        counts a row that many times. None means ones.
      max_iter: the most EM iterations per restart (>= 1).
      tol: stop once the mean log-likelihood changes by less than this (>= 0; 0 runs
        exactly ``max_iter`` iterations).
      num_init: number of random restarts (>= 1).
      chunk_size: run the E-step over chunks of this many images (bounded memory).
      observed: optional (n, d) boolean mask, False where a pixel is missing. Missing
        pixels (there, and wherever ``x`` is NaN) are marginalised exactly
        (:func:`masked_e_step`): ``log_likelihood`` is then the mean log-probability of the
        observed pixels, and the initialisation sees the missing pixels filled with the
        observed column means. With nothing missing the fit is the ordinary one, bit for
        bit.
      labels: optional partial labels for semi-supervised EM, integers (n,) with -1 for
        unknown or (n, k) distributions with all-NaN rows for unknown
        (:func:`emvi.missing.check_labels`); labelled images keep those responsibilities
        and ``log_likelihood`` is the objective of :mod:`emvi.missing` per image. The
        start puts the labelled images in their components
        (:func:`emvi.missing.label_init_responsibilities`), so component j is class j. Not
        combined with missing pixels.

    Returns:
      An :class:`emvi.em.FitResult` (alias :data:`BernoulliMixtureFit`); its log posterior
      is ``log_likelihood + log_prior(params, prior) / sum(sample_weight)``.

    Raises:
      ValueError: if ``x`` is not a finite 2-D array with values in [0, 1], or any other
        argument is out of range.
    """
    key = _checks.as_key(key)
    arr, mask = missing.check_observed(x, observed)
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(
            "x must hold values in [0, 1] (binary pixels) for a Bernoulli mixture; got values "
            f"in [{arr.min()}, {arr.max()}]. Binarise or rescale the data first."
        )
    n, d = arr.shape
    dtype = arr.dtype
    w = _checks.check_sample_weight(sample_weight, n)
    n_pos = n if w is None else int(np.count_nonzero(w))
    k = _checks.check_positive_int(num_components, name="num_components")
    if k > n_pos:
        raise ValueError(
            f"num_components must be <= the number of points with positive weight ({n_pos}); "
            f"got {k}."
        )
    max_iter, tol, num_init, chunk_size = _checks.check_em_settings(
        max_iter=max_iter, tol=tol, num_init=num_init, chunk_size=chunk_size
    )
    prior = _check_prior(prior, dtype)
    lab = missing.check_labels(labels, n, k, dtype)
    if mask is not None and lab is not None:
        raise ValueError("labels cannot be combined with missing entries in x (yet).")
    if mask is not None:
        wts = np.ones(n) if w is None else w
        obs_w = wts[:, None] * mask
        if np.any(obs_w.sum(axis=0) <= 0):
            raise ValueError("x has a column whose observed entries all have weight 0.")
        col_mean = (obs_w * arr).sum(axis=0) / obs_w.sum(axis=0)
        arr = np.where(mask, arr, col_mean).astype(dtype)
    xj = jnp.asarray(arr)
    wj = None if w is None else jnp.asarray(w, dtype)
    if isinstance(init, BernoulliMixtureParams):
        p0 = _check_init_params(init, k, d, dtype)
    else:
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(
                f"init must be one of {list(INITS)} or a BernoulliMixtureParams; got {init!r}."
            )
        kw = dict(num_components=k, num_init=num_init, method=init)
        if lab is None:
            p0 = _init_batch(key, xj, prior, wj, **kw)
        else:
            p0 = _init_batch_labelled(key, xj, prior, wj, lab.label_probs, lab.labelled, **kw)
    mdl, data = model(), xj
    if mask is not None:
        mdl, data = masked_model(), missing.masked_data(arr, mask, dtype)
    elif lab is not None:
        mdl, data = missing.fixed_responsibilities(model()), lab._replace(data=xj)
    return em.fit(
        mdl,
        p0,
        data,
        wj,
        max_iter=max_iter,
        tol=jnp.asarray(tol, dtype),
        hyper=prior,
        chunk_size=chunk_size,
    )
