"""Hidden Markov models (emvi.hmm): oracles, identities and bad input.

Oracles: brute-force enumeration of all k^t state paths (small k, t) with SciPy densities,
and hmmlearn (0.3.3) from the same initial parameters. Tolerances: enumeration and the
sequential/parallel agreement are float64 computations of the same quantities by different
summation orders, so 1e-10 (they agree to about 1e-14); hmmlearn's log-likelihood history
and parameters after 8 iterations to 1e-8 relative, the issue's bound (measured ~1e-14).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal, poisson

from emvi import em, estep, gmm, grid, hmm, mstep

K, D = 3, 2
LENGTHS = np.array([5, 3, 1, 4])
T = int(LENGTHS.max())

# Called eagerly, these functions compile every primitive as its own small XLA program (a
# few dozen per call, again for each new shape); through jit each is one program per shape.
# Same functions, same results (sampling: the same draws).
_sample = jax.jit(hmm.sample, static_argnums=(2, 3), static_argnames=("emission",))
_log_prob = jax.jit(hmm.log_prob, static_argnames=("emission", "parallel"))
_viterbi = jax.jit(hmm.viterbi, static_argnames=("emission", "parallel"))


def _params(rng, emission, k=K, d=D, m=4):
    pi = rng.dirichlet(np.full(k, 3.0))
    a = rng.dirichlet(np.full(k, 3.0), size=k)
    if isinstance(emission, hmm.Gaussian):
        ct = emission.covariance_type
        means = rng.normal(size=(k, d)) * 2.0
        if ct == "full":
            r = rng.normal(size=(k, d, d)) * 0.4
            cov = r @ np.swapaxes(r, 1, 2) + np.eye(d)
        elif ct == "tied":
            r = rng.normal(size=(d, d)) * 0.4
            cov = r @ r.T + np.eye(d)
        elif ct == "diag":
            cov = rng.uniform(0.5, 2.0, (k, d))
        else:
            cov = rng.uniform(0.5, 2.0, k)
        e = hmm.GaussianParams(jnp.asarray(means), jnp.asarray(cov))
    elif isinstance(emission, hmm.Categorical):
        e = hmm.CategoricalParams(jnp.asarray(rng.dirichlet(np.ones(emission.num_symbols), k)))
    elif isinstance(emission, hmm.Bernoulli):
        e = hmm.BernoulliParams(jnp.asarray(rng.uniform(0.1, 0.9, (k, d))))
    else:
        e = hmm.PoissonParams(jnp.asarray(rng.uniform(0.5, 4.0, (k, d))))
    return hmm.HMMParams(jnp.asarray(pi), jnp.asarray(a), e)


def _close_trees(a, b, **tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


def _data(rng, emission, n=LENGTHS.size, t=T, d=D):
    if isinstance(emission, hmm.Gaussian):
        return rng.normal(size=(n, t, d)) * 2.0
    if isinstance(emission, hmm.Categorical):
        return rng.integers(0, emission.num_symbols, size=(n, t))
    if isinstance(emission, hmm.Bernoulli):
        return (rng.uniform(size=(n, t, d)) < 0.5).astype(np.float64)
    return rng.poisson(2.0, size=(n, t, d)).astype(np.float64)


def _cov_full(emission, p, j):
    ct, cov = emission.covariance_type, np.asarray(p.emission.covariances)
    d = p.emission.means.shape[1]
    return {
        "full": lambda: cov[j],
        "tied": lambda: cov,
        "diag": lambda: np.diag(cov[j]),
        "spherical": lambda: cov[j] * np.eye(d),
    }[ct]()


def _log_b(emission, p, x_t):
    """Independent (SciPy/NumPy) emission log-densities of one step, (k,)."""
    k = p.initial.shape[0]
    if isinstance(emission, hmm.Gaussian):
        means = np.asarray(p.emission.means)
        return np.array(
            [multivariate_normal(means[j], _cov_full(emission, p, j)).logpdf(x_t) for j in range(k)]
        )
    if isinstance(emission, hmm.Categorical):
        return np.log(np.asarray(p.emission.probs)[:, int(x_t)])
    if isinstance(emission, hmm.Bernoulli):
        pr = np.asarray(p.emission.probs)
        return np.sum(x_t * np.log(pr) + (1 - x_t) * np.log1p(-pr), axis=1)
    return np.sum(poisson(np.asarray(p.emission.rates)).logpmf(x_t[None, :]), axis=1)


def _enumerate(emission, p, x, lengths):
    """Per sequence: log p(x), marginals, pairwise marginals, the best path and its score."""
    pi, a = np.asarray(p.initial), np.asarray(p.transition)
    k = pi.shape[0]
    out = []
    for i, length in enumerate(lengths):
        lb = np.array([_log_b(emission, p, x[i, t]) for t in range(length)])
        paths = list(itertools.product(range(k), repeat=int(length)))
        lp = np.array(
            [
                np.log(pi[z[0]])
                + sum(np.log(a[z[t - 1], z[t]]) for t in range(1, length))
                + sum(lb[t, z[t]] for t in range(length))
                for z in paths
            ]
        )
        total = np.logaddexp.reduce(lp)
        g = np.zeros((length, k))
        xi = np.zeros((max(length - 1, 0), k, k))
        for z, v in zip(paths, np.exp(lp - total), strict=True):
            g[np.arange(length), z] += v
            for t in range(length - 1):
                xi[t, z[t], z[t + 1]] += v
        best = int(np.argmax(lp))
        out.append((total, g, xi, np.array(paths[best]), lp[best]))
    return out


BRUTE_EMISSIONS = [  # the other covariance types: the hmmlearn tests
    hmm.Gaussian("full"),
    hmm.Categorical(4),
    hmm.Bernoulli(),
    hmm.Poisson(),
]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _everything(p, data, w, emission, parallel):
    """One compiled program per (emission, scan): every quantity the enumeration checks."""
    kw = dict(emission=emission, parallel=parallel)
    return (
        hmm.log_prob(p, data, **kw),
        hmm.posterior(p, data, **kw),
        hmm.viterbi(p, data, **kw),
        hmm.e_step(p, data, w, **kw),
        hmm.filter_marginals(p, data, **kw),
    )


@pytest.mark.parametrize("emission", BRUTE_EMISSIONS, ids=lambda e: repr(e))
def test_brute_force_enumeration(emission):
    """log p(x), marginals, pairwise marginals, Viterbi and the expected statistics equal the
    sums over all k^t paths, for both scans, on a ragged batch (lengths 5, 3, 1, 4)."""
    rng = np.random.default_rng(1)
    p = _params(rng, emission)
    x = _data(rng, emission)
    data = hmm.as_data(x, LENGTHS, emission=emission)
    ref = _enumerate(emission, p, x, LENGTHS)
    w = jnp.asarray(rng.uniform(0.5, 2.0, len(LENGTHS)))
    for parallel in (False, True):
        ll, q, (path, score), (stats, ll_sum), _ = _everything(p, data, w, emission, parallel)
        for i, (total, g, xi, best, best_lp) in enumerate(ref):
            length = LENGTHS[i]
            np.testing.assert_allclose(ll[i], total, rtol=1e-12, atol=1e-10)
            np.testing.assert_allclose(q.marginals[i, :length], g, atol=1e-10)
            np.testing.assert_allclose(q.pairwise[i, : length - 1], xi, atol=1e-10)
            np.testing.assert_array_equal(path[i, :length], best)
            np.testing.assert_array_equal(path[i, length:], -1)
            np.testing.assert_allclose(score[i], best_lp, rtol=1e-12, atol=1e-10)
        wn = np.asarray(w)
        np.testing.assert_allclose(ll_sum, np.sum(wn * np.array([r[0] for r in ref])), rtol=1e-12)
        np.testing.assert_allclose(
            stats.initial, sum(wn[i] * r[1][0] for i, r in enumerate(ref)), atol=1e-10
        )
        trans = sum(wn[i] * r[2].sum(axis=0) for i, r in enumerate(ref) if LENGTHS[i] > 1)
        np.testing.assert_allclose(stats.transition, trans, atol=1e-10)
        counts = sum(wn[i] * r[1].sum(axis=0) for i, r in enumerate(ref))
        if isinstance(emission, hmm.Gaussian):
            np.testing.assert_allclose(stats.emission.counts, counts, atol=1e-10)
            sums = sum(wn[i] * r[1].T @ x[i, : LENGTHS[i]] for i, r in enumerate(ref))
            np.testing.assert_allclose(stats.emission.sums, sums, atol=1e-10)
        elif isinstance(emission, hmm.Categorical):
            onehot = np.eye(4)
            sym = sum(wn[i] * r[1].T @ onehot[x[i, : LENGTHS[i]]] for i, r in enumerate(ref))
            np.testing.assert_allclose(stats.emission.sum_x, sym, atol=1e-10)
        else:
            np.testing.assert_allclose(stats.emission.counts, counts, atol=1e-10)
            sums = sum(wn[i] * r[1].T @ x[i, : LENGTHS[i]] for i, r in enumerate(ref))
            np.testing.assert_allclose(stats.emission.sum_x, sums, atol=1e-10)


# ---------------------------------------------------------------------------------------
# hmmlearn
# ---------------------------------------------------------------------------------------


def _hmmlearn_batch(seed, lengths):
    """A ragged batch sampled from a 3-state HMM with separated 2-D means."""
    true = hmm.HMMParams(
        jnp.array([0.5, 0.3, 0.2]),
        jnp.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]),
        hmm.GaussianParams(jnp.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]), jnp.ones((3, 2))),
    )
    x, _ = _sample(
        jax.random.key(seed), true, len(lengths), int(max(lengths)), emission=hmm.Gaussian("diag")
    )
    return np.asarray(x)


HL_ITERS = 8


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_matches_hmmlearn_gaussian(covariance_type):
    """From the same initial parameters, 8 EM iterations give hmmlearn's log-likelihood history
    and parameters (maximum likelihood: covars_prior=0, covars_weight=1, min_covar=0 (used
    only by hmmlearn's own initialisation), reg_covar=0; hmmlearn's history is a sum over
    sequences, emvi's a mean), on two ragged batches."""
    from hmmlearn import hmm as hl

    emission = hmm.Gaussian(covariance_type)
    # two ragged batches of the same padded shape (one compiled program per covariance type)
    for seed, lengths in ((3, np.array([40, 17, 25, 8, 33])), (4, np.array([12, 40, 5, 31, 1]))):
        rng = np.random.default_rng(seed)
        x = _hmmlearn_batch(seed, lengths)
        p0 = _params(rng, emission)
        p0 = p0._replace(
            emission=p0.emission._replace(
                means=jnp.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]) + rng.normal(size=(3, 2))
            )
        )
        res = hmm.fit(
            jax.random.key(0), x, K, emission=emission, lengths=lengths, init=p0,
            max_iter=HL_ITERS, tol=0.0, reg_covar=0.0,
        )  # fmt: skip
        ref = hl.GaussianHMM(
            K, covariance_type=covariance_type, n_iter=HL_ITERS, tol=-np.inf, init_params="",
            params="stmc", covars_prior=0.0, covars_weight=1.0, min_covar=0.0,
        )  # fmt: skip
        ref.startprob_, ref.transmat_ = np.asarray(p0.initial), np.asarray(p0.transition)
        ref.means_, ref.covars_ = np.asarray(p0.emission.means), np.asarray(p0.emission.covariances)
        ref.fit(np.concatenate([x[i, :length] for i, length in enumerate(lengths)]), lengths)
        hist = np.asarray(ref.monitor_.history)
        np.testing.assert_allclose(np.asarray(res.history) * len(lengths), hist, rtol=1e-8)
        np.testing.assert_allclose(res.params.initial, ref.startprob_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(res.params.transition, ref.transmat_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(res.params.emission.means, ref.means_, rtol=1e-8, atol=1e-12)
        cov = ref._covars_[:, 0] if covariance_type == "spherical" else ref._covars_
        np.testing.assert_allclose(res.params.emission.covariances, cov, rtol=1e-8)


def test_matches_hmmlearn_categorical():
    """Categorical emissions (hmmlearn's CategoricalHMM, emissionprob_prior=1) on two ragged
    batches of integer symbols."""
    from hmmlearn import hmm as hl

    emission = hmm.Categorical(4)
    for seed, lengths in ((5, np.array([30, 17, 25, 8])), (6, np.array([2, 30, 3, 11]))):
        rng = np.random.default_rng(seed)
        true = _params(rng, emission)
        x, _ = _sample(jax.random.key(seed), true, len(lengths), int(lengths.max()),
                          emission=emission)  # fmt: skip
        x = np.asarray(x)
        p0 = _params(rng, emission)
        res = hmm.fit(
            jax.random.key(0), x, K, emission=emission, lengths=lengths, init=p0,
            max_iter=HL_ITERS, tol=0.0,
        )  # fmt: skip
        ref = hl.CategoricalHMM(
            K, n_iter=HL_ITERS, tol=-np.inf, init_params="", params="ste", n_features=4
        )
        ref.startprob_, ref.transmat_ = np.asarray(p0.initial), np.asarray(p0.transition)
        ref.emissionprob_ = np.asarray(p0.emission.probs)
        flat = np.concatenate([x[i, :length] for i, length in enumerate(lengths)])[:, None]
        ref.fit(flat, lengths)
        np.testing.assert_allclose(
            np.asarray(res.history) * len(lengths), ref.monitor_.history, rtol=1e-8
        )
        np.testing.assert_allclose(res.params.transition, ref.transmat_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(res.params.initial, ref.startprob_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(
            res.params.emission.probs, ref.emissionprob_, rtol=1e-8, atol=1e-12
        )


# ---------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------


def test_sequential_equals_parallel_long_ragged():
    """Both scans give the same statistics, log-likelihoods, filtered marginals and Viterbi
    paths to 1e-10 on longer ragged sequences (t = 32; the enumeration test covers t <= 5)."""
    rng = np.random.default_rng(7)
    emission = hmm.Gaussian("diag")
    p = _params(rng, emission, k=4)
    lengths = np.array([32, 1, 17, 25])
    x, _ = _sample(jax.random.key(1), p, 4, 32, emission=emission)
    data = hmm.as_data(np.asarray(x), lengths, emission=emission)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 4))
    _, q0, (v0, sc0), (s0, l0), (f0, _) = _everything(p, data, w, emission, False)
    _, q1, (v1, sc1), (s1, l1), (f1, _) = _everything(p, data, w, emission, True)
    np.testing.assert_allclose(l0, l1, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(s1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(q0.pairwise, q1.pairwise, atol=1e-10)
    np.testing.assert_allclose(f0, f1, atol=1e-10)
    np.testing.assert_array_equal(v0, v1)
    np.testing.assert_allclose(sc0, sc1, rtol=1e-12)


def test_filtered_marginals_are_last_step_smoothed_of_prefixes():
    """p(z_t | x_{1:t}) = the smoothed marginal of the last step of the prefix x_{1:t}."""
    rng = np.random.default_rng(8)
    emission = hmm.Gaussian("spherical")
    p = _params(rng, emission)
    x = _data(rng, emission, n=1, t=T)
    prefixes = np.repeat(x, T, axis=0)
    lengths = np.arange(1, T + 1)
    data = hmm.as_data(prefixes, lengths, emission=emission)
    ll, q, _, _, (f, fll) = _everything(p, data, jnp.ones(T), emission, False)
    np.testing.assert_allclose(f[-1], q.marginals[np.arange(T), lengths - 1], atol=1e-12)
    np.testing.assert_allclose(fll, ll, rtol=1e-12)


@functools.partial(jax.jit, static_argnums=(4,))
def _protocol(p, other, data, w, mdl):
    q = mdl.posterior(p, data)
    stats, _ = mdl.e_step(p, data, w)
    return (
        mdl.elbo(p, q, data),
        mdl.log_prob(p, data),
        mdl.elbo(p, mdl.posterior(other, data), data),
        stats,
        mdl.expected_stats(q, data, w),
    )


def test_protocol_identities():
    """ELBO = log p(x) at the exact posterior and below it for another chain q;
    expected_stats(posterior) = e_step's statistics; em.require finds every field."""
    rng = np.random.default_rng(9)
    emission = hmm.Gaussian("full")
    mdl = hmm.model(emission)
    em.require(mdl, *em.ExactModel._fields, purpose="test")
    p, other = _params(rng, emission), _params(rng, emission)
    mask = jnp.asarray(np.arange(T)[None, :] < LENGTHS[:, None])
    data = mdl.prepare(hmm.HMMSequences(jnp.asarray(_data(rng, emission)), mask))
    w = jnp.asarray(rng.uniform(0.5, 2.0, len(LENGTHS)))
    elbo, ll, elbo_other, stats, again = _protocol(p, other, data, w, mdl)
    np.testing.assert_allclose(elbo, ll, rtol=1e-12)
    assert np.all(np.asarray(ll - elbo_other) > 1e-6)
    _close_trees(stats, again, rtol=1e-10, atol=1e-12)


def test_relabelling_states():
    """Permuting the states permutes marginals, statistics and nothing else."""
    rng = np.random.default_rng(10)
    emission = hmm.Gaussian("diag")
    p = _params(rng, emission)
    perm = np.array([2, 0, 1])
    pp = hmm.HMMParams(
        p.initial[perm],
        p.transition[perm][:, perm],
        hmm.GaussianParams(p.emission.means[perm], p.emission.covariances[perm]),
    )
    data = hmm.as_data(_data(rng, emission), LENGTHS, emission=emission)
    w = jnp.ones(len(LENGTHS))
    _, _, (path, _), (s, ll), _ = _everything(p, data, w, emission, False)
    _, _, (pathp, _), (sp, llp), _ = _everything(pp, data, w, emission, False)
    np.testing.assert_allclose(ll, llp, rtol=1e-13)
    np.testing.assert_allclose(s.initial[perm], sp.initial, atol=1e-13)
    np.testing.assert_allclose(s.transition[perm][:, perm], sp.transition, atol=1e-13)
    np.testing.assert_allclose(s.emission.sums[perm], sp.emission.sums, atol=1e-12)
    inv = np.argsort(perm)
    np.testing.assert_array_equal(np.where(path >= 0, inv[np.asarray(path)], -1), pathp)


@jax.jit
def _one_step_each(p, g, data, x, w):
    emission = hmm.Gaussian("full")
    stats, _ = hmm.e_step(p, data, w, emission=emission)
    gm = gmm.model("full")
    gstats, _ = gm.e_step(g, gm.prepare(x), w)
    return (
        hmm.log_prob(p, data, emission=emission),
        gmm.log_prob(g, x, covariance_type="full"),
        hmm.m_step(stats, None, emission=emission),
        gm.m_step(gstats, None),
    )


def test_length_one_sequences_are_a_mixture():
    """With every length 1 the HMM is a mixture with weights pi: log p(x) is gmm.log_prob and
    one EM step moves pi and the emission exactly as one GMM EM step (A is untouched: it gets
    no statistics, so its rows become uniform)."""
    rng = np.random.default_rng(11)
    emission = hmm.Gaussian("full")
    p = _params(rng, emission)
    x = rng.normal(size=(50, 1, D)) * 2.0
    data = hmm.as_data(x, emission=emission)
    g = gmm.GMMParams(p.initial, p.emission.means, p.emission.covariances)
    ll, gll, new, gnew = _one_step_each(p, g, data, jnp.asarray(x[:, 0]), jnp.ones(50))
    np.testing.assert_allclose(ll, gll, rtol=1e-12)
    np.testing.assert_allclose(new.initial, gnew.weights, rtol=1e-12)
    np.testing.assert_allclose(new.emission.means, gnew.means, rtol=1e-12)
    np.testing.assert_allclose(new.emission.covariances, gnew.covariances, rtol=1e-12)
    np.testing.assert_allclose(new.transition, np.full((K, K), 1.0 / K), rtol=1e-12)


@functools.partial(jax.jit, static_argnums=(5,))
def _stationarity(p, data, w, hyper, _unused, mdl):
    q = mdl.posterior(p, data)
    theta = mdl.m_step(mdl.expected_stats(q, data, w), hyper)
    u = mdl.to_unconstrained(theta)

    def objective(uu):
        th = mdl.from_unconstrained(uu)
        return jnp.sum(w * mdl.elbo(th, q, data)) + mdl.log_prior(th, hyper)

    return theta, mdl.from_unconstrained(u), jax.grad(objective)(u)


def test_m_step_is_stationary_point_of_the_map_objective():
    """The closed-form MAP M-step zeroes the gradient (in unconstrained coordinates) of
    sum_n w_n ELBO_n(q, theta) + log_prior(theta) for a fixed q: the two M-steps of the grid
    climb the same objective, and the bijections round-trip."""
    rng = np.random.default_rng(12)
    gauss_prior = gmm.GMMPrior(
        jnp.ones(()), jnp.zeros(D), jnp.array(0.5), jnp.ones(D), jnp.array(3.0)
    )
    for emission, eprior in (
        (hmm.Gaussian("diag"), gmm.GMMHyper(jnp.zeros(()), gauss_prior)),
        (hmm.Categorical(4), hmm.CategoricalPrior(jnp.array(2.0))),
        (hmm.Poisson(), hmm.PoissonPrior(2.0, 0.5)),
    ):
        hyper = hmm.HMMHyper(jnp.array(2.0), jnp.array([2.0, 3.0, 1.5]), eprior)
        p = _params(rng, emission)
        data = hmm.as_data(_data(rng, emission), LENGTHS, emission=emission)
        w = jnp.asarray(rng.uniform(0.5, 2.0, len(LENGTHS)))
        theta, back, grads = _stationarity(p, data, w, hyper, None, hmm.model(emission))
        _close_trees(theta, back, rtol=1e-10, atol=1e-12)
        for gleaf in jax.tree_util.tree_leaves(grads):
            np.testing.assert_allclose(gleaf, 0.0, atol=1e-7)


_em_history = jax.jit(
    lambda p, x, mask: (
        em.run_em(
            hmm.model(hmm.Gaussian("diag")),
            p,
            hmm.prepare(hmm.HMMSequences(x, mask), emission=hmm.Gaussian("diag")),
            max_iter=6,
            tol=0.0,
            hyper=hmm.HMMHyper(1.0, 1.0, gmm.GMMHyper(jnp.asarray(1e-3))),
        ).history
    )
)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1))
def test_em_never_lowers_the_log_likelihood(seed):
    rng = np.random.default_rng(seed)
    emission = hmm.Gaussian("diag")
    p = _params(rng, emission)
    x = jnp.asarray(_data(rng, emission))
    mask = jnp.asarray(np.arange(T)[None, :] < LENGTHS[:, None])
    hist = np.asarray(_em_history(p, x, mask))
    assert np.all(np.diff(hist) >= -1e-10 * np.abs(hist[1:]))


def test_chunks_and_weights():
    """chunk_size changes nothing; an integer sample_weight equals duplicated sequences."""
    rng = np.random.default_rng(13)
    emission = hmm.Categorical(4)
    w = np.array([2.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0])  # 4 sequences, 3 of zero weight
    idx = np.repeat(np.arange(4), w[:4].astype(int))  # the same 4, duplicated: 7 rows
    lengths = np.concatenate([LENGTHS, LENGTHS[:3]])
    x = _data(rng, emission, n=7)
    p0 = _params(rng, emission)
    # (a Dirichlet(1.5) prior keeps every emission probability > 0, so the zero-weight
    # sequences stay possible and em.run_em's final sum_n w_n log p(x_n) is finite)
    prior = hmm.HMMHyper(emission=hmm.CategoricalPrior(1.5))
    kw = dict(emission=emission, init=p0, max_iter=4, tol=0.0, prior=prior)
    weighted = hmm.fit(jax.random.key(0), x, K, lengths=lengths, sample_weight=w, **kw)
    dup = hmm.fit(jax.random.key(0), x[idx], K, lengths=lengths[idx], **kw)
    chunked = hmm.fit(jax.random.key(0), x[idx], K, lengths=lengths[idx], chunk_size=3, **kw)
    np.testing.assert_allclose(weighted.params.transition, dup.params.transition, rtol=1e-10)
    np.testing.assert_allclose(weighted.history, dup.history, rtol=1e-10)
    _close_trees(chunked.params, dup.params, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(chunked.history, dup.history, rtol=1e-12)


def test_fit_recovers_and_float32():
    """From restarts, fit recovers a well-separated 2-state HMM; float32 in, float32 out."""
    true = hmm.HMMParams(
        jnp.array([0.5, 0.5]),
        jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        hmm.GaussianParams(jnp.array([[-3.0, 0.0], [3.0, 1.0]]), jnp.ones((2, 2))),
    )
    x, _ = _sample(jax.random.key(0), true, 4, 80, emission=hmm.Gaussian("diag"))
    for dtype in (np.float32,):  # float64 fits: the hmmlearn tests
        res = hmm.fit(
            jax.random.key(1), np.asarray(x, dtype), 2, emission=hmm.Gaussian("diag"),
            num_init=2, max_iter=50,
        )  # fmt: skip
        assert res.params.transition.dtype == dtype
        order = np.argsort(np.asarray(res.params.emission.means[:, 0]))
        np.testing.assert_allclose(res.params.emission.means[order], true.emission.means, atol=0.2)
        a = np.asarray(res.params.transition)[order][:, order]
        np.testing.assert_allclose(a, true.transition, atol=0.06)
        assert bool(res.converged)


def test_sample_transition_frequencies():
    """Empirical transition frequencies of a long sample are within 5 standard errors."""
    p = hmm.HMMParams(
        jnp.array([1.0, 0.0]),
        jnp.array([[0.7, 0.3], [0.4, 0.6]]),
        hmm.CategoricalParams(jnp.array([[0.5, 0.5], [0.1, 0.9]])),
    )
    _, z = hmm.sample(jax.random.key(2), p, 4, 5000, emission=hmm.Categorical(2))
    z = np.asarray(z)
    assert np.all(z[:, 0] == 0)
    prev, nxt = z[:, :-1].ravel(), z[:, 1:].ravel()
    a = np.asarray(p.transition)
    for i in range(2):
        f = np.mean(nxt[prev == i] == 1)
        se = np.sqrt(a[i, 1] * (1 - a[i, 1]) / np.sum(prev == i))
        assert abs(f - a[i, 1]) < 5 * se


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@functools.cache
def _good():
    rng = np.random.default_rng(14)
    emission = hmm.Gaussian("diag")
    return emission, _params(rng, emission), _data(rng, emission)


@pytest.mark.parametrize(
    "case, match",
    [
        ("nan", "NaN"),
        ("long", "<= the padded length"),
        ("zero", ">= 1"),
        ("ragged", "ragged"),
        ("dim", "dimension"),
        ("rows", "sum to one"),
        ("negative", "negative"),
        ("k0", "num_states"),
        ("shape", "shape"),
    ],
)
def test_bad_input_raises(case, match):
    emission, p, x = _good()
    kw = dict(emission=emission, lengths=LENGTHS)
    x = x.copy()
    if case == "nan":
        x[1, 0, 0] = np.nan
    elif case == "long":
        kw["lengths"] = LENGTHS + 1
    elif case == "zero":
        kw["lengths"] = np.array([5, 0, 1, 4])
    elif case == "ragged":
        x = [np.zeros((3, D)), np.zeros((5, D))]
        kw.pop("lengths")
    elif case == "dim":
        kw["init"] = p._replace(emission=p.emission._replace(means=jnp.zeros((K, D + 1))))
    elif case == "rows":
        kw["init"] = p._replace(transition=p.transition * 1.1)
    elif case == "negative":
        a = np.asarray(p.transition).copy()
        a[0] = [1.2, -0.2, 0.0]
        kw["init"] = p._replace(transition=jnp.asarray(a))
    elif case == "shape":
        x = x[:, :, 0]
    with pytest.raises(ValueError, match=match):
        hmm.fit(jax.random.key(0), x, 0 if case == "k0" else K, **kw)


def test_nan_in_padding_is_ignored():
    """Padding after a sequence's end may hold anything (it is never evaluated)."""
    emission, p, x = _good()
    x = x.copy()
    x[2, 1:] = np.nan  # sequence 2 has length 1
    ll = _log_prob(p, hmm.as_data(x, LENGTHS, emission=emission), emission=emission)
    assert np.all(np.isfinite(np.asarray(ll)))


def test_generalised_em_cell_of_the_grid():
    """The HMM runs in the grid's exact-E + gradient-M cell (emvi.grid.run_cell with
    estep.exact and mstep.gradient) and climbs to the closed-form EM optimum."""
    import optax

    from emvi import estep, grid, mstep

    emission = hmm.Categorical(3)
    true = hmm.HMMParams(
        jnp.array([0.6, 0.4]),
        jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        hmm.CategoricalParams(jnp.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7]])),
    )
    x, _ = _sample(jax.random.key(0), true, 6, 30, emission=emission)
    p0 = hmm.HMMParams(
        jnp.array([0.5, 0.5]),
        jnp.array([[0.6, 0.4], [0.3, 0.7]]),
        hmm.CategoricalParams(jnp.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])),
    )
    mdl = hmm.model(emission)
    seqs = hmm.HMMSequences(x, jnp.ones(x.shape, bool))
    batch = estep.Batch(seqs, mdl.prepare(seqs), jnp.ones(6))
    cell = grid.Cell(estep.exact(mdl), mstep.gradient(mdl, optimizer=optax.adam(5e-2), num_steps=5))
    run = jax.jit(grid.run_cell, static_argnames=("cell", "model", "num_iters"))
    _, trace = run(jax.random.key(1), cell, mdl, p0, batch, None, num_iters=30)
    ll = np.asarray(trace.log_likelihood)
    ref = hmm.fit(jax.random.key(0), np.asarray(x), 2, emission=emission, init=p0, max_iter=200,
                  tol=0.0)  # fmt: skip
    assert ll[-1] > ll[0] + 1.0
    np.testing.assert_allclose(ll[-1], float(ref.log_likelihood), atol=1e-4)


