r"""The EM / VI grid: one E-step, one M-step and a schedule make a cell.

Every cell raises the same objective, the weighted ELBO plus the log prior,

.. math::
    J(\theta, q) = \frac{\sum_i w_i \,\mathrm{ELBO}_i(\theta, q_i) + \log p(\theta)}
        {\sum_i w_i}, \qquad
    \mathrm{ELBO}_i(\theta, q_i) = \log p_\theta(x_i)
        - \mathrm{KL}\big(q_i \,\|\, p_\theta(z \mid x_i)\big),

by turns in q (an E-step, :mod:`emvi.estep`) and in :math:`\theta` (an M-step,
:mod:`emvi.mstep`). The pieces are independent, so the grid is their product:

=====================  ===========================  =================================
E-step / M-step        closed form                  gradient (optax on u(theta))
=====================  ===========================  =================================
exact                  EM                           generalised EM
local (free q_i)       variational EM               variational EM, gradient M-step
amortized (encoder)    amortized EM                 VAE-style (joint or alternating)
=====================  ===========================  =================================

* E-step, :math:`q \leftarrow \arg\max_q J`: exactly (:math:`q_i = p_\theta(z \mid x_i)`,
  KL = 0), or by a few optax steps on free per-example parameters :math:`u_i`, or on an
  encoder's :math:`\phi` with :math:`u_i = f_\phi(x_i)`. ``estep.refine(amortized, local)``
  is semi-amortized VI (Kim et al., 2018).
* M-step, :math:`\theta \leftarrow \arg\max_\theta J`: ``m_step(expected_stats(q))``, or a
  few optax steps on :math:`u = \texttt{to\_unconstrained}(\theta)`.
* Schedule: :class:`Alternating` (``e_steps`` E-steps then ``m_steps`` M-steps per
  iteration; each gradient piece takes its own ``num_steps`` optax steps) or :class:`Joint`
  (one simultaneous optax step on the E-step's variables and on :math:`u`, one gradient of
  :math:`J`; needs a gradient E-step and a gradient M-step).

Nothing here knows a model: every piece uses only the :class:`emvi.em.ExactModel`
protocol, so a user's model (``docs/examples/poisson_mixture.py``) runs in every cell.
:func:`run_corner` runs a cell, timing its jitted steps and recording the exact
:math:`\log p_\theta(x)` and the ELBO of the current q; :func:`gap_decomposition` splits
an encoder's gap into approximation and amortization parts (Cremer, Li & Duvenaud, 2018) by
the local E-step started from the encoder's q.

The data are used in full at every step (no minibatches): the comparison is between
algorithms, not between gradient-noise levels.

Shape letters: ``n`` data points, ``d`` data dimension, ``t`` iterations.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from emvi import bernoulli_mixture as bm, estep, mstep
  >>> x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (50, 6)), jnp.float32)
  >>> model = bm.model()
  >>> theta0 = bm.init_params(jax.random.key(0), x, 3)
  >>> enc = estep.default_encoder(model, theta0, x)
  >>> vae = Cell(estep.amortized(model, enc), mstep.gradient(model), Joint())
  >>> res = run_corner(jax.random.key(1), vae, model, x, params=theta0, num_iters=5)
  >>> res.history.log_likelihood.shape
  (6,)
  >>> em_cell = Cell(estep.exact(model), mstep.closed(model))
  >>> h = run_corner(jax.random.key(1), em_cell, model, x, params=theta0, num_iters=5).history
  >>> bool(np.all(np.diff(h.log_likelihood) > -1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Key

from emvi import _checks, em, estep, mstep
from emvi.optim import apply_update

PyTree = Any


class Alternating(NamedTuple):
    """Per iteration, ``e_steps`` calls of the E-step, then ``m_steps`` of the M-step."""

    e_steps: int = 1
    m_steps: int = 1


class Joint(NamedTuple):
    """Per iteration, one optax step on the E-step's variables and theta together."""


