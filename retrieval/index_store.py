"""An index directory kept under an fsspec URL (``s3://bucket/prefix``): the one owner of "index directory <->
URL", used by the builder to publish an index and by readers to fetch one.

FAISS memory-maps ``image.index`` and every reader needs local files, so an index is always used from a local
folder in the layout of ``index_directory``; the URL holds a copy in the same layout:

* a build runs in a local staging folder, a :class:`StagingDirectory`, which uploads each shard as soon as it is
  committed (vectors, then metadata), and at the end the FAISS and caption indexes, then ``manifest.json``
  last: on the store as on disk, the manifest's presence says the index is complete. ``build_state.json`` goes
  up when the build starts, so that a rerun on any machine finds the arguments; a rerun whose staging folder
  is gone pulls it and every complete shard pair first (:meth:`StagingDirectory.pull`), then resumes.
* a reader syncs the index into a local cache (:func:`sync_index`): the manifest first, then each file it
  needs that is missing or changed (size, and the ETag or mtime recorded when it was downloaded), each
  atomically; the local manifest is written last, so a half-synced cache is never opened.

Only names of the layout (``index_directory.is_layout_name``) are copied: an object or a manifest entry with any
other name (``..``, an absolute path) is ignored or refused, so nothing lands outside the local folder.
Single-object uploads are atomic on object stores; other filesystems get a temporary name, then a move.
Filesystems are opened without a listing cache (s3fs would keep a listing forever).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from retrogen.errors import RetrogenError
from retrogen.fileio import atomic_path, atomic_write_bytes, atomic_write_json, folder_lock
from retrogen.progress import ProgressEvent, ProgressFn, emit

from .errors import IndexFormatError, IndexNotFoundError, IndexStoreError
from .index_directory import (
    CAPTIONS_FILE,
    INDEX_DATA_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    IndexDirectory,
    Manifest,
    build_state_bytes,
    is_layout_name,
    pair_shard_names,
    parse_json_object,
    parse_manifest,
)

log = logging.getLogger(__name__)

LOCAL_PROTOCOLS = ("file", "local")
#: protocols whose single-object uploads appear whole or not at all (others: a temporary name, then a move)
ATOMIC_UPLOADS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
#: in a reader's cache: the remote identity (size, ETag or mtime) of each file as it was downloaded
SYNC_FILE = ".sync.json"
_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: packages whose exceptions mean "the store failed" (reported as one line naming the URL)
_STORE_PACKAGES = ("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "adlfs", "google", "azure")


def is_remote(location: Any) -> bool:
    """Whether ``location`` is a URL of a store other than this machine's filesystem (``s3://...``)."""
    m = _PROTOCOL.match(location) if isinstance(location, str) else None
    return m is not None and m.group(1).lower() not in LOCAL_PROTOCOLS


