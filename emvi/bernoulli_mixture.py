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

and the M-step is closed form. With the optional conjugate priors
:math:`\pi \sim \mathrm{Dir}(\alpha, \dots, \alpha)` and
:math:`\mu_{kj} \sim \mathrm{Beta}(a, b)` it returns the MAP estimate

.. math::
    \pi_k = \frac{N_k + \alpha - 1}{N + k(\alpha - 1)}, \qquad
    \mu_{kj} = \frac{S_{kj} + a - 1}{N_k + a + b - 2},

with :math:`N = \sum_k N_k`. :math:`\alpha = a = b = 1` (flat priors) is maximum
likelihood. With :math:`a, b > 1` every :math:`\mu_{kj}` lies strictly inside (0, 1), so
every binary vector has positive probability; under maximum likelihood a pixel that is
never on in a component gets :math:`\mu_{kj} = 0` and an unseen image that has it on gets
log-probability :math:`-\infty` (never NaN: see :func:`log_joint`). MAP-EM never lowers
the log-posterior :func:`log_prior` + :math:`\sum_i w_i \log p(x_i)`; with flat priors that
is the log-likelihood.

Data need not be binary: any :math:`x_{ij} \in [0, 1]` is accepted and enters the same
formulas (the Bernoulli log-likelihood is then a cross-entropy, not a normalised density).

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

from emvi import _checks, em
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

    ``alpha = a = b = 1`` is maximum likelihood; ``a = b = 2`` is Laplace (add-one)
    smoothing of the pixel probabilities.
    """

    alpha: Float[Array, ""] | float = 1.0
    a: Float[Array, ""] | float = 1.0
    b: Float[Array, ""] | float = 1.0


class BernoulliMixtureFit(NamedTuple):
    """What :func:`fit` returns (the best restart).

    Attributes:
      params: fitted parameters.
      log_likelihood: mean :math:`\\log p(x_i)` over the training data at ``params``.
      log_posterior: ``log_likelihood + log_prior(params, prior) / n``, the objective
        MAP-EM ascends (equal to ``log_likelihood`` under flat priors); restarts are ranked
        by it.
      history: (max_iter,) mean log-likelihood at the start of each iteration, NaN after
        ``num_iter``.
      num_iter: iterations run.
      converged: whether the stopping rule fired before ``max_iter``.
    """

    params: BernoulliMixtureParams
    log_likelihood: Float[Array, ""]
    log_posterior: Float[Array, ""]
    history: Float[Array, " t"]
    num_iter: Int[Array, ""]
    converged: Array


# ---------------------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------------------


def _log_bernoulli(x: Array, probs: Array) -> Array:
    """:math:`\\sum_j x_j \\log \\mu_{kj} + (1 - x_j) \\log(1 - \\mu_{kj})` as an (n, k) matmul.

    ``0 * log 0`` is taken as 0, and a pixel that is (partly) on where :math:`\\mu = 0` (or
    off where :math:`\\mu = 1`) makes the entry exactly ``-inf``; no NaN either way.
    """
    zero, one = probs <= 0, probs >= 1
    log_p = jnp.log(jnp.where(zero, 1.0, probs))
    log_1mp = jnp.log1p(-jnp.where(one, 0.0, probs))
    finite = x @ log_p.T + (1.0 - x) @ log_1mp.T
    impossible = x @ zero.astype(x.dtype).T + (1.0 - x) @ one.astype(x.dtype).T
    return jnp.where(impossible > 0, -jnp.inf, finite)


def log_joint(params: BernoulliMixtureParams, x: Float[Array, "n d"]) -> Float[Array, "n k"]:
    r"""Log-joint :math:`\log p(x_i, z = k) = \log \pi_k + \log p(x_i \mid z = k)`.

    .. math::
        \log p(x_i, z=k) = \log \pi_k + \sum_{j=1}^{d} \big[x_{ij} \log \mu_{kj}
            + (1 - x_{ij}) \log(1 - \mu_{kj})\big],

    computed as two (n, d) x (d, k) products. Probabilities of exactly 0 or 1 are allowed
    (maximum likelihood produces them): :math:`0 \log 0 = 0`, and an impossible
    (image, component) pair gets ``-inf`` rather than NaN.

    Args:
      params: mixture parameters (weights (k,), probs (k, d)).
      x: data in [0, 1], shape (n, d).

    Returns:
      Shape (n, k).
    """
    log_w = jnp.log(params.weights)
    return _log_bernoulli(x, params.probs) + log_w[None, :]


def log_prob(params: BernoulliMixtureParams, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r"""Marginal log-likelihood :math:`\log p(x_i) = \log \sum_k \pi_k p(x_i \mid z=k)`.

    Args:
      params: mixture parameters.
      x: data, shape (n, d).

    Returns:
      Shape (n,); ``-inf`` for an image that every component rules out.
    """
    return jax.nn.logsumexp(log_joint(params, x), axis=1)


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
    """
    return _safe_softmax(log_joint(params, x))


