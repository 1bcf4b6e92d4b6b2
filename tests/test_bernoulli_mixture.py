"""Bernoulli mixture: closed forms against float64 NumPy/SciPy oracles, the protocol's
gradient face, EM invariants, the public wrapper and its errors.

Tolerances (float64 throughout unless a test says otherwise; eps = 2.2e-16):

* closed forms against an oracle computing the same quantity another way (enumeration,
  MAP formulas, KL, analytic gradients) agree to a few hundred roundings of O(1)-O(10)
  numbers: rtol 1e-12 leaves three orders of magnitude of margin over that and still
  catches any wrong term (which moves results by >= 1e-3);
* stationarity of the M-step: a gradient entry is a difference of O(N) terms, so exact
  stationarity leaves N * eps * (a few) of rounding; the bound used is 100 * N * eps;
* two EM runs that differ only by reassociation of the same sums (permuted data or labels,
  integer weights vs duplicated rows) agree to 1e-9 relative after 15-20 iterations (each
  iteration adds ~n * eps relative error to the statistics and EM near a fixed point does
  not amplify it);
* float32 against float64: 1e-3 nats per example (float32 rounding over ~50 iterations of
  a dozen pixels).

The core maths runs both jitted and op by op (the ``variant`` fixture over
``emvi.testing.JIT_VARIANTS``, chex's ``with_jit`` / ``without_jit`` in pytest form); eager
calls also run the input checks. Trees are compared with ``emvi.testing.assert_trees_close``.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from emvi import bernoulli_mixture as bm
from emvi import em, testing


@pytest.fixture(params=testing.JIT_VARIANTS)
def variant(request):
    """Every test taking ``variant`` runs twice: ``variant(fn)`` jitted, then op by op."""
    return lambda fn: testing.variant(request.param, fn)


# Jitted once per module for tests that are not about jit itself.
_log_prob = jax.jit(bm.log_prob)
_posterior = jax.jit(bm.posterior)
_e_step = jax.jit(bm.e_step)
_m_step = jax.jit(bm.m_step)
_log_prior = jax.jit(bm.log_prior)

FLAT = bm.BernoulliMixturePrior(1.0, 1.0, 1.0)
MAP = bm.BernoulliMixturePrior(2.0, 2.0, 3.0)
EPS = float(np.finfo(np.float64).eps)


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


def _np_log_joint(params, x):
    w, p = (np.asarray(a, np.float64) for a in params)
    return np.log(w) + x @ np.log(p).T + (1 - x) @ np.log1p(-p).T


# --------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------


def test_log_prob_matches_enumeration_and_normalises_over_all_binary_images(rng, variant):
    k, d = 3, 6
    params = _random_params(rng, k, d)
    every_image = np.array(list(itertools.product([0.0, 1.0], repeat=d)))  # (64, 6)
    lp = np.asarray(variant(bm.log_prob)(params, jnp.asarray(every_image)))
    np.testing.assert_allclose(lp, _np_log_prob(params, every_image), rtol=1e-12)
    # A normalised distribution over {0,1}^d: probabilities of the 2^d images sum to one.
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, rtol=1e-12)


def test_fractional_x_gives_the_cross_entropy_likelihood(rng, variant):
    """x in [0, 1] enters the same formula: prod_j mu^x (1 - mu)^(1 - x) per component."""
    params = _random_params(rng, 3, 5)
    x = rng.uniform(0.0, 1.0, (20, 5))
    lp = np.asarray(variant(bm.log_prob)(params, jnp.asarray(x)))
    np.testing.assert_allclose(lp, _np_log_prob(params, x), rtol=1e-12)


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


def test_float32_in_float32_out(rng):
    """Strict dtype promotion is on: any float64 constant mixed in would raise
    (jitted only: op by op the dtype rules are the same)."""
    params = jax.tree.map(lambda v: v.astype(jnp.float32), _random_params(rng, 3, 6))
    x = jnp.asarray(_planted_data(0, n=10, d=6), jnp.float32)
    w = jnp.ones(10, jnp.float32)
    stats, ll = jax.jit(bm.e_step)(params, x, w)
    new = jax.jit(bm.m_step)(stats, bm.BernoulliMixturePrior(1.0, 1.2, 1.2))
    u = jax.jit(bm.to_unconstrained)(new)
    q = jax.jit(bm.posterior)(params, x)
    outs = [ll, *stats, *new, *u, *bm.from_unconstrained(u), q, bm.q_to_unconstrained(q)]
    outs += [jax.jit(bm.elbo)(params, q, x), jax.jit(bm.log_prior)(params, MAP)]
    assert all(o.dtype == jnp.float32 for o in outs)


# --------------------------------------------------------------------------------------
# Input checks of the scoring functions
# --------------------------------------------------------------------------------------


def _scorers(params, x):
    q = jnp.full((x.shape[0], 2), 0.5)
    return {
        "log_joint": lambda: bm.log_joint(params, x),
        "log_prob": lambda: bm.log_prob(params, x),
        "posterior": lambda: bm.posterior(params, x),
        "elbo": lambda: bm.elbo(params, q, x),
        "e_step": lambda: bm.e_step(params, x, jnp.ones(x.shape[0])),
    }


_NAMES = ["log_joint", "log_prob", "posterior", "elbo", "e_step"]
_P2 = bm.BernoulliMixtureParams(jnp.array([0.5, 0.5]), jnp.full((2, 3), 0.5))


@pytest.mark.parametrize("name", _NAMES)
def test_wrong_column_count_raises_value_error_even_under_jit(name, variant):
    x = jnp.zeros((4, 5))  # the params have 3 pixels
    with pytest.raises(ValueError, match="5 columns but the params have 3"):
        variant(_scorers(_P2, x)[name])()


@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_eager_scoring_rejects_non_finite_rows(name, bad):
    x = jnp.zeros((4, 3)).at[2, 1].set(bad)
    with pytest.raises(ValueError, match=r"NaN or infinite values in row\(s\) 2"):
        _scorers(_P2, x)[name]()


# --------------------------------------------------------------------------------------
# ELBO identities and gradients
# --------------------------------------------------------------------------------------


def test_elbo_touches_at_posterior_and_gap_is_categorical_kl(rng, variant):
    params = _random_params(rng, 4, 10)
    x = jnp.asarray(_planted_data(1, n=30, d=10))
    lp = np.asarray(variant(bm.log_prob)(params, x))
    post = np.asarray(variant(bm.posterior)(params, x))
    elbo = variant(bm.elbo)
    np.testing.assert_allclose(elbo(params, jnp.asarray(post), x), lp, rtol=1e-12)
    q = rng.dirichlet(np.ones(4), size=30)
    gap = lp - np.asarray(elbo(params, jnp.asarray(q), x))
    kl = np.sum(q * (np.log(q) - np.log(post)), axis=1)
    np.testing.assert_allclose(gap, kl, rtol=1e-9, atol=1e-12)  # a difference of O(10) terms
    assert np.all(gap > 0)


def test_elbo_gradients_in_q_and_params_match_their_closed_forms(rng, variant):
    """d/dq_ik = log p(x_i, k) - log q_ik - 1; d/dpi_k = N_k / pi_k;
    d/dmu_kj = sum_i q_ik (x_ij / mu_kj - (1 - x_ij) / (1 - mu_kj))."""
    params = _random_params(rng, 3, 7)
    x = _planted_data(5, n=25, d=7)
    q = rng.dirichlet(np.ones(3), size=25)
    total = variant(jax.grad(lambda p, q_: jnp.sum(bm.elbo(p, q_, jnp.asarray(x))), (0, 1)))
    g_params, g_q = total(params, jnp.asarray(q))
    np.testing.assert_allclose(g_q, _np_log_joint(params, x) - np.log(q) - 1.0, rtol=1e-12)
    w, p = (np.asarray(a) for a in params)
    np.testing.assert_allclose(g_params.weights, q.sum(0) / w, rtol=1e-12)
    g_mu = (q.T @ x) / p - (q.T @ (1 - x)) / (1 - p)
    np.testing.assert_allclose(g_params.probs, g_mu, rtol=1e-12, atol=1e-12)


def test_em_trace_bound_touches_after_e_and_kl_nonnegative_after_m():
    x = jnp.asarray(_planted_data(2))
    p0 = bm.init_params(jax.random.key(1), x, 3)
    tr = em.em_trace(bm.model(), p0, x, num_iter=6, hyper=MAP)
    ll, eb, kl = (np.asarray(a) for a in (tr.log_likelihood, tr.elbo, tr.kl))
    np.testing.assert_allclose(eb[:, 0], ll[:, 0], rtol=1e-12)
    assert np.all(kl[:, 1] >= -1e-12) and kl[0, 1] > 1e-4
    assert np.all(eb[:, 1] >= eb[:, 0] - 1e-12)


# --------------------------------------------------------------------------------------
# M-step and log prior
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [None, FLAT, MAP, bm.BernoulliMixturePrior(3.5, 1.0, 1.5)])
def test_m_step_matches_numpy_map_formulas(rng, prior, variant):
    k, d = 4, 7
    nk = rng.uniform(1.0, 20.0, k)
    sk = nk[:, None] * rng.uniform(0.0, 1.0, (k, d))
    out = variant(bm.m_step)(bm.BernoulliMixtureStats(jnp.asarray(nk), jnp.asarray(sk)), prior)
    alpha, a, b = (1.0, 1.0, 1.0) if prior is None else prior
    w = (nk + alpha - 1) / (nk.sum() + k * (alpha - 1))
    p = (sk + a - 1) / (nk[:, None] + a + b - 2)
    testing.assert_trees_close(out, bm.BernoulliMixtureParams(w, p), rtol=1e-13)


def test_log_prior_differences_match_scipy_densities(rng):
    """log_prior is the Dirichlet x Beta log-density up to a constant (its normaliser)."""
    alpha, a, b = 2.5, 1.5, 3.0
    prior = bm.BernoulliMixturePrior(alpha, a, b)
    p1, p2 = _random_params(rng, 4, 5), _random_params(rng, 4, 5)

    def scipy_log_density(p):
        w, mu = (np.asarray(v) for v in p)
        return sps.dirichlet.logpdf(w, np.full(4, alpha)) + sps.beta.logpdf(mu, a, b).sum()

    ours = float(_log_prior(p1, prior) - _log_prior(p2, prior))
    np.testing.assert_allclose(ours, scipy_log_density(p1) - scipy_log_density(p2), rtol=1e-12)
    assert float(_log_prior(p1, None)) == 0.0 == float(_log_prior(p1, FLAT))


def _weighted_objective(u, q, x, w, prior):
    """sum_i w_i ELBO_i(q_i, theta) + log_prior(theta), theta = from_unconstrained(u)."""
    theta = bm.from_unconstrained(u)
    return jnp.sum(w * bm.elbo(theta, q, x)) + bm.log_prior(theta, prior)


_objective_and_grad = jax.jit(jax.value_and_grad(_weighted_objective))


@pytest.mark.parametrize("prior", [FLAT, MAP, bm.BernoulliMixturePrior(3.5, 1.2, 1.7)])
def test_map_m_step_is_stationary_for_weighted_elbo_plus_log_prior(rng, prior):
    """The closed-form M-step of expected_stats(q, x, w) is a stationary point, in the
    unconstrained coordinates of the gradient face, of the very objective a gradient M-step
    climbs; so log_prior is the prior m_step maximises, and the two M-steps agree."""
    n, k, d = 80, 3, 9
    x = jnp.asarray(_planted_data(3, n=n, d=d))
    q = jnp.asarray(rng.dirichlet(np.ones(k), size=n))  # an arbitrary q, not the posterior
    w = jnp.asarray(rng.uniform(0.2, 2.0, n))
    prior = bm.BernoulliMixturePrior(*(jnp.asarray(v, jnp.float64) for v in prior))
    theta = _m_step(bm.expected_stats(q, x, w), prior)
    u = bm.to_unconstrained(theta)
    value, grad = _objective_and_grad(u, q, x, w, prior)
    bound = 100 * float(jnp.sum(w)) * EPS  # see the module docstring
    for g in jax.tree.leaves(grad):
        assert np.max(np.abs(np.asarray(g))) < bound
    # ...and it is a maximum: a small step in a random direction lowers the objective.
    step = jax.tree.map(lambda v: 1e-3 * jnp.asarray(rng.standard_normal(v.shape)), u)
    moved = jax.tree.map(jnp.add, u, step)
    assert _objective_and_grad(moved, q, x, w, prior)[0] < value


def test_empty_component_under_maximum_likelihood_gets_pooled_probs_not_nan():
    stats = bm.BernoulliMixtureStats(jnp.array([5.0, 0.0]), jnp.array([[1.0, 4.0], [0.0, 0.0]]))
    out = _m_step(stats, FLAT)
    np.testing.assert_allclose(out.weights, [1.0, 0.0])
    np.testing.assert_allclose(out.probs, [[0.2, 0.8], [0.2, 0.8]])


# --------------------------------------------------------------------------------------
# The gradient face: bijections
# --------------------------------------------------------------------------------------


def test_model_fills_every_field_of_the_protocol():
    model = bm.model()
    em.require(model, *em.ExactModel._fields, purpose="the whole EM/VI grid")
    assert model is bm.model()  # cached: one static argument, one compile


def test_parameter_bijection_round_trips(rng, variant):
    params = _random_params(rng, 4, 6)
    to_u, from_u = variant(bm.to_unconstrained), variant(bm.from_unconstrained)
    u = to_u(params)
    # Centred weight logits; every real u is valid.
    np.testing.assert_allclose(jnp.sum(u.weights), 0.0, atol=1e-14)
    testing.assert_trees_close(from_u(u), params, rtol=1e-14)
    # The other way, from centred logits with |u| <= 4: logit(sigmoid(t)) amplifies
    # sigmoid's relative rounding by 1 / (1 - mu) <= 56, hence atol 1e-12.
    raw = rng.uniform(-4, 4, 4)
    v = bm.BernoulliMixtureParams(
        jnp.asarray(raw - raw.mean()), jnp.asarray(rng.uniform(-4, 4, (4, 6)))
    )
    testing.assert_trees_close(to_u(from_u(v)), v, rtol=0.0, atol=1e-12)


def test_bijections_are_finite_at_zero_and_one(variant):
    """Maximum likelihood gives weights of 0 and probabilities of 0 or 1: their logits are
    clipped at log(tiny) (about -708), finite, and map back to within tiny of the value."""
    params = bm.BernoulliMixtureParams(
        jnp.array([0.7, 0.3, 0.0]), jnp.array([[0.0, 1.0], [0.5, 1.0], [0.2, 0.0]])
    )
    u = variant(bm.to_unconstrained)(params)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in u)
    tiny = float(np.finfo(np.float64).tiny)
    # Centring moves every weight logit by mean(log w) (about -236 here), so the logits
    # carry absolute rounding of eps * max|u|, which softmax turns into relative error.
    rtol = 10 * EPS * float(jnp.max(jnp.abs(u.weights)))
    back = variant(bm.from_unconstrained)(u)
    testing.assert_trees_close(back, params, atol=2 * tiny, rtol=rtol)
    q = jnp.array([[1.0, 0.0], [0.25, 0.75]])
    uq = variant(bm.q_to_unconstrained)(q)
    assert np.all(np.isfinite(np.asarray(uq)))
    np.testing.assert_allclose(variant(bm.q_from_unconstrained)(uq), q, rtol=1e-15, atol=2 * tiny)


def test_q_bijection_round_trips(rng, variant):
    q = jnp.asarray(rng.dirichlet(np.ones(5), size=7))
    back = variant(bm.q_from_unconstrained)(variant(bm.q_to_unconstrained)(q))
    np.testing.assert_allclose(back, q, rtol=1e-14)  # a softmax of logs: a few roundings
    u = jnp.asarray(rng.normal(size=(7, 5)))
    again = bm.q_to_unconstrained(bm.q_from_unconstrained(u))
    # Equal up to a shift of each row (the softmax forgets it).
    np.testing.assert_allclose(again - again[:, :1], u - u[:, :1], atol=1e-13)


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
    res = bm.fit(jax.random.key(0), x, 3, init=p0, prior=None, max_iter=8, tol=0.0)
    w, p = (np.asarray(a) for a in p0)
    for _ in range(8):
        lj = np.log(w) + x @ np.log(p).T + (1 - x) @ np.log1p(-p).T
        r = np.exp(lj - lj.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0)
        w, p = nk / nk.sum(), (r.T @ x) / nk[:, None]
    testing.assert_trees_close(res.params, bm.BernoulliMixtureParams(w, p), rtol=1e-10)


def test_label_permutation_and_data_order_invariance():
    x = _planted_data(9, n=120, d=10)
    p0 = _random_params(np.random.default_rng(10), 3, 10)
    kw = dict(max_iter=15, tol=0.0, prior=MAP)
    base = bm.fit(jax.random.key(0), x, 3, init=p0, **kw)
    perm_k = np.array([2, 0, 1])
    permuted_p0 = bm.BernoulliMixtureParams(p0.weights[perm_k], p0.probs[perm_k])
    by_label = bm.fit(jax.random.key(0), x, 3, init=permuted_p0, **kw)
    expected = jax.tree.map(lambda v: v[perm_k], base.params)
    testing.assert_trees_close(by_label.params, expected, rtol=1e-9)
    perm_n = np.random.default_rng(11).permutation(120)
    by_order = bm.fit(jax.random.key(0), x[perm_n], 3, init=p0, **kw)
    testing.assert_trees_close(by_order.params, base.params, rtol=1e-9)
    np.testing.assert_allclose(by_order.log_likelihood, base.log_likelihood, rtol=1e-12)


# --------------------------------------------------------------------------------------
# The public wrapper
# --------------------------------------------------------------------------------------


# Every fit below shares one static configuration, so the driver compiles once per dtype.
_FIT = dict(max_iter=100, num_init=3)
_X_FIT = _planted_data(12, n=400, d=12)


def test_fit_recovers_planted_prototypes_and_reports_consistent_numbers():
    res = bm.fit(jax.random.key(0), _X_FIT, 3, tol=1e-8, prior=None, **_FIT)
    assert isinstance(res, em.FitResult) and bm.BernoulliMixtureFit is em.FitResult
    assert bool(res.converged) and 1 < int(res.num_iter) < 100
    lp = np.asarray(_log_prob(res.params, jnp.asarray(_X_FIT)))
    np.testing.assert_allclose(res.log_likelihood, lp.mean(), rtol=1e-12)
    assert res.restart_log_likelihoods.shape == (3,)
    # The planted prototypes are 0.85 / 0.1 per pixel: each fitted row sits near one of them.
    probs = np.sort(np.asarray(res.params.probs), axis=0)
    assert np.all((np.abs(probs - 0.85) < 0.1) | (np.abs(probs - 0.1) < 0.1))


def test_fit_is_the_one_driver_on_init_params_batches():
    """fit = init_params vmapped over split keys, then em.fit with the prior as hyper."""
    prior = MAP
    res = bm.fit(jax.random.key(1), _X_FIT, 3, tol=1e-6, prior=prior, **_FIT)
    x = jnp.asarray(_X_FIT)
    keys = jax.random.split(jax.random.key(1), 3)
    p0 = jax.vmap(lambda kk: bm.init_params(kk, x, 3))(keys)
    hyper = bm.BernoulliMixturePrior(*(jnp.asarray(v, jnp.float64) for v in prior))
    tol = jnp.asarray(1e-6)  # as fit passes it (a Python float would recompile)
    direct = em.fit(bm.model(), p0, x, max_iter=100, tol=tol, hyper=hyper)
    testing.assert_trees_close(res, direct, rtol=1e-14)
    probs = np.asarray(res.params.probs)
    assert probs.min() > 0 and probs.max() < 1  # a Beta(2, 3) prior: never exactly 0 or 1


def test_default_prior_is_documented_one():
    a = bm.fit(jax.random.key(3), _X_FIT, 3, tol=1e-6, **_FIT)
    b = bm.fit(jax.random.key(3), _X_FIT, 3, tol=1e-6, prior=bm.DEFAULT_PRIOR, **_FIT)
    c = bm.fit(jax.random.key(3), _X_FIT, 3, tol=1e-6, prior=None, **_FIT)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a.params.probs, c.params.probs)  # the prior is not flat


def test_integer_sample_weights_equal_duplicated_rows_and_zero_weights_dropped_rows():
    x = _planted_data(13, n=60, d=8)
    counts = np.random.default_rng(14).integers(0, 4, 60)  # zeros included: dropped rows
    p0 = _random_params(np.random.default_rng(15), 3, 8)
    kw = dict(init=p0, prior=MAP, max_iter=20, tol=0.0)
    weighted = bm.fit(jax.random.key(0), x, 3, sample_weight=counts, **kw)
    duplicated = bm.fit(jax.random.key(0), np.repeat(x, counts, axis=0), 3, **kw)
    testing.assert_trees_close(weighted.params, duplicated.params, rtol=1e-9)
    np.testing.assert_allclose(weighted.log_likelihood, duplicated.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(weighted.history, duplicated.history, rtol=1e-12)


def test_weighted_points_init_never_picks_a_zero_weight_row():
    x = jnp.asarray(np.eye(10))
    w = jnp.asarray(np.r_[np.zeros(6), np.ones(4)])
    for seed in range(5):
        p = bm.init_params(jax.random.key(seed), x, 4, sample_weight=w)
        rows = np.rint((np.asarray(p.probs) - 0.25) / 0.5).argmax(1)
        assert sorted(rows) == [6, 7, 8, 9]


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


_P0 = bm.BernoulliMixtureParams(np.array([0.5, 0.5]), np.full((2, 3), 0.5))


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.array([[0.0, 1.0], [np.inf, 0.0]]), {}, "non-finite"),  # NaN means missing
        (np.array([0.0, 1.0, 1.0]), {}, "2-D"),
        (np.array([[0.0, 2.0], [1.0, 0.0]]), {}, r"\[0, 1\]"),
        (np.array([[0.0, -0.5], [1.0, 0.0]]), {}, r"\[0, 1\]"),
        (np.eye(3), {"num_components": 0}, "num_components"),
        (np.eye(3), {"num_components": 4}, "num_components"),
        (np.eye(3), {"sample_weight": [1.0, 0.0, 0.0]}, "num_components"),
        (np.eye(3), {"sample_weight": [1.0, -1.0, 1.0]}, "sample_weight"),
        (np.eye(3), {"sample_weight": [1.0, 1.0]}, "sample_weight"),
        (np.eye(3), {"tol": -1.0}, "tol"),
        (np.eye(3), {"prior": bm.BernoulliMixturePrior(1.0, 0.5, 1.0)}, "prior.a"),
        (np.eye(3), {"prior": bm.BernoulliMixturePrior(1.0, 1.0, np.inf)}, "prior.b"),
        (np.eye(3), {"prior": bm.BernoulliMixturePrior(0.9)}, "prior.alpha"),
        (np.eye(3), {"init": "kmeans"}, "init"),
        (np.eye(3), {"init": _P0._replace(probs=np.full((2, 4), 0.5))}, "shape"),
        (np.eye(3), {"init": _P0._replace(weights=np.array([0.5, 0.6]))}, "summing to one"),
        (np.eye(3), {"init": _P0._replace(probs=np.full((2, 3), 1.5))}, r"\[0, 1\]"),
        (np.eye(3), {"num_init": 0}, "num_init"),
    ],
)
def test_bad_input_raises_value_error(x, kwargs, match):
    kwargs = {"num_components": 2, **kwargs}
    k = kwargs.pop("num_components")
    with pytest.raises(ValueError, match=match):
        bm.fit(jax.random.key(0), x, k, **kwargs)
