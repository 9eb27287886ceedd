"""Corpus sources: image folders, webdataset tar shards (img2dataset's layout), parquet/CSV listings.

Scanning a source yields lightweight :class:`Record`s (no pixels) in a deterministic order: sources in the
order given, folders in sorted path order, tars in member order, listings in row order. Each record knows
how to read its own bytes (a file, or a tar member at its recorded data offset), so embedding workers can
load them lazily and the index can serve them later without re-scanning a tar.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrogen.fileio import read_source_bytes
from retrogen.imageio import IMAGE_EXTENSIONS, is_image_path

from .errors import SourceError

log = logging.getLogger(__name__)

WDS_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
PATH_COLUMNS = ("path", "image_path", "filepath", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "TEXT")
URL_COLUMNS = ("url", "URL")
LICENCE_COLUMNS = ("licence", "license", "LICENSE", "LICENCE")
KEY_COLUMNS = ("key", "id")
#: the optional metadata columns (index_directory.OPTIONAL_COLUMNS) and the names corpora give them:
#: LAION's parquet (punsafe, pwatermark, NSFW), img2dataset's json (status), aesthetic predictors' scores
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {
    "punsafe": ("punsafe", "PUNSAFE"), "pwatermark": ("pwatermark", "PWATERMARK"), "nsfw": ("NSFW", "nsfw"),
    "status": ("status",), "opt_out": ("opt_out", "opted_out", "OPT_OUT"),
    "aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
}


@dataclass(frozen=True)
class Record:
    """One corpus item: where its bytes are, and what is known about it before decoding."""

    key: str
    source: str  # file path, tar path, or URI
    member: str | None = None  # tar member name
    offset: int | None = None  # byte offset of the member's data in the tar
    size: int | None = None
    caption: str | None = None
    url: str | None = None
    licence: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # optional columns (extra_columns), by canonical name

    def read(self) -> bytes:
        """The stored bytes (raises OSError when the file is gone, or a tar member is short).

        A whole file is read as it is now; only a tar member, addressed by offset, must have its recorded size.
        """
        if self.offset is None:
            return read_source_bytes(self.source)
        return read_source_bytes(self.source, offset=self.offset, size=self.size)


@dataclass(frozen=True)
class SourceSpec:
    path: str
    kind: str  # folder | webdataset | listing


def resolve_sources(specs: list[str]) -> list[SourceSpec]:
    """Expand ``--source`` arguments (paths, globs, ``{00000..00009}`` braces) into typed sources.

    Raises:
        SourceError: nothing matches, or a path is of no known kind.
    """
    from braceexpand import braceexpand

    if not specs:
        raise SourceError("no source given: pass at least one --source (folder, .tar, .parquet or .csv)")
    out: list[SourceSpec] = []
    for spec in specs:
        paths: list[str] = []
        for pattern in braceexpand(str(spec)):
            if "://" in pattern:
                raise SourceError(f"source {pattern!r}: remote sources are not supported yet; copy them locally")
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            paths.extend(matches)
        if not paths:
            raise SourceError(f"source {spec!r} matches no file")
        for p in paths:
            out.append(_classify(p))
    return out


def _classify(p: str) -> SourceSpec:
    path = Path(p)
    if not path.exists():
        raise SourceError(f"source {p!r} does not exist")
    if path.is_dir():
        has_images = any(is_image_path(f) for _, _, files in os.walk(path) for f in files)
        if not has_images and any(path.glob("*.tar")):
            raise SourceError(f"source {p!r} holds .tar shards, not images: pass them as {p}/*.tar")
        return SourceSpec(str(path.resolve()), "folder")
    name = path.name.lower()
    if name.endswith(".tar"):
        return SourceSpec(str(path.resolve()), "webdataset")
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise SourceError(f"source {p!r} is a compressed tar; members must be addressable by offset, "
                          "so use uncompressed .tar shards (as img2dataset writes them)")
    if name.endswith((".parquet", ".csv")):
        return SourceSpec(str(path.resolve()), "listing")
    raise SourceError(f"source {p!r} is neither a folder, a .tar shard, nor a .parquet/.csv listing")


def iter_records(spec: SourceSpec) -> Iterator[Record]:
    if spec.kind == "folder":
        return _folder_records(spec.path)
    if spec.kind == "webdataset":
        return _tar_records(spec.path)
    return _listing_records(spec.path)


def scan_sources(specs: list[SourceSpec]) -> tuple[list[Record], list[dict]]:
    """All records of all sources in order, and one summary dict per source for the manifest."""
    records: list[Record] = []
    summaries = []
    for spec in specs:
        before = len(records)
        records.extend(iter_records(spec))
        summaries.append({"path": spec.path, "kind": spec.kind, "records": len(records) - before})
        log.info("source %s (%s): %d records", spec.path, spec.kind, len(records) - before)
    return records, summaries


def records_digest(records: list[Record]) -> str:
    """A fingerprint of the corpus as scanned: a resumed build refuses a corpus that changed meanwhile."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.source}\0{r.member}\0{r.offset}\0{r.size}\n".encode())
    return h.hexdigest()


