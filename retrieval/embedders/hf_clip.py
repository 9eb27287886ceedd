"""Hugging Face transformers CLIP embedder: ``hf:ID_OR_DIR`` (a ``CLIPModel`` + its processor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from retrogen.errors import InvalidInputError, NotFoundError

from . import register_embedder
from .base import Embedder, l2_normalize


def _features(out):
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return out if hasattr(out, "shape") else out.pooler_output


@register_embedder("hf")
class HFClipEmbedder(Embedder):
    supports_text = True

    def __init__(self, spec: str, *, device: str = "cpu"):
        import torch
        from transformers import AutoProcessor, CLIPModel

        if not spec:
            raise InvalidInputError("hf needs a model id or folder, e.g. hf:openai/clip-vit-base-patch32")
        source = spec
        local = Path(spec).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise NotFoundError(f"{local} is not a transformers model folder (no config.json)")
            source = str(local.resolve())
        self.name = f"hf:{source}"
        self.source, self.device = source, device
        try:
            self._model = CLIPModel.from_pretrained(source).to(device).eval()
            self._processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"cannot load CLIP model {source!r}: {e}") from e
        self._torch = torch
        self.dim = int(self._model.config.projection_dim)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self._processor.image_processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return l2_normalize(_features(self._model.get_image_features(pixel_values=x)).float().cpu().numpy())

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tok = self._processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with self._torch.inference_mode():
            out = self._model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                attention_mask=tok["attention_mask"].to(self.device))
            return l2_normalize(_features(out).float().cpu().numpy())

    def manifest_entry(self) -> dict:
        return super().manifest_entry() | {"family": "hf", "model": self.source, "pretrained": None}
