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

import numpy as np

from retrogen.errors import InvalidInputError
from retrogen.fileio import image_extension
from retrogen.imagefolder import LabelledImage, class_names, scan_imagefolder
from retrogen.imageio import BadImageError, decode_image, read_image_file
from retrogen.outputs import AugmentResult, OutputFolder
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit

from .candidates import Queries, caption_list, caption_matches, vector_lists
from .config import RetrievalConfig
from .diverse import diverse_order
from .embedders import Embedder, create_embedder, embedder_for_index, l2_normalize
from .index import CorpusIndex
from .modes import METHODS, check_class_names, mode_name, parse_mode
from .prompts import class_prompts, class_text_embeddings
from .provenance import retrieved_item_fields, source_uri
from .safety import ItemScreen, screen_for
from .selection import FILTERS, Candidate, Selection, SelectionPolicy, round_robin, select

log = logging.getLogger(__name__)

#: ids -> zero-shot predicted class per id, given the candidates' embeddings (the label check)
LabelChecker = Callable[[list[int], dict[int, np.ndarray]], dict[int, str]]


@dataclass(frozen=True)
class _Run:
    """One augmentation's fixed inputs, shared by its steps."""

    corpus: CorpusIndex
    embedder: Embedder
    config: RetrievalConfig
    sources: frozenset[str]
    per_class: int
    classes: list[str]
    screen: ItemScreen
    progress: ProgressFn | None
    should_cancel: CancelFn | None
    timings: dict[str, float] = field(default_factory=lambda: {"search_s": 0.0, "selection_s": 0.0})

    @property
    def mode(self) -> str:
        return mode_name(self.sources)


@dataclass
class _Embedded:
    """The user's images that decoded, their vectors, and those skipped (with reasons)."""

    vectors: np.ndarray
    items: list[LabelledImage]
    skipped: list[dict]


@dataclass(frozen=True)
class _Output:
    """Where the result goes: the folder, whether it may replace an earlier one, when the work started."""

    out_dir: str | os.PathLike
    overwrite: bool
    started: float


