r"""Incomplete data in exact EM: entries missing at random, and partially known labels.

Both are missing data in the sense of Ghahramani and Jordan (1994): EM treats whatever is
unobserved as part of the latent variables.

**Missing entries.** A point :math:`x_i` is split into observed coordinates :math:`O_i` and
missing ones :math:`M_i` (missing at random). The objective is the likelihood of what was
observed, :math:`\sum_i w_i \log p(x_{i, O_i})`; the E-step takes the posterior of the latent
*and* of :math:`x_{i, M_i}` given :math:`x_{i, O_i}`, and the M-step uses the expected
completed sufficient statistics (:math:`E[x_M \mid x_O, z]` and, for second moments, the
conditional covariance as well). Each model module implements its own marginal (a
conditional Gaussian for :mod:`emvi.gmm` and :mod:`emvi.linear_gaussian`, dropped factors
for :mod:`emvi.bernoulli_mixture`); this module holds what they share: the validation of
``x`` and of the mask ``observed`` (:func:`check_observed`), the data type
(:class:`MaskedData`) and observed column means (:func:`column_means`).

**Partial labels** (semi-supervised EM). Some points come with a known component, or a known
distribution :math:`\lambda_i` over components; their responsibilities are held at
:math:`\lambda_i`, the others are the posterior. That is coordinate ascent on

.. math::
    \mathcal J(\theta) = \sum_{i \notin L} w_i \log p_\theta(x_i)
        + \sum_{i \in L} w_i \sum_j \lambda_{ij} \big(\log p_\theta(x_i, z_i = j)
        - \log \lambda_{ij}\big),

the ELBO with q fixed at :math:`\lambda` on the labelled set :math:`L` (for a hard label
:math:`y_i` the term is :math:`\log p_\theta(x_i, z_i = y_i)`, and :math:`\mathcal J` is the
log-likelihood of the data and the known labels together). :func:`fixed_responsibilities`
turns any :class:`emvi.em.ExactModel` that has ``expected_stats`` into the model of
:math:`\mathcal J`, which the one driver :func:`emvi.em.fit` then runs unchanged (its
``log_likelihood`` is :math:`\mathcal J / \sum_i w_i`, which never decreases).
:func:`check_labels` validates the labels a user passes, and
:func:`label_init_responsibilities` makes a start in which component j is class j.

Shape letters: ``n`` data points, ``d`` data dim, ``k`` components.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from emvi import _checks, em

PyTree = Any


class MaskedData(NamedTuple):
    """Data with missing entries: the values, and which of them were observed.

    Attributes:
      values: (n, d); a missing entry holds a placeholder (0, or the column mean) that no
        computation reads as data.
      observed: (n, d) 1.0 where observed, 0.0 where missing, in the dtype of ``values``.
    """

    values: Float[Array, "n d"]
    observed: Float[Array, "n d"]


def _shown(rows: np.ndarray) -> str:
    return ", ".join(str(r) for r in rows[:5]) + (" ..." if rows.size > 5 else "")


def check_observed(
    x, observed=None, *, name: str = "x", for_fit: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validates data that may have missing entries; returns ``(values, mask)``.

    An entry is missing where ``x`` is NaN, or, when ``observed`` is given, where it is
    False (the values there are then ignored, NaN or not). ``values`` is ``x`` as
    :func:`emvi._checks.as_data_matrix` would return it, with 0 in the missing entries;
    ``mask`` is the boolean (n, d) observed mask, or None when nothing is missing (then
    ``values`` equals ``as_data_matrix(x)`` exactly, and callers take their ordinary path).

    Raises:
      ValueError: if ``x`` is not 2-D and numeric, ``observed`` is not a boolean array of
        the shape of ``x``, ``x`` is NaN where ``observed`` is True, an observed entry is
        infinite, a row has every entry missing, or (with ``for_fit``, data to fit to) a
        column has no observed entry.

    Example:
      >>> values, mask = check_observed(np.array([[1.0, np.nan], [2.0, 3.0]]))
      >>> values.tolist(), mask.tolist()
      ([[1.0, 0.0], [2.0, 3.0]], [[True, False], [True, True]])
    """
    raw = np.asarray(x)
    if raw.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape (num_points, dim); got shape {raw.shape}.")
    is_float = np.issubdtype(raw.dtype, np.floating)
    nan = np.isnan(raw) if is_float else np.zeros(raw.shape, bool)
    if observed is None:
        mask = ~nan
    else:
        obs = np.asarray(observed)
        if obs.dtype != bool:
            raise ValueError(f"observed must be a boolean array; got dtype {obs.dtype}.")
        if obs.shape != raw.shape:
            raise ValueError(
                f"observed must have the shape of {name}, {raw.shape}; got {obs.shape}."
            )
        clash = nan & obs
        if clash.any():
            raise ValueError(
                f"{name} is NaN where observed is True, in row(s) "
                f"{_shown(np.unique(np.nonzero(clash)[0]))}."
            )
        mask = obs
    filled = np.where(mask, raw, 0) if not mask.all() else raw
    values = _checks.as_data_matrix(filled, name=name)
    if mask.all():
        return values, None
    empty_rows = np.flatnonzero(~mask.any(axis=1))
    if empty_rows.size:
        raise ValueError(
            f"{name} has every entry missing in row(s) {_shown(empty_rows)}; such a row "
            "carries no information; drop it."
        )
    empty_cols = np.flatnonzero(~mask.any(axis=0))
    if for_fit and empty_cols.size:
        raise ValueError(
            f"{name} has no observed entry in column(s) {_shown(empty_cols)}; nothing can be "
            "learned about them; drop them."
        )
    return values, mask


