"""Regression for issue 13: a chunked full-covariance GMM fit that hung XLA:CPU.

The cause is in jaxlib 0.10.2's LAPACK kernels, not in emvi: a batched ``lapack_*_ffi``
call whose batch is big enough (batch x flops per matrix >= 2e5, e.g. 64 triangular solves
of 16 x 16) splits the batch over XLA:CPU's intra-op thread pool and *blocks* its thread in
``absl::BlockingCounter::Wait`` until the pieces are done (``ParallelBatchMap`` in
``jaxlib/cpu/lapack_kernels.cc``). When the thunk executor runs as many such calls at once as
the pool has threads, every thread waits for pieces that no free thread is left to run: a
deadlock (on 2 cores, two independent calls suffice). Upstream disabled the parallel path in
open-source builds (jax commit 859992407d, "Don't try to parallelize LAPACK kernels in
opensource builds", after jax 0.11.0).

So one LAPACK call in flight at a time cannot deadlock: its pieces run on the other pool
threads (the parallel path is only taken with two or more). emvi's fit programs are built so
that every LAPACK call is ordered after or before every other by data dependence, which the
thunk executor honours (its dependencies come from buffer uses). The first tests check that
property on the compiled HLO (with the two patterns that did hang as controls that the check
flags); the last runs the configuration that hung, scaled down, many times in a subprocess and
fails on a stall.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from emvi import em, gmm

_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.*)$")
_CALLED = re.compile(
    r"\b(?:calls|body|condition|to_apply|branch_computations|called_computations)="
    r"(\{[^}]*\}|%[\w.\-]+)"
)


def _parse_hlo(text: str) -> dict[str, dict[str, tuple[set[str], set[str], bool]]]:
    """computation -> instruction -> (operands and control predecessors, called
    computations, is a LAPACK custom call)."""
    comps: dict[str, dict[str, tuple[set[str], set[str], bool]]] = {}
    current = None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            comps[current] = {}
            continue
        m = _INSTRUCTION.match(line)
        if current is None or not m:
            continue
        name, rest = m.groups()
        head = rest.split("), ")[0]
        operands = set(re.findall(r"%[\w.\-]+", head.split("(", 1)[1] if "(" in head else ""))
        preds = re.search(r"control-predecessors=\{([^}]*)\}", rest)
        if preds:
            operands |= set(re.findall(r"%[\w.\-]+", preds.group(1)))
        called = {c for group in _CALLED.findall(rest) for c in re.findall(r"%[\w.\-]+", group)}
        lapack = 'custom_call_target="lapack_' in rest
        comps[current][name] = (operands, called, lapack)
    return comps


def unordered_lapack_calls(hlo_text: str) -> list[tuple[str, str, str]]:
    """Pairs of LAPACK calls (or instructions containing some: while, call, conditional)
    that no chain of data dependence orders in the compiled HLO ``hlo_text``: the ones that
    may run at the same time. Returns ``(computation, a, b)`` triples."""
    comps = _parse_hlo(hlo_text)
    contains: dict[str, bool] = {}

    def has_lapack(comp: str) -> bool:
        if comp not in contains:
            contains[comp] = False
            contains[comp] = any(
                lap or any(has_lapack(c) for c in called if c in comps)
                for _, called, lap in comps[comp].values()
            )
        return contains[comp]

    pairs = []
    for comp, instrs in comps.items():
        nodes = [
            name
            for name, (_, called, lap) in instrs.items()
            if lap or any(has_lapack(c) for c in called if c in comps)
        ]
        # HLO text lists every instruction after its operands, so one pass collects ancestors.
        ancestors: dict[str, set[str]] = {}
        for name, (operands, _, _) in instrs.items():
            acc: set[str] = set()
            for op in operands & ancestors.keys():
                acc |= {op} | ancestors[op]
            ancestors[name] = acc

        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                if a not in ancestors[b] and b not in ancestors[a]:
                    pairs.append((comp, a, b))
    return pairs


def _gmm_inputs(covariance_type: str, n: int = 3000, d: int = 16, k: int = 64, r: int = 2):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)))
    hyper = gmm.GMMHyper(jnp.asarray(1e-6))
    cov = {
        "full": jnp.broadcast_to(jnp.eye(d), (r, k, d, d)),
        "tied": jnp.broadcast_to(jnp.eye(d), (r, d, d)),
        "diag": jnp.ones((r, k, d)),
        "spherical": jnp.ones((r, k)),
    }[covariance_type]
    p0 = gmm.GMMParams(jnp.full((r, k), 1.0 / k), jnp.asarray(rng.normal(size=(r, k, d))), cov)
    return x, hyper, p0


def _fit_hlo(covariance_type: str, chunk_size: int | None) -> str:
    x, hyper, p0 = _gmm_inputs(covariance_type)
    lowered = em._fit_jit.lower(
        gmm.model(covariance_type),
        p0,
        x,
        jnp.ones(x.shape[0]),
        jnp.asarray(1e-3),
        hyper,
        max_iter=5,
        chunk_size=chunk_size,
    )
    return lowered.compile().as_text()


def _old_chunked_e_step(model, params, data, weights, chunk_size):
    """The E-step of before the fix: first chunk outside the scan, the rest inside."""
    n = data.features.shape[0]
    chunks = jax.tree_util.tree_map(lambda a: a.reshape(n // chunk_size, chunk_size, -1), data)
    w = weights.reshape(n // chunk_size, chunk_size)
    first = model.e_step(params, jax.tree_util.tree_map(lambda c: c[0], chunks), w[0])

    def body(carry, chunk):
        s, l_ = model.e_step(params, *chunk)
        return (jax.tree_util.tree_map(jnp.add, carry[0], s), carry[1] + l_), None

    rest = jax.tree_util.tree_map(lambda c: c[1:], (chunks, w))
    return lax.scan(body, first, rest)[0]


@pytest.mark.parametrize(
    ("covariance_type", "chunk_size"),  # 700: a padded last chunk
    [
        ("full", None),
        ("full", 1000),
        ("full", 700),
        ("tied", 700),
        ("diag", 700),
        ("spherical", 700),
    ],
)
def test_fit_program_orders_every_lapack_call(covariance_type, chunk_size):
    assert unordered_lapack_calls(_fit_hlo(covariance_type, chunk_size)) == []


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_linear_gaussian_fit_program_orders_every_lapack_call(noise):
    # pPCA / factor analysis: the posterior mean and covariance come from one solve against
    # the precision's Cholesky factor (two solves against it were two unordered calls).
    from emvi import linear_gaussian as lg

    x = jnp.asarray(np.random.default_rng(0).normal(size=(300, 6)))
    p0 = lg.init_params(jax.random.key(0), x, 2, noise=noise)
    p0 = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), p0)
    hyper = lg.make_hyper(None, 1e-6, x.dtype)
    lowered = em._fit_jit.lower(
        lg.model(noise), p0, x, None, 1e-3, hyper, max_iter=10, chunk_size=None
    )
    assert unordered_lapack_calls(lowered.compile().as_text()) == []


def test_em_trace_step_orders_every_lapack_call():
    x, hyper, p0 = _gmm_inputs("full", r=1)
    mdl = gmm.model("full")
    p1 = jax.tree_util.tree_map(lambda a: a[0], p0)
    args = (mdl, p1, mdl.prepare(x), jnp.ones(x.shape[0]), hyper)
    hlo = em._trace_step_jit.lower(*args).compile().as_text()
    assert unordered_lapack_calls(hlo) == []


def test_the_check_flags_the_two_patterns_that_hung():
    """Controls: the lax.scan em_trace and the first-chunk-outside-the-scan E-step."""
    x, hyper, p0 = _gmm_inputs("full", r=1)
    mdl = gmm.model("full")
    p1 = jax.tree_util.tree_map(lambda a: a[0], p0)
    data, w = mdl.prepare(x), jnp.ones(x.shape[0])

    def trace_scan(theta, data, w):
        def body(t, _):
            new, ll, elbo = em._trace_step(mdl, t, data, w, hyper)
            return new, (ll, elbo)

        return lax.scan(body, theta, None, length=3)

    def old_em(theta, data, w):
        def body(_, t):
            return mdl.m_step(_old_chunked_e_step(mdl, t, data, w, 1000)[0], hyper)

        return lax.fori_loop(0, 3, body, theta)

    for f in (trace_scan, old_em):
        hlo = jax.jit(f).lower(p1, data, w).compile().as_text()
        assert unordered_lapack_calls(hlo), f.__name__


_STRESS = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from emvi import gmm
    rng = np.random.default_rng(0)
    n, d, k = 2000, 16, 64
    x = jnp.asarray(rng.normal(size=(k, d))[rng.integers(0, k, n)] + rng.normal(size=(n, d)))
    t0, fits = time.perf_counter(), 0
    while time.perf_counter() - t0 < float(sys.argv[1]):
        res = gmm.fit(jax.random.key(fits), x, num_components=k, covariance_type="full",
                      max_iter=20, tol=0.0, init="random_from_data", chunk_size=500,
                      num_init=2)
        assert np.isfinite(float(res.log_likelihood))
        fits += 1
    print("ok", fits, flush=True)
    """
)


