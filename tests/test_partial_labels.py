"""Partial labels (semi-supervised EM, emvi.missing.fixed_responsibilities) for the Gaussian
and Bernoulli mixtures, against brute-force enumeration of the unknown labels.

For hard labels the objective is the log-likelihood of the data and the known labels,
log sum over z_U of prod_i p(x_i, z_i), and the E-step statistics are expectations under
p(z_U | x, z_L): both are enumerated below over every assignment of the unlabelled points
(k^4 = 81 of them). Float64 against float64 over 81 terms: agreement to ~1e-14; the
tolerance 1e-10 leaves margin for the logsumexp and matmul reassociation.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from emvi import bernoulli_mixture as bm
from emvi import gmm, missing

K = 3
LABELS = np.array([0, -1, 2, -1, -1, 1, -1])  # 3 labelled, 4 unknown


def _gmm_setup(rng):
    x = rng.normal(size=(7, 2)) * 2.0
    a = rng.normal(size=(K, 2, 2)) * 0.6
    p = gmm.GMMParams(
        jnp.asarray(rng.dirichlet(np.full(K, 3.0))),
        jnp.asarray(rng.normal(size=(K, 2))),
        jnp.asarray(a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(2)),
    )
    lj = np.array(
        [
            [
                np.log(p.weights[j]) + multivariate_normal(p.means[j], p.covariances[j]).logpdf(xi)
                for j in range(K)
            ]
            for xi in x
        ]
    )
    return x, p, lj


def _bm_setup(rng):
    x = (rng.random((7, 5)) < 0.5).astype(np.float64)
    p = bm.BernoulliMixtureParams(
        jnp.asarray(rng.dirichlet(np.full(K, 3.0))), jnp.asarray(rng.uniform(0.1, 0.9, (K, 5)))
    )
    mu = np.asarray(p.probs)
    lj = np.log(np.asarray(p.weights))[None, :] + x @ np.log(mu).T + (1 - x) @ np.log(1 - mu).T
    return x, p, lj


def _enumerate(lj, labels, features):
    """Brute force over every completion of the unknown labels: the log joint of the data
    and the known labels, and the expected sums of one-hot(z_i) (x) features_i."""
    unknown = np.flatnonzero(labels < 0)
    logs, totals = [], []
    for zs in itertools.product(range(K), repeat=unknown.size):
        z = labels.copy()
        z[unknown] = zs
        logs.append(lj[np.arange(len(z)), z].sum())
        onehot = np.eye(K)[z]
        totals.append((onehot.sum(axis=0), onehot.T @ features))
    logs = np.array(logs)
    probs = np.exp(logs - logsumexp(logs))
    counts = sum(p * t[0] for p, t in zip(probs, totals, strict=True))
    sums = sum(p * t[1] for p, t in zip(probs, totals, strict=True))
    return logsumexp(logs), counts, sums


def _labelled_data(inner_data, labels, dtype=np.float64):
    lab = missing.check_labels(labels, len(labels), K, dtype)
    return lab._replace(data=inner_data)


@pytest.mark.parametrize("which", ["gmm", "bernoulli"])
def test_objective_and_e_step_match_enumeration_of_unknown_labels(rng, which):
    if which == "gmm":
        x, p, lj = _gmm_setup(rng)
        inner = gmm.model("full")
        features = np.concatenate([x, (x[:, :, None] * x[:, None, :]).reshape(7, 4)], axis=1)
    else:
        x, p, lj = _bm_setup(rng)
        inner = bm.model()
        features = x
    semi = missing.fixed_responsibilities(inner)
    data = _labelled_data(inner.prepare_data(jnp.asarray(x)), LABELS)
    stats, ll_sum = semi.e_step(p, data, jnp.ones(7))
    want_ll, want_counts, want_sums = _enumerate(lj, LABELS, features)
    np.testing.assert_allclose(ll_sum, want_ll, rtol=1e-10)
    np.testing.assert_allclose(jnp.sum(semi.log_prob(p, data)), want_ll, rtol=1e-10)
    np.testing.assert_allclose(stats.counts, want_counts, rtol=1e-10)
    if which == "gmm":
        d = x.shape[1]
        np.testing.assert_allclose(stats.sums, want_sums[:, :d], rtol=1e-10, atol=1e-12)
        second = np.asarray(gmm._unpack(stats.second, d)).reshape(K, d * d)
        np.testing.assert_allclose(second, want_sums[:, d:], rtol=1e-10, atol=1e-12)
    else:
        np.testing.assert_allclose(stats.sum_x, want_sums, rtol=1e-10, atol=1e-12)
    # Labelled rows keep their one-hot responsibilities exactly; the others are posteriors.
    q = np.asarray(semi.posterior(p, data))
    known = LABELS >= 0
    assert np.array_equal(q[known], np.eye(K)[LABELS[known]])
    post = np.exp(lj - logsumexp(lj, axis=1, keepdims=True))
    np.testing.assert_allclose(q[~known], post[~known], rtol=1e-10)


def test_soft_labels_objective_is_the_elbo_of_the_fixed_distribution(rng):
    x, p, lj = _gmm_setup(rng)
    soft = np.full((7, K), np.nan)
    soft[1] = [0.2, 0.8, 0.0]
    soft[4] = [0.5, 0.25, 0.25]
    semi = missing.fixed_responsibilities(gmm.model("full"))
    data = _labelled_data(gmm.prepare(jnp.asarray(x), covariance_type="full"), soft)
    got = np.asarray(semi.log_prob(p, data))
    want = logsumexp(lj, axis=1)
    for i in (1, 4):
        q = soft[i]
        pos = q > 0
        want[i] = np.sum(q[pos] * (lj[i, pos] - np.log(q[pos])))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_fully_labelled_gmm_fit_is_the_supervised_estimate(rng):
    y = np.repeat(np.arange(K), 10)
    x = rng.normal(size=(30, 2)) + 3.0 * y[:, None]
    res = gmm.fit(jax.random.key(0), x, K, covariance_type="full", labels=y, reg_covar=1e-3)
    for j in range(K):
        xj = x[y == j]
        np.testing.assert_allclose(res.params.means[j], xj.mean(axis=0), rtol=1e-9)
        cov = np.cov(xj.T, bias=True) + 1e-3 * np.eye(2)
        np.testing.assert_allclose(res.params.covariances[j], cov, rtol=1e-9)
    np.testing.assert_allclose(res.params.weights, np.full(K, 1 / K), rtol=1e-9)
    # Nothing left to infer: the label-aware start already is the estimate, so iteration 1
    # recomputes it and iteration 2 records no change in J and stops.
    assert int(res.num_iter) == 2


@pytest.mark.parametrize("which", ["gmm", "bernoulli"])
def test_semi_supervised_fit_is_monotone_and_all_unknown_is_the_plain_fit(rng, which):
    y = np.repeat(np.arange(K), 20)
    if which == "gmm":
        x = rng.normal(size=(60, 3)) + 2.5 * y[:, None]

        def fit(**kw):
            return gmm.fit(jax.random.key(1), x, K, covariance_type="diag", max_iter=30, **kw)
    else:
        x = (rng.random((60, 8)) < np.where(y[:, None] == np.arange(8) % K, 0.8, 0.2)).astype(float)

        def fit(**kw):
            return bm.fit(jax.random.key(1), x, K, max_iter=30, prior=None, **kw)

    labels = np.where(rng.random(60) < 0.2, y, -1)
    res = fit(labels=labels, tol=0.0)
    h = np.asarray(res.history)
    # The objective J never decreases (float64 rounding of O(10) per point: 1e-12 of scale).
    assert np.all(np.diff(h) >= -1e-12 * abs(h[-1])), np.diff(h).min()
    assert h[-1] > h[0]
    if which == "gmm":
        # Component j is class j (the label-aware start): the clusters are 2.5 sd apart in
        # each of 3 coordinates, so nearly every training point lands in its class.
        pred = gmm.predict(res.params, jnp.asarray(x), covariance_type="diag")
        assert np.mean(np.asarray(pred) == y) > 0.9
    none_known = fit(labels=np.full(60, -1))
    plain = fit()
    for u, v in zip(
        jax.tree_util.tree_leaves(none_known), jax.tree_util.tree_leaves(plain), strict=True
    ):
        assert np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True)


def test_label_errors(rng):
    x = rng.normal(size=(6, 2))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="component indices in"):
        gmm.fit(key, x, 2, labels=np.array([0, 1, 2, -1, -1, -1]))
    with pytest.raises(ValueError, match="shape"):
        gmm.fit(key, x, 2, labels=np.array([0, 1, -1]))
    bad = np.full((6, 2), np.nan)
    bad[0] = [0.7, 0.7]
    with pytest.raises(ValueError, match="neither a distribution"):
        bm.fit(key, (x > 0).astype(float), 2, labels=bad)
    with pytest.raises(ValueError, match="must be integers"):
        gmm.fit(key, x, 2, labels=np.array(["a"] * 6))
    xn = x.copy()
    xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="cannot be combined with missing"):
        gmm.fit(key, xn, 2, labels=np.array([0, 1, -1, -1, -1, -1]))
