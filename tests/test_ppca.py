"""Probabilistic PCA (``emvi.ppca``, the isotropic linear-Gaussian model): EM against the
closed form. The maths shared with factor analysis (log_prob against SciPy, the posterior,
ELBO + KL = log p, the protocol) is tested for both noise types in test_linear_gaussian.py.

Tolerances: closed forms in float64 against NumPy at rtol ~1e-10 (a handful of
O(d^3) factorisations apart); EM against the closed-form maximum to 1e-6 nats per example
and 1e-3 rad of subspace angle, on data whose spectral gap makes EM converge in a few
hundred iterations (EM's rate along a direction with covariance eigenvalue lambda is about
1 - 2 sigma^2 (lambda - sigma^2) / lambda^2, so it crawls at high signal-to-noise).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from emvi import em, ppca

# Jitted once per module: one XLA compile per shape instead of op-by-op dispatch.
_log_prob = jax.jit(ppca.log_prob)
_posterior = jax.jit(ppca.posterior)
_e_step = jax.jit(ppca.e_step)
_m_step = jax.jit(ppca.m_step)


def _random_params(rng, d=6, ell=2):
    return ppca.PPCAParams(
        jnp.asarray(rng.standard_normal((d, ell))),
        jnp.asarray(rng.standard_normal(d)),
        jnp.asarray(rng.uniform(0.3, 1.0)),
    )


def _gap_data(seed, n=300, d=8, ell=3, offset=5.0):
    """Data with covariance eigenvalues ~[9, 6, 4, 1, ..., 1]: a clear gap after l = 3."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, ell)))
    w = basis * np.sqrt(np.array([8.0, 5.0, 3.0]))[None, :ell]
    return rng.standard_normal((n, ell)) @ w.T + rng.standard_normal((n, d)) + offset


def _np_cov(params):
    w = np.asarray(params.loadings)
    return w @ w.T + float(params.noise_variance) * np.eye(w.shape[0])


# --------------------------------------------------------------------------------------
# Closed forms against SciPy / NumPy
# --------------------------------------------------------------------------------------


def test_posterior_matches_gaussian_conditioning_of_the_joint(rng):
    """(z, x) is jointly Gaussian with Cov[z, x] = W^T and Cov[x] = C: condition on x."""
    params = _random_params(rng)
    x = rng.standard_normal((10, 6))
    w, mu, c = np.asarray(params.loadings), np.asarray(params.mean), _np_cov(params)
    gain = np.linalg.solve(c, w).T  # W^T C^{-1}, (l, d)
    mean = (x - mu) @ gain.T
    cov = np.eye(2) - gain @ w
    q = _posterior(params, jnp.asarray(x))
    np.testing.assert_allclose(q.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(q.cov, np.broadcast_to(cov, (10, 2, 2)), rtol=1e-10)
    # Tipping & Bishop's form: mean M^{-1} W^T (x - mu), covariance sigma^2 M^{-1}.
    s2 = float(params.noise_variance)
    m_inv = np.linalg.inv(w.T @ w + s2 * np.eye(2))
    np.testing.assert_allclose(q.mean, (x - mu) @ (m_inv @ w.T).T, rtol=1e-10)
    np.testing.assert_allclose(q.cov[0], s2 * m_inv, rtol=1e-10)


_X_GAP = _gap_data(1)  # shared by the closed-form and EM tests: one compile per function


@pytest.fixture(scope="module")
def ml_gap():
    return ppca.closed_form_ml(_X_GAP, 3)


def test_closed_form_ml_is_an_em_fixed_point_and_matches_sklearn_pca(ml_gap):
    x, ml = _X_GAP, ml_gap
    n = x.shape[0]
    # One EM iteration from the maximum returns it (W up to rotation: compare W W^T).
    stats, _ = _e_step(ml, ppca.prepare(jnp.asarray(x)), jnp.ones(n))
    again = _m_step(stats)
    np.testing.assert_allclose(_np_cov(again), _np_cov(ml), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(again.mean, ml.mean, rtol=1e-12)
    # scikit-learn's PCA fits the same model with the unbiased (n - 1) covariance.
    pca = PCA(n_components=3, svd_solver="full").fit(x)
    np.testing.assert_allclose(_np_cov(ml) * n / (n - 1), pca.get_covariance(), rtol=1e-10)
    np.testing.assert_allclose(float(ml.noise_variance) * n / (n - 1), pca.noise_variance_)


# --------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------


def test_em_reaches_the_closed_form_maximum_in_likelihood_and_subspace(ml_gap):
    x, ml = _X_GAP, ml_gap
    res = ppca.fit(jax.random.key(0), x, 3, max_iter=1000, tol=1e-12)
    ll_ml = float(jnp.mean(_log_prob(ml, jnp.asarray(x))))
    gap = ll_ml - float(res.log_likelihood)
    # EM converges linearly: with rate rho from the last two changes of the history, a run
    # stopped after a change Delta is within Delta rho / (1 - rho) of its limit; add 100 eps
    # |ll| for the rounding of two means of n log-densities (measured gap 8.7e-13, bound 1.6e-12).
    h = np.asarray(res.history)[: int(res.num_iter)]
    d1, d2 = h[-1] - h[-2], h[-2] - h[-3]
    rho = min(max(d1 / d2, 0.0), 0.99)
    rounding = 100 * np.finfo(np.float64).eps * abs(ll_ml)
    bound = max(d1, 0.0) * rho / (1 - rho) + rounding
    assert -rounding < gap < bound  # ML is the global maximum
    # Parameters agree to ~sqrt(2 gap / c), c the curvature: along log sigma^2 it is
    # (d - l) / 2 per example, along a rotation of the subspace >= (lambda_l - lambda_{l+1})^2 /
    # (lambda_l lambda_{l+1}) ~ 2 for this data's spectrum (9, 6, 4 | 1, ...).
    angle = subspace_angles(np.asarray(res.params.loadings), np.asarray(ml.loadings)).max()
    assert angle < np.sqrt(bound)
    rtol = np.sqrt(4 * bound / (x.shape[1] - 3))
    np.testing.assert_allclose(res.params.noise_variance, ml.noise_variance, rtol=rtol)
    np.testing.assert_allclose(res.params.mean, x.mean(0), rtol=1e-12)
    assert np.all(np.diff(h) >= -rounding)


@jax.jit
def _em_path(params, x):
    data = ppca.prepare(x)

    def body(p, _):
        stats, ll = _e_step(p, data, jnp.ones(x.shape[0], x.dtype))
        return _m_step(stats), ll

    _, ll = jax.lax.scan(body, params, None, length=12)
    return ll


_X_PROP = jnp.asarray(_gap_data(2, n=80, d=6, ell=2))


@given(seed=st.integers(0, 2**31 - 1))
def test_em_never_decreases_the_log_likelihood(seed):
    # Random starting points, including a mean far from the data mean.
    params = _random_params(np.random.default_rng(seed), d=6, ell=2)
    ll = np.asarray(_em_path(params, _X_PROP))
    assert np.all(np.isfinite(ll))
    assert np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:]))


