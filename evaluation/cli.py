"""``retrogen evaluate``: real-only vs real + each augmentation set, on a held-out test set.

Only typer is imported at the top so ``retrogen --help`` stays fast; the work loads in the command.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_augment(values: list[str]) -> dict[str, Path]:
    from .errors import InvalidEvaluationError

    out: dict[str, Path] = {}
    for v in values:
        name, sep, d = v.partition("=")
        if not sep or not name or not d:
            raise InvalidEvaluationError(f"--augment takes NAME=DIR, got {v!r}")
        if name in out:
            raise InvalidEvaluationError(f"--augment name {name!r} given twice")
        out[name] = Path(d)
    return out


def evaluate(
    train: Path = typer.Option(..., help="Real labelled training images (ImageFolder)."),
    test: Path = typer.Option(..., help="Held-out labelled test images (ImageFolder, same classes)."),
    augment: list[str] = typer.Option([], help="NAME=DIR of an augmentation set; repeat for several."),
    out: Path = typer.Option(Path("evaluation-report"), help="Folder for report.json, report.md, report.png."),
    embedder: str = typer.Option("efficientnet-lite0:onnx", help="Features for the linear probe and leakage check "
                                 "(a retrieval embedder name, or pixels[:SIDE])."),
    classifier: str = typer.Option("linear", help="linear (probe on frozen features) or cnn (small CNN)."),
    seeds: int = typer.Option(3, help="Training seeds per method."),
    ratio: float | None = typer.Option(None, help="Share of augmentation samples per batch (DA-Fusion's p); "
                                       "default: uniform over real + augmentation."),
    aug_label_smoothing: float = typer.Option(0.0, help="Label smoothing for augmentation samples only."),
    cap_per_class: int | None = typer.Option(None, help="Use at most this many augmentation images per class."),
    num_steps: int | None = typer.Option(None, help="Optimiser steps (default: linear 300, cnn 600)."),
    leakage_threshold: float = typer.Option(0.95, help="Cosine at or above which a test image counts as leaked."),
    seed: int = typer.Option(0, help="First seed."),
) -> None:
    """Train a classifier on real-only and real + each augmentation set; report accuracy, gain and cost."""
    from retrogen.console import TqdmProgress

    from .api import EvaluationConfig
    from .api import evaluate as run
    from .report import markdown

    sets = _parse_augment(augment)
    config = EvaluationConfig(classifier=classifier, embedder=embedder, num_seeds=seeds, ratio=ratio,
                              aug_label_smoothing=aug_label_smoothing, cap_per_class=cap_per_class,
                              num_steps=num_steps, leakage_threshold=leakage_threshold, seed=seed)
    with TqdmProgress() as bars:
        report = run(train, test, sets, config=config, out_dir=out, progress=bars)
    typer.echo(markdown(report))
    typer.echo(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'report.png'}")
