r"""One EM driver for every model with an exact posterior.

EM is coordinate ascent on the ELBO. For data :math:`x_{1:n}` with weights :math:`w_i`,

.. math::
    \sum_i w_i \log p_\theta(x_i) = \sum_i w_i \big(\mathrm{ELBO}_i(q_i, \theta)
        + \mathrm{KL}(q_i \,\|\, p_\theta(z \mid x_i))\big).

* **E-step**: :math:`q_i \leftarrow p_{\theta_t}(z \mid x_i)`; the KL vanishes and the bound
  touches the log-likelihood.
* **M-step**: :math:`\theta_{t+1} = \arg\max_\theta \sum_i w_i E_{q_i}[\log p_\theta(x_i, z)]`,
  which only needs the *expected sufficient statistics* :math:`\sum_i w_i E_{q_i}[T(x_i, z)]`.

So a model is a handful of pure functions (an :class:`ExactModel`): the E-step returns the
statistics *summed over the data* together with the weighted log-likelihood, which makes
chunking, streaming and ``psum`` across devices a matter of adding statistics; the M-step
maps summed statistics to parameters in closed form. Each full iteration never lowers the
log-likelihood (the M-step raises the bound, which equals the likelihood at the old
parameters and lies below it everywhere else).

The driver follows scikit-learn's stopping rule: iteration ``t`` records the mean
log-likelihood of the parameters it starts from, and the loop stops once two consecutive
records differ by less than ``tol`` (``tol=0`` runs exactly ``max_iter`` iterations).

Restarts (a leading axis ``r`` of the initial parameters) run as one program: as
``jax.vmap`` of the loop, or, when the model's E-step carries a batched version of itself
(:class:`BatchedEStep`), as one loop over all restarts whose E-step is that batched call
(:func:`emvi.gmm.batched_e_step` folds the restarts into the component axis and takes the
rows in blocks). Both give the same results: a converged restart's parameters are frozen
while the others run on, exactly as ``vmap`` of a ``lax.while_loop`` does.

Shape letters: ``n`` data points, ``t`` iterations, ``r`` restarts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from emvi import _checks

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BatchedEStep:
    """An E-step that can also run many restarts at once: what a model's ``e_step`` may be.

    Calling it is calling ``e_step``. ``batched`` is ``(params_r, data, weights) ->
    (stats_r, log_lik_sums)``: ``params_r`` carries a leading restart axis ``r`` on every
    leaf, and it returns what ``jax.vmap(e_step, in_axes=(0, None, None))`` returns (the
    statistics of each restart with leading axis r, and the (r,) weighted log-likelihood
    sums), computed in one pass over the data (a mixture folds the restarts into its
    component axis). :func:`fit` and :func:`run_em_restarts` use it for r > 1.

    The batched E-step rides on the E-step it batches, not beside it in the model, so a
    model derived by replacing ``e_step`` (``model._replace(e_step=...)``, as
    :func:`emvi.missing.fixed_responsibilities` and :func:`emvi.parallel.data_parallel` do)
    loses it, instead of keeping a batched version of the old E-step.

    Example:
      >>> def e(params, x, w):
      ...     return jnp.sum(w * x) * params, jnp.sum(w)
      >>> def e_r(params_r, x, w):
      ...     return jnp.sum(w * x) * params_r, jnp.broadcast_to(jnp.sum(w), params_r.shape)
      >>> step = BatchedEStep(e, e_r)
      >>> float(step(jnp.asarray(2.0), jnp.ones(3), jnp.ones(3))[0])
      6.0
    """

    e_step: Callable[..., tuple[PyTree, Array]]
    batched: Callable[..., tuple[PyTree, Array]]

    def __call__(self, params: PyTree, data: PyTree, weights: Array) -> tuple[PyTree, Array]:
        return self.e_step(params, data, weights)


class ExactModel(NamedTuple):
    r"""A latent-variable model with a tractable posterior, as pure functions: the one protocol.

    Every model module of emvi (``gmm``, ``bernoulli_mixture``, ``linear_gaussian``, ``hmm``,
    a user's own) returns one of these from its ``model(...)`` function, and every algorithm
    of the EM/VI grid (:mod:`emvi.grid`) and the fit driver (:func:`fit`) use nothing else.
    The tuple is hashable (it holds only functions), so it is passed to jitted drivers as a
    static argument; every array-valued hyperparameter travels in ``hyper`` instead.

    ``data`` below is what ``prepare(x)`` returns (``x`` itself when ``prepare`` is None), a
    pytree with leading axis ``n``; ``q`` is a pytree of per-example variational parameters
    with leading axis ``n`` in the layout of ``posterior``'s output (responsibilities (n, k)
    for a finite latent, a Gaussian's mean and covariance for a continuous one).

    The exact face (EM):

    Attributes:
      e_step: ``(params, data, weights) -> (stats, log_lik_sum)``. ``stats`` is a pytree of
        expected sufficient statistics summed over the data with ``weights`` (n,);
        ``log_lik_sum`` is :math:`\sum_i w_i \log p(x_i)` at ``params``. It may be a
        :class:`BatchedEStep`, which also runs many restarts in one call (then
        ``batched_e_step`` is that call; a speed-up, never a change of results).
      m_step: ``(stats, hyper) -> params``, the closed-form maximiser of the expected
        complete-data log-likelihood (plus log-prior for MAP-EM).
      log_prob: ``(params, data) -> (n,)``, :math:`\log p(x_i)`.
      posterior: ``(params, data) -> q``, the exact posterior of each example.
      elbo: ``(params, q, data) -> (n,)``,
        :math:`E_{q_i}[\log p(x_i, z)] - E_{q_i}[\log q_i(z)]`; differentiable in both
        ``params`` and ``q`` (the gradient M-step and the local variational E-step climb it).
      prepare: optional ``x -> data``, run once before the loop (for example to precompute
        outer products).
      expected_stats: optional ``(q, data, weights) -> stats``, the statistics that
        ``e_step`` would return for an *arbitrary* q. With it, any q (an encoder's, a local
        optimiser's) drives the closed-form M-step: ``m_step(expected_stats(q, data, w),
        hyper)``. ``e_step(params, data, w)`` equals
        ``expected_stats(posterior(params, data), data, w)`` plus the log-likelihood.

    The gradient face (generalised EM, variational EM, VAEs; in the manner of dynamax's
    parameter properties, kept with the model):

    Attributes:
      to_unconstrained: ``params -> u``, a pytree of unconstrained real arrays.
      from_unconstrained: ``u -> params``, the inverse; every real ``u`` is valid.
      log_prior: optional ``(params, hyper) -> scalar``, the log prior that ``m_step`` adds
        for MAP estimation (up to a constant); the gradient M-step adds it too, so both
        M-steps climb the same objective. None means a flat prior.
      q_to_unconstrained: ``q -> (n, m)``, the variational parameters of each example as
        one unconstrained vector (an encoder's output layer, a local optimiser's variable).
      q_from_unconstrained: ``(n, m) -> q``, the inverse.
    """

    e_step: Callable[..., tuple[PyTree, Array]]
    m_step: Callable[..., PyTree]
    log_prob: Callable[..., Array]
    posterior: Callable[..., PyTree]
    elbo: Callable[..., Array]
    prepare: Callable[..., PyTree] | None = None
    expected_stats: Callable[..., PyTree] | None = None
    to_unconstrained: Callable[[PyTree], PyTree] | None = None
    from_unconstrained: Callable[[PyTree], PyTree] | None = None
    log_prior: Callable[[PyTree, PyTree], Array] | None = None
    q_to_unconstrained: Callable[[PyTree], Array] | None = None
    q_from_unconstrained: Callable[[Array], PyTree] | None = None

    def prepare_data(self, x: PyTree) -> PyTree:
        """``prepare(x)``, or ``x`` itself when the model has no ``prepare``."""
        return self.prepare(x) if self.prepare is not None else x

    @property
    def batched_e_step(self) -> Callable[..., tuple[PyTree, Array]] | None:
        """The optional batched E-step ``(params_r, data, weights) -> (stats_r, log_lik_sums)``
        over a leading restart axis: ``e_step.batched`` when ``e_step`` is a
        :class:`BatchedEStep`, else None (the restarts are then ``vmap``-ped)."""
        return getattr(self.e_step, "batched", None)


def require(model: ExactModel, *fields: str, purpose: str) -> None:
    """Raises a ``ValueError`` naming what ``model`` lacks for ``purpose``.

    Example:
      >>> m = ExactModel(*(lambda *a: None for _ in range(5)))
      >>> require(m, "expected_stats", purpose="amortized EM")
      Traceback (most recent call last):
        ...
      ValueError: amortized EM needs the model's expected_stats, which this model lacks.
    """
    missing = [f for f in fields if getattr(model, f) is None]
    if missing:
        names = " and ".join(missing)
        raise ValueError(f"{purpose} needs the model's {names}, which this model lacks.")


class EMState(NamedTuple):
    """Loop state of :func:`em_init` / :func:`em_step`."""

    params: PyTree
    log_likelihood: Float[Array, ""]  # mean log-lik recorded by the last step (-inf at start)
    iteration: Int[Array, ""]
    converged: Bool[Array, ""]


class EMInfo(NamedTuple):
    """Diagnostics of one EM iteration (never fed back into the state)."""

    log_likelihood: Float[Array, ""]  # mean log-lik at the parameters the step started from
    change: Float[Array, ""]


class EMResult(NamedTuple):
    """What :func:`run_em` returns.

    Attributes:
      params: the parameters after the last M-step.
      log_likelihood: mean (weighted) log-likelihood *of the returned params*, computed by one
        extra pass after the loop (scikit-learn's ``lower_bound_`` is instead the value at the
        parameters before the last M-step, that is ``history[num_iter - 1]``).
      history: (max_iter,) mean log-likelihood at the start of each iteration; entries at and
        beyond ``num_iter`` are NaN because those iterations never ran.
      num_iter: iterations run (each one E-step and one M-step).
      converged: whether the stopping rule fired before ``max_iter``.
    """

    params: PyTree
    log_likelihood: Float[Array, ""]
    history: Float[Array, " t"]
    num_iter: Int[Array, ""]
    converged: Bool[Array, ""]


def _leading_dim(data: PyTree) -> int:
    return jax.tree_util.tree_leaves(data)[0].shape[0]


def chunked_e_step(
    model: ExactModel,
    params: PyTree,
    data: PyTree,
    weights: Float[Array, " n"],
    *,
    chunk_size: int | None = None,
) -> tuple[PyTree, Float[Array, ""]]:
    """Runs ``model.e_step`` over chunks of the data and sums the statistics.

    Because statistics are sums over examples, the result equals the one-shot E-step up to
    floating-point reassociation, while only ``chunk_size`` examples are in memory at once.
    Padding rows carry weight 0. The data's padding rows are copies of its first row, so the
    model is never evaluated on made-up values.
    """
    return sum_over_chunks(model.e_step, params, data, weights, chunk_size=chunk_size)


def sum_over_chunks(
    e_step: Callable[..., tuple[PyTree, Array]],
    params: PyTree,
    data: PyTree,
    weights: Float[Array, " n"],
    *,
    chunk_size: int | None,
) -> tuple[PyTree, Array]:
    """``e_step(params, data, weights)`` for any function returning sums over the data,
    computed over chunks of ``chunk_size`` rows (padded as in :func:`chunked_e_step`) and
    added; one call when ``chunk_size`` is None or at least n.

    :func:`chunked_e_step` is this for ``model.e_step``; the restarts' batched E-step
    (:class:`BatchedEStep`) is chunked by it too, and a model may use it to block its own
    E-step over rows.
    """
    n = _leading_dim(data)
    if chunk_size is None or chunk_size >= n:
        return e_step(params, data, weights)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n

    def pad_and_split(leaf, zero_fill=False):
        if pad:
            filler = jnp.broadcast_to(leaf[:1], (pad, *leaf.shape[1:]))
            if zero_fill:
                filler = jnp.zeros_like(filler)
            leaf = jnp.concatenate([leaf, filler], axis=0)
        return leaf.reshape(num_chunks, chunk_size, *leaf.shape[1:])

    chunks = jax.tree_util.tree_map(pad_and_split, data)
    w = pad_and_split(weights, zero_fill=True)

    def body(carry, chunk):
        stats, ll = carry
        chunk_data, chunk_w = chunk
        s, l_ = e_step(params, chunk_data, chunk_w)
        return (jax.tree_util.tree_map(jnp.add, stats, s), ll + l_), None

    # The sums start from zeros (0 + s is s exactly) rather than from the first chunk's
    # E-step, so that ``e_step`` is traced once. With a separate first call, XLA hoisted the
    # scan body's parameter-only work (a GMM's Cholesky solves) out of the loop without
    # merging it with the first call's, and two LAPACK calls that may run at once deadlock
    # jaxlib 0.10.2's CPU runtime (issue 13; tests/test_hang_regression.py).
    shapes = jax.eval_shape(e_step, params, jax.tree_util.tree_map(lambda c: c[0], chunks), w[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (stats, ll), _ = lax.scan(body, zeros, (chunks, w))
    return stats, ll


def em_init(params: PyTree) -> EMState:
    """The state before the first iteration."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    return EMState(
        params=params,
        log_likelihood=jnp.array(-jnp.inf, dtype),
        iteration=jnp.array(0, jnp.int32),
        converged=jnp.array(False),
    )


