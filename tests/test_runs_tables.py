"""The table and summary helpers of emvi.runs: mean_and_sem, format_number, markdown_table."""

import math

import numpy as np
import pytest
from scipy import stats

from emvi import runs


def test_mean_and_sem_match_scipy():
    x = np.random.default_rng(0).normal(size=37).astype(np.float32)
    mean, sem = runs.mean_and_sem(x)
    # Both in float64 over the same 37 values: agreement to rounding.
    assert mean == pytest.approx(float(np.mean(x.astype(np.float64))), rel=1e-14)
    assert sem == pytest.approx(float(stats.sem(x.astype(np.float64))), rel=1e-12)
    assert math.isnan(runs.mean_and_sem([3.0])[1]) and runs.mean_and_sem([3.0])[0] == 3.0


def test_format_number_drops_the_sign_of_a_rounded_zero():
    assert runs.format_number(-0.0004, 3) == "0.000"
    assert runs.format_number(-0.004) == "0.00"
    assert runs.format_number(-0.006) == "-0.01"
    assert runs.format_number(17.456) == "17.46"
    assert runs.format_number("x") == "x" and runs.format_number(None) == "None"


def test_markdown_table_lays_out_headers_rule_and_cells():
    rows = [{"a": "x", "b": 1.5}, {"a": "y", "b": -2.25}]
    columns = [("name", lambda r: r["a"]), ("value", lambda r: f"{r['b']:.1f}")]
    assert runs.markdown_table(rows, columns, align="lr") == (
        "| name | value |\n|---|---:|\n| x | 1.5 |\n| y | -2.2 |\n"
    )
    assert runs.markdown_table([], columns).splitlines()[1] == "|---|---|"
    with pytest.raises(ValueError, match="align"):
        runs.markdown_table(rows, columns, align="l")
    with pytest.raises(ValueError, match="align"):
        runs.markdown_table(rows, columns, align="lc")


def test_load_average_is_three_rounded_non_negative_numbers():
    load = runs.load_average()
    assert load is None or (len(load) == 3 and all(v >= 0 and round(v, 2) == v for v in load))
