r"""A linear-Gaussian VAE trained by gradient reaches the pPCA maximum likelihood.

The VAE is one cell of the grid (``emvi.grid``): the amortized E-step with a linear encoder
(``emvi.linear_vae.LinearEncoder``: :math:`q(z \mid x) = \mathcal N(Ax + b, S)`, S a learned
constant, diagonal by default) and the gradient M-step on the pPCA decoder
(``emvi.linear_gaussian.model("isotropic")``: :math:`p(x \mid z) = \mathcal N(Wz + \mu,
\sigma^2 I)`, prior :math:`\mathcal N(0, I)`), stepped jointly (``grid.Joint``). The ELBO is
in closed form (``linear_gaussian.elbo``), so training is deterministic: full-batch Adam
with a cosine-decayed rate through the cell, then L-BFGS (``optax.lbfgs``) on the same
cell objective to a small gradient. Lucas, Tucker, Grosse & Norouzi (2019) predict
that the optimum is the pPCA maximum-likelihood solution and that the ELBO is *tight*
there (a rotation of z makes the exact posterior covariance diagonal). The experiment
measures, on the digits (1797 x 64, pixels / 16, float64):

* the ELBO and the exact :math:`\log p(x)` of the trained decoder against the
  closed-form pPCA optimum (``emvi.ppca.closed_form_ml``), in nats per example;
* the largest principal angle between span(W_vae) and span(W_ml) (W is identified only
  up to a rotation, so subspaces are compared, not matrices);
* optionally the same VAE trained on a one-sample Monte Carlo ELBO (Adam only), and
  pPCA fitted by EM (``emvi.ppca.fit``): the other corner of the same objective.

Run folder (``--workdir``): ``config.json``, ``metrics.jsonl`` (one row per logged step
of each phase), ``results.json``, ``params.npz`` (trained and ML parameters) and
``linear_vae_ppca.png``.

Usage::

    python experiments/linear_vae_ppca.py --workdir runs/linear_vae --overwrite
    python experiments/linear_vae_ppca.py plot runs/linear_vae     # remake the figure
"""

from __future__ import annotations

import dataclasses
import json
import sys
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


def load(cfg: Config) -> np.ndarray:
    """The digits as float64 in [0, 1] (pixel / 16)."""
    from emvi.data import load_digits

    x, _ = load_digits(np.float64)
    x = x / 16.0
    return x if cfg.num_points is None else x[: cfg.num_points]


def _adam_runner(loss_fn, optimizer, chunk):
    """A jitted ``(params, opt_state, key, start) -> (params, opt_state)`` running ``chunk``
    optimizer steps (``emvi.optim.run_steps``; ``loss_fn(params, key) -> scalar`` with the
    key folded with the global step)."""
    import jax

    from emvi.optim import run_steps

    @jax.jit
    def run(params, opt_state, key, start):
        def loss(p, t):
            return loss_fn(p, jax.random.fold_in(key, t))

        params, opt_state, _ = run_steps(loss, optimizer, params, opt_state, chunk, step0=start)
        return params, opt_state

    return run


def _lbfgs_runner(loss_fn, optimizer, chunk, grad_tol):
    """A jitted ``(params, opt_state) -> (params, opt_state, steps, grad_norm)``: up to
    ``chunk`` L-BFGS steps in a ``lax.while_loop``, stopping at ``grad_norm < grad_tol``."""
    import jax
    import jax.numpy as jnp
    import optax

    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    @jax.jit
    def run(params, opt_state):
        with jax.numpy_dtype_promotion("standard"):  # optax's L-BFGS mixes int32 and floats
            return _run(params, opt_state)

    def _run(params, opt_state):
        def norm(s):
            return optax.tree.norm(optax.tree.get(s, "grad"))

        def cond(carry):
            _, s, i = carry
            return (i < chunk) & ((i == 0) | (norm(s) >= grad_tol))

        def body(carry):
            p, s, i = carry
            value, grad = value_and_grad(p, state=s)
            updates, s = optimizer.update(grad, s, p, value=value, grad=grad, value_fn=loss_fn)
            return optax.apply_updates(p, updates), s, i + 1

        params, opt_state, steps = jax.lax.while_loop(
            cond, body, (params, opt_state, jnp.asarray(0))
        )
        return params, opt_state, steps, norm(opt_state)

    return run


