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

COBRA's optional quality term (off by default) adds a modular bonus, so the objective stays monotone
submodular and the greedy stays exact:

    F(A) = f(A) + w * sum over a in A of q'(a),   q'(a) = (q(a) - min_V q) / (max_V q - min_V q) * mean_V r

(q' = 0 when every q is equal). The rescaling makes ``w`` scale-free: whatever the scores' scale, the best
item's bonus is w times the pool's mean relevance, i.e. about w average candidates' worth of coverage.

Pools up to ``GROUND_MAX`` rows keep the capped similarity as a dense pool x pool float32 matrix: the exact
objective. Larger pools sum over a systematic sample S of s rows (``ground_rows``: evenly spread over the kNN
ranks, no seed; s = ``GROUND_MAX`` up to a pool of 5,000, then fewer, see ``ground_size``) while every row
stays a candidate:

    f_S(A) = (m / s) * sum over i in S of  min( max_{a in A} min(s(i, a), r(a)),  r(i) )

still a facility location, so monotone submodular. What it drops: how well the picks cover the rows outside
S (each sampled row stands for m / s of them, hence the scaling). Its similarities are taken in the sample's
top ``dims`` principal directions (``project``): s(i, c) becomes the inner product of c with ground row i's
projection onto them; the caps r stay exact. The matrix is s x pool, built in s * pool * dims
(plus pool * d * dims for the projection), not pool^2 * d.

On both the greedy keeps every candidate's gain exact up to float32 rounding (``dense_greedy``: each pick
updates all gains through the ground rows it raises; compiled loops in ``flmi_kernels``): a plain greedy,
not a lazy one. Given ``neighbours``, the similarity is instead a sparse kNN graph over every row (each row
keeps itself and its ``neighbours`` highest capped similarities: submodlib's sparse mode); it bounds memory,
not the O(pool^2 d) time, and its greedy is lazy (gains of a submodular function only shrink, so a stale
gain is an upper bound), refreshing a batch of the best bounds at once. The greedy yields an order, not a set, so the usual filters walk it exactly
as they walk the kNN order; the items after the pool follow in kNN order.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .selection import Candidate

GROUND_MAX = 1024  # larger pools cover a systematic sample of at most this many rows (see ground_size)
COVER_ENTRIES = 5000 * GROUND_MAX  # above a pool of 5,000 the sample shrinks: sample x pool stays this (20 MB)
GROUND_MIN = 256  # ... down to this many rows (the 20,000 pool cap)
DIMS = 64  # the sampled path's similarities: in the sample's top-DIMS principal directions (None: all)
_POWER_STEPS = 2  # subspace-iteration steps for those directions
_BATCH = 32  # candidates whose gains are refreshed together: one vectorised (batch x ground) step
_BLOCK_ENTRIES = 1 << 22  # rows x pool entries per block while building the sparse similarity (~48 MB of work)


def ground_size(m: int, ground: int | None = None) -> int:
    """How many pool rows the dense path covers: ``ground`` (capped at m), or by default every row up to
    ``GROUND_MAX``, then ``GROUND_MAX`` up to a pool of ``COVER_ENTRIES / GROUND_MAX`` (5,000), then
    ``COVER_ENTRIES / m`` (at least ``GROUND_MIN``): the greedy's matrix, its time and memory, stop growing with
    the pool, at the cost of fidelity (docs/retrieval-selection.md, "Large pools")."""
    if ground is not None and ground < 1:
        raise ValueError(f"ground must be >= 1, got {ground}")
    if ground is None:
        ground = min(GROUND_MAX, max(GROUND_MIN, COVER_ENTRIES // max(m, 1)))
    return min(m, ground)


def ground_rows(m: int, size: int) -> np.ndarray:
    """The systematic sample of ``size`` of ``m`` rows: round(j * m / size) for j = 0 .. size - 1.

    Spread evenly over the kNN ranks (so over the relevance range), deterministic (no seed to record), distinct
    while size <= m, and every row when size == m. Row 0, the nearest candidate, is always in.
    """
    return np.rint(np.arange(size) * m / size).astype(np.intp)  # rint rounds half to even, as round() does


def principal_basis(sample: np.ndarray, dims: int) -> np.ndarray:
    """(d, dims) orthonormal basis near the top-``dims`` principal (uncentred) directions of ``sample``'s rows.

    ``_POWER_STEPS`` steps of subspace iteration from a fixed-seed Gaussian start, so deterministic; an exact
    eigendecomposition of the d x d Gram matrix costs more (~70 ms at d = 512) than the product it saves.
    """
    basis = np.random.default_rng(0).standard_normal((sample.shape[1], dims)).astype(np.float32)
    for _ in range(_POWER_STEPS):
        basis = np.linalg.qr(sample.T @ (sample @ basis))[0]
    return np.ascontiguousarray(basis, dtype=np.float32)


def project(pool: np.ndarray, queries: np.ndarray, rows: np.ndarray,
            dims: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(the pool's coordinates for the sampled similarity, every row's cosine to every query), in one product.

    Coordinates in the top-``dims`` principal directions of the sample ``pool[rows]`` (``principal_basis``),
    not re-normalised: a coordinate product is then the inner product of a candidate with the ground row's
    projection onto those directions, so the part of a cosine in the dropped directions is lost
    (re-normalising inflated the cosines of rows lying mostly outside the subspace, and kept far less of the
    gain). With ``dims`` >= d or >= the sample's size (its own span keeps every ground cosine), or None: the
    pool itself. The query cosines (the caps) are exact either way.
    """
    if dims is None or dims >= min(pool.shape[1], len(rows)):
        return pool, pool @ queries.T
    both = pool @ np.concatenate([principal_basis(pool[rows], dims), queries.T], axis=1)
    return np.ascontiguousarray(both[:, :dims]), both[:, dims:]


def knn_cover(pool: np.ndarray, cap: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row i: itself, then its ``neighbours`` highest capped similarities (ties: the earlier column).

    Returns (columns, values), both (m, 1 + min(neighbours, m - 1)). Built in row blocks against the whole
    pool, so the work space is ~12 bytes x ``_BLOCK_ENTRIES`` whatever the pool. Ties are common (a capped
    similarity often equals the cap), so they are broken explicitly: results never depend on numpy's selection.
    """
    m = len(pool)
    k = min(neighbours, m - 1)
    cols = np.empty((m, k + 1), np.int32)
    vals = np.empty((m, k + 1), np.float32)
    tie = np.arange(m - 1, -1, -1, dtype=np.int64)  # low 32 bits of the key: larger for an earlier column
    step = max(1, min(1024, _BLOCK_ENTRIES // m))
    block_buf, key_buf = np.empty((step, m), np.float32), np.empty((step, m), np.int64)  # reused: no peak of two
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        block, key = block_buf[: hi - lo], key_buf[: hi - lo]
        np.matmul(pool[lo:hi], pool.T, out=block)
        np.clip(block, 0.0, None, out=block)
        np.minimum(block, cap[lo:hi, None], out=block)
        np.minimum(block, cap[None, :], out=block)
        rows = np.arange(hi - lo)
        cols[lo:hi, 0] = np.arange(lo, hi)
        vals[lo:hi, 0] = block[rows, rows + lo]
        if k == 0:
            continue
        # One int64 key per entry, ordered as (value, earlier column): a non-negative float32's bits order
        # like its value (the mask clears the sign of a -0.0).
        np.bitwise_and(block.view(np.int32), 0x7FFFFFFF, out=key)
        key <<= 32
        key |= tie
        key[rows, rows + lo] = -1  # itself is already in column 0
        key.partition(m - k, axis=1)  # in place: the k largest keys end up last
        best = (m - 1) - (key[:, m - k:] & 0xFFFFFFFF)
        cols[lo:hi, 1:] = best
        vals[lo:hi, 1:] = np.take_along_axis(block, best, axis=1)
    return cols, vals


class _SparseCover:
    """The capped similarity as a kNN graph (``knn_cover``): i is covered only by the items its row lists.

    Kept transposed (for each candidate c, the rows that list it, ascending) because a pick's gain is a sum
    over those rows: gain(c) = sum over them of max(cover[i, c] - covered[i], 0). O(m * neighbours) memory.
    """

    def __init__(self, pool: np.ndarray, cap: np.ndarray, neighbours: int):
        cols, vals = knn_cover(pool, cap, neighbours)
        m, width = cols.shape
        by_col = np.argsort(cols.ravel(), kind="stable")  # stable: each column's rows stay ascending
        self.ptr = np.zeros(m + 1, np.int64)
        np.cumsum(np.bincount(cols.ravel(), minlength=m), out=self.ptr[1:])
        del cols  # the steps below free as they go: peak ~3 x the graph
        self.vals = vals.ravel()[by_col]
        del vals
        np.floor_divide(by_col, width, out=by_col)
        self.rows = by_col.astype(np.int32)
        self.covered = np.zeros(m, np.float32)

    def first_gains(self) -> np.ndarray:
        # every column is listed at least by its own row: no empty segment
        return np.add.reduceat(self.vals, self.ptr[:-1], dtype=np.float64)

    def gains(self, top: np.ndarray) -> np.ndarray:
        starts = self.ptr[top]
        lengths = self.ptr[top + 1] - starts
        owner = np.repeat(np.arange(len(top)), lengths)
        pos = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        g = np.maximum(self.vals[pos] - self.covered[self.rows[pos]], 0.0)
        return np.bincount(owner, weights=g, minlength=len(top))

    def take(self, c: int) -> None:
        span = slice(self.ptr[c], self.ptr[c + 1])
        rows = self.rows[span]
        self.covered[rows] = np.maximum(self.covered[rows], self.vals[span])


def quality_bonus(quality: np.ndarray | None, weight: float, cap: np.ndarray) -> np.ndarray | None:
    """w * q'(a) per pool row (see the module docstring), or None when the term is off or adds nothing."""
    if weight < 0 or not np.isfinite(weight):
        raise ValueError(f"quality_weight must be a finite number >= 0, got {weight}")
    if quality is None or weight == 0:
        return None
    q = np.asarray(quality, dtype=np.float64)
    if q.shape != cap.shape or not np.isfinite(q).all():
        raise ValueError(f"quality needs one finite score per pool row ({len(cap)}), got shape {q.shape}")
    span = float(q.max() - q.min())
    if span <= 0:
        return None  # all equal: q' = 0
    return weight * ((q - q.min()) / span) * float(cap.mean(dtype=np.float64))


def _lazy_greedy(cover: _SparseCover, bonus: np.ndarray | None, *, m: int, steps: int,
                 batch: int = _BATCH) -> tuple[list[int], list[float]]:
    """Lazy greedy on coverage + bonus, a batch at a time: refresh the best bounds; the best refreshed gain
    wins once no stale bound beats it (a stale bound can only overstate a gain). Stops when nothing gains."""
    bound_left = cover.first_gains()  # exact gains of the first pick, then upper bounds; -inf: picked
    if bonus is not None:
        bound_left += bonus
    order: list[int] = []
    gains: list[float] = []
    while len(order) < steps:
        top = np.argpartition(-bound_left, min(batch, m) - 1)[:batch]
        top = top[np.isfinite(bound_left[top])]
        exact = cover.gains(top)
        if bonus is not None:
            exact += bonus[top]
        best = float(exact.max())
        bound_left[top] = -np.inf  # the best bound outside the batch, without copying the bounds
        rival = float(bound_left.max())
        bound_left[top] = exact
        if best < rival - 1e-7 * max(1.0, best):
            continue
        if best <= 1e-6:  # every other gain is no larger: nothing adds coverage (or quality) any more
            break
        c = int(top[exact == best].min())  # ties: the earlier (nearer in kNN order) row
        order.append(c)
        gains.append(best)
        bound_left[c] = -np.inf
        cover.take(c)
    return order, gains


def dense_greedy(coords: np.ndarray, cap: np.ndarray, rows: np.ndarray | None, bonus: np.ndarray | None, *,
                 steps: int) -> tuple[list[int], list[float]]:
    """Greedy on the capped similarity of the ground rows (every row when ``rows`` is None: the exact
    objective, whose ``coords @ coords.T`` is numpy's symmetric product) to every candidate, keeping every
    gain exact: a pick raises the coverage of only the ground rows it covers better than before, and each pick
    updates all gains through those rows alone (``flmi_kernels.greedy``). Ties: the earlier row.

    Gains are float64 sums of float32 entries, summed in a different order once updated, so candidates that
    tie exactly can differ by ~1e-7 of the first pick's gain: gains within ``tie`` = 1e-6 of it count as
    equal (exact ties are common: capped similarities often equal a cap; the earlier row is the nearer in kNN
    order), and the greedy stops once nothing gains more than ``tie`` (the lazy sparse path stops at an
    absolute 1e-6)."""
    from . import flmi_kernels  # numba: imported (and compiled, once per machine) on first use

    if rows is None:
        cover, row_cap = coords @ coords.T, cap
    else:
        cover, row_cap = coords[rows] @ coords.T, cap[rows]
    scale = len(cap) / len(cover)  # each ground row stands for m / s pool rows
    total = flmi_kernels.cap_in_place(cover, row_cap.astype(np.float32, copy=False),
                                       cap.astype(np.float32, copy=False), scale)
    if bonus is not None:
        total += bonus
    tie = 1e-6 * max(1.0, float(total.max(initial=0.0)))
    order, gains = flmi_kernels.greedy(cover, total, scale, steps, tie)
    return order.tolist(), gains.tolist()


def flmi_order(pool: np.ndarray, queries: np.ndarray, *, steps: int, eta: float = 1.0,
               quality: np.ndarray | None = None, quality_weight: float = 0.0,
               neighbours: int | None = None, ground: int | None = None,
               dims: int | None = DIMS) -> tuple[list[int], list[float]]:
    """Greedy FLMI order of ``pool`` rows: (positions in ``pool``, the marginal gain of each pick).

    Args:
        pool: (m, d) L2-normalised candidate embeddings, in kNN priority order (ties go to the earlier row).
        queries: (q, d) L2-normalised query embeddings (the class's images, or its text embedding).
        steps: picks wanted; fewer when the pool is smaller. Once nothing gains, the rest of the pool follows
            in its own order (gain 0).
        quality: (m,) scores on any real scale (higher is better), or None: COBRA's quality term, weighted by
            ``quality_weight`` (>= 0; 0 = off). A pick's gain then includes its bonus.
        ground: how many pool rows the objective sums over (all stay candidates): a systematic sample
            (``ground_rows``) with gains scaled by m / ground. None: ``ground_size``'s default (every row up
            to ``GROUND_MAX``); ground >= m is the exact objective.
        neighbours: instead, the sparse path over every row: keep only each row's own entry and its
            ``neighbours`` highest capped similarities. Not combined with ``ground``.
        dims: on the sampled path only, the principal directions its similarities use (``project``; >= 1);
            None, or at least d or the sample's size: full cosines.
    """
    m = len(pool)
    steps = min(steps, m)
    if neighbours is not None and (neighbours < 1 or ground is not None):
        raise ValueError(f"neighbours must be >= 1 and not combined with ground, got {neighbours}, {ground}")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int | np.integer) or dims < 1):
        raise ValueError(f"dims must be an integer >= 1 or None, got {dims!r}")
    size = ground_size(m, ground)
    if steps <= 0:
        return [], []
    pool = pool.astype(np.float32, copy=False)
    queries = queries.astype(np.float32)
    if neighbours is None:
        rows = ground_rows(m, size) if size < m else None  # None: the exact objective, full cosines
        coords, sims = project(pool, queries, rows, dims) if rows is not None else (pool, pool @ queries.T)
        cap = eta * np.clip(sims, 0.0, None).max(axis=1)  # relevance of each i
        order, gains = dense_greedy(coords, cap, rows, quality_bonus(quality, quality_weight, cap), steps=steps)
    else:
        cap = eta * np.clip(pool @ queries.T, 0.0, None).max(axis=1)
        order, gains = _lazy_greedy(_SparseCover(pool, cap, neighbours), quality_bonus(quality, quality_weight, cap),
                                    m=m, steps=steps)
    picked = set(order)
    rest = [i for i in range(m) if i not in picked][: steps - len(order)]
    return order + rest, gains + [0.0] * len(rest)


def diverse_order(cands: list[Candidate], emb: dict[int, np.ndarray], queries: np.ndarray, *, pool_size: int,
                  steps: int, eta: float = 1.0, quality: dict[int, float] | None = None,
                  quality_weight: float = 0.0, neighbours: int | None = None,
                  ground: int | None = None, dims: int | None = DIMS) -> list[Candidate]:
    """A class's candidates (kNN priority order) reordered: ``steps`` greedy picks, each carrying its gain,
    among the first ``pool_size`` distinct items, then the rest in kNN order.

    ``quality`` maps candidate id to score (see ``flmi_order``); an id without one (or with a NaN or infinite
    one, as a missing metadata value may read) counts as the pool's lowest score, i.e. earns no bonus.
    ``ground``, ``neighbours`` and ``dims``: as in ``flmi_order``.
    """
    where: dict[int, int] = {}  # pool member's id -> where it first occurs in cands
    vecs = []
    for k, c in enumerate(cands):  # one walk, stopped once the pool is full: pools reach 20,000 of ~10^5
        if c.id not in where:
            if len(where) == pool_size:
                break
            where[c.id] = k
            vecs.append(emb[c.id])
    if not where:
        return list(cands)
    pool = [cands[k] for k in where.values()]
    scores = None
    if quality is not None and quality_weight != 0:
        given = np.array([quality.get(c.id, np.nan) for c in pool], dtype=np.float64)
        known = np.isfinite(given)
        if known.any():
            scores = np.where(known, given, given[known].min())
    # concatenate + reshape: the same matrix as np.stack, without its per-row cost (half the time at 20,000)
    order, gains = flmi_order(np.concatenate(vecs).reshape(len(vecs), -1), queries, steps=steps, eta=eta,
                              quality=scores, quality_weight=quality_weight, neighbours=neighbours,
                              ground=ground, dims=dims)
    picked = [replace(pool[i], gain=round(g, 6)) for i, g in zip(order, gains, strict=True)]
    rest, start, first = [], 0, list(where.values())
    for k in sorted(first[i] for i in order):  # cands without the picks, by slices
        rest += cands[start:k]
        start = k + 1
    return picked + rest + cands[start:]
