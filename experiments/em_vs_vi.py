r"""Headline: EM and amortized VI on digits-bin, scored by held-out log-likelihood.

Bernoulli mixtures by MAP-EM for several k (Beta(a, a) pixel prior, a chosen per k on a
validation split; log p(x) exact), a Gaussian VAE (log p(x) by IWAE, k = 5000) and a
categorical VAE (log p(x) exact): test and train log-likelihood, ELBO and gap (nats per
image) in ``report.md``, with the EM half-step trace of the best mixture. Writes
``results.json``, ``metrics.jsonl``, ``figures.npz`` (for :func:`plot`), ``vae/<kind>/``
(training logs, checkpoints) and ``FIGURES``.

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
    """Training images (the first ones) on which the Gaussian VAE's train log-likelihood is
    estimated (the estimate costs as much as the test one)."""
    max_train: int | None = None
    """Use only the first this many training images (None: all 1500); for tests."""
    max_test: int | None = None
    """Use only the first this many test images (None: all 297); for tests."""
    progress: bool = True
    plots: bool = True


def _row(method, family, test_ll, test_elbo, train_ll, train_elbo, **extra) -> dict:
    """A result row: test log-likelihood (mean ± sem over images), ELBOs and gaps."""
    mean, sem = runs.mean_and_sem(test_ll) if np.ndim(test_ll) else (test_ll, extra.pop("sem"))
    row = dict(method=method, family=family, **extra.pop("head", {}))
    row |= dict(test_log_likelihood=mean, test_log_likelihood_sem=sem, test_elbo=test_elbo)
    row |= dict(train_log_likelihood=train_ll, train_elbo=train_elbo, **extra)
    row["test_gap"] = row["test_log_likelihood"] - row["test_elbo"]
    row["train_gap"] = row["train_log_likelihood"] - row["train_elbo"]
    return row


def fit_mixtures(cfg: Config, split, log: runs.MetricsLog) -> tuple[list[dict], dict]:
    """Fits one Bernoulli mixture per k by MAP-EM; returns result rows and fitted params."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from emvi import bernoulli_mixture as bm
    from emvi import selection

    train_x, test_x = jnp.asarray(split.train_x), jnp.asarray(split.test_x)
    opts = dict(max_iter=cfg.mixture_max_iter, tol=cfg.mixture_tol, num_init=cfg.mixture_num_init)
    rows, fitted = [], {}
    key = jax.random.key(cfg.seed)
    for k in tqdm(cfg.components, desc="Bernoulli mixtures (EM)", disable=not cfg.progress):
        tic = time.perf_counter()
        a, validation = selection.bernoulli_mixture_beta_prior(
            jax.random.fold_in(key, k),
            split.train_x,
            k,
            grid=cfg.beta_grid,
            validation_size=cfg.validation_size,
            alpha=cfg.dirichlet_alpha,
            **opts,
        )
        for b, val_ll in validation.items():
            log.write(phase="prior_selection", k=k, beta_a=b, validation_log_likelihood=val_ll)
        prior = bm.BernoulliMixturePrior(cfg.dirichlet_alpha, a, a)
        fit = bm.fit(jax.random.fold_in(key, k), split.train_x, k, prior=prior, **opts)
        p = jax.block_until_ready(fit.params)
        fit_time = time.perf_counter() - tic
        ll = {s: bm.log_prob(p, x) for s, x in (("train", train_x), ("test", test_x))}
        elbo = {
            s: bm.elbo(p, bm.posterior(p, x), x) for s, x in (("train", train_x), ("test", test_x))
        }
        for it, value in enumerate(np.asarray(fit.history)[: int(fit.num_iter)]):
            log.write(phase="mixture_em", k=k, iteration=it, train_log_likelihood=value)
        used = int(np.sum(np.asarray(p.weights) > 1e-6))
        row = _row(
            f"Bernoulli mixture, EM, k={k}, Beta({a:g}, {a:g})"
            + (f" ({used} used)" if used < k else ""),
            "em",
            np.asarray(ll["test"], np.float64),
            float(jnp.mean(elbo["test"])),
            float(jnp.mean(ll["train"])),
            float(jnp.mean(elbo["train"])),
            head={"k": k},
            log_likelihood_method="exact (logsumexp over k)",
            elbo_q="exact posterior (the E-step)",
            num_params=k * train_x.shape[1] + (k - 1),
            components_used=used,
            iterations=int(fit.num_iter),
            converged=bool(fit.converged),
            restarts=cfg.mixture_num_init,
            beta_prior=[a, a],
            prior_validation_log_likelihood=validation,
            fit_time_s=fit_time,
        )
        rows.append(row)
        fitted[k] = (p, a)
        log.write(phase="summary", **row)
    return rows, fitted