ALTERNATING = Alternating()  # the default schedule: one E-step, then one M-step


class CellState(NamedTuple):
    """State of a :class:`Cell`: the E-step's (with the current q in ``e.q``) and the
    M-step's (with theta in ``m.params``)."""

    e: PyTree
    m: PyTree


class CellInfo(NamedTuple):
    """Diagnostics of one iteration (never fed back)."""

    objective: Float[Array, ""]  # J reached by the iteration's last half-step


@dataclasses.dataclass(frozen=True)
class Cell:
    """One E-step, one M-step and a schedule; hashable, so a static argument of jit.

    Attributes:
      estep: an :class:`emvi.estep.EStep`.
      mstep: an :class:`emvi.mstep.MStep`.
      schedule: :class:`Alternating` (default) or :class:`Joint`.

    Raises:
      ValueError: for a joint schedule without a gradient E-step and a gradient M-step, or
        an alternating one with step counts below 1.
    """

    estep: estep.EStep
    mstep: mstep.MStep
    schedule: Alternating | Joint = ALTERNATING

    def __post_init__(self):
        if isinstance(self.schedule, Joint):
            if self.estep.q_of is None or self.mstep.optimizer is None:
                raise ValueError(
                    "the Joint schedule takes one simultaneous gradient step on the E-step's "
                    "variables and on theta, so it needs a gradient E-step (estep.local or "
                    "estep.amortized) and a gradient M-step (mstep.gradient); use "
                    "Alternating() for exact, closed-form or refined pieces."
                )
        elif isinstance(self.schedule, Alternating):
            _checks.check_positive_int(self.schedule.e_steps, name="schedule.e_steps")
            _checks.check_positive_int(self.schedule.m_steps, name="schedule.m_steps")
        else:
            raise ValueError(
                f"schedule must be Alternating(...) or Joint(); got {self.schedule!r}."
            )

    def init(self, key: Key[Array, ""], params: PyTree, batch: estep.Batch) -> CellState:
        """The state before the first iteration (``key`` initialises an encoder)."""
        return CellState(self.estep.init(key, params, batch), self.mstep.init(params))

    def step(
        self, key: Key[Array, ""], state: CellState, batch: estep.Batch, hyper: PyTree = None
    ) -> tuple[CellState, CellInfo]:
        """One iteration of the schedule. Pure; jit it with the cell static."""
        if isinstance(self.schedule, Joint):
            return self._joint_step(state, batch, hyper)
        e_state, m_state = state
        for j in range(self.schedule.e_steps):
            e_state, _ = self.estep.step(jax.random.fold_in(key, j), e_state, m_state.params, batch)
        for j in range(self.schedule.m_steps):
            m_state, info = self.mstep.step(
                jax.random.fold_in(key, 1000 + j), m_state, e_state.q, batch, hyper
            )
        return CellState(e_state, m_state), CellInfo(info.objective)

    def _joint_step(self, state, batch, hyper):
        e, m = self.estep, self.mstep

        def loss(vu):
            v, u = vu
            return -m.objective(m.from_variables(u), e.q_of(v, batch), batch, hyper)

        v, u = state.e.variables, m.to_variables(state.m.params)
        value, (g_v, g_u) = jax.value_and_grad(loss)((v, u))
        v, e_opt = apply_update(e.optimizer, g_v, state.e.opt_state, v)
        u, m_opt = apply_update(m.optimizer, g_u, state.m.opt_state, u)
        new_e = state.e._replace(q=e.q_of(v, batch), variables=v, opt_state=e_opt)
        new_m = state.m._replace(params=m.from_variables(u), opt_state=m_opt)
        return CellState(new_e, new_m), CellInfo(-value)  # J where the step started


