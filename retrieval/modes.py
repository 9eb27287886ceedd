"""Retrieval modes: where a class's candidates come from (its images, its text prompts, corpus captions).

A mode is any "+"-joined set of sources; ``mixed`` is image+text (its name from before captions existed).
"""

from __future__ import annotations

from itertools import combinations

from retrogen.errors import InvalidInputError

#: where candidates come from; a mode is any "+"-joined set of them ("mixed" = image+text)
SOURCES = ("image", "text", "caption")


def mode_name(sources: set[str] | frozenset[str]) -> str:
    """The canonical name of a set of sources (``mixed`` for image+text, as before captions existed)."""
    return "mixed" if set(sources) == {"image", "text"} else "+".join(s for s in SOURCES if s in sources)


def parse_mode(mode: str) -> frozenset[str]:
    """``image``, ``text``, ``caption``, ``mixed`` or a "+"-joined set of them -> its sources."""
    parts: set[str] = set()
    for raw in str(mode).split("+"):
        part = raw.strip()
        if part == "mixed":
            parts |= {"image", "text"}
        elif part in SOURCES:
            parts.add(part)
        else:
            raise InvalidInputError(f"mode must be image, text, caption, mixed or a '+'-joined set of them "
                                    f"(e.g. text+caption); got {mode!r}")
    return frozenset(parts)


MODES: tuple[str, ...] = tuple(sorted({mode_name(set(c)) for n in (1, 2, 3) for c in combinations(SOURCES, n)}))
#: the ``method`` of every output this backend writes: what ``overwrite`` may replace
METHODS: tuple[str, ...] = tuple(f"retrieval:{m}" for m in MODES)


def check_class_names(classes: list[str]) -> list[str]:
    """Class names as folder names: non-empty, unique, no path separators; returned sorted (ImageFolder order)."""
    names = [str(c) for c in classes]
    if not names:
        raise InvalidInputError("give at least one class name")
    for c in names:
        if not c.strip() or c != c.strip() or c in (".", "..") or any(ch in c for ch in "/\\\0"):
            raise InvalidInputError(f"class name {c!r} must be a non-empty folder name (no slashes, no "
                                    "leading/trailing spaces)")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise InvalidInputError(f"class names must be unique; repeated: {', '.join(dupes[:5])}")
    return sorted(names)
