"""Smoke test of the HMM experiment (experiments/hmm.py) and benchmark (scripts/bench_hmm.py)
on tiny settings: the run folder is complete, the numbers are finite, and the figures can be
remade from the folder alone."""

import json
import math
from pathlib import Path

import pytest

from emvi.runs import load_script, read_metrics

ROOT = Path(__file__).resolve().parents[1]
exp = load_script(ROOT / "experiments/hmm.py")


@pytest.mark.slow
def test_hmm_experiment_smoke(tmp_path):
    cfg = exp.Config(
        workdir=tmp_path / "run",
        states=(2,),
        num_init=1,
        max_iter=5,
        num_train=60,
        decode_examples=3,
        synthetic_sequences=6,
        synthetic_max_length=40,
        gap_steps=5,
        gap_hidden=(4,),
        refine_steps=2,
        local_steps=20,
    )
    results = exp.main(cfg)
    run = cfg.workdir
    for name in ("config.json", "metrics.jsonl", "results.json", "arrays.npz", *exp.FIGURES):
        assert (run / name).is_file(), name
    rows = results["digits"]["rows"]
    assert [r["states"] for r in rows] == [2]
    assert all(math.isfinite(r["test_log_likelihood"]) for r in rows)
    syn = results["synthetic"]
    assert 0.0 <= syn["viterbi_state_accuracy"] <= 1.0
    assert all(math.isfinite(v) for v in syn["max_abs_error"].values())
    assert json.loads((run / "results.json").read_text()) == json.loads(json.dumps(results))
    gap = results["gap"]
    assert gap["states"] == 2
    for split in ("train", "test"):
        row = gap[split]
        assert set(row) == {
            f"gap_{name}{suffix}"
            for name in ("amortized", "refined_2", "refined_20", "local_20")
            for suffix in ("", "_stderr", "_median", "_above_1")
        }
        # log p(x) - ELBO >= 0 for every q (1e-9: float64 sums over 60 or 297 digits)
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["gap_amortized"] >= row["gap_refined_20"] >= -1e-9
        assert row["gap_local_20"] >= -1e-9
    assert len(read_metrics(run)) == 4
    for fig in exp.FIGURES:
        (run / fig).unlink()
    written = exp.plot(run)
    assert sorted(p.name for p in written) == sorted(exp.FIGURES)


bench = load_script(ROOT / "scripts/bench_hmm.py")


@pytest.mark.slow
def test_bench_quick_runs_and_histories_agree_with_hmmlearn(tmp_path):
    out = bench.main(bench.Args(quick=True, repeats=1, out=tmp_path / "bench.json"))
    assert [r["case"] for r in out["rows"]] == ["batch", "long"]
    for r in out["rows"]:
        # same start, same iterations, float64: the histories agree to rounding
        assert r["emvi_sequential_history_rel_diff"] < 1e-10, r
        assert r["hmmlearn_ms_per_iter"] > 0 and r["emvi_sequential_ms_per_iter"] > 0
    # the parallel scan runs the whole batch case (the long case on a prefix, untested here)
    assert out["rows"][0]["emvi_parallel_history_rel_diff"] < 1e-10
    assert out["command"].startswith("python scripts/bench_hmm.py")
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(out))