def trace_best_mixture(cfg: Config, split, k: int, beta_a: float, log: runs.MetricsLog) -> dict:
    """EM from a fresh start, one ``emvi.em.em_trace`` iteration per call: log-likelihood,
    ELBO and KL after every half-step, and ``log_prior / n`` of the parameters (after the
    E-step at theta_t, after the M-step at theta_{t+1}): MAP-EM ascends ELBO + log_prior / n,
    so the figure shifts both curves by it."""
    import jax
    import jax.numpy as jnp

    from emvi import bernoulli_mixture as bm
    from emvi import em

    x = jnp.asarray(split.train_x)
    ab = (cfg.dirichlet_alpha, beta_a, beta_a)
    prior = bm.BernoulliMixturePrior(*(jnp.asarray(v, x.dtype) for v in ab))
    one_iteration = jax.jit(lambda p: em.em_trace(bm.model(), p, x, num_iter=1, hyper=prior))
    params = bm.init_params(jax.random.key(cfg.seed + 17), x, k, prior=prior)
    out = {"log_likelihood": [], "elbo": [], "kl": [], "log_prior": []}
    for t in range(cfg.trace_iters):
        lp_before = float(bm.log_prior(params, prior)) / x.shape[0]
        tr = one_iteration(params)
        params = tr.params
        out["log_prior"].append([lp_before, float(bm.log_prior(params, prior)) / x.shape[0]])
        for f in ("log_likelihood", "elbo", "kl"):
            out[f].append(np.asarray(getattr(tr, f), np.float64)[0])
        for h, half in enumerate("EM"):
            row = dict(phase="em_trace", k=k, iteration=t, half_step=half)
            row |= {f: out[f][-1][h] for f in ("log_likelihood", "elbo", "kl")}
            log.write(**row, log_prior_per_example=out["log_prior"][-1][h])
    return {f: np.asarray(v, np.float64) for f, v in out.items()}


