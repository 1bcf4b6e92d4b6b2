r"""MAP-EM vs mean-field variational Bayes on the digits, and LDA on two corpora.

MAP-EM keeps a point estimate of the mixture parameters (``gmm.fit(..., prior=p)``), VB a
distribution over them (``bayesian_mixture.fit(..., prior=p)``, the same prior); both climb
an ELBO. (a) Full-covariance Gaussian mixtures on 1500 digits (297 held out, the split of
``data.digits_bin``): MAP-EM, VB with the same Dirichlet, VB with a truncated Dirichlet
process. (b) LDA, batch and online, on the digits as documents (pixels as words). (c) LDA on
the "bars" corpus (Griffiths & Steyvers 2004): also the recovery of its known topics. (d) On
both corpora, amortized VI beside the per-document optimum: an encoder (``lda.fit_amortized``)
trained on the ELBO with the batch fit's topics fixed, its per-word ELBO against Blei et al.'s
per-document mean-field optimum, and Cremer et al.'s amortization gap
(``lda.amortization_gap``), on the training and the held-out documents.
Run: ``python experiments/variational_bayes.py --workdir runs/vb`` (a run folder with
``report.md`` and :data:`FIGURES`); ``... plot runs/vb`` remakes the figures.
"""

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from emvi import bayesian_mixture as bm
from emvi import gmm, lda, plotting, runs
from emvi.data import load_digits

