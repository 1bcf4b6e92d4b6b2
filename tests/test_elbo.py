"""Tests for emvi.elbo: KLs, Monte Carlo bounds, the log-likelihood estimator, Gibbs.

The reference model is linear-Gaussian, where everything is known in closed form:
z ~ N(0, I_l), x | z ~ N(W z + b, sigma^2 I_d), so log p(x) = log N(x | b, W W^T + sigma^2 I)
(scipy.stats.multivariate_normal is the oracle). W has orthogonal columns, so the exact
posterior N(mu_i, Sigma) has a diagonal Sigma and is a MultivariateNormalDiag.

Monte Carlo checks use 5 * std / sqrt(m) tolerances with the sample std.

The core maths runs both eagerly and under ``jax.jit`` (the ``transform`` fixture): the two
must agree with the same oracle.
"""

import functools
from typing import NamedTuple

import chex
import distrax
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

from emvi.elbo import (
    categorical_kl,
    discrete_elbo,
    estimate_log_likelihood,
    gaussian_elbo_terms,
    gaussian_kl,
    gaussian_mc_elbo,
    gibbs_log_partition,
    gibbs_objective,
    iwae_bound,
    mc_elbo,
    reparameterize,
    standard_normal_kl,
    std_normal_log_prob,
    tilted_distribution,
)

D, L, N = 4, 2, 3
Z_SIGMAS = 5.0  # Monte Carlo tolerance in standard errors


# --------------------------------------------------------------------------------------
# The linear-Gaussian reference model
# --------------------------------------------------------------------------------------


class LinearGaussian(NamedTuple):
    w: np.ndarray  # (d, l), orthogonal columns
    b: np.ndarray  # (d,)
    sigma: float
    x: np.ndarray  # (n, d), drawn from the model


def make_model(n: int = N, seed: int = 1) -> LinearGaussian:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(D, L)))
    w = basis * np.array([2.0, 0.7])[None, :]
    b = rng.normal(size=D)
    sigma = 0.5
    z = rng.normal(size=(n, L))
    x = z @ w.T + b[None, :] + sigma * rng.normal(size=(n, D))
    return LinearGaussian(w, b, sigma, x)


def log_marginal(m: LinearGaussian) -> np.ndarray:
    """Oracle: log p(x_i) from scipy, shape (n,)."""
    cov = m.w @ m.w.T + m.sigma**2 * np.eye(D)
    return np.atleast_1d(scipy.stats.multivariate_normal(m.b, cov).logpdf(m.x))