def cells(
    model: em.ExactModel,
    encoder: nn.Module,
    *,
    e_optimizer: optax.GradientTransformation | None = None,
    m_optimizer: optax.GradientTransformation | None = None,
    num_e_steps: int = 1,
    num_m_steps: int = 1,
) -> dict[tuple[str, str], Cell]:
    """The 3 x 2 grid for one model, keyed ``(e, m)`` with ``e`` in exact/local/amortized and
    ``m`` in closed/gradient, every cell alternating one E-step and one M-step.

    ``e_optimizer`` serves the local and the amortized E-step (None: their defaults).
    """
    es = {
        "exact": estep.exact(model),
        "local": estep.local(model, optimizer=e_optimizer, num_steps=num_e_steps),
        "amortized": estep.amortized(model, encoder, optimizer=e_optimizer, num_steps=num_e_steps),
    }
    ms = {
        "closed": mstep.closed(model),
        "gradient": mstep.gradient(model, optimizer=m_optimizer, num_steps=num_m_steps),
    }
    return {(e, m): Cell(es[e], ms[m]) for e in es for m in ms}


# ---------------------------------------------------------------------------------------
# Running a cell
# ---------------------------------------------------------------------------------------


class CornerHistory(NamedTuple):
    """Per-iteration record; row 0 is the initial state, row t the state after iteration t.

    Attributes:
      log_likelihood: (t+1,) exact weighted mean :math:`\\log p_\\theta(x_i)`.
      elbo: (t+1,) weighted mean ELBO of the cell's current q under the current theta (for
        an exact E-step, the posterior the last M-step used, so ``log_likelihood - elbo`` is
        the KL that the M-step opened; row 0 is tight).
      wall_time: (t+1,) seconds spent in the jitted steps up to row t (compilation and the
        evaluation of these diagnostics excluded; row 0 is 0).
    """

    log_likelihood: np.ndarray
    elbo: np.ndarray
    wall_time: np.ndarray


class CornerResult(NamedTuple):
    """What :func:`run_corner` returns.

    Attributes:
      cell: the :class:`Cell` that ran.
      params: the final theta (natural parametrisation), ``state.m.params``.
      state: the final :class:`CellState` (the encoder's variables, for an amortized
        E-step, in ``state.e.variables``; optimiser states included, to continue).
      history: a :class:`CornerHistory`.
      compile_time: seconds of the warm-up call (compilation plus one step whose result is
        discarded), excluded from ``history.wall_time``.
    """

    cell: Cell
    params: PyTree
    state: CellState
    history: CornerHistory
    compile_time: float


def _step_key(key, t):
    """The key of iteration t; ``key`` itself initialises the cell."""
    return jax.random.fold_in(key, t + 1)


def _cell_step(cell, key, state, batch, hyper):
    return cell.step(key, state, batch, hyper)


_step_jit = jax.jit(_cell_step, static_argnums=0)
_init_jit = jax.jit(
    lambda cell, key, params, batch: cell.init(key, params, batch), static_argnums=0
)


@functools.partial(jax.jit, static_argnames=("model",))
def _evaluate(model, params, q, batch):
    return (
        em.mean_log_prob(model, params, batch.data, batch.weights),
        estep.mean_elbo(model, params, q, batch),
    )


