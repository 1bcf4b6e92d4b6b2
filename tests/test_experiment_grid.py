"""Smoke tests of experiments/em_trace.py and experiments/amortization_gap.py on tiny settings.

Both are scripts, not package modules, so they are imported from their files.
"""

import json
import math
from pathlib import Path

import pytest

from emvi.runs import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str):
    return load_script(ROOT / rel)


em_trace = _load("experiments/em_trace.py")
amortization_gap = _load("experiments/amortization_gap.py")


def _numbers(tree, path=""):
    """Yields (path, value) for every number in a JSON tree (strings such as 'nan' too)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree
    elif tree in ("nan", "inf", "-inf"):
        yield path, float(tree)


def _tiny_trace(workdir, **kw):
    return em_trace.Config(
        workdir=str(workdir),
        gmm_num_points=60,
        gmm_num_iter=4,
        bm_num_components=3,
        bm_num_iter=4,
        bm_num_points=60,
        **kw,
    )


def _tiny_gap(workdir, **kw):
    kw.setdefault("datasets", ("digits",))
    return amortization_gap.Config(
        workdir=str(workdir),
        digits_num_components=3,
        digits_num_train=60,
        encoder_hidden=(8,),
        em_iters=3,
        gem_iters=3,
        gem_theta_steps=2,
        local_iters=3,
        local_steps=2,
        refine_steps=2,
        amortized_em_iters=3,
        amortized_em_phi_steps=2,
        vae_iters=4,
        vae_alternating_phi_steps=2,
        gap_steps=5,
        gvae_latent_dim=2,
        gvae_hidden=(8,),
        gvae_epochs=1,
        gvae_num_train_eval=20,
        gvae_iwae_samples=16,
        gvae_elbo_samples=8,
        gvae_local_steps=3,
        **kw,
    )


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("em_trace")
    em_trace.main(_tiny_trace(workdir))
    return workdir


@pytest.fixture(scope="module")
def gap_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("amortization_gap")
    amortization_gap.main(_tiny_gap(workdir))
    return workdir


def test_em_trace_results_are_finite_and_the_bound_touches_after_each_e_step(trace_dir):
    results = json.loads((trace_dir / "results.json").read_text())
    assert (trace_dir / "config.json").exists() and (trace_dir / "em_trace.png").stat().st_size
    for name in ("gmm_synthetic", "bernoulli_digits"):
        r = results[name]
        assert len(r["log_likelihood"]) == 4 and len(r["log_likelihood"][0]) == 2
        bad = [p for p, v in _numbers(r) if not math.isfinite(v)]
        assert not bad, bad
        assert r["checks"]["max_abs_gap_after_e_step"] < 1e-10
        assert r["checks"]["min_kl_after_m_step"] > -1e-10
    # The GMM runs maximum likelihood, so its likelihood never falls.
    assert results["gmm_synthetic"]["checks"]["min_log_likelihood_increase"] > -1e-10


def test_em_trace_plot_remakes_the_figure_from_the_run_folder(trace_dir):
    (trace_dir / "em_trace.png").unlink()
    (path,) = em_trace.plot(trace_dir)
    assert path == trace_dir / "em_trace.png" and path.stat().st_size > 0


@pytest.mark.slow
def test_amortization_gap_results_have_every_corner_and_gap(gap_dir):
    results = json.loads((gap_dir / "results.json").read_text())
    entry = results["digits"]
    labels = list(amortization_gap.CORNER_RUNS)
    assert list(entry["corners"]) == labels
    for row in entry["corners"].values():
        for key in ("train_log_likelihood", "train_elbo", "test_log_likelihood"):
            assert math.isfinite(row[key])
        assert row["train_elbo"] <= row["train_log_likelihood"] + 1e-10
        assert 0.0 <= row["time_to_tolerance_s"] <= row["step_time_s"]
    encoders = {
        "amortized_em",
        "vae_joint",
        "vae_alternating",
        "semi_amortized_em",
        "semi_amortized_vae",
    }
    assert set(entry["gaps"]) == encoders
    for by_split in entry["gaps"].values():
        for g in by_split.values():
            total = g["log_likelihood"] - g["elbo_amortized"]
            assert g["approximation_gap"] + g["amortization_gap"] == pytest.approx(total)
            assert g["approximation_gap"] > -1e-8 and g["amortization_gap"] > -1e-8
            assert g["elbo_semi_amortized"] <= g["log_likelihood"] + 1e-10
    gvae = results["gaussian_vae"]
    assert gvae["status"] == "done"
    for split_name in ("train", "test"):
        g = gvae[split_name]
        total = g["log_likelihood"] - g["elbo_amortized"]
        assert g["approximation_gap"] + g["amortization_gap"] == pytest.approx(total, abs=1e-4)
        assert all(math.isfinite(v) for v in g.values())
    bad = [p for p, v in _numbers(entry) if not math.isfinite(v)]
    assert not bad, bad
    rows = [json.loads(line) for line in (gap_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["corner"] for r in rows] == labels


@pytest.mark.slow
def test_amortization_gap_plot_remakes_both_figures(gap_dir):
    for name in ("loglik_vs_time.png", "gaps.png"):
        (gap_dir / name).unlink()
    paths = amortization_gap.plot(gap_dir)
    assert sorted(p.name for p in paths) == ["gaps.png", "loglik_vs_time.png"]
    assert all(p.stat().st_size > 0 for p in paths)


@pytest.mark.slow
def test_existing_run_folders_are_not_overwritten_without_the_flag(trace_dir, gap_dir):
    with pytest.raises(ValueError, match="overwrite"):
        em_trace.main(_tiny_trace(trace_dir))
    with pytest.raises(ValueError, match="overwrite"):
        amortization_gap.main(_tiny_gap(gap_dir))
    assert (trace_dir / "results.json").exists() and (gap_dir / "results.json").exists()


def test_unknown_dataset_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        amortization_gap.main(_tiny_gap(tmp_path / "new", datasets=("mnist",)))
    assert not (tmp_path / "new").exists()
