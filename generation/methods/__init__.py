"""Generation methods, registered by name (``@register_method("prompt")``) and built by ``create_method``.

Importing this package loads no torch: method modules import heavy libraries inside their functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import GenerationConfig
from ..errors import UnknownMethodError

if TYPE_CHECKING:
    from .base import GenerationMethod

_METHODS: dict[str, type[GenerationMethod]] = {}


def register_method(name: str):
    """Class decorator: make the method available as ``name``."""

    def deco(cls: type[GenerationMethod]) -> type[GenerationMethod]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    from . import personalised, text, variation  # noqa: F401  (registration)


def list_methods() -> list[str]:
    """Names of the available generation methods."""
    _load_builtins()
    return sorted(_METHODS)


def create_method(name: str, config: GenerationConfig) -> GenerationMethod:
    """Raises UnknownMethodError listing the valid names."""
    _load_builtins()
    if name not in _METHODS:
        raise UnknownMethodError(name, list(_METHODS))
    return _METHODS[name](config)
