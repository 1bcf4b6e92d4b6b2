r"""E-steps: three ways to produce q(z | x), each an ``(init, step)`` pair.

An E-step raises the ELBO in q with the model parameters :math:`\theta` held fixed,

.. math::
    \max_q \; \frac{\sum_i w_i \,\mathrm{ELBO}_i(\theta, q_i)}{\sum_i w_i}, \qquad
    \mathrm{ELBO}_i(\theta, q_i) = \log p_\theta(x_i)
        - \mathrm{KL}\big(q_i \,\|\, p_\theta(z \mid x_i)\big),

that is, it lowers the KL to the posterior. The three pieces differ in how far and how:

* :func:`exact`: :math:`q_i = p_\theta(z \mid x_i)` (``model.posterior``), KL = 0.
* :func:`local`: one free variational parameter vector per example, :math:`q_i =
  \texttt{q\_from\_unconstrained}(u_i)` with :math:`u \in \mathbb R^{n \times m}`, raised by a
  few optax steps and warm-started from its previous value (variational EM; no encoder).
* :func:`amortized`: :math:`u_i = f_\phi(x_i)`, a Flax encoder, raised by a few optax steps
  on :math:`\phi` (the encoder of a VAE).

and they compose: :func:`refine` runs one E-step and then a few local steps from its q, so
the semi-amortized E-step of Kim et al. (2018) is ``refine(amortized(...), local(...))``.

Every piece is written against :class:`emvi.em.ExactModel` alone, in blackjax's shape:
``state = piece.init(key, params, batch)``, ``state, info = piece.step(key, state, params,
batch)``, with the current q in ``state.q`` (in the layout of ``model.posterior``). The data
travel as a :class:`Batch`: the raw inputs ``x`` (what an encoder sees), ``data =
model.prepare_data(x)`` (what the model's functions see) and the weights. Every k optax
steps go through :func:`emvi.optim.run_steps`.

Shape letters: ``n`` data points, ``d`` data dimension, ``m`` size of one example's
unconstrained variational parameters.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from emvi import bernoulli_mixture as bm
  >>> x = (jax.random.uniform(jax.random.key(0), (30, 5)) < 0.5).astype(jnp.float32)
  >>> model = bm.model()
  >>> params = bm.init_params(jax.random.key(1), x, 3)
  >>> b = make_batch(model, x)
  >>> e = local(model, num_steps=50)
  >>> state, info = e.step(jax.random.key(2), e.init(jax.random.key(3), params, b), params, b)
  >>> exact_elbo = mean_elbo(model, params, model.posterior(params, x), b)
  >>> bool(info.elbo <= exact_elbo + 1e-5), bool(exact_elbo - info.elbo < 1e-2)
  (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Key

from emvi import _checks, em
from emvi.nn import MLP
from emvi.optim import run_steps

PyTree = Any
# One shared instance each, so that pieces built with the defaults hash equal.
DEFAULT_LOCAL_OPTIMIZER = optax.adam(0.1)
DEFAULT_ENCODER_OPTIMIZER = optax.adam(1e-2)


class Batch(NamedTuple):
    """The data as every piece of the grid receives it.

    Attributes:
      x: the raw inputs (n, d), what an encoder sees.
      data: ``model.prepare_data(x)``, what the model's functions see (leading axis n).
      weights: (n,) per-example weights.
    """

    x: Float[Array, "n d"]
    data: PyTree
    weights: Float[Array, " n"]


def make_batch(
    model: em.ExactModel,
    x: Float[Array | np.ndarray, "n d"],
    weights: Float[Array | np.ndarray, " n"] | None = None,
) -> Batch:
    """``Batch(x, model.prepare_data(x), weights)``, with unit weights if None."""
    x = jnp.asarray(x)
    if weights is None:
        weights = jnp.ones((x.shape[0],), x.dtype)
    return Batch(x, model.prepare_data(x), jnp.asarray(weights, x.dtype))


def mean_elbo(model: em.ExactModel, params: PyTree, q: PyTree, batch: Batch) -> Float[Array, ""]:
    r""":math:`\sum_i w_i \mathrm{ELBO}_i(\theta, q_i) / \sum_i w_i`."""
    w = batch.weights
    return jnp.sum(w * model.elbo(params, q, batch.data)) / jnp.sum(w)


class ExactState(NamedTuple):
    """State of :func:`exact`: the posterior at the last parameters seen."""

    q: PyTree


class GradientEState(NamedTuple):
    """State of a gradient E-step (:func:`local`, :func:`amortized`).

    Attributes:
      q: the current q (what ``q_of(variables, batch)`` returns).
      variables: what the optimiser moves: the (n, m) unconstrained q of :func:`local`, or
        the encoder's Flax variables of :func:`amortized`.
      opt_state: the optax state of ``variables``.
    """

    q: PyTree
    variables: PyTree
    opt_state: PyTree


class EStepInfo(NamedTuple):
    """Diagnostics of one E-step (never fed back)."""

    elbo: Float[Array, ""]  # weighted mean ELBO of the q the step returns


class EStep(NamedTuple):
    """An E-step as pure functions (hashable: it holds only functions and optax objects).

    Attributes:
      init: ``(key, params, batch) -> state``.
      step: ``(key, state, params, batch) -> (state, EStepInfo)``; ``state.q`` is the new q.
      start: optional ``q -> state``, a state holding a given q (the local E-step started
        from another E-step's output, :func:`refine`).
      optimizer: the optax transformation of a gradient E-step (None: exact, composite).
      q_of: ``(variables, batch) -> q`` of a gradient E-step, differentiable in
        ``variables`` (the joint schedule of :mod:`emvi.grid` steps through it).
    """

    init: Callable[..., PyTree]
    step: Callable[..., tuple[PyTree, EStepInfo]]
    start: Callable[[PyTree], PyTree] | None = None
    optimizer: optax.GradientTransformation | None = None
    q_of: Callable[[PyTree, Batch], PyTree] | None = None


def exact(model: em.ExactModel) -> EStep:
    r"""The exact E-step, :math:`q_i = p_\theta(z \mid x_i)`: the bound touches
    :math:`\log p_\theta(x)`.

    Example:
      >>> import jax.numpy as jnp
      >>> from emvi import bernoulli_mixture as bm
      >>> x = jnp.array([[0.0, 1.0], [1.0, 1.0]])
      >>> p = bm.BernoulliMixtureParams(jnp.array([0.5, 0.5]), jnp.array([[0.2, 0.7], [0.6, 0.4]]))
      >>> e = exact(bm.model())
      >>> state, info = e.step(None, e.init(None, p, make_batch(bm.model(), x)), p,
      ...                      make_batch(bm.model(), x))
      >>> bool(jnp.allclose(info.elbo, jnp.mean(bm.log_prob(p, x))))
      True
    """

    def init(key, params, batch):
        del key
        return ExactState(model.posterior(params, batch.data))

    def step(key, state, params, batch):
        del key, state
        q = model.posterior(params, batch.data)
        return ExactState(q), EStepInfo(mean_elbo(model, params, q, batch))

    return EStep(init, step, start=ExactState)


def _ascend(loss_of_q, q_of, optimizer, variables, opt_state, num_steps):
    """``num_steps`` optax steps raising the ELBO of ``q_of(variables)``."""
    variables, opt_state, _ = run_steps(
        lambda v, t: loss_of_q(q_of(v)), optimizer, variables, opt_state, num_steps
    )
    return variables, opt_state


def local(
    model: em.ExactModel,
    *,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 1,
) -> EStep:
    r"""The local variational E-step: a free q per example, no encoder (variational EM).

    Each step takes ``num_steps`` optax steps on :math:`u \in \mathbb R^{n \times m}`,
    :math:`q = \texttt{q\_from\_unconstrained}(u)`, maximising
    :math:`\sum_i w_i \mathrm{ELBO}_i(\theta, q_i)` (a sum, so each example's problem is on
    its own scale), warm-started from the previous :math:`u` and optimiser state. ``init``
    starts from :math:`u = 0` (for a categorical latent, the uniform q). Its optimum is the
    best member of the variational family for each example: for a model whose family
    contains the posterior, the exact E-step.

    Args:
      model: needs ``q_to_unconstrained`` and ``q_from_unconstrained``.
      optimizer: optax transformation on u (default ``optax.adam(0.1)``).
      num_steps: optax steps per E-step (>= 1).

    Raises:
      ValueError: when the model lacks the q bijection or ``num_steps < 1``.
    """
    em.require(
        model, "q_to_unconstrained", "q_from_unconstrained", purpose="the local variational E-step"
    )
    num_steps = _checks.check_positive_int(num_steps, name="num_steps")
    optimizer = DEFAULT_LOCAL_OPTIMIZER if optimizer is None else optimizer

    def q_of(u, batch):
        del batch
        return model.q_from_unconstrained(u)

    def start(q):
        u = model.q_to_unconstrained(q)
        return GradientEState(q, u, optimizer.init(u))

    def init(key, params, batch):
        del key
        u = jnp.zeros_like(model.q_to_unconstrained(model.posterior(params, batch.data)))
        return GradientEState(model.q_from_unconstrained(u), u, optimizer.init(u))

    def step(key, state, params, batch):
        del key
        params = lax.stop_gradient(params)

        def loss(q):
            return -jnp.sum(batch.weights * model.elbo(params, q, batch.data))

        u, opt_state = _ascend(
            loss,
            model.q_from_unconstrained,
            optimizer,
            state.variables,
            state.opt_state,
            num_steps,
        )
        q = model.q_from_unconstrained(u)
        return GradientEState(q, u, opt_state), EStepInfo(mean_elbo(model, params, q, batch))

    return EStep(init, step, start=start, optimizer=optimizer, q_of=q_of)


def num_q_outputs(model: em.ExactModel, params: PyTree, x: Float[Array, "n d"]) -> int:
    """m, the size of one example's unconstrained q (the output size an encoder needs)."""
    em.require(model, "q_to_unconstrained", purpose="an encoder's output size")

    def unconstrained(p, x1):
        return model.q_to_unconstrained(model.posterior(p, model.prepare_data(x1)))

    return int(jax.eval_shape(unconstrained, params, jnp.asarray(x)[:1]).shape[-1])


def default_encoder(
    model: em.ExactModel,
    params: PyTree,
    x: Float[Array, "n d"],
    *,
    hidden: Sequence[int] = (64,),
    activation: str = "relu",
) -> nn.Module:
    """An :class:`emvi.nn.MLP` from x to the (n, m) unconstrained q of ``model``.

    m is ``model.q_to_unconstrained(model.posterior(params, data)).shape[-1]``.
    """
    return MLP((*hidden, num_q_outputs(model, params, x)), activation)


def amortized(
    model: em.ExactModel,
    encoder: nn.Module,
    *,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 1,
) -> EStep:
    r"""The amortized E-step: :math:`q_i = \texttt{q\_from\_unconstrained}(f_\phi(x_i))`.

    Each step takes ``num_steps`` optax steps on the encoder's variables :math:`\phi`,
    maximising the weighted mean ELBO with :math:`\theta` fixed; ``init`` initialises
    :math:`\phi` from ``key`` (cast to the dtype of x). The encoder maps x (n, d) to (n, m),
    for example :func:`default_encoder`.

    Args:
      model: needs ``q_from_unconstrained``.
      encoder: a Flax module, x (n, d) -> (n, m).
      optimizer: optax transformation on :math:`\phi` (default ``optax.adam(1e-2)``).
      num_steps: optax steps per E-step (>= 1).

    Raises:
      ValueError: when the model lacks ``q_from_unconstrained`` or ``num_steps < 1``.
    """
    em.require(model, "q_from_unconstrained", purpose="the amortized E-step")
    num_steps = _checks.check_positive_int(num_steps, name="num_steps")
    optimizer = DEFAULT_ENCODER_OPTIMIZER if optimizer is None else optimizer

    def q_of(phi, batch):
        return model.q_from_unconstrained(encoder.apply(phi, batch.x))

    def init(key, params, batch):
        del params
        dtype = batch.x.dtype
        with jax.numpy_dtype_promotion("standard"):  # flax's float32 params meet float64 x
            phi = encoder.init(key, batch.x[:1])
        phi = jax.tree_util.tree_map(lambda a: a.astype(dtype), phi)
        return GradientEState(q_of(phi, batch), phi, optimizer.init(phi))

    def step(key, state, params, batch):
        del key
        params = lax.stop_gradient(params)

        def loss(q):
            return -mean_elbo(model, params, q, batch)

        phi, opt_state = _ascend(
            loss,
            lambda p: q_of(p, batch),
            optimizer,
            state.variables,
            state.opt_state,
            num_steps,
        )
        q = q_of(phi, batch)
        return GradientEState(q, phi, opt_state), EStepInfo(mean_elbo(model, params, q, batch))

    return EStep(init, step, optimizer=optimizer, q_of=q_of)


def refine(base: EStep, local_step: EStep) -> EStep:
    r"""``base`` followed by ``local_step`` started from base's q (semi-amortized VI).

    With ``base = amortized(...)`` and ``local_step = local(model, num_steps=k)`` this is
    the semi-amortized E-step of Kim et al. (2018): the encoder's q, refined by k local
    steps (a fresh optimiser each time), is what the M-step sees; the encoder itself is
    trained on its own ELBO (the refinement is not backpropagated into :math:`\phi`). Its
    state is base's, with ``q`` replaced by the refined q.
    """
    if local_step.start is None:
        raise ValueError("refine needs a local_step that can start from a given q (local()).")

    def step(key, state, params, batch):
        k_base, k_local = jax.random.split(key)
        state, _ = base.step(k_base, state, params, batch)
        refined, info = local_step.step(k_local, local_step.start(state.q), params, batch)
        return state._replace(q=refined.q), info

    return EStep(base.init, step)


def ascend_from(
    key: Key[Array, ""], local_step: EStep, q: PyTree, params: PyTree, batch: Batch
) -> tuple[PyTree, EStepInfo]:
    """Runs ``local_step`` once from a given q (an encoder's, say) and returns its new q."""
    key = _checks.as_key(key)
    state, info = local_step.step(key, local_step.start(q), params, batch)
    return state.q, info