def redact(url: str) -> str:
    """``url`` without user info, query or fragment (where credentials could ride): what messages show."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def display(location: Any) -> str:
    """``location`` as messages and logs name it (a URL redacted)."""
    return redact(location) if is_remote(location) else str(location)


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/retrogen/...`` (default ``~/.cache/retrogen/...``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "retrogen", *parts)


def normalise(url: str) -> str:
    """``url`` without trailing slashes (``s3://b/idx/`` is ``s3://b/idx``)."""
    scheme, _, rest = str(url).partition("://")
    return f"{scheme}://{rest.rstrip('/')}"


def url_key(url: str) -> str:
    """A short stable name for ``url``: its local folders are named by it."""
    return hashlib.sha256(normalise(url).encode()).hexdigest()[:16]


def default_work_dir(url: str) -> Path:
    """Where a build to ``url`` is staged unless told otherwise (``retrogen index build --work-dir``)."""
    return user_cache_dir("index-builds", url_key(url))


def default_cache_dir(url: str, root: str | os.PathLike | None = None) -> Path:
    """Where a reader keeps its copy of the index at ``url``: under ``root`` (default: the user's cache)."""
    return Path(root or user_cache_dir("indexes")) / url_key(url)


@contextlib.contextmanager
def store_errors(url: str, doing: str) -> Iterator[None]:
    """A store's failure (unknown protocol, missing package or bucket, no credentials, no network) as one
    ``IndexStoreError`` line naming the redacted URL; our own errors, and bugs, pass through."""
    try:
        yield
    except RetrogenError:
        raise
    except Exception as e:
        if not isinstance(e, (OSError, ValueError, ImportError)) and \
                type(e).__module__.split(".")[0] not in _STORE_PACKAGES:
            raise
        raise IndexStoreError(f"{doing} {redact(url)}: {failure_reason(e, url)}") from None


def failure_reason(error: BaseException, url: str, limit: int = 300) -> str:
    """``error``'s message on one line, with whatever could be a secret (the URL's user info or query, the
    values of credential-like environment variables) masked."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    secrets = [userinfo, *userinfo.split(":"), parts.query]
    secrets += [v for k, v in os.environ.items() if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", k) and len(v) >= 8]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def identity(info: dict[str, Any]) -> list:
    """What says that a listed object changed: its size and its ETag (object stores) or modification time."""
    tag = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(k)), "")
    return [int(info.get("size") or 0), str(tag)]


class RemoteIndex:
    """The index layout under a URL. Answers what ``build.start_or_resume`` asks of an ``IndexDirectory``
    (``has_manifest``, ``read_build_parameters``, ``clear``...) from one listing, kept current by its own writes.

    ``path`` is the redacted URL, the name messages use; ``name`` its last part (an index id starts with it).
    """

    def __init__(self, url: str):
        self.url = normalise(url)
        self.path = redact(self.url)
        self.protocol = self.url.split("://", 1)[0].lower()
        with store_errors(self.url, "cannot open"):
            from fsspec.core import url_to_fs

            self.fs, root = url_to_fs(self.url, use_listings_cache=False)
        self.root = root.rstrip("/")
        if not self.root:
            raise IndexStoreError(f"{self.path!r}: the URL names no bucket or folder")
        self.name = self.root.rsplit("/", 1)[-1]
        self._files: dict[str, dict[str, Any]] | None = None
        self._others = 0

    def __repr__(self) -> str:
        return f"RemoteIndex({self.path!r})"

    def key(self, name: str) -> str:
        """The object path of layout file ``name``; any other name is refused."""
        if not is_layout_name(name):
            raise IndexFormatError(f"{self.path}: {name!r} is not a file of the index layout")
        return f"{self.root}/{name}"

    def listing(self) -> dict[str, dict[str, Any]]:
        """Layout name -> listing entry (``size``; ``ETag`` or ``mtime``) of each index file under the URL.

        Listed once (a missing bucket fails here, before any work), then kept current by this object's writes.
        """
        if self._files is None:
            with store_errors(self.url, "cannot list"):
                found = self.fs.find(self.root, detail=True)
            self._files, self._others = {}, 0
            for path, info in found.items():
                rel = path.rstrip("/")[len(self.root) + 1:] if path.startswith(self.root + "/") else ""
                if is_layout_name(rel):
                    self._files[rel] = info
                else:
                    self._others += 1
                    log.debug("%s: ignoring object %r (not a file of the index layout)", self.path, path)
        return self._files

    def is_empty(self) -> bool:
        """True when nothing at all is stored under the URL."""
        return not self.listing() and not self._others

    def has_manifest(self) -> bool:
        return MANIFEST_FILE in self.listing()

    def has_build_state(self) -> bool:
        return STATE_FILE in self.listing()

    def read_bytes(self, name: str) -> bytes:
        with store_errors(self.url, f"cannot read {name} from"):
            return self.fs.cat_file(self.key(name))

    def manifest_bytes(self) -> bytes:
        """The stored manifest as it is. Raises IndexNotFoundError when there is none (not a complete index)."""
        if not self.has_manifest():
            raise IndexNotFoundError(
                f"{self.path!r} has no {MANIFEST_FILE}: not an index, or its build did not finish "
                "(re-run `retrogen index build` with the same arguments to resume)")
        return self.read_bytes(MANIFEST_FILE)

    def read_manifest(self, data: bytes | None = None) -> Manifest:
        """The stored manifest (or ``data``, its bytes read before), checked."""
        where = f"{self.path}/{MANIFEST_FILE}"
        return parse_manifest(parse_json_object(self.manifest_bytes() if data is None else data, where), where)

    def read_build_parameters(self) -> dict[str, Any]:
        where = f"{self.path}/{STATE_FILE}"
        state = parse_json_object(self.read_bytes(STATE_FILE), where)
        if not isinstance(state.get("parameters"), dict):
            raise IndexFormatError(f"{where} holds no parameters")
        return state["parameters"]

    def write_build_state(self, parameters: dict[str, Any]) -> None:
        data = build_state_bytes(parameters)
        self._put(STATE_FILE, lambda key: self.fs.pipe_file(key, data), len(data))

    def prepare(self) -> None:
        """Nothing to make: an object store has no folders (``IndexDirectory.prepare``'s counterpart)."""

    def clear(self) -> None:
        """Remove the index's files, the manifest first (a half-cleared index never looks complete); objects of
        any other name are left where they are."""
        for name in sorted(self.listing(), key=lambda n: n != MANIFEST_FILE):
            self.remove(name)

    def remove(self, name: str) -> None:
        if name in self.listing():
            with store_errors(self.url, f"cannot remove {name} from"):
                self.fs.rm_file(self.key(name))
            del self.listing()[name]

    def remove_build_state(self) -> None:
        self.remove(STATE_FILE)

    def upload(self, local: Path, name: str) -> None:
        """Copy local file ``local`` to ``name``, whole or not at all."""
        self._put(name, lambda key: self.fs.put_file(str(local), key), local.stat().st_size)

    def _put(self, name: str, write: Callable[[str], Any], size: int) -> None:
        key = self.key(name)
        with store_errors(self.url, f"cannot upload {name} to"):
            if self.protocol in ATOMIC_UPLOADS:
                write(key)
            else:  # a reader must never meet half a file under the final name
                folder, _, base = key.rpartition("/")
                tmp = f"{folder}/.{base}.{uuid.uuid4().hex}.tmp"
                self.fs.makedirs(folder, exist_ok=True)
                write(tmp)
                self.fs.mv(tmp, key)
        self.listing()[name] = {"size": size}

    def download(self, name: str, dest: Path) -> dict[str, Any]:
        """Copy ``name`` to local file ``dest`` atomically (a temp file, then a rename); returns its listing entry."""
        info = self.listing()[name]
        with store_errors(self.url, f"cannot download {name} from"), atomic_path(dest) as tmp:
            self.fs.get_file(self.key(name), str(tmp))
            got = tmp.stat().st_size
            if info.get("size") is not None and got != int(info["size"]):
                raise IndexStoreError(f"{self.path}/{name}: downloaded {got} bytes, {info['size']} listed "
                                      "(changed while it was copied? retry)")
        return info


class StagingDirectory(IndexDirectory):
    """The local folder a build to a URL writes: an ``IndexDirectory`` that copies what it commits to ``remote``
    (each shard once both its files are complete; with the manifest, the FAISS and caption indexes, then the
    manifest last). The engines write through it unchanged."""

    def __init__(self, path: str | os.PathLike, remote: RemoteIndex, *, progress: ProgressFn | None = None):
        super().__init__(path, name=remote.name)
        self.remote, self.progress = remote, progress
        self.planned = 0  # files the build will publish, for the progress bar (0: unknown)
        self.published: set[str] = set()

    def __repr__(self) -> str:
        return f"StagingDirectory({str(self.path)!r} -> {self.remote.path!r})"

    def pull(self) -> int:
        """Download what the remote build has and this folder lacks: ``build_state.json`` and every complete shard
        pair (a resume where the staging folder is gone). Returns how many files came down."""
        files = self.remote.listing()
        pairs = [x for _, emb, meta in pair_shard_names(files) if emb and meta for x in (emb, meta)]
        todo = [n for n in pairs if not self._same_size(n)]
        if todo and STATE_FILE in files and not self.has_build_state():
            todo.insert(0, STATE_FILE)  # what makes the shards a build to resume here
        self.prepare()
        for i, name in enumerate(todo):
            self.remote.download(name, self.path / name)
            emit(self.progress, ProgressEvent("download", i + 1, len(todo), message=name))
        if todo:
            log.info("downloaded %d file(s) of the build in progress at %s", len(todo), self.remote.path)
        return len(todo)

    def complete_shards(self, *, dim: int, dtype: str) -> list:
        """The complete shards (``IndexDirectory.complete_shards``), each uploaded unless the remote has it."""
        shards = super().complete_shards(dim=dim, dtype=dtype)
        for s in shards:
            self.upload_shard(s.n, force=False)
        return shards

    def write_shard(self, n: int, vectors: Any, rows: list[dict], **kwargs: Any):
        """Commit shard ``n`` here, then upload it (a shard written again replaces the remote's copy)."""
        info = super().write_shard(n, vectors, rows, **kwargs)
        self.upload_shard(n, force=True)
        return info

    def upload_shard(self, n: int, *, force: bool) -> None:
        for path in (self.emb_path(n), self.meta_path(n)):  # vectors first: the metadata file is the commit
            self._publish(path.relative_to(self.path).as_posix(), force=force)

    def write_manifest(self, manifest: Manifest) -> None:
        super().write_manifest(manifest)
        self.publish(manifest, force=True)

    def publish(self, manifest: Manifest, *, force: bool = False) -> None:
        """Upload what the remote lacks of this complete index (``force``: the FAISS and caption indexes even if
        present, as just rebuilt), the manifest last; then remove the remote build state."""
        built = [n for n in (INDEX_FILE, INDEX_DATA_FILE, CAPTIONS_FILE) if (self.path / n).is_file()]
        shards = [x for s in manifest.shards for x in (s["emb"], s["meta"])]
        self.planned = len(shards) + len(built) + 1
        for name in shards:
            self._publish(name, force=False)
        for name in built:
            self._publish(name, force=force)
        self._publish(MANIFEST_FILE, force=True)
        self.remote.remove_build_state()
        log.info("published %s (%d files)", self.remote.path, len(self.published))

    def remove_build_state(self) -> None:
        super().remove_build_state()
        self.remote.remove_build_state()

    def _same_size(self, name: str) -> bool:
        local, info = self.path / name, self.remote.listing().get(name)
        return info is not None and local.is_file() and local.stat().st_size == int(info.get("size", -1))

    def _publish(self, name: str, *, force: bool) -> None:
        if force or not self._same_size(name):
            self.remote.upload(self.path / name, name)
        self.published.add(name)
        done = len(self.published)
        emit(self.progress, ProgressEvent("upload", done, max(done, self.planned), message=name))


def sync_index(url: str, cache_dir: str | os.PathLike | None = None, *,
               progress: ProgressFn | None = None) -> IndexDirectory:
    """A local copy of the index at ``url``, brought up to date with it: what ``CorpusIndex.open(url)`` opens.

    ``cache_dir``: the copy's folder (default: :func:`default_cache_dir`). Only files that are missing or changed
    are downloaded; a cache whose manifest matches the remote's and whose files are intact downloads nothing.

    Raises:
        IndexNotFoundError: no manifest at ``url`` (not an index, or its build did not finish).
        IndexFormatError: the manifest is invalid or names files the store lacks or the layout does not have.
        IndexStoreError: the store cannot be reached or read.
    """
    remote = RemoteIndex(url)
    data = remote.manifest_bytes()  # missing or invalid: refused before anything is written
    names = needed_files(remote.read_manifest(data), remote)
    local = IndexDirectory(Path(cache_dir) if cache_dir else default_cache_dir(remote.url))
    local.path.mkdir(parents=True, exist_ok=True)
    with folder_lock(local.path):  # processes of this host syncing the same copy take turns
        here = local.path / MANIFEST_FILE
        if here.is_file() and here.read_bytes() != data:
            here.unlink()  # the copy is incomplete until every file of the new manifest is in place
        fetch_files(remote, local, names, progress)
        if remote.read_bytes(MANIFEST_FILE) != data:
            raise IndexStoreError(f"{remote.path} changed while it was being copied (rebuilt?); retry")
        if not here.is_file():
            atomic_write_bytes(here, data)
    return local


def needed_files(manifest: Manifest, remote: RemoteIndex) -> list[str]:
    """The files a reader of ``manifest`` needs, each checked to be a layout name the store holds."""
    names = [x for s in manifest.shards for x in (s.get("emb"), s.get("meta"))] + [INDEX_FILE]
    files = remote.listing()
    if manifest.faiss.get("storage") == "ondisk":  # a stray image.ivfdata would make the reader take it for one
        names.append(INDEX_DATA_FILE)
    if manifest.captions:
        names.append(CAPTIONS_FILE)
    bad = [n for n in names if not isinstance(n, str) or not is_layout_name(n)]
    if bad:
        raise IndexFormatError(f"{remote.path}/{MANIFEST_FILE} names a file outside the index layout: {bad[0]!r}")
    missing = [n for n in names if n not in files]
    if missing:
        raise IndexFormatError(f"{remote.path}/{MANIFEST_FILE} lists {missing[0]} but the store has no such object "
                               f"({len(missing)} missing)")
    return names


def fetch_files(remote: RemoteIndex, local: IndexDirectory, names: list[str],
                progress: ProgressFn | None = None) -> int:
    """Download each of ``names`` that the local copy lacks or holds in another version (by the identity recorded
    when it was downloaded), and delete index files the copy no longer needs. Returns files downloaded."""
    record_path = local.path / SYNC_FILE
    record = _read_record(record_path)
    files = remote.listing()
    todo = [n for n in names if record.get(n) != identity(files[n]) or not _has_size(local.path / n, files[n])]
    try:
        for i, name in enumerate(todo):
            record[name] = identity(remote.download(name, local.path / name))
            emit(progress, ProgressEvent("download", i + 1, len(todo), message=name))
    finally:
        keep = set(names)
        for _, emb, meta in local.list_shard_files():
            for p in (emb, meta):
                if p is not None and p.relative_to(local.path).as_posix() not in keep:
                    p.unlink(missing_ok=True)
        for name in (INDEX_DATA_FILE, CAPTIONS_FILE, STATE_FILE):
            if name not in keep:
                (local.path / name).unlink(missing_ok=True)
        atomic_write_json(record_path, {n: v for n, v in record.items() if n in keep})
    if todo:
        log.info("copied %d file(s) of %s into %s", len(todo), remote.path, local.path)
    return len(todo)


def _has_size(path: Path, info: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == int(info.get("size") or 0)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
