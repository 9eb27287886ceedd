"""Prompt strategies (templates, the ``ensemble`` set, per-class prompt lists) and per-image seeds.

The template texts are the shared ones of :mod:`retrogen.prompts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrogen.fileio import sha256_bytes
from retrogen.prompts import GENERATION_TEMPLATES, fill, readable

if TYPE_CHECKING:
    from .config import GenerationConfig


def expand_templates(templates: tuple[str, ...]) -> tuple[str, ...]:
    """Replace the name ``ensemble`` by ``GENERATION_TEMPLATES``, keeping order and dropping repeats."""
    out: list[str] = []
    for t in templates:
        for x in GENERATION_TEMPLATES if t == "ensemble" else (t,):
            if x not in out:
                out.append(x)
    return tuple(out)


def class_subject(label: str, config: GenerationConfig) -> str:
    """The words a prompt uses for a class: its configured name, else the label as words."""
    if config.class_names and label in config.class_names:
        return config.class_names[label]
    return readable(label)


def class_prompts(label: str, config: GenerationConfig, *, subject: str | None = None) -> list[str]:
    """Prompts for one class, used round-robin by image index.

    The user's own prompt list for the class wins; otherwise each template is filled with ``subject``
    (default: the class name; personalisation passes its learned token).
    """
    if subject is None:
        if config.class_prompts and label in config.class_prompts:
            return list(config.class_prompts[label])
        subject = class_subject(label, config)
    return fill(expand_templates(config.prompt_templates), subject)


def derive_seed(base_seed: int, label: str, index: int) -> int:
    """A 63-bit seed that depends only on (base seed, label, index), not on batch size or class order."""
    digest = sha256_bytes(f"{base_seed}\x00{label}\x00{index}".encode())
    return int(digest[:16], 16) & ((1 << 63) - 1)  # the digest's first 8 bytes, big-endian
