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

from .errors import EmbedderMismatchError, IndexFormatError
from .index_directory import INDEX_FILE, IndexDirectory, Manifest, take_rows

log = logging.getLogger(__name__)

RERANK_CHUNK = 256  # queries re-ranked at a time (bounds the gathered candidate matrix)


def search_parameters(faiss_index, *, nprobe: int | None = None, ef_search: int | None = None):
    """A per-call ``faiss.SearchParameters`` for ``faiss_index``, or None. Parameters the index has no use for are ignored."""
    import faiss

    inner = faiss_index.index if isinstance(faiss_index, faiss.IndexPreTransform) else faiss_index
    params = None
    if nprobe is not None and faiss.try_extract_index_ivf(inner) is not None:
        params = faiss.SearchParametersIVF(nprobe=int(nprobe))
    elif ef_search is not None and isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
    elif nprobe is not None or ef_search is not None:
        log.debug("index %s ignores nprobe/ef_search", type(inner).__name__)
    if params is not None and inner is not faiss_index:
        params = faiss.SearchParametersPreTransform(index_params=params)
    return params


class CorpusIndex:
    """A read-only view of an index directory. Thread-safe for concurrent searches and reads."""

    def __init__(self, directory: IndexDirectory | str | os.PathLike, manifest: Manifest, faiss_index: Any):
        self.directory = directory if isinstance(directory, IndexDirectory) else IndexDirectory(directory)
        self.manifest = manifest
        self.faiss_index = faiss_index
        if faiss_index.ntotal != manifest.count or faiss_index.d != manifest.dim:
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

    @classmethod
    def open(cls, directory: str | os.PathLike, *, mmap: bool | None = None) -> CorpusIndex:
        """Open a complete index directory; ``mmap``: memory-map the FAISS index (True), read it into RAM
        (False), or decide by its size (None, see ``IndexDirectory.read_faiss_index``).

        Raises:
            IndexNotFoundError / IndexFormatError: missing, incomplete or corrupt index.
        """
        folder = IndexDirectory(directory)
        manifest = folder.read_manifest()
        return cls(folder, manifest, folder.read_faiss_index(mmap=mmap))

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
            rerank_k_factor: per-call override of the exact re-rank depth (``k x`` this many candidates are
                re-scored from the stored vectors; 1: none).

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
        params = search_parameters(self.faiss_index, nprobe=nprobe, ef_search=ef_search)
        factor = int(rerank_k_factor) if rerank_k_factor is not None else self.rerank_k_factor
        if factor < 1:
            raise InvalidInputError(f"rerank_k_factor must be >= 1, got {rerank_k_factor}")
        kk = min(self.ntotal, k * factor)
        if len(q) == 0 or kk == 0:
            return (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        scores, ids = self.faiss_index.search(q, kk, params=params)
        if factor > 1:
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

