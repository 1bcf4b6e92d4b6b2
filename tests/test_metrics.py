"""Tests for emvi.metrics: active units, per-dimension KL, mutual information."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

from emvi.elbo import standard_normal_kl
from emvi.metrics import active_units, kl_per_dim, mutual_information, posterior_mean_variance

N, L = 8, 3


def _constructed_means(rng):
    """Dims 0, 2, 5 vary (variance ~1), 1 and 3 are constant, 4 varies below 0.01."""
    means = np.zeros((50, 6))
    means[:, [0, 2, 5]] = rng.normal(size=(50, 3))
    means[:, 1] = 3.0
    means[:, 3] = -7.0
    means[:, 4] = 0.05 * rng.normal(size=50)  # variance ~0.0025
    return means


def test_active_units_counts_the_varying_dimensions(rng):
    means = _constructed_means(rng)
    variances = np.var(means, axis=0)
    assert variances[4] < 0.01 < min(variances[[0, 2, 5]])  # the construction holds
    assert int(active_units(jnp.asarray(means))) == 3
    assert int(active_units(jnp.asarray(means), threshold=0.0)) == 4  # dim 4 is not constant
    assert int(active_units(jnp.asarray(means), threshold=100.0)) == 0


def test_posterior_mean_variance_is_two_pass(rng):
    # A large common offset: E[m^2] - E[m]^2 would lose every digit (1e16 * eps ~ 2).
    means = 1e8 + rng.normal(size=(40, 2))
    got = posterior_mean_variance(jnp.asarray(means))
    np.testing.assert_allclose(got, np.var(means, axis=0), rtol=1e-6)
    constructed = _constructed_means(rng)
    np.testing.assert_allclose(
        posterior_mean_variance(jnp.asarray(constructed)), np.var(constructed, axis=0), rtol=1e-12
    )


def test_kl_per_dim_matches_numpy(rng):
    means = rng.normal(size=(N, L))
    scales = np.exp(rng.normal(size=(N, L)))
    expected = np.mean(0.5 * (means**2 + scales**2 - 1.0 - 2.0 * np.log(scales)), axis=0)
    got = kl_per_dim(jnp.asarray(means), jnp.asarray(scales))
    assert got.shape == (L,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Summed over dims it is the average KL term of the ELBO.
    total = jnp.mean(standard_normal_kl(jnp.asarray(means), jnp.asarray(scales)))
    np.testing.assert_allclose(jnp.sum(got), total, rtol=1e-12)


_mi = jax.jit(mutual_information)


def _np_mutual_information(key, means, scales):
    """Oracle in NumPy/SciPy, with the same standard-normal draws."""
    eps = np.asarray(jax.random.normal(key, means.shape, dtype=jnp.float64))
    z = means + scales * eps
    log_dens = np.sum(
        scipy.stats.norm.logpdf(z[:, None, :], means[None, :, :], scales[None, :, :]), axis=-1
    )
    log_own = np.sum(scipy.stats.norm.logpdf(z, means, scales), axis=-1)
    return np.mean(log_own - (scipy.special.logsumexp(log_dens, axis=1) - np.log(len(z))))


def test_mutual_information_matches_numpy_oracle(rng):
    means = rng.normal(size=(N, L))
    scales = 0.5 * np.exp(0.3 * rng.normal(size=(N, L)))
    key = jax.random.key(1)
    got = float(_mi(key, jnp.asarray(means), jnp.asarray(scales)))
    np.testing.assert_allclose(got, _np_mutual_information(key, means, scales), rtol=1e-10)
    assert 0.0 < got < np.log(N)


def test_mutual_information_is_zero_for_identical_posteriors(rng):
    means = np.broadcast_to(rng.normal(size=(1, L)), (N, L))
    scales = np.broadcast_to(np.exp(rng.normal(size=(1, L))), (N, L))
    # Every mixture component equals q(z|x_i), so each summand is exactly 0 (no MC error).
    got = float(_mi(jax.random.key(2), jnp.asarray(means), jnp.asarray(scales)))
    assert abs(got) < 1e-12


def test_mutual_information_approaches_log_n_for_separated_posteriors():
    means = 100.0 * np.arange(N * L, dtype=float).reshape(N, L)
    scales = np.full((N, L), 0.01)
    got = float(_mi(jax.random.key(3), jnp.asarray(means), jnp.asarray(scales)))
    # Other components are ~1e4 standard deviations away: their share is exp(-1e8).
    np.testing.assert_allclose(got, np.log(N), rtol=0, atol=1e-12)
    assert got <= np.log(N)


@given(
    means=hnp.arrays(np.float64, (N, L), elements=st.floats(-5.0, 5.0)),
    log_scales=hnp.arrays(np.float64, (N, L), elements=st.floats(-6.0, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_mutual_information_never_exceeds_log_n(means, log_scales, seed):
    got = float(_mi(jax.random.key(seed), jnp.asarray(means), jnp.asarray(np.exp(log_scales))))
    assert np.isfinite(got)
    assert got <= np.log(N)  # exact, not up to rounding


def test_float32_in_float32_out_and_jit_matches_eager(rng):
    means = jnp.asarray(rng.normal(size=(N, L)), jnp.float32)
    scales = jnp.asarray(np.exp(0.3 * rng.normal(size=(N, L))), jnp.float32)
    key = jax.random.key(4)
    outs = {
        "variance": posterior_mean_variance(means),
        "active": active_units(means),
        "kl": kl_per_dim(means, scales),
        "mi": mutual_information(key, means, scales),
    }
    for name in ("variance", "kl", "mi"):
        assert outs[name].dtype == jnp.float32, name
        assert bool(jnp.all(jnp.isfinite(outs[name]))), name
    assert jnp.issubdtype(outs["active"].dtype, jnp.integer)
    np.testing.assert_allclose(_mi(key, means, scales), outs["mi"], rtol=1e-5)
    jitted = jax.jit(lambda m, s: (posterior_mean_variance(m), kl_per_dim(m, s)))(means, scales)
    np.testing.assert_allclose(jitted[0], outs["variance"], rtol=1e-6)
    np.testing.assert_allclose(jitted[1], outs["kl"], rtol=1e-6)


def test_bad_input_raises_value_error(rng):
    means = jnp.asarray(rng.normal(size=(N, L)))
    with pytest.raises(ValueError, match="threshold"):
        active_units(means, threshold=-1.0)
    bad_scales = jnp.ones((N, L)).at[2, 1].set(0.0)
    with pytest.raises(ValueError, match="strictly positive"):
        kl_per_dim(means, bad_scales)
    with pytest.raises(ValueError, match="strictly positive"):
        mutual_information(jax.random.key(0), means, bad_scales)
