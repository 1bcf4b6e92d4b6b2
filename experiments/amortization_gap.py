r"""The four corners of the EM / VI grid side by side, and the inference gaps of the encoders.

Two mixtures with an exact posterior over a finite latent:

* ``digits``: a Bernoulli mixture (k = 20 by default, Beta(2, 2) prior on the pixel
  probabilities) on the digits-bin protocol (1500 train / 297 test images);
* ``gmm``: a full-covariance Gaussian mixture (k = 3) on 2-D draws from
  :func:`emvi.data.synthetic_mixture`, with a held-out draw as test set.

**Four corners** (:func:`emvi.grid.run_corner`, same initial theta for all): EM, generalised
EM (exact E, optax M-step), amortized EM (encoder E-step, closed-form M-step) and the
VAE-style corner trained jointly and alternating. For each: the final exact log-likelihood
per example (train and test), the final ELBO of the corner's own q, and the wall time of its
jitted steps until the log-likelihood first comes within 0.1 nats of its own final value.

**Gaps** (Cremer, Li & Duvenaud, 2018), for every corner with an encoder, at its final
theta, on train and test:

.. math::
    \log p(x) - \mathrm{ELBO}(q_\phi)
      = \underbrace{\log p(x) - \mathrm{ELBO}(q^*)}_{\text{approximation}}
      + \underbrace{\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\phi)}_{\text{amortization}},

with :math:`q^*` the best categorical distribution for each x found by optimising free
per-example logits (:func:`emvi.grid.gap_decomposition`). For a full categorical family
:math:`q^*` is the exact posterior, so the approximation gap is zero up to how far that
optimisation gets; it is reported as measured.

Run folder: ``config.json``, ``metrics.jsonl`` (one row per corner and data set),
``results.json``, ``loglik_vs_time.png`` and ``gaps.png`` (remade by :func:`plot`).

Usage:
  python experiments/amortization_gap.py --workdir runs/amortization_gap --overwrite
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from emvi import runs

# (label, corner, schedule)
CORNER_RUNS = (
    ("em", "em", "joint"),
    ("gem", "gem", "joint"),
    ("amortized_em", "amortized_em", "joint"),
    ("vae_joint", "vae", "joint"),
    ("vae_alternating", "vae", "alternating"),
)
DATASETS = ("digits", "gmm")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (defaults: a few minutes on a 2-core CPU)."""

    workdir: str = "runs/amortization_gap"
    """Run folder."""
    overwrite: bool = False
    """Replace an existing run folder."""
    seed: int = 0
    datasets: tuple[str, ...] = DATASETS
    """Any of 'digits', 'gmm'."""
    corners: tuple[str, ...] = tuple(label for label, _, _ in CORNER_RUNS)
    """Which corner runs: em, gem, amortized_em, vae_joint, vae_alternating."""
    digits_num_components: int = 20
    digits_num_train: int | None = None
    """Use only the first this many training images (None: all 1500)."""
    digits_prior_ab: float = 2.0
    """Beta(a, a) prior on the pixel probabilities (all corners climb the same MAP
    objective: the gradient corners add the log prior / n)."""
    gmm_num_components: int = 3
    gmm_num_train: int = 1000
    gmm_num_test: int = 1000
    gmm_reg_covar: float = 1e-6
    encoder_hidden: tuple[int, ...] = (128,)
    """Hidden layers of the categorical encoder (Flax MLP -> logits over k)."""
    em_iters: int = 60
    gem_iters: int = 200
    gem_theta_steps: int = 5
    amortized_em_iters: int = 60
    amortized_em_phi_steps: int = 10
    vae_iters: int = 800
    vae_alternating_phi_steps: int = 3
    theta_learning_rate: float = 0.03
    phi_learning_rate: float = 3e-3
    gap_steps: int = 500
    """Adam steps of the per-example optimisation of free logits (q*)."""
    gap_learning_rate: float = 0.1
    gaussian_vae: bool = True
    """Also split the gaps of a Gaussian VAE (emvi.vae) on digits-bin."""
    gvae_latent_dim: int = 4
    gvae_hidden: tuple[int, ...] = (256,)
    gvae_epochs: int = 100
    gvae_learning_rate: float = 1e-3
    gvae_num_train_eval: int = 300
    """Training images on which the Gaussian-VAE gaps are measured (IWAE is costly)."""
    gvae_iwae_samples: int = 5000
    """Importance samples for log p(x) (emvi.elbo.estimate_log_likelihood)."""
    gvae_elbo_samples: int = 1000
    """Samples of the Monte Carlo ELBOs of q_phi and q* (common random numbers)."""
    gvae_local_steps: int = 500
    """Adam steps of the per-example optimisation of q*'s mean and log-scale."""
    gvae_local_learning_rate: float = 1e-2
    tolerance: float = 0.1
    """'Time to reach' = first time within this many nats of the corner's final value."""
    x64: bool = True