def run_corner(
    key: Key[Array, ""],
    cell: Cell,
    model: em.ExactModel,
    x: Float[Array | np.ndarray, "n d"],
    *,
    params: PyTree,
    num_iters: int,
    hyper: PyTree = None,
    weights: Float[Array | np.ndarray, " n"] | None = None,
    progress: bool = False,
) -> CornerResult:
    """Runs one cell of the grid for ``num_iters`` iterations.

    The step is jitted (the inner optax loops run on device as ``lax.scan``) and warmed up
    before the clock starts; the outer loop is a Python loop so that each iteration can be
    timed, and after each one the exact mean log-likelihood and the mean ELBO of the cell's
    q are recorded (outside the timed region).

    Args:
      key: a typed PRNG key: ``cell.init`` gets it (an encoder's initialisation, as
        ``encoder.init(key, x[:1])``), and iteration t gets ``fold_in(key, t + 1)``.
      cell: a :class:`Cell` built from pieces for ``model``.
      model: the :class:`emvi.em.ExactModel` the pieces were built for (its ``log_prob``
        and ``elbo`` make the history).
      x: data (n, d), before ``prepare``.
      params: the initial theta, e.g. from the model's ``init_params``; pass the same one to
        every cell to compare them.
      num_iters: iterations (>= 1).
      hyper: the model's hyperparameters (``m_step`` and ``log_prior``), e.g. a prior.
      weights: per-example weights (n,), ones if None.
      progress: show a tqdm progress bar.

    Returns:
      A :class:`CornerResult`.

    Raises:
      ValueError: for a ``cell`` that is not a :class:`Cell`, ``num_iters < 1`` or data
        that is not a finite 2-D array.
    """
    key = _checks.as_key(key)
    if not isinstance(cell, Cell):
        raise ValueError(f"cell must be a grid.Cell; got {type(cell).__name__}.")
    arr = _checks.as_data_matrix(x)
    num_iters = _checks.check_positive_int(num_iters, name="num_iters")
    if weights is not None:
        weights = _checks.check_sample_weight(weights, arr.shape[0])
    batch = estep.make_batch(model, arr, weights)
    state = _init_jit(cell, key, params, batch)
    t0 = time.perf_counter()  # warm-up: compile and run once, discarding the result
    jax.block_until_ready(_step_jit(cell, _step_key(key, 0), state, batch, hyper))
    compile_time = time.perf_counter() - t0
    rows = [tuple(float(v) for v in _evaluate(model, state.m.params, state.e.q, batch))]
    times = [0.0]
    iterator = range(num_iters)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, leave=False)
    for t in iterator:
        t0 = time.perf_counter()
        state, _ = _step_jit(cell, _step_key(key, t), state, batch, hyper)
        jax.block_until_ready(state)
        times.append(times[-1] + time.perf_counter() - t0)
        rows.append(tuple(float(v) for v in _evaluate(model, state.m.params, state.e.q, batch)))
    ll, elbo = (np.array(col) for col in zip(*rows, strict=True))
    history = CornerHistory(ll, elbo, np.array(times))
    return CornerResult(cell, state.m.params, state, history, compile_time)


def time_to_reach(history: CornerHistory, *, tol: float = 0.1) -> float:
    """Seconds until the log-likelihood first comes within ``tol`` nats of its final value."""
    ll = np.asarray(history.log_likelihood)
    hit = np.nonzero(np.abs(ll - ll[-1]) <= tol)[0]
    return float(np.asarray(history.wall_time)[hit[0]])


class CellTrace(NamedTuple):
    """What :func:`run_cell` records; row 0 is the initial state, row t after iteration t.

    Attributes:
      log_likelihood: (t+1,) exact weighted mean :math:`\\log p_\theta(x_i)`.
      elbo: (t+1,) weighted mean ELBO of the current q under the current theta.
      log_prior: (t+1,) :math:`\\log p(\theta) / \\sum_i w_i` (0 without a log prior), so
        that ``elbo + log_prior`` is the objective J every cell climbs.
    """

    log_likelihood: Float[Array, " t"]
    elbo: Float[Array, " t"]
    log_prior: Float[Array, " t"]


