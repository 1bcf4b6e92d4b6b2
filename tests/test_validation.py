"""Bad input to public functions: one test per class of failure (issue 12), each
parametrised over the public functions of that class, so that any one of them regressing
fails the test. Every check is an exact error (ValueError naming the argument) or an exact
equality with the well-formed call; the numerical-stability tests at the end compare with a
float64 NumPy oracle computed by direct differences.

Under pytest every emvi function is wrapped by jaxtyping's run-time annotation checker
(``--jaxtyping-packages`` in pyproject.toml), which would answer an ill-typed argument (an
integer seed for a ``Key``, a float ``max_iter``) before emvi's own checks run. Users do
not have that wrapper, so the calls below go through ``inspect.unwrap``: the function
exactly as a user calls it.
"""

import gzip
import inspect
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emvi import (
    _checks,
    bernoulli_mixture,
    data,
    elbo,
    em,
    gmm,
    kmeans,
    linear_gaussian,
    linear_vae,
    metrics,
    mmd,
    train,
    vq,
)


class _Unwrapped:
    """``module.name`` without the test-only annotation checker."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        return inspect.unwrap(value) if inspect.isfunction(value) else value


MODULES = (bernoulli_mixture, elbo, em, gmm, kmeans, linear_gaussian, linear_vae, metrics)
MODULES += (mmd, train, vq)
bernoulli_mixture, elbo, em, gmm, kmeans, linear_gaussian, linear_vae, metrics, mmd, train, vq = (
    _Unwrapped(m) for m in MODULES
)

# ---------------------------------------------------------------------------------------
# 1. The generic EM driver
# ---------------------------------------------------------------------------------------


def _log_joint(params, x):
    weights, means = params
    diff = x[:, None] - means[None, :]
    return jnp.log(weights)[None, :] - 0.5 * diff**2


def _e_step(params, x, w):
    lj = _log_joint(params, x)
    r = jax.nn.softmax(lj, axis=1) * w[:, None]
    return (jnp.sum(r, axis=0), r.T @ x), jnp.sum(w * jax.nn.logsumexp(lj, axis=1))


TOY = em.ExactModel(
    e_step=_e_step,
    m_step=lambda stats, hyper: (stats[0] / jnp.sum(stats[0]), stats[1] / stats[0]),
    log_prob=lambda p, x: jax.nn.logsumexp(_log_joint(p, x), axis=1),
    posterior=lambda p, x: jax.nn.softmax(_log_joint(p, x), axis=1),
    elbo=lambda p, q, x: elbo.discrete_elbo(_log_joint(p, x), q),
)
X = jnp.asarray(np.random.default_rng(0).normal(size=40) + np.repeat([-2.0, 2.0], 20))
P0 = (jnp.array([0.5, 0.5]), jnp.array([-1.0, 1.0]))


def _restarts(p, r=1):
    return jax.tree_util.tree_map(lambda a: jnp.stack([a] * r), p)


def _call_driver(name, *, params=P0, x=X, weights=None, max_iter=3, chunk_size=None, tol=0.0):
    if name == "fit":
        return em.fit(
            TOY, _restarts(params), x, weights, max_iter=max_iter, tol=tol, chunk_size=chunk_size
        )
    if name == "fit_em":
        return em.fit_em(TOY, params, x, weights, max_iter=max_iter, tol=tol, chunk_size=chunk_size)
    if name == "run_em":
        return em.run_em(TOY, params, x, weights, max_iter=max_iter, tol=tol, chunk_size=chunk_size)
    if name == "run_em_restarts":
        return em.run_em_restarts(
            TOY, _restarts(params), x, weights, max_iter=max_iter, tol=tol, chunk_size=chunk_size
        )
    if name == "fit_many":
        w = None if weights is None else jnp.stack([weights, weights])
        return em.fit_many(
            TOY,
            _restarts(_restarts(params), 2),
            jnp.stack([x, x]),
            w,
            max_iter=max_iter,
            tol=tol,
            chunk_size=chunk_size,
        )
    assert name == "em_trace"
    assert chunk_size is None and tol == 0.0
    return em.em_trace(TOY, params, x, weights, num_iter=max_iter)


DRIVERS = ["fit", "fit_em", "run_em", "run_em_restarts", "fit_many", "em_trace"]
_ITER = {"em_trace": "num_iter"}


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.parametrize(
    ("max_iter", "message"),
    [
        (0, "must be >= 1"),
        (-3, "must be >= 1"),
        (2.5, "must be an integer"),
        (None, "must be an integer"),
    ],
)
def test_driver_refuses_bad_max_iter(name, max_iter, message):
    with pytest.raises(ValueError, match=f"{_ITER.get(name, 'max_iter')} {message}"):
        _call_driver(name, max_iter=max_iter)


@pytest.mark.parametrize("name", [d for d in DRIVERS if d != "em_trace"])
@pytest.mark.parametrize("chunk_size", [0, -5, 2.0])
def test_driver_refuses_bad_chunk_size(name, chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be"):
        _call_driver(name, chunk_size=chunk_size)


@pytest.mark.parametrize("name", [d for d in DRIVERS if d != "em_trace"])
@pytest.mark.parametrize("tol", [-1e-3, float("nan"), None])
def test_driver_refuses_bad_tol(name, tol):
    with pytest.raises(ValueError, match="tol must be"):
        _call_driver(name, tol=tol)


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_driver_refuses_non_finite_data(name, bad):
    x = X.at[7].set(bad)
    with pytest.raises(ValueError, match=r"x contains 1 non-finite value"):
        _call_driver(name, x=x)


@pytest.mark.parametrize("name", DRIVERS)
@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (jnp.zeros(40), "zero everywhere"),
        (jnp.ones(40).at[3].set(-1.0), "must be >= 0"),
        (jnp.ones(40).at[3].set(jnp.nan), "NaN or inf"),
        (jnp.ones(39), r"must have shape"),
    ],
)
def test_driver_refuses_bad_weights(name, weights, message):
    with pytest.raises(ValueError, match=f"weights {message}|weights.*{message}"):
        _call_driver(name, weights=weights)


@pytest.mark.parametrize("name", DRIVERS)
def test_driver_refuses_params_that_do_not_fit(name):
    # Three means but two weights: the E-step cannot broadcast them.
    bad = (jnp.array([0.5, 0.5]), jnp.array([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="params do not fit the data"):
        _call_driver(name, params=bad)


def test_fit_refuses_params_without_a_shared_restart_axis():
    mixed = (jnp.ones((2, 2)) / 2, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="leading restart axis"):
        em.fit(TOY, mixed, X, max_iter=2)


GMM_P = gmm.GMMParams(jnp.full(2, 0.5), jnp.zeros((2, 3)), jnp.ones((2, 3)))
GMM_HYPER = gmm.GMMHyper(jnp.asarray(1e-6), None)


@pytest.mark.parametrize("columns", [1, 4])
def test_driver_refuses_gmm_params_for_other_columns(columns):
    """Fewer columns than the params used to broadcast silently, more to raise a raw
    TypeError; both are now a ValueError naming params (one abstract iteration)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(10, columns)))
    with pytest.raises(ValueError, match="params do not fit the data"):
        em.fit(gmm.model("diag"), _restarts(GMM_P), x, max_iter=2, hyper=GMM_HYPER)


