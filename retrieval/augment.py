"""Augment a labelled ImageFolder dataset with corpus neighbours: the retrieval backend's entry point."""

from __future__ import annotations

import logging
import math
import mimetypes
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrogen.errors import InvalidInputError
from retrogen.imagefolder import LabelledImage, class_names, scan_imagefolder
from retrogen.imageio import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from retrogen.outputs import AugmentResult, OutputFolder
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit

from .embedders import Embedder, create_embedder
from .prompts import DEFAULT_TEMPLATES, class_prompts, class_text_embeddings
from .selection import FILTERS, Candidate, SelectionPolicy, round_robin, select

log = logging.getLogger(__name__)

MODES = ("image", "text", "mixed")


@dataclass(frozen=True)
class RetrievalConfig:
    """Everything that shapes a retrieval augmentation besides the dataset, index and N.

    Thresholds are cosine similarities in the index embedder's space; ``None`` disables a filter.
    """

    dedup_threshold: float | None = 0.97
    leakage_threshold: float | None = 0.95
    min_similarity: float | None = None
    conflict: str = "assign"  # an item wanted by two classes: "assign" to the most similar class, or "drop"
    label_check: bool = False  # keep only items whose zero-shot prediction over the class names is their class
    label_check_embedder: str | None = None  # image-text embedder for the check; default: the index's own
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    class_descriptions: dict[str, list[str]] | None = None  # per-class prompt lists, replacing the templates
    oversample: float = 3.0  # first search asks each query for oversample x its share of N
    max_candidates_per_class: int = 20_000  # stop widening the search here
    nprobe: int | None = None
    ef_search: int | None = None
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS

    def check(self) -> None:
        for name in ("dedup_threshold", "leakage_threshold", "min_similarity"):
            v = getattr(self, name)
            if v is not None and not -1.0 <= v <= 1.0:
                raise InvalidInputError(f"{name} must be a cosine similarity in [-1, 1], got {v}")
        if self.conflict not in ("assign", "drop"):
            raise InvalidInputError(f"conflict must be 'assign' or 'drop', got {self.conflict!r}")
        if self.oversample < 1:
            raise InvalidInputError(f"oversample must be >= 1, got {self.oversample}")


@dataclass
class _Queries:
    """Query vectors per class, with what each one is (for provenance)."""

    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    infos: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, label: str, vector: np.ndarray, info: dict) -> None:
        self.vectors.setdefault(label, []).append(vector)
        self.infos.setdefault(label, []).append(info)


