r"""Hidden Markov models by exact EM: the digits as sequences of rows, and known parameters.

* **Digits as sequences.** Each 8x8 digit of scikit-learn's set (``emvi.data.load_digits``)
  is read top to bottom as a sequence of 8 rows of 8 pixels (scaled to [0, 1]); the
  digits-bin permutation splits 1500 training from 297 held-out images. For each number of
  states an HMM with diagonal Gaussian emissions is fitted (``reg_covar`` keeps always-blank
  pixels proper) and the held-out log-likelihood per image (nats) is recorded: the curve of
  held-out log p(x) against k. The most likely state path (Viterbi) of a few held-out digits
  is drawn beside the images.
* **Parameter recovery.** Sequences of random lengths are sampled from a 3-state HMM with
  2-D Gaussian emissions (a ragged batch); a fit from k-means starts is matched to the truth
  by the permutation of states that best aligns the means (Hungarian), and the largest
  errors of pi, A, the means and the covariances are reported.

Run folder: ``config.json``, ``metrics.jsonl`` (one row per fit), ``results.json``,
``arrays.npz`` (what the figures need), ``loglik_vs_states.png``, ``decoded.png``,
``synthetic_recovery.png``.

Usage::

    python experiments/hmm.py --workdir runs/hmm --overwrite
    python experiments/hmm.py plot runs/hmm      # remake the figures
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from emvi import hmm, plotting, runs
from emvi.data import load_digits

FIGURES = ("loglik_vs_states.png", "decoded.png", "synthetic_recovery.png")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the HMM experiment (every field is a command-line flag)."""

    workdir: Path = Path("runs/hmm")
    """Run folder; refused if it exists and is not empty, unless --overwrite."""
    overwrite: bool = False
    seed: int = 0
    states: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)
    """Numbers of states fitted to the digit rows."""
    reg_covar: float = 1e-2
    """Added to the emission variances (pixels in [0, 1]; a blank pixel has variance 0)."""
    num_init: int = 3
    max_iter: int = 200
    tol: float = 1e-4
    """Stop when the mean log-likelihood per sequence changes by less than this."""
    num_train: int | None = None
    """Use only this many training digits (None: all 1500; tests use fewer)."""
    decode_examples: int = 8
    synthetic_sequences: int = 50
    synthetic_max_length: int = 200
    x64: bool = True


def _log(msg: str) -> None:
    print(f"[hmm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


TRUE = dict(
    initial=[0.6, 0.3, 0.1],
    transition=[[0.90, 0.07, 0.03], [0.05, 0.90, 0.05], [0.10, 0.10, 0.80]],
    means=[[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]],
    covariances=[[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 0.5]], [[1.0, -0.3], [-0.3, 0.4]]],
)


def _digits(cfg: Config, dtype):
    x, y = load_digits(np.float64)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    seq = (x / 16.0).reshape(-1, 8, 8).astype(dtype)
    train, test = perm[:1500], perm[1500:]
    if cfg.num_train is not None:
        train = train[: cfg.num_train]
    return seq[train], y[train], seq[test], y[test]


def _digits_sweep(cfg: Config, log: runs.MetricsLog, dtype) -> dict:
    xtr, _, xte, yte = _digits(cfg, dtype)
    emission = hmm.Gaussian("diag")
    test_data = hmm.as_data(xte, emission=emission)
    rows, best = [], None
    for k in cfg.states:
        t0 = time.perf_counter()
        res = hmm.fit(
            jax.random.key(cfg.seed + k), xtr, k, emission=emission, reg_covar=cfg.reg_covar,
            num_init=cfg.num_init, max_iter=cfg.max_iter, tol=cfg.tol,
        )  # fmt: skip
        jax.block_until_ready(res)
        test_ll = np.asarray(hmm.log_prob(res.params, test_data, emission=emission))
        row = dict(
            states=k,
            train_log_likelihood=float(res.log_likelihood),
            test_log_likelihood=float(test_ll.mean()),
            test_stderr=float(test_ll.std(ddof=1) / np.sqrt(test_ll.size)),
            num_iter=int(res.num_iter),
            converged=bool(res.converged),
            seconds=time.perf_counter() - t0,
        )
        log.write(part="digits", **row)
        _log(f"digits k={k}: test log p(x) {row['test_log_likelihood']:.3f} ({row['num_iter']} it)")
        rows.append(row)
        if best is None or row["test_log_likelihood"] > best[0]["test_log_likelihood"]:
            best = (row, res.params)
    row, params = best
    m = cfg.decode_examples
    path, _ = hmm.viterbi(params, hmm.as_data(xte[:m], emission=emission), emission=emission)
    arrays = dict(
        decode_images=xte[:m],
        decode_labels=yte[:m],
        decode_paths=np.asarray(path),
        best_means=np.asarray(params.emission.means),
        best_transition=np.asarray(params.transition),
    )
    return dict(rows=rows, best_states=row["states"]), arrays


