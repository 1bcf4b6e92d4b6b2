"""VAE objectives: exact categorical ELBO, Gaussian ELBO/IWAE, wrappers and validation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

from emvi import nn as enn
from emvi import vae

D = 6


def _binary(rng, n, d=D, dtype=np.float64):
    return (rng.random((n, d)) < 0.4).astype(dtype)


def _as64(params):
    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)


# ---------------------------------------------------------------------------------------
# Categorical latent: exact ELBO and exact log p(x).


def _numpy_categorical(params, x, m):
    """Brute force in float64: every class k, every pixel j, written out."""
    enc = params.encoder["params"]["net"]
    dec = params.decoder["params"]["net"]

    def mlp(layers, h):
        names = sorted(layers)
        for i, name in enumerate(names):
            h = h @ np.asarray(layers[name]["kernel"], np.float64) + np.asarray(
                layers[name]["bias"], np.float64
            )
            if i + 1 < len(names):
                h = np.maximum(h, 0.0)
        return h

    q = special.softmax(mlp(enc, x), axis=1)
    log_lik = np.zeros((x.shape[0], m))
    for k in range(m):
        probs = special.expit(mlp(dec, np.eye(m)[k]))
        for j in range(x.shape[1]):
            log_lik[:, k] += np.where(x[:, j] == 1, np.log(probs[j]), np.log1p(-probs[j]))
    elbo = np.sum(q * (log_lik - math.log(m) - np.log(q)), axis=1)
    log_px = special.logsumexp(log_lik, axis=1) - math.log(m)
    return elbo, log_px


def test_categorical_exact_elbo_equals_enumeration(rng):
    model = vae.categorical_vae(D, 4, hidden=(5,))
    params = _as64(model.init(jax.random.key(0)))
    params = jax.tree.map(lambda p: 2.0 * p, params)  # a peaked q, not near uniform
    x = _binary(rng, 9)
    terms = jax.jit(functools.partial(vae.categorical_elbo_terms, model=model))(
        params, jnp.asarray(x)
    )
    want_elbo, want_log_px = _numpy_categorical(params, x, 4)
    # float64 on both sides: only summation order differs.
    np.testing.assert_allclose(terms["elbo"], want_elbo, rtol=1e-10)
    np.testing.assert_allclose(terms["recon"] - terms["kl"], want_elbo, rtol=1e-10)
    # The public wrapper casts the data to the parameters' dtype (float64 here).
    got_log_px = vae.categorical_log_likelihood(params, x.astype(np.float32), model=model)
    assert got_log_px.dtype == jnp.float64
    np.testing.assert_allclose(got_log_px, want_log_px, rtol=1e-10)
    loss, aux = jax.jit(functools.partial(vae.categorical_elbo_loss, model=model))(
        params, None, jnp.asarray(x)
    )
    assert float(loss) == pytest.approx(-want_elbo.mean(), rel=1e-10)
    assert float(aux["elbo"]) == pytest.approx(want_elbo.mean(), rel=1e-10)


def test_categorical_log_px_bounds_elbo_with_equality_at_exact_posterior(rng):
    """With no hidden layers the decoder is m Bernoulli prototypes l_k, and the exact
    posterior is softmax_k(x . l_k - sum_j softplus(l_kj)): linear in x, so a linear
    encoder can represent it exactly. Build that encoder and check the gap closes."""
    m = 3
    model = vae.categorical_vae(D, m, hidden=())
    params = _as64(model.init(jax.random.key(3)))
    dec = params.decoder["params"]["net"]["dense_0"]
    dec = {"kernel": 1.5 * jnp.asarray(rng.standard_normal((m, D))), "bias": dec["bias"]}
    prototypes = dec["kernel"] + dec["bias"][None, :]  # logits of class k
    exact_enc = {
        "kernel": prototypes.T,
        "bias": -jnp.sum(jax.nn.softplus(prototypes), axis=1),
    }
    x = jnp.asarray(_binary(rng, 12))
    random_params = vae.VAEParams(params.encoder, {"params": {"net": {"dense_0": dec}}})
    exact_params = vae.VAEParams({"params": {"net": {"dense_0": exact_enc}}}, random_params.decoder)
    exact_log_px = jax.jit(functools.partial(vae.categorical_exact_log_likelihood, model=model))
    elbo = jax.jit(lambda p: vae.categorical_elbo_terms(p, x, model=model)["elbo"])
    log_px = exact_log_px(random_params, x)
    loose, tight = elbo(random_params), elbo(exact_params)
    # Same decoder, so the same log p(x); the gap is KL(q || posterior) >= 0.
    np.testing.assert_array_equal(log_px, exact_log_px(exact_params, x))
    assert bool(jnp.all(log_px - loose > 1e-4))
    np.testing.assert_allclose(tight, log_px, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Gaussian latent.


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(1)
    model = vae.gaussian_vae(D, 2, hidden=(12,))
    params = model.init(jax.random.key(0))
    protos = (rng.random((3, D)) < 0.5).astype(np.float32)
    x = protos[rng.integers(0, 3, 30)]
    flip = rng.random(x.shape) < 0.05
    return model, params, np.where(flip, 1.0 - x, x).astype(np.float32)


def test_elbo_loss_and_gradient_are_finite(tiny):
    model, params, x = tiny
    loss_fn = functools.partial(vae.elbo_loss, model=model, num_samples=3)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, jax.random.key(1), jnp.asarray(x)
    )
    assert loss.shape == () and bool(jnp.isfinite(loss))
    assert float(loss) == pytest.approx(-float(aux["elbo"]), rel=1e-6)
    assert float(aux["elbo"]) == pytest.approx(float(aux["recon"] - aux["kl"]), rel=1e-6)
    assert float(aux["kl"]) >= 0
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_beta_weights_only_the_kl(tiny):
    model, params, x = tiny
    key, xx = jax.random.key(2), jnp.asarray(x)
    loss = jax.jit(lambda beta: vae.elbo_loss(params, key, xx, model=model, beta=beta))
    loss1, aux = loss(1.0)
    loss3, _ = loss(3.0)
    assert float(loss3 - loss1) == pytest.approx(2.0 * float(aux["kl"]), rel=1e-5)


def test_sampled_kl_agrees_with_analytic_kl_in_expectation(tiny):
    model, params, x = tiny
    params, xx = _as64(params), jnp.asarray(x, jnp.float64)
    s = 1000
    _, kl_exact = vae.gaussian_elbo_terms(params, jax.random.key(3), xx, model=model)
    sampled = jax.jit(
        lambda key: vae.gaussian_elbo_terms(
            params, key, xx, model=model, num_samples=s, analytic_kl=False
        )[1]
    )
    draws = np.stack([sampled(jax.random.key(10 + i)) for i in range(16)])  # (16, n)
    # Each draw averages s log-ratios; the 16 draws give the standard error of their mean.
    sem = draws.std(axis=0, ddof=1) / np.sqrt(16)
    assert np.all(np.abs(draws.mean(axis=0) - np.asarray(kl_exact)) < 5 * sem + 1e-9)
    assert float(sem.max()) < 0.05  # the check is sharp: errors of 0.25 nats would fail
    assert float(jnp.max(kl_exact)) > 0.1


def test_training_raises_the_elbo_and_iwae_bounds_it(tiny):
    model, params, x = tiny
    xx = jnp.asarray(x)

    @jax.jit
    def elbo(p):
        return vae.elbo_loss(p, jax.random.key(7), xx, model=model, num_samples=64)[1]["elbo"]

    result = vae.fit_vae(
        jax.random.key(4),
        model,
        x,
        params=params,
        optimizer=optax.adam(1e-2),
        batch_size=3,
        num_epochs=30,  # 300 steps
        progress=False,
    )
    before, after = float(elbo(params)), float(elbo(result.state.params))
    assert after > before + 2.0, (before, after)  # about +2.9 nats here
    trained = result.state.params
    iwae = jax.jit(functools.partial(vae.iwae_loss, model=model, num_samples=64))
    loss, aux = iwae(trained, jax.random.key(8), xx)
    assert bool(jnp.isfinite(loss)) and float(loss) == pytest.approx(-float(aux["iwae"]))
    # IWAE_64 >= ELBO (in expectation; the MC error of both is < 0.05 nats here).
    assert float(aux["iwae"]) > after - 0.05
    # log_likelihood (emvi.elbo.estimate_log_likelihood: per-example keys) and iwae_loss
    # (one key for the batch) are two independent draws of the same mean IWAE_64. Their
    # difference has standard error sqrt(2 sum_i s_i^2) / n, with s_i the spread of one
    # IWAE_64 draw of example i, estimated from 16 replicates; 5 standard errors.
    log_px = vae.log_likelihood(jax.random.key(9), trained, x, model=model, num_samples=64)
    reps = jax.jit(jax.vmap(lambda k: vae.iwae_bound(trained, k, xx, model=model, num_samples=64)))(
        jax.random.split(jax.random.key(10), 16)
    )
    spread = np.var(np.asarray(reps, np.float64), axis=0, ddof=1)
    se_diff = np.sqrt(2.0 * spread.sum()) / x.shape[0]
    assert 0 < se_diff < 0.05  # a sharp check: the old fixed tolerance was 0.2
    assert abs(float(jnp.mean(log_px)) - float(aux["iwae"])) < 5 * se_diff


def test_reconstruct_and_generate_shapes_and_ranges(tiny):
    model, params, x = tiny
    rec = vae.reconstruct(jax.random.key(0), params, x[:7], model=model)
    assert rec.shape == (7, D) and bool(jnp.all((rec > 0) & (rec < 1)))
    rec_s = vae.reconstruct(jax.random.key(0), params, x[:7], model=model, sample=True)
    assert set(np.unique(np.asarray(rec_s))) <= {0.0, 1.0}
    gen = vae.generate(jax.random.key(1), params, 11, model=model)
    assert gen.shape == (11, D) and bool(jnp.all((gen > 0) & (gen < 1)))
    gen_s = vae.generate(jax.random.key(1), params, 11, model=model, sample=True)
    assert set(np.unique(np.asarray(gen_s))) <= {0.0, 1.0}
    mean, scale = vae.encode(params, x, model=model)
    assert mean.shape == scale.shape == (30, 2) and bool(jnp.all(scale > 0))

    cat = vae.categorical_vae(D, 3, hidden=(4,))
    cparams = cat.init(jax.random.key(5))
    assert vae.reconstruct(jax.random.key(0), cparams, x[:4], model=cat).shape == (4, D)
    assert vae.generate(jax.random.key(0), cparams, 5, model=cat).shape == (5, D)
    q = vae.encode(cparams, x, model=cat)
    np.testing.assert_allclose(jnp.sum(q, axis=1), 1.0, rtol=1e-6)


def test_bad_inputs_raise_clear_errors(tiny):
    model, params, x = tiny
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\]"):
        vae.reconstruct(key, params, 2.0 * x + 0.5, model=model)
    with pytest.raises(ValueError, match="non-finite"):
        vae.encode(params, np.where(np.eye(30, D) > 0, np.nan, x), model=model)
    with pytest.raises(ValueError, match="expects data_dim=6"):
        vae.encode(params, x[:, :4], model=model)
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        vae.gaussian_vae(D, 0)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        vae.categorical_vae(D, 0)
    with pytest.raises(ValueError, match="larger than the 30 training examples"):
        vae.fit_vae(key, model, x, optimizer=optax.adam(1e-3), batch_size=31, num_epochs=1)
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\]"):
        vae.fit_vae(key, model, -x, optimizer=optax.adam(1e-3), batch_size=5, num_epochs=1)
    with pytest.raises(ValueError, match="objective must be one of"):
        vae.loss_fn(model, objective="vq")
    with pytest.raises(ValueError, match="num must be >= 1"):
        vae.generate(key, params, 0, model=model)


# ---------------------------------------------------------------------------------------
# Objectives against collapse, any decoder with a log_prob.


@pytest.fixture(scope="module")
def made_vae():
    model = vae.GaussianVAE(enn.GaussianEncoder((8,), 3), enn.MADEDecoder(data_dim=D, hidden=(8,)))
    params = _as64(model.init(jax.random.key(0)))
    x = jnp.asarray(_binary(np.random.default_rng(4), 10))
    return model, params, x


def _objective(kind, **kw):
    return vae.check_objective(vae.Objective(kind=kind, **kw))


def test_objectives_are_their_formulas(made_vae):
    model, params, x = made_vae
    key = jax.random.key(3)

    @functools.partial(jax.jit, static_argnames="objective")
    def loss(step, objective):
        return vae.objective_loss(params, key, x, step, model=model, objective=objective)

    base, aux = loss(0, _objective("elbo"))
    recon, kl = float(aux["recon"]), float(aux["kl"])
    assert kl > 0.01  # the KL weight is visible
    # float64: the formulas agree to rounding.
    assert float(base) == pytest.approx(-(recon - kl), rel=1e-12)
    for step, weight in ((0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0)):
        got, aux_t = loss(step, _objective("kl_anneal", anneal_steps=10))
        assert float(aux_t["kl_weight"]) == weight
        assert float(got) == pytest.approx(-recon + weight * kl, rel=1e-12)
        assert float(aux_t["recon"]) == recon  # the same z for every objective
    # free bits: lambda = 0 is the ELBO, a lambda above every dimension's KL is a constant.
    assert float(loss(0, _objective("free_bits", free_bits=0.0))[0]) == pytest.approx(
        float(base), rel=1e-12
    )
    high = float(loss(0, _objective("free_bits", free_bits=100.0))[0])
    assert high == pytest.approx(-recon + 3 * 100.0, rel=1e-12)
    # InfoVAE: alpha = 0, lambda = 1 is the ELBO; alpha = 1, lambda = 5 drops the KL.
    info, _ = loss(0, _objective("infovae", info_alpha=0.0, info_lambda=1.0))
    assert float(info) == pytest.approx(float(base), rel=1e-12)
    mmd_only, aux_m = loss(0, _objective("infovae", info_alpha=1.0, info_lambda=5.0))
    assert np.isfinite(float(aux_m["mmd"]))
    assert float(mmd_only) == pytest.approx(-recon + 5.0 * float(aux_m["mmd"]), rel=1e-12)


def test_any_decoder_with_log_prob_trains_through_fit(made_vae):
    model, _, x = made_vae
    assert model.likelihood == "bernoulli" and model.data_dim == D
    result = vae.fit_vae(
        jax.random.key(1),
        model,
        np.asarray(x, np.float32),
        optimizer=optax.adam(1e-2),
        batch_size=5,
        num_epochs=2,
        objective=vae.Objective("kl_anneal", anneal_steps=3),
        progress=False,
    )
    # 2 steps per epoch: the weight seen by the steps is min(1, t/3), t = 0..3.
    weights = [row["kl_weight"] for row in result.history]
    np.testing.assert_allclose(weights, [np.mean([0, 1 / 3]), np.mean([2 / 3, 1.0])], rtol=1e-6)
    with pytest.raises(ValueError, match="log_prob"):
        vae.GaussianVAE(enn.GaussianEncoder((4,), 2), enn.MLP((4,)))
    with pytest.raises(ValueError, match="kind"):
        vae.loss_fn(model, objective=vae.Objective("beta_vae"))
    with pytest.raises(ValueError, match="MMD weight"):
        vae.loss_fn(model, objective=vae.Objective("infovae", info_alpha=0.0, info_lambda=0.5))


def test_init_through_log_prob_equals_the_decoders_own_init():
    # What the headline's VAEs were initialised with before init went through log_prob.
    model = vae.gaussian_vae(D, 2, hidden=(5,))
    params = model.init(jax.random.key(7))
    _, k_dec = jax.random.split(jax.random.key(7))
    direct = model.decoder.init(k_dec, jnp.zeros((1, 2), jnp.float32))
    assert jax.tree.structure(direct) == jax.tree.structure(params.decoder)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(params.decoder), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# Held-out evaluation helpers: latent usage, the inference-gap split, traversals.


def _numpy_q(model, params, x):
    mean, scale = model.encoder.apply(params.encoder, jnp.asarray(x))
    return np.asarray(mean, np.float64), np.asarray(scale, np.float64)


def test_evaluate_latent_usage_against_numpy(tiny):
    model, params, x = tiny
    out = vae.evaluate_latent_usage(
        jax.random.key(0), params, x, model=model, elbo_samples=4, ll_samples=8, kl_threshold=0.05
    )
    mean, scale = _numpy_q(model, params, x)
    # Closed-form KL(N(m, s^2) || N(0, 1)) per dimension, float64; float32 model: 1e-5.
    kl_dims = 0.5 * (mean**2 + scale**2 - 1.0 - 2.0 * np.log(scale))
    np.testing.assert_allclose(out["kl_per_dim"], kl_dims.mean(0), rtol=1e-5, atol=1e-6)
    assert out["kl"] == pytest.approx(kl_dims.sum(1).mean(), rel=1e-5)
    assert out["elbo"] == pytest.approx(out["recon"] - out["kl"], rel=1e-6)
    assert out["active_units"] == int(np.sum(mean.var(0) > 0.01))
    assert out["dims_kl_above"] == int(np.sum(kl_dims.mean(0) > 0.05))
    assert 0.0 <= out["mutual_information"] <= math.log(x.shape[0]) + 1e-6
    assert math.isfinite(out["log_likelihood"])
    with pytest.raises(ValueError, match="ll_samples"):
        vae.evaluate_latent_usage(jax.random.key(0), params, x, model=model, ll_samples=0)


def test_gap_decomposition_splits_the_gap_and_its_elbo_is_the_encoders(tiny):
    model, params, x = tiny
    keys = jax.random.split(jax.random.key(3), 3)
    rep = vae.gap_decomposition(
        keys, params, x, model=model, num_steps=50, elbo_samples=200, ll_samples=32
    )
    total = rep.log_likelihood - rep.elbo_amortized
    assert rep.approximation_gap + rep.amortization_gap == pytest.approx(total, rel=1e-12)
    # 50 Adam steps per example on an untrained encoder's q raise the ELBO by far more
    # than the common-random-number noise of the difference.
    assert rep.amortization_gap > 0.05

    # The encoder's ELBO against an independent estimate: 64 replicates of the mean of
    # vae.gaussian_elbo_terms with 50 draws each. One replicate has spread s; the split's
    # ELBO uses 200 draws (spread s / 2), the replicates' mean has s / 8: 5 standard
    # errors of the difference.
    def one(k):
        recon, kl = vae.gaussian_elbo_terms(params, k, jnp.asarray(x), model=model, num_samples=50)
        return jnp.mean(recon - kl)

    reps = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(4), 64)), np.float64)
    se = reps.std(ddof=1) * math.sqrt(1 / 4 + 1 / 64)
    assert abs(rep.elbo_amortized - reps.mean()) < 5 * se
    with pytest.raises(ValueError, match="GaussianVAE"):
        vae.gap_decomposition(keys, params, x, model=vae.categorical_vae(D, 3, (4,)))


def test_latent_traversal_moves_one_dimension_by_decreasing_kl(tiny):
    model, params, x = tiny
    trav = vae.latent_traversal(params, x, model=model, num_dims=2, values=[-1.0, 0.0, 2.0])
    mean, scale = _numpy_q(model, params, x)
    kl = (0.5 * (mean**2 + scale**2 - 1.0 - 2.0 * np.log(scale))).mean(0)
    np.testing.assert_array_equal(trav.dims, np.argsort(-kl))
    assert trav.images.shape == (2, 3, D)
    z = np.zeros((1, 2), np.float32)
    z[0, trav.dims[1]] = 2.0
    np.testing.assert_array_equal(trav.images[1, 2], vae.decode(params, z, model=model)[0])
