r"""The cells of the EM / VI grid side by side, and the inference gaps of their encoders.

Two mixtures with an exact posterior over a finite latent: a Bernoulli mixture (k = 20,
Beta(2, 2) prior) on digits-bin, and a full-covariance GMM (k = 3) on 2-D draws of
:func:`emvi.data.synthetic_mixture`. Each cell (:func:`emvi.grid.run_corner`, same initial
theta) is one E-step of :mod:`emvi.estep` and one M-step of :mod:`emvi.mstep`: EM,
generalised EM, variational EM with either M-step, amortized EM, the VAE-style cell (joint
and alternating) and their semi-amortized versions (Kim et al. 2018). Per cell: the final
exact train and test log-likelihood, the final ELBO, and the wall time of its jitted steps
until the log-likelihood comes within 0.1 nats of its own final value. For every encoder,
the Cremer, Li & Duvenaud (2018) split of log p(x) - ELBO(q_phi) into approximation and
amortization gaps (:func:`emvi.grid.gap_decomposition`), and the part of the latter that
``refine_steps`` local steps close; a Gaussian VAE gets the same split by Monte Carlo
(:func:`emvi.vae.gap_decomposition`). Run folder: ``config.json``, ``metrics.jsonl``,
``results.json``, ``loglik_vs_time.png`` and ``gaps.png``.

Usage:
  python experiments/amortization_gap.py --workdir runs/amortization_gap --overwrite
  python experiments/amortization_gap.py plot runs/amortization_gap   # remake the figures
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from emvi import plotting, runs

# label -> (E-step, M-step, schedule); "semi" is the amortized E-step refined by local steps.
CORNER_RUNS = {
    "em": ("exact", "closed", "alternating"),
    "gem": ("exact", "gradient", "alternating"),
    "variational_em": ("local", "closed", "alternating"),
    "variational_gem": ("local", "gradient", "alternating"),
    "amortized_em": ("amortized", "closed", "alternating"),
    "vae_joint": ("amortized", "gradient", "joint"),
    "vae_alternating": ("amortized", "gradient", "alternating"),
    "semi_amortized_em": ("semi", "closed", "alternating"),
    "semi_amortized_vae": ("semi", "gradient", "alternating"),
}
DATASETS = ("digits", "gmm")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (defaults: several minutes on a 2-core CPU)."""

    workdir: str = "runs/amortization_gap"
    """Run folder."""
    overwrite: bool = False
    """Replace an existing run folder."""
    seed: int = 0
    datasets: tuple[str, ...] = DATASETS
    """Any of 'digits', 'gmm'."""
    corners: tuple[str, ...] = tuple(CORNER_RUNS)
    """Which cells run (labels of CORNER_RUNS)."""
    digits_num_components: int = 20
    digits_num_train: int | None = None
    """Use only the first this many training images (None: all 1500)."""
    digits_prior_ab: float = 2.0
    """Beta(a, a) prior on the pixel probabilities (every cell climbs the same MAP
    objective: the gradient M-step adds the log prior / n)."""
    gmm_num_components: int = 3
    gmm_num_train: int = 1000
    gmm_num_test: int = 1000
    gmm_reg_covar: float = 1e-6
    encoder_hidden: tuple[int, ...] = (128,)
    """Hidden layers of the encoder (emvi.nn.CategoricalEncoder: x -> the k logits of q)."""
    em_iters: int = 60
    gem_iters: int = 200
    gem_theta_steps: int = 5
    local_iters: int = 60
    """Iterations of the variational-EM cells (local E-step)."""
    local_steps: int = 10
    """Adam steps per local E-step (warm-started)."""
    local_learning_rate: float = 0.1
    amortized_em_iters: int = 60
    amortized_em_phi_steps: int = 10
    vae_iters: int = 800
    vae_alternating_phi_steps: int = 3
    refine_steps: int = 5
    """Local steps that refine the encoder's q in the semi-amortized cells and gaps."""
    theta_learning_rate: float = 0.03
    phi_learning_rate: float = 3e-3
    gap_steps: int = 500
    """Adam steps of the local E-step that finds q* for the gaps."""
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
    """Importance samples for log p(x) (emvi.vae.log_likelihood)."""
    gvae_elbo_samples: int = 1000
    """Samples of the Monte Carlo ELBOs of q_phi and q* (common random numbers)."""
    gvae_local_steps: int = 500
    """Adam steps of the per-example optimisation of q*'s mean and log-scale."""
    gvae_local_learning_rate: float = 1e-2
    tolerance: float = 0.1
    """'Time to reach' = first time within this many nats of the cell's final value."""
    x64: bool = True