def _cpu_ticks(pid: int) -> tuple[int, bool]:
    """(CPU ticks used by all threads of ``pid``, whether any thread is runnable)."""
    ticks, runnable = 0, False
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
        runnable |= fields[0] in "RD"
    return ticks, runnable


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_chunked_full_gmm_fits_never_stall():
    """The configuration that hung (full covariance, chunked E-step, k = 64, d = 16, float64,
    restarts), scaled down, fitted again and again for 10 s in a fresh process. A stall is
    10 s with no thread runnable and no CPU time used (a deadlock, not a slow machine).
    With the E-step of before the fix this loop hung in 3 runs out of 3, each after 20-40 s
    of fitting on 2 loaded cores; the HLO checks above catch that regression every time."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _STRESS, "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stalled_since, stall_ticks = None, 0
    start = time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(0.25)
            try:
                ticks, runnable = _cpu_ticks(proc.pid)
            except OSError:
                continue
            now = time.monotonic()
            if runnable or (stalled_since is not None and ticks - stall_ticks > 5):
                stalled_since = None
            elif stalled_since is None:
                stalled_since, stall_ticks = now, ticks
            assert stalled_since is None or now - stalled_since < 10.0, "the fit deadlocked"
            assert now - start < 240.0, "the fits took over 240 s"
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert out.startswith("ok"), out