def augment_by_retrieval(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    corpus: CorpusIndex | str | os.PathLike,
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
        corpus: a ``CorpusIndex``, or an index directory to open.
        per_class: images wanted per class; fewer are returned, with a reason, when the corpus runs out.
        mode: ``image`` (kNN of each training image, round-robin), ``text`` (class-name prompt ensemble),
            ``caption`` (corpus captions naming the class or its ``class_synonyms``), ``mixed`` (image+text), or
            any "+"-joined set of image, text and caption (their lists interleaved).
        holdout_dir: held-out images (ImageFolder) nothing returned may near-duplicate.
        embedder: the query embedder; default: the one named in the index manifest.
        overwrite: replace an earlier retrieval output in ``out_dir`` (cleared first); without it ``out_dir``
            must be new or empty.

    Raises:
        InvalidInputError: bad arguments or dataset; EmbedderMismatchError: embedder differs from the index's;
        OutputExistsError: ``out_dir`` cannot take the output (see ``OutputFolder.check_writable``).
    """
    output = _Output(out_dir, overwrite, time.perf_counter())
    sources = _check_request(mode, per_class, out_dir, overwrite)
    items = scan_imagefolder(dataset_dir)
    holdout = scan_imagefolder(holdout_dir) if holdout_dir else []
    run = _open_run(corpus, sources=sources, per_class=per_class, classes=class_names(items), has_images=True,
                    config=config, embedder=embedder, progress=progress, should_cancel=should_cancel)
    train = _embed_items(run, items, "embed_dataset")
    for label in run.classes:
        if not any(it.label == label for it in train.items) and "image" in run.sources:
            bad = [f"{sk['file']} ({sk['reason']})" for sk in train.skipped if sk["file"].startswith(f"{label}/")]
            raise InvalidInputError(f"class {label!r} has no readable image in {dataset_dir}: {', '.join(bad[:3])}"
                                    f"{', ...' if len(bad) > 3 else ''}; replace them or use mode='text'")
    return _augment(run, train, _embed_items(run, holdout, "embed_holdout"), output, classes_from="dataset")


def augment_from_names(
    classes: list[str],
    out_dir: str | os.PathLike,
    *,
    corpus: CorpusIndex | str | os.PathLike,
    per_class: int,
    mode: str = "text",
    holdout_dir: str | os.PathLike | None = None,
    config: RetrievalConfig | None = None,
    embedder: Embedder | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    overwrite: bool = False,
) -> AugmentResult:
    """Retrieve ``per_class`` corpus images for each class name, with no images of the user's (SuS-X's setting).

    ``mode`` is ``text``, ``caption`` or ``text+caption``; ``config.class_descriptions`` replaces a class's
    prompts and ``config.class_synonyms`` adds names its captions may hold. With ``holdout_dir``, nothing
    returned near-duplicates a held-out image (the leakage check). Other arguments as
    :func:`augment_by_retrieval`; the output is the same folder, ``summary.json`` saying ``classes_from: names``.
    """
    output = _Output(out_dir, overwrite, time.perf_counter())
    sources = _check_request(mode, per_class, out_dir, overwrite)
    if "image" in sources:
        raise InvalidInputError(f"mode {mode!r} searches with the dataset's images; with class names only, "
                                "use text, caption or text+caption")
    names = check_class_names(classes)
    holdout = scan_imagefolder(holdout_dir) if holdout_dir else []
    run = _open_run(corpus, sources=sources, per_class=per_class, classes=names, has_images=False,
                    config=config, embedder=embedder, progress=progress, should_cancel=should_cancel)
    train = _Embedded(np.zeros((0, run.embedder.dim), np.float32), [], [])
    return _augment(run, train, _embed_items(run, holdout, "embed_holdout"), output, classes_from="names")


def _check_request(mode: str, per_class: int, out_dir: str | os.PathLike, overwrite: bool) -> frozenset[str]:
    """Checks that need no model or index: the mode, N and the output folder."""
    sources = parse_mode(mode)
    if per_class < 1:
        raise InvalidInputError(f"per_class must be >= 1, got {per_class}")
    OutputFolder.check_writable(out_dir, overwrite=overwrite, methods=METHODS)
    return sources


def _open_run(corpus: CorpusIndex | str | os.PathLike, *, sources: frozenset[str], per_class: int,
              classes: list[str], has_images: bool, config: RetrievalConfig | None, embedder: Embedder | None,
              progress: ProgressFn | None, should_cancel: CancelFn | None) -> _Run:
    """Open the index and embedder and check that they can serve the request, before any embedding work."""
    config = config or RetrievalConfig()
    corpus = CorpusIndex.open(corpus, progress=progress) if isinstance(corpus, (str, os.PathLike)) else corpus
    if embedder is None:
        embedder = embedder_for_index(corpus.manifest.embedder)
    corpus.check_embedder(embedder.name)
    name = mode_name(sources)
    if "text" in sources and not embedder.supports_text:
        raise InvalidInputError(f"mode {name!r} needs an image-text embedder; the index uses {embedder.name!r}")
    if "caption" in sources:
        corpus.check_captions()
    if config.selection == "diverse" and not has_images and not embedder.supports_text:
        raise InvalidInputError("selection 'diverse' measures relevance to the class's images or text; with class "
                                f"names only and the image-only embedder {embedder.name!r} there is neither")
    if config.caption_rerank == "text" and not embedder.supports_text:
        raise InvalidInputError(f"caption_rerank 'text' needs an image-text embedder; the index uses {embedder.name!r}")
    if config.caption_rerank == "image" and not has_images:
        raise InvalidInputError("caption_rerank 'image' needs the dataset's images; use text or none")
    return _Run(corpus=corpus, embedder=embedder, config=config, sources=sources, per_class=per_class,
                classes=classes, screen=screen_for(config, corpus.manifest, embedder), progress=progress,
                should_cancel=should_cancel)


def _augment(run: _Run, train: _Embedded, hold: _Embedded, output: _Output, *, classes_from: str) -> AugmentResult:
    """Queries from the embedded images and class names, then search + selection, then the output folder."""
    config, embedder = run.config, run.embedder
    protected = np.concatenate([train.vectors, hold.vectors]) if len(hold.vectors) else train.vectors
    prompts = class_prompts(run.classes, config.templates, config.class_descriptions)
    text_vecs = class_text_embeddings(embedder, prompts) if embedder.supports_text else None
    queries = _build_queries(run, train, prompts, text_vecs)
    references = _references(run, train, text_vecs)
    checker = _label_checker(run, prompts, text_vecs)
    selection = _search_and_select(run, queries, references, protected=protected, checker=checker)
    return _write(run, selection, output, skipped=train.skipped + hold.skipped, classes_from=classes_from)


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
                   text_vecs: np.ndarray | None) -> Queries:
    queries = Queries()
    if "image" in run.sources:
        for it, vec in zip(train.items, train.vectors, strict=True):
            queries.add(it.label, vec, {"type": "image", "id": it.image_id})
    if "text" in run.sources:
        for c, vec in zip(run.classes, text_vecs, strict=True):
            queries.add(c, vec, {"type": "text", "prompt": prompts[c][0], "num_prompts": len(prompts[c])})
    return queries


def _references(run: _Run, train: _Embedded, text_vecs: np.ndarray | None) -> dict[str, np.ndarray | None]:
    """Per class, the vector caption matches are compared with (caption_rerank; auto: text, else images)."""
    rerank = run.config.caption_rerank
    out: dict[str, np.ndarray | None] = {}
    for n, label in enumerate(run.classes):
        mine = [v for it, v in zip(train.items, train.vectors, strict=True) if it.label == label]
        image_ref = l2_normalize(np.mean(mine, axis=0, keepdims=True))[0] if mine else None
        text_ref = text_vecs[n] if text_vecs is not None else None
        out[label] = image_ref if rerank == "image" or text_ref is None else text_ref
    return out


def _search_and_select(run: _Run, queries: Queries, references: dict[str, np.ndarray | None], *,
                       protected: np.ndarray, checker: LabelChecker | None) -> Selection:
    """Search with k large enough for ``oversample`` x each query's share; widen k x4 while a class is short."""
    config, corpus, per_class = run.config, run.corpus, run.per_class
    policy = SelectionPolicy(dedup_threshold=config.dedup_threshold, leakage_threshold=config.leakage_threshold,
                             min_similarity=config.min_similarity, conflict=config.conflict)
    per_label = [len(queries.vectors.get(c, [])) + ("caption" in run.sources) for c in run.classes]
    wanted = config.oversample * per_class
    if config.selection == "diverse":  # the greedy chooses among the top diversity_pool of each class
        wanted = max(wanted, _pool_size(run))
    k = max(4, math.ceil(wanted / max(1, min(per_label))))
    while True:
        check_cancel(run.should_cancel)
        emit(run.progress, ProgressEvent("search", 0, 1, message=f"k={k}"))
        candidates, emb = _candidates(run, queries, references, k)
        if config.selection == "diverse":
            candidates = _diverse(run, candidates, emb, queries, references)
        ids = sorted(emb)
        predicted = checker(ids, emb) if checker else None
        selection = select(candidates, per_class, embeddings=emb, policy=policy, protected=protected,
                           predicted_label=predicted, excluded=_screen(run, ids))
        short = [c for c in run.classes if len(selection.chosen[c]) < per_class]
        can_widen = k < corpus.ntotal and k * max(per_label) < config.max_candidates_per_class
        if not short or not can_widen:
            break
        k = min(corpus.ntotal, k * 4)
    emit(run.progress, ProgressEvent("search", 1, 1))
    return selection


