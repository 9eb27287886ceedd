"""Lazy public names for package ``__init__`` modules, so importing a package stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """Return a module ``__getattr__`` that imports ``exports[name]`` on first use, and ``__all__``.

    Usage in a package's ``__init__``: ``__getattr__, __all__ = lazy_exports(__name__, {"Name": ".module"})``;
    module names may be relative to ``package``.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)


def require_namespace(name: str, expected: str) -> None:
    """Refuse to load a package under any name but its own (``retrogen.retrieval``, never ``retrieval``).

    The repository keeps each package in a top-level folder, so from its root a bare ``import retrieval``
    would otherwise load a second copy, and a user's own ``evaluation.py`` could shadow ours.
    """
    if name != expected:
        raise ImportError(f"{name!r} is part of retrogen: import {expected!r} instead")
