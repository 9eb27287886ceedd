"""Turning an upload (zip, tar, or JSON manifest) into a validated ImageFolder, then a stored dataset.

Everything is checked before anything is stored: sizes, member types and paths (no absolute paths, ``..``,
links or devices), the ``class/image`` layout, image count, and every image is probed and decoded through
``retrogen.imageio`` (non-images, truncated files and pixel bombs are refused). Files are staged in a
private temporary folder that is removed whatever happens, so a refused upload leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import functools
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from retrogen.errors import InvalidInputError
from retrogen.fileio import image_extension
from retrogen.imagefolder import DatasetLayoutError, safe_class_dir
from retrogen.imageio import BadImageError, decode_image, is_image_path, probe_image

from ..core.config import Settings
from ..core.errors import ForbiddenError, PayloadTooLargeError

#: Names archivers add that are not part of the dataset and are skipped silently.
_JUNK_DIRS = ("__MACOSX",)
#: A path component on every common filesystem is at most this many bytes.
MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int
    max_dataset_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_images_per_dataset: int
    max_dataset_pixels: int = 500_000_000
    max_concurrent_decodes: int = 2

    @classmethod
    def from_settings(cls, s: Settings) -> UploadLimits:
        return cls(s.max_upload_bytes, s.max_dataset_bytes, s.max_image_bytes, s.max_image_pixels,
                   s.max_images_per_dataset, s.max_dataset_pixels, s.max_concurrent_decodes)


_slots_guard = threading.Lock()
_slots: tuple[int, threading.BoundedSemaphore] | None = None


def decode_slots(size: int) -> threading.BoundedSemaphore:
    """The process-wide bound on upload images decoded at once (``max_concurrent_decodes``).

    Checking an image means decoding it, and a few KB of PNG can decode to gigabytes: eight concurrent uploads
    once took a server from 1.5 to 5 GB. Decodes past the bound wait here. A different ``size`` (another app
    in the same process) replaces the semaphore; holders release the one they took.
    """
    global _slots
    with _slots_guard:
        if _slots is None or _slots[0] != size:
            _slots = (size, threading.BoundedSemaphore(max(1, size)))
        return _slots[1]


def check_name(text: str, what: str, where: str) -> None:
    """A label or file name the filesystem (and the database) can hold: UTF-8, no control characters (NUL
    included), at most 255 bytes."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"{where}: the {what} is not valid UTF-8") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidInputError(f"{where}: the {what} contains a control character")
    if size > MAX_NAME_BYTES:
        raise InvalidInputError(f"{where}: the {what} is {size} bytes long; at most {MAX_NAME_BYTES} are accepted")


@dataclass(frozen=True)
class StagedDataset:
    root: Path  # a temporary ImageFolder; the caller stores it and removes ``root``'s parent
    classes: dict[str, int]
    num_images: int
    num_bytes: int


class _Stager:
    """Collects (label, name, bytes) into a temporary ImageFolder, enforcing the limits as it goes."""

    def __init__(self, limits: UploadLimits, tmp_parent: Path):
        self.limits = limits
        tmp_parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_parent))
        self.root = self.tmp / "dataset"
        self.root.mkdir()
        self.classes: dict[str, int] = {}
        self.num_bytes = 0
        self.num_pixels = 0

    def add(self, label: str, name: str, data: bytes, where: str) -> None:
        n = sum(self.classes.values())
        if n >= self.limits.max_images_per_dataset:
            raise PayloadTooLargeError(f"more than {self.limits.max_images_per_dataset} images in one dataset")
        if len(data) > self.limits.max_image_bytes:
            raise PayloadTooLargeError(f"{where}: {len(data)} bytes exceeds the {self.limits.max_image_bytes}-byte "
                                       "limit per image")
        self.num_bytes += len(data)
        if self.num_bytes > self.limits.max_dataset_bytes:
            raise PayloadTooLargeError(f"dataset exceeds {self.limits.max_dataset_bytes} bytes when unpacked")
        check_name(label, "class name", where)
        check_name(name, "file name", where)
        try:
            safe_class_dir(label)
            if label.startswith("."):
                raise DatasetLayoutError(f"class name {label!r} cannot start with '.'")
        except DatasetLayoutError as e:
            raise InvalidInputError(f"{where}: {e}") from None
        if not is_image_path(name) or name.startswith(".") or "/" in name or "\\" in name:
            raise InvalidInputError(f"{where}: not an image file name (expected one of .jpg .png .webp .bmp .gif "
                                    ".tif in class_name/image layout)")
        self.check_image(data, where)
        dest = self.root / label / name
        if dest.exists():
            raise InvalidInputError(f"{where}: duplicate file {label}/{name}")
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(data)
        self.classes[label] = self.classes.get(label, 0) + 1

    def check_image(self, data: bytes, where: str) -> None:
        """Decode the image to prove it whole, after its header has been charged to the dataset's pixel budget
        (so a pile of tiny pixel bombs is refused before any is decoded), one of a bounded few at a time."""
        limits = self.limits
        try:
            info = probe_image(data, max_pixels=limits.max_image_pixels)
            self.num_pixels += info.width * info.height
            if self.num_pixels > limits.max_dataset_pixels:
                raise PayloadTooLargeError(f"{where}: the dataset's images add up to more than "
                                           f"{limits.max_dataset_pixels} pixels when decoded")
            with decode_slots(limits.max_concurrent_decodes):
                decode_image(data, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes)
        except BadImageError as e:
            raise InvalidInputError(f"{where}: not a usable image ({e})") from None

    def finish(self) -> StagedDataset:
        if not self.classes:
            raise InvalidInputError("the upload holds no images; expected class_name/image files")
        return StagedDataset(self.root, dict(sorted(self.classes.items())), sum(self.classes.values()), self.num_bytes)

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _split_member(name: str, strip: str | None) -> tuple[str, str] | None:
    """``label/file`` of an archive member, or None for entries to skip (folders, junk, hidden files)."""
    parts = PurePosixPath(name).parts
    if strip and parts and parts[0] == strip:
        parts = parts[1:]
    if not parts or any(p.startswith(".") for p in parts) or parts[0] in _JUNK_DIRS:
        return None
    if len(parts) == 1:
        raise DatasetLayoutError(f"{name!r} is at the top level; expected class_name/image files")
    if len(parts) > 2:
        raise DatasetLayoutError(f"{name!r} is nested too deep; expected class_name/image files")
    return parts[0], parts[1]


