r"""Choosing a hyperparameter by held-out log-likelihood.

A prior (or any setting the fit cannot learn) is chosen by fitting on all but the last
``validation_size`` training rows and scoring the fit on those rows; the winner is then
refitted on everything by the caller. :func:`select_on_validation` is the generic loop;
:func:`bernoulli_mixture_beta_prior` is the choice of the symmetric Beta(a, a) pixel prior
of a Bernoulli mixture (MAP-EM with a = 1 is maximum likelihood, where a component that
owns few images gets probabilities of exactly 0 or 1 and a test image :math:`-\infty`).

Example:
  >>> x = np.arange(10.0)[:, None]
  >>> fit = lambda x_fit, c: c                      # the "parameters" are the candidate
  >>> score = lambda c, x_val: -abs(c - x_val.mean())
  >>> select_on_validation(fit, score, (1.0, 8.0), x, validation_size=3)[0]
  8.0
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from emvi import _checks


def select_on_validation(
    fit_fn: Callable[[Any, Hashable], Any],
    score_fn: Callable[[Any, Any], float],
    candidates: Sequence[Hashable],
    x,
    *,
    validation_size: int,
) -> tuple[Hashable, dict]:
    """The candidate whose fit on ``x[:-validation_size]`` scores best on the rest.

    Args:
      fit_fn: ``fit_fn(x_fit, candidate) -> params``.
      score_fn: ``score_fn(params, x_val) -> float``, higher is better (a mean held-out
        log-likelihood, say).
      candidates: the settings to try, in order (ties go to the first).
      x: the training rows (NumPy or JAX array), shape (n, ...).
      validation_size: rows held out, 1 <= validation_size < n.

    Returns:
      ``(best, scores)`` with ``scores[candidate]`` the validation score of each.

    Raises:
      ValueError: on no candidates or a validation size outside [1, n - 1].
    """
    if len(candidates) < 1:
        raise ValueError("candidates must name at least one setting.")
    validation_size = _checks.check_positive_int(validation_size, name="validation_size")
    if validation_size >= len(x):
        raise ValueError(
            f"validation_size={validation_size} leaves no rows to fit on ({len(x)} rows)."
        )
    fit_x, val_x = x[:-validation_size], x[-validation_size:]
    scores = {c: float(score_fn(fit_fn(fit_x, c), val_x)) for c in candidates}
    return max(scores, key=scores.get), scores


def bernoulli_mixture_beta_prior(
    key,
    x,
    num_components: int,
    *,
    grid: Sequence[float],
    validation_size: int,
    alpha: float = 1.0,
    **fit_kwargs,
) -> tuple[float, dict]:
    """Chooses a of a symmetric Beta(a, a) pixel prior for a Bernoulli mixture with k
    components, by :func:`select_on_validation` on the mean held-out log-likelihood.

    Each candidate is fitted by ``emvi.bernoulli_mixture.fit(key, x_fit, k,
    prior=BernoulliMixturePrior(alpha, a, a), **fit_kwargs)`` (``alpha``: the symmetric
    Dirichlet on the weights). With one candidate nothing is fitted and ``scores`` is empty.

    Returns:
      ``(a, scores)``.
    """
    import jax.numpy as jnp

    from emvi import bernoulli_mixture as bm

    if len(grid) == 1:
        return grid[0], {}
    key = _checks.as_key(key)

    def fit(x_fit, a):
        prior = bm.BernoulliMixturePrior(alpha, a, a)
        return bm.fit(key, np.asarray(x_fit), num_components, prior=prior, **fit_kwargs).params

    def score(params, x_val):
        return float(jnp.mean(bm.log_prob(params, jnp.asarray(x_val))))

    return select_on_validation(fit, score, tuple(grid), x, validation_size=validation_size)
