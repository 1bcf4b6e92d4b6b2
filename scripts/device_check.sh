#!/usr/bin/env bash
# One prepared, short check on whatever accelerator is present (run it from the repo root,
# e.g. through the device tool): sets up a venv with the pinned lock plus JAX's CUDA plugin,
# then prints
#   1. the core tests (the exact models, the driver, streaming, the grid) on the device;
#   2. GMM ms/iteration at n = 1,000,000, d = 64, k = 64 (diag and full, float32 and float64);
#   3. VAE training examples/s (scripts/bench_vae.py, default digits model);
#   4. multi-device equality of data-parallel EM on the real devices (when there are >= 2).
# Figures go to ${OUT:-runs/device_check}/ as JSON; the log to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-runs/device_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  JAX_VERSION=$(.venv/bin/python -c "import jax; print(jax.__version__)")
  .venv/bin/python -m pip install -q "jax[cuda13]==${JAX_VERSION}" || \
    .venv/bin/python -m pip install -q "jax[cuda12]==${JAX_VERSION}"
fi
.venv/bin/python -c "import jax; print('backend', jax.default_backend(), jax.devices())"

echo "== 1. core tests on the device"
timeout 300 .venv/bin/python -m pytest -q -p no:xdist -x \
  tests/test_em.py tests/test_stream.py tests/test_gmm.py tests/test_bernoulli_mixture.py \
  2>&1 | tail -n 5 || echo "core tests: non-zero exit"

echo "== 2. GMM at n=1e6, d=64, k=64"
.venv/bin/python - "$OUT_DIR/gmm_1m.json" <<'PY'
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from emvi import em, gmm
rng = np.random.default_rng(0)
n, d, k, iters = 1_000_000, 64, 64, 10
x64 = rng.normal(size=(n, d))
rows = []
for dtype in (np.float32, np.float64):
    x = jnp.asarray(x64.astype(dtype))
    for ct in ("diag", "full"):
        cov = np.ones((k, d)) if ct == "diag" else np.broadcast_to(np.eye(d), (k, d, d))
        p0 = gmm.GMMParams(jnp.full((k,), 1 / k, dtype), x[:k], jnp.asarray(cov, dtype))
        p0 = jax.tree_util.tree_map(lambda a: a[None], p0)
        hyper = gmm.GMMHyper(jnp.asarray(1e-6, dtype), None)
        m = gmm.model(ct)
        jax.block_until_ready(em.fit(m, p0, x, max_iter=iters, tol=0.0, hyper=hyper))
        t = time.perf_counter()
        jax.block_until_ready(em.fit(m, p0, x, max_iter=iters, tol=0.0, hyper=hyper))
        ms = (time.perf_counter() - t) / iters * 1e3
        rows.append({"dtype": np.dtype(dtype).name, "covariance_type": ct, "ms_per_iteration": ms})
        print(rows[-1], flush=True)
json.dump({"n": n, "d": d, "k": k, "device": str(jax.devices()[0]), "rows": rows}, open(sys.argv[1], "w"))
PY

echo "== 3. VAE examples/s"
timeout 300 .venv/bin/python scripts/bench_vae.py --out "$OUT_DIR/bench_vae.json" --repeats 3 \
  2>&1 | tail -n 8 || echo "bench_vae: non-zero exit"

echo "== 4. data-parallel EM on the real devices"
.venv/bin/python - <<'PY'
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from emvi import em, gmm, parallel
nd = jax.device_count()
if nd < 2:
    print(f"one device ({jax.devices()[0]}): nothing to compare")
else:
    x = np.random.default_rng(0).normal(size=(100_003, 8))
    p0 = gmm.GMMParams(jnp.full(4, 0.25), jnp.asarray(x[:4]), jnp.ones((4, 8)))
    p0 = jax.tree_util.tree_map(lambda a: a[None], p0)
    hyper = gmm.GMMHyper(jnp.asarray(1e-6), None)
    lls = {}
    for m in sorted({1, 2, nd}):
        mesh = parallel.make_mesh(m)
        xs, ws = parallel.shard_rows(mesh, x)
        res = em.fit(parallel.data_parallel(gmm.model("diag"), mesh), p0, xs, ws, max_iter=20, tol=0.0, hyper=hyper)
        lls[m] = float(res.log_likelihood)
    print("log-likelihood by device count", lls, "max rel diff", max(abs(v / lls[1] - 1) for v in lls.values()))
PY
