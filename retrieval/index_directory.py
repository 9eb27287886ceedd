"""The index directory on disk: its one owner, :class:`IndexDirectory` (docs/architecture.md "Index directory").

```
DIR/manifest.json                    written last: its presence means the index is complete
DIR/img_emb/img_emb_{N}.npy          (rows, dim) float16/float32, L2-normalised, N zero-padded to 4 digits
DIR/metadata/metadata_{N}.parquet    row-aligned with the shard
DIR/image.index                      FAISS index over all rows in shard order (row id = global row number)
DIR/image.ivfdata                    only for an on-disk IVF index: its inverted lists (memory-mapped by faiss)
DIR/faiss_parts/                     while an on-disk index is built: the trained index and per-shard parts
DIR/captions.sqlite                  when the corpus has captions: SQLite FTS5 over them (rowid = row id)
DIR/build_state.json                 while a build runs: the arguments it was started with (for resume)
```

This is clip-retrieval's layout plus a manifest. Readers accept any zero padding of ``N``; writers use 4
digits. Every file is written through :func:`retrogen.fileio.atomic_path`, so a crash never leaves half a
file under a final name. A shard's parquet file is its commit: it is written after the vectors and carries,
in its schema metadata, the input-record range it covers and the files it skipped, so a resumed build keeps
exactly the shards whose two files agree.

The builder (``index_builder``) writes only through this class, and :class:`~retrogen.retrieval.index.CorpusIndex`
reads only through it. A copy of the layout under a URL (an object store) is published and fetched by
``index_store``, which copies only the names :func:`is_layout_name` accepts. numpy, pyarrow and faiss load on
first use: the CLI imports this module for its names, and reading a manifest needs none of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrogen.fileio import atomic_path, atomic_write_bytes, atomic_write_json, remove_temp_files
from retrogen.provenance import now_iso

from .errors import IndexFormatError, IndexNotFoundError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "image.index"
#: the inverted lists of an on-disk IVF index (faiss ``OnDiskInvertedLists``); ``image.index`` refers to it by name
INDEX_DATA_FILE = "image.ivfdata"
FAISS_WORK_DIR = "faiss_parts"
STATE_FILE = "build_state.json"
CAPTIONS_FILE = "captions.sqlite"
#: ``image.index`` files larger than this are memory-mapped by default, smaller ones read into RAM
MMAP_MIN_BYTES = 2 * 1024**3
#: Porter stemming over unicode61 words: "cats" finds "cat"; diacritics folded ("café" finds "cafe")
CAPTIONS_TOKENIZER = "porter unicode61 remove_diacritics 2"
EMB_DIR = "img_emb"
META_DIR = "metadata"

Dtype = Literal["float16", "float32"]
DTYPES: tuple[str, ...] = get_args(Dtype)

_EMB_RE = re.compile(r"^img_emb_(\d+)\.npy$")
_META_RE = re.compile(r"^metadata_(\d+)\.parquet$")
#: the files of the layout outside the shard folders (``faiss_parts/`` never leaves the machine that builds)
TOP_FILES = (MANIFEST_FILE, INDEX_FILE, INDEX_DATA_FILE, CAPTIONS_FILE, STATE_FILE)
# Schema-metadata keys of a shard's parquet file (its commit record).
_KV_RANGE = b"retrogen.records"
_KV_SKIPPED = b"retrogen.skipped"

#: Metadata columns, in order (the contract's types; nullable where the contract says so).
METADATA_COLUMNS: dict[str, str] = {
    "id": "int64", "key": "string", "source": "string", "member": "string", "offset": "int64",
    "size": "int64", "caption": "string", "url": "string", "licence": "string", "width": "int32",
    "height": "int32", "sha256": "string",
}
#: Columns a corpus may carry about each item (LAION's safety and watermark scores, img2dataset's status,
#: a rights-holder opt-out flag, an aesthetic score). Builds before they existed lack them: readers see nulls,
#: so the format version stays 1. The manifest's ``metadata.non_null`` counts each one's values.
OPTIONAL_COLUMNS: dict[str, str] = {
    "punsafe": "float32", "pwatermark": "float32", "nsfw": "string", "status": "string", "opt_out": "bool_",
    "aesthetic": "float32",
}


def metadata_schema():
    """The pyarrow schema of ``metadata_{N}.parquet`` (pyarrow loads lazily: a manifest read needs none)."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, typ)()) for name, typ in (METADATA_COLUMNS | OPTIONAL_COLUMNS).items()])