def run_cell(
    key: Key[Array, ""],
    cell: Cell,
    model: em.ExactModel,
    params: PyTree,
    batch: estep.Batch,
    hyper: PyTree = None,
    *,
    num_iters: int,
) -> tuple[CellState, CellTrace]:
    """Runs ``cell`` for ``num_iters`` iterations on device (a ``lax.scan``), untimed.

    Pure: jit it with ``cell``, ``model`` and ``num_iters`` static. Keys as in
    :func:`run_corner`. :func:`run_corner` is the timed, Python-loop version.

    Returns:
      ``(final_state, trace)``.
    """
    key = _checks.as_key(key)
    wsum = jnp.sum(batch.weights)

    def record(state):
        p = state.m.params
        lp = model.log_prior(p, hyper) if model.log_prior is not None else jnp.zeros((), wsum.dtype)
        return CellTrace(
            em.mean_log_prob(model, p, batch.data, batch.weights),
            estep.mean_elbo(model, p, state.e.q, batch),
            (lp / wsum).astype(wsum.dtype),
        )

    def body(state, t):
        state, _ = cell.step(_step_key(key, t), state, batch, hyper)
        return state, record(state)

    state = cell.init(key, params, batch)
    final, rows = lax.scan(body, state, jnp.arange(num_iters))
    first = record(state)
    trace = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rows)
    return final, trace


# ---------------------------------------------------------------------------------------
# Inference gaps (Cremer, Li & Duvenaud, 2018)
# ---------------------------------------------------------------------------------------


class GapReport(NamedTuple):
    r"""Cremer et al.'s split of the inference gap, in nats per example (weighted means).

    ``log_likelihood - elbo_amortized = approximation_gap + amortization_gap`` with

    * ``approximation_gap`` :math:`= \log p(x) - \mathrm{ELBO}(q^*)`, :math:`q^*` the best
      member of the variational family for each x (the local E-step's result);
    * ``amortization_gap`` :math:`= \mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\phi)`.
    """

    log_likelihood: float
    elbo_best: float
    elbo_amortized: float
    approximation_gap: float
    amortization_gap: float


@functools.partial(jax.jit, static_argnames=("model", "local_step"))
def _gap(key, model, local_step, params, q, batch):
    q_best, _ = estep.ascend_from(key, local_step, q, params, batch)
    ll = em.mean_log_prob(model, params, batch.data, batch.weights)
    return (
        ll,
        estep.mean_elbo(model, params, q_best, batch),
        estep.mean_elbo(model, params, q, batch),
    )


def gap_decomposition(
    key: Key[Array, ""],
    model: em.ExactModel,
    params: PyTree,
    q: PyTree,
    x: Float[Array | np.ndarray, "n d"],
    *,
    local_step: estep.EStep,
    weights: Float[Array | np.ndarray, " n"] | None = None,
) -> GapReport:
    r"""Splits :math:`\log p(x) - \mathrm{ELBO}(q)` for an encoder's q (on train or test x).

    :math:`q^*` is ``local_step`` (an :func:`emvi.estep.local`, with as many steps as it
    takes to converge) started from ``q`` itself, so it can only improve on it. With a few
    steps instead, ``elbo_best`` is the ELBO of the semi-amortized q (Kim et al., 2018) and
    ``amortization_gap`` what those steps closed.

    Args:
      key: a typed PRNG key for the local step.
      model: the :class:`emvi.em.ExactModel`.
      params: theta.
      q: the encoder's q for ``x``, in the layout of ``model.posterior``, e.g.
        ``amortized.q_of(phi, estep.make_batch(model, x))``.
      x: data (n, d).
      local_step: the local E-step that finds :math:`q^*`.
      weights: per-example weights (n,), ones if None.

    Raises:
      ValueError: when ``local_step`` cannot start from a given q, or for bad data.
    """
    key = _checks.as_key(key)
    if local_step.start is None:
        raise ValueError("local_step must start from a given q: pass an estep.local(...).")
    arr = _checks.as_data_matrix(x)
    if weights is not None:
        weights = _checks.check_sample_weight(weights, arr.shape[0])
    batch = estep.make_batch(model, arr, weights)
    ll, e_best, e_q = (float(v) for v in _gap(key, model, local_step, params, q, batch))
    return GapReport(ll, e_best, e_q, ll - e_best, e_best - e_q)