def em_step(
    model: ExactModel,
    state: EMState,
    data: PyTree,
    weights: Float[Array, " n"],
    *,
    tol: float | Array = 0.0,
    hyper: PyTree = None,
    chunk_size: int | None = None,
) -> tuple[EMState, EMInfo]:
    """One EM iteration: exact E-step (expected statistics), then closed-form M-step."""
    stats, ll_sum = chunked_e_step(model, state.params, data, weights, chunk_size=chunk_size)
    ll = (ll_sum / jnp.sum(weights)).astype(state.log_likelihood.dtype)
    new_params = model.m_step(stats, hyper)
    change = ll - state.log_likelihood
    converged = jnp.abs(change) < tol
    new_state = EMState(new_params, ll, state.iteration + 1, converged)
    return new_state, EMInfo(ll, change)


def mean_log_prob(
    model: ExactModel, params: PyTree, data: PyTree, weights: Float[Array, " n"]
) -> Float[Array, ""]:
    """Weighted mean log-likelihood :math:`\\sum_i w_i \\log p(x_i) / \\sum_i w_i`."""
    return jnp.sum(weights * model.log_prob(params, data)) / jnp.sum(weights)


def run_em(
    model: ExactModel,
    params: PyTree,
    data: PyTree,
    weights: Float[Array, " n"] | None = None,
    *,
    max_iter: int,
    tol: float | Array = 1e-3,
    hyper: PyTree = None,
    chunk_size: int | None = None,
) -> EMResult:
    """Runs EM to convergence on device (``lax.while_loop``); jit- and vmap-able.

    ``data`` is what ``model.prepare`` returns (or ``x`` itself when the model has none);
    :func:`fit_em` calls ``prepare`` for you.

    Args:
      model: the model's pure functions (static).
      params: initial parameters.
      data: pytree with leading axis ``n``.
      weights: per-example weights (n,), ones if None.
      max_iter: the most iterations to run (static).
      tol: stop when the mean log-likelihood changes by less than this between iterations.
      hyper: array-valued hyperparameters passed to ``model.m_step`` (priors, ``reg_covar``).
      chunk_size: run the E-step over chunks of this many examples (static).

    Returns:
      An :class:`EMResult`.

    Raises:
      ValueError: for ``max_iter`` not an integer >= 1, ``chunk_size`` not None or an
        integer >= 1, and (when the arguments are concrete, not traced) a negative ``tol``,
        non-finite data, weights of the wrong shape, negative, non-finite or all zero, or
        ``params`` that do not fit the data (see :func:`fit`).
    """
    _validate(
        model,
        params,
        data,
        weights,
        hyper,
        max_iter=max_iter,
        tol=tol,
        chunk_size=chunk_size,
        prepared=True,
        lead_axes=0,
    )
    n = _leading_dim(data)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    if weights is None:
        weights = jnp.ones(n, dtype)
    history0 = jnp.full((max_iter,), jnp.nan, dtype)

    def cond(carry):
        state, _ = carry
        return (state.iteration < max_iter) & ~state.converged

    def body(carry):
        state, history = carry
        new_state, info = em_step(
            model, state, data, weights, tol=tol, hyper=hyper, chunk_size=chunk_size
        )
        history = history.at[state.iteration].set(info.log_likelihood)
        return new_state, history

    state, history = lax.while_loop(cond, body, (em_init(params), history0))
    final_ll = mean_log_prob(model, state.params, data, weights)
    return EMResult(state.params, final_ll, history, state.iteration, state.converged)