def _load_data(cfg: Config, name: str, key, dtype):
    """Returns (model, train x, test x, initial theta, hyper, description)."""
    import jax
    import jax.numpy as jnp

    from emvi import bernoulli_mixture as bm
    from emvi import gmm
    from emvi.data import digits_bin, synthetic_mixture

    if name == "digits":
        split = digits_bin(dtype)
        x = jnp.asarray(split.train_x[: cfg.digits_num_train])
        ab = jnp.asarray(cfg.digits_prior_ab, dtype)
        hyper = bm.BernoulliMixturePrior(jnp.asarray(1.0, dtype), ab, ab)
        theta0 = jax.jit(bm.init_params, static_argnums=2)(key, x, cfg.digits_num_components)
        desc = f"Bernoulli mixture, k={cfg.digits_num_components}, digits-bin"
        return bm.model(), x, jnp.asarray(split.test_x), theta0, hyper, desc
    x, _, _ = synthetic_mixture(cfg.seed, cfg.gmm_num_train, dtype=dtype)
    x_test, _, _ = synthetic_mixture(cfg.seed + 1000, cfg.gmm_num_test, dtype=dtype)
    shift = x.mean(axis=0)  # the packed GMM E-step wants centred data
    x, x_test = jnp.asarray(x - shift), jnp.asarray(x_test - shift)
    k, reg = cfg.gmm_num_components, cfg.gmm_reg_covar
    theta0 = gmm.init_params(key, x, k, covariance_type="full", method="random", reg_covar=reg)
    desc = f"GMM (full), k={k}, 2-D synthetic"
    return gmm.model("full"), x, x_test, theta0, gmm.GMMHyper(jnp.asarray(reg, dtype)), desc


def _cells(cfg: Config, model, encoder) -> dict:
    """label -> (cell, num_iters, amortized E-step or None): the pieces composed."""
    import optax

    from emvi import estep, grid, mstep

    theta_opt, phi_opt = optax.adam(cfg.theta_learning_rate), optax.adam(cfg.phi_learning_rate)
    local_opt = optax.adam(cfg.local_learning_rate)
    refine = estep.local(model, optimizer=local_opt, num_steps=cfg.refine_steps)
    amortized_em = estep.amortized(
        model, encoder, optimizer=phi_opt, num_steps=cfg.amortized_em_phi_steps
    )
    vae_alt = estep.amortized(
        model, encoder, optimizer=phi_opt, num_steps=cfg.vae_alternating_phi_steps
    )
    closed = mstep.closed(model)
    gem = mstep.gradient(model, optimizer=theta_opt, num_steps=cfg.gem_theta_steps)
    one_theta_step = mstep.gradient(model, optimizer=theta_opt)
    local = estep.local(model, optimizer=local_opt, num_steps=cfg.local_steps)
    joint_e = estep.amortized(model, encoder, optimizer=phi_opt)
    semi_em, semi_vae = estep.refine(amortized_em, refine), estep.refine(vae_alt, refine)
    return {
        "em": (grid.Cell(estep.exact(model), closed), cfg.em_iters, None),
        "gem": (grid.Cell(estep.exact(model), gem), cfg.gem_iters, None),
        "variational_em": (grid.Cell(local, closed), cfg.local_iters, None),
        "variational_gem": (grid.Cell(local, gem), cfg.gem_iters, None),
        "amortized_em": (grid.Cell(amortized_em, closed), cfg.amortized_em_iters, amortized_em),
        "vae_joint": (grid.Cell(joint_e, one_theta_step, grid.Joint()), cfg.vae_iters, joint_e),
        "vae_alternating": (grid.Cell(vae_alt, one_theta_step), cfg.vae_iters, vae_alt),
        "semi_amortized_em": (grid.Cell(semi_em, closed), cfg.amortized_em_iters, amortized_em),
        "semi_amortized_vae": (grid.Cell(semi_vae, one_theta_step), cfg.vae_iters, vae_alt),
    }


