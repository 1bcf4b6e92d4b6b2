"""VAEs on digits-bin (or MNIST): a Gaussian-latent VAE and a categorical-latent VAE.

Both maximise the ELBO with an amortized E-step (a Flax encoder) and a gradient M-step
(Adam, jointly with the encoder): the Gaussian VAE on the reparameterised ELBO (or IWAE_k
with ``--iwae-k-train``), scored by IWAE with k=5000 (``emvi.vae.evaluate_gaussian``); the
categorical VAE (uniform prior over m classes) on its exact enumerated ELBO, scored exactly
(``emvi.vae.evaluate_categorical``). Run folder: ``results.json``, ``<kind>/metrics.jsonl``,
``<kind>/checkpoints/`` (``--resume`` continues from them), ``figures.npz`` and the PNGs.

Usage::

    python experiments/vae.py --workdir runs/vae --overwrite
    python experiments/vae.py --workdir runs/vae --resume        # continue a killed run
    python experiments/vae.py --dataset mnist --mnist-path ~/data/mnist --workdir runs/mnist
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import optax

from emvi import data, plotting, runs, vae

KINDS = ("gaussian", "categorical")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the VAE experiment (defaults: the digits-bin headline run)."""

    workdir: Path = Path("runs/vae")
    """Run folder."""
    overwrite: bool = False
    """Delete an existing run folder first."""
    resume: bool = False
    """Continue from the checkpoints in an existing run folder."""
    seed: int = 0
    latent: Literal["gaussian", "categorical", "both"] = "both"
    """Which VAE(s) to train: both run side by side by default."""
    latent_dim: int = 8
    """Latent dimension of the Gaussian VAE."""
    num_classes: int = 10
    """Number of classes m of the categorical VAE."""
    hidden: tuple[int, ...] = (256, 256)
    """Encoder hidden sizes (the decoder mirrors them)."""
    activation: str = "relu"
    learning_rate: float = 1e-3
    batch_size: int = 100
    epochs: int = 200
    num_samples: int = 1
    """Monte Carlo samples per example in the ELBO (Gaussian VAE)."""
    beta: float = 1.0
    """Weight of the KL term in the training loss (1 = the ELBO)."""
    iwae_k_train: int = 0
    """Train the Gaussian VAE on IWAE_k with this k (0: train on the ELBO)."""
    eval_num_samples: int = 5000
    """Importance samples for the Gaussian VAE's test log-likelihood."""
    eval_every: int = 10
    """Epochs between test-ELBO evaluations logged to metrics.jsonl."""
    checkpoint_every: int = 50
    dataset: Literal["digits-bin", "mnist"] = "digits-bin"
    mnist_path: Path | None = None
    """Folder of MNIST IDX files or an .npz (dataset=mnist only; binarised at 0.5)."""
    progress: bool = True
    plots: bool = True


def load_data(cfg: Config) -> data.Split:
    """The train/test split named by the config."""
    if cfg.dataset == "digits-bin":
        return data.digits_bin(np.float32)
    if cfg.mnist_path is None:
        raise ValueError("dataset='mnist' needs --mnist-path (a folder of IDX files or an .npz).")
    return data.load_mnist(cfg.mnist_path, binarize=True)


def train_one(cfg: Config, kind: str, split: data.Split, workdir: Path):
    """Trains one VAE; returns (model, params, fit result)."""
    build = vae.gaussian_vae if kind == "gaussian" else vae.categorical_vae
    size = cfg.latent_dim if kind == "gaussian" else cfg.num_classes
    model = build(split.train_x.shape[1], size, cfg.hidden, activation=cfg.activation)
    use_iwae = kind == "gaussian" and cfg.iwae_k_train > 0
    # The settings that define the trained model, so a resume cannot mix runs.
    skip = ("workdir", "overwrite", "resume", "progress", "plots", "eval_num_samples")
    result = vae.fit_vae(
        jax.random.fold_in(jax.random.key(cfg.seed), KINDS.index(kind)),
        model,
        split.train_x,
        optimizer=optax.adam(cfg.learning_rate),
        batch_size=cfg.batch_size,
        num_epochs=cfg.epochs,
        objective="iwae" if use_iwae else "elbo",
        num_samples=cfg.iwae_k_train if use_iwae else cfg.num_samples,
        beta=cfg.beta,
        workdir=(Path(workdir) / kind).resolve(),  # orbax wants absolute paths
        eval_fn=vae.elbo_eval_fn(model, split.test_x, jax.random.key(cfg.seed + 1)),
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        progress=cfg.progress,
        resume=cfg.resume,
        config_fingerprint=runs.fingerprint(cfg, skip=skip, kind=kind),
    )
    return model, result.state.params, result


def evaluate(cfg: Config, kind: str, params, model, split: data.Split) -> dict:
    """``emvi.vae.evaluate_gaussian`` / ``evaluate_categorical`` on the split."""
    if kind == "gaussian":
        return vae.evaluate_gaussian(
            jax.random.key(cfg.seed + 2),
            params,
            split.test_x,
            split.train_x,
            model=model,
            num_samples=cfg.eval_num_samples,
        )
    return vae.evaluate_categorical(
        jax.random.key(cfg.seed + 3), params, split.test_x, split.train_x, model=model
    )