def exact_posterior_params(m: LinearGaussian) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form posterior N(mu_i, Sigma): means (n, l) and (diagonal) scales (n, l)."""
    cov = np.linalg.inv(np.eye(L) + m.w.T @ m.w / m.sigma**2)
    assert np.allclose(cov, np.diag(np.diag(cov)), atol=1e-12)  # orthogonal columns
    means = (m.x - m.b[None, :]) @ m.w @ cov / m.sigma**2
    scales = np.broadcast_to(np.sqrt(np.diag(cov))[None, :], means.shape).copy()
    return means, scales


def imperfect_posterior_params(m: LinearGaussian) -> tuple[np.ndarray, np.ndarray]:
    """The exact posterior shifted by half a std and narrowed to 0.6 of its scale."""
    means, scales = exact_posterior_params(m)
    return means + 0.5 * scales, 0.6 * scales


def model_fns(m: LinearGaussian, dtype=jnp.float64):
    """(log_likelihood_fn, log_joint_fn, prior) on z of shape (s, n, l), in ``dtype``."""
    w, b, x = (jnp.asarray(a, dtype) for a in (m.w, m.b, m.x))
    const_lik = float(-0.5 * D * np.log(2 * np.pi * m.sigma**2))  # weakly typed
    const_prior = float(-0.5 * L * np.log(2 * np.pi))

    def log_lik(z):
        mean = jnp.einsum("dl,snl->snd", w, z) + b[None, None, :]
        resid = x[None, :, :] - mean
        return -0.5 * jnp.sum(jnp.square(resid), axis=-1) / m.sigma**2 + const_lik

    def log_joint(z):
        return log_lik(z) - 0.5 * jnp.sum(jnp.square(z), axis=-1) + const_prior

    prior = distrax.MultivariateNormalDiag(jnp.zeros(L, dtype), jnp.ones(L, dtype))
    return log_lik, log_joint, prior


def closed_form_elbo(m: LinearGaussian, means: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """E_q[log p(x|z)] - KL(q || N(0, I)) for diagonal q, in NumPy."""
    resid = m.x - means @ m.w.T - m.b[None, :]
    col_sq = np.sum(m.w**2, axis=0)  # ||W_j||^2
    expected_lik = (
        -0.5 * D * np.log(2 * np.pi * m.sigma**2)
        - 0.5 * (np.sum(resid**2, axis=1) + scales**2 @ col_sq) / m.sigma**2
    )
    kl = 0.5 * np.sum(means**2 + scales**2 - 1.0 - 2.0 * np.log(scales), axis=1)
    return expected_lik - kl


def closed_form_elbo_grads(m: LinearGaussian, means, scales):
    """Analytic d ELBO / d means and d ELBO / d scales, each (n, l)."""
    resid = m.x - means @ m.w.T - m.b[None, :]
    col_sq = np.sum(m.w**2, axis=0)
    d_means = resid @ m.w / m.sigma**2 - means
    d_scales = -scales * col_sq[None, :] / m.sigma**2 - scales + 1.0 / scales
    return d_means, d_scales


def diag_q(means, scales, dtype=jnp.float64):
    return distrax.MultivariateNormalDiag(jnp.asarray(means, dtype), jnp.asarray(scales, dtype))


def np_gaussian_kl(mq, sq, mp, sp):
    return 0.5 * np.sum(np.log(sp**2 / sq**2) + (sq**2 + (mq - mp) ** 2) / sp**2 - 1.0, axis=-1)


@pytest.fixture(params=["eager", "jit"])
def transform(request):
    """Runs a function as written or under ``jax.jit`` (static keyword arguments bound first
    with ``functools.partial``)."""
    return (lambda f: f) if request.param == "eager" else jax.jit


# --------------------------------------------------------------------------------------
# Finite latents, closed forms (eager and jitted against NumPy oracles)
# --------------------------------------------------------------------------------------


def test_finite_latent_closed_forms_match_numpy(rng, transform):
    log_joint = rng.normal(size=(4, K_FINITE)) * 2
    probs = rng.dirichlet(np.ones(K_FINITE), size=4)
    probs[0, 1] = 0.0  # a class without mass, where the log-joint may be -inf
    probs[0] /= probs[0].sum()
    log_joint[0, 1] = -np.inf
    log_p = np.log(rng.dirichlet(np.ones(K_FINITE), size=4))
    got_elbo = transform(discrete_elbo)(jnp.asarray(log_joint), jnp.asarray(probs))
    got_kl = transform(categorical_kl)(jnp.asarray(probs), jnp.asarray(log_p))
    with np.errstate(divide="ignore", invalid="ignore"):
        want_elbo = np.sum(np.where(probs > 0, probs * (log_joint - np.log(probs)), 0.0), 1)
        want_kl = np.sum(np.where(probs > 0, probs * (np.log(probs) - log_p), 0.0), 1)
    # The same sums of a few float64 terms of size ~5: rounding ~1e-15.
    np.testing.assert_allclose(got_elbo, want_elbo, rtol=1e-12)
    np.testing.assert_allclose(got_kl, want_kl, rtol=1e-12)
    # At the exact posterior the ELBO is log p(x) (rows 1..3; row 0's q is not it).
    post = scipy.special.softmax(log_joint[1:], axis=1)
    at_post = transform(discrete_elbo)(jnp.asarray(log_joint[1:]), jnp.asarray(post))
    np.testing.assert_allclose(
        at_post, scipy.special.logsumexp(log_joint[1:], axis=1), rtol=0, atol=1e-12
    )


K_FINITE = 6


# --------------------------------------------------------------------------------------
# Gaussian densities and KLs
# --------------------------------------------------------------------------------------


def test_std_normal_log_prob_matches_scipy(rng, transform):
    z = rng.normal(size=(3, 4, L)) * 2
    got = transform(std_normal_log_prob)(jnp.asarray(z))
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, scipy.stats.norm.logpdf(z).sum(-1), rtol=1e-14)
    got32 = std_normal_log_prob(jnp.asarray(z, jnp.float32))
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, scipy.stats.norm.logpdf(z).sum(-1), rtol=1e-6)


def test_gaussian_kls_match_numpy_eager_and_jitted(rng, transform):
    mq, mp = rng.normal(size=(2, 5, 3))
    sq, sp = np.exp(rng.normal(size=(2, 5, 3)))
    args = [jnp.asarray(a) for a in (mq, sq, mp, sp)]
    np.testing.assert_allclose(
        transform(gaussian_kl)(*args), np_gaussian_kl(mq, sq, mp, sp), rtol=1e-12
    )
    np.testing.assert_allclose(
        transform(standard_normal_kl)(args[0], args[1]),
        np_gaussian_kl(mq, sq, np.zeros_like(mq), np.ones_like(sq)),
        rtol=1e-12,
    )


def test_gaussian_kl_matches_numpy_formula(rng):
    mq, mp = rng.normal(size=(2, 5, 3))
    sq, sp = np.exp(rng.normal(size=(2, 5, 3)))
    got = gaussian_kl(*(jnp.asarray(a) for a in (mq, sq, mp, sp)))
    assert got.shape == (5,)
    # Same quantity, different arithmetic: agreement to float64 rounding.
    np.testing.assert_allclose(got, np_gaussian_kl(mq, sq, mp, sp), rtol=1e-12)


def test_gaussian_kl_is_accurate_for_nearly_equal_scales():
    # t = log(sq/sp) = 1e-9: KL = 0.5 (e^{2t} - 1 - 2t) ~ t^2 = 1e-18 per dim. Forming
    # sq^2/sp^2 - 1 - log(sq^2/sp^2) would give pure rounding noise (~1e-16) here.
    t = 1e-9
    sp = jnp.array([0.3, 2.0, 7.0])
    sq = sp * np.exp(t)
    got = float(gaussian_kl(jnp.zeros(3), sq, jnp.zeros(3), sp))
    expected = 3 * 0.5 * (np.expm1(2 * t) - 2 * t)  # = 3 (t^2 + 2 t^3 / 3 + ...)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A mean shift of 1e-10 scales adds 0.5 * 1e-20 per dim, also resolved.
    got_shift = float(gaussian_kl(1e-10 * sp, sp, jnp.zeros(3), sp))
    np.testing.assert_allclose(got_shift, 1.5e-20, rtol=1e-10)


def test_gaussian_kl_matches_monte_carlo():
    rng = np.random.default_rng(3)
    mq, sq = np.array([0.5, -1.0]), np.array([0.7, 1.5])
    mp, sp = np.array([0.0, 0.3]), np.array([1.2, 0.9])
    m = 200_000
    z = mq[None, :] + sq[None, :] * rng.normal(size=(m, 2))
    log_ratio = np.sum(
        scipy.stats.norm.logpdf(z, mq[None, :], sq[None, :])
        - scipy.stats.norm.logpdf(z, mp[None, :], sp[None, :]),
        axis=1,
    )
    tol = Z_SIGMAS * log_ratio.std() / np.sqrt(m)
    got = float(gaussian_kl(*(jnp.asarray(a) for a in (mq, sq, mp, sp))))
    assert abs(got - log_ratio.mean()) < tol


def test_standard_normal_kl_equals_gaussian_kl_to_standard_normal(rng):
    mean = jnp.asarray(rng.normal(size=(4, 3)))
    scale = jnp.asarray(np.exp(rng.normal(size=(4, 3))))
    expected = gaussian_kl(mean, scale, jnp.zeros((4, 3)), jnp.ones((4, 3)))
    np.testing.assert_allclose(standard_normal_kl(mean, scale), expected, rtol=1e-13)
    assert float(standard_normal_kl(jnp.zeros((1, 3)), jnp.ones((1, 3)))[0]) == 0.0


def test_closed_form_elbo_oracle_is_log_p_minus_kl_to_posterior():
    # Checks the test's own oracle and gaussian_kl together: ELBO(q) = log p(x) - KL(q||post).
    m = make_model()
    post_means, post_scales = exact_posterior_params(m)
    means, scales = imperfect_posterior_params(m)
    kl_to_post = gaussian_kl(*(jnp.asarray(a) for a in (means, scales, post_means, post_scales)))
    np.testing.assert_allclose(
        closed_form_elbo(m, means, scales), log_marginal(m) - kl_to_post, rtol=1e-12
    )
    np.testing.assert_allclose(
        closed_form_elbo(m, post_means, post_scales), log_marginal(m), rtol=1e-12
    )


# --------------------------------------------------------------------------------------
# Monte Carlo ELBO and IWAE on the linear-Gaussian model
#
# Module-level jitted functions of (keys, means, scales): tests that share a configuration
# share one compiled program (the suite runs on a shared 2-core CPU).
# --------------------------------------------------------------------------------------

MODEL = make_model()
LOG_LIK, LOG_JOINT, PRIOR = model_fns(MODEL)
LOG_P = log_marginal(MODEL)
EXACT = exact_posterior_params(MODEL)
IMPERFECT = imperfect_posterior_params(MODEL)
REPS = 4000  # replicates for unbiasedness checks
IWAE_REPS = 400


@functools.partial(jax.jit, static_argnames=("num_samples", "analytic_kl"))
def elbo_reps(keys, means, scales, *, num_samples, analytic_kl):
    """mc_elbo for each key: shape (len(keys), n)."""
    q = distrax.MultivariateNormalDiag(means, scales)
    return jax.vmap(
        lambda k: mc_elbo(k, q, LOG_LIK, PRIOR, num_samples=num_samples, analytic_kl=analytic_kl)
    )(keys)


@functools.partial(jax.jit, static_argnames=("num_samples", "chunk_size"))
def iwae_reps(keys, means, scales, *, num_samples, chunk_size):
    """iwae_bound for each key: shape (len(keys), n)."""
    q = distrax.MultivariateNormalDiag(means, scales)
    return jax.vmap(
        lambda k: iwae_bound(k, q, LOG_JOINT, num_samples=num_samples, chunk_size=chunk_size)
    )(keys)


def _keys(num, seed):
    return jax.random.split(jax.random.key(seed), num)


def _mean_se(values):
    values = np.asarray(values)
    return values.mean(0), values.std(0) / np.sqrt(values.shape[0])


def test_bounds_are_ordered_and_tighten_with_more_samples():
    elbo = elbo_reps(_keys(REPS, 1), *IMPERFECT, num_samples=2, analytic_kl=True)
    iwae5 = iwae_reps(_keys(IWAE_REPS, 2), *IMPERFECT, num_samples=5, chunk_size=None)
    iwae50 = iwae_reps(_keys(IWAE_REPS, 3), *IMPERFECT, num_samples=50, chunk_size=16)
    (e, se_e), (i5, se_5), (i50, se_50) = _mean_se(elbo), _mean_se(iwae5), _mean_se(iwae50)
    # Gaps to log p(x) at this q are about 0.64, 0.38 and 0.16 nats with standard errors
    # <= 0.03: each step must exceed 3 combined standard errors (a 5+ sigma margin).
    assert np.all(i5 - e > 3 * np.hypot(se_e, se_5))
    assert np.all(i50 - i5 > 3 * np.hypot(se_5, se_50))
    assert np.all(LOG_P - i50 > 3 * se_50)
    # ELBO = log p(x) - KL(q || posterior) exactly, so the first gap is known.
    assert np.all(np.abs(e - closed_form_elbo(MODEL, *IMPERFECT)) < Z_SIGMAS * se_e)


def test_exact_posterior_gives_log_p_for_every_sample():
    # Zero variance: with q the posterior, p(x, z) / q(z) = p(x) for every z. Rounding in
    # log-densities of size ~10 leaves ~1e-14; 1e-10 is the tolerance.
    expected = np.broadcast_to(LOG_P, (IWAE_REPS, N))
    for num_samples, chunk_size in ((5, None), (50, 16)):
        iwae = iwae_reps(
            _keys(IWAE_REPS, 4), *EXACT, num_samples=num_samples, chunk_size=chunk_size
        )
        np.testing.assert_allclose(iwae, expected, rtol=0, atol=1e-10)
    sampled = elbo_reps(_keys(REPS, 5), *EXACT, num_samples=2, analytic_kl=False)
    np.testing.assert_allclose(sampled, np.broadcast_to(LOG_P, (REPS, N)), rtol=0, atol=1e-10)
    # The analytic-KL estimator is not zero-variance, but is unbiased for log p(x).
    analytic = elbo_reps(_keys(REPS, 6), *EXACT, num_samples=2, analytic_kl=True)
    mean, se = _mean_se(analytic)
    assert np.all(np.abs(mean - LOG_P) < Z_SIGMAS * se)
    assert np.all(se * np.sqrt(REPS) > 0.1)  # the check above is not vacuous


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_mc_elbo_is_unbiased_for_closed_form_elbo(analytic_kl):
    est = elbo_reps(_keys(REPS, 7), *IMPERFECT, num_samples=2, analytic_kl=analytic_kl)
    mean, se = _mean_se(est)
    assert np.all(np.abs(mean - closed_form_elbo(MODEL, *IMPERFECT)) < Z_SIGMAS * se)


def test_analytic_and_sampled_kl_agree_in_expectation():
    # Same keys, so the difference is KL_hat - KL: its mean must be 0 within 5 sigma.
    keys = _keys(REPS, 8)
    diff = np.asarray(elbo_reps(keys, *IMPERFECT, num_samples=2, analytic_kl=False)) - np.asarray(
        elbo_reps(keys, *IMPERFECT, num_samples=2, analytic_kl=True)
    )
    mean, se = _mean_se(diff)
    assert np.all(se > 0)
    assert np.all(np.abs(mean) < Z_SIGMAS * se)


@jax.jit
def _elbo_sum(key, means, scales):
    q = distrax.MultivariateNormalDiag(means, scales)
    return jnp.sum(mc_elbo(key, q, LOG_LIK, PRIOR, num_samples=3))


_elbo_grad = jax.jit(jax.grad(_elbo_sum, argnums=(1, 2)))


def test_mc_elbo_gradients_match_finite_differences():
    means, scales = (jnp.asarray(a) for a in IMPERFECT)
    key = jax.random.key(7)
    grads = _elbo_grad(key, means, scales)
    eps = 1e-6
    for arg, grad in enumerate(grads):
        fd = np.zeros(means.shape)
        for idx in np.ndindex(means.shape):
            up, down = [means, scales], [means, scales]
            up[arg] = up[arg].at[idx].add(eps)
            down[arg] = down[arg].at[idx].add(-eps)
            fd[idx] = (_elbo_sum(key, *up) - _elbo_sum(key, *down)) / (2 * eps)
        # Central differences: truncation O(eps^2) ~ 1e-12, rounding ~ 1e-16 * |f| / eps
        # ~ 1e-9; 1e-6 leaves room while catching any missing reparameterisation path.
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)


def test_mc_elbo_gradients_match_closed_form_in_expectation():
    means, scales = (jnp.asarray(a) for a in IMPERFECT)
    g_means, g_scales = jax.jit(jax.vmap(_elbo_grad, in_axes=(0, None, None)))(
        _keys(2000, 11), means, scales
    )
    d_means, d_scales = closed_form_elbo_grads(MODEL, *IMPERFECT)
    for got, want in ((g_means, d_means), (g_scales, d_scales)):
        mean, se = _mean_se(got)
        assert np.all(np.abs(mean - want) < Z_SIGMAS * se)


# --------------------------------------------------------------------------------------
# The reparameterised ELBO of a diagonal Gaussian q
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_samples",))
def gauss_elbo_reps(keys, means, scales, *, num_samples):
    """gaussian_mc_elbo for each key: shape (len(keys), n)."""
    log_scale = jnp.log(scales)
    return jax.vmap(
        lambda k: gaussian_mc_elbo(k, LOG_JOINT, means, log_scale, num_samples=num_samples)
    )(keys)


def test_reparameterize_follows_its_sampling_contract(transform):
    key = jax.random.key(3)
    means, scales = (jnp.asarray(a) for a in IMPERFECT)
    z, eps = transform(functools.partial(reparameterize, num_samples=4))(key, means, scales)
    want_eps = np.asarray(jax.random.normal(key, (4, N, L), jnp.float64))
    np.testing.assert_array_equal(eps, want_eps)
    np.testing.assert_allclose(z, IMPERFECT[0][None] + IMPERFECT[1][None] * want_eps, rtol=1e-15)


def test_gaussian_mc_elbo_matches_scipy_on_its_draws(transform):
    # Oracle: the draws of reparameterize's contract, log q and log p by SciPy.
    key = jax.random.key(9)
    means, scales = IMPERFECT
    fn = functools.partial(gaussian_mc_elbo, num_samples=3)
    got = transform(lambda k, m, s: fn(k, LOG_JOINT, m, s))(
        key, jnp.asarray(means), jnp.log(jnp.asarray(scales))
    )
    eps = np.asarray(jax.random.normal(key, (3, N, L), jnp.float64))
    z = means[None] + scales[None] * eps
    log_q = scipy.stats.norm.logpdf(z, means[None], scales[None]).sum(-1)
    want = np.mean(np.asarray(LOG_JOINT(jnp.asarray(z))) - log_q, axis=0)
    # Two float64 evaluations of log-densities of size ~10: rounding ~1e-14.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_gaussian_mc_elbo_is_log_p_for_every_draw_at_the_posterior(transform):
    # Zero variance at the exact posterior (as for the IWAE): every draw gives log p(x).
    means, log_scale = jnp.asarray(EXACT[0]), jnp.log(jnp.asarray(EXACT[1]))
    fn = functools.partial(gaussian_mc_elbo, num_samples=7)
    got = transform(lambda k, m, s: fn(k, LOG_JOINT, m, s))(jax.random.key(2), means, log_scale)
    np.testing.assert_allclose(got, LOG_P, rtol=0, atol=1e-10)


def test_gaussian_mc_elbo_is_unbiased_and_equals_mc_elbo_in_expectation():
    est = gauss_elbo_reps(_keys(REPS, 7), *IMPERFECT, num_samples=2)
    mean, se = _mean_se(est)
    assert np.all(se * np.sqrt(REPS) > 0.1)  # a real spread, so the check can fail
    assert np.all(np.abs(mean - closed_form_elbo(MODEL, *IMPERFECT)) < Z_SIGMAS * se)


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_gaussian_elbo_terms_are_the_elbo_split(analytic_kl, transform):
    key = jax.random.key(5)
    means, scales = (jnp.asarray(a) for a in IMPERFECT)
    fn = functools.partial(gaussian_elbo_terms, num_samples=3, analytic_kl=analytic_kl)
    recon, kl = transform(lambda k, m, s: fn(k, LOG_LIK, m, s))(key, means, scales)
    z, _ = reparameterize(key, means, scales, 3)
    np.testing.assert_allclose(recon, np.mean(np.asarray(LOG_LIK(z)), 0), rtol=1e-14)
    if analytic_kl:
        np.testing.assert_allclose(kl, standard_normal_kl(means, scales), rtol=1e-14)
    else:
        # The same draws: recon - kl is gaussian_mc_elbo with the standard-normal prior.
        whole = gaussian_mc_elbo(key, LOG_JOINT, means, jnp.log(scales), num_samples=3)
        np.testing.assert_allclose(recon - kl, whole, rtol=0, atol=1e-12)


def test_gaussian_elbo_float32_in_float32_out():
    f32 = jnp.float32
    log_lik, log_joint, _ = model_fns(MODEL, f32)
    means, scales = (jnp.asarray(a, f32) for a in IMPERFECT)
    key = jax.random.key(0)
    out = gaussian_mc_elbo(key, log_joint, means, jnp.log(scales), num_samples=2)
    recon, kl = gaussian_elbo_terms(key, log_lik, means, scales, analytic_kl=False)
    for a in (out, recon, kl, std_normal_log_prob(means)):
        assert a.dtype == f32


def _manual_iwae(key, means, scales, num_samples):
    """Oracle for iwae_bound's sampling contract: sample j uses split(key)[j]; SciPy maths."""
    q = distrax.MultivariateNormalDiag(jnp.asarray(means), jnp.asarray(scales))
    with jax.numpy_rank_promotion("allow"):
        z = np.stack([np.asarray(q.sample(seed=k)) for k in jax.random.split(key, num_samples)])
    log_q = np.sum(scipy.stats.norm.logpdf(z, means[None], scales[None]), axis=-1)
    log_w = np.asarray(LOG_JOINT(jnp.asarray(z))) - log_q
    return scipy.special.logsumexp(log_w, axis=0) - np.log(num_samples)