def _gaps(cfg, key, model, res, amortized, splits) -> dict:
    """The gap split on each split, and what ``refine_steps`` local steps close of it."""
    import optax

    from emvi import estep, grid

    best = estep.local(model, optimizer=optax.adam(cfg.gap_learning_rate), num_steps=cfg.gap_steps)
    few = estep.local(
        model, optimizer=optax.adam(cfg.local_learning_rate), num_steps=cfg.refine_steps
    )
    out = {}
    for split_name, xs in splits:
        q_phi = amortized.q_of(res.state.e.variables, estep.make_batch(model, xs))
        g = grid.gap_decomposition(key, model, res.params, q_phi, xs, local_step=best)
        semi = grid.gap_decomposition(key, model, res.params, q_phi, xs, local_step=few)
        out[split_name] = {
            **g._asdict(),
            "elbo_semi_amortized": semi.elbo_best,
            "fraction_closed_by_refinement": (
                semi.amortization_gap / g.amortization_gap if g.amortization_gap > 0 else None
            ),
        }
    return out


def main(cfg: Config) -> dict:
    """Runs every cell on every data set, writes the run folder, returns the results."""
    bad = [d for d in cfg.datasets if d not in DATASETS]
    if bad:
        raise ValueError(f"unknown dataset(s) {bad}; choose from {DATASETS}.")
    bad = [c for c in cfg.corners if c not in CORNER_RUNS]
    if bad:
        raise ValueError(f"unknown corner(s) {bad}; choose from {list(CORNER_RUNS)}.")
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", cfg.x64)
    from emvi import estep, grid
    from emvi.nn import CategoricalEncoder

    runs.write_config(workdir, cfg)
    dtype = np.float64 if cfg.x64 else np.float32
    results: dict = {"config": cfg, "tolerance_nats": cfg.tolerance}
    key = jax.random.key(cfg.seed)
    with runs.MetricsLog(workdir) as log:
        for d_index, name in enumerate(cfg.datasets):
            k_theta, k_enc, k_gap = jax.random.split(jax.random.fold_in(key, d_index), 3)
            model, x, x_test, theta0, hyper, desc = _load_data(cfg, name, k_theta, dtype)
            encoder = CategoricalEncoder(cfg.encoder_hidden, estep.num_q_outputs(model, theta0, x))
            cells = _cells(cfg, model, encoder)

            def mean_ll(theta, xs, model=model):
                return float(jnp.mean(model.log_prob(theta, model.prepare_data(xs))))

            entry: dict = {
                "description": desc,
                "num_train": int(x.shape[0]),
                "num_test": int(x_test.shape[0]),
                "initial_log_likelihood": mean_ll(theta0, x),
                "corners": {},
                "gaps": {},
            }
            for label in (c for c in CORNER_RUNS if c in cfg.corners):
                cell, num_iters, amortized = cells[label]
                start = time.perf_counter()
                res = grid.run_corner(
                    k_enc,
                    cell,
                    model,
                    x,
                    params=theta0,
                    num_iters=num_iters,
                    hyper=hyper,
                    progress=True,
                )
                h = res.history
                row = {
                    "cell": "/".join(CORNER_RUNS[label]),
                    "num_iters": num_iters,
                    "train_log_likelihood": float(h.log_likelihood[-1]),
                    "train_elbo": float(h.elbo[-1]),
                    "test_log_likelihood": mean_ll(res.params, x_test),
                    "time_to_tolerance_s": grid.time_to_reach(h, tol=cfg.tolerance),
                    "step_time_s": float(h.wall_time[-1]),
                    "compile_time_s": res.compile_time,
                    "history": h._asdict(),
                }
                if amortized is not None:
                    entry["gaps"][label] = _gaps(
                        cfg, k_gap, model, res, amortized, (("train", x), ("test", x_test))
                    )
                row["seconds_total"] = time.perf_counter() - start
                entry["corners"][label] = row
                rest = {k: v for k, v in row.items() if k != "history"}
                log.write(dataset=name, corner=label, gaps=entry["gaps"].get(label), **rest)
            results[name] = entry
    if cfg.gaussian_vae:
        results["gaussian_vae"] = _gaussian_vae_gaps(cfg, jax.random.fold_in(key, 99))
    else:
        results["gaussian_vae"] = {"status": "not run", "reason": "gaussian_vae=False"}
    runs.write_json(workdir / "results.json", results)
    plot(workdir)
    return json.loads((workdir / "results.json").read_text())