# ---------------------------------------------------------------------------------------
# A chain-structured q from potentials: the local and amortized E-steps
# ---------------------------------------------------------------------------------------


def _log_joint_path(p, lb, z):
    """log p(x_{1:L}, z_{1:L}) of one path, from the (t, k) emission log-densities lb."""
    pi, a = np.log(np.asarray(p.initial)), np.log(np.asarray(p.transition))
    z = np.asarray(z)
    return pi[z[0]] + a[z[:-1], z[1:]].sum() + lb[np.arange(z.size), z].sum()


def _enumerate_chain(u, length, emission, p, x_i):
    """For the chain of potentials u (t, k + k^2) over all t steps: the marginal of its first
    ``length`` steps by summing over every k^t path, its marginals, pairwise marginals, and
    the ELBO sum_z q(z) (log p(x, z) - log q(z)) over the k^length prefixes."""
    t, m = u.shape
    k = int((np.sqrt(1 + 4 * m) - 1) / 2)
    phi, psi = u[:, :k], u[:-1, k:].reshape(t - 1, k, k)
    paths = np.array(list(itertools.product(range(k), repeat=t)))
    score = phi[np.arange(t), paths].sum(1) + psi[
        np.arange(t - 1), paths[:, :-1], paths[:, 1:]
    ].sum(1)
    q_full = np.exp(score - np.logaddexp.reduce(score))
    prefixes = list(itertools.product(range(k), repeat=length))
    index = {z: i for i, z in enumerate(prefixes)}
    q = np.zeros(len(prefixes))
    for z, v in zip(paths, q_full, strict=True):
        q[index[tuple(z[:length])]] += v
    g, xi = np.zeros((length, k)), np.zeros((length - 1, k, k))
    lb = np.array([_log_b(emission, p, x_i[s]) for s in range(length)])  # SciPy densities
    elbo = 0.0
    for z, v in zip(prefixes, q, strict=True):
        g[np.arange(length), z] += v
        xi[np.arange(length - 1), z[:-1], z[1:]] += v
        elbo += v * (_log_joint_path(p, lb, z) - np.log(v))
    return g, xi, elbo