def test_driver_still_fits_clean_input_under_jit():
    """The checks are skipped for traced values: the driver stays jittable, and the
    result equals the eager call."""
    eager = em.run_em(TOY, P0, X, max_iter=4, tol=0.0)
    jitted = jax.jit(lambda x: em.run_em(TOY, P0, x, max_iter=4, tol=0.0))(X)
    # Eager and jitted programs may fuse differently: float64 reassociation, ~1e-15.
    np.testing.assert_allclose(np.asarray(eager.history), np.asarray(jitted.history), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# 2. Keys: a typed key, a raw uint32 key, or an integer seed; anything else refused
# ---------------------------------------------------------------------------------------

_X2 = np.random.default_rng(2).normal(size=(12, 2))
_M, _S = jnp.zeros((3, 2)), jnp.ones((3, 2))


def _q():
    import distrax

    return distrax.MultivariateNormalDiag(_M, _S)


KEYED = {
    "elbo.reparameterize": lambda k: elbo.reparameterize(k, _M, _S, 2)[0],
    "elbo.gaussian_mc_elbo": lambda k: elbo.gaussian_mc_elbo(
        k, elbo.std_normal_log_prob, _M, jnp.log(_S), num_samples=2
    ),
    "elbo.gaussian_elbo_terms": lambda k: elbo.gaussian_elbo_terms(
        k, lambda z: -jnp.sum(z**2, axis=-1), _M, _S, num_samples=2
    )[0],
    "elbo.mc_elbo": lambda k: elbo.mc_elbo(
        k, _q(), lambda z: -jnp.sum(z**2, axis=-1), _q(), num_samples=2, analytic_kl=False
    ),
    "elbo.iwae_bound": lambda k: elbo.iwae_bound(k, _q(), elbo.std_normal_log_prob, num_samples=3),
    "metrics.mutual_information": lambda k: metrics.mutual_information(k, _M, _S),
    "vq.restart_dead_codes": lambda k: vq.restart_dead_codes(
        k, jnp.zeros((2, 2)), jnp.zeros(2), jnp.asarray(_X2)
    ),
    "kmeans.kmeans_plusplus": lambda k: kmeans.kmeans_plusplus(k, _X2, 3),
    "gmm.init_params": lambda k: (
        gmm.init_params(k, jnp.asarray(_X2), 2, covariance_type="diag").means
    ),
    "gmm.sample": lambda k: gmm.sample(k, GMM_P, 4, covariance_type="diag")[0],
    "bernoulli_mixture.init_params": lambda k: (
        bernoulli_mixture.init_params(k, jnp.asarray((_X2 > 0).astype(np.float64)), 2).probs
    ),
    "linear_gaussian.init_params": lambda k: (
        linear_gaussian.init_params(k, _X2, 1, noise="isotropic").loadings
    ),
    "kmeans.kmeans": lambda k: kmeans.kmeans(k, _X2, 2, max_iter=3).centers,
    "linear_vae.init_params": lambda k: linear_vae.init_params(k, _X2, 1).encoder_weight,
    "train.fit": lambda k: (
        train.fit(
            k,
            lambda p, key, b, s: (jnp.mean((b @ p + jax.random.normal(key, b.shape[:1])) ** 2), {}),
            jnp.zeros(2),
            optax.sgd(0.1),
            _X2,
            batch_size=4,
            num_epochs=1,
            progress=False,
        ).state.params
    ),
}


@pytest.mark.parametrize("name", sorted(KEYED))
def test_keys_one_rule(name):
    fn = KEYED[name]
    want = np.asarray(fn(jax.random.key(3)))
    # An integer seed means jax.random.key(seed); a raw key is wrapped: same numbers.
    np.testing.assert_array_equal(np.asarray(fn(3)), want)
    np.testing.assert_array_equal(np.asarray(fn(np.int64(3))), want)
    raw = np.asarray(fn(jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(
        raw, np.asarray(fn(jax.random.wrap_key_data(jax.random.PRNGKey(3))))
    )
    for bad in (0.5, "3", None, True, jnp.ones(3)):
        with pytest.raises(ValueError, match=r"key must be a JAX PRNG key .* or an integer seed"):
            fn(bad)


# ---------------------------------------------------------------------------------------
# 3. Dtypes: float32/float64 kept, ints and bools become float32, complex and half refused
# ---------------------------------------------------------------------------------------

_INTS = np.random.default_rng(3).integers(0, 5, size=(12, 2))
DATA_FUNCTIONS = {
    "gmm.fit": lambda x: (
        gmm.fit(jax.random.key(0), x, 2, covariance_type="diag", max_iter=3).params.means
    ),
    "kmeans.kmeans": lambda x: kmeans.kmeans(jax.random.key(0), x, 2, max_iter=3).centers,
    "mmd.mmd_unbiased": lambda x: mmd.mmd_unbiased(x, x[::-1]),
    "vq.quantize": lambda x: vq.quantize(x, jnp.asarray(x[:3], jnp.float32))[2],
    "metrics.posterior_mean_variance": lambda x: metrics.posterior_mean_variance(x),
    "elbo.standard_normal_kl": lambda x: elbo.standard_normal_kl(x, x + 1),
    "train.fit": lambda x: (
        train.fit(
            jax.random.key(0),
            lambda p, k, b, s: (jnp.mean((b @ p) ** 2), {}),
            jnp.zeros(2, np.float32),
            optax.sgd(0.01),
            x,
            batch_size=4,
            num_epochs=1,
            progress=False,
        ).state.params
    ),
}


@pytest.mark.parametrize("name", sorted(DATA_FUNCTIONS))
def test_dtypes_one_rule(name):
    fn = DATA_FUNCTIONS[name]
    # Integers and booleans are computed as float32: same result as passing float32.
    want = np.asarray(fn(_INTS.astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(fn(_INTS)), want)
    for bad, message in [
        (_INTS.astype(np.complex64), "is complex"),
        (_INTS.astype(np.float16), "float16"),
        (jnp.asarray(_INTS, jnp.bfloat16), "bfloat16"),
    ]:
        with pytest.raises(ValueError, match=message):
            fn(bad)


@pytest.mark.parametrize("bad", [np.complex128, np.float16])
def test_em_driver_refuses_complex_and_half_data(bad):
    """The driver does not cast (integer leaves are categories or counts for some models)
    but refuses what no model can use."""
    with pytest.raises(ValueError, match=r"is complex|float16"):
        em.fit(TOY, _restarts(P0), X.astype(bad), max_iter=2)


def test_float_dtype_rule_table():
    assert _checks.float_dtype(np.float64) == np.float64  # x64 is on in the tests
    assert _checks.float_dtype(np.float32) == np.float32
    for dt in (np.int8, np.int64, np.uint8, np.bool_):
        assert _checks.float_dtype(dt) == np.float32
    for dt in (np.complex128, np.float16, np.longdouble, np.str_, object):
        with pytest.raises(ValueError, match="x "):
            _checks.float_dtype(dt)


# ---------------------------------------------------------------------------------------
# 4. None for a numeric hyperparameter
# ---------------------------------------------------------------------------------------

_Z = jnp.asarray(_X2)
NONE_HYPER = {
    "gmm.fit reg_covar": ("reg_covar", lambda: gmm.fit(jax.random.key(0), _X2, 2, reg_covar=None)),
    "gmm.fit tol": ("tol", lambda: gmm.fit(jax.random.key(0), _X2, 2, tol=None)),
    "kmeans.kmeans tol": ("tol", lambda: kmeans.kmeans(jax.random.key(0), _X2, 2, tol=None)),
    "em.fit tol": ("tol", lambda: em.fit(TOY, _restarts(P0), X, tol=None)),
    "mmd.rbf_kernel bandwidth": ("bandwidth", lambda: mmd.rbf_kernel(_Z, _Z, bandwidth=None)),
    "mmd.mmd_unbiased bandwidth": ("bandwidth", lambda: mmd.mmd_unbiased(_Z, _Z, bandwidth=None)),
    "vq.vq_loss_terms beta": ("beta", lambda: vq.vq_loss_terms(_Z, _Z[:2], beta=None)),
    "vq.ema_update decay": (
        "decay",
        lambda: vq.ema_update(
            vq.ema_init(_Z[:2]), _Z, jnp.zeros(12, jnp.int32), decay=None, eps=1e-5
        ),
    ),
    "metrics.active_units threshold": (
        "threshold",
        lambda: metrics.active_units(_Z, threshold=None),
    ),
}


@pytest.mark.parametrize("name", sorted(NONE_HYPER))
def test_none_for_a_number_is_a_value_error_naming_it(name):
    arg, call = NONE_HYPER[name]
    with pytest.raises(ValueError, match=f"{arg}.* must be a real number; got None"):
        call()


# ---------------------------------------------------------------------------------------
# 5. Training: learning rates that do not descend, losses of the wrong form
# ---------------------------------------------------------------------------------------


def _quadratic(p, key, batch, step):
    return jnp.mean((batch @ p["w"] - 1.0) ** 2), {}


def _train(optimizer, loss=_quadratic):
    return train.fit(
        jax.random.key(0),
        loss,
        {"w": jnp.zeros(2)},
        optimizer,
        _X2,
        batch_size=4,
        num_epochs=1,
        progress=False,
    )


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (optax.sgd(-0.1), "moves uphill"),
        (optax.adam(-1e-3), "moves uphill"),
        (optax.sgd(float("nan")), "NaN or inf"),
        (optax.adam(float("nan")), "NaN or inf"),
        (optax.sgd(0.0), "does not move"),
        (optax.adam(0.0), "does not move"),
    ],
)
def test_train_fit_refuses_learning_rates_that_do_not_descend(optimizer, message):
    with pytest.raises(ValueError, match=f"optimizer.*{message}"):
        _train(optimizer)


def test_train_fit_accepts_a_warm_up_from_zero():
    schedule = optax.linear_schedule(0.0, 0.1, transition_steps=3)
    result = _train(optax.sgd(schedule))
    assert float(jnp.sum(jnp.abs(result.state.params["w"]))) > 0


def test_fit_vae_refuses_a_negative_learning_rate():
    from emvi import vae

    model = vae.gaussian_vae(2, 1, (4,))
    with pytest.raises(ValueError, match="optimizer moves uphill"):
        vae.fit_vae(
            jax.random.key(0),
            model,
            (_X2 > 0).astype(np.float64),
            optimizer=optax.adam(-1e-3),
            batch_size=4,
            num_epochs=1,
            progress=False,
        )


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda p, k, b, s: (b @ p["w"], {}), "must return a scalar loss"),
        (lambda p, k, b, s: jnp.mean(b @ p["w"]), r"must return a pair \(loss, aux\)"),
        (lambda p, k, b, s: (jnp.mean(b @ p["w"]), {"x": b[:, 0]}), r"aux\['x'\] must be a scalar"),
    ],
)
def test_train_fit_checks_the_loss_before_grad(loss, message):
    with pytest.raises(ValueError, match=message):
        _train(optax.sgd(0.1), loss)


