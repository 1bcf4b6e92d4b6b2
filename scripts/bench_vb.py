r"""Benchmark: emvi's variational Bayes against scikit-learn on the same work.

* ``BayesianGaussianMixture``: n = 100,000 points, d = 16, k = 16 (a synthetic mixture),
  ``full`` and ``diag``, Dirichlet-process weights, ``iters`` iterations with ``tol=0`` from
  the same initial responsibilities (scikit-learn's ``_initialize(X, resp)``), float64; the
  final lower bounds must agree to rounding.
* ``LatentDirichletAllocation``: the digits as documents (1797 x 64, k = 10) and a synthetic
  LDA corpus (``lda_docs`` documents over ``lda_vocab`` words, 50 topics, 100 words each),
  ``batch`` and ``online`` (minibatches of 128), ``lda_passes`` passes from the same
  initial topics (every training E-step starting gamma at 1 in both), float64; the
  perplexities must agree to ~1e-6.

emvi's compile time is excluded (``jit(...).lower(...).compile()`` first, then the compiled
program is timed, median of ``repeats``); scikit-learn is timed once per case (its
``n_jobs=None``, one process) and its input validation is included. Both use every core
the machine gives them (XLA's and OpenBLAS's threads).

Usage::

    nice -n 10 python scripts/bench_vb.py --out runs/bench_vb.json
    python scripts/bench_vb.py --quick
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    """Benchmark settings (each is a command-line flag)."""

    n: int = 100_000
    d: int = 16
    k: int = 16
    iters: int = 20
    repeats: int = 3
    lda_docs: int = 100_000
    lda_vocab: int = 500
    lda_topics: int = 50
    lda_passes: int = 1
    digits_passes: int = 10
    quick: bool = False
    """Smoke-test size (n=3000, d=4, k=3, 3 iterations; 2000 documents)."""
    out: Path | None = None


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_bgmm(args, ct):
    from sklearn.mixture import BayesianGaussianMixture

    from emvi import bayesian_mixture as bm

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (args.k, args.d))
    x = centres[rng.integers(args.k, size=args.n)] + rng.normal(size=(args.n, args.d))
    resp = rng.dirichlet(np.ones(args.k), size=args.n)
    prior = bm.default_prior(x, covariance_type=ct, num_components=args.k)
    kw = dict(covariance_type=ct, weight_prior_type="dirichlet_process", max_iter=args.iters)
    xj, rj = jnp.asarray(x), jnp.asarray(resp)
    compiled = bm.fit_from_resp.lower(rj, xj, prior, tol=0.0, **kw).compile()
    ours = _time(lambda: compiled(rj, xj, prior, tol=0.0), args.repeats)
    res = compiled(rj, xj, prior, tol=0.0)
    est = BayesianGaussianMixture(
        n_components=args.k, covariance_type=ct, max_iter=args.iters, tol=0.0
    )
    est._initialize_parameters = lambda X, rs, xp=None: est._initialize(X, resp)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(x)
    theirs = time.perf_counter() - t0
    return dict(
        case=f"BayesianGaussianMixture {ct}, n={args.n}, d={args.d}, k={args.k}",
        emvi_ms_per_iter=1e3 * ours / args.iters,
        sklearn_ms_per_iter=1e3 * theirs / args.iters,
        speedup=theirs / ours,
        lower_bound_rel_diff=abs(float(res.lower_bound) - est.lower_bound_) / abs(est.lower_bound_),
    )


def _synthetic_corpus(num_docs, vocab, topics, length=100, seed=0):
    rng = np.random.default_rng(seed)
    beta = rng.dirichlet(np.full(vocab, 0.05), size=topics)
    theta = rng.dirichlet(np.full(topics, 0.1), size=num_docs)
    p = theta @ beta
    p /= p.sum(axis=1, keepdims=True)
    x = np.stack([rng.multinomial(length, row) for row in p]).astype(np.float64)
    return x


def bench_lda(args, name, x, k, method, passes):
    import scipy.sparse
    from sklearn.decomposition import LatentDirichletAllocation
    from sklearn.decomposition._online_lda_fast import _dirichlet_expectation_2d

    from emvi import lda

    lam0 = np.random.default_rng(1).gamma(100.0, 0.01, (k, x.shape[1]))
    prior = lda.LDAPrior(1.0 / k, 1.0 / k)
    xj, lj = jnp.asarray(x), jnp.asarray(lam0)
    if method == "batch":
        compiled = lda._fit_batch.lower(lj, xj, prior, max_iter=passes).compile()
    else:
        compiled = lda._fit_online.lower(lj, xj, prior, max_iter=passes, batch_size=128).compile()
    ours = _time(lambda: compiled(lj, xj, prior), 1 if x.shape[0] > 10_000 else args.repeats)
    res = compiled(lj, xj, prior)
    est = LatentDirichletAllocation(
        n_components=k, learning_method=method, max_iter=passes, batch_size=128
    )
    init = est._init_latent_vars

    def same_topics(n_features, dtype=np.float64):
        init(n_features, dtype)
        est.components_ = lam0.copy()
        est.exp_dirichlet_component_ = np.exp(_dirichlet_expectation_2d(lam0))

    est._init_latent_vars = same_topics
    e_step = est._e_step
    est._e_step = lambda X, cal_sstats, random_init, parallel=None: e_step(
        X, cal_sstats, False, parallel
    )
    xs = scipy.sparse.csr_matrix(x)
    t0 = time.perf_counter()
    est.fit(xs)
    theirs = time.perf_counter() - t0
    return dict(
        case=f"LDA {method}, {name} ({x.shape[0]} docs x {x.shape[1]} words, k={k}, "
        f"{passes} passes)",
        emvi_s=ours,
        sklearn_s=theirs,
        speedup=theirs / ours,
        perplexity_rel_diff=abs(float(res.perplexity) - est.bound_) / est.bound_,
    )


def main(args: Args) -> list[dict]:
    from emvi import lda

    if args.quick:
        args = dataclasses.replace(
            args,
            n=3000,
            d=4,
            k=3,
            iters=3,
            repeats=2,
            lda_docs=2000,
            lda_vocab=50,
            lda_topics=5,
            digits_passes=2,
        )
    rows = []
    for ct in ("full", "diag"):
        rows.append(bench_bgmm(args, ct))
        print(json.dumps(rows[-1]), flush=True)
    digits = lda.digits_documents(np.float64)
    corpus = _synthetic_corpus(args.lda_docs, args.lda_vocab, args.lda_topics)
    for name, x, k, passes in (
        ("digits", digits, 10, args.digits_passes),
        ("synthetic", corpus, args.lda_topics, args.lda_passes),
    ):
        for method in ("batch", "online"):
            rows.append(bench_lda(args, name, x, k, method, passes))
            print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
