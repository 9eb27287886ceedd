"""A synchronous query's images, decoded within the server's limits (``/v1/retrieve``, ``/knn-service``)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from PIL import Image

from retrogen.errors import InvalidInputError
from retrogen.imageio import decode_image

from ..core.config import Settings


@dataclass(frozen=True)
class QueryLimits:
    """Bounds on one synchronous query request; the service Settings set each by the same name."""

    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 16 * 1024 * 1024
    max_queries: int = 32
    max_k: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> QueryLimits:
        return cls(settings.max_image_pixels, settings.max_image_bytes, settings.max_queries, settings.max_k)


def decode_base64_image(data: str, *, what: str, limits: QueryLimits) -> tuple[Image.Image, bytes]:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> (RGB PIL image, the decoded bytes).

    Raises:
        InvalidInputError: not base64, too large, or not a safe decodable image (the message names ``what``).
    """
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise InvalidInputError(f"{what}: a data URL must be base64-encoded")
    if len(data) > (limits.max_image_bytes * 4) // 3 + 4:
        raise InvalidInputError(f"{what}: image is larger than {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{what}: not valid base64 ({e})") from None
    try:
        return decode_image(raw, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes), raw
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}: {e}") from None
