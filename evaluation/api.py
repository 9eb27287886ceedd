"""``evaluate``: train the downstream classifier on real-only and real + each augmentation set, and report.

The CLI (``retrogen evaluate``) and the service's evaluation jobs call :func:`evaluate`; the evidence
benchmark calls :func:`evaluate_draws` with augmentation sets made from each draw's own shots. Both run the
same four steps: check inputs and draw the shots (:mod:`.inputs`); decode and embed every image once and look
for copies of test images (:mod:`.leaks`); train every arm on every draw with the same seeds
(:mod:`.training`); summarise with intervals over draws, seeds and test items (:mod:`.summary`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from retrogen.fileio import atomic_write_json
from retrogen.progress import CancelFn, ProgressFn

from .config import EvaluationConfig
from .errors import InvalidEvaluationError, LeakageError
from .features import FeatureCache, resolve_embedder
from .inputs import EvaluationInputs, load_draw_inputs, load_inputs
from .leaks import check_leaks
from .report import EvaluationReport
from .summary import build_report
from .training import load_images, train_arms

LEAKS_JSON = "leaks.json"


def evaluate(
    train_dir: str | os.PathLike,
    test_dir: str | os.PathLike,
    augment: Mapping[str, str | os.PathLike],
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
        train_dir: the user's real labelled images (ImageFolder); with ``config.shots``, the pool each draw
            takes its shots from.
        test_dir: held-out labelled images (ImageFolder) with the train set's classes.
        augment: name -> augmentation folder (ImageFolder, usually with provenance.jsonl + summary.json).
        config: classifier protocol, draws, seeds, mixing and leak-check settings (checked when built).
        out_dir: when given, ``report.json``, ``report.md`` and ``report.png`` are written there (and
            ``leaks.json`` when copies stop the evaluation).
        embedder: an already-built embedder object (default: ``config.embedder`` is created).
        cache: a FeatureCache shared across calls (images are keyed by their bytes).
        progress: receives ``ProgressEvent``s (``decode``, ``leak_check``, ``train``); should_cancel is polled
            between steps of training.

    Raises:
        InvalidEvaluationError: class mismatch, empty sets, bad names, too few shots, an unreadable image (named).
        LeakageError: training or augmentation images copy test images and leak_policy is ``refuse``.
        DatasetLayoutError: a folder is not an ImageFolder.
    """
    config = config or EvaluationConfig()
    inputs = load_inputs(train_dir, test_dir, augment, config=config)
    return _run(inputs, config, out_dir=out_dir, embedder=embedder, cache=cache, progress=progress,
                should_cancel=should_cancel)


def evaluate_draws(
    draws: Sequence[tuple[str | os.PathLike, Mapping[str, str | os.PathLike]]],
    test_dir: str | os.PathLike,
    *,
    config: EvaluationConfig | None = None,
    **options,
) -> EvaluationReport:
    """As :func:`evaluate` (the same keyword ``options``: out_dir, embedder, cache, progress, should_cancel),
    with the draws given: (train folder, {name: augmentation folder}) each, the augmentation sets made from
    that draw's own training images, the same set names in every draw."""
    config = config or EvaluationConfig()
    return _run(load_draw_inputs(draws, test_dir, config=config), config, **options)


def _run(inputs: EvaluationInputs, config: EvaluationConfig, *, out_dir: str | os.PathLike | None = None,
         embedder=None, cache: FeatureCache | None = None, progress: ProgressFn | None = None,
         should_cancel: CancelFn | None = None) -> EvaluationReport:
    t0 = time.perf_counter()
    # 1. Inputs are checked; the comparisons must name arms that exist.
    unknown = sorted({name for pair in config.comparisons for name in pair} - set(inputs.arms))
    if unknown:
        raise InvalidEvaluationError(f"compare names unknown arm(s) {unknown}; arms: {', '.join(inputs.arms)}")
    # 2. Decode and embed every image once, then look for copies of test images.
    emb = embedder if embedder is not None else resolve_embedder(config.embedder)
    images = load_images(inputs, emb, cache if cache is not None else FeatureCache(), progress=progress,
                         should_cancel=should_cancel)
    leaks = check_leaks(images.test, images.pool, images.sets, config=config, progress=progress,
                        should_cancel=should_cancel)
    if leaks.pairs and config.leak_policy == "refuse":
        raise LeakageError(leaks.pairs, written_to=_write_leaks(out_dir, leaks.summary(config, len(images.test))))
    images = images.without(leaks)
    # 3. Train every arm on every draw with the same seeds.
    runs = train_arms(inputs, images, config, progress=progress, should_cancel=should_cancel)
    # 4. Summaries with intervals over draws, seeds and test items; then the report.
    report = build_report(inputs, images, runs, config=config, leaks=leaks, embedder_name=getattr(emb, "name", None),
                          duration_s=time.perf_counter() - t0)
    if out_dir is not None:
        report.write(out_dir)
    return report


def _write_leaks(out_dir: str | os.PathLike | None, summary: dict) -> str | None:
    if out_dir is None:
        return None
    path = Path(out_dir) / LEAKS_JSON
    atomic_write_json(path, summary)
    return str(path)
