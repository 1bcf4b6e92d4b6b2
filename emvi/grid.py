r"""One objective, four algorithms: the EM / VI grid for models with a finite latent.

Every algorithm here raises the same per-example ELBO,

.. math::
    \mathrm{ELBO}(q, \theta; x_i) = \sum_{k} q(k \mid x_i)
        \big[\log p_\theta(x_i, k) - \log q(k \mid x_i)\big]
      = \log p_\theta(x_i) - \mathrm{KL}\big(q(\cdot \mid x_i) \,\|\, p_\theta(\cdot \mid x_i)\big),

computed exactly by enumerating the k values of z (:func:`emvi.elbo.discrete_elbo`, no
sampling). They differ only in how each half-step is taken:

==================  =============================  ==============================
                    closed-form M-step             gradient M-step (optax)
==================  =============================  ==============================
exact E-step        ``"em"``                       ``"gem"`` (generalised EM)
amortized E-step    ``"amortized_em"``             ``"vae"`` (joint / alternating)
==================  =============================  ==============================

* **E-step**, exact: :math:`q \leftarrow p_\theta(z \mid x)`, so the KL vanishes.
  Amortized: a few optax steps on the encoder's parameters :math:`\phi` raise the ELBO in
  :math:`\phi`, that is, lower :math:`\mathrm{KL}(q_\phi \,\|\, p_\theta(z \mid x))`.
* **M-step**, closed form: :math:`\theta \leftarrow \arg\max_\theta E_q[\log p_\theta(x, z)]`
  from the expected sufficient statistics of q (``model.exact.expected_stats``). Gradient:
  a few optax steps on an unconstrained parametrisation :math:`u` of :math:`\theta`, raising
  the same :math:`E_q[\log p_{\theta(u)}(x, z)]` with q held fixed.

A model enters the grid through a :class:`GridModel`: its :class:`emvi.em.ExactModel` (for the
exact E-step and the closed-form M-step), its log-joint :math:`\log p_\theta(x_i, k)` as an
(n, k) array, and a bijection between its parameters and an unconstrained pytree (for the
gradient M-step). :func:`bernoulli_mixture_model` and :func:`gmm_model` build the two
adapters that ship with emvi.

Each corner is an ``(init, step)`` pair (:func:`corner_init`, :func:`corner_step`) over a
static :class:`Corner`; :func:`run_corner` runs one corner for a number of outer iterations,
timing the jitted steps and recording the exact log-likelihood and the ELBO of the corner's
current q after every iteration. :func:`gap_decomposition` splits
:math:`\log p(x) - \mathrm{ELBO}(q_\phi)` into approximation and amortization gaps (Cremer,
Li & Duvenaud, 2018).

The data are used in full at every step (no minibatches): the comparison is between
algorithms, not between gradient-noise levels.

Shape letters: ``n`` data points, ``d`` data dimension, ``k`` components, ``t`` iterations.

Example:
  >>> from emvi import bernoulli_mixture as bm
  >>> x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (50, 6)), jnp.float32)
  >>> theta0 = bm.init_params(jax.random.key(0), x, 3)
  >>> res = run_corner(jax.random.key(1), "vae", bernoulli_mixture_model(), x,
  ...                  params=theta0, num_iters=5)
  >>> res.history.log_likelihood.shape
  (6,)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Key

from emvi import _checks, em
from emvi.elbo import discrete_elbo
from emvi.nn import CategoricalEncoder

PyTree = Any
CORNERS: tuple[str, ...] = ("em", "gem", "amortized_em", "vae")
SCHEDULES: tuple[str, ...] = ("joint", "alternating")
_EXACT_E = ("em", "gem")
# One shared instance, so that corners built with defaults hash equal and share compilations.
_DEFAULT_OPTIMIZER = optax.adam(1e-2)
_GRADIENT_M = ("gem", "vae")


# ---------------------------------------------------------------------------------------
# The model interface
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridModel:
    """What the grid needs from a model with a finite latent z in {1..k}.

    Hashable (it holds only functions), so it is a static argument of the jitted steps.

    Attributes:
      exact: the model's :class:`emvi.em.ExactModel`. ``posterior``, ``log_prob``, ``elbo``
        and ``m_step`` are used by every corner that needs them; ``expected_stats`` is needed
        by the ``"amortized_em"`` corner (closed-form M-step from an encoder's q).
      log_joint: ``(params, x) -> (n, k)``, :math:`\\log p_\\theta(x_i, z = k)` on the raw
        data ``x`` (the ``exact`` functions receive ``exact.prepare(x)`` instead).
      to_unconstrained: ``params -> u``, a pytree of unconstrained arrays.
      from_unconstrained: ``u -> params``, the inverse (any real ``u`` is valid).
      log_prior: optional ``(params, hyper) -> scalar``, the log prior that the closed-form
        M-step adds for MAP estimation; the gradient M-step adds it too (divided by n), so
        both M-steps climb the same objective.
    """

    exact: em.ExactModel
    log_joint: Callable[[PyTree, Array], Array]
    to_unconstrained: Callable[[PyTree], PyTree]
    from_unconstrained: Callable[[PyTree], PyTree]
    log_prior: Callable[[PyTree, PyTree], Array] | None = None

    def prepare(self, x: Array) -> PyTree:
        """The data as the ``exact`` functions expect it."""
        return self.exact.prepare(x) if self.exact.prepare is not None else x


# -- Bernoulli mixture -------------------------------------------------------------------


def _bm_to_unconstrained(params):
    from emvi.bernoulli_mixture import BernoulliMixtureParams

    log_w = jnp.log(params.weights)
    probs = params.probs
    return BernoulliMixtureParams(
        weights=log_w - jnp.mean(log_w), probs=jnp.log(probs) - jnp.log1p(-probs)
    )


def _bm_from_unconstrained(u):
    from emvi.bernoulli_mixture import BernoulliMixtureParams

    return BernoulliMixtureParams(weights=jax.nn.softmax(u.weights), probs=jax.nn.sigmoid(u.probs))


@functools.cache
def bernoulli_mixture_model() -> GridModel:
    r"""The Bernoulli mixture (:mod:`emvi.bernoulli_mixture`) as a :class:`GridModel`.

    Unconstrained parametrisation (a ``BernoulliMixtureParams`` of logits):

    .. math::
        u_{\pi} = \log \pi - \overline{\log \pi}, \quad \pi = \mathrm{softmax}(u_\pi);
        \qquad u_{\mu} = \log \frac{\mu}{1 - \mu}, \quad \mu = \sigma(u_\mu).

    Probabilities of exactly 0 or 1 (which maximum-likelihood EM can produce) map to
    infinite logits: give the closed-form corners a Beta prior with ``a, b > 1`` (the
    ``hyper``, a ``BernoulliMixturePrior``) when mixing them with gradient corners.
    """
    from emvi import bernoulli_mixture as bm

    return GridModel(
        exact=bm.model(),
        log_joint=bm.log_joint,
        to_unconstrained=_bm_to_unconstrained,
        from_unconstrained=_bm_from_unconstrained,
        log_prior=bm.log_prior,
    )


# -- Gaussian mixture --------------------------------------------------------------------


def _softplus_inverse(y: Array) -> Array:
    """The inverse of softplus for y > 0, :math:`\\log(e^y - 1) = y + \\log(1 - e^{-y})`."""
    return y + jnp.log(-jnp.expm1(-y))


def _diag_matrix(diag: Array) -> Array:
    """(..., d) -> (..., d, d) diagonal matrices (broadcasting written out)."""
    shape = (*diag.shape, diag.shape[-1])
    eye = jnp.broadcast_to(jnp.eye(diag.shape[-1], dtype=diag.dtype), shape)
    return eye * jnp.broadcast_to(diag[..., None, :], shape)


def _chol_to_raw(cov: Array) -> Array:
    """(..., d, d) SPD matrices -> unconstrained (..., d, d): strictly-lower entries of the
    Cholesky factor, softplus-inverse of its diagonal on the diagonal, zeros above."""
    chol = jnp.linalg.cholesky(cov)
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    return jnp.tril(chol, -1) + _diag_matrix(_softplus_inverse(diag))


def _raw_to_cov(raw: Array) -> Array:
    """Inverse of :func:`_chol_to_raw`: :math:`L L^T` with L lower, softplus diagonal (> 0)."""
    diag = jax.nn.softplus(jnp.diagonal(raw, axis1=-2, axis2=-1))
    chol = jnp.tril(raw, -1) + _diag_matrix(diag)
    return chol @ jnp.swapaxes(chol, -1, -2)


def _gmm_to_unconstrained(params, covariance_type):
    log_w = jnp.log(params.weights)
    cov = params.covariances
    if covariance_type in ("full", "tied"):
        raw = _chol_to_raw(cov)
    else:  # diag, spherical: softplus-inverse of the standard deviations
        raw = _softplus_inverse(jnp.sqrt(cov))
    return type(params)(log_w - jnp.mean(log_w), params.means, raw)


def _gmm_from_unconstrained(u, covariance_type):
    if covariance_type in ("full", "tied"):
        cov = _raw_to_cov(u.covariances)
    else:
        cov = jnp.square(jax.nn.softplus(u.covariances))
    return type(u)(jax.nn.softmax(u.weights), u.means, cov)


@functools.cache
def gmm_model(covariance_type: str = "full") -> GridModel:
    r"""The Gaussian mixture (:mod:`emvi.gmm`) as a :class:`GridModel`.

    Unconstrained parametrisation (a ``GMMParams`` of free arrays): weight logits
    :math:`u_\pi = \log\pi - \overline{\log\pi}`, the means as they are, and for the
    covariances the Cholesky factor :math:`\Sigma = L L^\top` with
    :math:`L_{cc} = \mathrm{softplus}(u_{cc})` and the strictly lower entries free (``full``,
    ``tied``), or standard deviations :math:`\sigma = \mathrm{softplus}(u)` (``diag``,
    ``spherical``).

    ``hyper`` is a ``GMMHyper``; its ``reg_covar`` and prior act on the closed-form M-step
    only (the gradient M-step maximises the plain likelihood), so keep ``reg_covar`` tiny
    when comparing corners. The exact model works on :func:`emvi.gmm.prepare` d features and
    loses accuracy on data far from the origin: centre the data first.
    """
    from emvi import gmm

    ct = _checks.check_choice(covariance_type, name="covariance_type", choices=gmm.COVARIANCE_TYPES)
    return GridModel(
        exact=gmm.model(ct),
        log_joint=functools.partial(gmm.log_joint, covariance_type=ct),
        to_unconstrained=functools.partial(_gmm_to_unconstrained, covariance_type=ct),
        from_unconstrained=functools.partial(_gmm_from_unconstrained, covariance_type=ct),
    )


# ---------------------------------------------------------------------------------------
# Corners as (init, step) pairs
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Corner:
    """A corner of the grid with its static settings (hashable; see :func:`make_corner`).

    Attributes:
      name: ``"em"``, ``"gem"``, ``"amortized_em"`` or ``"vae"``.
      model: the :class:`GridModel`.
      schedule: for ``"vae"``: ``"joint"`` (one optimiser step on phi and theta together
        per iteration) or ``"alternating"`` (``num_phi_steps`` steps on phi, then
        ``num_theta_steps`` on theta).
      encoder: a Flax module mapping x (n, d) to logits (n, k) (amortized corners).
      theta_optimizer: optax transformation for the unconstrained theta (gradient M).
      phi_optimizer: optax transformation for the encoder (amortized E).
      num_theta_steps: optax steps per gradient M-step (``"gem"``; ``"vae"`` alternating).
      num_phi_steps: optax steps per amortized E-step (``"amortized_em"``; ``"vae"``
        alternating).
    """

    name: str
    model: GridModel
    schedule: str = "joint"
    encoder: nn.Module | None = None
    theta_optimizer: optax.GradientTransformation | None = None
    phi_optimizer: optax.GradientTransformation | None = None
    num_theta_steps: int = 1
    num_phi_steps: int = 1

    @property
    def exact_e_step(self) -> bool:
        return self.name in _EXACT_E

    @property
    def gradient_m_step(self) -> bool:
        return self.name in _GRADIENT_M


class CornerState(NamedTuple):
    """Loop state of :func:`corner_init` / :func:`corner_step`.

    Attributes:
      theta: model parameters in their natural (constrained) form.
      phi: encoder variables (None for the exact-E corners).
      theta_opt: optax state of the unconstrained theta (None for closed-form corners).
      phi_opt: optax state of phi (None for the exact-E corners).
      q: (n, k) the exact posterior the last M-step used (exact-E corners; None otherwise:
        an amortized corner's q is ``softmax(encoder(phi, x))``).
    """

    theta: PyTree
    phi: PyTree
    theta_opt: PyTree
    phi_opt: PyTree
    q: Array | None


class CornerInfo(NamedTuple):
    """Diagnostics of one step (never fed back)."""

    objective: Float[Array, ""]  # mean ELBO (+ log prior / n) reached by the last half-step


def make_corner(
    name: str,
    model: GridModel,
    *,
    num_components: int,
    schedule: str = "joint",
    encoder: nn.Module | None = None,
    theta_optimizer: optax.GradientTransformation | None = None,
    phi_optimizer: optax.GradientTransformation | None = None,
    num_theta_steps: int = 1,
    num_phi_steps: int = 1,
) -> Corner:
    """Validates the settings and fills in defaults (Adam, a one-hidden-layer encoder).

    Defaults: ``theta_optimizer = optax.adam(1e-2)``, ``phi_optimizer = optax.adam(1e-2)``,
    ``encoder = CategoricalEncoder(hidden=(64,), num_classes=num_components)``. Settings a
    corner does not use are dropped (set to None / 1), so equal corners hash equal.

    Raises:
      ValueError: for an unknown corner or schedule, or step counts below 1.
    """
    _checks.check_choice(name, name="corner", choices=CORNERS)
    _checks.check_choice(schedule, name="schedule", choices=SCHEDULES)
    k = _checks.check_positive_int(num_components, name="num_components")
    num_theta_steps = _checks.check_positive_int(num_theta_steps, name="num_theta_steps")
    num_phi_steps = _checks.check_positive_int(num_phi_steps, name="num_phi_steps")
    if name == "amortized_em" and model.exact.expected_stats is None:
        raise ValueError(
            "the amortized_em corner needs model.exact.expected_stats(q, data, w), the "
            "statistics of an arbitrary q, to run the closed-form M-step; this model has none."
        )
    amortized = name not in _EXACT_E
    gradient_m = name in _GRADIENT_M
    if amortized and encoder is None:
        encoder = CategoricalEncoder(hidden=(64,), num_classes=k)
    if gradient_m and theta_optimizer is None:
        theta_optimizer = _DEFAULT_OPTIMIZER
    if amortized and phi_optimizer is None:
        phi_optimizer = _DEFAULT_OPTIMIZER
    uses_theta_steps = name == "gem" or (name == "vae" and schedule == "alternating")
    uses_phi_steps = name == "amortized_em" or (name == "vae" and schedule == "alternating")
    return Corner(
        name=name,
        model=model,
        schedule=schedule if name == "vae" else "joint",
        encoder=encoder if amortized else None,
        theta_optimizer=theta_optimizer if gradient_m else None,
        phi_optimizer=phi_optimizer if amortized else None,
        num_theta_steps=num_theta_steps if uses_theta_steps else 1,
        num_phi_steps=num_phi_steps if uses_phi_steps else 1,
    )


def encoder_probs(corner: Corner, phi: PyTree, x: Float[Array, "n d"]) -> Float[Array, "n k"]:
    """The amortized q(z | x) = softmax(encoder(phi, x))."""
    return jax.nn.softmax(corner.encoder.apply(phi, x), axis=-1)


def _objective(model: GridModel, theta, q, x, hyper) -> Array:
    """Mean ELBO of q under theta, plus the log prior over n (the MAP objective)."""
    value = jnp.mean(discrete_elbo(model.log_joint(theta, x), q))
    if model.log_prior is not None:
        value = value + model.log_prior(theta, hyper) / x.shape[0]
    return value


def _optax_loop(loss_fn, optimizer, params, opt_state, num_steps):
    """``num_steps`` optax steps minimising ``loss_fn`` (on device, ``lax.scan``)."""

    def body(carry, _):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, opt_state), losses = lax.scan(body, (params, opt_state), None, length=num_steps)
    return params, opt_state, losses


def _cast_floats(tree: PyTree, dtype) -> PyTree:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def corner_init(
    key: Key[Array, ""], corner: Corner, x: Float[Array, "n d"], params: PyTree
) -> CornerState:
    """The state before the first iteration.

    ``key`` initialises the encoder (amortized corners; its variables are cast to the dtype
    of ``x``); the exact-E corners use no randomness. ``params`` is the initial theta.
    """
    model = corner.model
    theta_opt = phi = phi_opt = q = None
    if corner.gradient_m_step:
        theta_opt = corner.theta_optimizer.init(model.to_unconstrained(params))
    if corner.exact_e_step:
        q = model.exact.posterior(params, model.prepare(x))
    else:
        phi = _cast_floats(corner.encoder.init(key, x[:1]), x.dtype)
        phi_opt = corner.phi_optimizer.init(phi)
    return CornerState(params, phi, theta_opt, phi_opt, q)


def corner_step(
    corner: Corner, state: CornerState, x: Float[Array, "n d"], hyper: PyTree = None
) -> tuple[CornerState, CornerInfo]:
    """One outer iteration of a corner (an E half-step and an M half-step).

    * ``"em"``: :math:`q = p_\\theta(z|x)`; :math:`\\theta \\leftarrow` ``m_step(stats(q))``.
    * ``"gem"``: :math:`q = p_\\theta(z|x)`; ``num_theta_steps`` optax steps on
      :math:`u = ` ``to_unconstrained(theta)`` raising :math:`E_q[\\log p_{\\theta(u)}(x, z)]`.
    * ``"amortized_em"``: ``num_phi_steps`` optax steps on :math:`\\phi` raising
      :math:`\\mathrm{ELBO}(q_\\phi, \\theta)`; then :math:`\\theta \\leftarrow`
      ``m_step(expected_stats(q_phi))``.
    * ``"vae"``, joint: one gradient of the ELBO in :math:`(\\phi, u)`, one optimiser
      update of each. Alternating: ``num_phi_steps`` steps on :math:`\\phi`, then
      ``num_theta_steps`` on :math:`u` with :math:`q_\\phi` held fixed.

    Pure and jittable with ``corner`` static (see :func:`run_corner`).
    """
    model = corner.model
    data = model.prepare(x)
    n = x.shape[0]
    weights = jnp.ones((n,), x.dtype)
    theta, phi, theta_opt, phi_opt, q = state

    def theta_loss(q_fixed):
        return lambda u: -_objective(model, model.from_unconstrained(u), q_fixed, x, hyper)

    def phi_loss(theta_fixed):
        lj = lax.stop_gradient(model.log_joint(theta_fixed, x))
        return lambda p: -jnp.mean(discrete_elbo(lj, encoder_probs(corner, p, x)))

    if corner.name == "em":
        q = model.exact.posterior(theta, data)
        if model.exact.expected_stats is not None:
            stats = model.exact.expected_stats(q, data, weights)
        else:
            stats, _ = model.exact.e_step(theta, data, weights)
        theta = model.exact.m_step(stats, hyper)
        objective = _objective(model, theta, q, x, hyper)
    elif corner.name == "gem":
        q = lax.stop_gradient(model.exact.posterior(theta, data))
        u, theta_opt, losses = _optax_loop(
            theta_loss(q),
            corner.theta_optimizer,
            model.to_unconstrained(theta),
            theta_opt,
            corner.num_theta_steps,
        )
        theta = model.from_unconstrained(u)
        objective = -losses[-1]
    elif corner.name == "amortized_em":
        phi, phi_opt, _ = _optax_loop(
            phi_loss(theta), corner.phi_optimizer, phi, phi_opt, corner.num_phi_steps
        )
        q_phi = encoder_probs(corner, phi, x)
        theta = model.exact.m_step(model.exact.expected_stats(q_phi, data, weights), hyper)
        objective = _objective(model, theta, q_phi, x, hyper)
    elif corner.schedule == "joint":

        def joint_loss(pu):
            p, u = pu
            return -_objective(
                model, model.from_unconstrained(u), encoder_probs(corner, p, x), x, hyper
            )

        u = model.to_unconstrained(theta)
        loss, (g_phi, g_u) = jax.value_and_grad(joint_loss)((phi, u))
        upd_phi, phi_opt = corner.phi_optimizer.update(g_phi, phi_opt, phi)
        upd_u, theta_opt = corner.theta_optimizer.update(g_u, theta_opt, u)
        phi = optax.apply_updates(phi, upd_phi)
        theta = model.from_unconstrained(optax.apply_updates(u, upd_u))
        objective = -loss  # at the parameters the step started from
    else:  # vae, alternating
        phi, phi_opt, _ = _optax_loop(
            phi_loss(theta), corner.phi_optimizer, phi, phi_opt, corner.num_phi_steps
        )
        q_phi = lax.stop_gradient(encoder_probs(corner, phi, x))
        u, theta_opt, losses = _optax_loop(
            theta_loss(q_phi),
            corner.theta_optimizer,
            model.to_unconstrained(theta),
            theta_opt,
            corner.num_theta_steps,
        )
        theta = model.from_unconstrained(u)
        objective = -losses[-1]
    new_state = CornerState(theta, phi, theta_opt, phi_opt, q if corner.exact_e_step else None)
    return new_state, CornerInfo(objective)


def current_q(corner: Corner, state: CornerState, x: Float[Array, "n d"]) -> Float[Array, "n k"]:
    """The q a corner holds: the last exact posterior it used, or its encoder's output."""
    if corner.exact_e_step:
        return state.q
    return encoder_probs(corner, state.phi, x)


def evaluate(
    corner: Corner, state: CornerState, x: Float[Array, "n d"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``(mean log p(x_i), mean ELBO(q, theta; x_i))`` for the corner's current theta and q."""
    return _evaluate_jit(corner.model, corner.encoder, state.theta, state.phi, state.q, x)


@functools.partial(jax.jit, static_argnames=("model", "encoder"))
def _evaluate_jit(model, encoder, theta, phi, q, x):
    # Static arguments are only what the evaluation needs, so the four corners of one model
    # share a compiled evaluation.
    data = model.prepare(x)
    if encoder is not None:
        q = jax.nn.softmax(encoder.apply(phi, x), axis=-1)
    ll = jnp.mean(model.exact.log_prob(theta, data))
    elbo = jnp.mean(model.exact.elbo(theta, q, data))
    return ll, elbo


_step_jit = jax.jit(corner_step, static_argnames=("corner",))
_init_jit = jax.jit(corner_init, static_argnames=("corner",))


# ---------------------------------------------------------------------------------------
# The single entry point
# ---------------------------------------------------------------------------------------


class CornerHistory(NamedTuple):
    """Per-iteration record; row 0 is the initial state, row t the state after iteration t.

    Attributes:
      log_likelihood: (t+1,) exact mean :math:`\\log p_\\theta(x_i)`.
      elbo: (t+1,) mean ELBO of the corner's current q (for the exact-E corners, the
        posterior the last M-step used, so ``log_likelihood - elbo`` is the KL that the
        M-step opened; row 0 is tight).
      wall_time: (t+1,) seconds spent in the jitted steps up to row t (compilation and the
        evaluation of these diagnostics excluded; row 0 is 0).
    """

    log_likelihood: np.ndarray
    elbo: np.ndarray
    wall_time: np.ndarray


class CornerResult(NamedTuple):
    """What :func:`run_corner` returns.

    Attributes:
      corner: the :class:`Corner` that ran (its settings, defaults filled in).
      params: the final theta (natural parametrisation).
      encoder_params: the final encoder variables (None for the exact-E corners).
      history: a :class:`CornerHistory`.
      state: the final :class:`CornerState` (optimiser states included, to continue).
      compile_time: seconds of the warm-up call (compilation plus one step whose result is
        discarded), excluded from ``history.wall_time``.
    """

    corner: Corner
    params: PyTree
    encoder_params: PyTree
    history: CornerHistory
    state: CornerState
    compile_time: float


def run_corner(
    key: Key[Array, ""],
    corner: str,
    model: GridModel,
    x: Float[Array | np.ndarray, "n d"],
    *,
    params: PyTree,
    num_iters: int,
    schedule: str = "joint",
    hyper: PyTree = None,
    encoder: nn.Module | None = None,
    theta_optimizer: optax.GradientTransformation | None = None,
    phi_optimizer: optax.GradientTransformation | None = None,
    num_theta_steps: int = 1,
    num_phi_steps: int = 1,
    progress: bool = False,
) -> CornerResult:
    """Runs one corner of the grid for ``num_iters`` outer iterations.

    The step is jitted (inner optax loops run on device as ``lax.scan``) and warmed up before
    the clock starts; the outer loop is a Python loop so that each iteration can be timed, and after
    each one the exact mean log-likelihood and the mean ELBO of the corner's q are recorded
    (outside the timed region).

    Args:
      key: a typed PRNG key; initialises the encoder (the only randomness: every step uses
        the full data and enumerates z exactly), so results are deterministic given it.
      corner: ``"em"``, ``"gem"``, ``"amortized_em"`` or ``"vae"``.
      model: a :class:`GridModel`.
      x: data (n, d).
      params: the initial theta (natural parametrisation), e.g. from the model's
        ``init_params``; pass the same one to every corner to compare them.
      num_iters: outer iterations (>= 1).
      schedule: ``"joint"`` or ``"alternating"`` (``"vae"`` only; see :class:`Corner`).
      hyper: the model's hyperparameters (``m_step`` and ``log_prior``), e.g. a prior.
      encoder, theta_optimizer, phi_optimizer, num_theta_steps, num_phi_steps: see
        :func:`make_corner` (defaults filled in there).
      progress: show a tqdm progress bar.

    Returns:
      A :class:`CornerResult`.

    Raises:
      ValueError: for bad settings or data that is not a finite 2-D array.
    """
    arr = _checks.as_data_matrix(x)
    num_iters = _checks.check_positive_int(num_iters, name="num_iters")
    x = jnp.asarray(arr)
    k = int(jax.eval_shape(model.log_joint, params, x[:1]).shape[-1])
    spec = make_corner(
        corner,
        model,
        num_components=k,
        schedule=schedule,
        encoder=encoder,
        theta_optimizer=theta_optimizer,
        phi_optimizer=phi_optimizer,
        num_theta_steps=num_theta_steps,
        num_phi_steps=num_phi_steps,
    )
    state = _init_jit(key, spec, x, params)
    # Warm-up: compile (and run once, discarding the result) outside the timed loop.
    t0 = time.perf_counter()
    jax.block_until_ready(_step_jit(spec, state, x, hyper))
    compile_time = time.perf_counter() - t0
    lls, elbos, times = [], [], [0.0]
    ll, elbo = evaluate(spec, state, x)
    lls.append(float(ll))
    elbos.append(float(elbo))
    iterator = range(num_iters)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=corner, leave=False)
    elapsed = 0.0
    for _ in iterator:
        t0 = time.perf_counter()
        state, _info = _step_jit(spec, state, x, hyper)
        jax.block_until_ready(state)
        elapsed += time.perf_counter() - t0
        times.append(elapsed)
        ll, elbo = evaluate(spec, state, x)
        lls.append(float(ll))
        elbos.append(float(elbo))
    history = CornerHistory(np.array(lls), np.array(elbos), np.array(times))
    return CornerResult(spec, state.theta, state.phi, history, state, compile_time)


def time_to_reach(history: CornerHistory, *, tol: float = 0.1) -> float:
    """Seconds until the log-likelihood first comes within ``tol`` nats of its final value."""
    ll = np.asarray(history.log_likelihood)
    final = ll[-1]
    hit = np.nonzero(np.abs(ll - final) <= tol)[0]
    return float(np.asarray(history.wall_time)[hit[0]])


# ---------------------------------------------------------------------------------------
# Inference gaps (Cremer, Li & Duvenaud, 2018)
# ---------------------------------------------------------------------------------------


def fit_free_logits(
    log_joint: Float[Array, "n k"],
    *,
    num_steps: int,
    learning_rate: float | Array = 0.1,
    init_logits: Float[Array, "n k"] | None = None,
) -> Float[Array, "n k"]:
    r"""The best member of the full categorical family for each example, by optimisation.

    Maximises :math:`\sum_i \mathrm{ELBO}(\mathrm{softmax}(\ell_i))` over free logits
    :math:`\ell_i` (one vector per example, no amortization) with Adam; the problems are
    independent across examples. The optimum is the exact posterior, so what this reaches
    measures how close local optimisation gets (the *approximation gap* of the family is
    zero in exact arithmetic).

    Args:
      log_joint: :math:`\log p(x_i, k)`, shape (n, k), held fixed.
      num_steps: Adam steps.
      learning_rate: Adam's step size.
      init_logits: where to start (zeros, the uniform q, if None).

    Returns:
      The optimised logits, shape (n, k).
    """
    logits = jnp.zeros_like(log_joint) if init_logits is None else init_logits
    log_joint = jnp.where(jnp.isfinite(log_joint), log_joint, jnp.finfo(log_joint.dtype).min / 4)

    def loss(lg):
        return -jnp.sum(discrete_elbo(log_joint, jax.nn.softmax(lg, axis=-1)))

    opt = optax.adam(learning_rate)
    logits, _, _ = _optax_loop(loss, opt, logits, opt.init(logits), num_steps)
    return logits


_fit_free_logits_jit = jax.jit(fit_free_logits, static_argnames=("num_steps",))


class GapReport(NamedTuple):
    r"""Cremer et al.'s split of the inference gap, in nats per example (means over x).

    ``log_likelihood - elbo_amortized = approximation_gap + amortization_gap`` with

    * ``approximation_gap`` :math:`= \log p(x) - \mathrm{ELBO}(q^*)`, :math:`q^*` the best
      member of the variational family for each x (found by per-example optimisation);
    * ``amortization_gap`` :math:`= \mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\phi)`.
    """

    log_likelihood: float
    elbo_best: float
    elbo_amortized: float
    approximation_gap: float
    amortization_gap: float


def gap_decomposition(
    corner: Corner,
    params: PyTree,
    encoder_params: PyTree,
    x: Float[Array | np.ndarray, "n d"],
    *,
    num_steps: int = 500,
    learning_rate: float = 0.1,
) -> GapReport:
    """Splits :math:`\\log p(x) - \\mathrm{ELBO}(q_\\phi)` for an amortized corner's result.

    :math:`q^*` is found by :func:`fit_free_logits` started from the encoder's own logits
    (so it can only improve on them), with the exact log-likelihood and ELBOs from the
    model's ``log_prob`` and ``elbo``.

    Args:
      corner: the :class:`Corner` of an amortized run (``CornerResult.corner``).
      params: theta.
      encoder_params: phi.
      x: data (n, d), train or held-out.
      num_steps, learning_rate: per-example optimisation of q*.
    """
    if corner.exact_e_step:
        raise ValueError("gap_decomposition needs an amortized corner (one with an encoder).")
    model = corner.model
    x = jnp.asarray(_checks.as_data_matrix(x))
    data = model.prepare(x)
    lj = model.log_joint(params, x)
    logits_phi = corner.encoder.apply(encoder_params, x)
    logits_best = _fit_free_logits_jit(
        lj, num_steps=num_steps, learning_rate=learning_rate, init_logits=logits_phi
    )
    ll = float(jnp.mean(model.exact.log_prob(params, data)))
    e_best = float(jnp.mean(model.exact.elbo(params, jax.nn.softmax(logits_best, axis=-1), data)))
    e_phi = float(jnp.mean(model.exact.elbo(params, jax.nn.softmax(logits_phi, axis=-1), data)))
    return GapReport(ll, e_best, e_phi, ll - e_best, e_best - e_phi)


# -- Continuous latents: the same split for a Gaussian q (a Gaussian VAE's encoder) --------


def gaussian_elbo(
    key: Key[Array, ""],
    log_joint_fn: Callable[[Array], Array],
    mean: Float[Array, "n l"],
    log_scale: Float[Array, "n l"],
    *,
    num_samples: int,
) -> Float[Array, " n"]:
    r"""Monte Carlo ELBO of :math:`q_i = \mathcal N(\mu_i, \mathrm{diag}\, e^{2 s_i})` per example.

    .. math::
        \widehat{\mathrm{ELBO}}_i = \frac1S \sum_{j} \log p(x_i, z_{ij}) - \log q_i(z_{ij}),
        \qquad z_{ij} = \mu_i + e^{s_i} \odot \varepsilon_{ij},

    with the entropy term taken in closed form given the draws (the :math:`\varepsilon` are
    drawn from ``key``: pass the same key to compare two q's with common random numbers).

    Args:
      key: a typed PRNG key.
      log_joint_fn: maps z of shape (s, n, l) to :math:`\log p(x_i, z_{s,i})`, shape (s, n).
      mean, log_scale: parameters of q, shape (n, l).
      num_samples: S.
    """
    eps = jax.random.normal(key, (num_samples, *mean.shape), mean.dtype)
    z = mean[None] + jnp.exp(log_scale)[None] * eps
    log_q = (
        jnp.sum(-0.5 * jnp.square(eps) - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
        - jnp.sum(log_scale, axis=-1)[None, :]
    )
    return jnp.mean(log_joint_fn(z) - log_q, axis=0)


def fit_local_gaussian(
    key: Key[Array, ""],
    log_joint_fn: Callable[[Array], Array],
    mean: Float[Array, "n l"],
    log_scale: Float[Array, "n l"],
    *,
    num_steps: int,
    learning_rate: float | Array | Callable = 1e-2,
    num_samples: int = 8,
) -> tuple[Float[Array, "n l"], Float[Array, "n l"]]:
    """The best diagonal Gaussian for each example with the model fixed (no amortization).

    Adam on the per-example mean and log-scale, maximising the sum over examples of the
    reparameterised :func:`gaussian_elbo` (fresh draws every step, ``fold_in(key, step)``),
    started from ``(mean, log_scale)`` (an encoder's output, say). ``learning_rate`` may be
    an optax schedule (a decaying one shrinks the Monte Carlo noise ball at the end).

    Returns:
      The optimised ``(mean, log_scale)``.
    """

    def body(carry, step):
        params, opt_state = carry
        k = jax.random.fold_in(key, step)

        def loss(p):
            return -jnp.sum(gaussian_elbo(k, log_joint_fn, *p, num_samples=num_samples))

        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    opt = optax.adam(learning_rate)
    params = (mean, log_scale)
    (params, _), _ = lax.scan(body, (params, opt.init(params)), jnp.arange(num_steps))
    return params
