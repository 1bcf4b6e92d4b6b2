"""Smoke test of experiments/collapse.py: tiny settings, files written, no clobbering."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
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


def test_made_decoder_is_autoregressive(collapse):
    """Flipping pixel j may change logits j+1, j+2, ... but never logits 0..j."""
    dec = collapse.MADEDecoder(data_dim=6, hidden=(10,))
    z = jnp.ones((7, 2))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, (1, 6)), jnp.float32)
    flips = jnp.concatenate([x, jnp.abs(x - jnp.eye(6, dtype=x.dtype))])  # row j+1 flips j
    params = dec.init(jax.random.key(0), z[:1], x)
    logits = np.asarray(jax.jit(dec.apply)(params, z, flips))
    changed = np.abs(logits[1:] - logits[:1]) > 0  # (flipped pixel j, logit i)
    assert not np.any(np.tril(changed))  # logit i <= j unchanged
    assert np.any(np.triu(changed, 1))  # and later logits do see pixel j


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


def test_infovae_loss_reduces_to_the_elbo(collapse):
    """With alpha=0, lambda=1 the InfoVAE branch must give exactly the negative ELBO."""
    models = collapse.Models(
        collapse.enn.GaussianEncoder((8,), 2), collapse.MADEDecoder(data_dim=64, hidden=(8,))
    )
    params = collapse.init_vae(jax.random.key(0), models, 2)
    batch = jnp.asarray(collapse.digits_bin().train_x[:16])
    common = dict(models=models, anneal_steps=1, free_bits=0.0, kernel="imq")

    @jax.jit
    def both(params, key):
        vae = collapse.vae_loss(params, key, batch, method="vae", alpha=0.0, lam=1.0, **common)
        info = collapse.vae_loss(params, key, batch, method="infovae", alpha=0.0, lam=1.0, **common)
        info_mmd = collapse.vae_loss(
            params, key, batch, method="infovae", alpha=1.0, lam=5.0, **common
        )
        return vae, info, info_mmd

    (vae, _), (info, aux), (info_mmd, aux_mmd) = both(params, jax.random.key(1))
    np.testing.assert_allclose(info, vae, rtol=1e-6)
    # alpha=1, lambda=5: no KL, MMD weighted by 5.
    np.testing.assert_allclose(info_mmd, -aux_mmd["recon"] + 5.0 * aux_mmd["mmd"], rtol=1e-5)
    assert np.isfinite(float(aux["mmd"]))


def test_bad_config_raises_before_training(collapse, tmp_path):
    with pytest.raises(ValueError, match="method"):
        collapse.main(_tiny(collapse, tmp_path / "a", methods=("beta_vae",)))
    with pytest.raises(ValueError, match="MMD weight"):
        collapse.main(_tiny(collapse, tmp_path / "b", info_alpha=0.0, info_lambda=0.5))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
