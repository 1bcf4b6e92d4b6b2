"""The linear-Gaussian model (pPCA and factor analysis in one): the protocol, against oracles.

Every test runs for both noise types; the core maths also with and without ``jax.jit`` (the
equivalent of chex's variants). Tolerances: closed forms in float64 against SciPy/NumPy at
rtol 1e-10 to 1e-12 (the two sides factorise different small matrices, condition numbers
< 1e3 here, so agreement is to ~1e3 eps); identities that are the same arithmetic in another
order (e_step vs expected_stats at the posterior) at rtol 1e-12; EM paths compared between
weighted and duplicated data at rtol 1e-9 (six EM iterations of O(10) reassociated sums,
each amplifying rounding by the iteration's condition number).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from emvi import em
from emvi import linear_gaussian as lg
from emvi.testing import JIT_VARIANTS, assert_trees_close, variant

NOISES = ("isotropic", "diagonal")
D, L, N = 6, 2, 15


def _params(rng, noise, d=D, ell=L):
    v = rng.uniform(0.3, 1.0) if noise == "isotropic" else rng.uniform(0.2, 1.5, d)
    return lg.LinearGaussianParams(
        jnp.asarray(rng.standard_normal((d, ell))),
        jnp.asarray(rng.standard_normal(d)),
        jnp.asarray(v),
    )


def _np_cov(params):
    w = np.asarray(params.loadings)
    psi = np.broadcast_to(np.asarray(params.noise_variance), (w.shape[0],))
    return w @ w.T + np.diag(psi)


def _random_q(rng, n=N, ell=L):
    a = rng.standard_normal((n, ell, ell)) * 0.5
    cov = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(ell)
    return lg.GaussianPosterior(jnp.asarray(rng.standard_normal((n, ell))), jnp.asarray(cov))


def _np_gauss_kl(m0, s0, m1, s1):
    """KL(N(m0, s0_i) || N(m1_i, s1)) row by row, full covariances (float64 NumPy)."""
    ell = m0.shape[-1]
    s1_inv = np.linalg.inv(s1)
    diff = m1 - m0
    return 0.5 * (
        np.einsum("ab,nba->n", s1_inv, s0)
        + np.einsum("na,ab,nb->n", diff, s1_inv, diff)
        - ell
        + np.linalg.slogdet(s1)[1]
        - np.linalg.slogdet(s0)[1]
    )


def _data(rng, n=N, d=D, offset=4.0):
    return jnp.asarray(rng.standard_normal((n, d)) * 1.5 + offset)


# --------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", NOISES)
def test_model_fills_every_field_of_the_protocol(noise):
    mdl = lg.model(noise)
    em.require(mdl, *em.ExactModel._fields, purpose="the full grid")
    assert lg.model(noise) is mdl  # cached: static under jit, no recompiles


# --------------------------------------------------------------------------------------
# Closed forms against SciPy / NumPy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant_name", JIT_VARIANTS)
@pytest.mark.parametrize("noise", NOISES)
def test_log_prob_matches_scipy_multivariate_normal(rng, noise, variant_name):
    params = _params(rng, noise)
    x = _data(rng)
    expected = multivariate_normal(np.asarray(params.mean), _np_cov(params)).logpdf(np.asarray(x))
    got = variant(variant_name, lg.log_prob)(params, x)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("variant_name", JIT_VARIANTS)
@pytest.mark.parametrize("noise", NOISES)
def test_posterior_matches_gaussian_conditioning_of_the_joint(rng, noise, variant_name):
    """(z, x) is jointly Gaussian with Cov[z, x] = W^T and Cov[x] = C: condition on x."""
    params = _params(rng, noise)
    x = _data(rng)
    w, mu, c = np.asarray(params.loadings), np.asarray(params.mean), _np_cov(params)
    gain = np.linalg.solve(c, w).T  # W^T C^{-1}
    q = variant(variant_name, lg.posterior)(params, x)
    np.testing.assert_allclose(q.mean, (np.asarray(x) - mu) @ gain.T, rtol=1e-10)
    cov = np.broadcast_to(np.eye(L) - gain @ w, (N, L, L))
    np.testing.assert_allclose(q.cov, cov, rtol=1e-10)


@pytest.mark.parametrize("variant_name", JIT_VARIANTS)
@pytest.mark.parametrize("noise", NOISES)
def test_elbo_plus_kl_equals_log_prob(rng, noise, variant_name):
    """ELBO(q) + KL(q || p(z|x)) = log p(x) for arbitrary full-covariance q, and the bound
    touches at the posterior; the KL is NumPy's, the log p SciPy's."""
    params = _params(rng, noise)
    x = _data(rng)
    lp = multivariate_normal(np.asarray(params.mean), _np_cov(params)).logpdf(np.asarray(x))
    elbo = variant(variant_name, lg.elbo)
    post = lg.posterior(params, x)
    np.testing.assert_allclose(elbo(params, post, x), lp, rtol=1e-12)
    q = _random_q(rng)
    kl = _np_gauss_kl(
        np.asarray(q.mean), np.asarray(q.cov), np.asarray(post.mean), np.asarray(post.cov[0])
    )
    np.testing.assert_allclose(lp - np.asarray(elbo(params, q, x)), kl, rtol=1e-9)
    assert np.all(kl > 1e-3)


def test_log_joint_matches_scipy_at_batched_latent_points(rng):
    """log_joint(x, z) = log N(x | Wz + mu, Psi) + log N(z | 0, I), against SciPy, batched."""
    params = _params(rng, "diagonal")
    x = _data(rng, n=4)
    z = rng.standard_normal((3, 4, L))
    got = np.asarray(lg.log_joint(params, x, jnp.asarray(z)))
    w, mu = np.asarray(params.loadings), np.asarray(params.mean)
    psi = np.asarray(params.noise_variance)
    for s in range(3):
        for i in range(4):
            want = multivariate_normal(z[s, i] @ w.T + mu, np.diag(psi)).logpdf(x[i])
            want += multivariate_normal(np.zeros(L), np.eye(L)).logpdf(z[s, i])
            np.testing.assert_allclose(got[s, i], want, rtol=1e-12)


# --------------------------------------------------------------------------------------
# Statistics and the M-step
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant_name", JIT_VARIANTS)
@pytest.mark.parametrize("noise", NOISES)
def test_expected_stats_at_the_posterior_equal_the_e_step_and_drive_one_em_step(
    rng, noise, variant_name
):
    params = _params(rng, noise)
    data = lg.prepare(_data(rng))
    w = jnp.asarray(rng.uniform(0.5, 2.0, N))
    mdl = lg.model(noise)
    stats, ll = variant(variant_name, mdl.e_step)(params, data, w)
    q = mdl.posterior(params, data)
    stats_q = variant(variant_name, mdl.expected_stats)(q, data, w)
    assert_trees_close(stats, stats_q, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ll, jnp.sum(w * mdl.log_prob(params, data)), rtol=1e-12)
    # The closed-form M-step from the posterior's statistics is one iteration of the driver.
    new = variant(variant_name, mdl.m_step)(stats_q, None)
    one = em.run_em(mdl, params, data, w, max_iter=1, tol=0.0)
    assert_trees_close(new, one.params, rtol=1e-12)


def _objective(u, q, x, w, hyper):
    """sum_i w_i ELBO_i + log prior, as a function of the unconstrained parameters."""
    params = lg.from_unconstrained(u)
    return jnp.sum(w * lg.elbo(params, q, x)) + lg.log_prior(params, hyper)


_grad_objective = jax.jit(jax.grad(_objective))


@functools.partial(jax.jit, static_argnames="noise")
def _m_step_from_q(q, data, w, hyper, *, noise):
    return lg.m_step(lg.expected_stats(q, data, w), hyper, noise=noise)


@pytest.mark.parametrize("use_prior", [False, True])
@pytest.mark.parametrize("noise", NOISES)
def test_m_step_is_a_stationary_point_of_the_elbo_plus_log_prior(rng, noise, use_prior):
    """jax.grad of sum_i w_i ELBO(theta, q_i) + log p(theta) vanishes at m_step(expected_stats(q)),
    for an arbitrary q: the M-step, the ELBO, expected_stats and log_prior agree."""
    x = _data(rng)
    data = lg.prepare(x)
    q = _random_q(rng)
    w = jnp.asarray(rng.uniform(0.5, 2.0, N))
    prior = lg.LinearGaussianPrior(3.0, 2.0) if use_prior else None
    hyper = lg.make_hyper(prior, 0.0, jnp.float64)
    params = _m_step_from_q(q, data, w, hyper, noise=noise)
    grad = _grad_objective(lg.to_unconstrained(params), q, x, w, hyper)
    # Scale: the same gradient at a slightly moved point is O(1); at the optimum it is
    # rounding (the objective is O(100), so 1e-9 is ~1e4 eps of it).
    moved = jax.tree_util.tree_map(lambda a: a + 0.01, lg.to_unconstrained(params))
    g_moved = _grad_objective(moved, q, x, w, hyper)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(g_moved))
    assert scale > 1e-2
    for leaf in jax.tree_util.tree_leaves(grad):
        np.testing.assert_allclose(leaf, 0.0, atol=1e-9)


@pytest.mark.parametrize("noise", NOISES)
def test_map_em_never_decreases_the_log_posterior(rng, noise):
    x = _data(rng, n=40)
    data = lg.prepare(x)
    mdl = lg.model(noise)
    hyper = lg.make_hyper(lg.LinearGaussianPrior(2.0, 5.0), 0.0, jnp.float64)
    params = _params(rng, noise)
    w = jnp.ones(40)
    objs = []
    step = jax.jit(
        lambda p: (
            mdl.m_step(mdl.e_step(p, data, w)[0], hyper),
            mdl.e_step(p, data, w)[1] + mdl.log_prior(p, hyper),
        )
    )
    for _ in range(8):
        params, obj = step(params)
        objs.append(float(obj))
    assert np.all(np.diff(objs) >= -1e-10 * np.abs(objs[1:]))
    assert objs[-1] - objs[0] > 1.0


# --------------------------------------------------------------------------------------
# Bijections
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant_name", JIT_VARIANTS)
@pytest.mark.parametrize("noise", NOISES)
def test_bijections_round_trip_and_the_posterior_is_in_the_q_family(rng, noise, variant_name):
    mdl = lg.model(noise)
    params = _params(rng, noise)
    back = variant(variant_name, lambda p: mdl.from_unconstrained(mdl.to_unconstrained(p)))(params)
    assert_trees_close(back, params, rtol=1e-13)
    q = lg.posterior(params, _data(rng))
    u = variant(variant_name, mdl.q_to_unconstrained)(q)
    assert u.shape == (N, L + L * (L + 1) // 2)
    assert_trees_close(
        variant(variant_name, mdl.q_from_unconstrained)(u), q, rtol=1e-12, atol=1e-14
    )
    # Any real vector is a valid q (positive-definite covariance), and the map is a bijection.
    raw = jnp.asarray(rng.standard_normal((N, 5)) * 2)
    q_raw = mdl.q_from_unconstrained(raw)
    assert np.all(np.linalg.eigvalsh(np.asarray(q_raw.cov)) > 0)
    np.testing.assert_allclose(mdl.q_to_unconstrained(q_raw), raw, rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------------------
# The fit wrapper
# --------------------------------------------------------------------------------------


def _gap_data(seed, n=40, d=5):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, 2)) * 2.0
    return rng.standard_normal((n, 2)) @ w.T + rng.standard_normal((n, d)) + 3.0


_SETTINGS = dict(max_iter=6, tol=0.0)


@pytest.mark.parametrize("noise", NOISES)
def test_integer_sample_weights_equal_duplicated_rows_and_chunks_change_nothing(noise):
    x = _gap_data(3)
    counts = np.random.default_rng(4).integers(1, 4, x.shape[0])
    start = lg.init_params(jax.random.key(5), jnp.asarray(x), 2, noise=noise)
    a = lg.fit(jax.random.key(0), x, 2, noise=noise, init=start, sample_weight=counts, **_SETTINGS)
    b = lg.fit(
        jax.random.key(0), np.repeat(x, counts, axis=0), 2, noise=noise, init=start, **_SETTINGS
    )
    assert_trees_close(a.params, b.params, rtol=1e-9)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-12)
    # The E-step over chunks of 7 (with zero-weight padding) gives the same fit; the E-step is
    # the same code for both noise types, so one of them is enough.
    if noise == "isotropic":
        return
    c = lg.fit(
        jax.random.key(0),
        x,
        2,
        noise=noise,
        init=start,
        sample_weight=counts,
        chunk_size=7,
        **_SETTINGS,
    )
    assert_trees_close(a.params, c.params, rtol=1e-10)


@functools.partial(jax.jit, static_argnames="noise")
def _float32_pass(x, *, noise):
    mdl = lg.model(noise)
    data = mdl.prepare(x)
    params = lg.init_params(jax.random.key(0), x, 2, noise=noise)
    w = jnp.ones(x.shape[0], jnp.float32)
    stats, ll = mdl.e_step(params, data, w)
    new = mdl.m_step(stats, lg.make_hyper(lg.LinearGaussianPrior(1.0, 1.0), 1e-6, jnp.float32))
    q = mdl.posterior(new, data)
    u = mdl.q_to_unconstrained(q)
    lp = mdl.log_prior(new, lg.make_hyper(None, 1e-6, jnp.float32))
    return (ll, *new, mdl.elbo(new, q, data), u, *mdl.q_from_unconstrained(u), lp)


@pytest.mark.parametrize("noise", NOISES)
def test_float32_model_functions_keep_float32(noise):
    outs = _float32_pass(jnp.asarray(_gap_data(7), jnp.float32), noise=noise)
    assert all(o.dtype == jnp.float32 for o in outs)
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)


@pytest.mark.parametrize("noise", NOISES)
def test_rank_deficient_data_without_a_floor_is_refused_and_finite_with_one(noise):
    """Data on a 2-D affine plane in 5-D: with l = 2 the maximum-likelihood noise is 0."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, 2)) @ rng.standard_normal((2, 5)) + 1.0
    with pytest.raises(ValueError, match="noise_floor"):
        lg.fit(jax.random.key(0), x, 2, noise=noise, noise_floor=0.0)
    for kwargs in ({}, {"noise_floor": 0.0, "prior": lg.LinearGaussianPrior(1.0, 1e-3)}):
        res = lg.fit(jax.random.key(0), x, 2, noise=noise, max_iter=300, tol=0.0, **kwargs)
        for leaf in res.params:
            assert np.all(np.isfinite(np.asarray(leaf)))
        assert float(np.min(res.params.noise_variance)) > 0
        assert np.isfinite(float(res.log_likelihood))
    # A rank-3 data set is fine for l = 2 with no floor at all.
    x3 = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 5))
    res = lg.fit(jax.random.key(0), x3, 2, noise=noise, noise_floor=0.0, max_iter=300, tol=0.0)
    assert np.all(np.isfinite(np.asarray(res.params.noise_variance)))


def test_pca_init_is_the_ppca_maximum():
    x = _gap_data(9)
    p = lg.init_params(jax.random.key(0), jnp.asarray(x), 2, noise="isotropic", method="pca")
    assert_trees_close(p, lg.closed_form_ml(x, 2), rtol=1e-12)
    res = lg.fit(jax.random.key(0), x, 2, noise="isotropic", init="pca", max_iter=6, tol=1e-10)
    assert int(res.num_iter) <= 3  # one step to confirm the fixed point, one to stop


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": "full"}, "noise"),
        ({"init": "kmeans"}, "init"),
        ({"init": lg.LinearGaussianParams(np.ones((3, 1)), np.zeros(3), np.ones(3))}, "init"),
        ({"init": lg.LinearGaussianParams(np.ones((3, 1)), np.zeros(3), np.array(-1.0))}, "init"),
        ({"prior": lg.LinearGaussianPrior(0.0, 1.0)}, "concentration"),
        ({"sample_weight": np.ones(2)}, "sample_weight"),
        ({"sample_weight": -np.ones(4)}, "sample_weight"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    kwargs = {"noise": "isotropic", **kwargs}
    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ValueError, match=match):
        lg.fit(jax.random.key(0), x, 1, **kwargs)
