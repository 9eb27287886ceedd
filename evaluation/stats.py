"""Intervals that cover the variance that matters: which shots were drawn, training seeds, and test items.

Every arm is scored on the same draws, seeds and test items, so two arms are compared by their per-item
difference ``diff[draw, seed, item]`` (1: only the first got the item right, -1: only the second did). The
gain is its mean. Draws and test items are crossed (every draw is tested on the same items), so the variance
of the mean has three parts, estimated from the table itself (method of moments, as for a two-way random
design):

- between training *units*: draws (each averaged over its seeds), or seeds when there is one draw;
- between test items, averaged over all units (an arm that helps some items generalises to new test sets);
- minus the unit x item residual, which both of the above contain once, so it is not counted twice.

The interval is mean ± t(U - 1) x SE with U units (a normal quantile when U = 1, where only test items vary:
the report then warns that nothing is known about another draw or seed). ``tests/test_evaluation_stats.py``
measures how often a null arm's interval excludes 0.
"""

from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_interval(arm_correct: np.ndarray, base_correct: np.ndarray, *, confidence: float = 0.95) -> dict:
    """Mean difference of two arms' (draws, seeds, items) 0/1 arrays, with its interval (module docstring)."""
    from scipy.stats import norm, t

    arm, base = np.asarray(arm_correct, np.float64), np.asarray(base_correct, np.float64)
    if arm.shape != base.shape or arm.ndim != 3:
        raise ValueError(f"paired arrays must share one (draws, seeds, items) shape: {arm.shape} vs {base.shape}")
    diff = arm - base
    draws, seeds, items = diff.shape
    # the replication unit: draws (seeds averaged within each) when there are several, else seeds
    table, unit = (diff.mean(axis=1), "draws") if draws > 1 else (diff[0], "seeds")
    units = table.shape[0]
    mean = float(table.mean())
    unit_means, item_means = table.mean(axis=1), table.mean(axis=0)
    v_unit = unit_means.var(ddof=1) / units if units > 1 else 0.0
    v_item = item_means.var(ddof=1) / items if items > 1 else 0.0
    residual = table - unit_means[:, None] - item_means[None, :] + mean
    v_resid = (residual ** 2).sum() / max(1, (units - 1) * (items - 1)) / (units * items) if units > 1 else 0.0
    se = float(np.sqrt(max(v_unit + v_item - v_resid, v_unit, v_item)))
    q = float(t.ppf(0.5 + confidence / 2, units - 1)) if units > 1 else float(norm.ppf(0.5 + confidence / 2))
    per_draw = diff.mean(axis=(1, 2))
    return {"mean": mean, "ci_low": mean - q * se, "ci_high": mean + q * se, "confidence": confidence,
            "se": se, "method": f"t({units - 1}) over {units} {unit}, test items crossed" if units > 1
            else "normal, over test items only (one draw, one seed)", "num_draws": int(draws),
            "num_seeds": int(seeds), "per_draw": [float(g) for g in per_draw],
            "positive_draws": int((per_draw > 0).sum())}
