r"""Uninformative latents ("posterior collapse") and discrete codes on digits-bin.

The claim under test (Zhao, Song & Ermon 2017; Bowman et al. 2016): with a decoder strong
enough to model x on its own, maximising the ELBO leaves latent dimensions unused, because
the KL term pulls every q(z|x) to the prior; an objective that matches only the *aggregate*
posterior to the prior (InfoVAE / MMD) keeps the code informative.

Every model is an ``emvi.vae.GaussianVAE`` with the same Gaussian encoder and the same
autoregressive decoder p(x|z) = prod_i Bernoulli(x_i | x_<i, z) (``emvi.nn.MADEDecoder``;
``--decoder mlp`` takes the factorised ``emvi.nn.BernoulliDecoder`` instead). They differ
only in the objective (``emvi.vae.Objective``), all trained with ``emvi.train.fit`` for the
same number of epochs:

* ``vae``: the ELBO, recon - KL;
* ``kl_anneal``: recon - w_t KL with w_t = min(1, t / T) rising over ``anneal_epochs``;
* ``free_bits``: recon - sum_j max(lambda, KL_j), KL_j the batch-mean KL of dimension j
  (Kingma et al. 2016);
* ``infovae``: ``emvi.mmd.info_vae_objective`` with (alpha, lambda), the MMD (IMQ kernel)
  between one z ~ q(z|x) per batch example and as many prior draws.

Beside them, a VQ-VAE (``emvi.vq.VQVAE``; deterministic encoder, ``vq_groups`` codes per
image from a shared codebook, the same MADE decoder), with and without dead-code restarts;
its ELBO under a uniform prior over code tuples is recon - groups * log m.

Test-set metrics (digits-bin protocol, 297 test images): log-likelihood by importance
sampling (IWAE with ``ll_samples`` samples, ``emvi.vae.iwae_bound``), the ELBO, active
units, KL per dimension, mutual information (``emvi.metrics``).

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
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from emvi import _checks, elbo, metrics, plotting, runs, train, vae, vq
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


# ---------------------------------------------------------------------------------------
# Gaussian-latent models: one GaussianVAE, four objectives.


def make_decoder(cfg: Config):
    _checks.check_choice(cfg.decoder, name="decoder", choices=("made", "mlp"))
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
def _vae_setup(method: str, cfg: Config):
    """Model, bound loss and optimizer of a method: the same objects for every seed, so
    ``fit``'s jitted epoch is compiled once per method."""
    model = vae.GaussianVAE(
        enn.GaussianEncoder(tuple(cfg.encoder_hidden), cfg.latent_dim), make_decoder(cfg)
    )
    loss = vae.loss_fn(model, objective=objective(method, cfg))
    return model, loss, optax.adam(cfg.learning_rate)


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def _test_terms(params, key, x, *, model, num_samples):
    """ELBO terms (``emvi.elbo.gaussian_elbo_terms``) and q's mean and scale, one program."""
    mean, scale = model.encoder.apply(params.encoder, x)
    log_lik = lambda z: model.decoder.apply(params.decoder, z, x[None], method="log_prob")
    recon, kl = elbo.gaussian_elbo_terms(key, log_lik, mean, scale, num_samples=num_samples)
    return recon, kl, mean, scale


_iwae = jax.jit(vae.iwae_bound, static_argnames=("model", "num_samples", "chunk_size"))


def evaluate_vae(key, params: vae.VAEParams, model: vae.GaussianVAE, test_x, cfg: Config) -> dict:
    """Test-set ELBO, IWAE log-likelihood and the latent-usage diagnostics."""
    k_elbo, k_mi, k_ll = jax.random.split(key, 3)
    x = jnp.asarray(test_x, jnp.float32)
    recon, kl, mean, scale = _test_terms(
        params, k_elbo, x, model=model, num_samples=cfg.elbo_samples
    )
    chunk = min(100, cfg.ll_samples)
    ll = _iwae(params, k_ll, x, model=model, num_samples=cfg.ll_samples, chunk_size=chunk)
    kl_dims = metrics.kl_per_dim(mean, scale)
    return {
        "log_likelihood": float(jnp.mean(ll)),
        "elbo": float(jnp.mean(recon - kl)),
        "recon": float(jnp.mean(recon)),
        "kl": float(jnp.mean(kl)),
        "active_units": int(metrics.active_units(mean, threshold=cfg.au_threshold)),
        "dims_kl_above": int(jnp.sum(kl_dims > cfg.kl_dim_threshold)),
        "mutual_information": float(metrics.mutual_information(k_mi, mean, scale)),
        "kl_per_dim": np.asarray(kl_dims).tolist(),
    }