# ---------------------------------------------------------------------------------------
# 6. The ELBO toolkit, vq, mmd and metrics: scales, NaN, ranks, shapes
# ---------------------------------------------------------------------------------------

_K = jax.random.key(0)
_M2, _S2 = jnp.zeros((3, 2)), jnp.ones((3, 2))
# Each takes (mean, scale); all of shape (3, 2) when well formed.
GAUSSIAN_FUNCTIONS = {
    "elbo.gaussian_kl": lambda m, s: elbo.gaussian_kl(m, s, jnp.zeros_like(m), jnp.ones_like(s)),
    "elbo.gaussian_kl (p side)": lambda m, s: elbo.gaussian_kl(
        jnp.zeros_like(m), jnp.ones_like(s), m, s
    ),
    "elbo.standard_normal_kl": elbo.standard_normal_kl,
    "elbo.reparameterize": lambda m, s: elbo.reparameterize(_K, m, s, 2),
    "elbo.gaussian_elbo_terms": lambda m, s: elbo.gaussian_elbo_terms(
        _K, lambda z: -jnp.sum(z**2, axis=-1), m, s
    ),
    "elbo.mc_elbo": lambda m, s: elbo.mc_elbo(
        _K,
        __import__("distrax").MultivariateNormalDiag(m, s),
        lambda z: -jnp.sum(z**2, axis=-1),
        __import__("distrax").MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2)),
        analytic_kl=False,
    ),
    "elbo.iwae_bound": lambda m, s: elbo.iwae_bound(
        _K,
        __import__("distrax").MultivariateNormalDiag(m, s),
        elbo.std_normal_log_prob,
        num_samples=2,
    ),
    "metrics.kl_per_dim": metrics.kl_per_dim,
    "metrics.mutual_information": lambda m, s: metrics.mutual_information(_K, m, s),
}


