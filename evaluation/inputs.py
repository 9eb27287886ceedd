"""Step 1 of an evaluation: scan the folders and refuse bad input before any model work.

The real train and test sets and the augmentation sets travel together as :class:`ImageSets`, so each later
step (features, labels, pixels) maps over all of them at once, and an augmentation set named ``train`` or
``test`` can never stand in for the real set of that name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from retrogen.imagefolder import LabelledImage, scan_imagefolder

from .errors import InvalidEvaluationError
from .guards import balance_warnings

#: the baseline arm, trained on the real images alone; no augmentation set may take its name
REAL_ONLY = "real-only"

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class ImageSets(Generic[T]):
    """One value per image set: the real ``train`` and ``test`` sets, and each augmentation set by name."""

    train: T
    test: T
    augment: dict[str, T]

    def named(self) -> list[tuple[str, T]]:
        """(name, value) in evaluation order: train, test, then the augmentation sets in the caller's order."""
        return [("train", self.train), ("test", self.test), *self.augment.items()]

    def map(self, fn: Callable[[str, T], U]) -> ImageSets[U]:
        """``fn(name, value)`` for every set, called in :meth:`named` order."""
        train, test = fn("train", self.train), fn("test", self.test)
        return ImageSets(train, test, {name: fn(name, v) for name, v in self.augment.items()})


@dataclass(frozen=True)
class EvaluationInputs:
    """The checked datasets of one evaluation."""

    classes: list[str]  # the train set's, sorted; class i is label i
    images: ImageSets[list[LabelledImage]]  # augmentation sets after cap_per_class
    set_dirs: dict[str, str | os.PathLike]  # augmentation set name -> folder, as given

    @property
    def arms(self) -> list[str]:
        """What is trained: real only, then real + each augmentation set."""
        return [REAL_ONLY, *self.images.augment]

    def counts(self, items: list[LabelledImage]) -> dict[str, int]:
        return {c: sum(it.label == c for it in items) for c in self.classes}

    def warnings(self) -> list[str]:
        """A warning for each unbalanced set (the train set, then each augmentation set)."""
        out = balance_warnings("train set", self.counts(self.images.train))
        for name, items in self.images.augment.items():
            out += balance_warnings(f"augmentation set {name!r}", self.counts(items))
        return out


def load_inputs(train_dir: str | os.PathLike, test_dir: str | os.PathLike,
                augment: Mapping[str, str | os.PathLike], *, cap_per_class: int | None) -> EvaluationInputs:
    """Scan every folder and check names, classes and sizes.

    Raises:
        InvalidEvaluationError: a reserved or bad set name, an empty set, a class the train set lacks.
        DatasetLayoutError: a folder is not an ImageFolder (the error names it).
    """
    for name in augment:
        if not name or name == REAL_ONLY or "=" in name:
            raise InvalidEvaluationError(f"augmentation set name {name!r} is empty, reserved or contains '='")
    train = scan_imagefolder(train_dir, min_per_class=0)
    test = scan_imagefolder(test_dir, min_per_class=0)
    classes = sorted({it.label for it in train})
    if not train:
        raise InvalidEvaluationError(f"train set {train_dir} has no images")
    if not test:
        raise InvalidEvaluationError(f"test set {test_dir} has no images")
    unknown_test = sorted({it.label for it in test} - set(classes))
    if unknown_test:
        raise InvalidEvaluationError(f"test set has classes the train set lacks: {unknown_test}")
    sets = {name: _load_set(name, d, classes, cap_per_class) for name, d in augment.items()}
    return EvaluationInputs(classes=classes, images=ImageSets(train, test, sets), set_dirs=dict(augment))


def _load_set(name: str, set_dir: str | os.PathLike, classes: list[str], cap: int | None) -> list[LabelledImage]:
    items = cap_per_class(scan_imagefolder(set_dir, min_per_class=0), cap)
    unknown = sorted({it.label for it in items} - set(classes))
    if unknown:
        raise InvalidEvaluationError(f"augmentation set {name!r} has classes the train set lacks: {unknown}")
    if not items:
        raise InvalidEvaluationError(f"augmentation set {name!r} ({set_dir}) has no images")
    return items


def cap_per_class(items: list[LabelledImage], cap: int | None) -> list[LabelledImage]:
    """The first ``cap`` images of each class in scan order (class, file name): deterministic, and the set's
    own first images rather than a sample."""
    if cap is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.label, 0) < cap:
            out.append(it)
            seen[it.label] = seen.get(it.label, 0) + 1
    return out
