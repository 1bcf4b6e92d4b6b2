"""Invariants of Gaussian-mixture EM, as hypothesis properties.

Every example draws a seed; data and parameters are generated from it with NumPy, so the
shapes are fixed (n=24, d=2, k=3) and the module-level jitted functions compile once per
covariance type. Tolerances (float64): identities that hold exactly up to rounding of sums
of ~100 terms, 1e-10 relative; monotonicity, -1e-9 relative (rounding of a mean of 24
log-densities); stationarity, a gradient of at most 1e-7 against terms of size ~n (the M-step
is exact up to its 10 eps guard on N_k and the eps-sized floor, see emvi.gmm).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emvi import em, gmm
from emvi.elbo import categorical_kl, discrete_elbo
from emvi.testing import gmm_two_pass_em

N, D, K = 24, 2, 3
ITERS = 12
TYPES = ("full", "tied", "diag", "spherical")
seeds = st.integers(0, 2**31 - 1)


def _data(seed, offset=0.0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-4, 4, (K, D))
    z = np.arange(N) % K
    x = centres[z] + rng.normal(size=(N, D)) * rng.uniform(0.5, 1.5, (K, 1))[z]
    return jnp.asarray(x + offset)


def _params(seed, ct, offset=0.0):
    rng = np.random.default_rng(seed + 1)
    w = rng.dirichlet(np.full(K, 3.0))
    m = rng.uniform(-3, 3, (K, D)) + offset
    a = rng.normal(size=(K, D, D)) * 0.5
    full = a @ np.swapaxes(a, 1, 2) + np.eye(D)
    cov = {
        "full": full,
        "tied": full[0],
        "diag": rng.uniform(0.5, 2.0, (K, D)),
        "spherical": rng.uniform(0.5, 2.0, K),
    }[ct]
    return gmm.GMMParams(jnp.asarray(w), jnp.asarray(m), jnp.asarray(cov))


def _prior(ct):
    psi = {"full": 0.5 * np.eye(D), "tied": 0.5 * np.eye(D), "diag": np.full(D, 0.5)}.get(ct, 0.5)
    return gmm.GMMPrior(
        jnp.asarray([1.0, 2.0, 3.5]),
        jnp.asarray([0.5, -0.5]),
        jnp.asarray(0.8),
        jnp.asarray(psi),
        jnp.asarray(D + 1.5),
    )


# Module-level jitted oracles, so hypothesis examples reuse one compiled program.
_two_pass = jax.jit(gmm_two_pass_em, static_argnames=("covariance_type", "num_iter"))
_chunked = jax.jit(em.chunked_e_step, static_argnames=("model", "chunk_size"))


def _fit(params, x, ct, prior=None, w=None):
    return gmm.fit_from_params(
        params, x, covariance_type=ct, max_iter=ITERS, tol=0.0, sample_weight=w, prior=prior
    )


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def _assert_params_close(p, q, rtol):
    for u, v in zip(p, q, strict=True):
        assert _rel(u, v) <= rtol, (_rel(u, v), rtol)


@pytest.mark.parametrize("ct", TYPES)
@settings(max_examples=10)
@given(seed=seeds)
def test_log_likelihood_never_decreases(ct, seed):
    h = np.asarray(_fit(_params(seed, ct), _data(seed), ct).history)
    assert np.all(np.isfinite(h))
    assert np.all(np.diff(h) >= -1e-9 * np.abs(h[1:]))


@jax.jit
def _scores(p, x, q):
    """One program per shape for every example (eagerly, each primitive compiles alone)."""
    lj = gmm.log_joint(p, x, covariance_type="full")
    post = gmm.posterior(p, x, covariance_type="full")
    log_px = gmm.log_prob(p, x, covariance_type="full")
    return post, log_px, discrete_elbo(lj, q), discrete_elbo(lj, post)


@settings(max_examples=15)
@given(seed=seeds)
def test_responsibilities_and_elbo_bound(seed):
    x, p = _data(seed), _params(seed, "full")
    q = jnp.asarray(np.random.default_rng(seed).dirichlet(np.ones(K), N))
    post, log_px, elbo, elbo_at_post = _scores(p, x, q)
    assert np.all(np.asarray(post) >= 0)
    np.testing.assert_allclose(jnp.sum(post, axis=1), 1.0, atol=1e-12)
    assert np.all(np.asarray(elbo) <= np.asarray(log_px) + 1e-12)
    np.testing.assert_allclose(elbo_at_post, log_px, rtol=1e-12)
    gap = log_px - elbo
    np.testing.assert_allclose(gap, categorical_kl(q, jnp.log(post)), rtol=1e-9, atol=1e-12)


# --- the M-step is a stationary point of Q(theta) (+ log prior) --------------------------


@functools.partial(jax.jit, static_argnames=("ct",))
def _m_step_in_u(x, q, w, hyper, *, ct):
    """The prepared data and the closed-form M-step from expected_stats(q), in the model's
    unconstrained coordinates (one program per shape: hypothesis examples reuse it)."""
    mdl = gmm.model(ct)
    data = mdl.prepare(x)
    return data, mdl.to_unconstrained(mdl.m_step(mdl.expected_stats(q, data, w), hyper))


@functools.partial(jax.jit, static_argnames=("ct",))
def _objective_grad(u, q, data, w, hyper, *, ct):
    """Gradient of sum_i w_i ELBO_i(q, theta) + log p(theta) in the model's unconstrained u."""
    mdl = gmm.model(ct)

    def objective(v):
        p = mdl.from_unconstrained(v)
        return jnp.sum(w * mdl.elbo(p, q, data)) + mdl.log_prior(p, hyper)

    return jax.grad(objective)(u)


