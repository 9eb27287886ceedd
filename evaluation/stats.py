"""Summary statistics: mean ± std over seeds, and the gain over real-only with a paired bootstrap interval."""

from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_bootstrap_gain(base_correct: np.ndarray, arm_correct: np.ndarray, *, num_resamples: int = 2000,
                          confidence: float = 0.95, seed: int = 0) -> dict:
    """Gain in top-1 accuracy of an arm over the baseline, with a bootstrap confidence interval.

    ``*_correct`` are (num_seeds, num_test) 0/1 arrays from the same seeds and test items (paired). Each
    resample draws seeds and test items with replacement, so the interval covers both training noise and the
    finite test set.
    """
    base, arm = np.asarray(base_correct, float), np.asarray(arm_correct, float)
    if base.shape != arm.shape:
        raise ValueError(f"paired arrays differ in shape: {base.shape} vs {arm.shape}")
    diff = arm - base
    rng = np.random.default_rng(seed)
    s, n = diff.shape  # (seeds, test items)
    stats = np.empty(num_resamples)
    for b in range(num_resamples):
        rows = rng.integers(0, s, s)
        cols = rng.integers(0, n, n)
        stats[b] = diff[rows][:, cols].mean()
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return {"mean": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "confidence": confidence,
            "num_resamples": num_resamples}