def main(cfg: Config) -> dict:
    """Trains the linear VAE, compares it with pPCA, writes the run folder; returns results."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax
    import scipy.linalg
    from tqdm.auto import tqdm

    from emvi import em, estep, grid, linear_vae, mstep, ppca
    from emvi import linear_gaussian as lg

    workdir = runs.prepare_workdir(cfg.workdir, overwrite=cfg.overwrite)
    runs.write_config(workdir, cfg)
    x_np = load(cfg)
    x = jnp.asarray(x_np)
    n, d = x.shape
    l_ = cfg.latent_dim
    key_init, key_mc, key_em = jax.random.split(jax.random.key(cfg.seed), 3)

    tic = time.perf_counter()
    ml = ppca.closed_form_ml(x, l_)
    ml_ll = float(jnp.mean(ppca.log_prob(ml, x)))
    closed_form_time = time.perf_counter() - tic

    init = linear_vae.init_params(key_init, x, l_)
    evaluate = jax.jit(
        lambda p: (jnp.mean(linear_vae.elbo(p, x)), jnp.mean(linear_vae.log_prob(p, x)))
    )
    log = runs.MetricsLog(workdir)
    results: dict = {
        "data": f"sklearn digits / 16, first {n} of 1797"
        if cfg.num_points
        else "sklearn digits / 16",
        "num_points": n,
        "data_dim": d,
        "latent_dim": l_,
        "encoder_covariance": cfg.encoder_covariance,
        "ppca_log_likelihood_per_example": ml_ll,
        "ppca_noise_variance": float(ml.noise_variance),
        "closed_form_time_s": closed_form_time,
    }

    def record(phase, step, params, **extra):
        e, ll = (float(v) for v in evaluate(params))
        log.write(phase=phase, step=step, elbo=e, log_likelihood=ll, **extra)
        return e, ll

    # The VAE as a cell of the grid: amortized E-step (linear encoder) + gradient M-step on
    # the pPCA decoder, one joint Adam step per iteration on (encoder, unconstrained theta).
    model = lg.model("isotropic")
    batch = estep.make_batch(model, x)
    encoder = linear_vae.LinearEncoder(
        l_,
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

    def record_cell(phase, step, vu, **extra):
        e, ll = (float(v) for v in evaluate_cell(vu))
        log.write(phase=phase, step=step, elbo=e, log_likelihood=ll, **extra)
        return e, ll

    # Phase 1: Adam through the cell (emvi.grid.run_corner), cosine-decayed rate.
    total = cfg.adam_steps + cfg.lbfgs_steps + cfg.mc_steps
    bar = tqdm(total=total, desc="linear VAE", disable=not cfg.progress, mininterval=1.0)
    theta0 = linear_vae.decoder(init)  # W ~ N(0, 0.01 v), mu = 0, sigma^2 = v
    tic = time.perf_counter()
    if cfg.adam_steps > 0:
        res = grid.run_corner(key_init, cell, model, x, params=theta0, num_iters=cfg.adam_steps)
        state = res.state
        hist = res.history
        for step in range(0, cfg.adam_steps + 1, cfg.log_every):
            log.write(
                phase="adam",
                step=step,
                elbo=float(hist.elbo[step]),
                log_likelihood=float(hist.log_likelihood[step]),
            )
        bar.update(cfg.adam_steps)
    else:
        state = jax.jit(cell.init)(key_init, theta0, batch)
    vu = (state.e.variables, m_piece.to_variables(state.m.params))
    if cfg.adam_steps % cfg.log_every:
        record_cell("adam", cfg.adam_steps, vu)
    adam_time = time.perf_counter() - tic
    adam_elbo = float(evaluate_cell(vu)[0])

    # Phase 2: L-BFGS on the same cell objective, from where Adam stopped.
    tic = time.perf_counter()
    lbfgs_steps, grad_norm = 0, float("nan")
    if cfg.lbfgs_steps > 0:
        lbfgs = optax.lbfgs()
        opt_state = lbfgs.init(vu)
        run_lbfgs = _lbfgs_runner(
            cell_loss, lbfgs, min(cfg.log_every, cfg.lbfgs_steps), cfg.lbfgs_grad_tol
        )
        while lbfgs_steps < cfg.lbfgs_steps:
            vu, opt_state, steps, gnorm = run_lbfgs(vu, opt_state)
            steps, grad_norm = int(steps), float(gnorm)
            lbfgs_steps += steps
            e, _ = record_cell("lbfgs", cfg.adam_steps + lbfgs_steps, vu, grad_norm=grad_norm)
            bar.update(steps)
            bar.set_postfix(elbo=f"{e:.6f}", gap=f"{ml_ll - e:.2e}", grad=f"{grad_norm:.1e}")
            if grad_norm < cfg.lbfgs_grad_tol or steps == 0:
                break
    lbfgs_time = time.perf_counter() - tic
    bar.update(cfg.lbfgs_steps - lbfgs_steps)

    elbo_pe, vae_ll = (float(v) for v in evaluate_cell(vu))
    theta = m_piece.from_variables(vu[1])
    w_vae = np.asarray(theta.loadings)
    angles = scipy.linalg.subspace_angles(w_vae, np.asarray(ml.loadings))
    gram = w_vae.T @ w_vae
    off = gram - np.diag(np.diag(gram))
    results.update(
        elbo_per_example=elbo_pe,
        vae_log_likelihood_per_example=vae_ll,
        elbo_gap_to_ppca=ml_ll - elbo_pe,
        log_likelihood_gap_to_ppca=ml_ll - vae_ll,
        vae_elbo_gap=vae_ll - elbo_pe,
        max_principal_angle=float(np.max(angles)),
        principal_angles=np.sort(angles)[::-1],
        vae_noise_variance=float(theta.noise_variance),
        loadings_gram_offdiag_relative=float(np.linalg.norm(off) / np.linalg.norm(gram)),
        optimal_encoder_gap=float(linear_vae.diagonal_family_gap(theta)),
        adam_steps=cfg.adam_steps,
        adam_elbo_per_example=adam_elbo,
        adam_time_s=adam_time,
        lbfgs_steps=lbfgs_steps,
        lbfgs_final_grad_norm=grad_norm,
        lbfgs_time_s=lbfgs_time,
        optimizer=f"Adam({cfg.learning_rate}, cosine to 1%) x {cfg.adam_steps} through "
        "grid.Cell(amortized linear encoder, gradient M-step, Joint), then optax.lbfgs on "
        "the cell's objective",
    )

    # Phase 3 (optional): the same VAE on the reparameterised one-sample MC ELBO.
    saved = {"w_vae": w_vae, "w_ml": np.asarray(ml.loadings)}
    if cfg.mc_steps > 0:
        tic = time.perf_counter()
        mc_chunk = max(1, min(cfg.log_every, cfg.mc_steps))
        mc_schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.mc_steps, alpha=0.01)
        mc_opt = optax.adam(mc_schedule)

        def mc_loss(p, k):
            return -jnp.mean(linear_vae.mc_elbo(k, p, x, num_samples=cfg.mc_samples))

        run_mc = _adam_runner(mc_loss, mc_opt, mc_chunk)
        mc_params, mc_state = init, mc_opt.init(init)
        record("mc_adam", 0, mc_params)
        step = 0
        while step < cfg.mc_steps:
            mc_params, mc_state = run_mc(mc_params, mc_state, key_mc, step)
            step += mc_chunk
            e, _ = record("mc_adam", step, mc_params)
            bar.update(mc_chunk)
            bar.set_postfix(mc_elbo=f"{e:.4f}", gap=f"{ml_ll - e:.2e}")
        mc_elbo, mc_ll = (float(v) for v in evaluate(mc_params))
        mc_angles = scipy.linalg.subspace_angles(
            np.asarray(mc_params.loadings), np.asarray(ml.loadings)
        )
        results["mc_elbo_run"] = {
            "steps": cfg.mc_steps,
            "samples_per_example": cfg.mc_samples,
            "elbo_per_example": mc_elbo,
            "vae_log_likelihood_per_example": mc_ll,
            "elbo_gap_to_ppca": ml_ll - mc_elbo,
            "max_principal_angle": float(np.max(mc_angles)),
            "time_s": time.perf_counter() - tic,
            "note": "ELBO and log p(x) evaluated in closed form at the MC-trained params",
        }
        saved["w_mc"] = np.asarray(mc_params.loadings)
    bar.close()

    # Phase 4 (optional): pPCA by EM, the exact-posterior corner of the same ELBO.
    if cfg.em_iters > 0:
        tic = time.perf_counter()
        em_fit = ppca.fit(key_em, x, l_, max_iter=cfg.em_iters, tol=1e-10)
        em_ll = float(em_fit.log_likelihood)
        em_angles = scipy.linalg.subspace_angles(
            np.asarray(em_fit.params.loadings), np.asarray(ml.loadings)
        )
        results["ppca_em"] = {
            "log_likelihood_per_example": em_ll,
            "gap_to_closed_form": ml_ll - em_ll,
            "iterations": int(em_fit.num_iter),
            "converged": bool(em_fit.converged),
            "max_principal_angle": float(np.max(em_angles)),
            "time_s": time.perf_counter() - tic,
        }
    log.close()
    np.savez(workdir / "params.npz", **saved)
    results["total_time_s"] = (
        sum(results.get(k, 0.0) for k in ("closed_form_time_s", "adam_time_s", "lbfgs_time_s"))
        + results.get("mc_elbo_run", {}).get("time_s", 0.0)
        + results.get("ppca_em", {}).get("time_s", 0.0)
    )
    runs.write_json(workdir / "results.json", results)
    if cfg.plots:
        plot(workdir)
    return runs.to_jsonable(results)


def plot(workdir) -> Path:
    """Draws ``linear_vae_ppca.png`` from ``metrics.jsonl`` and ``results.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    rows = runs.read_metrics(workdir)
    res = json.loads((workdir / "results.json").read_text())
    ml = res["ppca_log_likelihood_per_example"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"adam": "C0", "lbfgs": "C1", "mc_adam": "C2"}
    for phase, colour in styles.items():
        r = [row for row in rows if row["phase"] == phase]
        if not r:
            continue
        steps = np.array([row["step"] for row in r])
        e = np.array([row["elbo"] for row in r])
        ll = np.array([row["log_likelihood"] for row in r])
        name = {"adam": "Adam", "lbfgs": "L-BFGS", "mc_adam": "Adam, MC ELBO"}[phase]
        ax0.plot(steps, e, "-", color=colour, label=f"ELBO ({name})")
        ax0.plot(steps, ll, "--", color=colour, label=f"log p(x) ({name})")
        ax1.semilogy(steps, np.maximum(ml - e, 1e-12), "-", color=colour, label=f"ELBO ({name})")
        ax1.semilogy(
            steps, np.maximum(ml - ll, 1e-12), "--", color=colour, label=f"log p(x) ({name})"
        )
    ax0.axhline(ml, color="k", lw=1, label="pPCA maximum (closed form)")
    ax0.set_ylim(ml - 2.0, ml + 0.2)
    ax0.set_xlabel("optimizer step")
    ax0.set_ylabel("nats per example")
    ax0.set_title(f"Linear-Gaussian VAE on digits (l={res['latent_dim']})")
    ax0.legend(fontsize=7, loc="lower right")
    ax1.axhline(1e-3, color="grey", lw=0.8, ls=":", label="1e-3 nats")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("pPCA maximum minus value (nats per example)")
    ax1.set_title(
        f"gap at the end: ELBO {res['elbo_gap_to_ppca']:.1e}, "
        f"angle {res['max_principal_angle']:.1e} rad",
        fontsize=9,
    )
    ax1.legend(fontsize=7)
    return plotting.save(fig, workdir / FIGURE)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "plot":
        print(plot(sys.argv[2]))
    else:
        import tyro

        out = main(tyro.cli(Config))
        print(json.dumps({k: v for k, v in out.items() if k != "principal_angles"}, indent=2))
