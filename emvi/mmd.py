r"""Kernel two-sample statistics and the InfoVAE objective.

The maximum mean discrepancy (Gretton et al., 2006) between distributions P and Q under a
positive-definite kernel k is

.. math::
    \mathrm{MMD}^2(P, Q) = E_{x, x' \sim P}[k(x, x')] + E_{y, y' \sim Q}[k(y, y')]
                           - 2 E_{x \sim P, y \sim Q}[k(x, y)],

which is zero iff P = Q when k is characteristic (the RBF and inverse multiquadric kernels
are). InfoVAE (Zhao, Song and Ermon, 2017) uses it to pull the *aggregate* posterior
q(z) = E_x q(z|x) towards the prior p(z), instead of (or as well as) pulling every q(z|x)
towards p(z) as the KL term of the ELBO does.

Shape letters: ``n`` and ``m`` sample sizes, ``l`` latent (feature) dimension.

Hyperparameters (``bandwidth``, ``scale``, ``alpha``, ``lam``) are Python numbers; the public
functions check them eagerly (also when called inside ``jit``, where Python numbers are
still concrete) and raise ``ValueError``. Traced hyperparameters are accepted unchecked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from emvi import _checks

_KERNELS = ("rbf", "imq")


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def _check_positive(value, *, name: str) -> None:
    if _is_concrete(value):
        _checks.check_positive(value, name=name)


def _check_nonnegative(value, *, name: str) -> None:
    if _is_concrete(value):
        _checks.check_nonnegative(value, name=name)


def pairwise_sq_distances(x: Float[Array, "n l"], y: Float[Array, "m l"]) -> Float[Array, "n m"]:
    r"""Squared Euclidean distances :math:`\|x_i - y_j\|^2` with one matrix product.

    Both sets are first centred on their pooled mean c (distances do not change under a
    common shift), then :math:`\|x - c\|^2 - 2 (x - c) \cdot (y - c) + \|y - c\|^2` is
    clipped at zero. Without the centring the expanded form cancels catastrophically once
    the points sit far from the origin relative to their spread (an offset of 1e8 in
    float64, a few hundred in float32, loses every digit); after it, the rounding error is
    a few ulps of the squared spread. The clip catches what is left when
    :math:`x_i \approx y_j`: a negative squared distance would make a kernel exceed its
    maximum. The shift is a constant of the gradient (``stop_gradient``): the distances do
    not depend on it.

    Args:
      x: points, shape (n, l).
      y: points, shape (m, l).

    Returns:
      Shape (n, m), all entries >= 0.
    """
    x, y = _check_pair(x, y)
    return _pairwise_sq_distances(x, y)


def _check_pair(x, y) -> tuple[Array, Array]:
    """Two point sets: 2-D, float (the dtype rule), one dimension; finite when concrete."""
    x = _checks.as_array(x, name="x", ndim=2)
    y = _checks.as_array(y, name="y", ndim=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same dimension; got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    return x, y


def _pairwise_sq_distances(x: Array, y: Array) -> Array:
    total = jnp.sum(x, axis=0) + jnp.sum(y, axis=0)
    centre = jax.lax.stop_gradient(total / (x.shape[0] + y.shape[0]))
    x, y = x - centre[None, :], y - centre[None, :]
    x_sq = jnp.sum(x * x, axis=-1)
    y_sq = jnp.sum(y * y, axis=-1)
    cross = x @ y.T
    d2 = x_sq[:, None] + y_sq[None, :] - 2.0 * cross
    return jnp.maximum(d2, 0.0)


def rbf_kernel(
    x: Float[Array, "n l"], y: Float[Array, "m l"], *, bandwidth: float | Array
) -> Float[Array, "n m"]:
    r"""Gaussian (RBF) kernel matrix :math:`k(x, y) = \exp(-\|x - y\|^2 / (2 h^2))`.

    Args:
      x: points, shape (n, l).
      y: points, shape (m, l).
      bandwidth: the length scale h > 0.

    Returns:
      The kernel matrix, shape (n, m), entries in (0, 1].

    Example:
      >>> x = jnp.zeros((1, 2)); y = jnp.ones((1, 2))
      >>> float(rbf_kernel(x, y, bandwidth=1.0)[0, 0])  # exp(-2 / 2)
      0.367...
    """
    _check_positive(bandwidth, name="bandwidth")
    x, y = _check_pair(x, y)
    return jnp.exp(-_pairwise_sq_distances(x, y) / (2.0 * bandwidth**2))


def inverse_multiquadric_kernel(
    x: Float[Array, "n l"], y: Float[Array, "m l"], *, scale: float | Array
) -> Float[Array, "n m"]:
    r"""Inverse multiquadric kernel :math:`k(x, y) = C / (C + \|x - y\|^2)`.

    The kernel used by InfoVAE and WAE (there with :math:`C = 2 l \sigma^2` for a prior of
    variance :math:`\sigma^2`). Its heavy tails keep gradients alive for far-apart samples,
    where an RBF kernel's vanish.

    Args:
      x: points, shape (n, l).
      y: points, shape (m, l).
      scale: C > 0.

    Returns:
      The kernel matrix, shape (n, m), entries in (0, 1].

    Example:
      >>> x = jnp.zeros((1, 2)); y = jnp.ones((1, 2))
      >>> float(inverse_multiquadric_kernel(x, y, scale=2.0)[0, 0])  # 2 / (2 + 2)
      0.5
    """
    _check_positive(scale, name="scale")
    x, y = _check_pair(x, y)
    return scale / (scale + _pairwise_sq_distances(x, y))


def kernel_matrix(
    x: Float[Array, "n l"], y: Float[Array, "m l"], *, kernel: str, bandwidth: float | Array
) -> Float[Array, "n m"]:
    """Dispatches to :func:`rbf_kernel` (h = bandwidth) or the IMQ kernel (C = bandwidth)."""
    _checks.check_choice(kernel, name="kernel", choices=_KERNELS)
    x, y = _check_pair(x, y)
    if kernel == "rbf":
        return rbf_kernel(x, y, bandwidth=bandwidth)
    return inverse_multiquadric_kernel(x, y, scale=bandwidth)


def _off_diagonal_mean(k: Float[Array, "n n"]) -> Float[Array, ""]:
    n = k.shape[0]
    return (jnp.sum(k) - jnp.sum(jnp.diagonal(k))) / (n * (n - 1))


def mmd_unbiased(
    x: Float[Array, "n l"],
    y: Float[Array, "m l"],
    *,
    kernel: str = "rbf",
    bandwidth: float | Array = 1.0,
) -> Float[Array, ""]:
    r"""Unbiased (U-statistic) estimate of :math:`\mathrm{MMD}^2` between samples x ~ P, y ~ Q.

    .. math::
        \widehat{\mathrm{MMD}}^2_u = \frac{1}{n(n-1)} \sum_{i \ne i'} k(x_i, x_{i'})
            + \frac{1}{m(m-1)} \sum_{j \ne j'} k(y_j, y_{j'})
            - \frac{2}{nm} \sum_{i, j} k(x_i, y_j).

    Leaving out the diagonals makes the estimate unbiased (its mean is exactly
    :math:`\mathrm{MMD}^2`), so it is zero *on average* when P = Q and can be negative for a
    single draw. The biased V-statistic keeps the diagonals and is always >= 0.

    Args:
      x: samples from P, shape (n, l), n >= 2.
      y: samples from Q, shape (m, l), m >= 2.
      kernel: ``"rbf"`` or ``"imq"`` (inverse multiquadric).
      bandwidth: the RBF length scale h, or the IMQ constant C; > 0.

    Returns:
      A scalar.

    Raises:
      ValueError: for fewer than two samples on either side, mismatched dimensions, an
        unknown kernel, or a bandwidth that is not > 0.

    Example:
      >>> key_x, key_y = jax.random.split(jax.random.key(0))
      >>> x = jax.random.normal(key_x, (200, 2)); y = jax.random.normal(key_y, (200, 2)) + 3.0
      >>> float(mmd_unbiased(x, y, bandwidth=1.0)) > 0.5
      True
    """
    _checks.check_choice(kernel, name="kernel", choices=_KERNELS)
    _check_positive(bandwidth, name="bandwidth" if kernel == "rbf" else "bandwidth (IMQ scale)")
    x, y = _check_pair(x, y)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            "The unbiased MMD needs at least two samples on each side; "
            f"got {x.shape[0]} and {y.shape[0]}."
        )
    # One shift for all three matrices (the pooled mean): each is then computed from points
    # near the origin, and the three share their rounding.
    centre = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([x, y], axis=0), axis=0))
    x, y = x - centre[None, :], y - centre[None, :]
    kxx = kernel_matrix(x, x, kernel=kernel, bandwidth=bandwidth)
    kyy = kernel_matrix(y, y, kernel=kernel, bandwidth=bandwidth)
    kxy = kernel_matrix(x, y, kernel=kernel, bandwidth=bandwidth)
    return _off_diagonal_mean(kxx) + _off_diagonal_mean(kyy) - 2.0 * jnp.mean(kxy)


def info_vae_weights(*, alpha: float, lam: float) -> tuple[float, float]:
    r"""The KL and MMD weights of InfoVAE, :math:`(1 - \alpha, \alpha + \lambda - 1)`.

    Raises:
      ValueError: if lam < 0, or either weight is negative (alpha > 1, or
        alpha + lam < 1): the objective would then reward a larger divergence.
    """
    _check_nonnegative(lam, name="lam (the InfoVAE lambda)")
    if _is_concrete(alpha) and _is_concrete(lam):
        a, lmb = float(alpha), float(lam)
        if not np.isfinite(a):
            raise ValueError(f"alpha must be a finite number; got {alpha!r}.")
        if 1.0 - a < 0:
            raise ValueError(
                f"alpha must be <= 1 so that the KL weight 1 - alpha is >= 0; got alpha={a}."
            )
        if a + lmb - 1.0 < 0:
            raise ValueError(
                "alpha + lam must be >= 1 so that the MMD weight alpha + lam - 1 is >= 0; "
                f"got alpha={a}, lam={lmb}."
            )
    return 1.0 - alpha, alpha + lam - 1.0


def info_vae_objective(
    log_lik: Float[Array, " n"],
    kl: Float[Array, " n"],
    mmd: Float[Array, ""],
    *,
    alpha: float,
    lam: float,
) -> Float[Array, ""]:
    r"""The InfoVAE loss (to minimise), averaged over the batch.

    .. math::
        \mathcal{L} = -E_{p_D(x)} E_{q(z|x)}[\log p(x|z)]
            + (1 - \alpha)\, E_{p_D(x)} \mathrm{KL}(q(z|x) \,\|\, p(z))
            + (\alpha + \lambda - 1)\, \mathrm{MMD}(q(z) \,\|\, p(z)).

    ``alpha=0, lam=1`` is the negative ELBO; ``alpha=1`` drops the per-example KL (the
    "MMD-VAE"); ``alpha=0, lam>1`` keeps the ELBO and adds an MMD penalty of weight lam - 1.

    Args:
      log_lik: per-example reconstruction log-likelihood (a Monte Carlo estimate of
        :math:`E_{q(z|x_i)} \log p(x_i|z)`), shape (n,).
      kl: per-example :math:`\mathrm{KL}(q(z|x_i) \,\|\, p(z))`, shape (n,).
      mmd: a scalar MMD estimate between samples of the aggregate posterior (one z per
        example of the batch) and samples of the prior, e.g. :func:`mmd_unbiased`.
      alpha: the InfoVAE alpha, <= 1.
      lam: the InfoVAE lambda, >= 0, with alpha + lam >= 1.

    Returns:
      The scalar loss.

    Raises:
      ValueError: for negative weights (see :func:`info_vae_weights`).

    Example:
      >>> ll = jnp.array([-3.0, -5.0]); kl = jnp.array([1.0, 3.0])
      >>> float(info_vae_objective(ll, kl, jnp.asarray(0.0), alpha=0.0, lam=1.0))  # -ELBO
      6.0
    """
    log_lik = _checks.as_array(log_lik, name="log_lik", ndim=1)
    kl = _checks.as_array(kl, name="kl", ndim=1)
    _checks.check_same_shape((log_lik, "log_lik"), (kl, "kl"))
    mmd = _checks.as_array(mmd, name="mmd", ndim=0)
    kl_weight, mmd_weight = info_vae_weights(alpha=alpha, lam=lam)
    return -jnp.mean(log_lik) + kl_weight * jnp.mean(kl) + mmd_weight * mmd