def _folder_records(root: str) -> Iterator[Record]:
    base = Path(root)
    for dirpath, dirnames, files in os.walk(base):
        dirnames.sort()
        for f in sorted(files):
            if not is_image_path(f):
                continue
            p = Path(dirpath) / f
            rel = p.relative_to(base).as_posix()
            yield Record(key=os.path.splitext(rel)[0], source=str(p), size=p.stat().st_size)


def _tar_records(path: str) -> Iterator[Record]:
    """Group a webdataset shard's members by key (webdataset's own rule) into image + caption + json."""
    from webdataset.tariterators import base_plus_ext

    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"source {path!r} is not a readable tar: {e}") from None
    with tar:
        group_key: str | None = None
        group: dict[str, tarfile.TarInfo] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if key != group_key and group_key is not None:
                yield from _tar_group(tar, path, group_key, group)
                group = {}
            group_key = key
            group[ext.lower()] = member
        if group_key is not None:
            yield from _tar_group(tar, path, group_key, group)


def _tar_group(tar: tarfile.TarFile, path: str, key: str, group: dict[str, tarfile.TarInfo]) -> Iterator[Record]:
    image = next((group[e] for e in WDS_IMAGE_EXTS if e in group), None)
    if image is None:
        return  # a key without an image (img2dataset writes only successes; anything else is not ours)
    caption = url = licence = None
    meta: Any = None
    if "txt" in group:
        caption = tar.extractfile(group["txt"]).read().decode("utf-8", "replace").strip()
    if "json" in group:
        try:
            meta = json.loads(tar.extractfile(group["json"]).read())
        except (ValueError, UnicodeDecodeError):
            meta = {}
        if isinstance(meta, dict):
            url = first_text(meta, URL_COLUMNS)
            licence = first_text(meta, LICENCE_COLUMNS)
            caption = caption if caption is not None else first_text(meta, CAPTION_COLUMNS)
    yield Record(key=os.path.basename(key), source=path, member=image.name, offset=image.offset_data,
                 size=image.size, caption=caption, url=url, licence=licence,
                 extra=extra_columns(meta) if isinstance(meta, dict) else {})


def first_present(row: dict, names: tuple[str, ...]) -> Any:
    """The value of the first of ``names`` that ``row`` has (None and NaN count as absent), else None."""
    for n in names:
        v = row.get(n)
        if v is not None and v == v:  # skips NaN
            return v
    return None


def first_text(row: dict, names: tuple[str, ...]) -> str | None:
    """:func:`first_present` as a string."""
    v = first_present(row, names)
    return None if v is None else str(v)


def extra_columns(row: dict) -> dict[str, Any]:
    """The optional columns ``row`` has, typed; a value that does not parse is left out (as unknown)."""
    out: dict[str, Any] = {}
    for name, aliases in EXTRA_COLUMNS.items():
        v = first_present(row, aliases)
        if v is None:
            continue
        try:
            if name in ("punsafe", "pwatermark", "aesthetic"):
                v = float(v)
                if v != v or v in (float("inf"), float("-inf")):
                    continue
            elif name == "opt_out":
                v = _as_bool(v)
            else:
                v = str(v)
        except (TypeError, ValueError):
            continue
        out[name] = v
    return out


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "y", "t"):
        return True
    if text in ("0", "false", "no", "n", "f", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _listing_records(path: str) -> Iterator[Record]:
    if path.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        read = lambda: pacsv.read_csv(path)  # noqa: E731
    else:
        import pyarrow.parquet as pq

        read = lambda: pq.read_table(path)  # noqa: E731
    try:
        table = read()
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants
        raise SourceError(f"listing {path!r} is unreadable: {e}") from None
    col = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if col is None:
        raise SourceError(f"listing {path!r} needs a path column (one of {', '.join(PATH_COLUMNS)}); "
                          f"it has {', '.join(table.column_names)}")
    base = Path(path).parent
    for i, row in enumerate(table.to_pylist()):
        raw = row.get(col)
        if raw is None:
            continue
        p = str(raw)
        if "://" not in p and not os.path.isabs(p):
            p = str((base / p).resolve())
        size = os.path.getsize(p) if "://" not in p and os.path.isfile(p) else None
        key = first_text(row, KEY_COLUMNS) or f"{Path(path).stem}/{i:09d}"
        yield Record(key=key, source=p, size=size, caption=first_text(row, CAPTION_COLUMNS),
                     url=first_text(row, URL_COLUMNS), licence=first_text(row, LICENCE_COLUMNS),
                     extra=extra_columns(row))
