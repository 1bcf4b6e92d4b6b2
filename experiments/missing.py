r"""Missing pixels and partial labels on the digits, by exact EM (:mod:`emvi.missing`).

(a) scikit-learn's 8x8 digits (0..16), split as digits-bin (1500 train / 297 test), with a
fraction of the pixels of every image removed at random. A Gaussian mixture fitted by EM
that marginalises the missing pixels (``gmm.fit`` on data with NaN) is compared with the
same mixture fitted to mean-imputed data, on the held-out log-likelihood of the observed
pixels (``gmm.observed_log_prob``) and on the RMSE of its imputations (``gmm.impute``)
against mean imputation and scikit-learn's ``IterativeImputer``. (b) Semi-supervised EM:
the same mixture with the labels of a fraction of the training images fixed
(``gmm.fit(labels=...)``); test accuracy of the most probable component.

Usage::

    python experiments/missing.py --workdir runs/missing --overwrite
    python experiments/missing.py plot runs/missing   # remake the figures
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from emvi import gmm, plotting, runs
from emvi.data import DIGITS_BIN_NUM_TRAIN, load_digits

FIGURES = ("imputed_digits.png", "label_accuracy.png")
MISSING_COLUMNS = "method rmse test_observed_ll test_observed_ll_sem num_iter seconds".split()
LABEL_COLUMNS = "labelled_fraction num_labelled test_accuracy num_iter seconds".split()


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (every field is a command-line flag)."""

    workdir: Path = Path("runs/missing")
    overwrite: bool = False
    seed: int = 0
    fractions: tuple[float, ...] = (0.1, 0.3, 0.5)
    """Fractions of the pixels removed at random from every image."""
    covariance_types: tuple[str, ...] = ("diag",)
    """Any of full/tied/diag/spherical; the full masked E-step factorises n k matrices d x d
    per iteration (minutes per fit on 2 cores at digits size)."""
    num_components: int = 10
    reg_covar: float = 0.1
    """Added to covariance diagonals (pixel units; 1/12 is a unit bin's variance)."""
    max_iter: int = 100
    tol: float = 1e-3
    chunk_size: int | None = 250
    """E-step chunk (the full-covariance masked E-step holds n k d^2 numbers). Every
    ``seconds`` reported includes compiling (the first fit of a covariance type most)."""
    label_fractions: tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
    label_covariance_type: str = "diag"
    num_train: int | None = None
    """Use only the first this many training images (tests); None for all 1500."""
    iterative_imputer: bool = True


def _split(cfg: Config):
    x, y = load_digits(np.float64)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    train, test = perm[:DIGITS_BIN_NUM_TRAIN][: cfg.num_train], perm[DIGITS_BIN_NUM_TRAIN:]
    return x[train], y[train], x[test], y[test]


def _remove(rng, x: np.ndarray, fraction: float) -> np.ndarray:
    """A copy of ``x`` with each entry NaN with probability ``fraction`` (one kept per row)."""
    mask = rng.random(x.shape) >= fraction
    mask[np.arange(x.shape[0]), rng.integers(0, x.shape[1], x.shape[0])] = True
    return np.where(mask, x, np.nan)


def _table(rows, cols) -> str:
    """A markdown table of ``rows`` (dicts) over ``cols``; floats to 3 decimals."""

    def cell(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows])


def _rmse(imputed, truth, holes) -> float:
    return float(np.sqrt(np.mean((np.asarray(imputed)[holes] - truth[holes]) ** 2)))


def _gmm_row(method, res, ct, xte, xte_n, holes, seconds):
    ll = np.asarray(gmm.observed_log_prob(res.params, xte_n, covariance_type=ct), np.float64)
    out = np.asarray(gmm.impute(res.params, xte_n, covariance_type=ct))
    sem = float(ll.std(ddof=1) / np.sqrt(ll.size))
    row = dict(method=method, rmse=_rmse(out, xte, holes), test_observed_ll=float(ll.mean()))
    row.update(test_observed_ll_sem=sem, num_iter=int(res.num_iter), seconds=seconds)
    return row, out


