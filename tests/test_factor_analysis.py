"""Factor analysis (``emvi.factor_analysis``, the diagonal linear-Gaussian model) against
scikit-learn: ``score_samples`` at identical parameters, and the fitted maximum. The maths
shared with pPCA (log_prob against SciPy, posterior, ELBO + KL, the protocol) is tested for
both noise types in test_linear_gaussian.py.

Tolerances are derived from what each side delivers:

* ``score_samples`` at the same parameters: two float64 evaluations of the same density by
  different factorisations (ours an (l, l) Cholesky, scikit-learn's a d x d inverse via the
  matrix inversion lemma); rtol 1e-12, i.e. ~5e3 eps (measured 7e-16).
* The maximum: EM converges linearly, with rate rho estimated from the last two changes of
  the history, so a run stopped after a change Delta is at most Delta rho / (1 - rho) below
  its limit (the geometric tail); scikit-learn, stopped on its *total* log-likelihood at
  ``tol``, is at most (tol / n) rho / (1 - rho) below. Add 100 eps |ll| for the rounding of a
  mean of n log-densities summed in different orders (measured gap 7e-14 against a bound of
  ~3e-13).
* Parameters: at a maximum the mean log-likelihood is quadratic, so parameters agree only to
  about sqrt(2 gap / c) with c the curvature along the weakest direction: psi to rtol 1e-5
  and the subspace to 1e-5 rad (measured 1.2e-6 and ~1e-7: the weak directions of this data
  have curvature ~0.1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import subspace_angles
from sklearn.decomposition import FactorAnalysis

from emvi import em
from emvi import factor_analysis as fa

# Jitted once per module: one XLA compile per shape instead of op-by-op dispatch.
_log_prob = jax.jit(fa.log_prob)
_e_step = jax.jit(fa.e_step)
_m_step = jax.jit(fa.m_step)


def _random_params(rng, d=6, ell=2):
    return fa.FactorAnalysisParams(
        jnp.asarray(rng.standard_normal((d, ell))),
        jnp.asarray(rng.standard_normal(d)),
        jnp.asarray(rng.uniform(0.2, 1.5, d)),
    )


def _fa_data(seed, n=400, d=8, ell=2, offset=3.0):
    """Draws from a factor model with heteroscedastic noise (psi in [0.3, 1.5])."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, ell)) * 1.5
    psi = rng.uniform(0.3, 1.5, d)
    return rng.standard_normal((n, ell)) @ w.T + rng.standard_normal((n, d)) * np.sqrt(psi) + offset


def _np_cov(params):
    w = np.asarray(params.loadings)
    return w @ w.T + np.diag(np.asarray(params.noise_variance))


# --------------------------------------------------------------------------------------
# Closed forms against SciPy / scikit-learn / NumPy
# --------------------------------------------------------------------------------------


def test_log_prob_matches_sklearn_score_samples_with_identical_params(rng):
    params = _random_params(rng)
    x = rng.standard_normal((25, 6)) * 2
    ours = np.asarray(_log_prob(params, jnp.asarray(x)))
    sk = FactorAnalysis(n_components=2).fit(x)  # fitted only to exist; params overwritten
    sk.components_ = np.asarray(params.loadings).T
    sk.noise_variance_ = np.asarray(params.noise_variance)
    sk.mean_ = np.asarray(params.mean)
    np.testing.assert_allclose(ours, sk.score_samples(x), rtol=1e-12)


# --------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------


_X_SK = _fa_data(0)
_FIT = dict(max_iter=2000, num_init=2)  # one static configuration: compiled once per dtype


_SK_TOL = 1e-12  # on scikit-learn's total log-likelihood


@pytest.fixture(scope="module")
def sklearn_fit():
    sk = FactorAnalysis(n_components=2, tol=_SK_TOL, max_iter=100_000, svd_method="lapack")
    return sk.fit(_X_SK)


def _tail_bound(history, num_iter):
    """Geometric tail Delta rho / (1 - rho) of a linearly converging history."""
    h = np.asarray(history)[: int(num_iter)]
    d1, d2 = h[-1] - h[-2], h[-2] - h[-3]
    rho = min(max(d1 / d2, 0.0), 0.99) if d2 > 0 else 0.99
    return max(d1, 0.0) * rho / (1 - rho), rho


def test_em_reaches_the_same_maximum_as_sklearn(sklearn_fit):
    res = fa.fit(jax.random.key(0), _X_SK, 2, tol=1e-14, **_FIT)
    assert bool(res.converged)
    ours, theirs = float(res.log_likelihood), float(sklearn_fit.score(_X_SK))
    tail, rho = _tail_bound(res.history, res.num_iter)
    n = _X_SK.shape[0]
    eps = np.finfo(np.float64).eps
    bound = tail + (_SK_TOL / n) * rho / (1 - rho) + 100 * eps * abs(theirs)
    assert abs(ours - theirs) < bound, (ours - theirs, bound)
    np.testing.assert_allclose(res.params.noise_variance, sklearn_fit.noise_variance_, rtol=1e-5)
    angle = subspace_angles(np.asarray(res.params.loadings), sklearn_fit.components_.T).max()
    assert angle < 1e-5
    h = np.asarray(res.history)[: int(res.num_iter)]
    assert np.all(np.diff(h) >= -100 * eps * abs(theirs))


