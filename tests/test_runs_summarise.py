"""emvi.runs.summarise (mean and sd over seeds) and emvi.runs.fingerprint."""

import dataclasses

import numpy as np
import pytest

from emvi import runs


def test_summarise_is_numpys_mean_and_population_std_per_key_and_element():
    rng = np.random.default_rng(0)
    rows = [
        {"ll": float(v), "au": int(a), "kl": list(map(float, k)), "name": "x"}
        for v, a, k in zip(rng.normal(size=3), [3, 4, 4], rng.random((3, 2)), strict=True)
    ]
    s = runs.summarise(rows)
    assert set(s) == {"ll", "au", "kl"}  # strings are left out
    lls = np.array([r["ll"] for r in rows])
    assert s["ll"] == {
        "mean": pytest.approx(lls.mean(), rel=1e-15),
        "std": pytest.approx(lls.std()),
    }
    assert s["au"]["mean"] == pytest.approx(11 / 3) and s["au"]["std"] == pytest.approx(
        np.sqrt(2 / 9)
    )
    kl = np.array([r["kl"] for r in rows])
    np.testing.assert_allclose(s["kl"]["mean"], kl.mean(0), rtol=1e-15)
    np.testing.assert_allclose(s["kl"]["std"], kl.std(0), rtol=1e-15)
    assert runs.summarise(rows[:1])["ll"]["std"] == 0.0
    with pytest.raises(ValueError, match="rows"):
        runs.summarise([])


@dataclasses.dataclass(frozen=True)
class _Cfg:
    workdir: str = "a"
    seed: int = 0
    hidden: tuple[int, ...] = (8,)


def test_fingerprint_ignores_skipped_fields_and_sees_the_rest():
    base = runs.fingerprint(_Cfg(), skip=("workdir",), kind="g")
    assert len(base) == 16 and int(base, 16) >= 0
    assert runs.fingerprint(_Cfg(workdir="b"), skip=("workdir",), kind="g") == base
    assert runs.fingerprint(_Cfg(seed=1), skip=("workdir",), kind="g") != base
    assert runs.fingerprint(_Cfg(hidden=(9,)), skip=("workdir",), kind="g") != base
    assert runs.fingerprint(_Cfg(), skip=("workdir",), kind="c") != base
    assert runs.fingerprint(_Cfg()) != base