class Manifest(BaseModel):
    """``manifest.json``. Sub-objects stay plain dicts so that new keys need no format bump."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    index_id: str
    embedder: dict[str, Any]  # the embedder's manifest_entry(): name, dim, normalized, modalities, ...
    metric: str = "ip"
    dtype: Dtype
    count: int
    dim: int
    faiss: dict[str, Any]  # factory, kind (flat|hnsw|ivfpq|custom), search_defaults, rerank_k_factor
    recall: dict[str, Any] | None = None  # recall_at_10, num_queries, method; None for exact indexes
    shards: list[dict[str, Any]] = Field(default_factory=list)  # [{emb, meta, rows}]
    sources: list[dict[str, Any]] = Field(default_factory=list)
    skipped: dict[str, Any] = Field(default_factory=lambda: {"count": 0, "files": []})
    build: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)  # {"non_null": {optional column: count}}
    captions: dict[str, Any] | None = None  # the caption full-text index: {"file", "rows", "tokenizer"}

    @property
    def version(self) -> str | None:
        """When this build finished: what provenance calls the index version."""
        return self.build.get("created")

    def has_column(self, name: str) -> bool:
        """Whether any row has a value in optional metadata column ``name`` (older builds record none)."""
        return bool(self.metadata.get("non_null", {}).get(name))


def is_layout_name(name: str) -> bool:
    """Whether ``name`` (relative, ``/``-separated) is a file of the layout. Anything else (``..``, an absolute
    path, a stray object) is never read or written by a copy to or from another store (``index_store``)."""
    folder, _, base = name.rpartition("/")
    if not folder:
        return name in TOP_FILES
    return (folder == EMB_DIR and bool(_EMB_RE.match(base))) or (folder == META_DIR and bool(_META_RE.match(base)))


def pair_shard_names(names: Iterable[str]) -> list[tuple[int, str | None, str | None]]:
    """``[(N, embedding name or None, metadata name or None)]`` of the shard files among ``names``, sorted by N."""
    found: dict[int, list[str | None]] = {}
    for name in names:
        folder, _, base = name.rpartition("/")
        for sub, rx, slot in ((EMB_DIR, _EMB_RE, 0), (META_DIR, _META_RE, 1)):
            m = rx.match(base) if folder == sub else None
            if m:
                found.setdefault(int(m.group(1)), [None, None])[slot] = name
    return [(n, e, m) for n, (e, m) in sorted(found.items())]


def _emb_name(n: int) -> str:
    return f"{EMB_DIR}/img_emb_{n:04d}.npy"


def _meta_name(n: int) -> str:
    return f"{META_DIR}/metadata_{n:04d}.parquet"


@dataclass
class ShardInfo:
    """A shard written by a build: its number, rows, and the input records it covers."""

    n: int
    rows: int
    start: int  # first input record covered (inclusive)
    end: int  # last input record covered (exclusive)
    skipped: list[dict] = field(default_factory=list)

    def manifest_entry(self) -> dict:
        return {"emb": _emb_name(self.n), "meta": _meta_name(self.n), "rows": self.rows}


def take_rows(arrays: list[np.ndarray], shard_of: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Rows ``local[i]`` of ``arrays[shard_of[i]]``, in the order given, in the arrays' dtype.

    Each shard is read in sorted row order: kinder to the page cache of a memory-mapped file.
    """
    import numpy as np

    dtype, dim = (arrays[0].dtype, arrays[0].shape[1]) if arrays else (np.float32, 0)
    out = np.empty((len(shard_of), dim), dtype=dtype)
    for s in np.unique(shard_of):
        sel = shard_of == s
        rows = local[sel]
        order = np.argsort(rows, kind="stable")
        got = np.empty((len(rows), dim), dtype)
        got[order] = arrays[s][rows[order]]
        out[sel] = got
    return out


