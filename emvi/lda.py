r"""Latent Dirichlet Allocation: variational EM (batch), online VB, and amortized VI.

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

**Amortized VI, topics fixed** (:func:`fit_amortized`): an encoder (ProdLDA's, Srivastava
& Sutton 2017) maps a document's counts to a Gaussian over :math:`h \in \mathbb R^{k-1}`
with :math:`\theta = \mathrm{softmax}(h, 0)`, trained on the ELBO with each word's topic
summed out, :math:`\sum_w n_{dw} \log \sum_t \theta_t \beta_{tw}`, and the Dirichlet
prior kept exactly (by Monte Carlo, not ProdLDA's Laplace approximation), so it bounds the
same :math:`\log p(w_d \mid \alpha, \beta)` as the per-document mean-field optimum of
:func:`doc_bound`; :func:`amortization_gap` compares the two, and the encoder with the same
family optimised per document (Cremer et al. 2018), in nats per word.

The updates are scikit-learn's ``LatentDirichletAllocation`` (``tests/test_lda.py``
matches topics and perplexity from the same initial :math:`\lambda` to 1e-6), except that
each training E-step starts every :math:`\gamma_d` at 1 where scikit-learn draws it from
Gamma(100, 1/100).

Shape letters: ``n`` documents, ``v`` vocabulary size, ``k`` topics.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.scipy.special import digamma, gammaln
from jaxtyping import Array, ArrayLike, Float, Key

from emvi import _checks, nn
from emvi._checks import check_number, check_positive, check_positive_int
from emvi.optim import run_steps

PyTree = Any


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


def _size_ladder(n: int, smallest: int = 8) -> tuple[int, ...]:
    """Row counts the compacted inner loop may run at: ``n``, then halving (rounded up) down
    to ``smallest``; ascending."""
    sizes = [n]
    while sizes[-1] > smallest:
        sizes.append(-(-sizes[-1] // 2))
    return tuple(sizes[::-1])


def _local_step_matmul(topic_word, x, alpha, max_doc_update_iter, mean_change_tol):
    r"""The same local step as :func:`local_step`, written for the whole batch at once
    (:func:`_local_step_exp` with :math:`e^{E[\log\beta]}` from :math:`\lambda`)."""
    exp_beta = jnp.exp(dirichlet_expectation(topic_word))
    return _local_step_exp(exp_beta, x, alpha, max_doc_update_iter, mean_change_tol)


def _local_step_exp(exp_beta, x, alpha, max_doc_update_iter, mean_change_tol):
    r"""The batched local step given :math:`e^{E[\log\beta]}` (k, v): two (m, k) x (k, v)
    matmuls per inner iteration over the m documents still moving.

    Every document runs its own loop (the per-document one of :func:`local_step`: the same
    iterates, frozen once converged). Documents converge at very different speeds (on a
    50-topic corpus from fitted topics the mean is ~30 inner iterations, the slowest 100),
    so iterating all n rows until the last one stops would cost ``n * max`` instead of the
    ``sum`` of the documents' iterations. Each iteration therefore works on the unfinished
    documents only, gathered (active first, a stable argsort of ``done``) into the smallest
    size of :func:`_size_ladder` that holds them (a ``lax.switch`` over the static sizes),
    so the work is at most twice the sum."""
    dtype = x.dtype
    eps = jnp.finfo(dtype).eps
    n = x.shape[0]
    k = exp_beta.shape[0]
    gamma0 = jnp.ones((n, k), dtype)
    sizes = _size_ladder(n)

    def update(xs, g, e, d):
        norm = e @ exp_beta + eps
        new = e * ((xs / norm) @ exp_beta.T) + alpha
        new = jnp.where(d[:, None], g, new)
        new_exp = jnp.exp(dirichlet_expectation(new))
        now = jnp.mean(jnp.abs(new - g), axis=1) < mean_change_tol
        return new, new_exp, d | now

    def at_size(size):
        def run(gamma, exp_theta, done):
            if size == n:
                return update(x, gamma, exp_theta, done)
            idx = jnp.argsort(done, stable=True)[:size]
            new, new_exp, d = update(x[idx], gamma[idx], exp_theta[idx], done[idx])
            return gamma.at[idx].set(new), exp_theta.at[idx].set(new_exp), done.at[idx].set(d)

        return run

    branches = [at_size(size) for size in sizes]
    ladder = jnp.asarray(sizes, jnp.int32)

    def cond(s):
        _, _, it, done = s
        return (it < max_doc_update_iter) & ~jnp.all(done)

    def body(s):
        gamma, exp_theta, it, done = s
        active = jnp.sum(~done, dtype=jnp.int32)
        branch = jnp.searchsorted(ladder, active)
        gamma, exp_theta, done = lax.switch(branch, branches, gamma, exp_theta, done)
        return gamma, exp_theta, it + 1, done

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
def _fit_batch(
    topic_word: Float[Array, "k v"],
    x: Float[Array, "n v"],
    prior: LDAPrior,
    *,
    max_iter: int = 10,
    max_doc_update_iter: int = 100,
    mean_change_tol: float | Array = 1e-3,
) -> LDAFit:
    r"""Batch variational EM, jitted, no validation (:func:`fit_batch`)."""
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
def _fit_online(
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
    r"""Online VB, jitted, no validation (:func:`fit_online`)."""
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


def _check_topic_word(topic_word, v: int, *, name: str = "topic_word") -> np.ndarray:
    """(k, v) Dirichlet parameters :math:`\\lambda`: finite and > 0."""
    arr = np.asarray(topic_word)
    if arr.ndim != 2 or arr.shape[1] != v:
        raise ValueError(f"{name} must have shape (num_topics, {v}) to match x; got {arr.shape}.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} (lambda, Dirichlet parameters) must be finite and > 0.")
    return arr


def _check_prior(prior) -> tuple[float, float]:
    if not isinstance(prior, LDAPrior):
        raise ValueError(f"prior must be an LDAPrior(doc_topic, topic_word); got {prior!r}.")
    return (
        check_positive(prior.doc_topic, name="prior.doc_topic (alpha)"),
        check_positive(prior.topic_word, name="prior.topic_word (eta)"),
    )


def _check_tol(mean_change_tol) -> float:
    tol = check_number(mean_change_tol, name="mean_change_tol")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"mean_change_tol must be a finite number >= 0; got {mean_change_tol!r}.")
    return tol


def _check_steps(learning_offset, learning_decay) -> tuple[float, float]:
    kappa = check_number(learning_decay, name="learning_decay")
    if not 0.5 < kappa <= 1.0:
        raise ValueError(
            f"learning_decay (kappa) must lie in (0.5, 1] so the steps (tau0 + t)^-kappa "
            f"sum to infinity while their squares converge; got {learning_decay!r}."
        )
    tau0 = check_number(learning_offset, name="learning_offset")
    if not math.isfinite(tau0) or tau0 < 0:
        raise ValueError(
            f"learning_offset (tau0) must be a finite number >= 0; got {learning_offset!r}."
        )
    return tau0, kappa


def _validated(topic_word, x, prior):
    arr = as_doc_term(x)
    lam = _check_topic_word(topic_word, arr.shape[1])
    alpha, eta = _check_prior(prior)
    dtype = arr.dtype
    prior = LDAPrior(jnp.asarray(alpha, dtype), jnp.asarray(eta, dtype))
    return jnp.asarray(lam, dtype), jnp.asarray(arr), prior


def fit_batch(
    topic_word: Float[Array | np.ndarray, "k v"],
    x: ArrayLike,
    prior: LDAPrior,
    *,
    max_iter: int = 10,
    max_doc_update_iter: int = 100,
    mean_change_tol: float = 1e-3,
) -> LDAFit:
    r"""Batch variational EM from initial topics: ``max_iter`` rounds of local step then
    :math:`\lambda = \eta + S` (scikit-learn's ``learning_method="batch"``).

    Raises:
      ValueError: bad counts (:func:`as_doc_term`), ``topic_word`` not (k, v) and > 0, a
        prior <= 0, a setting out of range.
    """
    lam, xj, prior = _validated(topic_word, x, prior)
    return _fit_batch(
        lam,
        xj,
        prior,
        max_iter=check_positive_int(max_iter, name="max_iter"),
        max_doc_update_iter=check_positive_int(max_doc_update_iter, name="max_doc_update_iter"),
        mean_change_tol=jnp.asarray(_check_tol(mean_change_tol), xj.dtype),
    )


def fit_online(
    topic_word: Float[Array | np.ndarray, "k v"],
    x: ArrayLike,
    prior: LDAPrior,
    *,
    max_iter: int = 10,
    batch_size: int = 128,
    learning_offset: float = 10.0,
    learning_decay: float = 0.7,
    max_doc_update_iter: int = 100,
    mean_change_tol: float = 1e-3,
) -> LDAFit:
    r"""Online VB from initial topics: ``max_iter`` passes over the documents in order, in
    minibatches of ``batch_size`` (the last one smaller, as scikit-learn's ``gen_batches``),
    each a step :math:`\rho_t = (\tau_0 + t)^{-\kappa}` with ``learning_offset``
    :math:`\tau_0 \ge 0` and ``learning_decay`` :math:`\kappa \in (0.5, 1]`.

    Raises:
      ValueError: as :func:`fit_batch`, and a step setting out of range.
    """
    lam, xj, prior = _validated(topic_word, x, prior)
    tau0, kappa = _check_steps(learning_offset, learning_decay)
    batch_size = check_positive_int(batch_size, name="batch_size")
    dtype = xj.dtype
    return _fit_online(
        lam,
        xj,
        prior,
        max_iter=check_positive_int(max_iter, name="max_iter"),
        batch_size=min(batch_size, xj.shape[0]),
        learning_offset=jnp.asarray(tau0, dtype),
        learning_decay=jnp.asarray(kappa, dtype),
        max_doc_update_iter=check_positive_int(max_doc_update_iter, name="max_doc_update_iter"),
        mean_change_tol=jnp.asarray(_check_tol(mean_change_tol), dtype),
    )


def perplexity(
    topic_word: Float[Array | np.ndarray, "k v"],
    x: ArrayLike,
    prior: LDAPrior,
    *,
    max_doc_update_iter: int = 100,
    mean_change_tol: float = 1e-3,
) -> Float[Array, ""]:
    r"""Held-out perplexity bound :math:`\exp(-\mathrm{ELBO}(x) / \text{words})` of
    documents ``x`` under fixed topics (local step from :math:`\gamma = 1`), as
    scikit-learn's ``perplexity``."""
    lam, x, prior = _validated(topic_word, x, prior)
    return _perplexity_jit(
        lam,
        x,
        prior,
        check_positive_int(max_doc_update_iter, name="max_doc_update_iter"),
        jnp.asarray(_check_tol(mean_change_tol), x.dtype),
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
    key = _checks.as_key(key)
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

    ``num_init`` random starts run in one compiled program; the one with the lowest training
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
    tol = _check_tol(mean_change_tol)
    tau0, kappa = _check_steps(learning_offset, learning_decay)
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
    """Every start in one program (in turn); keeps the lowest training perplexity."""

    def run(lam):
        if method == "batch":
            return _fit_batch.__wrapped__(
                lam,
                x,
                prior,
                max_iter=max_iter,
                max_doc_update_iter=max_doc_update_iter,
                mean_change_tol=tol,
            )
        return _fit_online.__wrapped__(
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

    # One start after another (lax.map): under vmap the inner loop's lax.switch over row
    # counts would run every branch.
    fits = lax.map(run, lam0)
    best = jnp.argmin(jnp.where(jnp.isnan(fits.perplexity), jnp.inf, fits.perplexity))
    return jax.tree_util.tree_map(lambda leaf: leaf[best], fits)


# ---------------------------------------------------------------------------------------
# Fixed topics: the per-document mean-field optimum, and amortized (logistic-normal) VI
# ---------------------------------------------------------------------------------------
#
# With the topics held at a point beta (k, v), rows on the simplex, every bound below is a
# lower bound on the same log-evidence, the words' probability with theta integrated out:
#     log p(w_d | alpha, beta) = log \int Dir(theta; alpha) prod_w (sum_t theta_t beta_tw)^n_dw.


def _check_topics(topics, v: int, *, name: str = "topics") -> np.ndarray:
    """(k, v) topics, every row a distribution over the v words."""
    arr = np.asarray(topics)
    if arr.ndim != 2 or arr.shape[1] != v:
        raise ValueError(f"{name} must have shape (num_topics, {v}) to match x; got {arr.shape}.")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and >= 0.")
    sums = arr.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-4):
        raise ValueError(
            f"{name} rows must sum to 1 (word distributions; normalise lambda); got sums "
            f"between {sums.min():.6g} and {sums.max():.6g}."
        )
    return arr


def _safe_tokens(x, mix):
    """:math:`\\sum_w n_w \\log m_w` over the last axis, with :math:`0 \\log 0 = 0`."""
    present = x > 0
    return jnp.sum(jnp.where(present, x * jnp.log(jnp.where(present, mix, 1.0)), 0.0), axis=-1)


def _log_dirichlet_norm(alpha, k):
    return gammaln(k * alpha) - k * gammaln(alpha)


def _mean_field_doc_elbo(topics, gamma, x, alpha):
    """The mean-field bound of each document at :math:`\\gamma` (optimal :math:`\\phi`)."""
    k = topics.shape[0]
    e_theta = dirichlet_expectation(gamma)
    a_max = jnp.max(e_theta, axis=1, keepdims=True)
    mix = jnp.exp(e_theta - a_max) @ topics
    tokens = _safe_tokens(x, mix) + jnp.sum(x, axis=1) * a_max[:, 0]
    theta_terms = (
        jnp.sum((alpha - gamma) * e_theta, axis=1)
        + jnp.sum(gammaln(gamma), axis=1)
        - gammaln(jnp.sum(gamma, axis=1))
        + _log_dirichlet_norm(alpha, k)
    )
    return tokens + theta_terms


@functools.partial(jax.jit, static_argnames=("max_doc_update_iter",))
def _doc_bound_jit(topics, x, alpha, tol, *, max_doc_update_iter):
    gamma, _ = _local_step_exp(topics, x, alpha, max_doc_update_iter, tol)
    return gamma, _mean_field_doc_elbo(topics, gamma, x, alpha)


def doc_bound(
    topics: Float[Array | np.ndarray, "k v"],
    x: ArrayLike,
    doc_topic_prior: float,
    *,
    max_doc_update_iter: int = 1000,
    mean_change_tol: float = 1e-8,
) -> tuple[Float[Array, "n k"], Float[Array, " n"]]:
    r"""Blei et al.'s mean-field bound of every document at its per-document optimum, for
    fixed topics :math:`\beta`.

    The local step of :func:`local_step` with :math:`e^{E[\log\beta]}` replaced by
    :math:`\beta` itself (a point, not a Dirichlet), run to a tight tolerance, then

    .. math::
        \mathrm{ELBO}_d(\gamma_d) = \sum_w n_{dw} \log \sum_t e^{E[\log\theta_{dt}]}
        \beta_{tw} + E_q[\log \mathrm{Dir}(\theta_d; \alpha)] - E_q[\log
        \mathrm{Dir}(\theta_d; \gamma_d)] \le \log p(w_d \mid \alpha, \beta).

    Args:
      topics: (k, v) :math:`\beta`, rows summing to 1 (e.g. ``lam / lam.sum(1)``).
      x: (n, v) word counts.
      doc_topic_prior: :math:`\alpha > 0` (symmetric).
      max_doc_update_iter, mean_change_tol: the inner loop (defaults tighter than
        :func:`local_step`'s, so the result is the optimum).

    Returns:
      ``(gamma (n, k), elbo (n,))``, the ELBO in nats per document.
    """
    arr = as_doc_term(x)
    beta = jnp.asarray(_check_topics(topics, arr.shape[1]), arr.dtype)
    alpha = check_positive(doc_topic_prior, name="doc_topic_prior")
    iters = check_positive_int(max_doc_update_iter, name="max_doc_update_iter")
    tol = check_positive(mean_change_tol, name="mean_change_tol")
    dtype = arr.dtype
    return _doc_bound_jit(
        beta,
        jnp.asarray(arr),
        jnp.asarray(alpha, dtype),
        jnp.asarray(tol, dtype),
        max_doc_update_iter=iters,
    )


def encoder(num_topics: int, hidden: tuple[int, ...] = (100, 100)) -> nn.GaussianEncoder:
    r"""The amortized E-step's network (ProdLDA's, Srivastava & Sutton 2017): word counts
    (as :math:`\log(1 + n_{dw})`) to the mean and scale of a diagonal Gaussian over
    :math:`h \in \mathbb R^{k-1}`, with :math:`\theta = \mathrm{softmax}(h, 0)`."""
    return nn.GaussianEncoder(hidden=tuple(hidden), latent_dim=num_topics - 1)


def _log_theta(h):
    zeros = jnp.zeros((*h.shape[:-1], 1), h.dtype)
    return jax.nn.log_softmax(jnp.concatenate([h, zeros], axis=-1), axis=-1)


def _ln_terms(eps, mean, scale, topics, x, alpha):
    r"""Per draw :math:`h = \mu + \sigma\epsilon`: ``(log_joint, log_q)``, each (s, n).

    ``log_joint`` is :math:`\log p(w \mid \theta, \beta) + \log \mathrm{Dir}(\theta;
    \alpha) + \sum_{t=1}^k \log\theta_t`, the joint density in the coordinates h (the last
    sum is :math:`\log|\det \partial\theta_{1:k-1} / \partial h|` of the additive logistic
    map); ``log_q`` is :math:`\log N(h; \mu, \sigma^2)`."""
    h = mean + scale * eps
    log_theta = _log_theta(h)
    k = log_theta.shape[-1]
    a_max = jnp.max(log_theta, axis=-1, keepdims=True)
    mix = jnp.exp(log_theta - a_max) @ topics
    tokens = _safe_tokens(x, mix) + jnp.sum(x, axis=-1) * a_max[..., 0]
    prior = _log_dirichlet_norm(alpha, k) + alpha * jnp.sum(log_theta, axis=-1)
    log_q = jnp.sum(-0.5 * eps**2 - jnp.log(scale) - 0.5 * math.log(2.0 * math.pi), axis=-1)
    return tokens + prior, log_q


def _gaussian_entropy(scale):
    return jnp.sum(jnp.log(scale) + 0.5 * (1.0 + math.log(2.0 * math.pi)), axis=-1)


def _mc_elbo_draws(key, mean, scale, topics, x, alpha, num_samples):
    """(s, n) draws of the reparameterised ELBO, the Gaussian entropy exact."""
    eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
    log_joint, _ = _ln_terms(eps, mean[None], scale[None], topics, x[None], alpha)
    return log_joint + _gaussian_entropy(scale)[None]


class AmortizedLDA(NamedTuple):
    """A trained logistic-normal encoder for fixed topics (:func:`fit_amortized`).

    Attributes:
      encoder: the Flax module (:func:`encoder`).
      params: its variables.
      losses: (num_steps,) the negative ELBO per word before each step (one MC draw).
    """

    encoder: nn.GaussianEncoder
    params: PyTree
    losses: Float[Array, " s"]


def _features(x):
    return jnp.log1p(x)


@functools.partial(jax.jit, static_argnames=("module", "num_steps", "num_samples", "batch_size"))
def _train_encoder(
    key, params, topics, x, alpha, learning_rate, *, module, num_steps, num_samples, batch_size
):
    optimizer = optax.adam(learning_rate)
    n = x.shape[0]
    words = jnp.sum(x) / n

    def loss(p, step):
        k_batch, k_eps = jax.random.split(jax.random.fold_in(key, step))
        xs = x if batch_size >= n else x[jax.random.randint(k_batch, (batch_size,), 0, n)]
        mean, scale = module.apply(p, _features(xs))
        draws = _mc_elbo_draws(k_eps, mean, scale, topics, xs, alpha, num_samples)
        return -jnp.mean(draws) / words

    params, _, losses = run_steps(loss, optimizer, params, optimizer.init(params), num_steps)
    return params, losses


def fit_amortized(
    key: Key[Array, ""],
    topics: Float[Array | np.ndarray, "k v"],
    x: ArrayLike,
    doc_topic_prior: float,
    *,
    hidden: tuple[int, ...] = (100, 100),
    num_steps: int = 2000,
    learning_rate: float = 2e-3,
    num_samples: int = 1,
    batch_size: int = 256,
) -> AmortizedLDA:
    r"""Trains a logistic-normal encoder on the ELBO of the documents, topics fixed.

    For document d the encoder gives :math:`q(h_d) = N(\mu_\phi(n_d),
    \mathrm{diag}\,\sigma_\phi(n_d)^2)` on :math:`\mathbb R^{k-1}` and :math:`\theta_d =
    \mathrm{softmax}(h_d, 0)` (the additive logistic-normal family of ProdLDA). Unlike
    ProdLDA, whose KL term uses the Laplace approximation of the Dirichlet prior in this
    softmax basis (a logistic-normal prior, so a bound for a different model), the prior
    term here is the Dirichlet itself, estimated by the same draws: with the topic of each
    word summed out exactly,

    .. math::
        \mathrm{ELBO}_d = E_q\Big[\sum_w n_{dw}\log\sum_t\theta_t\beta_{tw}
          + \log\mathrm{Dir}(\theta;\alpha) + \sum_{t=1}^k \log\theta_t\Big]
          + H[q(h_d)] \le \log p(w_d \mid \alpha, \beta),

    (:math:`\prod_t \theta_t` is the Jacobian of :math:`h \mapsto \theta_{1:k-1}`),
    maximised by Adam (:func:`emvi.optim.run_steps`) with reparameterised draws, on random
    minibatches of ``batch_size`` documents (all of them if fewer).

    Args:
      key: typed PRNG key (initial weights, minibatches, draws).
      topics: (k, v) :math:`\beta`, rows summing to 1.
      x: (n, v) word counts.
      doc_topic_prior: :math:`\alpha > 0`.
      hidden: the encoder's hidden sizes.
      num_steps, learning_rate, num_samples, batch_size: the optimiser loop (draws per
        document per step).

    Example:
      >>> x, true = bars_corpus(0, 50)
      >>> fit = fit_amortized(jax.random.key(0), true, x, 1.0, hidden=(16,), num_steps=20)
      >>> fit.losses.shape
      (20,)
    """
    key = _checks.as_key(key)
    arr = as_doc_term(x)
    beta = _check_topics(topics, arr.shape[1])
    k = beta.shape[0]
    if k < 2:
        raise ValueError(f"topics must have at least 2 rows (topics); got {k}.")
    alpha = check_positive(doc_topic_prior, name="doc_topic_prior")
    num_steps = check_positive_int(num_steps, name="num_steps")
    num_samples = check_positive_int(num_samples, name="num_samples")
    batch_size = check_positive_int(batch_size, name="batch_size")
    rate = check_positive(learning_rate, name="learning_rate")
    dtype = arr.dtype
    module = encoder(k, hidden)
    k_init, k_train = jax.random.split(key)
    xj = jnp.asarray(arr)
    # Flax initialises float32 weights; the network computes in the data's dtype.
    params = jax.tree_util.tree_map(
        lambda leaf: leaf.astype(dtype),
        module.init(k_init, jnp.zeros((1, arr.shape[1]), jnp.float32)),
    )
    params, losses = _train_encoder(
        k_train,
        params,
        jnp.asarray(beta, dtype),
        xj,
        jnp.asarray(alpha, dtype),
        jnp.asarray(rate, dtype),
        module=module,
        num_steps=num_steps,
        num_samples=num_samples,
        batch_size=min(batch_size, arr.shape[0]),
    )
    return AmortizedLDA(module, params, losses)


def amortized_elbo(
    key: Key[Array, ""],
    fit: AmortizedLDA,
    topics: Float[Array | np.ndarray, "k v"],
    x: ArrayLike,
    doc_topic_prior: float,
    *,
    num_samples: int = 1000,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """The encoder's ELBO of each document (nats; :func:`fit_amortized`'s objective), by
    ``num_samples`` draws: ``(mean, standard error)``, each (n,)."""
    key = _checks.as_key(key)
    arr = as_doc_term(x)
    beta = _check_topics(topics, arr.shape[1])
    alpha = check_positive(doc_topic_prior, name="doc_topic_prior")
    num_samples = check_positive_int(num_samples, name="num_samples", minimum=2)
    dtype = arr.dtype
    return _amortized_elbo_jit(
        key,
        fit.params,
        jnp.asarray(beta, dtype),
        jnp.asarray(arr),
        jnp.asarray(alpha, dtype),
        module=fit.encoder,
        num_samples=num_samples,
    )


@functools.partial(jax.jit, static_argnames=("module", "num_samples"))
def _amortized_elbo_jit(key, params, topics, x, alpha, *, module, num_samples):
    mean, scale = module.apply(params, _features(x))
    draws = _mc_elbo_draws(key, mean, scale, topics, x, alpha, num_samples)
    return jnp.mean(draws, axis=0), jnp.std(draws, axis=0, ddof=1) / math.sqrt(num_samples)


class GapEstimate(NamedTuple):
    """Per-word bounds on a corpus, each with the Monte Carlo standard error of its mean
    (0 where exact). Nats per word: the corpus total divided by its number of words.

    Attributes:
      mean_field: Blei et al.'s bound at each document's optimum (:func:`doc_bound`).
      amortized, amortized_se: the encoder's ELBO.
      refined, refined_se: the same logistic-normal family optimised per document
        (started from the encoder's output): the family's per-document optimum.
      amortization_gap, amortization_gap_se: refined - amortized (common draws), Cremer
        et al.'s amortization gap, >= 0 up to MC error.
      gap_vs_mean_field, gap_vs_mean_field_se: mean_field - amortized: the amortized
        encoder against the per-document mean-field optimum (two families: either sign).
    """

    mean_field: float
    amortized: float
    amortized_se: float
    refined: float
    refined_se: float
    amortization_gap: float
    amortization_gap_se: float
    gap_vs_mean_field: float
    gap_vs_mean_field_se: float


@functools.partial(jax.jit, static_argnames=("module",))
def _encode(params, x, *, module):
    return module.apply(params, _features(x))


@functools.partial(jax.jit, static_argnames=("num_steps", "num_samples"))
def _refine(key, mean, scale, topics, x, alpha, *, num_steps, num_samples):
    """Per-document Adam on (mean, log scale) from the encoder's q."""
    optimizer = optax.adam(1e-2)
    words = jnp.sum(x)

    def loss(u, step):
        m, log_s = u
        draws = _mc_elbo_draws(
            jax.random.fold_in(key, step), m, jnp.exp(log_s), topics, x, alpha, num_samples
        )
        return -jnp.sum(jnp.mean(draws, axis=0)) / words

    u0 = (mean, jnp.log(scale))
    (m, log_s), _, _ = run_steps(loss, optimizer, u0, optimizer.init(u0), num_steps)
    return m, jnp.exp(log_s)


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _eval_draws(key, q_enc, q_ref, topics, x, alpha, *, num_samples):
    """Per-document means and variances of the ELBO draws (common random numbers)."""
    eps = jax.random.normal(key, (num_samples, *q_enc[0].shape), x.dtype)

    def draws(q):
        lj, _ = _ln_terms(eps, q[0][None], q[1][None], topics, x[None], alpha)
        return lj + _gaussian_entropy(q[1])[None]

    a, r = draws(q_enc), draws(q_ref)
    return (
        jnp.mean(a, 0),
        jnp.var(a, 0),
        jnp.mean(r, 0),
        jnp.var(r, 0),
        jnp.mean(r - a, 0),
        jnp.var(r - a, 0),
    )


def amortization_gap(
    key: Key[Array, ""],
    fit: AmortizedLDA,
    topics: Float[Array | np.ndarray, "k v"],
    x: ArrayLike,
    doc_topic_prior: float,
    *,
    num_samples: int = 1000,
    refine_steps: int = 500,
    refine_samples: int = 8,
) -> GapEstimate:
    r"""The encoder's ELBO on documents ``x`` against the per-document optima, in nats per
    word (:class:`GapEstimate`).

    Every bound is on the same :math:`\log p(w \mid \alpha, \beta)`. The Monte Carlo ones
    average ``num_samples`` fresh draws per document; the standard error of a corpus total
    is :math:`\sqrt{\sum_d \mathrm{Var}_d / s}` (documents independent), divided by the
    words like the total.

    Example:
      >>> x, true = bars_corpus(0, 50)
      >>> fit = fit_amortized(jax.random.key(0), true, x, 1.0, hidden=(16,), num_steps=20)
      >>> g = amortization_gap(jax.random.key(1), fit, true, x, 1.0, num_samples=50,
      ...                      refine_steps=20)
      >>> bool(g.refined > g.amortized)
      True
    """
    key = _checks.as_key(key)
    arr = as_doc_term(x)
    beta = _check_topics(topics, arr.shape[1])
    alpha = check_positive(doc_topic_prior, name="doc_topic_prior")
    num_samples = check_positive_int(num_samples, name="num_samples")
    refine_steps = check_positive_int(refine_steps, name="refine_steps")
    refine_samples = check_positive_int(refine_samples, name="refine_samples")
    dtype = arr.dtype
    xj, bj, aj = jnp.asarray(arr), jnp.asarray(beta, dtype), jnp.asarray(alpha, dtype)
    words = float(arr.sum())
    _, mf = doc_bound(beta, arr, alpha)
    q_enc = _encode(fit.params, xj, module=fit.encoder)
    k_ref, k_eval = jax.random.split(key)
    q_ref = _refine(k_ref, *q_enc, bj, xj, aj, num_steps=refine_steps, num_samples=refine_samples)
    a, va, r, vr, d, vd = (
        np.asarray(t, np.float64)
        for t in _eval_draws(k_eval, q_enc, q_ref, bj, xj, aj, num_samples=num_samples)
    )

    def se(var):
        return float(np.sqrt(var.sum() / num_samples) / words)

    mf_total = float(np.sum(np.asarray(mf, np.float64)))
    return GapEstimate(
        mean_field=mf_total / words,
        amortized=float(a.sum()) / words,
        amortized_se=se(va),
        refined=float(r.sum()) / words,
        refined_se=se(vr),
        amortization_gap=float(d.sum()) / words,
        amortization_gap_se=se(vd),
        gap_vs_mean_field=(mf_total - float(a.sum())) / words,
        gap_vs_mean_field_se=se(va),
    )
