"""Vector quantisation: nearest codes, gradients, the EMA codebook as k-means, usage metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from emvi import vq


def _data(rng, n=17, m=5, dim=3):
    return jnp.asarray(rng.normal(size=(n, dim))), jnp.asarray(rng.normal(size=(m, dim)))


def _np_nearest(z, codebook):
    z, codebook = np.asarray(z), np.asarray(codebook)
    d2 = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    return d2.argmin(1), d2


def test_quantize_matches_bruteforce_argmin(rng):
    z, codebook = _data(rng, n=40, m=7)
    z_q, idx, dist = vq.quantize(z, codebook)
    want_idx, want_d2 = _np_nearest(z, codebook)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_d2, atol=1e-12)
    np.testing.assert_array_equal(z_q, np.asarray(codebook)[want_idx])


def test_straight_through_value_is_z_q_and_gradient_is_identity(rng):
    z, codebook = _data(rng)

    def st_out(z_e):
        return vq.straight_through(z_e, vq.quantize(z_e, codebook)[0])

    # z_e + (z_q - z_e) rounds to z_q within one ulp.
    np.testing.assert_allclose(st_out(z), vq.quantize(z, codebook)[0], rtol=0, atol=1e-15)
    jac = jax.jacobian(st_out)(z).reshape(z.size, z.size)
    np.testing.assert_array_equal(jac, np.eye(z.size))
    # Without the estimator the encoder would get no gradient at all through argmin.
    jac_plain = jax.jacobian(lambda z_e: vq.quantize(z_e, codebook)[0])(z)
    assert not np.any(jac_plain)


def test_loss_term_gradients_go_where_they_should(rng):
    z, codebook = _data(rng)
    n = z.shape[0]
    idx, _ = _np_nearest(z, codebook)
    diff = np.asarray(z) - np.asarray(codebook)[idx]  # z_e - e_k, (n, l)

    def term(name):
        return lambda z_e, cb: getattr(vq.vq_loss_terms(z_e, cb, beta=0.25), name)

    gz_code, gc_code = jax.grad(term("codebook"), argnums=(0, 1))(z, codebook)
    gz_commit, gc_commit = jax.grad(term("commitment"), argnums=(0, 1))(z, codebook)
    # Codebook term: encoder gets nothing; code j gets (2/n) sum_{i: k_i=j} (e_j - z_i).
    assert not np.any(gz_code)
    want_gc = np.zeros_like(np.asarray(codebook))
    np.add.at(want_gc, idx, -2.0 * diff / n)
    np.testing.assert_allclose(gc_code, want_gc, atol=1e-14)
    # Commitment term: codes get nothing; encoder output i gets (2/n) (z_i - e_k).
    assert not np.any(gc_commit)
    np.testing.assert_allclose(gz_commit, 2.0 * diff / n, atol=1e-14)
    # Values: both are the mean over vectors of the squared distance summed over l.
    terms = vq.vq_loss_terms(z, codebook, beta=0.25)
    want = np.mean(np.sum(diff**2, axis=1))
    np.testing.assert_allclose([terms.codebook, terms.commitment], [want, want], rtol=1e-13)
    np.testing.assert_allclose(terms.total, 1.25 * want, rtol=1e-13)


def _np_lloyd(z, codebook):
    """One k-means (Lloyd) update: nearest-code assignment, then per-code means."""
    idx, _ = _np_nearest(z, codebook)
    new = np.array(codebook, copy=True)
    for j in range(new.shape[0]):
        if np.any(idx == j):  # an empty cluster keeps its centre
            new[j] = np.asarray(z)[idx == j].mean(0)
    return new, idx


def test_ema_update_with_decay_zero_is_one_lloyd_step(rng):
    # Codes chosen as data points, so every cluster is non-empty.
    z = jnp.asarray(rng.normal(size=(30, 2)))
    codebook = z[:4] + 0.01
    state = vq.ema_init(codebook)
    _, idx, _ = vq.quantize(z, codebook)
    new = vq.ema_update(state, z, idx, decay=0.0, eps=0.0)
    want, want_idx = _np_lloyd(z, codebook)
    assert np.bincount(want_idx, minlength=4).min() > 0
    np.testing.assert_allclose(new.codebook, want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(new.cluster_size, np.bincount(want_idx, minlength=4))


def test_ema_update_empty_code_keeps_its_value(rng):
    z = jnp.asarray(rng.normal(size=(10, 2)))
    codebook = jnp.concatenate([z[:2], jnp.full((1, 2), 100.0)])  # code 2 is far away
    _, idx, _ = vq.quantize(z, codebook)
    new = vq.ema_update(vq.ema_init(codebook), z, idx, decay=0.0, eps=0.0)
    want, _ = _np_lloyd(z, codebook)
    np.testing.assert_allclose(new.codebook, want, atol=1e-12)
    assert np.all(np.isfinite(np.asarray(new.codebook)))


def test_ema_update_matches_smoothed_formula(rng):
    z, codebook = _data(rng, n=12, m=4, dim=2)
    state = vq.EMAState(jnp.asarray([2.0, 0.5, 1.0, 3.0]), 2 * codebook, codebook)
    _, idx, _ = vq.quantize(z, codebook)
    decay, eps, m = 0.9, 1e-2, 4
    new = vq.ema_update(state, z, idx, decay=decay, eps=eps)
    one_hot = np.eye(m)[np.asarray(idx)]
    size = decay * np.asarray(state.cluster_size) + (1 - decay) * one_hot.sum(0)
    sums = decay * np.asarray(state.embed_sum) + (1 - decay) * one_hot.T @ np.asarray(z)
    smoothed = (size + eps) / (size.sum() + m * eps) * size.sum()
    np.testing.assert_allclose(new.cluster_size, size, rtol=1e-13)
    np.testing.assert_allclose(new.codebook, sums / smoothed[:, None], rtol=1e-12)


_lloyd_step = jax.jit(
    lambda z, cb: vq.ema_update(vq.ema_init(cb), z, vq.quantize(z, cb)[1], decay=0.0, eps=0.0)
)


@given(seed=st.integers(0, 2**31 - 1))
def test_hard_em_never_increases_distortion(seed):
    """k-means is hard EM: each E-step + M-step pair cannot increase the distortion."""
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(25, 2)))
    cb = jnp.asarray(rng.normal(size=(4, 2)))
    distortion = []
    for _ in range(4):
        distortion.append(float(jnp.mean(jnp.min(vq.quantize(z, cb)[2], axis=1))))
        cb = _lloyd_step(z, cb).codebook
    assert np.all(np.diff(distortion) <= 1e-12), distortion


def test_perplexity_and_dead_codes():
    m = 6
    uniform = jnp.tile(jnp.arange(m), 3)
    np.testing.assert_allclose(vq.codebook_perplexity(uniform, m), m, rtol=1e-12)
    np.testing.assert_allclose(vq.codebook_perplexity(jnp.full(9, 2), m), 1.0, rtol=1e-12)
    p = np.array([0.5, 0.25, 0.25])
    got = vq.codebook_perplexity(jnp.array([0, 0, 1, 4]), m)
    np.testing.assert_allclose(got, np.exp(-np.sum(p * np.log(p))), rtol=1e-12)
    assert int(vq.dead_codes(uniform, m)) == 0
    assert int(vq.dead_codes(jnp.full(9, 2), m)) == m - 1
    assert int(vq.dead_codes(jnp.array([0, 0, 1, 4]), m)) == 3


def test_restart_fills_dead_codes_with_encoder_outputs(rng):
    z, codebook = _data(rng, n=10, m=5)
    usage = jnp.asarray([3.0, 0.0, 7.0, 0.0, 0.0])
    new = np.asarray(vq.restart_dead_codes(jax.random.key(1), codebook, usage, z))
    np.testing.assert_array_equal(new[[0, 2]], np.asarray(codebook)[[0, 2]])
    rows = [int(np.flatnonzero((np.asarray(z) == new[j]).all(1))[0]) for j in (1, 3, 4)]
    assert len(set(rows)) == 3  # drawn without replacement (n >= m)
    # Each restarted code sits on an encoder output, so it is now someone's nearest code.
    _, idx, _ = vq.quantize(z, jnp.asarray(new))
    assert {1, 3, 4} <= set(np.asarray(idx).tolist())


def test_vector_quantizer_module_parameter_codebook(rng):
    z = jnp.asarray(rng.normal(size=(8, 3)))
    layer = vq.VectorQuantizer(num_codes=4, code_dim=3)
    variables = layer.init(jax.random.key(0), z)
    codebook = variables["params"]["codebook"]
    assert codebook.shape == (4, 3)
    out, aux = layer.apply(variables, z)
    z_q, idx, _ = vq.quantize(z, codebook)
    np.testing.assert_allclose(out, z_q, atol=1e-15)
    np.testing.assert_array_equal(aux["indices"], idx)
    terms = vq.vq_loss_terms(z, codebook, beta=0.25)
    np.testing.assert_allclose(aux["loss"], terms.total, rtol=1e-14)
    np.testing.assert_allclose(aux["perplexity"], vq.codebook_perplexity(idx, 4), rtol=1e-14)


def test_vector_quantizer_module_ema_codebook(rng):
    z = jnp.asarray(rng.normal(size=(8, 3)))
    layer = vq.VectorQuantizer(num_codes=4, code_dim=3, ema=True, decay=0.5, eps=1e-3)
    variables = layer.init(jax.random.key(0), z)
    assert "params" not in variables
    state = variables["vq_stats"]["ema"]
    _, aux = layer.apply(variables, z)  # collection immutable: no update, no error
    (_, aux), updated = layer.apply(variables, z, mutable=["vq_stats"])
    want = vq.ema_update(state, z, aux["indices"], decay=0.5, eps=1e-3)
    np.testing.assert_allclose(updated["vq_stats"]["ema"].codebook, want.codebook, rtol=1e-14)
    np.testing.assert_allclose(aux["loss"], 0.25 * aux["commitment"], rtol=1e-14)
    (_, _), frozen = layer.apply(variables, z, train=False, mutable=["vq_stats"])
    np.testing.assert_array_equal(frozen["vq_stats"]["ema"].codebook, state.codebook)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda z: vq.quantize(z, jnp.zeros((0, 2))), "at least one code"),
        (lambda z: vq.vq_loss_terms(z, jnp.zeros((3, 2)), beta=-1.0), "beta"),
        (lambda z: vq.codebook_perplexity(jnp.zeros(4, int), 0), "codebook size"),
        (lambda z: vq.dead_codes(jnp.zeros(4, int), 0), "codebook size"),
        (
            lambda z: vq.ema_update(vq.ema_init(z[:2]), z, jnp.zeros(4, int), decay=1.0, eps=1e-5),
            "decay",
        ),
        (
            lambda z: vq.VectorQuantizer(num_codes=0, code_dim=2).init(jax.random.key(0), z),
            "num_codes",
        ),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((4, 2)))


def _tiny_vqvae(groups=2, code_dim=2, m=4, d=6):
    from emvi import nn as enn

    return vq.VQVAE(
        enn.MLP((8, groups * code_dim)),
        vq.VectorQuantizer(num_codes=m, code_dim=code_dim, beta=0.25),
        enn.BernoulliDecoder((8,), d),
        groups,
    )


def test_vqvae_loss_is_reconstruction_plus_vq_terms(rng):
    model = _tiny_vqvae()
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0)))
    x = jnp.asarray((rng.random((9, 6)) < 0.5).astype(np.float64))
    loss, aux = jax.jit(lambda p: vq.vqvae_loss(p, None, x, model=model))(params)
    # Oracle: every piece by hand, the nearest codes by brute force. (The networks and the
    # functions under test run jitted: eagerly, each primitive compiles on its own.)
    z_e = np.asarray(jax.jit(model.encoder.apply)(params.encoder, x)).reshape(18, 2)
    codebook = np.asarray(params.vq["params"]["codebook"])
    idx, d2 = _np_nearest(z_e, codebook)
    z_q = codebook[idx].reshape(9, 4)
    decode = jax.jit(lambda v, z: model.decoder.apply(v, z, x, method="log_prob"))
    recon = np.asarray(decode(params.decoder, jnp.asarray(z_q)))
    # codebook + beta * commitment: both are the mean squared distance to the nearest code.
    vq_terms = (1.0 + 0.25) * np.mean(d2[np.arange(18), idx])
    assert float(aux["recon"]) == pytest.approx(recon.mean(), rel=1e-12)
    got_vq = float(aux["vq_loss"])
    assert got_vq == pytest.approx(vq_terms, rel=1e-12)
    assert float(loss) == pytest.approx(-recon.mean() + got_vq, rel=1e-12)
    _, assigned = jax.jit(lambda p: vq.vqvae_assign(p, x, model=model))(params)
    np.testing.assert_array_equal(assigned, idx)
    log_lik = jax.jit(lambda p: vq.vqvae_log_likelihood(p, x, model=model))(params)
    np.testing.assert_allclose(log_lik, recon, rtol=1e-12)
    assert vq.vqvae_elbo(-3.0, groups=2, num_codes=4) == pytest.approx(-3.0 - 2 * np.log(4))
    sample = jax.jit(lambda k, p: vq.vqvae_sample(k, p, model=model, num=5))
    samples = sample(jax.random.key(1), params)
    assert samples.shape == (5, 6) and set(np.unique(np.asarray(samples))) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="groups"):
        vq.VQVAE(model.encoder, model.quantizer, model.decoder, 0)


@pytest.fixture(scope="module")
def vq_fit_setup():
    import optax

    model = _tiny_vqvae(m=6)
    rng = np.random.default_rng(3)
    x = (rng.random((40, 6)) < 0.5).astype(np.float32)
    params = model.init(jax.random.key(0))
    # All codes but one far from every encoder output: five start dead.
    codebook = params.vq["params"]["codebook"]
    far = codebook.at[1:].set(1e3)
    params = params._replace(vq={"params": {"codebook": far}})
    return model, params, x, optax.adam(1e-2)


def test_fit_vqvae_without_restarts_is_train_fit_on_the_vqvae_loss(vq_fit_setup, tmp_path):
    import functools

    from emvi import runs, train

    model, params, x, opt = vq_fit_setup
    keys = jax.random.split(jax.random.key(1))
    res = vq.fit_vqvae(
        keys, model, params, x, optimizer=opt, batch_size=10, num_epochs=3, workdir=tmp_path
    )
    # The oracle: emvi.train.fit's own loop over the same loss, key and optimizer.
    loss = functools.partial(vq.vqvae_loss, model=model)
    ref = train.fit(
        keys[0], loss, params, opt, x, batch_size=10, num_epochs=3, progress=False, resume=False
    )
    assert res.codes_restarted == 0
    np.testing.assert_array_equal(
        [r["loss"] for r in res.history], [r["loss"] for r in ref.history]
    )
    jax.tree.map(np.testing.assert_array_equal, res.params, ref.state.params)
    assert [r["train_dead_codes"] for r in res.history] == [5, 5, 5]
    assert [r["epoch"] for r in runs.read_metrics(tmp_path)] == [0, 1, 2]


def test_fit_vqvae_restarts_dead_codes_and_counts_them(vq_fit_setup):
    model, params, x, opt = vq_fit_setup
    res = vq.fit_vqvae(
        jax.random.key(1),
        model,
        params,
        x,
        optimizer=opt,
        batch_size=10,
        num_epochs=3,
        restart_epochs=2,
    )
    dead = [r["train_dead_codes"] for r in res.history]
    assert dead[0] == 5  # counted before the first restart
    assert res.codes_restarted == dead[0] + dead[1] > 0
    # Restarted codes sit on encoder outputs, so fewer are dead at the end than the five.
    assert vq.evaluate_vqvae(res.params, x, x, model=model)["dead_codes"] < 5
    with pytest.raises(ValueError, match="train_x"):
        vq.fit_vqvae(
            jax.random.key(1), model, params, x[:, :3], optimizer=opt, batch_size=10, num_epochs=1
        )


def test_evaluate_vqvae_matches_a_numpy_oracle(vq_fit_setup):
    model, params, x, _ = vq_fit_setup
    params = params._replace(vq=model.init(jax.random.key(2)).vq)  # every code alive
    test, train = x[:15], x[15:]
    out = vq.evaluate_vqvae(params, test, train, model=model)
    codebook = np.asarray(params.vq["params"]["codebook"])

    def nearest(data):
        z_e = np.asarray(model.encoder.apply(params.encoder, jnp.asarray(data))).reshape(-1, 2)
        return _np_nearest(z_e, codebook)[0]

    idx = nearest(test)
    z_q = jnp.asarray(codebook[idx].reshape(15, -1))
    recon = model.decoder.apply(params.decoder, z_q, jnp.asarray(test), method="log_prob")
    recon = np.asarray(recon)
    p = np.bincount(idx, minlength=6) / idx.size
    perplexity = np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))
    assert out["recon"] == pytest.approx(recon.mean(), rel=1e-6)  # float32 sums
    assert out["elbo"] == pytest.approx(out["recon"] - 2 * np.log(6), rel=1e-12)
    assert out["perplexity"] == pytest.approx(perplexity, rel=1e-6)
    assert out["dead_codes"] == 6 - np.unique(nearest(train)).size
    assert out["distinct_code_tuples_test"] == np.unique(idx.reshape(15, 2), axis=0).shape[0]