_chain = jax.jit(
    lambda p, u, data, emission: (
        hmm.chain_posterior(u),
        hmm.elbo(p, hmm.chain_posterior(u), data, emission=emission),
        hmm.log_prob(p, data, emission=emission),
        hmm.elbo(
            p,
            hmm.chain_posterior(hmm.chain_potentials(hmm.posterior(p, data, emission=emission))),
            data,
            emission=emission,
        ),
    ),
    static_argnums=3,
)


def test_chain_q_against_enumeration():
    """For random potentials (nonzero on padded steps too) chain_posterior's marginals and
    pairwise marginals, and the ELBO of that q, equal the sums over all k^t paths (1e-10, as
    the enumeration test), the ELBO is below log p(x); the potentials of the HMM itself
    (phi_1 = log pi + log b(x_1), phi_t = log b(x_t), psi = log A) give the exact posterior
    and ELBO = log p(x); and chain_potentials inverts chain_posterior on the posterior."""
    rng = np.random.default_rng(20)
    emission = hmm.Gaussian("full")
    p = _params(rng, emission)
    x = _data(rng, emission)
    data = hmm.as_data(x, LENGTHS, emission=emission)
    u = rng.normal(size=(len(LENGTHS), T, K + K * K)) * 1.5
    q, elbo, ll, elbo_post = _chain(p, jnp.asarray(u), data, emission)
    exact = _enumerate(emission, p, x, LENGTHS)
    for i, length in enumerate(LENGTHS):
        g, xi, ref = _enumerate_chain(u[i], length, emission, p, x[i])
        np.testing.assert_allclose(q.marginals[i, :length], g, atol=1e-10)
        np.testing.assert_allclose(q.pairwise[i, : length - 1], xi, atol=1e-10)
        np.testing.assert_allclose(elbo[i], ref, rtol=1e-12, atol=1e-10)
        assert ref < exact[i][0] - 1e-3  # a random chain is far from the posterior
    np.testing.assert_allclose(ll, [r[0] for r in exact], rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(elbo_post, ll, rtol=1e-12, atol=1e-10)
    lb = np.array([[_log_b(emission, p, x[i, t]) for t in range(T)] for i in range(len(LENGTHS))])
    mask = np.arange(T)[None, :] < LENGTHS[:, None]
    phi = np.where(mask[..., None], lb, 0.0)
    phi[:, 0] += np.log(np.asarray(p.initial))
    psi = np.broadcast_to(
        np.log(np.asarray(p.transition)).reshape(1, 1, -1), (len(LENGTHS), T, K * K)
    )
    psi = np.where(
        np.concatenate([mask[:, 1:], np.zeros((len(LENGTHS), 1), bool)], 1)[..., None], psi, 0
    )
    q_hmm, elbo_hmm, _, _ = _chain(p, jnp.asarray(np.concatenate([phi, psi], -1)), data, emission)
    np.testing.assert_allclose(elbo_hmm, ll, rtol=1e-12, atol=1e-10)
    for i, (_, g, xi, _, _) in enumerate(exact):
        np.testing.assert_allclose(q_hmm.marginals[i, : LENGTHS[i]], g, atol=1e-10)
        np.testing.assert_allclose(q_hmm.pairwise[i, : LENGTHS[i] - 1], xi, atol=1e-10)


def _amortized_setup():
    emission = hmm.Categorical(3)
    true = hmm.HMMParams(
        jnp.array([0.6, 0.4]),
        jnp.array([[0.9, 0.1], [0.2, 0.8]]),
        hmm.CategoricalParams(jnp.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7]])),
    )
    x, _ = _sample(jax.random.key(0), true, 8, 20, emission=emission)
    lengths = np.array([20, 7, 13, 1, 20, 16, 4, 11])
    p0 = hmm.HMMParams(
        jnp.array([0.5, 0.5]),
        jnp.array([[0.6, 0.4], [0.3, 0.7]]),
        hmm.CategoricalParams(jnp.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])),
    )
    return emission, hmm.make_batch(np.asarray(x), lengths, emission=emission), p0