# ---------------------------------------------------------------------------------------
# Eager validation of the driver's inputs (static checks always; values only when concrete)
# ---------------------------------------------------------------------------------------


def _check_settings(*, max_iter, tol, chunk_size, name_iter: str = "max_iter") -> None:
    """Loop settings. ``max_iter`` and ``chunk_size`` are static, so checked even under jit."""
    _checks.check_positive_int(max_iter, name=name_iter)
    if tol is None or (_checks.is_concrete(tol) and jnp.ndim(tol) == 0):
        _checks.check_nonnegative(tol, name="tol")
    if chunk_size is not None:
        _checks.check_positive_int(chunk_size, name="chunk_size")


def _check_data(x: PyTree, *, allow_missing: bool, name: str = "x") -> int:
    """Every leaf of ``x`` has a leading data axis; floating leaves follow the dtype rule
    and, when concrete, are finite (NaN allowed with ``allow_missing``). Returns ``n``."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError(f"{name} is empty (a pytree without arrays).")
    for leaf in leaves:
        shape, dtype = tuple(jnp.shape(leaf)), np.dtype(jnp.result_type(leaf))
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(
                f"{name} needs a leading axis of at least one data point; got shape {shape}."
            )
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            continue  # counts, categories, sequence lengths
        _checks.float_dtype(dtype, name=name)
        if _checks.is_concrete(leaf):
            values = np.asarray(leaf)
            bad = np.isinf(values) if allow_missing else ~np.isfinite(values)
            if bad.any():
                hint = (
                    ""
                    if allow_missing
                    else " (a model that marginalises missing entries passes allow_missing=True)"
                )
                raise ValueError(
                    f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
                    f"remove or impute them first{hint}."
                )
    return _leading_dim(x)


def _check_weights(weights, shape: tuple[int, ...], name: str = "weights") -> None:
    """Shape always; finite, >= 0 and not all zero (per data set) when concrete."""
    if weights is None:
        return
    if tuple(jnp.shape(weights)) != shape:
        raise ValueError(
            f"{name} must have shape {shape} to match the data; got {tuple(jnp.shape(weights))}."
        )
    if _checks.is_concrete(weights):
        for row in np.asarray(weights).reshape(-1, shape[-1]):
            _checks.check_sample_weight(row, shape[-1], name=name)


def _one_iteration(params, x, weights, hyper, *, model, prepared):
    data = x if prepared else model.prepare_data(x)
    if weights is None:
        weights = jnp.ones(_leading_dim(data), jax.tree_util.tree_leaves(params)[0].dtype)
    stats, _ = model.e_step(params, data, weights)
    return model.m_step(stats, hyper)


# Only ever traced (``.eval_shape``), never run: jit's cache makes a repeated check free.
_one_iteration_jit = jax.jit(_one_iteration, static_argnames=("model", "prepared"))


def _check_params_fit(model, params, x, weights, hyper, *, prepared: bool) -> None:
    """One *abstract* EM iteration (nothing is computed): the M-step must return params of
    the structure, shapes and dtypes it was given, which the loop needs. Params made for
    data with other columns fail here (as a mismatch, or as an error of the E-step)."""
    try:
        out = _one_iteration_jit.eval_shape(
            params, x, weights, hyper, model=model, prepared=prepared
        )
    except (TypeError, ValueError, IndexError, AssertionError) as err:
        raise ValueError(
            "params do not fit the data: the model's E-step or M-step fails on them "
            f"({type(err).__name__}: {str(err)[:300]}). Are params from this model's "
            "init_params, for data with these columns?"
        ) from err
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(params):
        raise ValueError(
            "params do not fit the model: its M-step returns the structure "
            f"{jax.tree_util.tree_structure(out)}, but params has "
            f"{jax.tree_util.tree_structure(params)}."
        )
    new_leaves = jax.tree_util.tree_flatten_with_path(out)[0]
    for (path, new), old in zip(new_leaves, jax.tree_util.tree_leaves(params), strict=True):
        old_shape, old_dtype = tuple(jnp.shape(old)), jnp.result_type(old)
        if tuple(new.shape) != old_shape or new.dtype != old_dtype:
            raise ValueError(
                f"params do not fit the data: params{jax.tree_util.keystr(path)} has shape "
                f"{old_shape} ({old_dtype}), but one EM iteration on this data makes it "
                f"{tuple(new.shape)} ({new.dtype}). Are params from this model's "
                "init_params, for data with these columns and this dtype?"
            )


def _leading_axes(params: PyTree, axes: int) -> tuple[int, ...]:
    """The leading (data set, restart) axes every leaf of ``params`` must share."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params is empty (a pytree without arrays).")
    leads = {tuple(jnp.shape(leaf))[:axes] for leaf in leaves}
    lead = next(iter(leads))
    if len(leads) != 1 or len(lead) != axes or 0 in lead:
        what = "a leading restart axis r >= 1" if axes == 1 else "leading axes (b, r)"
        raise ValueError(
            f"params must have {what} shared by every leaf (a stack of initialisations); "
            f"got leaf shapes {[tuple(jnp.shape(leaf)) for leaf in leaves]}."
        )
    return lead


