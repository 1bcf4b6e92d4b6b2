"""The scikit-learn estimators (emvi.sklearn): same numbers as scikit-learn, its own checks.

Oracles, float64: ``sklearn.mixture.GaussianMixture`` from the same initial parameters
(weights, means and precisions given to both), the same iterations and stopping rule;
``sklearn.mixture.BayesianGaussianMixture`` from the same initial responsibilities (the
functional core is compared for every covariance and weight-prior type in
tests/test_bayesian_mixture.py; here the estimator's attributes, priors, stopping rule and
warm start); ``sklearn.decomposition.PCA`` (its probabilistic score is pPCA's maximum
likelihood) and ``FactorAnalysis`` (the same maximum by another algorithm).
"""

import pickle
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets, decomposition, mixture
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from emvi import bernoulli_mixture as bm
from emvi import gmm
from emvi.sklearn import (
    BayesianGaussianMixture,
    BernoulliMixture,
    FactorAnalysis,
    GaussianMixture,
    ProbabilisticPCA,
)


def _start(x, k, ct, rng):
    d = x.shape[1]
    means = x[rng.choice(x.shape[0], k, replace=False)]
    weights = np.full(k, 1.0 / k)
    var = x.var(axis=0)
    prec = {
        "full": np.broadcast_to(np.diag(1 / var), (k, d, d)).copy(),
        "tied": np.diag(1 / var),
        "diag": np.broadcast_to(1 / var, (k, d)).copy(),
        "spherical": np.full(k, 1 / var.mean()),
    }[ct]
    return weights, means, prec


@pytest.mark.parametrize("ct", gmm.COVARIANCE_TYPES)
def test_same_numbers_as_scikit_learn_from_the_same_start(ct, rng):
    # Both run the same float64 iterations from the same parameters; the packed forms
    # reassociate sums, so agreement is to ~1e-12, far inside the 1e-8 required.
    x = datasets.load_iris().data
    w0, m0, p0 = _start(x, 3, ct, rng)
    kw = dict(
        n_components=3,
        covariance_type=ct,
        weights_init=w0,
        means_init=m0,
        precisions_init=p0,
        max_iter=30,
        tol=1e-6,
        reg_covar=1e-6,
    )
    ours = GaussianMixture(**kw).fit(x)
    ref = mixture.GaussianMixture(**kw).fit(x)
    assert ours.n_iter_ == ref.n_iter_ and ours.converged_ == ref.converged_
    np.testing.assert_allclose(ours.lower_bound_, ref.lower_bound_, rtol=1e-8)
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        np.testing.assert_allclose(
            getattr(ours, name), getattr(ref, name), rtol=1e-7, atol=1e-9, err_msg=name
        )
    np.testing.assert_allclose(ours.score_samples(x), ref.score_samples(x), rtol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x), atol=1e-8)
    np.testing.assert_allclose(ours.bic(x), ref.bic(x), rtol=1e-8)
    np.testing.assert_allclose(ours.aic(x), ref.aic(x), rtol=1e-8)


@parametrize_with_checks(
    [
        GaussianMixture(
            n_components=2,
            covariance_type="diag",
            init_params="random_from_data",
            max_iter=5,
            random_state=0,
        ),
        BernoulliMixture(n_components=2, binarize=0.0, max_iter=5, random_state=0),
        BayesianGaussianMixture(
            n_components=2,
            covariance_type="spherical",
            init_params="random_from_data",
            max_iter=5,
            random_state=0,
        ),
        FactorAnalysis(n_components=1, max_iter=5),
        ProbabilisticPCA(n_components=1, max_iter=5),
    ]
)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_pickle_pipeline_grid_search_and_warm_start(rng):
    # Small data and a small grid: what is tested is that the estimator composes with
    # scikit-learn's machinery (clone, set_params, score), not the fits themselves.
    x = datasets.load_iris().data
    gm = GaussianMixture(n_components=2, covariance_type="diag", random_state=0).fit(x)
    again = pickle.loads(pickle.dumps(gm))
    np.testing.assert_array_equal(again.score_samples(x), gm.score_samples(x))
    # The grid varies reg_covar, which changes no array shape: one program per data shape.
    pipe = make_pipeline(
        StandardScaler(),
        GaussianMixture(n_components=2, covariance_type="diag", max_iter=10, random_state=0),
    )
    search = GridSearchCV(pipe, {"gaussianmixture__reg_covar": [1e-6, 1e-2]}, cv=2).fit(x)
    assert search.best_params_["gaussianmixture__reg_covar"] in (1e-6, 1e-2)
    assert np.isfinite(search.best_score_)
    warm = GaussianMixture(
        n_components=2,
        covariance_type="diag",
        warm_start=True,
        max_iter=2,
        tol=0.0,
        random_state=0,
    )
    warm.fit(x)
    first = warm.lower_bound_
    warm.fit(x)  # continues from the last parameters: the bound keeps rising
    assert warm.lower_bound_ >= first


