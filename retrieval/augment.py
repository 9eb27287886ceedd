"""Augment a labelled ImageFolder dataset with corpus neighbours: the retrieval backend's entry point."""

from __future__ import annotations

import logging
import math
import mimetypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from retrogen.errors import InvalidInputError
from retrogen.fileio import image_extension
from retrogen.imagefolder import LabelledImage, class_names, scan_imagefolder
from retrogen.imageio import BadImageError, decode_image, read_image_file
from retrogen.outputs import AugmentResult, OutputFolder
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit

from .config import RetrievalConfig
from .diverse import diverse_order
from .embedders import Embedder, create_embedder
from .index import CorpusIndex
from .opt_out import OptOut
from .prompts import class_prompts, class_text_embeddings
from .provenance import retrieved_item_fields, source_uri
from .selection import FILTERS, Candidate, Selection, SelectionPolicy, round_robin, select

log = logging.getLogger(__name__)

Mode = Literal["image", "text", "mixed"]
MODES: tuple[str, ...] = get_args(Mode)
#: the ``method`` of every output this backend writes: what ``overwrite`` may replace
METHODS: tuple[str, ...] = tuple(f"retrieval:{m}" for m in MODES)

#: ids -> zero-shot predicted class per id, given the candidates' embeddings (the label check)
LabelChecker = Callable[[list[int], dict[int, np.ndarray]], dict[int, str]]


@dataclass(frozen=True)
class _Run:
    """One augmentation's fixed inputs, shared by its steps."""

    corpus: CorpusIndex
    embedder: Embedder
    config: RetrievalConfig
    mode: str
    per_class: int
    classes: list[str]
    progress: ProgressFn | None
    should_cancel: CancelFn | None
    timings: dict[str, float] = field(default_factory=lambda: {"search_s": 0.0, "selection_s": 0.0})


@dataclass
class _Queries:
    """Query vectors per class, with what each one is (for provenance)."""

    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    infos: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, label: str, vector: np.ndarray, info: dict) -> None:
        self.vectors.setdefault(label, []).append(vector)
        self.infos.setdefault(label, []).append(info)


@dataclass
class _Embedded:
    """The user's images that decoded, their vectors, and those skipped (with reasons)."""

    vectors: np.ndarray
    items: list[LabelledImage]
    skipped: list[dict]


