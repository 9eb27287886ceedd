"""Prompt strategies (templates, ensembles, per-class prompt lists) and per-image seeds."""

from __future__ import annotations

import hashlib

from .config import GenerationConfig

#: A short ensemble from CLIP's ImageNet prompt set (Radford et al. 2021), as used for SD augmentation.
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a bright photo of a {}",
    "a cropped photo of a {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a photo of the large {}",
    "a photo of the small {}",
)


def expand_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    """Replace the name ``ensemble`` by :data:`ENSEMBLE_TEMPLATES`, keeping order and dropping repeats."""
    out: list[str] = []
    for t in templates:
        for x in ENSEMBLE_TEMPLATES if t == "ensemble" else (t,):
            if x not in out:
                out.append(x)
    return tuple(out)


def class_subject(label: str, config: GenerationConfig) -> str:
    """The words a prompt uses for a class: its configured name, else the label with separators as spaces."""
    if config.class_names and label in config.class_names:
        return config.class_names[label]
    return label.replace("_", " ").replace("-", " ")


def class_prompts(label: str, config: GenerationConfig, *, subject: str | None = None) -> list[str]:
    """Prompts for one class, used round-robin by image index.

    The user's own prompt list for the class wins; otherwise each template is filled with ``subject``
    (default: the class name; personalisation passes its learned token).
    """
    if subject is None and config.class_prompts and label in config.class_prompts:
        return list(config.class_prompts[label])
    subject = subject if subject is not None else class_subject(label, config)
    return [t.format(subject) for t in expand_templates(config.prompt_templates)]


def derive_seed(base_seed: int, label: str, index: int) -> int:
    """A 63-bit seed that depends only on (base seed, label, index), not on batch size or class order."""
    digest = hashlib.sha256(f"{base_seed}\x00{label}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
