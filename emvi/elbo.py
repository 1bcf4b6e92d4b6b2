r"""The evidence lower bound and its relatives, as pure functions.

For any distribution q over the latent z,

.. math::
    \log p(x) = \underbrace{E_q[\log p(x, z) - \log q(z)]}_{\mathrm{ELBO}(q)}
                + \mathrm{KL}(q(z) \,\|\, p(z \mid x)),

so the ELBO is a lower bound that touches log p(x) exactly when q is the posterior.

The module holds four groups of functions:

* finite latents: :func:`discrete_elbo`, :func:`categorical_kl` (what EM uses);
* Gaussian densities and KLs in closed form: :func:`std_normal_log_prob`,
  :func:`gaussian_kl`, :func:`standard_normal_kl`;
* the reparameterised ELBO of a diagonal Gaussian q, the one every Gaussian-latent model
  of emvi uses (the VAEs, the linear VAE, the grid's local E-step):
  :func:`gaussian_mc_elbo` for any joint, :func:`gaussian_elbo_terms` for its
  reconstruction and KL terms under a standard-normal prior, and :func:`reparameterize`
  (the draws both use);
* Monte Carlo bounds for any reparameterisable distrax q: :func:`mc_elbo`, the one IWAE
  estimator :func:`iwae_bound` and the dataset-level estimator
  :func:`estimate_log_likelihood`;
* the Gibbs variational principle on a finite space: :func:`gibbs_log_partition`,
  :func:`gibbs_objective`, :func:`tilted_distribution`.

Shape letters: ``n`` data points (``b`` for one chunk of them), ``l`` latent dim, ``s``
Monte Carlo samples, ``k`` values of a finite latent. Leading ``...`` are batch axes.

Distributions are distrax objects. distrax broadcasts with implicit rank promotion, so
every call into distrax here runs under ``jax.numpy_rank_promotion("allow")``; the
user's own callables (``log_likelihood_fn``, ``log_joint_fn``, ``posterior_fn``) are
called outside that context and see whatever setting is in force.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import distrax
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Key, Shaped

from emvi import _checks
from emvi._checks import check_positive_int

# ---------------------------------------------------------------------------------------
# Argument checks: shapes and dtypes always, values only for concrete (untraced) arrays
# ---------------------------------------------------------------------------------------


def _gaussian_args(mean, scale, *, names=("mean", "scale"), ndim=None, log_scale=False):
    """Checks a diagonal Gaussian's (mean, scale): float dtype, at least one axis (or
    exactly ``ndim``), equal shapes, finite values and, unless ``log_scale``, scale > 0."""
    mean = _checks.as_array(mean, name=names[0], ndim=ndim, min_ndim=1)
    scale = _checks.as_array(scale, name=names[1], ndim=ndim, min_ndim=1)
    _checks.check_same_shape((mean, names[0]), (scale, names[1]))
    if not log_scale:
        _checks.check_positive_array(scale, name=names[1], what=" (standard deviations)")
    return mean, scale


def _check_samples(num_samples, *, allow_none: bool = False):
    if num_samples is None and allow_none:
        return None
    return check_positive_int(num_samples, name="num_samples")


# ---------------------------------------------------------------------------------------
# Finite latents
# ---------------------------------------------------------------------------------------


def _xlogy_ratio(probs: Array, log_probs_q: Array, log_probs_p: Array) -> Array:
    """q * (log q - log p) with the convention 0 * anything = 0."""
    safe = jnp.where(probs > 0, log_probs_q - log_probs_p, 0.0)
    return jnp.where(probs > 0, probs * safe, 0.0)


def discrete_elbo(log_joint: Float[Array, "n k"], probs: Float[Array, "n k"]) -> Float[Array, " n"]:
    r"""Per-example ELBO for a finite latent variable.

    .. math::
        \mathrm{ELBO}_i(q) = \sum_k q_{ik} \big(\log p(x_i, z=k) - \log q_{ik}\big),

    with :math:`0 \log 0 = 0`, so a q that puts no mass on a component is allowed even
    where ``log_joint`` is ``-inf`` there.

    Args:
      log_joint: ``log p(x_i, z=k)``, shape (n, k).
      probs: ``q(z=k | x_i)``, rows summing to one, shape (n, k).

    Returns:
      The ELBO of each example, shape (n,). Equal to ``logsumexp(log_joint, axis=1)``
      (that is, log p(x_i)) when ``probs`` is the exact posterior ``softmax(log_joint)``.

    Example:
      >>> lj = jnp.log(jnp.array([[0.1, 0.3]]))
      >>> float(discrete_elbo(lj, jax.nn.softmax(lj, axis=1))[0])  # log 0.4
      -0.916...
    """
    log_q = jnp.log(jnp.where(probs > 0, probs, 1.0))
    safe_joint = jnp.where(probs > 0, log_joint, 0.0)
    return jnp.sum(jnp.where(probs > 0, probs * (safe_joint - log_q), 0.0), axis=-1)


def categorical_kl(
    probs_q: Float[Array, "... k"], log_probs_p: Float[Array, "... k"]
) -> Float[Array, "..."]:
    r"""KL(q || p) between categorical distributions, :math:`\sum_k q_k (\log q_k - \log p_k)`.

    Args:
      probs_q: probabilities of q (the last axis sums to one).
      log_probs_p: log-probabilities of p (normalised), same shape.
    """
    log_q = jnp.log(jnp.where(probs_q > 0, probs_q, 1.0))
    return jnp.sum(_xlogy_ratio(probs_q, log_q, log_probs_p), axis=-1)


# ---------------------------------------------------------------------------------------
# Gaussian densities and KLs
# ---------------------------------------------------------------------------------------

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def std_normal_log_prob(z: Float[Array, "*batch l"]) -> Float[Array, "*batch"]:
    r"""Log-density of the standard normal :math:`\mathcal N(0, I_l)`, summed over the last axis.

    .. math::
        \log \mathcal N(z; 0, I_l) = \sum_{j=1}^{l} \Big(-\frac{z_j^2}{2}
            - \frac12 \log 2\pi\Big).

    Args:
      z: points, shape (..., l).

    Returns:
      Shape (...), in the dtype of ``z``.

    Example:
      >>> float(std_normal_log_prob(jnp.zeros(2)))  # -log(2 pi)
      -1.837...
    """
    z = _checks.as_array(z, name="z", min_ndim=1)
    return jnp.sum(-0.5 * jnp.square(z) - _HALF_LOG_2PI, axis=-1)


def _gaussian_kl_terms(mean_diff_over_scale_p: Array, log_ratio: Array) -> Array:
    r"""Per-coordinate KL given :math:`\delta = (m_q - m_p)/s_p` and :math:`t = \log(s_q/s_p)`.

    :math:`\tfrac12(\delta^2 + e^{2t} - 1 - 2t)`, with :math:`e^{2t} - 1` taken by ``expm1``
    so that nearly equal scales do not lose every digit to cancellation.
    """
    return 0.5 * (jnp.square(mean_diff_over_scale_p) + jnp.expm1(2.0 * log_ratio) - 2.0 * log_ratio)


def gaussian_kl(
    mean_q: Float[Array, "*batch l"],
    scale_q: Float[Array, "*batch l"],
    mean_p: Float[Array, "*batch l"],
    scale_p: Float[Array, "*batch l"],
) -> Float[Array, "*batch"]:
    r"""KL between diagonal Gaussians, summed over the last axis.

    .. math::
        \mathrm{KL}\big(\mathcal N(m_q, \mathrm{diag}\, s_q^2) \,\|\,
                        \mathcal N(m_p, \mathrm{diag}\, s_p^2)\big)
        = \frac12 \sum_{j=1}^{l} \Big[\Big(\frac{m_{q,j} - m_{p,j}}{s_{p,j}}\Big)^2
          + e^{2 t_j} - 1 - 2 t_j\Big],
        \qquad t_j = \log s_{q,j} - \log s_{p,j}.

    The variance ratio enters only through the log-scale difference ``t`` (never through
    ``log(scale**2)`` of a tiny number), and :math:`e^{2t} - 1` is computed with ``expm1``.

    Args:
      mean_q: means of q, shape (..., l).
      scale_q: standard deviations of q (> 0), shape (..., l).
      mean_p: means of p, the same shape as ``mean_q`` (no broadcasting; pass
        ``jnp.broadcast_to`` explicitly if p is shared).
      scale_p: standard deviations of p (> 0), the same shape.

    Returns:
      The KL divergence, shape (...), in the dtype of the inputs.

    Example:
      >>> m, s = jnp.array([1.0]), jnp.array([2.0])
      >>> float(gaussian_kl(m, s, jnp.zeros(1), jnp.ones(1)))  # 0.5 (1 + 4 - 1 - 2 log 2)
      1.306...
    """
    mean_q, scale_q = _gaussian_args(mean_q, scale_q, names=("mean_q", "scale_q"))
    mean_p, scale_p = _gaussian_args(mean_p, scale_p, names=("mean_p", "scale_p"))
    _checks.check_same_shape((mean_q, "mean_q"), (mean_p, "mean_p"))
    log_ratio = jnp.log(scale_q) - jnp.log(scale_p)
    delta = (mean_q - mean_p) / scale_p
    return jnp.sum(_gaussian_kl_terms(delta, log_ratio), axis=-1)


def standard_normal_kl(
    mean: Float[Array, "*batch l"], scale: Float[Array, "*batch l"]
) -> Float[Array, "*batch"]:
    r"""KL from a diagonal Gaussian to the standard normal, summed over the last axis.

    .. math::
        \mathrm{KL}\big(\mathcal N(m, \mathrm{diag}\, s^2) \,\|\, \mathcal N(0, I)\big)
        = \frac12 \sum_{j=1}^{l} \big(m_j^2 + s_j^2 - 1 - 2 \log s_j\big).

    Args:
      mean: means, shape (..., l).
      scale: standard deviations (> 0), shape (..., l).

    Returns:
      The KL divergence, shape (...). Equals ``gaussian_kl(mean, scale, 0, 1)``.

    Raises:
      ValueError: for shapes that differ, non-finite values or a scale that is not > 0
        (values are checked only outside ``jit``).
    """
    mean, scale = _gaussian_args(mean, scale)
    return jnp.sum(_gaussian_kl_terms(mean, jnp.log(scale)), axis=-1)


# ---------------------------------------------------------------------------------------
# The reparameterised ELBO of a diagonal Gaussian q
# ---------------------------------------------------------------------------------------


def reparameterize(
    key: Key[Array, ""],
    mean: Float[Array, "n l"],
    scale: Float[Array, "n l"],
    num_samples: int | None,
) -> tuple[Float[Array, "*s n l"], Float[Array, "*s n l"]]:
    r"""Draws :math:`z_{si} = \mu_i + \sigma_i \odot \varepsilon_{si}` with
    :math:`\varepsilon_{si} \sim \mathcal N(0, I_l)`, differentiable in :math:`(\mu, \sigma)`.

    Sampling contract: ``eps = jax.random.normal(key, (num_samples, n, l), mean.dtype)``, so
    the same key gives the same :math:`\varepsilon` to every q of that shape (common random
    numbers). ``num_samples=None`` draws one z per example without the sample axis,
    ``eps = jax.random.normal(key, (n, l), mean.dtype)`` (the same numbers as
    ``num_samples=1``, whose sample axis has size one).

    Args:
      key: a typed PRNG key.
      mean, scale: :math:`\mu` and :math:`\sigma > 0`, shape (n, l).
      num_samples: S (static), or None.

    Returns:
      ``(z, eps)``, both of shape (S, n, l), or (n, l) for ``num_samples=None``.
    """
    key = _checks.as_key(key)
    mean, scale = _gaussian_args(mean, scale, ndim=2)
    num_samples = _check_samples(num_samples, allow_none=True)
    return _reparameterize(key, mean, scale, num_samples)


def _reparameterize(key, mean, scale, num_samples):
    if num_samples is None:
        eps = jax.random.normal(key, mean.shape, mean.dtype)
        return mean + scale * eps, eps
    eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
    return mean[None] + scale[None] * eps, eps


def _log_q_at_draws(eps: Array, log_scale: Array) -> Array:
    r""":math:`\log q(z)` at :math:`z = \mu + e^{s} \varepsilon`: the standard-normal density
    of :math:`\varepsilon` minus :math:`\sum_j s_j` (the Jacobian), shape (S, n)."""
    return std_normal_log_prob(eps) - jnp.sum(log_scale, axis=-1)[None, :]


def gaussian_mc_elbo(
    key: Key[Array, ""],
    log_joint_fn: Callable[[Float[Array, "s n l"]], Float[Array, "s n"]],
    mean: Float[Array, "n l"],
    log_scale: Float[Array, "n l"],
    *,
    num_samples: int,
) -> Float[Array, " n"]:
    r"""Reparameterised Monte Carlo ELBO of :math:`q_i = \mathcal N(\mu_i, \mathrm{diag}\,
    e^{2 s_i})` for every example.

    .. math::
        \widehat{\mathrm{ELBO}}_i = \frac1S \sum_{j=1}^{S} \log p(x_i, z_{ij})
            - \log q_i(z_{ij}), \qquad z_{ij} = \mu_i + e^{s_i} \odot \varepsilon_{ij},

    where :math:`\log q_i(z_{ij}) = \log \mathcal N(\varepsilon_{ij}; 0, I) - \sum_l s_{il}`
    is computed from the draws :math:`\varepsilon` (no subtraction :math:`z - \mu`, so no
    cancellation). Unbiased for the ELBO, and exactly :math:`\log p(x_i)` for every draw
    when q is the posterior. The draws follow :func:`reparameterize`'s contract: pass the
    same key to compare two q's with common random numbers.

    Args:
      key: a typed PRNG key.
      log_joint_fn: maps z of shape (S, n, l) to :math:`\log p(x_i, z_{s,i})`, shape (S, n).
      mean: :math:`\mu`, shape (n, l).
      log_scale: :math:`s = \log \sigma`, shape (n, l).
      num_samples: S >= 1 (static).

    Returns:
      Shape (n,).

    Example:
      >>> log_joint = lambda z: std_normal_log_prob(z)  # p(x, z) = N(z; 0, I), log p(x) = 0
      >>> m = jnp.zeros((3, 2))
      >>> bool(jnp.allclose(gaussian_mc_elbo(jax.random.key(0), log_joint, m, m,
      ...                                    num_samples=4), 0.0, atol=1e-6))
      True
    """
    key = _checks.as_key(key)
    mean, log_scale = _gaussian_args(
        mean, log_scale, names=("mean", "log_scale"), ndim=2, log_scale=True
    )
    num_samples = _check_samples(num_samples)
    z, eps = _reparameterize(key, mean, jnp.exp(log_scale), num_samples)
    return jnp.mean(log_joint_fn(z) - _log_q_at_draws(eps, log_scale), axis=0)


def gaussian_elbo_terms(
    key: Key[Array, ""],
    log_likelihood_fn: Callable[[Float[Array, "s n l"]], Float[Array, "s n"]],
    mean: Float[Array, "n l"],
    scale: Float[Array, "n l"],
    *,
    num_samples: int = 1,
    analytic_kl: bool = True,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    r"""The two terms of :func:`gaussian_mc_elbo` under the prior :math:`p(z) = \mathcal N(0, I)`.

    .. math::
        \mathrm{recon}_i = \frac1S \sum_{j} \log p(x_i \mid z_{ij}), \qquad
        \mathrm{kl}_i = \mathrm{KL}\big(q_i \,\|\, \mathcal N(0, I)\big),

    with :math:`z_{ij} = \mu_i + \sigma_i \odot \varepsilon_{ij}` drawn by
    :func:`reparameterize` and the KL in closed form (:func:`standard_normal_kl`), or, with
    ``analytic_kl=False``, estimated from the same draws,
    :math:`\frac1S \sum_j \log q_i(z_{ij}) - \log \mathcal N(z_{ij}; 0, I)`. Then
    ``recon - kl`` is the ELBO; with ``analytic_kl=False`` it equals
    ``gaussian_mc_elbo(key, lambda z: log_likelihood_fn(z) + std_normal_log_prob(z), mean,
    log(scale))`` (same draws). Objectives that weight the terms (beta-VAE, KL annealing,
    free bits) need them apart.

    Args:
      key: a typed PRNG key.
      log_likelihood_fn: maps z of shape (S, n, l) to :math:`\log p(x_i \mid z_{s,i})`,
        shape (S, n).
      mean: :math:`\mu`, shape (n, l).
      scale: :math:`\sigma > 0`, shape (n, l).
      num_samples: S >= 1 (static).
      analytic_kl: closed-form KL (True) or the sampled log-ratio (False).

    Returns:
      ``(recon, kl)``, each of shape (n,).
    """
    key = _checks.as_key(key)
    mean, scale = _gaussian_args(mean, scale, ndim=2)
    num_samples = _check_samples(num_samples)
    z, eps = _reparameterize(key, mean, scale, num_samples)
    recon = jnp.mean(log_likelihood_fn(z), axis=0)
    if analytic_kl:
        kl = standard_normal_kl(mean, scale)
    else:
        log_q = _log_q_at_draws(eps, jnp.log(scale))
        kl = jnp.mean(log_q - std_normal_log_prob(z), axis=0)
    return recon, kl


# ---------------------------------------------------------------------------------------
# Monte Carlo bounds for any reparameterisable distrax q
# ---------------------------------------------------------------------------------------


def _distrax_context():
    """distrax broadcasts by implicit rank promotion; allow it for distrax calls only."""
    return jax.numpy_rank_promotion("allow")


def _check_fn_output(values: Array, expected: tuple[int, ...], name: str) -> None:
    if tuple(values.shape) != tuple(expected):
        raise ValueError(
            f"{name} must return an array of shape (num_samples, batch) = {expected}; "
            f"got shape {tuple(values.shape)}."
        )


def _check_posterior(posterior: distrax.Distribution) -> tuple[int, ...]:
    if not isinstance(posterior, distrax.Distribution):
        raise ValueError(
            "posterior must be a distrax distribution (e.g. distrax.MultivariateNormalDiag("
            f"mean, scale)); got {type(posterior).__name__}."
        )
    for name in ("loc", "scale_diag"):
        value = getattr(posterior, name, None)
        if value is not None and hasattr(value, "dtype"):
            _checks.as_array(value, name=f"posterior.{name}", min_ndim=1)
            if name == "scale_diag":
                _checks.check_positive_array(value, name="posterior.scale_diag")
    batch_shape = tuple(posterior.batch_shape)
    if len(batch_shape) != 1 or len(tuple(posterior.event_shape)) != 1:
        raise ValueError(
            "posterior must have batch shape (n,) and event shape (l,), e.g. "
            "distrax.MultivariateNormalDiag(mean, scale) with mean of shape (n, l); got "
            f"batch shape {batch_shape} and event shape {tuple(posterior.event_shape)}."
        )
    return batch_shape


def mc_elbo(
    key: Key[Array, ""],
    posterior: distrax.Distribution,
    log_likelihood_fn: Callable[[Float[Array, "s n l"]], Float[Array, "s n"]],
    prior: distrax.Distribution,
    *,
    num_samples: int = 1,
    analytic_kl: bool = True,
) -> Float[Array, " n"]:
    r"""Reparameterised Monte Carlo estimate of the per-example ELBO.

    With :math:`z_{s} \sim q(z \mid x_i)` drawn by reparameterisation (so gradients flow
    to the parameters of q) and ``analytic_kl=True``:

    .. math::
        \widehat{\mathrm{ELBO}}_i = \frac1S \sum_{s=1}^S \log p(x_i \mid z_s)
            - \mathrm{KL}\big(q(z \mid x_i) \,\|\, p(z)\big),

    and with ``analytic_kl=False`` the KL is estimated from the same samples:

    .. math::
        \widehat{\mathrm{ELBO}}_i = \frac1S \sum_{s=1}^S \big[\log p(x_i \mid z_s)
            + \log p(z_s) - \log q(z_s \mid x_i)\big].

    Both are unbiased for the same ELBO; the first has lower variance when the KL is known.

    Args:
      key: a typed PRNG key (``jax.random.key``).
      posterior: q(z|x) as a distrax distribution with batch shape (n,) and event shape
        (l,), e.g. ``distrax.MultivariateNormalDiag(mean, scale)``. Samples are drawn
        with ``posterior.sample(seed=key, sample_shape=(num_samples,))``.
      log_likelihood_fn: maps z of shape (s, n, l) to ``log p(x_i | z_{s,i})``, shape
        (s, n).
      prior: p(z), a distrax distribution whose ``log_prob`` broadcasts over (s, n, l)
        samples, e.g. ``MultivariateNormalDiag(jnp.zeros(l), jnp.ones(l))``. With
        ``analytic_kl=True`` distrax must know ``KL(posterior || prior)`` in closed form.
      num_samples: S >= 1, a static Python int.
      analytic_kl: use the closed-form KL (True) or the sampled log-ratio (False).

    Returns:
      The ELBO estimate per example, shape (n,), in the dtype of the posterior.

    Raises:
      ValueError: if ``num_samples < 1``, if the posterior's shapes are not (n,)/(l,), if
        ``log_likelihood_fn`` returns the wrong shape, or if ``analytic_kl=True`` and distrax
        has no closed-form KL for the (posterior, prior) pair.

    Example:
      >>> q = distrax.MultivariateNormalDiag(jnp.zeros((3, 2)), jnp.ones((3, 2)))
      >>> p = distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2))
      >>> loglik = lambda z: -0.5 * jnp.sum(z**2, axis=-1)
      >>> mc_elbo(jax.random.key(0), q, loglik, p, num_samples=4).shape
      (3,)
    """
    key = _checks.as_key(key)
    num_samples = check_positive_int(num_samples, name="num_samples")
    batch_shape = _check_posterior(posterior)
    with _distrax_context():
        z = posterior.sample(seed=key, sample_shape=(num_samples,))
    log_lik = log_likelihood_fn(z)
    _check_fn_output(log_lik, (num_samples, *batch_shape), "log_likelihood_fn")
    if analytic_kl:
        try:
            with _distrax_context():
                kl = posterior.kl_divergence(prior)
        except NotImplementedError as err:
            raise ValueError(
                f"analytic_kl=True needs a closed-form KL between {type(posterior).__name__} "
                f"and {type(prior).__name__}, which distrax does not provide ({err}); pass "
                "analytic_kl=False to estimate it by Monte Carlo."
            ) from err
        kl = jnp.broadcast_to(kl, batch_shape)
        out = jnp.mean(log_lik, axis=0) - kl
    else:
        with _distrax_context():
            log_ratio = prior.log_prob(z) - posterior.log_prob(z)
        out = jnp.mean(log_lik + log_ratio, axis=0)
    return out.astype(posterior.dtype)


def _iwae_log_sum(
    keys: Array,
    posterior: distrax.Distribution,
    log_joint_fn: Callable,
    batch_shape: tuple[int, ...],
    chunk_size: int,
) -> Array:
    """log sum_j w_j over the samples drawn with ``keys`` (one key per sample), in chunks.

    Sample j is ``posterior.sample(seed=keys[j])``, whatever the chunking, so the result
    depends on ``chunk_size`` only through floating-point rounding of the running
    logsumexp. When ``chunk_size`` does not divide the number of samples, the last chunk
    is filled up by repeating the last key and the extra samples get weight zero (their
    log-weight is set to -inf), so one compiled chunk body serves every chunk.
    """
    num_samples = keys.shape[0]

    def chunk_log_sum(chunk_keys, valid):
        with _distrax_context():
            z = jax.vmap(lambda k: posterior.sample(seed=k))(chunk_keys)
        log_joint = log_joint_fn(z)
        _check_fn_output(log_joint, (chunk_keys.shape[0], *batch_shape), "log_joint_fn")
        with _distrax_context():
            log_w = log_joint - posterior.log_prob(z)
        log_w = jnp.where(valid[:, None], log_w, -jnp.inf)
        return jax.nn.logsumexp(log_w, axis=0)

    if chunk_size >= num_samples:
        return chunk_log_sum(keys, jnp.ones(num_samples, dtype=bool))

    num_chunks = -(-num_samples // chunk_size)
    slots = jnp.arange(num_chunks * chunk_size)
    chunk_keys = keys[jnp.minimum(slots, num_samples - 1)].reshape(num_chunks, chunk_size)
    valid = (slots < num_samples).reshape(num_chunks, chunk_size)
    # Rematerialise each chunk in the backward pass too: memory stays O(chunk_size).
    chunk_fn = jax.checkpoint(chunk_log_sum)
    out = jax.eval_shape(chunk_fn, chunk_keys[0], valid[0])
    init = jnp.full(out.shape, -jnp.inf, dtype=out.dtype)

    def body(running, xs):
        return jnp.logaddexp(running, chunk_fn(*xs)), None

    total, _ = lax.scan(body, init, (chunk_keys, valid))
    return total


def iwae_bound(
    key: Key[Array, ""],
    posterior: distrax.Distribution,
    log_joint_fn: Callable[[Float[Array, "s n l"]], Float[Array, "s n"]],
    *,
    num_samples: int,
    chunk_size: int | None = None,
) -> Float[Array, " n"]:
    r"""Per-example importance-weighted bound (IWAE, Burda et al. 2016).

    .. math::
        \mathrm{IWAE}_S(x_i) = \log \frac1S \sum_{j=1}^{S}
            \frac{p(x_i, z_{j})}{q(z_{j} \mid x_i)}, \qquad z_{j} \sim q(z \mid x_i),

    computed with ``logsumexp`` over the samples of each example separately (never pooled
    across the minibatch). In expectation
    :math:`\mathrm{ELBO} = \mathrm{IWAE}_1 \le \mathrm{IWAE}_S \le \mathrm{IWAE}_{S'}
    \le \log p(x_i)` for :math:`S \le S'`, and every sample gives exactly
    :math:`\log p(x_i)` when q is the exact posterior.

    Sampling contract: the keys are ``jax.random.split(key, num_samples)`` and sample j is
    ``posterior.sample(seed=keys[j])`` (one draw for the whole batch). Hence the same key
    gives the same samples for every ``chunk_size``: results with different chunk sizes
    agree up to the rounding of the running logsumexp (about 1e-15 relative in float64).

    Args:
      key: a typed PRNG key.
      posterior: q(z|x), a distrax distribution with batch shape (n,), event shape (l,),
        whose samples are reparameterised.
      log_joint_fn: maps z of shape (s, n, l) to ``log p(x_i, z_{s,i})``, shape (s, n).
      num_samples: S >= 1, a static Python int.
      chunk_size: if given (>= 1), samples are processed ``chunk_size`` at a time in a
        ``lax.scan`` keeping a running logsumexp, so only (chunk_size, n, l) samples are
        alive at once (forward and, by rematerialisation, backward). If ``chunk_size``
        does not divide ``num_samples``, the last chunk is padded with masked-out
        (zero-weight) samples. ``None`` means one chunk of all samples.

    Returns:
      The bound per example, shape (n,), in the dtype of the posterior.

    Raises:
      ValueError: if ``num_samples < 1`` or ``chunk_size < 1``, or on wrong shapes.

    Example:
      >>> q = distrax.MultivariateNormalDiag(jnp.zeros((3, 2)), jnp.ones((3, 2)))
      >>> log_joint = std_normal_log_prob  # p(x, z) = N(z; 0, I), so log p(x) = 0
      >>> bound = iwae_bound(jax.random.key(0), q, log_joint, num_samples=8, chunk_size=3)
      >>> bool(jnp.allclose(bound, 0.0, atol=1e-5))  # q is the posterior and log p(x) = 0
      True
    """
    key = _checks.as_key(key)
    num_samples = check_positive_int(num_samples, name="num_samples")
    if chunk_size is None:
        chunk_size = num_samples
    chunk_size = min(check_positive_int(chunk_size, name="chunk_size"), num_samples)
    batch_shape = _check_posterior(posterior)
    keys = jax.random.split(key, num_samples)
    log_sum = _iwae_log_sum(keys, posterior, log_joint_fn, batch_shape, chunk_size)
    return (log_sum - math.log(num_samples)).astype(posterior.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("posterior_fn", "log_joint_fn", "num_samples", "sample_chunk", "data_chunk"),
)
def _estimate_log_likelihood(
    key, x, posterior_fn, log_joint_fn, num_samples, sample_chunk, data_chunk
):
    n = x.shape[0]
    num_batches = -(-n // data_chunk)
    pad = num_batches * data_chunk - n
    # Pad by repeating the last row (valid data, so no spurious NaN); padded rows are
    # computed and then dropped.
    x_padded = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    x_batches = x_padded.reshape(num_batches, data_chunk, *x.shape[1:])
    index_batches = jnp.arange(num_batches * data_chunk).reshape(num_batches, data_chunk)

    def one_example(x_i, i):
        x_one = x_i[None]
        posterior = posterior_fn(x_one)
        batch_shape = _check_posterior(posterior)
        keys = jax.random.split(jax.random.fold_in(key, i), num_samples)
        log_sum = _iwae_log_sum(
            keys, posterior, lambda z: log_joint_fn(x_one, z), batch_shape, sample_chunk
        )
        return log_sum[0].astype(posterior.dtype)

    def one_batch(args):
        xs, idx = args
        return jax.vmap(one_example)(xs, idx)

    values = lax.map(one_batch, (x_batches, index_batches))
    return values.reshape(num_batches * data_chunk)[:n] - math.log(num_samples)


def estimate_log_likelihood(
    key: Key[Array, ""],
    x: Shaped[Array, "n ..."],
    posterior_fn: Callable[[Array], distrax.Distribution],
    log_joint_fn: Callable[[Array, Array], Array],
    *,
    num_samples: int = 5000,
    sample_chunk: int = 500,
    data_chunk: int = 256,
) -> Float[Array, " n"]:
    r"""IWAE estimate of :math:`\log p(x_i)` for every point of a dataset, in bounded memory.

    .. math::
        \widehat{\log p}(x_i) = \log \frac1S \sum_{j=1}^{S}
            \frac{p(x_i, z_{ij})}{q(z_{ij} \mid x_i)}, \qquad z_{ij} \sim q(z \mid x_i),

    a lower bound in expectation that tightens as S grows (the standard test-set
    log-likelihood of a VAE with S = 5000). The dataset is cut into chunks of
    ``data_chunk`` points (the last one padded and the padding dropped), chunks are
    visited with ``lax.map`` and samples with a ``lax.scan`` of ``sample_chunk`` at a
    time, so at most (sample_chunk, data_chunk, l) samples are alive, and the whole
    estimate is one compiled program.

    Exact definition (what the result equals, whatever the chunk sizes): entry i is

    ``iwae_bound(jax.random.fold_in(key, i), posterior_fn(x[i:i+1]),
    lambda z: log_joint_fn(x[i:i+1], z), num_samples=num_samples)[0]``

    up to logsumexp rounding, so results do not depend on ``data_chunk`` or
    ``sample_chunk``. Each example is processed on its own (a batch of one, vmapped over
    the chunk), so ``posterior_fn`` and ``log_joint_fn`` must treat batch rows
    independently (no batch statistics) and be vmappable.

    Args:
      key: a typed PRNG key.
      x: the data, shape (n, ...).
      posterior_fn: maps a batch ``x_b`` of shape (b, ...) to q(z|x_b), a distrax
        distribution with batch shape (b,) and event shape (l,).
      log_joint_fn: maps ``(x_b, z)`` with z of shape (s, b, l) to ``log p(x_b, z)``,
        shape (s, b).
      num_samples: S >= 1 importance samples per point.
      sample_chunk: samples per scan step (>= 1; clipped to S).
      data_chunk: points per ``lax.map`` step (>= 1; clipped to n).

    Returns:
      The estimate per point, shape (n,).

    Raises:
      ValueError: for ``num_samples``, ``sample_chunk`` or ``data_chunk`` below 1, empty
        or non-finite ``x``.
    """
    key = _checks.as_key(key)
    num_samples = check_positive_int(num_samples, name="num_samples")
    sample_chunk = check_positive_int(sample_chunk, name="sample_chunk")
    data_chunk = check_positive_int(data_chunk, name="data_chunk")
    x = _checks.as_array(x, name="x", min_ndim=1)
    if x.shape[0] < 1:
        raise ValueError(f"x must have at least one row (shape (n, ...)); got shape {x.shape}.")
    return _estimate_log_likelihood(
        key,
        x,
        posterior_fn,
        log_joint_fn,
        num_samples,
        min(sample_chunk, num_samples),
        min(data_chunk, x.shape[0]),
    )


# ---------------------------------------------------------------------------------------
# Gibbs variational principle (finite spaces)
# ---------------------------------------------------------------------------------------


def gibbs_log_partition(
    g: Float[Array, "*batch k"], log_eta: Float[Array, "*batch k"]
) -> Float[Array, "*batch"]:
    r"""The log-partition :math:`\log E_\eta[e^g]` on a finite space.

    .. math::
        \log E_{\eta}\big[e^{g}\big] = \log \sum_{k} \eta_k e^{g_k}
            = \operatorname{logsumexp}_k (g_k + \log \eta_k).

    With :math:`\eta` the prior and :math:`g(z) = \log p(x \mid z)` this is
    :math:`\log p(x)`.

    Args:
      g: the function g on the k points, shape (..., k).
      log_eta: log-probabilities of the reference measure :math:`\eta` (normalised;
        ``-inf`` allowed), shape (..., k).

    Returns:
      Shape (...).
    """
    return jax.nn.logsumexp(g + log_eta, axis=-1)


def tilted_distribution(
    g: Float[Array, "*batch k"], log_eta: Float[Array, "*batch k"]
) -> Float[Array, "*batch k"]:
    r"""The Gibbs (tilted) measure, the maximiser in the Gibbs variational principle.

    .. math::
        \xi^*_k = \frac{\eta_k e^{g_k}}{E_\eta[e^g]} = \operatorname{softmax}_k(g_k + \log \eta_k).

    With :math:`\eta` the prior and :math:`g = \log p(x \mid z)` this is the exact posterior.

    Args:
      g: shape (..., k).
      log_eta: normalised log-probabilities of :math:`\eta`, shape (..., k).

    Returns:
      Probabilities, shape (..., k), summing to one over the last axis.
    """
    return jax.nn.softmax(g + log_eta, axis=-1)


def gibbs_objective(
    probs_xi: Float[Array, "*batch k"],
    g: Float[Array, "*batch k"],
    log_eta: Float[Array, "*batch k"],
) -> Float[Array, "*batch"]:
    r"""The Gibbs variational objective :math:`E_\xi[g] - \mathrm{KL}(\xi \| \eta)`.

    .. math::
        \log E_\eta[e^g] = \sup_{\xi} \big\{E_\xi[g] - \mathrm{KL}(\xi \,\|\, \eta)\big\},

    and for every :math:`\xi` the gap is exactly a KL to the tilted measure:

    .. math::
        \log E_\eta[e^g] - \big(E_\xi[g] - \mathrm{KL}(\xi \,\|\, \eta)\big)
            = \mathrm{KL}(\xi \,\|\, \xi^*).

    With :math:`\eta` the prior and :math:`g = \log p(x \mid z)` the objective is the ELBO
    of :math:`q = \xi`. Points where :math:`\xi_k = 0` contribute nothing (even if
    :math:`g_k` or :math:`\log \eta_k` is ``-inf`` there).

    Args:
      probs_xi: probabilities of :math:`\xi`, shape (..., k).
      g: shape (..., k).
      log_eta: normalised log-probabilities of :math:`\eta`, shape (..., k).

    Returns:
      Shape (...).

    Example:
      >>> g, log_eta = jnp.array([0.0, 1.0]), jnp.log(jnp.array([0.5, 0.5]))
      >>> xi = tilted_distribution(g, log_eta)
      >>> bool(jnp.isclose(gibbs_objective(xi, g, log_eta), gibbs_log_partition(g, log_eta)))
      True
    """
    expected_g = jnp.sum(probs_xi * jnp.where(probs_xi > 0, g, 0.0), axis=-1)
    return expected_g - categorical_kl(probs_xi, log_eta)
