r"""The evidence lower bound and its relatives, as pure functions.

For any distribution q over the latent z,

.. math::
    \log p(x) = \underbrace{E_q[\log p(x, z) - \log q(z)]}_{\mathrm{ELBO}(q)}
                + \mathrm{KL}(q(z) \,\|\, p(z \mid x)),

so the ELBO is a lower bound that touches log p(x) exactly when q is the posterior.

Shape letters: ``n`` data points, ``k`` values of a finite latent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


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


def exact_posterior(log_joint: Float[Array, "n k"]) -> Float[Array, "n k"]:
    """The exact posterior p(z = k | x_i) = softmax_k log p(x_i, k) (the E-step)."""
    return jax.nn.softmax(log_joint, axis=-1)
