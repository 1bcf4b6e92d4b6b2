r"""Headline experiment: Gaussian mixtures fitted by EM, checked against scikit-learn.

EM is coordinate ascent on the ELBO: the E-step sets q to the exact posterior (the bound
touches :math:`\log p(x)`), the M-step raises :math:`E_q[\log p(x, z)]` in closed form. This
experiment fits

* (a) scikit-learn's 8x8 digits (1797 x 64, integer pixels 0..16) with ``num_components``
  components, once per covariance type, and
* (b) a 2-D synthetic mixture with known parameters (``emvi.data.synthetic_mixture``),
  k=3 "full",

each with ``emvi.gmm.fit`` and with scikit-learn's ``GaussianMixture`` from the *same*
initial parameters (k-means labels -> one M-step) and the same stopping rule, and records
the EM half-step trace (log-likelihood, ELBO and KL after every E- and M-step).

Run folder (``--workdir``):

* ``config.json``, ``metrics.jsonl`` (one row per EM iteration per fit, one per half-step
  of each trace, one summary per fit), ``results.json``;
* ``params_<fit>.npz``: initial and fitted parameters (and the 2-D data), so ``plot``
  remakes every figure without refitting;
* ``trace.png``, ``synthetic_fit.png``, ``digits_means.png``.

Usage::

    python experiments/gmm_em.py --workdir runs/main --overwrite
    python experiments/gmm_em.py --workdir runs/main --plot-only   # remake the figures

Shape letters: ``n`` data points, ``d`` data dimension, ``k`` components.
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

from emvi import em, gmm, plotting, runs
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
    plot_only: bool = False
    """Only remake the figures from an existing run folder."""
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


# ---------------------------------------------------------------------------------------
# Initialisation shared by emvi and scikit-learn
# ---------------------------------------------------------------------------------------


def moments_from_labels(
    x: np.ndarray, labels: np.ndarray, k: int, covariance_type: str, reg_covar: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One M-step from hard labels (scikit-learn's ``init_params="kmeans"``).

    ``emvi.gmm``'s closed-form M-step (``expected_stats`` then ``m_step``) on one-hot
    responsibilities, on the centred data, means shifted back. Returns ``(weights (k,),
    means (k, d), covariances)`` in scikit-learn's layout; empty clusters get ``10 * eps``
    mass, as in scikit-learn, and start at the data mean (scikit-learn: the origin).
    """
    xj = jnp.asarray(x)
    shift = jnp.mean(xj, axis=0)
    xc = xj - shift[None, :]
    resp = jax.nn.one_hot(jnp.asarray(labels), k, dtype=xj.dtype)
    w = jnp.ones(xj.shape[0], xj.dtype)
    data = gmm.prepare(xc, covariance_type=covariance_type)
    stats = gmm.expected_stats(resp, data, w, covariance_type=covariance_type)
    hyper = gmm.GMMHyper(jnp.asarray(reg_covar, xj.dtype))
    p = gmm.m_step(stats, hyper, covariance_type=covariance_type)
    return np.asarray(p.weights), np.asarray(p.means + shift[None, :]), np.asarray(p.covariances)


