"""Content-addressed storage of datasets and job results, through fsspec (a local folder or an object store).

A stored tree lives at ``{kind}/{sha256}/`` where the hash covers every file's relative path and bytes, so
equal content is stored once and a stored tree never changes. A ``.complete`` marker is what makes a tree
visible, so a crash mid-write never leaves a half tree that readers would trust. Storing is idempotent under
any concurrency (threads, processes, hosts sharing the store), and a tree with its marker is never deleted
or replaced by a put:

* local folder: the files and the marker are written to a private ``staging/<uuid>/`` folder that is then
  renamed onto the final name in one atomic step. A racer whose rename finds the name taken by a complete
  tree has nothing to do; leftovers of a crashed write (no marker) are moved aside and deleted first.
* object store (no atomic folder rename): each file is uploaded to ``staging/<uuid>/`` and moved onto its
  name, then the marker is written last. Racers move the same bytes onto the same names, and stop as soon
  as another racer's marker is there.

Workers read trees through :meth:`Store.local_dir` (the folder itself for a local store, a verified cache
copy otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from retrogen.errors import NotFoundError
from retrogen.fileio import folder_lock, sha256_tree, tree_files

log = logging.getLogger(__name__)

MARKER = ".complete"
KINDS = ("datasets", "results")


def stored_files(root: str | os.PathLike) -> list[str]:
    """The files of a local tree that make up its content (links never followed, the marker left out)."""
    return tree_files(root, skip=lambda rel: rel.rsplit("/", 1)[-1] == MARKER)


def tree_hash(root: str | os.PathLike) -> str:
    """The tree's content address (retrogen.fileio.sha256_tree over its stored files)."""
    return sha256_tree(root, stored_files(root))


