r"""Latent Dirichlet Allocation by variational EM (batch) and online variational Bayes.

The model (Blei, Ng & Jordan 2003), for documents :math:`d` over a vocabulary of V words
with k topics: :math:`\beta_t \sim \mathrm{Dir}(\eta)` (one distribution over words per
topic), :math:`\theta_d \sim \mathrm{Dir}(\alpha)`, and each word token picks a topic
:math:`z \sim \mathrm{Cat}(\theta_d)` then a word :math:`w \sim \mathrm{Cat}(\beta_z)`.
The mean-field family is :math:`q(\beta_t) = \mathrm{Dir}(\lambda_t)`,
:math:`q(\theta_d) = \mathrm{Dir}(\gamma_d)`, :math:`q(z_{dw}) = \mathrm{Cat}(\phi_{dw})`.

**Local (E) step** — per document, to convergence (:func:`local_step`, vmapped over
documents, on device): with :math:`E[\log\theta_{dt}] = \psi(\gamma_{dt}) -
\psi(\sum_s \gamma_{ds})` and :math:`E[\log\beta_{tw}]` likewise from :math:`\lambda`,

.. math::
    \phi_{dwt} \propto e^{E[\log\theta_{dt}]} e^{E[\log\beta_{tw}]}, \qquad
    \gamma_{dt} = \alpha + \sum_w n_{dw} \phi_{dwt}
      = \alpha + e^{E[\log\theta_{dt}]} \sum_w \frac{n_{dw}}{\sum_s e^{E[\log\theta_{ds}]}
        e^{E[\log\beta_{sw}]} + \epsilon} e^{E[\log\beta_{tw}]},

iterated from :math:`\gamma_d = 1` until the mean absolute change of :math:`\gamma_d` is
below ``mean_change_tol`` or ``max_doc_update_iter`` passes (scikit-learn's inner loop and
its :math:`\exp E[\log\theta]` formulation; :math:`\phi` is never stored). Documents are the
rows of a dense (n, V) count matrix; absent words have count 0 and contribute nothing, so
ragged documents need no further masking.

**Global (M) step** — the expected topic-word counts :math:`S_{tw} = \sum_d n_{dw}
\phi_{dwt}` give :math:`\lambda = \eta + S` (batch, :func:`fit_batch`); online VB (Hoffman,
Blei & Bach 2010, :func:`fit_online`) takes, for minibatch :math:`B` at step
:math:`t = 1, 2, \dots`,

.. math::
    \rho_t = (\tau_0 + t)^{-\kappa}, \qquad
    \lambda \leftarrow (1 - \rho_t)\lambda + \rho_t\Big(\eta + \frac{D}{|B|} S_B\Big),

a natural-gradient step on the ELBO (:math:`\kappa \in (0.5, 1]` makes the steps satisfy
Robbins-Monro).

**ELBO** (:func:`elbo`, scikit-learn's ``_approx_bound``): with :math:`\phi` at its optimum
given :math:`\gamma, \lambda` the token terms collapse to
:math:`\sum_{dw} n_{dw}\log\sum_t e^{E[\log\theta_{dt}] + E[\log\beta_{tw}]}`; the Dirichlet
terms are :math:`E[\log p] - E[\log q]` of every :math:`\theta_d` and :math:`\beta_t`.
Perplexity is :math:`\exp(-\mathrm{ELBO} / \sum_{dw} n_{dw})` (an upper bound on the true
per-word perplexity).

The updates are scikit-learn's ``LatentDirichletAllocation`` (``tests/test_lda.py``
matches topics and perplexity from the same initial :math:`\lambda` to 1e-6), except that
each training E-step starts every :math:`\gamma_d` at 1 where scikit-learn draws it from
Gamma(100, 1/100).

Shape letters: ``n`` documents, ``v`` vocabulary size, ``k`` topics.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import digamma, gammaln
from jaxtyping import Array, ArrayLike, Float, Key

from emvi import _checks
from emvi._checks import check_positive, check_positive_int


class LDAPrior(NamedTuple):
    r"""Symmetric Dirichlet priors: ``doc_topic`` :math:`\alpha` (on each :math:`\theta_d`)
    and ``topic_word`` :math:`\eta` (on each :math:`\beta_t`), both > 0."""

    doc_topic: Float[Array, ""] | float
    topic_word: Float[Array, ""] | float


class LDAFit(NamedTuple):
    """What the fitting functions return.

    Attributes:
      topic_word: (k, v) :math:`\\lambda`, scikit-learn's ``components_``.
      elbo: the ELBO of the training documents (local step from :math:`\\gamma = 1`, as
        scikit-learn's final ``bound_``).
      perplexity: :math:`\\exp(-\\mathrm{ELBO} / \\text{words})`.
    """

    topic_word: Float[Array, "k v"]
    elbo: Float[Array, ""]
    perplexity: Float[Array, ""]


def dirichlet_expectation(conc: Float[Array, "... k"]) -> Float[Array, "... k"]:
    r""":math:`E[\log x_t] = \psi(c_t) - \psi(\sum_s c_s)` under :math:`\mathrm{Dir}(c)`
    (per row)."""
    return digamma(conc) - digamma(jnp.sum(conc, axis=-1, keepdims=True))


def _doc_step(counts, exp_beta, alpha, *, max_doc_update_iter, mean_change_tol):
    """One document's inner loop (scikit-learn's ``_update_doc_distribution``)."""
    dtype = counts.dtype
    eps = jnp.finfo(dtype).eps
    k = exp_beta.shape[0]
    gamma0 = jnp.ones((k,), dtype)
    exp_theta0 = jnp.exp(dirichlet_expectation(gamma0))

    def cond(s):
        _, _, it, done = s
        return (it < max_doc_update_iter) & ~done

    def body(s):
        gamma, exp_theta, it, _ = s
        norm = exp_theta @ exp_beta + eps
        new = exp_theta * (exp_beta @ (counts / norm)) + alpha
        new_exp = jnp.exp(dirichlet_expectation(new))
        done = jnp.mean(jnp.abs(new - gamma)) < mean_change_tol
        return new, new_exp, it + 1, done

    gamma, exp_theta, _, _ = lax.while_loop(
        cond, body, (gamma0, exp_theta0, jnp.array(0, jnp.int32), jnp.array(False))
    )
    norm = exp_theta @ exp_beta + eps
    return gamma, jnp.outer(exp_theta, counts / norm)


def local_step(
    topic_word: Float[Array, "k v"],
    x: Float[Array, "n v"],
    prior: LDAPrior,
    *,
    max_doc_update_iter: int = 100,
    mean_change_tol: float = 1e-3,
) -> tuple[Float[Array, "n k"], Float[Array, "k v"]]:
    r"""The local variational E-step of every document (vmapped), and the summed statistics.

    Args:
      topic_word: :math:`\lambda` (k, v).
      x: (n, v) word counts.
      prior: the priors (only :math:`\alpha` is used).
      max_doc_update_iter, mean_change_tol: the inner loop's settings (static / scalar).

    Returns:
      ``(gamma (n, k), stats (k, v))`` with ``stats`` :math:`S_{tw} = \sum_d n_{dw}
      \phi_{dwt}`.
    """
    dtype = x.dtype
    alpha = jnp.asarray(prior.doc_topic, dtype)
    exp_beta = jnp.exp(dirichlet_expectation(topic_word))
    one = functools.partial(
        _doc_step,
        exp_beta=exp_beta,
        alpha=alpha,
        max_doc_update_iter=max_doc_update_iter,
        mean_change_tol=jnp.asarray(mean_change_tol, dtype),
    )
    gamma, outer = jax.vmap(one)(x)
    return gamma, jnp.sum(outer, axis=0) * exp_beta


def _local_step_matmul(topic_word, x, alpha, max_doc_update_iter, mean_change_tol):
    """The same local step as :func:`local_step`, written for the whole batch at once: two
    (n, k) x (k, v) matmuls per inner iteration, each document frozen once it converged
    (what ``vmap`` of the per-document loop computes, without the (n, k, v) outer products)."""
    dtype = x.dtype
    eps = jnp.finfo(dtype).eps
    n = x.shape[0]
    k = topic_word.shape[0]
    exp_beta = jnp.exp(dirichlet_expectation(topic_word))
    gamma0 = jnp.ones((n, k), dtype)

    def cond(s):
        _, _, it, done = s
        return (it < max_doc_update_iter) & ~jnp.all(done)

    def body(s):
        gamma, exp_theta, it, done = s
        norm = exp_theta @ exp_beta + eps
        new = exp_theta * ((x / norm) @ exp_beta.T) + alpha
        new = jnp.where(done[:, None], gamma, new)
        new_exp = jnp.exp(dirichlet_expectation(new))
        now = jnp.mean(jnp.abs(new - gamma), axis=1) < mean_change_tol
        return new, new_exp, it + 1, done | now

    gamma, exp_theta, _, _ = lax.while_loop(
        cond,
        body,
        (
            gamma0,
            jnp.exp(dirichlet_expectation(gamma0)),
            jnp.array(0, jnp.int32),
            jnp.zeros((n,), bool),
        ),
    )
    norm = exp_theta @ exp_beta + eps
    return gamma, (exp_theta.T @ (x / norm)) * exp_beta


def _dirichlet_terms(prior_conc, conc, e_log, size):
    """:math:`\\sum E[\\log p] - E[\\log q]` of Dirichlet rows (scikit-learn's
    ``_loglikelihood``)."""
    return (
        jnp.sum((prior_conc - conc) * e_log)
        + jnp.sum(gammaln(conc) - gammaln(prior_conc))
        + jnp.sum(gammaln(prior_conc * size) - gammaln(jnp.sum(conc, axis=1)))
    )


def elbo(
    topic_word: Float[Array, "k v"],
    gamma: Float[Array, "n k"],
    x: Float[Array, "n v"],
    prior: LDAPrior,
) -> Float[Array, ""]:
    r"""The ELBO of the documents ``x`` at :math:`(\lambda, \gamma)` with :math:`\phi` optimal
    (module docstring), summed over documents and including the topics' Dirichlet terms."""
    dtype = x.dtype
    alpha = jnp.asarray(prior.doc_topic, dtype)
    eta = jnp.asarray(prior.topic_word, dtype)
    k, v = topic_word.shape
    e_theta = dirichlet_expectation(gamma)
    e_beta = dirichlet_expectation(topic_word)
    # log sum_t exp(a_dt + b_tw) as a matmul, shifted by the row and column maxima.
    a_max = jnp.max(e_theta, axis=1, keepdims=True)
    b_max = jnp.max(e_beta, axis=0, keepdims=True)
    mix = jnp.exp(e_theta - a_max) @ jnp.exp(e_beta - b_max)
    tokens = jnp.sum(x * (jnp.log(mix) + a_max + b_max))
    return (
        tokens
        + _dirichlet_terms(alpha, gamma, e_theta, k)
        + _dirichlet_terms(eta, topic_word, e_beta, v)
    )