def _check_member_path(name: str) -> None:
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise InvalidInputError(f"archive member {name!r} has an absolute path; refused")
    if ".." in PurePosixPath(name).parts:
        raise InvalidInputError(f"archive member {name!r} points outside the archive folder; refused")


def _wrapper_dir(names: list[str]) -> str | None:
    """If every file sits under one top folder holding class folders (``data/cat/1.jpg``), that folder."""
    files = [PurePosixPath(n).parts for n in names if not n.endswith("/")]
    files = [p for p in files if p and p[0] not in _JUNK_DIRS and not any(x.startswith(".") for x in p)]
    tops = {p[0] for p in files}
    if len(tops) == 1 and all(len(p) >= 3 for p in files):
        return tops.pop()
    return None


_ARCHIVE_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, NotImplementedError,
                        RuntimeError, lzma.LZMAError)


def _check_totals(num_members: int, declared_bytes: int, limits: UploadLimits) -> None:
    """Refuse what the archive's own directory gives away before reading a byte: millions of tiny entries
    (they cost time before any image limit triggers), or a declared unpacked size over the limit. Declared
    sizes can lie; each member is capped again while it is read."""
    cap = 2 * limits.max_images_per_dataset + 1000  # room for folders and skipped junk
    if num_members > cap:
        raise PayloadTooLargeError(f"archive has {num_members} entries; at most {cap} are accepted")
    if declared_bytes > limits.max_dataset_bytes:
        raise PayloadTooLargeError(f"archive unpacks to {declared_bytes} bytes, over the "
                                   f"{limits.max_dataset_bytes}-byte limit")


def _read_capped(f: IO[bytes], cap: int, where: str) -> bytes:
    data = f.read(cap + 1)  # never trust the declared size: a bomb lies about it
    if len(data) > cap:
        raise PayloadTooLargeError(f"{where}: more than {cap} bytes when decompressed")
    return data


