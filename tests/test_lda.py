"""LDA: scikit-learn oracle (batch and online), the vmapped local step, bars recovery, input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from sklearn.decomposition import LatentDirichletAllocation
from sklearn.decomposition._online_lda_fast import _dirichlet_expectation_2d

from emvi import lda


def _sklearn_from_topics(x, lam0, method, iters, batch_size):
    est = LatentDirichletAllocation(
        n_components=lam0.shape[0],
        learning_method=method,
        max_iter=iters,
        batch_size=batch_size,
        random_state=0,
    )
    init = est._init_latent_vars

    def same_topics(n_features, dtype=np.float64):
        init(n_features, dtype)
        est.components_ = lam0.copy()
        est.exp_dirichlet_component_ = np.exp(_dirichlet_expectation_2d(lam0))

    est._init_latent_vars = same_topics
    # Every training E-step starts gamma at 1 (scikit-learn draws Gamma(100, 1/100)).
    e_step = est._e_step
    est._e_step = lambda X, cal_sstats, random_init, parallel=None: e_step(
        X, cal_sstats, False, parallel
    )
    est.fit(x)
    return est


@pytest.mark.parametrize("method", ["batch", "online"])
def test_matches_sklearn_from_the_same_topics(method):
    # Digits as documents (300 images, 64 pixel-words, counts 0-16), k = 6, 3 passes, the
    # default inner loop (100 iterations, mean change 1e-3), minibatches of 128 (the last
    # one 44) for online. The tolerance is the 1e-6; measured ~1e-9 (topics) and
    # ~1e-11 (perplexity): the inner loop's stopping test makes the results depend on
    # rounding only through documents that sit at the 1e-3 threshold.
    x = lda.digits_documents(np.float64)[:300]
    k = 6
    lam0 = np.random.default_rng(0).gamma(100.0, 0.01, (k, 64))
    est = _sklearn_from_topics(x, lam0, method, 3, 128)
    prior = lda.LDAPrior(1.0 / k, 1.0 / k)
    if method == "batch":
        res = lda.fit_batch(jnp.asarray(lam0), jnp.asarray(x), prior, max_iter=3)
    else:
        res = lda.fit_online(jnp.asarray(lam0), jnp.asarray(x), prior, max_iter=3, batch_size=128)
    lam = np.asarray(res.topic_word)
    assert np.max(np.abs(lam - est.components_)) / np.max(est.components_) < 1e-6
    assert abs(float(res.perplexity) - est.bound_) / est.bound_ < 1e-6
    # The per-document, vmapped local step is the batched one (same gamma, same statistics),
    # and its statistics sum to the number of words (each token's phi sums to one).
    g1, s1 = lda.local_step(res.topic_word, jnp.asarray(x), prior)
    g2, s2 = lda._local_step_matmul(res.topic_word, jnp.asarray(x), 1.0 / k, 100, 1e-3)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-10)
    assert float(jnp.sum(s1)) == pytest.approx(float(x.sum()), rel=1e-10)
    # Held-out perplexity is scikit-learn's perplexity of the same topics.
    held = lda.digits_documents(np.float64)[1500:1600]
    want = est.perplexity(held)
    assert abs(float(lda.perplexity(res.topic_word, held, prior)) - want) / want < 1e-6


def test_batch_recovers_the_bars_topics():
    # 10 bars topics on a 5x5 grid, 300 documents of 100 words (theta ~ Dir(1)): the best of
    # 3 random starts of 100 batch-VB passes (lowest training perplexity) finds every bar
    # (mean total-variation distance to the matched true topic < 0.1; measured 0.036).
    # After only 40 passes the starts still share bars between topics (TV 0.13-0.2).
    x, topics = lda.bars_corpus(0, 300)
    res = lda.fit(jax.random.key(0), x, 10, max_iter=100, doc_topic_prior=1.0, num_init=3)
    tv, match = lda.topic_recovery(res.topic_word, topics)
    assert tv < 0.1
    assert sorted(match.tolist()) == list(range(10))


def test_doc_term_loader_and_bad_input():
    dense = np.array([[1, 0, 2], [0, 3, 0]])
    np.testing.assert_array_equal(lda.as_doc_term(scipy.sparse.csr_matrix(dense)), dense)
    assert lda.as_doc_term(dense).dtype == np.float32
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="negative"):
        lda.fit(key, -dense, 2)
    with pytest.raises(ValueError, match="non-integer"):
        lda.fit(key, dense + 0.5, 2)
    with pytest.raises(ValueError, match="empty document"):
        lda.fit(key, np.array([[1, 0, 2], [0, 0, 0]]), 2)
    with pytest.raises(ValueError, match="doc_topic_prior"):
        lda.fit(key, dense, 2, doc_topic_prior=0.0)
    with pytest.raises(ValueError, match="topic_word_prior"):
        lda.fit(key, dense, 2, topic_word_prior=-1.0)
    for kappa in (0.5, 1.2):
        with pytest.raises(ValueError, match="learning_decay"):
            lda.fit(key, dense, 2, method="online", learning_decay=kappa)


# ---------------------------------------------------------------------------------------
# Fixed topics: mean-field optimum and the amortized logistic-normal encoder
# ---------------------------------------------------------------------------------------


def _tiny_corpus():
    """6 documents of 3-12 words over 4 words, 2 fixed topics (float64), alpha = 0.5."""
    rng = np.random.default_rng(3)
    topics = rng.dirichlet(np.ones(4), size=2)
    x = rng.multinomial(1, [0.25] * 4, size=(6, 12)).sum(axis=1).astype(np.float64)
    x[0] = [3, 0, 0, 0]
    x[1] = [0, 1, 1, 1]
    return x, topics, 0.5


def _exact_log_evidence(x, topics, alpha):
    """log p(w | alpha, beta) with theta ~ Beta(alpha, alpha) (k = 2), by adaptive quadrature
    with the Beta weight handled exactly (quad's algebraic weight, so the endpoint
    singularities of alpha < 1 cost no accuracy)."""
    from scipy import integrate, special

    out = []
    for doc in x:

        def lik(t, doc=doc):
            return np.prod((t * topics[0] + (1 - t) * topics[1]) ** doc)

        val, err = integrate.quad(
            lik, 0, 1, weight="alg", wvar=(alpha - 1, alpha - 1), epsabs=0, epsrel=1e-12
        )
        assert err < 1e-10 * val
        out.append(np.log(val) - special.betaln(alpha, alpha))
    return np.array(out)


def _numpy_mean_field(x, topics, gamma, alpha):
    """Blei et al.'s per-document bound with optimal phi, written out in NumPy/SciPy."""
    from scipy.special import digamma, gammaln

    k = topics.shape[0]
    e = digamma(gamma) - digamma(gamma.sum(1, keepdims=True))
    phi = np.exp(e)[:, :, None] * topics[None]  # (n, k, v), unnormalised
    z = phi.sum(1, keepdims=True)
    phi = phi / z
    with np.errstate(divide="ignore", invalid="ignore"):
        token = np.where(phi > 0, phi * (e[:, :, None] + np.log(topics)[None] - np.log(phi)), 0.0)
    tokens = np.sum(x[:, None, :] * token, axis=(1, 2))
    theta = (
        gammaln(k * alpha)
        - k * gammaln(alpha)
        + ((alpha - 1) * e).sum(1)
        - (gammaln(gamma.sum(1)) - gammaln(gamma).sum(1) + ((gamma - 1) * e).sum(1))
    )
    return tokens + theta