def _finish(topic_word, x, prior, max_doc_update_iter, mean_change_tol):
    alpha = jnp.asarray(prior.doc_topic, x.dtype)
    gamma, _ = _local_step_matmul(topic_word, x, alpha, max_doc_update_iter, mean_change_tol)
    value = elbo(topic_word, gamma, x, prior)
    return LDAFit(topic_word, value, jnp.exp(-value / jnp.sum(x)))


@functools.partial(jax.jit, static_argnames=("max_iter", "max_doc_update_iter"))
def fit_batch(
    topic_word: Float[Array, "k v"],
    x: Float[Array, "n v"],
    prior: LDAPrior,
    *,
    max_iter: int = 10,
    max_doc_update_iter: int = 100,
    mean_change_tol: float | Array = 1e-3,
) -> LDAFit:
    r"""Batch variational EM from initial topics: ``max_iter`` rounds of local step then
    :math:`\lambda = \eta + S` (scikit-learn's ``learning_method="batch"``; no validation)."""
    dtype = x.dtype
    alpha = jnp.asarray(prior.doc_topic, dtype)
    eta = jnp.asarray(prior.topic_word, dtype)
    tol = jnp.asarray(mean_change_tol, dtype)

    def body(lam, _):
        _, stats = _local_step_matmul(lam, x, alpha, max_doc_update_iter, tol)
        return eta + stats, None

    lam, _ = lax.scan(body, topic_word.astype(dtype), None, length=max_iter)
    return _finish(lam, x, prior, max_doc_update_iter, tol)


