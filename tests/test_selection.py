"""Hyperparameter choice by held-out score (emvi.selection)."""

import numpy as np
import pytest

from emvi import selection


def test_select_on_validation_fits_on_the_head_and_scores_on_the_tail():
    x = np.arange(10.0)[:, None]
    seen = []

    def fit(x_fit, c):
        seen.append(len(x_fit))
        return float(x_fit.mean()) + c

    # Validation rows 7, 8, 9 (mean 8); fit mean 3: candidate c gives 3 + c.
    best, scores = selection.select_on_validation(
        fit, lambda p, xv: -abs(p - xv.mean()), (0.0, 5.0, 4.0, 6.0), x, validation_size=3
    )
    assert best == 5.0 and seen == [7, 7, 7, 7]
    assert scores == {0.0: -5.0, 5.0: 0.0, 4.0: -1.0, 6.0: -1.0}
    # Ties go to the first candidate.
    tie = selection.select_on_validation(fit, lambda p, xv: 0.0, (2, 1), x, validation_size=1)
    assert tie[0] == 2
    with pytest.raises(ValueError, match="validation_size"):
        selection.select_on_validation(fit, lambda p, xv: 0.0, (1,), x, validation_size=10)
    with pytest.raises(ValueError, match="candidates"):
        selection.select_on_validation(fit, lambda p, xv: 0.0, (), x, validation_size=1)


def test_beta_prior_with_one_candidate_fits_nothing():
    assert selection.bernoulli_mixture_beta_prior(
        None, np.zeros((4, 2)), 2, grid=(1.5,), validation_size=2
    ) == (1.5, {})