def precisions(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Inverse covariances in scikit-learn's ``precisions_init`` layout."""
    if covariance_type in ("full", "tied"):
        return np.linalg.inv(covariances)
    return 1.0 / covariances


def kmeans_labels(key, x: np.ndarray, k: int) -> np.ndarray:
    """Hard labels of a k-means run (``emvi.kmeans``, k-means++ seeding, Lloyd to convergence)."""
    return np.asarray(km.kmeans(key, x, k).labels)


def random_point_init(
    rng: np.random.Generator, x: np.ndarray, k: int, covariance_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A deliberately rough start for the trace figure: k random points, the data covariance."""
    n, d = x.shape
    means = x[rng.choice(n, size=k, replace=False)]
    cov = np.cov(x, rowvar=False).reshape(d, d)
    layouts = {
        "full": np.broadcast_to(cov, (k, d, d)).copy(),
        "diag": np.broadcast_to(np.diag(cov), (k, d)).copy(),
        "spherical": np.full(k, np.trace(cov) / d),
        "tied": cov,
    }
    return np.full(k, 1.0 / k), means, layouts[covariance_type]


# ---------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------


def _sklearn_fit(x, init, *, covariance_type, max_iter, tol, reg_covar, seed):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    weights, means, cov = init
    gm = GaussianMixture(
        n_components=len(weights),
        covariance_type=covariance_type,
        tol=tol,
        reg_covar=reg_covar,
        max_iter=max_iter,
        weights_init=weights,
        means_init=means,
        precisions_init=precisions(cov, covariance_type),
        random_state=seed,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(x)
    return gm, time.perf_counter() - t0


@functools.partial(jax.jit, static_argnames="covariance_type")
def _evaluate(params, x, *, covariance_type):
    """(mean log-likelihood, BIC, hard labels) in one compiled call."""
    return (
        jnp.mean(gmm.log_prob(params, x, covariance_type=covariance_type)),
        gmm.bic(params, x, covariance_type=covariance_type),
        gmm.predict(params, x, covariance_type=covariance_type),
    )


def _fit_pair(key, x, y, inits, *, covariance_type, cfg, reg_covar, name, log, x_test=None):
    """Fits emvi and scikit-learn from each init; returns (summary dict, best emvi params)."""
    from sklearn.metrics import adjusted_rand_score

    xj = jnp.asarray(x)

    def fit_one(i, init):
        return jax.block_until_ready(
            gmm.fit(
                jax.random.fold_in(key, i),
                xj,
                len(init[0]),
                covariance_type=covariance_type,
                init=gmm.GMMParams(*(jnp.asarray(a) for a in init)),
                max_iter=cfg.max_iter,
                tol=cfg.tol,
                reg_covar=reg_covar,
            )
        )

    fits, first_call = [], None
    for i, init in enumerate(inits):
        t0 = time.perf_counter()
        fit = fit_one(i, init)
        if first_call is None:
            first_call = time.perf_counter() - t0
        fits.append(fit)
        hist = np.asarray(fit.history)
        for t in range(int(fit.num_iter)):
            log.write(
                event="em_iteration",
                fit=name,
                init=i,
                iteration=t,
                log_likelihood=float(hist[t]),
            )
    # Warm timing (compile excluded): refit every init once more.
    t0 = time.perf_counter()
    for i, init in enumerate(inits):
        fit_one(i, init)
    warm = time.perf_counter() - t0
    lls = [float(_evaluate(f.params, xj, covariance_type=covariance_type)[0]) for f in fits]
    best_i = int(np.nanargmax(lls))
    best = fits[best_i]
    _, best_bic, labels = _evaluate(best.params, xj, covariance_type=covariance_type)
    labels = np.asarray(labels)
    emvi_res = {
        "mean_log_likelihood": lls[best_i],
        "bic": float(best_bic),
        "num_iter": int(best.num_iter),
        "converged": bool(best.converged),
        "wall_time_s": warm,
        "first_call_s": first_call,
        "best_init": best_i,
    }
    if y is not None:
        emvi_res["adjusted_rand_index"] = float(adjusted_rand_score(y, labels))
    if x_test is not None:
        emvi_res["test_mean_log_likelihood"] = float(
            _evaluate(best.params, jnp.asarray(x_test), covariance_type=covariance_type)[0]
        )

    sk_fits = [
        _sklearn_fit(
            x,
            init,
            covariance_type=covariance_type,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            reg_covar=reg_covar,
            seed=cfg.seed,
        )
        for init in inits
    ]
    sk_lls = [gm.score(x) for gm, _ in sk_fits]
    sk_i = int(np.nanargmax(sk_lls))
    gm = sk_fits[sk_i][0]
    sk_res = {
        "mean_log_likelihood": float(sk_lls[sk_i]),
        "bic": float(gm.bic(x)),
        "num_iter": int(gm.n_iter_),
        "converged": bool(gm.converged_),
        "wall_time_s": float(sum(t for _, t in sk_fits)),
        "best_init": sk_i,
    }
    if y is not None:
        sk_res["adjusted_rand_index"] = float(adjusted_rand_score(y, gm.predict(x)))
    if x_test is not None:
        sk_res["test_mean_log_likelihood"] = float(gm.score(x_test))
    summary = {
        "covariance_type": covariance_type,
        "reg_covar": reg_covar,
        "num_points": int(x.shape[0]),
        "num_components": len(inits[0][0]),
        "emvi": emvi_res,
        "sklearn": sk_res,
        "log_likelihood_difference": emvi_res["mean_log_likelihood"]
        - sk_res["mean_log_likelihood"],
        "sklearn_params": {
            "weights": gm.weights_,
            "means": gm.means_,
            "covariances": gm.covariances_,
        },
    }
    log.write(event="fit", fit=name, **{k: v for k, v in summary.items() if k != "sklearn_params"})
    _log(
        f"{name}: emvi ll/n={emvi_res['mean_log_likelihood']:.4f} ({emvi_res['num_iter']} it, "
        f"{warm:.2f}s warm, {first_call:.2f}s first call) | sklearn "
        f"ll/n={sk_res['mean_log_likelihood']:.4f} ({sk_res['num_iter']} it, "
        f"{sk_res['wall_time_s']:.2f}s)"
    )
    return summary, best


# One EM iteration of the trace per call. em_trace(num_iter=T) runs a lax.scan; on XLA:CPU
# (jax 0.10.2, 2 cores) that scan deadlocks for digits/full (every thread idle in a futex;
# jitted or not; fine with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false). A length-1 scan
# has no loop left after compilation and runs fine, so the experiment steps it from Python.
_em_trace_jit = jax.jit(em.em_trace, static_argnames=("model", "num_iter"))


def _trace(init, x, *, covariance_type, reg_covar, num_iter, name, log):
    """``emvi.em.em_trace`` from ``init``; logs one row per half-step and returns arrays.

    The GMM's packed half-steps want centred data (see ``emvi.gmm``), so the data and the
    initial means are shifted by the data mean; log-likelihoods, ELBOs and KLs do not
    change under a common shift.
    """
    shift = x.mean(0)
    model = gmm.model(covariance_type)
    data = model.prepare(jnp.asarray(x - shift[None, :]))
    weights, means, cov = init
    p0 = gmm.GMMParams(jnp.asarray(weights), jnp.asarray(means - shift[None, :]), jnp.asarray(cov))
    hyper = gmm.GMMHyper(jnp.asarray(reg_covar, x.dtype))
    rows, params = [], p0
    for _ in range(num_iter):
        tr = _em_trace_jit(model, params, data, num_iter=1, hyper=hyper)
        rows.append([np.asarray(a) for a in (tr.log_likelihood, tr.elbo, tr.kl)])
        params = tr.params
    ll, elbo, kl = (np.concatenate(parts) for parts in zip(*rows, strict=True))
    for t in range(num_iter):
        for h, half in enumerate("EM"):
            log.write(
                event="half_step",
                fit=name,
                iteration=t,
                half=half,
                step=2 * t + h,
                log_likelihood=float(ll[t, h]),
                elbo=float(elbo[t, h]),
                kl=float(kl[t, h]),
            )
    return {"log_likelihood": ll, "elbo": elbo, "kl": kl}


def _match_components(true_means: np.ndarray, fitted_means: np.ndarray) -> np.ndarray:
    """perm such that fitted component perm[j] matches true component j (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    cost = ((true_means[:, None, :] - fitted_means[None, :, :]) ** 2).sum(-1)
    _, cols = linear_sum_assignment(cost)
    return cols


def parameter_error(true, fitted) -> dict:
    """Recovered-vs-true errors after matching components (weights, means, covariances)."""
    tw, tm, tc = (np.asarray(a) for a in true)
    perm = _match_components(tm, np.asarray(fitted[1]))
    fw, fm, fc = (np.asarray(a)[perm] for a in fitted)
    rel_cov = np.linalg.norm(fc - tc, axis=(1, 2)) / np.linalg.norm(tc, axis=(1, 2))
    return {
        "weights_max_abs_error": float(np.abs(fw - tw).max()),
        "means_max_euclidean_error": float(np.linalg.norm(fm - tm, axis=1).max()),
        "covariances_max_relative_frobenius_error": float(rel_cov.max()),
        "matching": perm.tolist(),
    }


def _save_params(path: Path, **arrays) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})


def main(cfg: Config) -> dict:
    """Runs the experiment, writes the run folder and returns ``results.json``'s content."""
    if cfg.plot_only:
        plot(cfg.workdir)
        return json.loads((Path(cfg.workdir) / "results.json").read_text())
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
    key = jax.random.key(cfg.seed)
    k_digits, k_synth, k_fit = jax.random.split(key, 3)
    rng = np.random.default_rng(cfg.seed)
    results: dict = {"config": cfg, "digits": {}, "synthetic": {}}

    x_all, y_all = load_digits(np.float64)
    perm = np.random.default_rng(0).permutation(x_all.shape[0])  # the digits-bin order
    train = perm[: x_all.shape[0] - cfg.digits_holdout] if cfg.digits_holdout else perm
    test = perm[x_all.shape[0] - cfg.digits_holdout :] if cfg.digits_holdout else None
    if cfg.digits_num_points is not None:
        train = train[: cfg.digits_num_points]
    if not cfg.digits_holdout:
        train = np.sort(train)  # the plain data set, in its own order
    x, y = x_all[train].astype(dtype), y_all[train]
    x_test = x_all[test].astype(dtype) if test is not None else None
    _log(f"digits: {x.shape[0]} x {x.shape[1]}, k={cfg.num_components}, x64={cfg.x64}")

    with runs.MetricsLog(workdir) as log:
        digit_labels = [
            kmeans_labels(jax.random.fold_in(k_digits, i), x, cfg.num_components)
            for i in range(cfg.num_init)
        ]
        for ct in cfg.covariance_types:
            inits = [
                moments_from_labels(x, lab, cfg.num_components, ct, cfg.reg_covar)
                for lab in digit_labels
            ]
            name = f"digits_{ct}"
            summary, best = _fit_pair(
                k_fit,
                x,
                y,
                inits,
                covariance_type=ct,
                cfg=cfg,
                reg_covar=cfg.reg_covar,
                name=name,
                log=log,
                x_test=x_test,
            )
            sk = summary.pop("sklearn_params")
            # Majority true label of each cluster (for the means figure).
            pred = np.asarray(_evaluate(best.params, jnp.asarray(x), covariance_type=ct)[2])
            majority = [
                int(np.bincount(y[pred == j], minlength=10).argmax()) if (pred == j).any() else -1
                for j in range(cfg.num_components)
            ]
            summary["cluster_majority_label"] = majority
            _save_params(
                workdir / f"params_{name}.npz",
                weights=best.params.weights,
                means=best.params.means,
                covariances=best.params.covariances,
                init_weights=inits[summary["emvi"]["best_init"]][0],
                init_means=inits[summary["emvi"]["best_init"]][1],
                init_covariances=inits[summary["emvi"]["best_init"]][2],
                sklearn_weights=sk["weights"],
                sklearn_means=sk["means"],
                sklearn_covariances=sk["covariances"],
                majority_label=np.array(majority),
            )
            tr = _trace(
                inits[0],
                x,
                covariance_type=ct,
                reg_covar=cfg.reg_covar,
                num_iter=cfg.trace_iters,
                name=name,
                log=log,
            )
            _save_params(workdir / f"trace_{name}.npz", **tr)
            results["digits"][ct] = summary

        # (b) the 2-D synthetic mixture, k=3 full.
        seed_synth = int(jax.random.randint(k_synth, (), 0, 2**31 - 1))
        xs, zs, spec = synthetic_mixture(seed_synth, cfg.synthetic_num_points, dtype=dtype)
        k3 = len(spec.weights)
        _log(f"synthetic: {xs.shape[0]} x {xs.shape[1]}, k={k3} full")
        s_inits = [
            moments_from_labels(
                xs,
                kmeans_labels(jax.random.fold_in(k_synth, i), xs, k3),
                k3,
                "full",
                cfg.synthetic_reg_covar,
            )
            for i in range(cfg.synthetic_num_init)
        ]
        summary, best = _fit_pair(
            k_fit,
            xs,
            zs,
            s_inits,
            covariance_type="full",
            cfg=cfg,
            reg_covar=cfg.synthetic_reg_covar,
            name="synthetic",
            log=log,
        )
        sk = summary.pop("sklearn_params")
        true = (spec.weights, spec.means, spec.covariances)
        summary["emvi"]["parameter_error"] = parameter_error(true, best.params)
        summary["sklearn"]["parameter_error"] = parameter_error(
            true, (sk["weights"], sk["means"], sk["covariances"])
        )
        rough = random_point_init(rng, xs, k3, "full")
        tr = _trace(
            rough,
            xs,
            covariance_type="full",
            reg_covar=cfg.synthetic_reg_covar,
            num_iter=cfg.trace_iters,
            name="synthetic",
            log=log,
        )
        _save_params(workdir / "trace_synthetic.npz", **tr)
        _save_params(
            workdir / "params_synthetic.npz",
            weights=best.params.weights,
            means=best.params.means,
            covariances=best.params.covariances,
            true_weights=spec.weights,
            true_means=spec.means,
            true_covariances=spec.covariances,
            x=xs,
            z=zs,
        )
        results["synthetic"] = summary

    results["wall_time_s"] = time.perf_counter() - start
    runs.write_json(workdir / "results.json", results)
    _log(f"fits done in {results['wall_time_s']:.1f}s; results in {workdir / 'results.json'}")
    if cfg.plots:
        paths = plot(workdir)
        _log("figures: " + ", ".join(str(p) for p in paths))
    return json.loads((workdir / "results.json").read_text())


# ---------------------------------------------------------------------------------------
# Figures, from the run folder alone
# ---------------------------------------------------------------------------------------


def _ellipse(ax, mean, cov, nsig, **kw):
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    w, h = 2 * nsig * np.sqrt(vals[::-1])
    ax.add_patch(Ellipse(mean, w, h, angle=angle, fill=False, **kw))


def _plot_trace(workdir: Path, results: dict):
    import matplotlib.pyplot as plt

    names = [f"digits_{ct}" for ct in results["digits"]] + ["synthetic"]
    names = [n for n in names if (workdir / f"trace_{n}.npz").exists()]
    fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 6.4), squeeze=False)
    for col, name in enumerate(names):
        tr = np.load(workdir / f"trace_{name}.npz")
        ll, elbo, kl = tr["log_likelihood"].ravel(), tr["elbo"].ravel(), tr["kl"].ravel()
        steps = np.arange(1, ll.size + 1) / 2  # E-step t at t+0.5, M-step t at t+1
        show = min(ll.size, 16)  # the sawtooth is visible early; later it is below a pixel
        ax = axes[0, col]
        ax.plot(steps[:show], ll[:show], "-", color="k", lw=1.2, label=r"$\log p(x\mid\theta)$")
        ax.plot(steps[:show], elbo[:show], "-", color="C1", lw=1.2, label="ELBO(q, θ)")
        ax.plot(steps[:show:2], elbo[:show:2], "o", color="C0", ms=4, label="after E-step")
        ax.plot(steps[1:show:2], elbo[1:show:2], "s", color="C3", ms=4, label="after M-step")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("EM iteration (half-steps)")
        ax.set_ylabel("mean per sample (nats)")
        if col == 0:
            ax.legend(fontsize=8, loc="lower right")
        ax = axes[1, col]
        floor = 1e-16
        m_kl = kl[1::2]
        e_kl = np.abs(kl[0::2])
        ax.semilogy(
            steps[1::2], np.maximum(m_kl, floor), "s-", color="C3", ms=3, label="after M-step"
        )
        e_label = "after E-step (|KL|, floored)"
        ax.semilogy(steps[0::2], np.maximum(e_kl, floor), "o", color="C0", ms=3, label=e_label)
        ax.set_xlabel("EM iteration (half-steps)")
        ax.set_ylabel(r"KL(q $\|$ p(z|x,θ)) per sample")
        ax.set_ylim(bottom=floor / 2)
        if col == 0:
            ax.legend(fontsize=8)
    fig.suptitle(
        "EM as coordinate ascent on the ELBO: E-step closes the gap, M-step raises the bound"
    )
    return plotting.save(fig, workdir / "trace.png")