def test_float32_in_float32_out_and_close_to_the_float64_maximum(sklearn_fit):
    r32 = fa.fit(jax.random.key(1), _X_SK.astype(np.float32), 2, tol=1e-7, **_FIT)
    assert r32.params.noise_variance.dtype == jnp.float32 and r32.history.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(r32.history)[: int(r32.num_iter)]))
    # Rounding of a float32 mean of n log-densities of size |ll|: ~sqrt(n) eps32 |ll| (3e-5
    # here), below 100 eps32 |ll| (1.6e-4); the float32 run's stopping error (tol 1e-7) is less.
    theirs = float(sklearn_fit.score(_X_SK))
    eps32 = float(np.finfo(np.float32).eps)
    assert abs(float(r32.log_likelihood) - theirs) < 100 * eps32 * abs(theirs)


@jax.jit
def _em_path(params, x):
    data = fa.prepare(x)

    def body(p, _):
        stats, ll = _e_step(p, data, jnp.ones(x.shape[0], x.dtype))
        return _m_step(stats), ll

    _, ll = jax.lax.scan(body, params, None, length=12)
    return ll


_X_PROP = jnp.asarray(_fa_data(1, n=80, d=6))


@given(seed=st.integers(0, 2**31 - 1))
def test_em_never_decreases_the_log_likelihood(seed):
    params = _random_params(np.random.default_rng(seed))
    ll = np.asarray(_em_path(params, _X_PROP))
    assert np.all(np.isfinite(ll))
    assert np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:]))


def test_em_trace_bound_touches_after_e_and_kl_nonnegative_after_m(rng):
    x = jnp.asarray(_fa_data(2, n=60, d=6))
    tr = em.em_trace(fa.model(), _random_params(rng), fa.prepare(x), num_iter=5)
    ll, eb, kl = (np.asarray(a) for a in (tr.log_likelihood, tr.elbo, tr.kl))
    np.testing.assert_allclose(eb[:, 0], ll[:, 0], rtol=1e-12)
    assert np.all(kl[:, 1] >= -1e-12) and kl[0, 1] > 1e-3
    assert np.all(eb[:, 1] >= eb[:, 0] - 1e-12)


def test_heywood_case_and_constant_feature_stay_on_the_floor_without_nan():
    """Feature 1 copies feature 0 exactly (its ML noise is 0); feature 5 is constant."""
    x = _fa_data(3, n=200, d=6)
    x[:, 1] = x[:, 0]
    x[:, 5] = 2.0
    p0 = fa.init_params(jax.random.key(0), jnp.asarray(x), 2)
    res = em.fit_em(fa.model(), p0, jnp.asarray(x), max_iter=300, tol=0.0)
    psi = np.asarray(res.params.noise_variance)
    var = x.var(0)
    assert np.all(np.isfinite(psi)) and np.isfinite(float(res.log_likelihood))
    assert np.all(psi >= 1e-6 * np.where(var > 0, var, var.mean()) * (1 - 1e-12))
    # The duplicated pair and the constant feature sit on their floors.
    np.testing.assert_allclose(psi[5], 1e-6 * var.mean(), rtol=1e-6)
    assert psi[0] < 1e-4 * var[0] or psi[1] < 1e-4 * var[1]
    h = np.asarray(res.history)
    assert np.all(np.isfinite(h)) and np.all(np.diff(h) >= -1e-9 * np.abs(h[1:]))
    # With no relative floor the duplicated pair's psi heads for 0; machine epsilon times the
    # variance still keeps the posterior precision representable, so nothing goes NaN.
    res0 = fa.fit(jax.random.key(0), x, 2, noise_floor=0.0, max_iter=300, tol=0.0)
    psi0 = np.asarray(res0.params.noise_variance)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in res0.params)
    eps = np.finfo(np.float64).eps
    assert np.all(psi0 >= eps * np.where(var > 0, var, var.mean()) * (1 - 1e-12))
    assert min(psi0[0], psi0[1]) < 1e-9 * var[0]


def test_sample_matches_model_moments():
    params = _random_params(np.random.default_rng(7), d=4)
    m = 20_000
    x, z = fa.sample(jax.random.key(0), params, m)
    assert x.shape == (m, 4) and z.shape == (m, 2)
    cov = _np_cov(params)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / m)
    assert np.all(np.abs(np.cov(np.asarray(x), rowvar=False) - cov) < 5 * se_cov)
    se = np.sqrt(np.diag(cov) / m)
    assert np.all(np.abs(np.asarray(x).mean(0) - np.asarray(params.mean)) < 5 * se)


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.array([[0.0, 1.0, 2.0], [np.inf, 0.0, 1.0]]), {}, "non-finite"),  # NaN: missing
        (np.ones(5), {}, "2-D"),
        (np.ones((4, 3)), {}, "constant"),
        (np.eye(3), {"latent_dim": 0}, "latent_dim"),
        (np.eye(3), {"latent_dim": 5}, "latent_dim"),
        (np.eye(3), {"tol": -1.0}, "tol"),
        (np.eye(3), {"noise_floor": np.nan}, "noise_floor"),
        (np.eye(3), {"num_init": 0}, "num_init"),
    ],
)
def test_bad_input_raises_value_error(x, kwargs, match):
    kwargs = {"latent_dim": 1, **kwargs}
    latent_dim = kwargs.pop("latent_dim")
    with pytest.raises(ValueError, match=match):
        fa.fit(jax.random.key(0), x, latent_dim, **kwargs)
