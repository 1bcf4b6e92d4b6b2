"""The strict-numerics settings of conftest are in force."""

import jax
import jax.numpy as jnp
import pytest


def test_x64_enabled():
    assert jnp.zeros(1).dtype == jnp.float64


def test_rank_promotion_raises():
    with pytest.raises(ValueError):
        jnp.ones((2, 3)) + jnp.ones(3)


def test_jaxtyping_checks_shapes():
    from emvi.elbo import discrete_elbo

    with pytest.raises(Exception):  # noqa: B017 - jaxtyping raises its own error type
        discrete_elbo(jnp.zeros((3, 2)), jnp.zeros((4, 2)))
    assert jax.default_backend() in {"cpu", "gpu", "tpu"}


def test_float64_input_without_x64_becomes_float32_quietly():
    import subprocess
    import sys

    code = (
        "import warnings, numpy as np; warnings.simplefilter('error');"
        "from emvi._checks import as_data_matrix;"
        "print(as_data_matrix(np.zeros((3, 2))).dtype)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "float32"


def test_float64_input_with_x64_stays_float64():
    import numpy as np

    from emvi._checks import as_data_matrix

    assert as_data_matrix(np.zeros((3, 2))).dtype == np.float64


def test_runs_cli_dispatches_plot_or_flags(capsys):
    import dataclasses

    from emvi import runs

    @dataclasses.dataclass(frozen=True)
    class Config:
        size: int = 3
        """A flag."""

    calls = []
    main = lambda cfg: calls.append(("main", cfg.size)) or "ran"
    plot = lambda d: calls.append(("plot", d)) or ["a.png"]
    assert runs.cli(Config, main, plot, argv=["--size", "5"]) == "ran"
    assert runs.cli(Config, main, plot, argv=[]) == "ran"
    assert runs.cli(Config, main, plot, argv=["plot", "runs/x"]) == ["a.png"]
    assert calls == [("main", 5), ("main", 3), ("plot", "runs/x")]
    assert "a.png" in capsys.readouterr().out