def _plot_synthetic(workdir: Path, results: dict):
    import matplotlib.pyplot as plt

    p = np.load(workdir / "params_synthetic.npz")
    x, z = p["x"], p["z"]
    err = results["synthetic"]["emvi"]["parameter_error"]
    perm = np.array(err["matching"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    panels = [
        ("true mixture", p["true_weights"], p["true_means"], p["true_covariances"], z),
        ("EM fit (emvi)", p["weights"][perm], p["means"][perm], p["covariances"][perm], None),
    ]
    if panels[1][4] is None:
        # colour the fitted panel by the most likely fitted component (matched to truth)
        from scipy.stats import multivariate_normal

        w, m, c = panels[1][1:4]
        logp = np.stack(
            [np.log(w[j]) + multivariate_normal(m[j], c[j]).logpdf(x) for j in range(len(w))], 1
        )
        panels[1] = (*panels[1][:4], logp.argmax(1))
    for ax, (title, w, m, c, lab) in zip(axes, panels, strict=True):
        ax.scatter(x[:, 0], x[:, 1], c=[f"C{j}" for j in lab], s=3, alpha=0.35, lw=0)
        for j in range(len(w)):
            for nsig, ls in ((1, "-"), (2, "--")):
                _ellipse(ax, m[j], c[j], nsig, color="k", lw=1.2, ls=ls)
            if title.startswith("EM"):
                for nsig, ls in ((1, "-"), (2, "--")):
                    _ellipse(
                        ax,
                        p["true_means"][j],
                        p["true_covariances"][j],
                        nsig,
                        color="0.6",
                        lw=0.8,
                        ls=ls,
                    )
            ax.annotate(
                f"w={w[j]:.2f}", m[j], textcoords="offset points", xytext=(6, 6), fontsize=9
            )
        ax.set_title(title + ("  (grey: true)" if title.startswith("EM") else ""))
        ax.set_aspect("equal")
    fig.suptitle(
        f"2-D mixture, 1σ (solid) and 2σ (dashed) ellipses; n={x.shape[0]}; "
        f"max |Δw|={err['weights_max_abs_error']:.3f}, "
        f"max |Δμ|={err['means_max_euclidean_error']:.3f}, "
        f"max rel. ΔΣ={err['covariances_max_relative_frobenius_error']:.3f}",
        fontsize=10,
    )
    return plotting.save(fig, workdir / "synthetic_fit.png")


def _plot_digits(workdir: Path, results: dict):
    import matplotlib.pyplot as plt

    cts = list(results["digits"])
    k = results["digits"][cts[0]]["num_components"]
    fig, axes = plt.subplots(len(cts), k, figsize=(1.25 * k, 1.6 * len(cts) + 0.6), squeeze=False)
    for row, ct in enumerate(cts):
        p = np.load(workdir / f"params_digits_{ct}.npz")
        order = np.argsort(-p["weights"])
        res = results["digits"][ct]["emvi"]
        for col, j in enumerate(order):
            ax = axes[row, col]
            ax.imshow(p["means"][j].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"w={p['weights'][j]:.3f}\n'{p['majority_label'][j]}'", fontsize=8)
        axes[row, 0].set_ylabel(
            f"{ct}\nARI={res.get('adjusted_rand_index', float('nan')):.2f}", fontsize=9
        )
    fig.suptitle(
        "Digits: component means, sorted by weight (w); '3' = majority true digit", fontsize=10
    )
    return plotting.save(fig, workdir / "digits_means.png")


def plot(workdir) -> list[Path]:
    """Remakes every figure from the files in ``workdir`` (no refitting)."""
    import matplotlib

    matplotlib.use("Agg")
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    return [
        _plot_trace(workdir, results),
        _plot_synthetic(workdir, results),
        _plot_digits(workdir, results),
    ]


if __name__ == "__main__":
    runs.cli(Config, main, plot)
