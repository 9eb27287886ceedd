"""The file mechanics every package shares: atomic writes, a folder lock, sha256 of bytes, files and trees,
image-type sniffing, and reading an item's stored bytes (a local file, a tar member at its offset, or an fsspec URL).

One implementation of each, so that two packages can never disagree on what a hash or a file type is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .imageio import IMAGE_EXTENSIONS

#: The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# -- atomic writes ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it gets the usual file mode and replaces ``path``.

    Readers never see half a file under the final name. ``suffix`` keeps an extension a writer insists on
    (``np.save`` appends ``.npy`` otherwise). The mode is what ``open()`` would give (0666 & ~umask), not
    mkstemp's private 0600: indexes and outputs are read by other users (the service).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON; values JSON cannot hold (paths, datetimes) are written as strings."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def remove_temp_files(*folders: str | os.PathLike) -> int:
    """Delete leftovers of interrupted atomic writes (``.NAME.*.tmp*``) in ``folders``; returns how many."""
    n = 0
    for folder in map(Path, folders):
        if folder.is_dir():
            for p in folder.glob(".*.tmp*"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
    return n



@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock held on ``folder`` itself (made if missing): flock, so processes of this host (and
    threads, each with its own call) take turns; no lock where there is no flock, so callers must stay correct
    without it (atomic renames, markers)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

# -- hashes -----------------------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_files(root: str | os.PathLike, *, skip: Callable[[str], bool] | None = None) -> list[str]:
    """Relative POSIX paths of the regular files under ``root``, sorted; links are never followed.

    ``skip(relative_path)`` leaves files out (markers, metadata).
    """
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not Path(dirpath, d).is_symlink()]
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                rel = p.relative_to(root).as_posix()
                if skip is None or not skip(rel):
                    out.append(rel)
    return sorted(out)


def sha256_tree(root: str | os.PathLike, files: Iterable[str] | None = None, *,
                file_digest: Callable[[Path], str] = sha256_file) -> str:
    """sha256 over ``relative path NUL file sha256 LF`` of each file (default: all of :func:`tree_files`).

    The one content address of a folder: stored datasets and results, artefacts and model weights.
    """
    h = hashlib.sha256()
    for rel in sorted(files) if files is not None else tree_files(root):
        h.update(f"{rel}\x00{file_digest(Path(root, rel))}\n".encode())
    return h.hexdigest()


# -- image types ------------------------------------------------------------------------------------------------

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))
_EXTENSION = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/bmp": ".bmp",
              "image/webp": ".webp", "image/tiff": ".tif"}


def sniff_image_type(data: bytes) -> str | None:
    """The image media type the bytes' magic number says, or None."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def media_type(data: bytes, name: str | None = None) -> str:
    """The content type to serve image bytes with: magic numbers first (names lie), then the file name.

    Never SVG (scriptable): crawled bytes must not run in our origin.
    """
    sniffed = sniff_image_type(data)
    if sniffed:
        return sniffed
    guessed = mimetypes.guess_type(name or "")[0]
    if guessed and guessed.startswith("image/") and "svg" not in guessed:
        return guessed
    return "application/octet-stream"


def image_extension(data: bytes, name: str | None = None, *, default: str = ".bin") -> str:
    """A file extension for image bytes: the name's own when it is an image's, else the sniffed type's."""
    ext = os.path.splitext(name or "")[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return ext
    return _EXTENSION.get(sniff_image_type(data) or "", default)


# -- stored bytes -----------------------------------------------------------------------------------------------

def read_source_bytes(source: str, *, offset: int | None = None, size: int | None = None) -> bytes:
    """The bytes of a corpus item: a whole file, or ``size`` bytes at ``offset`` (a tar member's data).

    ``source`` is a local path or an fsspec URL (``s3://...``). Raises OSError (FileNotFoundError when the
    file is gone) and when the file is shorter than the recorded size.
    """
    if "://" in source:
        import fsspec

        opened = fsspec.open(source, "rb").open()
    else:
        opened = open(source, "rb")  # noqa: SIM115  (closed below)
    with opened as f:
        if offset is not None:
            f.seek(offset)
        data = f.read() if size is None else f.read(size)
    if size is not None and len(data) != size:
        raise OSError(f"{source}: {len(data)} bytes at offset {offset}, {size} recorded (truncated?)")
    return data
