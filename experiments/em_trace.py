r"""EM as coordinate ascent on the ELBO, half-step by half-step.

For each data set the script runs exact EM (:func:`emvi.em.em_trace`) and records, after
every half-step, the mean log-likelihood, the mean ELBO of the current q and their difference
:math:`\mathrm{KL}(q \,\|\, p_\theta(z \mid x))`:

* after the E-step :math:`q_t = p_{\theta_t}(z \mid x)`: the bound touches the likelihood
  (KL = 0);
* after the M-step :math:`\theta_{t+1}`: the ELBO has risen, and the likelihood by at least
  as much, because a KL gap opened between the stale :math:`q_t` and the new posterior.

So the ELBO traces a sawtooth under a staircase log-likelihood. Two models:

(a) a 3-component full-covariance Gaussian mixture (:mod:`emvi.gmm`) on 2-D draws from
    :func:`emvi.data.synthetic_mixture`, started from random responsibilities;
(b) a Bernoulli mixture (:mod:`emvi.bernoulli_mixture`) on the digits-bin training set,
    started from k random images, with a Beta(2, 2) prior on the pixel probabilities by
    default (``--bm-prior-ab 1`` for maximum likelihood). With a prior, EM climbs the
    log-posterior; the likelihood and the ELBO are what is plotted and need not rise at
    every step (the checks in ``results.json`` report by how much they ever fall).

The run folder holds ``config.json``, ``results.json`` (the traces and their checks) and
``em_trace.png``; :func:`plot` remakes the figure from ``results.json``.

Usage:
  python experiments/em_trace.py --workdir runs/em_trace --overwrite
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from emvi import plotting, runs


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the EM trace (defaults: well under a minute on a 2-core CPU)."""

    workdir: str = "runs/em_trace"
    """Run folder."""
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
    likelihood, whose 0/1 probabilities make the post-M-step ELBO -inf in floating point
    (a responsibility of 1e-300 times log 0)."""
    x64: bool = True
    """Float64, so 'the bound touches' is checked to ~1e-12, not float32's 1e-6."""


def _summary(trace) -> dict:
    ll, elbo, kl = (np.asarray(a, np.float64) for a in (trace.log_likelihood, trace.elbo, trace.kl))
    after_e_gap = np.abs(ll[:, 0] - elbo[:, 0])
    return {
        # Row t: [after E-step t, after M-step t]; means per example, in nats.
        "log_likelihood": ll.tolist(),
        "elbo": elbo.tolist(),
        "kl": kl.tolist(),
        "final_log_likelihood": float(ll[-1, 1]),
        "checks": {
            "max_abs_gap_after_e_step": float(after_e_gap.max()),
            "min_kl_after_m_step": float(kl[:, 1].min()),
            "min_log_likelihood_increase": float(np.diff(ll.reshape(-1)).min()),
            "min_elbo_increase_in_m_step": float((elbo[:, 1] - elbo[:, 0]).min()),
        },
    }


def main(cfg: Config) -> dict:
    """Runs both traces, writes the run folder and returns ``results.json``'s content."""
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    import jax

    jax.config.update("jax_enable_x64", cfg.x64)
    import jax.numpy as jnp

    from emvi import bernoulli_mixture as bm
    from emvi import em, gmm
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
    theta0 = gmm.init_params(
        k_gmm,
        x,
        cfg.gmm_num_components,
        covariance_type="full",
        method="random",
        reg_covar=cfg.gmm_reg_covar,
    )
    trace = trace_fn(model, theta0, model.prepare(x), num_iter=cfg.gmm_num_iter, hyper=hyper)
    results["gmm_synthetic"] = {
        "num_points": int(x.shape[0]),
        "num_components": cfg.gmm_num_components,
        **_summary(trace),
        "seconds": time.perf_counter() - start,
    }

    # (b) Bernoulli mixture on digits-bin (train split).
    start = time.perf_counter()
    split = digits_bin(dtype)
    xb = jnp.asarray(split.train_x[: cfg.bm_num_points])
    prior = None
    if cfg.bm_prior_ab != 1.0:
        prior = bm.BernoulliMixturePrior(
            *(jnp.asarray(v, dtype) for v in (1.0, *[cfg.bm_prior_ab] * 2))
        )
    theta0 = jax.jit(bm.init_params, static_argnums=2)(k_bm, xb, cfg.bm_num_components)
    trace = trace_fn(bm.model(), theta0, xb, num_iter=cfg.bm_num_iter, hyper=prior)
    results["bernoulli_digits"] = {
        "num_points": int(xb.shape[0]),
        "num_components": cfg.bm_num_components,
        "prior_ab": cfg.bm_prior_ab,
        **_summary(trace),
        "seconds": time.perf_counter() - start,
    }
    runs.write_json(workdir / "results.json", results)
    plot(workdir)
    return json.loads((workdir / "results.json").read_text())


