"""Steps 2 and 3 of an evaluation: every image decoded once, then every arm trained on every draw.

Every arm of a draw trains on the same real images with the same seeds (and, for the linear classifier, the
same C chosen on those real images), so arms differ only in the augmentation data they add. Runs are
deterministic for a given config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit

from .classifier import Samples, choose_c, predict_cnn, predict_linear
from .config import EvaluationConfig
from .features import FeatureCache, ImageData
from .inputs import REAL_ONLY, EvaluationInputs
from .leaks import LeakCheck

DRAW_SEED_STRIDE = 7919  # training seed of draw d, seed s: s + d * stride (distinct across draws)


@dataclass(frozen=True)
class LoadedImages:
    """Every image of the evaluation, decoded: the test set, the training pool and each augmentation set."""

    test: ImageData
    pool: ImageData
    sets: dict[str, ImageData]  # set label -> images (a label is the arm's name, per draw when sets differ)
    draw_train: list[np.ndarray]  # per draw: indices into pool
    draw_sets: list[dict[str, str]]  # per draw: arm -> set label
    set_dirs: dict[str, str]  # set label -> folder

    def without(self, leaks: LeakCheck) -> LoadedImages:
        """What ``exclude`` keeps: copying augmentation images out of their sets, copied test images out."""
        sets = {label: data.without(leaks.excluded.get(label, set())) for label, data in self.sets.items()}
        return replace(self, test=self.test.without(leaks.excluded_test), sets=sets)


@dataclass
class Runs:
    """arm -> (draws, seeds, test items) correctness, and what each draw's protocol chose."""

    correct: dict[str, np.ndarray]
    chosen: list[dict[str, Any]] = field(default_factory=list)  # per draw: the linear classifier's C and rule


def load_images(inputs: EvaluationInputs, embedder, cache: FeatureCache, *, progress: ProgressFn | None = None,
                should_cancel: CancelFn | None = None) -> LoadedImages:
    """Decode and embed the test set, the training pool and every distinct augmentation folder once."""
    labels, set_dirs = _set_labels(inputs)
    total = 2 + len(set_dirs)
    emit(progress, ProgressEvent("decode", 0, total, message="test"))
    test = cache.load(embedder, inputs.test)
    check_cancel(should_cancel)
    pool = cache.load(embedder, inputs.train_pool)
    if len(set(pool.ids)) < len(pool.ids):  # several train folders (explicit draws): name images by path
        pool = replace(pool, ids=[str(it.path) for it in inputs.train_pool])
    emit(progress, ProgressEvent("decode", 2, total, message="train"))
    sets = {}
    for done, (label, (draw, name)) in enumerate(set_dirs.items(), start=3):
        check_cancel(should_cancel)
        sets[label] = cache.load(embedder, inputs.draws[draw].augment[name])
        emit(progress, ProgressEvent("decode", done, total, message=label))
    where = {it.path: i for i, it in enumerate(inputs.train_pool)}
    return LoadedImages(test=test, pool=pool, sets=sets,
                        draw_train=[np.array([where[it.path] for it in d.train]) for d in inputs.draws],
                        draw_sets=labels, set_dirs={lb: inputs.draws[d].set_dirs[n] for lb, (d, n) in set_dirs.items()})


def _set_labels(inputs: EvaluationInputs) -> tuple[list[dict[str, str]], dict[str, tuple[int, str]]]:
    """Per draw arm -> label, and label -> (first draw, arm): one label per distinct folder of an arm."""
    labels: list[dict[str, str]] = []
    first: dict[str, tuple[int, str]] = {}
    for d, draw in enumerate(inputs.draws):
        labels.append({})
        for name, folder in draw.set_dirs.items():
            shared = all(other.set_dirs[name] == folder for other in inputs.draws)
            label = name if shared else f"{name} (draw {d})"
            labels[d][name] = label
            first.setdefault(label, (d, name))
    return labels, first


def train_arms(inputs: EvaluationInputs, images: LoadedImages, config: EvaluationConfig, *,
               progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> Runs:
    """Every arm on every draw with the same seeds; correctness of each run on each test image."""
    seeds, arms, draws = config.seeds, inputs.arms, len(inputs.draws)
    y_test = images.test.classes(inputs.classes)
    correct = {arm: np.zeros((draws, len(seeds), len(y_test)), bool) for arm in arms}
    runs = Runs(correct)
    total, done = draws * len(arms) * len(seeds), 0
    for d in range(draws):
        real = images.pool.take(images.draw_train[d])
        c = choose_c(real.vecs, real.classes(inputs.classes), config.settings(), seed=config.seed + d) \
            if config.classifier == "linear" else None
        runs.chosen.append(c or {"rule": "the cnn's head is re-fit per run with C chosen on the real images"
                                 if config.classifier == "stagewise" else "not used"})
        for arm in arms:
            aug = images.sets[images.draw_sets[d][arm]] if arm != REAL_ONLY else real.take([])
            data = _samples(config, real, aug, inputs.classes)
            for s, seed in enumerate(seeds):
                check_cancel(should_cancel)
                pred = _predict(config, data, images.test, c=c, seed=seed + d * DRAW_SEED_STRIDE,
                                on_step=_step_progress(progress, done, total, arm=arm, draw=d, draws=draws))
                correct[arm][d, s] = pred == y_test
                done += 1
                emit(progress, ProgressEvent("train", done, total, label=arm, message=f"draw {d + 1}/{draws}"))
    return runs


def _samples(config: EvaluationConfig, real: ImageData, aug: ImageData, classes: list[str]) -> Samples:
    linear = config.classifier == "linear"
    x_real = real.vecs if linear else real.pixels_chw()
    x_aug = aug.vecs if linear else aug.pixels_chw()
    return Samples(x_real, real.classes(classes), x_aug, aug.classes(classes), len(classes))


def _predict(config: EvaluationConfig, data: Samples, test: ImageData, *, c: dict[str, Any] | None, seed: int,
             on_step) -> np.ndarray:
    if config.classifier == "linear":
        return predict_linear(data, test.vecs, c=c["C"], ratio=config.ratio)
    return predict_cnn(data, test.pixels_chw(), settings=config.settings(), seed=seed,
                       stagewise=config.classifier == "stagewise", on_step=on_step)


def _step_progress(progress: ProgressFn | None, done: int, total: int, *, arm: str, draw: int, draws: int):
    """Training steps of one cnn run as ``train`` progress (the stage's count is runs, the message the step)."""
    if progress is None:
        return None
    return lambda step, steps: progress(ProgressEvent("train", done, total, label=arm,
                                                      message=f"draw {draw + 1}/{draws}, step {step}/{steps}"))
