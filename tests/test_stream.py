"""Streamed batch EM, stepwise online EM and incremental EM (emvi.stream).

Oracles: in-memory EM through the one driver (``em.fit`` with the same chunking) for the
streamed batch EM; the batch-EM fixed point for the online variants; the Neal-Hinton free
energy, recomputed here from the stored posteriors, for incremental EM.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emvi import bernoulli_mixture as bm
from emvi import em, gmm, stream


def _gmm_data(rng, n=600):
    means = np.array([[-3.0, 0.0], [0.0, 3.0], [3.0, -1.0]])
    labels = rng.integers(0, 3, n)
    return means[labels] + rng.normal(size=(n, 2)) * np.array([0.7, 1.1])


def _gmm_start(x, ct="diag"):
    k = 3
    d = x.shape[1]
    cov = {"diag": np.ones((k, d)), "full": np.broadcast_to(np.eye(d), (k, d, d)).copy()}[ct]
    return gmm.GMMParams(
        jnp.full((k,), 1.0 / k), jnp.asarray(x[[0, 1, 2]]), jnp.asarray(cov, x.dtype)
    )


def _batch(p):
    return jax.tree_util.tree_map(lambda a: a[None], p)


@pytest.mark.parametrize("ct", ["diag", "full"])
def test_streamed_batch_em_equals_in_memory_em(rng, ct):
    # Same chunks, same order of additions: equal up to reassociation inside XLA (the bound
    # 1e-10 relative is the issue's; the agreement seen is ~1e-15).
    x = _gmm_data(rng)
    p0 = _gmm_start(x, ct)
    model = gmm.model(ct)
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    ref = em.fit(
        model, _batch(p0), jnp.asarray(x), max_iter=8, tol=0.0, hyper=hyper, chunk_size=128
    )
    res = stream.fit_source(
        model, p0, stream.from_array(x, chunk_size=128), max_iter=8, tol=0.0, hyper=hyper
    )
    np.testing.assert_allclose(res.history, ref.history, rtol=1e-10)
    np.testing.assert_allclose(res.log_likelihood, ref.log_likelihood, rtol=1e-10)
    for a, b in zip(res.params, ref.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert int(res.num_iter) == 8


def test_memory_mapped_file_and_shuffled_epochs_give_the_same_fit(rng, tmp_path):
    x = (rng.random((500, 7)) < 0.35).astype(np.float64)
    path = tmp_path / "x.npy"
    np.save(path, x)
    p0 = bm.BernoulliMixtureParams(
        jnp.full((3,), 1 / 3), jnp.asarray(rng.uniform(0.2, 0.8, (3, 7)))
    )
    model = bm.model()
    ref = em.fit(model, _batch(p0), jnp.asarray(x), max_iter=6, tol=0.0, chunk_size=100)
    mm = stream.fit_source(model, p0, stream.from_npy(path, chunk_size=100), max_iter=6, tol=0.0)
    np.testing.assert_allclose(mm.log_likelihood, ref.log_likelihood, rtol=1e-10)
    # Shuffling changes only the order of the sums: agreement to reassociation error.
    sh = stream.fit_source(
        model, p0, stream.from_npy(path, chunk_size=64, seed=3), max_iter=6, tol=0.0
    )
    np.testing.assert_allclose(sh.log_likelihood, ref.log_likelihood, rtol=1e-10)
    np.testing.assert_allclose(sh.params.probs, ref.params.probs, rtol=1e-9, atol=1e-12)


def test_callable_source_with_weights_equals_duplicated_rows(rng):
    x = _gmm_data(rng, 200)
    counts = rng.integers(1, 4, 200)

    def chunks(epoch):
        for lo in range(0, 200, 70):
            yield x[lo : lo + 70], counts[lo : lo + 70].astype(np.float64)

    p0 = _gmm_start(x)
    model = gmm.model("diag")
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    src = stream.from_callable(chunks, chunk_size=50)
    a = stream.fit_source(model, p0, src, max_iter=5, tol=0.0, hyper=hyper)
    dup = np.repeat(x, counts, axis=0)
    b = em.fit(model, _batch(p0), jnp.asarray(dup), max_iter=5, tol=0.0, hyper=hyper)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-10)


def test_interrupted_fit_resumes_from_its_last_statistics(rng, tmp_path):
    x = _gmm_data(rng, 300)
    p0 = _gmm_start(x)
    model = gmm.model("diag")
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    src = stream.from_array(x, chunk_size=64)
    full = stream.fit_source(model, p0, src, max_iter=7, tol=0.0, hyper=hyper)
    ckpt = tmp_path / "ckpt"
    stream.fit_source(model, p0, src, max_iter=3, tol=0.0, hyper=hyper, checkpoint_dir=ckpt)
    resumed = stream.fit_source(
        model, p0, src, max_iter=7, tol=0.0, hyper=hyper, checkpoint_dir=ckpt
    )
    np.testing.assert_array_equal(resumed.history, full.history)
    for a, b in zip(resumed.params, full.params, strict=True):
        np.testing.assert_array_equal(a, b)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        stream.fit_source(model, p0, src, max_iter=7, hyper=hyper, checkpoint_dir=ckpt)


def _batch_optimum(model, p0, x, hyper):
    return em.fit(model, _batch(p0), jnp.asarray(x), max_iter=500, tol=1e-12, hyper=hyper)


def test_stepwise_online_em_reaches_the_batch_fixed_point(rng):
    # After T minibatches of b points, the running statistics average about 1 / rho_T recent
    # minibatches, i.e. ~ b / rho_T points (here ~ 3e4 >= n), so the online means sit within
    # a few sampling standard errors (sigma / sqrt(n) ~ 0.01) of the batch optimum.
    x = _gmm_data(rng, 20_000)
    p0 = _gmm_start(x)
    model = gmm.model("diag")
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    batch = _batch_optimum(model, p0, x, hyper)
    src = stream.from_array(x, chunk_size=500, seed=0)
    params, info = stream.online_em(model, p0, src, num_epochs=8, alpha=0.6, t0=2.0, hyper=hyper)
    order = np.argsort(np.asarray(batch.params.means[:, 0]))
    got = np.argsort(np.asarray(params.means[:, 0]))
    np.testing.assert_allclose(
        np.asarray(params.means)[got], np.asarray(batch.params.means)[order], atol=0.05
    )
    ll = stream.final_log_likelihood(model, params, stream.from_array(x, chunk_size=5000))
    assert float(batch.log_likelihood) - ll < 2e-3
    assert info.step_size[0] == 1.0 and info.step_size[1] == pytest.approx(4.0**-0.6)
    assert len(info.step) == 8 * 40


def test_incremental_em_never_lowers_the_free_energy_and_reaches_the_fixed_point(rng):
    x = _gmm_data(rng, 900)
    p0 = _gmm_start(x)
    model = gmm.model("diag")
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    c = 150
    chunks = [jnp.asarray(x[i : i + c]) for i in range(0, 900, c)]
    data = [model.prepare(xc) for xc in chunks]
    # The free energy F = sum_c ELBO_c(q_c, theta) with q_c the posterior stored at chunk c's
    # last visit: every partial E-step and every M-step raises it (Neal & Hinton, 1998).
    q_store = [model.posterior(p0, d) for d in data]
    prev = {"params": None}
    energies = []

    def free_energy(params):
        return sum(
            float(jnp.sum(model.elbo(params, q, d))) for q, d in zip(q_store, data, strict=True)
        )

    def callback(t, params):
        j = (t - 1) % len(chunks)
        q_store[j] = model.posterior(prev["params"], data[j])
        energies.append(free_energy(params))
        prev["params"] = params

    # The initial full pass stores every posterior at p0, then one M-step.
    first = em.run_em(model, p0, model.prepare(jnp.asarray(x)), max_iter=1, tol=0.0, hyper=hyper)
    prev["params"] = first.params
    energies.append(free_energy(first.params))
    params, state = stream.incremental_em(
        model, p0, stream.from_array(x, chunk_size=c), num_epochs=30, hyper=hyper, callback=callback
    )
    steps = np.diff(np.asarray(energies))
    scale = np.max(np.abs(energies))
    assert np.all(steps >= -1e-12 * scale), steps.min()
    batch = _batch_optimum(model, p0, x, hyper)
    ll = stream.final_log_likelihood(model, params, stream.from_array(x, chunk_size=c))
    np.testing.assert_allclose(ll, float(batch.log_likelihood), atol=1e-7)
    total = jax.tree_util.tree_map(lambda *a: sum(a), *state.chunk_stats)
    for a, b in zip(
        jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(state.total), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_bad_sources_and_settings_raise_clear_errors(rng, tmp_path):
    x = _gmm_data(rng, 100)
    p0 = _gmm_start(x)
    model = gmm.model("diag")

    def changing(epoch):
        yield x[:50]
        yield x[50:, :1]

    with pytest.raises(ValueError, match="columns"):
        stream.fit_source(model, p0, stream.from_callable(changing, chunk_size=50), max_iter=2)

    def dtype_change(epoch):
        yield x[:50]
        yield x[50:].astype(np.float32)

    with pytest.raises(ValueError, match="dtype"):
        stream.fit_source(model, p0, stream.from_callable(dtype_change, chunk_size=50), max_iter=2)
    with pytest.raises(ValueError, match="empty"):
        stream.from_callable(lambda epoch: iter(()), chunk_size=10)
    np.save(tmp_path / "v.npy", np.zeros(5))
    with pytest.raises(ValueError, match="2-D"):
        stream.from_npy(tmp_path / "v.npy", chunk_size=2)
    (tmp_path / "junk.npy").write_text("not an array")
    with pytest.raises(ValueError, match="not a readable"):
        stream.from_npy(tmp_path / "junk.npy", chunk_size=2)
    with pytest.raises(ValueError, match="not a file"):
        stream.from_npy(tmp_path / "missing.npy", chunk_size=2)
    src = stream.from_array(x, chunk_size=10)
    for alpha in (0.5, 1.2, 0.0):
        with pytest.raises(ValueError, match=r"\(0.5, 1\]"):
            stream.online_em(model, p0, src, alpha=alpha)
    with pytest.raises(ValueError, match="seed=None"):
        stream.incremental_em(model, p0, stream.from_array(x, chunk_size=10, seed=1))
    with pytest.raises(ValueError, match="chunk_size"):
        stream.from_array(x, chunk_size=0)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        stream.from_array(bad, chunk_size=10)
    with pytest.raises(ValueError, match="float32"):
        stream.fit_source(model, p0, stream.from_array(x.astype(np.float32), chunk_size=10))


def test_many_data_sets_in_one_call_equal_one_fit_each(rng):
    xs = np.stack([_gmm_data(np.random.default_rng(s), 300) for s in range(3)])
    model = gmm.model("diag")
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    p0 = [_gmm_start(x) for x in xs]
    batch = jax.tree_util.tree_map(lambda *a: jnp.stack([jnp.stack([b, b]) for b in a]), *p0)
    many = em.fit_many(model, batch, jnp.asarray(xs), max_iter=6, tol=0.0, hyper=hyper)
    for i in range(3):
        one = em.fit(model, _batch(p0[i]), jnp.asarray(xs[i]), max_iter=6, tol=0.0, hyper=hyper)
        np.testing.assert_allclose(many.log_likelihood[i], one.log_likelihood, rtol=1e-12)
        np.testing.assert_allclose(many.params.means[i], one.params.means, rtol=1e-12, atol=1e-12)


def test_a_vae_trains_from_a_memory_mapped_file_as_from_the_array(rng, tmp_path):
    import optax

    from emvi import vae

    x = (rng.random((130, 12)) < 0.3).astype(np.float32)
    path = tmp_path / "bin.npy"
    np.save(path, x)
    model = vae.gaussian_vae(12, 2, (8,))
    params = model.init(jax.random.key(0))

    def loss_fn(p, key, xb, wb):
        recon, kl = vae.gaussian_elbo_terms(p, key, xb, model=model)
        return -jnp.sum(wb * (recon - kl)) / jnp.sum(wb)

    opt = optax.adam(1e-2)
    runs = [
        stream.train_on_source(jax.random.key(1), loss_fn, opt, params, src, num_epochs=4)
        for src in (stream.from_npy(path, chunk_size=32), stream.from_array(x, chunk_size=32))
    ]
    (pa, _, ia), (pb, _, ib) = runs
    assert ia.num_steps == 4 * 5
    assert ia.epoch_loss == ib.epoch_loss
    assert ia.epoch_loss[-1] < ia.epoch_loss[0]
    for a, b in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb), strict=True):
        np.testing.assert_array_equal(a, b)