def run_vaes(cfg: Config, split, workdir: Path, log: runs.MetricsLog) -> tuple[list[dict], dict]:
    """Trains the Gaussian and categorical VAEs with ``emvi.vae.fit_vae`` (Adam on the ELBO;
    the test ELBO logged every tenth of the run) and scores them (``emvi.vae``)."""
    import jax
    import jax.numpy as jnp
    import optax

    from emvi import vae

    seed, d, hidden, key = cfg.seed, split.train_x.shape[1], tuple(cfg.vae_hidden), jax.random.key
    xs = (split.test_x, split.train_x)
    rows, arrays = [], {}
    for kind in VAE_KINDS:
        print(f"[em_vs_vi] training the {kind} VAE ({cfg.vae_epochs} epochs)", flush=True)
        tic = time.perf_counter()
        if kind == "gaussian":
            model = vae.gaussian_vae(d, cfg.vae_latent_dim, hidden)
        else:
            model = vae.categorical_vae(d, cfg.vae_num_classes, hidden)
        params = vae.fit_vae(
            jax.random.fold_in(key(seed), VAE_KINDS.index(kind)),
            model,
            split.train_x,
            optimizer=optax.adam(cfg.vae_learning_rate),
            batch_size=min(cfg.vae_batch_size, split.train_x.shape[0]),
            num_epochs=cfg.vae_epochs,
            workdir=(workdir / "vae" / kind).resolve(),
            eval_fn=vae.elbo_eval_fn(model, split.test_x, key(seed + 1)),
            eval_every=max(1, cfg.vae_epochs // 10),
            checkpoint_every=cfg.vae_epochs,
            progress=cfg.progress,
            resume=False,
        ).state.params
        train_time = time.perf_counter() - tic
        tic = time.perf_counter()
        if kind == "gaussian":
            n, s = cfg.vae_eval_num_samples, cfg.vae_train_ll_points
            ev = vae.evaluate_gaussian(key(seed + 2), params, *xs, model=model, num_samples=n)
            sub = split.train_x[:s]
            train_ll = vae.log_likelihood(key(seed + 5), params, sub, model=model, num_samples=n)
            # The train ELBO on the same images, for a like-for-like train gap.
            aux = vae.elbo_loss(
                params, key(seed + 6), jnp.asarray(sub), model=model, num_samples=100
            )
            train_elbo = float(aux[1]["elbo"])
            samples = vae.generate(key(seed + 7), params, 64, model=model)
            arrays["vae_samples"] = np.asarray(samples)
            name, how = (
                f"Gaussian VAE, l={model.latent_dim}",
                f"IWAE, k={n} (a stochastic lower bound)",
            )
            note = f"first {sub.shape[0]} training images"
            q = "amortized encoder (ELBO by 100-sample MC)"
        else:
            ev = vae.evaluate_categorical(key(seed + 3), params, *xs, model=model)
            train_ll = vae.categorical_log_likelihood(params, split.train_x, model=model)
            train_elbo = ev["train_elbo"]
            codes = np.eye(model.num_classes, dtype=np.float32)
            arrays["categorical_prototypes"] = np.asarray(vae.decode(params, codes, model=model))
            name = f"Categorical VAE, m={model.num_classes}"
            how = "exact (enumeration of the m classes)"
            note, q = "all training images", "amortized encoder (exact ELBO)"
        row = _row(
            name,
            "vi",
            ev["test_log_likelihood"],
            ev["test_elbo"],
            float(np.mean(np.asarray(train_ll))),
            train_elbo,
            sem=ev["test_log_likelihood_sem"],
            head={"kind": kind},
            train_elbo_all=ev["train_elbo"],
            train_scored_on=note,
            log_likelihood_method=how,
            elbo_q=q,
            num_params=int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
            epochs=cfg.vae_epochs,
            fit_time_s=train_time,
            eval_time_s=time.perf_counter() - tic,
            active_units=ev.get("active_units"),
        )
        rows.append(row)
        log.write(phase="summary", **row)
    return rows, arrays


def main(cfg: Config) -> dict:
    """Fits every method, writes the run folder and ``report.md``; returns the results."""
    import jax

    from emvi import data

    started = time.perf_counter()
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    full = data.digits_bin(np.float32)
    n_train, n_test = cfg.max_train, cfg.max_test
    split = data.Split(
        full.train_x[:n_train], full.train_y[:n_train], full.test_x[:n_test], full.test_y[:n_test]
    )
    load_before = runs.load_average()
    with runs.MetricsLog(workdir) as log:
        mixture_rows, fitted = fit_mixtures(cfg, split, log)
        best = max(mixture_rows, key=lambda r: r["test_log_likelihood"])
        best_params, best_a = fitted[best["k"]]
        trace = trace_best_mixture(cfg, split, best["k"], best_a, log)
        arrays = {
            "mixture_weights": np.asarray(best_params.weights),
            "mixture_probs": np.asarray(best_params.probs),
        }
        arrays |= {f"trace_{f}": trace[f] for f in ("log_likelihood", "elbo", "log_prior")}
        vae_rows = []
        if cfg.vae:
            vae_rows, vae_arrays = run_vaes(cfg, split, workdir, log)
            arrays.update(vae_arrays)
    np.savez(workdir / "figures.npz", **arrays)
    from_cli = sys.argv and sys.argv[0].endswith("em_vs_vi.py")
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
            "load_average_after": runs.load_average(),
            "backend": jax.default_backend(),
        },
        "command": " ".join(["python", *sys.argv])
        if from_cli
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


