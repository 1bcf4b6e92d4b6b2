"""gmm.params_from_responsibilities, gmm.parameter_error and the scikit-learn oracle
emvi.testing.sklearn_gmm (what experiments/gmm_em.py compares emvi against)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emvi import gmm, testing

TYPES = ("full", "diag", "spherical", "tied")


def _numpy_m_step(x, resp, covariance_type, reg):
    """Textbook float64 M-step with scikit-learn's 10 * eps guard on the counts."""
    nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ x / nk[:, None]
    diff = x[None, :, :] - means[:, None, :]  # (k, n, d)
    full = np.einsum("kn,kni,knj->kij", resp.T, diff, diff) / nk[:, None, None]
    d = x.shape[1]
    cov = {
        "full": full + reg * np.eye(d),
        "diag": np.diagonal(full, axis1=1, axis2=2) + reg,
        "spherical": np.trace(full, axis1=1, axis2=2) / d + reg,
        "tied": np.einsum("k,kij->ij", nk, full) / nk.sum() + reg * np.eye(d),
    }[covariance_type]
    return nk / nk.sum(), means, cov


@pytest.mark.parametrize("covariance_type", TYPES)
def test_params_from_responsibilities_is_the_numpy_m_step(covariance_type):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) * [1.0, 3.0, 0.5] + 7.0  # off-centre: the shift is exercised
    resp = rng.dirichlet(np.ones(4), size=40)
    p = gmm.params_from_responsibilities(
        jnp.asarray(x), jnp.asarray(resp), covariance_type=covariance_type, reg_covar=0.01
    )
    # Both are float64 sums of 40 terms of size O(50): agreement to ~1e-13 relative.
    for got, want in zip(p, _numpy_m_step(x, resp, covariance_type, 0.01), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-11, atol=1e-11)


def test_an_empty_component_starts_at_the_data_mean_with_a_tiny_weight():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(10, 2)))
    resp = jax.nn.one_hot(jnp.zeros(10, int), 2, dtype=x.dtype)  # component 1 gets nothing
    p = gmm.params_from_responsibilities(x, resp, covariance_type="diag", reg_covar=0.5)
    np.testing.assert_allclose(p.means[1], jnp.mean(x, 0), rtol=0, atol=1e-12)
    assert 0 < float(p.weights[1]) < 1e-13
    np.testing.assert_allclose(p.covariances[1], [0.5, 0.5], rtol=0, atol=1e-12)


def test_params_from_responsibilities_refuses_an_unknown_covariance_type():
    with pytest.raises(ValueError, match="covariance_type"):
        gmm.params_from_responsibilities(
            jnp.zeros((5, 2)), jnp.ones((5, 2)) / 2, covariance_type="banana"
        )


def test_parameter_error_undoes_a_relabelling_and_measures_the_rest():
    rng = np.random.default_rng(2)
    means = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    covs = np.stack([np.eye(2), 2 * np.eye(2), np.diag([1.0, 3.0])])
    true = gmm.GMMParams(np.array([0.5, 0.3, 0.2]), means, covs)
    perm = np.array([2, 0, 1])  # fitted component perm[j] is true component j
    inverse = np.argsort(perm)
    shift = rng.normal(scale=0.01, size=means.shape)
    fitted = gmm.GMMParams(
        true.weights[inverse] + np.array([0.01, 0.0, -0.01]),
        (means + shift)[inverse],
        (covs * 1.1)[inverse],
    )
    err = gmm.parameter_error(true, fitted)
    assert err["matching"] == perm.tolist()
    assert err["weights_max_abs_error"] == pytest.approx(0.01, abs=1e-15)
    assert err["means_max_euclidean_error"] == pytest.approx(np.linalg.norm(shift, axis=1).max())
    # Every covariance is scaled by 1.1: relative Frobenius error 0.1 for each.
    assert err["covariances_max_relative_frobenius_error"] == pytest.approx(0.1, rel=1e-12)
    with pytest.raises(ValueError, match="full-covariance"):
        gmm.parameter_error(true, gmm.GMMParams(true.weights, means, np.ones((3, 2))))


@pytest.mark.parametrize("covariance_type", TYPES)
def test_sklearn_precisions_inverts_every_layout(covariance_type):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(3, 2, 2))
    full = a @ a.transpose(0, 2, 1) + np.eye(2)
    cov = {"full": full, "tied": full[0], "diag": np.diagonal(full, axis1=1, axis2=2)}.get(
        covariance_type, full[:, 0, 0]
    )
    prec = testing.sklearn_precisions(cov, covariance_type)
    if covariance_type in ("full", "tied"):
        np.testing.assert_allclose(prec @ cov, np.broadcast_to(np.eye(2), cov.shape), atol=1e-12)
    else:
        np.testing.assert_allclose(prec * cov, 1.0, rtol=1e-15)


def test_sklearn_gmm_from_the_same_start_matches_one_emvi_em_iteration():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=(60, 2)), rng.normal(size=(40, 2)) + np.array([4.0, 1.0])])
    labels = (x[:, 0] > 2).astype(int)
    xj = jnp.asarray(x)
    start = gmm.params_from_responsibilities(
        xj, jax.nn.one_hot(labels, 2, dtype=jnp.float64), covariance_type="full"
    )
    ref = testing.sklearn_gmm(x, start, covariance_type="full", max_iter=1, tol=0.0, reg_covar=1e-6)
    # One EM iteration: the exact posterior at the start, then the closed-form M-step.
    resp = gmm.posterior(start, xj, covariance_type="full")
    ours = gmm.params_from_responsibilities(xj, resp, covariance_type="full", reg_covar=1e-6)
    assert ref.n_iter_ == 1
    # float64 on both sides from the same start: agreement to rounding (~1e-15 relative
    # here); 1e-10 allows for scikit-learn's different order of the same sums.
    for got, want in zip(ours, (ref.weights_, ref.means_, ref.covariances_), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
