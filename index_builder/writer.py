"""Embedding + metadata shards on disk, written so that an interrupted build can resume.

A shard covers a fixed range of input records. Its vectors go to ``img_emb/img_emb_{N}.npy`` first, then
its row-aligned metadata to ``metadata/metadata_{N}.parquet``; both are atomic (temp file + os.replace), and
the parquet file is the commit: it carries, in its schema metadata, the record range it covers and the files
it skipped. On resume, shards whose two files agree are kept and everything after the first gap is redone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrogen.retrieval.index_format import (
    DTYPES,
    EMB_DIR,
    META_DIR,
    atomic_path,
    emb_path,
    list_shard_files,
    meta_path,
    metadata_schema,
)

log = logging.getLogger(__name__)

_KV_RANGE = b"retrogen.records"
_KV_SKIPPED = b"retrogen.skipped"


@dataclass
class ShardInfo:
    n: int
    rows: int
    start: int  # first input record covered (inclusive)
    end: int  # last input record covered (exclusive)
    skipped: list[dict] = field(default_factory=list)

    def manifest_entry(self) -> dict:
        return {"emb": f"{EMB_DIR}/{emb_path('.', self.n).name}", "meta": f"{META_DIR}/{meta_path('.', self.n).name}",
                "rows": self.rows}


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (zero rows stay zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def write_shard(out_dir: str | os.PathLike, n: int, vectors: np.ndarray, rows: list[dict], *, first_id: int,
                dtype: str, start: int, end: int, skipped: list[dict] | None = None) -> ShardInfo:
    """Write shard ``n``: vectors (cast to ``dtype``) then metadata (ids from ``first_id``), each atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if len(vectors) != len(rows):
        raise ValueError(f"shard {n}: {len(vectors)} vectors but {len(rows)} metadata rows")
    skipped = list(skipped or [])
    with atomic_path(emb_path(out_dir, n), suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(vectors, dtype=dtype))
    schema = metadata_schema()
    columns = {name: [r.get(name) for r in rows] for name in schema.names if name != "id"}
    columns["id"] = list(range(first_id, first_id + len(rows)))
    table = pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)
    table = table.replace_schema_metadata({_KV_RANGE: f"{start}:{end}".encode(),
                                           _KV_SKIPPED: json.dumps(skipped).encode()})
    with atomic_path(meta_path(out_dir, n), suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return ShardInfo(n, len(rows), start, end, skipped)


def complete_shards(out_dir: str | os.PathLike, *, dim: int, dtype: str) -> list[ShardInfo]:
    """The shards ``0..N`` already complete and consistent; files of any later or broken shard are deleted."""
    import pyarrow.parquet as pq

    done: list[ShardInfo] = []
    broken_from: int | None = None
    for n, emb, meta in list_shard_files(out_dir):
        if broken_from is None:
            info = _check_shard(n, emb, meta, dim=dim, dtype=dtype, pq=pq) if n == len(done) else None
            if info is not None and (not done or info.start == done[-1].end):
                done.append(info)
                continue
            broken_from = n
        for p in (emb, meta):
            if p is not None:
                log.info("removing incomplete shard file %s", p)
                Path(p).unlink(missing_ok=True)
    return done


def _check_shard(n, emb, meta, *, dim, dtype, pq) -> ShardInfo | None:
    if emb is None or meta is None:
        return None
    try:
        arr = np.load(emb, mmap_mode="r")
        md = pq.read_metadata(meta)
        kv = md.metadata or {}
        start, end = (int(x) for x in kv[_KV_RANGE].decode().split(":"))
        skipped = json.loads(kv[_KV_SKIPPED].decode())
    except (OSError, ValueError, KeyError) as e:
        log.info("shard %d is incomplete (%s)", n, e)
        return None
    if arr.ndim != 2 or arr.shape[1] != dim or arr.dtype != np.dtype(dtype) or arr.shape[0] != md.num_rows:
        log.info("shard %d does not match (shape %s, dtype %s, %d rows)", n, arr.shape, arr.dtype, md.num_rows)
        return None
    return ShardInfo(n, int(md.num_rows), start, end, skipped)


def iter_vectors(out_dir: str | os.PathLike, shards: list[ShardInfo], chunk: int = 65536) -> Iterator[np.ndarray]:
    """All stored vectors in shard order, as float32 chunks (memory-mapped reads)."""
    for s in shards:
        arr = np.load(emb_path(out_dir, s.n), mmap_mode="r")
        for lo in range(0, len(arr), chunk):
            yield np.ascontiguousarray(arr[lo : lo + chunk], dtype=np.float32)


def gather_vectors(out_dir: str | os.PathLike, shards: list[ShardInfo], ids: np.ndarray) -> np.ndarray:
    """float32 vectors of global row ``ids`` (sorted ids read fastest), from the memory-mapped shards."""
    starts = np.cumsum([0] + [s.rows for s in shards])
    ids = np.asarray(ids, dtype=np.int64)
    shard_of = np.searchsorted(starts, ids, side="right") - 1
    out = np.empty((len(ids), 0 if not shards else np.load(emb_path(out_dir, shards[0].n), mmap_mode="r").shape[1]),
                   np.float32)
    for s in np.unique(shard_of):
        sel = shard_of == s
        arr = np.load(emb_path(out_dir, shards[s].n), mmap_mode="r")
        out[sel] = arr[ids[sel] - starts[s]]
    return out
