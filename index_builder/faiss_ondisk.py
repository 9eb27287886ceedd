"""The FAISS index of a large corpus, built the way faiss's ``bench_all_ivf``/autofaiss do it at LAION scale.

1. an IVF index is trained on a sample of the stored vectors (``plan.train_size`` rows, seeded);
2. one part per embedding shard: the trained (empty) index filled with that shard's vectors under their global
   row ids, written to ``faiss_parts/part_{N}.index``; the parts are independent, so an engine fills them in
   parallel (Ray tasks on the cluster with ``--engine ray``, one after another locally);
3. ``faiss.contrib.ondisk.merge_ondisk`` merges the parts' inverted lists into one ``OnDiskInvertedLists``
   file, ``image.ivfdata``, which faiss memory-maps when the index is read (``IndexDirectory.read_faiss_index``).

Nothing is added after the merge (faiss's ``OnDiskInvertedLists`` returned wrong neighbours for rows added to a
merged index, measured here), so the recall probe's query rows stay in the index and each query's own row is
dropped from its results: an IVF index files each row in the list of its nearest centroid whatever else is in
the index, so this is the recall of the index without that row. Lossy codes (PQ) are re-ranked exactly from
the memory-mapped shards (``CorpusIndex``), not from a float16 copy in RAM (``Refine``), which is what a
corpus too large for RAM needs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from retrogen.progress import ProgressEvent, ProgressFn, emit
from retrogen.retrieval.faiss_device import train
from retrogen.retrieval.index_directory import IndexDirectory, Manifest, ShardInfo

from .config import IndexBuildConfig
from .errors import IndexBuildError
from .faiss_build import IndexPlan, RecallProbe, plan_index, record_train_device, sample_ids

log = logging.getLogger(__name__)

#: (function, argument tuples) -> results in order; how an engine runs independent jobs
MapFn = Callable[[Callable[..., Any], Sequence[tuple]], list]


def plan_ondisk(count: int, dim: int, index_type: str) -> IndexPlan:
    """The IVF index to build on disk: ``auto``/``ivfpq`` is IVF-PQ sized as ``plan_index`` sizes it, without
    the float16 ``Refine`` copy (RAM the on-disk layout exists to avoid); a custom factory must contain IVF.

    Raises:
        IndexBuildError: flat/HNSW, or a factory without an IVF level (nothing to merge on disk).
    """
    import faiss

    kind = (index_type or "auto").strip()
    if kind in ("flat", "hnsw"):
        raise IndexBuildError(f"--faiss-storage ondisk builds an IVF index; --index-type {kind} has no inverted "
                              "lists to store on disk (use auto, ivfpq or an IVF factory such as 'IVF1024,PQ64np')")
    plan = plan_index(count, dim, index_type="ivfpq" if kind == "auto" else kind)
    factory = re.sub(r",Refine\([^)]*\)$", "", plan.factory)
    if faiss.try_extract_index_ivf(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)) is None:
        raise IndexBuildError(f"--faiss-storage ondisk needs an IVF index; {factory!r} has no IVF level")
    return replace(plan, factory=factory, memory_bytes=None)


def fill_part(trained_path: str, emb_path: str, first_id: int, out_path: str, chunk: int = 65536) -> str:
    """Add one shard's vectors (rows ``first_id...``) to a copy of the trained index; write it to ``out_path``.

    Runs wherever the engine puts it (a Ray task on any node): it reads only the files it is given.
    """
    import faiss

    index = faiss.read_index(trained_path)
    arr = np.load(emb_path, mmap_mode="r")
    for lo in range(0, len(arr), chunk):
        block = np.ascontiguousarray(arr[lo : lo + chunk], dtype=np.float32)
        index.add_with_ids(block, np.arange(first_id + lo, first_id + lo + len(block), dtype=np.int64))
    faiss.write_index(index, out_path)
    return out_path


def map_in_order(fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
    """The local engine's ``MapFn``: one job after another (faiss's add is multi-threaded already)."""
    return [fn(*job) for job in jobs]


def build_ondisk_index(directory: IndexDirectory, shards: list[ShardInfo], manifest: Manifest, plan: IndexPlan, *,
                       config: IndexBuildConfig, map_parts: MapFn | None = None,
                       progress: ProgressFn | None = None) -> tuple[Any, np.ndarray]:
    """Train on a sample, fill one part per shard through ``map_parts``, merge the parts on disk; returns the
    merged index (``IndexDirectory.write_faiss_index`` moves its lists to ``image.ivfdata``) and the training
    row ids. Records how it was built in ``manifest.faiss``."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    count, dim = manifest.count, manifest.dim
    train_ids = sample_ids(count, plan.train_size or min(count, 10_000), config.seed)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    emit(progress, ProgressEvent("faiss_train", 0, 1, message=plan.factory))
    train(index, directory.gather_vectors(shards, train_ids), record_train_device(manifest, config, trains=True))
    emit(progress, ProgressEvent("faiss_train", 1, 1, message=plan.factory))
    trained = str(directory.faiss_work_path("trained.index"))
    faiss.write_index(index, trained)
    starts = np.cumsum([0] + [s.rows for s in shards])
    jobs = [(trained, str(directory.emb_path(s.n)), int(first), str(directory.faiss_work_path(f"part_{s.n:04d}.index")))
            for s, first in zip(shards, starts, strict=False) if s.rows]
    emit(progress, ProgressEvent("faiss_add", 0, count, message=f"{len(jobs)} parts"))
    parts = (map_parts or map_in_order)(fill_part, jobs)
    merged = faiss.read_index(trained)
    merge_ondisk(merged, parts, str(directory.faiss_work_path("merged.ivfdata")))
    if merged.ntotal != count:
        raise IndexBuildError(f"merged {merged.ntotal} vectors into the on-disk index, expected {count}")
    emit(progress, ProgressEvent("faiss_add", count, count, message=f"merged {len(parts)} parts on disk"))
    manifest.faiss.update({"storage": "ondisk", "ivfdata": "image.ivfdata", "parts": len(parts),
                           "train_size": len(train_ids), "merged_with": "faiss.contrib.ondisk.merge_ondisk"})
    return merged, train_ids