def _corner_iters(cfg: Config, label: str) -> dict:
    return {
        "em": dict(num_iters=cfg.em_iters),
        "gem": dict(num_iters=cfg.gem_iters, num_theta_steps=cfg.gem_theta_steps),
        "amortized_em": dict(
            num_iters=cfg.amortized_em_iters, num_phi_steps=cfg.amortized_em_phi_steps
        ),
        "vae_joint": dict(num_iters=cfg.vae_iters),
        "vae_alternating": dict(
            num_iters=cfg.vae_iters, num_phi_steps=cfg.vae_alternating_phi_steps
        ),
    }[label]


def _load_data(cfg: Config, name: str, key, dtype):
    """Returns (grid model, train x, test x, initial theta, hyper, description)."""
    import jax
    import jax.numpy as jnp

    from emvi import bernoulli_mixture as bm
    from emvi import gmm, grid
    from emvi.data import digits_bin, synthetic_mixture

    if name == "digits":
        split = digits_bin(dtype)
        x = jnp.asarray(split.train_x[: cfg.digits_num_train])
        x_test = jnp.asarray(split.test_x)
        ab = jnp.asarray(cfg.digits_prior_ab, dtype)
        hyper = bm.BernoulliMixturePrior(jnp.asarray(1.0, dtype), ab, ab)
        theta0 = jax.jit(bm.init_params, static_argnums=2)(key, x, cfg.digits_num_components)
        desc = f"Bernoulli mixture, k={cfg.digits_num_components}, digits-bin"
        return grid.bernoulli_mixture_model(), x, x_test, theta0, hyper, desc
    if name == "gmm":
        x, _, _ = synthetic_mixture(cfg.seed, cfg.gmm_num_train, dtype=dtype)
        x_test, _, _ = synthetic_mixture(cfg.seed + 1000, cfg.gmm_num_test, dtype=dtype)
        shift = x.mean(axis=0)  # the packed GMM E-step wants centred data
        x, x_test = jnp.asarray(x - shift), jnp.asarray(x_test - shift)
        hyper = gmm.GMMHyper(jnp.asarray(cfg.gmm_reg_covar, dtype))
        init_fn = jax.jit(
            gmm.initial_params, static_argnames=("num_components", "covariance_type", "init")
        )
        theta0 = init_fn(
            key,
            x,
            jnp.ones((x.shape[0],), dtype),
            hyper,
            num_components=cfg.gmm_num_components,
            covariance_type="full",
            init="random",
        )
        desc = f"GMM (full), k={cfg.gmm_num_components}, 2-D synthetic"
        return grid.gmm_model("full"), x, x_test, theta0, hyper, desc
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}.")


def _mean_ll(model, theta, x) -> float:
    import jax.numpy as jnp

    return float(jnp.mean(model.exact.log_prob(theta, model.prepare(x))))