def augment_by_retrieval(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    corpus: CorpusIndex | str | os.PathLike,
    per_class: int,
    mode: Mode = "image",
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
        corpus: a ``CorpusIndex``, or an index directory to open.
        per_class: images wanted per class; fewer are returned, with a reason, when the corpus runs out.
        mode: ``image`` (kNN of each training image, round-robin), ``text`` (class-name prompt ensemble) or
            ``mixed`` (both, interleaved).
        holdout_dir: held-out images (ImageFolder) nothing returned may near-duplicate.
        embedder: the query embedder; default: the one named in the index manifest.
        overwrite: replace an earlier retrieval output in ``out_dir`` (cleared first); without it ``out_dir``
            must be new or empty.

    Raises:
        InvalidInputError: bad arguments or dataset; EmbedderMismatchError: embedder differs from the index's;
        OutputExistsError: ``out_dir`` cannot take the output (see ``OutputFolder.check_writable``).
    """
    t0 = time.perf_counter()
    # 1. Check inputs before any model work.
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if per_class < 1:
        raise InvalidInputError(f"per_class must be >= 1, got {per_class}")
    config = config or RetrievalConfig()
    OutputFolder.check_writable(out_dir, overwrite=overwrite, methods=METHODS)
    items = scan_imagefolder(dataset_dir)
    holdout = scan_imagefolder(holdout_dir) if holdout_dir else []
    corpus = CorpusIndex.open(corpus) if isinstance(corpus, (str, os.PathLike)) else corpus
    if embedder is None:
        embedder = create_embedder(corpus.manifest.embedder["name"])
    corpus.check_embedder(embedder.name)
    if mode in ("text", "mixed") and not embedder.supports_text:
        raise InvalidInputError(f"mode {mode!r} needs an image-text embedder; the index uses {embedder.name!r}")
    run = _Run(corpus=corpus, embedder=embedder, config=config, mode=mode, per_class=per_class,
               classes=class_names(items), progress=progress, should_cancel=should_cancel)

    # 2. Embed the user's images (training and held-out): queries for image mode, protected set for leakage.
    train = _embed_items(run, items, "embed_dataset")
    hold = _embed_items(run, holdout, "embed_holdout")
    for label in run.classes:
        if not any(it.label == label for it in train.items) and mode != "text":
            bad = [f"{sk['file']} ({sk['reason']})" for sk in train.skipped if sk["file"].startswith(f"{label}/")]
            raise InvalidInputError(f"class {label!r} has no readable image in {dataset_dir}: {', '.join(bad[:3])}"
                                    f"{', ...' if len(bad) > 3 else ''}; replace them or use mode='text'")
    protected = np.concatenate([train.vectors, hold.vectors]) if len(hold.vectors) else train.vectors

    # 3. Build queries per class.
    prompts = class_prompts(run.classes, config.templates, config.class_descriptions)
    text_vecs = class_text_embeddings(embedder, prompts) if embedder.supports_text else None
    queries = _build_queries(run, train, prompts, text_vecs)

    # 4. Search, widening k until every class is full or its candidates are exhausted.
    checker = _label_checker(run, prompts, text_vecs)
    selection = _search_and_select(run, queries, protected=protected, checker=checker)

    # 5. Write the images exactly as stored in the corpus, with provenance, then the summary.
    return _write(run, selection, out_dir, overwrite=overwrite, skipped=train.skipped + hold.skipped, started=t0)


def _embed_items(run: _Run, items: list[LabelledImage], stage: str) -> _Embedded:
    batch_size, embedder = run.config.batch_size, run.embedder
    out = _Embedded(np.zeros((0, embedder.dim), np.float32), [], [])
    vecs: list[np.ndarray] = []
    for i in range(0, len(items), batch_size):
        check_cancel(run.should_cancel)
        batch, batch_items = [], []
        for it in items[i : i + batch_size]:
            try:
                image = read_image_file(it.path, max_pixels=run.config.max_pixels)
                batch.append(embedder.preprocess(image))
                batch_items.append(it)
            except BadImageError as e:  # its message names the file
                log.warning("skipping %s", e)
                out.skipped.append({"file": it.image_id, "reason": e.reason})
        if batch:
            vecs.append(embedder.embed_preprocessed(np.stack(batch)))
            out.items.extend(batch_items)
        emit(run.progress, ProgressEvent(stage, min(i + batch_size, len(items)), len(items)))
    if vecs:
        out.vectors = np.concatenate(vecs)
    return out


def _build_queries(run: _Run, train: _Embedded, prompts: dict[str, list[str]],
                   text_vecs: np.ndarray | None) -> _Queries:
    queries = _Queries()
    if run.mode in ("image", "mixed"):
        for it, vec in zip(train.items, train.vectors, strict=True):
            queries.add(it.label, vec, {"type": "image", "id": it.image_id})
    if run.mode in ("text", "mixed"):
        for c, vec in zip(run.classes, text_vecs, strict=True):
            queries.add(c, vec, {"type": "text", "prompt": prompts[c][0], "num_prompts": len(prompts[c])})
    return queries


def _search_and_select(run: _Run, queries: _Queries, *, protected: np.ndarray,
                       checker: LabelChecker | None) -> Selection:
    """Search with k large enough for ``oversample`` x each query's share; widen k x4 while a class is short."""
    config, corpus, per_class = run.config, run.corpus, run.per_class
    policy = SelectionPolicy(dedup_threshold=config.dedup_threshold, leakage_threshold=config.leakage_threshold,
                             min_similarity=config.min_similarity, conflict=config.conflict)
    max_queries = max(len(v) for v in queries.vectors.values())
    opt_out = OptOut.parse(config.opt_out)
    wanted = config.oversample * per_class
    if config.selection == "diverse":  # the greedy chooses among the top diversity_pool of each class
        wanted = max(wanted, _pool_size(run))
    k = max(4, math.ceil(wanted / max(1, min(len(v) for v in queries.vectors.values()))))
    while True:
        check_cancel(run.should_cancel)
        emit(run.progress, ProgressEvent("search", 0, 1, message=f"k={k}"))
        t0 = time.perf_counter()
        candidates = _search(run, queries, k)
        ids = sorted({c.id for cands in candidates.values() for c in cands})
        emb = dict(zip(ids, corpus.embeddings(ids).astype(np.float32), strict=True)) if ids else {}
        run.timings["search_s"] += time.perf_counter() - t0
        if config.selection == "diverse":
            t0 = time.perf_counter()
            # 2 x N greedy picks: spares for the filters that come after
            candidates = {label: diverse_order(cands, emb, np.stack(queries.vectors[label]),
                                               pool_size=_pool_size(run), steps=2 * per_class,
                                               eta=config.diversity_eta)
                          for label, cands in candidates.items()}
            run.timings["selection_s"] += time.perf_counter() - t0
        predicted = checker(ids, emb) if checker else None
        selection = select(candidates, per_class, embeddings=emb, policy=policy, protected=protected,
                           predicted_label=predicted, opted_out=_opted_out(run, opt_out, ids))
        short = [c for c in run.classes if len(selection.chosen[c]) < per_class]
        can_widen = k < corpus.ntotal and k * max_queries < config.max_candidates_per_class
        if not short or not can_widen:
            break
        k = min(corpus.ntotal, k * 4)
    emit(run.progress, ProgressEvent("search", 1, 1))
    return selection


def _search(run: _Run, queries: _Queries, k: int) -> dict[str, list[Candidate]]:
    """Each class's candidates: its queries' result lists, interleaved by rank."""
    corpus, out = run.corpus, {}
    for label in sorted(queries.vectors):
        mat = np.stack(queries.vectors[label]).astype(np.float32)
        scores, ids = corpus.search(mat, min(k, corpus.ntotal), nprobe=run.config.nprobe,
                                    ef_search=run.config.ef_search)
        lists = [
            [Candidate(int(i), label, float(s), r, info) for r, (s, i) in enumerate(zip(srow, irow, strict=True))
             if i >= 0]
            for srow, irow, info in zip(scores, ids, queries.infos[label], strict=True)
        ]
        out[label] = round_robin(lists)
    return out


def _opted_out(run: _Run, opt_out: OptOut, ids: list[int]) -> frozenset[int]:
    """The candidate ids on the user's opt-out list (matched on the corpus's url and sha256 columns)."""
    if not opt_out or not ids:
        return frozenset()
    rows = run.corpus.metadata(ids, columns=["id", "url", "sha256"])
    return frozenset(r["id"] for r in rows if opt_out.matches(r["url"], r["sha256"]))


def _pool_size(run: _Run) -> int:
    return run.config.diversity_pool or 2 * run.per_class


def _label_checker(run: _Run, prompts: dict[str, list[str]], text_vecs: np.ndarray | None) -> LabelChecker | None:
    """The zero-shot label check, or None when it is off."""
    config, embedder = run.config, run.embedder
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
            images = [decode_image(run.corpus.read_bytes(i), max_pixels=config.max_pixels) for i in ids]
            mat = checker_embedder.embed_images(images, batch_size=config.batch_size)
        pred = (mat @ class_vecs.T).argmax(axis=1)
        return {i: run.classes[p] for i, p in zip(ids, pred, strict=True)}

    return predict


def _write(run: _Run, selection: Selection, out_dir: str | os.PathLike, *, overwrite: bool, skipped: list[dict],
           started: float) -> AugmentResult:
    corpus, chosen = run.corpus, selection.chosen
    total = sum(len(v) for v in chosen.values())
    metas = {m["id"]: m for m in corpus.metadata(sorted({c.id for v in chosen.values() for c in v}))}
    passed = _filters_passed(run.config)
    with OutputFolder.create(out_dir, overwrite=overwrite, methods=METHODS) as writer:
        for label in run.classes:
            for n, cand in enumerate(chosen[label]):
                check_cancel(run.should_cancel)
                meta = metas[cand.id]
                data = corpus.read_bytes(cand.id)
                fields = retrieved_item_fields(corpus, meta, sample_id=cand.id, similarity=cand.similarity,
                                               rank=cand.rank, query=cand.query, embedder_name=run.embedder.name)
                fields |= {"filters_passed": passed, "mime_type": mimetypes.guess_type(source_uri(meta) or "")[0],
                           "selection": run.config.selection}
                if cand.gain is not None:
                    fields["selection_gain"] = cand.gain
                name = meta.get("member") or meta.get("source")
                writer.add(label=label, filename=f"{n:05d}_{cand.id}{image_extension(data, name)}",
                           image_bytes=data, method=f"retrieval:{run.mode}", fields=fields)
                # per class, as generation reports it: this class's images of its own, and the overall count
                emit(run.progress, ProgressEvent("write", n + 1, len(chosen[label]), label=label, extra={
                    "overall_done": len(writer.records), "overall_total": total}))
        summary = _summary(run, selection, skipped=skipped, duration=time.perf_counter() - started, total=total)
        writer.close(summary)
        return AugmentResult(Path(out_dir), summary, writer.records)


def _filters_passed(config: RetrievalConfig) -> list[str]:
    """The filters every returned item went through, in the order they run (selection.FILTERS)."""
    on = {"duplicate": True, "opt_out": bool(config.opt_out), "conflict": True,
          "min_similarity": config.min_similarity is not None, "leakage": config.leakage_threshold is not None,
          "label_check": config.label_check, "near_duplicate": config.dedup_threshold is not None}
    return [name for name in FILTERS if on[name]]


def _summary(run: _Run, selection: Selection, *, skipped: list[dict], duration: float, total: int) -> dict:
    per = {}
    for c in run.classes:
        got = len(selection.chosen[c])
        reason = None
        if got < run.per_class:
            reason = (f"only {got} of {run.per_class} passed the filters among all candidates the corpus "
                      f"({run.corpus.ntotal} items) offered within max_candidates_per_class")
        per[c] = {"requested": run.per_class, "returned": got, "reason": reason}
    sims = [c.similarity for v in selection.chosen.values() for c in v]
    return {
        "method": f"retrieval:{run.mode}",
        "per_class": per,
        "removed": {f: int(selection.removed.get(f, 0)) for f in FILTERS},
        "similarity": {"mean": float(np.mean(sims)), "min": float(np.min(sims)), "max": float(np.max(sims))}
        if sims else None,
        "skipped_dataset_images": skipped,
        "index_id": run.corpus.manifest.index_id,
        # what building the index cost, for an evaluation to amortise over the images retrieved from it
        "index_build": {"duration_s": run.corpus.manifest.build.get("duration_s"), "count": run.corpus.ntotal},
        "embedder": run.embedder.name,
        "duration_s": round(duration, 3),
        # search (with the embeddings read back) and the selection policy's own ordering, over every widening
        "timings": {"search_s": round(run.timings["search_s"], 4), "selection_s": round(run.timings["selection_s"], 4),
                    "selection": run.config.selection},
        "images_per_s": round(total / duration, 3) if duration > 0 else None,
        "parameters": {"mode": run.mode, "per_class": run.per_class, **run.config.to_dict()},
    }
