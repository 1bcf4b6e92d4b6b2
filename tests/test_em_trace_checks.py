"""em.trace_checks: the invariants of an EM half-step trace, as numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emvi import em, gmm


def test_trace_checks_reads_each_invariant_off_a_hand_made_trace():
    ll = np.array([[-3.0, -2.0], [-2.1, -1.5], [-1.5, -1.4]])  # falls by 0.1 at the 2nd E-step
    elbo = np.array([[-3.0, -2.5], [-2.1, -2.2], [-1.5 - 1e-3, -1.45]])
    checks = em.trace_checks(em.EMTrace(ll, elbo, ll - elbo, None))
    assert checks["max_abs_gap_after_e_step"] == pytest.approx(1e-3, rel=1e-9)
    assert checks["min_kl_after_m_step"] == pytest.approx(0.05, rel=1e-9)
    assert checks["min_log_likelihood_increase"] == pytest.approx(-0.1, rel=1e-9)
    assert checks["min_elbo_increase_in_m_step"] == pytest.approx(-0.1, rel=1e-9)


def test_trace_checks_of_maximum_likelihood_gmm_em_hold():
    x = jax.random.normal(jax.random.key(0), (80, 2), jnp.float64)
    x = x.at[:40].add(3.0)
    x = x - jnp.mean(x, axis=0)[None, :]
    model = gmm.model("full")
    p0 = gmm.init_params(jax.random.key(1), x, 2, covariance_type="full", method="random")
    hyper = gmm.GMMHyper(jnp.asarray(1e-6, jnp.float64))
    checks = em.trace_checks(em.em_trace(model, p0, model.prepare(x), num_iter=6, hyper=hyper))
    # Exact E-step: the bound touches to float64 rounding of O(1) means (~1e-15).
    assert checks["max_abs_gap_after_e_step"] < 1e-12
    # KL >= 0 and ML-EM never lowers the likelihood or (in its M-step) the ELBO, up to rounding.
    for name in (
        "min_kl_after_m_step",
        "min_log_likelihood_increase",
        "min_elbo_increase_in_m_step",
    ):
        assert checks[name] > -1e-12, name
