"""Filter an augmentation output folder by image-text similarity to each class's prompts.

Generated images that do not look like their class are the main failure of prompt-based augmentation. This
scores every image of an output folder (any backend) against its class's prompt ensemble with an image-text
embedder and moves those below ``min_similarity`` (or whose zero-shot class is another, with
``require_top1``) into ``rejected/``, rewriting ``provenance.jsonl`` and ``summary.json`` atomically. It lives
here, not in ``generation``, because it needs the retrieval embedders; the CLI and the service apply it where
both backends meet.
"""

from __future__ import annotations

import os

import numpy as np

from retrogen.errors import InvalidInputError
from retrogen.imageio import read_image_file
from retrogen.outputs import OutputFolder
from retrogen.prompts import ZERO_SHOT_TEMPLATES

from .embedders import Embedder
from .prompts import class_prompts, class_text_embeddings


def filter_by_text_similarity(
    out_dir: str | os.PathLike,
    embedder: Embedder,
    *,
    min_similarity: float | None = None,
    require_top1: bool = False,
    templates: tuple[str, ...] = ZERO_SHOT_TEMPLATES,
    batch_size: int = 32,
) -> dict:
    """Score, annotate and filter the images of ``out_dir`` in place. Returns the filter's summary.

    Every kept record gains ``text_similarity`` (and ``zero_shot_label``); rejected images move to
    ``out_dir/rejected/<label>/`` with their records in ``rejected/provenance.jsonl``.
    """
    if not embedder.supports_text:
        raise InvalidInputError(f"text filtering needs an image-text embedder; {embedder.name!r} is image-only")
    if min_similarity is None and not require_top1:
        raise InvalidInputError("give min_similarity and/or require_top1")
    folder = OutputFolder(out_dir)
    if not folder.is_complete:
        raise InvalidInputError(f"{folder.path} is not a finished augmentation output (no summary.json)")
    records = folder.records()
    summary = folder.summary()
    classes = sorted(set(summary.get("per_class", {})) | {r["label"] for r in records})
    class_vecs = class_text_embeddings(embedder, class_prompts(classes, templates))
    index_of = {c: i for i, c in enumerate(classes)}

    sims, top = [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        vecs = embedder.embed_images([read_image_file(folder.file(r)) for r in chunk])  # errors name the file
        scores = vecs @ class_vecs.T
        sims.extend(scores[np.arange(len(chunk)), [index_of[r["label"]] for r in chunk]].tolist())
        top.extend(classes[j] for j in scores.argmax(axis=1))

    kept, rejected = [], []
    for r, s, t in zip(records, sims, top, strict=True):
        r = r | {"text_similarity": round(float(s), 6), "zero_shot_label": t, "text_filter_embedder": embedder.name}
        bad = (min_similarity is not None and s < min_similarity) or (require_top1 and t != r["label"])
        (rejected if bad else kept).append(r)
    report = {"embedder": embedder.name, "min_similarity": min_similarity, "require_top1": require_top1,
              "kept": len(kept), "rejected": len(rejected),
              "mean_similarity": float(np.mean(sims)) if sims else None}
    for label, c in summary.get("per_class", {}).items():
        c["returned"] = sum(r["label"] == label for r in kept)
    summary["text_filter"] = report
    folder.rewrite(kept, rejected, summary)
    return report