FIGURES = ("mixture_weights.png", "digits_topics.png", "bars_topics.png")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (every field is a command-line flag)."""

    workdir: Path = Path("runs/variational_bayes")  # refused if not empty, unless --overwrite
    overwrite: bool = False
    seed: int = 0
    x64: bool = True  # run in float64
    num_components: int = 20  # truncation level k of the Gaussian mixtures
    reg_covar: float = 0.1  # added to every covariance (integer pixels; see the README's GMM part)
    gmm_max_iter: int = 300
    gmm_tol: float = 1e-3
    digits_topics: int = 10
    lda_passes: int = 20  # passes over the corpus (batch iterations, or online epochs)
    online_batch_size: int = 100
    bars_train_docs: int = 1000
    bars_test_docs: int = 200
    bars_passes: int = 100
    bars_num_init: int = 3
    amortized_steps: int = 1500  # Adam steps of the LDA encoder (topics fixed)
    amortized_hidden: tuple[int, ...] = (100, 100)
    gap_samples: int = 200  # Monte Carlo draws per document for the amortized bounds
    gap_refine_steps: int = 200  # per-document optimisation of the encoder's family


def _mixtures(cfg, key, train, test, log):
    (n, d), k = train.shape, cfg.num_components
    psi = np.cov(train.T) + cfg.reg_covar * np.eye(d)  # constant pixels make cov singular
    values = (1.0, train.mean(0), 1.0, psi, float(d))  # the Normal-Wishart prior of both
    prior = gmm.GMMPrior(*(jnp.asarray(a, train.dtype) for a in values))
    dp = prior._replace(weight_concentration=jnp.asarray(1.0 / k, train.dtype))
    kw = dict(covariance_type="full", reg_covar=cfg.reg_covar, max_iter=cfg.gmm_max_iter)
    rows, fits = [], {}
    for name, wpt, p in (
        ("MAP-EM, Dirichlet(1)", None, prior),
        ("VB, Dirichlet(1)", "dirichlet_distribution", prior),
        (f"VB, DP(1/{k})", "dirichlet_process", dp),
    ):
        t0 = time.perf_counter()
        fit = bm.fit if wpt else gmm.fit
        extra = dict(weight_concentration_prior_type=wpt) if wpt else dict(init="kmeans")
        res = jax.block_until_ready(fit(key, train, k, prior=p, tol=cfg.gmm_tol, **kw, **extra))
        seconds = time.perf_counter() - t0
        if wpt is None:  # after an E-step the bound touches log p(x): MAP-EM's ELBO
            params, train_elbo = res.params, float(res.log_likelihood)
        else:  # the exact ELBO, a bound on log p(x), per image
            params = bm.to_gmm_params(res.posterior, weight_prior_type=wpt)
            train_elbo = float(res.elbo) / n
        ll = gmm.log_prob(params, jnp.asarray(test), covariance_type="full")
        se = float(jnp.std(ll) / np.sqrt(test.shape[0]))
        row = dict(method=name, test_log_lik=float(jnp.mean(ll)), test_log_lik_se=se)
        row.update(train_elbo=train_elbo, effective_components=int(jnp.sum(params.weights > 0.01)))
        rows.append(dict(row, iterations=int(res.num_iter), seconds=seconds))
        log.write(part="mixture", **rows[-1])
        fits[name] = np.sort(np.asarray(params.weights))[::-1]
    return rows, fits


def _lda(cfg, out, key, train, test, k, passes, log, part, *, alpha=None, true=None, num_init=1):
    """Batch and online LDA: appends their rows to ``out[0]["lda_<part>"]``, topics to out[1]."""
    rows, alpha = out[0].setdefault(f"lda_{part}", []), 1.0 / k if alpha is None else alpha
    kw = dict(max_iter=passes, batch_size=cfg.online_batch_size, num_init=num_init)
    for method in ("batch", "online"):
        t0 = time.perf_counter()
        res = lda.fit(key, train, k, method=method, doc_topic_prior=alpha, **kw)
        lam, seconds = np.asarray(res.topic_word), time.perf_counter() - t0  # waits for it
        test_ppl = lda.perplexity(res.topic_word, test, lda.LDAPrior(alpha, 1.0 / k))
        row = dict(corpus=part, method=method, train_perplexity=float(res.perplexity))
        rows.append(dict(row, test_perplexity=float(test_ppl), seconds=seconds))
        if true is not None:
            rows[-1]["topic_tv_distance"], match = lda.topic_recovery(lam, true)
            lam = lam[np.argsort(match)]
        log.write(part=part, **rows[-1])
        out[1][f"{part}_{method}"] = lam / lam.sum(axis=1, keepdims=True)
    _amortized(cfg, out, key, train, test, out[1][f"{part}_batch"], alpha, log, part)


def _amortized(cfg, out, key, train, test, topics, alpha, log, part):
    """Amortized VI on the batch fit's topics: rows of ``out[0]["amortized"]``, per word."""
    rows = out[0].setdefault("amortized", [])
    t0 = time.perf_counter()
    enc = lda.fit_amortized(
        jax.random.fold_in(key, 1),
        topics,
        train,
        alpha,
        hidden=tuple(cfg.amortized_hidden),
        num_steps=cfg.amortized_steps,
    )
    for split, x in (("train", train), ("test", test)):
        gap = lda.amortization_gap(
            jax.random.fold_in(key, 2),
            enc,
            topics,
            x,
            alpha,
            num_samples=cfg.gap_samples,
            refine_steps=cfg.gap_refine_steps,
        )
        rows.append(dict(corpus=part, split=split, docs=len(x), **gap._asdict()))
        log.write(part=f"{part}_amortized", **rows[-1])
    rows[-1]["seconds"] = rows[-2]["seconds"] = time.perf_counter() - t0


def main(cfg: Config) -> dict:
    """Runs the three parts, writes the run folder and returns ``results.json``'s content."""
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    if cfg.x64:
        jax.config.update("jax_enable_x64", True)
    runs.write_config(workdir, cfg)
    k_mix, k_dig, k_bars = jax.random.split(jax.random.key(cfg.seed), 3)
    x, _ = load_digits(np.float64 if cfg.x64 else np.float32)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    tr, te = x[perm[:-297]], x[perm[-297:]]
    bars, true = lda.bars_corpus(cfg.seed, cfg.bars_train_docs + cfg.bars_test_docs)
    bars, nb = bars.astype(x.dtype), cfg.bars_train_docs
    with runs.MetricsLog(workdir) as log:
        rows, weights = _mixtures(cfg, k_mix, tr, te, log)
        results = {"mixtures": rows, "mixture_names": list(weights)}
        out = results, {f"weights_{i}": w for i, w in enumerate(weights.values())}
        _lda(cfg, out, k_dig, tr, te, cfg.digits_topics, cfg.lda_passes, log, "digits")
        kw = dict(alpha=1.0, true=true, num_init=cfg.bars_num_init)
        _lda(cfg, out, k_bars, bars[:nb], bars[nb:], len(true), cfg.bars_passes, log, "bars", **kw)
    np.savez(workdir / "arrays.npz", **out[1], bars_true=true)
    runs.write_json(workdir / "results.json", results)
    runs.atomic_write_text(workdir / "report.md", _report(results))
    plot(workdir)
    return results


