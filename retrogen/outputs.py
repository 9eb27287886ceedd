"""The augmentation output folder, the one format every backend writes and every consumer reads.

```
OUT/<label>/<file>          an ImageFolder of the images
OUT/provenance.jsonl        one JSON record per image, in the order written (retrogen.provenance)
OUT/summary.json            written last: its presence means the folder is complete
OUT/rejected/               images a filter removed, with their own provenance.jsonl
```

:class:`OutputFolder` owns it, reading and writing, as a diffusers class owns its folder: backends write
through :meth:`OutputFolder.create`, the text filter rewrites through :meth:`OutputFolder.rewrite`, and the
service, the client and the evaluation read through :meth:`OutputFolder.records` / :meth:`OutputFolder.summary`
(or :func:`parse_records` / :func:`parse_summary` on bytes from an object store). Nobody else parses the files.

Where a new output may go is decided here too, once for every writer (:meth:`OutputFolder.check_writable`): a
new or empty folder; an earlier output of the same command only when overwriting (it is cleared, not merged
into); never a file, nor a folder holding anything else (the user's own images, say).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import InvalidInputError
from .fileio import atomic_write_bytes, atomic_write_json
from .imagefolder import safe_class_dir
from .provenance import common_fields

PROVENANCE_FILE = "provenance.jsonl"
SUMMARY_FILE = "summary.json"
REJECTED_DIR = "rejected"


class OutputExistsError(InvalidInputError, FileExistsError):
    """The output path cannot take a new output: a file, a folder holding other content, or an earlier output
    that overwriting was not asked for."""


def _null(_constant: str) -> None:
    """NaN and Infinity are not JSON: read back as null."""
    return None


def parse_records(data: str | bytes) -> list[dict[str, Any]]:
    """The records of a ``provenance.jsonl`` (as read from a file or an object store)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return [json.loads(line, parse_constant=_null) for line in text.splitlines() if line.strip()]


def parse_summary(data: str | bytes) -> dict[str, Any]:
    """A ``summary.json``; raises ValueError when it is not a JSON object."""
    summary = json.loads(data, parse_constant=_null)
    if not isinstance(summary, dict):
        raise ValueError(f"{SUMMARY_FILE} must hold a JSON object, got {type(summary).__name__}")
    return summary


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, default=str) + "\n" for r in records).encode()


