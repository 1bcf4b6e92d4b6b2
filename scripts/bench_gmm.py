r"""Benchmark: one EM iteration of emvi's GMM against scikit-learn's GaussianMixture.

Both start from the *same* parameters (one M-step from nearest-centre labels of k random
data points, passed to scikit-learn as ``weights_init`` / ``means_init`` /
``precisions_init``) and run the *same* number of iterations (``tol=0``), in float64, so
their final log-likelihoods must agree to rounding (~1e-8 relative or better).

Timing: the median of ``repeats`` whole fits divided by ``iters``; emvi's compile time is
excluded by a warm-up call. Each fit also pays one-off costs that are amortised over the
iterations: emvi prepares the data (centring, packed outer products) and evaluates the
log-likelihood of the final parameters; scikit-learn validates input, converts the
precisions and runs a final E-step. The E-step and M-step of emvi are also timed alone.

FLOPs of one emvi iteration (multiply-add = 2 FLOPs), with ``P = d(d+1)/2``:

* "full": E-step quadratic term ``packed(x x^T) @ packed(Lambda_k)``: 2 n k P, linear term
  ``x @ (Lambda_k mu_k)``: 2 n k d; M-step second moments ``R^T packed(x x^T)``: 2 n k P,
  first moments ``R^T x``: 2 n k d; plus ~8 n k for logsumexp/softmax and k d^3 for the
  Cholesky factors and inverses.  Total ``4 n k (P + d) + 8 n k + k d^3``.
* "diag": E-step ``x^2 @ (1/sigma^2)`` and ``x @ (mu/sigma^2)``: 4 n k d; M-step
  ``R^T x^2`` and ``R^T x``: 4 n k d; plus ~8 n k.  Total ``8 n k d + 8 n k``.

* "tied": as "full" (one shared precision, the same two matmuls).
* "spherical": ``||x||^2`` and ``x`` against k columns each way: ``4 n k (d + 1) + 8 n k``.

The machine's float64 matmul rate (median of a large ``jnp.dot``) gives the fraction of
peak reached. Each row also times emvi in float32 (same parameters, cast).

``--accuracy`` adds, per covariance type, how far a float32 fit ends from the float64
optimum: float64 EM from the benchmark's start runs to convergence (``tol=1e-13``), float32
EM from the same start runs as many iterations, and both are scored in float64
(``mean log p(x)`` of the float64 optimum minus that of the float32 parameters, in nats per
point).

Usage::

    python scripts/bench_gmm.py --out runs/bench_gmm.json
    python scripts/bench_gmm.py --accuracy --covariance-types full diag
    python scripts/bench_gmm.py --quick
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
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
    """EM iterations per fit (tol=0, so exactly this many)."""
    repeats: int = 5
    """Timed emvi fits (the median is reported)."""
    sklearn_repeats: int = 3
    covariance_types: tuple[str, ...] = ("full", "tied", "diag", "spherical")
    reg_covar: float = 1e-6
    matmul_size: int = 2048
    seed: int = 0
    accuracy: bool = False
    """Also measure the float32 fit's distance from the float64 optimum (nats per point)."""
    accuracy_max_iter: int = 3000
    quick: bool = False
    """Smoke-test size: n=3000, d=4, k=3, 5 iterations, 2 repeats, 256^3 matmul."""
    out: Path | None = None
    """Write the results JSON here."""


QUICK = {
    "n": 3000,
    "d": 4,
    "k": 3,
    "iters": 5,
    "repeats": 2,
    "sklearn_repeats": 2,
    "matmul_size": 256,
}


def flops_per_iteration(n: int, d: int, k: int, covariance_type: str) -> float:
    """FLOPs of one emvi EM iteration (see the module docstring for the derivation)."""
    p = d * (d + 1) // 2
    if covariance_type == "full":
        return 4.0 * n * k * (p + d) + 8.0 * n * k + k * d**3
    if covariance_type == "tied":
        return 4.0 * n * k * (p + d) + 8.0 * n * k + d**3
    if covariance_type == "diag":
        return 8.0 * n * k * d + 8.0 * n * k
    if covariance_type == "spherical":
        return 4.0 * n * k * (d + 1) + 8.0 * n * k
    raise ValueError(f"no FLOP count for covariance_type {covariance_type!r}")


def thread_info() -> dict:
    """Cores, BLAS thread pools (numpy/scikit-learn) and XLA's view, for a fair comparison."""
    info = {
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "env": {
            v: os.environ.get(v)
            for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
        },
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(dv) for dv in jax.devices()],
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas_threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version", "prefix")}
            for p in threadpool_info()
        ]
    except ImportError:  # pragma: no cover - scikit-learn depends on threadpoolctl
        info["blas_threadpools"] = None
    # XLA:CPU runs its intra-op (Eigen) pool with one thread per visible core unless
    # XLA_FLAGS says otherwise.
    info["xla_intra_op_threads"] = info["affinity_cpus"] or info["os_cpu_count"]
    return info