def _model_key(cfg: Config) -> Config:
    """The config with the fields that do not change a compiled program blanked out."""
    return dataclasses.replace(
        cfg, workdir="", overwrite=False, methods=(), seeds=(), progress=False
    )


def run_vae(method, seed, cfg: Config, data, run_dir: Path) -> tuple[dict, np.ndarray]:
    model, loss, optimizer = _vae_setup(method, _model_key(cfg))
    k_init, k_train, k_eval, k_sample = jax.random.split(jax.random.key(seed), 4)
    params = jax.jit(model.init)(k_init)
    tic = time.perf_counter()
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
    out = evaluate_vae(k_eval, result.state.params, model, data.test_x, cfg)
    out["train_time_s"] = train_time
    out["eval_time_s"] = time.perf_counter() - tic - train_time
    out["final_train_loss"] = result.history[-1]["loss"]
    samples = vae.generate(
        k_sample, result.state.params, cfg.num_plot_samples, model=model, sample=True
    )
    return out, np.asarray(samples)


# ---------------------------------------------------------------------------------------
# VQ-VAE.


@functools.cache
def _vq_setup(cfg: Config):
    """Jitted epoch, optimizer and jitted model functions of the VQ-VAE, shared by seeds."""
    model = vq.VQVAE(
        enn.MLP((*cfg.encoder_hidden, cfg.vq_groups * cfg.vq_code_dim)),
        vq.VectorQuantizer(num_codes=cfg.vq_num_codes, code_dim=cfg.vq_code_dim, beta=cfg.vq_beta),
        make_decoder(cfg),
        cfg.vq_groups,
    )
    optimizer = optax.adam(cfg.learning_rate)
    train_epoch = train.make_train_epoch(
        functools.partial(vq.vqvae_loss, model=model), optimizer, batch_size=cfg.batch_size
    )
    jitted = {
        "init": jax.jit(model.init),
        "assign": jax.jit(functools.partial(vq.vqvae_assign, model=model)),
        "log_lik": jax.jit(functools.partial(vq.vqvae_log_likelihood, model=model)),
        "sample": jax.jit(functools.partial(vq.vqvae_sample, model=model), static_argnames="num"),
    }
    return train_epoch, optimizer, jitted


def run_vq(method, seed, cfg: Config, data, run_dir: Path) -> tuple[dict, np.ndarray]:
    """Trains a VQ-VAE with ``emvi.train.make_train_epoch``; restarts dead codes between
    epochs (usage counted on the whole training set) for the first 90% of training when
    ``method == "vqvae_restart"``."""
    train_epoch, optimizer, fn = _vq_setup(_model_key(cfg))
    groups, m = cfg.vq_groups, cfg.vq_num_codes
    k_init, k_train, k_restart, k_sample = jax.random.split(jax.random.key(seed), 4)
    state = train.init_state(fn["init"](k_init), optimizer)
    train_x = jnp.asarray(data.train_x, jnp.float32)
    restart_until = int(0.9 * cfg.num_epochs) if method == "vqvae_restart" else 0
    restarts = 0
    tic = time.perf_counter()
    with runs.MetricsLog(run_dir) as log:
        for epoch in range(cfg.num_epochs):
            state, step_metrics = train_epoch(state, k_train, epoch, train_x)
            row = {"epoch": epoch, **{k: float(np.mean(v)) for k, v in step_metrics.items()}}
            if not np.isfinite(row["loss"]):
                raise train.TrainingDivergedError(
                    f"VQ-VAE training diverged in epoch {epoch}.", step=-1, epoch=epoch
                )
            z_e, idx = fn["assign"](state.params, train_x)
            usage = vq.code_usage(idx, m)
            row["train_dead_codes"] = int(jnp.sum(usage == 0))
            if epoch < restart_until and row["train_dead_codes"] > 0:
                codebook = state.params.vq["params"]["codebook"]
                new = vq.restart_dead_codes(
                    jax.random.fold_in(k_restart, epoch), codebook, usage, z_e
                )
                restarts += row["train_dead_codes"]
                state = state._replace(
                    params=state.params._replace(vq={"params": {"codebook": new}})
                )
            log.write(**row)
    train_time = time.perf_counter() - tic
    test_x = jnp.asarray(data.test_x, jnp.float32)
    recon = fn["log_lik"](state.params, test_x)
    _, test_idx = fn["assign"](state.params, test_x)
    _, train_idx = fn["assign"](state.params, train_x)
    tuples = np.asarray(test_idx).reshape(-1, groups)
    out = {
        "recon": float(jnp.mean(recon)),
        "elbo": vq.vqvae_elbo(float(jnp.mean(recon)), groups=groups, num_codes=m),
        "perplexity": float(vq.codebook_perplexity(test_idx, m)),
        "dead_codes": int(vq.dead_codes(train_idx, m)),
        "distinct_code_tuples_test": len({tuple(t) for t in tuples.tolist()}),
        "codes_restarted": restarts,
        "train_time_s": train_time,
        "final_train_loss": row["loss"],
    }
    samples = fn["sample"](k_sample, state.params, num=cfg.num_plot_samples)
    return out, np.asarray(samples)