def plot(workdir, zoom: int = 8) -> Path:
    """Remakes ``em_trace.png`` from ``results.json`` (no refitting).

    Top: log-likelihood and ELBO over ``zoom`` iterations around the widest gap (linear
    scale, where the sawtooth is visible). Bottom: the KL after every half-step, all
    iterations, log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    panels = [
        ("gmm_synthetic", "(a) GMM, 2-D synthetic"),
        ("bernoulli_digits", "(b) Bernoulli mixture, digits-bin train"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for col, (name, title) in enumerate(panels):
        r = results[name]
        ll = np.asarray(r["log_likelihood"], float)
        elbo = np.asarray(r["elbo"], float)
        kl = np.asarray(r["kl"], float)
        num_iter = ll.shape[0]
        # Zoom on the iterations around the widest post-M-step gap, where the teeth show
        # (from iteration 1: the first M-step's jump would flatten everything else).
        widest = int(np.argmax(kl[1:, 1])) + 1 if num_iter > 1 else 0
        lo = min(max(widest - zoom // 2, 1), max(num_iter - zoom, 0))  # skip the first jump
        hi = min(lo + zoom, num_iter)
        steps = (np.arange(num_iter)[:, None] + np.array([0.0, 0.5])[None, :]).reshape(-1)
        win = slice(2 * lo, 2 * hi)
        ax = axes[0, col]
        ax.plot(steps[win], ll.reshape(-1)[win], "-", color="C0", lw=2.5, label="log p(x)")
        ax.plot(steps[win], elbo.reshape(-1)[win], "-", color="C1", lw=1, label="ELBO")
        ax.plot(
            steps[win][0::2],
            elbo.reshape(-1)[win][0::2],
            "o",
            color="C2",
            ms=5,
            label="after E-step: ELBO = log p(x)",
        )
        ax.plot(
            steps[win][1::2],
            elbo.reshape(-1)[win][1::2],
            "v",
            color="C3",
            ms=5,
            label="after M-step: gap = KL",
        )
        ax.set_ylabel("nats per example")
        if r.get("prior_ab", 1.0) != 1.0:
            title = f"{title} (MAP, Beta({r['prior_ab']:g}, {r['prior_ab']:g}) prior)"
        ax.set_title(
            f"{title}\niterations {lo}-{hi - 1} (widest gap at {widest}); "
            f"final log p(x) = {ll[-1, 1]:.3f}",
            fontsize=9,
        )
        ax.legend(fontsize=8, loc="lower right")
        ax = axes[1, col]
        tiny = 1e-17  # log axis: exact zeros and rounding (|KL| < 1e-14) are drawn here
        ax.plot(
            steps[1::2], np.maximum(kl[:, 1], tiny), "v-", color="C3", ms=3, label="after M-step"
        )
        ax.plot(
            steps[0::2],
            np.maximum(np.abs(kl[:, 0]), tiny),
            "o",
            color="C2",
            ms=3,
            label="after E-step (|KL|: rounding only)",
        )
        ax.axvspan(lo, hi - 0.5, color="0.9", zorder=0, label="zoomed above")
        ax.set_yscale("log")
        ax.set_ylabel("KL(q || p(z|x)) = log p(x) - ELBO")
        ax.set_xlabel("EM iteration (E-step at t, M-step at t + 1/2)")
        ax.legend(fontsize=8)
    fig.suptitle(
        "EM is coordinate ascent on the ELBO: the bound touches log p(x) after each E-step"
    )
    return plotting.save(fig, workdir / "em_trace.png")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "plot":  # remake the figures from a run folder
        print(plot(sys.argv[2]))
    else:
        import tyro

        main(tyro.cli(Config))
