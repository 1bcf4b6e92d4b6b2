"""Gaussian-mixture EM against scikit-learn and SciPy, input validation, degenerate data.

Tolerances (float64):

* scikit-learn parity, 1e-8 relative: both sides run the same recursion from the same
  parameters; they differ only by rounding (expanded vs whitened quadratic forms, packed
  vs centred scatter), about 1e-13 relative per iteration on these data, amplified by a
  few iterations of EM's contraction.
* densities vs SciPy, 1e-10 relative: one Cholesky solve each, different orderings.
* Monte Carlo moments: 5 standard errors (two-sided, false alarm < 1e-6 per check).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn import datasets
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from emvi import gmm
from emvi.testing import JIT_VARIANTS, assert_same_runs, assert_trees_close
from emvi.testing import variant as variant_fn

TYPES = ("full", "tied", "diag", "spherical")
PARITY_ITERS = 6
MAX_ITER = 30  # one value everywhere, so the compiled EM programs are shared
CENTRES = np.array([[0.0, 0, 0], [6, 0, 0], [0, 6, 1]])


def _dataset(name):
    """The first 150 rows and 4 columns of each set: one shape, so one compiled program per
    covariance type serves all four sets."""
    if name == "iris":
        x = datasets.load_iris().data
    elif name == "wine":
        x = datasets.load_wine().data  # raw units
    elif name == "breast_cancer":
        # radius, texture, perimeter, area: radius and perimeter correlate at 0.998, so the
        # full covariances are ill-conditioned (a stress test for the packed forms).
        x = datasets.load_breast_cancer().data
        x = (x - x.mean(0)) / x.std(0)
    else:  # digits: column 0 is all zeros
        x = datasets.load_digits().data
    x = np.asarray(x[:150, :4], np.float64)
    assert name != "digits" or np.ptp(x[:, 0]) == 0
    return x


def _precisions(cov, covariance_type):
    if covariance_type in ("full", "tied"):
        return np.linalg.inv(cov)
    return 1.0 / cov


def _sklearn_start(x, k, covariance_type, reg):
    """Reasonable starting parameters: one scikit-learn iteration from its k-means init."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(
            k, covariance_type=covariance_type, max_iter=1, random_state=0, reg_covar=reg
        ).fit(x)
    return gm.weights_, gm.means_, gm.covariances_


