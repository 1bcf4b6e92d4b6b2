r"""A linear-Gaussian VAE trained by gradient reaches the pPCA maximum likelihood.

The VAE is one cell of the grid (``emvi.grid``): the amortized E-step with
``emvi.linear_vae.LinearEncoder`` (:math:`q(z \mid x) = \mathcal N(Ax + b, S)`, S a learned
constant) and the gradient M-step on the pPCA decoder (``emvi.linear_gaussian``,
isotropic noise), stepped jointly. Its ELBO is in closed form, so training is deterministic:
full-batch Adam (cosine-decayed rate), then L-BFGS (``emvi.optim.run_lbfgs``) on the same
objective. Measured on the digits / 16 in float64 (Lucas et al., 2019, predict both gaps
vanish): the ELBO and exact log p(x) against the closed-form pPCA optimum, the largest
principal angle between span(W_vae) and span(W_ml); optionally the same VAE on a one-sample
Monte Carlo ELBO, and pPCA by EM. Run folder: ``config.json``, ``metrics.jsonl``,
``results.json``, ``params.npz`` and ``linear_vae_ppca.png``.

Usage::

    python experiments/linear_vae_ppca.py --workdir runs/linear_vae --overwrite
    python experiments/linear_vae_ppca.py plot runs/linear_vae     # remake the figure
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from emvi import plotting, runs

FIGURE = "linear_vae_ppca.png"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the linear-VAE / pPCA experiment (every field is a flag)."""

    workdir: Path = Path("runs/linear_vae_ppca")
    """Run folder; refused if it exists and is not empty, unless --overwrite."""
    overwrite: bool = False
    """Delete an existing run folder first."""
    seed: int = 0
    latent_dim: int = 10
    """l, the latent dimension (and the number of principal components)."""
    encoder_covariance: str = "diagonal"
    """q's constant covariance: 'diagonal' (Lucas et al.'s family) or 'full' (contains the
    exact posterior)."""
    num_points: int | None = None
    """Use only the first this many digits (None: all 1797); for tests."""
    adam_steps: int = 3000
    """Full-batch Adam steps on the closed-form ELBO."""
    learning_rate: float = 0.02
    """Adam's initial rate, decayed to 1% by a cosine schedule."""
    lbfgs_steps: int = 1000
    """The most L-BFGS steps after Adam (0: Adam only)."""
    lbfgs_grad_tol: float = 1e-9
    """Stop L-BFGS once the gradient norm of the mean negative ELBO is below this."""
    mc_steps: int = 3000
    """Adam steps on the one-sample Monte Carlo ELBO from the same start (0: skip)."""
    mc_samples: int = 1
    """Monte Carlo samples per example and step in the MC run."""
    em_iters: int = 2000
    """The most EM iterations for pPCA by EM (0: skip)."""
    log_every: int = 50
    """Steps between rows of metrics.jsonl (and chunks of the on-device loops)."""
    progress: bool = True
    plots: bool = True


