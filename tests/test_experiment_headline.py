"""The linear-Gaussian VAE (emvi/linear_vae.py) and the experiments built on it and on the
headline comparison: experiments/linear_vae_ppca.py and experiments/em_vs_vi.py.

The experiments are scripts, not package modules, so they are imported from their files.
The smoke tests run each ``main`` once on tiny settings (module-scoped fixtures) and
check the run folder; the property tests check the closed-form ELBO of the linear VAE.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emvi import linear_vae
from emvi.runs import load_script

ROOT = Path(__file__).resolve().parents[1]
N, D, L = 7, 5, 3


def _load(rel: str):
    return load_script(ROOT / rel)


def _random_params(key) -> linear_vae.LinearVAEParams:
    ks = jax.random.split(key, 5)
    f64 = jnp.float64
    return linear_vae.LinearVAEParams(
        encoder_weight=0.5 * jax.random.normal(ks[0], (L, D), f64),
        encoder_log_scale=0.5 * jax.random.normal(ks[1], (L,), f64),
        loadings=jax.random.normal(ks[2], (D, L), f64),
        mean=jax.random.normal(ks[3], (D,), f64),
        log_noise_variance=0.5 * jax.random.normal(ks[4], (), f64),
    )


def _data(key):
    return 2.0 * jax.random.normal(key, (N, D), jnp.float64)


# ---------------------------------------------------------------------------------------
# Closed-form ELBO of the linear VAE


@jax.jit
def _bound_and_oracles(key):
    k_p, k_x = jax.random.split(key)
    params, x = _random_params(k_p), _data(k_x)
    best = linear_vae.optimal_encoder(params)
    return (
        params,
        x,
        linear_vae.elbo(params, x),
        linear_vae.log_prob(params, x),
        linear_vae.elbo(best, x),
        linear_vae.optimal_encoder_gap(params),
    )


def _numpy_elbo(params, x):
    """float64 NumPy/SciPy oracle by another route than linear_vae.elbo's expected
    log-joint: ELBO = log p(x) - KL(q || p(z|x)), with log p(x) the density of
    N(mu, W W^T + sigma^2 I) and the exact posterior N(P W^T c / sigma^2, P),
    P = (I + W^T W / sigma^2)^{-1}."""
    from scipy.stats import multivariate_normal

    p = {k: np.asarray(v, np.float64) for k, v in params._asdict().items()}
    x = np.asarray(x, np.float64)
    w, mu, var = p["loadings"], p["mean"], np.exp(p["log_noise_variance"])
    c = x - mu
    log_px = multivariate_normal(mu, w @ w.T + var * np.eye(D)).logpdf(x)
    post_cov = np.linalg.inv(np.eye(L) + w.T @ w / var)
    post_mean = c @ w @ post_cov / var  # post_cov is symmetric
    q_mean, q_var = c @ p["encoder_weight"].T, np.exp(2 * p["encoder_log_scale"])
    prec = np.linalg.inv(post_cov)
    diff = post_mean - q_mean
    kl = 0.5 * (
        np.trace(prec @ np.diag(q_var))
        + np.einsum("ni,ij,nj->n", diff, prec, diff)
        - L
        + np.linalg.slogdet(post_cov)[1]
        - np.sum(np.log(q_var))
    )
    return log_px - kl


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1))
def test_elbo_is_below_log_likelihood_and_matches_the_numpy_oracle(seed):
    params, x, elbo, log_p, best_elbo, best_gap = _bound_and_oracles(jax.random.key(seed))
    # The oracle takes another route (log p(x) - KL to the exact posterior, SciPy density,
    # explicit inverses), all float64: agreement to rounding (values are O(10-100) and
    # these l x l matrices are well conditioned), so 1e-9 absolute.
    np.testing.assert_allclose(elbo, _numpy_elbo(params, x), rtol=0, atol=1e-9)
    assert np.all(elbo <= log_p + 1e-9)
    # The best diagonal q beats this q and leaves exactly the Hadamard gap, for every x.
    assert np.all(best_elbo >= elbo - 1e-9)
    assert best_gap >= 0
    np.testing.assert_allclose(log_p - best_elbo, np.full(N, best_gap), rtol=0, atol=1e-9)


@jax.jit
def _mc_draws(key, params, x):
    keys = jax.random.split(key, 4000)
    return jax.vmap(lambda k: linear_vae.mc_elbo(k, params, x, num_samples=1))(keys)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_analytic_elbo_equals_the_monte_carlo_estimate(seed):
    k_p, k_x, k_mc = jax.random.split(jax.random.key(seed), 3)
    params, x = _random_params(k_p), _data(k_x)
    draws = np.asarray(_mc_draws(k_mc, params, x))  # (m, n)
    m = draws.shape[0]
    estimate, sem = draws.mean(axis=0), draws.std(axis=0, ddof=1) / math.sqrt(m)
    exact = np.asarray(linear_vae.elbo(params, x))
    assert np.all(sem > 0)
    assert np.all(np.abs(estimate - exact) < 5 * sem), (estimate - exact) / sem


def test_elbo_is_tight_when_the_posterior_covariance_is_diagonal():
    k_p, k_x, k_q = jax.random.split(jax.random.key(3), 3)
    params, x = _random_params(k_p), _data(k_x)
    q, _ = jnp.linalg.qr(jax.random.normal(k_q, (D, L), jnp.float64))
    orthogonal = params._replace(loadings=q * jnp.array([3.0, 1.5, 0.7])[None, :])
    exact = linear_vae.optimal_encoder(orthogonal)
    np.testing.assert_allclose(
        linear_vae.elbo(exact, x), linear_vae.log_prob(exact, x), rtol=0, atol=1e-10
    )
    assert abs(float(linear_vae.optimal_encoder_gap(orthogonal))) < 1e-12
    # A rotation of z keeps log p(x) but not the diagonal posterior: the gap opens.
    c, s = math.cos(0.6), math.sin(0.6)
    rot = jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    rotated = linear_vae.optimal_encoder(orthogonal._replace(loadings=orthogonal.loadings @ rot))
    np.testing.assert_allclose(
        linear_vae.log_prob(rotated, x), linear_vae.log_prob(exact, x), rtol=0, atol=1e-10
    )
    gap = np.asarray(linear_vae.log_prob(rotated, x) - linear_vae.elbo(rotated, x))
    assert np.all(gap > 1e-2)


# ---------------------------------------------------------------------------------------
# experiments/linear_vae_ppca.py


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    exp = _load("experiments/linear_vae_ppca.py")
    workdir = tmp_path_factory.mktemp("linear_vae")
    cfg = exp.Config(
        workdir=workdir,
        num_points=300,
        latent_dim=3,
        adam_steps=300,
        learning_rate=0.05,
        lbfgs_steps=300,
        mc_steps=20,
        em_iters=20,
        log_every=100,
        progress=False,
    )
    return exp, cfg, exp.main(cfg)


@pytest.mark.slow
def test_linear_vae_experiment_reaches_the_ppca_optimum(linear_run):
    exp, cfg, res = linear_run
    keys = (
        "elbo_per_example",
        "ppca_log_likelihood_per_example",
        "vae_log_likelihood_per_example",
        "max_principal_angle",
        "adam_steps",
        "lbfgs_steps",
        "total_time_s",
    )
    for key in keys:
        assert math.isfinite(res[key]), key
    assert res["mc_elbo_run"]["steps"] == 20 and "ppca_em" in res
    # Even this short run reaches the closed-form optimum: the ELBO within 1e-3 nats of
    # the pPCA maximum (never above it), and the same principal subspace.
    gap = res["ppca_log_likelihood_per_example"] - res["elbo_per_example"]
    assert -1e-9 <= gap < 1e-3
    assert res["vae_log_likelihood_per_example"] <= res["ppca_log_likelihood_per_example"] + 1e-9
    assert res["max_principal_angle"] < 1e-2
    on_disk = json.loads((cfg.workdir / "results.json").read_text())
    assert on_disk["elbo_per_example"] == res["elbo_per_example"]
    for name in ("config.json", "metrics.jsonl", "params.npz", exp.FIGURE):
        assert (cfg.workdir / name).exists(), name
    with pytest.raises(ValueError, match="overwrite"):
        exp.main(cfg)


# ---------------------------------------------------------------------------------------
# experiments/em_vs_vi.py


@pytest.fixture(scope="module")
def headline_run(tmp_path_factory):
    exp = _load("experiments/em_vs_vi.py")
    workdir = tmp_path_factory.mktemp("em_vs_vi")
    cfg = exp.Config(
        workdir=workdir,
        components=(3,),
        beta_grid=(1.1, 2.0),
        validation_size=20,
        mixture_num_init=2,
        mixture_max_iter=15,
        trace_iters=3,
        vae_epochs=1,
        vae_hidden=(8,),
        vae_latent_dim=2,
        vae_num_classes=3,
        vae_batch_size=50,
        vae_eval_num_samples=4,
        vae_train_ll_points=10,
        max_train=100,
        max_test=20,
        progress=False,
    )
    return exp, cfg, exp.main(cfg)


def test_headline_writes_every_number_figure_and_the_report(headline_run):
    exp, cfg, res = headline_run
    names = [m["method"] for m in res["methods"]]
    assert len(names) == 3 and sum(m["family"] == "vi" for m in res["methods"]) == 2
    numeric = (
        "test_log_likelihood",
        "test_elbo",
        "test_gap",
        "train_log_likelihood",
        "train_elbo",
        "train_gap",
        "fit_time_s",
    )
    for m in res["methods"]:
        for key in numeric:
            assert math.isfinite(m[key]), (m["method"], key)
        # Every ELBO is a lower bound (the Gaussian VAE's MC ELBO and IWAE estimate are
        # both noisy, so allow slack there; EM's bound is tight at the exact posterior).
        slack = 1.0 if m.get("kind") == "gaussian" else 1e-4
        assert m["test_gap"] > -slack and m["train_gap"] > -slack, m
        if m["family"] == "em":
            assert abs(m["test_gap"]) < 1e-4 and abs(m["train_gap"]) < 1e-4
    report = (cfg.workdir / "report.md").read_text()
    for name in names:
        assert name in report
    for fig in exp.FIGURES:
        assert (cfg.workdir / fig).exists(), fig
        assert f"]({fig})" in report
    assert "from Python" in report  # not run from the command line: no made-up command
    rows = [json.loads(line) for line in (cfg.workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} >= {"prior_selection", "mixture_em", "em_trace", "summary"}
    with pytest.raises(ValueError, match="overwrite"):
        exp.main(cfg)


def test_headline_trace_alternates_tight_and_open_bounds(headline_run):
    _exp, cfg, _ = headline_run
    arrays = np.load(cfg.workdir / "figures.npz")
    ll, elbo = arrays["trace_log_likelihood"], arrays["trace_elbo"]
    # After each E-step the bound touches log p(x); after each M-step it lies below.
    np.testing.assert_allclose(elbo[:, 0], ll[:, 0], rtol=0, atol=1e-4)
    assert np.all(elbo[:, 1] <= ll[:, 1] + 1e-4)
