"""Fit a Gaussian mixture data-parallel over every device of every process.

The same command runs on every host (one process per host, or several per host); each
process reads only its own rows of the ``.npy`` file (memory-mapped), the E-step statistics
are summed across all devices of all processes, and every process ends with the same fit.

One machine, two processes (what ``tests/test_parallel.py`` runs)::

    python scripts/fit_multihost.py --data x.npy --k 4 --coordinator localhost:47001 \
        --num-processes 2 --process-id 0 &
    python scripts/fit_multihost.py --data x.npy --k 4 --coordinator localhost:47001 \
        --num-processes 2 --process-id 1

On a SLURM cluster (one task per node)::

    srun python scripts/fit_multihost.py --data /shared/x.npy --k 64 \
        --coordinator "$(scontrol show hostnames $SLURM_NODELIST | head -n1):47001" \
        --num-processes "$SLURM_NTASKS" --process-id "$SLURM_PROCID"

With ``--num-processes 1`` it is an ordinary one-process fit (the reference). The result (mean
log-likelihood, iterations, parameters) is printed as one JSON line by process 0, or by every
process with ``--all-print``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a 2-D .npy file (num_points, dim)")
    ap.add_argument("--k", type=int, required=True, help="number of components")
    ap.add_argument("--covariance-type", default="diag")
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--tol", type=float, default=0.0)
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk per device")
    ap.add_argument("--coordinator", default="localhost:47001")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--x64", action="store_true")
    ap.add_argument("--all-print", action="store_true")
    args = ap.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from emvi import parallel

    if args.num_processes > 1:
        parallel.initialize(args.coordinator, args.num_processes, args.process_id)

    import jax.numpy as jnp
    import numpy as np

    from emvi import em, gmm

    x_all = np.load(args.data, mmap_mode="r")
    rows = parallel.process_rows(x_all.shape[0])
    local = np.asarray(x_all[rows])
    dtype = np.float64 if args.x64 else np.float32
    local = local.astype(dtype)
    mesh = parallel.make_mesh()
    xs, ws = parallel.global_rows(mesh, local)
    # Every process starts from the same parameters: the first k rows of the file and unit
    # covariances (a deterministic start, so the fit does not depend on the process count).
    first = np.asarray(x_all[: args.k], dtype)
    d = first.shape[1]
    cov = {
        "diag": np.ones((args.k, d)),
        "spherical": np.ones(args.k),
        "full": np.broadcast_to(np.eye(d), (args.k, d, d)),
        "tied": np.eye(d),
    }[args.covariance_type].astype(dtype)
    p0 = gmm.GMMParams(
        jnp.full((args.k,), 1.0 / args.k, dtype), jnp.asarray(first), jnp.asarray(cov)
    )
    hyper = gmm.GMMHyper(jnp.asarray(1e-6, dtype), None)
    model = parallel.data_parallel(
        gmm.model(args.covariance_type), mesh, chunk_size=args.chunk_size
    )
    res = em.fit(
        model,
        jax.tree_util.tree_map(lambda a: a[None], p0),
        xs,
        ws,
        max_iter=args.max_iter,
        tol=args.tol,
        hyper=hyper,
    )
    out = {
        "process_id": args.process_id,
        "num_processes": jax.process_count(),
        "num_devices": jax.device_count(),
        "log_likelihood": float(res.log_likelihood),
        "num_iter": int(res.num_iter),
        "means": np.asarray(res.params.means).tolist(),
    }
    if args.all_print or jax.process_index() == 0:
        print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
