r"""Hidden Markov models on digit rows and on known parameters, and the amortization gap.

Digits (8x8, in [0, 1]) as sequences of 8 rows of 8 pixels, split 1500/297 as digits-bin:
held-out log p(x) of a diagonal-Gaussian HMM against the number of states, Viterbi paths.
A ragged batch from a known 3-state 2-D Gaussian HMM: parameter errors after matching
states. The best digits model (MAP-EM, Dirichlet ``--concentration`` on pi and A) fixed, an
``hmm.ChainEncoder`` trained as its amortized E-step (``--gap-steps`` full-batch Adam steps at
``--gap-learning-rate``): log p(x) minus its exact ELBO, after ``--refine-steps`` (Adam 1e-2)
and ``--local-steps`` (Adam 0.1, cosine) local steps from its q, and after ``--local-steps``
from the uniform chain (the chain family holds the posterior: no approximation gap).

Usage: ``python experiments/hmm.py --workdir runs/hmm --overwrite``; ``... plot runs/hmm``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emvi import estep, hmm, plotting, runs
from emvi.data import load_digits

FIGURES = ("loglik_vs_states.png", "decoded.png", "synthetic_recovery.png", "gap_ranked.png")


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: Path = Path("runs/hmm")
    overwrite: bool = False
    seed: int = 0
    states: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)
    reg_covar: float = 1e-2
    """Added to the emission variances (pixels in [0, 1]; a blank pixel has variance 0)."""
    concentration: float = 1.01
    """Dirichlet concentration on the initial distribution and on each row of the transitions
    of the digits fits (MAP-EM). Above 1, every entry stays positive: a zero (which
    maximum-likelihood EM sets) gives every amortized chain q an ELBO of -inf."""
    num_init: int = 3
    max_iter: int = 200
    tol: float = 1e-4
    num_train: int | None = None
    """Use only this many training digits (None: all 1500; tests use fewer)."""
    decode_examples: int = 8
    synthetic_sequences: int = 50
    synthetic_max_length: int = 200
    gap_steps: int = 1000
    gap_hidden: tuple[int, ...] = (64, 64)
    gap_kernel_size: int = 3
    gap_learning_rate: float = 3e-3
    refine_steps: int = 10
    local_steps: int = 500
    """Adam steps (0.1, cosine decay) of the longer local E-step, from the encoder's q and from
    the uniform chain."""
    x64: bool = True


TRUE = hmm.HMMParams(
    np.array([0.6, 0.3, 0.1]),
    np.array([[0.90, 0.07, 0.03], [0.05, 0.90, 0.05], [0.10, 0.10, 0.80]]),
    hmm.GaussianParams(
        np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]),
        np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 0.5]], [[1.0, -0.3], [-0.3, 0.4]]]),
    ),
)


def _digits_sweep(cfg: Config, log: runs.MetricsLog, xtr, xte, yte):
    emission = hmm.Gaussian("diag")
    test_data = hmm.as_data(xte, emission=emission)
    prior = hmm.HMMHyper(cfg.concentration, cfg.concentration)
    rows, fits = [], []
    for k in cfg.states:
        t0 = time.perf_counter()
        res = hmm.fit(
            jax.random.key(cfg.seed + k), xtr, k, emission=emission, reg_covar=cfg.reg_covar,
            prior=prior, num_init=cfg.num_init, max_iter=cfg.max_iter, tol=cfg.tol,
        )  # fmt: skip
        jax.block_until_ready(res)
        test_ll, test_se = runs.mean_and_sem(hmm.log_prob(res.params, test_data, emission=emission))
        row = dict(
            states=k,
            train_log_likelihood=float(res.log_likelihood),
            test_log_likelihood=test_ll,
            test_stderr=test_se,
            num_iter=int(res.num_iter),
            converged=bool(res.converged),
            seconds=time.perf_counter() - t0,
        )
        log.write(part="digits", **row)
        print(f"[hmm] digits k={k}: test log p(x) {test_ll:.3f} ({row['num_iter']} it)", flush=True)
        rows.append(row)
        fits.append(res.params)
    best = max(range(len(rows)), key=lambda i: rows[i]["test_log_likelihood"])  # first if tied
    params, m = fits[best], cfg.decode_examples
    path, _ = hmm.viterbi(params, hmm.as_data(xte[:m], emission=emission), emission=emission)
    arrays = dict(decode_images=xte[:m], decode_labels=yte[:m], decode_paths=np.asarray(path))
    arrays.update(best_means=params.emission.means, best_transition=params.transition)
    return dict(rows=rows, best_states=rows[best]["states"]), arrays, params


def _synthetic(cfg: Config, log: runs.MetricsLog, dtype):
    emission = hmm.Gaussian("full")
    true = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), TRUE)
    n, t = cfg.synthetic_sequences, cfg.synthetic_max_length
    key_x, key_len, key_fit = jax.random.split(jax.random.key(cfg.seed + 1000), 3)
    x, z = (np.asarray(a) for a in hmm.sample(key_x, true, n, t, emission=emission))
    lengths = np.asarray(jax.random.randint(key_len, (n,), t // 4, t + 1))
    res = hmm.fit(
        key_fit, x, 3, emission=emission, lengths=lengths, num_init=cfg.num_init,
        max_iter=cfg.max_iter, tol=cfg.tol,
    )  # fmt: skip
    rep = hmm.recovery_report(res.params, true, x, z, lengths, emission=emission)
    out = dict(
        num_sequences=n,
        total_steps=int(lengths.sum()),
        max_abs_error=rep.max_abs_error,
        fitted_log_likelihood=float(res.log_likelihood),
        true_params_log_likelihood=rep.true_log_likelihood,
        viterbi_state_accuracy=rep.state_accuracy,
        num_iter=int(res.num_iter),
    )
    log.write(part="synthetic", **out)
    first, e = slice(0, lengths[0]), rep.params.emission
    arrays = dict(syn_x=x[0, first], syn_z=z[0, first], syn_path=rep.paths[0, first])
    arrays.update(syn_means=e.means, syn_cov=e.covariances)
    return dict(out, fitted_transition=np.asarray(rep.params.transition).tolist()), arrays


def _gap(cfg: Config, log: runs.MetricsLog, params, xtr, xte) -> dict:
    """Exact log p(x) minus the ELBO of the encoder's chain q, before and after local steps
    from it, and of a local E-step from the uniform chain (no encoder)."""
    emission = hmm.Gaussian("diag")
    mdl = hmm.model(emission)
    r, m = cfg.refine_steps, cfg.local_steps
    decay = optax.adam(optax.cosine_decay_schedule(0.1, m))
    local = {f"refined_{r}": estep.local(mdl, optimizer=optax.adam(1e-2), num_steps=r)}
    local[f"refined_{m}"] = estep.local(mdl, optimizer=decay, num_steps=m)
    key = jax.random.key(cfg.seed + 2000)
    train = hmm.make_batch(xtr, emission=emission)
    amortized, state = hmm.fit_chain_encoder(
        key, params, train, emission=emission, hidden=cfg.gap_hidden,
        kernel_size=cfg.gap_kernel_size, num_steps=cfg.gap_steps,
        learning_rate=cfg.gap_learning_rate,
    )  # fmt: skip
    k = int(params.initial.shape[0])
    out, arrays = dict(states=k), {}
    for split, batch in (("train", train), ("test", hmm.make_batch(xte, emission=emission))):
        q = jax.jit(amortized.q_of)(state.variables, batch)
        gaps = hmm.inference_gaps(key, params, q, batch, local, emission=emission)
        zeros = jnp.zeros((*batch.data.mask.shape, k + k * k), q.marginals.dtype)
        uniform = hmm.chain_posterior(zeros)
        gaps[f"local_{m}"] = hmm.inference_gaps(
            key, params, uniform, batch, {"local": local[f"refined_{m}"]}, emission=emission
        )["local"]
        row = {}
        arrays.update({f"gap_{split}_{name}": g for name, g in gaps.items()})
        for name, g in gaps.items():
            row[f"gap_{name}"], row[f"gap_{name}_stderr"] = runs.mean_and_sem(g)
            row[f"gap_{name}_median"] = float(np.median(g))
            row[f"gap_{name}_above_1"] = float(np.mean(g > 1.0))
        log.write(part="gap", split=split, **row)
        print(f"[hmm] gap {split}: " + ", ".join(f"{n} {g.mean():.3f}" for n, g in gaps.items()))
        out[split] = row
    return out, arrays


def main(cfg: Config) -> dict:
    """Runs the three parts, writes the run folder and returns ``results.json``'s content."""
    jax.config.update("jax_enable_x64", cfg.x64)
    dtype = np.float64 if cfg.x64 else np.float32
    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    x, y = load_digits(np.float64)
    perm = np.random.default_rng(0).permutation(x.shape[0])  # the digits-bin split
    seq = (x / 16.0).reshape(-1, 8, 8).astype(dtype)
    xtr, xte, yte = seq[perm[: cfg.num_train or 1500]], seq[perm[1500:]], y[perm[1500:]]
    with runs.MetricsLog(workdir) as log:
        digits, a1, best = _digits_sweep(cfg, log, xtr, xte, yte)
        synthetic, a2 = _synthetic(cfg, log, dtype)
        gap, a3 = _gap(cfg, log, best, xtr, xte)
    results = dict(digits=digits, synthetic=synthetic, gap=gap)
    runs.write_json(workdir / "results.json", results)
    np.savez(workdir / "arrays.npz", **a1, **a2, **a3)
    plot(workdir)
    return results