def main(cfg: Config) -> dict:
    """Trains the linear VAE, compares it with pPCA, writes the run folder; returns results."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax
    import scipy.linalg
    from tqdm.auto import tqdm

    from emvi import em, estep, grid, linear_vae, mstep, optim, ppca
    from emvi import linear_gaussian as lg
    from emvi.data import load_digits

    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    x_np = (load_digits(np.float64)[0] / 16.0)[: cfg.num_points]
    x = jnp.asarray(x_np)
    n, d = x.shape
    key_init, key_mc, key_em = jax.random.split(jax.random.key(cfg.seed), 3)
    times = {}

    tic = time.perf_counter()
    ml = ppca.closed_form_ml(x, cfg.latent_dim)
    ml_ll = float(jnp.mean(ppca.log_prob(ml, x)))
    times["closed_form_time_s"] = time.perf_counter() - tic
    w_ml = np.asarray(ml.loadings)

    def angles(w):
        return scipy.linalg.subspace_angles(np.asarray(w), w_ml)

    log = runs.MetricsLog(workdir)
    results: dict = {
        "data": f"sklearn digits / 16, first {n} of 1797"
        if cfg.num_points
        else "sklearn digits / 16",
        "num_points": n,
        "data_dim": d,
        "latent_dim": cfg.latent_dim,
        "encoder_covariance": cfg.encoder_covariance,
        "ppca_log_likelihood_per_example": ml_ll,
        "ppca_noise_variance": float(ml.noise_variance),
        "closed_form_time_s": times["closed_form_time_s"],
    }

    def record(phase, step, values, **extra):
        e, ll = (float(v) for v in values)
        log.write(phase=phase, step=step, elbo=e, log_likelihood=ll, **extra)
        return e, ll

    # The VAE as a cell of the grid: amortized E-step (linear encoder) + gradient M-step on
    # the pPCA decoder, one joint Adam step per iteration on (encoder, unconstrained theta).
    model = lg.model("isotropic")
    batch = estep.make_batch(model, x)
    encoder = linear_vae.LinearEncoder(
        cfg.latent_dim,
        diagonal=cfg.encoder_covariance == "diagonal",
        data_variance=float(jnp.mean(jnp.var(x, axis=0))),
        centre=tuple(float(v) for v in x_np.mean(axis=0)),
    )
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.adam_steps, 1), alpha=0.01)
    adam = optax.adam(schedule)
    cell = grid.Cell(
        estep.amortized(model, encoder, optimizer=adam),
        mstep.gradient(model, optimizer=adam),
        grid.Joint(),
    )
    e_piece, m_piece = cell.estep, cell.mstep

    def cell_loss(vu):
        """Minus the cell's objective J (the mean ELBO) at encoder v and theta(u)."""
        v, u = vu
        return -m_piece.objective(m_piece.from_variables(u), e_piece.q_of(v, batch), batch, None)

    @jax.jit
    def evaluate_cell(vu):
        v, u = vu
        theta = m_piece.from_variables(u)
        q = e_piece.q_of(v, batch)
        return estep.mean_elbo(model, theta, q, batch), em.mean_log_prob(
            model, theta, batch.data, batch.weights
        )

    # Phase 1: Adam through the cell (emvi.grid.run_corner), cosine-decayed rate.
    total = cfg.adam_steps + cfg.lbfgs_steps + cfg.mc_steps
    bar = tqdm(total=total, desc="linear VAE", disable=not cfg.progress, mininterval=1.0)
    init = linear_vae.init_params(key_init, x, cfg.latent_dim)
    theta0 = linear_vae.decoder(init)  # W ~ N(0, 0.01 v), mu = 0, sigma^2 = v
    tic = time.perf_counter()
    if cfg.adam_steps > 0:
        res = grid.run_corner(key_init, cell, model, x, params=theta0, num_iters=cfg.adam_steps)
        state, hist = res.state, res.history
        for step in range(0, cfg.adam_steps + 1, cfg.log_every):
            record("adam", step, (hist.elbo[step], hist.log_likelihood[step]))
        bar.update(cfg.adam_steps)
    else:
        state = jax.jit(cell.init)(key_init, theta0, batch)
    vu = (state.e.variables, m_piece.to_variables(state.m.params))
    if cfg.adam_steps % cfg.log_every:
        record("adam", cfg.adam_steps, evaluate_cell(vu))
    times["adam_time_s"] = time.perf_counter() - tic
    adam_elbo = float(evaluate_cell(vu)[0])

    # Phase 2: L-BFGS on the same cell objective, from where Adam stopped.
    tic = time.perf_counter()
    lbfgs_steps, grad_norm = 0, float("nan")
    if cfg.lbfgs_steps > 0:
        lbfgs = optax.lbfgs()
        opt_state = lbfgs.init(vu)
        chunk, tol = min(cfg.log_every, cfg.lbfgs_steps), cfg.lbfgs_grad_tol
        run = jax.jit(lambda p, s: optim.run_lbfgs(cell_loss, lbfgs, p, s, chunk, grad_tol=tol))
        while lbfgs_steps < cfg.lbfgs_steps:
            vu, opt_state, steps, gnorm = run(vu, opt_state)
            steps, grad_norm = int(steps), float(gnorm)
            lbfgs_steps += steps
            step = cfg.adam_steps + lbfgs_steps
            e, _ = record("lbfgs", step, evaluate_cell(vu), grad_norm=grad_norm)
            bar.update(steps)
            bar.set_postfix(elbo=f"{e:.6f}", gap=f"{ml_ll - e:.2e}", grad=f"{grad_norm:.1e}")
            if grad_norm < cfg.lbfgs_grad_tol or steps == 0:
                break
    times["lbfgs_time_s"] = time.perf_counter() - tic
    bar.update(cfg.lbfgs_steps - lbfgs_steps)

    elbo_pe, vae_ll = (float(v) for v in evaluate_cell(vu))
    theta = m_piece.from_variables(vu[1])
    w_vae = np.asarray(theta.loadings)
    gram = w_vae.T @ w_vae
    off = gram - np.diag(np.diag(gram))
    results.update(
        elbo_per_example=elbo_pe,
        vae_log_likelihood_per_example=vae_ll,
        elbo_gap_to_ppca=ml_ll - elbo_pe,
        log_likelihood_gap_to_ppca=ml_ll - vae_ll,
        vae_elbo_gap=vae_ll - elbo_pe,
        max_principal_angle=float(np.max(angles(w_vae))),
        principal_angles=np.sort(angles(w_vae))[::-1],
        vae_noise_variance=float(theta.noise_variance),
        loadings_gram_offdiag_relative=float(np.linalg.norm(off) / np.linalg.norm(gram)),
        optimal_encoder_gap=float(linear_vae.diagonal_family_gap(theta)),
        adam_steps=cfg.adam_steps,
        adam_elbo_per_example=adam_elbo,
        adam_time_s=times["adam_time_s"],
        lbfgs_steps=lbfgs_steps,
        lbfgs_final_grad_norm=grad_norm,
        lbfgs_time_s=times["lbfgs_time_s"],
        optimizer=f"Adam({cfg.learning_rate}, cosine to 1%) x {cfg.adam_steps} through "
        "grid.Cell(amortized linear encoder, gradient M-step, Joint), then optax.lbfgs on "
        "the cell's objective",
    )

    # Phase 3 (optional): the same VAE on the reparameterised one-sample MC ELBO.
    saved = {"w_vae": w_vae, "w_ml": w_ml}
    evaluate = jax.jit(
        lambda p: (jnp.mean(linear_vae.elbo(p, x)), jnp.mean(linear_vae.log_prob(p, x)))
    )
    if cfg.mc_steps > 0:
        tic = time.perf_counter()
        chunk = max(1, min(cfg.log_every, cfg.mc_steps))
        mc_opt = optax.adam(
            optax.cosine_decay_schedule(cfg.learning_rate, cfg.mc_steps, alpha=0.01)
        )

        def mc_loss(p, t):
            k = jax.random.fold_in(key_mc, t)
            return -jnp.mean(linear_vae.mc_elbo(k, p, x, num_samples=cfg.mc_samples))

        run = jax.jit(lambda p, s, t0: optim.run_steps(mc_loss, mc_opt, p, s, chunk, step0=t0)[:2])
        mc_params, mc_state = init, mc_opt.init(init)
        record("mc_adam", 0, evaluate(mc_params))
        step = 0
        while step < cfg.mc_steps:
            mc_params, mc_state = run(mc_params, mc_state, step)
            step += chunk
            e, _ = record("mc_adam", step, evaluate(mc_params))
            bar.update(chunk)
            bar.set_postfix(mc_elbo=f"{e:.4f}", gap=f"{ml_ll - e:.2e}")
        mc_elbo, mc_ll = (float(v) for v in evaluate(mc_params))
        times["mc"] = time.perf_counter() - tic
        results["mc_elbo_run"] = {
            "steps": cfg.mc_steps,
            "samples_per_example": cfg.mc_samples,
            "elbo_per_example": mc_elbo,
            "vae_log_likelihood_per_example": mc_ll,
            "elbo_gap_to_ppca": ml_ll - mc_elbo,
            "max_principal_angle": float(np.max(angles(mc_params.loadings))),
            "time_s": times["mc"],
            "note": "ELBO and log p(x) evaluated in closed form at the MC-trained params",
        }
        saved["w_mc"] = np.asarray(mc_params.loadings)
    bar.close()

    # Phase 4 (optional): pPCA by EM, the exact-posterior corner of the same ELBO.
    if cfg.em_iters > 0:
        tic = time.perf_counter()
        em_fit = ppca.fit(key_em, x, cfg.latent_dim, max_iter=cfg.em_iters, tol=1e-10)
        em_ll = float(em_fit.log_likelihood)
        times["em"] = time.perf_counter() - tic
        results["ppca_em"] = {
            "log_likelihood_per_example": em_ll,
            "gap_to_closed_form": ml_ll - em_ll,
            "iterations": int(em_fit.num_iter),
            "converged": bool(em_fit.converged),
            "max_principal_angle": float(np.max(angles(em_fit.params.loadings))),
            "time_s": times["em"],
        }
    log.close()
    np.savez(workdir / "params.npz", **saved)
    results["total_time_s"] = sum(times.values())
    runs.write_json(workdir / "results.json", results)
    if cfg.plots:
        plot(workdir)
    return runs.to_jsonable(results)


