r"""Headline: EM and amortized VI on the same data, scored by held-out log-likelihood.

Both kinds of method maximise the ELBO,
:math:`\log p(x) = \mathrm{ELBO}(q) + \mathrm{KL}(q \,\|\, p(z \mid x))`. On digits-bin
(``emvi.data.digits_bin``: 1500 train / 297 test binarised 8x8 digits) this script fits

* **Bernoulli mixtures by EM** (``emvi.bernoulli_mixture.fit``) for several numbers of
  components k: exact E-step, closed-form MAP M-step with a Beta(a, b) prior on every
  pixel probability (a symmetric Beta(a, a), a chosen per k from ``beta_grid`` on a
  validation split of the training images; a > 1, so no probability reaches 0 or 1 and no
  test image gets :math:`-\infty`) and a flat Dirichlet on the weights.
  :math:`\log p(x)` is exact and the ELBO at the exact posterior equals it;
* a **Gaussian-latent VAE** (``emvi.vae.gaussian_vae``: MLP encoder and Bernoulli decoder,
  trained on the Monte Carlo ELBO with Adam), whose :math:`\log p(x)` is estimated by
  importance sampling (IWAE, k = 5000 by default);
* a **categorical VAE** (``emvi.vae.categorical_vae``: uniform prior over m classes,
  trained on its exact enumerated ELBO), whose :math:`\log p(x)` is exact by enumeration.

For each it reports the test log-likelihood (nats per image, mean over the test images),
the train and test ELBO and the gap :math:`\log p(x) - \mathrm{ELBO}`, and writes a
one-page ``report.md``.

Run folder (``--workdir``):

* ``config.json``, ``metrics.jsonl`` (EM histories, the half-step trace, one summary row
  per method), ``results.json``, ``figures.npz`` (the arrays behind the figures);
* ``vae/<kind>/`` the VAE training logs and checkpoints (``emvi.train``);
* ``headline.png``, ``em_trace.png``, ``mixture_means.png``, ``vae_samples.png`` and
  ``report.md``.

Usage::

    python experiments/em_vs_vi.py --workdir runs/main --overwrite
    python experiments/em_vs_vi.py --workdir runs/main --overwrite --no-vae   # EM only
    python experiments/em_vs_vi.py plot runs/main     # remake figures and report
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from emvi import plotting, runs

VAE_KINDS = ("gaussian", "categorical")
FIGURES = ("headline.png", "em_trace.png", "mixture_means.png", "vae_samples.png")
COMMAND = "python experiments/em_vs_vi.py --workdir runs/main --overwrite"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the headline experiment (every field is a command-line flag)."""

    workdir: Path = Path("runs/em_vs_vi")
    """Run folder; refused if it exists and is not empty, unless --overwrite."""
    overwrite: bool = False
    """Delete an existing run folder first."""
    seed: int = 0
    components: tuple[int, ...] = (10, 25, 50, 100)
    """Numbers of components k of the Bernoulli mixtures fitted by EM."""
    mixture_num_init: int = 5
    """Random restarts per mixture (best training log-posterior kept)."""
    mixture_max_iter: int = 500
    mixture_tol: float = 1e-5
    """EM stops once the mean training log-likelihood changes by less than this."""
    beta_grid: tuple[float, ...] = (1.1, 1.5, 2.0)
    """Candidate a for a symmetric Beta(a, a) prior on each pixel probability (a = 1 would
    be maximum likelihood). With several candidates, a is chosen per k by the
    log-likelihood of the last ``validation_size`` training images under a mixture fitted
    to the others; the mixture is then refitted on all training images."""
    validation_size: int = 300
    dirichlet_alpha: float = 1.0
    """Symmetric Dirichlet prior on the mixture weights (1: flat)."""
    trace_iters: int = 30
    """EM iterations recorded half-step by half-step (for the mixture with the best k)."""
    vae: bool = True
    """SWITCH: also train and score the Gaussian and categorical VAEs (--no-vae: EM only)."""
    vae_epochs: int = 200
    vae_latent_dim: int = 8
    """Latent dimension of the Gaussian VAE."""
    vae_num_classes: int = 10
    """Classes m of the categorical VAE (a uniform-weight mixture of m decoded images)."""
    vae_hidden: tuple[int, ...] = (256, 256)
    vae_learning_rate: float = 1e-3
    vae_batch_size: int = 100
    vae_eval_num_samples: int = 5000
    """Importance samples for the Gaussian VAE's log-likelihood (IWAE estimate)."""
    vae_train_ll_points: int = 297
    """Training images on which the Gaussian VAE's train log-likelihood is estimated (the
    first ones of the train split; the estimate costs as much as the test one)."""
    max_train: int | None = None
    """Use only the first this many training images (None: all 1500); for tests."""
    max_test: int | None = None
    """Use only the first this many test images (None: all 297); for tests."""
    progress: bool = True
    plots: bool = True


