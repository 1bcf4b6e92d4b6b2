"""Flax encoders and decoders: shapes, positive scales, log-likelihoods against SciPy."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from emvi import nn as enn


def _scaled(params, factor):
    return jax.tree.map(lambda p: p * factor, params)


def _float64(params):
    """Flax initialises float32 parameters; the tight SciPy comparisons run in float64
    (strict dtype promotion refuses float64 data against float32 weights)."""
    return jax.tree.map(lambda p: p.astype(jnp.float64), params)


def test_gaussian_encoder_shapes_and_positive_scale(rng):
    enc = enn.GaussianEncoder(hidden=(8, 8), latent_dim=3, min_scale=1e-3)
    x = jnp.asarray(rng.random((5, 6)), jnp.float32)
    params = enc.init(jax.random.key(0), x)
    mean, scale = enc.apply(params, x)
    assert mean.shape == scale.shape == (5, 3)
    assert mean.dtype == scale.dtype == jnp.float32
    # Blow the weights up so the scale pre-activations reach +-1e4: a raw exp would
    # overflow or underflow to 0 here, the softplus + floor stays finite and > min_scale.
    big = _scaled(params, 300.0)
    _, scale_big = enc.apply(big, 10.0 * x)
    _, scale_neg = enc.apply(_scaled(params, -300.0), 10.0 * x)
    for s in (scale, scale_big, scale_neg):
        assert bool(jnp.all(jnp.isfinite(s)))
        assert bool(jnp.all(s >= 1e-3))
    assert float(jnp.max(scale_big)) > 100.0 or float(jnp.max(scale_neg)) > 100.0
    assert float(jnp.min(jnp.minimum(scale_big, scale_neg))) == pytest.approx(1e-3, rel=1e-3)


def test_zero_preactivation_gives_unit_scale():
    assert float(enn.positive_scale(jnp.zeros(()), 0.0)) == pytest.approx(1.0, rel=1e-12)


def test_categorical_encoder_logits_shape(rng):
    enc = enn.CategoricalEncoder(hidden=(8,), num_classes=4)
    x = jnp.asarray(rng.random((7, 6)), jnp.float32)
    logits = enc.apply(enc.init(jax.random.key(1), x), x)
    assert logits.shape == (7, 4)
    assert np.unique(np.asarray(logits).round(5), axis=1).shape[1] == 4


def test_mlp_depth_and_activation_name():
    mlp = enn.MLP((5, 4, 3), activation="tanh")
    params = mlp.init(jax.random.key(0), jnp.zeros((1, 2), jnp.float32))
    assert sorted(params["params"]) == ["dense_0", "dense_1", "dense_2"]
    with pytest.raises(ValueError, match="activation must be one of"):
        enn.MLP((3,), activation="sigmoidish").init(
            jax.random.key(0), jnp.zeros((1, 2), jnp.float32)
        )


def test_bernoulli_decoder_log_prob_matches_scipy(rng):
    dec = enn.BernoulliDecoder(hidden=(8,), data_dim=6)
    z = jnp.asarray(rng.standard_normal((4, 2)))  # float64: the oracle comparison is tight
    params = _float64(dec.init(jax.random.key(0), z.astype(jnp.float32)))
    params = _scaled(params, 3.0)  # logits of several units, not just near zero
    logits = np.asarray(dec.apply(params, z), np.float64)
    x = (rng.random((4, 6)) < 0.5).astype(np.float64)
    got = np.asarray(dec.apply(params, z, jnp.asarray(x), method="log_prob"))
    want = stats.bernoulli.logpmf(x, special.expit(logits)).sum(axis=1)
    assert np.abs(logits).max() > 1.0
    # float64 throughout: the same formula in another arrangement, rounding ~1e-15.
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    mean = np.asarray(dec.apply(params, z, method="mean"))
    np.testing.assert_allclose(mean, special.expit(logits), rtol=1e-12)


@pytest.mark.parametrize("variance", ["per_dim", "per_output"])
def test_gaussian_decoder_log_prob_matches_scipy(rng, variance):
    dec = enn.GaussianDecoder(hidden=(8,), data_dim=5, variance=variance, min_scale=1e-2)
    z = jnp.asarray(rng.standard_normal((4, 3)))
    params = _float64(dec.init(jax.random.key(2), z.astype(jnp.float32)))
    # Move the scale parameters away from their zero initialisation.
    params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.standard_normal(p.shape)), params)
    mean, scale = (np.asarray(a) for a in dec.apply(params, z))
    x = rng.standard_normal((4, 5))
    got = np.asarray(dec.apply(params, z, jnp.asarray(x), method="log_prob"))
    want = stats.norm.logpdf(x, mean, scale).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert np.all(scale > 1e-2)
    names = set(params["params"])
    if variance == "per_dim":
        assert params["params"]["raw_scale"].shape == (5,)
        # One scale vector shared by every z.
        np.testing.assert_array_equal(scale, np.broadcast_to(scale[:1], scale.shape))
    else:
        assert "raw_scale" not in names and "scale" in names
        assert np.std(scale, axis=0).max() > 1e-3


def test_gaussian_decoder_rejects_unknown_variance():
    dec = enn.GaussianDecoder(hidden=(4,), data_dim=3, variance="per_pixel")
    with pytest.raises(ValueError, match="variance must be 'per_dim' or 'per_output'"):
        dec.init(jax.random.key(0), jnp.zeros((1, 2), jnp.float32))


def test_latent_size_below_one_is_rejected():
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        enn.GaussianEncoder(hidden=(4,), latent_dim=0).init(
            jax.random.key(0), jnp.zeros((1, 3), jnp.float32)
        )


def test_made_decoder_is_autoregressive():
    """Flipping pixel j may change logits j+1, j+2, ... but never logits 0..j."""
    dec = enn.MADEDecoder(data_dim=6, hidden=(10,))
    z = jnp.ones((7, 2), jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (1, 6)), jnp.float32)
    flips = jnp.concatenate([x, jnp.abs(x - jnp.eye(6, dtype=x.dtype))])  # row j+1 flips j
    params = dec.init(jax.random.key(0), z[:1], x)
    logits = np.asarray(jax.jit(dec.apply)(params, z, flips))
    changed = np.abs(logits[1:] - logits[:1]) > 0  # (flipped pixel j, logit i)
    assert not np.any(np.tril(changed))  # logit i <= j unchanged
    assert np.any(np.triu(changed, 1))  # and later logits do see pixel j


def test_made_decoder_log_prob_matches_scipy_and_broadcasts(rng):
    dec = enn.MADEDecoder(data_dim=5, hidden=(7,))
    z = jnp.asarray(rng.standard_normal((3, 4, 2)))
    x = jnp.asarray((rng.random((1, 4, 5)) < 0.5).astype(np.float64))
    params = _float64(
        dec.init(jax.random.key(1), z[0].astype(jnp.float32), x[0].astype(jnp.float32))
    )
    got = np.asarray(dec.apply(params, z, x, method="log_prob"))  # x broadcast over axis 0
    logits = np.asarray(dec.apply(params, z, jnp.broadcast_to(x, (3, 4, 5))))
    want = stats.bernoulli.logpmf(np.broadcast_to(x, (3, 4, 5)), special.expit(logits)).sum(-1)
    assert got.shape == (3, 4)
    # float64 throughout: the same formula in another arrangement.
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert dec.likelihood == "bernoulli" and enn.GaussianDecoder.likelihood == "gaussian"


def test_made_samples_are_binary():
    dec = enn.MADEDecoder(data_dim=4, hidden=(6,))
    z = jnp.zeros((5, 2), jnp.float32)
    params = dec.init(jax.random.key(0), z, jnp.zeros((5, 4), jnp.float32))
    xs = np.asarray(dec.apply(params, jax.random.key(1), z, method="sample"))
    assert xs.shape == (5, 4) and set(np.unique(xs)) <= {0.0, 1.0}


@pytest.mark.parametrize("width", [1, 3, 5])
def test_conv1d_is_flax_same_conv_and_a_direct_sum(rng, width):
    """Conv1D (im2col matmul) against flax's 'SAME' convolution from the same key (same
    parameters, same outputs) and a NumPy float64 sum over the taps, in both dtypes."""
    x64 = rng.normal(size=(4, 7, 3))
    for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
        x = jnp.asarray(x64, dtype)
        ours = enn.Conv1D(5, width)
        flax_conv = linen.Conv(5, (width,), padding="SAME")
        with jax.numpy_dtype_promotion("standard"):  # float32 parameters meet float64 x
            p = ours.init(jax.random.key(3), x)
            p_ref = flax_conv.init(jax.random.key(3), x)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        p = jax.tree.map(lambda a, dt=dtype: a.astype(dt), p)
        y = ours.apply(p, x)
        assert y.dtype == dtype and y.shape == (4, 7, 5)
        np.testing.assert_allclose(y, flax_conv.apply(p, x), atol=tol)
        kern = np.asarray(p["params"]["kernel"], np.float64)
        bias = np.asarray(p["params"]["bias"], np.float64)
        r = width // 2
        padded = np.pad(x64, ((0, 0), (r, r), (0, 0)))
        direct = bias + sum(padded[:, s : s + 7] @ kern[s] for s in range(width))
        np.testing.assert_allclose(np.asarray(y, np.float64), direct, atol=tol)


@pytest.mark.parametrize("width", [0, 2, -1])
def test_conv1d_rejects_even_or_nonpositive_width(width):
    with pytest.raises(ValueError, match="kernel_size"):
        enn.Conv1D(2, width).init(jax.random.key(0), jnp.zeros((1, 4, 2)))