def plot(workdir) -> list[Path]:
    """Draws ``linear_vae_ppca.png`` from ``metrics.jsonl`` and ``results.json``."""
    workdir = Path(workdir)
    rows = runs.read_metrics(workdir)
    res = json.loads((workdir / "results.json").read_text())
    ml = res["ppca_log_likelihood_per_example"]
    fig, (ax0, ax1) = plotting.pyplot().subplots(1, 2, figsize=(11, 4))
    names = {"adam": "Adam", "lbfgs": "L-BFGS", "mc_adam": "Adam, MC ELBO"}
    for i, (phase, name) in enumerate(names.items()):
        r = [row for row in rows if row["phase"] == phase]
        if not r:
            continue
        steps = np.array([row["step"] for row in r])
        for key, style, what in (("elbo", "-", "ELBO"), ("log_likelihood", "--", "log p(x)")):
            values = np.array([row[key] for row in r])
            label = f"{what} ({name})"
            ax0.plot(steps, values, style, color=f"C{i}", label=label)
            ax1.semilogy(steps, np.maximum(ml - values, 1e-12), style, color=f"C{i}", label=label)
    ax0.axhline(ml, color="k", lw=1, label="pPCA maximum (closed form)")
    ax0.set_ylim(ml - 2.0, ml + 0.2)
    ax0.set(xlabel="optimizer step", ylabel="nats per example")
    ax0.set_title(f"Linear-Gaussian VAE on digits (l={res['latent_dim']})")
    ax0.legend(fontsize=7, loc="lower right")
    ax1.axhline(1e-3, color="grey", lw=0.8, ls=":", label="1e-3 nats")
    ax1.set(xlabel="optimizer step", ylabel="pPCA maximum minus value (nats per example)")
    ax1.set_title(
        f"gap at the end: ELBO {res['elbo_gap_to_ppca']:.1e}, "
        f"angle {res['max_principal_angle']:.1e} rad",
        fontsize=9,
    )
    ax1.legend(fontsize=7)
    return [plotting.save(fig, workdir / FIGURE)]


if __name__ == "__main__":
    runs.cli(Config, main, plot)