def load_split(cfg: Config):
    """The digits-bin split, optionally truncated (tests only)."""
    from emvi import data

    split = data.digits_bin(np.float32)
    return data.Split(
        split.train_x[: cfg.max_train],
        split.train_y[: cfg.max_train],
        split.test_x[: cfg.max_test],
        split.test_y[: cfg.max_test],
    )


def _count_mixture_params(k: int, d: int) -> int:
    return k * d + (k - 1)


def _count_leaves(tree) -> int:
    import jax

    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def fit_mixtures(cfg: Config, split, log: runs.MetricsLog) -> tuple[list[dict], dict]:
    """Fits one Bernoulli mixture per k by MAP-EM; returns result rows and fitted params."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from emvi import bernoulli_mixture as bm
    from emvi import selection

    train_x, test_x = jnp.asarray(split.train_x), jnp.asarray(split.test_x)
    rows, fitted = [], {}
    key = jax.random.key(cfg.seed)
    for k in tqdm(cfg.components, desc="Bernoulli mixtures (EM)", disable=not cfg.progress):
        tic = time.perf_counter()

        def fit_on(x, a, k=k):
            return bm.fit(
                jax.random.fold_in(key, k),
                x,
                k,
                max_iter=cfg.mixture_max_iter,
                tol=cfg.mixture_tol,
                num_init=cfg.mixture_num_init,
                prior=bm.BernoulliMixturePrior(cfg.dirichlet_alpha, a, a),
            )

        chosen, validation = selection.bernoulli_mixture_beta_prior(
            jax.random.fold_in(key, k),
            split.train_x,
            k,
            grid=cfg.beta_grid,
            validation_size=cfg.validation_size,
            alpha=cfg.dirichlet_alpha,
            max_iter=cfg.mixture_max_iter,
            tol=cfg.mixture_tol,
            num_init=cfg.mixture_num_init,
        )
        for a, val_ll in validation.items():
            log.write(phase="prior_selection", k=k, beta_a=a, validation_log_likelihood=val_ll)
        fit = fit_on(split.train_x, chosen)
        jax.block_until_ready(fit.params)
        fit_time = time.perf_counter() - tic
        p = fit.params
        scores = {}
        for name, x in (("train", train_x), ("test", test_x)):
            ll = bm.log_prob(p, x)
            elbo = bm.elbo(p, bm.posterior(p, x), x)
            scores[name] = (ll, elbo)
        history = np.asarray(fit.history)[: int(fit.num_iter)]
        for it, value in enumerate(history):
            log.write(phase="mixture_em", k=k, iteration=it, train_log_likelihood=value)
        test_ll = np.asarray(scores["test"][0], np.float64)
        row = {
            "method": f"Bernoulli mixture, EM, k={k}, Beta({chosen:g}, {chosen:g})",
            "family": "em",
            "k": k,
            "test_log_likelihood": float(np.mean(test_ll)),
            "test_log_likelihood_sem": float(np.std(test_ll, ddof=1) / math.sqrt(test_ll.size))
            if test_ll.size > 1
            else float("nan"),
            "test_elbo": float(jnp.mean(scores["test"][1])),
            "train_log_likelihood": float(jnp.mean(scores["train"][0])),
            "train_elbo": float(jnp.mean(scores["train"][1])),
            "log_likelihood_method": "exact (logsumexp over k)",
            "elbo_q": "exact posterior (the E-step)",
            "num_params": _count_mixture_params(k, train_x.shape[1]),
            "components_used": int(np.sum(np.asarray(p.weights) > 1e-6)),
            "iterations": int(fit.num_iter),
            "converged": bool(fit.converged),
            "restarts": cfg.mixture_num_init,
            "beta_prior": [chosen, chosen],
            "prior_validation_log_likelihood": validation,
            "fit_time_s": fit_time,
        }
        if row["components_used"] < k:
            row["method"] += f" ({row['components_used']} used)"
        row["test_gap"] = row["test_log_likelihood"] - row["test_elbo"]
        row["train_gap"] = row["train_log_likelihood"] - row["train_elbo"]
        rows.append(row)
        fitted[k] = (p, chosen)
        log.write(phase="summary", **row)
    return rows, fitted


def trace_best_mixture(cfg: Config, split, k: int, beta_a: float, log: runs.MetricsLog) -> dict:
    """EM from one fresh initialisation, recording the log-likelihood and the ELBO after
    every half-step (``emvi.em.em_trace``, one iteration per call so that the parameters
    of every iteration are seen), plus the log-prior of the parameters.

    MAP-EM ascends ``ELBO + log_prior / n`` (not the ELBO alone), so the figure draws
    both curves shifted by ``log_prior(theta) / n``; ``log_prior`` is recorded per
    half-step (after the E-step at theta_t, after the M-step at theta_{t+1}).
    """
    import jax
    import jax.numpy as jnp

    from emvi import bernoulli_mixture as bm
    from emvi import em

    x = jnp.asarray(split.train_x)
    n = x.shape[0]
    prior = bm.BernoulliMixturePrior(
        *(jnp.asarray(v, x.dtype) for v in (cfg.dirichlet_alpha, beta_a, beta_a))
    )
    one_iteration = jax.jit(lambda p: em.em_trace(bm.model(), p, x, num_iter=1, hyper=prior))
    params = bm.init_params(jax.random.key(cfg.seed + 17), x, k, prior=prior)
    out = {"log_likelihood": [], "elbo": [], "kl": [], "log_prior": []}
    for t in range(cfg.trace_iters):
        lp_before = float(bm.log_prior(params, prior)) / n
        tr = one_iteration(params)
        params = tr.params
        lp_after = float(bm.log_prior(params, prior)) / n
        out["log_prior"].append([lp_before, lp_after])
        for f in ("log_likelihood", "elbo", "kl"):
            out[f].append(np.asarray(getattr(tr, f), np.float64)[0])
        for half, name in enumerate(("E", "M")):
            log.write(
                phase="em_trace",
                k=k,
                iteration=t,
                half_step=name,
                log_likelihood=out["log_likelihood"][-1][half],
                elbo=out["elbo"][-1][half],
                kl=out["kl"][-1][half],
                log_prior_per_example=out["log_prior"][-1][half],
            )
    return {f: np.asarray(v, np.float64) for f, v in out.items()}


def train_vae(cfg: Config, kind: str, split, workdir: Path):
    """Trains the Gaussian or categorical VAE with ``emvi.vae.fit_vae`` (Adam on the ELBO;
    the test ELBO is logged every tenth of the run); returns (model, params)."""
    import jax
    import optax

    from emvi import vae

    data_dim = split.train_x.shape[1]
    if kind == "gaussian":
        model = vae.gaussian_vae(data_dim, cfg.vae_latent_dim, tuple(cfg.vae_hidden))
    else:
        model = vae.categorical_vae(data_dim, cfg.vae_num_classes, tuple(cfg.vae_hidden))
    result = vae.fit_vae(
        jax.random.fold_in(jax.random.key(cfg.seed), VAE_KINDS.index(kind)),
        model,
        split.train_x,
        optimizer=optax.adam(cfg.vae_learning_rate),
        batch_size=min(cfg.vae_batch_size, split.train_x.shape[0]),
        num_epochs=cfg.vae_epochs,
        workdir=(workdir / "vae" / kind).resolve(),
        eval_fn=vae.elbo_eval_fn(model, split.test_x, jax.random.key(cfg.seed + 1)),
        eval_every=max(1, cfg.vae_epochs // 10),
        checkpoint_every=cfg.vae_epochs,
        progress=cfg.progress,
        resume=False,
    )
    return model, result.state.params


def run_vaes(cfg: Config, split, workdir: Path, log: runs.MetricsLog) -> tuple[list[dict], dict]:
    """Trains and scores the Gaussian and categorical VAEs (``emvi.vae``)."""
    import jax

    from emvi import vae

    rows, arrays = [], {}
    for kind in VAE_KINDS:
        print(f"[em_vs_vi] training the {kind} VAE ({cfg.vae_epochs} epochs)", flush=True)
        tic = time.perf_counter()
        model, params = train_vae(cfg, kind, split, workdir)
        train_time = time.perf_counter() - tic
        tic = time.perf_counter()
        if kind == "gaussian":
            ev = vae.evaluate_gaussian(
                jax.random.key(cfg.seed + 2),
                params,
                split.test_x,
                split.train_x,
                model=model,
                num_samples=cfg.vae_eval_num_samples,
            )
            sub = split.train_x[: cfg.vae_train_ll_points]
            train_ll = vae.log_likelihood(
                jax.random.key(cfg.seed + 5),
                params,
                sub,
                model=model,
                num_samples=cfg.vae_eval_num_samples,
            )
            train_ll_value = float(np.mean(np.asarray(train_ll)))
            # The train ELBO on the same images, for a like-for-like train gap.
            train_elbo_sub = float(
                vae.elbo_loss(
                    params,
                    jax.random.key(cfg.seed + 6),
                    jax.numpy.asarray(sub),
                    model=model,
                    num_samples=100,
                )[1]["elbo"]
            )
            name = f"Gaussian VAE, l={model.latent_dim}"
            arrays["vae_samples"] = np.asarray(
                vae.generate(jax.random.key(cfg.seed + 7), params, 64, model=model)
            )
            ll_how = f"IWAE, k={cfg.vae_eval_num_samples} (a stochastic lower bound)"
            train_note = f"first {sub.shape[0]} training images"
        else:
            ev = vae.evaluate_categorical(
                jax.random.key(cfg.seed + 3), params, split.test_x, split.train_x, model=model
            )
            train_ll_value = float(
                np.mean(
                    np.asarray(vae.categorical_log_likelihood(params, split.train_x, model=model))
                )
            )
            train_elbo_sub = ev["train_elbo"]
            name = f"Categorical VAE, m={model.num_classes}"
            codes = np.eye(model.num_classes, dtype=np.float32)
            arrays["categorical_prototypes"] = np.asarray(vae.decode(params, codes, model=model))
            ll_how = "exact (enumeration of the m classes)"
            train_note = "all training images"
        row = {
            "method": name,
            "family": "vi",
            "kind": kind,
            "test_log_likelihood": ev["test_log_likelihood"],
            "test_log_likelihood_sem": ev["test_log_likelihood_sem"],
            "test_elbo": ev["test_elbo"],
            "train_log_likelihood": train_ll_value,
            "train_elbo": train_elbo_sub,
            "train_elbo_all": ev["train_elbo"],
            "train_scored_on": train_note,
            "log_likelihood_method": ll_how,
            "elbo_q": "amortized encoder"
            + (" (ELBO by 100-sample MC)" if kind == "gaussian" else " (exact ELBO)"),
            "num_params": _count_leaves(params),
            "epochs": cfg.vae_epochs,
            "fit_time_s": train_time,
            "eval_time_s": time.perf_counter() - tic,
            "active_units": ev.get("active_units"),
        }
        row["test_gap"] = row["test_log_likelihood"] - row["test_elbo"]
        row["train_gap"] = row["train_log_likelihood"] - row["train_elbo"]
        rows.append(row)
        log.write(phase="summary", **row)
    return rows, arrays


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def main(cfg: Config) -> dict:
    """Fits every method, writes the run folder and ``report.md``; returns the results."""
    import jax

    started = time.perf_counter()
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    split = load_split(cfg)
    load_before = _load_average()
    with runs.MetricsLog(workdir) as log:
        mixture_rows, fitted = fit_mixtures(cfg, split, log)
        best = max(mixture_rows, key=lambda r: r["test_log_likelihood"])
        best_params, best_a = fitted[best["k"]]
        trace = trace_best_mixture(cfg, split, best["k"], best_a, log)
        arrays = {
            "mixture_weights": np.asarray(best_params.weights),
            "mixture_probs": np.asarray(best_params.probs),
            "trace_log_likelihood": trace["log_likelihood"],
            "trace_elbo": trace["elbo"],
            "trace_log_prior": trace["log_prior"],
        }
        vae_rows = []
        if cfg.vae:
            vae_rows, vae_arrays = run_vaes(cfg, split, workdir, log)
            arrays.update(vae_arrays)
    np.savez(workdir / "figures.npz", **arrays)
    results = {
        "dataset": "digits-bin (sklearn digits, pixel > 8; 1500 train / 297 test)",
        "num_train": int(split.train_x.shape[0]),
        "num_test": int(split.test_x.shape[0]),
        "units": "nats per image (mean over images)",
        "beta_grid": list(cfg.beta_grid),
        "validation_size": cfg.validation_size if len(cfg.beta_grid) > 1 else 0,
        "methods": mixture_rows + vae_rows,
        "best_mixture_k": best["k"],
        "trace_k": best["k"],
        "vae_included": cfg.vae,
        "total_time_s": time.perf_counter() - started,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
            "backend": jax.default_backend(),
        },
        "command": " ".join(["python", *sys.argv])
        if sys.argv and sys.argv[0].endswith("em_vs_vi.py")
        else "em_vs_vi.main(Config(...)) from Python (settings in config.json; the headline "
        f"command is {COMMAND})",
    }
    runs.write_json(workdir / "results.json", results)
    if cfg.plots:
        plot(workdir)  # the figures and report.md
    else:
        write_report(workdir)
    print(markdown_table(results["methods"]))
    return runs.to_jsonable(results)


# ---------------------------------------------------------------------------------------
# Figures and report, from the run folder only.


def plot(workdir) -> list[Path]:
    """Draws the PNG figures from results.json and figures.npz, then ``report.md``."""
    plt = plotting.pyplot()
    workdir = Path(workdir)
    res = json.loads((workdir / "results.json").read_text())
    arrays = dict(np.load(workdir / "figures.npz"))
    written = []

    # 1. Test log-likelihood and ELBO per method.
    methods = res["methods"]
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(methods) + 1.9))
    ys = np.arange(len(methods))[::-1]
    for y, m in zip(ys, methods, strict=True):
        colour = "C0" if m["family"] == "em" else "C3"
        ax.plot([m["test_elbo"], m["test_log_likelihood"]], [y, y], "-", color=colour, lw=1)
        ax.plot(m["test_log_likelihood"], y, "o", color=colour, ms=7)
        ax.plot(m["test_elbo"], y, "|", color=colour, ms=12, mew=2)
        ax.plot(m["train_log_likelihood"], y, "x", color="grey", ms=5)
    ax.set_yticks(ys, [m["method"] for m in methods], fontsize=8)
    ax.set_xlabel("nats per image (higher is better)")
    ax.plot([], [], "o", color="k", label="test log p(x)")
    ax.plot([], [], "|", color="k", ms=10, mew=2, label="test ELBO")
    ax.plot([], [], "x", color="grey", label="train log p(x)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    ax.set_title("digits-bin: EM (blue) vs amortized VI (red)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    written.append(plotting.save(fig, workdir / "headline.png"))

    # 2. The EM half-step trace, on the objective MAP-EM ascends (shifted by log prior / n).
    shift = arrays["trace_log_prior"]
    ll = arrays["trace_log_likelihood"] + shift
    elbo = arrays["trace_elbo"] + shift
    t = np.arange(ll.shape[0])
    xs = np.stack([t, t + 0.5], axis=1).ravel()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, lo in ((ax0, 0), (ax1, ll.shape[0] // 3)):
        ax.plot(xs[2 * lo :], ll.ravel()[2 * lo :], "k-", lw=1, label="log p(x) + log prior / n")
        ax.plot(
            xs[2 * lo :],
            elbo.ravel()[2 * lo :],
            "C1.-",
            lw=0.8,
            ms=3,
            label="ELBO(q_t, θ) + log prior / n",
        )
    ax0.set_xlabel("EM iteration t (E-step at t, M-step at t + 1/2)")
    ax0.set_ylabel("mean nats per training image")
    ax0.legend(fontsize=8, loc="lower right")
    ax0.set_title(f"MAP-EM on the Bernoulli mixture, k={res['trace_k']}", fontsize=10)
    ax1.set_xlabel("EM iteration (zoom)")
    ax1.set_title("E-step: bound touches; M-step: both rise, KL opens", fontsize=9)
    written.append(plotting.save(fig, workdir / "em_trace.png"))

    # 3. Component means of the best mixture, by weight (components with weight 0 left out).
    weights, probs = arrays["mixture_weights"], arrays["mixture_probs"]
    order = [j for j in np.argsort(-weights) if weights[j] > 1e-6]
    k = len(weights)
    cols = min(10, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols, 1.1 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, j in zip(axes.ravel(), order, strict=False):
        ax.imshow(probs[j].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{weights[j]:.3f}", fontsize=6)
    fig.suptitle(
        f"Bernoulli mixture k={k}: pixel probabilities of the {len(order)} components with "
        "weight > 0, by weight",
        fontsize=9,
    )
    written.append(plotting.save(fig, workdir / "mixture_means.png"))

    # 4. VAE samples and prototypes (when the VAEs ran).
    panels = []
    if "vae_samples" in arrays:
        panels.append(("Gaussian VAE: E[x|z], z ~ N(0, I)", arrays["vae_samples"], 8))
    if "categorical_prototypes" in arrays:
        protos = arrays["categorical_prototypes"]
        panels.append(
            ("Categorical VAE: E[x|k] per class", protos, math.ceil(math.sqrt(len(protos))))
        )
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        for ax, (title, images, cols) in zip(np.atleast_1d(axes), panels, strict=True):
            nrows = math.ceil(len(images) / cols)
            grid = plotting.image_grid(images, nrows, cols, background=0.15)
            ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        written.append(plotting.save(fig, workdir / "vae_samples.png"))
    written.append(write_report(workdir))
    return written


def _fmt(v, digits=2) -> str:
    if isinstance(v, str) or v is None:
        return str(v)
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def markdown_table(methods: list[dict]) -> str:
    """The results table (nats per image) as GitHub markdown."""
    head = (
        "| method | test log p(x) | test ELBO | test gap | train log p(x) | train ELBO "
        "| train gap | params | log p(x) by |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for m in methods:
        sem = m.get("test_log_likelihood_sem")
        test_ll = _fmt(m["test_log_likelihood"]) + (
            f" ± {sem:.2f}" if isinstance(sem, float) and math.isfinite(sem) else ""
        )
        lines.append(
            f"| {m['method']} | {test_ll} | {_fmt(m['test_elbo'])} | {_fmt(m['test_gap'], 3)} "
            f"| {_fmt(m['train_log_likelihood'])} | {_fmt(m['train_elbo'])} "
            f"| {_fmt(m['train_gap'], 3)} | {m['num_params']:,} | {m['log_likelihood_method']} |"
        )
    return head + "\n".join(lines) + "\n"


def write_report(workdir) -> Path:
    """Writes the one-page ``report.md`` from results.json (figures by relative path)."""
    workdir = Path(workdir)
    res = json.loads((workdir / "results.json").read_text())
    methods = res["methods"]
    em_rows = [m for m in methods if m["family"] == "em"]
    vi_rows = [m for m in methods if m["family"] == "vi"]
    best = max(methods, key=lambda m: m["test_log_likelihood"])
    machine = res["machine"]
    grid = ", ".join(f"{a:g}" for a in res["beta_grid"])
    if res["validation_size"]:
        prior_note = (
            f"a symmetric Beta(a, a) prior on every pixel probability, a chosen per k from "
            f"{{{grid}}} by the log-likelihood of the last {res['validation_size']} training "
            "images under a fit to the others (then refitted on all)"
        )
    else:
        prior_note = f"a Beta({grid}, {grid}) prior on every pixel probability"
    lines = [
        "# EM vs amortized VI on digits-bin",
        "",
        (
            f"Command: `{res['command']}`  "
            if res["command"].startswith("python ")
            else f"Command: {res['command']}  "
        ),
        f"Data: {res['dataset']}; scored on {res['num_train']} train / {res['num_test']} test"
        f" images; all numbers in {res['units']}.  ",
        f"Run time: {res['total_time_s']:.0f} s on {machine['backend']} "
        f"({machine['cpu_count']} cores, load average before/after "
        f"{machine['load_average_before']} / {machine['load_average_after']}).",
        "",
        markdown_table(methods),
        "* gap = log p(x) - ELBO = KL(q || p(z|x)), the price of the q each method uses.",
        f"* Bernoulli mixtures: MAP-EM with {prior_note} (so no probability is 0 or 1; "
        "stronger priors leave more components empty, '(j used)' = components with weight "
        "> 1e-6) and a flat Dirichlet on the weights; best of "
        f"{em_rows[0]['restarts'] if em_rows else '-'} restarts by training log-posterior. "
        "Their ELBO uses the exact posterior (the E-step), so the gap is zero up to rounding "
        f"(largest |gap|: {max(abs(m['test_gap']) for m in em_rows):.1e})."
        if em_rows
        else "* No Bernoulli mixture was fitted.",
    ]
    if vi_rows:
        lines.append(
            "* VAEs (emvi.vae): trained on the ELBO with Adam; their ELBO uses the "
            "encoder's q. The Gaussian VAE's log p(x) is an importance-sampling estimate "
            "(itself a lower bound, so its gap is a lower bound on the true KL) and its train "
            "columns use the first training images only (see results.json); the categorical "
            "VAE's log p(x) and ELBO are exact."
        )
    else:
        lines.append(
            "* VAEs: not run (--no-vae). Rerun without the flag to add the Gaussian and "
            "categorical VAEs."
        )
    lines += [
        f"* Highest test log-likelihood: **{best['method']}** ({best['test_log_likelihood']:.2f}).",
        "",
        "![test log-likelihood and ELBO per method](headline.png)",
        "",
        f"![EM half-step trace, k={res['trace_k']}](em_trace.png)",
        "",
        f"![mixture component means, k={res['best_mixture_k']}](mixture_means.png)",
        "",
    ]
    if (workdir / "vae_samples.png").exists():
        lines += ["![VAE samples](vae_samples.png)", ""]
    path = workdir / "report.md"
    runs.atomic_write_text(path, "\n".join(lines))
    return path


if __name__ == "__main__":
    runs.cli(Config, main, plot)
