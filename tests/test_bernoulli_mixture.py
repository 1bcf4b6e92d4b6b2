"""Bernoulli mixture: closed forms against float64 NumPy oracles, EM invariants, errors.

Tolerances: pure float64 closed forms (enumeration, MAP formulas, KL) are compared at
rtol 1e-12 or so (a few roundings apart); fitted parameters from two EM runs that should
be identical up to reassociation (permuted data or labels) at 1e-9; float32 against
float64 at 1e-3 nats per example (float32 rounding over ~50 iterations of 64 pixels).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from emvi import bernoulli_mixture as bm
from emvi import em

# Jitted once per module: one XLA compile per shape instead of op-by-op dispatch.
_log_prob = jax.jit(bm.log_prob)
_posterior = jax.jit(bm.posterior)
_elbo = jax.jit(bm.elbo)
_e_step = jax.jit(bm.e_step)
_m_step = jax.jit(bm.m_step)
_expected_stats = jax.jit(bm.expected_stats)
_log_prior = jax.jit(bm.log_prior)


FLAT = bm.BernoulliMixturePrior(1.0, 1.0, 1.0)
MAP = bm.BernoulliMixturePrior(2.0, 2.0, 3.0)


def _random_params(rng, k, d, dtype=np.float64):
    w = rng.dirichlet(np.ones(k))
    p = rng.uniform(0.05, 0.95, (k, d))
    return bm.BernoulliMixtureParams(jnp.asarray(w, dtype), jnp.asarray(p, dtype))


def _planted_data(seed, n=200, d=12, k=3):
    """Binary data from a mixture with well-separated prototypes."""
    rng = np.random.default_rng(seed)
    proto = rng.uniform(size=(k, d)) < 0.5
    probs = np.where(proto, 0.85, 0.1)
    z = rng.integers(0, k, n)
    return (rng.uniform(size=(n, d)) < probs[z]).astype(np.float64)


def _np_log_prob(params, x):
    """Brute force: p(x) = sum_k w_k prod_j p^x (1-p)^(1-x), all in float64 products."""
    w, p = (np.asarray(a, np.float64) for a in params)
    lik = np.prod(p[None] ** x[:, None] * (1 - p[None]) ** (1 - x[:, None]), axis=2)
    with np.errstate(divide="ignore"):
        return np.log(lik @ w)


# --------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------


def test_log_prob_matches_enumeration_and_normalises_over_all_binary_images(rng):
    k, d = 3, 6
    params = _random_params(rng, k, d)
    every_image = np.array(list(itertools.product([0.0, 1.0], repeat=d)))  # (64, 6)
    lp = np.asarray(_log_prob(params, jnp.asarray(every_image)))
    np.testing.assert_allclose(lp, _np_log_prob(params, every_image), rtol=1e-12)
    # A normalised distribution over {0,1}^d: probabilities of the 2^d images sum to one.
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, rtol=1e-12)


def test_probabilities_of_exactly_zero_and_one_give_minus_inf_not_nan():
    params = bm.BernoulliMixtureParams(
        jnp.array([0.5, 0.5, 0.0]),
        jnp.array([[0.0, 1.0, 0.5], [1.0, 0.5, 0.0], [0.3, 0.3, 0.3]]),
    )
    x = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    lp = np.asarray(_log_prob(params, x))
    np.testing.assert_allclose(lp, _np_log_prob(params, np.asarray(x)), rtol=1e-12)
    assert lp[2] == -np.inf and lp[3] == -np.inf and np.all(np.isfinite(lp[:2]))
    r = np.asarray(_posterior(params, x))
    assert np.all(np.isfinite(r)) and np.allclose(r.sum(1), 1.0)
    np.testing.assert_allclose(r[0], [1.0, 0.0, 0.0])
    # The E-step sees a -inf log-likelihood but no NaN statistics.
    stats, ll = _e_step(params, x, jnp.ones(4))
    assert ll == -np.inf
    assert all(np.all(np.isfinite(np.asarray(s))) for s in stats)


def test_sample_pixel_frequencies_match_the_mixture_mean(rng):
    params = _random_params(rng, 3, 8)
    m = 20_000
    x, z = bm.sample(jax.random.key(0), params, m)
    assert x.shape == (m, 8) and z.shape == (m,) and x.dtype == params.probs.dtype
    expected = np.asarray(params.weights @ params.probs)
    se = np.sqrt(expected * (1 - expected) / m)
    assert np.all(np.abs(np.asarray(x).mean(0) - expected) < 5 * se)
    freq = np.bincount(np.asarray(z), minlength=3) / m
    w = np.asarray(params.weights)
    assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / m))


# --------------------------------------------------------------------------------------
# ELBO identities
# --------------------------------------------------------------------------------------


def test_elbo_touches_at_posterior_and_gap_is_categorical_kl(rng):
    params = _random_params(rng, 4, 10)
    x = jnp.asarray(_planted_data(1, n=30, d=10))
    lp = np.asarray(_log_prob(params, x))
    post = np.asarray(_posterior(params, x))
    np.testing.assert_allclose(_elbo(params, jnp.asarray(post), x), lp, rtol=1e-12)
    q = rng.dirichlet(np.ones(4), size=30)
    gap = lp - np.asarray(_elbo(params, jnp.asarray(q), x))
    kl = np.sum(q * (np.log(q) - np.log(post)), axis=1)
    np.testing.assert_allclose(gap, kl, rtol=1e-9, atol=1e-12)
    assert np.all(gap > 0)


def test_m_step_of_expected_stats_maximises_the_elbo_of_any_q(rng):
    x = jnp.asarray(_planted_data(14, n=40, d=8))
    q = jnp.asarray(rng.dirichlet(np.ones(3), size=40))
    best = _m_step(_expected_stats(q, x, jnp.ones(40)), FLAT)
    top = float(jnp.sum(_elbo(best, q, x)))
    for _ in range(3):
        other = bm.BernoulliMixtureParams(
            jax.nn.softmax(jnp.log(best.weights) + rng.normal(0, 0.05, 3)),
            jax.nn.sigmoid(jax.scipy.special.logit(best.probs) + rng.normal(0, 0.05, (3, 8))),
        )
        assert float(jnp.sum(_elbo(other, q, x))) < top
    # The E-step is expected_stats at the exact posterior.
    stats, _ = _e_step(best, x, jnp.ones(40))
    direct = _expected_stats(_posterior(best, x), x, jnp.ones(40))
    for u, v in zip(stats, direct, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-13)


def test_em_trace_bound_touches_after_e_and_kl_nonnegative_after_m(rng):
    x = jnp.asarray(_planted_data(2))
    p0 = bm.init_params(jax.random.key(1), x, 3)
    tr = em.em_trace(bm.model(), p0, x, num_iter=6, hyper=MAP)
    ll, eb, kl = (np.asarray(a) for a in (tr.log_likelihood, tr.elbo, tr.kl))
    np.testing.assert_allclose(eb[:, 0], ll[:, 0], rtol=1e-12)
    assert np.all(kl[:, 1] >= -1e-12) and kl[0, 1] > 1e-4
    assert np.all(eb[:, 1] >= eb[:, 0] - 1e-12)


# --------------------------------------------------------------------------------------
# M-step
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [None, FLAT, MAP, bm.BernoulliMixturePrior(3.5, 1.0, 1.5)])
def test_m_step_matches_numpy_map_formulas(rng, prior):
    k, d = 4, 7
    nk = rng.uniform(1.0, 20.0, k)
    sk = nk[:, None] * rng.uniform(0.0, 1.0, (k, d))
    out = _m_step(bm.BernoulliMixtureStats(jnp.asarray(nk), jnp.asarray(sk)), prior)
    alpha, a, b = (1.0, 1.0, 1.0) if prior is None else prior
    w = (nk + alpha - 1) / (nk.sum() + k * (alpha - 1))
    p = (sk + a - 1) / (nk[:, None] + a + b - 2)
    np.testing.assert_allclose(out.weights, w, rtol=1e-13)
    np.testing.assert_allclose(out.probs, p, rtol=1e-13)


def _expected_log_joint_in_logits(eta, theta, stats, prior):
    """sum_k N_k log pi_k + sum_kj [S log mu + (N - S) log(1 - mu)] + log prior, with
    pi = softmax(eta) and mu = sigmoid(theta): an unconstrained parametrisation."""
    alpha, a, b = prior
    nk, sk = stats
    log_pi = jax.nn.log_softmax(eta)
    log_mu, log_1m = jax.nn.log_sigmoid(theta), jax.nn.log_sigmoid(-theta)
    return (
        jnp.sum((nk + alpha - 1) * log_pi)
        + jnp.sum((sk + a - 1) * log_mu)
        + jnp.sum((nk[:, None] - sk + b - 1) * log_1m)
    )


_value_and_grad = jax.jit(jax.value_and_grad(_expected_log_joint_in_logits, argnums=(0, 1)))


@pytest.mark.parametrize("prior", [FLAT, MAP])
def test_m_step_is_a_stationary_point_of_the_expected_complete_log_posterior(prior):
    x = jnp.asarray(_planted_data(3, n=80, d=9))
    # A generic point (not a fixed point of EM): probabilities strictly inside (0, 1).
    params = _random_params(np.random.default_rng(4), 3, 9)
    stats, _ = _e_step(params, x, jnp.ones(80))
    new = _m_step(stats, prior)
    eta = jnp.log(new.weights)
    theta = jnp.log(new.probs) - jnp.log1p(-new.probs)
    prior = bm.BernoulliMixturePrior(*(jnp.asarray(v, jnp.float64) for v in prior))
    q0, grads = _value_and_grad(eta, theta, stats, prior)
    # Terms are O(N) = O(80); exact stationarity leaves only rounding, far below 1e-10.
    for g in grads:
        assert np.max(np.abs(np.asarray(g))) < 1e-10
    # ...and it is a maximum: a small step in a random direction lowers the objective.
    rng = np.random.default_rng(5)
    de, dt = rng.standard_normal(3) * 1e-3, rng.standard_normal((3, 9)) * 1e-3
    assert _value_and_grad(eta + de, theta + dt, stats, prior)[0] < q0


def test_empty_component_under_maximum_likelihood_gets_pooled_probs_not_nan():
    stats = bm.BernoulliMixtureStats(jnp.array([5.0, 0.0]), jnp.array([[1.0, 4.0], [0.0, 0.0]]))
    out = _m_step(stats, FLAT)
    np.testing.assert_allclose(out.weights, [1.0, 0.0])
    np.testing.assert_allclose(out.probs, [[0.2, 0.8], [0.2, 0.8]])


# --------------------------------------------------------------------------------------
# EM invariants
# --------------------------------------------------------------------------------------


@jax.jit
def _em_path(params, x, prior):
    """Ten EM iterations; returns the log-likelihood sum and log-prior at each iterate."""

    def body(p, _):
        stats, ll = _e_step(p, x, jnp.ones(x.shape[0], x.dtype))
        return _m_step(stats, prior), (ll, _log_prior(p, prior))

    _, (ll, lprior) = jax.lax.scan(body, params, None, length=10)
    return ll, lprior


_X_PROP = jnp.asarray(_planted_data(6, n=60, d=8))


@given(seed=st.integers(0, 2**31 - 1), use_prior=st.booleans())
def test_em_never_decreases_its_objective(seed, use_prior):
    """Flat prior: the log-likelihood; otherwise the log-posterior (log-lik + log-prior)."""
    prior = MAP if use_prior else FLAT
    params = _random_params(np.random.default_rng(seed), 3, 8)
    ll, lprior = (np.asarray(a) for a in _em_path(params, _X_PROP, prior))
    objective = ll + lprior
    assert np.all(np.isfinite(objective))
    assert np.all(np.diff(objective) >= -1e-10 * np.abs(objective[1:]))


def test_flat_prior_em_matches_an_independent_numpy_em():
    x = _planted_data(7, n=100, d=10)
    p0 = _random_params(np.random.default_rng(8), 3, 10)
    res = em.fit_em(bm.model(), p0, jnp.asarray(x), max_iter=8, tol=0.0, hyper=FLAT)
    w, p = (np.asarray(a) for a in p0)
    for _ in range(8):
        lj = np.log(w) + x @ np.log(p).T + (1 - x) @ np.log1p(-p).T
        r = np.exp(lj - lj.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0)
        w, p = nk / nk.sum(), (r.T @ x) / nk[:, None]
    np.testing.assert_allclose(res.params.weights, w, rtol=1e-10)
    np.testing.assert_allclose(res.params.probs, p, rtol=1e-10)


def test_label_permutation_and_data_order_invariance():
    x = _planted_data(9, n=120, d=10)
    p0 = _random_params(np.random.default_rng(10), 3, 10)
    kw = dict(max_iter=15, tol=0.0, hyper=MAP)
    base = em.fit_em(bm.model(), p0, jnp.asarray(x), **kw)
    perm_k = np.array([2, 0, 1])
    permuted_p0 = bm.BernoulliMixtureParams(p0.weights[perm_k], p0.probs[perm_k])
    by_label = em.fit_em(bm.model(), permuted_p0, jnp.asarray(x), **kw)
    np.testing.assert_allclose(by_label.params.weights, base.params.weights[perm_k], rtol=1e-9)
    np.testing.assert_allclose(by_label.params.probs, base.params.probs[perm_k], rtol=1e-9)
    perm_n = np.random.default_rng(11).permutation(120)
    by_order = em.fit_em(bm.model(), p0, jnp.asarray(x[perm_n]), **kw)
    np.testing.assert_allclose(by_order.params.probs, base.params.probs, rtol=1e-9)
    np.testing.assert_allclose(by_order.log_likelihood, base.log_likelihood, rtol=1e-12)


# --------------------------------------------------------------------------------------
# The public wrapper
# --------------------------------------------------------------------------------------


# Every fit below shares one static configuration, so the wrapper compiles once per dtype.
_FIT = dict(max_iter=100, num_init=3)
_X_FIT = _planted_data(12, n=400, d=12)


def test_fit_recovers_planted_prototypes_and_reports_consistent_numbers():
    res = bm.fit(jax.random.key(0), _X_FIT, 3, tol=1e-8, a=1.0, b=1.0, **_FIT)
    assert bool(res.converged) and 1 < int(res.num_iter) < 100
    lp = np.asarray(_log_prob(res.params, jnp.asarray(_X_FIT)))
    np.testing.assert_allclose(res.log_likelihood, lp.mean(), rtol=1e-12)
    np.testing.assert_allclose(res.log_posterior, res.log_likelihood, rtol=1e-12)  # flat
    # The planted prototypes are 0.85 / 0.1 per pixel: each fitted row sits near one of them.
    probs = np.sort(np.asarray(res.params.probs), axis=0)
    assert np.all((np.abs(probs - 0.85) < 0.1) | (np.abs(probs - 0.1) < 0.1))


def test_fit_with_prior_reports_the_log_posterior_it_ranks_restarts_by():
    res = bm.fit(jax.random.key(1), _X_FIT, 3, tol=1e-6, alpha=2.0, a=2.0, b=3.0, **_FIT)
    expected = res.log_likelihood + _log_prior(res.params, MAP) / _X_FIT.shape[0]
    np.testing.assert_allclose(res.log_posterior, expected, rtol=1e-12)
    probs = np.asarray(res.params.probs)
    assert probs.min() > 0 and probs.max() < 1  # a Beta(2, 3) prior: never exactly 0 or 1
    assert np.all(np.isfinite(np.asarray(res.history)[: int(res.num_iter)]))


def test_responsibilities_init_is_a_valid_m_step_output():
    p = bm.init_params(jax.random.key(2), jnp.asarray(_X_FIT), 3, method="responsibilities")
    np.testing.assert_allclose(np.sum(p.weights), 1.0, rtol=1e-12)
    assert np.all((np.asarray(p.probs) > 0) & (np.asarray(p.probs) < 1))


def test_bool_input_runs_in_float32_and_matches_float64():
    """Bool images are cast to float32; float32 EM tracks float64 EM closely."""
    r64 = bm.fit(jax.random.key(2), _X_FIT, 3, tol=0.0, **_FIT)
    r32 = bm.fit(jax.random.key(2), _X_FIT > 0.5, 3, tol=0.0, **_FIT)
    assert r32.params.probs.dtype == jnp.float32 and r32.history.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(r32.history)))
    assert abs(float(r32.log_likelihood) - float(r64.log_likelihood)) < 1e-3


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), {}, "non-finite"),
        (np.array([0.0, 1.0, 1.0]), {}, "2-D"),
        (np.array([[0.0, 2.0], [1.0, 0.0]]), {}, r"\[0, 1\]"),
        (np.array([[0.0, -0.5], [1.0, 0.0]]), {}, r"\[0, 1\]"),
        (np.eye(3), {"num_components": 0}, "num_components"),
        (np.eye(3), {"num_components": 4}, "num_components"),
        (np.eye(3), {"tol": -1.0}, "tol"),
        (np.eye(3), {"a": 0.5}, "a must"),
        (np.eye(3), {"b": np.inf}, "b must"),
        (np.eye(3), {"alpha": 0.9}, "alpha"),
        (np.eye(3), {"init": "kmeans"}, "init"),
        (np.eye(3), {"num_init": 0}, "num_init"),
    ],
)
def test_bad_input_raises_value_error(x, kwargs, match):
    kwargs = {"num_components": 2, **kwargs}
    k = kwargs.pop("num_components")
    with pytest.raises(ValueError, match=match):
        bm.fit(jax.random.key(0), x, k, **kwargs)
