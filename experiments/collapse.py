r"""Uninformative latents ("posterior collapse") and discrete codes on digits-bin.

The claim under test (Zhao, Song & Ermon 2017; Bowman et al. 2016): with a decoder strong
enough to model x alone, the ELBO leaves latent dimensions unused, while an objective that
matches only the aggregate posterior to the prior (InfoVAE / MMD) keeps the code
informative. Every model has the same Gaussian encoder and the same MADE decoder
p(x|z) = prod_i p(x_i | x_<i, z) (``--decoder mlp``: a factorised one) and differs only in
its ``emvi.vae.Objective``: ``vae`` (the ELBO), ``kl_anneal``, ``free_bits``, ``infovae``.
Beside them a VQ-VAE (``emvi.vq.fit_vqvae``) with and without dead-code restarts. Test-set
numbers: ``emvi.vae.evaluate_latent_usage`` (IWAE log-likelihood, ELBO, active units, KL
per dimension, mutual information) and ``emvi.vq.evaluate_vqvae``, mean ± std over seeds.

Usage:
  python experiments/collapse.py --workdir runs/collapse --overwrite
  python experiments/collapse.py --workdir runs/collapse_quick --num-epochs 20 --seeds 0
  python experiments/collapse.py plot runs/collapse      # remake the figures
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from emvi import _checks, plotting, runs, train, vae, vq
from emvi import nn as enn
from emvi.data import digits_bin

VAE_METHODS = ("vae", "kl_anneal", "free_bits", "infovae")
VQ_METHODS = ("vqvae", "vqvae_restart")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the collapse study (defaults: about 10 minutes on a loaded 2-core CPU)."""

    workdir: str = "runs/collapse"
    """Run folder (results.json, config.json, per-run metrics, figures)."""
    overwrite: bool = False
    """Replace an existing run folder."""
    methods: tuple[str, ...] = VAE_METHODS + VQ_METHODS
    """Models to train: any of vae, kl_anneal, free_bits, infovae, vqvae, vqvae_restart."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One training run per method and seed (same initial parameters across methods)."""
    decoder: str = "made"
    """'made' (autoregressive, conditioned on z) or 'mlp' (factorised Bernoulli)."""
    latent_dim: int = 16
    encoder_hidden: tuple[int, ...] = (256,)
    decoder_hidden: tuple[int, ...] = (256,)
    num_epochs: int = 200
    batch_size: int = 100
    learning_rate: float = 1e-3
    anneal_epochs: int = 100
    """kl_anneal: epochs over which the KL weight rises linearly from 0 to 1."""
    free_bits: float = 0.5
    """free_bits: per-dimension KL floor lambda (nats)."""
    info_alpha: float = 1.0
    """infovae: alpha (KL weight 1 - alpha; 1 = no per-example KL, the 'MMD-VAE')."""
    info_lambda: float = 100.0
    """infovae: lambda (MMD weight alpha + lambda - 1)."""
    mmd_kernel: str = "imq"
    """infovae: 'imq' (scale 2 * latent_dim, as in WAE) or 'rbf' (bandwidth 1)."""
    vq_num_codes: int = 16
    vq_groups: int = 4
    """VQ-VAE: codes per image (the encoder output is cut into this many vectors)."""
    vq_code_dim: int = 2
    vq_beta: float = 0.25
    ll_samples: int = 1000
    """Importance samples per test image for log p(x) (5000 is the usual protocol)."""
    elbo_samples: int = 16
    """Monte Carlo samples per test image for the reconstruction term of the ELBO."""
    au_threshold: float = 0.01
    """Active units: Var_x E[z_j | x] > this (Burda et al. 2016)."""
    kl_dim_threshold: float = 0.1
    """Also count the dimensions whose test KL exceeds this many nats."""
    num_plot_samples: int = 16
    progress: bool = True


def make_decoder(cfg: Config):
    if cfg.decoder == "made":
        return enn.MADEDecoder(data_dim=64, hidden=tuple(cfg.decoder_hidden))
    return enn.BernoulliDecoder(tuple(cfg.decoder_hidden), 64)


