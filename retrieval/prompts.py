"""Class-name prompts for text queries and zero-shot label checks (CLIP-style template ensembles)."""

from __future__ import annotations

import numpy as np

from .embedders.base import Embedder, l2_normalize

#: A short ensemble from CLIP's ImageNet templates; averaging several is more robust than "a photo of a {}".
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a good photo of a {}.",
)


def readable(class_name: str) -> str:
    """Folder names like ``golden_retriever`` -> ``golden retriever``."""
    return class_name.replace("_", " ").replace("-", " ").strip()


def class_prompts(
    classes: list[str],
    templates: tuple[str, ...] | list[str] = DEFAULT_TEMPLATES,
    class_descriptions: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Prompts per class: user descriptions when given for a class, else templates x readable name."""
    out = {}
    for c in classes:
        if class_descriptions and class_descriptions.get(c):
            out[c] = list(class_descriptions[c])
        else:
            out[c] = [t.format(readable(c)) for t in templates]
    return out


def class_text_embeddings(embedder: Embedder, prompts: dict[str, list[str]]) -> np.ndarray:
    """(num_classes, dim): each class's prompt embeddings averaged then re-normalised (the ensemble)."""
    rows = [embedder.embed_texts(p).mean(axis=0) for p in prompts.values()]
    return l2_normalize(np.stack(rows))
