"""``retrogen index import``: an index from clip-retrieval's output (``img_emb/*.npy`` + ``metadata/*.parquet``).

Users with precomputed LAION-style embeddings need not re-embed: the shards are copied into our layout
(4-digit names, our metadata columns, normalised only if they are not already), then the FAISS index and
manifest are built exactly as ``build_index`` does.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from retrogen.progress import ProgressEvent, ProgressFn, emit
from retrogen.retrieval.index_format import DTYPES, Manifest

from .build import finish_index, prepare_out_dir
from .errors import SourceError
from .sources import CAPTION_COLUMNS, KEY_COLUMNS, LICENCE_COLUMNS, URL_COLUMNS
from .writer import normalise, write_shard

log = logging.getLogger(__name__)

_NUM = re.compile(r"_(\d+)\.(npy|parquet)$")
SOURCE_COLUMNS = ("image_path", "path", "filepath", "url")
NORM_TOLERANCE = 1e-2  # float16 vectors are normalised to about 1e-3; beyond this they were not normalised


def _numbered(folder: Path, pattern: str) -> dict[int, Path]:
    out = {}
    for p in sorted(folder.glob(pattern)):
        m = _NUM.search(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def import_clip_retrieval(from_dir: str | os.PathLike, out_dir: str | os.PathLike, *, embedder: str | None = None,
                          index: str = "auto", memory_budget: str | int | None = None, dtype: str | None = None,
                          overwrite: bool = False, num_recall_queries: int = 1000, seed: int = 0,
                          progress: ProgressFn | None = None) -> Manifest:
    """Build an index directory from clip-retrieval embeddings and metadata without re-embedding.

    Args:
        embedder: the name of the embedder that made the vectors (e.g. ``open_clip:ViT-B-32:openai``),
            recorded in the manifest so queries are checked against it; ``None`` records ``unknown``.
        dtype: stored dtype; default: the input's (float16 or float32).

    Raises:
        SourceError: no shards, unmatched or misaligned embedding/metadata files.
    """
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    src, out_dir = Path(from_dir), Path(out_dir)
    emb_files = _numbered(src / "img_emb", "img_emb_*.npy")
    meta_files = _numbered(src / "metadata", "metadata_*.parquet")
    if not emb_files:
        raise SourceError(f"{str(src)!r} has no img_emb/img_emb_N.npy files (clip-retrieval's layout)")
    if set(emb_files) != set(meta_files):
        missing = sorted(set(emb_files) ^ set(meta_files))
        raise SourceError(f"{str(src)!r}: embedding and metadata shards do not pair up (unmatched N: {missing[:5]})")
    first = np.load(emb_files[min(emb_files)], mmap_mode="r")
    if first.ndim != 2:
        raise SourceError(f"{emb_files[min(emb_files)]} is not a 2-D array of embeddings")
    dim = int(first.shape[1])
    dtype = dtype or (first.dtype.name if first.dtype.name in DTYPES else "float32")
    if dtype not in DTYPES:
        raise SourceError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    params = {"from": str(src.resolve()), "embedder": embedder, "index": index, "memory_budget": memory_budget,
              "dtype": dtype, "num_recall_queries": num_recall_queries, "seed": seed,
              "shards": {str(n): os.path.getsize(p) for n, p in emb_files.items()}}
    existing = prepare_out_dir(out_dir, params, overwrite)
    if existing is not None:
        return existing

    shards, first_id, renormalised = [], 0, 0
    for out_n, n in enumerate(sorted(emb_files)):
        vectors = np.load(emb_files[n], mmap_mode="r")
        table = pq.read_table(meta_files[n])
        if vectors.ndim != 2 or vectors.shape[1] != dim or len(vectors) != table.num_rows:
            raise SourceError(f"shard {n}: {emb_files[n].name} has shape {vectors.shape} but "
                              f"{meta_files[n].name} has {table.num_rows} rows (dim {dim} expected)")
        norms = np.linalg.norm(np.asarray(vectors, dtype=np.float32), axis=1)
        if len(norms) and np.abs(norms - 1).max() > NORM_TOLERANCE:
            vectors = normalise(vectors)
            renormalised += len(vectors)
        rows = [_map_row(r, i) for i, r in enumerate(table.to_pylist())]
        shards.append(write_shard(out_dir, out_n, np.asarray(vectors), rows, first_id=first_id, dtype=dtype,
                                  start=first_id, end=first_id + len(rows)))
        first_id += len(rows)
        emit(progress, ProgressEvent("import", out_n + 1, len(emb_files)))
    if renormalised:
        log.warning("%d imported vectors were not L2-normalised; normalised them", renormalised)
    entry = {"name": embedder or "unknown", "dim": dim, "normalized": True,
             "modalities": ["image", "text"] if embedder and embedder.startswith(("open_clip:", "hf:")) else ["image"],
             "imported_from": "clip-retrieval"}
    return finish_index(out_dir, shards, embedder_entry=entry, dtype=dtype, index=index, memory_budget=memory_budget,
                        sources=[{"path": str(src.resolve()), "kind": "clip-retrieval", "records": first_id}],
                        params=params, seed=seed, num_recall_queries=num_recall_queries, progress=progress,
                        started=t0, extra_build={"renormalised": renormalised})


def _pick(row: dict, names: tuple[str, ...]):
    for n in names:
        v = row.get(n)
        if v is not None and v == v:
            return v
    return None


def _map_row(row: dict, i: int) -> dict:
    """clip-retrieval / img2dataset metadata columns -> ours."""
    source = _pick(row, SOURCE_COLUMNS)
    width, height = _pick(row, ("width",)), _pick(row, ("height",))
    return {"key": str(_pick(row, KEY_COLUMNS) if _pick(row, KEY_COLUMNS) is not None else i),
            "source": str(source) if source is not None else None, "member": None, "offset": None, "size": None,
            "caption": _str(_pick(row, CAPTION_COLUMNS)), "url": _str(_pick(row, URL_COLUMNS)),
            "licence": _str(_pick(row, LICENCE_COLUMNS)),
            "width": int(width) if width is not None else None, "height": int(height) if height is not None else None,
            "sha256": _str(_pick(row, ("sha256",)))}


def _str(v) -> str | None:
    return None if v is None else str(v)
