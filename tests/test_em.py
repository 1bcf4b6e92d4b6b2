"""The generic EM driver, on a toy model small enough to check by hand.

The toy model is a mixture of k unit-variance Gaussians in one dimension with unknown
weights and means. Its M-step is weights = N_k / N, means = S_k / N_k.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp as np_logsumexp

from emvi import em, testing
from emvi.elbo import discrete_elbo


def _log_joint(params, x):
    weights, means = params
    diff = x[:, None] - means[None, :]
    return jnp.log(weights)[None, :] - 0.5 * diff**2 - 0.5 * jnp.log(2 * jnp.pi)


def _e_step(params, x, w):
    lj = _log_joint(params, x)
    ll = jax.scipy.special.logsumexp(lj, axis=1)
    r = jax.nn.softmax(lj, axis=1) * w[:, None]
    return (jnp.sum(r, axis=0), r.T @ x), jnp.sum(w * ll)


def _m_step(stats, hyper):
    nk, sk = stats
    return (nk / jnp.sum(nk), sk / nk)


TOY = em.ExactModel(
    e_step=_e_step,
    m_step=_m_step,
    log_prob=lambda p, x: jax.scipy.special.logsumexp(_log_joint(p, x), axis=1),
    posterior=lambda p, x: jax.nn.softmax(_log_joint(p, x), axis=1),
    elbo=lambda p, q, x: discrete_elbo(_log_joint(p, x), q),
    expected_stats=lambda q, x, w: (jnp.sum(q * w[:, None], axis=0), (q * w[:, None]).T @ x),
)


def _data(seed=0, n=300):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 3, n)
    return jnp.asarray(np.array([-4.0, 0.0, 3.0])[z] + rng.standard_normal(n))


P0 = (jnp.array([0.2, 0.3, 0.5]), jnp.array([-1.0, 0.5, 1.0]))


def _numpy_em(x, params, iters):
    w, m = (np.asarray(a) for a in params)
    x = np.asarray(x)
    hist = []
    for _ in range(iters):
        lj = np.log(w)[None] - 0.5 * (x[:, None] - m[None]) ** 2 - 0.5 * np.log(2 * np.pi)
        hist.append(np_logsumexp(lj, axis=1).mean())
        r = np.exp(lj - np_logsumexp(lj, axis=1, keepdims=True))
        nk = r.sum(0)
        w, m = nk / nk.sum(), (r * x[:, None]).sum(0) / nk
    return (w, m), np.array(hist)


def test_run_em_matches_numpy_oracle_and_runs_exactly_max_iter_with_tol_zero():
    x = _data()
    res = em.fit_em(TOY, P0, x, max_iter=7, tol=0.0)
    (w, m), hist = _numpy_em(x, P0, 7)
    assert int(res.num_iter) == 7 and not bool(res.converged)
    np.testing.assert_allclose(res.params[0], w, rtol=1e-12)
    np.testing.assert_allclose(res.params[1], m, rtol=1e-12)
    np.testing.assert_allclose(res.history, hist, rtol=1e-12)


def test_log_likelihood_never_decreases_and_stops_on_tol():
    x = _data(1)
    res = em.fit_em(TOY, P0, x, max_iter=500, tol=1e-6)
    n = int(res.num_iter)
    assert bool(res.converged) and n < 500
    h = np.asarray(res.history)
    assert np.all(np.isnan(h[n:])) and np.all(np.isfinite(h[:n]))
    assert np.all(np.diff(h[:n]) >= -1e-12)
    assert abs(h[n - 1] - h[n - 2]) < 1e-6
    assert float(res.log_likelihood) >= h[n - 1] - 1e-12


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 300, 1000])
def test_chunked_e_step_equals_one_shot(chunk_size):
    x = _data(2)
    w = jnp.asarray(np.random.default_rng(3).uniform(0, 2, x.shape[0]))
    full_stats, full_ll = TOY.e_step(P0, x, w)
    stats, ll = em.chunked_e_step(TOY, P0, x, w, chunk_size=chunk_size)
    np.testing.assert_allclose(ll, full_ll, rtol=1e-12)
    for a, b in zip(stats, full_stats, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_integer_weights_equal_duplicated_points():
    x = _data(4, n=50)
    counts = np.random.default_rng(5).integers(0, 4, 50)
    counts[0] = 1
    dup = jnp.asarray(np.repeat(np.asarray(x), counts))
    a = em.fit_em(TOY, P0, x, jnp.asarray(counts, x.dtype), max_iter=5, tol=0.0)
    b = em.fit_em(TOY, P0, dup, max_iter=5, tol=0.0)
    for u, v in zip(a.params, b.params, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-10)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-10)


def test_restarts_pick_the_best_and_equal_single_runs():
    x = _data(6)
    inits = (
        jnp.array([[1 / 3] * 3, [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]]),
        jnp.array([[-4.0, 0.0, 3.0], [5.0, 5.1, 5.2], [-0.1, 0.0, 0.1]]),
    )
    best, allr = em.run_em_restarts(TOY, inits, x, max_iter=50, tol=0.0)
    singles = [
        em.fit_em(TOY, (inits[0][i], inits[1][i]), x, max_iter=50, tol=0.0) for i in range(3)
    ]
    lls = np.array([float(s.log_likelihood) for s in singles])
    np.testing.assert_allclose(allr.log_likelihood, lls, rtol=1e-10)
    assert float(best.log_likelihood) == pytest.approx(lls.max(), rel=1e-12)


def test_vmap_over_datasets_equals_loop():
    xs = jnp.stack([_data(s, n=100) for s in range(3)])
    run = jax.jit(jax.vmap(lambda x: em.run_em(TOY, P0, x, max_iter=20, tol=1e-8)))
    batched = run(xs)
    for i in range(3):
        single = em.fit_em(TOY, P0, xs[i], max_iter=20, tol=1e-8)
        np.testing.assert_allclose(batched.params[1][i], single.params[1], rtol=1e-10)
        assert int(batched.num_iter[i]) == int(single.num_iter)


def test_trace_bound_touches_after_e_and_gap_is_kl_after_m():
    x = _data(7)
    tr = em.em_trace(TOY, P0, x, num_iter=10)
    ll, elbo, kl = (np.asarray(a) for a in (tr.log_likelihood, tr.elbo, tr.kl))
    np.testing.assert_allclose(elbo[:, 0], ll[:, 0], atol=1e-12)  # tight after E
    assert np.all(kl[:, 1] >= -1e-12)  # KL(q_t || p(z|x, theta_{t+1})) >= 0
    assert np.all(elbo[:, 1] >= elbo[:, 0] - 1e-12)  # M-step raises the bound
    assert np.all(ll[1:, 0] >= ll[:-1, 0] - 1e-12)  # likelihood never decreases
    np.testing.assert_allclose(ll[:-1, 1], ll[1:, 0], rtol=1e-12)
    assert kl[0, 1] > 1e-6  # the gap really opens on the first M-step from a poor start
    # Direct KL check on the first M-step.
    q0 = TOY.posterior(P0, x)
    p1 = TOY.posterior(
        jax.tree_util.tree_map(lambda a: a, _m_step(TOY.e_step(P0, x, jnp.ones_like(x))[0], None)),
        x,
    )
    direct = np.mean(np.sum(np.asarray(q0) * (np.log(q0) - np.log(p1)), axis=1))
    np.testing.assert_allclose(kl[0, 1], direct, rtol=1e-8)


def test_float32_stays_float32():
    x = _data(8).astype(jnp.float32)
    p = tuple(a.astype(jnp.float32) for a in P0)
    res = em.fit_em(TOY, p, x, max_iter=10, tol=0.0)
    assert res.params[1].dtype == jnp.float32 and res.history.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(res.history)))


def test_expected_stats_of_the_posterior_equal_the_e_step():
    x = _data(9)
    w = jnp.asarray(np.random.default_rng(9).uniform(0, 2, x.shape[0]))
    stats, _ = TOY.e_step(P0, x, w)
    again = TOY.expected_stats(TOY.posterior(P0, x), x, w)
    for a, b in zip(stats, again, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_em_trace_does_not_hang_on_a_full_covariance_digits_gmm():
    """Regression: a lax.scan version of em_trace deadlocked XLA:CPU here (jax 0.10.2)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        from emvi import em, gmm
        from emvi.data import load_digits
        x, y = load_digits()
        x = x - x.mean(0)
        k = 10
        means = np.stack([x[y == c].mean(0) for c in range(k)])
        params = gmm.GMMParams(jnp.full(k, 0.1), jnp.asarray(means),
                               jnp.broadcast_to(4.0 * jnp.eye(64), (k, 64, 64)))
        model = gmm.model("full")
        tr = em.em_trace(model, params, model.prepare(jnp.asarray(x)), num_iter=3,
                         hyper=gmm.GMMHyper(jnp.asarray(0.1)))
        ll = np.asarray(tr.log_likelihood)
        assert np.all(np.isfinite(ll)) and np.all(np.diff(ll.ravel()) >= -1e-9), ll
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def _chunked_e_step_before_issue_13(model, params, data, weights, *, chunk_size=None):
    """em.chunked_e_step as it was: the first chunk's E-step outside the scan, the rest in."""
    n = em._leading_dim(data)
    if chunk_size is None or chunk_size >= n:
        return model.e_step(params, data, weights)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n

    def pad_and_split(leaf, zero_fill=False):
        if pad:
            filler = jnp.broadcast_to(leaf[:1], (pad, *leaf.shape[1:]))
            if zero_fill:
                filler = jnp.zeros_like(filler)
            leaf = jnp.concatenate([leaf, filler], axis=0)
        return leaf.reshape(num_chunks, chunk_size, *leaf.shape[1:])

    chunks = jax.tree_util.tree_map(pad_and_split, data)
    w = pad_and_split(weights, zero_fill=True)
    first = model.e_step(params, jax.tree_util.tree_map(lambda c: c[0], chunks), w[0])

    def body(carry, chunk):
        s, l_ = model.e_step(params, *chunk)
        return (jax.tree_util.tree_map(jnp.add, carry[0], s), carry[1] + l_), None

    rest = jax.tree_util.tree_map(lambda c: c[1:], (chunks, w))
    return jax.lax.scan(body, first, rest)[0]


