r"""The one optimiser loop: ``num_steps`` optax steps in a ``lax.scan``.

Every gradient-based piece of emvi (the gradient M-step, the local and amortized E-steps of
:mod:`emvi.grid`, the training loop of :mod:`emvi.train`) takes its steps through
:func:`run_steps`, so there is one place where a step is defined:

.. math::
    g_t = \nabla_\theta L(\theta_t, t), \qquad (u_t, s_{t+1}) = \mathrm{update}(g_t, s_t,
    \theta_t), \qquad \theta_{t+1} = \theta_t + u_t.

The loss receives the global step ``t``, so schedules (KL annealing, free-bits warm-up) need
no tricks. :func:`run_lbfgs` is the deterministic counterpart for a smooth full-batch loss:
``optax.lbfgs`` steps in a ``lax.while_loop`` until the gradient norm falls below a tolerance.

Example:
  >>> import optax
  >>> opt = optax.sgd(0.5)
  >>> p, s, losses = run_steps(lambda p, t: (p - 3.0) ** 2, opt, 0.0, opt.init(0.0), 20)
  >>> round(float(p), 4), losses.shape
  (3.0, (20,))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, Float

PyTree = Any


def apply_update(
    optimizer: optax.GradientTransformation, grads: PyTree, opt_state: PyTree, params: PyTree
) -> tuple[PyTree, PyTree]:
    """One optax step: ``updates = optimizer.update(grads, ...)``, then ``params + updates``.

    optax's bias corrections (Adam and friends) compute ``decay ** count`` with an int32
    ``count``, which JAX's strict dtype promotion (the mode emvi's tests run in) rejects; the
    update therefore runs under standard promotion. The setting acts at trace time only, so
    it is free under ``jit``. Call this instead of ``optimizer.update`` everywhere.

    Returns:
      ``(new_params, new_opt_state)``.
    """
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def run_steps(
    loss_fn: Callable[[PyTree, Array], Array],
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    num_steps: int,
    *,
    step0: int | Array = 0,
    has_aux: bool = False,
) -> tuple[PyTree, PyTree, Float[Array, " s"] | tuple[Float[Array, " s"], PyTree]]:
    """Minimises ``loss_fn(params, step)`` by ``num_steps`` optax steps (on device).

    Args:
      loss_fn: ``(params, step) -> scalar``, or ``-> (scalar, aux)`` with ``has_aux``;
        ``step`` is the global step (int32).
      optimizer: an optax transformation.
      params: the starting point (any pytree of float arrays).
      opt_state: ``optimizer.init(params)`` or a state carried over from earlier steps.
      num_steps: how many steps (static, >= 1).
      step0: the global step of the first step taken here.
      has_aux: ``loss_fn`` returns ``(loss, aux)`` (any pytree of arrays).

    Returns:
      ``(params, opt_state, losses)`` with ``losses[j]`` the loss *before* step ``j``; with
      ``has_aux``, ``losses`` is ``(losses, aux)`` with every aux leaf stacked over steps.
    """

    def body(carry, step):
        p, s = carry
        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(p, step)
        p, s = apply_update(optimizer, grads, s, p)
        return (p, s), out

    steps = jnp.asarray(step0, jnp.int32) + jnp.arange(num_steps, dtype=jnp.int32)
    (params, opt_state), losses = lax.scan(body, (params, opt_state), steps)
    return params, opt_state, losses


def run_lbfgs(
    loss_fn: Callable[[PyTree], Array],
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    max_steps: int,
    *,
    grad_tol: float,
) -> tuple[PyTree, PyTree, Array, Array]:
    r"""Minimises a deterministic ``loss_fn(params)`` by up to ``max_steps`` L-BFGS steps.

    The steps run on device in a ``lax.while_loop`` that stops early once
    :math:`\|\nabla L(\theta_t)\|_2 <` ``grad_tol`` (the gradient kept in the optimiser
    state, so no extra evaluation); at least one step is taken. Call it repeatedly with
    the returned state to continue in chunks (to log between them).

    Args:
      loss_fn: ``params -> scalar``, smooth (no step argument: L-BFGS's line search
        evaluates it at trial points).
      optimizer: ``optax.lbfgs(...)`` (any optax transformation that takes ``value``,
        ``grad`` and ``value_fn`` in its update).
      params: the starting point.
      opt_state: ``optimizer.init(params)`` or the state of a previous call.
      max_steps: the most steps of this call (static, >= 1).
      grad_tol: the gradient-norm tolerance.

    Returns:
      ``(params, opt_state, steps, grad_norm)``: ``steps`` taken (int32) and the norm of
      the last gradient the optimiser saw.

    Example:
      >>> p, _, steps, g = run_lbfgs(lambda p: jnp.sum((p - 2.0) ** 2), optax.lbfgs(),
      ...                            jnp.zeros(3), optax.lbfgs().init(jnp.zeros(3)), 20,
      ...                            grad_tol=1e-8)
      >>> [round(float(v), 6) for v in p], int(steps) < 20
      ([2.0, 2.0, 2.0], True)
    """
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def norm(s):
        return optax.tree.norm(optax.tree.get(s, "grad"))

    def cond(carry):
        _, s, i = carry
        return (i < max_steps) & ((i == 0) | (norm(s) >= grad_tol))

    def body(carry):
        p, s, i = carry
        value, grad = value_and_grad(p, state=s)
        updates, s = optimizer.update(grad, s, p, value=value, grad=grad, value_fn=loss_fn)
        return optax.apply_updates(p, updates), s, i + 1

    with jax.numpy_dtype_promotion("standard"):  # optax's L-BFGS mixes int32 and floats
        params, opt_state, steps = lax.while_loop(
            cond, body, (params, opt_state, jnp.asarray(0, jnp.int32))
        )
        return params, opt_state, steps, norm(opt_state)
