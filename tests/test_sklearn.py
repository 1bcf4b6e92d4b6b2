"""The scikit-learn estimators (emvi.sklearn): same numbers as scikit-learn, its own checks.

Oracle: ``sklearn.mixture.GaussianMixture`` from the same initial parameters (weights,
means and precisions given to both), the same iterations and stopping rule, float64.
"""

import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets, mixture
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from emvi import bernoulli_mixture as bm
from emvi import gmm
from emvi.sklearn import BernoulliMixture, GaussianMixture


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
    pipe = make_pipeline(
        StandardScaler(), GaussianMixture(covariance_type="diag", max_iter=10, random_state=0)
    )
    search = GridSearchCV(pipe, {"gaussianmixture__n_components": [1, 2]}, cv=2).fit(x)
    assert search.best_params_["gaussianmixture__n_components"] in (1, 2)
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
