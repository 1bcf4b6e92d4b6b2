r"""MAP-EM vs mean-field variational Bayes on the digits, and LDA on two corpora.

Both columns climb an ELBO by coordinate ascent: MAP-EM keeps a point estimate of the
mixture parameters (``emvi.gmm.fit(..., prior=p)``), VB a distribution over them
(``emvi.bayesian_mixture.fit(..., prior=p)``, the same prior object). This experiment fits

* (a) a full-covariance Gaussian mixture to 1500 of scikit-learn's 8x8 digits (the other
  297 held out, the split of ``emvi.data.digits_bin``) with MAP-EM (flat Dirichlet on the
  weights, which the MAP estimate needs), VB with the same Dirichlet, and VB with a
  truncated Dirichlet-process prior :math:`\alpha_0 = 1/k`: held-out log-likelihood of the
  plug-in mixture, training ELBO per image, the effective number of components (weight >
  1%) and time;
* (b) LDA on the digits as documents (pixel positions as words, intensities 0-16 as
  counts), batch variational EM and online VB: held-out perplexity, topics as 8x8 images;
* (c) LDA on the synthetic "bars" corpus (Griffiths & Steyvers 2004) whose 10 true topics
  are known: held-out perplexity and topic recovery (mean total-variation distance to the
  matched true topic).

Run folder (``--workdir``): ``config.json``, ``metrics.jsonl``, ``results.json``,
``arrays.npz`` (weights and topics, so ``plot`` remakes the figures without refitting),
``report.md``, ``mixture_weights.png``, ``digits_topics.png``, ``bars_topics.png``.

Usage::

    python experiments/variational_bayes.py --workdir runs/vb --overwrite
    python experiments/variational_bayes.py plot runs/vb     # remake the figures

Shape letters: ``n`` images / documents, ``d`` pixels, ``k`` components or topics.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from emvi import runs

FIGURES = ("mixture_weights.png", "digits_topics.png", "bars_topics.png")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (every field is a command-line flag)."""

    workdir: Path = Path("runs/variational_bayes")
    """Run folder; refused if it exists and is not empty, unless --overwrite."""
    overwrite: bool = False
    seed: int = 0
    x64: bool = True
    """Run in float64."""
    num_components: int = 20
    """Truncation level k of the Gaussian mixtures."""
    reg_covar: float = 0.1
    """Added to every covariance (the pixels are integers; see the README's GMM section)."""
    gmm_max_iter: int = 300
    gmm_tol: float = 1e-3
    digits_topics: int = 10
    lda_passes: int = 20
    """Passes over the corpus (batch iterations, or online epochs)."""
    online_batch_size: int = 100
    bars_train_docs: int = 1000
    bars_test_docs: int = 200
    bars_passes: int = 100
    bars_num_init: int = 3


def _split(n: int, n_test: int):
    perm = np.random.default_rng(0).permutation(n)
    return perm[: n - n_test], perm[n - n_test :]


