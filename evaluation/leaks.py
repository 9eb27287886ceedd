"""Step 2b of an evaluation: copies of test images among the training and augmentation images.

Checked between the training images (every image any draw may use) and the test set, and between every
augmentation set and the test set, by :func:`.copies.find_copies`. What a copy does is the config's
``leak_policy``: ``refuse`` stops the evaluation naming every pair; ``exclude`` drops the copying
augmentation images, and the test images that copy training images, from every arm. Either way the report
records the method, the thresholds and every pair.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit

from .config import EvaluationConfig
from .copies import METHOD, ViewCache, find_copies
from .features import ImageData

TRAIN = "train"


@dataclass(frozen=True)
class LeakCheck:
    """What the check found: every pair, and what ``exclude`` removes (test ids; ids per checked set)."""

    pairs: list[dict[str, Any]] = field(default_factory=list)
    excluded_test: set[str] = field(default_factory=set)
    excluded: dict[str, set[str]] = field(default_factory=dict)  # set label -> augmentation image ids
    checked: dict[str, int] = field(default_factory=dict)  # set label -> images checked against the test set

    def summary(self, config: EvaluationConfig, num_test: int) -> dict[str, Any]:
        per_set = Counter(p["set"] for p in self.pairs)
        per_image: dict[str, dict[str, int]] = {}
        for p in self.pairs:
            per_image.setdefault(p["set"], {}).setdefault(p["image"], 0)
            per_image[p["set"]][p["image"]] += 1
        return {"enabled": config.enable_leakage_check, "method": METHOD, "policy": config.leak_policy,
                "near_copy_residual": config.near_copy_residual, "candidates_per_image": config.leak_candidates,
                "num_test": num_test, "checked": self.checked, "found": len(self.pairs),
                "pairs_per_set": dict(per_set), "test_images_per_copying_image": per_image, "pairs": self.pairs,
                "excluded_test_images": sorted(self.excluded_test),
                "excluded_augmentation_images": {k: sorted(v) for k, v in self.excluded.items()}}


def check_leaks(test: ImageData, train: ImageData, sets: dict[str, ImageData], *, config: EvaluationConfig,
                progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> LeakCheck:
    """Copies of test images in ``train`` and in each augmentation set (label -> data). Nothing is removed
    here: ``exclude`` lists what the caller drops."""
    if not config.enable_leakage_check:
        return LeakCheck()
    reference, views = test.fingerprints(), ViewCache()
    pairs: list[dict[str, Any]] = []
    checked: dict[str, int] = {}
    for done, (label, data) in enumerate([(TRAIN, train), *sets.items()], start=1):
        check_cancel(should_cancel)
        found = find_copies(data.fingerprints(), reference, threshold=config.near_copy_residual,
                            candidates=config.leak_candidates, views=views)
        pairs += [c.as_dict(label) for c in found]
        checked[label] = len(data)
        emit(progress, ProgressEvent("leak_check", done, len(sets) + 1, message=label))
    excluded_test = {p["test"] for p in pairs if p["set"] == TRAIN}
    excluded: dict[str, set[str]] = {}
    for p in pairs:
        if p["set"] != TRAIN:
            excluded.setdefault(p["set"], set()).add(p["image"])
    return LeakCheck(pairs, excluded_test, excluded, checked)