def plot(workdir) -> list[Path]:
    """Remakes every figure from ``results.json`` and ``arrays.npz`` (no refitting)."""
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    a = np.load(workdir / "arrays.npz")
    fig = plotting.train_test_figure(
        results["digits"]["rows"], "states", "log_likelihood", test_label="held out (297 digits)"
    )
    fig.axes[0].set(xlabel="number of states k", ylabel="log p(x) per digit (nats)")
    fig.axes[0].set_title("Digits as 8 rows of 8 pixels: Gaussian-diag HMM")
    titles = [f"digit {y}" for y in a["decode_labels"]]
    k = a["best_means"].shape[0]
    decoded = plotting.image_state_strips(
        a["decode_images"], a["decode_paths"], titles, num_states=k, ylabel="Viterbi state\nper row"
    )
    acc = results["synthetic"]["viterbi_state_accuracy"]
    recovery = plotting.decoded_states_figure(
        a["syn_x"],
        a["syn_z"],
        a["syn_path"],
        np.asarray(TRUE.emission.means),
        a["syn_means"],
        title=f"decoded states (accuracy over all sequences {acc:.3f})",
    )
    names = [key.removeprefix("gap_test_") for key in a.files if key.startswith("gap_test_")]
    floor = 1e-6

    def label(name):  # amortized, refined_<steps>, local_<steps>
        kind, _, steps = name.partition("_")
        texts = dict(refined=f"encoder q + {steps} local steps", amortized="encoder q")
        return texts.get(kind, f"{steps} local steps from the uniform chain")

    ranked = plotting.ranked_values_figure(
        {label(n): np.maximum(np.sort(a[f"gap_test_{n}"])[::-1], floor) for n in names},
        xlabel="held-out digit (sorted by its gap)",
        ylabel=f"log p(x) - ELBO(q) (nats; shown >= {floor:g})",
    )
    ranked.axes[0].set_title(f"Chain q for the {k}-state HMM: per-digit gaps")
    figs = (fig, decoded, recovery, ranked)
    return [plotting.save(f, workdir / name) for f, name in zip(figs, FIGURES, strict=True)]


if __name__ == "__main__":
    runs.cli(Config, main, plot)