class OutputFolder:
    """An augmentation output folder on local disk (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def is_complete(self) -> bool:
        return (self.path / SUMMARY_FILE).is_file()

    @property
    def has_provenance(self) -> bool:
        return (self.path / PROVENANCE_FILE).is_file()

    def file(self, record: dict[str, Any]) -> Path:
        """The image file a record describes."""
        return self.path / record["file"]

    def records(self) -> list[dict[str, Any]]:
        """Every provenance record, in file order. Raises FileNotFoundError when there is none."""
        return parse_records((self.path / PROVENANCE_FILE).read_bytes())

    def iter_records(self) -> Iterator[dict[str, Any]]:
        with open(self.path / PROVENANCE_FILE, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line, parse_constant=_null)

    def num_records(self) -> int:
        with open(self.path / PROVENANCE_FILE, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())

    def summary(self) -> dict[str, Any]:
        """``summary.json``. Raises FileNotFoundError (unfinished folder) or ValueError (not a JSON object)."""
        return parse_summary((self.path / SUMMARY_FILE).read_bytes())

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` (atomically, last): the folder is complete from here on."""
        atomic_write_json(self.path / SUMMARY_FILE, summary)

    def _methods(self) -> set[str]:
        """The ``method``s that wrote this folder: the summary's, else its records' (none for no record)."""
        try:
            return {str(self.summary().get("method"))}
        except FileNotFoundError:
            pass
        except ValueError:
            return {f"unreadable {SUMMARY_FILE}"}
        try:
            return {str(r.get("method")) for r in self.iter_records()} if self.has_provenance else set()
        except ValueError:
            return {f"unreadable {PROVENANCE_FILE}"}

    @classmethod
    def check_writable(cls, path: str | os.PathLike, *, overwrite: bool = False,
                       methods: Collection[str] | None = None) -> None:
        """Refuse, before any work, an output path that cannot take a new output (reads no image).

        A new or empty folder is fine. A folder holding an earlier output (``summary.json``, or an interrupted
        one's ``provenance.jsonl``) written by ``methods`` (any method when None) is replaced only with
        ``overwrite``; anything else (a file, class folders without provenance, another command's output) is
        never replaced: ``overwrite`` must not delete what retrogen did not write. Files loose beside the
        ImageFolder are not part of it (the service's evaluation job writes its report there first).

        Raises:
            OutputExistsError: with one line saying what is there and what to do.
        """
        folder = cls(path)
        where = folder.path
        if where.exists() and not where.is_dir():
            raise OutputExistsError(f"{where} is a file; the output must be a new or empty folder")
        if not where.is_dir():
            return
        content = sorted(e.name for e in os.scandir(where) if e.is_dir() or e.name in (PROVENANCE_FILE, SUMMARY_FILE))
        if not content:
            return
        if not (folder.is_complete or folder.has_provenance):
            shown = ", ".join(content[:3]) + (", ..." if len(content) > 3 else "")
            raise OutputExistsError(f"{where} is not empty ({shown}) and holds no augmentation output; choose a "
                                    "new or empty output folder (overwriting replaces only an earlier output)")
        found = folder._methods()
        if methods is not None and not found <= set(methods):
            raise OutputExistsError(f"{where} holds the output of another command (method "
                                    f"{', '.join(sorted(found))}); choose another output folder")
        if not overwrite:
            what = f"an augmentation output ({SUMMARY_FILE})" if folder.is_complete else \
                f"an interrupted augmentation output ({PROVENANCE_FILE} without {SUMMARY_FILE})"
            raise OutputExistsError(f"{where} already holds {what}; choose another output folder or overwrite "
                                    "it (--overwrite, overwrite=True)")

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False,
               methods: Collection[str] | None = None) -> OutputWriter:
        """A writer for a new output folder at ``path``; with ``overwrite`` an earlier output there is cleared.

        Raises:
            OutputExistsError: ``path`` cannot take a new output (see :meth:`check_writable`).
        """
        cls.check_writable(path, overwrite=overwrite, methods=methods)
        folder = cls(path)
        if overwrite and (folder.is_complete or folder.has_provenance):
            folder._clear()
        return OutputWriter(folder)

    def _clear(self) -> None:
        """Delete everything in the folder, the summary first: a half-cleared folder is never complete."""
        (self.path / SUMMARY_FILE).unlink(missing_ok=True)
        for entry in os.scandir(self.path):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def rewrite(self, kept: list[dict[str, Any]], rejected: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Move ``rejected`` images under ``rejected/`` and keep ``kept``'s records, then the new summary.

        Files move first and records are rewritten after, each atomically, so a crash leaves every listed
        record's image in place; ``rejected/provenance.jsonl`` accumulates across filters.
        """
        for r in rejected:
            dst = self.path / REJECTED_DIR / r["file"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.file(r), dst)
        if rejected:
            with open(self.path / REJECTED_DIR / PROVENANCE_FILE, "ab") as f:
                f.write(_jsonl(rejected))
        atomic_write_bytes(self.path / PROVENANCE_FILE, _jsonl(kept))
        self.write_summary(summary)


class OutputWriter:
    """Writes images + provenance records into an output folder; ``close(summary)`` completes it.

    Images are written atomically; ``provenance.jsonl`` gets one line per image once the image is on disk,
    and the summary comes last, so a folder with a summary is complete.
    """

    def __init__(self, folder: OutputFolder):
        self.folder = folder
        folder.path.mkdir(parents=True, exist_ok=True)
        self._prov: IO[str] = open(folder.path / PROVENANCE_FILE, "w", encoding="utf-8")  # noqa: SIM115
        self.records: list[dict[str, Any]] = []

    @property
    def out_dir(self) -> Path:
        return self.folder.path

    def add(self, *, label: str, filename: str, image_bytes: bytes, method: str, fields: dict[str, Any]) -> dict:
        """Write one image as ``<label>/<filename>`` and its record (common fields + the backend's ``fields``)."""
        rel = f"{safe_class_dir(label)}/{filename}"
        atomic_write_bytes(self.folder.path / rel, image_bytes)
        record = common_fields(label=label, method=method, image_bytes=image_bytes, file=rel) | fields
        self._prov.write(json.dumps(record, default=str) + "\n")
        self._prov.flush()
        self.records.append(record)
        return record

    def close(self, summary: dict[str, Any]) -> None:
        self._prov.close()
        self.folder.write_summary(summary)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._prov.closed:
            self._prov.close()


@dataclass(frozen=True)
class AugmentResult:
    """What an augmentation call returns: where the output folder is, and its summary (as in summary.json)."""

    out_dir: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {label: c["returned"] for label, c in self.summary.get("per_class", {}).items()}
