"""Benchmarks of EM on data larger than memory, and of online against batch EM.

Three sub-commands (each prints one JSON object and writes it, with any figure, to --out):

``make-data``: writes an (n, d) float64 ``.npy`` file drawn from a k-component Gaussian
mixture, in blocks, never holding the whole array (the data for ``stream``)::

    python scripts/bench_stream.py make-data --n 10000000 --d 16 --k 16 --path /tmp/x10m.npy

``stream``: batch EM over the memory-mapped file (``emvi.stream.fit_source``), or in memory
(``emvi.em.fit``, the whole array loaded) with ``--in-memory``; time per iteration after a
warm-up iteration. Run it under ``/usr/bin/time -v`` for the peak resident memory::

    /usr/bin/time -v python scripts/bench_stream.py stream --path /tmp/x10m.npy --k 64 \
        --covariance-type diag --chunk-size 200000 --iters 3 --out runs/bench_stream/diag.json

``online``: log-likelihood against wall time for batch, incremental and stepwise EM on the same
data and start (n = 1,000,000 by default), with a figure::

    python scripts/bench_stream.py online --n 1000000 --out runs/bench_stream/online.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _mixture(rng, n, d, k):

    means = rng.normal(scale=4.0, size=(k, d))
    scales = rng.uniform(0.5, 1.5, size=(k, d))
    labels = rng.integers(0, k, n)
    return means[labels] + rng.normal(size=(n, d)) * scales[labels]


def make_data(args) -> dict:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    means = rng.normal(scale=4.0, size=(args.k, args.d))
    scales = rng.uniform(0.5, 1.5, size=(args.k, args.d))
    out = np.lib.format.open_memmap(args.path, mode="w+", dtype=np.float64, shape=(args.n, args.d))
    block = 1_000_000
    for lo in range(0, args.n, block):
        hi = min(args.n, lo + block)
        labels = rng.integers(0, args.k, hi - lo)
        out[lo:hi] = means[labels] + rng.normal(size=(hi - lo, args.d)) * scales[labels]
    out.flush()
    del out
    return {"path": str(args.path), "n": args.n, "d": args.d, "k": args.k}


def _start(x_head, k, d, ct):
    import jax.numpy as jnp
    import numpy as np

    from emvi import gmm

    cov = {
        "diag": np.ones((k, d)),
        "full": np.broadcast_to(np.eye(d), (k, d, d)),
        "spherical": np.ones(k),
        "tied": np.eye(d),
    }[ct]
    return gmm.GMMParams(
        jnp.full((k,), 1.0 / k), jnp.asarray(np.asarray(x_head[:k])), jnp.asarray(cov, jnp.float64)
    )


def stream_bench(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from emvi import em, gmm, stream

    x = np.load(args.path, mmap_mode="r")
    n, d = x.shape
    p0 = _start(x, args.k, d, args.covariance_type)
    model = gmm.model(args.covariance_type)
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    t0 = time.perf_counter()
    if args.in_memory:
        xm = jnp.asarray(np.asarray(x))
        batch = jax.tree_util.tree_map(lambda a: a[None], p0)
        kw = dict(tol=0.0, hyper=hyper, chunk_size=args.chunk_size)

        def run(iters):
            return jax.block_until_ready(em.fit(model, batch, xm, max_iter=iters, **kw))

    else:
        src = stream.from_npy(args.path, chunk_size=args.chunk_size)

        def run(iters):
            return stream.fit_source(model, p0, src, max_iter=iters, tol=0.0, hyper=hyper)

    run(1)  # compiles
    warm = time.perf_counter() - t0
    if args.in_memory:
        run(args.iters + 1)  # max_iter is static under jit: compile this length too
    # Two timed calls after the compile: one iteration, then iters + 1. Each call also pays
    # fixed costs (the start, the final log-likelihood pass), which the difference removes.
    t1 = time.perf_counter()
    run(1)
    one = time.perf_counter() - t1
    t2 = time.perf_counter()
    res = run(args.iters + 1)
    per_iter = (time.perf_counter() - t2 - one) / args.iters
    return {
        "mode": "in_memory" if args.in_memory else "memory_mapped",
        "n": n,
        "d": d,
        "k": args.k,
        "covariance_type": args.covariance_type,
        "chunk_size": args.chunk_size,
        "seconds_per_iteration": per_iter,
        "first_call_seconds": warm,
        "log_likelihood": float(res.log_likelihood),
        "backend": jax.default_backend(),
    }


def online_bench(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from emvi import em, gmm, stream

    rng = np.random.default_rng(args.seed)
    x = _mixture(rng, args.n, args.d, args.k)
    model = gmm.model("diag")
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    xj = jnp.asarray(x)
    # One start for all three: k-means++ seeds from a 20,000-point subsample (scikit-learn's
    # init_params="k-means++": each component one seed point). A start from k random points
    # leaves batch and stepwise EM in different local optima 0.13 nats apart, which says
    # nothing about their speed; a converged k-means start leaves nothing to race over.
    sub = jnp.asarray(x[rng.permutation(args.n)[:20_000]])
    p0 = gmm.init_params(
        jax.random.key(args.seed), sub, args.k, covariance_type="diag", method="kmeans++"
    )
    eval_src = stream.from_array(x, chunk_size=100_000)

    def ll(params):
        return stream.final_log_likelihood(model, params, eval_src)

    curves = {}
    # Batch EM: one iteration per point on the curve (the in-memory driver, jitted once).
    one = jax.jit(
        lambda p: em.run_em(model, p, model.prepare(xj), max_iter=1, tol=0.0, hyper=hyper).params
    )
    # Twice: the first call's output differs from p0 in weak types, which recompiles once.
    jax.block_until_ready(one(one(p0)))
    params, clock, pts = p0, 0.0, [(0.0, ll(p0))]
    for _ in range(args.batch_iters):
        t = time.perf_counter()
        params = jax.block_until_ready(one(params))
        clock += time.perf_counter() - t
        pts.append((clock, ll(params)))
    curves["batch EM"] = pts
    best = pts[-1][1]

    def run_online(kind):
        clock = {"t": 0.0, "last": None}
        pts = [(0.0, ll(p0))]
        src = stream.from_array(
            x, chunk_size=args.batch_size, seed=0 if kind == "stepwise" else None
        )
        every = max(1, (args.n // args.batch_size) // args.points_per_epoch)

        def cb(t, params):
            if t % every == 0:
                jax.block_until_ready(params)
                now = time.perf_counter()
                clock["t"] += now - clock["last"]
                pts.append((clock["t"], ll(params)))
                clock["last"] = time.perf_counter()

        clock["last"] = time.perf_counter()
        if kind == "stepwise":
            stream.online_em(
                model,
                p0,
                src,
                num_epochs=args.epochs,
                alpha=args.alpha,
                t0=2.0,
                hyper=hyper,
                callback=cb,
            )
        else:
            stream.incremental_em(model, p0, src, num_epochs=args.epochs, hyper=hyper, callback=cb)
        return pts

    # Warm the per-chunk programs of both so that compilation is not on the clocks.
    warm = stream.from_array(x[: 2 * args.batch_size], chunk_size=args.batch_size)
    stream.online_em(model, p0, warm, hyper=hyper)
    stream.incremental_em(model, p0, warm, num_epochs=2, hyper=hyper)
    curves["incremental EM"] = run_online("incremental")
    curves["stepwise EM"] = run_online("stepwise")

    def time_to(pts, gap):
        for t, v in pts:
            if best - v <= gap:
                return t
        return None

    summary = {
        name: {
            "final_log_likelihood": pts[-1][1],
            "seconds_to_within_1e-2": time_to(pts, 1e-2),
            "seconds_to_within_1e-3": time_to(pts, 1e-3),
            "total_seconds": pts[-1][0],
        }
        for name, pts in curves.items()
    }
    result = {
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "batch_size": args.batch_size,
        "alpha": args.alpha,
        "epochs": args.epochs,
        "batch_iters": args.batch_iters,
        "batch_optimum": best,
        "summary": summary,
        "curves": curves,
        "backend": jax.default_backend(),
    }
    if args.out:
        _plot_online(result, Path(args.out).with_suffix(".png"))
    return result


def _plot_online(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    best = result["batch_optimum"]
    for name, pts in result["curves"].items():
        t = [p[0] for p in pts[1:]]
        gap = [max(best - p[1], 1e-7) for p in pts[1:]]
        ax.semilogy(t, gap, marker=".", label=name)
    ax.set_xlabel("wall time (s, evaluation excluded)")
    ax.set_ylabel("nats per point below batch EM's final value")
    ax.set_title(f"n = {result['n']:,}, d = {result['d']}, k = {result['k']} (diag GMM)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-data")
    m.add_argument("--n", type=int, default=10_000_000)
    m.add_argument("--d", type=int, default=16)
    m.add_argument("--k", type=int, default=16)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--path", required=True)
    s = sub.add_parser("stream")
    s.add_argument("--path", required=True)
    s.add_argument("--k", type=int, default=16)
    s.add_argument("--covariance-type", default="diag")
    s.add_argument("--chunk-size", type=int, default=200_000)
    s.add_argument("--iters", type=int, default=3)
    s.add_argument("--in-memory", action="store_true")
    o = sub.add_parser("online")
    o.add_argument("--n", type=int, default=1_000_000)
    o.add_argument("--d", type=int, default=16)
    o.add_argument("--k", type=int, default=16)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--batch-size", type=int, default=10_000)
    o.add_argument("--alpha", type=float, default=0.6)
    o.add_argument("--epochs", type=int, default=3)
    o.add_argument("--batch-iters", type=int, default=60)
    o.add_argument("--points-per-epoch", type=int, default=10)
    for p in (m, s, o):
        p.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    result = {"make-data": make_data, "stream": stream_bench, "online": online_bench}[args.cmd](
        args
    )
    text = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    summary = {k: v for k, v in result.items() if k != "curves"}
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
