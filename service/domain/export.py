"""Job results out: a JSON/JSONL manifest with stable image URLs, and tar streams (ImageFolder or webdataset).

Results are immutable content-addressed trees, so every URL here is stable. Tars are produced as a stream,
one member at a time, never built in memory or on disk, and byte-stable: members in provenance order with a
fixed mtime, owner and mode, so downloading a result twice gives the same bytes (checksums and caches hold).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

from retrogen.errors import InvalidInputError, RetrogenError
from retrogen.outputs import PROVENANCE_FILE, SUMMARY_FILE, parse_records, parse_summary

from .storage import Store

EXPORT_FORMATS = ("imagefolder", "webdataset")


def read_records(store: Store, key: str) -> list[dict[str, Any]]:
    """A stored result's provenance records (NaN/Infinity served as null)."""
    return parse_records(store.read_bytes(key, PROVENANCE_FILE))


def read_summary(store: Store, key: str) -> dict[str, Any] | None:
    """A stored result's summary, or None when it is missing or unreadable."""
    try:
        return parse_summary(store.read_bytes(key, SUMMARY_FILE))
    except (RetrogenError, ValueError):
        return None


def image_url(job_id: str, file: str) -> str:
    return f"/v1/jobs/{job_id}/images/{file}"


def manifest_items(store: Store, key: str, job_id: str) -> list[dict[str, Any]]:
    return [{"url": image_url(job_id, r["file"]), "label": r["label"], "file": r["file"], "provenance": r}
            for r in read_records(store, key)]


def jsonl_stream(items: list[dict[str, Any]]) -> Iterator[bytes]:
    for item in items:
        yield (json.dumps(item, default=str) + "\n").encode()


class _Sink(io.RawIOBase):
    """A write-only file that tarfile writes into and the generator drains after each member."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.chunks.append(bytes(b))
        return len(b)

    def drain(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)  # uid/gid 0, no user or group name: nothing of the serving host
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def tar_stream(store: Store, key: str, *, fmt: str = "imagefolder", shard: int | None = None,
               shard_size: int = 10_000, mtime: float = 0) -> Iterator[bytes]:
    """The result as one tar; every member has mtime ``mtime`` (the job's finish time), so it is byte-stable.

    ``imagefolder``: ``<label>/<file>`` + ``provenance.jsonl`` + ``summary.json``.
    ``webdataset``: samples ``{key}.{ext}`` + ``{key}.json`` (provenance) + ``{key}.cls`` (class index), keys
    in provenance order; ``shard``/``shard_size`` select one shard of ``shard_size`` samples.
    """
    if fmt not in EXPORT_FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    records = read_records(store, key)
    if fmt == "webdataset" and shard is not None:
        if shard < 0 or shard * shard_size >= max(1, len(records)):
            raise InvalidInputError(f"shard {shard} is out of range ({num_shards(len(records), shard_size)} shards)")
    classes = sorted({r["label"] for r in records})
    stamp = max(0, int(mtime))

    def gen() -> Iterator[bytes]:
        sink = _Sink()
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if fmt == "imagefolder":
                for r in records:
                    _add(tar, r["file"], store.read_bytes(key, r["file"]), stamp)
                    yield sink.drain()
                for name in (PROVENANCE_FILE, SUMMARY_FILE):
                    _add(tar, name, store.read_bytes(key, name), stamp)
            else:
                start = (shard or 0) * shard_size
                stop = start + shard_size if shard is not None else len(records)
                for i, r in enumerate(records[start:stop], start=start):
                    sample = f"{i:08d}"
                    ext = r["file"].rsplit(".", 1)[-1].lower()
                    _add(tar, f"{sample}.{ext}", store.read_bytes(key, r["file"]), stamp)
                    _add(tar, f"{sample}.json", json.dumps(r, default=str).encode(), stamp)
                    _add(tar, f"{sample}.cls", str(classes.index(r["label"])).encode(), stamp)
                    yield sink.drain()
        yield sink.drain()

    return gen()


def num_shards(count: int, shard_size: int) -> int:
    return max(1, -(-count // shard_size))
