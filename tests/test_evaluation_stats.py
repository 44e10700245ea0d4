"""Bootstrap intervals: where they sit and how wide they are, for records and for seeds x records."""

from __future__ import annotations

import numpy as np
import pytest

from gist_lightning.evaluation.stats import (
    bootstrap_interval,
    format_interval,
    format_mean_count,
    format_mean_sd,
    mean_and_sd,
    paired_bootstrap,
)


def test_bootstrap_interval_of_a_mean():
    assert bootstrap_interval([3.0] * 10) == (3.0, 3.0)
    values = np.random.default_rng(0).normal(10, 2, size=400)
    lo, hi = bootstrap_interval(values)
    half = 1.96 * 2 / np.sqrt(400)  # the normal interval's half width, 0.196
    assert lo < values.mean() < hi and hi - lo == pytest.approx(2 * half, rel=0.2)


def test_paired_bootstrap_counts_seeds_and_records():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 10, size=(3, 200))
    none = paired_bootstrap(noise * 0)
    assert (none["mean"], none["low"], none["high"]) == (0.0, 0.0, 0.0)
    shifted = paired_bootstrap(noise + 5)
    assert shifted["low"] > 0 and shifted["low"] < 5 < shifted["high"]
    # the same records, but one seed's run sits 8 points apart: the seed level widens the interval
    seeds_apart = paired_bootstrap(noise + 5 + np.array([[0.0], [0.0], [8.0]]))
    assert seeds_apart["high"] - seeds_apart["low"] > 1.5 * (shifted["high"] - shifted["low"])
    assert (shifted["seeds"], shifted["records"]) == (3, 200)
    with pytest.raises(ValueError, match="seeds, records"):
        paired_bootstrap([1.0, 2.0])


def test_result_tables_print_means_spreads_and_intervals():
    assert mean_and_sd([2.0]) == (2.0, 0.0)
    assert mean_and_sd([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert format_mean_sd([41.25]) == "41.2" and format_mean_sd([40.0, 42.0]) == "41.0 ± 1.4"
    assert format_mean_count([100.0, 0.0, 100.0]) == "66.7 (3)"
    assert format_interval({"mean": 1.23, "low": -0.3, "high": 2.5}) == "+1.2 [-0.3, +2.5]"
