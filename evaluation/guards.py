"""Guard rails: unbalanced classes earn a warning. (Copies between sets: :mod:`.leaks`.)"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: max/min class count above which a set is called unbalanced
IMBALANCE_RATIO = 1.5


def balance_warnings(name: str, counts: dict[str, int]) -> list[str]:
    """A warning when the largest class is over IMBALANCE_RATIO times the smallest (or a class is empty)."""
    if not counts:
        return []
    lo, hi = min(counts.values()), max(counts.values())
    if hi and (lo == 0 or hi / lo > IMBALANCE_RATIO):
        small = min(counts, key=counts.get)
        big = max(counts, key=counts.get)
        msg = (f"{name}: unbalanced classes ({big!r} has {hi} images, {small!r} has {lo}); accuracy may favour "
               "the large classes (use cap_per_class to even out augmentation sets)")
        log.warning(msg)
        return [msg]
    return []
