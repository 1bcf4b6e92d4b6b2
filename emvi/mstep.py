r"""M-steps: two ways to raise the ELBO in the model parameters, each an ``(init, step)`` pair.

With q held fixed (from any E-step of :mod:`emvi.estep`), an M-step raises

.. math::
    J(\theta; q) = \frac{\sum_i w_i \,\mathrm{ELBO}_i(\theta, q_i) + \log p(\theta)}
        {\sum_i w_i}
    = \frac{\sum_i w_i E_{q_i}[\log p_\theta(x_i, z)] + \log p(\theta)}{\sum_i w_i}
      + \text{const}(q),

the MAP objective (``log_prior`` is optional; without it, maximum likelihood):

* :func:`closed`: :math:`\theta \leftarrow \arg\max_\theta J` in closed form,
  ``model.m_step(model.expected_stats(q, data, w), hyper)``.
* :func:`gradient`: a few optax steps on :math:`u = \texttt{to\_unconstrained}(\theta)`,
  climbing :math:`J(\texttt{from\_unconstrained}(u); q)` (generalised EM when q is exact).

Both climb the same :math:`J` (the gradient step adds ``log_prior`` as the closed form
does). Every piece is written against :class:`emvi.em.ExactModel` alone:
``state = piece.init(params)``, ``state, info = piece.step(key, state, q, batch, hyper)``,
with the parameters in ``state.params``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from emvi import bernoulli_mixture as bm, estep
  >>> x = (jax.random.uniform(jax.random.key(0), (30, 5)) < 0.5).astype(jnp.float32)
  >>> model = bm.model()
  >>> p0 = bm.init_params(jax.random.key(1), x, 3)
  >>> b = estep.make_batch(model, x)
  >>> q = model.posterior(p0, x)
  >>> m = closed(model)
  >>> state, info = m.step(None, m.init(p0), q, b, None)
  >>> bool(info.objective >= objective(model, p0, q, b, None))
  True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, Float

from emvi import _checks, em
from emvi.estep import Batch
from emvi.optim import run_steps

PyTree = Any
# One shared instance, so that pieces built with the default hash equal.
DEFAULT_OPTIMIZER = optax.adam(1e-2)


def objective(
    model: em.ExactModel, params: PyTree, q: PyTree, batch: Batch, hyper: PyTree
) -> Float[Array, ""]:
    r""":math:`J(\theta; q) = (\sum_i w_i \mathrm{ELBO}_i(\theta, q_i) + \log p(\theta)) /
    \sum_i w_i`, the log prior counted only when the model has one."""
    w = batch.weights
    total = jnp.sum(w * model.elbo(params, q, batch.data))
    if model.log_prior is not None:
        total = total + model.log_prior(params, hyper)
    return total / jnp.sum(w)


class ClosedState(NamedTuple):
    """State of :func:`closed`."""

    params: PyTree


class GradientMState(NamedTuple):
    """State of :func:`gradient`: the parameters (natural form) and the optax state of their
    unconstrained form."""

    params: PyTree
    opt_state: PyTree


class MStepInfo(NamedTuple):
    """Diagnostics of one M-step (never fed back)."""

    objective: Float[Array, ""]  # J at the parameters the step returns


class MStep(NamedTuple):
    """An M-step as pure functions (hashable).

    Attributes:
      init: ``params -> state``.
      step: ``(key, state, q, batch, hyper) -> (state, MStepInfo)``; ``state.params`` is the
        new theta.
      objective: ``(params, q, batch, hyper) -> scalar``, the :math:`J` it climbs.
      optimizer: the optax transformation of a gradient M-step (None: closed form).
      to_variables / from_variables: for a gradient M-step, the model's parameter bijection
        (the joint schedule of :mod:`emvi.grid` steps in the unconstrained coordinates).
    """

    init: Callable[[PyTree], PyTree]
    step: Callable[..., tuple[PyTree, MStepInfo]]
    objective: Callable[..., Array]
    optimizer: optax.GradientTransformation | None = None
    to_variables: Callable[[PyTree], PyTree] | None = None
    from_variables: Callable[[PyTree], PyTree] | None = None


def closed(model: em.ExactModel) -> MStep:
    r"""The closed-form M-step, :math:`\theta \leftarrow
    \texttt{m\_step}(\texttt{expected\_stats}(q, \text{data}, w), \text{hyper})`.

    Raises:
      ValueError: when the model lacks ``expected_stats``.
    """
    em.require(model, "expected_stats", purpose="the closed-form M-step from an arbitrary q")

    def obj(params, q, batch, hyper):
        return objective(model, params, q, batch, hyper)

    def step(key, state, q, batch, hyper):
        del key, state
        params = model.m_step(model.expected_stats(q, batch.data, batch.weights), hyper)
        return ClosedState(params), MStepInfo(obj(params, q, batch, hyper))

    return MStep(ClosedState, step, obj)


def gradient(
    model: em.ExactModel,
    *,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 1,
) -> MStep:
    r"""The gradient M-step: ``num_steps`` optax steps on :math:`u =
    \texttt{to\_unconstrained}(\theta)` raising :math:`J(\texttt{from\_unconstrained}(u); q)`
    with q fixed.

    :math:`u` is recomputed from :math:`\theta` at each step; the optimiser state carries
    over between steps.

    Args:
      model: needs ``to_unconstrained`` and ``from_unconstrained``.
      optimizer: optax transformation on u (default ``optax.adam(1e-2)``).
      num_steps: optax steps per M-step (>= 1).

    Raises:
      ValueError: when the model lacks the bijection or ``num_steps < 1``.
    """
    em.require(model, "to_unconstrained", "from_unconstrained", purpose="the gradient M-step")
    num_steps = _checks.check_positive_int(num_steps, name="num_steps")
    optimizer = DEFAULT_OPTIMIZER if optimizer is None else optimizer

    def obj(params, q, batch, hyper):
        return objective(model, params, q, batch, hyper)

    def init(params):
        return GradientMState(params, optimizer.init(model.to_unconstrained(params)))

    def step(key, state, q, batch, hyper):
        del key
        q = lax.stop_gradient(q)

        def loss(u, t):
            return -obj(model.from_unconstrained(u), q, batch, hyper)

        u, opt_state, _ = run_steps(
            loss, optimizer, model.to_unconstrained(state.params), state.opt_state, num_steps
        )
        params = model.from_unconstrained(u)
        return GradientMState(params, opt_state), MStepInfo(obj(params, q, batch, hyper))

    return MStep(
        init,
        step,
        obj,
        optimizer=optimizer,
        to_variables=model.to_unconstrained,
        from_variables=model.from_unconstrained,
    )
