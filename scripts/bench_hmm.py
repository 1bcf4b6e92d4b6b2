r"""Benchmark: EM iterations of emvi's HMM against hmmlearn and dynamax, from the same start.

Two cases, Gaussian "diag" emissions, float64:

* ``batch``: 100 sequences of length 1,000, k = 10 states, d = 8;
* ``long``: one sequence of length 100,000, k = 25 states, d = 8.

Data are sampled from a random HMM; every method starts from the *same* parameters (uniform
initial distribution, a random near-uniform transition matrix, means at k random data
points, unit variances) and runs ``iters`` iterations with the tolerance disabled, so the
log-likelihood histories must agree to rounding (reported as the largest relative
difference). Time per iteration is one whole fit (hmmlearn) or the median over ``repeats``
whole fits (emvi, dynamax) divided by ``iters``; the compile time of emvi and dynamax is
excluded by a warm-up fit of the same shapes. emvi runs with the sequential ``lax.scan`` and
with the parallel associative scan; the parallel scan does O(t k^3) work against O(t k^2) and
holds (t, k, k, k) temporaries, so on a CPU it is slower, and for the long case it is run on
the first ``parallel_long_t`` steps only (the full 100,000 would need about t k^3 * 8 bytes =
12 GB).

dynamax (the ``bench`` extra of pyproject.toml; skipped, with ``"dynamax": false`` in the
row, when it does not import) runs ``DiagonalGaussianHMM.fit_em`` for ``iters`` iterations.
Its history is log p(x | theta) + log p(theta) and its M-step is the posterior mode, so its
hyperparameters are set to the flat prior: Dirichlet concentrations 1 (the next float above
1: TFP's Dirichlet mode is NaN at exactly 1) and the normal-inverse-gamma prior
N(mu | mu_0, sigma^2 / kappa_0) IG(sigma^2 | alpha_0, beta_0) with kappa_0 = 0,
alpha_0 = -3/2, beta_0 = 0, whose density is proportional to 1, so that the mode is the ML
update

    mu = S_x / n,    sigma^2 = (S_xx - n mu^2) / 2 / (alpha_0 + n / 2 + 3 / 2) = S_xx / n - mu^2.

That prior is improper (dynamax's ``log_prior`` is NaN there), so a subclass replaces
``log_prior`` by the constant 0, and the history is then the log-likelihood alone, compared
with emvi's and hmmlearn's (``dynamax_history_rel_diff_emvi``, ``..._hmmlearn``). Untimed,
one more fit with dynamax's default priors gives ``dynamax_default_prior_history_rel_diff_emvi``:
how far its stock objective (MAP, prior included) is from the ML history. ``fit_em`` jits a
fresh closure on each call, so called as is it recompiles on every fit; it is timed inside one
``jax.jit`` (with ``verbose=False``, its documented use under jit).

Usage::

    nice -n 10 python scripts/bench_hmm.py --out runs/bench_hmm.json
    python scripts/bench_hmm.py --quick
    pip install -e ".[bench]"   # dynamax, for its column
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from emvi import hmm  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    out: Path | None = None
    """Write the results as JSON here."""
    iters: int = 5
    """EM iterations per fit (tolerance disabled)."""
    repeats: int = 3
    """Timed fits per method (median)."""
    parallel_long_t: int = 5_000
    """Steps of the long sequence that the parallel scan is timed on (CPU memory)."""
    quick: bool = False
    """Tiny sizes (a smoke test of the script)."""


def _problem(seed: int, n: int, t: int, k: int, d: int):
    rng = np.random.default_rng(seed)
    true = hmm.HMMParams(
        jnp.full(k, 1.0 / k),
        jnp.asarray(rng.dirichlet(np.full(k, 1.0), size=k) * 0.5 + 0.5 * np.eye(k)),
        hmm.GaussianParams(jnp.asarray(rng.normal(size=(k, d)) * 3.0), jnp.ones((k, d))),
    )
    x, _ = hmm.sample(jax.random.key(seed), true, n, t, emission=hmm.Gaussian("diag"))
    x = np.asarray(x)
    flat = x.reshape(-1, d)
    p0 = hmm.HMMParams(
        jnp.full(k, 1.0 / k),
        jnp.asarray(rng.dirichlet(np.full(k, 10.0 * k), size=k)),
        hmm.GaussianParams(
            jnp.asarray(flat[rng.choice(flat.shape[0], k, replace=False)]), jnp.ones((k, d))
        ),
    )
    return x, p0


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _emvi(x, p0, iters, parallel):
    def run():
        res = hmm.fit(
            jax.random.key(0), x, p0.initial.shape[0], emission=hmm.Gaussian("diag"),
            init=p0, max_iter=iters, tol=0.0, reg_covar=0.0, parallel=parallel,
        )  # fmt: skip
        jax.block_until_ready(res)
        return res

    return run


def _hmmlearn(x, p0, iters):
    from hmmlearn import hmm as hl

    k = p0.initial.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    lengths = np.full(x.shape[0], x.shape[1])

    def run():
        m = hl.GaussianHMM(
            k, covariance_type="diag", n_iter=iters, tol=-np.inf, init_params="",
            params="stmc", covars_prior=0.0, min_covar=0.0,
        )  # fmt: skip
        m.startprob_, m.transmat_ = np.asarray(p0.initial), np.asarray(p0.transition)
        m.means_, m.covars_ = np.asarray(p0.emission.means), np.asarray(p0.emission.covariances)
        m.fit(flat, lengths)
        return m

    return run


def _dynamax(x, p0, iters, flat_prior=True):
    """A jitted ``fit_em`` of dynamax's ``DiagonalGaussianHMM`` from ``p0`` (None: not installed).

    With ``flat_prior`` the hyperparameters are those of the flat prior: Dirichlet
    concentrations just above 1 (TFP's Dirichlet mode is NaN at exactly 1, where a zero count
    would land), and the normal-inverse-gamma with kappa_0 = 0, alpha_0 = -3/2, beta_0 = 0, whose
    density N(mu | mu_0, sigma^2 / kappa_0) IG(sigma^2 | alpha_0, beta_0) is proportional to
    sigma^-1 (sigma^2)^(1/2) = 1 (Lebesgue in (mu, sigma^2)). Its posterior mode is then the ML
    update: mu = S_x / n and sigma^2 = (S_xx - n mu^2) / (n / 2 + alpha_0 + 3/2) * (1/2)
    = S_xx / n - mu^2. That prior is improper, so dynamax's ``log_prior`` is NaN there; it is
    replaced by its constant, 0, so that ``fit_em``'s history is the log-likelihood alone.
    Without ``flat_prior``: dynamax's default priors and its own ``log_prior``.
    """
    try:
        from dynamax.hidden_markov_model import DiagonalGaussianHMM
    except ImportError:
        return None

    class FlatDiagonalGaussianHMM(DiagonalGaussianHMM):
        def log_prior(self, params):
            return jnp.zeros(())

    k, d = p0.emission.means.shape
    if flat_prior:
        above_one = float(np.nextafter(1.0, 2.0))
        model = FlatDiagonalGaussianHMM(
            k, d, initial_probs_concentration=above_one,
            transition_matrix_concentration=above_one, emission_prior_mean_concentration=0.0,
            emission_prior_concentration=-1.5, emission_prior_scale=0.0,
        )  # fmt: skip
    else:
        model = DiagonalGaussianHMM(k, d)
    params, props = model.initialize(
        initial_probs=p0.initial, transition_matrix=p0.transition,
        emission_means=p0.emission.means, emission_scale_diags=jnp.sqrt(p0.emission.covariances),
    )  # fmt: skip
    # fit_em jits a fresh closure on every call, so it would recompile every time: jit it whole
    # (its documented use inside jit is verbose=False).
    fit = jax.jit(lambda p, e: model.fit_em(p, props, e, num_iters=iters, verbose=False))
    xj = jnp.asarray(x)

    def run():
        return jax.block_until_ready(fit(params, xj))

    return run


def _rel_diff(a, b) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def bench_case(name, x, p0, args: Args, parallel_t: int | None = None) -> dict:
    n, t, d = x.shape
    k = p0.initial.shape[0]
    row = dict(case=name, n=n, t=t, k=k, d=d, iters=args.iters)
    run = _hmmlearn(x, p0, args.iters)  # imports hmmlearn outside the timing
    t0 = time.perf_counter()
    ref = run()  # one timed fit: hmmlearn has no compile step
    row["hmmlearn_ms_per_iter"] = 1e3 * (time.perf_counter() - t0) / args.iters
    hist_ref = np.asarray(ref.monitor_.history)
    print(name, "hmmlearn", row["hmmlearn_ms_per_iter"], "ms/iter", flush=True)
    for parallel in (False, True):
        key = "parallel" if parallel else "sequential"
        xs = x if parallel_t is None or not parallel else x[:, :parallel_t]
        run = _emvi(xs, p0, args.iters, parallel)
        res = run()  # compile
        row[f"emvi_{key}_ms_per_iter"] = 1e3 * _time(run, args.repeats) / args.iters
        row[f"emvi_{key}_t"] = xs.shape[1]
        print(name, key, row[f"emvi_{key}_ms_per_iter"], "ms/iter", flush=True)
        if xs.shape[1] == t:
            hist = np.asarray(res.history) * n
            row[f"emvi_{key}_history_rel_diff"] = _rel_diff(hist, hist_ref)
            if not parallel:
                hist_emvi = hist
    row["speedup_sequential"] = row["hmmlearn_ms_per_iter"] / row["emvi_sequential_ms_per_iter"]
    run = _dynamax(x, p0, args.iters)
    row["dynamax"] = run is not None
    if run is not None:
        _, hist_dyn = run()  # compile
        row["dynamax_ms_per_iter"] = 1e3 * _time(run, args.repeats) / args.iters
        print(name, "dynamax", row["dynamax_ms_per_iter"], "ms/iter", flush=True)
        row["dynamax_history_rel_diff_emvi"] = _rel_diff(np.asarray(hist_dyn), hist_emvi)
        row["dynamax_history_rel_diff_hmmlearn"] = _rel_diff(np.asarray(hist_dyn), hist_ref)
        row["dynamax_over_emvi_sequential"] = (
            row["dynamax_ms_per_iter"] / row["emvi_sequential_ms_per_iter"]
        )
        # Untimed: dynamax's default priors, whose history is log p(x | theta) + log p(theta)
        # and whose M-step is MAP: how far that objective is from the ML history.
        _, hist_def = _dynamax(x, p0, args.iters, flat_prior=False)()
        row["dynamax_default_prior_history_rel_diff_emvi"] = _rel_diff(
            np.asarray(hist_def), hist_emvi
        )
    print(json.dumps(row), flush=True)
    return row


def main(args: Args) -> dict:
    if args.quick:
        cases = [("batch", 4, 50, 3, 2, None), ("long", 1, 400, 4, 2, 200)]
    else:
        cases = [
            ("batch", 100, 1000, 10, 8, None),
            ("long", 1, 100_000, 25, 8, args.parallel_long_t),
        ]
    rows = []
    for name, n, t, k, d, pt in cases:
        x, p0 = _problem(0, n, t, k, d)
        rows.append(bench_case(name, x, p0, args, pt))
    out = dict(
        rows=rows,
        jax=jax.__version__,
        backend=jax.default_backend(),
        cpus=os.cpu_count(),
        command=shlex.join(["python", "scripts/bench_hmm.py", *sys.argv[1:]]),
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