@pytest.mark.parametrize("name", sorted(GAUSSIAN_FUNCTIONS))
@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (_S2.at[1, 0].set(-1.0), "> 0|positive"),
        (_S2.at[1, 0].set(0.0), "> 0|positive"),
        (_S2.at[1, 0].set(jnp.nan), "non-finite|NaN"),
    ],
)
def test_scales_must_be_positive_and_finite(name, scale, message):
    with pytest.raises(ValueError, match=message):
        GAUSSIAN_FUNCTIONS[name](_M2, scale)


@pytest.mark.parametrize("name", sorted(GAUSSIAN_FUNCTIONS))
def test_nan_means_are_refused(name):
    with pytest.raises(ValueError, match="non-finite"):
        GAUSSIAN_FUNCTIONS[name](_M2.at[2, 1].set(jnp.nan), _S2)


# distrax refuses a mismatched (loc, scale_diag) itself, before mc_elbo or iwae_bound run.
@pytest.mark.parametrize(
    "name", sorted(set(GAUSSIAN_FUNCTIONS) - {"elbo.mc_elbo", "elbo.iwae_bound"})
)
def test_mismatched_shapes_are_refused(name):
    with pytest.raises(ValueError, match=r"same shape|batch shape"):
        GAUSSIAN_FUNCTIONS[name](_M2, jnp.ones((3, 3)))


