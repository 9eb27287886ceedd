"""``retrogen index import``: an index from clip-retrieval's output (``img_emb/*.npy`` + ``metadata/*.parquet``).

Users with precomputed LAION-style embeddings need not re-embed: the shards are copied into our layout
(4-digit names, our metadata columns, normalised only if they are not already), then the FAISS index and
manifest are built exactly as ``build_index`` does. clip-retrieval's layout is ours without the manifest, so
its shards are listed by :class:`IndexDirectory` too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from retrogen.progress import ProgressEvent, ProgressFn, emit
from retrogen.retrieval.embedders import l2_normalize
from retrogen.retrieval.index_directory import DTYPES, Dtype, IndexDirectory, Manifest, ShardInfo

from .build import finish_index, open_output
from .config import IndexBuildConfig
from .errors import SourceError
from .sources import (
    CAPTION_COLUMNS,
    KEY_COLUMNS,
    LICENCE_COLUMNS,
    URL_COLUMNS,
    extra_columns,
    first_present,
    first_text,
)

log = logging.getLogger(__name__)

SOURCE_COLUMNS = ("image_path", "path", "filepath", "url")
NORM_TOLERANCE = 1e-2  # float16 vectors are normalised to about 1e-3; beyond this they were not normalised


def import_clip_retrieval(from_dir: str | os.PathLike, out_dir: str | os.PathLike, *, embedder: str | None = None,
                          config: IndexBuildConfig | None = None, dtype: Dtype | None = None,
                          overwrite: bool = False, progress: ProgressFn | None = None,
                          work_dir: str | os.PathLike | None = None) -> Manifest:
    """Build an index directory from clip-retrieval embeddings and metadata without re-embedding.

    ``out_dir`` may be an fsspec URL, staged in ``work_dir`` and published as ``build_index`` does (an
    import is not resumed per shard: a rerun copies and uploads every shard again).

    Args:
        embedder: the name of the embedder that made the vectors (e.g. ``open_clip:ViT-B-32:openai``),
            recorded in the manifest so queries are checked against it; ``None`` records ``unknown``.
        config: index type, memory budget, recall queries, seed; its embedding settings do not apply.
        dtype: stored dtype; default: the input's (float16 or float32).

    Raises:
        SourceError: no shards, unmatched or misaligned embedding/metadata files.
    """
    t0 = time.perf_counter()
    src = Path(from_dir)
    pairs = _shard_pairs(src)
    first = np.load(pairs[0][1], mmap_mode="r")
    if first.ndim != 2:
        raise SourceError(f"{pairs[0][1]} is not a 2-D array of embeddings")
    dim = int(first.shape[1])
    dtype = dtype or (first.dtype.name if first.dtype.name in DTYPES else "float32")
    if dtype not in DTYPES:
        raise SourceError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = (config or IndexBuildConfig()).replace(dtype=dtype)
    params = {"from": str(src.resolve()), "embedder": embedder, **config.output_parameters(embedding=False),
              "shards": {str(n): os.path.getsize(emb) for n, emb, _ in pairs}}
    directory, existing = open_output(out_dir, params, overwrite=overwrite, work_dir=work_dir, progress=progress,
                                      shards=len(pairs))
    if existing is not None:
        return existing

    shards, renormalised = _copy_shards(directory, pairs, dim=dim, dtype=dtype, progress=progress)
    entry = {"name": embedder or "unknown", "dim": dim, "normalized": True,
             "modalities": ["image", "text"] if embedder and embedder.startswith(("open_clip:", "hf:")) else ["image"],
             "imported_from": "clip-retrieval"}
    records = sum(s.rows for s in shards)
    return finish_index(directory, shards, embedder_entry=entry, config=config,
                        sources=[{"path": str(src.resolve()), "kind": "clip-retrieval", "records": records}],
                        params=params, progress=progress, started=t0, extra_build={"renormalised": renormalised})


def _shard_pairs(src: Path) -> list[tuple[int, Path, Path]]:
    """``[(N, img_emb file, metadata file)]`` in shard order; every shard must have both."""
    files = IndexDirectory(src).list_shard_files()
    if not any(emb is not None for _, emb, _ in files):
        raise SourceError(f"{str(src)!r} has no img_emb/img_emb_N.npy files (clip-retrieval's layout)")
    unmatched = [n for n, emb, meta in files if emb is None or meta is None]
    if unmatched:
        raise SourceError(f"{str(src)!r}: embedding and metadata shards do not pair up (unmatched N: {unmatched[:5]})")
    return [(n, emb, meta) for n, emb, meta in files]


def _copy_shards(directory: IndexDirectory, pairs: list[tuple[int, Path, Path]], *, dim: int, dtype: Dtype,
                 progress: ProgressFn | None) -> tuple[list[ShardInfo], int]:
    """Write each input shard as ours (renumbered from 0); returns the shards and how many rows were renormalised."""
    import pyarrow.parquet as pq

    shards, first_id, renormalised = [], 0, 0
    for out_n, (n, emb, meta) in enumerate(pairs):
        vectors = np.load(emb, mmap_mode="r")
        table = pq.read_table(meta)
        if vectors.ndim != 2 or vectors.shape[1] != dim or len(vectors) != table.num_rows:
            raise SourceError(f"shard {n}: {emb.name} has shape {vectors.shape} but "
                              f"{meta.name} has {table.num_rows} rows (dim {dim} expected)")
        norms = np.linalg.norm(np.asarray(vectors, dtype=np.float32), axis=1)
        if len(norms) and np.abs(norms - 1).max() > NORM_TOLERANCE:
            vectors = l2_normalize(vectors)
            renormalised += len(vectors)
        rows = [_map_row(r, i) for i, r in enumerate(table.to_pylist())]
        shards.append(directory.write_shard(out_n, np.asarray(vectors), rows, first_id=first_id, dtype=dtype,
                                            start=first_id, end=first_id + len(rows)))
        first_id += len(rows)
        emit(progress, ProgressEvent("import", out_n + 1, len(pairs)))
    if renormalised:
        log.warning("%d imported vectors were not L2-normalised; normalised them", renormalised)
    return shards, renormalised


def _map_row(row: dict, i: int) -> dict:
    """clip-retrieval / img2dataset metadata columns -> ours."""
    key = first_text(row, KEY_COLUMNS)
    width, height = first_present(row, ("width",)), first_present(row, ("height",))
    return {"key": key if key is not None else str(i), "source": first_text(row, SOURCE_COLUMNS),
            "member": None, "offset": None, "size": None, "caption": first_text(row, CAPTION_COLUMNS),
            "url": first_text(row, URL_COLUMNS), "licence": first_text(row, LICENCE_COLUMNS),
            "width": int(width) if width is not None else None, "height": int(height) if height is not None else None,
            "sha256": first_text(row, ("sha256",)), **extra_columns(row)}
