r"""Gaussian mixtures by exact EM against scikit-learn, from the same start.

Fits the 8x8 digits (1797 x 64, pixels 0..16; once per covariance type) and a 2-D synthetic
mixture with known parameters (k=3 full) with ``emvi.gmm.fit`` and with scikit-learn's
``GaussianMixture``, both from the same k-means start and with the same stopping rule, and
records the EM half-step trace. Writes ``results.json``, ``metrics.jsonl`` (per iteration,
half-step and fit), ``params_*.npz`` and ``trace_*.npz`` (for :func:`plot`) and ``FIGURES``.

Usage::

    python experiments/gmm_em.py --workdir runs/gmm --overwrite
    python experiments/gmm_em.py plot runs/gmm   # remake the figures
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

from emvi import em, gmm, plotting, runs, testing
from emvi import kmeans as km
from emvi.data import load_digits, synthetic_mixture

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
FIGURES = ("trace.png", "synthetic_fit.png", "digits_means.png")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the GMM experiment (every field is a command-line flag)."""

    workdir: Path = Path("runs/gmm_em")
    """Run folder; refused if it exists and is not empty, unless --overwrite."""
    overwrite: bool = False
    """Delete an existing run folder first."""
    seed: int = 0
    num_components: int = 10
    """Components for the digits mixture."""
    covariance_types: tuple[str, ...] = ("diag", "full")
    """Covariance types fitted to the digits (any of full, diag, spherical, tied)."""
    reg_covar: float = 0.1
    """Added to covariance diagonals for the digits (pixel units; 1/12 is the variance of
    a unit-width quantisation bin)."""
    digits_holdout: int = 0
    """If > 0, hold out this many digits (the digits-bin permutation) and report their
    mean log-likelihood too."""
    digits_num_points: int | None = None
    """Use only the first this many (permuted) training digits; None for all (tests)."""
    synthetic_num_points: int = 1500
    synthetic_reg_covar: float = 1e-6
    synthetic_num_init: int = 5
    """Initialisations for the 2-D fit: one k-means start often splits the large elongated
    component and merges the other two (a local optimum); the best of 5 finds the truth."""
    max_iter: int = 200
    tol: float = 1e-3
    """Stop when the mean log-likelihood per sample changes by less than this."""
    num_init: int = 1
    """Initialisations per fit (the best final log-likelihood is kept, by each library)."""
    trace_iters: int = 15
    """EM iterations recorded half-step by half-step for the trace figure."""
    x64: bool = True
    """Run emvi in float64 (scikit-learn always is)."""
    plots: bool = True