class IndexDirectory:
    """An index directory: reads and writes every file of it (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike, *, name: str | None = None):
        """``name``: what the index is called (its ``index_id`` starts with it); default: the folder's name."""
        self.path = Path(path)
        self.name = name or self.path.name

    def __repr__(self) -> str:
        return f"IndexDirectory({str(self.path)!r})"

    def emb_path(self, n: int) -> Path:
        return self.path / _emb_name(n)

    def meta_path(self, n: int) -> Path:
        return self.path / _meta_name(n)

    def is_empty(self) -> bool:
        """True when the folder is missing or holds nothing at all."""
        return not self.path.exists() or not any(self.path.iterdir())

    # -- manifest ---------------------------------------------------------------------------------------------

    def has_manifest(self) -> bool:
        return (self.path / MANIFEST_FILE).exists()

    def write_manifest(self, manifest: Manifest) -> None:
        """Write ``manifest.json``; call it last, after every shard and the FAISS index are in place."""
        atomic_write_json(self.path / MANIFEST_FILE, manifest.model_dump(mode="json"))

    def read_manifest(self) -> Manifest:
        """Load and check ``manifest.json``.

        Raises:
            IndexNotFoundError: no such directory, or no manifest (an incomplete or interrupted build).
            IndexFormatError: unreadable JSON, another format version, or missing/invalid fields.
        """
        if not self.path.is_dir():
            raise IndexNotFoundError(f"index directory {str(self.path)!r} does not exist")
        path = self.path / MANIFEST_FILE
        if not path.is_file():
            raise IndexNotFoundError(
                f"{str(self.path)!r} has no {MANIFEST_FILE}: not an index, or its build did not finish "
                "(re-run `retrogen index build` with the same arguments to resume)"
            )
        return parse_manifest(_read_json_object(path), str(path))

    # -- shards: writing and the resume scan -------------------------------------------------------------------

    def write_shard(self, n: int, vectors: np.ndarray, rows: list[dict], *, first_id: int, dtype: Dtype,
                    start: int, end: int, skipped: list[dict] | None = None) -> ShardInfo:
        """Write shard ``n``: vectors (cast to ``dtype``), then metadata (ids from ``first_id``) as the commit.

        ``start:end`` is the range of input records the shard covers (some may be ``skipped``).
        """
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if len(vectors) != len(rows):
            raise ValueError(f"shard {n}: {len(vectors)} vectors but {len(rows)} metadata rows")
        skipped = list(skipped or [])
        with atomic_path(self.emb_path(n), suffix=".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(vectors, dtype=dtype))
        schema = metadata_schema()
        columns = {name: [r.get(name) for r in rows] for name in schema.names if name != "id"}
        columns["id"] = list(range(first_id, first_id + len(rows)))
        table = pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)
        table = table.replace_schema_metadata({_KV_RANGE: f"{start}:{end}".encode(),
                                               _KV_SKIPPED: json.dumps(skipped).encode()})
        with atomic_path(self.meta_path(n), suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
        return ShardInfo(n, len(rows), start, end, skipped)

    def list_shard_files(self) -> list[tuple[int, Path | None, Path | None]]:
        """``[(N, embedding file or None, metadata file or None)]`` sorted by N, whatever the zero padding."""
        names = [f"{sub}/{p.name}" for sub in (EMB_DIR, META_DIR) if (self.path / sub).is_dir()
                 for p in (self.path / sub).iterdir()]
        return [(n, e and self.path / e, m and self.path / m) for n, e, m in pair_shard_names(names)]

    def complete_shards(self, *, dim: int, dtype: Dtype) -> list[ShardInfo]:
        """The shards ``0..N`` already complete and consecutive; files of any later or broken shard are deleted."""
        done: list[ShardInfo] = []
        broken_from: int | None = None
        for n, emb, meta in self.list_shard_files():
            if broken_from is None:
                info = _read_shard_info(n, emb, meta, dim=dim, dtype=dtype) if n == len(done) else None
                if info is not None and (not done or info.start == done[-1].end):
                    done.append(info)
                    continue
                broken_from = n
            for p in (emb, meta):
                if p is not None:
                    log.info("removing incomplete shard file %s", p)
                    p.unlink(missing_ok=True)
        return done

    # -- vectors and metadata ----------------------------------------------------------------------------------

    def iter_vectors(self, shards: list[ShardInfo], chunk: int = 65536) -> Iterator[np.ndarray]:
        """All stored vectors in shard order, as float32 chunks (memory-mapped reads)."""
        import numpy as np

        for s in shards:
            arr = np.load(self.emb_path(s.n), mmap_mode="r")
            for lo in range(0, len(arr), chunk):
                yield np.ascontiguousarray(arr[lo : lo + chunk], dtype=np.float32)

    def gather_vectors(self, shards: list[ShardInfo], ids: np.ndarray) -> np.ndarray:
        """float32 vectors of global row ``ids``, from the memory-mapped shards."""
        import numpy as np

        arrays = [np.load(self.emb_path(s.n), mmap_mode="r") for s in shards]
        starts = np.cumsum([0] + [s.rows for s in shards])
        ids = np.asarray(ids, dtype=np.int64)
        shard_of = np.searchsorted(starts, ids, side="right") - 1
        return take_rows(arrays, shard_of, ids - starts[shard_of]).astype(np.float32)

    def open_embeddings(self, manifest: Manifest) -> list[np.ndarray]:
        """The manifest's embedding shards, memory-mapped read-only, each checked against its recorded shape."""
        import numpy as np

        out = []
        for s in manifest.shards:
            try:
                arr = np.load(self.path / s["emb"], mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFormatError(f"embedding shard {s['emb']} is unreadable: {e}") from None
            if arr.ndim != 2 or arr.shape != (s["rows"], manifest.dim):
                raise IndexFormatError(f"embedding shard {s['emb']} has shape {arr.shape}, "
                                       f"expected ({s['rows']}, {manifest.dim})")
            out.append(arr)
        return out

    def read_metadata(self, shard: dict[str, Any]):
        """One manifest shard's metadata as a memory-mapped ``pyarrow.Table``, checked against its row count."""
        import pyarrow.parquet as pq

        path = self.path / shard["meta"]
        try:
            table = pq.read_table(path, memory_map=True)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"metadata shard {path} is unreadable: {e}") from None
        if table.num_rows != shard["rows"]:
            raise IndexFormatError(f"metadata shard {path} has {table.num_rows} rows, expected {shard['rows']}")
        return with_optional_columns(table)

    def count_optional_values(self, shards: list[dict[str, Any]]) -> dict[str, int]:
        """Non-null values of each optional column over ``shards``: what the manifest records under ``metadata``."""
        counts = dict.fromkeys(OPTIONAL_COLUMNS, 0)
        for shard in shards:
            table = self.read_metadata(shard)
            for name in OPTIONAL_COLUMNS:
                column = table.column(name)
                counts[name] += len(column) - column.null_count
        return counts

    # -- the FAISS index ---------------------------------------------------------------------------------------

    def write_faiss_index(self, faiss_index: Any) -> None:
        """Write ``image.index``. An on-disk IVF index (``OnDiskInvertedLists``) has its lists file moved to
        ``image.ivfdata`` first, and is written to refer to it; any other index removes a stale one."""
        import faiss

        lists = ondisk_lists(faiss_index)
        data = self.path / INDEX_DATA_FILE
        if lists is None:
            data.unlink(missing_ok=True)
        elif Path(lists.filename).resolve() != data.resolve():
            os.replace(lists.filename, data)  # the lists stay mapped: renaming an open file is safe on POSIX
            lists.filename = str(data.resolve())
        with atomic_path(self.path / INDEX_FILE, suffix=".index") as tmp:
            faiss.write_index(faiss_index, str(tmp))

    def faiss_work_path(self, name: str) -> Path:
        """A build file of an on-disk index under ``faiss_parts/`` (the folder is made; removed by
        ``remove_build_state``)."""
        (self.path / FAISS_WORK_DIR).mkdir(parents=True, exist_ok=True)
        return self.path / FAISS_WORK_DIR / name

    def read_faiss_index(self, *, mmap: bool | None = None) -> Any:
        """``image.index``, read into RAM or memory-mapped read-only (where its type supports it).

        ``mmap`` None: memory-mapped above ``MMAP_MIN_BYTES``, in RAM below. Measured on 1M x 512 IVF-PQ, a
        memory-mapped scan ran 1.58x slower than in RAM, so RAM is the default while the index fits easily;
        a mapped index shares the page cache between processes and starts at once.
        """
        import faiss

        path = self.path / INDEX_FILE
        if not path.is_file():
            raise IndexFormatError(f"{str(self.path)!r} has a manifest but no {INDEX_FILE}")
        if (self.path / INDEX_DATA_FILE).is_file():
            return _read_ondisk_index(path)
        if mmap is None:
            mmap = path.stat().st_size > MMAP_MIN_BYTES
        try:
            if mmap:
                return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            log.debug("cannot mmap %s (%s); reading it into memory", path, e)
        try:
            return faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexFormatError(f"{path} is not a readable FAISS index: {str(e).splitlines()[0]}") from None

    # -- the caption full-text index ----------------------------------------------------------------------

    def write_caption_index(self, shards: list[dict[str, Any]], *, batch: int = 50_000) -> dict[str, Any] | None:
        """Index every non-empty caption of ``shards`` (manifest entries) for full-text search.

        Returns the manifest's ``captions`` entry, or None (and no file) when no row has a caption.
        """
        import sqlite3

        rows = 0
        with atomic_path(self.path / CAPTIONS_FILE, suffix=".sqlite") as tmp:
            tmp.unlink()  # sqlite creates its own file
            con = sqlite3.connect(tmp)
            try:
                con.execute(f"CREATE VIRTUAL TABLE captions USING fts5(caption, tokenize='{CAPTIONS_TOKENIZER}')")
                for shard in shards:
                    table = self.read_metadata(shard).select(["id", "caption"])
                    for lo in range(0, table.num_rows, batch):
                        part = table.slice(lo, batch).to_pydict()
                        pairs = [(i, c) for i, c in zip(part["id"], part["caption"], strict=True) if c and c.strip()]
                        con.executemany("INSERT INTO captions(rowid, caption) VALUES (?, ?)", pairs)
                        rows += len(pairs)
                con.execute("INSERT INTO captions(captions) VALUES ('optimize')")
                con.commit()
            finally:
                con.close()
            if rows == 0:
                return None
        return {"file": CAPTIONS_FILE, "rows": rows, "tokenizer": CAPTIONS_TOKENIZER}

    def search_captions(self, match: str, limit: int) -> list[tuple[int, float]]:
        """Rows whose caption matches the FTS5 query ``match``: ``[(row id, bm25 score)]``, best first
        (scores are positive: larger is better). Opened read-only per call, so threads never share a connection."""
        import sqlite3

        path = self.path / CAPTIONS_FILE
        if not path.is_file():
            raise IndexFormatError(f"{str(self.path)!r} has no caption index ({CAPTIONS_FILE})")
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        try:
            got = con.execute("SELECT rowid, bm25(captions) FROM captions WHERE captions MATCH ? "
                              "ORDER BY bm25(captions), rowid LIMIT ?", (match, int(limit))).fetchall()
        except sqlite3.Error as e:
            raise IndexFormatError(f"caption search in {path} failed: {e}") from None
        finally:
            con.close()
        return [(int(i), -float(score)) for i, score in got]

    # -- a build in progress -----------------------------------------------------------------------------------

    def has_build_state(self) -> bool:
        return (self.path / STATE_FILE).exists()

    def read_build_parameters(self) -> dict[str, Any]:
        """The parameters an unfinished build started with. Raises IndexFormatError when unreadable."""
        state = _read_json_object(self.path / STATE_FILE)
        if not isinstance(state.get("parameters"), dict):
            raise IndexFormatError(f"{self.path / STATE_FILE} holds no parameters")
        return state["parameters"]

    def write_build_state(self, parameters: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / STATE_FILE, build_state_bytes(parameters))

    def remove_build_state(self) -> None:
        (self.path / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.path / FAISS_WORK_DIR, ignore_errors=True)

    def clear(self) -> None:
        """Remove what a build writes, and nothing else the folder may hold."""
        for name in (MANIFEST_FILE, INDEX_FILE, INDEX_DATA_FILE, STATE_FILE, CAPTIONS_FILE):
            (self.path / name).unlink(missing_ok=True)
        for sub in (EMB_DIR, META_DIR, FAISS_WORK_DIR):
            shutil.rmtree(self.path / sub, ignore_errors=True)

    def prepare(self) -> None:
        """Create the folder, and delete leftovers of atomic writes a crash interrupted."""
        self.path.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.path, self.path / EMB_DIR, self.path / META_DIR)


