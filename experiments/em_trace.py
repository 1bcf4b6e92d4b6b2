r"""EM as coordinate ascent on the ELBO, half-step by half-step (:func:`emvi.em.em_trace`).

After each E-step the ELBO touches log p(x) (KL = 0); after each M-step both have risen and
a KL gap has opened. (a) A 3-component full GMM on 2-D synthetic draws from random
responsibilities; (b) a Bernoulli mixture on digits-bin train from k random images, with a
Beta(2, 2) pixel prior (``--bm-prior-ab 1``: maximum likelihood; with a prior the likelihood
need not rise at every step). Writes ``results.json`` (traces, checks) and ``em_trace.png``.

Usage::

    python experiments/em_trace.py --workdir runs/em_trace --overwrite
    python experiments/em_trace.py plot runs/em_trace   # remake the figure
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from emvi import em, plotting, runs


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the EM trace (defaults: well under a minute on a 2-core CPU)."""

    workdir: str = "runs/em_trace"
    overwrite: bool = False
    """Replace an existing run folder."""
    seed: int = 0
    gmm_num_points: int = 500
    """Points drawn from the 2-D synthetic mixture."""
    gmm_num_components: int = 3
    gmm_num_iter: int = 40
    gmm_reg_covar: float = 1e-6
    bm_num_components: int = 20
    """Components of the Bernoulli mixture on digits-bin."""
    bm_num_iter: int = 40
    bm_num_points: int | None = None
    """Use only the first this many training images (None: all 1500)."""
    bm_prior_ab: float = 2.0
    """Beta(a, a) prior on pixel probabilities (2: Laplace smoothing); 1 is maximum
    likelihood, whose 0/1 probabilities make the post-M-step ELBO -inf in floating point."""
    x64: bool = True
    """Float64, so 'the bound touches' is checked to ~1e-12, not float32's 1e-6."""


def _summary(trace, x, k: int, start: float, **extra) -> dict:
    """The trace (row t: [after E-step t, after M-step t], nats per example) and its checks."""
    ll, elbo, kl = (np.asarray(a, np.float64) for a in (trace.log_likelihood, trace.elbo, trace.kl))
    out = {"num_points": int(x.shape[0]), "num_components": k, **extra}
    out |= {"log_likelihood": ll.tolist(), "elbo": elbo.tolist(), "kl": kl.tolist()}
    out |= {"final_log_likelihood": float(ll[-1, 1]), "checks": em.trace_checks(trace)}
    return out | {"seconds": time.perf_counter() - start}


def main(cfg: Config) -> dict:
    """Runs both traces, writes the run folder and returns ``results.json``'s content."""
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    import jax

    jax.config.update("jax_enable_x64", cfg.x64)
    import jax.numpy as jnp

    from emvi import bernoulli_mixture as bm
    from emvi import gmm
    from emvi.data import digits_bin, synthetic_mixture

    runs.write_config(workdir, cfg)
    dtype = np.float64 if cfg.x64 else np.float32
    k_gmm, k_bm = jax.random.split(jax.random.key(cfg.seed))
    results: dict = {"config": cfg}
    trace_fn = jax.jit(em.em_trace, static_argnames=("model", "num_iter"))

    # (a) Gaussian mixture on 2-D synthetic data (centred: the packed E-step wants it).
    start = time.perf_counter()
    x, _, _ = synthetic_mixture(cfg.seed, cfg.gmm_num_points, dtype=dtype)
    x = jnp.asarray(x - x.mean(axis=0))
    model = gmm.model("full")
    hyper = gmm.GMMHyper(jnp.asarray(cfg.gmm_reg_covar, dtype))
    k = cfg.gmm_num_components
    theta0 = gmm.init_params(
        k_gmm, x, k, covariance_type="full", method="random", reg_covar=cfg.gmm_reg_covar
    )
    trace = trace_fn(model, theta0, model.prepare(x), num_iter=cfg.gmm_num_iter, hyper=hyper)
    results["gmm_synthetic"] = _summary(trace, x, k, start)

    # (b) Bernoulli mixture on digits-bin (train split).
    start = time.perf_counter()
    xb = jnp.asarray(digits_bin(dtype).train_x[: cfg.bm_num_points])
    ab = (1.0, cfg.bm_prior_ab, cfg.bm_prior_ab)
    prior = bm.BernoulliMixturePrior(*(jnp.asarray(v, dtype) for v in ab)) if ab[1] != 1 else None
    theta0 = jax.jit(bm.init_params, static_argnums=2)(k_bm, xb, cfg.bm_num_components)
    trace = trace_fn(bm.model(), theta0, xb, num_iter=cfg.bm_num_iter, hyper=prior)
    k = cfg.bm_num_components
    results["bernoulli_digits"] = _summary(trace, xb, k, start, prior_ab=cfg.bm_prior_ab)
    runs.write_json(workdir / "results.json", results)
    plot(workdir)
    return json.loads((workdir / "results.json").read_text())


def plot(workdir, zoom: int = 8) -> list[Path]:
    """Remakes ``em_trace.png`` from ``results.json`` (:func:`emvi.plotting.em_trace_figure`:
    ``zoom`` iterations around the widest gap on top, the KL of every half-step below)."""
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    a = results["bernoulli_digits"]["prior_ab"]
    titles = {
        "gmm_synthetic": "(a) GMM, 2-D synthetic",
        "bernoulli_digits": "(b) Bernoulli mixture, digits-bin train"
        + (f" (MAP, Beta({a:g}, {a:g}) prior)" if a != 1.0 else ""),
    }
    traces = {
        t: tuple(results[n][f] for f in ("log_likelihood", "elbo", "kl")) for n, t in titles.items()
    }
    title = "EM is coordinate ascent on the ELBO: the bound touches log p(x) after each E-step"
    fig = plotting.em_trace_figure(traces, zoom=zoom, title=title)
    return [plotting.save(fig, workdir / "em_trace.png")]


if __name__ == "__main__":
    runs.cli(Config, main, plot)