def test_amortized_and_mean_field_bound_the_exact_evidence():
    x, topics, alpha = _tiny_corpus()
    log_p = _exact_log_evidence(x, topics, alpha)

    # Mean field at the per-document optimum: its formula is the NumPy one (to rounding,
    # 1e-10 relative) and it is below log p(w) (deterministic; the quadrature's error is
    # < 1e-10 relative).
    gamma, mf = lda.doc_bound(topics, x, alpha)
    mf = np.asarray(mf)
    want = _numpy_mean_field(x, topics, np.asarray(gamma), alpha)
    np.testing.assert_allclose(mf, want, rtol=1e-10)
    assert np.all(mf <= log_p + 1e-9)

    # The encoder: training raises its ELBO (the loss is -ELBO per word, one 4-draw
    # estimate per step: the first 30 steps' mean against the last 30's, 4 standard errors
    # apart, the error from the spread of each window), and its ELBO is below log p(w) per
    # document (1000 draws per document, 4 standard errors).
    fit = lda.fit_amortized(
        jax.random.key(0),
        topics,
        x,
        alpha,
        hidden=(8,),
        num_steps=300,
        learning_rate=1e-2,
        num_samples=4,
    )
    losses = np.asarray(fit.losses)
    first, last = losses[:30], losses[-30:]
    se = np.sqrt(first.var(ddof=1) / 30 + last.var(ddof=1) / 30)
    assert first.mean() - last.mean() > 4 * se
    after, se1 = (
        np.asarray(v) for v in lda.amortized_elbo(jax.random.key(1), fit, topics, x, alpha)
    )
    assert np.all(after <= log_p + 4 * se1)

    # The density the bound uses is the density of q: importance sampling with q as the
    # proposal recovers log p(w) (a missing Jacobian would shift it), within 5 delta-method
    # standard errors of the log of the mean weight.
    s = 20_000

    @jax.jit  # one program (eagerly, each primitive compiles on its own)
    def log_weights(params):
        mean, scale = fit.encoder.apply(params, lda._features(jnp.asarray(x)))
        eps = jax.random.normal(jax.random.key(2), (s, *mean.shape), mean.dtype)
        log_joint, log_q = lda._ln_terms(
            eps, mean[None], scale[None], jnp.asarray(topics), jnp.asarray(x)[None],
            jnp.asarray(alpha),
        )  # fmt: skip
        return log_joint - log_q

    log_w = np.asarray(log_weights(fit.params))
    w = np.exp(log_w - log_w.max(0))
    is_est = np.log(w.mean(0)) + log_w.max(0)
    is_se = w.std(0) / (np.sqrt(s) * w.mean(0))
    assert np.all(np.abs(is_est - log_p) < 5 * is_se + 1e-12)

    # The per-document optimum of the same family is above the encoder, up to MC error.
    g = lda.amortization_gap(
        jax.random.key(3), fit, topics, x, alpha, num_samples=500, refine_steps=100
    )
    assert g.amortization_gap > -4 * g.amortization_gap_se
    assert g.gap_vs_mean_field == pytest.approx(g.mean_field - g.amortized)