def test_bernoulli_mixture_estimator_is_the_functional_fit(rng):
    import jax

    x = (rng.random((200, 9)) < 0.3).astype(np.float64)
    est = BernoulliMixture(n_components=3, random_state=5, max_iter=40).fit(x)
    res = bm.fit(
        jax.random.key(5), x, 3, prior=bm.BernoulliMixturePrior(1.0, 1.2, 1.2), max_iter=40
    )
    np.testing.assert_allclose(est.probs_, res.params.probs, rtol=1e-12)
    np.testing.assert_allclose(
        est.score(x), float(np.mean(bm.log_prob(res.params, jnp.asarray(x)))), rtol=1e-12
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BernoulliMixture(n_components=2).fit(x * 3)


def test_bad_parameters_raise_value_errors():
    x = np.random.default_rng(0).normal(size=(20, 2))
    for bad in (
        dict(n_components=0),
        dict(covariance_type="banana"),
        dict(init_params="x"),
        dict(max_iter=0),
        dict(tol=-1.0),
        dict(reg_covar=-1e-3),
    ):
        with pytest.raises(ValueError):
            GaussianMixture(**bad).fit(x)
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        GaussianMixture(n_components=30).fit(x)
    with pytest.raises(ValueError, match="means_init"):
        GaussianMixture(n_components=2, means_init=np.zeros((3, 2))).fit(x)


# ---------------------------------------------------------------------------------------
# BayesianGaussianMixture
# ---------------------------------------------------------------------------------------


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


VB_ATTRIBUTES = (
    "weights_",
    "means_",
    "covariances_",
    "precisions_",
    "precisions_cholesky_",
    "mean_precision_",
    "degrees_of_freedom_",
    "weight_concentration_prior_",
    "mean_precision_prior_",
    "mean_prior_",
    "degrees_of_freedom_prior_",
    "covariance_prior_",
)


@pytest.mark.parametrize(
    ("ct", "wpt", "priors"),
    [
        ("full", "dirichlet_process", False),
        ("tied", "dirichlet_distribution", True),
    ],
)
def test_bayesian_mixture_estimator_matches_scikit_learn(ct, wpt, priors):
    # From the same initial responsibilities (scikit-learn's own _initialize(X, resp) on its
    # side, the estimator's _initial_resp hook on ours), with tol > 0 so the stopping rule
    # decides n_iter_; then a warm start continues both. The core matches to ~1e-13
    # (tests/test_bayesian_mixture.py); 1e-8 relative leaves room for the 60 iterations.
    x = datasets.load_iris().data
    n, d = x.shape
    k = 3
    resp = np.random.default_rng(0).dirichlet(np.ones(k), size=n)
    kw = dict(
        n_components=k,
        covariance_type=ct,
        weight_concentration_prior_type=wpt,
        max_iter=30,
        tol=1e-3,
    )
    if priors:  # every prior given, none of them scikit-learn's default
        kw.update(
            weight_concentration_prior=0.5,
            mean_precision_prior=0.8,
            mean_prior=x.mean(0) + 0.3,
            degrees_of_freedom_prior=d + 1.5,
            covariance_prior=np.diag(x.var(0)) * 1.5,
        )
    ref = mixture.BayesianGaussianMixture(**kw)
    ref._initialize_parameters = lambda X, rs, xp=None: ref._initialize(X, resp)
    ours = BayesianGaussianMixture(**kw)
    ours._initial_resp = lambda key, x_, k_: jnp.asarray(resp)
    for warm in (False, True):
        ref.set_params(warm_start=warm)
        ours.set_params(warm_start=warm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning
            ref.fit(x)
        ours.fit(x)
        assert (ours.n_iter_, ours.converged_) == (ref.n_iter_, ref.converged_)
        # scikit-learn's tied bound is a (1,) array; ours is a float.
        assert _rel(ours.lower_bound_, ref.lower_bound_) < 1e-8
        assert _rel(ours.lower_bounds_, np.ravel(ref.lower_bounds_)) < 1e-8
        for name in VB_ATTRIBUTES:
            assert np.shape(getattr(ours, name)) == np.shape(getattr(ref, name)), name
            assert _rel(getattr(ours, name), getattr(ref, name)) < 1e-8, name
        wc_ours, wc_ref = ours.weight_concentration_, ref.weight_concentration_
        assert isinstance(wc_ours, tuple) == isinstance(wc_ref, tuple)
        assert _rel(np.asarray(wc_ours), np.asarray(wc_ref)) < 1e-8
        assert _rel(ours.score_samples(x), ref.score_samples(x)) < 1e-8
        np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x), atol=1e-8)
        np.testing.assert_array_equal(ours.predict(x), ref.predict(x))
    assert ref.n_iter_ >= 2  # the warm start ran iterations of its own


