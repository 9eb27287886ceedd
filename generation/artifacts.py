"""Personalisation artefacts (learned embeddings, LoRA weights, fine-tuned UNets), stored once and reused.

An artefact lives in ``<root>/<kind>/<key>/`` where ``key`` hashes (base model weights, the class images'
sha256, the trainer's hyper-parameters). It is built in a temporary sibling folder and moved into place
with ``os.replace``, so a folder with ``artifact.json`` is always complete, and a crash or a concurrent
builder never leaves half an artefact where readers look.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrogen.fileio import atomic_write_json, sha256_bytes, sha256_tree, tree_files
from retrogen.provenance import now_iso

log = logging.getLogger(__name__)

META_FILE = "artifact.json"
ORPHAN_AGE_S = 24 * 3600  # a build folder untouched this long belongs to a builder that died (training takes minutes)


def artifact_key(*, kind: str, base_weights_hash: str, image_sha256s: list[str], hyperparameters: dict[str, Any]) -> str:
    """A content hash: same base model + same images (in any order) + same settings -> same key."""
    payload = {
        "kind": kind,
        "base": base_weights_hash,
        "images": sorted(image_sha256s),
        "hyperparameters": hyperparameters,
    }
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())


def dir_hash(path: Path) -> str:
    """The artefact's tree hash without its metadata (what a provenance record calls adapter_hash)."""
    return sha256_tree(path, tree_files(path, skip=lambda rel: Path(rel).name == META_FILE))


class ArtifactStore:
    """A folder of artefacts keyed by :func:`artifact_key`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The artefact's metadata (with ``path``) when it is complete, else None."""
        p = self.path(kind, key)
        meta = p / META_FILE
        if not meta.is_file():
            return None
        return json.loads(meta.read_text()) | {"path": str(p)}

    def remove_orphans(self, kind: str, *, older_than_s: float = ORPHAN_AGE_S) -> int:
        """Delete build folders (``.KEY.*.tmp``) left by builders that died; young ones may still be in use."""
        removed = 0
        cutoff = time.time() - older_than_s
        for tmp in (self.root / kind).glob(".*.tmp"):
            try:
                if tmp.is_dir() and tmp.stat().st_mtime < cutoff:
                    shutil.rmtree(tmp)
                    removed += 1
            except OSError:  # another process removed it first
                continue
        if removed:
            log.info("removed %d orphaned %s build folder(s)", removed, kind)
        return removed

    def get_or_build(
        self, kind: str, key: str, build: Callable[[Path], dict[str, Any]], *, description: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Return ``(metadata, reused)``; ``build(tmp_dir)`` writes the files and returns extra metadata."""
        found = self.get(kind, key)
        if found is not None:
            log.info("reusing %s artefact %s", kind, key[:12])
            return found, True
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.remove_orphans(kind)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key[:12]}.", suffix=".tmp"))
        try:
            extra = build(tmp)
            meta = {"kind": kind, "key": key, "created": now_iso(), **description, **extra, "hash": dir_hash(tmp)}
            atomic_write_json(tmp / META_FILE, meta)
            try:
                os.replace(tmp, final)
            except OSError:  # another builder finished first: theirs is as good as ours
                if self.get(kind, key) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(kind, key) or meta, False