class IndexedQueryProbe(RecallProbe):
    """A :class:`RecallProbe` whose query rows are in the index: each query's own row is dropped from its
    results (valid for IVF: a row's list does not depend on the other rows; not for a graph)."""

    @classmethod
    def make(cls, qids: np.ndarray, queries: np.ndarray, chunks: Callable[[], Any], *, k: int = 10,
             seed: int = 0) -> IndexedQueryProbe:
        """Exact top-``k`` by inner product of ``queries`` (the rows ``qids``) over every row but the query's own."""
        import faiss

        heap, start = faiss.ResultHeap(len(qids), k + 1, keep_max=True), 0
        for chunk in chunks():
            scores, pos = faiss.knn(queries, chunk, min(k + 1, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, pos + start)
            start += len(chunk)
        heap.finalize()
        truth = [[int(i) for i in row if i >= 0 and i != q][:k] for q, row in zip(np.asarray(qids).tolist(), heap.I,
                                                                                   strict=True)]
        return cls(np.asarray(qids), np.asarray(queries, np.float32), truth, k, seed)

    def recall(self, corpus, **overrides) -> tuple[float, float]:
        import time

        t0 = time.perf_counter()
        _, found = corpus.search(self.queries, self.k + 1, **overrides)
        ms = 1000 * (time.perf_counter() - t0) / max(1, len(self.qids))
        hits = []
        for qid, row, truth in zip(self.qids.tolist(), found.tolist(), self.truth, strict=True):
            if truth:
                others = [i for i in row if i != qid][: self.k]
                hits.append(len(set(others) & set(truth)) / len(truth))
        return (float(np.mean(hits)) if hits else 1.0), ms

    def entry(self, recall: float) -> dict:
        return super().entry(recall) | {
            "method": "stored vectors as queries, each query's own row dropped from its results (an on-disk IVF "
                      "index is merged once, nothing added after); exact inner-product ground truth over the "
                      "other rows; search with the chosen defaults, re-rank included"}
