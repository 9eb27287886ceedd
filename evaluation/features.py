"""Images -> what an evaluation needs of them (features, fingerprints, small pixels), cached by image bytes.

Features come from a ``retrieval`` embedder (``efficientnet-lite0``, ``open_clip:...``, ``hf:...``), or from
``pixels[:SIDE]``: the image resized to SIDE x SIDE greyscale, centred and L2-normalised. ``pixels`` needs no
weights and is what the tests use; it is a weak feature, but a fair one to compare methods with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from retrogen.fileio import sha256_bytes
from retrogen.imagefolder import LabelledImage
from retrogen.imageio import BadImageError, decode_image
from retrogen.retrieval.embedders import create_embedder, l2_normalize

from .copies import Fingerprint, FingerprintSet, fingerprint
from .errors import InvalidEvaluationError

PIXEL_SIDE = 32  # the cnn's input size

log = logging.getLogger(__name__)


class PixelEmbedder:
    """``pixels:SIDE``: downsampled greyscale pixels, mean-removed and L2-normalised (no model)."""

    supports_text = False

    def __init__(self, side: int = 16):
        if not 4 <= side <= 128:
            raise InvalidEvaluationError(f"pixels side must be in [4, 128], got {side}")
        self.side = side
        self.name = f"pixels:{side}"
        self.dim = side * side

    def embed_images(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        x = np.stack([np.asarray(im.convert("L").resize((self.side, self.side), Image.BILINEAR), np.float32)
                      for im in images]).reshape(len(images), -1) / 255.0
        return l2_normalize(x - x.mean(axis=1, keepdims=True))


def resolve_embedder(name_or_embedder, *, device: str = "cpu"):
    """An embedder object from a name (``pixels[:SIDE]`` or any ``retrieval`` embedder name), or itself."""
    if not isinstance(name_or_embedder, str):
        return name_or_embedder
    family, _, spec = name_or_embedder.partition(":")
    if family == "pixels":
        try:
            return PixelEmbedder(int(spec) if spec else 16)
        except ValueError:
            raise InvalidEvaluationError(f"pixels embedder takes an integer side, got {spec!r}") from None
    return create_embedder(name_or_embedder, device=device)


@dataclass(frozen=True)
class ImageData:
    """One image set decoded once: embedder features, copy-detection fingerprints and small pixels (the cnn's),
    in the set's order."""

    ids: list[str]
    labels: list[str]
    vecs: np.ndarray  # (n, dim) L2-normalised
    prints: list[Fingerprint]
    pixels: np.ndarray  # (n, PIXEL_SIDE, PIXEL_SIDE, 3) uint8

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: np.ndarray | list[int]) -> ImageData:
        index = np.asarray(index, np.int64)
        return ImageData([self.ids[i] for i in index], [self.labels[i] for i in index], self.vecs[index],
                         [self.prints[i] for i in index], self.pixels[index])

    def without(self, ids: set[str]) -> ImageData:
        """The set minus the images named in ``ids``."""
        return self.take([i for i, name in enumerate(self.ids) if name not in ids]) if ids else self

    def classes(self, names: list[str]) -> np.ndarray:
        """Each image's class index in ``names``."""
        index = {c: i for i, c in enumerate(names)}
        return np.array([index[label] for label in self.labels], np.int64)

    def fingerprints(self) -> FingerprintSet:
        return FingerprintSet(self.ids, self.prints, self.vecs)

    def pixels_chw(self) -> np.ndarray:
        """(n, 3, side, side) float32 in [0, 1] for the cnn."""
        return (self.pixels.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()


@dataclass(frozen=True)
class _Decoded:
    vec: np.ndarray
    print: Fingerprint
    pixels: np.ndarray


class FeatureCache:
    """Decoded images keyed by (embedder name, sha256 of the bytes), shared across evaluations: each image is
    read and decoded once, however many draws and arms use it."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], _Decoded] = {}

    def __len__(self) -> int:
        return len(self._items)

    def load(self, embedder, items: list[LabelledImage], *, batch_size: int = 64) -> ImageData:
        """The set's ImageData. A file that cannot be read or decoded is an error naming its path."""
        keys: list[tuple[str, str]] = []
        todo: dict[tuple[str, str], tuple[Path, bytes]] = {}
        for it in items:
            data = _read(it.path)
            key = (embedder.name, sha256_bytes(data))
            keys.append(key)
            if key not in self._items:
                todo.setdefault(key, (it.path, data))
        pending = list(todo.items())
        for start in range(0, len(pending), batch_size):
            self._decode(embedder, pending[start : start + batch_size])
        if pending:
            log.debug("decoded %d new images for %s", len(pending), embedder.name)
        got = [self._items[k] for k in keys]
        return ImageData(ids=[it.image_id for it in items], labels=[it.label for it in items],
                         vecs=np.stack([g.vec for g in got]) if got else np.zeros((0, embedder.dim), np.float32),
                         prints=[g.print for g in got],
                         pixels=np.stack([g.pixels for g in got]) if got else
                         np.zeros((0, PIXEL_SIDE, PIXEL_SIDE, 3), np.uint8))

    def _decode(self, embedder, batch: list[tuple[tuple[str, str], tuple[Path, bytes]]]) -> None:
        images = []
        for _key, (path, data) in batch:
            try:
                images.append(decode_image(data))
            except BadImageError as e:
                raise InvalidEvaluationError(f"{path}: not a usable image ({e})") from None
        vecs = embedder.embed_images(images, batch_size=len(images))
        for (key, _file), image, vec in zip(batch, images, vecs, strict=True):
            small = np.asarray(image.resize((PIXEL_SIDE, PIXEL_SIDE), Image.BILINEAR), np.uint8)
            self._items[key] = _Decoded(np.asarray(vec, np.float32), fingerprint(image, key[1]), small)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidEvaluationError(f"{path}: cannot be read ({e.strerror or e})") from None