# ---------------------------------------------------------------------------------------
# ProbabilisticPCA and FactorAnalysis
# ---------------------------------------------------------------------------------------


def _remaining_gain(loglike):
    """What a linearly converging monotone ascent has left to gain after its last step:
    with steps shrinking by the ratio rho, the tail sum is step * rho / (1 - rho)."""
    steps = np.diff(np.asarray(loglike, np.float64))
    rho = steps[-1] / steps[-2]
    assert 0 < rho < 1, rho
    return steps[-1] * rho / (1 - rho)


def test_probabilistic_pca_attains_the_pca_likelihood():
    # PCA's score is the log-likelihood of the pPCA model at its maximum, but with the
    # covariance estimated with n - 1: C_pca = c C_ml, c = n / (n - 1). At the maximum
    # tr(C_ml^-1 S) = d, so log N(x | mu, c C) averages to the maximum minus
    # (d / 2)(log c + 1/c - 1), which is added back. EM from a random start stops below the
    # maximum by at most its remaining gain (from its own history), doubled for safety;
    # float64 rounding of the ~600-term sums is ~1e-13.
    x = datasets.load_iris().data
    n, d = x.shape
    pca = decomposition.PCA(n_components=2).fit(x)
    c = n / (n - 1)
    ml = pca.score(x) + 0.5 * d * (np.log(c) + 1 / c - 1)
    est = ProbabilisticPCA(2, init_params="random", tol=1e-8, max_iter=5000).fit(x)
    assert est.n_iter_ < 5000
    gain = 2 * _remaining_gain(est.loglike_) / n
    assert -1e-12 <= ml - est.score(x) <= gain + 1e-12
    assert gain < 1e-8  # the bound is tight enough to mean something
    # The model covariance and noise: PCA's, rescaled from n - 1 to n. Their error is of
    # order sqrt(2 * gain) (the likelihood is quadratic about its maximum, curvature O(1)).
    tol = 10 * np.sqrt(2 * gain)
    np.testing.assert_allclose(est.noise_variance_, pca.noise_variance_ / c, atol=tol)
    np.testing.assert_allclose(est.get_covariance(), pca.get_covariance() / c, atol=tol)
    # NumPy oracles: the inverse, and the posterior mean (W^T W + s2 I)^-1 W^T (x - mu).
    np.testing.assert_allclose(
        est.get_precision(), np.linalg.inv(est.get_covariance()), rtol=1e-10, atol=1e-10
    )
    w, s2 = est.components_.T, est.noise_variance_
    z = np.linalg.solve(w.T @ w + s2 * np.eye(2), w.T @ (x - est.mean_).T).T
    np.testing.assert_allclose(est.transform(x), z, rtol=1e-10, atol=1e-10)
    assert est.get_feature_names_out().tolist() == [
        "probabilisticpca0",
        "probabilisticpca1",
    ]


