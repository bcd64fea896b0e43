"""Mean and 95% confidence interval of per-image values (Student's t: evaluation sets are often small)."""

from __future__ import annotations

import math

import numpy as np


def mean_ci(values, confidence: float = 0.95) -> dict:
    """``{"mean", "ci95", "std", "n"}`` of the finite ``values``; ``ci95`` is the half-width
    (mean ± ci95). With one value the interval is unknown (None); with none, mean is None too."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "ci95": None, "std": None, "n": 1}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {"mean": mean, "ci95": half, "std": std, "n": n}
