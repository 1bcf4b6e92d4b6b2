"""The user-defined Poisson mixture of docs/examples proves the protocol: it runs in all six
cells of the grid, and its closed forms match independent oracles.

The example is loaded from its file (it is documentation, not a package module).
Tolerances (float64): the closed forms are compared with SciPy / NumPy to 1e-12 relative
(a few dozen float64 terms per entry, so ~1e-14 rounding); the M-step with the root of the
objective's derivative found by SciPy's ``brentq`` to ``rtol=1e-14``, hence 1e-12; the bound
checks allow 1e3 ulps of the log-likelihood (sums of 40 terms).
"""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize, stats

from emvi import em, estep, grid

PATH = Path(__file__).resolve().parents[1] / "docs" / "examples" / "poisson_mixture.py"
_spec = importlib.util.spec_from_file_location("poisson_mixture", PATH)
pm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pm)

MODEL = pm.model()
RATES = np.array([[1.0, 6.0, 2.0], [7.0, 1.0, 3.0]])


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, n)
    return jnp.asarray(rng.poisson(RATES[z]).astype(np.float64))


X = _data()
THETA0 = pm.init_params(jax.random.key(0), X, 2)
PRIOR = pm.GammaPrior(2.0, 0.5)


def test_the_example_stays_well_under_a_hundred_lines():
    assert len(PATH.read_text().splitlines()) < 100


def test_log_joint_and_posterior_match_scipy():
    lj = np.asarray(pm.log_joint(THETA0, X))
    w, lam = np.asarray(THETA0.weights), np.asarray(THETA0.rates)
    x = np.asarray(X)
    ref = np.log(w)[None, :] + stats.poisson.logpmf(x[:, None, :], lam[None]).sum(-1)
    np.testing.assert_allclose(lj, ref, rtol=1e-12)
    post = np.exp(ref - ref.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    np.testing.assert_allclose(MODEL.posterior(THETA0, X), post, rtol=1e-12)
    # log p(x_i) by brute force: the sum over both components of the joint probability.
    np.testing.assert_allclose(MODEL.log_prob(THETA0, X), np.log(np.exp(ref).sum(1)), rtol=1e-12)


def test_e_step_is_expected_stats_at_the_posterior_plus_the_log_likelihood():
    w = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, X.shape[0]))
    s, ll = MODEL.e_step(THETA0, X, w)
    q = np.asarray(MODEL.posterior(THETA0, X))
    np.testing.assert_allclose(s[0], (w[:, None] * q).sum(0), rtol=1e-12)
    np.testing.assert_allclose(s[1], np.einsum("n,nk,nd->kd", w, q, X), rtol=1e-12)
    np.testing.assert_allclose(ll, np.sum(w * MODEL.log_prob(THETA0, X)), rtol=1e-12)


@pytest.mark.parametrize("prior", [None, PRIOR], ids=["ml", "gamma"])
def test_m_step_maximises_each_rate_like_scipy(prior):
    q = np.asarray(MODEL.posterior(THETA0, X))
    s = MODEL.expected_stats(jnp.asarray(q), X, jnp.ones(X.shape[0]))
    new = MODEL.m_step(s, prior)
    a, b = (1.0, 0.0) if prior is None else prior
    for k in range(2):
        for j in range(3):
            n_k, s_kj = float(s[0][k]), float(s[1][k, j])

            def score(lam, n_k=n_k, s_kj=s_kj):  # d/d lambda of the MAP objective
                return (s_kj + a - 1.0) / lam - (n_k + b)

            best = optimize.brentq(score, 1e-6, 50.0, xtol=1e-14, rtol=1e-14)
            assert float(new.rates[k, j]) == pytest.approx(best, rel=1e-12)
    np.testing.assert_allclose(new.weights, q.sum(0) / q.shape[0], rtol=1e-12)


def test_bijections_round_trip():
    back = MODEL.from_unconstrained(MODEL.to_unconstrained(THETA0))
    for a, b in zip(back, THETA0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    q = MODEL.posterior(THETA0, X)
    np.testing.assert_allclose(
        MODEL.q_from_unconstrained(MODEL.q_to_unconstrained(q)), q, rtol=1e-10, atol=1e-300
    )


# -- all six cells -------------------------------------------------------------------------

ENCODER = estep.default_encoder(MODEL, THETA0, X, hidden=(8,))
OPT = optax.adam(3e-2)
CELLS = grid.cells(MODEL, ENCODER, e_optimizer=OPT, m_optimizer=OPT, num_e_steps=2, num_m_steps=2)
NUM_ITERS = 5


@functools.cache
def _traces():
    """All six cells in one jitted program (one compilation), maximum likelihood."""

    @jax.jit
    def run(key, params, batch):
        return {
            c: grid.run_cell(key, cell, MODEL, params, batch, num_iters=NUM_ITERS)[1]
            for c, cell in CELLS.items()
        }

    return jax.tree_util.tree_map(
        np.asarray, run(jax.random.key(1), THETA0, estep.make_batch(MODEL, X))
    )


@pytest.mark.parametrize("cell", list(CELLS), ids=lambda c: "/".join(c))
def test_the_example_runs_in_every_cell(cell):
    ll, elbo = _traces()[cell].log_likelihood, _traces()[cell].elbo
    tol = 1e3 * np.finfo(np.float64).eps * np.max(np.abs(ll))
    assert np.all(np.isfinite(ll)) and np.all(np.isfinite(elbo))
    assert np.all(elbo <= ll + tol)
    assert elbo[-1] > elbo[0] + 1e-3
    if cell[0] == "exact":
        assert elbo[0] == pytest.approx(ll[0], abs=tol)
        assert np.all(np.diff(ll) >= -tol)  # EM and generalised EM, maximum likelihood


def test_run_corner_is_em_for_the_exact_closed_cell_and_times_its_steps():
    res = grid.run_corner(
        jax.random.key(1), CELLS[("exact", "closed")], MODEL, X, params=THETA0, num_iters=NUM_ITERS
    )
    h = res.history
    ref = em.fit(
        MODEL, jax.tree_util.tree_map(lambda a: a[None], THETA0), X, max_iter=NUM_ITERS, tol=0.0
    )
    # Same iterations, same arithmetic up to expected_stats(posterior) vs e_step (~1e-15).
    np.testing.assert_allclose(h.log_likelihood[:NUM_ITERS], ref.history, rtol=1e-9)
    np.testing.assert_allclose(res.params.rates, ref.params.rates, rtol=1e-9)
    np.testing.assert_allclose(
        h.log_likelihood, _traces()[("exact", "closed")].log_likelihood, rtol=1e-12
    )
    assert h.wall_time[0] == 0.0 and np.all(np.diff(h.wall_time) > 0)
    assert grid.time_to_reach(h, tol=np.inf) == 0.0
    with pytest.raises(ValueError, match="num_iters"):
        grid.run_corner(
            jax.random.key(1), CELLS[("exact", "closed")], MODEL, X, params=THETA0, num_iters=0
        )