def _log(msg: str) -> None:
    print(f"[gmm_em {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kmeans_labels(key, x, k: int, num_init: int) -> list:
    """One-hot labels of ``num_init`` k-means runs (``emvi.kmeans``, k-means++ seeding),
    run ``i`` from ``fold_in(key, i)``: with one M-step each (``emvi.gmm``'s
    ``params_from_responsibilities``), scikit-learn's ``init_params="kmeans"``."""
    keys = [jax.random.fold_in(key, i) for i in range(num_init)]
    return [jax.nn.one_hot(km.kmeans(kk, x, k).labels, k, dtype=x.dtype) for kk in keys]


def _inits(x, labels, ct, reg_covar) -> list[gmm.GMMParams]:
    fn = functools.partial(
        gmm.params_from_responsibilities, covariance_type=ct, reg_covar=reg_covar
    )
    return [fn(x, resp) for resp in labels]


@functools.partial(jax.jit, static_argnames="covariance_type")
def _evaluate(params, x, *, covariance_type):
    """(mean log-likelihood, BIC, hard labels) in one compiled call."""
    return (
        jnp.mean(gmm.log_prob(params, x, covariance_type=covariance_type)),
        gmm.bic(params, x, covariance_type=covariance_type),
        gmm.predict(params, x, covariance_type=covariance_type),
    )


def _best(rows: list[dict], y, **extra) -> dict:
    """The summary of one library: its fit with the highest training log-likelihood."""
    from sklearn.metrics import adjusted_rand_score

    best = int(np.nanargmax([r["mean_log_likelihood"] for r in rows]))
    out = {k: v for k, v in rows[best].items() if k != "labels"} | extra | {"best_init": best}
    if y is not None:
        out["adjusted_rand_index"] = float(adjusted_rand_score(y, np.asarray(rows[best]["labels"])))
    return out


def _fit_pair(key, x, y, inits, *, ct, cfg, reg_covar, name, log, x_test=None):
    """Fits emvi and scikit-learn from each init; returns the summary and the best fit of
    each library (``GMMParams``)."""
    xj = jnp.asarray(x)
    opts = dict(max_iter=cfg.max_iter, tol=cfg.tol, reg_covar=reg_covar)

    def fit_one(i):
        p = inits[i]
        fit = gmm.fit(
            jax.random.fold_in(key, i), xj, len(p.weights), covariance_type=ct, init=p, **opts
        )
        return jax.block_until_ready(fit)

    t0 = time.perf_counter()
    fits = [fit_one(0)]
    first_call = time.perf_counter() - t0
    fits += [fit_one(i) for i in range(1, len(inits))]
    t0 = time.perf_counter()  # warm timing (compile excluded): refit every init once more
    for i in range(len(inits)):
        fit_one(i)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    sk = [
        testing.sklearn_gmm(x, p, covariance_type=ct, random_state=cfg.seed, **opts) for p in inits
    ]
    sk_time = time.perf_counter() - t0
    rows, sk_rows = [], []
    for i, (fit, gm) in enumerate(zip(fits, sk, strict=True)):
        for t, value in enumerate(np.asarray(fit.history)[: int(fit.num_iter)]):
            log.write(event="em_iteration", fit=name, init=i, iteration=t, log_likelihood=value)
        ll, bic, labels = _evaluate(fit.params, xj, covariance_type=ct)
        rows.append(dict(mean_log_likelihood=float(ll), bic=float(bic), labels=labels))
        rows[-1] |= dict(num_iter=int(fit.num_iter), converged=bool(fit.converged))
        sk_rows.append(dict(mean_log_likelihood=float(gm.score(x)), bic=float(gm.bic(x))))
        sk_rows[-1] |= dict(
            labels=gm.predict(x), num_iter=int(gm.n_iter_), converged=bool(gm.converged_)
        )
        if x_test is not None:
            test = _evaluate(fit.params, jnp.asarray(x_test), covariance_type=ct)[0]
            rows[-1]["test_mean_log_likelihood"] = float(test)
            sk_rows[-1]["test_mean_log_likelihood"] = float(gm.score(x_test))
    emvi_res = _best(rows, y, wall_time_s=warm, first_call_s=first_call)
    sk_res = _best(sk_rows, y, wall_time_s=sk_time)
    summary = {
        "covariance_type": ct,
        "reg_covar": reg_covar,
        "num_points": int(x.shape[0]),
        "num_components": len(inits[0].weights),
        "emvi": emvi_res,
        "sklearn": sk_res,
        "log_likelihood_difference": emvi_res["mean_log_likelihood"]
        - sk_res["mean_log_likelihood"],
    }
    log.write(event="fit", fit=name, **summary)
    _log(
        f"{name}: emvi ll/n={emvi_res['mean_log_likelihood']:.4f} ({emvi_res['num_iter']} it, "
        f"{warm:.2f}s warm, {first_call:.2f}s first call) | sklearn "
        f"ll/n={sk_res['mean_log_likelihood']:.4f} ({sk_res['num_iter']} it, {sk_time:.2f}s)"
    )
    gm = sk[sk_res["best_init"]]
    return (
        summary,
        fits[emvi_res["best_init"]].params,
        gmm.GMMParams(gm.weights_, gm.means_, gm.covariances_),
    )


_em_trace_jit = jax.jit(em.em_trace, static_argnames=("model", "num_iter"))


def _trace(init, x, *, ct, reg_covar, num_iter, name, log, workdir):
    """``emvi.em.em_trace`` from ``init`` (one iteration per call, see ``em.em_trace``),
    on data and means shifted by the data mean (the GMM's packed half-steps want centred
    data; log-likelihoods, ELBOs and KLs do not change under a common shift)."""
    shift = x.mean(0)
    model = gmm.model(ct)
    data = model.prepare(jnp.asarray(x - shift[None, :]))
    params = init._replace(means=jnp.asarray(init.means) - shift[None, :])
    hyper = gmm.GMMHyper(jnp.asarray(reg_covar, x.dtype))
    parts = []
    for _ in range(num_iter):
        tr = _em_trace_jit(model, params, data, num_iter=1, hyper=hyper)
        parts.append((tr.log_likelihood, tr.elbo, tr.kl))
        params = tr.params
    ll, elbo, kl = (np.concatenate(p) for p in zip(*parts, strict=True))
    for t in range(num_iter):
        for h, half in enumerate("EM"):
            row = dict(log_likelihood=ll[t, h], elbo=elbo[t, h], kl=kl[t, h])
            log.write(event="half_step", fit=name, iteration=t, half=half, step=2 * t + h, **row)
    np.savez(workdir / f"trace_{name}.npz", log_likelihood=ll, elbo=elbo, kl=kl)


def main(cfg: Config) -> dict:
    """Runs the experiment, writes the run folder and returns ``results.json``'s content."""
    bad = [c for c in cfg.covariance_types if c not in COVARIANCE_TYPES]
    if bad:
        raise ValueError(f"unknown covariance type(s) {bad}; choose from {COVARIANCE_TYPES}.")
    if min(cfg.num_init, cfg.synthetic_num_init) < 1:
        raise ValueError("num_init and synthetic_num_init must be >= 1.")
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    jax.config.update("jax_enable_x64", cfg.x64)
    start = time.perf_counter()
    runs.write_config(workdir, cfg)
    dtype = np.float64 if cfg.x64 else np.float32
    k_digits, k_synth, k_fit = jax.random.split(jax.random.key(cfg.seed), 3)
    results: dict = {"config": cfg, "digits": {}, "synthetic": {}}

    x_all, y_all = load_digits(np.float64)
    n_all = x_all.shape[0]
    perm = np.random.default_rng(0).permutation(n_all)  # the digits-bin order
    train = perm[: n_all - cfg.digits_holdout] if cfg.digits_holdout else perm
    if cfg.digits_num_points is not None:
        train = train[: cfg.digits_num_points]
    if not cfg.digits_holdout:
        train = np.sort(train)  # the plain data set, in its own order
    x, y = x_all[train].astype(dtype), y_all[train]
    x_test = x_all[perm[n_all - cfg.digits_holdout :]].astype(dtype) if cfg.digits_holdout else None
    k = cfg.num_components
    _log(f"digits: {x.shape[0]} x {x.shape[1]}, k={k}, x64={cfg.x64}")
    trace = functools.partial(_trace, num_iter=cfg.trace_iters, workdir=workdir)

    with runs.MetricsLog(workdir) as log:
        labels = kmeans_labels(k_digits, jnp.asarray(x), k, cfg.num_init)
        for ct in cfg.covariance_types:
            inits = _inits(jnp.asarray(x), labels, ct, cfg.reg_covar)
            name = f"digits_{ct}"
            fit_args = dict(ct=ct, cfg=cfg, reg_covar=cfg.reg_covar, name=name, log=log)
            summary, best, sk = _fit_pair(k_fit, x, y, inits, x_test=x_test, **fit_args)
            # Majority true label of each cluster (for the means figure).
            pred = np.asarray(_evaluate(best, jnp.asarray(x), covariance_type=ct)[2])
            majority = [
                int(np.bincount(y[pred == j], minlength=10).argmax()) if (pred == j).any() else -1
                for j in range(k)
            ]
            summary["cluster_majority_label"] = majority
            init = inits[summary["emvi"]["best_init"]]
            np.savez(
                workdir / f"params_{name}.npz",
                **best._asdict(),
                **{f"init_{f}": v for f, v in init._asdict().items()},
                **{f"sklearn_{f}": v for f, v in sk._asdict().items()},
                majority_label=np.array(majority),
            )
            trace(inits[0], x, ct=ct, reg_covar=cfg.reg_covar, name=name, log=log)
            results["digits"][ct] = summary

        # (b) the 2-D synthetic mixture, k=3 full.
        seed_synth = int(jax.random.randint(k_synth, (), 0, 2**31 - 1))
        xs, zs, spec = synthetic_mixture(seed_synth, cfg.synthetic_num_points, dtype=dtype)
        k3, reg = len(spec.weights), cfg.synthetic_reg_covar
        _log(f"synthetic: {xs.shape[0]} x {xs.shape[1]}, k={k3} full")
        labels = kmeans_labels(k_synth, jnp.asarray(xs), k3, cfg.synthetic_num_init)
        inits = _inits(jnp.asarray(xs), labels, "full", reg)
        fit_args = dict(ct="full", cfg=cfg, reg_covar=reg, name="synthetic", log=log)
        summary, best, sk = _fit_pair(k_fit, xs, zs, inits, **fit_args)
        true = gmm.GMMParams(spec.weights, spec.means, spec.covariances)
        summary["emvi"]["parameter_error"] = gmm.parameter_error(true, best)
        summary["sklearn"]["parameter_error"] = gmm.parameter_error(true, sk)
        # A deliberately rough start for the trace: k random points, the data covariance.
        rng = np.random.default_rng(cfg.seed)
        means = xs[rng.choice(xs.shape[0], size=k3, replace=False)]
        cov = np.cov(xs, rowvar=False)
        covs = np.broadcast_to(cov, (k3, *cov.shape)).copy()
        rough = gmm.GMMParams(np.full(k3, 1.0 / k3), means, covs)
        trace(rough, xs, ct="full", reg_covar=reg, name="synthetic", log=log)
        np.savez(
            workdir / "params_synthetic.npz",
            **best._asdict(),
            **{f"true_{f}": v for f, v in true._asdict().items()},
            x=xs,
            z=zs,
        )
        results["synthetic"] = summary

    results["wall_time_s"] = time.perf_counter() - start
    runs.write_json(workdir / "results.json", results)
    _log(f"fits done in {results['wall_time_s']:.1f}s; results in {workdir / 'results.json'}")
    if cfg.plots:
        _log("figures: " + ", ".join(str(p) for p in plot(workdir)))
    return json.loads((workdir / "results.json").read_text())


def plot(workdir) -> list[Path]:
    """Remakes every figure from the files in ``workdir`` (no refitting)."""
    from scipy.stats import multivariate_normal

    plt = plotting.pyplot()
    workdir = Path(workdir)
    res = json.loads((workdir / "results.json").read_text())
    names = [f"digits_{ct}" for ct in res["digits"]] + ["synthetic"]
    traces = {}
    for name in names:
        if (workdir / f"trace_{name}.npz").exists():
            tr = np.load(workdir / f"trace_{name}.npz")
            traces[name.replace("_", " ")] = (tr["log_likelihood"], tr["elbo"], tr["kl"])
    title = "EM as coordinate ascent on the ELBO: E-step closes the gap, M-step raises the bound"
    written = [
        plotting.save(plotting.em_trace_figure(traces, start=0, title=title), workdir / "trace.png")
    ]

    # The 2-D fit: 1 and 2 sigma ellipses, true (left) and fitted (right, matched, grey: true).
    p = np.load(workdir / "params_synthetic.npz")
    x, z = p["x"], p["z"]
    err = res["synthetic"]["emvi"]["parameter_error"]
    perm = np.array(err["matching"])
    w, m, c = p["weights"][perm], p["means"][perm], p["covariances"][perm]
    logp = np.stack(
        [np.log(w[j]) + multivariate_normal(m[j], c[j]).logpdf(x) for j in range(len(w))], 1
    )
    true = (p["true_weights"], p["true_means"], p["true_covariances"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    panels = [
        ("true mixture", *true, z, None),
        ("EM fit (emvi)  (grey: true)", w, m, c, logp.argmax(1), true),
    ]
    for ax, (title, w, m, c, labels, grey) in zip(axes, panels, strict=True):
        ax.scatter(x[:, 0], x[:, 1], c=[f"C{j}" for j in labels], s=3, alpha=0.35, lw=0)
        plotting.mixture_ellipses(ax, w, m, c, lw=1.2)
        if grey is not None:
            plotting.mixture_ellipses(ax, *grey, annotate=False, color="0.6", lw=0.8)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.suptitle(
        f"2-D mixture, 1σ (solid) and 2σ (dashed) ellipses; n={x.shape[0]}; "
        f"max |Δw|={err['weights_max_abs_error']:.3f}, "
        f"max |Δμ|={err['means_max_euclidean_error']:.3f}, "
        f"max rel. ΔΣ={err['covariances_max_relative_frobenius_error']:.3f}",
        fontsize=10,
    )
    written.append(plotting.save(fig, workdir / "synthetic_fit.png"))

    # The digits means as 8x8 images, one row per covariance type, sorted by weight.
    cts = list(res["digits"])
    k = res["digits"][cts[0]]["num_components"]
    fig, axes = plt.subplots(len(cts), k, figsize=(1.25 * k, 1.6 * len(cts) + 0.6), squeeze=False)
    for row, ct in enumerate(cts):
        p = np.load(workdir / f"params_digits_{ct}.npz")
        order = np.argsort(-p["weights"])
        titles = [f"w={p['weights'][j]:.3f}\n'{p['majority_label'][j]}'" for j in order]
        plotting.image_panels(axes[row], p["means"][order], titles, vmax=16, fontsize=8)
        ari = res["digits"][ct]["emvi"].get("adjusted_rand_index", float("nan"))
        axes[row, 0].set_ylabel(f"{ct}\nARI={ari:.2f}", fontsize=9)
    fig.suptitle(
        "Digits: component means, sorted by weight (w); '3' = majority true digit", fontsize=10
    )
    written.append(plotting.save(fig, workdir / "digits_means.png"))
    return written


if __name__ == "__main__":
    runs.cli(Config, main, plot)