def test_amortized_runs_in_float32():
    x, true = lda.bars_corpus(0, 40)  # float32 counts
    fit = lda.fit_amortized(jax.random.key(0), true, x, 1.0, hidden=(8,), num_steps=5)
    assert fit.losses.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(fit.losses)))


def test_bad_input_to_the_other_entry_points():
    x = np.array([[1.0, 0, 2], [0, 3, 0]])
    lam = np.ones((2, 3))
    prior = lda.LDAPrior(0.5, 0.5)
    for fn in (lda.fit_batch, lda.fit_online, lda.perplexity):
        with pytest.raises(ValueError, match="negative"):
            fn(lam, -x, prior)
        with pytest.raises(ValueError, match="empty document"):
            fn(lam, np.array([[1.0, 0, 2], [0, 0, 0]]), prior)
        with pytest.raises(ValueError, match="topic_word must have shape"):
            fn(np.ones((2, 4)), x, prior)
        with pytest.raises(ValueError, match="finite and > 0"):
            fn(-lam, x, prior)
        with pytest.raises(ValueError, match="alpha"):
            fn(lam, x, lda.LDAPrior(0.0, 0.5))
        with pytest.raises(ValueError, match="eta"):
            fn(lam, x, lda.LDAPrior(0.5, -1.0))
    for kappa in (0.5, 0.2, 1.01, float("nan")):
        with pytest.raises(ValueError, match="learning_decay"):
            lda.fit_online(lam, x, prior, learning_decay=kappa)
    with pytest.raises(ValueError, match="learning_offset"):
        lda.fit_online(lam, x, prior, learning_offset=-1.0)
    with pytest.raises(ValueError, match="mean_change_tol"):
        lda.fit_batch(lam, x, prior, mean_change_tol=float("nan"))
    # kappa = 1 is inside (0.5, 1]: accepted.
    assert np.isfinite(float(lda.fit_online(lam, x, prior, learning_decay=1.0, max_iter=1).elbo))
    topics = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="non-integer"):
        lda.doc_bound(topics, x + 0.5, 0.5)
    with pytest.raises(ValueError, match="doc_topic_prior"):
        lda.doc_bound(topics, x, 0.0)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        lda.fit_amortized(jax.random.key(0), 2 * topics, x, 0.5)
    with pytest.raises(ValueError, match="doc_topic_prior"):
        lda.fit_amortized(jax.random.key(0), topics, x, -1.0)
    with pytest.raises(ValueError, match="empty document"):
        lda.fit_amortized(jax.random.key(0), topics, np.zeros((2, 3)), 0.5)