_TWO_D = jnp.asarray(np.random.default_rng(4).normal(size=(6, 2)))
# Functions that need 2-D (n, d) input, given 1-D instead; and NaN in that input.
MATRIX_FUNCTIONS = {
    "vq.quantize": lambda z: vq.quantize(z, _TWO_D[:3]),
    "vq.quantize (codebook)": lambda z: vq.quantize(_TWO_D, z),
    "vq.vq_loss_terms": lambda z: vq.vq_loss_terms(z, _TWO_D[:3]),
    "mmd.mmd_unbiased": lambda z: mmd.mmd_unbiased(z, _TWO_D),
    "mmd.rbf_kernel": lambda z: mmd.rbf_kernel(_TWO_D, z, bandwidth=1.0),
    "mmd.inverse_multiquadric_kernel": lambda z: mmd.inverse_multiquadric_kernel(
        z, _TWO_D, scale=1.0
    ),
    "mmd.pairwise_sq_distances": lambda z: mmd.pairwise_sq_distances(z, _TWO_D),
    "metrics.posterior_mean_variance": metrics.posterior_mean_variance,
    "metrics.active_units": metrics.active_units,
    "metrics.kl_per_dim": lambda z: metrics.kl_per_dim(z, jnp.ones_like(z)),
    "elbo.reparameterize": lambda z: elbo.reparameterize(_K, z, jnp.ones_like(z), 1),
}


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_one_d_where_two_d_expected_is_refused(name):
    with pytest.raises(ValueError, match=r"must be 2-D"):
        MATRIX_FUNCTIONS[name](_TWO_D[:, 0])


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_nan_input_is_refused(name):
    with pytest.raises(ValueError, match="non-finite"):
        MATRIX_FUNCTIONS[name](_TWO_D.at[1, 1].set(jnp.nan))


