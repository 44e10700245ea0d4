"""Intervals for results that must hold beyond seed noise: percentile bootstraps of a mean over
records, and of a paired difference over seeds and records (two levels: draw seeds, then records,
so both the training seed and the choice of validation records count)."""

from __future__ import annotations

import numpy as np


def bootstrap_interval(values, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
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
        raise ValueError(f"differences must be (seeds, records) with at least one of each; got shape {d.shape}")
    n_seeds, n_records = d.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for b in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        records = rng.integers(0, n_records, n_records)
        means[b] = d[np.ix_(seeds, records)].mean()
    tail = (1 - level) / 2
    return {"mean": float(d.mean()), "low": float(np.quantile(means, tail)), "high": float(np.quantile(means, 1 - tail)),
            "seeds": n_seeds, "records": n_records}