def plot(workdir) -> list[Path]:
    """Draws the PNG figures from results.json and figures.npz, then ``report.md``."""
    plt = plotting.pyplot()
    workdir = Path(workdir)
    res = json.loads((workdir / "results.json").read_text())
    arrays = dict(np.load(workdir / "figures.npz"))

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
    written = [plotting.save(fig, workdir / "headline.png")]

    # 2. The EM half-step trace, on the objective MAP-EM ascends (shifted by log prior / n).
    ll, elbo, shift = (arrays[f"trace_{f}"] for f in ("log_likelihood", "elbo", "log_prior"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, lo in zip(axes, (0, ll.shape[0] // 3), strict=True):
        plotting.half_step_trace(
            ax, ll, elbo, start=lo, shift=shift, label_suffix=" + log prior / n", markers=False
        )
    axes[0].set_ylabel("mean nats per training image")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"MAP-EM on the Bernoulli mixture, k={res['trace_k']}", fontsize=10)
    axes[1].set_xlabel("EM iteration (zoom)")
    axes[1].set_title("E-step: bound touches; M-step: both rise, KL opens", fontsize=9)
    written.append(plotting.save(fig, workdir / "em_trace.png"))

    # 3. Component means of the best mixture, by weight (components with weight 0 left out).
    weights, probs = arrays["mixture_weights"], arrays["mixture_probs"]
    order = [j for j in np.argsort(-weights) if weights[j] > 1e-6]
    cols = min(10, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols, 1.1 * rows + 0.5), squeeze=False)
    plotting.image_panels(axes, probs[order], [f"{weights[j]:.3f}" for j in order])
    fig.suptitle(
        f"Bernoulli mixture k={len(weights)}: pixel probabilities of the {len(order)} "
        "components with weight > 0, by weight",
        fontsize=9,
    )
    written.append(plotting.save(fig, workdir / "mixture_means.png"))

    # 4. VAE samples and prototypes (when the VAEs ran).
    panels = []
    if "vae_samples" in arrays:
        panels.append(("Gaussian VAE: E[x|z], z ~ N(0, I)", arrays["vae_samples"]))
    if "categorical_prototypes" in arrays:
        panels.append(("Categorical VAE: E[x|k] per class", arrays["categorical_prototypes"]))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        for ax, (title, images) in zip(np.atleast_1d(axes), panels, strict=True):
            ax.imshow(plotting.square_grid(images, background=0.15), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        written.append(plotting.save(fig, workdir / "vae_samples.png"))
    written.append(write_report(workdir))
    return written


def markdown_table(methods: list[dict]) -> str:
    """The results table (nats per image) as GitHub markdown."""
    fmt = runs.format_number

    def test_ll(m):
        sem = m.get("test_log_likelihood_sem")
        finite = isinstance(sem, float) and math.isfinite(sem)
        return fmt(m["test_log_likelihood"]) + (f" ± {sem:.2f}" if finite else "")

    columns = [
        ("method", lambda m: m["method"]),
        ("test log p(x)", test_ll),
        ("test ELBO", lambda m: fmt(m["test_elbo"])),
        ("test gap", lambda m: fmt(m["test_gap"], 3)),
        ("train log p(x)", lambda m: fmt(m["train_log_likelihood"])),
        ("train ELBO", lambda m: fmt(m["train_elbo"])),
        ("train gap", lambda m: fmt(m["train_gap"], 3)),
        ("params", lambda m: f"{m['num_params']:,}"),
        ("log p(x) by", lambda m: m["log_likelihood_method"]),
    ]
    return runs.markdown_table(methods, columns, align="lrrrrrrrl")


def write_report(workdir) -> Path:
    """Writes the one-page ``report.md`` from results.json (figures by relative path)."""
    workdir = Path(workdir)
    res = json.loads((workdir / "results.json").read_text())
    methods = res["methods"]
    em_rows = [m for m in methods if m["family"] == "em"]
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
    command = res["command"]
    lines = [
        "# EM vs amortized VI on digits-bin",
        "",
        f"Command: `{command}`  " if command.startswith("python ") else f"Command: {command}  ",
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
        "* VAEs (emvi.vae): trained on the ELBO with Adam; their ELBO uses the "
        "encoder's q. The Gaussian VAE's log p(x) is an importance-sampling estimate "
        "(itself a lower bound, so its gap is a lower bound on the true KL) and its train "
        "columns use the first training images only (see results.json); the categorical "
        "VAE's log p(x) and ELBO are exact."
        if any(m["family"] == "vi" for m in methods)
        else "* VAEs: not run (--no-vae). Rerun without the flag to add the Gaussian and "
        "categorical VAEs.",
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
