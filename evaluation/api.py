"""``evaluate``: train the downstream classifier on real-only and real + each augmentation set, and report.

This is the function the CLI (``retrogen evaluate``) and the service's evaluation jobs call.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from retrogen import __version__
from retrogen.imagefolder import LabelledImage, scan_imagefolder
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit
from retrogen.provenance import now_iso

from .classifier import CLASSIFIERS, TrainSettings, train_and_predict
from .cost import augmentation_cost
from .errors import InvalidEvaluationError, LeakageError
from .features import FeatureCache, load_pixels, resolve_embedder
from .guards import balance_warnings, find_leaks
from .report import ArmResult, EvaluationReport
from .stats import mean_std, paired_bootstrap_gain

log = logging.getLogger(__name__)

REAL_ONLY = "real-only"
DEFAULT_EMBEDDER = "efficientnet-lite0:onnx"


@dataclass(frozen=True)
class EvaluationConfig:
    """Everything that shapes an evaluation besides the data. One name for kwarg, CLI flag and JSON."""

    classifier: str = "linear"  # "linear" (probe on frozen embeddings) or "cnn" (small CNN on 32 px pixels)
    embedder: str = DEFAULT_EMBEDDER  # features for the probe and for the leakage check
    num_seeds: int = 3
    ratio: float | None = None  # DA-Fusion's p: share of augmentation samples per batch; None: uniform mix
    aug_label_smoothing: float = 0.0
    cap_per_class: int | None = None  # use at most this many augmentation images per class
    num_steps: int | None = None  # optimiser steps; None: linear 300, cnn 600
    batch_size: int = 64
    leakage_threshold: float = 0.95  # cosine in the embedder's space; test~augmentation at or above is refused
    enable_leakage_check: bool = True
    confidence: float = 0.95
    seed: int = 0  # seeds used: seed, seed + 1, ...

    def check(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise InvalidEvaluationError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        if self.num_seeds < 1:
            raise InvalidEvaluationError(f"num_seeds must be >= 1, got {self.num_seeds}")
        if self.cap_per_class is not None and self.cap_per_class < 0:
            raise InvalidEvaluationError(f"cap_per_class must be >= 0, got {self.cap_per_class}")
        if not -1.0 <= self.leakage_threshold <= 1.0:
            raise InvalidEvaluationError(f"leakage_threshold must be a cosine in [-1, 1], got {self.leakage_threshold}")
        if not 0.5 <= self.confidence < 1.0:
            raise InvalidEvaluationError(f"confidence must be in [0.5, 1), got {self.confidence}")
        self.settings().check()

    @classmethod
    def from_dict(cls, d: dict) -> EvaluationConfig:
        """Build from JSON (e.g. a service request body); unknown keys are an error listing the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise InvalidEvaluationError(f"unknown evaluation setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
        config = cls(**d)
        config.check()
        return config

    def settings(self) -> TrainSettings:
        steps = self.num_steps or (300 if self.classifier == "linear" else 600)
        return TrainSettings(num_steps=steps, batch_size=self.batch_size, ratio=self.ratio,
                             aug_label_smoothing=self.aug_label_smoothing)


def _scan(d: str | os.PathLike) -> list[LabelledImage]:
    return scan_imagefolder(d, min_per_class=0)  # DatasetLayoutError names the folder


def _counts(items: list[LabelledImage], classes: list[str]) -> dict[str, int]:
    return {c: sum(it.label == c for it in items) for c in classes}


def _cap(items: list[LabelledImage], cap: int | None) -> list[LabelledImage]:
    if cap is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for it in items:  # scan order (class, file name): deterministic, the set's own first images
        if seen.get(it.label, 0) < cap:
            out.append(it)
            seen[it.label] = seen.get(it.label, 0) + 1
    return out


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
        config: classifier, embedder, seeds, mixing and guard-rail settings.
        out_dir: when given, ``report.json``, ``report.md`` and ``report.png`` are written there.
        embedder: an already-built embedder object (default: ``config.embedder`` is created).
        cache: a FeatureCache shared across calls (features are keyed by image bytes).
        progress: receives ``ProgressEvent``s ``embed`` and ``train``; should_cancel is polled between runs.

    Returns:
        The EvaluationReport (also written to ``out_dir`` when given).

    Raises:
        InvalidEvaluationError: bad config, class mismatch, empty sets, reserved or bad set names.
        LeakageError: test images near-duplicate augmentation images (the message names them).
        DatasetLayoutError: a folder is not an ImageFolder.
    """
    t0 = time.perf_counter()
    config = config or EvaluationConfig()
    # 1. Check inputs before any model work.
    config.check()
    for name in augment:
        if not name or name == REAL_ONLY or "=" in name:
            raise InvalidEvaluationError(f"augmentation set name {name!r} is empty, reserved or contains '='")
    train = _scan(train_dir)
    test = _scan(test_dir)
    classes = sorted({it.label for it in train})
    if not train:
        raise InvalidEvaluationError(f"train set {train_dir} has no images")
    if not test:
        raise InvalidEvaluationError(f"test set {test_dir} has no images")
    unknown_test = sorted({it.label for it in test} - set(classes))
    if unknown_test:
        raise InvalidEvaluationError(f"test set has classes the train set lacks: {unknown_test}")
    sets: dict[str, list[LabelledImage]] = {}
    for name, d in augment.items():
        items = _cap(_scan(d), config.cap_per_class)
        unknown = sorted({it.label for it in items} - set(classes))
        if unknown:
            raise InvalidEvaluationError(f"augmentation set {name!r} has classes the train set lacks: {unknown}")
        if not items:
            raise InvalidEvaluationError(f"augmentation set {name!r} ({d}) has no images")
        sets[name] = items
    counts = {"train": _counts(train, classes), "test": _counts(test, classes)}
    warnings = balance_warnings("train set", counts["train"])
    warnings += [w for name, items in sets.items() for w in balance_warnings(f"augmentation set {name!r}",
                                                                              _counts(items, classes))]

    # 2. Features (linear probe and leakage check share them), and the leakage guard rail.
    emb = embedder if embedder is not None else resolve_embedder(config.embedder)
    cache = cache if cache is not None else FeatureCache()
    total = len(train) + len(test) + sum(len(v) for v in sets.values())
    feats: dict[str, tuple[np.ndarray, list[str]]] = {}
    done = 0
    for name, items in [("train", train), ("test", test), *sets.items()]:
        check_cancel(should_cancel)
        feats[name] = cache.embed_files(emb, [it.path for it in items])
        done += len(items)
        emit(progress, ProgressEvent("embed", done, total, message=name))
    leaks: list[dict] = []
    if config.enable_leakage_check:
        test_ids = [it.image_id for it in test]
        for name, items in sets.items():
            leaks += find_leaks(feats["test"][0], test_ids, feats["test"][1], feats[name][0],
                                [it.image_id for it in items], feats[name][1], name, config.leakage_threshold)
        if leaks:
            raise LeakageError(leaks, config.leakage_threshold)

    # 3. Train and test each arm with the same seeds.
    idx = {c: i for i, c in enumerate(classes)}
    y = {name: np.array([idx[it.label] for it in items], np.int64)
         for name, items in [("train", train), ("test", test), *sets.items()]}
    if config.classifier == "linear":
        x = {k: v[0] for k, v in feats.items()}
    else:
        x = {name: load_pixels([it.path for it in items])
             for name, items in [("train", train), ("test", test), *sets.items()]}
    seeds = [config.seed + s for s in range(config.num_seeds)]
    settings = config.settings()
    arms = [REAL_ONLY, *sets]
    correct: dict[str, np.ndarray] = {}
    runs, n_runs = 0, len(arms) * len(seeds)
    for arm in arms:
        rows = []
        for seed in seeds:
            check_cancel(should_cancel)
            xa = x[arm] if arm != REAL_ONLY else x["train"][:0]
            ya = y[arm] if arm != REAL_ONLY else y["train"][:0]
            pred = train_and_predict(config.classifier, x["train"], y["train"], xa, ya, x["test"], len(classes),
                                     settings, seed)
            rows.append(pred == y["test"])
            runs += 1
            emit(progress, ProgressEvent("train", runs, n_runs, label=arm))
        correct[arm] = np.stack(rows)

    # 4. Summaries: accuracy, per class, gain with a paired bootstrap CI, cost.
    results = []
    for arm in arms:
        acc = correct[arm].mean(axis=1)
        mean, std = mean_std(acc)
        per_class = {c: float(correct[arm][:, y["test"] == i].mean()) if (y["test"] == i).any() else float("nan")
                     for c, i in idx.items()}
        gain = None if arm == REAL_ONLY else paired_bootstrap_gain(correct[REAL_ONLY], correct[arm],
                                                                    confidence=config.confidence, seed=config.seed)
        items = sets.get(arm, [])
        results.append(ArmResult(
            name=arm, set_dir=str(augment[arm]) if arm in augment else None, num_images=len(items),
            counts=_counts(items, classes) if items else {},
            accuracy={"mean": mean, "std": std, "per_seed": [float(a) for a in acc]},
            per_class=per_class, gain=gain,
            cost=augmentation_cost(augment[arm], len(items)) if arm in augment else {},
        ))
        log.info("%s: top-1 %.4f ± %.4f%s", arm, mean, std,
                 f", gain {gain['mean']:+.4f} [{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}]" if gain else "")
    report = EvaluationReport(
        classes=classes, arms=results, config=asdict(config) | {"embedder": getattr(emb, "name", config.embedder),
                                                                 "seeds": seeds, "num_steps": settings.num_steps},
        counts=counts, leakage={"enabled": config.enable_leakage_check, "threshold": config.leakage_threshold,
                                "checked_pairs": len(test) * sum(len(v) for v in sets.values()), "found": 0},
        warnings=warnings, duration_s=round(time.perf_counter() - t0, 3), created=now_iso(),
        retrogen_version=__version__,
    )
    if out_dir is not None:
        report.write(out_dir)
    return report
