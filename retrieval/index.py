"""A built corpus index opened for search: FAISS index + memory-mapped embedding shards + parquet metadata.

One ``CorpusIndex`` is shared by concurrent requests in the service, so nothing here mutates shared state
per call: search parameters (``nprobe``, ``efSearch``) travel in a per-call ``faiss.SearchParameters``,
never by setting them on the index (clip-retrieval's ``knn_search`` does the latter and races). Every file
is read through :class:`~retrogen.retrieval.index_directory.IndexDirectory`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

from retrogen.errors import InvalidInputError
from retrogen.fileio import read_source_bytes
from retrogen.progress import ProgressFn

from .errors import EmbedderMismatchError, IndexFormatError
from .faiss_device import for_search, resolve_device
from .index_directory import INDEX_FILE, IndexDirectory, Manifest, take_rows
from .index_store import is_remote, sync_index

log = logging.getLogger(__name__)

PARAMS_CACHED = 64  # distinct per-call search settings kept made, per index
RERANK_CHUNK = 256  # queries re-ranked at a time (bounds the gathered candidate matrix)


def searching_index(faiss_index):
    """The index under an ``IndexIDMap`` (built indexes that were tuned have one: their recall-probe rows went
    in last, under their own ids), else ``faiss_index`` itself."""
    import faiss

    return faiss.downcast_index(faiss_index.index) if isinstance(faiss_index, faiss.IndexIDMap) else faiss_index


def row_ids(faiss_index) -> np.ndarray | None:
    """Storage position -> row id of an ``IndexIDMap`` (a view of faiss's own array, no copy), else None.

    ``CorpusIndex`` searches the index under the map and translates here: faiss's ``IndexIDMap.search``
    translates in an OpenMP loop, whose thread wake-up cost ~0.1 ms per single query (measured: IVF-PQ at
    100k went from 0.14 to 0.31 ms p50), more than the search itself."""
    import faiss

    if not isinstance(faiss_index, faiss.IndexIDMap):
        return None
    ids = faiss_index.id_map
    return faiss.rev_swig_ptr(ids.data(), ids.size()).view(np.int64) if ids.size() else np.zeros(0, np.int64)


def search_parameters(faiss_index, *, nprobe: int | None = None, ef_search: int | None = None,
                      k_factor: int | None = None):
    """A per-call ``faiss.SearchParameters`` for ``faiss_index``, or None. Parameters the index has no use for are
    ignored; ``k_factor`` is the re-rank depth of an ``IndexRefine`` (faiss's own re-rank)."""
    import faiss

    searching = searching_index(faiss_index)
    refine = searching if isinstance(searching, faiss.IndexRefine) else None
    outer = faiss.downcast_index(refine.base_index) if refine is not None else searching
    inner = outer.index if isinstance(outer, faiss.IndexPreTransform) else outer
    params = None
    if nprobe is not None and faiss.try_extract_index_ivf(inner) is not None:
        params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    elif ef_search is not None and isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
    elif nprobe is not None or ef_search is not None:
        log.debug("index %s ignores nprobe/ef_search", type(inner).__name__)
    if params is not None and inner is not outer:
        params = _holding(faiss.SearchParametersPreTransform(index_params=params), params)
    if refine is not None and k_factor is not None:
        outer_params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor))
        if params is not None:
            outer_params.base_index_params = params
        params = _holding(outer_params, params)
    return params


def _holding(params, inner):
    """``params`` keeping the Python object of its nested parameters alive (faiss holds only a raw pointer)."""
    params.referenced_objects = [inner]
    return params