def objective(method: str, cfg: Config) -> vae.Objective:
    """The ``emvi.vae.Objective`` of a method (``vae`` is the plain ELBO)."""
    steps_per_epoch = digits_bin().train_x.shape[0] // cfg.batch_size
    return vae.Objective(
        kind="elbo" if method == "vae" else method,
        anneal_steps=max(1, cfg.anneal_epochs * steps_per_epoch),
        free_bits=cfg.free_bits,
        info_alpha=cfg.info_alpha,
        info_lambda=cfg.info_lambda,
        mmd_kernel=cfg.mmd_kernel,
    )


@functools.cache
def _setup(method: str, cfg: Config):
    """Model, loss (None for the VQ-VAE) and optimizer of a method: the same objects for
    every seed, so the jitted epoch is compiled once per method."""
    optimizer = optax.adam(cfg.learning_rate)
    if method in VQ_METHODS:
        quantizer = vq.VectorQuantizer(
            num_codes=cfg.vq_num_codes, code_dim=cfg.vq_code_dim, beta=cfg.vq_beta
        )
        encoder = enn.MLP((*cfg.encoder_hidden, cfg.vq_groups * cfg.vq_code_dim))
        return vq.VQVAE(encoder, quantizer, make_decoder(cfg), cfg.vq_groups), None, optimizer
    encoder = enn.GaussianEncoder(tuple(cfg.encoder_hidden), cfg.latent_dim)
    model = vae.GaussianVAE(encoder, make_decoder(cfg))
    return model, vae.loss_fn(model, objective=objective(method, cfg)), optimizer


def run_one(method: str, seed: int, cfg: Config, data, run_dir: Path) -> tuple[dict, np.ndarray]:
    """Trains and evaluates one (method, seed); returns its numbers and plot samples."""
    # The fields that do not change a compiled program blanked out, for the cache.
    key_cfg = dataclasses.replace(
        cfg, workdir="", overwrite=False, methods=(), seeds=(), progress=False
    )
    model, loss, optimizer = _setup(method, key_cfg)
    keys = jax.random.split(jax.random.key(seed), 4)
    k_init, k_train, k_other, k_sample = keys  # k_other: evaluation, or the VQ restarts
    params = jax.jit(model.init)(k_init)
    tic = time.perf_counter()
    if method in VQ_METHODS:
        # Dead codes restarted between epochs for the first 90% of training.
        restart = int(0.9 * cfg.num_epochs) if method == "vqvae_restart" else 0
        fit = vq.fit_vqvae(
            keys[1:3],  # (k_train, k_restart)
            model,
            params,
            data.train_x,
            optimizer=optimizer,
            batch_size=cfg.batch_size,
            num_epochs=cfg.num_epochs,
            restart_epochs=restart,
            workdir=run_dir,
        )
        out = vq.evaluate_vqvae(fit.params, data.test_x, data.train_x, model=model)
        out.update(codes_restarted=fit.codes_restarted, train_time_s=time.perf_counter() - tic)
        out["final_train_loss"] = fit.history[-1]["loss"]
        sample = jax.jit(vq.vqvae_sample, static_argnames=("model", "num"))
        return out, np.asarray(sample(k_sample, fit.params, model=model, num=cfg.num_plot_samples))
    result = train.fit(
        k_train,
        loss,
        params,
        optimizer,
        data.train_x,
        batch_size=cfg.batch_size,
        num_epochs=cfg.num_epochs,
        workdir=run_dir,
        checkpoint_every=cfg.num_epochs,
        max_checkpoints=1,
        progress=False,
        resume=False,
    )
    train_time = time.perf_counter() - tic
    out = vae.evaluate_latent_usage(
        k_other,
        result.state.params,
        data.test_x,
        model=model,
        elbo_samples=cfg.elbo_samples,
        ll_samples=cfg.ll_samples,
        au_threshold=cfg.au_threshold,
        kl_threshold=cfg.kl_dim_threshold,
    )
    out["train_time_s"] = train_time
    out["eval_time_s"] = time.perf_counter() - tic - train_time
    out["final_train_loss"] = result.history[-1]["loss"]
    n = cfg.num_plot_samples
    samples = vae.generate(k_sample, result.state.params, n, model=model, sample=True)
    return out, np.asarray(samples)