class Store:
    """Immutable content-addressed trees under one fsspec URL."""

    def __init__(self, url: str, cache_dir: str | os.PathLike):
        self.url = url
        # No listing cache: s3fs (and other object stores) otherwise keep a folder's listing forever, so a
        # replica that listed a tree before another one wrote its marker would never see it complete.
        self.fs, self.root = url_to_fs(url, use_listings_cache=False)
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self.cache_dir = Path(cache_dir)
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str, rel: str = "") -> str:
        kind, _, digest = key.partition("/")
        if kind not in KINDS or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise NotFoundError(f"not a stored tree: {key!r}")
        if rel:
            parts = rel.split("/")
            if any(p in ("", ".", "..") for p in parts) or "\\" in rel or rel == MARKER:
                raise NotFoundError(f"no file {rel!r}")
        return f"{self.root}/{key}" + (f"/{rel}" if rel else "")

    def _marker(self, key: str) -> str:
        return f"{self._path(key)}/{MARKER}"

    def ping(self) -> None:
        """Raise if the store does not answer (readiness)."""
        self.fs.exists(self.root)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._marker(key))

    def put_tree(self, kind: str, local_root: str | os.PathLike) -> str:
        """Store a local folder; returns its key ``kind/sha256``. Storing equal content again is a no-op.

        Safe when any number of threads or processes store the same content at once: each returns the key
        once the complete tree is there, and the tree holds exactly the folder's files.
        """
        files = stored_files(local_root)
        key = f"{kind}/{sha256_tree(local_root, files)}"
        if self.exists(key):
            return key
        if self.local:
            self._put_local(Path(local_root), files, Path(self._path(key)))
        else:
            self._put_remote(Path(local_root), files, self._path(key))
        log.info("stored %s", key)
        return key

    def _put_local(self, src: Path, files: list[str], final: Path) -> None:
        """Write the tree and its marker into a private staging folder, then rename it onto ``final``."""
        staging = Path(self.root, "staging", uuid.uuid4().hex)
        try:
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, staging / rel)
            (staging / MARKER).write_bytes(str(time.time()).encode())  # inside: the rename publishes both at once
            _publish_folder(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _put_remote(self, src: Path, files: list[str], final: str) -> None:
        """Move each file onto its name, then write the marker: an object store has no atomic folder rename.

        Racers move the same bytes onto the same names; each stops once another's marker is there, so a
        complete tree is never rewritten. Files a crashed write left that are not in the tree are removed.
        """
        marker, staging = f"{final}/{MARKER}", f"{self.root}/staging/{uuid.uuid4().hex}"
        try:
            for rel in files:
                if self.fs.exists(marker):
                    return
                # Uploaded aside, then moved: a reader of the complete tree never meets a file half-rewritten
                # by a late racer on a backend whose writes are not atomic (object-store PUTs are).
                part = f"{staging}/{rel}"
                self.fs.makedirs(part.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(src / rel), part)
                self.fs.makedirs(f"{final}/{rel}".rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(part, f"{final}/{rel}")
            if self.fs.exists(marker):
                return
            found = {p.rstrip("/")[len(final) + 1:] for p in self.fs.find(final)}
            if MARKER in found:  # another racer completed it since the check above: never remove its marker
                return
            for rel in sorted(found - set(files)):
                self.fs.rm_file(f"{final}/{rel}")
            self.fs.pipe_file(marker, str(time.time()).encode())
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(staging, recursive=True)

    def files(self, key: str) -> list[str]:
        if not self.exists(key):
            raise NotFoundError(f"stored tree {key} is missing")
        base = self._path(key)
        found = self.fs.find(base)
        return sorted(p[len(base) + 1:] for p in (f.rstrip("/") for f in found) if not p.endswith("/" + MARKER))

    def read_bytes(self, key: str, rel: str) -> bytes:
        path = self._path(key, rel)
        if not self.exists(key) or not self.fs.isfile(path):
            raise NotFoundError(f"no file {rel!r}")
        return self.fs.cat_file(path)

    def open(self, key: str, rel: str):
        path = self._path(key, rel)
        if not self.fs.isfile(path):
            raise NotFoundError(f"no file {rel!r}")
        return self.fs.open(path, "rb")

    def local_dir(self, key: str) -> Path:
        """A local folder holding the tree (read it only). Remote trees are copied once into the cache."""
        if not self.exists(key):
            raise NotFoundError(f"stored tree {key} is missing")
        if self.local:
            return Path(self._path(key))
        dest = self.cache_dir / key
        if (dest / MARKER).exists():
            return dest
        tmp = self.cache_dir / "tmp" / uuid.uuid4().hex
        try:
            for rel in self.files(key):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                # Whole-file reads: fsspec's memory store hands every reader one shared file object (and seek).
                (tmp / rel).write_bytes(self.fs.cat_file(self._path(key, rel)))
            (tmp / MARKER).write_text("ok")
            _publish_folder(tmp, dest)  # another reader of the same tree may have copied it first: then theirs
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def delete(self, key: str) -> None:
        """Remove a tree: its marker first, so a half-deleted tree is never seen as complete."""
        path = self._path(key)
        if self.fs.exists(f"{path}/{MARKER}"):
            self.fs.rm_file(f"{path}/{MARKER}")
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        shutil.rmtree(self.cache_dir / key, ignore_errors=True)

    def clean_staging(self, older_than_s: float = 3600) -> None:
        """Remove staging folders left by crashed uploads (called at worker start)."""
        base = f"{self.root}/staging"
        if not self.fs.exists(base):
            return
        for entry in self.fs.ls(base, detail=True):
            # An object store's "folder" is a prefix with no time of its own: its newest object dates it, so
            # another replica's upload in progress is never taken for a crashed one.
            times = [_mtime(entry)] if entry.get("type") != "directory" or self.local else \
                [_mtime(f) for f in self.fs.find(entry["name"], detail=True).values()]
            known = [t for t in times if t is not None]
            if known and time.time() - max(known) > older_than_s:
                self.fs.rm(entry["name"], recursive=True)


def _mtime(info: dict) -> float | None:
    """A listing entry's modification time in seconds, whatever the filesystem calls it; None if it has none."""
    value = info.get("mtime") or info.get("LastModified") or info.get("created")
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def _publish_folder(staging: Path, final: Path) -> None:
    """Rename ``staging`` (complete, its marker inside) onto ``final`` unless a complete copy is there already.

    The rename is atomic and fails on a non-empty target instead of nesting into it, so racers storing the same
    content all succeed with one copy in place; markerless leftovers of a crashed write at ``final`` are
    removed first. ``staging`` must be on the same filesystem as ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        try:
            os.rename(staging, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if (final / MARKER).is_file():
            return  # another writer stored the same content first: theirs is ours
        _remove_unfinished(final, staging.parent)
    raise OSError(f"could not store {final}: the folder keeps reappearing without its {MARKER} marker")


def _remove_unfinished(final: Path, scratch: Path) -> None:
    """Delete a crashed write's leftovers at ``final`` (no marker), never a complete tree.

    Removers take turns (a lock on ``scratch``, where leftovers are moved before deletion). A complete tree
    can only appear at ``final`` once it is gone or empty, and one that did is put back rather than deleted.
    """
    aside = scratch / f"{uuid.uuid4().hex}.unfinished"
    with folder_lock(scratch):
        if not final.exists() or (final / MARKER).is_file():
            return
        os.rename(final, aside)
        if (aside / MARKER).is_file():  # completed over an empty leftover folder between check and rename
            try:
                os.rename(aside, final)
                return
            except OSError:
                pass  # another complete copy is at ``final`` already: this one is redundant
    log.warning("removed %s, left without its marker by an interrupted write", final)
    shutil.rmtree(aside, ignore_errors=True)