def matmul_gflops(size: int, repeats: int = 5) -> float:
    """Median float64 GFLOP/s of a ``size x size @ size x size`` jnp.dot."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.float64)
    b = jax.random.normal(key_b, (size, size), jnp.float64)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * size**3 / statistics.median(times) / 1e9


def make_data(seed: int, n: int, d: int, k: int) -> np.ndarray:
    """n points from a random, well-separated k-component Gaussian mixture in d dims."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 4.0, (k, d))
    a = rng.normal(size=(k, d, d)) / np.sqrt(d)
    chol = np.linalg.cholesky(a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d))
    z = rng.integers(0, k, n)
    return means[z] + np.einsum("nij,nj->ni", chol[z], rng.standard_normal((n, d)))


def initial_params(seed: int, x: np.ndarray, k: int, covariance_type: str, reg_covar: float):
    """One M-step from the labels of the nearest of k random data points (NumPy, float64)."""
    rng = np.random.default_rng(seed + 1)
    n, d = x.shape
    centres = x[rng.choice(n, k, replace=False)]
    labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    resp = np.zeros((n, k))
    resp[np.arange(n), labels] = 1.0
    nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ x / nk[:, None]
    cov_full = np.stack(
        [
            (resp[:, j, None] * (x - means[j])).T @ (x - means[j]) / nk[j] + reg_covar * np.eye(d)
            for j in range(k)
        ]
    )
    if covariance_type == "full":
        cov, prec = cov_full, np.linalg.inv(cov_full)
    elif covariance_type == "tied":
        cov = np.einsum("k,kij->ij", nk, cov_full - reg_covar * np.eye(d)) / nk.sum()
        cov = cov + reg_covar * np.eye(d)
        prec = np.linalg.inv(cov)
    elif covariance_type == "diag":
        cov = np.diagonal(cov_full, axis1=1, axis2=2).copy()
        prec = 1.0 / cov
    elif covariance_type == "spherical":
        cov = np.diagonal(cov_full, axis1=1, axis2=2).mean(axis=1)
        prec = 1.0 / cov
    else:
        raise ValueError(f"unknown covariance_type {covariance_type!r}")
    return nk / n, means, cov, prec


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(args: Args, x: np.ndarray, covariance_type: str) -> dict:
    """emvi vs scikit-learn for one covariance type."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    from emvi import gmm

    n, d = x.shape
    weights, means, cov, prec = initial_params(
        args.seed, x, args.k, covariance_type, args.reg_covar
    )
    xj = jnp.asarray(x)
    p0 = gmm.GMMParams(jnp.asarray(weights), jnp.asarray(means), jnp.asarray(cov))

    def fit(p, data):
        return gmm.fit_from_params(
            p,
            data,
            covariance_type=covariance_type,
            max_iter=args.iters,
            tol=0.0,
            reg_covar=args.reg_covar,
        )

    t0 = time.perf_counter()
    res = jax.block_until_ready(fit(p0, xj))  # warm-up: compile + first run
    compile_and_first_s = time.perf_counter() - t0
    emvi_s = _median_time(lambda: jax.block_until_ready(fit(p0, xj)), args.repeats)
    emvi_ll = float(jnp.mean(gmm.log_prob(res.params, xj, covariance_type=covariance_type)))
    x32, p32 = xj.astype(jnp.float32), jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p0)
    jax.block_until_ready(fit(p32, x32))
    emvi32_s = _median_time(lambda: jax.block_until_ready(fit(p32, x32)), args.repeats)

    # E-step and M-step alone (steady state: data centred and prepared once, as in a fit).
    model = gmm.model(covariance_type)
    shift = jnp.mean(xj, axis=0)
    data = jax.block_until_ready(model.prepare(xj - shift[None, :]))
    p0c = p0._replace(means=p0.means - shift[None, :])
    w = jnp.ones(n, xj.dtype)
    hyper = gmm.GMMHyper(jnp.asarray(args.reg_covar, xj.dtype))
    e_step = jax.jit(model.e_step)
    m_step = jax.jit(model.m_step)
    stats, _ = jax.block_until_ready(e_step(p0c, data, w))
    jax.block_until_ready(m_step(stats, hyper))
    e_s = _median_time(lambda: jax.block_until_ready(e_step(p0c, data, w)), args.repeats)
    m_s = _median_time(lambda: jax.block_until_ready(m_step(stats, hyper)), args.repeats)

    def sk_fit():
        gm = GaussianMixture(
            n_components=args.k,
            covariance_type=covariance_type,
            tol=0.0,
            reg_covar=args.reg_covar,
            max_iter=args.iters,
            weights_init=weights,
            means_init=means,
            precisions_init=prec,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(x)
        return gm

    gm = sk_fit()  # also warms caches, for symmetry with emvi's warm-up
    sk_s = _median_time(sk_fit, args.sklearn_repeats)
    sk_ll = float(gm.score(x))

    flops = flops_per_iteration(n, d, args.k, covariance_type)
    emvi_ms = 1e3 * emvi_s / args.iters
    sk_ms = 1e3 * sk_s / args.iters
    row = {
        "covariance_type": covariance_type,
        "emvi_ms_per_iter": emvi_ms,
        "emvi_float32_ms_per_iter": 1e3 * emvi32_s / args.iters,
        "sklearn_ms_per_iter": sk_ms,
        "speedup": sk_ms / emvi_ms,
        "emvi_e_step_ms": 1e3 * e_s,
        "emvi_m_step_ms": 1e3 * m_s,
        "emvi_compile_and_first_fit_s": compile_and_first_s,
        "emvi_num_iter": int(res.num_iter),
        "sklearn_num_iter": int(gm.n_iter_),
        "emvi_log_likelihood": emvi_ll,
        "sklearn_log_likelihood": sk_ll,
        "log_likelihood_difference": emvi_ll - sk_ll,
        "log_likelihood_relative_difference": abs(emvi_ll - sk_ll) / abs(sk_ll),
        "flops_per_iter": flops,
        "emvi_gflops": flops / (emvi_ms * 1e-3) / 1e9,
    }
    if args.accuracy:
        row.update(float32_accuracy(args, xj, p0, covariance_type))
    return row


def float32_accuracy(args: Args, xj, p0, covariance_type: str) -> dict:
    """Nats per point between the float64 optimum and a float32 fit of as many iterations."""
    from emvi import gmm

    def run(p, data, max_iter, tol):
        return gmm.fit_from_params(
            p,
            data,
            covariance_type=covariance_type,
            max_iter=max_iter,
            tol=tol,
            reg_covar=args.reg_covar,
        )

    ref = run(p0, xj, args.accuracy_max_iter, 1e-13)
    num_iter = int(ref.num_iter)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p0)
    res32 = run(p32, xj.astype(jnp.float32), num_iter, 0.0)

    def score(params):
        # In float64, with the weights renormalised: cast up, float32 weights sum to 1 only
        # to ~k eps32, which would shift every log p(x) by that much (either sign).
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        params = params._replace(weights=params.weights / jnp.sum(params.weights))
        return float(jnp.mean(gmm.log_prob(params, xj, covariance_type=covariance_type)))

    return {
        "float64_iterations_to_optimum": num_iter,
        "float64_converged": bool(ref.converged),
        "float64_optimum_log_likelihood": score(ref.params),
        "float32_gap_nats_per_point": score(ref.params) - score(res32.params),
    }


def main(args: Args) -> dict:
    """Runs the benchmark, prints a table and returns (and optionally writes) the results."""
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    threads = thread_info()
    print(
        f"n={args.n} d={args.d} k={args.k} iters={args.iters} float64 | cores: "
        f"{threads['affinity_cpus']} | XLA intra-op threads: {threads['xla_intra_op_threads']} | "
        "BLAS: "
        + ", ".join(
            f"{p['internal_api']}={p['num_threads']}" for p in threads["blas_threadpools"] or []
        ),
        flush=True,
    )
    peak = matmul_gflops(args.matmul_size)
    print(f"float64 matmul ({args.matmul_size}^3, jnp.dot): {peak:.1f} GFLOP/s", flush=True)
    x = make_data(args.seed, args.n, args.d, args.k)
    rows = []
    for ct in args.covariance_types:
        r = bench_one(args, x, ct)
        r["fraction_of_matmul_peak"] = r["emvi_gflops"] / peak
        rows.append(r)
        print(
            f"{ct:9s}: emvi {r['emvi_ms_per_iter']:8.2f} ms/iter "
            f"(E {r['emvi_e_step_ms']:.2f} ms, M {r['emvi_m_step_ms']:.2f} ms; "
            f"{r['emvi_gflops']:.1f} GFLOP/s = {100 * r['fraction_of_matmul_peak']:.0f}% of matmul)"
            f" | float32 {r['emvi_float32_ms_per_iter']:8.2f} ms/iter"
            f" | sklearn {r['sklearn_ms_per_iter']:8.2f} ms/iter | speedup "
            f"{r['speedup']:5.1f}x | log-lik emvi {r['emvi_log_likelihood']:.12f} "
            f"sklearn {r['sklearn_log_likelihood']:.12f} diff {r['log_likelihood_difference']:.2e} "
            f"(rel {r['log_likelihood_relative_difference']:.1e})",
            flush=True,
        )
        if args.accuracy:
            print(
                f"{ct:9s}: float32 fit ends {r['float32_gap_nats_per_point']:.2e} nats/point "
                f"below the float64 optimum ({r['float64_iterations_to_optimum']} iterations)",
                flush=True,
            )
    out = {
        "args": dataclasses.asdict(args),
        "threads": threads,
        "matmul_gflops": peak,
        "results": rows,
    }
    if args.out is not None:
        from emvi.runs import write_json

        write_json(args.out, out)
        print(f"wrote {args.out}")
    return json.loads(json.dumps(out, default=str))


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
