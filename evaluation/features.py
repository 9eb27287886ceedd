"""Images -> feature vectors for the linear probe and the leakage check, cached by image bytes.

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
from retrogen.imageio import decode_image
from retrogen.retrieval.embedders import create_embedder, l2_normalize

from .errors import InvalidEvaluationError

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
class Features:
    """One image set's feature vectors (L2-normalised rows), with each image's id and sha256 in the same order."""

    vecs: np.ndarray
    ids: list[str]
    shas: list[str]


class FeatureCache:
    """Feature vectors keyed by (embedder name, sha256 of the image bytes), shared across evaluations."""

    def __init__(self) -> None:
        self._vecs: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._vecs)

    def embed_files(self, embedder, paths: list[Path], *, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
        """(n, dim) features of ``paths`` and their sha256s; decoded through retrogen.imageio."""
        shas, todo, todo_keys = [], [], []
        for p in paths:
            data = Path(p).read_bytes()
            sha = sha256_bytes(data)
            shas.append(sha)
            key = (embedder.name, sha)
            if key not in self._vecs and key not in todo_keys:
                todo.append(data)
                todo_keys.append(key)
        for i in range(0, len(todo), batch_size):
            images = [decode_image(d) for d in todo[i : i + batch_size]]
            vecs = embedder.embed_images(images, batch_size=batch_size)
            for key, v in zip(todo_keys[i : i + batch_size], vecs, strict=True):
                self._vecs[key] = np.asarray(v, np.float32)
        if todo:
            log.debug("embedded %d new images with %s", len(todo), embedder.name)
        dim = embedder.dim
        out = np.stack([self._vecs[(embedder.name, s)] for s in shas]) if shas else np.zeros((0, dim), np.float32)
        return out, shas


def load_pixels(paths: list[Path], side: int = 32) -> np.ndarray:
    """(n, 3, side, side) float32 in [0, 1] for the CNN classifier."""
    if not paths:
        return np.zeros((0, 3, side, side), np.float32)
    arr = [np.asarray(decode_image(Path(p).read_bytes()).resize((side, side), Image.BILINEAR), np.float32)
           for p in paths]
    return (np.stack(arr) / 255.0).transpose(0, 3, 1, 2).copy()