def stage_zip(path: Path, stager: _Stager) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise InvalidInputError(f"not a valid zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            _check_member_path(info.filename)
            mode = (info.external_attr >> 16) & 0o170000
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise InvalidInputError(f"archive member {info.filename!r} is a link or special file; refused")
            if info.flag_bits & 0x1:
                raise InvalidInputError(f"archive member {info.filename!r} is encrypted")
        _check_totals(len(infos), sum(i.file_size for i in infos), stager.limits)
        strip = _wrapper_dir([i.filename for i in infos])
        _stage_members(stager, [(i.filename, i.is_dir(), functools.partial(zf.open, i)) for i in infos], strip)


def stage_tar(path: Path, stager: _Stager) -> None:
    try:
        tf = tarfile.open(path, mode="r:*")
    except tarfile.TarError as e:
        raise InvalidInputError(f"not a valid tar archive ({e})") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InvalidInputError(f"corrupt tar archive ({e})") from None
        for m in members:
            _check_member_path(m.name)
            if m.issym() or m.islnk():
                raise InvalidInputError(f"archive member {m.name!r} is a link; refused")
            if not (m.isfile() or m.isdir()):
                raise InvalidInputError(f"archive member {m.name!r} is a special file; refused")
        _check_totals(len(members), sum(m.size for m in members), stager.limits)
        strip = _wrapper_dir([m.name + ("/" if m.isdir() else "") for m in members])
        _stage_members(stager, [(m.name, m.isdir(), functools.partial(tf.extractfile, m)) for m in members], strip)


def _stage_members(stager: _Stager, members: list[tuple[str, bool, Callable[[], IO[bytes] | None]]],
                   strip: str | None) -> None:
    """Stage each file member (name, is a folder, opener) of a checked archive; each read is capped, since a
    member's declared size can lie."""
    for name, is_dir, open_member in members:
        split = None if is_dir else _split_member(name, strip)
        if split is None:
            continue
        try:
            f = open_member()
            if f is None:
                raise InvalidInputError(f"archive member {name!r} cannot be read")
            with f:
                data = _read_capped(f, stager.limits.max_image_bytes, name)
        except _ARCHIVE_READ_ERRORS as e:
            raise InvalidInputError(f"archive member {name!r} cannot be read ({e})") from None
        stager.add(*split, data, where=name)


def stage_archive(path: Path, limits: UploadLimits, tmp_parent: Path) -> StagedDataset:
    """Validate a zip or tar (optionally gz/bz2/xz) file into a temporary ImageFolder.

    Raises:
        InvalidInputError (422) / PayloadTooLargeError (413) naming the offending member.
    """
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise PayloadTooLargeError(f"upload of {size} bytes exceeds the {limits.max_upload_bytes}-byte limit")
    stager = _Stager(limits, tmp_parent)
    try:
        if zipfile.is_zipfile(path):
            stage_zip(path, stager)
        elif _is_tar(path):
            stage_tar(path, stager)
        else:
            raise InvalidInputError("the upload is neither a zip nor a tar archive of class_name/image files")
        return stager.finish()
    except DatasetLayoutError as e:
        stager.cleanup()
        raise InvalidInputError(str(e)) from None
    except BaseException:
        stager.cleanup()
        raise


def _is_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, mode="r:*") as tf:
            tf.next()
        return True
    except (tarfile.TarError, EOFError, OSError):
        return False


def _read_server_file(path: str, root: Path | None, limits: UploadLimits, where: str) -> tuple[str, bytes]:
    """(file name, bytes) of a manifest's server-side ``path``: only under ``root`` (links followed)."""
    if root is None:
        raise ForbiddenError(f"{where}: this server reads no server-side paths (server_root is not set)")
    if "\x00" in path:
        raise InvalidInputError(f"{where}: the path contains a NUL character")
    try:
        p = Path(path)
        resolved = (p if p.is_absolute() else root / p).resolve()
        if not resolved.is_relative_to(root):
            raise ForbiddenError(f"{where}: path {path!r} is outside the server's allowed root")
        if not resolved.is_file():
            raise InvalidInputError(f"{where}: no such file {path!r} under the server root")
        if resolved.stat().st_size > limits.max_image_bytes:
            raise PayloadTooLargeError(f"{where}: file exceeds the per-image limit")
        return resolved.name, resolved.read_bytes()
    except OSError as e:  # a name too long for the filesystem, a folder that cannot be read...
        raise InvalidInputError(f"{where}: path {path!r} cannot be read ({e.strerror or type(e).__name__})") from None


def _decode_data(data: str, limits: UploadLimits, where: str) -> bytes:
    if len(data) > limits.max_image_bytes * 4 // 3 + 4:
        raise PayloadTooLargeError(f"{where}: image exceeds {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{where}: data is not valid base64 ({e})") from None


def stage_manifest(items: list[dict[str, Any]], limits: UploadLimits, tmp_parent: Path,
                   server_root: Path | None) -> StagedDataset:
    """Validate a JSON manifest (``{label, data: base64, filename?}`` or ``{label, path}``) into an ImageFolder.

    Paths are read only when ``server_root`` is configured, and only if they resolve (links followed)
    inside it.
    """
    stager = _Stager(limits, tmp_parent)
    root = server_root.resolve() if server_root else None
    try:
        for i, item in enumerate(items):
            where = f"images[{i}]"
            if item.get("path") is not None:
                name, raw = _read_server_file(item["path"], root, limits, where)
            else:
                raw = _decode_data(item.get("data") or "", limits, where)
                name = f"{i:06d}{image_extension(raw, default='.png')}"
            stager.add(item["label"], item.get("filename") or name, raw, where)
        return stager.finish()
    except BaseException:
        stager.cleanup()
        raise


def cleanup_staged(staged: StagedDataset) -> None:
    shutil.rmtree(staged.root.parent, ignore_errors=True)


def save_upload_stream(chunks, dest_dir: Path, max_bytes: int) -> Path:
    """Write an incoming stream of byte chunks to a temp file, stopping at ``max_bytes`` (413)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".bin", dir=dest_dir)
    total = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                total += len(chunk)
                if total > max_bytes:
                    raise PayloadTooLargeError(f"upload exceeds the {max_bytes}-byte limit")
                f.write(chunk)
        return Path(name)
    except BaseException:
        os.unlink(name)
        raise
