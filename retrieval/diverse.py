"""The ``diverse`` selection policy: order a class's candidates by greedy facility-location mutual information.

Nearest-neighbour retrieval takes the candidates most similar to the user's images, which are often
near-copies of each other. COBRA (Das et al., CVPR 2025) instead maximises a combinatorial mutual information
between the selected set A and the user's images Q over the candidate pool V; retrogen uses its
facility-location form (FLMI, as in submodlib):

    f(A) = sum over i in V of  min( max_{a in A} min(s(i, a), r(a)),  r(i) ),   r(x) = eta * max_{q in Q} s(x, q)

Each candidate i counts as covered by its most similar selected item, but only up to how relevant i is to
the user's images: so A spreads over the relevant part of the pool instead of piling onto its densest spot.
One change to the textbook FLMI: a pick covers others at most as far as it is relevant itself (the inner
``min(s(i, a), r(a))``), so an off-topic image that happens to sit between relevant ones cannot stand for
them; it is still a facility-location function (of that capped similarity), hence monotone submodular and
greedy's (1 - 1/e) guarantee holds. ``eta`` trades spread for relevance: larger spreads wider. Similarities
are cosines clipped at 0 (facility location needs non-negative ones). COBRA's soft class balancing is not
needed here: every class gets exactly its own N (or fewer, with a reason).

The greedy maximisation is lazy (gains of a submodular function only shrink, so a stale gain is an upper
bound) and refreshes a batch of the best bounds at once, vectorised over the pool. It yields an order, not a
set, so the usual filters walk it exactly as they walk the kNN order; the items after the pool follow in kNN
order.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .selection import Candidate

_BATCH = 32  # candidates whose gains are refreshed together: one vectorised (batch x pool) step


def flmi_order(pool: np.ndarray, queries: np.ndarray, *, steps: int, eta: float = 1.0) -> tuple[list[int], list[float]]:
    """Greedy FLMI order of ``pool`` rows: (positions in ``pool``, the marginal gain of each pick).

    Args:
        pool: (m, d) L2-normalised candidate embeddings, in kNN priority order (ties go to the earlier row).
        queries: (q, d) L2-normalised query embeddings (the class's images, or its text embedding).
        steps: picks wanted; fewer when the pool is smaller. Once nothing adds coverage, the rest of the
            pool follows in its own order (gain 0).
    """
    m = len(pool)
    steps = min(steps, m)
    if steps <= 0:
        return [], []
    pool = pool.astype(np.float32, copy=False)
    cap = eta * np.clip(pool @ queries.astype(np.float32).T, 0.0, None).max(axis=1)  # relevance of each i
    cover = pool @ pool.T  # cover[i, c]: how much picking c covers i, capped by both relevances
    np.clip(cover, 0.0, None, out=cover)
    np.minimum(cover, cap[:, None], out=cover)
    np.minimum(cover, cap[None, :], out=cover)
    # cover is symmetric (up to rounding), so its contiguous row cover[c] stands for what picking c covers
    covered = np.zeros(m, np.float32)
    bound_left = cover.sum(axis=1, dtype=np.float64)  # exact gains of the first pick, then upper bounds; -inf: picked
    order: list[int] = []
    gains: list[float] = []
    while len(order) < steps:
        # Lazy greedy, a batch at a time: refresh the best bounds; the best refreshed gain wins once no stale
        # bound beats it (a stale bound can only overstate a gain).
        top = np.argpartition(-bound_left, min(_BATCH, m) - 1)[:_BATCH]
        top = top[np.isfinite(bound_left[top])]
        exact = np.maximum(cover[top] - covered, 0.0).sum(axis=1, dtype=np.float64)
        bound_left[top] = exact
        best = float(exact.max())
        rivals = bound_left.copy()
        rivals[top] = -np.inf
        if best < rivals.max() - 1e-7 * max(1.0, best):
            continue
        if best <= 1e-6:  # every other gain is no larger: nothing adds coverage any more
            break
        c = int(top[exact == best].min())  # ties: the earlier (nearer in kNN order) row
        order.append(c)
        gains.append(best)
        bound_left[c] = -np.inf
        np.maximum(covered, cover[c], out=covered)
    picked = set(order)
    rest = [i for i in range(m) if i not in picked][: steps - len(order)]
    return order + rest, gains + [0.0] * len(rest)


def diverse_order(cands: list[Candidate], emb: dict[int, np.ndarray], queries: np.ndarray, *, pool_size: int,
                  steps: int, eta: float = 1.0) -> list[Candidate]:
    """A class's candidates (kNN priority order) reordered: ``steps`` greedy picks, each carrying its gain,
    among the first ``pool_size`` distinct items, then the rest in kNN order."""
    pool: list[Candidate] = []
    seen: set[int] = set()
    for c in cands:
        if c.id not in seen and len(pool) < pool_size:
            seen.add(c.id)
            pool.append(c)
    if not pool:
        return list(cands)
    order, gains = flmi_order(np.stack([emb[c.id] for c in pool]), queries, steps=steps, eta=eta)
    picked = [replace(pool[i], gain=round(g, 6)) for i, g in zip(order, gains, strict=True)]
    first = {id(pool[i]) for i in order}
    return picked + [c for c in cands if id(c) not in first]
