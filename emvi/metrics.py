r"""Diagnostics for amortized Gaussian posteriors.

The encoder gives :math:`q(z \mid x_i) = \mathcal N(m_i, \mathrm{diag}\, s_i^2)` and the
prior is :math:`\mathcal N(0, I)`. These metrics tell whether the latent code is used:

* :func:`posterior_mean_variance` and :func:`active_units` (Burda et al. 2016): a latent
  dimension is active when its posterior mean moves with x;
* :func:`kl_per_dim`: the average KL to the prior of each dimension (a collapsed
  dimension has KL near 0);
* :func:`mutual_information`: :math:`I(x; z)` under :math:`q(z \mid x) p_{data}(x)`.

Shape letters: ``n`` data points, ``l`` latent dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Key

from emvi import _checks
from emvi._checks import check_nonnegative
from emvi.elbo import standard_normal_kl


def _check_means(means) -> Array:
    return _checks.as_array(means, name="means", ndim=2)


def _check_means_scales(means, scales) -> tuple[Array, Array]:
    """Shapes and dtypes always; finite values and scales > 0 when concrete."""
    means = _check_means(means)
    scales = _checks.as_array(scales, name="scales", ndim=2)
    if means.shape != scales.shape:
        raise ValueError(
            f"means and scales must have the same shape (n, l); got {means.shape} and "
            f"{scales.shape}."
        )
    if _checks.is_concrete(scales) and not bool(np.all(np.asarray(scales) > 0)):
        raise ValueError("scales must be strictly positive (they are standard deviations).")
    return means, scales


def posterior_mean_variance(means: Float[Array, "n l"]) -> Float[Array, " l"]:
    r"""Variance over the data of the posterior mean, per latent dimension.

    .. math::
        A_j = \mathrm{Var}_{x}\big(E_{q(z \mid x)}[z_j]\big)
            = \frac1n \sum_{i=1}^{n} (m_{ij} - \bar m_j)^2,

    computed in two passes (centre, then square), with divisor n (ddof = 0).

    Args:
      means: posterior means :math:`m_i`, shape (n, l).

    Returns:
      Shape (l,).
    """
    means = _check_means(means)
    centred = means - jnp.mean(means, axis=0)[None, :]
    return jnp.mean(jnp.square(centred), axis=0)


def active_units(means: Float[Array, "n l"], *, threshold: float = 0.01) -> Int[Array, ""]:
    r"""Number of active latent dimensions (Burda et al. 2016).

    .. math::
        \mathrm{AU} = \#\{\, j : \mathrm{Var}_x(E_{q(z \mid x)}[z_j]) > \delta \,\},

    with :math:`\delta` = ``threshold`` (0.01 in the paper) and the variance from
    :func:`posterior_mean_variance`.

    Args:
      means: posterior means, shape (n, l).
      threshold: :math:`\delta \ge 0`, a Python number.

    Returns:
      An integer scalar array.

    Example:
      >>> means = jnp.stack([jnp.linspace(-1.0, 1.0, 5), jnp.full(5, 3.0)], axis=1)
      >>> int(active_units(means))
      1
    """
    threshold = check_nonnegative(threshold, name="threshold")
    means = _check_means(means)
    return jnp.sum(posterior_mean_variance(means) > threshold)


def kl_per_dim(means: Float[Array, "n l"], scales: Float[Array, "n l"]) -> Float[Array, " l"]:
    r"""Average over the data of each dimension's KL to the standard normal.

    .. math::
        \mathrm{KL}_j = \frac1n \sum_{i=1}^n \tfrac12\big(m_{ij}^2 + s_{ij}^2 - 1
            - 2 \log s_{ij}\big).

    The sum over j is the average KL term of the ELBO.

    Args:
      means: shape (n, l).
      scales: standard deviations (> 0), shape (n, l).

    Returns:
      Shape (l,).
    """
    means, scales = _check_means_scales(means, scales)
    # A trailing axis of size one turns the summed KL into a per-dimension one.
    per_point = standard_normal_kl(means[:, :, None], scales[:, :, None])
    return jnp.mean(per_point, axis=0)


def mutual_information(
    key: Key[Array, ""], means: Float[Array, "n l"], scales: Float[Array, "n l"]
) -> Float[Array, ""]:
    r"""Monte Carlo estimate of :math:`I(x; z)` under :math:`q(z \mid x) p_{data}(x)`.

    The aggregate posterior :math:`q(z) = E_x[q(z \mid x)]` is replaced by the mixture of
    the batch's posteriors, and one :math:`z_i \sim q(z \mid x_i)` is drawn per point
    (Hoffman & Johnson 2016; He et al. 2019):

    .. math::
        \hat I = \frac1n \sum_{i=1}^n \Big[\log q(z_i \mid x_i)
            - \log \frac1n \sum_{j=1}^n q(z_i \mid x_j)\Big].

    The estimate depends on the batch size n: since the j = i term is in the mixture,
    every summand is at most :math:`\log n`, so :math:`\hat I \le \log n` always (it is
    computed so that this holds exactly in floating point). It is 0 when all posteriors
    are equal, approaches :math:`\log n` when they are narrow and far apart, and can be
    slightly negative by Monte Carlo error. Cost O(n^2 l) time and memory.

    Args:
      key: a typed PRNG key.
      means: posterior means, shape (n, l).
      scales: posterior standard deviations (> 0), shape (n, l).

    Returns:
      A scalar in the dtype of ``means``.
    """
    key = _checks.as_key(key)
    means, scales = _check_means_scales(means, scales)
    n = means.shape[0]
    eps = jax.random.normal(key, means.shape, dtype=means.dtype)
    z = means + scales * eps
    # log q(z_i | x_j) up to the constant -l/2 log(2 pi), which cancels: shape (n_i, n_j).
    standardised = (z[:, None, :] - means[None, :, :]) / scales[None, :, :]
    log_dens = (
        -0.5 * jnp.sum(jnp.square(standardised), axis=-1)
        - jnp.sum(jnp.log(scales), axis=-1)[None, :]
    )
    # diag <= max <= logsumexp, so every term below is <= 0 in floating point too.
    terms = jnp.diagonal(log_dens) - jax.nn.logsumexp(log_dens, axis=1)
    return jnp.mean(terms) + math.log(n)
