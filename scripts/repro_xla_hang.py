r"""Reproducer for the XLA:CPU hang of issue 13: run a small jitted program many times.

Each run is a fresh subprocess (a hang, if any, is a property of one process: thread pools,
compilation, the runtime's scheduling). A run counts as **hung** only if, for
``--stall-seconds`` in a row, no thread of the process is runnable and the process's CPU time
does not advance: a deadlock, not a slow run on a loaded machine (a process starved of CPU
keeps a runnable thread). Every hung run is dumped (``py-spy dump --native`` when installed,
else ``gdb -batch -ex "thread apply all bt"``) into ``--dump-dir`` and killed.

Cases (``--case``):

* ``trace_scan``: the ``lax.scan`` form of ``em.em_trace`` that ``em_trace``'s docstring says
  deadlocked, on a full-covariance GMM of the digits (1797 x 64, k = 10, float64).
* ``fit``: ``gmm.fit(covariance_type="full", chunk_size=...)`` as in the issue, scaled down
  (``--n``, ``--d``, ``--k``, ``--chunk``, ``--iters``).
* ``minimal``: emvi-free: a ``lax.fori_loop`` of ``--iters`` iterations, each two
  independent chains of a large matmul (``--n`` x ``k d`` by ``k d`` x ``d``), a batched
  Cholesky of ``--k`` matrices ``--d`` x ``--d`` and a triangular solve with it (two
  independent LAPACK calls, as the chunked E-step compiled to: see ``em.chunked_e_step``).

Usage::

    python scripts/repro_xla_hang.py --case trace_scan --runs 20
    python scripts/repro_xla_hang.py --case fit --runs 20 --n 200000 --chunk 20000 --k 64
    python scripts/repro_xla_hang.py --case minimal --runs 50 \
        --xla-flags=--xla_cpu_use_thunk_runtime=false

Prints one line per run and a summary ``runs=R ok=O hung=H failed=F``; exits 1 if any run hung
or failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    t0 = time.perf_counter()
    if args.case == "trace_scan":
        from emvi import gmm
        from emvi.data import load_digits

        x, y = load_digits()
        x = x - x.mean(0)
        k = 10
        means = np.stack([x[y == c].mean(0) for c in range(k)])
        params = gmm.GMMParams(
            jnp.full(k, 0.1), jnp.asarray(means), jnp.broadcast_to(4.0 * jnp.eye(64), (k, 64, 64))
        )
        model = gmm.model("full")
        data = model.prepare(jnp.asarray(x))
        w = jnp.ones(x.shape[0])
        hyper = gmm.GMMHyper(jnp.asarray(0.1))

        def trace(theta, data, w, hyper):
            def wmean(v):
                return jnp.sum(w * v) / jnp.sum(w)

            def body(theta, _):
                q = model.posterior(theta, data)
                ll_e = wmean(model.log_prob(theta, data))
                elbo_e = wmean(model.elbo(theta, q, data))
                stats, _ = model.e_step(theta, data, w)
                new = model.m_step(stats, hyper)
                ll_m = wmean(model.log_prob(new, data))
                elbo_m = wmean(model.elbo(new, q, data))
                return new, (jnp.stack([ll_e, ll_m]), jnp.stack([elbo_e, elbo_m]))

            return lax.scan(body, theta, None, length=args.iters)

        out = jax.jit(trace)(params, data, w, hyper)
        result = float(jax.block_until_ready(out)[1][0][-1, 1])
    elif args.case == "fit":
        from emvi import gmm

        rng = np.random.default_rng(args.seed)
        centres = rng.normal(size=(args.k, args.d)) * 3.0
        x = centres[rng.integers(0, args.k, args.n)] + rng.normal(size=(args.n, args.d))
        res = gmm.fit(
            jax.random.key(args.seed),
            jnp.asarray(x),
            num_components=args.k,
            covariance_type="full",
            max_iter=args.iters,
            tol=0.0,
            init="random_from_data",
            chunk_size=args.chunk,
        )
        result = float(jax.block_until_ready(res.log_likelihood))
    else:
        from jax.scipy.linalg import solve_triangular

        k, d = args.k, args.d
        a0 = jnp.broadcast_to(jnp.eye(d) * 2.0, (k, d, d))
        eye = jnp.broadcast_to(jnp.eye(d), (k, d, d))

        feats = jnp.asarray(np.random.default_rng(args.seed).normal(size=(args.n, k * d)))

        def chain(a, scale):
            # A large matmul and fusion (run in pieces on the intra-op pool), then a batched
            # Cholesky and triangular solve (lapack_dpotrf_ffi, lapack_dtrsm_ffi, batch k).
            g = jnp.tanh(scale * feats @ a.reshape(k * d, d)) @ jnp.ones((d, d))
            cov = a + 1e-9 * jnp.mean(g) * eye
            return solve_triangular(jnp.linalg.cholesky(cov), eye, lower=True)

        def body(_, a):
            # Two independent chains: the thunk executor may start both solves at once.
            inv1 = chain(a, 1.0)
            if args.ordered:  # the second chain waits for the first (a data dependence)
                a = a + 0.0 * inv1[:1, :1, :1]
            inv2 = chain(a, 2.0)
            prec = jnp.swapaxes(inv1, -1, -2) @ inv2
            return a + 1e-9 * (prec + jnp.swapaxes(prec, -1, -2))

        out = jax.jit(lambda a: lax.fori_loop(0, args.iters, body, a))(a0)
        result = float(jnp.sum(jax.block_until_ready(out)))
    print(f"ok {result:.10g} {time.perf_counter() - t0:.2f}s", flush=True)


def _threads(pid: int) -> list[tuple[str, int]]:
    """(state, utime + stime in ticks) of every thread of ``pid``."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out.append((fields[0], int(fields[11]) + int(fields[12])))
    return out