@functools.partial(jax.jit, static_argnames=("max_iter", "batch_size", "max_doc_update_iter"))
def fit_online(
    topic_word: Float[Array, "k v"],
    x: Float[Array, "n v"],
    prior: LDAPrior,
    *,
    max_iter: int = 10,
    batch_size: int = 128,
    learning_offset: float | Array = 10.0,
    learning_decay: float | Array = 0.7,
    max_doc_update_iter: int = 100,
    mean_change_tol: float | Array = 1e-3,
) -> LDAFit:
    r"""Online VB from initial topics: ``max_iter`` passes over the documents in order, in
    minibatches of ``batch_size`` (the last one smaller, as scikit-learn's ``gen_batches``),
    each a step :math:`\rho_t = (\tau_0 + t)^{-\kappa}` with ``learning_offset``
    :math:`\tau_0` and ``learning_decay`` :math:`\kappa` (no validation)."""
    dtype = x.dtype
    n, v = x.shape
    alpha = jnp.asarray(prior.doc_topic, dtype)
    eta = jnp.asarray(prior.topic_word, dtype)
    tol = jnp.asarray(mean_change_tol, dtype)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    # Zero rows contribute nothing to S; each batch's true size sets D / |B|.
    xb = jnp.concatenate([x, jnp.zeros((pad, v), dtype)]).reshape(num_batches, batch_size, v)
    sizes = jnp.minimum(batch_size, n - batch_size * jnp.arange(num_batches)).astype(dtype)
    tau0 = jnp.asarray(learning_offset, dtype)
    kappa = jnp.asarray(learning_decay, dtype)

    def step(carry, batch):
        lam, t = carry
        xs, size = batch
        _, stats = _local_step_matmul(lam, xs, alpha, max_doc_update_iter, tol)
        rho = (tau0 + t) ** (-kappa)
        lam = (1.0 - rho) * lam + rho * (eta + (n / size) * stats)
        return (lam, t + 1.0), None

    def epoch(carry, _):
        return lax.scan(step, carry, (xb, sizes))[0], None

    (lam, _), _ = lax.scan(
        epoch, (topic_word.astype(dtype), jnp.ones((), dtype)), None, length=max_iter
    )
    return _finish(lam, x, prior, max_doc_update_iter, tol)


