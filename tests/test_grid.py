"""The four corners of the EM / VI grid on small synthetic mixtures.

Runs are cached per (model, corner) so the suite compiles each step once. Tolerances:
float64 throughout; "never decreases" allows 1e-10 nats of rounding; the oracle comparisons
(perfect encoder vs exact posterior, many gradient steps vs closed form) use Adam with a
cosine-decayed step, which converges these small smooth problems to ~1e-12, so 1e-7 leaves
room for rounding on other machines while still failing on any wrong statistic.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emvi import bernoulli_mixture as bm
from emvi import em, gmm, grid
from emvi.data import synthetic_mixture
from emvi.elbo import categorical_kl
from emvi.nn import CategoricalEncoder

N, D, K = 60, 8, 3


@functools.cache
def _bernoulli_data():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.1, 0.9, (K, D))
    z = rng.integers(0, K, N)
    x = jnp.asarray((rng.uniform(size=(N, D)) < truth[z]).astype(np.float64))
    theta0 = bm.init_params(jax.random.key(0), x, K)
    return grid.bernoulli_mixture_model(), x, theta0, None


@functools.cache
def _gmm_data():
    x, _, _ = synthetic_mixture(0, N)
    x = jnp.asarray(x - x.mean(axis=0))  # the packed GMM E-step wants centred data
    theta0 = gmm.GMMParams(jnp.full((K,), 1.0 / K), x[:K], jnp.broadcast_to(jnp.eye(2), (K, 2, 2)))
    return grid.gmm_model("full"), x, theta0, gmm.GMMHyper(jnp.asarray(1e-6))


PRIOR = bm.BernoulliMixturePrior(1.0, 2.0, 2.0)


def _setup(name):
    return {"bernoulli": _bernoulli_data, "gmm": _gmm_data}[name]()


MODELS = ["bernoulli", "gmm"]
SETTINGS = {
    "em": {},
    "gem": {"num_theta_steps": 5, "theta_optimizer": optax.adam(2e-2)},
    "amortized_em": {"num_phi_steps": 5, "phi_optimizer": optax.adam(2e-2)},
    "vae": {"theta_optimizer": optax.adam(2e-2), "phi_optimizer": optax.adam(2e-2)},
}


@functools.cache
def _run(model_name, corner, schedule="joint", seed=1):
    model, x, theta0, hyper = _setup(model_name)
    return grid.run_corner(
        jax.random.key(seed),
        corner,
        model,
        x,
        params=theta0,
        num_iters=12,
        schedule=schedule,
        hyper=hyper,
        **SETTINGS[corner],
    )


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("corner", grid.CORNERS)
def test_every_corner_raises_the_elbo_which_stays_below_the_log_likelihood(model_name, corner):
    h = _run(model_name, corner).history
    assert h.elbo.shape == h.log_likelihood.shape == h.wall_time.shape == (13,)
    assert np.all(np.isfinite(h.elbo)) and np.all(np.isfinite(h.log_likelihood))
    assert h.elbo[-1] > h.elbo[0] + 0.05
    assert np.all(h.elbo <= h.log_likelihood + 1e-10)
    assert np.all(np.diff(h.wall_time) > 0) and h.wall_time[0] == 0.0
    if corner in ("em", "gem"):  # the first q is the exact posterior: the bound is tight
        assert h.elbo[0] == pytest.approx(h.log_likelihood[0], abs=1e-10)
    else:  # a fresh encoder is not the posterior
        assert h.elbo[0] < h.log_likelihood[0] - 1e-3


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("corner", ["em", "gem"])
def test_exact_e_step_corners_never_decrease_the_log_likelihood(model_name, corner):
    h = _run(model_name, corner).history
    assert np.all(np.diff(h.log_likelihood) >= -1e-10)
    # The M-step's ELBO (q_t, theta_{t+1}) is at least the previous likelihood (tight at t).
    assert np.all(h.elbo[1:] >= h.log_likelihood[:-1] - 1e-10)


def test_em_corner_equals_the_em_driver():
    model, x, theta0, _ = _setup("bernoulli")
    ours = _run("bernoulli", "em")
    ref = em.fit_em(model.exact, theta0, x, max_iter=12, tol=0.0)
    np.testing.assert_allclose(ours.history.log_likelihood[:-1], ref.history, rtol=1e-12)
    np.testing.assert_allclose(ours.params.probs, ref.params.probs, rtol=1e-10)


def test_perfect_encoder_makes_amortized_em_equal_em():
    # The Bernoulli mixture's posterior logits are linear in x, so a linear encoder contains
    # the exact posterior; run its E-step to convergence and compare the closed-form M-steps.
    model, x, theta0, _ = _setup("bernoulli")
    em_res = _run("bernoulli", "em")
    one_em = grid.run_corner(jax.random.key(0), "em", model, x, params=theta0, num_iters=1)
    res = grid.run_corner(
        jax.random.key(0),
        "amortized_em",
        model,
        x,
        params=theta0,
        num_iters=1,
        encoder=CategoricalEncoder(hidden=(), num_classes=K),
        phi_optimizer=optax.adam(optax.cosine_decay_schedule(0.1, 1000)),
        num_phi_steps=1000,
    )
    q_phi = grid.encoder_probs(res.corner, res.encoder_params, x)
    kl = categorical_kl(q_phi, jnp.log(bm.posterior(theta0, x)))
    assert float(jnp.max(kl)) < 1e-10
    np.testing.assert_allclose(res.params.weights, one_em.params.weights, atol=1e-7)
    np.testing.assert_allclose(res.params.probs, one_em.params.probs, atol=1e-7)
    # ...and the comparison is not vacuous: one EM step moves theta by far more.
    assert float(jnp.max(jnp.abs(one_em.params.probs - theta0.probs))) > 0.05
    assert em_res.params.probs.shape == res.params.probs.shape


def test_gradient_m_step_run_to_convergence_equals_the_closed_form_map_m_step():
    # One GEM iteration with many Adam steps maximises E_q[log p(x, z)] + log prior; so does
    # the closed-form MAP M-step (Beta(2, 2) prior keeps the optimum at finite logits).
    model, x, theta0, _ = _setup("bernoulli")
    kw = dict(params=theta0, num_iters=1, hyper=PRIOR)
    closed = grid.run_corner(jax.random.key(0), "em", model, x, **kw)
    gem = grid.run_corner(
        jax.random.key(0),
        "gem",
        model,
        x,
        theta_optimizer=optax.adam(optax.cosine_decay_schedule(0.1, 1000)),
        num_theta_steps=1000,
        **kw,
    )
    np.testing.assert_allclose(gem.params.weights, closed.params.weights, atol=1e-7)
    np.testing.assert_allclose(gem.params.probs, closed.params.probs, atol=1e-7)


def test_joint_and_alternating_both_run_and_are_deterministic_given_the_key():
    joint = _run("bernoulli", "vae", "joint")
    alt = _run("bernoulli", "vae", "alternating")
    alt_again = _run.__wrapped__("bernoulli", "vae", "alternating")
    other_key = _run("bernoulli", "vae", "alternating", seed=2)
    assert alt.corner.schedule == "alternating" and joint.corner.schedule == "joint"
    np.testing.assert_array_equal(alt.history.log_likelihood, alt_again.history.log_likelihood)
    np.testing.assert_array_equal(alt.params.probs, alt_again.params.probs)
    assert not np.allclose(alt.params.probs, joint.params.probs)
    assert not np.allclose(alt.params.probs, other_key.params.probs)
    for res in (joint, alt):
        assert res.history.elbo[-1] > res.history.elbo[0]


@pytest.mark.parametrize(
    "model_name", ["bernoulli", "gmm", "gmm-tied", "gmm-diag", "gmm-spherical"]
)
def test_unconstrained_parametrisation_round_trips(model_name):
    model, x, theta0, _ = _setup(model_name.split("-")[0])
    if "-" in model_name:  # the other covariance layouts, from the full covariances
        ct = model_name.split("-")[1]
        model = grid.gmm_model(ct)
        cov = theta0.covariances + jnp.array([[0.5, 0.3], [0.3, 0.2]])[None]
        cov = {
            "tied": cov[0],
            "diag": jnp.diagonal(cov, axis1=1, axis2=2),
            "spherical": cov[:, 0, 0],
        }[ct]
        theta0 = theta0._replace(covariances=cov)
    to_u, from_u = jax.jit(model.to_unconstrained), jax.jit(model.from_unconstrained)
    u = to_u(theta0)
    back = from_u(u)
    for a, b in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(theta0), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    u_again = to_u(back)
    for a, b in zip(jax.tree_util.tree_leaves(u_again), jax.tree_util.tree_leaves(u), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    # Any real u is valid: a random one maps to a distribution with a finite log-likelihood.
    leaves, treedef = jax.tree_util.tree_flatten(u)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    rand = treedef.unflatten(
        [jax.random.normal(k_, a.shape, a.dtype) for k_, a in zip(keys, leaves, strict=True)]
    )
    log_prob = jax.jit(lambda v: model.exact.log_prob(from_u(v), model.prepare(x)))
    assert np.all(np.isfinite(log_prob(rand)))


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_gmm_expected_stats_of_the_posterior_equal_the_e_step(covariance_type):
    # The amortized-EM M-step relies on expected_stats(q) being the E-step's statistics.
    _, x, theta0, _ = _gmm_data()
    model = grid.gmm_model(covariance_type)
    cov = {
        "full": theta0.covariances,
        "tied": theta0.covariances[0],
        "diag": jnp.ones((K, 2)),
        "spherical": jnp.ones((K,)),
    }[covariance_type]
    theta = theta0._replace(covariances=cov)
    data = model.prepare(x)
    w = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, N))
    stats, _ = model.exact.e_step(theta, data, w)
    again = model.exact.expected_stats(model.exact.posterior(theta, data), data, w)
    for a, b in zip(stats, again, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_gap_decomposition_adds_up_and_the_full_family_has_no_approximation_gap():
    _, x, _, _ = _setup("bernoulli")
    res = _run("bernoulli", "vae")
    gaps = grid.gap_decomposition(res.corner, res.params, res.encoder_params, x, num_steps=400)
    assert gaps.approximation_gap + gaps.amortization_gap == pytest.approx(
        gaps.log_likelihood - gaps.elbo_amortized, abs=1e-10
    )
    assert -1e-10 <= gaps.approximation_gap < 1e-3
    assert gaps.amortization_gap > 1e-3  # a 12-step encoder is far from the posterior
    with pytest.raises(ValueError, match="amortized"):
        grid.gap_decomposition(_run("bernoulli", "em").corner, res.params, None, x)


def test_bad_settings_raise():
    model, x, theta0, _ = _setup("bernoulli")
    with pytest.raises(ValueError, match="corner"):
        grid.run_corner(jax.random.key(0), "xx", model, x, params=theta0, num_iters=1)
    with pytest.raises(ValueError, match="schedule"):
        grid.run_corner(
            jax.random.key(0), "vae", model, x, params=theta0, num_iters=1, schedule="both"
        )
    no_stats = grid.GridModel(
        model.exact._replace(expected_stats=None),
        model.log_joint,
        model.to_unconstrained,
        model.from_unconstrained,
    )
    with pytest.raises(ValueError, match="expected_stats"):
        grid.run_corner(jax.random.key(0), "amortized_em", no_stats, x, params=theta0, num_iters=1)
    with pytest.raises(ValueError, match="non-finite"):
        grid.run_corner(
            jax.random.key(0), "em", model, x.at[0, 0].set(jnp.nan), params=theta0, num_iters=1
        )


def test_gaussian_elbo_and_local_fit_on_a_conjugate_model():
    # p(z) = N(0, 1), p(x | z) = N(z, s2) (two independent coordinates): the posterior is
    # N(x / (1 + s2), s2 / (1 + s2)), and at the posterior every draw gives log p(x) exactly.
    s2 = 0.5
    x = jnp.array([[1.0, -2.0], [0.3, 0.0], [2.5, 1.0]])

    def log_joint(z):  # (s, n, l) -> (s, n)
        lik = -0.5 * jnp.square(x[None] - z) / s2 - 0.5 * jnp.log(2 * jnp.pi * s2)
        prior = -0.5 * jnp.square(z) - 0.5 * jnp.log(2 * jnp.pi)
        return jnp.sum(lik + prior, axis=-1)

    post_mean = x / (1 + s2)
    post_log_scale = jnp.full_like(x, 0.5 * np.log(s2 / (1 + s2)))
    log_px = np.sum(-0.5 * np.square(x) / (1 + s2) - 0.5 * np.log(2 * np.pi * (1 + s2)), axis=1)
    at_post = grid.gaussian_elbo(
        jax.random.key(0), log_joint, post_mean, post_log_scale, num_samples=4
    )
    np.testing.assert_allclose(at_post, log_px, rtol=1e-12)
    off = grid.gaussian_elbo(
        jax.random.key(0), log_joint, post_mean + 0.3, post_log_scale, num_samples=4
    )
    assert np.all(np.asarray(off) < log_px)  # at a shifted mean every draw is below
    mean, log_scale = jax.jit(
        lambda m, s: grid.fit_local_gaussian(
            jax.random.key(1),
            log_joint,
            m,
            s,
            num_steps=1500,
            learning_rate=optax.cosine_decay_schedule(0.05, 1500),
        )
    )(jnp.zeros_like(x), jnp.zeros_like(x))
    np.testing.assert_allclose(mean, post_mean, atol=0.05)
    np.testing.assert_allclose(log_scale, post_log_scale, atol=0.1)