def elbo(
    params: BernoulliMixtureParams, q: Float[Array, "n k"], x: Float[Array, "n d"]
) -> Float[Array, " n"]:
    r"""Per-example ELBO :math:`\sum_k q_{ik} (\log p(x_i, k) - \log q_{ik})`.

    Equals :func:`log_prob` when ``q`` is :func:`posterior` and is below it otherwise, by
    :math:`\mathrm{KL}(q_i \,\|\, p(z \mid x_i))`.

    Args:
      params: mixture parameters.
      q: a distribution over components for each example, shape (n, k).
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    return discrete_elbo(log_joint(params, x), q)


def log_prior(
    params: BernoulliMixtureParams, prior: BernoulliMixturePrior | None = None
) -> Float[Array, ""]:
    r"""Unnormalised log prior density of the parameters (0 under flat priors).

    .. math::
        \log p(\pi, \mu) = (\alpha - 1)\sum_k \log \pi_k + \sum_{k,j} \big[(a - 1)\log\mu_{kj}
            + (b - 1) \log(1 - \mu_{kj})\big] + \text{const}.

    MAP-EM never decreases ``log_prior(params) + sum_i w_i log p(x_i)``. Terms with a zero
    coefficient vanish even where the parameter is 0 or 1.

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
# EM pieces
# ---------------------------------------------------------------------------------------


