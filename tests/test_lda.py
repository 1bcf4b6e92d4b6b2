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
