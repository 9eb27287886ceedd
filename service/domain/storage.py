"""Content-addressed storage of datasets and job results, through fsspec (a local folder or an object store).

A stored tree lives at ``{kind}/{sha256}/`` where the hash covers every file's relative path and bytes, so
equal content is stored once and a stored tree never changes. Trees are uploaded to a staging prefix, then
moved; a ``.complete`` marker written last is what makes a tree visible, so a crash mid-write never leaves a
half tree that readers would trust. Workers read trees through :meth:`Store.local_dir` (the folder itself
for a local store, a verified cache copy otherwise).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from retrogen.errors import NotFoundError
from retrogen.fileio import sha256_tree, tree_files

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
        self.fs, self.root = url_to_fs(url)
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
        """Store a local folder; returns its key ``kind/sha256``. Storing equal content again is a no-op."""
        key = f"{kind}/{tree_hash(local_root)}"
        if self.exists(key):
            return key
        final = self._path(key)
        staging = f"{self.root}/staging/{uuid.uuid4().hex}"
        try:
            for rel in stored_files(local_root):
                self.fs.makedirs(f"{staging}/{rel}".rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(Path(local_root, rel)), f"{staging}/{rel}")
            if self.fs.exists(final):  # a crashed earlier attempt without its marker: replace it
                self.fs.rm(final, recursive=True)
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(staging, final, recursive=True)
            self.fs.pipe_file(f"{final}/{MARKER}", str(time.time()).encode())
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        log.info("stored %s", key)
        return key

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
                self.fs.get_file(self._path(key, rel), str(tmp / rel))
            (tmp / MARKER).write_text("ok")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                os.replace(tmp, dest)
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
            mtime = entry.get("mtime") or entry.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            if time.time() - float(mtime) > older_than_s:
                self.fs.rm(entry["name"], recursive=True)
