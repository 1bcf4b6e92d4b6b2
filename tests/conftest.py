"""Strict numerics for every test.

* float64 is enabled, so oracles in float64 can be matched to 1e-8; code under test must
  follow the dtype of its input, and float32 tests pass float32 arrays explicitly.
* Implicit rank promotion raises: broadcasting is written out.
"""

import jax
import numpy as np
import pytest
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("emvi", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("emvi")


@pytest.fixture
def rng():
    """A NumPy generator with a fixed seed, fresh for each test."""
    return np.random.default_rng(0)
