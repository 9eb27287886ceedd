"""``build_index``: sources -> embedding shards + metadata -> FAISS index -> manifest (written last).

Resumable: the arguments that shape the output (sources, corpus fingerprint, embedder, and the config's
:meth:`~IndexBuildConfig.output_parameters`) are stored in ``build_state.json`` before any work. A re-run
with the same arguments keeps every complete shard and continues from the first missing one; since shards
cover fixed ranges of the deterministically ordered input and the FAISS index is built from the shards with
a fixed seed, the result equals an uninterrupted build. A re-run with other arguments is refused unless
``overwrite``. :func:`start_or_resume` and :func:`finish_index` are shared with ``index import``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from retrogen import __version__
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit
from retrogen.provenance import now_iso
from retrogen.retrieval.embedders import Embedder, create_embedder, l2_normalize
from retrogen.retrieval.errors import IndexFormatError
from retrogen.retrieval.faiss_device import resolve_device
from retrogen.retrieval.index_directory import IndexDirectory, Manifest, ShardInfo
from retrogen.retrieval.index_store import RemoteIndex, StagingDirectory, default_work_dir, display, is_remote

from .config import IndexBuildConfig
from .embed import ShardEmbedder
from .errors import BuildMismatchError, IndexBuildError, SourceError
from .faiss_build import (
    EF_CONSTRUCTION,
    EF_CONSTRUCTION_MAX,
    RecallProbe,
    add_held_out,
    build_faiss,
    has_hnsw,
    plan_index,
    record_train_device,
    sample_ids,
    tune_search,
)
from .faiss_ondisk import IndexedQueryProbe, MapFn, build_ondisk_index, map_in_order, plan_ondisk
from .sources import Record, records_digest, resolve_sources, scan_sources

log = logging.getLogger(__name__)

MAX_SKIPPED_LISTED = 10_000  # the manifest lists at most this many skipped files (all are counted)


def build_index(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    embedder: Embedder | str,
    config: IndexBuildConfig | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    engine: Engine | None = None,
    work_dir: str | os.PathLike | None = None,
) -> Manifest:
    """Build (or resume building) an index directory from image sources.

    Args:
        sources: folders of images, webdataset ``.tar`` shards, ``.parquet``/``.csv`` listings (globs and
            ``{a..b}`` braces expand).
        out_dir: the index directory to write, or an fsspec URL (``s3://bucket/prefix``): then the build is
            staged in ``work_dir`` and published there as it goes (see :func:`open_output`).
        embedder: an ``Embedder`` or an embedder name for ``create_embedder``.
        config: index type, memory budget, shard size, dtype... (default: ``IndexBuildConfig()``).
        overwrite: replace a build made with other arguments (or an unrelated folder's build files).
        engine: where the shards are embedded and an on-disk index's parts filled: ``LocalEngine()`` (default,
            this process) or ``ray_build.RayEngine`` (a Ray cluster); either writes the same directory.
        work_dir: with a URL ``out_dir``, the local staging folder (default: under the user's cache,
            ``index_store.default_work_dir``).

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        SourceError, MemoryBudgetError, BuildMismatchError, IndexBuildError: bad input, found before work
        where possible; CancelledError when ``should_cancel()`` turns true (the build resumes later).
    """
    t0 = time.perf_counter()
    # 1. Check inputs (the config checked its own values when it was built).
    config = config or IndexBuildConfig()
    specs = resolve_sources([str(s) for s in sources])
    if isinstance(embedder, str):
        embedder = create_embedder(embedder)

    # 2. Scan the sources (metadata only) and choose the index: the memory budget is checked before embedding.
    emit(progress, ProgressEvent("scan", 0, len(specs)))
    records, source_summaries = scan_sources(specs)
    emit(progress, ProgressEvent("scan", len(specs), len(specs), message=f"{len(records)} records"))
    if not records:
        raise SourceError(f"no images found in {', '.join(s.path for s in specs)}")
    plan_for(len(records), embedder.dim, config)

    # 3. Resume, refuse or start.
    params = _jsonable({"sources": [s.path for s in specs], "num_records": len(records),
                        "corpus_digest": records_digest(records), "embedder": embedder.name,
                        **config.output_parameters()})
    directory, existing = open_output(out_dir, params, overwrite=overwrite, work_dir=work_dir, progress=progress,
                                      shards=-(-len(records) // config.shard_size))
    if existing is not None:
        log.info("%s is already a complete index built with these arguments", display(out_dir))
        return existing

    # 4. Embed the shards not yet on disk.
    engine = engine or LocalEngine()
    shards, embed_stats = engine.embed_missing_shards(directory, records, embedder, config, progress=progress,
                                                      should_cancel=should_cancel)

    # 5. FAISS index, recall, manifest (last).
    return finish_index(directory, shards, embedder_entry=embedder.manifest_entry(), config=config,
                        sources=source_summaries, params=params, progress=progress, started=t0,
                        extra_build={"engine": engine.name, **embed_stats}, map_parts=engine.map_parts)


class Engine(Protocol):
    """Where a build's work runs: embedding the missing shards, and filling an on-disk index's parts."""

    name: str

    def embed_missing_shards(self, directory: IndexDirectory, records: list[Record], embedder: Embedder,
                             config: IndexBuildConfig, *, progress: ProgressFn | None,
                             should_cancel: CancelFn | None) -> tuple[list[ShardInfo], dict[str, Any]]:
        """Keep the complete shards on disk, embed and write the rest in order; every shard and what was measured."""

    def map_parts(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
        """``[fn(*job) for job in jobs]``, possibly in parallel elsewhere."""


class LocalEngine:
    """This process: decode threads and one model (``ShardEmbedder``); an on-disk index's parts one by one."""

    name = "local"

    def embed_missing_shards(self, directory: IndexDirectory, records: list[Record], embedder: Embedder,
                             config: IndexBuildConfig, *, progress: ProgressFn | None = None,
                             should_cancel: CancelFn | None = None) -> tuple[list[ShardInfo], dict[str, Any]]:
        return _embed_missing_shards(directory, records, embedder, config, progress=progress,
                                     should_cancel=should_cancel)

    def map_parts(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
        return map_in_order(fn, jobs)


def plan_for(count: int, dim: int, config: IndexBuildConfig):
    """The FAISS index ``config`` asks for over ``count`` vectors (checked before any work, as is a FAISS device
    the machine lacks)."""
    resolve_device(config.faiss_device)
    if config.faiss_storage == "ondisk":
        return plan_ondisk(count, dim, config.index_type)
    return plan_index(count, dim, index_type=config.index_type, memory_budget=config.memory_budget)


@dataclass
class _EmbedMeter:
    """Counts embedded records for progress events (with the rate) and checks for cancellation per batch."""

    done: int
    total: int
    progress: ProgressFn | None
    should_cancel: CancelFn | None
    embedded: int = 0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, k: int) -> None:
        self.done += k
        self.embedded += k
        rate = self.embedded / max(1e-9, self.seconds)
        emit(self.progress, ProgressEvent("embed", self.done, self.total, extra={"images_per_s": round(rate, 1)}))
        check_cancel(self.should_cancel)


def _embed_missing_shards(directory: IndexDirectory, records: list[Record], embedder: Embedder,
                          config: IndexBuildConfig, *, progress: ProgressFn | None,
                          should_cancel: CancelFn | None) -> tuple[list[ShardInfo], dict[str, Any]]:
    """Keep the complete shards on disk, embed the rest; returns every shard and what this run measured."""
    shards = directory.complete_shards(dim=embedder.dim, dtype=config.dtype)
    first_new, total, size = len(shards), len(records), config.shard_size
    if shards:
        log.info("resuming: %d complete shard(s) kept, %d of %d records done", len(shards), shards[-1].end, total)
    meter = _EmbedMeter(shards[-1].end if shards else 0, total, progress, should_cancel)
    with ShardEmbedder(embedder, batch_size=config.batch_size, num_workers=config.num_workers,
                       max_pixels=config.max_pixels) as run:
        for n in range(first_new, -(-total // size)):
            check_cancel(should_cancel)
            start, end = n * size, min(total, (n + 1) * size)
            result = run(records[start:end], on_batch=meter)
            shards.append(directory.write_shard(n, l2_normalize(result.vectors), result.rows,
                                                first_id=sum(s.rows for s in shards), dtype=config.dtype,
                                                start=start, end=end, skipped=result.skipped))
    embed_s = meter.seconds
    images_per_s = round(meter.embedded / embed_s, 2) if meter.embedded and embed_s > 0 else None
    if images_per_s:
        log.info("embedded %d images in %.1f s: %.1f images/s", meter.embedded, embed_s, images_per_s)
    return shards, {"images_per_s": images_per_s, "embed_s": round(embed_s, 3), "embedded_this_run": meter.embedded,
                    "resumed_from_shard": first_new or None, "batch_size": config.batch_size,
                    "num_workers": config.num_workers}


def finish_index(directory: IndexDirectory, shards: list[ShardInfo], *, embedder_entry: dict,
                 config: IndexBuildConfig, sources: list[dict], params: dict, progress: ProgressFn | None = None,
                 started: float | None = None, extra_build: dict | None = None,
                 map_parts: MapFn | None = None) -> Manifest:
    """Train + fill the FAISS index from the shards, measure recall, and write the manifest (last).

    ``map_parts``: how an on-disk index's per-shard parts are filled (an engine's ``map_parts``; default in order).
    """
    import faiss

    started = started if started is not None else time.perf_counter()
    count = sum(s.rows for s in shards)
    skipped = [f for s in shards for f in s.skipped]
    if count == 0:
        reasons = Counter(f["reason"] for f in skipped)
        raise IndexBuildError(f"no image could be read: all {len(skipped)} skipped "
                              f"({', '.join(f'{r} {n}' for r, n in reasons.most_common())})")
    dim = int(embedder_entry["dim"])
    plan = plan_for(count, dim, config)
    if config.rerank_k_factor is not None:
        plan = replace(plan, rerank_k_factor=config.rerank_k_factor)
    digest = hashlib.sha256(f"{params.get('corpus_digest')}|{embedder_entry.get('name')}|{plan.factory}|{count}"
                            .encode()).hexdigest()[:12]
    manifest = Manifest(
        index_id=f"{directory.name}-{digest}", embedder=embedder_entry, dtype=config.dtype, count=count,
        dim=dim, faiss={**plan.manifest_entry(), "ntotal": count}, recall=None,
        shards=[s.manifest_entry() for s in shards], sources=sources,
        skipped={"count": len(skipped), "by_reason": dict(Counter(f["reason"] for f in skipped)),
                 "files": skipped[:MAX_SKIPPED_LISTED], "truncated": len(skipped) > MAX_SKIPPED_LISTED},
        build={"parameters": params, "retrogen_version": __version__, "faiss_version": faiss.__version__},
    )
    describe_metadata(directory, manifest, progress)
    if config.faiss_storage == "ondisk":
        faiss_index = build_tuned_ondisk_index(directory, shards, manifest, plan, config=config,
                                               map_parts=map_parts, progress=progress)
    else:
        faiss_index = build_tuned_index(directory, shards, manifest, plan, config=config, progress=progress)
    directory.write_faiss_index(faiss_index)
    duration = time.perf_counter() - started
    manifest.build.update({"created": now_iso(), "duration_s": round(duration, 3), **(extra_build or {})})
    directory.write_manifest(manifest)
    directory.remove_build_state()
    return manifest


def build_tuned_index(directory: IndexDirectory, shards: list[ShardInfo], manifest: Manifest, plan, *,
                      config: IndexBuildConfig, progress: ProgressFn | None = None) -> Any:
    """Train and fill the FAISS index; for an approximate one, tune its search on held-out rows first (see
    ``RecallProbe``), then add them.

    An HNSW graph that misses ``config.target_recall`` even at the deepest efSearch is built again twice as
    deep (efConstruction x 2, up to ``EF_CONSTRUCTION_MAX``), unless ``config.ef_construction`` fixes it: the
    graph's build depth caps its recall (efConstruction 40 levels off near 0.92 on 1M x 512 clustered data).
    """
    count, dim = manifest.count, manifest.dim
    train_ids = sample_ids(count, plan.train_size, config.seed) if plan.train_size else None
    train = directory.gather_vectors(shards, train_ids) if train_ids is not None else None
    # at most a tenth of the rows, so that the index being tuned is (nearly) the whole corpus
    probe_ids = None if plan.kind == "flat" else sample_ids(count, min(config.num_recall_queries,
                                                                       max(1, count // 10)), config.seed + 1, train_ids)
    probe_vectors = directory.gather_vectors(shards, probe_ids) if probe_ids is not None else None
    chunks = lambda: directory.iter_vectors(shards)  # noqa: E731
    ef, tried = config.ef_construction or EF_CONSTRUCTION, []
    device = record_train_device(manifest, config, trains=train is not None)
    while True:
        log.info("building FAISS %s over %d vectors", plan.factory, count)
        faiss_index = build_faiss(plan, dim, count, chunks, train_vectors=train, progress=progress,
                                  ef_construction=ef, held_out=probe_ids, device=device)
        if probe_ids is None:
            return faiss_index
        tune_operating_point(directory, manifest, faiss_index, chunks, config=config,
                             probe=(probe_ids, probe_vectors), progress=progress)
        if not has_hnsw(faiss_index):
            break
        manifest.faiss["ef_construction"] = ef
        tried.append({"ef_construction": ef, "recall_at_10": manifest.recall["recall_at_10"],
                      "met": manifest.recall["met"]})
        manifest.recall["graphs_built"] = tried
        if manifest.recall["met"] or config.ef_construction is not None or ef >= EF_CONSTRUCTION_MAX:
            break
        log.warning("HNSW built with efConstruction %d reaches recall@10 %.3f at best; building it again with %d",
                    ef, manifest.recall["recall_at_10"], 2 * ef)
        ef *= 2
    add_held_out(faiss_index, probe_vectors, probe_ids)
    return faiss_index


def build_tuned_ondisk_index(directory: IndexDirectory, shards: list[ShardInfo], manifest: Manifest, plan, *,
                             config: IndexBuildConfig, map_parts: MapFn | None = None,
                             progress: ProgressFn | None = None) -> Any:
    """The on-disk IVF index (see ``faiss_ondisk``), its search defaults tuned on stored rows as queries."""
    merged, train_ids = build_ondisk_index(directory, shards, manifest, plan, config=config, map_parts=map_parts,
                                           progress=progress)
    count = manifest.count
    probe_ids = sample_ids(count, min(config.num_recall_queries, max(1, count // 10)), config.seed + 1, train_ids)
    tune_operating_point(directory, manifest, merged, lambda: directory.iter_vectors(shards), config=config,
                         probe=(probe_ids, directory.gather_vectors(shards, probe_ids)), progress=progress,
                         probe_type=IndexedQueryProbe)
    return merged


def tune_operating_point(directory: IndexDirectory, manifest: Manifest, faiss_index: Any, chunks, *,
                         config: IndexBuildConfig, probe: tuple[Any, Any],
                         progress: ProgressFn | None = None, probe_type: type[RecallProbe] = RecallProbe) -> None:
    """Measure recall on the held-out ``probe`` rows (ids, vectors; not yet in ``faiss_index``) at rising search
    cost and record, as the manifest's search defaults, the cheapest point that reaches
    ``config.target_recall`` (``manifest.recall`` keeps every point tried)."""
    from retrogen.retrieval.index import CorpusIndex

    emit(progress, ProgressEvent("recall", 0, 1))
    held_out = 0 if probe_type is IndexedQueryProbe else len(probe[0])  # its queries are in the index
    corpus = CorpusIndex(directory, manifest, faiss_index, held_out=held_out)
    manifest.recall = tune_search(corpus, probe_type.make(*probe, chunks, seed=config.seed),
                                  target=config.target_recall, rerank=config.rerank_k_factor)
    point = manifest.recall["operating_point"]
    defaults = {"nprobe": point["nprobe"]} if "nprobe" in point else \
        {"efSearch": point["ef_search"]} if "ef_search" in point else {}
    manifest.faiss = {**manifest.faiss, "search_defaults": defaults, "rerank_k_factor": point["rerank_k_factor"]}
    emit(progress, ProgressEvent("recall", 1, 1, extra={"recall_at_10": manifest.recall["recall_at_10"]}))
    log.info("recall@10 against exact search: %.3f at %s (target %.2f)", manifest.recall["recall_at_10"], point,
             config.target_recall)


def describe_metadata(directory: IndexDirectory, manifest: Manifest, progress: ProgressFn | None = None) -> None:
    """Fill the manifest's ``metadata`` (values per optional column) and ``captions`` (the full-text index)."""
    emit(progress, ProgressEvent("captions", 0, 1))
    manifest.metadata = {"non_null": directory.count_optional_values(manifest.shards)}
    manifest.captions = directory.write_caption_index(manifest.shards)
    emit(progress, ProgressEvent("captions", 1, 1, extra={"rows": (manifest.captions or {}).get("rows", 0)}))


def refresh_metadata(path: str | os.PathLike) -> Manifest:
    """Add the caption index and column counts to an index built before they existed (vectors untouched)."""
    directory = IndexDirectory(path)
    manifest = directory.read_manifest()
    describe_metadata(directory, manifest)
    directory.write_manifest(manifest)
    return manifest


def _jsonable(obj: Any) -> Any:
    """As it will read back from JSON, so a resume compares like with like."""
    return json.loads(json.dumps(obj, default=str))


# Build options added after indexes were first recorded, with the value every older build had in effect.
ADDED_OPTIONS = {"faiss_storage": "memory"}


def with_new_defaults(previous: dict | None) -> dict | None:
    """A recorded build's parameters, with the options added since at what that build did: an index built
    before an option existed is still the same build, resumed or left as it is by the same command."""
    if not isinstance(previous, dict):
        return previous
    return {k: v for k, v in ADDED_OPTIONS.items() if k not in previous} | previous


def open_output(out_dir: str | os.PathLike, params: dict, *, overwrite: bool, work_dir: str | os.PathLike | None = None,
                progress: ProgressFn | None = None, shards: int = 0) -> tuple[IndexDirectory, Manifest | None]:
    """The index directory a build writes, and the manifest when the same build is already complete there.

    A URL ``out_dir`` (``index_store``): the remote decides, by :func:`start_or_resume`'s rules (its
    ``build_state.json`` is uploaded now); ``--overwrite`` never deletes a prefix that holds objects but no
    build. The staging folder ``work_dir`` follows the remote build: emptied when it holds another one, then
    given the remote's complete shards it lacks (another machine, or a lost folder). A staged build complete
    but not fully uploaded (the last run died publishing) is published now. ``shards``: how many the build
    writes (for the upload progress bar).
    """
    if not is_remote(out_dir):
        directory = IndexDirectory(out_dir)
        return directory, start_or_resume(directory, params, overwrite=overwrite)
    remote = RemoteIndex(str(out_dir))
    if overwrite and not (remote.has_manifest() or remote.has_build_state() or remote.is_empty()):
        raise BuildMismatchError(f"{remote.path!r} holds objects but no index build; --overwrite replaces only a "
                                 "build: choose another --out")
    existing = start_or_resume(remote, params, overwrite=overwrite)
    staging = StagingDirectory(work_dir or default_work_dir(str(out_dir)), remote, progress=progress)
    staging.planned = 2 * shards + 2  # the shards' two files, the FAISS index, the manifest
    if existing is not None:
        return staging, existing
    if overwrite or recorded_parameters(staging) not in (None, params):
        log.info("staging folder %s held another build: cleared", staging.path)
        staging.clear()
    staging.pull()
    existing = start_or_resume(staging, params, overwrite=overwrite)
    if existing is not None:
        staging.publish(existing)
    return staging, existing


def recorded_parameters(directory: IndexDirectory) -> dict | None:
    """The parameters of the build (finished or not) in ``directory``; None when it holds none."""
    try:
        if directory.has_manifest():
            return with_new_defaults(directory.read_manifest().build.get("parameters"))
        if directory.has_build_state():
            return with_new_defaults(directory.read_build_parameters())
    except IndexFormatError:
        return {"unreadable": True}
    return None


def start_or_resume(directory: IndexDirectory, params: dict, *, overwrite: bool) -> Manifest | None:
    """The existing manifest when the same build is already complete; else make the directory ready to write.

    A build (finished or not) made with other ``params`` is refused unless ``overwrite``, and so is a folder
    holding anything but a build: nothing the user put there is ever deleted without asking.
    """
    previous: dict | None = None
    if directory.has_manifest():
        try:
            manifest = directory.read_manifest()
        except IndexFormatError as e:  # a corrupt manifest: only overwrite may replace it
            log.info("existing manifest unreadable: %s", e)
            previous = {"manifest": "unreadable"}
        else:
            previous = with_new_defaults(manifest.build.get("parameters"))
            if previous == params and not overwrite:
                return manifest
    elif directory.has_build_state():
        try:
            previous = with_new_defaults(directory.read_build_parameters())
        except IndexFormatError:
            previous = {"build_state": "unreadable"}
    elif not directory.is_empty() and not overwrite:
        raise BuildMismatchError(f"{str(directory.path)!r} is not empty and holds no index build; choose another "
                                 "--out or pass --overwrite")
    if previous is not None and previous != params and not overwrite:
        diff = sorted(k for k in set(previous) | set(params) if previous.get(k) != params.get(k))
        why = " (the sources' files changed since)" if "corpus_digest" in diff else ""
        raise BuildMismatchError(
            f"{str(directory.path)!r} holds a build made with other arguments (differs in: {', '.join(diff)}){why}; "
            "re-run with the same arguments to resume, or pass --overwrite to replace it"
        )
    if overwrite:
        directory.clear()
    directory.prepare()
    if not directory.has_build_state():
        directory.write_build_state(params)
    return None
