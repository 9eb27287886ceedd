"""``build_index``: sources -> embedding shards + metadata -> FAISS index -> manifest (written last).

Resumable: the arguments that shape the output (sources, corpus fingerprint, embedder, index choice, shard
size, dtype...) are stored in ``build_state.json`` before any work. A re-run with the same arguments keeps
every complete shard and continues from the first missing one; since shards cover fixed ranges of the
deterministically ordered input and the FAISS index is built from the shards with a fixed seed, the result
equals an uninterrupted build. A re-run with other arguments is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from retrogen import __version__
from retrogen.imageio import DEFAULT_MAX_PIXELS
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit
from retrogen.provenance import now_iso
from retrogen.retrieval.errors import IndexFormatError
from retrogen.retrieval.index_format import (
    DTYPES,
    EMB_DIR,
    INDEX_FILE,
    MANIFEST_FILE,
    META_DIR,
    Manifest,
    atomic_path,
    read_manifest,
    remove_temp_files,
    write_json,
    write_manifest,
)

from .embed import ShardEmbedder
from .errors import BuildMismatchError, IndexBuildError, SourceError
from .faiss_build import IndexPlan, build_faiss, measure_recall, plan_index, sample_ids
from .sources import records_digest, resolve_sources, scan_sources
from .writer import ShardInfo, complete_shards, gather_vectors, iter_vectors, normalise, write_shard

log = logging.getLogger(__name__)

STATE_FILE = "build_state.json"
MAX_SKIPPED_LISTED = 10_000  # the manifest lists at most this many skipped files (all are counted)


def build_index(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    embedder: Any,
    index: str = "auto",
    memory_budget: str | int | None = None,
    shard_size: int = 10_000,
    dtype: str = "float16",
    batch_size: int = 32,
    num_workers: int = 2,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    num_recall_queries: int = 1000,
    seed: int = 0,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> Manifest:
    """Build (or resume building) an index directory from image sources.

    Args:
        sources: folders of images, webdataset ``.tar`` shards, ``.parquet``/``.csv`` listings (globs and
            ``{a..b}`` braces expand).
        out_dir: the index directory to write.
        embedder: an ``Embedder`` or an embedder name for ``create_embedder``.
        index: ``auto|flat|hnsw|ivfpq`` or a FAISS factory string.
        memory_budget: RAM the FAISS index may use (``"4G"`` or bytes); checked before any work.
        shard_size: input records per embedding shard (the unit of resume).
        dtype: ``float16`` or ``float32`` for the stored embeddings.

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        SourceError, MemoryBudgetError, BuildMismatchError, IndexBuildError: bad input, found before work
        where possible; CancelledError when ``should_cancel()`` turns true (the build resumes later).
    """
    t0 = time.perf_counter()
    # 1. Check inputs.
    if dtype not in DTYPES:
        raise IndexBuildError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size), ("num_workers", num_workers)):
        if int(value) < 1:
            raise IndexBuildError(f"{name} must be >= 1, got {value}")
    specs = resolve_sources([str(s) for s in sources])
    if isinstance(embedder, str):
        from retrogen.retrieval.embedders import create_embedder

        embedder = create_embedder(embedder)
    out_dir = Path(out_dir)

    # 2. Scan the sources (metadata only) and choose the index: the memory budget is checked before embedding.
    emit(progress, ProgressEvent("scan", 0, len(specs)))
    records, source_summaries = scan_sources(specs)
    emit(progress, ProgressEvent("scan", len(specs), len(specs), message=f"{len(records)} records"))
    if not records:
        raise SourceError(f"no images found in {', '.join(s.path for s in specs)}")
    plan_index(len(records), embedder.dim, index=index, memory_budget=memory_budget)

    # 3. Resume, refuse or start.
    params = _jsonable({
        "sources": [s.path for s in specs], "num_records": len(records), "corpus_digest": records_digest(records),
        "embedder": embedder.name, "index": index, "memory_budget": memory_budget, "shard_size": int(shard_size),
        "dtype": dtype, "max_pixels": int(max_pixels), "num_recall_queries": int(num_recall_queries), "seed": seed,
    })
    existing = prepare_out_dir(out_dir, params, overwrite)
    if existing is not None:
        log.info("%s is already a complete index built with these arguments", out_dir)
        return existing

    # 4. Embed the shards not yet on disk.
    shards = complete_shards(out_dir, dim=embedder.dim, dtype=dtype)
    if shards:
        log.info("resuming: %d complete shard(s) kept, %d of %d records done", len(shards), shards[-1].end,
                 len(records))
    first_new = len(shards)
    total, done_records = len(records), (shards[-1].end if shards else 0)
    num_shards = -(-total // shard_size)
    t_embed, embedded = time.perf_counter(), 0
    with ShardEmbedder(embedder, batch_size=batch_size, num_workers=num_workers, max_pixels=max_pixels) as run:
        for n in range(len(shards), num_shards):
            check_cancel(should_cancel)
            start, end = n * shard_size, min(total, (n + 1) * shard_size)

            def on_batch(k: int) -> None:
                nonlocal done_records, embedded
                done_records += k
                embedded += k
                rate = embedded / max(1e-9, time.perf_counter() - t_embed)
                emit(progress, ProgressEvent("embed", done_records, total, extra={"images_per_s": round(rate, 1)}))
                check_cancel(should_cancel)

            result = run(records[start:end], on_batch=on_batch)
            first_id = sum(s.rows for s in shards)
            shards.append(write_shard(out_dir, n, normalise(result.vectors), result.rows, first_id=first_id,
                                      dtype=dtype, start=start, end=end, skipped=result.skipped))
    embed_s = time.perf_counter() - t_embed
    images_per_s = round(embedded / embed_s, 2) if embedded and embed_s > 0 else None
    if images_per_s:
        log.info("embedded %d images in %.1f s: %.1f images/s", embedded, embed_s, images_per_s)

    # 5. FAISS index, recall, manifest (last).
    return finish_index(
        out_dir, shards, embedder_entry=embedder.manifest_entry(), dtype=dtype, index=index,
        memory_budget=memory_budget, sources=source_summaries, params=params, seed=seed,
        num_recall_queries=num_recall_queries, progress=progress, started=t0,
        extra_build={"images_per_s": images_per_s, "embed_s": round(embed_s, 3), "embedded_this_run": embedded,
                     "resumed_from_shard": first_new or None, "batch_size": batch_size, "num_workers": num_workers},
    )


def finish_index(out_dir: Path, shards: list[ShardInfo], *, embedder_entry: dict, dtype: str, index: str,
                 memory_budget: str | int | None, sources: list[dict], params: dict, seed: int = 0,
                 num_recall_queries: int = 1000, progress: ProgressFn | None = None, started: float | None = None,
                 extra_build: dict | None = None) -> Manifest:
    """Train + fill the FAISS index from the shards, measure recall, and write the manifest (last)."""
    import faiss

    from retrogen.retrieval.index import CorpusIndex

    started = started if started is not None else time.perf_counter()
    count = sum(s.rows for s in shards)
    skipped = [f for s in shards for f in s.skipped]
    if count == 0:
        reasons = Counter(f["reason"] for f in skipped)
        raise IndexBuildError(f"no image could be read: all {len(skipped)} skipped "
                              f"({', '.join(f'{r} {n}' for r, n in reasons.most_common())})")
    dim = int(embedder_entry["dim"])
    plan: IndexPlan = plan_index(count, dim, index=index, memory_budget=memory_budget)
    train_ids = sample_ids(count, plan.train_size, seed) if plan.train_size else None
    train = gather_vectors(out_dir, shards, train_ids) if train_ids is not None else None
    log.info("building FAISS %s over %d vectors", plan.factory, count)
    chunks = lambda: iter_vectors(out_dir, shards)  # noqa: E731
    faiss_index = build_faiss(plan, dim, count, chunks, train_vectors=train, progress=progress)
    with atomic_path(out_dir / INDEX_FILE, suffix=".index") as tmp:
        faiss.write_index(faiss_index, str(tmp))

    digest = hashlib.sha256(f"{params.get('corpus_digest')}|{embedder_entry.get('name')}|{plan.factory}|{count}"
                            .encode()).hexdigest()[:12]
    manifest = Manifest(
        index_id=f"{out_dir.name}-{digest}", embedder=embedder_entry, dtype=dtype, count=count, dim=dim,
        faiss={**plan.manifest_entry(), "ntotal": count}, recall=None,
        shards=[s.manifest_entry() for s in shards], sources=sources,
        skipped={"count": len(skipped), "by_reason": dict(Counter(f["reason"] for f in skipped)),
                 "files": skipped[:MAX_SKIPPED_LISTED], "truncated": len(skipped) > MAX_SKIPPED_LISTED},
        build={"parameters": params, "retrogen_version": __version__, "faiss_version": faiss.__version__},
    )
    if plan.kind != "flat":
        emit(progress, ProgressEvent("recall", 0, 1))
        corpus = CorpusIndex(out_dir, manifest, faiss_index)
        manifest.recall = measure_recall(corpus, chunks, num_queries=num_recall_queries, seed=seed, exclude=train_ids)
        emit(progress, ProgressEvent("recall", 1, 1, extra={"recall_at_10": manifest.recall["recall_at_10"]}))
        log.info("recall@10 against exact search: %.3f", manifest.recall["recall_at_10"])
    duration = time.perf_counter() - started
    manifest.build.update({"created": now_iso(), "duration_s": round(duration, 3), **(extra_build or {})})
    write_manifest(out_dir, manifest)
    (out_dir / STATE_FILE).unlink(missing_ok=True)
    return manifest


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def prepare_out_dir(out_dir: Path, params: dict, overwrite: bool) -> Manifest | None:
    """Return the existing manifest when the same build is already complete; else make ``out_dir`` ready."""
    state_path = out_dir / STATE_FILE
    previous: dict | None = None
    if (out_dir / MANIFEST_FILE).exists():
        try:
            manifest = read_manifest(out_dir)
        except IndexFormatError as e:  # a corrupt manifest: only overwrite may replace it
            log.info("existing manifest unreadable: %s", e)
            previous = {"manifest": "unreadable"}
        else:
            previous = manifest.build.get("parameters")
            if previous == params and not overwrite:
                return manifest
    elif state_path.exists():
        try:
            previous = json.loads(state_path.read_text())["parameters"]
        except (OSError, ValueError, KeyError):
            previous = {"build_state": "unreadable"}
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BuildMismatchError(f"{str(out_dir)!r} is not empty and holds no index build; choose another --out "
                                 "or pass --overwrite")
    if previous is not None and previous != params:
        if not overwrite:
            diff = sorted(k for k in set(previous) | set(params) if previous.get(k) != params.get(k))
            why = " (the sources' files changed since)" if "corpus_digest" in diff else ""
            raise BuildMismatchError(
                f"{str(out_dir)!r} holds a build made with other arguments (differs in: {', '.join(diff)}){why}; "
                "re-run with the same arguments to resume, or pass --overwrite to replace it"
            )
    if overwrite or (previous is not None and previous != params):
        _clear(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)
    if not state_path.exists():
        write_json(state_path, {"parameters": params, "started": now_iso()})
    return None


def _clear(out_dir: Path) -> None:
    """Remove what a build writes (and nothing else the folder may hold)."""
    for name in (MANIFEST_FILE, INDEX_FILE, STATE_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for sub in (EMB_DIR, META_DIR):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