def _validate(
    model: ExactModel,
    params: PyTree,
    x: PyTree,
    weights,
    hyper,
    *,
    max_iter,
    tol,
    chunk_size,
    prepared: bool,
    lead_axes: int,
    allow_missing: bool = False,
    name_iter: str = "max_iter",
) -> None:
    """The checks of every public driver: ``lead_axes`` is 0 for one initialisation, 1 for
    a restart axis (``fit``), 2 for (data set, restart) axes (``fit_many``, whose data and
    weights carry the data-set axis too)."""
    if not isinstance(model, ExactModel):
        raise ValueError(f"model must be an emvi.em.ExactModel; got {type(model).__name__}.")
    _check_settings(max_iter=max_iter, tol=tol, chunk_size=chunk_size, name_iter=name_iter)
    lead = _leading_axes(params, lead_axes) if lead_axes else ()
    one_x = x if lead_axes < 2 else jax.tree_util.tree_map(lambda leaf: leaf[0], x)
    n = _check_data(one_x, allow_missing=allow_missing)
    _check_weights(weights, (lead[0], n) if lead_axes == 2 else (n,))
    if not _checks.is_concrete((params, x, weights, hyper)):
        return
    one = params
    for _ in range(lead_axes):
        one = jax.tree_util.tree_map(lambda leaf: leaf[0], one)
    one_w = weights[0] if (weights is not None and lead_axes == 2) else weights
    _check_params_fit(model, one, one_x, one_w, hyper, prepared=prepared)


