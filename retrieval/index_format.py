"""The index-directory contract (docs/architecture.md "Index directory"): names, manifest, atomic writes.

```
DIR/manifest.json                    written last: its presence means the index is complete
DIR/img_emb/img_emb_{N}.npy          (rows, dim) float16/float32, L2-normalised, N zero-padded to 4 digits
DIR/metadata/metadata_{N}.parquet    row-aligned with the shard
DIR/image.index                      FAISS index over all rows in shard order (row id = global row number)
```

This is clip-retrieval's layout plus a manifest. Readers accept any zero padding of ``N``; writers use 4 digits.
Every file is written to a temp file in the same folder and moved into place with ``os.replace``, so a
crash never leaves half a file under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import IndexFormatError, IndexNotFoundError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "image.index"
EMB_DIR = "img_emb"
META_DIR = "metadata"
DTYPES = ("float16", "float32")

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_EMB_RE = re.compile(r"^img_emb_(\d+)\.npy$")
_META_RE = re.compile(r"^metadata_(\d+)\.parquet$")

#: Metadata columns, in order (the contract's types; nullable where the contract says so).
METADATA_COLUMNS: dict[str, str] = {
    "id": "int64", "key": "string", "source": "string", "member": "string", "offset": "int64",
    "size": "int64", "caption": "string", "url": "string", "licence": "string", "width": "int32",
    "height": "int32", "sha256": "string",
}


def metadata_schema():
    """The pyarrow schema of ``metadata_{N}.parquet`` (imported lazily: pyarrow is not needed to read a manifest)."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, typ)()) for name, typ in METADATA_COLUMNS.items()])


class Manifest(BaseModel):
    """``manifest.json``. Sub-objects stay plain dicts so that new keys need no format bump."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    index_id: str
    embedder: dict[str, Any]  # the embedder's manifest_entry(): name, dim, normalized, modalities, ...
    metric: str = "ip"
    dtype: str
    count: int
    dim: int
    faiss: dict[str, Any]  # factory, kind (flat|hnsw|ivfpq|custom), search_defaults, rerank_k_factor
    recall: dict[str, Any] | None = None  # recall_at_10, num_queries, method; None for exact indexes
    shards: list[dict[str, Any]] = Field(default_factory=list)  # [{emb, meta, rows}]
    sources: list[dict[str, Any]] = Field(default_factory=list)
    skipped: dict[str, Any] = Field(default_factory=lambda: {"count": 0, "files": []})
    build: dict[str, Any] = Field(default_factory=dict)


def shard_name(n: int) -> str:
    return f"{n:04d}"


def emb_path(directory: str | os.PathLike, n: int) -> Path:
    return Path(directory) / EMB_DIR / f"img_emb_{shard_name(n)}.npy"


def meta_path(directory: str | os.PathLike, n: int) -> Path:
    return Path(directory) / META_DIR / f"metadata_{shard_name(n)}.parquet"


def list_shard_files(directory: str | os.PathLike) -> list[tuple[int, Path | None, Path | None]]:
    """``[(N, emb_path or None, meta_path or None)]`` sorted by N, whatever the zero padding."""
    directory = Path(directory)
    found: dict[int, list[Path | None]] = {}
    for sub, rx, slot in ((EMB_DIR, _EMB_RE, 0), (META_DIR, _META_RE, 1)):
        if (directory / sub).is_dir():
            for p in (directory / sub).iterdir():
                m = rx.match(p.name)
                if m:
                    found.setdefault(int(m.group(1)), [None, None])[slot] = p
    return [(n, e, m) for n, (e, m) in sorted(found.items())]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is moved to ``path`` with ``os.replace``.

    ``suffix`` keeps an extension some writers insist on (``np.save`` appends ``.npy`` otherwise).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; an index is read by other users (the service)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_temp_files(directory: str | os.PathLike) -> int:
    """Delete leftovers of interrupted atomic writes (``.NAME.*.tmp*``); returns how many."""
    n = 0
    for sub in (Path(directory), Path(directory) / EMB_DIR, Path(directory) / META_DIR):
        if sub.is_dir():
            for p in sub.glob(".*.tmp*"):
                p.unlink(missing_ok=True)
                n += 1
    return n


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically; call it last, after every shard and the FAISS index are in place."""
    write_json(Path(directory) / MANIFEST_FILE, manifest.model_dump(mode="json"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Load and check ``DIR/manifest.json``.

    Raises:
        IndexNotFoundError: no such directory, or no manifest (an incomplete or interrupted build).
        IndexFormatError: unreadable JSON, another format version, or missing/invalid fields.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexNotFoundError(f"index directory {str(directory)!r} does not exist")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise IndexNotFoundError(
            f"{str(directory)!r} has no {MANIFEST_FILE}: not an index, or its build did not finish "
            "(re-run `retrogen index build` with the same arguments to resume)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise IndexFormatError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format_version {version!r}; this retrogen reads version {FORMAT_VERSION} "
            "(rebuild the index, or use the retrogen version that wrote it)"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise IndexFormatError(f"{path}: invalid field {where!r}: {first['msg']}") from None
    if manifest.dtype not in DTYPES:
        raise IndexFormatError(f"{path}: dtype must be one of {DTYPES}, got {manifest.dtype!r}")
    if sum(int(s.get("rows", 0)) for s in manifest.shards) != manifest.count:
        raise IndexFormatError(f"{path}: shard rows do not add up to count {manifest.count}")
    return manifest