REPORT = """\
# MAP-EM vs variational Bayes; LDA

## Full-covariance Gaussian mixtures on the digits (1500 train / 297 test)

| method | test log p(x) (plug-in) | train ELBO / image | components > 1% | iterations | seconds |
|---|---:|---:|---:|---:|---:|
{mixtures}

MAP-EM's ELBO is its log-likelihood (the bound is tight after the exact E-step); VB's is \
the exact mean-field ELBO, a bound on the log marginal likelihood.

## LDA

| corpus | method | train perplexity | test perplexity | topic TV distance | seconds |
|---|---|---:|---:|---:|---:|
{lda}

## Amortized VI on the batch topics (nats per word; ± Monte Carlo standard errors)

| corpus | split | mean-field optimum | amortized ELBO | mean-field − amortized | \
amortization gap (refined − amortized) |
|---|---|---:|---:|---:|---:|
{amortized}

The mean-field optimum is each document's coordinate-ascent fixed point (Dirichlet family), \
the encoder's family is logistic-normal; both bound the same log p(w | alpha, beta), so \
only the last column, the encoder's own family optimised per document, must be >= 0.
"""
AMORTIZED_ROW = (
    "| {corpus} | {split} | {mean_field:.4f} | {amortized:.4f} ± {amortized_se:.1e} | "
    "{gap_vs_mean_field:.4f} | {amortization_gap:.4f} ± {amortization_gap_se:.1e} |"
)
MIXTURE_ROW = (
    "| {method} | {test_log_lik:.2f} ± {test_log_lik_se:.2f} | {train_elbo:.2f} | "
    "{effective_components} | {iterations} | {seconds:.1f} |"
)
LDA_ROW = (
    "| {corpus} | {method} | {train_perplexity:.3f} | {test_perplexity:.3f} | {tv} | "
    "{seconds:.1f} |"
)


def _report(results: dict) -> str:
    lda_rows = results["lda_digits"] + results["lda_bars"]
    tvs = [f"{r['topic_tv_distance']:.3f}" if "topic_tv_distance" in r else "–" for r in lda_rows]
    return REPORT.format(
        mixtures="\n".join(MIXTURE_ROW.format(**r) for r in results["mixtures"]),
        lda="\n".join(LDA_ROW.format(**r, tv=tv) for r, tv in zip(lda_rows, tvs, strict=True)),
        amortized="\n".join(AMORTIZED_ROW.format(**r) for r in results["amortized"]),
    )


def plot(workdir) -> list[Path]:
    """Remakes the figures from ``results.json`` and ``arrays.npz`` (no refitting)."""
    workdir = Path(workdir)
    names = json.loads((workdir / "results.json").read_text())["mixture_names"]
    arrays = np.load(workdir / "arrays.npz")
    weights = {name: arrays[f"weights_{i}"] for i, name in enumerate(names)}
    fig = plotting.ranked_values_figure(weights, xlabel="component (sorted)", ylabel="weight")
    written = [plotting.save(fig, workdir / FIGURES[0])]
    for corpus in ("digits", "bars"):
        labels = ["batch", "online"] + (["true"] if corpus == "bars" else [])
        fig = plotting.image_rows_figure({r: arrays[f"{corpus}_{r}"] for r in labels})
        written.append(plotting.save(fig, workdir / f"{corpus}_topics.png"))
    return written


if __name__ == "__main__":
    runs.cli(Config, main, plot)