def _synthetic(cfg: Config, log: runs.MetricsLog, dtype) -> tuple[dict, dict]:
    emission = hmm.Gaussian("full")
    true = hmm.HMMParams(
        jnp.asarray(TRUE["initial"], dtype),
        jnp.asarray(TRUE["transition"], dtype),
        hmm.GaussianParams(
            jnp.asarray(TRUE["means"], dtype), jnp.asarray(TRUE["covariances"], dtype)
        ),
    )
    n, t = cfg.synthetic_sequences, cfg.synthetic_max_length
    key_x, key_len, key_fit = jax.random.split(jax.random.key(cfg.seed + 1000), 3)
    x, z = hmm.sample(key_x, true, n, t, emission=emission)
    lengths = np.asarray(jax.random.randint(key_len, (n,), t // 4, t + 1))
    res = hmm.fit(
        key_fit, np.asarray(x), 3, emission=emission, lengths=lengths, num_init=cfg.num_init,
        max_iter=cfg.max_iter, tol=cfg.tol,
    )  # fmt: skip
    p = res.params
    means = np.asarray(p.emission.means)
    cost = ((means[:, None, :] - np.asarray(TRUE["means"])[None]) ** 2).sum(-1)
    rows_, cols = linear_sum_assignment(cost)
    order = rows_[np.argsort(cols)]  # fitted state matched to true state j
    err = dict(
        initial=float(np.abs(np.asarray(p.initial)[order] - TRUE["initial"]).max()),
        transition=float(
            np.abs(np.asarray(p.transition)[order][:, order] - TRUE["transition"]).max()
        ),
        means=float(np.abs(means[order] - TRUE["means"]).max()),
        covariances=float(
            np.abs(np.asarray(p.emission.covariances)[order] - TRUE["covariances"]).max()
        ),
    )
    data = hmm.as_data(np.asarray(x), lengths, emission=emission)
    true_ll = float(np.mean(np.asarray(hmm.log_prob(true, data, emission=emission))))
    path, _ = hmm.viterbi(p, data, emission=emission)
    path = np.asarray(path)
    mask = np.arange(t)[None, :] < lengths[:, None]
    inv = np.argsort(order)  # fitted -> true label
    accuracy = float(np.mean(inv[path[mask]] == np.asarray(z)[mask]))
    out = dict(
        num_sequences=n,
        total_steps=int(lengths.sum()),
        max_abs_error=err,
        fitted_log_likelihood=float(res.log_likelihood),
        true_params_log_likelihood=true_ll,
        viterbi_state_accuracy=accuracy,
        num_iter=int(res.num_iter),
        fitted_transition=np.asarray(p.transition)[order][:, order].tolist(),
    )
    log.write(part="synthetic", **{k: v for k, v in out.items() if k != "fitted_transition"})
    _log(f"synthetic: max |A - A*| = {err['transition']:.3f}, Viterbi accuracy {accuracy:.3f}")
    arrays = dict(
        syn_x=np.asarray(x)[0, : lengths[0]],
        syn_z=np.asarray(z)[0, : lengths[0]],
        syn_path=inv[path[0, : lengths[0]]],
        syn_means=means[order],
        syn_cov=np.asarray(p.emission.covariances)[order],
    )
    return out, arrays


def main(cfg: Config) -> dict:
    """Runs both parts, writes the run folder and returns ``results.json``'s content."""
    jax.config.update("jax_enable_x64", cfg.x64)
    dtype = np.float64 if cfg.x64 else np.float32
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    with runs.MetricsLog(workdir) as log:
        digits, a1 = _digits_sweep(cfg, log, dtype)
        synthetic, a2 = _synthetic(cfg, log, dtype)
    results = dict(digits=digits, synthetic=synthetic)
    runs.write_json(workdir / "results.json", results)
    np.savez(workdir / "arrays.npz", **a1, **a2)
    plot(workdir)
    return results


def _plot_loglik(workdir: Path, results: dict) -> Path:
    import matplotlib.pyplot as plt

    rows = results["digits"]["rows"]
    k = [r["states"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(k, [r["train_log_likelihood"] for r in rows], "o-", label="train")
    ax.errorbar(
        k, [r["test_log_likelihood"] for r in rows], yerr=[r["test_stderr"] for r in rows],
        fmt="s-", label="held out (297 digits)", capsize=3,
    )  # fmt: skip
    ax.set_xlabel("number of states k")
    ax.set_ylabel("log p(x) per digit (nats)")
    ax.set_title("Digits as 8 rows of 8 pixels: Gaussian-diag HMM")
    ax.legend()
    return plotting.save(fig, workdir / "loglik_vs_states.png")


def _plot_decoded(workdir: Path, arrays) -> Path:
    import matplotlib.pyplot as plt

    imgs, paths, labels = arrays["decode_images"], arrays["decode_paths"], arrays["decode_labels"]
    m = imgs.shape[0]
    k = arrays["best_means"].shape[0]
    fig, axes = plt.subplots(2, m, figsize=(1.3 * m, 3.2))
    cmap = plt.get_cmap("tab20", k)
    for i in range(m):
        axes[0, i].imshow(imgs[i], cmap="gray_r")
        axes[0, i].set_title(f"digit {labels[i]}", fontsize=8)
        axes[1, i].imshow(paths[i][:, None], cmap=cmap, vmin=-0.5, vmax=k - 0.5, aspect=0.25)
        for r, s in enumerate(paths[i]):
            axes[1, i].text(0, r, str(s), ha="center", va="center", fontsize=7)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("Viterbi state\nper row", fontsize=8)
    return plotting.save(fig, workdir / "decoded.png")


def _plot_synthetic(workdir: Path, arrays, results: dict) -> Path:
    import matplotlib.pyplot as plt

    x, z, path_ = arrays["syn_x"], arrays["syn_z"], arrays["syn_path"]
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw=dict(width_ratios=[1, 2]))
    a0.scatter(x[:, 0], x[:, 1], c=z, cmap="tab10", vmin=0, vmax=9, s=6)
    a0.scatter(*np.asarray(TRUE["means"]).T, marker="x", c="k", s=60, label="true means")
    a0.scatter(*arrays["syn_means"].T, marker="+", c="r", s=80, label="fitted means")
    a0.legend(fontsize=7)
    a0.set_title("sequence 1 (colour = true state)", fontsize=9)
    steps = np.arange(z.size)
    a1.step(steps, z, where="mid", label="true state")
    a1.step(steps, path_ + 0.1, where="mid", label="Viterbi (fitted, +0.1)")
    acc = results["synthetic"]["viterbi_state_accuracy"]
    a1.set_title(f"decoded states (accuracy over all sequences {acc:.3f})", fontsize=9)
    a1.set_xlabel("t")
    a1.set_yticks([0, 1, 2])
    a1.legend(fontsize=7)
    return plotting.save(fig, workdir / "synthetic_recovery.png")


def plot(workdir) -> list[Path]:
    """Remakes every figure from ``results.json`` and ``arrays.npz`` (no refitting)."""
    import matplotlib

    matplotlib.use("Agg")
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    arrays = np.load(workdir / "arrays.npz")
    return [
        _plot_loglik(workdir, results),
        _plot_decoded(workdir, arrays),
        _plot_synthetic(workdir, arrays, results),
    ]


if __name__ == "__main__":
    runs.cli(Config, main, plot)
