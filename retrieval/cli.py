"""``retrogen augment retrieve`` and ``retrogen augment filter``: the retrieval package's commands.

The retrieval settings' options are derived from :class:`RetrievalConfig` (one flag per field); the work
itself (torch, faiss) loads on demand, so ``retrogen --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from retrogen.config_cli import config_options

from .config import RetrievalConfig


@config_options(RetrievalConfig)
def retrieve(
    *,
    index_dir: str = typer.Option(..., "--index-dir", help="Index directory (built by `retrogen index build`), or its "
                                  "URL (s3://bucket/prefix: copied into ~/.cache/retrogen/indexes first)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Labelled dataset: class_name/*.jpg"),
    classes: list[str] | None = typer.Option(
        None, "--classes", help="Instead of --dataset: class names (repeat, or comma-separated); modes text, "
        "caption, text+caption. --class-descriptions and --class-synonyms refine them."),
    per_class: int = typer.Option(..., "--per-class", min=1, help="Images to retrieve per class."),
    out: Path = typer.Option(..., "--out", help="Output folder (new or empty, or --overwrite): ImageFolder + "
                                                 "provenance.jsonl + summary.json"),
    mode: str | None = typer.Option(None, "--mode", help="image | text | caption | mixed (image+text) | a '+'-joined "
                                    "set, e.g. text+caption. Default: image with --dataset, text with --classes."),
    holdout: Path | None = typer.Option(None, "--holdout", help="Held-out images (ImageFolder) to protect from leakage."),
    embedder: str | None = typer.Option(None, "--embedder", help="Query embedder; default: the index's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier retrieval output in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    config: RetrievalConfig,
) -> None:
    """Retrieve N corpus images per class of a dataset (or for class names alone), filtered, with provenance."""
    from retrogen.console import TqdmProgress
    from retrogen.outputs import OutputFolder

    from .augment import augment_by_retrieval, augment_from_names
    from .embedders import create_embedder
    from .modes import METHODS, parse_mode

    if (dataset is None) == (not classes):
        raise typer.BadParameter("give exactly one of --dataset and --classes", param_hint="--dataset/--classes")
    names = [c.strip() for arg in classes or [] for c in arg.split(",") if c.strip()]
    mode = mode or ("image" if dataset is not None else "text")
    parse_mode(mode)
    OutputFolder.check_writable(out, overwrite=overwrite, methods=METHODS)  # before --embedder loads a model
    kwargs = {"corpus": index_dir, "per_class": per_class, "mode": mode, "holdout_dir": holdout, "config": config,
              "overwrite": overwrite, "embedder": create_embedder(embedder) if embedder else None}
    with TqdmProgress(disable=quiet or None) as bars:
        if dataset is not None:
            result = augment_by_retrieval(dataset, out, progress=bars, **kwargs)
        else:
            result = augment_from_names(names, out, progress=bars, **kwargs)
    s = result.summary
    for label, c in s["per_class"].items():
        line = f"{label}: {c['returned']}/{c['requested']}"
        typer.echo(line + (f"  ({c['reason']})" if c["reason"] else ""))
    removed = ", ".join(f"{k}={v}" for k, v in s["removed"].items() if v)
    sim = s["similarity"]
    typer.echo(
        f"wrote {sum(c['returned'] for c in s['per_class'].values())} images to {out} in {s['duration_s']:.1f}s"
        + (f"; similarity mean {sim['mean']:.3f} [{sim['min']:.3f}, {sim['max']:.3f}]" if sim else "")
        + (f"; removed: {removed}" if removed else "")
    )


def text_filter(
    *,
    out: Path = typer.Argument(..., help="An augmentation output folder (any backend)."),
    embedder: str = typer.Option(..., "--embedder", help="Image-text embedder, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k"),
    min_similarity: float | None = typer.Option(None, help="Reject images less similar than this to their class prompts."),
    require_top1: bool = typer.Option(False, "--require-top1", help="Reject images whose zero-shot class is another."),
) -> None:
    """Filter generated (or retrieved) images by image-text similarity to their class; rejects go to rejected/."""
    from .embedders import create_embedder
    from .text_filter import filter_by_text_similarity

    report = filter_by_text_similarity(out, create_embedder(embedder), min_similarity=min_similarity,
                                       require_top1=require_top1)
    typer.echo(f"kept {report['kept']}, rejected {report['rejected']} (mean similarity {report['mean_similarity']})")