def _dump(pid: int, path: Path) -> None:
    """Stacks of every thread of ``pid``: gdb for all native threads, py-spy for Python's."""
    cmds = []
    if shutil.which("gdb"):
        cmds.append(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"])
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if Path(pyspy).exists():
        cmds.append([pyspy, "dump", "--native", "--pid", str(pid)])
    text = []
    for cmd in cmds:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            text.append(out.stdout + out.stderr)
        except (OSError, subprocess.TimeoutExpired) as err:
            text.append(f"{cmd[0]} failed: {err}")
    path.write_text("\n".join(text) if text else "no gdb or py-spy to dump with")


def run_once(
    child_argv: list[str],
    env: dict,
    stall_seconds: float,
    max_seconds: float,
    dump_path: Path | None,
) -> tuple[str, str]:
    """Runs one child; returns (status, detail) with status in ok / hung / failed / timeout."""
    proc = subprocess.Popen(
        child_argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    start = time.monotonic()
    stalled_since, stall_cpu = None, 0
    while proc.poll() is None:
        time.sleep(0.25)
        try:
            threads = _threads(proc.pid)
        except OSError:
            continue
        cpu = sum(t for _, t in threads)
        now = time.monotonic()
        # Busy: a thread runnable (or in uninterruptible I/O), or more than 0.05 s of CPU used
        # since the stall began (an idle pool's housekeeping wake-ups use far less).
        if any(s in "RD" for s, _ in threads) or (
            stalled_since is not None and cpu - stall_cpu > 5
        ):
            stalled_since = None
        elif stalled_since is None:
            stalled_since, stall_cpu = now, cpu
        hung = stalled_since is not None and now - stalled_since >= stall_seconds
        if hung or now - start > max_seconds:
            if dump_path is not None:
                _dump(proc.pid, dump_path)
            proc.kill()
            proc.communicate()
            return ("hung" if hung else "timeout"), f"{now - start:.1f}s"
    out, err = proc.communicate()
    if proc.returncode != 0:
        return "failed", err.strip().splitlines()[-1] if err.strip() else f"rc={proc.returncode}"
    return "ok", out.strip().splitlines()[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=["trace_scan", "fit", "minimal"], default="trace_scan")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--iters", type=int, default=3, help="EM iterations / scan length")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ordered", action="store_true", help="minimal: order the two chains")
    p.add_argument("--xla-flags", default=None, help="XLA_FLAGS for the children")
    p.add_argument("--stall-seconds", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=900.0)
    p.add_argument("--dump-dir", type=Path, default=Path("/tmp/repro_xla_hang"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0
    env = dict(os.environ)
    if args.xla_flags is not None:
        env["XLA_FLAGS"] = args.xla_flags
    argv = [
        sys.executable,
        __file__,
        "--child",
        "--case",
        args.case,
        "--iters",
        str(args.iters),
        "--n",
        str(args.n),
        "--d",
        str(args.d),
        "--k",
        str(args.k),
        "--chunk",
        str(args.chunk),
        *(["--ordered"] if args.ordered else []),
    ]
    args.dump_dir.mkdir(parents=True, exist_ok=True)
    counts = {"ok": 0, "hung": 0, "failed": 0, "timeout": 0}
    for i in range(args.runs):
        seed_argv = [*argv, "--seed", str(args.seed + i)]
        dump = args.dump_dir / f"{args.case}_{i}.txt"
        status, detail = run_once(seed_argv, env, args.stall_seconds, args.max_seconds, dump)
        counts[status] += 1
        print(f"run {i}: {status} {detail}", flush=True)
    print(" ".join([f"runs={args.runs}"] + [f"{k}={v}" for k, v in counts.items()]), flush=True)
    return int(counts["hung"] + counts["failed"] + counts["timeout"] > 0)


if __name__ == "__main__":
    sys.exit(main())
