"""Class-name prompt templates, kept in one place for every package that turns a class into text.

Each set has its own purpose, so they differ on purpose: ``zero-shot`` is averaged in CLIP's text space for
text queries and label checks (a bad or cropped photo is still the class); ``generation`` asks Stable
Diffusion for good photos; ``textual-inversion`` is the Textual Inversion paper's object set, used while
training. ``{}`` is the class name.
"""

from __future__ import annotations

#: From CLIP's ImageNet templates (Radford et al. 2021): averaging several beats "a photo of a {}".
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a good photo of a {}.",
)

#: The same family without the degraded variants, for generating training images.
GENERATION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a bright photo of a {}",
    "a cropped photo of a {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a photo of the large {}",
    "a photo of the small {}",
)

#: From the Textual Inversion paper's object templates (Gal et al. 2022), a subset.
TEXTUAL_INVERSION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of a {}",
)


def readable(label: str) -> str:
    """Folder names as words: ``golden_retriever`` -> ``golden retriever``."""
    return label.replace("_", " ").replace("-", " ").strip()


def fill(templates: tuple[str, ...] | list[str], subject: str) -> list[str]:
    """Each template with ``subject`` in place of ``{}``."""
    return [t.format(subject) for t in templates]
