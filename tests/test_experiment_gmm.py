"""Smoke tests of the GMM experiment (experiments/gmm_em.py) and benchmark (scripts/bench_gmm.py).

Both are scripts, not modules of the package, so they are imported from their files.
"""

import json
import math
from pathlib import Path

import pytest

from emvi.runs import load_script, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str):
    return load_script(ROOT / rel)


gmm_em = _load("experiments/gmm_em.py")
bench = _load("scripts/bench_gmm.py")


def _tiny(workdir: Path, **kw):
    settings = dict(
        workdir=workdir,
        num_components=3,
        covariance_types=("full",),
        digits_num_points=240,
        synthetic_num_points=240,
        max_iter=8,
        trace_iters=4,
    )
    settings.update(kw)
    return gmm_em.Config(**settings)


def _finite_numbers(tree, path=""):
    """Yields (path, value) for every number in a JSON tree, so a test can name the bad one."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gmm_em") / "run"
    results = gmm_em.main(_tiny(workdir))
    return workdir, results


def test_run_folder_has_results_metrics_and_figures(run_dir):
    workdir, results = run_dir
    assert json.loads((workdir / "results.json").read_text()) == results
    config = json.loads((workdir / "config.json").read_text())
    assert config["config"]["num_components"] == 3 and "environment" in config
    required = {"mean_log_likelihood", "bic", "num_iter", "converged", "wall_time_s"}
    for fit in (results["digits"]["full"], results["synthetic"]):
        for lib in ("emvi", "sklearn"):
            assert required <= set(fit[lib]), (lib, sorted(fit[lib]))
            assert "adjusted_rand_index" in fit[lib]
        # Same init, same stopping rule, both float64: the same fit up to rounding.
        assert abs(fit["log_likelihood_difference"]) < 1e-6
    assert set(results["synthetic"]["emvi"]["parameter_error"]) >= {
        "weights_max_abs_error",
        "means_max_euclidean_error",
        "covariances_max_relative_frobenius_error",
    }
    bad = [p for p, v in _finite_numbers(results) if not math.isfinite(v)]
    assert not bad, bad
    assert isinstance(results["wall_time_s"], float)

    rows = read_metrics(workdir)
    iters = [r for r in rows if r["event"] == "em_iteration"]
    halves = [r for r in rows if r["event"] == "half_step"]
    assert {r["fit"] for r in iters} == {"digits_full", "synthetic"}
    n_digits = results["digits"]["full"]["emvi"]["num_iter"]
    assert len([r for r in iters if r["fit"] == "digits_full"]) == n_digits
    assert len(halves) == 2 * 2 * 4  # two traces x 4 iterations x (E, M)
    for r in halves:
        # ELBO <= log p(x), with equality after every E-step (up to rounding).
        assert r["elbo"] <= r["log_likelihood"] + 1e-9
        if r["half"] == "E":
            assert abs(r["kl"]) < 1e-9
    for name in gmm_em.FIGURES:
        assert (workdir / name).stat().st_size > 1000, name


def test_plot_remakes_figures_from_the_run_folder_alone(run_dir):
    workdir, _ = run_dir
    for name in gmm_em.FIGURES:
        (workdir / name).unlink()
    paths = gmm_em.plot(workdir)
    assert sorted(p.name for p in paths) == sorted(gmm_em.FIGURES)
    for name in gmm_em.FIGURES:
        assert (workdir / name).stat().st_size > 1000, name


def test_existing_run_folder_is_not_overwritten_without_flag(run_dir):
    workdir, _ = run_dir
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="overwrite"):
        gmm_em.main(_tiny(workdir))
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert after == before


def test_bench_quick_runs_and_libraries_agree():
    out = bench.main(bench.Args(quick=True, covariance_types=("full", "diag"), repeats=1))
    assert [r["covariance_type"] for r in out["results"]] == ["full", "diag"]
    for r in out["results"]:
        assert r["emvi_num_iter"] == r["sklearn_num_iter"] == bench.QUICK["iters"]
        # Same init, same iterations, float64: agreement to rounding, far below 1e-8.
        assert r["log_likelihood_relative_difference"] < 1e-8, r
        assert r["emvi_ms_per_iter"] > 0 and r["sklearn_ms_per_iter"] > 0
    assert out["matmul_gflops"] > 0