def _candidates(run: _Run, queries: Queries, references: dict[str, np.ndarray | None],
                k: int) -> tuple[dict[str, list[Candidate]], dict[int, np.ndarray]]:
    """Each class's candidates in priority order, and the embeddings of every candidate (timed as search)."""
    t0 = time.perf_counter()
    corpus, config = run.corpus, run.config
    lists = vector_lists(corpus, queries, k, nprobe=config.nprobe, ef_search=config.ef_search,
                         rerank_k_factor=config.rerank_k_factor)
    matches = caption_matches(corpus, run.classes, k, config.class_synonyms) if "caption" in run.sources else {}
    ids = sorted({c.id for per_query in lists.values() for lst in per_query for c in lst}
                 | {i for _, hits in matches.values() for i, _ in hits})
    emb = dict(zip(ids, corpus.embeddings(ids).astype(np.float32), strict=True)) if ids else {}
    for label, (names, hits) in matches.items():
        lists.setdefault(label, []).append(caption_list(label, names, hits, emb=emb, reference=references[label],
                                                        rerank=config.caption_rerank != "none"))
    run.timings["search_s"] += time.perf_counter() - t0
    return {label: round_robin(lists.get(label, [])) for label in run.classes}, emb


def _diverse(run: _Run, candidates: dict[str, list[Candidate]], emb: dict[int, np.ndarray], queries: Queries,
             references: dict[str, np.ndarray | None]) -> dict[str, list[Candidate]]:
    """The diverse policy's order: 2 x N greedy picks per class (spares for the filters that come after)."""
    t0 = time.perf_counter()
    quality = _quality(run, sorted(emb)) if run.config.diversity_quality else None
    out = {}
    for label, cands in candidates.items():
        relevant = queries.vectors.get(label) or [references[label]]
        out[label] = diverse_order(cands, emb, np.stack(relevant), pool_size=_pool_size(run),
                                   steps=2 * run.per_class, eta=run.config.diversity_eta, quality=quality,
                                   quality_weight=run.config.diversity_quality_weight if quality else 0.0)
    run.timings["selection_s"] += time.perf_counter() - t0
    return out


