"""Data-parallel EM and training on many devices, and EM across two processes.

Every check runs in a fresh subprocess: the number of CPU devices
(``--xla_force_host_platform_device_count``) and the multi-process runtime must be set
before JAX starts. Oracle: the same computation on one device, in one process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

MULTI_DEVICE = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from emvi import em, gmm, optim, parallel, vae

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1003, 3)) + np.array([0.0, 2.0, -1.0])
    out = {"em": {}, "vae": {}}
    for ct in ("diag", "full"):
        cov = np.ones((3, 3)) if ct == "diag" else np.broadcast_to(np.eye(3), (3, 3, 3))
        p0 = gmm.GMMParams(jnp.full(3, 1 / 3), jnp.asarray(x[:3]), jnp.asarray(cov))
        p0 = jax.tree_util.tree_map(lambda a: jnp.stack([a, a * 1.0]), p0)
        hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
        for nd in (1, 2, 8):
            mesh = parallel.make_mesh(nd)
            model = parallel.data_parallel(gmm.model(ct), mesh, chunk_size=64)
            xs, ws = parallel.shard_rows(mesh, x)
            res = em.fit(model, p0, xs, ws, max_iter=12, tol=0.0, hyper=hyper)
            out["em"].setdefault(ct, {})[nd] = {
                "ll": float(res.log_likelihood),
                "history": np.asarray(res.history).tolist(),
                "means": np.asarray(res.params.means).tolist(),
                "cov": np.asarray(res.params.covariances).tolist(),
            }
    # A Gaussian VAE trained data-parallel: the batch is split over the devices, the
    # parameters replicated; the jitted step is partitioned by XLA.
    xb = (rng.random((64, 10)) < 0.4).astype(np.float64)
    model = vae.gaussian_vae(10, 2, (16,))
    opt = optax.adam(1e-2)
    for nd in (1, 2, 8):
        mesh = parallel.make_mesh(nd)
        params = model.init(jax.random.key(0))
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        params = parallel.replicated(mesh, params)
        state = parallel.replicated(mesh, opt.init(params))
        xs, _ = parallel.shard_rows(mesh, xb)

        @jax.jit
        def step(params, state, key, xs):
            def loss_fn(p):
                return vae.elbo_loss(p, key, xs, model=model)[0]

            loss, grads = jax.value_and_grad(loss_fn)(params)
            params, state = optim.apply_update(opt, grads, state, params)
            return params, state, loss

        losses = []
        for t in range(5):
            params, state, loss = step(params, state, jax.random.fold_in(jax.random.key(1), t), xs)
            losses.append(float(loss))
        out["vae"][nd] = losses
    try:
        parallel.make_mesh(9)
    except ValueError as err:
        out["too_many"] = str(err)
    print("RESULT " + json.dumps(out))
    """
)


def _run(code_or_args, timeout=300, env=None):
    env = {**os.environ, **(env or {})}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        code_or_args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_one_two_and_eight_devices_give_the_same_fit_and_the_same_training():
    proc = _run([sys.executable, "-c", MULTI_DEVICE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    for ct, by_nd in out["em"].items():
        ref = by_nd["1"]
        for nd in ("2", "8"):
            # Only the order of the sums across devices differs: 1e-10 relative (the issue's
            # bound; about 1e-15 is seen).
            for key in ("ll", "history", "means", "cov"):
                np.testing.assert_allclose(
                    by_nd[nd][key], ref[key], rtol=1e-10, atol=1e-12, err_msg=f"{ct} {nd} {key}"
                )
    ref = np.asarray(out["vae"]["1"])
    assert ref[-1] < ref[0]
    for nd in ("2", "8"):
        np.testing.assert_allclose(out["vae"][nd], ref, rtol=1e-9)
    assert "asked for" in out["too_many"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_fit_what_one_process_fits(tmp_path, rng):
    x = rng.normal(size=(600, 4)) + np.array([0.0, 3.0, 0.0, -2.0]) * (rng.random((600, 1)) < 0.5)
    path = tmp_path / "x.npy"
    np.save(path, x)
    script = str(ROOT / "scripts" / "fit_multihost.py")
    common = ["--data", str(path), "--k", "3", "--max-iter", "15", "--x64", "--all-print"]
    single = _run([sys.executable, script, *common], timeout=200)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = json.loads(single.stdout.strip().splitlines()[-1])
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                script,
                *common,
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out in outs:
        assert out["num_processes"] == 2 and out["num_devices"] == 2
        np.testing.assert_allclose(out["log_likelihood"], ref["log_likelihood"], rtol=1e-10)
        np.testing.assert_allclose(out["means"], ref["means"], rtol=1e-10, atol=1e-12)
        assert out["num_iter"] == ref["num_iter"] == 15


def test_bad_process_settings_raise_clear_errors():
    from emvi import parallel

    with pytest.raises(ValueError, match="do not divide"):
        parallel.process_rows(10, process_index=0, process_count=3)
    assert parallel.process_rows(10, process_index=1, process_count=2) == slice(5, 10)
    with pytest.raises(ValueError, match="process_id"):
        parallel.initialize("localhost:1", 2, 2)
    with pytest.raises(ValueError, match="asked for"):
        parallel.make_mesh(10_000)
