"""``evaluate``: train the downstream classifier on real-only and real + each augmentation set, and report.

This is the function the CLI (``retrogen evaluate``) and the service's evaluation jobs call. Its four steps
are the functions below, in order: check inputs (:func:`~.inputs.load_inputs`), features + leakage guard,
train every arm with the same seeds, summaries + report.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from retrogen import __version__
from retrogen.imagefolder import LabelledImage
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit
from retrogen.provenance import now_iso

from .classifier import train_and_predict
from .config import EvaluationConfig
from .cost import augmentation_cost
from .errors import LeakageError
from .features import FeatureCache, Features, load_pixels, resolve_embedder
from .guards import find_leaks
from .inputs import REAL_ONLY, EvaluationInputs, ImageSets, load_inputs
from .report import ArmResult, EvaluationReport
from .stats import mean_std, paired_bootstrap_gain

log = logging.getLogger(__name__)


def evaluate(
    train_dir: str | os.PathLike,
    test_dir: str | os.PathLike,
    augment: dict[str, str | os.PathLike],
    *,
    config: EvaluationConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    embedder=None,
    cache: FeatureCache | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> EvaluationReport:
    """Compare real-only training with real + each augmentation set on a held-out test set.

    Args:
        train_dir: the user's real labelled images (ImageFolder).
        test_dir: held-out labelled images (ImageFolder) with the same classes.
        augment: name -> augmentation folder (ImageFolder, usually with provenance.jsonl + summary.json).
        config: classifier, embedder, seeds, mixing and guard-rail settings (checked when it was built).
        out_dir: when given, ``report.json``, ``report.md`` and ``report.png`` are written there.
        embedder: an already-built embedder object (default: ``config.embedder`` is created).
        cache: a FeatureCache shared across calls (features are keyed by image bytes).
        progress: receives ``ProgressEvent``s ``embed`` and ``train``; should_cancel is polled between runs.

    Returns:
        The EvaluationReport (also written to ``out_dir`` when given).

    Raises:
        InvalidEvaluationError: class mismatch, empty sets, reserved or bad set names.
        LeakageError: test images near-duplicate augmentation images (the message names them).
        DatasetLayoutError: a folder is not an ImageFolder.
    """
    t0 = time.perf_counter()
    config = config or EvaluationConfig()
    # 1. Check inputs before any model work.
    inputs = load_inputs(train_dir, test_dir, augment, cap_per_class=config.cap_per_class)
    warnings = inputs.warnings()
    # 2. Features (the linear probe and the leakage check share them), and the leakage guard rail.
    emb = embedder if embedder is not None else resolve_embedder(config.embedder)
    features = _embed_sets(inputs.images, emb, cache if cache is not None else FeatureCache(), progress=progress,
                           should_cancel=should_cancel)
    if config.enable_leakage_check:
        _refuse_leaks(features, threshold=config.leakage_threshold)
    # 3. Train and test each arm with the same seeds.
    correct = _train_arms(inputs, features, config, progress=progress, should_cancel=should_cancel)
    # 4. Summaries: accuracy, per class, gain with a paired bootstrap CI, cost; then the report.
    y_test = _class_indices(inputs.classes, inputs.images.test)
    report = EvaluationReport(
        classes=inputs.classes, arms=[_summarise_arm(arm, correct, inputs=inputs, y_test=y_test, config=config)
                                      for arm in inputs.arms],
        config=config.to_dict() | {"embedder": getattr(emb, "name", config.embedder), "seeds": config.seeds,
                                   "num_steps": config.settings().num_steps},
        counts={"train": inputs.counts(inputs.images.train), "test": inputs.counts(inputs.images.test)},
        leakage={"enabled": config.enable_leakage_check, "threshold": config.leakage_threshold,
                 "checked_pairs": len(inputs.images.test) * sum(map(len, inputs.images.augment.values())),
                 "found": 0},
        warnings=warnings, duration_s=round(time.perf_counter() - t0, 3), created=now_iso(),
        retrogen_version=__version__,
    )
    if out_dir is not None:
        report.write(out_dir)
    return report


def _embed_sets(images: ImageSets[list[LabelledImage]], embedder, cache: FeatureCache, *,
                progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> ImageSets[Features]:
    """Features of every image set, reporting ``embed`` progress after each set."""
    total = sum(len(items) for _, items in images.named())
    done = 0

    def embed(name: str, items: list[LabelledImage]) -> Features:
        nonlocal done
        check_cancel(should_cancel)
        vecs, shas = cache.embed_files(embedder, [it.path for it in items])
        done += len(items)
        emit(progress, ProgressEvent("embed", done, total, message=name))
        return Features(vecs=vecs, ids=[it.image_id for it in items], shas=shas)

    return images.map(embed)


def _refuse_leaks(features: ImageSets[Features], *, threshold: float) -> None:
    """Raise LeakageError naming every augmentation image that copies or near-duplicates a test image."""
    leaks = [leak for name, aug in features.augment.items()
             for leak in find_leaks(features.test, aug, set_name=name, threshold=threshold)]
    if leaks:
        raise LeakageError(leaks, threshold)


def _class_indices(classes: list[str], items: list[LabelledImage]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[it.label] for it in items], np.int64)


def _train_arms(inputs: EvaluationInputs, features: ImageSets[Features], config: EvaluationConfig, *,
                progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> dict[str, np.ndarray]:
    """arm -> (num_seeds, num_test) booleans, whether each seed's classifier got each test image right.

    Every arm trains with the same seeds, so arms differ only in their data and the bootstrap can pair them.
    """
    y = inputs.images.map(lambda _, items: _class_indices(inputs.classes, items))
    if config.classifier == "linear":
        x = features.map(lambda _, f: f.vecs)
    else:
        x = inputs.images.map(lambda _, items: load_pixels([it.path for it in items]))
    settings = config.settings()
    correct: dict[str, np.ndarray] = {}
    runs, num_runs = 0, len(inputs.arms) * config.num_seeds
    for arm in inputs.arms:
        x_aug, y_aug = (x.augment[arm], y.augment[arm]) if arm in x.augment else (x.train[:0], y.train[:0])
        rows = []
        for seed in config.seeds:
            check_cancel(should_cancel)
            pred = train_and_predict(config.classifier, x_real=x.train, y_real=y.train, x_aug=x_aug, y_aug=y_aug,
                                     x_test=x.test, num_classes=len(inputs.classes), settings=settings, seed=seed)
            rows.append(pred == y.test)
            runs += 1
            emit(progress, ProgressEvent("train", runs, num_runs, label=arm))
        correct[arm] = np.stack(rows)
    return correct


def _summarise_arm(arm: str, correct: dict[str, np.ndarray], *, inputs: EvaluationInputs, y_test: np.ndarray,
                   config: EvaluationConfig) -> ArmResult:
    """Accuracy over seeds, per class, gain over real only (paired bootstrap CI) and cost of one arm."""
    acc = correct[arm].mean(axis=1)
    mean, std = mean_std(acc)
    per_class = {c: float(correct[arm][:, y_test == i].mean()) if (y_test == i).any() else float("nan")
                 for i, c in enumerate(inputs.classes)}
    gain = None if arm == REAL_ONLY else paired_bootstrap_gain(correct[REAL_ONLY], correct[arm],
                                                                confidence=config.confidence, seed=config.seed)
    items = inputs.images.augment.get(arm, [])
    set_dir = inputs.set_dirs.get(arm)
    result = ArmResult(
        name=arm, set_dir=str(set_dir) if set_dir is not None else None, num_images=len(items),
        counts=inputs.counts(items) if items else {},
        accuracy={"mean": mean, "std": std, "per_seed": [float(a) for a in acc]},
        per_class=per_class, gain=gain,
        cost=augmentation_cost(set_dir, len(items)) if set_dir is not None else {},
    )
    log.info("%s: top-1 %.4f ± %.4f%s", arm, mean, std,
             f", gain {gain['mean']:+.4f} [{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}]" if gain else "")
    return result
