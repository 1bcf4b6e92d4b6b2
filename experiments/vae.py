"""VAEs on digits-bin (or MNIST): a Gaussian-latent VAE and a categorical-latent VAE.

Both maximise the ELBO with an amortized E-step (a Flax encoder) and a gradient M-step
(Adam on the decoder, jointly with the encoder). The Gaussian VAE is trained on the
reparameterised Monte Carlo ELBO (or IWAE_k with ``--iwae-k-train``) and evaluated with
the IWAE k=5000 estimate of log p(x); the categorical VAE (uniform prior over m classes)
is trained on its exact, enumerated ELBO and evaluated with its exact log p(x).

Run folder::

    config.json            config, git SHA, versions, backend
    results.json           final numbers for each model (see ``evaluate_*``)
    <kind>/metrics.jsonl   one row per epoch (loss, elbo, recon, kl, eval_test_elbo, ...)
    <kind>/checkpoints/    orbax checkpoints (``--resume`` continues from them)
    figures.npz            the arrays behind the image figures
    *.png                  learning_curves, reconstructions, samples, traversals

Usage::

    python experiments/vae.py --workdir runs/vae --overwrite
    python experiments/vae.py --workdir runs/vae --resume        # continue a killed run
    python experiments/vae.py --dataset mnist --mnist-path ~/data/mnist --workdir runs/mnist
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import optax

from emvi import data, metrics, plotting, runs, vae

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


def build_model(cfg: Config, kind: str, data_dim: int) -> vae.Model:
    if kind == "gaussian":
        return vae.gaussian_vae(data_dim, cfg.latent_dim, cfg.hidden, activation=cfg.activation)
    return vae.categorical_vae(data_dim, cfg.num_classes, cfg.hidden, activation=cfg.activation)


def _fingerprint(cfg: Config, kind: str) -> str:
    """Hash of the settings that define the trained model (so a resume cannot mix runs)."""
    skip = {"workdir", "overwrite", "resume", "progress", "plots", "eval_num_samples"}
    fields = {k: v for k, v in runs.to_jsonable(cfg).items() if k not in skip}
    fields["kind"] = kind
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def train_one(cfg: Config, kind: str, split: data.Split, workdir: Path):
    """Trains one VAE; returns (model, params, fit result)."""
    model = build_model(cfg, kind, split.train_x.shape[1])
    use_iwae = kind == "gaussian" and cfg.iwae_k_train > 0
    key = jax.random.fold_in(jax.random.key(cfg.seed), KINDS.index(kind))
    result = vae.fit_vae(
        key,
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
        config_fingerprint=_fingerprint(cfg, kind),
    )
    return model, result.state.params, result


def _shown_reconstructions(key, params, x, model, num=16) -> np.ndarray:
    # Reconstruct the whole test set (the shape already compiled for the error) and slice.
    return np.asarray(vae.reconstruct(key, params, x, model=model))[:num]


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
    shown = split.test_x[:16]
    out = {"test_x": shown}
    for kind, (model, params) in trained.items():
        k_rec, k_gen = jax.random.split(jax.random.fold_in(key, KINDS.index(kind)))
        out[f"recon_{kind}"] = _shown_reconstructions(k_rec, params, split.test_x, model)
        if kind == "gaussian":
            out["samples_gaussian"] = np.asarray(vae.generate(k_gen, params, 64, model=model))
            means, scales = vae.encode(params, split.test_x, model=model)
            kl = np.asarray(metrics.kl_per_dim(means, scales))
            dims = np.argsort(-kl)[: min(8, model.latent_dim)]
            values = np.linspace(-2.5, 2.5, 9)
            z = np.zeros((dims.size, values.size, model.latent_dim), np.float32)
            for row, dim in enumerate(dims):
                z[row, :, dim] = values
            images = vae.decode(params, z.reshape(-1, model.latent_dim), model=model)
            out["traversal_gaussian"] = np.asarray(images).reshape(dims.size, values.size, -1)
            out["traversal_dims"] = dims
            out["traversal_kl"] = kl[dims]
            out["traversal_values"] = values
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
    kinds = KINDS if cfg.latent == "both" else (cfg.latent,)
    results: dict = {
        "dataset": cfg.dataset,
        "num_train": int(split.train_x.shape[0]),
        "num_test": int(split.test_x.shape[0]),
        "data_dim": int(split.train_x.shape[1]),
    }
    trained = {}
    started = time.perf_counter()
    for kind in kinds:
        print(f"[vae] training the {kind} VAE for {cfg.epochs} epochs", flush=True)
        tic = time.perf_counter()
        model, params, fit = train_one(cfg, kind, split, workdir)
        train_time = time.perf_counter() - tic
        print(f"[vae] evaluating the {kind} VAE", flush=True)
        tic = time.perf_counter()
        row = evaluate(cfg, kind, params, model, split)
        row.update(
            train_time_s=train_time,
            eval_time_s=time.perf_counter() - tic,
            resumed_from_epoch=fit.resumed_from,
            examples_per_second=(
                fit.examples_per_epoch / fit.steady_epoch_time if fit.steady_epoch_time else None
            ),
            objective=(
                f"IWAE_{cfg.iwae_k_train}"
                if kind == "gaussian" and cfg.iwae_k_train > 0
                else ("exact ELBO" if kind == "categorical" else "MC ELBO")
            ),
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


# ---------------------------------------------------------------------------------------
# Figures, from the run folder only.


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
        epochs = [r["epoch"] + 1 for r in rows]
        ax.plot(epochs, [-r["loss"] for r in rows], label=f"{kind}: train objective")
        ev = [(r["epoch"] + 1, r["eval_test_elbo"]) for r in rows if "eval_test_elbo" in r]
        if ev:
            ax.plot(*zip(*ev, strict=True), "o-", ms=3, label=f"{kind}: test ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], -60))
    ax.legend()
    ax.set_title("Learning curves")
    written.append(plotting.save(fig, workdir / "learning_curves.png"))

    recon_kinds = [k for k in kinds if f"recon_{k}" in arrays]
    fig, axes = plt.subplots(1 + len(recon_kinds), 1, figsize=(8, 1.2 * (1 + len(recon_kinds))))
    axes = np.atleast_1d(axes)
    for ax, (name, images) in zip(
        axes,
        [("test data", arrays["test_x"])] + [(k, arrays[f"recon_{k}"]) for k in recon_kinds],
        strict=True,
    ):
        ax.imshow(plotting.image_grid(images, 1, len(images)), cmap="gray_r", vmin=0, vmax=1)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Reconstructions E[x | z], z ~ q(z | x)")
    written.append(plotting.save(fig, workdir / "reconstructions.png"))

    panels = []
    if "samples_gaussian" in arrays:
        panels.append(("Gaussian VAE: z ~ N(0, I)", arrays["samples_gaussian"], 8))
    if "prototypes_categorical" in arrays:
        protos = arrays["prototypes_categorical"]
        panels.append(("Categorical VAE: every class k", protos, math.ceil(math.sqrt(len(protos)))))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        for ax, (title, images, cols) in zip(np.atleast_1d(axes), panels, strict=True):
            rows = math.ceil(len(images) / cols)
            ax.imshow(plotting.image_grid(images, rows, cols), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle("Samples: decoder means E[x | z]")
        written.append(plotting.save(fig, workdir / "samples.png"))

    if "traversal_gaussian" in arrays:
        trav = arrays["traversal_gaussian"]
        fig, ax = plt.subplots(figsize=(5, 0.6 * trav.shape[0] + 0.8))
        ax.imshow(
            plotting.image_grid(trav.reshape(-1, trav.shape[-1]), trav.shape[0], trav.shape[1]),
            cmap="gray_r",
            vmin=0,
            vmax=1,
        )
        side = round(math.sqrt(trav.shape[-1])) + 1
        ax.set_yticks(
            [side * i + side / 2 - 1 for i in range(trav.shape[0])],
            [
                f"z{d} (KL {kl:.2f})"
                for d, kl in zip(arrays["traversal_dims"], arrays["traversal_kl"], strict=True)
            ],
            fontsize=7,
        )
        vals = arrays["traversal_values"]
        ax.set_xticks(
            [side * i + side / 2 - 1 for i in range(len(vals))], [f"{v:.1f}" for v in vals]
        )
        ax.set_title("Latent traversals (other dims 0), by KL")
        written.append(plotting.save(fig, workdir / "traversals.png"))
    return written


if __name__ == "__main__":
    runs.cli(Config, main, plot)
