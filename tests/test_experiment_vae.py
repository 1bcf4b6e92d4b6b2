"""Smoke test of experiments/vae.py on tiny settings (seconds, not minutes)."""

import hashlib
import json
from pathlib import Path

import pytest

from emvi.runs import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_script(ROOT / "experiments/vae.py")


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


REQUIRED = {
    "test_elbo",
    "test_log_likelihood",
    "active_units",
    "kl_per_dim",
    "mutual_information",
    "mutual_information_num_points",
    "reconstruction_error",
    "train_time_s",
}
FIGURES = ["learning_curves.png", "reconstructions.png", "samples.png", "traversals.png"]


@pytest.mark.slow
def test_main_writes_a_complete_run_folder_and_refuses_to_overwrite(tmp_path):
    exp = _load()
    workdir = tmp_path / "run"
    cfg = exp.Config(
        workdir=workdir,
        epochs=2,
        hidden=(8,),
        latent_dim=2,
        num_classes=3,
        batch_size=500,
        eval_num_samples=10,
        eval_every=1,
        progress=False,
    )
    results = exp.main(cfg)

    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["num_train"] == 1500 and on_disk["num_test"] == 297
    for kind in ("gaussian", "categorical"):
        assert REQUIRED <= set(on_disk[kind]), kind
        assert on_disk[kind]["test_log_likelihood"] == pytest.approx(
            results[kind]["test_log_likelihood"]
        )
        # A bound on log p(x) cannot exceed it (exactly for the categorical VAE; the
        # 10-sample IWAE estimate beats the 100-sample ELBO by far more than its noise).
        assert on_disk[kind]["test_log_likelihood"] >= on_disk[kind]["test_elbo"] - 1e-4
        rows = [json.loads(line) for line in (workdir / kind / "metrics.jsonl").open()]
        assert [r["epoch"] for r in rows] == [0, 1]
        assert "eval_test_elbo" in rows[-1]
        assert (workdir / kind / "checkpoints").is_dir()
    assert len(on_disk["gaussian"]["kl_per_dim"]) == 2
    assert on_disk["gaussian"]["mutual_information_num_points"] == 297
    config = json.loads((workdir / "config.json").read_text())
    assert config["config"]["epochs"] == 2 and "environment" in config
    for name in FIGURES:
        assert (workdir / name).stat().st_size > 1000, name

    # Figures can be remade from the folder alone.
    (workdir / "samples.png").unlink()
    exp.plot(workdir)
    assert (workdir / "samples.png").exists()

    before = _snapshot(workdir)
    with pytest.raises(ValueError, match="already holds a run"):
        exp.main(cfg)
    assert _snapshot(workdir) == before