def ondisk_lists(faiss_index: Any):
    """The ``OnDiskInvertedLists`` of an IVF index whose lists live in a file, else None."""
    import faiss

    ivf = faiss.try_extract_index_ivf(faiss_index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _read_ondisk_index(path: Path) -> Any:
    """An on-disk IVF index: faiss maps ``image.ivfdata`` itself (read-only). faiss stores the absolute name the
    lists had when written; ``IO_FLAG_ONDISK_SAME_DIR`` looks for it beside ``image.index`` instead, so a moved or
    copied index directory still opens. (``IO_FLAG_MMAP`` must not be added: searching such an index crashed.)"""
    import faiss

    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(path.resolve()), flags)
    except RuntimeError as e:
        raise IndexFormatError(f"{path} is not a readable on-disk FAISS index: {str(e).splitlines()[0]}") from None
    if ondisk_lists(index) is None:
        raise IndexFormatError(f"{path.parent} has {INDEX_DATA_FILE} but {INDEX_FILE} is not an on-disk IVF index")
    return index


def with_optional_columns(table):
    """``table`` with every optional column, as nulls where an older build did not write it."""
    import pyarrow as pa

    for name, typ in OPTIONAL_COLUMNS.items():
        if name not in table.column_names:
            table = table.append_column(pa.field(name, getattr(pa, typ)()),
                                        pa.nulls(table.num_rows, getattr(pa, typ)()))
    return table


