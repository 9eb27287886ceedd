"""Per-class selection policy: from ranked candidates to exactly N distinct, clean items per class.

Pure numpy over ids, scores and embeddings, so every filter is testable on synthetic vectors. The order of
checks for each candidate, walked in round-robin priority order per class:

1. ``duplicate``: the same corpus id already seen for this class (another query also found it);
2. ``opt_out``: on the user's opt-out list or flagged opted out by the corpus, never returned;
3. ``unsafe`` / 4. ``watermark``: over a safety or watermark threshold (``retrieval.safety``);
5. ``conflict``: the id would be returned for several classes; it goes to the class whose queries found it
   most similar (or is dropped everywhere with ``conflict="drop"``);
6. ``min_similarity``: similarity to its query below the threshold;
7. ``leakage``: a near-duplicate (cosine >= ``leakage_threshold``) of a training or held-out image;
8. ``label_check``: its zero-shot prediction over the dataset's class names is another class;
9. ``near_duplicate``: cosine >= ``dedup_threshold`` with an item already selected (for any class).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

FILTERS = ("duplicate", "opt_out", "unsafe", "watermark", "conflict", "min_similarity", "leakage", "label_check", "near_duplicate")


@dataclass(frozen=True)
class Candidate:
    """A corpus item proposed for ``label`` by one query, at ``rank`` in that query's result list."""

    id: int
    label: str
    similarity: float
    rank: int
    query: dict  # {"type": "image", "id": "cat/1.jpg"} or {"type": "text", "prompt": "..."}
    gain: float | None = None  # the diverse policy's marginal gain when it picked this item


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


def select(
    candidates: dict[str, list[Candidate]],
    per_class: int,
    *,
    embeddings: dict[int, np.ndarray],
    policy: SelectionPolicy,
    protected: np.ndarray | None = None,
    predicted_label: dict[int, str] | None = None,
    excluded: Mapping[int, str] | None = None,
) -> Selection:
    """Choose up to ``per_class`` items per class from priority-ordered ``candidates``.

    Conflicts are settled on what would actually be returned: select per class, find items chosen by several
    classes, give each to the class that found it most similar (or drop it), let the losing classes continue
    down their lists, and repeat until no item is chosen twice.

    Args:
        candidates: per class, candidates in priority order (see :func:`round_robin`).
        embeddings: normalised embedding of every candidate id.
        protected: (m, dim) normalised embeddings of the user's training + held-out images (leakage filter).
        predicted_label: zero-shot predicted class per id (label check); None disables the check.
        excluded: ids screened out before selection, with their reason (``opt_out``, ``unsafe``, ``watermark``).
    """
    leak_sims = LeakSims(embeddings, protected)
    best: dict[str, dict[int, float]] = {}  # class -> id -> best similarity any of its queries gave (on demand)
    lost: dict[str, set[int]] = {label: set() for label in candidates}
    while True:
        sel = _select_once(candidates, per_class, embeddings=embeddings, policy=policy, leak_sims=leak_sims,
                           predicted_label=predicted_label, lost=lost, excluded=excluded or {})
        owners: dict[int, list[str]] = {}
        for label, chosen in sel.chosen.items():
            for c in chosen:
                owners.setdefault(c.id, []).append(label)
        conflicts = {i: labels for i, labels in owners.items() if len(labels) > 1}
        if not conflicts:
            return sel
        for i, labels in conflicts.items():
            winner = None if policy.conflict == "drop" else max(
                labels, key=lambda lb: (best_similarities(candidates, lb, best)[i], lb))
            for label in labels:
                if label != winner:
                    lost[label].add(i)


def best_similarities(candidates: dict[str, list[Candidate]], label: str,
                      cache: dict[str, dict[int, float]]) -> dict[int, float]:
    """id -> the best similarity any of ``label``'s queries gave it; built for a class at its first conflict (a
    Python walk over every candidate, which a class without conflicts never pays)."""
    if label not in cache:
        best: dict[int, float] = {}
        for c in candidates[label]:
            best[c.id] = max(c.similarity, best.get(c.id, -np.inf))
        cache[label] = best
    return cache[label]


def _select_once(candidates: dict[str, list[Candidate]], per_class: int, *, embeddings: dict[int, np.ndarray],
                 policy: SelectionPolicy, leak_sims: LeakSims, predicted_label: dict[int, str] | None,
                 lost: dict[str, set[int]], excluded: Mapping[int, str]) -> Selection:
    """One pass of selection with the ``lost`` conflicts excluded."""
    sel = Selection(chosen={label: [] for label in candidates})
    dim = next(iter(embeddings.values())).shape[0] if embeddings else 0
    taken = np.zeros((0, dim), np.float32)
    # Fill classes in turn, one pass over each class's priority list; near-duplicate checks see every
    # item already taken for any class.
    for label in sorted(candidates):
        seen: set[int] = set()
        chosen = sel.chosen[label]
        for c in candidates[label]:
            if len(chosen) >= per_class:
                break
            reason = None
            if c.id in seen:
                reason = "duplicate"
            elif c.id in excluded:
                reason = excluded[c.id]
            elif c.id in lost[label]:
                reason = "conflict"
            elif policy.min_similarity is not None and c.similarity < policy.min_similarity:
                reason = "min_similarity"
            elif policy.leakage_threshold is not None and leak_sims[c.id] >= policy.leakage_threshold:
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


class LeakSims:
    """id -> its highest cosine to the protected images (training + held-out), computed when the walk first asks.

    The walk stops after N picks, so it asks for about N + the filtered candidates, not for the thousands a
    wide pool holds: stacking every candidate's embedding up front was most of ``select``'s time at M = 2,500.
    """

    def __init__(self, embeddings: dict[int, np.ndarray], protected: np.ndarray | None):
        self.embeddings = embeddings
        self.protected = None if protected is None or len(protected) == 0 else protected.astype(np.float32)
        self.cache: dict[int, float] = {}

    def __getitem__(self, item_id: int) -> float:
        if self.protected is None or item_id not in self.embeddings:
            return -1.0
        if item_id not in self.cache:
            vec = np.asarray(self.embeddings[item_id], dtype=np.float32)
            self.cache[item_id] = float((self.protected @ vec).max())
        return self.cache[item_id]
