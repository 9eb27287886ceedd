"""Step 1 of an evaluation: scan the folders, draw the training shots, and refuse bad input before model work.

An evaluation runs over one or more *draws*. A draw is the real training images one classifier sees plus the
augmentation sets added to them: ``evaluate`` draws ``shots`` images per class from one train folder ``draws``
times (the same augmentation sets join every draw), and ``evaluate_draws`` takes draws whose augmentation
sets were made from each draw's own shots (the evidence benchmark). Every arm sees the same draws.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from retrogen.imagefolder import LabelledImage, scan_imagefolder

from .config import EvaluationConfig
from .errors import InvalidEvaluationError
from .guards import balance_warnings

#: the baseline arm, trained on the real images alone; no augmentation set may take its name
REAL_ONLY = "real-only"


@dataclass(frozen=True)
class Draw:
    """One draw: the real training images, and each augmentation set (name -> images, after the cap)."""

    train: list[LabelledImage]
    augment: dict[str, list[LabelledImage]]
    set_dirs: dict[str, str]  # augmentation set name -> folder, as given


@dataclass(frozen=True)
class EvaluationInputs:
    """The checked datasets of one evaluation."""

    classes: list[str]  # the train images', sorted; class i is label i
    test: list[LabelledImage]
    draws: list[Draw]
    train_pool: list[LabelledImage]  # every training image any draw may use (checked against the test set)

    @property
    def arms(self) -> list[str]:
        """What is trained: real only, then real + each augmentation set."""
        return [REAL_ONLY, *self.draws[0].augment]

    def counts(self, items: list[LabelledImage]) -> dict[str, int]:
        return {c: sum(it.label == c for it in items) for c in self.classes}

    def warnings(self) -> list[str]:
        """Unbalanced sets (first draw), and train classes the test set cannot score."""
        draw = self.draws[0]
        out = balance_warnings("train set", self.counts(draw.train))
        for name, items in draw.augment.items():
            out += balance_warnings(f"augmentation set {name!r}", self.counts(items))
        untested = [c for c, n in self.counts(self.test).items() if n == 0]
        if untested:
            out.append(f"the test set has no images of {untested}: their accuracy is not measured (shown as '–')")
        return out


def load_inputs(train_dir: str | os.PathLike, test_dir: str | os.PathLike,
                augment: Mapping[str, str | os.PathLike], *, config: EvaluationConfig) -> EvaluationInputs:
    """Scan the folders and draw ``config.shots`` per class ``config.draws`` times (all train images once when
    ``shots`` is None).

    Raises:
        InvalidEvaluationError: a bad set name, an empty set, a class the train set lacks, too few shots.
        DatasetLayoutError: a folder is not an ImageFolder (the error names it).
    """
    pool = _scan("train set", train_dir)
    sets = {name: scan_imagefolder(d, min_per_class=0) for name, d in _checked_names(augment).items()}
    draws = [Draw(train, sets, {n: str(d) for n, d in augment.items()})
             for train in _draw_shots(pool, config)]
    return _checked(draws, _scan("test set", test_dir), pool, config)


def load_draw_inputs(draws: Sequence[tuple[str | os.PathLike, Mapping[str, str | os.PathLike]]],
                     test_dir: str | os.PathLike, *, config: EvaluationConfig) -> EvaluationInputs:
    """Draws given explicitly: (train folder, {name: augmentation folder}) each, the same names in every one."""
    if not draws:
        raise InvalidEvaluationError("give at least one draw")
    if config.shots is not None or config.draws != 1:
        raise InvalidEvaluationError("draws given explicitly: leave shots unset and draws at 1")
    names = list(draws[0][1])
    made = []
    for i, (train_dir, augment) in enumerate(draws):
        if list(augment) != names:
            raise InvalidEvaluationError(f"draw {i} has augmentation sets {list(augment)}, draw 0 has {names}")
        sets = {name: scan_imagefolder(d, min_per_class=0) for name, d in _checked_names(augment).items()}
        made.append(Draw(_scan(f"train set of draw {i}", train_dir), sets, {n: str(d) for n, d in augment.items()}))
    pool = list({it.path: it for d in made for it in d.train}.values())
    return _checked(made, _scan("test set", test_dir), pool, config)


def _scan(what: str, folder: str | os.PathLike) -> list[LabelledImage]:
    items = scan_imagefolder(folder, min_per_class=0)
    if not items:
        raise InvalidEvaluationError(f"{what} {folder} has no images")
    return items


def _checked_names(augment: Mapping[str, str | os.PathLike]) -> Mapping[str, str | os.PathLike]:
    for name in augment:
        if not name or name == REAL_ONLY or "=" in name or "," in name:
            raise InvalidEvaluationError(f"augmentation set name {name!r} is empty, reserved or contains '=' or ','")
    return augment


def _draw_shots(pool: list[LabelledImage], config: EvaluationConfig) -> list[list[LabelledImage]]:
    """``config.draws`` subsets of ``config.shots`` images per class (each draw from its own seeded stream)."""
    if config.shots is None:
        return [pool]
    by_class: dict[str, list[LabelledImage]] = {}
    for it in pool:
        by_class.setdefault(it.label, []).append(it)
    short = {c: len(v) for c, v in by_class.items() if len(v) < config.shots}
    if short:
        raise InvalidEvaluationError(f"shots={config.shots} needs that many training images per class; "
                                     f"these have fewer: {short}")
    draws = []
    for d in range(config.draws):
        rng = np.random.default_rng([config.seed, d])
        draws.append([items[i] for _, items in sorted(by_class.items())
                      for i in sorted(rng.choice(len(items), config.shots, replace=False))])
    return draws


def _checked(draws: list[Draw], test: list[LabelledImage], pool: list[LabelledImage],
             config: EvaluationConfig) -> EvaluationInputs:
    classes = sorted({it.label for it in pool})
    unknown_test = sorted({it.label for it in test} - set(classes))
    if unknown_test:
        raise InvalidEvaluationError(f"test set has classes the train set lacks: {unknown_test}")
    capped = []
    for draw in draws:
        sets = {}
        for name, items in draw.augment.items():
            items = cap_per_class(items, config.cap_per_class)
            unknown = sorted({it.label for it in items} - set(classes))
            if unknown:
                raise InvalidEvaluationError(f"augmentation set {name!r} has classes the train set lacks: {unknown}")
            if not items:
                raise InvalidEvaluationError(f"augmentation set {name!r} ({draw.set_dirs[name]}) has no images")
            sets[name] = items
        capped.append(Draw(draw.train, sets, draw.set_dirs))
    return EvaluationInputs(classes=classes, test=test, draws=capped, train_pool=pool)


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