def augment_by_retrieval(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    index: Any,
    per_class: int,
    mode: str = "image",
    holdout_dir: str | os.PathLike | None = None,
    config: RetrievalConfig | None = None,
    embedder: Embedder | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    overwrite: bool = False,
) -> AugmentResult:
    """Retrieve ``per_class`` corpus images for every class of an ImageFolder dataset.

    Args:
        dataset_dir: ``class_name/*.jpg`` training images.
        out_dir: output folder (ImageFolder + provenance.jsonl + summary.json).
        index: a ``CorpusIndex`` or an index directory.
        per_class: images wanted per class; fewer are returned, with a reason, when the corpus runs out.
        mode: ``image`` (kNN of each training image, round-robin), ``text`` (class-name prompt ensemble) or
            ``mixed`` (both, interleaved).
        holdout_dir: held-out images (ImageFolder) nothing returned may near-duplicate.
        embedder: the query embedder; default: the one named in the index manifest.

    Raises:
        InvalidInputError: bad arguments or dataset; EmbedderMismatchError: embedder differs from the index's.
    """
    t0 = time.perf_counter()
    config = config or RetrievalConfig()
    # 1. Check inputs before any model work.
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if per_class < 1:
        raise InvalidInputError(f"per_class must be >= 1, got {per_class}")
    config.check()
    items = scan_imagefolder(dataset_dir)
    holdout = scan_imagefolder(holdout_dir) if holdout_dir else []
    classes = class_names(items)
    corpus = _open_index(index)
    if embedder is None:
        embedder = create_embedder(corpus.manifest.embedder["name"])
    corpus.check_embedder(embedder.name)
    if mode in ("text", "mixed") and not embedder.supports_text:
        raise InvalidInputError(f"mode {mode!r} needs an image-text embedder; the index uses {embedder.name!r}")

    # 2. Embed the user's images (training and held-out): queries for image mode, protected set for leakage.
    train_vecs, train_ok, bad = _embed_items(items, embedder, config, progress, should_cancel, "embed_dataset")
    hold_vecs, _, bad_hold = _embed_items(holdout, embedder, config, progress, should_cancel, "embed_holdout")
    for label in classes:
        if not any(it.label == label for it in train_ok) and mode != "text":
            raise InvalidInputError(f"class {label!r} has no readable image")
    protected = np.concatenate([train_vecs, hold_vecs]) if len(hold_vecs) else train_vecs

    # 3. Build queries per class.
    prompts = class_prompts(classes, config.templates, config.class_descriptions)
    queries = _Queries()
    if mode in ("image", "mixed"):
        for it, vec in zip(train_ok, train_vecs, strict=True):
            queries.add(it.label, vec, {"type": "image", "id": it.image_id})
    text_vecs = class_text_embeddings(embedder, prompts) if embedder.supports_text else None
    if mode in ("text", "mixed"):
        for c, vec in zip(classes, text_vecs, strict=True):
            queries.add(c, vec, {"type": "text", "prompt": prompts[c][0], "num_prompts": len(prompts[c])})

    # 4. Search, widening k until every class is full or its candidates are exhausted.
    checker = _label_checker(config, embedder, text_vecs, classes, prompts, corpus)
    policy = SelectionPolicy(config.dedup_threshold, config.leakage_threshold, config.min_similarity, config.conflict)
    max_queries = max(len(v) for v in queries.vectors.values())
    k = max(4, math.ceil(config.oversample * per_class / max(1, min(len(v) for v in queries.vectors.values()))))
    while True:
        check_cancel(should_cancel)
        emit(progress, ProgressEvent("search", 0, 1, message=f"k={k}"))
        candidates = _search(corpus, queries, k, config)
        ids = sorted({c.id for cands in candidates.values() for c in cands})
        emb = dict(zip(ids, corpus.embeddings(ids).astype(np.float32), strict=True)) if ids else {}
        predicted = checker(ids, emb) if checker else None
        selection = select(candidates, per_class, embeddings=emb, policy=policy, protected=protected,
                           predicted_label=predicted)
        short = [c for c in classes if len(selection.chosen[c]) < per_class]
        can_widen = k < corpus.ntotal and k * max_queries < config.max_candidates_per_class
        if not short or not can_widen:
            break
        k = min(corpus.ntotal, k * 4)
    emit(progress, ProgressEvent("search", 1, 1))

    # 5. Write the images exactly as stored in the corpus, with provenance, then the summary.
    total = sum(len(v) for v in selection.chosen.values())
    metas = {m["id"]: m for m in corpus.metadata(sorted({c.id for v in selection.chosen.values() for c in v}))}
    with OutputFolder.create(out_dir, overwrite=overwrite) as writer:
        done = 0
        for label in classes:
            for n, cand in enumerate(selection.chosen[label]):
                check_cancel(should_cancel)
                meta = metas[cand.id]
                data = corpus.read_bytes(cand.id)
                writer.add(label=label, filename=f"{n:05d}_{cand.id}{_extension(meta, data)}", image_bytes=data,
                           method=f"retrieval:{mode}", fields=_provenance(corpus, meta, cand, embedder, config))
                done += 1
                emit(progress, ProgressEvent("write", done, total, label=label))
        summary = _summary(mode, per_class, classes, selection, config, corpus, embedder, bad + bad_hold,
                           time.perf_counter() - t0, total)
        writer.close(summary)
        return AugmentResult(Path(out_dir), summary, writer.records)


def _open_index(index: Any):
    if isinstance(index, (str, os.PathLike)):
        from .index import CorpusIndex

        return CorpusIndex.open(index)
    return index


def _embed_items(items: list[LabelledImage], embedder: Embedder, config: RetrievalConfig,
                 progress: ProgressFn | None, should_cancel: CancelFn | None, stage: str):
    ok: list[LabelledImage] = []
    vecs: list[np.ndarray] = []
    bad: list[dict] = []
    for i in range(0, len(items), config.batch_size):
        check_cancel(should_cancel)
        batch, batch_items = [], []
        for it in items[i : i + config.batch_size]:
            try:
                batch.append(embedder.preprocess(decode_image(it.path.read_bytes(), max_pixels=config.max_pixels)))
                batch_items.append(it)
            except (BadImageError, OSError) as e:
                log.warning("skipping unreadable dataset image %s: %s", it.path, e)
                bad.append({"file": it.image_id, "reason": getattr(e, "reason", type(e).__name__)})
        if batch:
            vecs.append(embedder.embed_preprocessed(np.stack(batch)))
            ok.extend(batch_items)
        emit(progress, ProgressEvent(stage, min(i + config.batch_size, len(items)), len(items)))
    dim = embedder.dim
    return (np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)), ok, bad