def _mixtures(cfg, key, train, test, log):
    import jax
    import jax.numpy as jnp

    from emvi import bayesian_mixture as bm
    from emvi import gmm

    n, d = train.shape
    k = cfg.num_components
    psi = np.cov(train.T) + cfg.reg_covar * np.eye(d)  # constant pixels make cov singular
    prior = gmm.GMMPrior(
        *(jnp.asarray(a, train.dtype) for a in (1.0, train.mean(0), 1.0, psi, float(d)))
    )
    rows = []
    fits = {}
    for name in ("MAP-EM, Dirichlet(1)", "VB, Dirichlet(1)", f"VB, DP(1/{k})"):
        t0 = time.perf_counter()
        if name.startswith("MAP"):
            res = gmm.fit(
                key,
                train,
                k,
                covariance_type="full",
                init="kmeans",
                prior=prior,
                reg_covar=cfg.reg_covar,
                max_iter=cfg.gmm_max_iter,
                tol=cfg.gmm_tol,
            )
            jax.block_until_ready(res.params)
            params, iters = res.params, int(res.num_iter)
            # After an E-step the bound touches log p(x): the ELBO of MAP-EM's q(z).
            train_elbo = float(res.log_likelihood)
        else:
            wpt = "dirichlet_distribution" if "Dirichlet" in name else "dirichlet_process"
            p = (
                prior
                if wpt == "dirichlet_distribution"
                else prior._replace(weight_concentration=jnp.asarray(1.0 / k, train.dtype))
            )
            res = bm.fit(
                key,
                train,
                k,
                covariance_type="full",
                weight_concentration_prior_type=wpt,
                prior=p,
                reg_covar=cfg.reg_covar,
                max_iter=cfg.gmm_max_iter,
                tol=cfg.gmm_tol,
            )
            jax.block_until_ready(res.posterior)
            params = bm.to_gmm_params(res.posterior, weight_prior_type=wpt)
            iters = int(res.num_iter)
            train_elbo = float(res.elbo) / n  # the exact ELBO, a bound on log p(x) per image
        seconds = time.perf_counter() - t0
        ll_test = gmm.log_prob(params, jnp.asarray(test), covariance_type="full")
        row = dict(
            method=name,
            test_log_lik=float(jnp.mean(ll_test)),
            test_log_lik_se=float(jnp.std(ll_test) / np.sqrt(test.shape[0])),
            train_elbo=train_elbo,
            effective_components=int(jnp.sum(params.weights > 0.01)),
            iterations=iters,
            seconds=seconds,
        )
        log.write(part="mixture", **row)
        rows.append(row)
        fits[name] = np.sort(np.asarray(params.weights))[::-1]
    return rows, fits


def _lda_rows(
    cfg, key, train, test, num_topics, passes, log, part, *, doc_topic=None, true=None, num_init=1
):
    import jax

    from emvi import lda

    rows, topics = [], {}
    prior_alpha = 1.0 / num_topics if doc_topic is None else doc_topic
    for method in ("batch", "online"):
        t0 = time.perf_counter()
        res = lda.fit(
            key,
            train,
            num_topics,
            method=method,
            max_iter=passes,
            batch_size=cfg.online_batch_size,
            doc_topic_prior=prior_alpha,
            num_init=num_init,
        )
        jax.block_until_ready(res.topic_word)
        seconds = time.perf_counter() - t0
        prior = lda.LDAPrior(prior_alpha, 1.0 / num_topics)
        row = dict(
            corpus=part,
            method=method,
            train_perplexity=float(res.perplexity),
            test_perplexity=float(lda.perplexity(res.topic_word, test, prior)),
            seconds=seconds,
        )
        lam = np.asarray(res.topic_word)
        if true is not None:
            tv, match = lda.topic_recovery(lam, true)
            row["topic_tv_distance"] = tv
            order = np.argsort(match)
            lam = lam[order]
        log.write(part=part, **row)
        rows.append(row)
        topics[method] = lam / lam.sum(axis=1, keepdims=True)
    return rows, topics