def figure_arrays(cfg: Config, trained: dict, split: data.Split) -> dict:
    """The images behind the figures (saved to figures.npz so plots need no retraining)."""
    key = jax.random.key(cfg.seed + 4)
    out = {"test_x": split.test_x[:16]}
    for kind, (model, params) in trained.items():
        k_rec, k_gen = jax.random.split(jax.random.fold_in(key, KINDS.index(kind)))
        # The whole test set (the shape already compiled for the error), then 16 shown.
        recon = vae.reconstruct(k_rec, params, split.test_x, model=model)
        out[f"recon_{kind}"] = np.asarray(recon)[:16]
        if kind == "gaussian":
            out["samples_gaussian"] = np.asarray(vae.generate(k_gen, params, 64, model=model))
            trav = vae.latent_traversal(params, split.test_x, model=model)
            out["traversal_gaussian"], out["traversal_dims"] = trav.images, trav.dims
            out["traversal_kl"], out["traversal_values"] = trav.kl, trav.values
        else:
            codes = np.eye(model.num_classes, dtype=np.float32)
            out["prototypes_categorical"] = np.asarray(vae.decode(params, codes, model=model))
            probs = vae.encode(params, split.test_x, model=model)
            out["class_mass_categorical"] = np.asarray(probs).mean(axis=0)
    return out


def main(cfg: Config) -> dict:
    """Trains, evaluates and plots; returns the contents of results.json."""
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite, resume=cfg.resume)
    workdir = workdir.resolve()  # orbax wants absolute checkpoint paths
    runs.write_config(workdir, cfg)
    split = load_data(cfg)
    results: dict = {
        "dataset": cfg.dataset,
        "num_train": int(split.train_x.shape[0]),
        "num_test": int(split.test_x.shape[0]),
        "data_dim": int(split.train_x.shape[1]),
    }
    trained = {}
    started = time.perf_counter()
    for kind in KINDS if cfg.latent == "both" else (cfg.latent,):
        print(f"[vae] training the {kind} VAE for {cfg.epochs} epochs", flush=True)
        tic = time.perf_counter()
        model, params, fit = train_one(cfg, kind, split, workdir)
        train_time = time.perf_counter() - tic
        row = evaluate(cfg, kind, params, model, split)
        if kind == "categorical":
            objective = "exact ELBO"
        else:
            objective = f"IWAE_{cfg.iwae_k_train}" if cfg.iwae_k_train > 0 else "MC ELBO"
        row.update(
            train_time_s=train_time,
            eval_time_s=time.perf_counter() - tic - train_time,
            resumed_from_epoch=fit.resumed_from,
            examples_per_second=(
                fit.examples_per_epoch / fit.steady_epoch_time if fit.steady_epoch_time else None
            ),
            objective=objective,
        )
        results[kind] = row
        trained[kind] = (model, params)
        print(
            f"[vae] {kind}: test ELBO {row['test_elbo']:.3f}, test log p(x)"
            f" {row['test_log_likelihood']:.3f} nats, active units {row['active_units']}",
            flush=True,
        )
    results["total_time_s"] = time.perf_counter() - started
    np.savez(workdir / "figures.npz", **figure_arrays(cfg, trained, split))
    runs.write_json(workdir / "results.json", results)
    if cfg.plots:
        plot(workdir)
    print(json.dumps(runs.to_jsonable(results), indent=2))
    return results


def plot(workdir: str | Path) -> list[Path]:
    """Draws the PNG figures from metrics.jsonl, results.json and figures.npz."""
    plt = plotting.pyplot()
    workdir = Path(workdir)
    arrays = dict(np.load(workdir / "figures.npz"))
    kinds = [k for k in KINDS if (workdir / k / "metrics.jsonl").exists()]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in kinds:
        rows = runs.read_metrics(workdir / kind)
        ax.plot(
            [r["epoch"] + 1 for r in rows],
            [-r["loss"] for r in rows],
            label=f"{kind}: train objective",
        )
        ev = [(r["epoch"] + 1, r["eval_test_elbo"]) for r in rows if "eval_test_elbo" in r]
        if ev:
            ax.plot(*zip(*ev, strict=True), "o-", ms=3, label=f"{kind}: test ELBO")
    ax.set(xlabel="epoch", ylabel="nats per example", title="Learning curves")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], -60))
    ax.legend()
    written.append(plotting.save(fig, workdir / "learning_curves.png"))

    shown = [("test data", arrays["test_x"])]
    shown += [(k, arrays[f"recon_{k}"]) for k in kinds if f"recon_{k}" in arrays]
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.2 * len(shown)), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], shown, strict=True):
        plotting.show_images(ax, images, 1, len(images), ylabel=name)
    fig.suptitle("Reconstructions E[x | z], z ~ q(z | x)")
    written.append(plotting.save(fig, workdir / "reconstructions.png"))

    panels = []
    if "samples_gaussian" in arrays:
        panels.append(("Gaussian VAE: z ~ N(0, I)", arrays["samples_gaussian"]))
    if "prototypes_categorical" in arrays:
        panels.append(("Categorical VAE: every class k", arrays["prototypes_categorical"]))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
        for ax, (title, images) in zip(axes[0], panels, strict=True):
            plotting.show_images(ax, images, title=title)
        fig.suptitle("Samples: decoder means E[x | z]")
        written.append(plotting.save(fig, workdir / "samples.png"))

    if "traversal_gaussian" in arrays:
        trav = arrays["traversal_gaussian"]
        dims = zip(arrays["traversal_dims"], arrays["traversal_kl"], strict=True)
        fig, ax = plt.subplots(figsize=(5, 0.6 * trav.shape[0] + 0.8))
        plotting.show_images(
            ax,
            trav.reshape(-1, trav.shape[-1]),
            *trav.shape[:2],
            title="Latent traversals (other dims 0), by KL",
            row_labels=[f"z{d} (KL {kl:.2f})" for d, kl in dims],
            col_labels=[f"{v:.1f}" for v in arrays["traversal_values"]],
        )
        written.append(plotting.save(fig, workdir / "traversals.png"))
    return written


if __name__ == "__main__":
    runs.cli(Config, main, plot)
