"""Missing values in exact EM (emvi.missing, and the masked paths of gmm, bernoulli_mixture and
linear_gaussian), each checked against an independent float64 oracle: SciPy's marginal
Gaussian of the observed coordinates, generic Gaussian conditioning, or brute-force
enumeration of the missing binary pixels.

Tolerances: the oracles and the code under test are both float64 computations of a few
hundred flops per entry on O(1) data, so they agree to ~1e-13 (measured); 1e-9 leaves four
orders of margin for the rounding of Cholesky/solve on matrices of condition number < 1e3,
and anything wrong in the maths is off by far more than that.
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
from emvi import linear_gaussian as lg

CTS = ("full", "tied", "diag", "spherical")


def _compiled(fn, params, *args, **kwargs):
    """``fn(params, *args, **kwargs)`` as one compiled program. Called eagerly, the scoring
    functions (host-side validation of ``x``, then jnp) compile each primitive as its own
    small XLA program, about five times the cost of compiling the whole (measured); here the
    data are constants of the program, validated on the host while it is traced."""
    return jax.jit(lambda p: fn(p, *args, **kwargs))(params)


_gmm_e_step = jax.jit(gmm.e_step, static_argnames=("covariance_type",))
_gmm_masked_e_step = jax.jit(gmm.masked_e_step, static_argnames=("covariance_type",))


def _mask(rng, n, d, frac):
    """Entries missing at random with probability ``frac``; every row keeps one entry."""
    mask = rng.random((n, d)) > frac
    mask[np.arange(n), rng.integers(0, d, n)] = True
    return mask


def _gmm_params(rng, k, d, ct):
    weights = rng.dirichlet(np.full(k, 3.0))
    means = rng.normal(size=(k, d)) * 2.0
    a = rng.normal(size=(k, d, d)) * 0.5
    full = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d)
    cov = {
        "full": full,
        "tied": full[0],
        "diag": np.exp(rng.normal(size=(k, d)) * 0.4),
        "spherical": np.exp(rng.normal(size=k) * 0.4),
    }[ct]
    return gmm.GMMParams(*(jnp.asarray(v) for v in (weights, means, cov)))


def _full_covs(params, ct):
    cov = np.asarray(params.covariances)
    k, d = params.means.shape
    if ct == "full":
        return cov
    if ct == "tied":
        return np.broadcast_to(cov, (k, d, d))
    if ct == "diag":
        return np.stack([np.diag(c) for c in cov])
    return np.stack([c * np.eye(d) for c in cov])


def _oracle_gmm_conditionals(params, ct, x, mask):
    """Per row and component, with SciPy / np.linalg.solve: log pi_j + log N(x_O | mu_O,
    S_OO), E[x | x_O, j] and Cov[x | x_O, j] (zero outside the missing block)."""
    covs = _full_covs(params, ct)
    means, weights = np.asarray(params.means), np.asarray(params.weights)
    n, d = x.shape
    k = len(weights)
    lj, xh, cc = np.zeros((n, k)), np.zeros((n, k, d)), np.zeros((n, k, d, d))
    for i in range(n):
        o, m = mask[i], ~mask[i]
        for j in range(k):
            s, mu = covs[j], means[j]
            lj[i, j] = np.log(weights[j]) + multivariate_normal(mu[o], s[np.ix_(o, o)]).logpdf(
                x[i, o]
            )
            xh[i, j, o] = x[i, o]
            xh[i, j, m] = mu[m] + s[np.ix_(m, o)] @ np.linalg.solve(
                s[np.ix_(o, o)], x[i, o] - mu[o]
            )
            cc[i, j][np.ix_(m, m)] = s[np.ix_(m, m)] - s[np.ix_(m, o)] @ np.linalg.solve(
                s[np.ix_(o, o)], s[np.ix_(o, m)]
            )
    return lj, xh, cc


def _gmm_data(rng, n=30, d=4, frac=0.3):
    x = rng.normal(size=(n, d)) + 1.0
    mask = _mask(rng, n, d, frac)
    return x, mask, np.where(mask, x, np.nan)


# ---------------------------------------------------------------------------------------
# Nothing missing: today's fit, bit for bit; the masked path agrees with the ordinary one
# ---------------------------------------------------------------------------------------


def _same(a, b):
    return all(
        np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True)
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_gmm_nothing_missing_is_the_ordinary_fit_bit_for_bit(rng):
    # The dispatch (nothing missing -> the ordinary path) is the same for every covariance
    # type; one type keeps the compile time down.
    ct = "full"
    x = rng.normal(size=(40, 3))
    key = jax.random.key(0)
    plain = gmm.fit(key, x, 2, covariance_type=ct, max_iter=5)
    masked = gmm.fit(key, x, 2, covariance_type=ct, max_iter=5, observed=np.ones(x.shape, bool))
    assert _same(plain, masked)


def test_bernoulli_and_linear_gaussian_nothing_missing_bit_for_bit(rng):
    xb = (rng.random((40, 6)) < 0.4).astype(np.float64)
    ones = np.ones(xb.shape, bool)
    key = jax.random.key(1)
    assert _same(bm.fit(key, xb, 3, max_iter=5), bm.fit(key, xb, 3, max_iter=5, observed=ones))
    x = rng.normal(size=(40, 6))
    a = lg.fit(key, x, 2, noise="diagonal", max_iter=5)
    b = lg.fit(key, x, 2, noise="diagonal", max_iter=5, observed=ones)
    assert _same(a, b)


@pytest.mark.parametrize("ct", CTS)
def test_gmm_masked_e_step_with_nothing_missing_equals_e_step(rng, ct):
    x = rng.normal(size=(25, 3))
    p = _gmm_params(rng, 3, 3, ct)
    w = jnp.asarray(rng.random(25) + 0.5)
    prepared = gmm.prepare(jnp.asarray(x), covariance_type=ct)
    plain = _gmm_e_step(p, prepared, w, covariance_type=ct)
    data = missing.MaskedData(jnp.asarray(x), jnp.ones(x.shape))
    masked = _gmm_masked_e_step(p, data, w, covariance_type=ct)
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(masked), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Log-likelihood of the observed entries against SciPy / brute force
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ct", CTS)
def test_gmm_observed_log_prob_matches_scipy_marginals(rng, ct):
    x, mask, xn = _gmm_data(rng)
    p = _gmm_params(rng, 3, 4, ct)
    lj, _, _ = _oracle_gmm_conditionals(p, ct, x, mask)
    expect = logsumexp(lj, axis=1)
    got = _compiled(gmm.observed_log_prob, p, xn, covariance_type=ct)
    np.testing.assert_allclose(got, expect, atol=1e-9)
    # The same entries given by a mask (values under it ignored, even where not NaN).
    got = _compiled(gmm.observed_log_prob, p, np.where(mask, x, 123.0), mask, covariance_type=ct)
    np.testing.assert_allclose(got, expect, atol=1e-9)


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_linear_gaussian_observed_log_prob_matches_scipy(rng, noise):
    n, d, l_ = 30, 5, 2
    x = rng.normal(size=(n, d)) * 1.5 + 2.0
    mask = _mask(rng, n, d, 0.4)
    psi = np.exp(rng.normal(size=d) * 0.3)
    p = lg.LinearGaussianParams(
        jnp.asarray(rng.normal(size=(d, l_))),
        jnp.asarray(rng.normal(size=d)),
        jnp.asarray(psi[0] if noise == "isotropic" else psi),
    )
    c = np.asarray(p.loadings @ p.loadings.T) + np.diag(np.broadcast_to(p.noise_variance, (d,)))
    mu = np.asarray(p.mean)
    expect = [
        multivariate_normal(mu[o], c[np.ix_(o, o)]).logpdf(x[i, o]) for i, o in enumerate(mask)
    ]
    got = _compiled(lg.observed_log_prob, p, np.where(mask, x, np.nan))
    np.testing.assert_allclose(got, expect, atol=1e-9)


def _bm_params(rng, k, d):
    return bm.BernoulliMixtureParams(
        jnp.asarray(rng.dirichlet(np.full(k, 2.0))), jnp.asarray(rng.uniform(0.1, 0.9, (k, d)))
    )


def _bm_brute_force(p, x, mask):
    """Enumerates every completion of the missing pixels and every component: log p(x_O),
    and the expected counts N_k and S_kj (the completed statistics)."""
    w, mu = np.asarray(p.weights), np.asarray(p.probs)
    k, d = mu.shape
    ll, counts, sums = [], np.zeros(k), np.zeros((k, d))
    for xi, o in zip(x, mask, strict=True):
        miss = np.flatnonzero(~o)
        comps, joints = [], []
        for bits in itertools.product([0.0, 1.0], repeat=miss.size):
            full = xi.copy()
            full[miss] = bits
            for j in range(k):
                lik = np.prod(mu[j] ** full * (1 - mu[j]) ** (1 - full))
                comps.append((j, full))
                joints.append(w[j] * lik)
        joints = np.array(joints)
        ll.append(np.log(joints.sum()))
        for (j, full), pj in zip(comps, joints / joints.sum(), strict=True):
            counts[j] += pj
            sums[j] += pj * full
    return np.array(ll), counts, sums


def test_bernoulli_observed_log_prob_matches_brute_force(rng):
    x = (rng.random((12, 5)) < 0.5).astype(np.float64)
    mask = _mask(rng, 12, 5, 0.4)
    p = _bm_params(rng, 3, 5)
    expect, _, _ = _bm_brute_force(p, x, mask)
    np.testing.assert_allclose(
        bm.observed_log_prob(p, np.where(mask, x, np.nan)), expect, atol=1e-9
    )


# ---------------------------------------------------------------------------------------
# One EM iteration against the textbook Ghahramani-Jordan step, computed independently
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ct", CTS)
def test_gmm_one_em_step_matches_numpy_oracle(rng, ct):
    x, mask, _ = _gmm_data(rng)
    p = _gmm_params(rng, 3, 4, ct)
    w = rng.random(x.shape[0]) + 0.5
    reg = 1e-3
    lj, xh, cc = _oracle_gmm_conditionals(p, ct, x, mask)
    r = np.exp(lj - logsumexp(lj, axis=1, keepdims=True)) * w[:, None]
    nk = r.sum(axis=0)
    means = np.einsum("nk,nkd->kd", r, xh) / nk[:, None]
    dev = xh - means[None]
    scatter = np.einsum("nk,nkd,nke->kde", r, dev, dev) + np.einsum("nk,nkde->kde", r, cc)
    d = x.shape[1]
    cov = {
        "full": scatter / nk[:, None, None] + reg * np.eye(d),
        "tied": scatter.sum(axis=0) / nk.sum() + reg * np.eye(d),
        "diag": np.diagonal(scatter, axis1=1, axis2=2) / nk[:, None] + reg,
        "spherical": np.trace(scatter, axis1=1, axis2=2) / (d * nk) + reg,
    }[ct]

    data = missing.MaskedData(jnp.asarray(np.where(mask, x, 0.0)), jnp.asarray(mask, jnp.float64))
    stats, ll = _gmm_masked_e_step(p, data, jnp.asarray(w), covariance_type=ct)
    new = _compiled(gmm.m_step, stats, gmm.GMMHyper(jnp.asarray(reg)), covariance_type=ct)
    np.testing.assert_allclose(ll, np.sum(w * logsumexp(lj, axis=1)), rtol=1e-10)
    np.testing.assert_allclose(new.weights, nk / nk.sum(), rtol=1e-9)
    np.testing.assert_allclose(new.means, means, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(new.covariances, cov, rtol=1e-9, atol=1e-9)


def _oracle_lg_step(p, x, mask, w, noise):
    """Conditions the joint Gaussian of y = (z, x) on x_O (generic formulas), forms the
    expected complete-data moments, and solves the complete-data M-step."""
    wl, mu = np.asarray(p.loadings), np.asarray(p.mean)
    d, l_ = wl.shape
    psi = np.broadcast_to(np.asarray(p.noise_variance), (d,))
    m_y = np.concatenate([np.zeros(l_), mu])
    s_y = np.block([[np.eye(l_), wl.T], [wl, wl @ wl.T + np.diag(psi)]])
    ezz, exz, exx = np.zeros((l_ + 1, l_ + 1)), np.zeros((d, l_ + 1)), np.zeros(d)
    for xi, o, wi in zip(x, mask, w, strict=True):
        obs = l_ + np.flatnonzero(o)
        hid = np.setdiff1d(np.arange(l_ + d), obs)
        gain = np.linalg.solve(s_y[np.ix_(obs, obs)], s_y[np.ix_(obs, hid)]).T
        mean = m_y.copy()
        mean[obs] = xi[o]
        mean[hid] = m_y[hid] + gain @ (xi[o] - m_y[obs])
        cov = np.zeros((l_ + d, l_ + d))
        cov[np.ix_(hid, hid)] = s_y[np.ix_(hid, hid)] - gain @ s_y[np.ix_(obs, hid)]
        second = cov + np.outer(mean, mean)  # E[y y^T | x_O]
        zt = np.zeros((l_ + 1, l_ + 1))
        zt[:l_, :l_], zt[:l_, l_], zt[l_, :l_], zt[l_, l_] = (
            second[:l_, :l_],
            mean[:l_],
            mean[:l_],
            1.0,
        )
        ezz += wi * zt
        exz += wi * np.concatenate([second[l_:, :l_], mean[l_:, None]], axis=1)
        exx += wi * np.diagonal(second[l_:, l_:])
    wt = exz @ np.linalg.inv(ezz)
    resid = exx - 2 * np.sum(wt * exz, axis=1) + np.einsum("ja,ab,jb->j", wt, ezz, wt)
    psi_new = resid / w.sum()
    return wt[:, :l_], wt[:, l_], psi_new.mean() if noise == "isotropic" else psi_new


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_linear_gaussian_one_em_step_matches_gaussian_conditioning(rng, noise):
    n, d, l_ = 25, 5, 2
    x = rng.normal(size=(n, d)) + 1.0
    mask = _mask(rng, n, d, 0.35)
    w = rng.random(n) + 0.5
    psi = np.exp(rng.normal(size=d) * 0.3)
    p = lg.LinearGaussianParams(
        jnp.asarray(rng.normal(size=(d, l_))),
        jnp.asarray(rng.normal(size=d)),
        jnp.asarray(psi[0] if noise == "isotropic" else psi),
    )
    values, observed = jnp.asarray(np.where(mask, x, 0.0)), jnp.asarray(mask, jnp.float64)

    def one_step(p):
        stats, _ = lg.masked_e_step(p, lg.prepare_missing(values, observed), jnp.asarray(w))
        return lg.m_step(stats, lg.make_hyper(None, 1e-12, jnp.float64), noise=noise)

    new = jax.jit(one_step)(p)
    want_w, want_mu, want_psi = _oracle_lg_step(p, x, mask, w, noise)
    np.testing.assert_allclose(new.loadings, want_w, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(new.mean, want_mu, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(new.noise_variance, want_psi, rtol=1e-9)


def test_bernoulli_one_em_step_matches_brute_force(rng):
    x = (rng.random((12, 5)) < 0.5).astype(np.float64)
    mask = _mask(rng, 12, 5, 0.4)
    p = _bm_params(rng, 3, 5)
    ll, counts, sums = _bm_brute_force(p, x, mask)
    data = missing.MaskedData(jnp.asarray(np.where(mask, x, 0.0)), jnp.asarray(mask, jnp.float64))
    stats, ll_sum = bm.masked_e_step(p, data, jnp.ones(12))
    np.testing.assert_allclose(ll_sum, ll.sum(), rtol=1e-10)
    np.testing.assert_allclose(stats.counts, counts, rtol=1e-10)
    np.testing.assert_allclose(stats.sum_x, sums, rtol=1e-10)
    new = bm.m_step(stats, None)
    np.testing.assert_allclose(new.probs, sums / counts[:, None], rtol=1e-10)


# ---------------------------------------------------------------------------------------
# EM on data with 30% missing: monotone, and chunking changes nothing
# ---------------------------------------------------------------------------------------


def _assert_monotone(history, scale):
    h = np.asarray(history)
    h = h[~np.isnan(h)]
    # Each iteration never lowers the observed-data log-likelihood; rounding of a mean of
    # O(1) float64 terms is ~1e-15 relative, so allow 1e-12 of its scale.
    assert np.all(np.diff(h) >= -1e-12 * scale), np.diff(h).min()
    assert h[-1] > h[0]


@pytest.mark.parametrize("ct", CTS)
def test_gmm_em_is_monotone_with_30_percent_missing(rng, ct):
    x = np.concatenate([rng.normal(size=(30, 4)) - 2.0, rng.normal(size=(30, 4)) + 2.0])
    xn = np.where(_mask(rng, 60, 4, 0.3), x, np.nan)
    res = gmm.fit(jax.random.key(0), xn, 3, covariance_type=ct, max_iter=15, tol=0.0)
    _assert_monotone(res.history, abs(float(res.log_likelihood)))
    assert np.isfinite(float(res.log_likelihood))
    # The reported value is the observed-data log-likelihood of the returned params.
    ll = _compiled(gmm.observed_log_prob, res.params, xn, covariance_type=ct)
    np.testing.assert_allclose(res.log_likelihood, jnp.mean(ll), rtol=1e-10)


def test_bernoulli_and_linear_gaussian_em_monotone_with_30_percent_missing(rng):
    xb = (rng.random((60, 8)) < np.linspace(0.1, 0.9, 8)).astype(np.float64)
    mask = _mask(rng, 60, 8, 0.3)
    res = bm.fit(jax.random.key(0), np.where(mask, xb, np.nan), 3, max_iter=15, tol=0.0)
    _assert_monotone(res.history, abs(float(res.log_likelihood)))
    z = rng.normal(size=(60, 2))
    x = z @ rng.normal(size=(2, 8)) + 0.3 * rng.normal(size=(60, 8))
    for noise in ("isotropic", "diagonal"):
        res = lg.fit(jax.random.key(0), np.where(mask, x, np.nan), 2, noise=noise, max_iter=15)
        _assert_monotone(res.history, abs(float(res.log_likelihood)))


def test_gmm_chunked_masked_fit_equals_one_shot(rng):
    _, _, xn = _gmm_data(rng, n=50)
    kw = dict(covariance_type="full", max_iter=6, tol=0.0)
    a = gmm.fit(jax.random.key(2), xn, 2, **kw)
    b = gmm.fit(jax.random.key(2), xn, 2, chunk_size=16, **kw)  # 4 chunks, 14 padding rows
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------
# impute against NumPy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ct", CTS)
def test_gmm_impute_matches_numpy(rng, ct):
    x, mask, xn = _gmm_data(rng)
    p = _gmm_params(rng, 3, 4, ct)
    lj, xh, _ = _oracle_gmm_conditionals(p, ct, x, mask)
    r = np.exp(lj - logsumexp(lj, axis=1, keepdims=True))
    expect = np.einsum("nk,nkd->nd", r, xh)
    got = np.asarray(_compiled(gmm.impute, p, xn, covariance_type=ct))
    np.testing.assert_allclose(got, expect, atol=1e-9)
    assert np.array_equal(got[mask], x[mask])  # observed entries untouched


def test_linear_gaussian_and_bernoulli_impute_match_numpy(rng):
    n, d, l_ = 20, 5, 2
    x = rng.normal(size=(n, d))
    mask = _mask(rng, n, d, 0.4)
    p = lg.LinearGaussianParams(
        jnp.asarray(rng.normal(size=(d, l_))), jnp.asarray(rng.normal(size=d)), jnp.asarray(0.7)
    )
    c = np.asarray(p.loadings @ p.loadings.T) + 0.7 * np.eye(d)
    mu = np.asarray(p.mean)
    expect = x.copy()
    for i, o in enumerate(mask):
        m = ~o
        expect[i, m] = mu[m] + c[np.ix_(m, o)] @ np.linalg.solve(c[np.ix_(o, o)], x[i, o] - mu[o])
    np.testing.assert_allclose(
        _compiled(lg.impute, p, np.where(mask, x, np.nan)), expect, atol=1e-9
    )

    xb = (rng.random((12, 5)) < 0.5).astype(np.float64)
    maskb = _mask(rng, 12, 5, 0.4)
    pb = _bm_params(rng, 3, 5)
    lw = np.log(np.asarray(pb.weights))
    mub = np.asarray(pb.probs)
    expect = xb.copy()
    for i, o in enumerate(maskb):
        lj = lw + (xb[i, o] * np.log(mub[:, o]) + (1 - xb[i, o]) * np.log(1 - mub[:, o])).sum(1)
        r = np.exp(lj - logsumexp(lj))
        expect[i, ~o] = r @ mub[:, ~o]
    got = _compiled(bm.impute, pb, np.where(maskb, xb, np.nan))
    np.testing.assert_allclose(got, expect, atol=1e-12)


# ---------------------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------------------


def test_gmm_float32_fit_with_missing_values(rng):
    ct = "full"  # the conditional-Gaussian path; diag/spherical have no solve at all
    x, mask, xn = _gmm_data(rng, n=40)
    res = gmm.fit(jax.random.key(0), xn.astype(np.float32), 2, covariance_type=ct, max_iter=10)
    assert res.params.means.dtype == jnp.float32 and res.log_likelihood.dtype == jnp.float32
    # The float32 observed log-likelihood of the float32 fit, against SciPy at those params:
    # float32 rounding of O(10) terms is ~1e-6 relative; allow 1e-4 absolute.
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), res.params)
    lj, _, _ = _oracle_gmm_conditionals(p64, ct, x, mask)
    got = _compiled(gmm.observed_log_prob, res.params, xn.astype(np.float32), covariance_type=ct)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, logsumexp(lj, axis=1), atol=1e-4)
    imp = _compiled(gmm.impute, res.params, xn.astype(np.float32), covariance_type=ct)
    assert imp.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(imp)))


def test_bernoulli_and_linear_gaussian_float32_with_missing_values(rng):
    xb = (rng.random((40, 6)) < 0.4).astype(np.float32)
    mask = _mask(rng, 40, 6, 0.3)
    res = bm.fit(jax.random.key(0), np.where(mask, xb, np.nan), 2, max_iter=10)
    assert res.params.probs.dtype == jnp.float32 and np.isfinite(float(res.log_likelihood))
    x = rng.normal(size=(40, 6)).astype(np.float32)
    res = lg.fit(jax.random.key(0), np.where(mask, x, np.nan), 2, noise="diagonal", max_iter=10)
    assert res.params.loadings.dtype == jnp.float32 and np.isfinite(float(res.log_likelihood))
    got = _compiled(lg.observed_log_prob, res.params, np.where(mask, x, np.nan))
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), res.params)
    want = _compiled(lg.observed_log_prob, p64, np.where(mask, x, np.nan).astype(np.float64))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-4)  # float32 rounding, as above


# ---------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------


def test_check_observed_errors(rng):
    x = rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match="every entry missing in row"):
        missing.check_observed(
            np.where([[True] * 3, [False] * 3, [True] * 3, [True] * 3], x, np.nan)
        )
    with pytest.raises(ValueError, match="observed must have the shape"):
        missing.check_observed(x, np.ones((4, 2), bool))
    with pytest.raises(ValueError, match="observed must be a boolean"):
        missing.check_observed(x, np.ones((4, 3)))
    with pytest.raises(ValueError, match="NaN where observed is True"):
        missing.check_observed(np.where(np.eye(4, 3) > 0, np.nan, x), np.ones((4, 3), bool))
    with pytest.raises(ValueError, match="no observed entry in column"):
        missing.check_observed(x, np.array([[True, True, False]] * 4))
    with pytest.raises(ValueError, match="non-finite"):
        missing.check_observed(np.where(np.eye(4, 3) > 0, np.inf, x))


def test_models_raise_clear_errors_for_bad_masks(rng):
    x = rng.random((6, 3))
    all_missing_row = np.ones((6, 3), bool)
    all_missing_row[2] = False
    wrong_shape = np.ones((6, 4), bool)
    key = jax.random.key(0)
    fits = [
        lambda o: gmm.fit(key, x, 2, covariance_type="diag", observed=o),
        lambda o: bm.fit(key, x, 2, observed=o),
        lambda o: lg.fit(key, x, 1, noise="diagonal", observed=o),
    ]
    p = _gmm_params(rng, 2, 3, "full")
    scorers = [
        lambda o: gmm.observed_log_prob(p, x, o, covariance_type="full"),
        lambda o: gmm.impute(p, x, o, covariance_type="full"),
        lambda o: bm.impute(_bm_params(rng, 2, 3), x, o),
        lambda o: lg.impute(lg.init_params(key, jnp.asarray(x), 1, noise="diagonal"), x, o),
    ]
    for call in fits + scorers:
        with pytest.raises(ValueError, match="every entry missing in row"):
            call(all_missing_row)
        with pytest.raises(ValueError, match="observed must have the shape"):
            call(wrong_shape)
    with pytest.raises(ValueError, match="to match params"):
        gmm.observed_log_prob(p, rng.random((6, 2)), covariance_type="full")