@pytest.mark.parametrize("case", ["toy", "gmm_full"])
def test_chunked_run_em_equals_the_e_step_of_before_issue_13(case, monkeypatch):
    """The zero-started chunk sums (issue 13) change nothing but rounding: 0 + s == s in
    floating point. The GMM's fit is bit-identical; the toy's differs in the last bit
    (measured 2e-16 absolute), because the old code's first chunk ran outside the loop,
    compiled by XLA as its own kernels, so its sums were rounded differently; hence 4 ulps
    (of the value, or of the data's scale) for the toy and exact equality for the GMM."""
    from emvi import gmm

    if case == "toy":
        model, params, data, hyper = TOY, P0, _data(10, n=300), None
    else:
        rng = np.random.default_rng(11)
        x = jnp.asarray(rng.normal(size=(300, 3)) + rng.integers(0, 3, (300, 1)) * 3.0)
        model = gmm.model("full")
        k = 3
        params = gmm.GMMParams(jnp.full(k, 1 / k), x[:k], jnp.broadcast_to(jnp.eye(3), (k, 3, 3)))
        data, hyper = model.prepare(x), gmm.GMMHyper(jnp.asarray(1e-6))
    w = jnp.asarray(np.random.default_rng(12).uniform(0.5, 2.0, 300))

    def run():
        # A fresh function each time: jit's cache is keyed on the function, and a cached
        # trace would not see the monkeypatched E-step.
        def f(params, data, w, hyper):
            return em.run_em(
                model, params, data, w, max_iter=8, tol=0.0, hyper=hyper, chunk_size=64
            )

        return jax.jit(f)(params, data, w, hyper)

    now = run()
    monkeypatch.setattr(em, "chunked_e_step", _chunked_e_step_before_issue_13)
    before = run()
    eps = np.finfo(np.float64).eps
    # Toy: 4 ulps of each value, or of the data's scale for a mean that cancels near 0.
    rtol, atol = (
        (0.0, 0.0) if case == "gmm_full" else (4 * eps, 4 * eps * float(jnp.max(jnp.abs(data))))
    )
    for a, b in zip(jax.tree_util.tree_leaves(now), jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# Restarts through a batched E-step (em.BatchedEStep): the same results as vmap
# ---------------------------------------------------------------------------------------


def _toy_batched_e_step(params, x, w):
    """The toy's E-step of r restarts at once, written out: log joint (n, r, k)."""
    weights, means = params  # (r, k) each
    diff = x[:, None, None] - means[None, :, :]
    lj = jnp.log(weights)[None] - 0.5 * diff**2 - 0.5 * jnp.log(2 * jnp.pi)
    ll = jax.scipy.special.logsumexp(lj, axis=2)  # (n, r)
    r = jax.nn.softmax(lj, axis=2) * w[:, None, None]
    return (jnp.sum(r, axis=0), jnp.einsum("nrk,n->rk", r, x)), jnp.sum(w[:, None] * ll, axis=0)


TOY_BATCHED = TOY._replace(e_step=em.BatchedEStep(_e_step, _toy_batched_e_step))

# Five restarts of the toy; with tol=1e-6 they stop after different numbers of iterations.
INITS = (
    jnp.array([[1 / 3] * 3, [0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]]),
    jnp.array(
        [[-4.0, 0.0, 3.0], [5.0, 5.1, 5.2], [-0.1, 0.0, 0.1], [-2.0, 1.0, 2.0], [0.0, 2.0, 6.0]]
    ),
)


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_fit_with_a_batched_e_step_equals_the_vmapped_restarts(chunk_size):
    x = _data(13)
    w = jnp.asarray(np.random.default_rng(13).uniform(0.5, 2.0, x.shape[0]))
    kw = dict(max_iter=200, tol=1e-6, chunk_size=chunk_size)
    _, runs = em.run_em_restarts(TOY, INITS, x, w, **kw)
    iters = np.asarray(runs.num_iter)
    # The case the frozen-restart logic is for: different stopping iterations, all < max_iter.
    assert len(set(iters.tolist())) >= 3 and bool(np.all(np.asarray(runs.converged)))
    _, runs_b = em.run_em_restarts(TOY_BATCHED, INITS, x, w, **kw)
    testing.assert_same_runs(runs_b, runs)
    best = em.fit(TOY, INITS, x, w, **kw)
    best_b = em.fit(TOY_BATCHED, INITS, x, w, **kw)
    testing.assert_same_runs(best_b, best)
    assert int(np.argmax(best_b.restart_log_likelihoods)) == int(np.argmax(runs.log_likelihood))
    # fit_many: the batched loop vmapped over data sets.
    xs = jnp.stack([x, _data(14)])
    ps = jax.tree_util.tree_map(lambda a: jnp.stack([a, a[::-1]]), INITS)
    many = em.fit_many(TOY, ps, xs, jnp.stack([w, w]), **kw)
    testing.assert_same_runs(em.fit_many(TOY_BATCHED, ps, xs, jnp.stack([w, w]), **kw), many)


def test_batched_e_step_is_used_for_restarts_only_and_dropped_with_the_e_step():
    calls = []

    def counting(params, x, w):
        calls.append(1)  # runs when traced
        return _toy_batched_e_step(params, x, w)

    model = TOY._replace(e_step=em.BatchedEStep(_e_step, counting))
    assert model.batched_e_step is counting and TOY.batched_e_step is None
    x = _data(15, n=50)
    one = jax.tree_util.tree_map(lambda a: a[:1], INITS)
    res = em.fit(model, one, x, max_iter=3, tol=0.0)
    assert not calls  # one restart: the plain loop
    np.testing.assert_allclose(res.history, em.fit(TOY, one, x, max_iter=3, tol=0.0).history)
    em.fit(model, INITS, x, max_iter=3, tol=0.0)
    assert calls
    # Replacing the E-step (as missing.fixed_responsibilities and parallel.data_parallel do)
    # must not keep a batched version of the old one.
    assert model._replace(e_step=_e_step).batched_e_step is None
    assert model.e_step(P0, x, jnp.ones(50))[1] == TOY.e_step(P0, x, jnp.ones(50))[1]


def test_a_batched_e_step_of_the_wrong_shape_raises():
    def wrong(params, x, w):  # the log-likelihood sums of the restarts summed again
        stats, ll = _toy_batched_e_step(params, x, w)
        return stats, jnp.sum(ll)

    model = TOY._replace(e_step=em.BatchedEStep(_e_step, wrong))
    with pytest.raises(ValueError, match="batched_e_step does not return what vmap"):
        em.fit(model, INITS, _data(16, n=40), max_iter=2)
