"""Step 4 of an evaluation: per-arm accuracy, gain and cost with intervals, and the protocol in words."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from retrogen import __version__
from retrogen.provenance import now_iso

from .config import EvaluationConfig
from .cost import arm_cost
from .inputs import REAL_ONLY, EvaluationInputs
from .leaks import LeakCheck
from .report import ArmResult, EvaluationReport
from .stats import paired_interval
from .training import LoadedImages, Runs

log = logging.getLogger(__name__)


def build_report(inputs: EvaluationInputs, images: LoadedImages, runs: Runs, *, config: EvaluationConfig,
                 leaks: LeakCheck, embedder_name: str | None, duration_s: float) -> EvaluationReport:
    y_test = images.test.classes(inputs.classes)
    arms = [_arm(arm, inputs, images, runs, y_test=y_test, config=config) for arm in inputs.arms]
    comparisons = [{"a": a, "b": b} | paired_interval(runs.correct[a], runs.correct[b], confidence=config.confidence)
                   for a, b in config.comparisons]
    return EvaluationReport(
        classes=inputs.classes, arms=arms,
        config=config.to_dict() | {"embedder": embedder_name or config.embedder, "seeds": config.seeds},
        protocol=protocol(config, inputs, runs, embedder_name=embedder_name, num_test=len(y_test)),
        draws=[{"train_per_class": inputs.counts(d.train)} for d in inputs.draws],
        comparisons=comparisons,
        counts={"train": inputs.counts(inputs.draws[0].train),
                "test": {c: int((y_test == i).sum()) for i, c in enumerate(inputs.classes)}},
        leakage=leaks.summary(config, len(inputs.test)),
        warnings=inputs.warnings() + _interval_warnings(config, len(inputs.draws)) + _leak_warnings(leaks),
        duration_s=round(duration_s, 3), created=now_iso(), retrogen_version=__version__,
    )


def _arm(arm: str, inputs: EvaluationInputs, images: LoadedImages, runs: Runs, *, y_test: np.ndarray,
         config: EvaluationConfig) -> ArmResult:
    correct = runs.correct[arm]  # (draws, seeds, items)
    per_run = correct.mean(axis=2)
    per_draw = per_run.mean(axis=1)
    spread = per_draw if len(per_draw) > 1 else per_run[0]
    gain = None if arm == REAL_ONLY else paired_interval(correct, runs.correct[REAL_ONLY],
                                                          confidence=config.confidence)
    labels = [d[arm] for d in images.draw_sets] if arm != REAL_ONLY else []
    sets = [images.sets[label] for label in labels]
    dirs = sorted({images.set_dirs[label] for label in labels})
    result = ArmResult(
        name=arm, set_dirs=dirs, num_images=float(np.mean([len(s) for s in sets])) if sets else 0.0,
        counts={c: sets[0].labels.count(c) for c in inputs.classes} if sets else {},
        accuracy={"mean": float(per_draw.mean()), "std": float(spread.std(ddof=1)) if len(spread) > 1 else 0.0,
                  "per_draw": [float(a) for a in per_draw], "per_run": [float(a) for a in per_run.ravel()]},
        per_class={c: float(correct[:, :, y_test == i].mean()) if (y_test == i).any() else None
                   for i, c in enumerate(inputs.classes)},
        gain=gain, aug_settings=config.aug_settings() if arm != REAL_ONLY else None,
        cost=arm_cost([(images.set_dirs[label], len(images.sets[label])) for label in dict.fromkeys(labels)]),
    )
    log.info("%s: top-1 %.4f ± %.4f%s", arm, result.accuracy["mean"], result.accuracy["std"],
             f", gain {gain['mean']:+.4f} [{gain['ci_low']:+.4f}, {gain['ci_high']:+.4f}]" if gain else "")
    return result


def protocol(config: EvaluationConfig, inputs: EvaluationInputs, runs: Runs, *, embedder_name: str | None,
             num_test: int) -> dict[str, Any]:
    """The recipe, as numbers and as the paragraph report.md opens with."""
    s = config.settings()
    if config.classifier == "linear":
        cs = sorted({float(c["C"]) for c in runs.chosen})
        how = f"C = {config.linear_c} (given)" if config.linear_c is not None else (
            f"C chosen per draw on its real images ({runs.chosen[0]['rule']}) among {list(s.linear_c_grid)}; "
            f"chosen: {cs}")
        model = (f"multinomial logistic regression (L2, lbfgs) on {embedder_name or config.embedder} features "
                 f"standardised with each draw's real images; {how}; deterministic, one run per draw")
    else:
        model = (f"a 3-block CNN on 32 px pixels trained end to end: AdamW, learning rate {s.learning_rate}, "
                 f"weight decay {s.weight_decay}, {s.num_steps} steps of {s.batch_size}, cosine schedule, random "
                 f"flips; {len(config.seeds)} seed(s) per draw")
        if config.classifier == "stagewise":
            model += ("; then its head re-fit on the real images only (logistic regression on the pooled features, "
                      f"C chosen by cross-validation on them among {list(s.linear_c_grid)})")
    shots = (f"{len(inputs.draws)} draw(s) of {config.shots} real image(s) per class from the train set"
             if config.shots else f"{len(inputs.draws)} draw(s) as given" if len(inputs.draws) > 1
             else "all real training images")
    text = (f"Protocol: {config.classifier}: {model}. Training data: {shots}, the same for every arm; each "
            f"augmentation set is added as it is unless stated below. Test: {num_test} images. Gains are paired "
            f"per draw, seed and test item; intervals as in stats.paired_interval "
            f"({config.confidence:.0%}).")
    return {"classifier": config.classifier, "text": text, "settings": config.to_dict(), "chosen": runs.chosen}


def _interval_warnings(config: EvaluationConfig, draws: int) -> list[str]:
    if draws > 1:
        return []
    if len(config.seeds) == 1:
        return ["one draw and one training run: no interval here is meaningful (it covers only the test images, "
                "not another choice of training images or another seed); use shots and draws (--shots k --draws N)"]
    return ["one draw: the interval covers seeds and test items but not another choice of training images; use "
            "shots and draws (--shots k --draws N) for a gain that holds beyond this draw"]


def _leak_warnings(leaks: LeakCheck) -> list[str]:
    out = []
    if leaks.excluded_test:
        out.append(f"{len(leaks.excluded_test)} test image(s) copy training images and were left out of the test set")
    for label, ids in leaks.excluded.items():
        out.append(f"{len(ids)} image(s) of {label!r} copy test images and were left out of that arm")
    return out