def column_means(
    values: Float[Array, "n d"], observed: Float[Array, "n d"], weights: Float[Array, " n"]
) -> Float[Array, " d"]:
    r"""Weighted mean of each column over its observed entries,
    :math:`\sum_i w_i o_{ic} x_{ic} / \sum_i w_i o_{ic}` (each column needs one observed entry
    of positive weight)."""
    wo = weights[:, None] * observed
    return jnp.sum(wo * values, axis=0) / jnp.sum(wo, axis=0)


def masked_data(values, mask, dtype) -> MaskedData:
    """A :class:`MaskedData` of JAX arrays from :func:`check_observed`'s output."""
    return MaskedData(jnp.asarray(values, dtype), jnp.asarray(mask, dtype))


# ---------------------------------------------------------------------------------------
# Partial labels
# ---------------------------------------------------------------------------------------


class LabelledData(NamedTuple):
    """The data of :func:`fixed_responsibilities`' model.

    Attributes:
      data: the inner model's data (a pytree with leading axis n).
      label_probs: (n, k) the known distribution of each labelled point (rows of the
        unlabelled points are ignored; uniform is a safe filler).
      labelled: (n,) boolean, True where the responsibilities are fixed.
    """

    data: PyTree
    label_probs: Float[Array, "n k"]
    labelled: Bool[Array, " n"]


def check_labels(labels, num_points: int, num_components: int, dtype) -> LabelledData | None:
    """Validates partial labels; returns ``LabelledData(None, label_probs, labelled)``.

    ``labels`` is either integers (n,) with a component index in ``[0, k)`` for a labelled
    point and -1 for an unlabelled one, or floats (n, k) whose rows are distributions over
    the components (non-negative, summing to one) for labelled points and all NaN for
    unlabelled ones. None (or no labelled point at all) returns None.

    Raises:
      ValueError: naming ``labels`` for a wrong shape or dtype, an index outside
        ``[-1, k)``, a row that is neither a distribution nor all NaN.

    Example:
      >>> lab = check_labels(np.array([1, -1]), 2, 3, np.float32)
      >>> lab.label_probs[0].tolist(), lab.labelled.tolist()
      ([0.0, 1.0, 0.0], [True, False])
    """
    if labels is None:
        return None
    arr = np.asarray(labels)
    n, k = num_points, num_components
    if np.issubdtype(arr.dtype, np.integer):
        if arr.shape != (n,):
            raise ValueError(
                f"integer labels must have shape ({n},) (one per point); got {arr.shape}."
            )
        if np.any(arr < -1) or np.any(arr >= k):
            raise ValueError(
                f"labels must be component indices in [0, {k}) or -1 (unknown); got values "
                f"in [{arr.min()}, {arr.max()}]."
            )
        labelled = arr >= 0
        probs = np.full((n, k), 1.0 / k)
        probs[labelled] = np.eye(k)[arr[labelled]]
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.shape != (n, k):
            raise ValueError(
                f"label distributions must have shape ({n}, {k}) (a row per point); got "
                f"{arr.shape}."
            )
        unknown = np.isnan(arr).all(axis=1)
        known = arr[~unknown].astype(np.float64)
        bad = (
            ~np.isfinite(known).all(axis=1)
            | (known < 0).any(axis=1)
            | (np.abs(known.sum(axis=1) - 1.0) > 1e-6)
        )
        if bad.any():
            rows = np.flatnonzero(~unknown)[bad]
            raise ValueError(
                f"labels row(s) {_shown(rows)} are neither a distribution over the {k} "
                "components (non-negative, summing to 1) nor all NaN (unknown)."
            )
        labelled = ~unknown
        probs = np.full((n, k), 1.0 / k)
        probs[labelled] = known / known.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"labels must be integers (n,) or floats (n, k); got dtype {arr.dtype}.")
    if not labelled.any():
        return None
    return LabelledData(None, jnp.asarray(probs, dtype), jnp.asarray(labelled))