def test_iwae_chunking_gives_the_same_answer():
    keys = _keys(IWAE_REPS, 4)
    unchunked = np.asarray(iwae_reps(keys, *IMPERFECT, num_samples=5, chunk_size=None))
    # The sampling contract, checked against a Python loop over keys and SciPy.
    expected = _manual_iwae(keys[0], *IMPERFECT, 5)
    np.testing.assert_allclose(unchunked[0], expected, rtol=0, atol=1e-10)
    # Chunks of one sample, and of 2 (not dividing 5: the last chunk is padded and masked).
    for chunk_size in (1, 2):
        got = iwae_reps(keys, *IMPERFECT, num_samples=5, chunk_size=chunk_size)
        # The samples are identical by contract; only logsumexp rounding differs.
        np.testing.assert_allclose(got, unchunked, rtol=0, atol=1e-10)


def test_chunked_iwae_gradient_equals_unchunked():
    means, scales = (jnp.asarray(a) for a in IMPERFECT)
    key = jax.random.key(9)

    def total(mu, s, chunk):
        return jnp.sum(iwae_reps(key[None], mu, s, num_samples=5, chunk_size=chunk))

    grad = jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=2)
    full, chunked = grad(means, scales, None), grad(means, scales, 2)
    assert np.all(np.abs(np.asarray(full[0])) > 1e-3)
    for a, b in zip(full, chunked, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# estimate_log_likelihood
# --------------------------------------------------------------------------------------


def _amortized(m: LinearGaussian, exact: bool, dtype=jnp.float64):
    """posterior_fn and log_joint_fn(x_b, z) for the linear-Gaussian model, in ``dtype``."""
    cov = np.linalg.inv(np.eye(L) + m.w.T @ m.w / m.sigma**2)
    gain = jnp.asarray(m.w @ cov / m.sigma**2, dtype)  # (d, l): mean = (x - b) @ gain
    post_scale = jnp.asarray(np.sqrt(np.diag(cov)), dtype)
    w, b = jnp.asarray(m.w, dtype), jnp.asarray(m.b, dtype)
    shift, shrink = (0.0, 1.0) if exact else (0.5, 0.6)

    def posterior_fn(xb):
        mean = (xb - b[None, :]) @ gain + shift * post_scale[None, :]
        scale = jnp.broadcast_to(shrink * post_scale[None, :], mean.shape)
        return distrax.MultivariateNormalDiag(mean, scale)

    def log_joint_fn(xb, z):
        resid = xb[None, :, :] - jnp.einsum("dl,sbl->sbd", w, z) - b[None, None, :]
        log_lik = -0.5 * jnp.sum(jnp.square(resid), axis=-1) / m.sigma**2
        log_lik = log_lik - float(0.5 * D * np.log(2 * np.pi * m.sigma**2))  # weakly typed
        return log_lik - 0.5 * jnp.sum(jnp.square(z), axis=-1) - float(L * np.log(2 * np.pi) / 2)

    return posterior_fn, log_joint_fn


def test_estimate_log_likelihood_equals_per_example_iwae():
    m = make_model(n=7)
    posterior_fn, log_joint_fn = _amortized(m, exact=False)
    x = jnp.asarray(m.x)
    key = jax.random.key(3)
    # The documented definition, one example at a time (compiled once, called n times).
    direct_one = jax.jit(
        lambda k, xi: iwae_bound(
            k, posterior_fn(xi), lambda z: log_joint_fn(xi, z), num_samples=10
        )[0]
    )
    direct = np.array([direct_one(jax.random.fold_in(key, i), x[i : i + 1]) for i in range(7)])
    # data_chunk=3 does not divide n=7 (padding), sample_chunk=4 does not divide 10.
    got = estimate_log_likelihood(
        key, x, posterior_fn, log_joint_fn, num_samples=10, sample_chunk=4, data_chunk=3
    )
    assert got.shape == (7,)
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-10)