def _gaussian_vae_gaps(cfg: Config, key) -> dict:
    """Trains a Gaussian VAE on digits-bin and splits its inference gap on train and test
    images (:func:`emvi.vae.gap_decomposition`)."""
    import jax
    import optax

    from emvi import vae
    from emvi.data import digits_bin

    start = time.perf_counter()
    split = digits_bin(np.float32)
    model = vae.gaussian_vae(64, cfg.gvae_latent_dim, tuple(cfg.gvae_hidden))
    keys = jax.random.split(key, 4)  # training, then log p(x), the ELBO draws, q*'s steps
    fit = vae.fit_vae(
        keys[0],
        model,
        split.train_x,
        optimizer=optax.adam(cfg.gvae_learning_rate),
        batch_size=min(100, split.train_x.shape[0]),
        num_epochs=cfg.gvae_epochs,
    )
    out: dict = {
        "status": "done",
        "description": (
            f"Gaussian VAE, latent {cfg.gvae_latent_dim}, hidden {list(cfg.gvae_hidden)}, "
            f"{cfg.gvae_epochs} epochs; log p(x) by IWAE with {cfg.gvae_iwae_samples} samples"
        ),
        "train_seconds": time.perf_counter() - start,
    }
    local_opt = optax.adam(cfg.gvae_local_learning_rate)
    for split_name, xs in (
        ("train", split.train_x[: cfg.gvae_num_train_eval]),
        ("test", split.test_x),
    ):
        report = vae.gap_decomposition(
            keys[1:],
            fit.state.params,
            xs,
            model=model,
            optimizer=local_opt,
            num_steps=cfg.gvae_local_steps,
            elbo_samples=cfg.gvae_elbo_samples,
            ll_samples=cfg.gvae_iwae_samples,
        )
        out[split_name] = {"num_examples": int(xs.shape[0]), **report._asdict()}
    out["seconds"] = time.perf_counter() - start
    return out


def plot(workdir) -> list[Path]:
    """Remakes ``loglik_vs_time.png`` and ``gaps.png`` from ``results.json``."""
    plt = plotting.pyplot()
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    names = [d for d in DATASETS if d in results]
    paths = []

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        entry = results[name]
        corners = entry["corners"]
        traces = {
            k: (r["history"]["wall_time"], r["history"]["log_likelihood"])
            for k, r in corners.items()
        }
        plotting.time_traces(ax, traces, {k: r["time_to_tolerance_s"] for k, r in corners.items()})
        finals = [row["train_log_likelihood"] for row in corners.values()]
        top, spread = max(finals), max(max(finals) - min(finals), 0.5)
        ax.set_ylim(top - 3.0 * spread, top + 0.2 * spread)
        ax.set_xlabel("wall time of the jitted steps (s, log scale)")
        ax.set_ylabel("train log p(x) per example (exact)")
        ax.set_title(
            f"{entry['description']}\n(dot: within {results['tolerance_nats']} nats of own final)",
            fontsize=9,
        )
        ax.legend(fontsize=7)
    paths.append(plotting.save(fig, workdir / "loglik_vs_time.png"))

    panels = [(results[n]["gaps"], results[n]["description"]) for n in names]
    gvae = results.get("gaussian_vae", {})
    if gvae.get("status") == "done":
        panels.append(
            ({"gaussian_vae": {s: gvae[s] for s in ("train", "test")}}, gvae["description"])
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (gaps, title) in zip(axes[0], panels, strict=True):
        bars = [(f"{label}\n{s}", split[s]) for label, split in gaps.items() for s in split]
        approx = [float(g["approximation_gap"]) for _, g in bars]
        closed = [g.get("elbo_semi_amortized", np.nan) - g["elbo_amortized"] for _, g in bars]
        amort = [float(g["amortization_gap"]) for _, g in bars]
        plotting.gap_bars(ax, [b for b, _ in bars], approx, amort, closed)
        ax.set_xlabel(
            f"approximation gap (measured): max |.| = {max(np.abs(approx), default=0):.1e} nats",
            fontsize=8,
        )
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("log p(x) - ELBO(q_phi) = approximation gap + amortization gap")
    paths.append(plotting.save(fig, workdir / "gaps.png"))
    return paths


if __name__ == "__main__":
    runs.cli(Config, main, plot)
