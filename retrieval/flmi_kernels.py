"""Compiled loops of the dense FLMI greedy (``diverse.flmi_order``): capping the similarity, and the greedy.

Both are element-wise passes that numpy can only write as several calls, each a full pass over the matrix
with a temporary, plus ~15 calls of fixed cost per pick: at a pool of 1,000 the greedy's 100 picks took
~12 ms that way, ~1.4 ms here (docs/retrieval-selection.md). numba compiles them once per machine
(``cache=True``: the machine code is kept beside this file, or in the user's cache folder when that is not
writable; with neither, as on a read-only file system, every process compiles them, ~2.5 s); they release
the GIL, so the service's threads select in parallel. Single-threaded and in a fixed order, so the same
matrix gives the same picks on every run. Imported on the first diverse selection only: numba itself takes
~0.3 s to import.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def compiled(fn):
    """``fn`` compiled with its machine code cached on disk, or without a cache where numba finds no writable
    folder for one (it raises at decoration then)."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:
        return njit(nogil=True)(fn)


@compiled
def cap_in_place(sims, row_cap, col_cap, scale):
    """sims[i, c] = min(max(sims[i, c], 0), row_cap[i], col_cap[c]), in place; returns each column's sum
    times ``scale`` (float64): the first pick's gain of every candidate."""
    ground, m = sims.shape
    first = np.zeros(m, np.float64)
    zero = np.float32(0.0)
    for i in range(ground):
        r = row_cap[i]
        row = sims[i]
        for j in range(m):
            x = row[j]
            x = x if x > zero else zero
            x = x if x < r else r
            c = col_cap[j]
            x = x if x < c else c
            row[j] = x
            first[j] += x
    for j in range(m):
        first[j] *= scale
    return first


@compiled
def greedy(cover, total, scale, steps, tie):
    """Plain greedy over the capped similarity ``cover`` (ground rows x candidates), ``total`` (float64, in
    place) holding every candidate's exact gain: each step takes the first candidate within ``tie`` of the
    best (the earlier row, nearer in kNN order), then lowers every gain through the ground rows the pick
    raises, by scale * sum over them of clip(x, old, new) - old (float64 sums). Stops after ``steps`` picks or
    once no gain exceeds ``tie``. Returns (picked columns, their gains)."""
    ground, m = cover.shape
    covered = np.zeros(ground, np.float32)
    drop = np.zeros(m, np.float64)
    order = np.empty(steps, np.int64)
    gains = np.empty(steps, np.float64)
    n = 0
    while n < steps:
        best = -np.inf
        for j in range(m):
            if total[j] > best:
                best = total[j]
        if best <= tie:
            break
        c = 0
        while total[c] < best - tie:
            c += 1
        order[n] = c
        gains[n] = total[c]
        n += 1
        drop[:] = 0.0
        for i in range(ground):
            new = cover[i, c]
            old = covered[i]
            if new > old:  # only raised rows change any gain
                row = cover[i]
                for j in range(m):
                    x = row[j]
                    x = x if x > old else old
                    x = x if x < new else new
                    drop[j] += x - old
                covered[i] = new
        for j in range(m):
            total[j] -= scale * drop[j]
        total[c] = -np.inf
    return order[:n], gains[:n]
