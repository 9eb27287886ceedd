"""Caption matching (REAL, Parashar et al. CVPR 2024): corpus items whose captions name a class.

A class is named by its label (underscores and hyphens read as spaces: ``golden_retriever`` matches "golden
retriever") and by the user's synonyms. Each name becomes an FTS5 phrase (its words adjacent, in order,
stemmed: "tabby cats" matches "tabby cat"); the class matches a caption holding any of its phrases.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def class_names_for_captions(label: str, synonyms: Mapping[str, Sequence[str]] | None) -> list[str]:
    """The label as words, then each synonym; duplicates (ignoring case) dropped."""
    names, seen = [], set()
    for name in [label.replace("_", " ").replace("-", " "), *((synonyms or {}).get(label) or [])]:
        key = " ".join(_WORD.findall(name.lower()))
        if key and key not in seen:
            seen.add(key)
            names.append(name)
    return names


def fts_query(names: Sequence[str]) -> str | None:
    """An FTS5 MATCH expression: any of ``names`` as a phrase of its words (quoted, so no operator leaks in).

    None when no name has a word (such a class can match no caption).
    """
    phrases = []
    for name in names:
        words = _WORD.findall(name)
        if words:
            phrases.append('"' + " ".join(words).replace('"', '""') + '"')
    return " OR ".join(phrases) if phrases else None
