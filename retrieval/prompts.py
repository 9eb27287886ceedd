"""Class-name prompts for text queries and zero-shot label checks (CLIP-style template ensembles).

The templates themselves are :data:`retrogen.prompts.ZERO_SHOT_TEMPLATES`; this module turns them into
text embeddings per class.
"""

from __future__ import annotations

import numpy as np

from retrogen.prompts import ZERO_SHOT_TEMPLATES, fill, readable

from .embedders.base import Embedder, l2_normalize


def class_prompts(
    classes: list[str],
    templates: tuple[str, ...] | list[str] = ZERO_SHOT_TEMPLATES,
    class_descriptions: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Prompts per class: user descriptions when given for a class, else templates x readable name."""
    out = {}
    for c in classes:
        if class_descriptions and class_descriptions.get(c):
            out[c] = list(class_descriptions[c])
        else:
            out[c] = fill(templates, readable(c))
    return out


def class_text_embeddings(embedder: Embedder, prompts: dict[str, list[str]]) -> np.ndarray:
    """(num_classes, dim): each class's prompt embeddings averaged then re-normalised (the ensemble)."""
    rows = [embedder.embed_texts(p).mean(axis=0) for p in prompts.values()]
    return l2_normalize(np.stack(rows))