def parse_manifest(raw: dict[str, Any], where: str) -> Manifest:
    """A manifest from its JSON object, checked (``where`` names it in errors: a file or a URL).

    Raises:
        IndexFormatError: another format version, or missing/invalid fields.
    """
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{where} has format_version {version!r}; this retrogen reads version {FORMAT_VERSION} "
            "(rebuild the index, or use the retrogen version that wrote it)"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise IndexFormatError(f"{where}: invalid field {loc!r}: {first['msg']}") from None
    if sum(int(s.get("rows", 0)) for s in manifest.shards) != manifest.count:
        raise IndexFormatError(f"{where}: shard rows do not add up to count {manifest.count}")
    return manifest


def build_state_bytes(parameters: dict[str, Any]) -> bytes:
    """The content of ``build_state.json`` for a build started now with ``parameters``."""
    return (json.dumps({"parameters": parameters, "started": now_iso()}, indent=2, default=str) + "\n").encode()


def parse_json_object(data: bytes, where: str) -> dict[str, Any]:
    """``data`` as a JSON object (a manifest or build state read from elsewhere). Raises IndexFormatError."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{where} is not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise IndexFormatError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexFormatError(f"{path} is not readable JSON: {e}") from None
    return parse_json_object(data, str(path))


def _read_shard_info(n: int, emb: Path | None, meta: Path | None, *, dim: int, dtype: str) -> ShardInfo | None:
    """Shard ``n``'s commit record when both its files are there and agree, else None."""
    import numpy as np
    import pyarrow.parquet as pq

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