class CorpusIndex:
    """A read-only view of an index directory. Thread-safe for concurrent searches and reads."""

    def __init__(self, directory: IndexDirectory | str | os.PathLike, manifest: Manifest, faiss_index: Any, *,
                 held_out: int = 0, device: str = "cpu"):
        """``held_out``: rows of the manifest not yet in ``faiss_index`` (the build's recall probe, while tuning).
        ``device``: where to search, ``cpu`` | ``gpu`` | ``auto`` (``retrieval.faiss_device``); ``self.device``
        says where it does."""
        import faiss

        self.directory = directory if isinstance(directory, IndexDirectory) else IndexDirectory(directory)
        self.manifest = manifest
        self.faiss_index = faiss_index
        if faiss_index.ntotal != manifest.count - held_out or faiss_index.d != manifest.dim:
            raise IndexFormatError(
                f"{self.directory.path / INDEX_FILE} holds {faiss_index.ntotal} vectors of dim {faiss_index.d}; "
                f"the manifest says {manifest.count} of dim {manifest.dim}"
            )
        self._emb = self.directory.open_embeddings(manifest)
        self._starts = np.cumsum([0] + [int(s["rows"]) for s in manifest.shards])
        self._meta: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.search_defaults: dict[str, Any] = dict(manifest.faiss.get("search_defaults") or {})
        self.rerank_k_factor = int(manifest.faiss.get("rerank_k_factor") or 1)
        self._searcher = searching_index(faiss_index)
        self._row_of = row_ids(faiss_index)
        self.refined = isinstance(self._searcher, faiss.IndexRefine)  # faiss re-ranks; else numpy, from the shards
        base = faiss.downcast_index(self._searcher.base_index) if self.refined else self._searcher
        ivf = faiss.try_extract_index_ivf(base)
        self._nlist = int(ivf.nlist) if ivf is not None else 0
        self._graph = isinstance(faiss.downcast_index(base.index) if isinstance(base, faiss.IndexPreTransform)
                                 else base, faiss.IndexHNSW)
        self._params: dict[tuple, Any] = {}  # (nprobe, efSearch, factor) -> SearchParameters, read-only once made
        # parameters are made from the CPU structure (a GPU copy's classes are not IndexIVF...) and fit both
        self._structure = self._searcher
        self._searcher, self.device = for_search(self._searcher, resolve_device(device))

    @classmethod
    def open(cls, directory: str | os.PathLike, *, mmap: bool | None = None, device: str = "cpu",
             cache_dir: str | os.PathLike | None = None, progress: ProgressFn | None = None) -> CorpusIndex:
        """Open a complete index directory; ``mmap``: memory-map the FAISS index (True), read it into RAM
        (False), or decide by its size (None, see ``IndexDirectory.read_faiss_index``); ``device``: search on
        the ``cpu``, the ``gpu`` (a copy in GPU memory), or ``auto`` (the GPU when faiss-gpu sees one).

        ``directory`` may be an fsspec URL (``s3://bucket/prefix``): FAISS needs local files, so the index is
        first brought up to date in ``cache_dir`` (default: ``~/.cache/retrogen/indexes/<hash of the URL>``;
        only missing or changed files are downloaded, ``progress`` reports them) and opened from there.

        Raises:
            IndexNotFoundError / IndexFormatError: missing, incomplete or corrupt index.
            IndexStoreError: the URL's store cannot be reached or read.
        """
        if is_remote(directory):
            folder = sync_index(str(directory), cache_dir, progress=progress)
        else:
            folder = IndexDirectory(directory)
        manifest = folder.read_manifest()
        return cls(folder, manifest, folder.read_faiss_index(mmap=mmap), device=device)

    @property
    def ntotal(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    # -- search -------------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None, ef_search: int | None = None,
               rerank_k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest corpus rows of each query by inner product (= cosine on normalised vectors).

        Args:
            queries: (n, dim) float vectors, L2-normalised like the corpus.
            k: neighbours per query; rows past the corpus size come back as id -1, score -inf.
            nprobe, ef_search: per-call overrides of the manifest's ``search_defaults``.
            rerank_k_factor: per-call override of the re-rank depth of a lossy index (``k x`` this many
                candidates are re-scored: by faiss's refine from the float16 copy in the index, or, for an index
                without one, from the stored shards; 1: none).

        Returns:
            ``(scores, ids)``, each (n, k), best first; scores float32, ids int64.
        """
        q = queries  # per-call work here is ~10 us beside a 0.1-0.2 ms faiss search: keep it so
        if not (isinstance(q, np.ndarray) and q.dtype == np.float32 and q.flags.c_contiguous):
            q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidInputError(f"queries must have shape (n, {self.dim}), got {np.shape(queries)}")
        if int(k) < 1:
            raise InvalidInputError(f"k must be >= 1, got {k}")
        k = int(k)
        factor = int(rerank_k_factor) if rerank_k_factor is not None else self.rerank_k_factor
        if factor < 1:
            raise InvalidInputError(f"rerank_k_factor must be >= 1, got {rerank_k_factor}")
        if len(q) == 0:
            return np.full((0, k), -np.inf, np.float32), np.full((0, k), -1, np.int64)
        key = self._depth(nprobe if nprobe is not None else self.search_defaults.get("nprobe"),
                          ef_search if ef_search is not None else self.search_defaults.get("efSearch"), factor, k)
        params = self._params.get(key)
        if params is None:  # cached (a few keys in practice): making one costs ~10 us of a 0.1 ms query
            params = search_parameters(self._structure, nprobe=key[0], ef_search=key[1], k_factor=factor)
            if len(self._params) < PARAMS_CACHED:
                self._params[key] = params
        if self.refined or factor == 1:
            scores, ids = self._rows(*self._searcher.search(q, k, params=params))
        else:  # a lossy index without faiss's refine (built before it, or a custom factory)
            cand = self._rows(*self._searcher.search(q, min(self.ntotal, k * factor), params=params))[1]
            scores, ids = self._rerank(q, cand, k)
        if ids.shape[1] < k:  # pad to k so callers always get (n, k)
            pad = k - ids.shape[1]
            scores = np.hstack([scores, np.full((len(q), pad), -np.inf, np.float32)])
            ids = np.hstack([ids, np.full((len(q), pad), -1, np.int64)])
        return scores, ids

    def _depth(self, nprobe: int | None, ef_search: int | None, factor: int, k: int) -> tuple:
        """(nprobe, efSearch, factor) deep enough for ``k`` results. The tuned point is for k = 10; asked for
        thousands (a diverse pool), faiss's HNSW returns at most about efSearch of them and an IVF index at most
        what its probed lists hold (measured: 1,100-1,300 of 2,000 at efSearch 24), the rest as -1. So efSearch
        is at least k, and where the probed lists would hold fewer candidates than the search needs on average,
        nprobe covers twice that many. Neither changes at k = 10 (the tuned point stays what was measured)."""
        if self._graph and ef_search is not None:
            ef_search = max(int(ef_search), k)
        if self._nlist and nprobe is not None:
            wanted = k * factor if (self.refined or factor > 1) else k
            lists = -(-wanted * self._nlist // max(1, self.ntotal))  # lists that hold `wanted` rows on average
            if lists > int(nprobe):
                nprobe = min(self._nlist, 2 * lists)
        return nprobe, ef_search, factor

    def _rows(self, scores: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """faiss's answer with row ids, and id -1 / score -inf where it found nothing (faiss pads each row's end
        with id -1 and a finite score)."""
        last = found[:, -1]  # a single query (the latency case) skips numpy's reduce: ~3 us of a 0.2 ms search
        missing = len(last) > 0 and (last[0] < 0 if len(last) == 1 else last.min() < 0)
        ids = found if self._row_of is None or not len(self._row_of) else self._row_of.take(found)
        if missing:
            ids = np.where(found >= 0, ids, -1)
            scores = np.where(found >= 0, scores, np.float32(-np.inf))
        return scores, ids

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidates (from the stored shards), top ``k`` kept."""
        n, kk = cand.shape
        out_s = np.full((n, min(k, kk)), -np.inf, np.float32)
        out_i = np.full((n, min(k, kk)), -1, np.int64)
        for lo in range(0, n, RERANK_CHUNK):
            c = cand[lo : lo + RERANK_CHUNK]
            valid = c >= 0
            vecs = self.embeddings(np.where(valid, c, 0).ravel()).astype(np.float32).reshape(*c.shape, self.dim)
            exact = np.einsum("nkd,nd->nk", vecs, q[lo : lo + RERANK_CHUNK])
            exact[~valid] = -np.inf
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            out_s[lo : lo + len(c)] = np.take_along_axis(exact, order, axis=1)
            out_i[lo : lo + len(c)] = np.where(np.take_along_axis(valid, order, axis=1),
                                               np.take_along_axis(c, order, axis=1), -1)
        return out_s, out_i

    def search_captions(self, match: str, limit: int) -> list[tuple[int, float]]:
        """Rows whose caption matches FTS5 expression ``match`` (see ``retrieval.captions``), best bm25 first.

        Raises:
            InvalidInputError: the index has no caption index (see :meth:`check_captions`).
        """
        self.check_captions()
        return self.directory.search_captions(match, limit)

    def check_captions(self) -> None:
        """Raise InvalidInputError unless the index has a caption index (a corpus without captions has none, nor
        has an index built before caption matching)."""
        if not self.manifest.captions:
            raise InvalidInputError(
                f"index {str(self.directory.path)!r} has no caption index: its corpus has no captions, or it was "
                "built before caption matching (run `retrogen index captions DIR` to add one)")

    # -- rows ---------------------------------------------------------------------------------------------

    def _locate(self, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.ntotal):
            bad = ids[(ids < 0) | (ids >= self.ntotal)][0]
            raise InvalidInputError(f"row id {int(bad)} is outside the index (0..{self.ntotal - 1})")
        shard = np.searchsorted(self._starts, ids, side="right") - 1
        return shard, ids - self._starts[shard]

    def embeddings(self, ids) -> np.ndarray:
        """Stored vectors of ``ids`` (stored dtype, float16 or float32), in the order given."""
        return take_rows(self._emb, *self._locate(ids))

    def _meta_table(self, s: int):
        with self._lock:
            if s not in self._meta:
                self._meta[s] = self.directory.read_metadata(self.manifest.shards[s])
            return self._meta[s]

    def metadata_table(self, ids, columns: list[str] | None = None):
        """Metadata rows of ``ids`` as a ``pyarrow.Table`` in the order given."""
        import pyarrow as pa

        shard, local = self._locate(ids)
        parts, positions = [], []
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            table = self._meta_table(int(s))
            if columns is not None:
                table = table.select(columns)
            parts.append(table.take(pa.array(local[sel])))
            positions.append(sel)
        if not parts:
            schema = self._meta_table(0).schema if self.manifest.shards else None
            return pa.Table.from_pylist([], schema=schema)
        merged = pa.concat_tables(parts)
        return merged.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))

    def metadata(self, ids, columns: list[str] | None = None) -> list[dict[str, Any]]:
        """Metadata rows of ``ids`` as dicts, in the order given (``metadata_table`` for Arrow)."""
        return self.metadata_table(ids, columns).to_pylist()

    def read_bytes(self, id: int) -> bytes:
        """The item's bytes exactly as stored in the corpus: a file, or a tar member read at its data offset."""
        (row,) = self.metadata([int(id)], ["source", "member", "offset", "size"])
        source, member = row["source"], row["member"]
        if source is None:
            raise IndexFormatError(f"row {id} has no stored source (its metadata names no file)")
        if member is not None and (row["offset"] is None or row["size"] is None):
            raise IndexFormatError(f"row {id}: tar member {member!r} has no offset/size")
        at = {"offset": int(row["offset"]), "size": int(row["size"])} if member is not None else {}
        try:
            return read_source_bytes(source, **at)
        except FileNotFoundError:
            raise IndexFormatError(f"row {id}: corpus file {source!r} is gone (moved or deleted since the build)"
                                   ) from None
        except OSError as e:  # shorter than recorded, or unreadable
            raise IndexFormatError(f"row {id} ({member or source}): {e}") from None

    def check_embedder(self, name: str) -> None:
        """Raise ``EmbedderMismatchError`` unless ``name`` is the embedder the index was built with."""
        built = self.manifest.embedder.get("name")
        if name != built:
            raise EmbedderMismatchError(
                f"query embedder {name!r} does not match the index's embedder {built!r} "
                f"(index {str(self.directory.path)!r}); query with {built!r} or rebuild the index with {name!r}"
            )

