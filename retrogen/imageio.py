"""Defensive image decoding shared by every retrogen package.

User uploads and crawled corpora contain truncated files, decompression bombs, CMYK/16-bit/paletted
images and things that are not images at all. Everything that turns bytes into pixels goes through
:func:`decode_image`, which either returns an RGB ``PIL.Image`` or raises :class:`BadImageError` with a
short reason; it never returns a partial decode. It is thread-safe (no process-wide state is touched).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

from PIL import Image, ImageOps

from .errors import InvalidInputError

#: Default ceiling on decoded pixels (about 89 MP, PIL's own warning threshold). Larger is treated as a bomb.
DEFAULT_MAX_PIXELS = 89_478_485
#: Default ceiling on encoded bytes per image.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadImageError(InvalidInputError):
    """The bytes are not a decodable, safe-sized image. ``reason`` is a short machine-friendly tag.

    :func:`decode_image` works on bytes and cannot name the file; :func:`read_image_file` does (``path``), as
    ``PATH: not a usable image (reason: detail)``. PIL's own messages name ``<_io.BytesIO object at 0x...>``;
    that part is dropped (it says nothing, and changes per run).
    """

    def __init__(self, reason: str, detail: str = "", *, path: str | os.PathLike | None = None):
        self.reason = reason
        self.detail = _BYTESIO.sub("the data", detail)
        self.path = path
        what = f"{reason}: {self.detail}" if self.detail else reason
        super().__init__(f"{path}: not a usable image ({what})" if path is not None else what)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str | None


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read only the header: size and format, without decoding pixels. Raises BadImageError."""
    # No warnings.catch_warnings() here or below: it swaps the process-wide filter list and is not thread-safe,
    # and decoders run in threads. Our own pixel check replaces PIL's bomb warning; PIL still raises
    # DecompressionBombError past twice its limit, and a truncated file raises OSError on load().
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = im.format
    except Image.DecompressionBombError as e:
        raise BadImageError("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for garbage input
        raise BadImageError("not_an_image", f"{type(e).__name__}: {e}") from None
    if w * h > max_pixels:
        raise BadImageError("too_many_pixels", f"{w}x{h} exceeds {max_pixels} pixels")
    if w < 1 or h < 1:
        raise BadImageError("empty_image", f"{w}x{h}")
    return ImageInfo(w, h, fmt)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode ``data`` fully into an RGB image, applying EXIF orientation.

    Raises:
        BadImageError: empty, oversized, bomb, truncated or undecodable input.
    """
    if not data:
        raise BadImageError("empty_file")
    if len(data) > max_bytes:
        raise BadImageError("file_too_large", f"{len(data)} bytes exceeds {max_bytes}")
    probe_image(data, max_pixels=max_pixels)  # header check before any pixel is allocated
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # raises OSError on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except BadImageError:
        raise
    except Exception as e:
        raise BadImageError("corrupt_image", f"{type(e).__name__}: {e}") from None


def read_image_file(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Read and decode an image file (:func:`decode_image`); the user is told which file is unusable.

    Raises:
        BadImageError: naming ``path``; an unreadable file (permissions, a folder) is reason ``unreadable``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError("unreadable", f"{type(e).__name__}: {e.strerror or e}", path=path) from None
    try:
        return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    except BadImageError as e:
        raise BadImageError(e.reason, e.detail, path=path) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white (as CLIP preprocessing expects)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping to white.
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        return Image.fromarray((a / hi * 255.0).astype("uint8"), "L").convert("RGB")
    return im.convert("RGB")


def is_image_path(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)
