"""k-means against scikit-learn, and k-means as the hard-assignment limit of GMM EM.

Tolerances: Lloyd from the same centres is the same recursion as scikit-learn's (labels
must agree exactly; centres and inertia to 1e-10 relative, the rounding of weighted means
of at most a few hundred points). The limit tests compare a softmax with temperature
2 sigma^2 against the one-hot assignment: the error is exp(-gap / 2 sigma^2) for the
smallest squared-distance gap, which the test checks shrinks as sigma does.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets
from sklearn.cluster import KMeans

from emvi import gmm
from emvi import kmeans as km

CENTRES = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])


def _blobs(seed=0, n=60):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 3, n)
    return CENTRES[z] + rng.normal(size=(n, 2)), z


@pytest.mark.parametrize("name", ["blobs", "iris"])
@pytest.mark.parametrize("max_iter", [2, 50])
def test_lloyd_matches_sklearn_from_the_same_centres(name, max_iter):
    if name == "blobs":
        x = _blobs()[0] + 100.0  # an offset, to exercise the centring
        idx = [0, 1, 2]
    else:
        x = datasets.load_iris().data
        idx = [0, 1, 2]  # three setosa points: a poor start that takes several steps
    init = x[idx]
    ref = KMeans(3, init=init, n_init=1, algorithm="lloyd", max_iter=max_iter, tol=0.0).fit(x)
    res = km.kmeans(jax.random.key(0), x, 3, init=init, max_iter=max_iter, tol=0.0)
    np.testing.assert_array_equal(res.labels, ref.labels_)
    np.testing.assert_allclose(res.centers, ref.cluster_centers_, rtol=1e-10)
    np.testing.assert_allclose(res.inertia, ref.inertia_, rtol=1e-10)
    assert int(res.num_iter) == ref.n_iter_


def test_kmeans_plusplus_seeds_are_data_points_in_different_blobs():
    x, z = _blobs(1)
    c = np.asarray(km.kmeans_plusplus(jax.random.key(3), x, 3))
    rows = [int(np.flatnonzero(np.all(x == ci, axis=1))[0]) for ci in c]
    assert sorted(z[rows].tolist()) == [0, 1, 2]
    # Only two distinct points but four seeds: no crash, seeds are still data points.
    dup = np.repeat(np.array([[0.0, 1.0], [2.0, 3.0]]), 5, axis=0)
    c = np.asarray(km.kmeans_plusplus(jax.random.key(0), dup, 4))
    assert all(np.any(np.all(dup == ci, axis=1)) for ci in c)


def test_kmeans_from_kmeans_plusplus_converges_and_float32_stays_float32():
    x, z = _blobs(2)
    res = km.kmeans(jax.random.key(0), x.astype(np.float32), 3)
    assert res.centers.dtype == jnp.float32 and bool(res.converged)
    # Each found cluster is one blob (label maps agree up to renaming).
    pairs = set(zip(np.asarray(res.labels).tolist(), z.tolist(), strict=True))
    assert len(pairs) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": np.full((5, 2), np.nan)}, "non-finite"),
        ({"k": 61}, "larger than the number of points"),
        ({"k": 0}, ">= 1"),
        ({"init": "banana"}, "init"),
        ({"init": np.zeros((2, 2))}, "shape"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"sample_weight": np.zeros(60)}, "zero everywhere"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = {"x": _blobs()[0], "k": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        km.kmeans(jax.random.key(0), args.pop("x"), args.pop("k"), **args)


def test_kmeans_is_the_hard_assignment_limit_of_isotropic_gmm_em():
    x, _ = _blobs(4)
    xj = jnp.asarray(x)
    centres = jnp.asarray(CENTRES + np.array([[0.5, -0.3], [-0.4, 0.2], [0.3, 0.6]]))
    d2 = np.asarray(km.squared_distances(xj, centres))
    labels = d2.argmin(1)
    onehot = np.eye(3)[labels]
    errors = []
    for s2 in [1.0, 0.3, 0.1, 0.03, 0.01]:
        p = gmm.GMMParams(jnp.full(3, 1 / 3), centres, jnp.full(3, s2))
        r = np.asarray(gmm.posterior(p, xj, covariance_type="spherical"))
        # Known isotropic variance, equal weights: the E-step is softmax(-D^2 / 2 sigma^2).
        logits = -d2 / (2 * s2)
        soft = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(r, soft / soft.sum(1, keepdims=True), atol=1e-12)
        errors.append(np.abs(r - onehot).max())
    assert all(a > b for a, b in itertools.pairwise(errors))
    # With gap = the smallest squared-distance margin, 1 - r_{i z_i} <= (k - 1) e^{-gap/2s^2}.
    srt = np.sort(d2, axis=1)
    gap = np.min(srt[:, 1] - srt[:, 0])
    assert errors[-1] <= 2 * np.exp(-gap / (2 * 0.01)) and errors[-1] < 1e-3
    # One GMM M-step with the hard responsibilities is one Lloyd step (the means part).
    data = gmm.prepare(xj, covariance_type="spherical")
    stats = gmm.expected_stats(
        jnp.asarray(onehot), data, jnp.ones(x.shape[0]), covariance_type="spherical"
    )
    means = gmm.m_step(stats, gmm.GMMHyper(jnp.asarray(0.0)), covariance_type="spherical").means
    step = km.lloyd(centres, xj, jnp.ones(x.shape[0]), max_iter=1)
    np.testing.assert_allclose(means, step.centers, rtol=1e-12)
    # ... and with the soft responsibilities at the smallest sigma it agrees to that error.
    stats = gmm.expected_stats(
        jnp.asarray(r), data, jnp.ones(x.shape[0]), covariance_type="spherical"
    )
    means = gmm.m_step(stats, gmm.GMMHyper(jnp.asarray(0.0)), covariance_type="spherical").means
    np.testing.assert_allclose(means, step.centers, atol=100 * errors[-1])