def select_best(results: EMResult) -> tuple[EMResult, Int[Array, ""]]:
    """Picks the restart with the highest final log-likelihood (NaN counts as -inf)."""
    ll = jnp.where(jnp.isnan(results.log_likelihood), -jnp.inf, results.log_likelihood)
    best = jnp.argmax(ll)
    return jax.tree_util.tree_map(lambda leaf: leaf[best], results), best


def _run_restarts(model, params, data, weights, *, max_iter, tol, hyper, chunk_size) -> EMResult:
    """Every restart (leading axis r of ``params``) to convergence: an :class:`EMResult` whose
    leaves have a leading axis r. ``vmap`` of :func:`run_em`, or, when the model has a
    ``batched_e_step`` and r > 1, :func:`_run_em_batched` (the same results)."""
    r = _leading_axes(params, 1)[0]
    if model.batched_e_step is None or r == 1:
        return jax.vmap(
            lambda p: run_em(
                model,
                p,
                data,
                weights,
                max_iter=max_iter,
                tol=tol,
                hyper=hyper,
                chunk_size=chunk_size,
            )
        )(params)
    return _run_em_batched(
        model, params, data, weights, max_iter=max_iter, tol=tol, hyper=hyper, chunk_size=chunk_size
    )


def _check_batched_e_step(model: ExactModel, params: PyTree, data: PyTree, weights) -> None:
    """At trace time: ``batched_e_step`` must return the structure, shapes and dtypes of
    ``vmap(e_step)`` (nothing is computed)."""
    want = jax.eval_shape(jax.vmap(model.e_step, in_axes=(0, None, None)), params, data, weights)
    got = jax.eval_shape(model.batched_e_step, params, data, weights)
    leaves_got, tree_got = jax.tree_util.tree_flatten(got)
    leaves_want, tree_want = jax.tree_util.tree_flatten(want)
    same = tree_got == tree_want and all(
        (a.shape, a.dtype) == (b.shape, b.dtype)
        for a, b in zip(leaves_got, leaves_want, strict=True)
    )
    if not same:
        raise ValueError(
            "the model's batched_e_step does not return what vmap of its e_step returns: "
            f"got {got}, expected {want} (statistics with a leading restart axis r and (r,) "
            "log-likelihood sums)."
        )