def _assert_close(actual, expected, rtol):
    """Entrywise relative error, with entries near zero judged against the array's scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits"])
def test_matches_sklearn_from_the_same_start(name):
    x = _dataset(name)
    k = 3
    reg = 1e-6
    for ct in TYPES:
        w0, m0, c0 = _sklearn_start(x, k, ct, reg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref = GaussianMixture(
                k,
                covariance_type=ct,
                weights_init=w0,
                means_init=m0,
                precisions_init=_precisions(c0, ct),
                max_iter=PARITY_ITERS,
                tol=0.0,
                reg_covar=reg,
            ).fit(x)
        p0 = gmm.GMMParams(jnp.asarray(w0), jnp.asarray(m0), jnp.asarray(c0))
        res = gmm.fit_from_params(
            p0, jnp.asarray(x), covariance_type=ct, max_iter=PARITY_ITERS, tol=0.0, reg_covar=reg
        )
        assert int(res.num_iter) == PARITY_ITERS == ref.n_iter_
        _assert_close(res.params.weights, ref.weights_, 1e-8)
        _assert_close(res.params.means, ref.means_, 1e-8)
        _assert_close(res.params.covariances, ref.covariances_, 1e-8)
        # scikit-learn's lower_bound_ is the mean log-likelihood *before* its last M-step.
        np.testing.assert_allclose(res.history[PARITY_ITERS - 1], ref.lower_bound_, rtol=1e-8)
        np.testing.assert_allclose(res.log_likelihood, ref.score(x), rtol=1e-8)


def _random_params(rng, k, d, covariance_type):
    w = rng.dirichlet(np.ones(k) * 2)
    m = rng.normal(size=(k, d)) * 2
    a = rng.normal(size=(k, d, d))
    full = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d)
    cov = {
        "full": full,
        "tied": full[0],
        "diag": rng.uniform(0.3, 2.0, (k, d)),
        "spherical": rng.uniform(0.3, 2.0, k),
    }[covariance_type]
    return gmm.GMMParams(jnp.asarray(w), jnp.asarray(m), jnp.asarray(cov))


def _dense_cov(params, j, covariance_type, d):
    c = np.asarray(params.covariances)
    return {
        "full": lambda: c[j],
        "tied": lambda: c,
        "diag": lambda: np.diag(c[j]),
        "spherical": lambda: c[j] * np.eye(d),
    }[covariance_type]()


@pytest.mark.parametrize("variant", JIT_VARIANTS)
@pytest.mark.parametrize("ct", TYPES)
def test_densities_match_scipy_and_posterior_rows_sum_to_one(rng, ct, variant):
    k, d = 3, 4
    p = _random_params(rng, k, d, ct)
    x = rng.normal(size=(50, d)) * 3
    log_joint = variant_fn(variant, gmm.log_joint, static_argnames=("covariance_type",))
    lj = np.asarray(log_joint(p, jnp.asarray(x), covariance_type=ct))
    expected = np.stack(
        [
            np.log(float(p.weights[j]))
            + multivariate_normal(np.asarray(p.means[j]), _dense_cov(p, j, ct, d)).logpdf(x)
            for j in range(k)
        ],
        axis=1,
    )
    np.testing.assert_allclose(lj, expected, rtol=1e-10)
    lp = gmm.log_prob(p, jnp.asarray(x), covariance_type=ct)
    np.testing.assert_allclose(lp, np.logaddexp.reduce(expected, axis=1), rtol=1e-10)
    post = np.asarray(gmm.posterior(p, jnp.asarray(x), covariance_type=ct))
    assert np.all(post >= 0)
    np.testing.assert_allclose(post.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(
        gmm.predict(p, jnp.asarray(x), covariance_type=ct), expected.argmax(1)
    )
    # The packed path (what EM uses) gives the same densities on centred data.
    mdl = gmm.model(ct)
    data = mdl.prepare(jnp.asarray(x))
    np.testing.assert_allclose(
        mdl.log_prob(p, data), np.logaddexp.reduce(expected, axis=1), rtol=1e-10
    )
    np.testing.assert_allclose(mdl.posterior(p, data), post, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ct", TYPES)
def test_bic_aic_match_sklearn(ct):
    x = _dataset("iris")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = GaussianMixture(3, covariance_type=ct, max_iter=3, random_state=1).fit(x)
    p = gmm.GMMParams(*(jnp.asarray(a) for a in (ref.weights_, ref.means_, ref.covariances_)))
    np.testing.assert_allclose(
        gmm.bic(p, jnp.asarray(x), covariance_type=ct), ref.bic(x), rtol=1e-10
    )
    np.testing.assert_allclose(
        gmm.aic(p, jnp.asarray(x), covariance_type=ct), ref.aic(x), rtol=1e-10
    )
    assert gmm.num_parameters(3, 4, ct) == ref._n_parameters()


@pytest.mark.parametrize("ct", TYPES)
def test_sample_moments(ct):
    rng = np.random.default_rng(3)
    k, d, n = 2, 2, 20000
    p = _random_params(rng, k, d, ct)
    x, z = gmm.sample(jax.random.key(0), p, n, covariance_type=ct)
    x, z = np.asarray(x), np.asarray(z)
    w = np.asarray(p.weights)
    for j in range(k):
        nj = np.sum(z == j)
        assert abs(nj / n - w[j]) < 5 * np.sqrt(w[j] * (1 - w[j]) / n)
        cov = _dense_cov(p, j, ct, d)
        xj = x[z == j]
        se_mean = np.sqrt(np.diag(cov) / nj)
        assert np.all(np.abs(xj.mean(0) - np.asarray(p.means[j])) < 5 * se_mean)
        # Var of a sample covariance entry: (S_ii S_jj + S_ij^2) / n for Gaussians.
        se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / nj)
        assert np.all(np.abs(np.cov(xj.T) - cov) < 5 * se_cov)


# ---------------------------------------------------------------------------------------
# fit: restarts, inits, tol, MAP
# ---------------------------------------------------------------------------------------


def _blobs(seed=0, n=30, d=3, offset=0.0):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 3, n)
    return CENTRES[z, :d] + rng.normal(size=(n, d)) + offset


def _start(x, ct="full"):
    """Three components at points 0, 7, 14 with unit covariances."""
    x = np.asarray(x)
    d = x.shape[1]
    cov = {
        "full": np.broadcast_to(np.eye(d), (3, d, d)),
        "tied": np.eye(d),
        "diag": np.ones((3, d)),
        "spherical": np.ones(3),
    }[ct]
    return gmm.GMMParams(jnp.full(3, 1 / 3), jnp.asarray(x[[0, 7, 14]]), jnp.asarray(cov))


@pytest.mark.parametrize("init", ["kmeans++", "kmeans", "random", "random_from_data"])
def test_fit_inits_restarts_and_history(init):
    x = _blobs()
    res = gmm.fit(jax.random.key(0), x, 3, init=init, num_init=3, max_iter=MAX_ITER, tol=1e-8)
    n_it = int(res.num_iter)
    h = np.asarray(res.history)
    assert np.all(np.isfinite(h[:n_it])) and np.all(np.isnan(h[n_it:]))
    assert np.all(np.diff(h[:n_it]) >= -1e-10)
    assert res.restart_log_likelihoods.shape == (3,)
    assert float(res.log_likelihood) == pytest.approx(float(res.restart_log_likelihoods.max()))
    np.testing.assert_allclose(float(jnp.sum(res.params.weights)), 1.0, atol=1e-12)
    # Three well separated blobs: the fit is at least as likely as the generating model.
    truth = gmm.GMMParams(jnp.full(3, 1 / 3), jnp.asarray(CENTRES), jnp.ones(3))
    ll_truth = jnp.mean(gmm.log_prob(truth, jnp.asarray(x), covariance_type="spherical"))
    assert float(res.log_likelihood) >= float(ll_truth)


def test_tol_zero_runs_max_iter_and_positive_tol_stops():
    x = _blobs(1)
    a = gmm.fit(jax.random.key(0), x, 3, max_iter=MAX_ITER, tol=0.0)
    assert int(a.num_iter) == MAX_ITER and not bool(a.converged)
    b = gmm.fit(jax.random.key(0), x, 3, max_iter=MAX_ITER, tol=1e-6)
    n_it = int(b.num_iter)
    assert bool(b.converged) and n_it < MAX_ITER
    assert abs(float(b.history[n_it - 1] - b.history[n_it - 2])) < 1e-6


def test_sample_weight_equals_duplicated_points():
    x = _blobs(2)
    counts = np.random.default_rng(0).integers(0, 3, 30)
    counts[0] = 1
    p0 = _start(x)
    a = gmm.fit(jax.random.key(0), x, 3, init=p0, max_iter=MAX_ITER, tol=0.0, sample_weight=counts)
    dup = np.repeat(x, counts, axis=0)
    b = gmm.fit(jax.random.key(0), dup, 3, init=p0, max_iter=MAX_ITER, tol=0.0)
    for u, v in zip(a.params, b.params, strict=True):
        _assert_close(u, v, 1e-9)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-10)


def test_model_is_cached_and_plugs_into_the_generic_driver():
    from emvi import em

    assert gmm.model("full") is gmm.model("full")
    x = jnp.asarray(_blobs(3))
    p0 = _start(x)
    hyper = gmm.GMMHyper(jnp.asarray(1e-6))
    via_em = em.fit_em(gmm.model("full"), p0, x, max_iter=MAX_ITER, tol=0.0, hyper=hyper)
    via_fit = gmm.fit_from_params(p0, x, max_iter=MAX_ITER, tol=0.0)
    for u, v in zip(via_em.params, via_fit.params, strict=True):
        _assert_close(u, v, 1e-10)


def _numpy_map_m_step(counts, sums, second, prior, reg, ct):
    """The MAP formulas of the module docstring, written out in NumPy."""
    alpha, m0, kappa, psi, nu = (np.asarray(a, np.float64) for a in prior)
    k, d = sums.shape
    nk = counts + 10 * np.finfo(np.float64).eps
    xbar = sums / nk[:, None]
    weights = nk + alpha - 1
    weights = weights / weights.sum()
    means = (sums + kappa * m0) / (nk + kappa)[:, None]
    rho = kappa * nk / (kappa + nk)
    dev = xbar - m0
    if ct in ("full", "tied"):
        scat = second - nk[:, None, None] * np.einsum("ki,kj->kij", xbar, xbar)
        shrink = rho[:, None, None] * np.einsum("ki,kj->kij", dev, dev)
        if ct == "full":
            cov = (psi + scat + shrink) / (nu + nk + d + 2)[:, None, None] + reg * np.eye(d)
        else:
            cov = (psi + scat.sum(0) + shrink.sum(0)) / (nu + nk.sum() + k + d + 1)
            cov = cov + reg * np.eye(d)
    elif ct == "diag":
        scat = np.einsum("kii->ki", second) - nk[:, None] * xbar**2
        cov = (psi + scat + rho[:, None] * dev**2) / (nu + nk + 3)[:, None] + reg
    else:
        scat = np.einsum("kii->k", second) - nk * np.sum(xbar**2, 1)
        cov = (psi + scat + rho * np.sum(dev**2, 1)) / (d * nk + d + nu + 2) + reg
    return weights, means, cov


def _prior(ct, d, k):
    psi = {"full": 0.5 * np.eye(d), "tied": 0.5 * np.eye(d), "diag": np.full(d, 0.5)}.get(ct, 0.5)
    return gmm.GMMPrior(
        jnp.asarray(np.linspace(1.0, 3.0, k)),
        jnp.asarray(np.full(d, 0.3)),
        jnp.asarray(0.7),
        jnp.asarray(psi),
        jnp.asarray(float(d + 1)),
    )


@pytest.mark.parametrize("variant", JIT_VARIANTS)
@pytest.mark.parametrize("ct", TYPES)
def test_map_m_step_matches_numpy_formulas(rng, ct, variant):
    n, d, k = 40, 3, 4
    x = rng.normal(size=(n, d))
    resp = rng.dirichlet(np.ones(k), n)
    resp[:, 3] = 0.0  # one component with no points at all
    resp /= resp.sum(1, keepdims=True)
    w = rng.uniform(0.5, 2.0, n)
    data = gmm.prepare(jnp.asarray(x), covariance_type=ct)
    expected_stats = variant_fn(variant, gmm.expected_stats, static_argnames=("covariance_type",))
    m_step = variant_fn(variant, gmm.m_step, static_argnames=("covariance_type",))
    stats = expected_stats(jnp.asarray(resp), data, jnp.asarray(w), covariance_type=ct)
    prior = _prior(ct, d, k)
    hyper = gmm.GMMHyper(jnp.asarray(1e-4), prior)
    got = m_step(stats, hyper, covariance_type=ct)
    rw = resp * w[:, None]
    second = np.einsum("nk,ni,nj->kij", rw, x, x)
    expected = _numpy_map_m_step(rw.sum(0), rw.T @ x, second, prior, 1e-4, ct)
    for u, v in zip(got, expected, strict=True):
        _assert_close(u, v, 1e-12)
    # The empty component sits at the prior: mean m0, covariance Psi0 / (nu0 + d + 2) + reg.
    np.testing.assert_allclose(got.means[3], prior.mean_prior, rtol=1e-12)
    if ct == "full":
        # (off the diagonal only the 10 eps guard on N_k contributes, ~1e-17)
        np.testing.assert_allclose(
            got.covariances[3],
            0.5 * np.eye(d) / (d + 1 + d + 2) + 1e-4 * np.eye(d),
            rtol=1e-12,
            atol=1e-15,
        )


def test_map_em_stays_proper_where_ml_degenerates():
    # Five copies of one point plus spread points: with reg_covar=0, ML collapses a
    # component onto the copies (its variance falls to the rounding floor and the
    # likelihood blows up); MAP keeps it at the prior's scale.
    rng = np.random.default_rng(4)
    x = np.concatenate([np.full((5, 2), 1.0), rng.normal(size=(15, 2)) * 3])
    p0 = gmm.GMMParams(
        jnp.full(3, 1 / 3), jnp.asarray([[1.0, 1.0], [-3.0, 0.0], [3.0, 0.0]]), jnp.ones(3)
    )
    kw = {"covariance_type": "spherical", "init": p0, "reg_covar": 0.0, "max_iter": MAX_ITER}
    ml = gmm.fit(jax.random.key(0), x, 3, tol=0.0, **kw)
    prior = gmm.GMMPrior(
        jnp.asarray(2.0), jnp.zeros(2), jnp.asarray(0.01), jnp.asarray(1.0), jnp.asarray(2.0)
    )
    mp = gmm.fit(jax.random.key(0), x, 3, tol=0.0, prior=prior, **kw)
    assert np.all(np.isfinite(np.asarray(ml.params.covariances)))
    assert float(ml.params.covariances[0]) < 1e-12  # degenerate (floor only)
    # MAP: sigma^2 >= psi / (d N + d + nu + 2) with N <= 20 points.
    assert float(jnp.min(mp.params.covariances)) >= 1.0 / (2 * 20 + 2 + 2 + 2)
    assert float(mp.log_likelihood) < float(ml.log_likelihood)
    # alpha = 2 keeps every MAP weight >= 1 / (N + k) = 1 / 23.
    assert float(jnp.min(mp.params.weights)) >= 1 / 23 - 1e-12


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _ok_params(k=2, d=3):
    return gmm.GMMParams(
        jnp.full(k, 1.0 / k), jnp.zeros((k, d)), jnp.broadcast_to(jnp.eye(d), (k, d, d))
    )


X_OK = _blobs(5, n=20)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # NaN marks a missing entry (marginalised); a column with none observed is refused.
        ({"x": np.array([[0.0, np.nan, 1.0]] * 5)}, "no observed entry in column"),
        ({"x": np.array([[0.0, np.inf, 1.0]] * 5)}, "non-finite"),
        ({"x": np.zeros(5)}, "2-D"),
        ({"num_components": 0}, ">= 1"),
        ({"num_components": 21}, "larger than the number of points"),
        ({"tol": -1.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"num_init": 0}, "num_init"),
        ({"covariance_type": "banana"}, "covariance_type"),
        ({"init": "banana"}, "init"),
        ({"reg_covar": -1e-6}, "reg_covar"),
        ({"sample_weight": np.ones(19)}, "shape"),
        ({"sample_weight": -np.ones(20)}, ">= 0"),
        ({"sample_weight": np.full(20, np.nan)}, "NaN"),
        ({"sample_weight": np.zeros(20)}, "zero everywhere"),
        ({"init": _ok_params(d=2)}, "dimension 2"),
        ({"init": _ok_params(k=3)}, "3 components"),
        ({"init": _ok_params()._replace(weights=jnp.array([0.7, 0.7]))}, "sum to 1"),
        ({"init": _ok_params()._replace(weights=jnp.array([1.5, -0.5]))}, "non-negative"),
        ({"init": _ok_params()._replace(covariances=-jnp.ones((2, 3, 3)))}, "positive definite"),
        ({"init": _ok_params()._replace(covariances=jnp.ones((2, 3)))}, "shape"),
        ({"init": _ok_params()._replace(means=jnp.full((2, 3), jnp.nan))}, "NaN"),
        ({"x": np.ones((20, 3)), "reg_covar": 0.0}, "no variance"),
        (
            {"prior": gmm.GMMPrior(0.5, jnp.zeros(3), 1.0, jnp.eye(3), 3.0)},
            "weight_concentration",
        ),
        ({"prior": gmm.GMMPrior(1.0, jnp.zeros(2), 1.0, jnp.eye(3), 3.0)}, "mean_prior"),
        ({"prior": gmm.GMMPrior(1.0, jnp.zeros(3), 1.0, -jnp.eye(3), 3.0)}, "positive definite"),
        ({"prior": gmm.GMMPrior(1.0, jnp.zeros(3), 1.0, jnp.eye(3), 1.0)}, "degrees_of_freedom"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = {"x": X_OK, "num_components": 2}
    args.update(kwargs)
    x = args.pop("x")
    k = args.pop("num_components")
    with pytest.raises(ValueError, match=match):
        gmm.fit(jax.random.key(0), x, k, **args)


# ---------------------------------------------------------------------------------------
# Degenerate data: finite, normalised, positive definite
# ---------------------------------------------------------------------------------------


def _degenerate(case):
    rng = np.random.default_rng(7)
    base = _blobs(6, n=20)
    if case == "duplicates":
        return np.repeat(base[:4], 5, axis=0)
    if case == "constant_column":
        return np.concatenate([base[:, :2], np.full((20, 1), 3.0)], axis=1)
    if case == "scaled_1e8":
        return base * 1e8
    if case == "scaled_1e-8":
        return base * 1e-8
    if case == "offset_1e6":
        return base + 1e6
    if case == "float32":
        return (base + rng.normal(size=base.shape)).astype(np.float32)
    raise AssertionError(case)


def _assert_proper(res, ct, dtype=np.float64):
    p = res.params
    for leaf in p:
        assert leaf.dtype == dtype
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.isfinite(float(res.log_likelihood))
    np.testing.assert_allclose(float(jnp.sum(p.weights)), 1.0, atol=10 * np.finfo(dtype).eps)
    cov = np.asarray(p.covariances, np.float64)
    if ct in ("full", "tied"):
        np.linalg.cholesky(cov)  # raises if not positive definite
    else:
        assert np.all(cov > 0)


@pytest.mark.parametrize("ct", TYPES)
@pytest.mark.parametrize(
    "case",
    ["duplicates", "constant_column", "scaled_1e8", "scaled_1e-8", "offset_1e6", "float32"],
)
def test_degenerate_data_gives_a_proper_fit(case, ct):
    x = _degenerate(case)
    res = gmm.fit(jax.random.key(0), x, 3, covariance_type=ct, max_iter=MAX_ITER)
    _assert_proper(res, ct, x.dtype)


@pytest.mark.parametrize("ct", TYPES)
def test_as_many_components_as_points_and_an_empty_component(ct):
    x = _blobs(8, n=6)
    res = gmm.fit(jax.random.key(0), x * 1e8, 6, covariance_type=ct, max_iter=MAX_ITER)
    _assert_proper(res, ct)
    # A component far from every point loses all of them and stays proper.
    x = _blobs(9, n=20)
    far = _start(x, ct)
    far = far._replace(means=far.means.at[1].set(1e3))
    res = gmm.fit(jax.random.key(0), x, 3, covariance_type=ct, init=far, max_iter=MAX_ITER)
    _assert_proper(res, ct)
    assert float(res.params.weights[1]) < 1e-12


# ---------------------------------------------------------------------------------------
# The one protocol: every field, bijections, log prior, init_params, the driver
# ---------------------------------------------------------------------------------------


def test_model_fills_every_field_and_fit_returns_the_one_result_type():
    from emvi import em

    for ct in TYPES:
        mdl = gmm.model(ct)
        missing = [f for f in em.ExactModel._fields if getattr(mdl, f) is None]
        assert not missing, (ct, missing)
    res = gmm.fit(jax.random.key(0), _blobs(), 3, max_iter=MAX_ITER)
    assert isinstance(res, em.FitResult) and gmm.GMMFit is em.FitResult


@pytest.mark.parametrize("variant", JIT_VARIANTS)
@pytest.mark.parametrize("ct", TYPES)
def test_parameter_bijection_round_trips_and_maps_every_real_to_valid_params(rng, ct, variant):
    # Round trips cost a Cholesky factorisation and its product (backward stable: relative
    # error ~ d eps cond(Sigma), cond < 20 here) plus softplus and its inverse (a few eps):
    # 1e-12 relative leaves a margin of ~100 over float64's 2e-16 * 4 * 20.
    to_u = variant_fn(variant, gmm.to_unconstrained, static_argnames=("covariance_type",))
    from_u = variant_fn(variant, gmm.from_unconstrained, static_argnames=("covariance_type",))
    p = _random_params(rng, 3, 4, ct)
    assert_trees_close(
        from_u(to_u(p, covariance_type=ct), covariance_type=ct), p, rtol=1e-12, scaled=True
    )
    # The other way: centred logits, free means, lower-triangular raw factors.
    u = to_u(_random_params(np.random.default_rng(1), 3, 4, ct), covariance_type=ct)
    noise = jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.random.default_rng(2).normal(size=a.shape)), u
    )
    v = gmm.GMMParams(
        noise.weights - jnp.mean(noise.weights),
        noise.means,
        jnp.tril(noise.covariances) if ct in ("full", "tied") else noise.covariances,
    )
    q = from_u(v, covariance_type=ct)
    np.testing.assert_allclose(float(jnp.sum(q.weights)), 1.0, atol=1e-15)
    if ct in ("full", "tied"):
        np.linalg.cholesky(np.asarray(q.covariances))  # raises unless positive definite
    else:
        assert np.all(np.asarray(q.covariances) > 0)
    assert_trees_close(to_u(q, covariance_type=ct), v, rtol=1e-12, scaled=True)


def _scipy_log_prior(p, prior, ct):
    """The GMMPrior's density with SciPy's distributions (normalising constants included)."""
    from scipy.stats import dirichlet, invgamma, invwishart, norm

    alpha, m0, kappa, psi, nu = (np.asarray(a, np.float64) for a in prior)
    w, m, c = (np.asarray(a, np.float64) for a in p)
    kappa, nu = float(kappa), float(nu)
    k, d = m.shape
    out = dirichlet(np.broadcast_to(alpha, (k,))).logpdf(w)
    for j in range(k):
        if ct in ("full", "tied"):
            cj = c[j] if ct == "full" else c
            out += multivariate_normal(m0, cj / kappa).logpdf(m[j])
            if ct == "full":
                out += invwishart(df=nu, scale=psi).logpdf(cj)
        elif ct == "diag":
            out += np.sum(norm(m0, np.sqrt(c[j] / kappa)).logpdf(m[j]))
            out += np.sum(invgamma(nu / 2, scale=psi / 2).logpdf(c[j]))
        else:
            out += multivariate_normal(m0, c[j] / kappa * np.eye(d)).logpdf(m[j])
            out += invgamma(nu / 2, scale=psi / 2).logpdf(c[j])
    if ct == "tied":
        out += invwishart(df=nu, scale=psi).logpdf(c)
    return out


@pytest.mark.parametrize("variant", JIT_VARIANTS)
@pytest.mark.parametrize("ct", TYPES)
def test_log_prior_is_the_gmm_prior_density_up_to_a_constant(ct, variant):
    # Differences between two parameter settings cancel the constants; both sides sum ~10
    # log-density terms of size ~10 in float64, so 1e-10 relative to their spread is ample.
    k, d = 3, 4
    prior = _prior(ct, d, k)
    lp = variant_fn(variant, gmm.log_prior, static_argnames=("covariance_type",))
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), prior)
    a = _random_params(np.random.default_rng(5), k, d, ct)
    b = _random_params(np.random.default_rng(6), k, d, ct)
    got = float(lp(a, hyper, covariance_type=ct) - lp(b, hyper, covariance_type=ct))
    want = _scipy_log_prior(a, prior, ct) - _scipy_log_prior(b, prior, ct)
    assert abs(want) > 1.0  # the settings differ, so the check has teeth
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # No prior: a flat log prior (maximum likelihood).
    assert float(lp(a, gmm.GMMHyper(jnp.asarray(1e-6)), covariance_type=ct)) == 0.0


@pytest.mark.parametrize("variant", JIT_VARIANTS)
def test_q_bijection_round_trips_and_is_finite_at_zero(rng, variant):
    to_u = variant_fn(variant, gmm.q_to_unconstrained)
    from_u = variant_fn(variant, gmm.q_from_unconstrained)
    q = rng.dirichlet(np.ones(4), 10)
    q[0] = [1.0, 0.0, 0.0, 0.0]
    u = to_u(jnp.asarray(q))
    assert np.all(np.isfinite(np.asarray(u)))
    # softmax(log q) = q / sum(q): a few eps per entry; the zero entries come back as
    # tiny / 1 ~ 2e-308.
    np.testing.assert_allclose(from_u(u), q, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("variant", JIT_VARIANTS)
# log_prob, posterior, predict, bic and aic all score through log_joint (one check).
@pytest.mark.parametrize("fn", ["log_joint", "predict", "aic"])
def test_scoring_checks_the_column_count_and_nan_rows(fn, variant):
    f = variant_fn(variant, getattr(gmm, fn), static_argnames=("covariance_type",))
    p = _start(_blobs(), "diag")
    with pytest.raises(ValueError, match="shape"):  # at trace time, so also under jit
        f(p, jnp.zeros((5, 2)), covariance_type="diag")
    x = jnp.asarray(_blobs(n=6)).at[4, 1].set(jnp.nan)
    if variant == "no_jit":
        with pytest.raises(ValueError, match=r"NaN in row\(s\) 4"):
            f(p, x, covariance_type="diag")


def test_fit_restarts_are_init_params_vmapped_over_split_keys():
    # fit's restart batch must be init_params of each split key; each restart then is the
    # same EM recursion as a single fit from those parameters, differing only by the
    # rounding of batched vs unbatched matmuls (~1e-16 per iteration, not amplified by a
    # contracting EM map): 1e-10 relative.
    x = _blobs(11)
    key = jax.random.key(3)
    res = gmm.fit(key, x, 3, num_init=3, init="kmeans", max_iter=MAX_ITER, tol=1e-8)
    xj = jnp.asarray(x)
    # jitted, as inside fit (eagerly, k-means compiles each primitive on its own: slower)
    init = jax.jit(gmm.init_params, static_argnums=(2,), static_argnames=("method",))
    for i, kk in enumerate(jax.random.split(key, 3)):
        p0 = init(kk, xj, 3, method="kmeans")
        single = gmm.fit_from_params(p0, xj, max_iter=MAX_ITER, tol=1e-8)
        np.testing.assert_allclose(
            res.restart_log_likelihoods[i], single.log_likelihood, rtol=1e-10
        )
    # The best restart is what fit returns.
    assert float(res.log_likelihood) == float(jnp.max(res.restart_log_likelihoods))


def test_float32_full_covariances_are_as_accurate_as_the_cancellation_allows():
    # The packed M-step forms S/N = M/N - xbar xbar^T, whose entries carry an absolute
    # error of a few float32 eps times a_c = Sigma_cc + xbar_c^2 = Sigma_cc (1 + kappa_c),
    # kappa_c = xbar_c^2 / Sigma_cc the component's squared offset from the data mean in
    # its own units (products, sum, division and subtraction each round once: ~4 eps).
    # EM's contraction keeps the fixed point's error at that order, so float32 covariances
    # must agree with float64 ones to 10 (1 + kappa) eps32 in correlation units
    # |dSigma_cc'| / sqrt(Sigma_cc Sigma_c'c'). A floor of 4 d eps a added to every
    # diagonal (what the M-step did before) is 4d = 32 times that and fails here.
    n, d, k = 2000, 8, 4
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 10.0, (k, d))
    a = rng.normal(size=(k, d, d)) / np.sqrt(d)
    chol = np.linalg.cholesky(a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d))
    z = np.arange(n) % k
    x = centres[z] + np.einsum("nij,nj->ni", chol[z], rng.standard_normal((n, d)))
    cov0 = np.stack([np.cov(x[z == j].T) * 1.3 for j in range(k)])
    p0 = gmm.GMMParams(jnp.full(k, 1.0 / k), jnp.asarray(centres + 0.3), jnp.asarray(cov0))
    kw = {"covariance_type": "full", "max_iter": 50, "tol": 0.0}
    r64 = gmm.fit_from_params(p0, jnp.asarray(x), **kw)
    p0_32 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), p0)
    r32 = gmm.fit_from_params(p0_32, jnp.asarray(x, jnp.float32), **kw)
    assert r32.params.covariances.dtype == jnp.float32
    c64 = np.asarray(r64.params.covariances)
    c32 = np.asarray(r32.params.covariances, np.float64)
    var = np.diagonal(c64, axis1=1, axis2=2)  # (k, d)
    kappa = np.max((np.asarray(r64.params.means) - x.mean(0)) ** 2 / var)
    assert kappa > 50  # far-off components: the cancellation is real
    err = np.max(np.abs(c32 - c64) / np.sqrt(var[:, :, None] * var[:, None, :]))
    assert err <= 10 * (1 + kappa) * np.finfo(np.float32).eps, (err, kappa)


# ---------------------------------------------------------------------------------------
# Restarts folded into the component axis (gmm.batched_e_step): the same results as vmap
# ---------------------------------------------------------------------------------------


def _restart_batch(x, ct, r, seed):
    """r starts: three distinct data points as means, unit covariances, uneven weights."""
    rng = np.random.default_rng(seed)
    starts = [_start(np.asarray(x)[rng.permutation(len(x))], ct) for _ in range(r)]
    starts = [s._replace(weights=jnp.asarray([0.5, 0.3, 0.2])) for s in starts]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *starts)


@pytest.mark.parametrize("ct", TYPES)
def test_batched_e_step_equals_the_vmapped_e_step_over_blocks_of_rows(ct, monkeypatch):
    x = jnp.asarray(_blobs(20, n=300))
    w = jnp.asarray(np.random.default_rng(21).uniform(0.5, 2.0, 300))
    params = _restart_batch(x, ct, 3, seed=22)
    data = gmm.prepare(x, covariance_type=ct)
    want = jax.vmap(lambda p: gmm.e_step(p, data, w, covariance_type=ct))(params)
    got = gmm.batched_e_step(params, data, w, covariance_type=ct)  # one block of 300 rows
    assert_same_runs(got, want)
    # Blocks of 64 rows: 4 full ones and one padded with 20 zero-weight rows.
    monkeypatch.setattr(gmm, "_MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(gmm, "_BLOCK_BYTES", 64 * 3 * 3 * 8)
    blocked = gmm.batched_e_step(params, data, w, covariance_type=ct)
    assert_same_runs(blocked, want)
    assert gmm.model(ct).batched_e_step.func is gmm.batched_e_step


@pytest.mark.parametrize(
    ("ct", "chunk_size"), [(ct, 64) for ct in TYPES] + [("full", None), ("diag", None)]
)
def test_fit_with_the_batched_e_step_equals_the_vmapped_restarts(ct, chunk_size):
    """em.fit and run_em_restarts with the batched E-step against the hook removed; the
    per-type E-step is also checked alone (above), so the unchunked loop is run for two
    types only (each case compiles four programs)."""
    from emvi import em

    x = jnp.asarray(_blobs(23, n=200))
    x = x - jnp.mean(x, axis=0, keepdims=True)
    w = jnp.asarray(np.random.default_rng(24).uniform(0.5, 2.0, 200))
    params = _restart_batch(x, ct, 4, seed=25)
    mdl = gmm.model(ct)
    vmapped = mdl._replace(e_step=mdl.e_step.e_step)
    assert vmapped.batched_e_step is None
    kw = dict(max_iter=MAX_ITER, tol=1e-7, hyper=gmm.GMMHyper(jnp.asarray(1e-6)))
    kw["chunk_size"] = chunk_size
    _, runs = em.run_em_restarts(vmapped, params, mdl.prepare(x), w, **kw)
    # Restarts that stop at different iterations (the frozen-restart case).
    assert len(set(np.asarray(runs.num_iter).tolist())) >= 2
    _, runs_b = em.run_em_restarts(mdl, params, mdl.prepare(x), w, **kw)
    assert_same_runs(runs_b, runs)
    best, best_b = em.fit(vmapped, params, x, w, **kw), em.fit(mdl, params, x, w, **kw)
    assert_same_runs(best_b, best)
    chosen = int(np.argmax(best.restart_log_likelihoods))
    assert int(np.argmax(best_b.restart_log_likelihoods)) == chosen
