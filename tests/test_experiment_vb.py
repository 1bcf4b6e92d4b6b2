"""Smoke test of experiments/variational_bayes.py: tiny settings, files written, plot rerun."""

import json
from pathlib import Path

import pytest

from emvi.runs import load_script

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "variational_bayes.py"


@pytest.mark.slow
def test_variational_bayes_smoke(tmp_path):
    mod = load_script(_PATH)
    cfg = mod.Config(
        workdir=tmp_path / "run",
        num_components=3,
        gmm_max_iter=3,
        digits_topics=3,
        lda_passes=2,
        online_batch_size=500,
        bars_train_docs=40,
        bars_test_docs=10,
        bars_passes=2,
        bars_num_init=1,
        amortized_steps=5,
        amortized_hidden=(8,),
        gap_samples=4,
        gap_refine_steps=2,
    )
    results = mod.main(cfg)
    for name in ("config.json", "metrics.jsonl", "results.json", "report.md", *mod.FIGURES):
        assert (cfg.workdir / name).exists(), name
    assert len(results["mixtures"]) == 3
    assert all(r["effective_components"] <= 3 for r in results["mixtures"])
    # VB's ELBO is a lower bound on the log marginal likelihood, MAP-EM's the log-likelihood.
    assert json.loads((cfg.workdir / "results.json").read_text()) == results
    assert all(r["test_perplexity"] > 1 for r in results["lda_digits"] + results["lda_bars"])
    # Amortized rows: both corpora, both splits, every bound a finite number of nats per word.
    amortized = results["amortized"]
    assert [(r["corpus"], r["split"]) for r in amortized] == [
        (c, s) for c in ("digits", "bars") for s in ("train", "test")
    ]
    assert all(abs(r["mean_field"]) < 1e3 and abs(r["amortized"]) < 1e3 for r in amortized)
    assert [p.name for p in mod.plot(cfg.workdir)] == list(mod.FIGURES)
    report = (cfg.workdir / "report.md").read_text()
    for r in results["mixtures"] + results["lda_digits"] + results["lda_bars"]:
        assert f"| {r['method']} |" in report
    assert f"| bars | test | {amortized[-1]['mean_field']:.4f} |" in report
    with pytest.raises(ValueError, match="already holds a run"):
        mod.main(cfg)
