"""Provenance fields common to both backends, and the output folder every augment command writes.

An augmentation output folder is an ImageFolder (``<label>/<file>``) plus ``provenance.jsonl`` (one JSON
object per image, in file order) and ``summary.json``. Backend-specific fields (retrieval: index, sample,
similarity...; generation: pipeline, seed, steps...) are added by each backend; the fields here are on
every record.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .imagefolder import safe_class_dir, sha256_bytes

PROVENANCE_FILE = "provenance.jsonl"
SUMMARY_FILE = "summary.json"


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


class OutputWriter:
    """Writes images + provenance records into an augmentation output folder.

    Images are written atomically; ``provenance.jsonl`` is appended one line per image after the image
    is on disk, and ``close()`` writes ``summary.json`` last, so a folder with a summary is complete.
    """

    def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if (self.out_dir / SUMMARY_FILE).exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds an augmentation output (summary.json)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._prov = open(self.out_dir / PROVENANCE_FILE, "w", encoding="utf-8")  # noqa: SIM115
        self.records: list[dict[str, Any]] = []

    def add(self, *, label: str, filename: str, image_bytes: bytes, method: str, fields: dict[str, Any]) -> dict:
        rel = f"{safe_class_dir(label)}/{filename}"
        atomic_write_bytes(self.out_dir / rel, image_bytes)
        record = common_fields(label=label, method=method, image_bytes=image_bytes, file=rel) | fields
        self._prov.write(json.dumps(record, default=str) + "\n")
        self._prov.flush()
        self.records.append(record)
        return record

    def close(self, summary: dict[str, Any]) -> None:
        self._prov.close()
        atomic_write_json(self.out_dir / SUMMARY_FILE, summary)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._prov.closed:
            self._prov.close()


def read_provenance(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    with open(Path(out_dir) / PROVENANCE_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class AugmentResult:
    """What an augmentation call returns: where the output folder is, and its summary (as in summary.json)."""

    out_dir: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {label: c["returned"] for label, c in self.summary.get("per_class", {}).items()}
