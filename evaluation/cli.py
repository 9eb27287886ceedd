"""``retrogen evaluate``: real-only vs real + each augmentation set, on a held-out test set.

The settings' options come from :class:`~.config.EvaluationConfig` (``@config_options``); the command adds
only its folders. The work (numpy, torch, the embedder) loads in the command, so ``retrogen --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from retrogen.config_cli import config_options

from .config import EvaluationConfig
from .errors import InvalidEvaluationError


def _parse_augment(values: list[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` -> {name: folder}; a value without ``=`` or a name given twice is an error."""
    out: dict[str, Path] = {}
    for v in values:
        name, sep, d = v.partition("=")
        if not sep or not name or not d:
            raise InvalidEvaluationError(f"--augment takes NAME=DIR, got {v!r}")
        if name in out:
            raise InvalidEvaluationError(f"--augment name {name!r} given twice")
        out[name] = Path(d)
    return out


@config_options(EvaluationConfig)
def evaluate(
    *,
    train: Path = typer.Option(..., help="Real labelled training images (ImageFolder); with --shots, the pool "
                               "each draw takes its shots from."),
    test: Path = typer.Option(..., help="Held-out labelled test images (ImageFolder, the train set's classes)."),
    augment: list[str] = typer.Option([], help="NAME=DIR of an augmentation set; repeat for several."),
    out: Path = typer.Option(Path("evaluation-report"), help="Folder for report.json, report.md, report.png."),
    config: EvaluationConfig,
) -> None:
    """Train a classifier on real-only and real + each augmentation set; report accuracy, gain and cost."""
    from retrogen.console import TqdmProgress

    from .api import evaluate as run
    from .report import markdown

    sets = _parse_augment(augment)
    with TqdmProgress() as bars:
        report = run(train, test, sets, config=config, out_dir=out, progress=bars)
    typer.echo(markdown(report))
    typer.echo(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'report.png'}")
