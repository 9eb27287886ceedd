"""Per-class selection policy: from ranked candidates to exactly N distinct, clean items per class.

Pure numpy over ids, scores and embeddings, so every filter is testable on synthetic vectors. The order of
checks for each candidate, walked in round-robin priority order per class:

1. ``duplicate``: the same corpus id already seen for this class (another query also found it);
2. ``conflict``: the id is wanted by several classes; it goes to the class it is most similar to (or is
   dropped everywhere with ``conflict="drop"``);
3. ``min_similarity``: similarity to its query below the threshold;
4. ``leakage``: a near-duplicate (cosine >= ``leakage_threshold``) of a training or held-out image;
5. ``label_check``: its zero-shot prediction over the dataset's class names is another class;
6. ``near_duplicate``: cosine >= ``dedup_threshold`` with an item already selected (for any class).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

FILTERS = ("duplicate", "conflict", "min_similarity", "leakage", "label_check", "near_duplicate")


@dataclass(frozen=True)
class Candidate:
    """A corpus item proposed for ``label`` by one query, at ``rank`` in that query's result list."""

    id: int
    label: str
    similarity: float
    rank: int
    query: dict  # {"type": "image", "id": "cat/1.jpg"} or {"type": "text", "prompt": "..."}


@dataclass(frozen=True)
class SelectionPolicy:
    dedup_threshold: float | None = 0.97
    leakage_threshold: float | None = 0.95
    min_similarity: float | None = None
    conflict: str = "assign"  # "assign" | "drop"


@dataclass
class Selection:
    chosen: dict[str, list[Candidate]]
    removed: Counter = field(default_factory=Counter)
    exhausted: dict[str, bool] = field(default_factory=dict)  # class ran out of candidates before N


def round_robin(lists: list[list[Candidate]]) -> list[Candidate]:
    """Interleave ranked lists: rank 0 of every query, then rank 1, ... so every query contributes."""
    out: list[Candidate] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def best_class(candidates: dict[str, list[Candidate]]) -> dict[int, str]:
    """For each id, the class whose query found it with the highest similarity."""
    best: dict[int, tuple[float, str]] = {}
    for label, cands in candidates.items():
        for c in cands:
            if c.id not in best or c.similarity > best[c.id][0]:
                best[c.id] = (c.similarity, label)
    return {i: label for i, (_, label) in best.items()}


def select(
    candidates: dict[str, list[Candidate]],
    per_class: int,
    *,
    embeddings: dict[int, np.ndarray],
    policy: SelectionPolicy,
    protected: np.ndarray | None = None,
    predicted_label: dict[int, str] | None = None,
) -> Selection:
    """Choose up to ``per_class`` items per class from priority-ordered ``candidates``.

    Args:
        candidates: per class, candidates in priority order (see :func:`round_robin`).
        embeddings: normalised embedding of every candidate id.
        protected: (m, dim) normalised embeddings of the user's training + held-out images (leakage filter).
        predicted_label: zero-shot predicted class per id (label check); None disables the check.
    """
    owners = best_class(candidates)
    wanted_by = Counter(i for cands in candidates.values() for i in {c.id for c in cands})
    sel = Selection(chosen={label: [] for label in candidates})
    taken = np.zeros((0, next(iter(embeddings.values())).shape[0] if embeddings else 0), np.float32)
    leak_sims = _max_sims(embeddings, protected) if policy.leakage_threshold is not None else {}
    classes = sorted(candidates)
    # Fill classes in turn, one pass over each class's priority list; near-duplicate checks see every
    # item already taken for any class.
    for label in classes:
        seen: set[int] = set()
        chosen = sel.chosen[label]
        for c in candidates[label]:
            if len(chosen) >= per_class:
                break
            reason = None
            if c.id in seen:
                reason = "duplicate"
            elif wanted_by[c.id] > 1 and (policy.conflict == "drop" or owners[c.id] != label):
                reason = "conflict"
            elif policy.min_similarity is not None and c.similarity < policy.min_similarity:
                reason = "min_similarity"
            elif policy.leakage_threshold is not None and leak_sims.get(c.id, -1.0) >= policy.leakage_threshold:
                reason = "leakage"
            elif predicted_label is not None and predicted_label.get(c.id) != label:
                reason = "label_check"
            elif policy.dedup_threshold is not None and len(taken) and \
                    float((taken @ embeddings[c.id]).max()) >= policy.dedup_threshold:
                reason = "near_duplicate"
            seen.add(c.id)
            if reason:
                sel.removed[reason] += 1
                continue
            chosen.append(c)
            taken = np.vstack([taken, embeddings[c.id][None, :]])
        sel.exhausted[label] = len(chosen) < per_class
    return sel


def _max_sims(embeddings: dict[int, np.ndarray], protected: np.ndarray | None) -> dict[int, float]:
    if protected is None or len(protected) == 0 or not embeddings:
        return {}
    ids = list(embeddings)
    mat = np.stack([embeddings[i] for i in ids]).astype(np.float32)
    sims = (mat @ protected.astype(np.float32).T).max(axis=1)
    return dict(zip(ids, sims.tolist(), strict=True))