@pytest.mark.parametrize(
    "call",
    [
        lambda: vq.quantize(_TWO_D, jnp.zeros((3, 3))),
        lambda: mmd.mmd_unbiased(_TWO_D, jnp.zeros((4, 3))),
        lambda: vq.ema_update(
            vq.ema_init(_TWO_D[:3]), _TWO_D, jnp.zeros(5, jnp.int32), decay=0.9, eps=1e-5
        ),
        lambda: vq.ema_update(
            vq.ema_init(_TWO_D[:3]), _TWO_D, jnp.full(6, 3, jnp.int32), decay=0.9, eps=1e-5
        ),
        lambda: vq.restart_dead_codes(_K, _TWO_D[:3], jnp.zeros(4), _TWO_D),
        lambda: mmd.info_vae_objective(
            jnp.zeros(3), jnp.zeros(4), jnp.asarray(0.0), alpha=0.0, lam=1.0
        ),
    ],
    ids=[
        "quantize dims",
        "mmd dims",
        "ema indices length",
        "ema indices range",
        "restart usage length",
        "info_vae lengths",
    ],
)
def test_shape_mismatches_are_value_errors(call):
    with pytest.raises(ValueError):
        call()


def test_values_are_not_checked_under_jit_but_shapes_are():
    """Under jit the value checks are skipped (values unknown) and the maths runs; the
    shape checks still raise at trace time."""
    out = jax.jit(elbo.standard_normal_kl)(_M2, _S2.at[0, 0].set(-1.0))
    assert np.isnan(np.asarray(out)[0])  # log of a negative scale: what the user asked for
    with pytest.raises(ValueError, match="same shape"):
        jax.jit(elbo.standard_normal_kl)(_M2, jnp.ones((3, 3)))