@pytest.mark.parametrize("use_prior", [False, True])
@pytest.mark.parametrize("ct", TYPES)
@settings(max_examples=8)
@given(seed=seeds)
def test_m_step_is_a_stationary_point_of_the_elbo_plus_log_prior(ct, use_prior, seed):
    # The closed-form (MAP) M-step from expected_stats(q) must zero the gradient of the
    # objective a gradient M-step climbs, in the model's own unconstrained coordinates;
    # reg_covar = 0 because it is not part of that objective.
    rng = np.random.default_rng(seed)
    x = _data(seed)
    q = jnp.asarray(rng.dirichlet(np.ones(K), N))
    w = jnp.asarray(rng.uniform(0.5, 2.0, N))
    prior = _prior(ct)
    hyper = gmm.GMMHyper(jnp.asarray(0.0), prior if use_prior else None)
    data, u = _m_step_in_u(x, q, w, hyper, ct=ct)
    grads = _objective_grad(u, q, data, w, hyper, ct=ct)
    for g in grads:
        assert np.max(np.abs(np.asarray(g))) < 1e-7
    # The test can fail: the ML M-step is not stationary for the MAP objective.
    if use_prior:
        _, u_ml = _m_step_in_u(x, q, w, gmm.GMMHyper(jnp.asarray(0.0)), ct=ct)
        g_ml = _objective_grad(u_ml, q, data, w, hyper, ct=ct)
        assert max(float(jnp.max(jnp.abs(g))) for g in g_ml) > 1e-3


# --- symmetries, transformations, paths --------------------------------------------------


@pytest.mark.parametrize("ct", ["full", "diag"])
@settings(max_examples=8)
@given(seed=seeds)
def test_order_of_data_and_labels_of_components_do_not_matter(ct, seed):
    x, p = _data(seed), _params(seed, ct)
    rng = np.random.default_rng(seed)
    rows, perm = rng.permutation(N), rng.permutation(K)
    permuted = p._replace(
        weights=p.weights[perm],
        means=p.means[perm],
        covariances=p.covariances if ct == "tied" else p.covariances[perm],
    )
    a = _fit(p, x, ct)
    b = _fit(permuted, x[rows], ct)
    _assert_params_close(
        (a.params.weights[perm], a.params.means[perm], a.params.covariances[perm]),
        b.params,
        1e-9,
    )
    np.testing.assert_allclose(a.history, b.history, rtol=1e-9)