# ---------------------------------------------------------------------------------------
# Driver, summary, plots.


def _summarise(per_seed: list[dict]) -> dict:
    summary = {}
    for name, value in per_seed[0].items():
        if isinstance(value, list):
            arr = np.asarray([row[name] for row in per_seed], dtype=float)
            summary[name] = {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()}
        elif isinstance(value, int | float):
            arr = np.asarray([row[name] for row in per_seed], dtype=float)
            summary[name] = {"mean": float(arr.mean()), "std": float(arr.std())}
    return summary


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
    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    per_seed: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    samples = {}
    bar = tqdm(jobs, desc="collapse runs", unit="run", disable=not cfg.progress)
    for method, seed in bar:
        bar.set_postfix(method=method, seed=seed)
        run_dir = workdir / "runs" / f"{method}_seed{seed}"
        runner = run_vq if method in VQ_METHODS else run_vae
        out, x_samples = runner(method, seed, cfg, data, run_dir)
        out["seed"] = seed
        per_seed[method].append(out)
        if seed == cfg.seeds[0]:
            samples[method] = x_samples
        runs.write_json(run_dir / "result.json", out)
        tqdm.write(
            f"{method:14s} seed {seed}: "
            + ", ".join(
                f"{k}={v:.3g}" for k, v in out.items() if isinstance(v, float) and k != "seed"
            )
        )
    bar.close()
    np.savez_compressed(workdir / "samples.npz", **samples)
    results = {
        "dataset": "digits-bin (1500 train / 297 test, pixel > 8)",
        "log_likelihood_estimator": f"IWAE with {cfg.ll_samples} importance samples",
        "decoder": cfg.decoder,
        "methods": {
            m: {"summary": _summarise(rows), "per_seed": rows} for m, rows in per_seed.items()
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
        fig, axes = plt.subplots(1, len(vae_names), figsize=(3.2 * len(vae_names), 3), sharey=True)
        for ax, name in zip(np.atleast_1d(axes), vae_names, strict=True):
            rows = methods[name]["per_seed"]
            kl = np.sort(np.asarray([r["kl_per_dim"] for r in rows]), axis=1)[:, ::-1]
            ax.bar(np.arange(kl.shape[1]), kl.mean(0), yerr=kl.std(0), color="C0", alpha=0.8)
            ax.set_title(f"{name}\nAU={methods[name]['summary']['active_units']['mean']:.1f}")
            ax.set_xlabel("latent dim (sorted)")
        np.atleast_1d(axes)[0].set_ylabel("test KL per dimension (nats)")
        written.append(plotting.save(fig, workdir / "kl_per_dim.png"))

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for i, name in enumerate(vae_names):
            for j, row in enumerate(methods[name]["per_seed"]):
                hist = runs.read_metrics(workdir / "runs" / f"{name}_seed{row['seed']}")
                epochs, kls = [h["epoch"] for h in hist], [h["kl"] for h in hist]
                ax.plot(epochs, kls, color=f"C{i}", alpha=0.7, label=name if j == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("train KL(q(z|x) || p(z)) (nats)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.legend()
        written.append(plotting.save(fig, workdir / "kl_curves.png"))

    samples_path = workdir / "samples.npz"
    if samples_path.exists():
        with np.load(samples_path) as npz:
            samples = {k: npz[k] for k in npz.files}
        if samples:
            fig, axes = plt.subplots(1, len(samples), figsize=(2.2 * len(samples), 2.4))
            for ax, (name, xs) in zip(np.atleast_1d(axes), samples.items(), strict=True):
                grid = plotting.square_grid(xs, background=0.35)
                ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
                ax.set_title(name, fontsize=9)
                ax.axis("off")
            written.append(plotting.save(fig, workdir / "samples.png"))
    return written


if __name__ == "__main__":
    runs.cli(Config, main, plot)