def _run_em_batched(
    model: ExactModel,
    params: PyTree,
    data: PyTree,
    weights: Float[Array, " n"] | None,
    *,
    max_iter: int,
    tol: float | Array,
    hyper: PyTree,
    chunk_size: int | None,
) -> EMResult:
    r"""All r restarts in one ``lax.while_loop`` whose E-step is ``model.batched_e_step``.

    The loop runs while any restart runs (:math:`t_\rho <` ``max_iter`` and not converged);
    each iteration computes the E-step of every restart in one batched call (chunked over
    the data like :func:`chunked_e_step`) and the M-step of every restart (``vmap``), then
    keeps the new state of the running restarts only, so a stopped restart's parameters,
    log-likelihood, history, iteration count and flag are frozen: what ``vmap`` of
    :func:`run_em` computes, since ``vmap`` of a ``lax.while_loop`` selects the same way.
    The final log-likelihood of each restart is one more batched E-step's
    :math:`\sum_i w_i \log p(x_i) / \sum_i w_i`, which is :func:`mean_log_prob` (the
    protocol's E-step returns that sum), in one pass for all restarts.
    """
    n = _leading_dim(data)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    if weights is None:
        weights = jnp.ones(n, dtype)
    _check_batched_e_step(model, params, data, weights)
    r = _leading_axes(params, 1)[0]
    steps = jnp.arange(max_iter, dtype=jnp.int32)  # the dtype of EMState.iteration

    def running(state):
        return (state.iteration < max_iter) & ~state.converged

    def keep(mask, new, old):
        return jnp.where(mask.reshape(r, *(1,) * (jnp.ndim(new) - 1)), new, old)

    def cond(carry):
        return jnp.any(running(carry[0]))

    def body(carry):
        state, history = carry
        active = running(state)
        stats, ll_sum = sum_over_chunks(
            model.batched_e_step, state.params, data, weights, chunk_size=chunk_size
        )
        ll = (ll_sum / jnp.sum(weights)).astype(dtype)
        new_params = jax.vmap(lambda s: model.m_step(s, hyper))(stats)
        change = ll - state.log_likelihood
        new = EMState(new_params, ll, state.iteration + 1, jnp.abs(change) < tol)
        slot = active[:, None] & (steps[None, :] == state.iteration[:, None])
        history = jnp.where(slot, ll[:, None], history)
        state = jax.tree_util.tree_map(lambda a, b: keep(active, a, b), new, state)
        return state, history

    history0 = jnp.full((r, max_iter), jnp.nan, dtype)
    state, history = lax.while_loop(cond, body, (jax.vmap(em_init)(params), history0))
    _, final_sum = sum_over_chunks(
        model.batched_e_step, state.params, data, weights, chunk_size=chunk_size
    )
    final_ll = (final_sum / jnp.sum(weights)).astype(dtype)
    return EMResult(state.params, final_ll, history, state.iteration, state.converged)


def run_em_restarts(
    model: ExactModel,
    params: PyTree,
    data: PyTree,
    weights: Float[Array, " n"] | None = None,
    *,
    max_iter: int,
    tol: float | Array = 1e-3,
    hyper: PyTree = None,
    chunk_size: int | None = None,
) -> tuple[EMResult, EMResult]:
    """Runs a batch of initialisations (leading axis ``r`` of ``params``) as one program
    (``vmap`` of :func:`run_em`, or one loop over the model's ``batched_e_step`` when it
    has one and r > 1, with the same results) and returns ``(best, all_results)``; checked
    as :func:`run_em`."""
    _validate(
        model,
        params,
        data,
        weights,
        hyper,
        max_iter=max_iter,
        tol=tol,
        chunk_size=chunk_size,
        prepared=True,
        lead_axes=1,
    )
    batched = _run_restarts(
        model, params, data, weights, max_iter=max_iter, tol=tol, hyper=hyper, chunk_size=chunk_size
    )
    best, _ = select_best(batched)
    return best, batched


class FitResult(NamedTuple):
    """What every model's ``fit`` returns (through :func:`fit`).

    Attributes:
      params: the parameters of the best restart after its last M-step.
      log_likelihood: mean (weighted) log-likelihood of ``params`` (one extra pass after the
        loop; scikit-learn's ``lower_bound_`` is ``history[num_iter - 1]`` instead).
      history: (max_iter,) mean log-likelihood at the start of each iteration of the best
        restart; NaN from ``num_iter`` on.
      num_iter: iterations the best restart ran.
      converged: whether its stopping rule fired before ``max_iter``.
      restart_log_likelihoods: (r,) final mean log-likelihood of every restart.
    """

    params: PyTree
    log_likelihood: Float[Array, ""]
    history: Float[Array, " t"]
    num_iter: Int[Array, ""]
    converged: Bool[Array, ""]
    restart_log_likelihoods: Float[Array, " r"]


def _fit(model, params, x, weights, tol, hyper, *, max_iter, chunk_size):
    data = model.prepare_data(x)
    n = _leading_dim(data)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    if weights is None:
        weights = jnp.ones(n, dtype)
    runs = _run_restarts(
        model, params, data, weights, max_iter=max_iter, tol=tol, hyper=hyper, chunk_size=chunk_size
    )
    score = runs.log_likelihood
    if model.log_prior is not None:
        # MAP-EM climbs the log posterior: pick the restart that reached the highest one.
        log_prior = jax.vmap(lambda p: model.log_prior(p, hyper))(runs.params)
        score = score + log_prior / jnp.sum(weights)
    score = jnp.where(jnp.isnan(score), -jnp.inf, score)
    best = jnp.argmax(score)
    pick = jax.tree_util.tree_map(lambda leaf: leaf[best], runs)
    return FitResult(
        pick.params,
        pick.log_likelihood,
        pick.history,
        pick.num_iter,
        pick.converged,
        runs.log_likelihood,
    )


_fit_jit = jax.jit(_fit, static_argnames=("model", "max_iter", "chunk_size"))


