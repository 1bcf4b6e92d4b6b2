"""Batches of fits in one call: what 8 restarts, or 8 data sets, cost against one fit.

Every fit runs exactly ``--iters`` EM iterations (``tol=0``) through the one driver
(``emvi.em.fit``; ``emvi.em.fit_many`` for data sets), float64, after a warm-up call
(compilation excluded); the median of ``--repeats`` timed calls is reported. The restarts
run twice: through the GMM's batched E-step (restarts folded into the component axis, one
loop over all restarts; ``emvi.em.BatchedEStep``) and, with it removed from the model, as
``vmap`` of the one-restart loop::

    python scripts/bench_batches.py --out runs/bench_batches.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from emvi import em, gmm

    rng = np.random.default_rng(0)
    n, d, k, b = args.n, args.d, args.k, args.batch
    x = rng.normal(size=(n, d)) + 3.0 * rng.normal(size=(k, d))[rng.integers(0, k, n)]
    xj = jnp.asarray(x)
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)

    def start(ct, rows):
        cov = np.ones((k, d)) if ct == "diag" else np.broadcast_to(np.eye(d), (k, d, d))
        return gmm.GMMParams(jnp.full((k,), 1.0 / k), jnp.asarray(x[rows]), jnp.asarray(cov))

    def timed(fn, *fargs, **fkw):
        jax.block_until_ready(fn(*fargs, **fkw))
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*fargs, **fkw))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    rows = []
    for ct in ("diag", "full"):
        model = gmm.model(ct)
        vmapped = model._replace(e_step=model.e_step.e_step)  # the batched E-step removed
        starts = [start(ct, rng.choice(n, k, replace=False)) for _ in range(b)]
        one = jax.tree_util.tree_map(lambda a: a[None], starts[0])
        many = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *starts)
        kw = dict(max_iter=args.iters, tol=0.0, hyper=hyper)
        t1 = timed(em.fit, model, one, xj, **kw)
        tr = timed(em.fit, model, many, xj, **kw)
        tv = timed(em.fit, vmapped, many, xj, **kw)
        xs = jnp.stack([xj[rng.permutation(n)] for _ in range(b)])
        pb = jax.tree_util.tree_map(lambda a: a[:, None], many)
        td = timed(em.fit_many, model, pb, xs, **kw)
        rows.append(
            {
                "covariance_type": ct,
                "one_fit_s": t1,
                f"{b}_restarts_s": tr,
                f"{b}_restarts_over_one": tr / t1,
                f"{b}_restarts_vmap_s": tv,
                f"{b}_restarts_vmap_over_one": tv / t1,
                f"{b}_data_sets_s": td,
                f"{b}_data_sets_over_one": td / t1,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "n": n,
        "d": d,
        "k": k,
        "iters": args.iters,
        "backend": jax.default_backend(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
