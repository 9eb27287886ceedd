"""The gain's interval keeps its promise: a null arm's interval excludes 0 at about the nominal rate.

Simulated evaluations where an arm is exchangeable with real-only: test items of varying difficulty shared by
both arms, a per-draw training effect shared by both (which shots were drawn), and a per-draw gain that is
zero on average but not in any one draw (an augmentation set that helps some draws and hurts others).
"""

from __future__ import annotations

import numpy as np

from retrogen.evaluation.stats import paired_interval


def _null(rng: np.random.Generator, draws: int, seeds: int, items: int = 300):
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    difficulty = rng.normal(1.0, 1.5, items)
    draw_effect = rng.normal(0, 0.3, (draws, 1, 1))
    gain = rng.normal(0, 0.15, (draws, 1, 1))  # zero on average: the null
    base = rng.random((draws, seeds, items)) < sig(difficulty + draw_effect + rng.normal(0, 0.1, (draws, seeds, 1)))
    arm = rng.random((draws, seeds, items)) < sig(difficulty + draw_effect + gain
                                                  + rng.normal(0, 0.1, (draws, seeds, 1)))
    return arm, base


def _false_positive_rate(draws: int, seeds: int, n: int = 300) -> float:
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(n):
        r = paired_interval(*_null(rng, draws, seeds))
        hits += r["ci_low"] > 0 or r["ci_high"] < 0
    return hits / n


def test_a_null_arm_is_significant_at_about_the_nominal_rate_with_ten_draws():
    assert 0.02 <= _false_positive_rate(10, 3) <= 0.09


def test_one_draw_cannot_see_the_draw_to_draw_variance():
    # what the report's one-draw warning is about: the same null looks significant far more often
    assert _false_positive_rate(1, 1) > 0.12


def test_a_real_gain_is_found():
    rng = np.random.default_rng(3)
    arm, base = _null(rng, 10, 3)
    better = arm | (rng.random(arm.shape) < 0.15)
    r = paired_interval(better, base)
    assert r["ci_low"] > 0 and r["method"] == "t(9) over 10 draws, test items crossed"