def test_em_trace_bound_touches_after_e_and_kl_nonnegative_after_m(rng):
    x = jnp.asarray(_gap_data(6, n=60, d=6, ell=2))
    tr = em.em_trace(ppca.model(), _random_params(rng, d=6, ell=2), ppca.prepare(x), num_iter=5)
    ll, eb, kl = (np.asarray(a) for a in (tr.log_likelihood, tr.elbo, tr.kl))
    np.testing.assert_allclose(eb[:, 0], ll[:, 0], rtol=1e-12)
    assert np.all(kl[:, 1] >= -1e-12) and kl[0, 1] > 1e-3
    assert np.all(eb[:, 1] >= eb[:, 0] - 1e-12)


def test_sample_matches_model_moments():
    params = _random_params(np.random.default_rng(7), d=4, ell=2)
    m = 20_000
    x, z = ppca.sample(jax.random.key(0), params, m)
    assert x.shape == (m, 4) and z.shape == (m, 2)
    cov = _np_cov(params)
    se = np.sqrt(np.diag(cov) / m)
    assert np.all(np.abs(np.asarray(x).mean(0) - np.asarray(params.mean)) < 5 * se)
    # Sample covariance entries have standard error ~ sqrt((c_ii c_jj + c_ij^2) / m).
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / m)
    assert np.all(np.abs(np.cov(np.asarray(x), rowvar=False) - cov) < 5 * se_cov)


def test_float32_in_float32_out_and_near_the_float64_maximum(ml_gap):
    r32 = ppca.fit(jax.random.key(0), _X_GAP.astype(np.float32), 3, max_iter=1000, tol=1e-7)
    assert r32.params.loadings.dtype == jnp.float32 and r32.history.dtype == jnp.float32
    ll_ml = float(jnp.mean(_log_prob(ml_gap, jnp.asarray(_X_GAP))))
    # Rounding of a float32 mean of n log-densities of size |ll|: ~sqrt(n) eps32 |ll| (4e-5
    # here), below 100 eps32 |ll| (1.7e-4); the float32 run's stopping error (tol 1e-7) is less.
    eps32 = float(np.finfo(np.float32).eps)
    assert abs(float(r32.log_likelihood) - ll_ml) < 100 * eps32 * abs(ll_ml)


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.array([[0.0, 1.0, 2.0], [np.inf, 0.0, 1.0]]), {}, "non-finite"),
        (np.ones((4, 3, 2)), {}, "2-D"),
        (np.ones((4, 3)), {}, "constant"),
        (np.eye(3), {"latent_dim": 0}, "latent_dim"),
        (np.eye(3), {"latent_dim": 3}, "latent_dim"),
        (np.eye(3), {"tol": -1e-3}, "tol"),
        (np.eye(3), {"noise_floor": -1.0}, "noise_floor"),
        (np.eye(3), {"max_iter": 0}, "max_iter"),
        (np.eye(3)[:1], {}, "at least 2 rows"),
    ],
)
def test_bad_input_raises_value_error(x, kwargs, match):
    kwargs = {"latent_dim": 1, **kwargs}
    latent_dim = kwargs.pop("latent_dim")
    with pytest.raises(ValueError, match=match):
        ppca.fit(jax.random.key(0), x, latent_dim, **kwargs)
    if not kwargs:
        with pytest.raises(ValueError, match=match):
            ppca.closed_form_ml(x, latent_dim)
