"""Readiness: what ``/readyz`` names, checked for real (HTTP-free).

A store is ready when its root exists and takes a write: a deleted or read-only data folder must read as not
ready, since every upload and every finished job would fail there. The probe object is removed at once.
"""

from __future__ import annotations

import uuid

from .storage import Store


class NotReadyError(Exception):
    """A dependency is up but cannot serve (the message says why, naming no server path)."""


def check_store(store: Store) -> None:
    """Raise unless the store's root exists (a local folder) and a small object can be written and removed."""
    if store.local and not store.fs.isdir(store.root):
        raise NotReadyError("the store's root folder is missing")
    probe = f"{store.root}/.ready-{uuid.uuid4().hex}"
    try:
        store.fs.pipe_file(probe, b"ready")
    except (OSError, PermissionError) as e:
        raise NotReadyError(f"the store's root cannot be written ({type(e).__name__})") from None
    try:
        store.fs.rm_file(probe)
    except OSError as e:
        raise NotReadyError(f"the store's root does not let a written object be removed ({type(e).__name__})") from None
