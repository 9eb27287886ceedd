"""A built corpus index opened for search: FAISS index + memory-mapped embedding shards + parquet metadata.

One ``CorpusIndex`` is shared by concurrent requests in the service, so nothing here mutates shared state
per call: search parameters (``nprobe``, ``efSearch``) travel in a per-call ``faiss.SearchParameters``,
never by setting them on the index (clip-retrieval's ``knn_search`` does the latter and races).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from retrogen.errors import InvalidInputError

from .errors import EmbedderMismatchError, IndexFormatError
from .index_format import INDEX_FILE, Manifest, read_manifest

log = logging.getLogger(__name__)

RERANK_CHUNK = 256  # queries re-ranked at a time (bounds the gathered candidate matrix)


def read_faiss_index(path: str | os.PathLike):
    """Load a FAISS index memory-mapped read-only where its type supports it, else normally."""
    import faiss

    path = str(path)
    try:
        return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        log.debug("cannot mmap %s (%s); reading it into memory", path, e)
    try:
        return faiss.read_index(path)
    except RuntimeError as e:
        raise IndexFormatError(f"{path} is not a readable FAISS index: {str(e).splitlines()[0]}") from None


def search_parameters(index, *, nprobe: int | None = None, ef_search: int | None = None):
    """A per-call ``faiss.SearchParameters`` for ``index``, or None. Parameters the index has no use for are ignored."""
    import faiss

    inner = index.index if isinstance(index, faiss.IndexPreTransform) else index
    params = None
    if nprobe is not None and faiss.try_extract_index_ivf(inner) is not None:
        params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    elif ef_search is not None and isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
    elif nprobe is not None or ef_search is not None:
        log.debug("index %s ignores nprobe/ef_search", type(inner).__name__)
    if params is not None and inner is not index:
        params = faiss.SearchParametersPreTransform(index_params=params)
    return params


class CorpusIndex:
    """A read-only view of an index directory. Thread-safe for concurrent searches and reads."""

    def __init__(self, directory: str | os.PathLike, manifest: Manifest, faiss_index: Any):
        self.directory = Path(directory)
        self.manifest = manifest
        self.index = faiss_index
        if faiss_index.ntotal != manifest.count or faiss_index.d != manifest.dim:
            raise IndexFormatError(
                f"{self.directory / INDEX_FILE} holds {faiss_index.ntotal} vectors of dim {faiss_index.d}; "
                f"the manifest says {manifest.count} of dim {manifest.dim}"
            )
        self._emb: list[np.ndarray] = []
        for s in manifest.shards:
            try:
                arr = np.load(self.directory / s["emb"], mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFormatError(f"embedding shard {s['emb']} is unreadable: {e}") from None
            if arr.ndim != 2 or arr.shape != (s["rows"], manifest.dim):
                raise IndexFormatError(f"embedding shard {s['emb']} has shape {arr.shape}, "
                                       f"expected ({s['rows']}, {manifest.dim})")
            self._emb.append(arr)
        self._starts = np.cumsum([0] + [int(s["rows"]) for s in manifest.shards])
        self._meta: dict[int, Any] = {}
        self._lock = threading.Lock()
        faiss_cfg = manifest.faiss
        self.search_defaults: dict[str, Any] = dict(faiss_cfg.get("search_defaults") or {})
        self.rerank_k_factor = int(faiss_cfg.get("rerank_k_factor") or 1)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> CorpusIndex:
        """Open a complete index directory.

        Raises:
            IndexNotFoundError / IndexFormatError: missing, incomplete or corrupt index.
        """
        manifest = read_manifest(directory)
        path = Path(directory) / INDEX_FILE
        if not path.is_file():
            raise IndexFormatError(f"{str(directory)!r} has a manifest but no {INDEX_FILE}")
        return cls(directory, manifest, read_faiss_index(path))

    @property
    def ntotal(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    # -- search -------------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest corpus rows of each query by inner product (= cosine on normalised vectors).

        Args:
            queries: (n, dim) float vectors, L2-normalised like the corpus.
            k: neighbours per query; rows past the corpus size come back as id -1, score -inf.
            nprobe, ef_search: per-call overrides of the manifest's ``search_defaults``.

        Returns:
            ``(scores, ids)``, each (n, k), best first; scores float32, ids int64.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidInputError(f"queries must have shape (n, {self.dim}), got {np.shape(queries)}")
        if int(k) < 1:
            raise InvalidInputError(f"k must be >= 1, got {k}")
        k = int(k)
        nprobe = nprobe if nprobe is not None else self.search_defaults.get("nprobe")
        ef_search = ef_search if ef_search is not None else self.search_defaults.get("efSearch")
        params = search_parameters(self.index, nprobe=nprobe, ef_search=ef_search)
        kk = min(self.ntotal, k * self.rerank_k_factor) if self.rerank_k_factor > 1 else min(self.ntotal, k)
        if len(q) == 0 or kk == 0:
            return (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        scores, ids = self.index.search(q, kk, params=params)
        if self.rerank_k_factor > 1:
            scores, ids = self._rerank(q, ids, k)
        if ids.shape[1] < k:  # pad to k so callers always get (n, k)
            pad = k - ids.shape[1]
            scores = np.hstack([scores, np.full((len(q), pad), -np.inf, np.float32)])
            ids = np.hstack([ids, np.full((len(q), pad), -1, np.int64)])
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

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
        shard, local = self._locate(ids)
        out = np.empty((len(shard), self.dim), dtype=self._emb[0].dtype if self._emb else np.float32)
        for s in np.unique(shard):
            sel = shard == s
            rows = local[sel]
            order = np.argsort(rows, kind="stable")  # sorted reads are kinder to the page cache
            got = np.empty((len(rows), self.dim), out.dtype)
            got[order] = self._emb[s][rows[order]]
            out[sel] = got
        return out

    def _meta_table(self, s: int):
        with self._lock:
            table = self._meta.get(s)
            if table is None:
                import pyarrow.parquet as pq

                path = self.directory / self.manifest.shards[s]["meta"]
                try:
                    table = pq.read_table(path, memory_map=True)
                except (OSError, ValueError) as e:
                    raise IndexFormatError(f"metadata shard {path} is unreadable: {e}") from None
                if table.num_rows != self.manifest.shards[s]["rows"]:
                    raise IndexFormatError(f"metadata shard {path} has {table.num_rows} rows, "
                                           f"expected {self.manifest.shards[s]['rows']}")
                self._meta[s] = table
            return table

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
        source = row["source"]
        if source is None:
            raise IndexFormatError(f"row {id} has no stored source (its metadata names no file)")
        try:
            if row["member"] is not None:
                if row["offset"] is None or row["size"] is None:
                    raise IndexFormatError(f"row {id}: tar member {row['member']!r} has no offset/size")
                with _open_source(source) as f:
                    f.seek(int(row["offset"]))
                    data = f.read(int(row["size"]))
                if len(data) != row["size"]:
                    raise IndexFormatError(f"row {id}: {source} is shorter than recorded ({row['member']})")
                return data
            with _open_source(source) as f:
                return f.read()
        except FileNotFoundError:
            raise IndexFormatError(f"row {id}: corpus file {source!r} is gone (moved or deleted since the build)"
                                   ) from None

    def check_embedder(self, name: str) -> None:
        """Raise ``EmbedderMismatchError`` unless ``name`` is the embedder the index was built with."""
        built = self.manifest.embedder.get("name")
        if name != built:
            raise EmbedderMismatchError(
                f"query embedder {name!r} does not match the index's embedder {built!r} "
                f"(index {str(self.directory)!r}); query with {built!r} or rebuild the index with {name!r}"
            )


def _open_source(source: str):
    if "://" in source:  # object stores and URLs go through fsspec
        import fsspec

        return fsspec.open(source, "rb").open()
    return open(source, "rb")
