"""Smoke test of experiments/collapse.py: tiny settings, files written, no clobbering."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from emvi.runs import load_script

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "collapse.py"


@pytest.fixture(scope="module")
def collapse():
    return load_script(_PATH)


def _tiny(module, workdir, **overrides):
    cfg = module.Config(
        workdir=str(workdir),
        methods=("vae", "vqvae_restart"),
        seeds=(0,),
        latent_dim=2,
        encoder_hidden=(8,),
        decoder_hidden=(8,),
        num_epochs=2,
        batch_size=500,
        ll_samples=4,
        elbo_samples=2,
        vq_num_codes=4,
        vq_groups=2,
        vq_code_dim=2,
        num_plot_samples=4,
        progress=False,
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.mark.slow
def test_main_writes_results_and_figures_and_refuses_to_clobber(collapse, tmp_path):
    cfg = _tiny(collapse, tmp_path / "run")
    results = collapse.main(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(on_disk["methods"]) == {"vae", "vqvae_restart"}
    summary = on_disk["methods"]["vae"]["summary"]
    for key in ("log_likelihood", "elbo", "active_units", "kl_per_dim", "mutual_information"):
        assert key in summary, key
        assert set(summary[key]) == {"mean", "std"}
    assert len(summary["kl_per_dim"]["mean"]) == 2
    assert np.isfinite(summary["log_likelihood"]["mean"])
    vq_summary = on_disk["methods"]["vqvae_restart"]["summary"]
    assert {"recon", "elbo", "perplexity", "dead_codes"} <= set(vq_summary)
    assert 1.0 <= vq_summary["perplexity"]["mean"] <= 4.0 + 1e-9
    assert results["methods"].keys() == on_disk["methods"].keys()
    for name in ("config.json", "kl_per_dim.png", "kl_curves.png", "samples.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    # Plots are remade from the saved files alone.
    assert len(collapse.plot(tmp_path / "run")) == 3

    with pytest.raises(ValueError, match="overwrite"):
        collapse.main(cfg)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == on_disk
    collapse.main(dataclasses.replace(cfg, overwrite=True, methods=("vae",)))
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(again["methods"]) == {"vae"}


def test_bad_config_raises_before_training(collapse, tmp_path):
    with pytest.raises(ValueError, match="method"):
        collapse.main(_tiny(collapse, tmp_path / "a", methods=("beta_vae",)))
    with pytest.raises(ValueError, match="MMD weight"):
        collapse.main(_tiny(collapse, tmp_path / "b", info_alpha=0.0, info_lambda=0.5))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