def _search(corpus, queries: _Queries, k: int, config: RetrievalConfig) -> dict[str, list[Candidate]]:
    out: dict[str, list[Candidate]] = {}
    for label in sorted(queries.vectors):
        mat = np.stack(queries.vectors[label]).astype(np.float32)
        scores, ids = corpus.search(mat, min(k, corpus.ntotal), nprobe=config.nprobe, ef_search=config.ef_search)
        lists = [
            [Candidate(int(i), label, float(s), r, info) for r, (s, i) in enumerate(zip(srow, irow, strict=True))
             if i >= 0]
            for srow, irow, info in zip(scores, ids, queries.infos[label], strict=True)
        ]
        out[label] = round_robin(lists)
    return out


def _label_checker(config: RetrievalConfig, embedder: Embedder, text_vecs, classes, prompts, corpus):
    """A function ids -> predicted class per id, or None when the label check is off."""
    if not config.label_check:
        return None
    if config.label_check_embedder and config.label_check_embedder != embedder.name:
        checker_embedder = create_embedder(config.label_check_embedder)
    else:
        checker_embedder = embedder
    if not checker_embedder.supports_text:
        raise InvalidInputError(
            f"the label check needs an image-text embedder; {checker_embedder.name!r} is image-only "
            "(set label_check_embedder to an open_clip or hf CLIP model)"
        )
    class_vecs = class_text_embeddings(checker_embedder, prompts) if checker_embedder is not embedder else text_vecs

    def predict(ids: list[int], emb: dict[int, np.ndarray]) -> dict[int, str]:
        if not ids:
            return {}
        if checker_embedder is embedder:
            mat = np.stack([emb[i] for i in ids])
        else:  # another embedding space: embed the stored images with the checker
            images = [decode_image(corpus.read_bytes(i), max_pixels=config.max_pixels) for i in ids]
            mat = checker_embedder.embed_images(images, batch_size=config.batch_size)
        pred = (mat @ class_vecs.T).argmax(axis=1)
        return {i: classes[p] for i, p in zip(ids, pred, strict=True)}

    return predict


def _extension(meta: dict, data: bytes) -> str:
    name = meta.get("member") or meta.get("source") or ""
    ext = os.path.splitext(str(name))[1].lower()
    if ext in (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
        return ext
    sniff = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"RIFF": ".webp", b"GIF8": ".gif"}
    return next((e for magic, e in sniff.items() if data.startswith(magic)), ".bin")


def _provenance(corpus, meta: dict, cand: Candidate, embedder: Embedder, config: RetrievalConfig) -> dict:
    m = corpus.manifest
    source = meta.get("source")
    uri = f"{source}#{meta['member']}" if meta.get("member") else source
    passed = ["duplicate", "conflict"]
    passed += [n for n, on in (("min_similarity", config.min_similarity is not None),
                               ("leakage", config.leakage_threshold is not None),
                               ("label_check", config.label_check),
                               ("near_duplicate", config.dedup_threshold is not None)) if on]
    return {
        "index_id": m.index_id,
        "index_version": m.build.get("created") if isinstance(m.build, dict) else None,
        "sample_id": int(cand.id),
        "sample_key": meta.get("key"),
        "source_uri": uri,
        "caption": meta.get("caption"),
        "url": meta.get("url"),
        "licence": meta.get("licence"),
        "corpus_sha256": meta.get("sha256"),
        "query": cand.query,
        "similarity": round(cand.similarity, 6),
        "rank": cand.rank,
        "embedder": embedder.name,
        "filters_passed": passed,
        "mime_type": mimetypes.guess_type(uri or "")[0],
    }


def _summary(mode, per_class, classes, selection, config, corpus, embedder, bad, duration, total) -> dict:
    per = {}
    for c in classes:
        got = len(selection.chosen[c])
        reason = None
        if got < per_class:
            reason = (f"only {got} of {per_class} passed the filters among all candidates the corpus "
                      f"({corpus.ntotal} items) offered within max_candidates_per_class")
        per[c] = {"requested": per_class, "returned": got, "reason": reason}
    sims = [c.similarity for v in selection.chosen.values() for c in v]
    return {
        "method": f"retrieval:{mode}",
        "per_class": per,
        "removed": {f: int(selection.removed.get(f, 0)) for f in FILTERS},
        "similarity": {"mean": float(np.mean(sims)), "min": float(np.min(sims)), "max": float(np.max(sims))}
        if sims else None,
        "skipped_dataset_images": bad,
        "index_id": corpus.manifest.index_id,
        "embedder": embedder.name,
        "duration_s": round(duration, 3),
        "images_per_s": round(total / duration, 3) if duration > 0 else None,
        "parameters": {"mode": mode, "per_class": per_class, **{k: v for k, v in asdict(config).items()}},
    }