def main(cfg: Config) -> dict:
    """Runs every corner on every data set, writes the run folder, returns the results."""
    bad = [d for d in cfg.datasets if d not in DATASETS]
    if bad:
        raise ValueError(f"unknown dataset(s) {bad}; choose from {DATASETS}.")
    labels = [label for label, _, _ in CORNER_RUNS]
    bad = [c for c in cfg.corners if c not in labels]
    if bad:
        raise ValueError(f"unknown corner(s) {bad}; choose from {labels}.")
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    import jax

    jax.config.update("jax_enable_x64", cfg.x64)
    import optax

    from emvi import grid
    from emvi.nn import CategoricalEncoder

    runs.write_config(workdir, cfg)
    dtype = np.float64 if cfg.x64 else np.float32
    results: dict = {"config": cfg, "tolerance_nats": cfg.tolerance}
    theta_opt = optax.adam(cfg.theta_learning_rate)
    phi_opt = optax.adam(cfg.phi_learning_rate)
    key = jax.random.key(cfg.seed)
    with runs.MetricsLog(workdir) as log:
        for d_index, name in enumerate(cfg.datasets):
            k_theta, k_enc = jax.random.split(jax.random.fold_in(key, d_index))
            model, x, x_test, theta0, hyper, desc = _load_data(cfg, name, k_theta, dtype)
            num_components = int(model.log_joint(theta0, x[:1]).shape[-1])
            encoder = CategoricalEncoder(tuple(cfg.encoder_hidden), num_components)
            entry: dict = {
                "description": desc,
                "num_train": int(x.shape[0]),
                "num_test": int(x_test.shape[0]),
                "initial_log_likelihood": _mean_ll(model, theta0, x),
                "corners": {},
                "gaps": {},
            }
            for label, corner, schedule in CORNER_RUNS:
                if label not in cfg.corners:
                    continue
                start = time.perf_counter()
                res = grid.run_corner(
                    k_enc,
                    corner,
                    model,
                    x,
                    params=theta0,
                    schedule=schedule,
                    hyper=hyper,
                    encoder=encoder,
                    theta_optimizer=theta_opt,
                    phi_optimizer=phi_opt,
                    progress=True,
                    **_corner_iters(cfg, label),
                )
                h = res.history
                row = {
                    "num_iters": int(h.log_likelihood.shape[0] - 1),
                    "train_log_likelihood": float(h.log_likelihood[-1]),
                    "train_elbo": float(h.elbo[-1]),
                    "test_log_likelihood": _mean_ll(model, res.params, x_test),
                    "time_to_tolerance_s": grid.time_to_reach(h, tol=cfg.tolerance),
                    "step_time_s": float(h.wall_time[-1]),
                    "compile_time_s": res.compile_time,
                    "history": {
                        "log_likelihood": h.log_likelihood,
                        "elbo": h.elbo,
                        "wall_time": h.wall_time,
                    },
                }
                if res.encoder_params is not None:
                    gaps = {}
                    for split_name, xs in (("train", x), ("test", x_test)):
                        g = grid.gap_decomposition(
                            res.corner,
                            res.params,
                            res.encoder_params,
                            xs,
                            num_steps=cfg.gap_steps,
                            learning_rate=cfg.gap_learning_rate,
                        )
                        gaps[split_name] = g._asdict()
                    entry["gaps"][label] = gaps
                row["seconds_total"] = time.perf_counter() - start
                entry["corners"][label] = row
                log.write(
                    dataset=name,
                    corner=label,
                    **{k: v for k, v in row.items() if k != "history"},
                    gaps=entry["gaps"].get(label),
                )
            results[name] = entry
    if cfg.gaussian_vae:
        results["gaussian_vae"] = _gaussian_vae_gaps(cfg, jax.random.fold_in(key, 99))
    else:
        results["gaussian_vae"] = {"status": "not run", "reason": "gaussian_vae=False"}
    runs.write_json(workdir / "results.json", results)
    plot(workdir)
    return json.loads((workdir / "results.json").read_text())


