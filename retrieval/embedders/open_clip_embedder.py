"""open_clip image-text embedder: ``open_clip:MODEL[:PRETRAINED_TAG_OR_CHECKPOINT]``.

MODEL is an open_clip architecture name (``ViT-B-32``), or ``local-dir:/path`` / ``hf-hub:org/repo`` (open_clip's
own schemes: ``open_clip_config.json`` + weights in the folder). The second part is a pretrained tag
(``laion2b_s34b_b79k``, downloaded by open_clip into its cache) or a local checkpoint file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from retrogen.errors import InvalidInputError, NotFoundError

from . import register_embedder
from .base import Embedder, l2_normalize

DEFAULT = "open_clip:ViT-B-32:laion2b_s34b_b79k"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"ViT-B-32:laion2b"`` -> (model, tag); schemes keep their colon: ``"local-dir:/p"`` -> ("local-dir:/p", None)."""
    for scheme in ("local-dir:", "hf-hub:"):
        if spec.startswith(scheme):
            return spec, None
    model, _, pretrained = spec.partition(":")
    return model, (pretrained or None)


@register_embedder("open_clip")
class OpenClipEmbedder(Embedder):
    supports_text = True

    def __init__(self, spec: str, *, device: str = "cpu"):
        import open_clip
        import torch

        if not spec:
            raise InvalidInputError(f"open_clip needs a model, e.g. {DEFAULT}")
        model_name, pretrained = parse_spec(spec)
        if model_name.startswith("local-dir:"):
            folder = Path(model_name.removeprefix("local-dir:")).expanduser().resolve()
            if not (folder / "open_clip_config.json").is_file():
                raise NotFoundError(f"{folder} is not an open_clip model folder (no open_clip_config.json)")
            model_name = f"local-dir:{folder}"
        elif not model_name.startswith("hf-hub:") and model_name not in open_clip.list_models():
            raise InvalidInputError(
                f"unknown open_clip model {model_name!r}; e.g. ViT-B-32, ViT-L-14 (open_clip.list_models() has all)"
            )
        if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            path = Path(pretrained).expanduser().resolve()
            if not path.is_file():
                raise NotFoundError(f"open_clip checkpoint not found: {path}")
            pretrained = str(path)
        self.name = "open_clip:" + model_name + (f":{pretrained}" if pretrained else "")
        self.model_name, self.pretrained, self.device = model_name, pretrained, device
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        except (RuntimeError, ValueError, OSError) as e:
            raise InvalidInputError(f"cannot load {self.name}: {e}") from e
        self._model = model.eval()
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self._torch = torch
        with torch.inference_mode():
            self.dim = int(self._model.encode_text(self._tokenizer(["a"]).to(device)).shape[-1])

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self._preprocess(image).numpy()

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return l2_normalize(self._model.encode_image(x).float().cpu().numpy())

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._torch.inference_mode():
            feats = self._model.encode_text(self._tokenizer(list(texts)).to(self.device))
            return l2_normalize(feats.float().cpu().numpy())

    def manifest_entry(self) -> dict:
        return super().manifest_entry() | {
            "family": "open_clip", "model": self.model_name, "pretrained": self.pretrained,
        }