def expected_stats(
    q: Float[Array, "n k"], x: Float[Array, "n d"], weights: Float[Array, " n"]
) -> BernoulliMixtureStats:
    r"""Sufficient statistics expected under any responsibilities ``q`` (not only the posterior).

    .. math::
        N_k = \sum_i w_i q_{ik}, \qquad S_{kj} = \sum_i w_i q_{ik} x_{ij}.

    ``m_step(expected_stats(q, x, w), prior)`` maximises the ELBO of ``q`` over the
    parameters, for example with ``q`` from an amortized encoder.

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
    """
    lj = log_joint(params, x)
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
    + (N_k - S_{kj}) \log(1 - \mu_{kj})] + \log p(\pi, \mu)`. Under maximum likelihood a
    component with :math:`N_k = 0` has no data to estimate :math:`\mu_k` from; it then
    gets the pooled frequencies :math:`\sum_k S_{kj} / N` (and weight 0) instead of 0/0.

    Args:
      stats: summed statistics from :func:`e_step`.
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
    key_z, key_x = jax.random.split(key)
    z = jax.random.categorical(key_z, jnp.log(params.weights), shape=(num_samples,))
    x = jax.random.bernoulli(key_x, params.probs[z]).astype(params.probs.dtype)
    return x, z


@functools.cache
def model() -> em.ExactModel:
    """The Bernoulli mixture as an :class:`emvi.em.ExactModel` (one cached instance).

    ``hyper`` for the driver is a :class:`BernoulliMixturePrior` (or ``None``: maximum
    likelihood). The number of components and pixels come from the shapes of the params.

    Example:
      >>> x = jnp.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
      >>> p0 = BernoulliMixtureParams(jnp.array([0.5, 0.5]), jnp.array([[0.2, 0.7], [0.6, 0.4]]))
      >>> res = em.fit_em(model(), p0, x, max_iter=20, hyper=BernoulliMixturePrior(1.0, 2.0, 2.0))
      >>> res.params.probs.shape
      (2, 2)
    """
    return em.ExactModel(
        e_step=e_step,
        m_step=m_step,
        log_prob=log_prob,
        posterior=posterior,
        elbo=elbo,
        expected_stats=expected_stats,
    )


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
) -> BernoulliMixtureParams:
    r"""Random initial parameters.

    * ``"points"``: k distinct data points chosen at random, smoothed halfway towards 1/2,
      :math:`\mu_k = \tfrac14 + \tfrac12 x_{i_k}` (so every probability lies in [1/4, 3/4]),
      with uniform weights.
    * ``"responsibilities"``: responsibilities drawn uniformly at random on the simplex
      (Dirichlet(1)), followed by one M-step (with ``prior``).

    Args:
      key: a typed PRNG key.
      x: data, shape (n, d), n >= k.
      num_components: k (static).
      method: one of :data:`INITS`.
      prior: used by the ``"responsibilities"`` M-step.

    Returns:
      Parameters in the dtype of ``x``.
    """
    n = x.shape[0]
    k = num_components
    if method == "points":
        idx = jax.random.choice(key, n, shape=(k,), replace=False)
        probs = 0.25 + 0.5 * x[idx]
        return BernoulliMixtureParams(jnp.full((k,), 1.0 / k, x.dtype), probs)
    if method == "responsibilities":
        # Normalised standard exponentials are Dirichlet(1, ..., 1) draws.
        e = jax.random.exponential(key, (n, k), x.dtype)
        r = e / jnp.sum(e, axis=1, keepdims=True)
        return m_step(expected_stats(r, x, jnp.ones(n, x.dtype)), prior)
    raise ValueError(f"method must be one of {INITS}; got {method!r}.")


@functools.partial(
    jax.jit, static_argnames=("num_components", "num_init", "init", "max_iter", "chunk_size")
)
def _fit_device(key, x, prior, tol, *, num_components, num_init, init, max_iter, chunk_size):
    keys = jax.random.split(key, num_init)
    p0 = jax.vmap(lambda k_: init_params(k_, x, num_components, method=init, prior=prior))(keys)
    _, runs = em.run_em_restarts(
        model(), p0, x, max_iter=max_iter, tol=tol, hyper=prior, chunk_size=chunk_size
    )
    n = x.shape[0]
    objective = runs.log_likelihood + jax.vmap(lambda p: log_prior(p, prior))(runs.params) / n
    objective = jnp.where(jnp.isnan(objective), -jnp.inf, objective)
    best = jnp.argmax(objective)
    pick = functools.partial(jax.tree_util.tree_map, lambda leaf: leaf[best])
    r = pick(runs)
    return BernoulliMixtureFit(
        r.params, r.log_likelihood, objective[best], r.history, r.num_iter, r.converged
    )


def fit(
    key: Key[Array, ""],
    x,
    num_components: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    num_init: int = 1,
    init: str = "points",
    alpha: float = 1.0,
    a: float = 2.0,
    b: float = 2.0,
    chunk_size: int | None = None,
) -> BernoulliMixtureFit:
    r"""Fits a Bernoulli mixture by (MAP-)EM, on device, keeping the best of ``num_init`` runs.

    The defaults put a Beta(2, 2) prior on every pixel probability (Laplace smoothing,
    so held-out images never get :math:`-\infty`) and a flat prior on the weights; pass
    ``a=b=1`` for maximum likelihood. All restarts run as one vmapped program
    (:func:`emvi.em.run_em_restarts`); the one with the highest log-posterior (see
    :class:`BernoulliMixtureFit`) is returned.

    Args:
      key: a typed PRNG key (drives the initialisation).
      x: data in [0, 1] (binary images), shape (n, d); bool and integer arrays are cast to
        float32, floating arrays keep their dtype.
      num_components: k, 1 <= k <= n.
      max_iter: the most EM iterations per restart (>= 1).
      tol: stop once the mean log-likelihood changes by less than this (>= 0; 0 runs
        exactly ``max_iter`` iterations).
      num_init: number of random restarts (>= 1).
      init: ``"points"`` or ``"responsibilities"`` (see :func:`init_params`).
      alpha: Dirichlet concentration on the weights (>= 1).
      a, b: Beta prior on pixel probabilities (each >= 1).
      chunk_size: run the E-step over chunks of this many images (bounded memory).

    Returns:
      A :class:`BernoulliMixtureFit`.

    Raises:
      ValueError: if ``x`` is not a finite 2-D array with values in [0, 1], or any
        hyperparameter is out of range.
    """
    arr = _checks.as_data_matrix(x)
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(
            "x must hold values in [0, 1] (binary pixels) for a Bernoulli mixture; got values "
            f"in [{arr.min()}, {arr.max()}]. Binarise or rescale the data first."
        )
    n = arr.shape[0]
    k = _checks.check_positive_int(num_components, name="num_components")
    if k > n:
        raise ValueError(f"num_components must be <= the number of points ({n}); got {k}.")
    max_iter, tol, num_init, chunk_size = _checks.check_em_settings(
        max_iter=max_iter, tol=tol, num_init=num_init, chunk_size=chunk_size
    )
    _checks.check_choice(init, name="init", choices=INITS)
    for name, value in (("alpha", alpha), ("a", a), ("b", b)):
        v = float(value)
        if not np.isfinite(v) or v < 1:
            raise ValueError(
                f"{name} must be a finite number >= 1 (1 means a flat prior; below 1 the MAP "
                f"estimate does not exist); got {value!r}."
            )
    dtype = arr.dtype
    prior = BernoulliMixturePrior(*(jnp.asarray(v, dtype) for v in (alpha, a, b)))
    return _fit_device(
        key,
        jnp.asarray(arr),
        prior,
        jnp.asarray(tol, dtype),
        num_components=k,
        num_init=num_init,
        init=init,
        max_iter=max_iter,
        chunk_size=chunk_size,
    )