def test_estimate_log_likelihood_is_exact_at_the_exact_posterior():
    # Every point has a different log p(x): a padding or ordering bug cannot hide.
    m = make_model(n=5)
    posterior_fn, log_joint_fn = _amortized(m, exact=True)
    got = estimate_log_likelihood(
        jax.random.key(0),
        jnp.asarray(m.x),
        posterior_fn,
        log_joint_fn,
        num_samples=6,
        sample_chunk=64,  # chunks larger than the data or sample counts are clipped
        data_chunk=64,
    )
    np.testing.assert_allclose(got, log_marginal(m), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------
# Gibbs variational principle
# --------------------------------------------------------------------------------------

K = 5


def _gibbs_fn(probs_xi, g, log_eta):
    tilted = tilted_distribution(g, log_eta)
    return (
        gibbs_objective(probs_xi, g, log_eta),
        gibbs_log_partition(g, log_eta),
        tilted,
        gibbs_objective(tilted, g, log_eta),
    )


_gibbs = jax.jit(chex.assert_max_traces(_gibbs_fn, n=1))


def test_gibbs_objective_at_tilted_equals_log_partition(rng):
    g = jnp.asarray(rng.normal(size=(3, K)) * 3)
    eta = rng.random(size=(3, K))
    eta[1, 2] = 0.0  # a point without reference mass
    log_eta = jnp.log(jnp.asarray(eta / eta.sum(1, keepdims=True)))
    tilted = tilted_distribution(g, log_eta)
    np.testing.assert_allclose(
        gibbs_objective(tilted, g, log_eta), gibbs_log_partition(g, log_eta), rtol=0, atol=1e-12
    )
    oracle = scipy.special.logsumexp(np.asarray(g + log_eta), axis=1)
    np.testing.assert_allclose(gibbs_log_partition(g, log_eta), oracle, rtol=1e-14)
    assert float(tilted[1, 2]) == 0.0
    # Any other xi is strictly worse.
    xi = rng.random(size=(3, K))
    xi = jnp.asarray(xi / xi.sum(1, keepdims=True))
    xi = xi.at[1, 2].set(0.0) / jnp.sum(xi.at[1, 2].set(0.0), axis=1, keepdims=True)
    assert np.all(gibbs_log_partition(g, log_eta) - gibbs_objective(xi, g, log_eta) > 1e-3)


def test_gibbs_objective_is_the_discrete_elbo():
    # eta = prior, g = log p(x|z): the Gibbs objective of xi is the ELBO of q = xi, and the
    # tilted measure is the exact posterior.
    rng = np.random.default_rng(4)
    log_prior = jnp.log(jnp.asarray(rng.dirichlet(np.ones(K))))
    log_lik = jnp.asarray(rng.normal(size=(2, K)))
    log_joint = log_lik + log_prior[None, :]
    q = jnp.asarray(rng.dirichlet(np.ones(K), size=2))
    eta = jnp.broadcast_to(log_prior[None, :], (2, K))
    np.testing.assert_allclose(
        gibbs_objective(q, log_lik, eta), discrete_elbo(log_joint, q), rtol=1e-13
    )
    np.testing.assert_allclose(
        tilted_distribution(log_lik, eta), jax.nn.softmax(log_joint, axis=-1), rtol=1e-13
    )


_simplex = hnp.arrays(np.float64, (K,), elements=st.floats(0.01, 1.0))


@given(
    g=hnp.arrays(np.float64, (K,), elements=st.floats(-10.0, 10.0)),
    eta=_simplex,
    xi=_simplex,
)
def test_gibbs_gap_is_kl_to_tilted(g, eta, xi):
    eta, xi = eta / eta.sum(), xi / xi.sum()
    obj, log_z, tilted, obj_at_tilted = _gibbs(
        jnp.asarray(xi), jnp.asarray(g), jnp.asarray(np.log(eta))
    )
    # Oracle in NumPy: KL(xi || softmax(g + log eta)).
    log_tilted = g + np.log(eta) - scipy.special.logsumexp(g + np.log(eta))
    kl = float(np.sum(xi * (np.log(xi) - log_tilted)))
    np.testing.assert_allclose(float(log_z - obj), kl, rtol=1e-9, atol=1e-12)
    assert float(log_z - obj) >= -1e-12
    np.testing.assert_allclose(float(obj_at_tilted), float(log_z), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.log(np.asarray(tilted)), log_tilted, rtol=0, atol=1e-12)


def test_gibbs_principle_on_a_gaussian_space_by_monte_carlo():
    # eta = N(0, 1), g(z) = a z + c z^2 with c < 1/2:
    #   log E_eta[e^g] = -0.5 log(1 - 2c) + a^2 / (2 (1 - 2c)),
    #   tilted measure = N(a / (1 - 2c), 1 / (1 - 2c)).
    a, c = 0.8, 0.2
    log_z = -0.5 * np.log(1 - 2 * c) + a**2 / (2 * (1 - 2 * c))
    t_mean, t_scale = a / (1 - 2 * c), 1 / np.sqrt(1 - 2 * c)
    m = 100_000
    eps = np.random.default_rng(6).normal(size=m)

    def objective_samples(mean, scale):
        z = mean + scale * eps
        kl = float(standard_normal_kl(jnp.array([mean]), jnp.array([scale])))
        return a * z + c * z**2 - kl

    def log_ratio_samples(mean, scale):  # g(z) + log eta(z) - log xi(z)
        z = mean + scale * eps
        return (
            a * z + c * z**2 + scipy.stats.norm.logpdf(z) - scipy.stats.norm.logpdf(z, mean, scale)
        )

    at_tilted = objective_samples(t_mean, t_scale)
    assert abs(at_tilted.mean() - log_z) < Z_SIGMAS * at_tilted.std() / np.sqrt(m)
    np.testing.assert_allclose(log_ratio_samples(t_mean, t_scale), log_z, rtol=1e-12)
    for mean, scale in ((t_mean + 1.0, t_scale), (t_mean, 0.5 * t_scale)):
        vals = objective_samples(mean, scale)
        se = vals.std() / np.sqrt(m)
        gap = float(
            gaussian_kl(
                jnp.array([mean]), jnp.array([scale]), jnp.array([t_mean]), jnp.array([t_scale])
            )
        )
        assert gap > 10 * se  # the perturbation is resolvable
        assert log_z - vals.mean() > Z_SIGMAS * se
        assert abs((log_z - vals.mean()) - gap) < Z_SIGMAS * se


# --------------------------------------------------------------------------------------
# dtypes, jit, bad input
# --------------------------------------------------------------------------------------


def test_float32_in_float32_out():
    f32 = jnp.float32
    log_lik, log_joint, prior = model_fns(MODEL, f32)
    mq, sq = (jnp.asarray(a, f32) for a in IMPERFECT)
    g = jnp.asarray([0.5, -1.0, 2.0], f32)
    log_eta = jnp.log(jnp.asarray([0.2, 0.3, 0.5], f32))

    @jax.jit
    def everything(key):
        q = distrax.MultivariateNormalDiag(mq, sq)
        return {
            "gaussian_kl": gaussian_kl(mq, sq, jnp.zeros_like(mq), jnp.ones_like(sq)),
            "standard_normal_kl": standard_normal_kl(mq, sq),
            "mc_elbo": mc_elbo(key, q, log_lik, prior, num_samples=3),
            "mc_elbo_sampled": mc_elbo(key, q, log_lik, prior, num_samples=3, analytic_kl=False),
            "iwae": iwae_bound(key, q, log_joint, num_samples=5, chunk_size=2),
            "log_partition": gibbs_log_partition(g, log_eta),
            "tilted": tilted_distribution(g, log_eta),
            "objective": gibbs_objective(jax.nn.softmax(g), g, log_eta),
            "categorical_kl": categorical_kl(jax.nn.softmax(g), log_eta),
        }

    outs = everything(jax.random.key(0))
    posterior_fn32, log_joint_fn32 = _amortized(MODEL, exact=False, dtype=f32)
    outs["estimate"] = estimate_log_likelihood(
        jax.random.key(0),
        jnp.asarray(MODEL.x, f32),
        posterior_fn32,
        log_joint_fn32,
        num_samples=4,
        sample_chunk=3,
        data_chunk=2,
    )
    for name, out in outs.items():
        assert out.dtype == jnp.float32, name
        assert bool(jnp.all(jnp.isfinite(out))), name
    # float32 agrees with the float64 closed forms to float32 accuracy.
    np.testing.assert_allclose(
        outs["standard_normal_kl"],
        standard_normal_kl(*(jnp.asarray(a) for a in IMPERFECT)),
        rtol=1e-5,
    )


def test_jit_matches_eager_and_oracles():
    rng = np.random.default_rng(2)
    mq, mp = rng.normal(size=(2, 3, 2))
    sq, sp = np.exp(rng.normal(size=(2, 3, 2)))
    args = [jnp.asarray(a) for a in (mq, sq, mp, sp)]
    np.testing.assert_allclose(gaussian_kl(*args), np_gaussian_kl(mq, sq, mp, sp), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(gaussian_kl)(*args), gaussian_kl(*args), rtol=1e-14)

    # The keys and configuration of test_iwae_chunking_gives_the_same_answer.
    keys = _keys(IWAE_REPS, 4)
    q = diag_q(*IMPERFECT)
    eager_iwae = iwae_bound(keys[0], q, LOG_JOINT, num_samples=5, chunk_size=2)
    jit_iwae = iwae_reps(keys, *IMPERFECT, num_samples=5, chunk_size=2)[0]
    np.testing.assert_allclose(eager_iwae, jit_iwae, rtol=0, atol=1e-12)
    expected = _manual_iwae(keys[0], *IMPERFECT, 5)
    np.testing.assert_allclose(eager_iwae, expected, rtol=0, atol=1e-10)

    # The keys and configuration of test_mc_elbo_is_unbiased_for_closed_form_elbo[False].
    key = _keys(REPS, 7)[0]
    eager_elbo = mc_elbo(key, q, LOG_LIK, PRIOR, num_samples=2, analytic_kl=False)
    jit_elbo = elbo_reps(_keys(REPS, 7), *IMPERFECT, num_samples=2, analytic_kl=False)[0]
    np.testing.assert_allclose(eager_elbo, jit_elbo, rtol=0, atol=1e-12)
    # Oracle for mc_elbo: the samples it documents, fed through SciPy.
    with jax.numpy_rank_promotion("allow"):
        z = np.asarray(q.sample(seed=key, sample_shape=(2,)))
    means, scales = IMPERFECT
    log_ratio = np.sum(
        scipy.stats.norm.logpdf(z) - scipy.stats.norm.logpdf(z, means[None], scales[None]),
        axis=-1,
    )
    expected = np.mean(np.asarray(LOG_LIK(jnp.asarray(z))) + log_ratio, axis=0)
    np.testing.assert_allclose(eager_elbo, expected, rtol=0, atol=1e-10)


def test_bad_input_raises_value_error():
    q = diag_q(*IMPERFECT)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        mc_elbo(key, q, LOG_LIK, PRIOR, num_samples=0)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        iwae_bound(key, q, LOG_JOINT, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        iwae_bound(key, q, LOG_JOINT, num_samples=4, chunk_size=0)
    posterior_fn, log_joint_fn = _amortized(MODEL, exact=False)
    x = jnp.asarray(MODEL.x)
    for kwargs, msg in (
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"sample_chunk": 0}, "sample_chunk must be >= 1"),
        ({"data_chunk": -2}, "data_chunk must be >= 1"),
    ):
        with pytest.raises(ValueError, match=msg):
            estimate_log_likelihood(key, x, posterior_fn, log_joint_fn, **kwargs)
    with pytest.raises(ValueError, match="NaN or inf"):
        estimate_log_likelihood(key, x.at[1, 0].set(jnp.nan), posterior_fn, log_joint_fn)
    # No closed-form KL between a Gaussian and a Laplace product.
    laplace = distrax.Independent(distrax.Laplace(jnp.zeros(L), jnp.ones(L)), 1)
    with pytest.raises(ValueError, match="closed-form KL"):
        mc_elbo(key, q, LOG_LIK, laplace)
    sampled_kl = jax.jit(lambda k: mc_elbo(k, q, LOG_LIK, laplace, analytic_kl=False))(key)
    assert sampled_kl.shape == (N,)  # the Monte Carlo KL needs no closed form
    with pytest.raises(ValueError, match="log_likelihood_fn must return"):
        mc_elbo(key, q, lambda z: jnp.sum(LOG_LIK(z), axis=0), PRIOR)
    with pytest.raises(ValueError, match="batch shape"):
        iwae_bound(
            key, distrax.MultivariateNormalDiag(jnp.zeros(L), jnp.ones(L)), LOG_JOINT, num_samples=2
        )
