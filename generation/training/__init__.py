"""Per-class personalisation trainers (Textual Inversion, DreamBooth LoRA / full), registered by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_TRAINERS: dict[str, Callable[..., Any]] = {}


def register_trainer(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TRAINERS[name] = fn
        return fn

    return deco


def list_trainers() -> list[str]:
    from . import dreambooth, textual_inversion  # noqa: F401  (registration)

    return sorted(_TRAINERS)


def get_trainer(name: str) -> Callable[..., Any]:
    from retrogen.errors import UnknownComponentError

    from . import dreambooth, textual_inversion  # noqa: F401  (registration)

    if name not in _TRAINERS:
        raise UnknownComponentError("trainer", name, list(_TRAINERS))
    return _TRAINERS[name]