def fit(
    model: ExactModel,
    params: PyTree,
    x: PyTree,
    weights: Float[Array, " n"] | None = None,
    *,
    max_iter: int = 100,
    tol: float | Array = 1e-3,
    hyper: PyTree = None,
    chunk_size: int | None = None,
    allow_missing: bool = False,
) -> FitResult:
    """The one fit driver: ``prepare`` the data, run every restart as one program, keep the
    best.

    Each model's ``fit`` validates its inputs, draws ``params`` (a batch of initialisations
    with a leading restart axis ``r``, from its ``init_params``) and calls this. The restarts
    run to convergence on device (:func:`run_em`, a ``lax.while_loop``, vmapped; or, for a
    model whose ``e_step`` is a :class:`BatchedEStep` and r > 1, one loop whose E-step runs
    all restarts in one call, with the same results); the kept one has the
    highest final log-likelihood, or, when the model has a ``log_prior``, the highest log
    posterior (the objective MAP-EM climbs). The model's ``fit`` validates what is
    specific to it; this checks what every model shares (below).

    Args:
      model: the model's pure functions (static).
      params: initial parameters with a leading restart axis (r >= 1).
      x: data, a pytree with leading axis ``n`` (before ``prepare``).
      weights: per-example weights (n,), ones if None.
      max_iter: the most iterations per restart (static).
      tol: stop a restart when its mean log-likelihood changes by less than this.
      hyper: array-valued hyperparameters for ``m_step`` and ``log_prior``.
      chunk_size: run the E-step over chunks of this many examples (static).
      allow_missing: let NaN entries of ``x`` through, for a model whose E-step
        marginalises missing entries; otherwise NaN in ``x`` is an error.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: for ``max_iter`` not an integer >= 1, ``tol`` not a number >= 0,
        ``chunk_size`` not None or an integer >= 1, ``params`` without one shared leading
        restart axis, a leaf of ``x`` without a leading data axis, complex or
        half-precision data, NaN or inf in ``x``, ``weights`` of the wrong shape, negative,
        non-finite or all zero, and ``params`` that do not fit the data: one abstract EM
        iteration (``jax.eval_shape``, nothing is computed) must give back params of the
        shapes and dtypes it was given. Traced arguments (under ``jit``) are checked for
        shapes only.
    """
    _validate(
        model,
        params,
        x,
        weights,
        hyper,
        max_iter=max_iter,
        tol=tol,
        chunk_size=chunk_size,
        prepared=False,
        lead_axes=1,
        allow_missing=allow_missing,
    )
    return _fit_jit(model, params, x, weights, tol, hyper, max_iter=max_iter, chunk_size=chunk_size)


def _fit_many(model, params, xs, weights, tol, hyper, *, max_iter, chunk_size):
    return jax.vmap(
        lambda p, x, w: _fit(model, p, x, w, tol, hyper, max_iter=max_iter, chunk_size=chunk_size)
    )(params, xs, weights)


_fit_many_jit = jax.jit(_fit_many, static_argnames=("model", "max_iter", "chunk_size"))


def fit_many(
    model: ExactModel,
    params: PyTree,
    xs: PyTree,
    weights: Float[Array, "b n"] | None = None,
    *,
    max_iter: int = 100,
    tol: float | Array = 1e-3,
    hyper: PyTree = None,
    chunk_size: int | None = None,
    allow_missing: bool = False,
) -> FitResult:
    """Many independent data sets (leading axis ``b``) fitted in one vmapped program.

    ``params`` has leading axes ``(b, r)`` (data set, restart) and ``xs`` leading axes
    ``(b, n)``; every data set has the same ``n`` (give padding rows weight 0). The result
    is a :class:`FitResult` whose leaves have a leading axis ``b``, each entry what
    :func:`fit` returns for that data set. Checked as :func:`fit` (on the first data set
    for the abstract iteration; every weight row is checked).
    """
    _validate(
        model,
        params,
        xs,
        weights,
        hyper,
        max_iter=max_iter,
        tol=tol,
        chunk_size=chunk_size,
        prepared=False,
        lead_axes=2,
        allow_missing=allow_missing,
    )
    if weights is None:
        lead = jax.tree_util.tree_leaves(xs)[0]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        weights = jnp.ones(lead.shape[:2], dtype)
    return _fit_many_jit(
        model, params, xs, weights, tol, hyper, max_iter=max_iter, chunk_size=chunk_size
    )


class EMTrace(NamedTuple):
    """Log-likelihood and ELBO after every half-step of EM (all means per example).

    Row ``t`` holds ``[after E-step t, after M-step t]``:

    * after the E-step, ``q_t = p(z | x, theta_t)``: ``elbo == log_likelihood`` (tight bound)
      and ``kl == 0``;
    * after the M-step, ``theta_{t+1}`` with ``q_t`` kept: the ELBO has risen, and the
      log-likelihood has risen by at least as much, because ``kl = KL(q_t || p(z|x,
      theta_{t+1})) >= 0`` opened up.
    """

    log_likelihood: Float[Array, "t 2"]
    elbo: Float[Array, "t 2"]
    kl: Float[Array, "t 2"]
    params: PyTree


def _trace_step(model: ExactModel, theta: PyTree, data: PyTree, weights: Array, hyper: PyTree):
    """One EM iteration, with log-likelihood and ELBO after its E and its M half-step."""
    wsum = jnp.sum(weights)

    def wmean(v):
        return jnp.sum(weights * v) / wsum

    q = model.posterior(theta, data)
    ll_e = wmean(model.log_prob(theta, data))
    elbo_e = wmean(model.elbo(theta, q, data))
    stats, _ = model.e_step(theta, data, weights)
    new_theta = model.m_step(stats, hyper)
    ll_m = wmean(model.log_prob(new_theta, data))
    elbo_m = wmean(model.elbo(new_theta, q, data))
    return new_theta, jnp.stack([ll_e, ll_m]), jnp.stack([elbo_e, elbo_m])


