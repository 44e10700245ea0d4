"""The statistics of results, in one place for the library and the experiments: the mean and spread
over seeds, intervals for results that must hold beyond seed noise (percentile bootstraps of a mean
over records, and of a paired difference over seeds and records: two levels, draw seeds, then
records, so both the training seed and the choice of validation records count), and how result
tables print them."""

from __future__ import annotations

import statistics

import numpy as np


def mean_and_sd(values) -> tuple[float, float]:
    """The mean and the sample standard deviation of ``values`` (sd 0 for a single value).

    Args:
        values: numbers, e.g. one score per seed.

    Returns:
        ``(mean, sd)``.
    """
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_sd(values) -> str:
    """``"41.3 ± 1.2"`` over several values, the value alone (``"41.3"``) for one.

    Args:
        values: numbers, e.g. one ROUGE-L per seed.

    Returns:
        The mean, and the sample standard deviation after ``±`` where there are two values or more,
        one decimal each.
    """
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    mean, sd = mean_and_sd(values)
    return f"{mean:.1f} ± {sd:.1f}"


def format_mean_count(values) -> str:
    """``"66.7 (3)"``: the mean of ``values``, one decimal, and how many there are."""
    values = list(values)
    return f"{statistics.mean(values):.1f} ({len(values)})"


def format_interval(summary: dict) -> str:
    """``"+1.2 [-0.3, +2.5]"``: a difference and its interval, signed, as ``paired_bootstrap`` returns them.

    Args:
        summary: a mapping with ``mean``, ``low`` and ``high``.
    """
    return f"{summary['mean']:+.1f} [{summary['low']:+.1f}, {summary['high']:+.1f}]"


def bootstrap_interval(values, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` over resampled records."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_bootstrap(differences, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean and interval of per-record differences ``differences`` (seeds, records): each resample
    draws seeds with replacement and, once for all of them, records with replacement (a record is
    the same record in every seed's run, so its draws stay paired)."""
    d = np.asarray(differences, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise ValueError("differences must be (seeds, records) with at least one of each; got shape "
                         f"{d.shape}")
    n_seeds, n_records = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for b in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        records = rng.integers(0, n_records, n_records)
        means[b] = d[np.ix_(seeds, records)].mean()
    tail = (1 - level) / 2
    return {"mean": float(d.mean()), "low": float(np.quantile(means, tail)),
            "high": float(np.quantile(means, 1 - tail)), "seeds": n_seeds, "records": n_records}