def _missing_rows(cfg, key, xte, xtr_n, xte_n, log):
    """Every method at one fraction: rows of the table, and the imputed test images."""
    holes = np.isnan(xte_n)
    col_mean = np.nanmean(xtr_n, axis=0)
    mean_imp = np.where(holes, col_mean, xte_n)
    rows, examples = [dict(method="mean imputation", rmse=_rmse(mean_imp, xte, holes))], {}
    if cfg.iterative_imputer:
        from sklearn.experimental import enable_iterative_imputer  # noqa: F401
        from sklearn.impute import IterativeImputer

        t0 = time.perf_counter()
        out = IterativeImputer(max_iter=10, random_state=cfg.seed).fit(xtr_n).transform(xte_n)
        rows.append(dict(method="IterativeImputer", rmse=_rmse(out, xte, holes)))
        rows[-1]["seconds"], examples["IterativeImputer"] = time.perf_counter() - t0, out
    fit_kw = dict(
        reg_covar=cfg.reg_covar, max_iter=cfg.max_iter, tol=cfg.tol, chunk_size=cfg.chunk_size
    )
    train_sets = {
        "marginalised": xtr_n,
        "on mean-imputed": np.where(np.isnan(xtr_n), col_mean, xtr_n),
    }
    for ct in cfg.covariance_types:
        for name, data in train_sets.items():
            t0 = time.perf_counter()
            res = jax.block_until_ready(
                gmm.fit(key, data, cfg.num_components, covariance_type=ct, **fit_kw)
            )
            row, examples[f"GMM {ct}, EM {name}"] = _gmm_row(
                f"GMM {ct}, EM {name}", res, ct, xte, xte_n, holes, time.perf_counter() - t0
            )
            rows.append(row)
            log.write(event="fit", **row)
    return rows, examples


def _label_rows(cfg, key, xtr, ytr, xte, yte, log):
    """Semi-supervised fits, one per labelled fraction; test accuracy of the components."""
    rows, rng, ct = [], np.random.default_rng(cfg.seed + 1), cfg.label_covariance_type
    for frac in cfg.label_fractions:
        labels = np.where(rng.random(len(ytr)) < frac, ytr, -1)
        t0 = time.perf_counter()
        kw = dict(reg_covar=cfg.reg_covar, max_iter=cfg.max_iter, tol=cfg.tol, labels=labels)
        res = jax.block_until_ready(gmm.fit(key, xtr, cfg.num_components, covariance_type=ct, **kw))
        pred = np.asarray(gmm.predict(res.params, jnp.asarray(xte), covariance_type=ct))
        row = dict(labelled_fraction=frac, num_labelled=int(np.sum(labels >= 0)))
        row.update(test_accuracy=float(np.mean(pred == yte)), num_iter=int(res.num_iter))
        rows.append(dict(row, seconds=time.perf_counter() - t0))
        log.write(event="labels", **rows[-1])
    return rows


def main(cfg: Config) -> dict:
    """Runs (a) and (b), writes results.json, report.md and the figures; returns the results."""
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    jax.config.update("jax_enable_x64", True)
    started = time.perf_counter()
    key = jax.random.key(cfg.seed)
    xtr, ytr, xte, yte = _split(cfg)
    results = {"data": f"digits 0..16, {len(xtr)} train / {len(xte)} test", "missing": {}}
    with runs.MetricsLog(workdir) as log:
        for frac in cfg.fractions:
            rng = np.random.default_rng([cfg.seed, round(1000 * frac)])  # same mask in any run
            xtr_n, xte_n = _remove(rng, xtr, frac), _remove(rng, xte, frac)
            rows, examples = _missing_rows(cfg, key, xte, xtr_n, xte_n, log)
            results["missing"][str(frac)] = rows
            print(_table(rows, MISSING_COLUMNS), flush=True)
            if frac == max(cfg.fractions):
                first = {m: v[:10] for m, v in examples.items()}
                np.savez_compressed(
                    workdir / "examples.npz", truth=xte[:10], masked=xte_n[:10], **first
                )
        results["labels"] = _label_rows(cfg, key, xtr, ytr, xte, yte, log)
    results["wall_time_s"] = time.perf_counter() - started
    runs.write_json(workdir / "results.json", results)
    lines = [f"# Missing pixels and partial labels ({results['data']})", ""]
    for frac, rows in results["missing"].items():
        lines += [f"## {float(frac):.0%} of pixels missing", "", _table(rows, MISSING_COLUMNS), ""]
    lines += ["## Partial labels", "", _table(results["labels"], LABEL_COLUMNS)]
    runs.atomic_write_text(workdir / "report.md", "\n".join(lines) + "\n")
    plot(workdir)
    return results


def plot(workdir) -> list[Path]:
    """Imputed test digits (50% missing) and accuracy against the labelled fraction."""
    import json

    workdir = Path(workdir)
    plt = plotting.pyplot()
    ex = dict(np.load(workdir / "examples.npz"))
    names = ["truth", "masked"] + [k for k in ex if k not in ("truth", "masked")]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.1 * len(names)))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        grid = plotting.image_grid(ex[name], 1, len(ex[name]), background=16.0)
        cmap = plt.get_cmap("gray").with_extremes(bad="tab:red")  # missing pixels in red
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=16)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    written = [plotting.save(fig, workdir / FIGURES[0])]
    rows = json.loads((workdir / "results.json").read_text())["labels"]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.semilogx([r["labelled_fraction"] for r in rows], [r["test_accuracy"] for r in rows], "o-")
    ax.set_xlabel("fraction of training images labelled")
    ax.set_ylabel("test accuracy")
    written.append(plotting.save(fig, workdir / FIGURES[1]))
    return written


if __name__ == "__main__":
    runs.cli(Config, main, plot)