def perplexity(
    topic_word: Float[Array, "k v"],
    x: ArrayLike,
    prior: LDAPrior,
    *,
    max_doc_update_iter: int = 100,
    mean_change_tol: float = 1e-3,
) -> Float[Array, ""]:
    r"""Held-out perplexity bound :math:`\exp(-\mathrm{ELBO}(x) / \text{words})` of
    documents ``x`` under fixed topics (local step from :math:`\gamma = 1`), as
    scikit-learn's ``perplexity``."""
    x = jnp.asarray(as_doc_term(x))
    return _perplexity_jit(
        topic_word.astype(x.dtype),
        x,
        prior,
        max_doc_update_iter,
        jnp.asarray(mean_change_tol, x.dtype),
    )


@functools.partial(jax.jit, static_argnums=(3,))
def _perplexity_jit(topic_word, x, prior, max_doc_update_iter, tol):
    return _finish(topic_word, x, prior, max_doc_update_iter, tol).perplexity


# ---------------------------------------------------------------------------------------
# Data and validation
# ---------------------------------------------------------------------------------------


def as_doc_term(x, *, name: str = "x", allow_empty: bool = False) -> np.ndarray:
    """A user's document-term matrix (scipy sparse or dense) as a dense float array of counts.

    Raises ``ValueError`` for a non-2-D input, NaN, negative or non-integer counts, and
    (unless ``allow_empty``) a document with no words. Integer input becomes float32;
    float64 stays float64 when JAX's x64 mode is on.
    """
    if hasattr(x, "toarray"):
        x = x.toarray()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D document-term matrix; got shape {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must hold numeric word counts; got dtype {arr.dtype}.")
    if not np.issubdtype(arr.dtype, np.floating) or (
        arr.dtype == np.float64 and not jax.config.read("jax_enable_x64")
    ):
        arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf.")
    if np.any(arr < 0):
        raise ValueError(f"{name} has negative counts; word counts must be >= 0.")
    if np.any(arr != np.round(arr)):
        raise ValueError(f"{name} has non-integer counts; LDA needs whole word counts.")
    if not allow_empty:
        empty = np.nonzero(arr.sum(axis=1) == 0)[0]
        if empty.size:
            raise ValueError(
                f"{name} has {empty.size} empty document(s) (no words), e.g. row "
                f"{int(empty[0])}; remove them first."
            )
    return arr


def digits_documents(dtype=np.float32) -> np.ndarray:
    """scikit-learn's 8x8 digits as documents: (1797, 64) counts 0-16, one word per pixel."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(dtype)


def bars_topics(size: int = 5) -> np.ndarray:
    """The 2 * ``size`` true "bars" topics (Griffiths & Steyvers 2004): each uniform over one
    row or one column of a ``size`` x ``size`` image; shape (2 size, size**2)."""
    topics = np.zeros((2 * size, size, size))
    for i in range(size):
        topics[i, i, :] = 1.0 / size
        topics[size + i, :, i] = 1.0 / size
    return topics.reshape(2 * size, size * size)


def bars_corpus(
    seed: int, num_docs: int, *, size: int = 5, doc_length: int = 100, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Documents drawn from the bars topics: :math:`\\theta_d \\sim \\mathrm{Dir}(\\alpha)`,
    ``doc_length`` words each. Returns ``(counts (num_docs, size**2) float32, topics)``."""
    rng = np.random.default_rng(seed)
    topics = bars_topics(size)
    theta = rng.dirichlet(np.full(topics.shape[0], alpha), size=num_docs)
    probs = theta @ topics
    counts = np.stack([rng.multinomial(doc_length, p / p.sum()) for p in probs])
    return counts.astype(np.float32), topics


def topic_recovery(learned: ArrayLike, true: ArrayLike) -> tuple[float, np.ndarray]:
    """Matches learned topics (rows of :math:`\\lambda`, normalised) to true ones by the
    Hungarian algorithm on total-variation distance; returns (mean TV distance, matching)."""
    from scipy.optimize import linear_sum_assignment

    p = np.asarray(learned, np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    t = np.asarray(true, np.float64)
    dist = 0.5 * np.abs(p[:, None, :] - t[None, :, :]).sum(axis=2)
    rows, cols = linear_sum_assignment(dist)
    return float(dist[rows, cols].mean()), cols


def init_topics(key: Key[Array, ""], num_topics: int, vocab_size: int, dtype=jnp.float32):
    """Random initial :math:`\\lambda` ~ Gamma(100, 1/100) (scikit-learn's initialisation)."""
    return jax.random.gamma(key, 100.0, (num_topics, vocab_size), dtype) / 100.0


def fit(
    key: Key[Array, ""],
    x,
    num_topics: int,
    *,
    method: str = "batch",
    doc_topic_prior: float | None = None,
    topic_word_prior: float | None = None,
    max_iter: int = 10,
    batch_size: int = 128,
    learning_offset: float = 10.0,
    learning_decay: float = 0.7,
    max_doc_update_iter: int = 100,
    mean_change_tol: float = 1e-3,
    num_init: int = 1,
) -> LDAFit:
    r"""Fits LDA by batch variational EM or online VB, validating the inputs eagerly.

    ``num_init`` random starts run as one vmapped program; the one with the lowest training
    perplexity (highest ELBO) is returned.

    Args:
      key: typed PRNG key (initial topics, :func:`init_topics`).
      x: (n, v) document-term counts, dense or scipy sparse (:func:`as_doc_term`).
      num_topics: k >= 1.
      method: ``"batch"`` or ``"online"``.
      doc_topic_prior, topic_word_prior: :math:`\alpha, \eta > 0`; default 1/k
        (scikit-learn's).
      max_iter: passes over the corpus.
      batch_size: online minibatch size.
      learning_offset: :math:`\tau_0 \ge 0`; learning_decay: :math:`\kappa \in (0.5, 1]`.
      max_doc_update_iter, mean_change_tol: the per-document inner loop.

    Raises:
      ValueError: bad counts (negative, non-integer, NaN, an empty document), a prior or
        step setting out of range.

    Example:
      >>> x, _ = bars_corpus(0, 200)
      >>> res = fit(jax.random.key(0), x, 10, max_iter=5)
      >>> res.topic_word.shape
      (10, 25)
    """
    key = _checks.as_key(key)
    arr = as_doc_term(x)
    k = check_positive_int(num_topics, name="num_topics")
    if method not in ("batch", "online"):
        raise ValueError(f"method must be 'batch' or 'online'; got {method!r}.")
    alpha = 1.0 / k if doc_topic_prior is None else doc_topic_prior
    eta = 1.0 / k if topic_word_prior is None else topic_word_prior
    check_positive(alpha, name="doc_topic_prior")
    check_positive(eta, name="topic_word_prior")
    max_iter = check_positive_int(max_iter, name="max_iter")
    batch_size = check_positive_int(batch_size, name="batch_size")
    max_doc_update_iter = check_positive_int(max_doc_update_iter, name="max_doc_update_iter")
    tol = float(mean_change_tol)
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"mean_change_tol must be a finite number >= 0; got {mean_change_tol!r}.")
    kappa = float(learning_decay)
    if not 0.5 < kappa <= 1.0:
        raise ValueError(
            f"learning_decay (kappa) must lie in (0.5, 1] so the steps (tau0 + t)^-kappa "
            f"sum to infinity while their squares converge; got {learning_decay!r}."
        )
    tau0 = float(learning_offset)
    if not math.isfinite(tau0) or tau0 < 0:
        raise ValueError(
            f"learning_offset (tau0) must be a finite number >= 0; got {learning_offset!r}."
        )
    dtype = arr.dtype
    prior = LDAPrior(jnp.asarray(alpha, dtype), jnp.asarray(eta, dtype))
    num_init = check_positive_int(num_init, name="num_init")
    lam0 = jax.vmap(lambda kk: init_topics(kk, k, arr.shape[1], dtype))(
        jax.random.split(key, num_init)
    )
    steps = (jnp.asarray(tau0, dtype), jnp.asarray(kappa, dtype))
    return _restarts(
        lam0,
        jnp.asarray(arr),
        prior,
        jnp.asarray(tol, dtype),
        steps,
        method=method,
        max_iter=max_iter,
        batch_size=min(batch_size, arr.shape[0]),
        max_doc_update_iter=max_doc_update_iter,
    )


@functools.partial(
    jax.jit, static_argnames=("method", "max_iter", "batch_size", "max_doc_update_iter")
)
def _restarts(lam0, x, prior, tol, steps, *, method, max_iter, batch_size, max_doc_update_iter):
    """Every start as one vmapped program; keeps the lowest training perplexity."""

    def run(lam):
        if method == "batch":
            return fit_batch.__wrapped__(
                lam,
                x,
                prior,
                max_iter=max_iter,
                max_doc_update_iter=max_doc_update_iter,
                mean_change_tol=tol,
            )
        return fit_online.__wrapped__(
            lam,
            x,
            prior,
            max_iter=max_iter,
            batch_size=batch_size,
            learning_offset=steps[0],
            learning_decay=steps[1],
            max_doc_update_iter=max_doc_update_iter,
            mean_change_tol=tol,
        )

    fits = jax.vmap(run)(lam0)
    best = jnp.argmin(jnp.where(jnp.isnan(fits.perplexity), jnp.inf, fits.perplexity))
    return jax.tree_util.tree_map(lambda leaf: leaf[best], fits)