@pytest.mark.parametrize("ct", TYPES)
@settings(max_examples=4)
@given(seed=seeds)
def test_packed_path_equals_two_pass_reference(ct, seed):
    # An offset of 30 standard deviations: the centring inside fit_from_params matters.
    x, p = _data(seed, offset=30.0), _params(seed, ct, offset=30.0)
    w = jnp.asarray(np.random.default_rng(seed).uniform(0.2, 2.0, N))
    for prior in (None, _prior(ct)._replace(mean_prior=jnp.asarray([30.5, 29.5]))):
        fast = _fit(p, x, ct, prior=prior, w=w)
        hyper = gmm.GMMHyper(jnp.asarray(1e-6), prior)
        ref, hist = _two_pass(p, x, w, hyper, covariance_type=ct, num_iter=ITERS)
        _assert_params_close(fast.params, ref, 1e-10)
        # The history may include a component shrinking onto a few of the 24 points, where
        # rounding in the log-densities is amplified by ~10 (seen: 4e-10).
        np.testing.assert_allclose(fast.history, hist, rtol=2e-9)


@pytest.mark.parametrize("ct", TYPES)
@settings(max_examples=4)
@given(seed=seeds, chunk=st.sampled_from([1, 5, 7, 24, 100]))
def test_chunked_e_step_equals_one_shot(ct, seed, chunk):
    x, p = _data(seed), _params(seed, ct)
    w = jnp.asarray(np.random.default_rng(seed).uniform(0.0, 2.0, N))
    mdl = gmm.model(ct)
    data = mdl.prepare(x)
    full_stats, full_ll = _chunked(mdl, p, data, w, chunk_size=None)
    stats, ll = _chunked(mdl, p, data, w, chunk_size=chunk)
    np.testing.assert_allclose(ll, full_ll, rtol=1e-12)
    for a, b in zip(stats, full_stats, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(b))))


def test_jit_equals_no_jit():
    x, p = _data(0), _params(0, "full")
    kw = {"covariance_type": "full", "max_iter": 3, "tol": 0.0}
    jitted = gmm.fit_from_params(p, x, **kw)
    with jax.disable_jit():
        eager = gmm._fit_from_params(p, x, **kw)
    _assert_params_close(jitted.params, eager.params, 1e-12)
    np.testing.assert_allclose(jitted.history, eager.history, rtol=1e-12)


def test_vmap_over_datasets_and_over_inits_equals_a_loop():
    xs = jnp.stack([_data(s) for s in range(3)])
    p = _params(0, "diag")
    batched = jax.vmap(lambda x: _fit(p, x, "diag"))(xs)
    for i in range(3):
        single = _fit(p, xs[i], "diag")
        _assert_params_close(gmm.GMMParams(*(a[i] for a in batched.params)), single.params, 1e-12)
    ps = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[_params(s, "diag") for s in range(3)])
    batched = jax.vmap(lambda q: _fit(q, xs[0], "diag"))(ps)
    for i in range(3):
        single = _fit(_params(i, "diag"), xs[0], "diag")
        np.testing.assert_allclose(batched.log_likelihood[i], single.log_likelihood, rtol=1e-12)


@pytest.mark.parametrize("ct", TYPES)
def test_float32_agrees_with_float64(ct):
    # Well-conditioned data (separated unit-scale clusters). float32 EM carries ~1e-6
    # relative error per step (eps32 = 1.2e-7 times the cancellation factor 1 + m^2/s^2,
    # about 10 here), over 12 steps of a contraction: 1e-4 relative leaves a margin of ~10.
    x, p = _data(5), _params(5, ct)
    a = _fit(p, x, ct)
    b = _fit(jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), p), x.astype(jnp.float32), ct)
    assert all(leaf.dtype == jnp.float32 for leaf in b.params)
    assert b.history.dtype == jnp.float32
    _assert_params_close(b.params, a.params, 1e-4)
    np.testing.assert_allclose(b.history, a.history, rtol=1e-5)
