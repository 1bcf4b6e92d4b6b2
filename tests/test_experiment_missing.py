"""Smoke test of experiments/missing.py on tiny settings (IterativeImputer off: it is the
slowest part and scikit-learn's own)."""

import json
import math
from pathlib import Path

import pytest

from emvi.runs import load_script

missing_exp = load_script(Path(__file__).resolve().parents[1] / "experiments/missing.py")


@pytest.mark.slow
def test_missing_experiment_runs_and_plots(tmp_path):
    cfg = missing_exp.Config(
        workdir=tmp_path / "run",
        fractions=(0.3,),
        covariance_types=("diag",),
        num_train=150,
        max_iter=5,
        label_fractions=(0.1, 1.0),
        iterative_imputer=False,
    )
    results = missing_exp.main(cfg)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    rows = {r["method"]: r for r in results["missing"]["0.3"]}
    assert set(rows) == {
        "mean imputation",
        "GMM diag, EM marginalised",
        "GMM diag, EM on mean-imputed",
    }
    for row in rows.values():
        assert math.isfinite(row["rmse"]) and row["rmse"] > 0
    assert math.isfinite(rows["GMM diag, EM marginalised"]["test_observed_ll"])
    assert [r["labelled_fraction"] for r in results["labels"]] == [0.1, 1.0]
    assert all(0 <= r["test_accuracy"] <= 1 for r in results["labels"])
    for name in missing_exp.FIGURES:
        (tmp_path / "run" / name).unlink()
    paths = missing_exp.plot(tmp_path / "run")
    assert sorted(p.name for p in paths) == sorted(missing_exp.FIGURES)
