"""Kernels, the unbiased MMD and the InfoVAE objective against NumPy oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from emvi import mmd

# One jitted function per property, so hypothesis examples do not recompile.
_kernel_jit = jax.jit(mmd.kernel_matrix, static_argnames=("kernel",))
_NUM_REPS = 300


def _np_sq_dists(x, y):
    return np.array([[np.sum((xi - yj) ** 2) for yj in y] for xi in x])


def _np_mmd_u(x, y, k):
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_pairwise_sq_distances_match_numpy_and_are_nonnegative(rng):
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    got = mmd.pairwise_sq_distances(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(got, _np_sq_dists(x, y), atol=1e-12)
    # Identical, large-norm points: the expanded form cancels to slightly negative values.
    big = jnp.asarray(1e4 + rng.normal(size=(5, 3)))
    assert float(jnp.min(mmd.pairwise_sq_distances(big, big))) >= 0.0


def test_kernel_values_match_numpy_formula(rng):
    x, y = rng.normal(size=(5, 2)), rng.normal(size=(3, 2))
    d2 = _np_sq_dists(x, y)
    x, y = jnp.asarray(x), jnp.asarray(y)
    np.testing.assert_allclose(
        mmd.rbf_kernel(x, y, bandwidth=0.7), np.exp(-d2 / (2 * 0.7**2)), rtol=1e-12
    )
    np.testing.assert_allclose(
        mmd.inverse_multiquadric_kernel(x, y, scale=1.5), 1.5 / (1.5 + d2), rtol=1e-12
    )


@given(
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(0.01, 20.0),
    bandwidth=st.floats(0.05, 10.0),
    kernel=st.sampled_from(["rbf", "imq"]),
    duplicate=st.booleans(),
)
def test_kernel_matrix_symmetric_psd(seed, spread, bandwidth, kernel, duplicate):
    x = spread * np.random.default_rng(seed).normal(size=(12, 3))
    if duplicate:  # a repeated point makes K singular: min eigenvalue exactly 0 in theory
        x[1] = x[0]
    x = jnp.asarray(x)
    k = np.asarray(_kernel_jit(x, x, kernel=kernel, bandwidth=jnp.asarray(bandwidth)))
    # float64 matmul rounding is ~1e-16 relative; kernel entries are <= 1.
    np.testing.assert_allclose(k, k.T, rtol=0, atol=1e-14)
    assert np.linalg.eigvalsh(k).min() >= -1e-10
    np.testing.assert_allclose(np.diag(k), 1.0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_mmd_unbiased_matches_bruteforce(rng, kernel):
    x, y = rng.normal(size=(5, 2)), 0.5 + rng.normal(size=(4, 2))
    if kernel == "rbf":
        k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * 1.3**2))
    else:
        k = lambda a, b: 1.3 / (1.3 + np.sum((a - b) ** 2))
    got = mmd.mmd_unbiased(jnp.asarray(x), jnp.asarray(y), kernel=kernel, bandwidth=1.3)
    np.testing.assert_allclose(got, _np_mmd_u(x, y, k), rtol=1e-12)


@functools.cache
def _mmd_draws():
    """MMD estimates over _NUM_REPS independent sample pairs, computed once (one compile).

    x ~ N(0, I) and y ~ N(shift, I), 30 points each in 2-D; keys are
    ``(kernel, shift)`` for the unbiased estimate and ``("v-stat", 0.0)`` for the biased
    V-statistic (diagonals kept) with the RBF kernel.
    """

    def one(key):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (30, 2), dtype=jnp.float64)
        y = jax.random.normal(ky, (30, 2), dtype=jnp.float64)
        out = {}
        for kernel in ("rbf", "imq"):
            for shift in (0.0, 1.0):
                out[kernel, shift] = mmd.mmd_unbiased(x, y + shift, kernel=kernel, bandwidth=1.0)
        k = lambda a, b: mmd.rbf_kernel(a, b, bandwidth=1.0)
        out["v-stat", 0.0] = jnp.mean(k(x, x)) + jnp.mean(k(y, y)) - 2 * jnp.mean(k(x, y))
        return out

    keys = jax.random.split(jax.random.key(42), _NUM_REPS)
    return {name: np.asarray(v) for name, v in jax.jit(jax.vmap(one))(keys).items()}


def _mean_and_se(est):
    return est.mean(), est.std(ddof=1) / np.sqrt(est.size)


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_mmd_unbiased_is_zero_on_average_for_one_distribution(kernel):
    est = _mmd_draws()[kernel, 0.0]
    mean, se = _mean_and_se(est)
    assert abs(mean) < 4 * se, (mean, se)
    assert (est < 0).any()  # unbiased => single draws do go negative


def test_biased_v_statistic_would_fail_the_null_check():
    """The null test has teeth: keeping the kernel diagonals (V-statistic) is detected."""
    mean, se = _mean_and_se(_mmd_draws()["v-stat", 0.0])
    assert mean > 4 * se, (mean, se)


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_mmd_unbiased_is_clearly_positive_for_shifted_gaussians(kernel):
    mean, se = _mean_and_se(_mmd_draws()[kernel, 1.0])
    assert mean > 20 * se, (mean, se)


def test_info_vae_objective_weights():
    ll = jnp.array([-3.0, -5.0, -4.0])
    kl = jnp.array([1.0, 2.0, 6.0])
    d = jnp.asarray(0.25)
    # alpha=0, lam=1: the negative ELBO, MMD ignored.
    np.testing.assert_allclose(mmd.info_vae_objective(ll, kl, d, alpha=0.0, lam=1.0), 4.0 + 3.0)
    # General weights: (1 - alpha) KL + (alpha + lam - 1) MMD.
    got = mmd.info_vae_objective(ll, kl, d, alpha=0.5, lam=10.0)
    np.testing.assert_allclose(got, 4.0 + 0.5 * 3.0 + 9.5 * 0.25, rtol=1e-14)
    # alpha=1 (MMD-VAE): no KL at all.
    got = mmd.info_vae_objective(ll, kl, d, alpha=1.0, lam=2.0)
    np.testing.assert_allclose(got, 4.0 + 2.0 * 0.25, rtol=1e-14)


def test_info_vae_objective_under_jit_with_python_weights():
    f = jax.jit(lambda ll, kl, d: mmd.info_vae_objective(ll, kl, d, alpha=0.0, lam=3.0))
    np.testing.assert_allclose(f(-jnp.ones(2), jnp.ones(2), jnp.asarray(0.5)), 1.0 + 1.0 + 1.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: mmd.rbf_kernel(x, x, bandwidth=0.0), "bandwidth must be"),
        (lambda x: mmd.rbf_kernel(x, x, bandwidth=-1.0), "bandwidth must be"),
        (lambda x: mmd.inverse_multiquadric_kernel(x, x, scale=0.0), "scale must be"),
        (lambda x: mmd.mmd_unbiased(x, x, kernel="imq", bandwidth=-2.0), "IMQ scale"),
        (lambda x: mmd.mmd_unbiased(x, x, kernel="laplace"), "kernel must be one of"),
        (lambda x: mmd.mmd_unbiased(x[:1], x), "at least two samples"),
    ],
)
def test_bad_kernel_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((4, 2)))


@pytest.mark.parametrize(
    ("alpha", "lam", "match"),
    [
        (0.0, -1.0, "lam"),
        (1.5, 1.0, "KL weight"),
        (0.0, 0.5, "MMD weight"),
        (float("nan"), 1.0, "alpha must be a finite"),
    ],
)
def test_bad_info_vae_weights_raise(alpha, lam, match):
    with pytest.raises(ValueError, match=match):
        mmd.info_vae_objective(jnp.zeros(2), jnp.zeros(2), jnp.asarray(0.0), alpha=alpha, lam=lam)