# ---------------------------------------------------------------------------------------
# 7. load_mnist on damaged files and out-of-range values
# ---------------------------------------------------------------------------------------


def _idx(array, code=0x08):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    return header + b"".join(struct.pack(">I", s) for s in array.shape) + array.tobytes()


def _mnist_folder(folder, train_images=None, compress=True):
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (4, 3, 3), dtype=np.uint8) if train_images is None else train_images,
        rng.integers(0, 10, 4, dtype=np.uint8),
        rng.integers(0, 256, (2, 3, 3), dtype=np.uint8),
        rng.integers(0, 10, 2, dtype=np.uint8),
    ]
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for name, array in zip(names, arrays, strict=True):
        raw = _idx(array) if array.dtype == np.uint8 else _idx(array.astype(">f8"), 0x0E)
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
    return folder / "train-images-idx3-ubyte.gz"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "bad header"])
def test_load_mnist_damaged_gzip_is_a_value_error(tmp_path, damage):
    path = _mnist_folder(tmp_path)
    data.load_mnist(tmp_path)  # intact: loads
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "flipped":
        raw[len(raw) // 2] ^= 0xFF  # in the deflate stream or its CRC
        raw[-6] ^= 0xFF
    else:
        raw[3] = 0xFF  # reserved gzip flag bits
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"truncated or corrupt gzip|is not an IDX|bytes but"):
        data.load_mnist(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, -1.0, 256.0, np.inf])
def test_load_mnist_refuses_out_of_range_pixels(tmp_path, bad):
    images = np.random.default_rng(1).uniform(0, 255, (4, 3, 3))
    images[2, 1, 1] = bad
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=images, y_train=np.arange(4), x_test=images[:2], y_test=np.arange(2))
    with pytest.raises(ValueError, match="NaN, inf, negative or above 255"):
        data.load_mnist(path)


@pytest.mark.parametrize("bad", [np.nan, -1.0, 2.5])
def test_load_mnist_refuses_bad_labels(tmp_path, bad):
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 3)).astype(np.uint8)
    labels = np.arange(4.0)
    labels[1] = bad
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images[:2], y_test=np.arange(2))
    with pytest.raises(ValueError, match="train labels hold 1 value"):
        data.load_mnist(path)


# ---------------------------------------------------------------------------------------
# 8. Large offsets: vq.quantize and mmd.mmd_unbiased against direct differences
# ---------------------------------------------------------------------------------------


def _direct_sq_distances(x, y):
    """The oracle: float64 differences first, then squares (no expanded form)."""
    d = np.asarray(x, np.float64)[:, None, :] - np.asarray(y, np.float64)[None, :, :]
    return np.sum(d * d, axis=-1)


def _mmd_oracle(x, y, bandwidth):
    def k(a, b):
        return np.exp(-_direct_sq_distances(a, b) / (2 * bandwidth**2))

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )


