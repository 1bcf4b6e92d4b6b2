r"""The linear-Gaussian VAE: a VAE whose ELBO, optimum and gap are all in closed form.

Generative model (the decoder) and amortized posterior (the encoder):

.. math::
    z \sim \mathcal N(0, I_l), \qquad x \mid z \sim \mathcal N(W z + \mu, \sigma^2 I_d),
    \qquad q(z \mid x) = \mathcal N\big(V (x - \mu),\ \mathrm{diag}(s^2)\big),

with a linear encoder mean and a diagonal covariance that does not depend on x (the
setting of Lucas, Tucker, Grosse & Norouzi, 2019, "Don't Blame the ELBO!"). The decoder
is probabilistic PCA (:mod:`emvi.linear_gaussian` with ``noise="isotropic"``), so
:math:`\log p(x)` is exact, and because q is Gaussian and the likelihood is Gaussian in z
the ELBO needs no sampling (it is :func:`emvi.linear_gaussian.elbo` at the encoder's q): with
:math:`c = x - \mu`, :math:`m = V c` and :math:`w_j` the j-th column of W,

.. math::
    \mathrm{ELBO}(x) = -\frac d2 \log(2\pi\sigma^2)
        - \frac{1}{2\sigma^2}\Big(\|c - W m\|^2 + \sum_j s_j^2 \|w_j\|^2\Big)
        - \frac12 \sum_j \big(s_j^2 + m_j^2 - 1 - \log s_j^2\big).

The E-step has a closed form too. With :math:`M = W^\top W + \sigma^2 I_l` the exact
posterior is :math:`\mathcal N(M^{-1} W^\top c, \sigma^2 M^{-1})`; the best q of the
family above (:func:`optimal_encoder`) has :math:`V = M^{-1} W^\top` and
:math:`s_j^2 = \sigma^2 / M_{jj}` (the reciprocal diagonal of the posterior precision),
and its gap is the same for every x,

.. math::
    \log p(x) - \mathrm{ELBO}(x) = \mathrm{KL}(q \,\|\, p(z \mid x))
        = \frac12\Big(\sum_j \log M_{jj} - \log |M|\Big) \ \ge 0

(Hadamard's inequality), zero exactly when the columns of W are orthogonal. The
maximum-likelihood W is unique only up to a rotation of z, and one of those rotations has
orthogonal columns, so the global maximum of the ELBO *is* the maximum of the
likelihood: the VAE loses nothing to its diagonal posterior at the optimum.

Shape letters: ``n`` data points, ``d`` data dim, ``l`` latent dim, ``s`` Monte Carlo
samples.

Example:
  >>> x = jax.random.normal(jax.random.key(0), (50, 5))
  >>> params = init_params(jax.random.key(1), x, 2)
  >>> bool(jnp.all(elbo(params, x) <= log_prob(params, x)))
  True
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Key

from emvi import _checks, linear_gaussian
from emvi.elbo import gaussian_mc_elbo
from emvi.linear_gaussian import GaussianPosterior, LinearGaussianParams


class LinearVAEParams(NamedTuple):
    """Parameters of the linear-Gaussian VAE (unconstrained: scales as logarithms).

    Attributes:
      encoder_weight: :math:`V`, shape (l, d); the encoder mean is :math:`V (x - \\mu)`.
      encoder_log_scale: :math:`\\log s`, shape (l,); q's standard deviations, shared by
        every x.
      loadings: :math:`W`, shape (d, l).
      mean: :math:`\\mu`, shape (d,), shared by encoder and decoder.
      log_noise_variance: :math:`\\log \\sigma^2`, a scalar.
    """

    encoder_weight: Float[Array, "l d"]
    encoder_log_scale: Float[Array, " l"]
    loadings: Float[Array, "d l"]
    mean: Float[Array, " d"]
    log_noise_variance: Float[Array, ""]


def decoder(params: LinearVAEParams) -> LinearGaussianParams:
    """The decoder as (isotropic) pPCA parameters (W, mu, sigma^2): the model whose log p(x)
    is exact."""
    return LinearGaussianParams(params.loadings, params.mean, jnp.exp(params.log_noise_variance))


def encode(
    params: LinearVAEParams, x: Float[Array, "n d"]
) -> tuple[Float[Array, "n l"], Float[Array, " l"]]:
    """Mean (n, l) and standard deviations (l,) of q(z | x)."""
    m = (x - params.mean[None, :]) @ params.encoder_weight.T
    return m, jnp.exp(params.encoder_log_scale)


def encoder_posterior(params: LinearVAEParams, x: Float[Array, "n d"]) -> GaussianPosterior:
    """q(z | x) as a :class:`emvi.linear_gaussian.GaussianPosterior` (means (n, l), the
    shared diagonal covariance broadcast to (n, l, l))."""
    m, s = encode(params, x)
    return GaussianPosterior(
        m, jnp.broadcast_to(jnp.diag(s**2), (x.shape[0], s.shape[0], s.shape[0]))
    )


def elbo(params: LinearVAEParams, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r"""The ELBO of every example, in closed form (no sampling).

    .. math::
        \mathrm{ELBO}(x) = -\frac d2 \log(2\pi\sigma^2)
            - \frac{\|c - W m\|^2 + \sum_j s_j^2 \|w_j\|^2}{2\sigma^2}
            - \frac12 \sum_j \big(s_j^2 + m_j^2 - 1 - \log s_j^2\big),
        \qquad c = x - \mu,\ m = V c:

    the linear-Gaussian model's closed-form ELBO (:func:`emvi.linear_gaussian.elbo`) at the
    decoder's parameters and the encoder's q (:func:`encoder_posterior`). The first two terms
    are :math:`E_q[\log p(x \mid z)]`, the last :math:`-\mathrm{KL}(q \,\|\, \mathcal N(0, I))`.

    Args:
      params: the VAE's parameters.
      x: data, shape (n, d).

    Returns:
      Shape (n,).
    """
    return linear_gaussian.elbo(decoder(params), encoder_posterior(params, x), x)


def mc_elbo(
    key: Key[Array, ""],
    params: LinearVAEParams,
    x: Float[Array, "n d"],
    *,
    num_samples: int = 1,
) -> Float[Array, " n"]:
    r"""A reparameterised Monte Carlo estimate of :func:`elbo` (what a generic VAE computes).

    .. math::
        \widehat{\mathrm{ELBO}}(x) = \frac1S \sum_{t=1}^S \big[\log p(x \mid z_t)
            + \log p(z_t) - \log q(z_t \mid x)\big], \qquad z_t = m + s \odot \epsilon_t,

    unbiased for :func:`elbo`; every term is sampled (no analytic KL), so it is the
    estimator a model-agnostic VAE would use (:func:`emvi.elbo.gaussian_mc_elbo` with the
    joint :func:`emvi.linear_gaussian.log_joint`).

    Args:
      key: a typed PRNG key.
      params: the VAE's parameters.
      x: data, shape (n, d).
      num_samples: S >= 1 (static).

    Returns:
      Shape (n,).
    """
    key = _checks.as_key(key)
    m, _ = encode(params, x)
    log_s = jnp.broadcast_to(params.encoder_log_scale, m.shape)
    dec = decoder(params)
    return gaussian_mc_elbo(
        key, lambda z: linear_gaussian.log_joint(dec, x, z), m, log_s, num_samples=num_samples
    )


def log_prob(params: LinearVAEParams, x: Float[Array, "n d"]) -> Float[Array, " n"]:
    r"""Exact :math:`\log p(x) = \log \mathcal N(x \mid \mu, W W^\top + \sigma^2 I)` of the
    decoder (:func:`emvi.linear_gaussian.log_prob`)."""
    return linear_gaussian.log_prob(decoder(params), x)


def _gram(params: LinearVAEParams) -> Array:
    """:math:`M = W^\\top W + \\sigma^2 I_l`, shape (l, l)."""
    w = params.loadings
    eye = jnp.eye(w.shape[1], dtype=w.dtype)
    return w.T @ w + jnp.exp(params.log_noise_variance) * eye


def optimal_encoder(params: LinearVAEParams) -> LinearVAEParams:
    r"""The best encoder of the family for the current decoder (the closed-form E-step).

    .. math::
        V = M^{-1} W^\top, \qquad s_j^2 = \sigma^2 / M_{jj}, \qquad M = W^\top W + \sigma^2 I.

    V gives the exact posterior mean for every x; :math:`s_j^2` is the reciprocal of the
    j-th diagonal entry of the posterior precision :math:`M / \sigma^2`, which minimises
    :math:`\mathrm{KL}(q \,\|\, p(z \mid x))` over diagonal covariances. When M is diagonal
    (orthogonal columns of W) q is the exact posterior.

    Args:
      params: parameters whose decoder is kept.

    Returns:
      The same decoder with the optimal encoder.
    """
    gram = _gram(params)
    v = jnp.linalg.solve(gram, params.loadings.T)
    log_s = 0.5 * (params.log_noise_variance - jnp.log(jnp.diagonal(gram)))
    return params._replace(encoder_weight=v, encoder_log_scale=log_s)


def diagonal_family_gap(decoder_params: LinearGaussianParams) -> Float[Array, ""]:
    r"""The smallest gap any diagonal-covariance q can leave at a pPCA decoder, for every x:
    :math:`\frac12(\sum_j \log M_{jj} - \log|M|)`, :math:`M = W^\top W + \sigma^2 I`
    (see :func:`optimal_encoder_gap`)."""
    w = decoder_params.loadings
    gram = w.T @ w + decoder_params.noise_variance * jnp.eye(w.shape[1], dtype=w.dtype)
    _, log_det = jnp.linalg.slogdet(gram)
    return 0.5 * (jnp.sum(jnp.log(jnp.diagonal(gram))) - log_det)


def optimal_encoder_gap(params: LinearVAEParams) -> Float[Array, ""]:
    r"""The gap :math:`\log p(x) - \mathrm{ELBO}(x)` left by :func:`optimal_encoder`.

    .. math::
        \mathrm{KL}\big(q^\star \,\|\, p(z \mid x)\big)
            = \frac12\Big(\sum_j \log M_{jj} - \log|M|\Big),

    the same for every x, >= 0 by Hadamard's inequality and 0 iff :math:`W^\top W` is
    diagonal.
    """
    return diagonal_family_gap(decoder(params))


def init_params(
    key: Key[Array, ""], x: Float[Array, "n d"], latent_dim: int, *, scale: float = 0.1
) -> LinearVAEParams:
    r"""Random initial parameters that know nothing about the data but its scale.

    :math:`W_{jk}, V_{kj} \sim \mathcal N(0, \mathrm{scale}^2 \bar v)` (resp.
    :math:`\mathcal N(0, \mathrm{scale}^2 / \bar v)`), :math:`\mu = 0`, :math:`s = 1` and
    :math:`\sigma^2 = \bar v`, the mean per-feature variance of x.

    Args:
      key: a typed PRNG key.
      x: data, shape (n, d) (only its dtype, shape and overall variance are used).
      latent_dim: l (static).
      scale: relative size of the random weights.

    Returns:
      :class:`LinearVAEParams` in the dtype of x.
    """
    key = _checks.as_key(key)
    latent_dim = _checks.check_positive_int(latent_dim, name="latent_dim")
    k_w, k_v = jax.random.split(key)
    d = x.shape[1]
    dtype = x.dtype
    v_bar = jnp.mean(jnp.var(x, axis=0))
    w = scale * jnp.sqrt(v_bar) * jax.random.normal(k_w, (d, latent_dim), dtype)
    v = scale / jnp.sqrt(v_bar) * jax.random.normal(k_v, (latent_dim, d), dtype)
    return LinearVAEParams(
        encoder_weight=v,
        encoder_log_scale=jnp.zeros((latent_dim,), dtype),
        loadings=w,
        mean=jnp.zeros((d,), dtype),
        log_noise_variance=jnp.log(v_bar).astype(dtype),
    )


def negative_elbo(params: LinearVAEParams, x: Float[Array, "n d"]) -> Float[Array, ""]:
    """The training loss: minus the mean closed-form ELBO per example."""
    return -jnp.mean(elbo(params, x))


class LinearEncoder(nn.Module):
    r"""The linear encoder as a Flax module for the grid (:mod:`emvi.estep`'s amortized E-step).

    Outputs the unconstrained q of :func:`emvi.linear_gaussian.q_from_unconstrained`, one
    (n, m) row per example, :math:`m = l + l(l+1)/2`: the mean :math:`A (x - \bar x) + b`
    (linear in x; :math:`\bar x` a fixed centre, the data mean, which only conditions the
    optimisation: without it the mean's slope and offset are strongly coupled) and a learned
    constant for the Cholesky factor of the covariance (its log-diagonal and,
    with ``diagonal=False``, its strictly lower triangle), so

    .. math::
        q(z \mid x) = \mathcal N(A (x - \bar x) + b,\ S), \qquad S \text{ the same for
        every } x.

    ``diagonal=True`` is the family of Lucas et al. (2019) (:func:`encode`): the
    off-diagonal entries are held at 0. ``diagonal=False`` contains the exact pPCA posterior.
    The weights start at :math:`\mathcal N(0, \mathrm{scale}^2 / \bar v)` (``scale`` and
    ``data_variance`` :math:`\bar v` as in :func:`init_params`), the bias and the log-scales
    at 0 (s = 1).

    Attributes:
      latent_dim: l.
      diagonal: hold the covariance diagonal.
      scale: relative size of the initial weights.
      data_variance: :math:`\bar v`, the mean per-feature variance of the data.
      centre: :math:`\bar x` as a tuple of d floats, or None (0).
    """

    latent_dim: int
    diagonal: bool = True
    scale: float = 0.1
    data_variance: float = 1.0
    centre: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n m"]:
        l_ = self.latent_dim
        std = self.scale / float(np.sqrt(self.data_variance))
        if self.centre is not None:
            x = x - jnp.asarray(self.centre, x.dtype)[None, :]
        mean = nn.Dense(
            l_,
            kernel_init=nn.initializers.normal(std),
            dtype=x.dtype,
            param_dtype=x.dtype,  # follow the data's dtype (float32 or float64)
            name="mean",
        )(x)
        rows, cols = np.tril_indices(l_)
        raw = self.param("chol_raw", nn.initializers.zeros, (rows.size,), x.dtype)
        if self.diagonal:
            raw = jnp.where(jnp.asarray(rows == cols), raw, 0.0)
        return jnp.concatenate([mean, jnp.broadcast_to(raw, (x.shape[0], rows.size))], axis=1)
