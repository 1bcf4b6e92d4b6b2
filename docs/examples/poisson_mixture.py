r"""A user's own model in every cell of the EM / VI grid: a mixture of Poisson counts,
:math:`p(x_i, z_i = k) = \pi_k \prod_j \mathrm{Poisson}(x_{ij}; \lambda_{kj})`, with an
optional Gamma(a, b) prior on each rate. From :math:`N_k = \sum_i w_i q_{ik}` and
:math:`S_{kj} = \sum_i w_i q_{ik} x_{ij}` the M-step is :math:`\pi_k = N_k / \sum_l N_l`,
:math:`\lambda_{kj} = (S_{kj} + a - 1) / (N_k + b)`. :mod:`emvi.grid` knows nothing of it:

  >>> import jax, jax.numpy as jnp
  >>> from emvi import estep, grid, mstep
  >>> x = jax.random.poisson(jax.random.key(0), 3.0, (40, 2)).astype(jnp.float32)
  >>> cell = grid.Cell(estep.local(model(), num_steps=3), mstep.gradient(model()))
  >>> theta0 = init_params(jax.random.key(2), x, 2)
  >>> res = grid.run_corner(jax.random.key(1), cell, model(), x, params=theta0, num_iters=4)
  >>> res.params.rates.shape
  (2, 2)
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from emvi.elbo import discrete_elbo
from emvi.em import ExactModel


class Params(NamedTuple):
    weights: jax.Array  # (k,) mixing proportions
    rates: jax.Array  # (k, d) Poisson rates


class GammaPrior(NamedTuple):  # on each rate; a = 1, b = 0 is maximum likelihood
    a: float
    b: float


def log_joint(params, x):
    """(n, k): log pi_k + sum_j x_ij log lambda_kj - lambda_kj - log x_ij!."""
    lam = params.rates
    base = x @ jnp.log(lam).T - jnp.sum(lam, axis=1)[None, :]
    return base + jnp.log(params.weights)[None, :] - jnp.sum(gammaln(x + 1.0), axis=1)[:, None]


def expected_stats(q, x, weights):  # (N_k (k,), S_kj (k, d))
    r = q * weights[:, None]
    return jnp.sum(r, axis=0), r.T @ x


def e_step(params, x, weights):
    lj = log_joint(params, x)
    ll = jnp.sum(weights * jax.nn.logsumexp(lj, axis=1))
    return expected_stats(jax.nn.softmax(lj, axis=1), x, weights), ll


def m_step(stats, prior=None):
    (counts, sums), (a, b) = stats, (1.0, 0.0) if prior is None else prior
    return Params(counts / jnp.sum(counts), (sums + (a - 1.0)) / (counts[:, None] + b))


def log_prior(params, prior=None):  # the Gamma log density of the rates, up to a constant
    a, b = (1.0, 0.0) if prior is None else prior
    return jnp.sum((a - 1.0) * jnp.log(params.rates) - b * params.rates)


def _centred_log(p):  # a probability vector's unconstrained coordinates
    log_p = jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))
    return log_p - jnp.mean(log_p, axis=-1, keepdims=True)


@functools.cache  # one object, so jitted drivers compile once
def model() -> ExactModel:
    """The Poisson mixture as an :class:`emvi.em.ExactModel`; ``hyper`` is a GammaPrior."""
    return ExactModel(
        e_step=e_step,
        m_step=m_step,
        log_prob=lambda p, x: jax.nn.logsumexp(log_joint(p, x), axis=1),
        posterior=lambda p, x: jax.nn.softmax(log_joint(p, x), axis=1),
        elbo=lambda p, q, x: discrete_elbo(log_joint(p, x), q),
        expected_stats=expected_stats,
        to_unconstrained=lambda p: Params(_centred_log(p.weights), jnp.log(p.rates)),
        from_unconstrained=lambda u: Params(jax.nn.softmax(u.weights), jnp.exp(u.rates)),
        log_prior=log_prior,
        q_to_unconstrained=_centred_log,
        q_from_unconstrained=lambda u: jax.nn.softmax(u, axis=-1),
    )


def init_params(key, x, num_components: int, prior=None) -> Params:
    """The M-step of random (Dirichlet(1)) responsibilities."""
    q = jax.random.dirichlet(key, jnp.ones(num_components, x.dtype), (x.shape[0],))
    return m_step(expected_stats(q, x, jnp.ones(x.shape[0], x.dtype)), prior)