@pytest.mark.parametrize(("dtype", "offset"), [(np.float64, 1e8), (np.float32, 300.0)])
def test_quantize_picks_the_nearest_code_far_from_the_origin(dtype, offset):
    rng = np.random.default_rng(5)
    z = (rng.normal(size=(200, 3)) + offset).astype(dtype)
    codebook = (rng.normal(size=(16, 3)) + offset).astype(dtype)
    oracle = _direct_sq_distances(z, codebook)  # of the very numbers quantize sees
    _, idx, dist = jax.jit(vq.quantize)(jnp.asarray(z), jnp.asarray(codebook))
    # Centring is exact here (x - c with x and c within a factor 2: Sterbenz), so the
    # expanded form works on coordinates of size ~3: squared norms and cross terms up to
    # ~80, a handful of roundings each, error <= ~5 * 80 eps = 400 eps; atol = 1000 eps.
    # (The uncentred form is off by up to 17 in float64 at 1e8 and 0.11 in float32 at 300,
    # picking a wrong code for 90% and 3% of the vectors.) A tie within that bound may pick
    # either code, so the chosen code's true distance is compared with the true minimum.
    atol = 1000 * np.finfo(dtype).eps
    chosen = oracle[np.arange(200), np.asarray(idx)]
    np.testing.assert_allclose(chosen, oracle.min(axis=1), rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(dist, np.float64), oracle, rtol=0, atol=atol)


@pytest.mark.parametrize(("dtype", "offset"), [(np.float64, 1e8), (np.float32, 1e3)])
def test_mmd_unbiased_is_shift_invariant_far_from_the_origin(dtype, offset):
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(50, 2)) + offset).astype(dtype)
    y = (rng.normal(size=(40, 2)) + 0.5 + offset).astype(dtype)
    want = _mmd_oracle(x, y, 1.0)
    # Jitted (one compilation instead of one per eager op): the same arithmetic.
    got = float(jax.jit(mmd.mmd_unbiased)(jnp.asarray(x), jnp.asarray(y)))
    # Kernel values are <= 1; each is computed to a few ulps after centring, and the three
    # means sum ~2500 terms (pairwise, error ~log2(2500) = 11 ulps): 50 ulps in all. (The
    # uncentred form gives 0.047 instead of 0.072 in float64 at 1e8, 0.0702 in float32 at 1e3.)
    assert abs(got - want) < 50 * np.finfo(dtype).eps, (got, want)
    assert want > 0.05  # a real difference, well above the tolerance


# ---------------------------------------------------------------------------------------
# Scoring functions: data columns against the params, NaN rows
# ---------------------------------------------------------------------------------------


def _lg_params():
    x = jnp.asarray(np.random.default_rng(7).normal(size=(20, 3)))
    return linear_gaussian.init_params(jax.random.key(0), x, 1, noise="diagonal")


def _bm_params():
    return bernoulli_mixture.BernoulliMixtureParams(jnp.full(2, 0.5), jnp.full((2, 3), 0.3))


SCORING = {
    "linear_gaussian.log_prob": lambda x: linear_gaussian.log_prob(_lg_params(), x),
    "linear_gaussian.posterior": lambda x: linear_gaussian.posterior(_lg_params(), x),
    "linear_gaussian.log_joint": lambda x: linear_gaussian.log_joint(
        _lg_params(), x, jnp.zeros((x.shape[0], 1))
    ),
    "bernoulli_mixture.log_prob": lambda x: bernoulli_mixture.log_prob(_bm_params(), x),
    "bernoulli_mixture.posterior": lambda x: bernoulli_mixture.posterior(_bm_params(), x),
    "gmm.log_prob": lambda x: gmm.log_prob(GMM_P, x, covariance_type="diag"),
    "gmm.predict": lambda x: gmm.predict(GMM_P, x, covariance_type="diag"),
}


@pytest.mark.parametrize("name", sorted(SCORING))
@pytest.mark.parametrize("columns", [1, 2, 4])
def test_scoring_checks_columns_against_the_params(name, columns):
    x = jnp.asarray((np.random.default_rng(8).random((5, columns)) > 0.5).astype(np.float64))
    with pytest.raises(ValueError, match=r"columns|must have shape \(num_points, 3\)"):
        SCORING[name](x)


@pytest.mark.parametrize("name", sorted(SCORING))
def test_scoring_refuses_nan_rows(name):
    x = jnp.asarray((np.random.default_rng(8).random((5, 3)) > 0.5).astype(np.float64))
    SCORING[name](x)  # well formed: scores
    with pytest.raises(ValueError, match="NaN"):
        SCORING[name](x.at[2, 1].set(jnp.nan))
