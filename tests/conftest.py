"""Strict numerics for every test.

* float64 is enabled, so oracles in float64 can be matched to 1e-8; code under test must
  follow the dtype of its input, and float32 tests pass float32 arrays explicitly.
* Implicit rank promotion raises: broadcasting is written out.
* Dtype promotion is strict: mixing float32 with float64 arrays, or ints with floats, raises
  instead of silently widening (Python scalars stay weakly typed), so code under test keeps
  the dtype it was given.
* XLA's backend optimisation level is 0: the suite is dominated by compiling many small
  programs, each run a few times, so LLVM's optimisation passes cost more than they save
  (about 20% of the suite's time on 2 cores). It changes speed, not semantics (XLA:CPU
  does not enable fast-math); a user's own flags are kept.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import numpy as np
import pytest
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile("emvi", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("emvi")


@pytest.fixture
def rng():
    """A NumPy generator with a fixed seed, fresh for each test."""
    return np.random.default_rng(0)


# The slow tier: tests listed in tests/slow.txt (node ids; an entry ending in '[' or '::'
# stands for every test under it) get the ``slow`` mark, as if decorated with
# ``@pytest.mark.slow``. ``make test`` (the README's command) skips them, ``make test-slow``
# runs only them (CI runs both), ``make test-all`` runs every test. The file says how its
# entries were chosen (measured duration) and how to regenerate it.
_SLOW_LIST = os.path.join(os.path.dirname(__file__), "slow.txt")


def _slow_entries() -> tuple[str, ...]:
    if not os.path.exists(_SLOW_LIST):
        return ()
    with open(_SLOW_LIST) as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return tuple(line for line in lines if line)


def pytest_collection_modifyitems(config, items):
    entries = () if os.environ.get("EMVI_IGNORE_SLOW_LIST") else _slow_entries()
    if not entries:
        return
    exact = set(entries)
    groups = tuple(e for e in entries if e.endswith(("[", "::")))
    for item in items:
        if item.nodeid in exact or (groups and item.nodeid.startswith(groups)):
            item.add_marker(pytest.mark.slow)
