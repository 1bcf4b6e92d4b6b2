"""The linear VAE's pieces: its closed-form ELBO against NumPy, and the linear encoder of the
grid (``linear_vae.LinearEncoder``), whose family contains the exact pPCA posterior.

Tolerances: float64 closed forms against float64 NumPy at rtol 1e-12 (a few dozen flops of
O(10) terms apart); the ELBO at the exact posterior against log p(x) at rtol 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emvi import linear_gaussian as lg
from emvi import linear_vae

N, D, L = 9, 5, 3


def _vae_params(rng):
    return linear_vae.LinearVAEParams(
        encoder_weight=jnp.asarray(rng.standard_normal((L, D)) * 0.5),
        encoder_log_scale=jnp.asarray(rng.standard_normal(L) * 0.5),
        loadings=jnp.asarray(rng.standard_normal((D, L))),
        mean=jnp.asarray(rng.standard_normal(D)),
        log_noise_variance=jnp.asarray(0.3),
    )


def test_elbo_matches_the_numpy_closed_form_of_the_diagonal_family(rng):
    """ELBO = -d/2 log(2 pi s2) - (|c - W m|^2 + sum_j s_j^2 |w_j|^2) / (2 s2)
    - 1/2 sum_j (s_j^2 + m_j^2 - 1 - log s_j^2), c = x - mu, m = V c (float64 NumPy)."""
    p = _vae_params(rng)
    x = rng.standard_normal((N, D)) * 2
    v, w, mu = (np.asarray(a) for a in (p.encoder_weight, p.loadings, p.mean))
    s2, sig2 = np.exp(2 * np.asarray(p.encoder_log_scale)), float(np.exp(p.log_noise_variance))
    c = x - mu
    m = c @ v.T
    sq = np.sum((c - m @ w.T) ** 2, axis=1) + np.sum(s2 * np.sum(w**2, axis=0))
    want = -0.5 * D * np.log(2 * np.pi * sig2) - sq / (2 * sig2)
    want -= 0.5 * np.sum(s2[None, :] + m**2 - 1 - np.log(s2)[None, :], axis=1)
    np.testing.assert_allclose(linear_vae.elbo(p, jnp.asarray(x)), want, rtol=1e-12)


def _encoder_apply(encoder, variables, x):
    return lg.q_from_unconstrained(encoder.apply(variables, x))


@pytest.mark.parametrize("diagonal", [True, False])
def test_linear_encoder_mean_is_affine_and_covariance_constant(rng, diagonal):
    x = jnp.asarray(rng.standard_normal((N, D)))
    enc = linear_vae.LinearEncoder(L, diagonal=diagonal, centre=tuple(rng.standard_normal(D)))
    variables = enc.init(jax.random.key(0), x[:1])
    variables = jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape)), variables
    )
    u = enc.apply(variables, x)
    assert u.shape == (N, L + L * (L + 1) // 2)
    q = lg.q_from_unconstrained(u)
    np.testing.assert_allclose(q.cov, np.broadcast_to(q.cov[0], q.cov.shape), rtol=1e-14)
    off = np.asarray(q.cov[0]) - np.diag(np.diag(q.cov[0]))
    assert (np.max(np.abs(off)) == 0.0) == diagonal
    # Affine in x: the mean of a midpoint is the midpoint of the means.
    mid = _encoder_apply(enc, variables, 0.5 * (x[:3] + x[3:6])).mean
    np.testing.assert_allclose(mid, 0.5 * (q.mean[:3] + q.mean[3:6]), rtol=1e-12, atol=1e-13)


def test_full_linear_encoder_contains_the_exact_posterior(rng):
    """With A = K^{-1} W^T Psi^{-1}, b = A (centre - mu) and S = K^{-1}, the encoder's q is the
    pPCA posterior, so its ELBO is log p(x) (the grid's linear-VAE cell can be tight)."""
    params = lg.LinearGaussianParams(
        jnp.asarray(rng.standard_normal((D, L))),
        jnp.asarray(rng.standard_normal(D)),
        jnp.asarray(0.7),
    )
    x = jnp.asarray(rng.standard_normal((N, D)) + 1.0)
    centre = np.asarray(x).mean(0)
    enc = linear_vae.LinearEncoder(L, diagonal=False, centre=tuple(centre))
    variables = enc.init(jax.random.key(0), x[:1])
    w, mu, s2 = np.asarray(params.loadings), np.asarray(params.mean), 0.7
    k = np.eye(L) + w.T @ w / s2
    gain = np.linalg.solve(k, w.T / s2)  # (l, d)
    chol = np.linalg.cholesky(np.linalg.inv(k))
    rows, cols = np.tril_indices(L)
    raw = np.where(rows == cols, np.log(np.abs(chol[rows, cols])), chol[rows, cols])
    variables = {
        "params": {
            "mean": {"kernel": jnp.asarray(gain.T), "bias": jnp.asarray(gain @ (centre - mu))},
            "chol_raw": jnp.asarray(raw),
        }
    }
    q = _encoder_apply(enc, variables, x)
    np.testing.assert_allclose(lg.elbo(params, q, x), lg.log_prob(params, x), rtol=1e-12)
