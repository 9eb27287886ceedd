"""The provenance fields on every record of every backend (``file, label, method, sha256, created,
retrogen_version``); each backend adds its own (retrieval: index, sample, similarity...; generation:
pipeline, seed, steps...). Records are written and read by :mod:`retrogen.outputs`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from . import __version__
from .fileio import sha256_bytes


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def common_fields(*, label: str, method: str, image_bytes: bytes, file: str) -> dict[str, Any]:
    """Fields on every provenance record. ``file`` is the image's path relative to the output folder."""
    return {
        "file": file,
        "label": label,
        "method": method,
        "sha256": sha256_bytes(image_bytes),
        "created": now_iso(),
        "retrogen_version": __version__,
    }