_run_cell = jax.jit(grid.run_cell, static_argnames=("cell", "model", "num_iters"))


def test_amortized_cell_of_the_grid_and_its_gaps():
    """The HMM in the grid's amortized-E x closed-M cell (the E-step of fit_chain_encoder, a
    ChainEncoder through estep.amortized) on a ragged batch: every ELBO is below the exact
    log p(x) (to 1e3 ulps of the sums) and the objective rises. inference_gaps: 0 for the
    exact posterior (1e-10, as the enumeration), >= 0 for an encoder's q and below the uniform
    chain's, and closed by a converged local E-step from the encoder's q (the chain family
    holds the posterior: no approximation gap)."""
    import optax

    emission, batch, p0 = _amortized_setup()
    mdl = hmm.model(emission)
    key = jax.random.key(1)
    amortized, state = hmm.fit_chain_encoder(
        key, p0, batch, emission=emission, hidden=(8,), num_steps=5, learning_rate=3e-2
    )
    final, trace = _run_cell(key, grid.Cell(amortized, mstep.closed(mdl)), mdl, p0, batch, None,
                             num_iters=8)  # fmt: skip
    ll_t, elbo_t = np.asarray(trace.log_likelihood), np.asarray(trace.elbo)
    tol = 1e3 * np.finfo(np.float64).eps * np.abs(ll_t).max()
    assert np.all(np.isfinite(elbo_t)) and np.all(elbo_t <= ll_t + tol)
    assert elbo_t[-1] > elbo_t[0] + 1.0  # J (no prior): measured -14.06 -> -9.27 nats
    # a decaying step (Adam at a constant 0.3 oscillated from the encoder's q, at -6e-3)
    converge = optax.adam(optax.cosine_decay_schedule(0.1, 500))
    local = {"converged": estep.local(mdl, optimizer=converge, num_steps=500)}
    theta = final.m.params
    gaps = hmm.inference_gaps(key, theta, final.e.q, batch, local, emission=emission)
    assert np.all(gaps["amortized"] >= -1e-10) and gaps["amortized"].mean() > 1e-3
    # 500 Adam steps on this small problem: log p reached to 1e-15 (measured)
    assert np.all(np.abs(gaps["converged"]) < 1e-6)
    n, t = batch.data.mask.shape
    qs = jax.jit(
        lambda variables: dict(
            exact=hmm.posterior(p0, batch.data, emission=emission),
            uniform=hmm.chain_posterior(jnp.zeros((n, t, 2 + 2 * 2))),
            encoder=amortized.q_of(variables, batch),
        )
    )(state.variables)
    ref = {name: hmm.inference_gaps(key, p0, q, batch, emission=emission)["amortized"]
           for name, q in qs.items()}  # fmt: skip
    np.testing.assert_allclose(ref["exact"], 0.0, atol=1e-10)
    assert np.all(ref["encoder"] >= -1e-10)
    assert ref["encoder"].mean() < ref["uniform"].mean() - 0.1  # 5 steps already learn