def _check_config(cfg: Config) -> None:
    for method in cfg.methods:
        _checks.check_choice(method, name="method", choices=VAE_METHODS + VQ_METHODS)
    if not cfg.seeds:
        raise ValueError("seeds must name at least one seed.")
    _checks.check_positive_int(cfg.num_epochs, name="num_epochs")
    _checks.check_positive_int(cfg.latent_dim, name="latent_dim")
    _checks.check_positive_int(cfg.ll_samples, name="ll_samples")
    _checks.check_positive(cfg.learning_rate, name="learning_rate")
    _checks.check_choice(cfg.decoder, name="decoder", choices=("made", "mlp"))
    vae.check_objective(objective("infovae", cfg))  # free bits, kernel, InfoVAE weights
    _checks.check_positive_int(cfg.vq_num_codes, name="vq_num_codes (codebook size)")


def main(cfg: Config) -> dict:
    """Trains every (method, seed), writes results.json and the figures; returns the results."""
    _check_config(cfg)
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    data = digits_bin(np.float32)
    started = time.perf_counter()
    per_seed: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    samples = {}
    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    bar = tqdm(jobs, desc="collapse runs", unit="run", disable=not cfg.progress)
    for method, seed in bar:
        bar.set_postfix(method=method, seed=seed)
        run_dir = workdir / "runs" / f"{method}_seed{seed}"
        out, x_samples = run_one(method, seed, cfg, data, run_dir)
        out["seed"] = seed
        per_seed[method].append(out)
        if seed == cfg.seeds[0]:
            samples[method] = x_samples
        runs.write_json(run_dir / "result.json", out)
        shown = ", ".join(f"{k}={v:.3g}" for k, v in out.items() if isinstance(v, float))
        tqdm.write(f"{method:14s} seed {seed}: {shown}")
    bar.close()
    np.savez_compressed(workdir / "samples.npz", **samples)
    results = {
        "dataset": "digits-bin (1500 train / 297 test, pixel > 8)",
        "log_likelihood_estimator": f"IWAE with {cfg.ll_samples} importance samples",
        "decoder": cfg.decoder,
        "methods": {
            m: {"summary": runs.summarise(rows), "per_seed": rows} for m, rows in per_seed.items()
        },
        "wall_time_s": time.perf_counter() - started,
    }
    runs.write_json(workdir / "results.json", results)
    plot(workdir)
    return results


def plot(workdir: str | Path) -> list[Path]:
    """Remakes the figures from results.json, samples.npz and the per-run metrics."""
    plt = plotting.pyplot()
    workdir = Path(workdir)
    methods = json.loads((workdir / "results.json").read_text())["methods"]
    written = []
    vae_names = [m for m in methods if m in VAE_METHODS]
    if vae_names:
        fig, axes = plt.subplots(
            1, len(vae_names), figsize=(3.2 * len(vae_names), 3), sharey=True, squeeze=False
        )
        for ax, name in zip(axes[0], vae_names, strict=True):
            rows = methods[name]["per_seed"]
            kl = np.sort(np.asarray([r["kl_per_dim"] for r in rows]), axis=1)[:, ::-1]
            ax.bar(np.arange(kl.shape[1]), kl.mean(0), yerr=kl.std(0), color="C0", alpha=0.8)
            ax.set_title(f"{name}\nAU={methods[name]['summary']['active_units']['mean']:.1f}")
            ax.set_xlabel("latent dim (sorted)")
        axes[0, 0].set_ylabel("test KL per dimension (nats)")
        written.append(plotting.save(fig, workdir / "kl_per_dim.png"))

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for i, name in enumerate(vae_names):
            for j, row in enumerate(methods[name]["per_seed"]):
                hist = runs.read_metrics(workdir / "runs" / f"{name}_seed{row['seed']}")
                epochs, kls = [h["epoch"] for h in hist], [h["kl"] for h in hist]
                ax.plot(epochs, kls, color=f"C{i}", alpha=0.7, label=name if j == 0 else None)
        ax.set(xlabel="epoch", ylabel="train KL(q(z|x) || p(z)) (nats)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.legend()
        written.append(plotting.save(fig, workdir / "kl_curves.png"))

    if (workdir / "samples.npz").exists():
        with np.load(workdir / "samples.npz") as npz:
            samples = {k: npz[k] for k in npz.files}
        if samples:
            fig, axes = plt.subplots(
                1, len(samples), figsize=(2.2 * len(samples), 2.4), squeeze=False
            )
            for ax, (name, xs) in zip(axes[0], samples.items(), strict=True):
                plotting.show_images(ax, xs, title=name, background=0.35)
            written.append(plotting.save(fig, workdir / "samples.png"))
    return written


if __name__ == "__main__":
    runs.cli(Config, main, plot)
