"""The report's interval for a change in accuracy: a paired bootstrap over the same eval problems (used by the
report's tables and by its plots, so both show one estimate)."""
from __future__ import annotations

import numpy as np


def paired_delta(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Δ = mean(b) − mean(a) over the same problems, with a paired bootstrap 95 % interval (in points). Entries
    are per-problem correctness (bools) or, for pools, per-problem mean correctness over several models."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or not len(x):
        raise ValueError("paired_delta needs two equal-length, non-empty correctness vectors")
    d = y - x
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"delta_pp": 100 * d.mean(), "ci_low_pp": 100 * lo, "ci_high_pp": 100 * hi, "n": len(d)}
