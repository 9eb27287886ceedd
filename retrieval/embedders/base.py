"""The one small interface every embedder implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image

from retrogen.errors import InvalidInputError


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Embedder(ABC):
    """Maps images (and, for image-text models, texts) to L2-normalised float32 vectors.

    ``preprocess`` is CPU-only and picklable-friendly so it can run in DataLoader workers;
    ``embed_preprocessed`` runs the model on a stacked batch.
    """

    #: canonical name, exactly as written on the command line and recorded in index manifests
    name: str
    dim: int
    supports_text: bool = False

    @property
    def load_name(self) -> str:
        """The name that rebuilds exactly this embedder, runtime included (``name`` says only which vectors it
        makes: the same for every runtime). Readers of an index create its embedder from this."""
        return self.name

    @abstractmethod
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image -> float32 CHW array."""

    @abstractmethod
    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """(n, C, H, W) float32 -> (n, dim) float32, L2-normalised."""

    def embed_images(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(images), batch_size):
            batch = np.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.append(self.embed_preprocessed(batch))
        return np.concatenate(out)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(n,) strings -> (n, dim). Only image-text embedders implement it."""
        raise InvalidInputError(
            f"embedder {self.name!r} is image-only and cannot embed text; use an image-text embedder "
            "such as open_clip:ViT-B-32:laion2b_s34b_b79k or hf:openai/clip-vit-base-patch32"
        )

    def manifest_entry(self) -> dict[str, Any]:
        """What an index manifest records about this embedder."""
        return {
            "name": self.name,
            "load_name": self.load_name,
            "dim": self.dim,
            "normalized": True,
            "modalities": ["image", "text"] if self.supports_text else ["image"],
        }