def label_init_responsibilities(
    resp: Float[Array, "n k"], label_probs: Float[Array, "n k"], labelled: Bool[Array, " n"]
) -> Float[Array, "n k"]:
    """Initial responsibilities that respect partial labels, for one initial M-step.

    Labelled rows get their label distribution; an unlabelled row keeps its initial
    responsibility ``resp`` only for components that no labelled point has mass on. So a
    labelled component starts at the statistics of its labelled points (component j is
    class j from the start, rather than whatever cluster a random start put there, which
    a few labels could not pull back), and the others start as the initialisation made
    them. With every component labelled, the start is the supervised estimate.
    """
    has = jnp.sum(jnp.where(labelled[:, None], label_probs, 0.0), axis=0) > 0
    unlabelled = jnp.where(has[None, :], 0.0, resp)
    return jnp.where(labelled[:, None], label_probs, unlabelled)


@functools.cache
def fixed_responsibilities(model: em.ExactModel) -> em.ExactModel:
    r"""The semi-supervised form of a model with a finite latent: responsibilities of the
    labelled points held fixed (the objective :math:`\mathcal J` of the module docstring).

    ``model`` must have ``expected_stats`` and a q that is an (n, k) array of
    responsibilities (the mixtures). The returned model's data is a :class:`LabelledData`
    around the inner model's data (``prepare`` prepares the inner part); its ``e_step``
    takes q = the label distribution on labelled points and the posterior elsewhere, and
    returns ``expected_stats`` of that q with :math:`\sum_i w_i \mathcal J_i`;
    ``log_prob`` is :math:`\mathcal J_i` per point, ``posterior`` that q, and the rest of
    the protocol is the inner model's. Cached, so jitted drivers do not recompile.

    Example:
      >>> from emvi import bernoulli_mixture as bm
      >>> semi = fixed_responsibilities(bm.model())
      >>> semi is fixed_responsibilities(bm.model())
      True
    """
    em.require(model, "expected_stats", purpose="semi-supervised EM")
    inner = model

    def q_of(params, data: LabelledData):
        post = inner.posterior(params, data.data)
        return jnp.where(data.labelled[:, None], data.label_probs, post)

    def objective(params, data: LabelledData):
        ll = inner.log_prob(params, data.data)
        fixed = inner.elbo(params, data.label_probs, data.data)
        return jnp.where(data.labelled, fixed, ll)

    def e_step(params, data: LabelledData, weights):
        stats = inner.expected_stats(q_of(params, data), data.data, weights)
        return stats, jnp.sum(weights * objective(params, data))

    def prepare(x: LabelledData) -> LabelledData:
        return x._replace(data=inner.prepare_data(x.data))

    return inner._replace(
        e_step=e_step,
        log_prob=objective,
        posterior=q_of,
        elbo=lambda params, q, data: inner.elbo(params, q, data.data),
        prepare=prepare,
        expected_stats=lambda q, data, w: inner.expected_stats(q, data.data, w),
    )


def scoring_input(x, observed, check_columns) -> tuple[Array, Array]:
    """Data to score under fitted params, missing entries allowed: ``(values, mask)``.

    ``x`` and ``observed`` are validated as by :func:`check_observed` (a column with no
    observed entry is allowed here: nothing is estimated from it); ``check_columns(values)``
    is the model's check of the data against its params (raises ``ValueError``). ``mask``
    is the observed mask in the dtype of ``values``, all ones when nothing is missing.
    """
    values, mask = check_observed(x, observed, for_fit=False)
    values = jnp.asarray(values)
    check_columns(values)
    mask = np.ones(values.shape, bool) if mask is None else mask
    return values, jnp.asarray(mask, values.dtype)