def test_factor_analysis_reaches_scikit_learns_maximum():
    # scikit-learn's FactorAnalysis climbs the same likelihood by another algorithm (SVD
    # iterations); both stop below the maximum by their remaining gain, so their scores
    # differ by at most the larger one; parameters by ~sqrt(2 gain) (quadratic maximum,
    # curvature O(1) per point: the features have unit-order variance). Posterior means are
    # unique up to the sign of the one factor.
    rng = np.random.default_rng(0)
    n, d = 200, 5
    w = 2.0 * rng.normal(size=(d, 1))
    psi = rng.uniform(0.5, 1.0, d)
    x = rng.normal(size=(n, 1)) @ w.T + rng.normal(size=(n, d)) * np.sqrt(psi) + 3.0
    ours = FactorAnalysis(1, tol=1e-9, max_iter=10_000).fit(x)
    ref = decomposition.FactorAnalysis(1, tol=1e-9, max_iter=10_000).fit(x)
    assert ours.n_iter_ < 10_000 and ref.n_iter_ < 10_000
    gain = max(_remaining_gain(ours.loglike_), _remaining_gain(ref.loglike_)) / n
    assert gain < 1e-8
    assert abs(ours.score(x) - ref.score(x)) <= gain + 1e-12
    tol = 10 * np.sqrt(2 * gain)
    # Each point's log-density moves to first order with the parameters: O(tol).
    np.testing.assert_allclose(ours.score_samples(x), ref.score_samples(x), atol=tol)
    np.testing.assert_allclose(ours.noise_variance_, ref.noise_variance_, atol=tol)
    np.testing.assert_allclose(ours.get_covariance(), ref.get_covariance(), atol=tol)
    np.testing.assert_allclose(ours.mean_, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.abs(ours.transform(x)), np.abs(ref.transform(x)), atol=tol)
    np.testing.assert_allclose(
        ours.get_precision(), np.linalg.inv(ours.get_covariance()), rtol=1e-10, atol=1e-10
    )


def test_new_estimators_pickle_and_compose_with_pipelines_and_grid_search():
    # What is tested is composition with scikit-learn's machinery (clone, set_params, score
    # inside a Pipeline and GridSearchCV) and pickling of the refitted pipelines, on small
    # data; the grids vary a prior and a tolerance, which do not change array shapes, so
    # the programs compile once per shape (the test's cost is compilation).
    x = datasets.load_iris().data
    bgmm = BayesianGaussianMixture(
        n_components=2, covariance_type="diag", init_params="random_from_data", max_iter=10
    )
    grid = {"bayesiangaussianmixture__weight_concentration_prior": [0.01, 1.0]}
    fa = make_pipeline(StandardScaler(), FactorAnalysis(1, max_iter=20))
    fitted = [
        GridSearchCV(make_pipeline(StandardScaler(), bgmm), grid, cv=2).fit(x),
        GridSearchCV(fa, {"factoranalysis__tol": [1e-2, 1e-4]}, cv=2).fit(x),
    ]
    assert fitted[1].best_params_["factoranalysis__tol"] in (1e-2, 1e-4)
    ppca = make_pipeline(StandardScaler(), ProbabilisticPCA(1, max_iter=20))
    assert ppca.fit_transform(x).shape == (x.shape[0], 1)
    for est in (*(s.best_estimator_ for s in fitted), ppca):
        again = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(again.score_samples(x), est.score_samples(x))
        assert np.isfinite(est.score(x))


def test_new_estimators_bad_parameters_name_the_parameter():
    x = np.random.default_rng(0).normal(size=(20, 2))
    for bad, name in (
        (dict(covariance_type="banana"), "covariance_type"),
        (dict(weight_concentration_prior_type="x"), "weight_concentration_prior_type"),
        (dict(init_params="x"), "init_params"),
        (dict(weight_concentration_prior=-1.0), "weight_concentration_prior"),
        (dict(mean_precision_prior=0.0), "mean_precision_prior"),
        (dict(degrees_of_freedom_prior=0.5), "degrees_of_freedom_prior"),
        (dict(mean_prior=np.zeros(3)), "mean_prior"),
        (dict(covariance_prior=np.eye(3)), "covariance_prior"),
        (dict(covariance_prior=-np.eye(2)), "covariance_prior"),
        (dict(max_iter=0), "max_iter"),
        (dict(n_components=30), "n_components"),
    ):
        with pytest.raises(ValueError, match=name):
            BayesianGaussianMixture(**bad).fit(x)
    for cls in (FactorAnalysis, ProbabilisticPCA):
        for bad, name in (
            (dict(n_components=2), "n_components"),
            (dict(n_components=0), "n_components"),
            (dict(init_params="x"), "init_params"),
            (dict(tol=-1.0), "tol"),
            (dict(noise_floor=-1.0), "noise_floor"),
        ):
            with pytest.raises(ValueError, match=name):
                cls(**bad).fit(x)
    with pytest.raises(ValueError, match="noise_variance_init"):
        FactorAnalysis(1, noise_variance_init=np.ones(3)).fit(x)
