"""Each class's ranked candidates: vector search per query, and caption matches, merged round-robin.

Every query (a training image, the class's prompt ensemble, or its caption match) contributes one ranked
list; :func:`~retrogen.retrieval.selection.round_robin` interleaves them, so every query is heard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .captions import class_names_for_captions, fts_query
from .index import CorpusIndex
from .selection import Candidate


@dataclass
class Queries:
    """Query vectors per class, with what each one is (for provenance)."""

    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    infos: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, label: str, vector: np.ndarray, info: dict) -> None:
        self.vectors.setdefault(label, []).append(vector)
        self.infos.setdefault(label, []).append(info)


def vector_lists(corpus: CorpusIndex, queries: Queries, k: int, **search: int | None) -> dict[str, list[list[Candidate]]]:
    """Per class, one ranked list of ``k`` neighbours per query vector (``search``: CorpusIndex.search's
    per-call overrides)."""
    out: dict[str, list[list[Candidate]]] = {}
    for label in sorted(queries.vectors):
        mat = np.stack(queries.vectors[label]).astype(np.float32)
        scores, ids = corpus.search(mat, min(k, corpus.ntotal), **search)
        out[label] = [
            [Candidate(int(i), label, float(s), r, info) for r, (s, i) in enumerate(zip(srow, irow, strict=True))
             if i >= 0]
            for srow, irow, info in zip(scores, ids, queries.infos[label], strict=True)
        ]
    return out


def caption_matches(corpus: CorpusIndex, classes: list[str], k: int,
                    synonyms: dict[str, list[str]] | None) -> dict[str, tuple[list[str], list[tuple[int, float]]]]:
    """Per class: the names matched, and up to ``k`` ``(row id, bm25)`` whose captions hold one, best first."""
    out = {}
    for label in classes:
        names = class_names_for_captions(label, synonyms)
        match = fts_query(names)
        out[label] = (names, corpus.search_captions(match, k) if match else [])
    return out


def caption_list(label: str, names: list[str], hits: list[tuple[int, float]], *, emb: dict[int, np.ndarray],
                 reference: np.ndarray | None, rerank: bool) -> list[Candidate]:
    """One class's caption matches as candidates: similarity = cosine to the class's reference vector (0 when
    there is none); in that order when ``rerank``, else in bm25 order. ``rank`` is the bm25 rank."""
    cands = []
    for rank, (i, bm25) in enumerate(hits):
        sim = float(emb[i].astype(np.float32) @ reference) if reference is not None else 0.0
        cands.append(Candidate(i, label, sim, rank, {"type": "caption", "names": names, "bm25": round(bm25, 4)}))
    if rerank and reference is not None:
        cands.sort(key=lambda c: (-c.similarity, c.rank))
    return cands
