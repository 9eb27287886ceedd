"""Batched embedding of corpus records: threads read + decode + preprocess, the model runs on whole batches.

Every image goes through ``retrogen.imageio.decode_image``; a bad file (unreadable, truncated, a
decompression bomb, not an image) is skipped with a reason and counted, never fatal. While the model runs
on batch ``i`` the thread pool already loads batch ``i + 1``, so decoding overlaps inference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from retrogen.fileio import sha256_bytes
from retrogen.imageio import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, BadImageError, decode_image

from .sources import Record

log = logging.getLogger(__name__)


@dataclass
class EmbeddedShard:
    """Vectors and metadata rows of the records that decoded, and what was skipped (with reasons)."""

    vectors: np.ndarray
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def load_record(record: Record, preprocess: Callable, max_pixels: int, max_bytes: int):
    """-> (CHW array, metadata row) or (None, skipped entry): one record read, decoded and preprocessed (the local
    and the Ray engine both call it, so a bad file is skipped with the same reason and detail by either)."""
    try:
        data = record.read()
    except OSError as e:
        return None, {"source": record.source, "path": record.member or record.source, "reason": "unreadable",
                      "detail": str(e)[:200]}
    try:
        image = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
        array = preprocess(image)
    except BadImageError as e:  # its detail carries no per-run object address: manifests stay reproducible
        return None, {"source": record.source, "path": record.member or record.source, "reason": e.reason,
                      "detail": e.detail[:200]}
    except Exception as e:  # a preprocess failure on one odd image must not abort a corpus build
        return None, {"source": record.source, "path": record.member or record.source,
                      "reason": "preprocess_failed", "detail": f"{type(e).__name__}: {e}"[:200]}
    row = {"key": record.key, "source": record.source, "member": record.member, "offset": record.offset,
           "size": len(data), "caption": record.caption, "url": record.url, "licence": record.licence,
           "width": image.width, "height": image.height, "sha256": sha256_bytes(data), **record.extra}
    return array, row


class ShardEmbedder:
    """Embeds lists of records with one embedder and one thread pool (reused across shards)."""

    def __init__(self, embedder, *, batch_size: int = 32, num_workers: int = 2,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES):
        self.embedder = embedder
        self.batch_size = max(1, int(batch_size))
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(num_workers)), thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _submit(self, batch: list[Record]) -> list[Future]:
        pre = self.embedder.preprocess
        return [self._pool.submit(load_record, r, pre, self.max_pixels, self.max_bytes) for r in batch]

    def __call__(self, records: list[Record], on_batch: Callable[[int], None] | None = None) -> EmbeddedShard:
        """Embed ``records`` in order; ``on_batch(n)`` is called after each batch of ``n`` records."""
        batches = [records[i : i + self.batch_size] for i in range(0, len(records), self.batch_size)]
        out = EmbeddedShard(np.zeros((0, self.embedder.dim), np.float32))
        vecs: list[np.ndarray] = []
        pending = self._submit(batches[0]) if batches else []
        for i, batch in enumerate(batches):
            results = [f.result() for f in pending]
            pending = self._submit(batches[i + 1]) if i + 1 < len(batches) else []
            arrays = []
            for array, info in results:
                if array is None:
                    log.warning("skipping %s: %s", info["path"], info["reason"])
                    out.skipped.append(info)
                else:
                    arrays.append(array)
                    out.rows.append(info)
            if arrays:
                v = np.asarray(self.embedder.embed_preprocessed(np.stack(arrays)), dtype=np.float32)
                vecs.append(v)
            if on_batch is not None:
                on_batch(len(batch))
        if vecs:
            out.vectors = np.concatenate(vecs)
        return out
