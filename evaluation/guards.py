"""Guard rails: test images must not leak into augmentation sets; unbalanced classes earn a warning."""

from __future__ import annotations

import logging

from .features import Features

log = logging.getLogger(__name__)

#: max/min class count above which a set is called unbalanced
IMBALANCE_RATIO = 1.5


def find_leaks(test: Features, aug: Features, *, set_name: str, threshold: float) -> list[dict]:
    """Augmentation images that copy (same bytes) or near-duplicate (cosine >= threshold) a test image.

    Vectors are L2-normalised, so inner product = cosine. One entry per leaking augmentation image, naming the
    most similar test image (the copied one for a byte copy).
    """
    leaks: list[dict] = []
    if not len(test.vecs) or not len(aug.vecs):
        return leaks
    test_sha = {s: i for i, s in enumerate(test.shas)}
    for start in range(0, len(aug.vecs), 1024):  # blocks bound the (block, num_test) similarity matrix
        sims = aug.vecs[start : start + 1024] @ test.vecs.T
        best = sims.argmax(axis=1)
        for j, (b, row) in enumerate(zip(best, sims, strict=True)):
            k = start + j
            same = test_sha.get(aug.shas[k])
            if same is not None or row[b] >= threshold:
                t = same if same is not None else int(b)
                leaks.append({"set": set_name, "image": aug.ids[k], "test": test.ids[t],
                              "similarity": 1.0 if same is not None else round(float(row[b]), 4)})
    return leaks


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