def main(cfg: Config) -> dict:
    """Runs the three parts, writes the run folder and returns ``results.json``'s content."""
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    import jax

    if cfg.x64:
        jax.config.update("jax_enable_x64", True)
    from emvi import lda
    from emvi.data import load_digits

    runs.write_config(workdir, cfg)
    dtype = np.float64 if cfg.x64 else np.float32
    k_mix, k_dig, k_bars = jax.random.split(jax.random.key(cfg.seed), 3)
    x, _ = load_digits(dtype)
    tr, te = _split(x.shape[0], 297)
    results: dict = {}
    arrays: dict = {}
    with runs.MetricsLog(workdir) as log:
        rows, weights = _mixtures(cfg, k_mix, x[tr], x[te], log)
        results["mixtures"] = rows
        for i, w in enumerate(weights.values()):
            arrays[f"weights_{i}"] = w
        results["mixture_names"] = list(weights)
        rows, topics = _lda_rows(
            cfg, k_dig, x[tr], x[te], cfg.digits_topics, cfg.lda_passes, log, "digits"
        )
        results["lda_digits"] = rows
        arrays.update({f"digits_{m}": t for m, t in topics.items()})
        bars, true = lda.bars_corpus(cfg.seed, cfg.bars_train_docs + cfg.bars_test_docs)
        bars = bars.astype(dtype)
        rows, topics = _lda_rows(
            cfg,
            k_bars,
            bars[: cfg.bars_train_docs],
            bars[cfg.bars_train_docs :],
            true.shape[0],
            cfg.bars_passes,
            log,
            "bars",
            doc_topic=1.0,
            true=true,
            num_init=cfg.bars_num_init,
        )
        results["lda_bars"] = rows
        arrays.update({f"bars_{m}": t for m, t in topics.items()})
        arrays["bars_true"] = true
    np.savez(workdir / "arrays.npz", **arrays)
    runs.write_json(workdir / "results.json", results)
    runs.atomic_write_text(workdir / "report.md", _report(results))
    plot(workdir)
    return results


def _report(results: dict) -> str:
    lines = [
        "# MAP-EM vs variational Bayes; LDA",
        "",
        "## Full-covariance Gaussian mixtures on the digits (1500 train / 297 test)",
        "",
        "| method | test log p(x) (plug-in) | train ELBO / image | components > 1% "
        "| iterations | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["mixtures"]:
        lines.append(
            f"| {r['method']} | {r['test_log_lik']:.2f} ± {r['test_log_lik_se']:.2f} | "
            f"{r['train_elbo']:.2f} | {r['effective_components']} | {r['iterations']} | "
            f"{r['seconds']:.1f} |"
        )
    lines += [
        "",
        "MAP-EM's ELBO is its log-likelihood (the bound is tight after the exact E-step); "
        "VB's is the exact mean-field ELBO, a bound on the log marginal likelihood.",
        "",
        "## LDA",
        "",
        "| corpus | method | train perplexity | test perplexity | topic TV distance | seconds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results["lda_digits"] + results["lda_bars"]:
        tv = f"{r['topic_tv_distance']:.3f}" if "topic_tv_distance" in r else "–"
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['train_perplexity']:.3f} | "
            f"{r['test_perplexity']:.3f} | {tv} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _grid(ax_row, images, side):
    for ax, img in zip(ax_row, images, strict=False):
        ax.imshow(img.reshape(side, side), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])


def plot(workdir) -> Path:
    """Remakes the figures from ``results.json`` and ``arrays.npz`` (no refitting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    arrays = np.load(workdir / "arrays.npz")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, name in enumerate(results["mixture_names"]):
        w = arrays[f"weights_{i}"]
        ax.plot(np.arange(1, w.size + 1), w, "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("component (sorted)")
    ax.set_ylabel("weight")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "mixture_weights.png", dpi=120)
    plt.close(fig)
    for corpus, side in (("digits", 8), ("bars", 5)):
        rows = ["batch", "online"] + (["true"] if corpus == "bars" else [])
        tops = [arrays[f"{corpus}_{r}"] for r in rows]
        k = tops[0].shape[0]
        fig, axes = plt.subplots(len(rows), k, figsize=(k * 0.9, len(rows) * 1.0), squeeze=False)
        for r, (label, t) in enumerate(zip(rows, tops, strict=True)):
            _grid(axes[r], t, side)
            axes[r, 0].set_ylabel(label)
        fig.tight_layout()
        fig.savefig(workdir / f"{corpus}_topics.png", dpi=120)
        plt.close(fig)
    return workdir


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 2 and sys.argv[1] == "plot":
        print(plot(sys.argv[2]))
    else:
        import tyro

        main(tyro.cli(Config))