def test_match_and_permute_states_undo_label_switching():
    """A relabelled copy of the true HMM is matched back exactly: zero errors, the Viterbi
    paths of the relabelled model mapped to the true labels are the true model's paths, and
    the report's accuracy is that of those paths against the sampled states."""
    rng = np.random.default_rng(21)
    for emission in (hmm.Gaussian("tied"),):  # the emission whose covariance has no state axis
        true = _params(rng, emission)
        perm = np.array([2, 0, 1])
        fitted = hmm.permute_states(true, perm, emission=emission)
        order = hmm.match_states(fitted, true)
        np.testing.assert_array_equal(perm[order], np.arange(K))
        errors, _ = hmm.recovery_errors(fitted, true, emission=emission)
        assert set(errors) == {"initial", "transition", *type(true.emission)._fields}
        assert max(errors.values()) == 0.0
        x, z = _sample(jax.random.key(2), true, 4, T, emission=emission)
        rep = hmm.recovery_report(fitted, true, np.asarray(x), z, LENGTHS, emission=emission)
        data = hmm.as_data(np.asarray(x), LENGTHS, emission=emission)
        ref_path = np.asarray(_viterbi(true, data, emission=emission)[0])
        np.testing.assert_array_equal(rep.paths, ref_path)
        mask = np.asarray(data.mask)
        assert rep.state_accuracy == np.mean(ref_path[mask] == np.asarray(z)[mask])
        ll = np.mean(np.asarray(_log_prob(true, data, emission=emission)))
        assert rep.true_log_likelihood == ll
        _close_trees(rep.params, true, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Gaussian-mixture emissions (GMM-HMM)
# ---------------------------------------------------------------------------------------

GMM_LENGTHS = np.array([8, 6, 1, 7, 8, 5])


def _gmm_hmm_params(rng, ct, k=2, m=2, d=D):
    means = rng.normal(size=(k, m, d)) * 3.0
    if ct in ("full", "tied"):
        r = rng.normal(size=(k, m, d, d) if ct == "full" else (k, d, d)) * 0.4
        cov = r @ np.swapaxes(r, -1, -2) + np.eye(d)
    elif ct == "diag":
        cov = rng.uniform(0.5, 2.0, (k, m, d))
    else:
        cov = rng.uniform(0.5, 2.0, (k, m))
    return hmm.HMMParams(
        jnp.asarray(rng.dirichlet(np.full(k, 3.0))),
        jnp.asarray(rng.dirichlet(np.full(k, 3.0), size=k)),
        hmm.GaussianMixtureParams(
            jnp.asarray(rng.dirichlet(np.full(m, 3.0), size=k)),
            jnp.asarray(means),
            jnp.asarray(cov),
        ),
    )


def _gmm_full_covariances(ct, cov, m, d):
    """(k, M, d, d) per-component covariances from any of the four layouts."""
    cov = np.asarray(cov)
    if ct == "full":
        return cov
    if ct == "tied":
        return np.repeat(cov[:, None], m, axis=1)
    var = cov if ct == "diag" else np.repeat(cov[..., None], d, axis=-1)
    return var[..., :, None] * np.eye(d)


def _gmm_log_joint(p, ct, x_t):
    """(k, M) log c_jm + log N(x_t; mu_jm, Sigma_jm) by SciPy."""
    e = p.emission
    w, means = np.asarray(e.weights), np.asarray(e.means)
    k, m = w.shape
    cov = _gmm_full_covariances(ct, e.covariances, m, means.shape[-1])
    out = np.zeros((k, m))
    for j in range(k):
        for c in range(m):
            out[j, c] = np.log(w[j, c]) + multivariate_normal(means[j, c], cov[j, c]).logpdf(x_t)
    return out


def _gmm_hmm_em_step(p, ct, x, lengths):
    """One Baum-Welch step for a GMM-HMM in NumPy, every posterior by enumerating the k^t state
    paths (components summed out per step): (mean log p(x) at p, the new parameters)."""
    pi, a = np.asarray(p.initial), np.asarray(p.transition)
    k, m = np.asarray(p.emission.weights).shape
    d = x.shape[-1]
    n0, n1, xi_sum = np.zeros(k), np.zeros((k, m)), np.zeros((k, k))
    steps, resp = [], []
    total = 0.0
    for i, length in enumerate(lengths):
        lj = np.array([_gmm_log_joint(p, ct, x[i, t]) for t in range(length)])
        lb = np.logaddexp.reduce(lj, axis=-1)
        paths = np.array(list(itertools.product(range(k), repeat=int(length))))
        lp = (
            np.log(pi)[paths[:, 0]]
            + np.log(a)[paths[:, :-1], paths[:, 1:]].sum(1)
            + lb[np.arange(length), paths].sum(1)
        )
        ll = np.logaddexp.reduce(lp)
        total += ll
        post = np.exp(lp - ll)
        g = np.zeros((length, k))
        for z, v in zip(paths, post, strict=True):
            g[np.arange(length), z] += v
            for t in range(length - 1):
                xi_sum[z[t], z[t + 1]] += v
        n0 += g[0]
        r = g[:, :, None] * np.exp(lj - lb[:, :, None])  # gamma_t(j) r_t(j, m)
        steps.append(x[i, :length])
        resp.append(r)
    xs, rs = np.concatenate(steps), np.concatenate(resp)
    n1 = rs.sum(0)
    means = np.einsum("tjm,td->jmd", rs, xs) / n1[:, :, None]
    centred = xs[:, None, None, :] - means[None]
    if ct == "full":
        cov = np.einsum("tjm,tjmd,tjme->jmde", rs, centred, centred) / n1[:, :, None, None]
    elif ct == "tied":  # the scatters of a state's components about their new means, pooled
        cov = np.einsum("tjm,tjmd,tjme->jde", rs, centred, centred) / n1.sum(1)[:, None, None]
    else:
        cov = np.einsum("tjm,tjmd->jmd", rs, centred**2) / n1[:, :, None]
    new = hmm.HMMParams(
        n0 / n0.sum(),
        xi_sum / xi_sum.sum(1, keepdims=True),
        hmm.GaussianMixtureParams(n1 / n1.sum(1, keepdims=True), means, cov),
    )
    assert d == means.shape[-1]
    return total / len(lengths), new


@pytest.mark.parametrize("ct", ["full", "tied", "diag"])
def test_gmm_emissions_against_enumeration(ct):
    """Three EM iterations of a GMM-HMM (2 states x 2 components) from the same start equal a
    NumPy Baum-Welch whose posteriors enumerate every state path, on a ragged batch: the
    log-likelihood history and the parameters to 1e-8 (float64 sums of the same terms in
    another order agree to ~1e-14; EM over three steps does not amplify that by 1e6), after
    every iteration. For ``tied`` the oracle pools the scatters of a state's two components
    about their new means (the component densities then use the state's covariance). Each
    iteration is one ``fit`` with ``max_iter=1``: the program the hmmlearn test below
    compiles for the same shapes, so the two tests compile one fit per covariance type."""
    rng = np.random.default_rng(30)
    emission = hmm.GaussianMixture(ct, num_mix=2)
    true = _gmm_hmm_params(rng, ct)
    x, _ = _sample(jax.random.key(3), true, len(GMM_LENGTHS), 8, emission=emission)
    x = np.asarray(x)
    # a start near the truth: 35 points keep all four components proper for three steps
    p0 = _gmm_hmm_params(rng, ct)
    p0 = p0._replace(emission=p0.emission._replace(means=true.emission.means + 0.3))
    p, ours = p0, p0
    for _ in range(3):
        res = hmm.fit(
            jax.random.key(0), x, 2, emission=emission, lengths=GMM_LENGTHS, init=ours,
            max_iter=1, tol=0.0, reg_covar=0.0,
        )  # fmt: skip
        ours = res.params
        ll, p = _gmm_hmm_em_step(p, ct, x, GMM_LENGTHS)
        np.testing.assert_allclose(res.history, [ll], rtol=1e-8)
        _close_trees(ours, p, rtol=1e-8, atol=1e-10)
    data = hmm.as_data(x, GMM_LENGTHS, emission=emission)
    np.testing.assert_allclose(
        float(res.log_likelihood),
        np.mean(_log_prob(jax.tree_util.tree_map(jnp.asarray, p), data, emission=emission)),
        rtol=1e-12,
    )


GMM_HL_ITERS = 5
_gmm_posterior = jax.jit(hmm.posterior, static_argnames=("emission", "parallel"))


def _hmmlearn_covariance_shift(ct, weights, means, old_means):
    """What hmmlearn's GMMHMM covariance update adds to EM's: it centres the scatter on the
    *previous* means (hmmlearn PR #516), sum_t r (x_t - mu_old)(x_t - mu_old)^T = S + N d d^T
    with d = mu_new - mu_old, over the denominator of its ``_do_mstep``: N_jm (full: d d^T;
    diag: d^2), d N_jm (spherical: |d|^2 / d) or N_j = sum_m N_jm (tied: the sum over m of
    N_jm d d^T / N_j, i.e. weighted by the new mixture weights c_jm = N_jm / N_j)."""
    dm = np.asarray(means) - np.asarray(old_means)  # (k, M, d)
    outer = dm[..., :, None] * dm[..., None, :]
    return {
        "full": lambda: outer,
        "tied": lambda: np.einsum("jm,jmde->jde", np.asarray(weights), outer),
        "diag": lambda: dm**2,
        "spherical": lambda: np.mean(dm**2, axis=-1),
    }[ct]()


@pytest.mark.parametrize("ct", gmm.COVARIANCE_TYPES)
def test_gmm_emissions_against_hmmlearn(ct):
    """hmmlearn's GMMHMM (0.3.3, maximum likelihood: its default priors, and for spherical
    covars_prior = -(d + 2) / 2, which its default -(n_mix + 2) / 2 equals only when
    n_mix = d) on a ragged batch, for 5 EM iterations: at each one hmmlearn is set to emvi's
    current parameters and does one iteration (n_iter=1, init_params=""). At every iteration
    the log-likelihood agrees to 1e-10 relative, the state posteriors to 1e-10, and the new
    start probabilities, transitions, mixture weights and means to 1e-8. Its covariance
    update centres on the *previous* means (see :func:`_hmmlearn_covariance_shift`), so its
    covariances are ours plus that shift, checked to 1e-8; EM's exact update is checked by
    enumeration above, on the same shapes (35 points)."""
    from hmmlearn import hmm as hl

    rng = np.random.default_rng(31)
    emission = hmm.GaussianMixture(ct, num_mix=2)
    lengths = GMM_LENGTHS  # the enumeration test's shapes: one compiled fit for both
    p = _gmm_hmm_params(rng, ct)
    x, _ = _sample(jax.random.key(5), p, len(lengths), 8, emission=emission)
    x = np.asarray(x)
    flat = np.concatenate([x[i, :length] for i, length in enumerate(lengths)])
    data = hmm.as_data(x, lengths, emission=emission)
    d = x.shape[-1]
    priors = dict(covars_prior=-(d + 2.0) / 2.0) if ct == "spherical" else {}
    for _ in range(GMM_HL_ITERS):
        res = hmm.fit(
            jax.random.key(0), x, 2, emission=emission, lengths=lengths, init=p, max_iter=1,
            tol=0.0, reg_covar=0.0,
        )  # fmt: skip
        ref = hl.GMMHMM(
            2, n_mix=2, covariance_type=ct, n_iter=1, tol=-np.inf, init_params="", **priors
        )
        e = p.emission
        ref.startprob_, ref.transmat_ = np.asarray(p.initial), np.asarray(p.transition)
        ref.weights_, ref.means_ = np.asarray(e.weights), np.asarray(e.means)
        ref.covars_ = np.asarray(e.covariances)
        gamma = np.asarray(_gmm_posterior(p, data, emission=emission).marginals)
        np.testing.assert_allclose(ref.predict_proba(flat, lengths), gamma[data.mask], atol=1e-10)
        ref.fit(flat, lengths)
        np.testing.assert_allclose(
            res.history[0] * len(lengths), ref.monitor_.history[0], rtol=1e-10
        )
        new = res.params
        np.testing.assert_allclose(new.initial, ref.startprob_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(new.transition, ref.transmat_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(new.emission.weights, ref.weights_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(new.emission.means, ref.means_, rtol=1e-8, atol=1e-12)
        extra = _hmmlearn_covariance_shift(ct, new.emission.weights, new.emission.means, e.means)
        np.testing.assert_allclose(new.emission.covariances + extra, ref.covars_, rtol=1e-8)
        p = new


def test_gmm_emissions_bad_input_and_one_component():
    """One component per state is the Gaussian HMM; bad settings and parameters raise."""
    rng = np.random.default_rng(32)
    p = _params(rng, hmm.Gaussian("diag"))
    x = _data(rng, hmm.Gaussian("diag"))
    g = hmm.GaussianMixtureParams(
        jnp.ones((K, 1)), p.emission.means[:, None], p.emission.covariances[:, None]
    )
    pg = p._replace(emission=g)
    one = hmm.GaussianMixture("diag", num_mix=1)
    data = hmm.as_data(x, LENGTHS, emission=one)
    np.testing.assert_allclose(
        _log_prob(pg, data, emission=one),
        _log_prob(p, data, emission=hmm.Gaussian("diag")),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="covariance_type"):
        hmm.GaussianMixture("banana")
    with pytest.raises(ValueError, match="num_mix"):
        hmm.GaussianMixture("diag", num_mix=0)
    bad = pg._replace(emission=g._replace(weights=jnp.full((K, 1), 0.5)))
    with pytest.raises(ValueError, match="sum to one"):
        hmm.fit(jax.random.key(0), x, K, emission=one, lengths=LENGTHS, init=bad)
    wrong_d = pg._replace(emission=g._replace(means=jnp.zeros((K, 1, D + 1))))
    with pytest.raises(ValueError, match="dimension"):
        hmm.fit(jax.random.key(0), x, K, emission=one, lengths=LENGTHS, init=wrong_d)
    with pytest.raises(ValueError, match="component responsibilities"):
        hmm.expected_stats(_gmm_posterior(pg, data, emission=one), data, jnp.ones(4), emission=one)
    # tied: one symmetric positive definite (d, d) covariance per state, shape (k, d, d)
    tied = hmm.GaussianMixture("tied", num_mix=2)
    pt = _gmm_hmm_params(rng, "tied", k=K)
    cov = np.asarray(pt.emission.covariances)
    indefinite = cov.copy()
    indefinite[1] = [[1.0, 2.0], [2.0, 1.0]]  # eigenvalues 3 and -1
    for bad_cov, match in (
        (np.broadcast_to(cov[:, None], (K, 2, D, D)), "shape"),  # the full layout
        (cov[0], "shape"),  # one covariance for every state (Gaussian's tied layout)
        (cov[:, :1, :1], "shape"),
        (indefinite, "positive definite"),
        (cov + np.triu(np.ones((D, D)), 1)[None], "symmetric"),
    ):
        init = pt._replace(emission=pt.emission._replace(covariances=jnp.asarray(bad_cov)))
        with pytest.raises(ValueError, match=match):
            hmm.fit(jax.random.key(0), x, K, emission=tied, lengths=LENGTHS, init=init)


_TIED_GMM = hmm.GaussianMixture("tied", num_mix=2)


@jax.jit
def _tied_map_objective_history(p, data, w, hyper):
    """Six MAP-EM steps: sum_n w_n log p(x_n) + log p(theta) at the start of each."""

    def body(p, _):
        stats, ll = hmm.e_step(p, data, w, emission=_TIED_GMM)
        objective = ll + hmm.log_prior(p, hyper, emission=_TIED_GMM)
        return hmm.m_step(stats, hyper, emission=_TIED_GMM), objective

    return jax.lax.scan(body, p, None, length=6)[1]


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1))
def test_gmm_tied_em_never_lowers_its_objective(seed):
    """EM for a tied GMM-HMM never lowers the weighted log-likelihood (maximum likelihood,
    reg_covar=1e-3 as for the Gaussian HMM above), and MAP-EM (a per-state inverse-Wishart
    prior, reg_covar=0, where the M-step is the exact maximiser) never lowers the log
    posterior, from random starts on ragged random data."""
    rng = np.random.default_rng(seed)
    p = _gmm_hmm_params(rng, "tied")
    x = rng.normal(size=(GMM_LENGTHS.size, 8, D)) * 2.0
    data = hmm.as_data(x, GMM_LENGTHS, emission=_TIED_GMM)
    w = jnp.asarray(rng.uniform(0.5, 2.0, GMM_LENGTHS.size))
    prior = gmm.GMMPrior(jnp.ones(()), jnp.zeros(D), jnp.array(0.3), jnp.eye(D), jnp.array(3.0))
    for em_hyper in (gmm.GMMHyper(jnp.asarray(1e-3)), gmm.GMMHyper(jnp.zeros(()), prior)):
        hist = np.asarray(_tied_map_objective_history(p, data, w, hmm.HMMHyper(1.0, 1.0, em_hyper)))
        assert np.all(np.isfinite(hist))
        assert np.all(np.diff(hist) >= -1e-10 * np.abs(hist[1:]))


@jax.jit
def _tied_stationarity(e, x, w, q, hyper):
    emission = _TIED_GMM
    obs = emission.prepare(x)
    r = emission.responsibilities(e, obs, q)  # (n, k M), fixed below
    theta = emission.m_step(emission.expected_stats(r, obs, w), hyper)
    u = emission.to_unconstrained(theta)

    def objective(uu):
        th = emission.from_unconstrained(uu)
        cov = jnp.broadcast_to(th.covariances[:, None], (*th.means.shape, x.shape[1]))
        log_n = jax.scipy.stats.multivariate_normal.logpdf(
            x[:, None, None, :], th.means[None], cov[None]
        )  # (n, k, M), each component with its state's covariance
        log_joint = (jnp.log(th.weights)[None] + log_n).reshape(x.shape[0], -1)
        return jnp.sum(w[:, None] * r * log_joint) + emission.log_prior(th, hyper)

    return theta, emission.from_unconstrained(u), jax.grad(objective)(u)


def test_gmm_tied_map_m_step_is_stationary_point():
    """For fixed responsibilities r (state marginals times within-state component
    responsibilities), the tied MAP M-step zeroes the gradient, in unconstrained coordinates,
    of sum_i w_i sum_jm r_ijm log(c_jm N(x_i; mu_jm, Sigma_j)) + log p(theta) (densities by
    jax.scipy.stats; prior: Sigma_j ~ IW(Psi_0, nu_0) per state, mu_jm | Sigma_j ~
    N(m_0, Sigma_j / kappa_0)), so the M + d + 1 of its denominator is right; the bijection
    round-trips; a (k,) weight concentration (for k states, not k M components) is accepted
    and unused."""
    rng = np.random.default_rng(35)
    n = 40
    p = _gmm_hmm_params(rng, "tied", k=K)
    x = jnp.asarray(rng.normal(size=(n, D)) * 2.0)
    w = jnp.asarray(rng.uniform(0.5, 2.0, n))
    q = jnp.asarray(rng.dirichlet(np.ones(K), size=n))
    psi = jnp.array([[0.8, 0.2], [0.2, 0.5]])
    prior = gmm.GMMPrior(
        jnp.array([2.0, 3.0, 1.5]), jnp.asarray(rng.normal(size=D)), jnp.array(0.5), psi,
        jnp.array(4.0),
    )  # fmt: skip
    theta, back, grads = _tied_stationarity(p.emission, x, w, q, gmm.GMMHyper(jnp.zeros(()), prior))
    _close_trees(theta, back, rtol=1e-10, atol=1e-12)
    for gleaf in jax.tree_util.tree_leaves(grads):
        np.testing.assert_allclose(gleaf, 0.0, atol=1e-7)


def test_gmm_tied_relabelling_and_one_component():
    """permute_states relabels a tied GMM-HMM's weights, means and per-state covariances with
    its states (log p(x) unchanged, to rounding); with one component per state the tied
    GMM-HMM is the full-covariance Gaussian HMM."""
    rng = np.random.default_rng(36)
    tied = hmm.GaussianMixture("tied", num_mix=2)
    p = _gmm_hmm_params(rng, "tied", k=K)
    x = _data(rng, tied)
    data = hmm.as_data(x, LENGTHS, emission=tied)
    perm = np.array([2, 0, 1])
    relabelled = hmm.permute_states(p, perm, emission=tied)
    for a, b in zip(relabelled.emission, p.emission, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b)[perm])
    np.testing.assert_allclose(
        hmm.log_prob(relabelled, data, emission=tied),
        hmm.log_prob(p, data, emission=tied),
        rtol=1e-12,
    )
    one = hmm.GaussianMixture("tied", num_mix=1)
    e = p.emission
    p1 = p._replace(
        emission=hmm.GaussianMixtureParams(jnp.ones((K, 1)), e.means[:, :1], e.covariances)
    )
    pf = p._replace(emission=hmm.GaussianParams(e.means[:, 0], e.covariances))
    np.testing.assert_allclose(
        hmm.log_prob(p1, data, emission=one),
        hmm.log_prob(
            pf,
            hmm.as_data(x, LENGTHS, emission=hmm.Gaussian("full")),
            emission=hmm.Gaussian("full"),
        ),
        rtol=1e-12,
    )