def _quality(run: _Run, ids: list[int]) -> dict[int, float]:
    """COBRA's quality score per candidate: its aesthetic score, or 1 - its watermark probability."""
    column = "aesthetic" if run.config.diversity_quality == "aesthetic" else "pwatermark"
    rows = run.corpus.metadata(ids, columns=["id", column])
    return {r["id"]: (r[column] if column == "aesthetic" else 1.0 - r[column])
            for r in rows if r[column] is not None}


def _screen(run: _Run, ids: list[int]) -> dict[int, str]:
    """The reason each screened-out candidate is excluded (opt-out, unsafe, watermark)."""
    return run.screen.excluded_in(run.corpus, ids, max_pixels=run.config.max_pixels)


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


def _write(run: _Run, selection: Selection, output: _Output, *, skipped: list[dict],
           classes_from: str) -> AugmentResult:
    corpus, chosen = run.corpus, selection.chosen
    total = sum(len(v) for v in chosen.values())
    metas = {m["id"]: m for m in corpus.metadata(sorted({c.id for v in chosen.values() for c in v}))}
    passed = _filters_passed(run)
    with OutputFolder.create(output.out_dir, overwrite=output.overwrite, methods=METHODS) as writer:
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
                if cand.id in run.screen.scores:
                    fields["safety_score"] = run.screen.scores[cand.id]
                name = meta.get("member") or meta.get("source")
                writer.add(label=label, filename=f"{n:05d}_{cand.id}{image_extension(data, name)}",
                           image_bytes=data, method=f"retrieval:{run.mode}", fields=fields)
                # per class, as generation reports it: this class's images of its own, and the overall count
                emit(run.progress, ProgressEvent("write", n + 1, len(chosen[label]), label=label, extra={
                    "overall_done": len(writer.records), "overall_total": total}))
        summary = _summary(run, selection, skipped=skipped, duration=time.perf_counter() - output.started,
                           total=total) | {"classes_from": classes_from}
        writer.close(summary)
        return AugmentResult(Path(output.out_dir), summary, writer.records)


def _filters_passed(run: _Run) -> list[str]:
    """The filters every returned item went through, in the order they run (selection.FILTERS)."""
    config, t = run.config, run.screen.thresholds
    unsafe = t.max_punsafe is not None or bool(t.nsfw_exclude) or run.screen.classifier is not None
    on = {"duplicate": True, "opt_out": bool(run.screen.opt_out) or t.respect_corpus_opt_out, "unsafe": unsafe,
          "watermark": t.max_pwatermark is not None, "conflict": True,
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
        "screening": run.screen.report(),
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