def _gaussian_vae_gaps(cfg: Config, key) -> dict:
    """Trains a Gaussian VAE on digits-bin and splits its inference gap (Cremer et al.)."""
    import jax
    import jax.numpy as jnp
    import optax

    from emvi import grid, vae
    from emvi.data import digits_bin

    start = time.perf_counter()
    split = digits_bin(np.float32)
    model = vae.gaussian_vae(64, cfg.gvae_latent_dim, tuple(cfg.gvae_hidden))
    k_fit, k_ll, k_elbo, k_local = jax.random.split(key, 4)
    fit = vae.fit_vae(
        k_fit,
        model,
        split.train_x,
        optimizer=optax.adam(cfg.gvae_learning_rate),
        batch_size=min(100, split.train_x.shape[0]),
        num_epochs=cfg.gvae_epochs,
    )
    params = fit.state.params
    out: dict = {
        "status": "done",
        "description": (
            f"Gaussian VAE, latent {cfg.gvae_latent_dim}, hidden {list(cfg.gvae_hidden)}, "
            f"{cfg.gvae_epochs} epochs; log p(x) by IWAE with {cfg.gvae_iwae_samples} samples"
        ),
        "train_seconds": time.perf_counter() - start,
    }

    @jax.jit
    def elbos(x):
        mean, scale = model.encoder.apply(params.encoder, x)

        def log_joint(z):  # (s, n, l) -> (s, n)
            xb = jnp.broadcast_to(x[None], (z.shape[0], *x.shape))
            log_lik = model.decoder.apply(params.decoder, z, xb, method="log_prob")
            log_prior = jnp.sum(-0.5 * jnp.square(z) - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
            return log_lik + log_prior

        log_scale = jnp.log(scale)
        best = grid.fit_local_gaussian(
            k_local,
            log_joint,
            mean,
            log_scale,
            num_steps=cfg.gvae_local_steps,
            learning_rate=cfg.gvae_local_learning_rate,
        )
        n_eval = cfg.gvae_elbo_samples
        e_phi = grid.gaussian_elbo(k_elbo, log_joint, mean, log_scale, num_samples=n_eval)
        e_best = grid.gaussian_elbo(k_elbo, log_joint, *best, num_samples=n_eval)
        return jnp.mean(e_phi), jnp.mean(e_best)

    for split_name, xs in (
        ("train", split.train_x[: cfg.gvae_num_train_eval]),
        ("test", split.test_x),
    ):
        xs = jnp.asarray(xs)
        ll = float(
            jnp.mean(
                vae.log_likelihood(k_ll, params, xs, model=model, num_samples=cfg.gvae_iwae_samples)
            )
        )
        e_phi, e_best = (float(v) for v in elbos(xs))
        out[split_name] = {
            "num_examples": int(xs.shape[0]),
            "log_likelihood": ll,
            "elbo_best": e_best,
            "elbo_amortized": e_phi,
            "approximation_gap": ll - e_best,
            "amortization_gap": e_best - e_phi,
        }
    out["seconds"] = time.perf_counter() - start
    return out


_COLOURS = {
    "em": "C0",
    "gem": "C1",
    "amortized_em": "C2",
    "vae_joint": "C3",
    "vae_alternating": "C4",
}


def plot(workdir) -> list[Path]:
    """Remakes ``loglik_vs_time.png`` and ``gaps.png`` from ``results.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    names = [d for d in DATASETS if d in results]
    paths = []

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        entry = results[name]
        for label, row in entry["corners"].items():
            t = np.asarray(row["history"]["wall_time"], float)
            ll = np.asarray(row["history"]["log_likelihood"], float)
            ax.plot(t[1:], ll[1:], color=_COLOURS.get(label), label=label, lw=1.5)
            ax.plot(
                [row["time_to_tolerance_s"]],
                [ll[np.searchsorted(t, row["time_to_tolerance_s"])]],
                "o",
                color=_COLOURS.get(label),
                ms=5,
            )
        ax.set_xscale("log")
        finals = [row["train_log_likelihood"] for row in entry["corners"].values()]
        top = max(finals)
        ax.set_ylim(
            top - 3.0 * max(top - min(finals), 0.5), top + 0.2 * max(top - min(finals), 0.5)
        )
        ax.set_xlabel("wall time of the jitted steps (s, log scale)")
        ax.set_ylabel("train log p(x) per example (exact)")
        ax.set_title(
            f"{entry['description']}\n(dot: within {results['tolerance_nats']} nats of own final)",
            fontsize=9,
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = workdir / "loglik_vs_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    panels = [(results[n]["gaps"], results[n]["description"]) for n in names]
    gvae = results.get("gaussian_vae", {})
    if gvae.get("status") == "done":
        panels.append(
            ({"gaussian_vae": {s_: gvae[s_] for s_ in ("train", "test")}}, gvae["description"])
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (gaps, title) in zip(axes[0], panels, strict=True):
        labels, approx, amort = [], [], []
        for label, by_split in gaps.items():
            for split_name in ("train", "test"):
                g = by_split[split_name]
                labels.append(f"{label}\n{split_name}")
                approx.append(float(g["approximation_gap"]))
                amort.append(float(g["amortization_gap"]))
        pos = np.arange(len(labels))
        ax.bar(pos, approx, color="0.6", label="approximation gap (measured)")
        ax.bar(pos, amort, bottom=np.maximum(approx, 0.0), color="C3", label="amortization gap")
        ax.set_xticks(pos, labels, fontsize=7, rotation=30)
        tops = np.maximum(approx, 0.0) + np.asarray(amort)
        ax.set_ylim(0.0, 1.4 * max(float(np.max(tops, initial=0.0)), 1e-12))  # room for the legend
        ax.set_ylabel("nats per example")
        ax.set_xlabel(
            f"approximation gap (measured): max |.| = {max(np.abs(approx), default=0):.1e} nats",
            fontsize=8,
        )
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("log p(x) - ELBO(q_phi) = approximation gap + amortization gap")
    fig.tight_layout()
    path = workdir / "gaps.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "plot":  # remake the figures from a run folder
        print(plot(sys.argv[2]))
    else:
        import tyro

        main(tyro.cli(Config))