_trace_step_jit = jax.jit(_trace_step, static_argnames=("model",))


def em_trace(
    model: ExactModel,
    params: PyTree,
    data: PyTree,
    weights: Float[Array, " n"] | None = None,
    *,
    num_iter: int,
    hyper: PyTree = None,
) -> EMTrace:
    """Runs ``num_iter`` EM iterations, recording both half-steps.

    ``data`` is what ``model.prepare`` returns (or ``x`` when the model has none). The
    iterations run as a Python loop over one jitted iteration rather than a ``lax.scan``:
    this is a diagnostic of a few dozen iterations, so the loop costs nothing measurable,
    and with jax/jaxlib 0.10.2 a ``lax.scan`` of this body can deadlock XLA:CPU (on a
    full-covariance GMM of the digits, 1797 x 64, three runs in four hung at 30 iterations):
    inside the loop XLA does not merge the body's repeated Cholesky solves, and two batched
    LAPACK calls that run at once each block an intra-op thread waiting for work queued
    behind the other (issue 13; ``--xla_cpu_use_thunk_runtime`` is ignored by this jaxlib).
    The one jitted iteration has every LAPACK call ordered by data dependence
    (tests/test_hang_regression.py checks it).

    Checked as :func:`run_em`, with ``num_iter`` an integer >= 1.
    """
    _validate(
        model,
        params,
        data,
        weights,
        hyper,
        max_iter=num_iter,
        tol=0.0,
        chunk_size=None,
        prepared=True,
        lead_axes=0,
        name_iter="num_iter",
    )
    n = _leading_dim(data)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    if weights is None:
        weights = jnp.ones(n, dtype)
    theta, lls, elbos = params, [], []
    for _ in range(num_iter):
        theta, ll, elbo = _trace_step_jit(model, theta, data, weights, hyper)
        lls.append(ll)
        elbos.append(elbo)
    ll = jnp.stack(lls) if lls else jnp.zeros((0, 2), dtype)
    elbo = jnp.stack(elbos) if elbos else jnp.zeros((0, 2), dtype)
    return EMTrace(ll, elbo, ll - elbo, theta)


def fit_em(
    model: ExactModel,
    params: PyTree,
    x: PyTree,
    weights: Float[Array, " n"] | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    hyper: PyTree = None,
    chunk_size: int | None = None,
    allow_missing: bool = False,
) -> EMResult:
    """Convenience wrapper: ``prepare`` the data, then jit and run :func:`run_em`.

    A batch of initialisations (``params`` with a leading restart axis) is not handled
    here; use :func:`run_em_restarts`. Checked as :func:`fit` (without the restart axis).
    """
    _validate(
        model,
        params,
        x,
        weights,
        hyper,
        max_iter=max_iter,
        tol=tol,
        chunk_size=chunk_size,
        prepared=False,
        lead_axes=0,
        allow_missing=allow_missing,
    )
    data = model.prepare(x) if model.prepare is not None else x
    return _run_em_jit(
        model,
        params,
        data,
        weights,
        max_iter=max_iter,
        tol=tol,
        hyper=hyper,
        chunk_size=chunk_size,
    )


_run_em_jit = jax.jit(run_em, static_argnames=("model", "max_iter", "chunk_size"))


def trace_checks(trace: EMTrace) -> dict[str, float]:
    r"""The invariants of an :class:`EMTrace` as float64 numbers (row t: [after E, after M]).

    * ``max_abs_gap_after_e_step`` :math:`= \max_t |\log p_t^E - \mathrm{ELBO}_t^E|`: zero up
      to rounding for an exact E-step (the bound touches);
    * ``min_kl_after_m_step`` :math:`= \min_t \mathrm{KL}_t^M`: never negative;
    * ``min_log_likelihood_increase``: the smallest change of the log-likelihood between
      consecutive half-steps, never negative for maximum-likelihood EM (with a prior, EM
      climbs the log-posterior and the likelihood may fall);
    * ``min_elbo_increase_in_m_step`` :math:`= \min_t (\mathrm{ELBO}_t^M - \mathrm{ELBO}_t^E)`,
      never negative for a maximum-likelihood M-step.

    Example:
      >>> ll = jnp.array([[-3.0, -2.5], [-2.5, -2.4]])
      >>> elbo = jnp.array([[-3.0, -2.7], [-2.5, -2.45]])
      >>> tr = EMTrace(ll, elbo, ll - elbo, None)
      >>> {k: round(v, 6) for k, v in trace_checks(tr).items()}  # doctest: +NORMALIZE_WHITESPACE
      {'max_abs_gap_after_e_step': 0.0, 'min_kl_after_m_step': 0.05,
       'min_log_likelihood_increase': 0.0, 'min_elbo_increase_in_m_step': 0.05}
    """
    ll = np.asarray(trace.log_likelihood, np.float64)
    elbo = np.asarray(trace.elbo, np.float64)
    kl = np.asarray(trace.kl, np.float64)
    return {
        "max_abs_gap_after_e_step": float(np.abs(ll[:, 0] - elbo[:, 0]).max()),
        "min_kl_after_m_step": float(kl[:, 1].min()),
        "min_log_likelihood_increase": float(np.diff(ll.reshape(-1)).min()),
        "min_elbo_increase_in_m_step": float((elbo[:, 1] - elbo[:, 0]).min()),
    }
