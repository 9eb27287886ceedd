"""The diverse selection policy (greedy facility-location mutual information) on synthetic vectors."""

import numpy as np

from retrogen.retrieval.diverse import diverse_order, flmi_order


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _off_topic_pool(rng, dim=16):
    """(query, pool): rows 0-7 orthogonal to the query (cosine 0), rows 8-15 near it."""
    q = _unit(rng.standard_normal((1, dim)))
    relevant = _unit(q + 0.3 * rng.standard_normal((8, dim)))
    ortho = rng.standard_normal((8, dim))
    ortho -= (ortho @ q.T) * q
    return q, np.concatenate([_unit(ortho), relevant])


def _clusters(rng, centres, sizes, spread):
    return np.concatenate([_unit(c + spread * rng.standard_normal((n, len(c))))
                           for c, n in zip(centres, sizes, strict=True)])


def _flmi(pool, queries, chosen, eta=1.0):
    """The objective written out: sum_i min(max_{a in A} min(s(i,a), r(a)), r(i)), r = eta max_q s(., q)."""
    s = np.clip(pool @ pool.T, 0, None)
    r = eta * np.clip(pool @ queries.T, 0, None).max(axis=1)
    if not chosen:
        return 0.0
    return float(np.minimum(np.minimum(s[:, chosen], r[chosen][None, :]).max(axis=1), r).sum())


def test_diverse_covers_every_mode_the_queries_reach_while_knn_piles_onto_one():
    """Three modes around the user's images; the densest and closest one fills kNN's whole top-N."""
    rng = np.random.default_rng(0)
    dim = 32
    centres = _unit(rng.standard_normal((3, dim)))
    queries = _unit(centres + 0.05 * rng.standard_normal((3, dim)))
    pool = _clusters(rng, centres, (60, 20, 20), 0.08)
    # kNN order as retrieval builds it: most similar to any query first
    knn = np.argsort(-(pool @ queries.T).max(axis=1), kind="stable")
    pool = pool[knn]
    cluster = np.repeat([0, 1, 2], (60, 20, 20))[knn]
    order, gains = flmi_order(pool, queries, steps=6)
    assert len(order) == 6 and len(set(order)) == 6
    assert set(cluster[order[:3]]) == {0, 1, 2}, "the first three picks are one per mode"
    assert all(a >= b - 1e-6 for a, b in zip(gains, gains[1:], strict=False)), "submodular: greedy gains shrink"
    assert len(set(cluster[:3])) < 3, "the scenario is one where kNN's top-3 misses a mode"


def test_off_topic_candidates_earn_nothing_and_come_last():
    """Orthogonal to the query yet similar to relevant items: they may not stand for them."""
    rng = np.random.default_rng(1)
    q, pool = _off_topic_pool(rng)
    order, gains = flmi_order(pool, q, steps=16)  # off-topic rows first: pool order does not rescue them
    earning = [c for c, g in zip(order, gains, strict=True) if g > 0]
    assert earning and all(c >= 8 for c in earning), "only relevant items earn a gain"
    assert order[: len(earning)] == earning, "every earning pick comes before any zero-gain one"
    zero = order[len(earning):]
    assert zero == sorted(zero), "zero gain: the pool's own (kNN) order is kept"


def test_the_greedy_equals_a_plain_greedy_on_the_written_out_objective():
    rng = np.random.default_rng(2)
    for trial in range(5):
        pool = _unit(rng.standard_normal((80, 12)))
        queries = _unit(rng.standard_normal((3, 12)))
        eta = (0.5, 1.0, 3.0, 1.0, 1.0)[trial]
        order, gains = flmi_order(pool, queries, steps=15, eta=eta)
        chosen = []
        for step in range(15):  # plain greedy: evaluate every candidate's marginal gain each step
            base = _flmi(pool, queries, chosen, eta)
            marg = [(_flmi(pool, queries, chosen + [c], eta) - base, -c) for c in range(80) if c not in chosen]
            best, neg_c = max(marg)
            assert abs(gains[step] - best) < 1e-3, (trial, step)
            chosen.append(-neg_c if abs(best - gains[step]) > 1e-5 else order[step])
        assert order == chosen, trial


def test_same_input_same_order_and_small_inputs():
    rng = np.random.default_rng(3)
    pool, q = _unit(rng.standard_normal((50, 8))), _unit(rng.standard_normal((2, 8)))
    assert flmi_order(pool, q, steps=10) == flmi_order(pool.copy(), q.copy(), steps=10)
    assert flmi_order(pool[:3], q, steps=10)[0] != [] and len(flmi_order(pool[:3], q, steps=10)[0]) == 3
    assert flmi_order(pool[:0], q, steps=5) == ([], [])


def test_without_a_writable_cache_folder_the_greedy_compiles_per_process_and_picks_the_same(tmp_path):
    """numba raises at decoration when no cache folder is writable (a read-only root file system); the kernels
    then compile uncached in each process. Emulated by leaving numba no cache locator at all."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(4)
    pool, q = _unit(rng.standard_normal((80, 8))), _unit(rng.standard_normal((2, 8)))
    np.save(tmp_path / "pool.npy", pool)
    np.save(tmp_path / "q.npy", q)
    code = ("import json, numpy as np, numba.core.caching as c\n"
            "c.CacheImpl._locator_classes = []\n"
            "from retrogen.retrieval import flmi_kernels\n"
            "from retrogen.retrieval.diverse import flmi_order\n"
            f"d = {str(tmp_path)!r}\n"
            "order, gains = flmi_order(np.load(d + '/pool.npy'), np.load(d + '/q.npy'), steps=12)\n"
            "print(json.dumps([type(flmi_kernels.greedy._cache).__name__, order, gains]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    cache, order, gains = json.loads(out.stdout.splitlines()[-1])
    assert cache == "NullCache", "the fallback compiled without a cache"
    assert [order, gains] == list(flmi_order(pool, q, steps=12))


# --- COBRA's quality term ---------------------------------------------------------------------------------------

def _capped(pool, queries, eta=1.0):
    """K[i, c] = min(s(i, c), r(i), r(c)): how far picking c covers i, so f(A) = sum_i max_{a in A} K[i, a]."""
    r = eta * np.clip(pool @ queries.T, 0, None).max(axis=1)
    return np.minimum(np.minimum(np.clip(pool @ pool.T, 0, None), r[:, None]), r[None, :]), r


def _bonus(quality, weight, r):
    """w * q', written out: quality min-max rescaled over the pool, times the pool's mean relevance cap."""
    q = np.asarray(quality, dtype=np.float64)
    return weight * (q - q.min()) / (q.max() - q.min()) * r.mean()


def _check_against_naive_greedy(order, gains, cover, bonus):
    """Plain greedy on F(A) = sum_i max_{a in A} cover[i, a] + sum_{a in A} bonus[a]: every candidate's marginal
    gain from the objective itself, each step. A near-tie may go either way: then follow the greedy's pick.
    ``cover`` is (ground rows, candidates): the rows i summed over need not be every candidate."""
    m = cover.shape[1]

    def objective(chosen):
        return float(cover[:, chosen].max(axis=1).sum() + bonus[chosen].sum()) if chosen else 0.0

    chosen, tie = [], None
    for step in range(len(order)):
        base = objective(chosen)
        marg = np.array([objective(chosen + [c]) - base if c not in chosen else -np.inf for c in range(m)])
        best = float(marg.max())
        tie = 1e-5 + 1e-6 * max(1.0, best) if tie is None else tie  # the greedy's near-tie: 1e-6 of the first gain
        if best <= 1e-6:  # nothing gains any more: the rest follows in pool order, gain 0
            rest = [c for c in range(m) if c not in chosen]
            assert order[step:] == rest[: len(order) - step] and not any(gains[step:]), step
            return
        assert abs(gains[step] - best) < 1e-3, step
        assert marg[order[step]] > best - tie, (step, "the pick is a best one")
        chosen.append(order[step])


def test_quality_off_is_todays_order():
    rng = np.random.default_rng(4)
    pool, q = _unit(rng.standard_normal((120, 16))), _unit(rng.standard_normal((3, 16)))
    today = flmi_order(pool, q, steps=30)
    assert flmi_order(pool, q, steps=30, quality=rng.standard_normal(120), quality_weight=0.0) == today
    same = np.full(120, 7.0)
    assert flmi_order(pool, q, steps=30, quality=same, quality_weight=5.0) == today, "all equal: q' = 0"
    assert flmi_order(pool, q, steps=30, quality=None, quality_weight=5.0) == today
    assert flmi_order(pool, q, steps=30, quality=rng.standard_normal(120), quality_weight=0.5) != today


def test_a_large_quality_weight_picks_in_quality_order():
    rng = np.random.default_rng(5)
    pool, q = _unit(rng.standard_normal((40, 16))), _unit(rng.standard_normal((2, 16)))
    quality = rng.permutation(40) * 3.5 - 20  # any scale
    order, gains = flmi_order(pool, q, steps=39, quality=quality, quality_weight=1e6)
    assert order == list(np.argsort(-quality)[:39])
    assert all(a > b for a, b in zip(gains, gains[1:], strict=False))


def test_picks_without_coverage_gain_still_come_in_quality_order():
    """Off-topic items cover nothing (relevance 0); with the quality term on, each still gains its bonus."""
    rng = np.random.default_rng(1)
    q, pool = _off_topic_pool(rng)
    quality = np.concatenate([np.arange(8.0), 10 + rng.random(8)])  # off-topic: the later row, the better
    order, gains = flmi_order(pool, q, steps=16, quality=quality, quality_weight=0.05)
    off = [(c, g) for c, g in zip(order, gains, strict=True) if c < 8]
    assert [c for c, _ in off] == [7, 6, 5, 4, 3, 2, 1, 0], "by quality, not in pool order"
    bonus = _bonus(quality, 0.05, _capped(pool, q)[1])
    assert all(abs(g - bonus[c]) < 1e-6 for c, g in off), "the gain recorded is coverage (0) + bonus"
    assert off[-1][1] == 0.0 and all(g > 1e-3 for _, g in off[:-1]), "the lowest score earns nothing"


def test_the_greedy_with_quality_equals_a_plain_greedy():
    rng = np.random.default_rng(6)
    for trial in range(6):
        pool = _unit(rng.standard_normal((60, 10)))
        queries = _unit(rng.standard_normal((2, 10)))
        eta, weight = ((0.5, 0.1), (1.0, 1.0), (3.0, 0.5), (1.0, 10.0), (1.0, 0.01), (2.0, 3.0))[trial]
        quality = rng.standard_normal(60) * 10 ** trial
        order, gains = flmi_order(pool, queries, steps=40, eta=eta, quality=quality, quality_weight=weight)
        cover, r = _capped(pool, queries, eta)
        _check_against_naive_greedy(order, gains, cover, _bonus(quality, weight, r))


def test_diverse_order_reads_quality_by_id_and_an_unscored_id_gets_no_bonus():
    from retrogen.retrieval.selection import Candidate

    rng = np.random.default_rng(7)
    vecs = _unit(rng.standard_normal((12, 8)))
    q = _unit(rng.standard_normal((1, 8)))
    cands = [Candidate(100 + i, "c", float(vecs[i] @ q[0]), i, {}) for i in range(12)]
    emb = {100 + i: vecs[i] for i in range(12)}
    scores = {100 + i: float(s) for i, s in zip((3, 9, 5, 1), (-1.0, -2.0, -3.0, -4.0), strict=True)}
    out = diverse_order(cands, emb, q, pool_size=12, steps=12, quality=scores, quality_weight=1e6)
    assert [c.id for c in out[:3]] == [103, 109, 105], "scored ids first, by score"
    assert out[0].gain > out[1].gain > out[2].gain > 0
    unscored = [c.gain for c in out[3:] if c.id not in scores]
    assert max(unscored) < 1e-3 * out[2].gain, "no score counts as the lowest score: no bonus"
    with_nan = diverse_order(cands, emb, q, pool_size=12, steps=12, quality_weight=1e6,
                             quality={**scores, 100: float("nan"), 102: float("inf")})
    assert [(c.id, c.gain) for c in with_nan] == [(c.id, c.gain) for c in out], "a NaN or inf reads as no score"
    plain = diverse_order(cands, emb, q, pool_size=12, steps=12)
    assert diverse_order(cands, emb, q, pool_size=12, steps=12, quality={}, quality_weight=1.0) == plain


# --- the sparse (k-nearest-neighbour) similarity ----------------------------------------------------------------

def _knn_capped(cover, neighbours):
    """cover kept only where c is i itself or among i's ``neighbours`` largest others (ties: the earlier c)."""
    m = len(cover)
    kept = np.zeros_like(cover)
    for i in range(m):
        others = [c for c in np.lexsort((np.arange(m), -cover[i])) if c != i][:neighbours]
        kept[i, [i, *others]] = cover[i, [i, *others]]
    return kept


def test_sparse_with_every_neighbour_kept_is_the_dense_objectives_greedy():
    """Both paths are a greedy on the same objective (the sparse one lazy in float64, the dense one with exact
    float32 updates), so each is checked against the written-out greedy; near-ties may go either way."""
    rng = np.random.default_rng(8)
    for trial in range(4):
        m = (50, 90, 140, 200)[trial]
        centres = _unit(rng.standard_normal((4, 24)))
        pool = _clusters(rng, centres, (m // 2, m // 4, m // 8, m - m // 2 - m // 4 - m // 8), 0.3)
        queries = _unit(centres[:2] + 0.1 * rng.standard_normal((2, 24)))
        quality = rng.standard_normal(m) if trial % 2 else None
        dense = flmi_order(pool, queries, steps=60, quality=quality, quality_weight=0.2)
        sparse = flmi_order(pool, queries, steps=60, quality=quality, quality_weight=0.2, neighbours=m - 1)
        cover, r = _capped(pool, queries)
        bonus = _bonus(quality, 0.2, r) if quality is not None else np.zeros(m)
        _check_against_naive_greedy(*dense, cover, bonus)
        _check_against_naive_greedy(*sparse, cover, bonus)
        assert len(set(dense[0][:20]) & set(sparse[0][:20])) >= 18, trial


def test_sparse_lazy_greedy_equals_plain_greedy_on_the_knn_objective():
    rng = np.random.default_rng(9)
    for trial in range(4):
        pool = _unit(rng.standard_normal((70, 8)))
        queries = _unit(rng.standard_normal((2, 8)))
        neighbours, eta = ((3, 1.0), (6, 0.5), (10, 2.0), (1, 1.0))[trial]
        quality = rng.standard_normal(70) if trial >= 2 else None
        order, gains = flmi_order(pool, queries, steps=50, eta=eta, quality=quality, quality_weight=0.3,
                                  neighbours=neighbours)
        cover, r = _capped(pool, queries, eta)
        bonus = _bonus(quality, 0.3, r) if quality is not None else np.zeros(70)
        _check_against_naive_greedy(order, gains, _knn_capped(cover, neighbours), bonus)


def test_sparse_with_few_neighbours_still_spreads_over_the_modes():
    """Six modes the queries reach, one dense and tight; 8 neighbours per row of a 290-item pool."""
    rng = np.random.default_rng(10)
    dim = 32
    centres = _unit(rng.standard_normal((6, dim)))
    queries = _unit(centres + 0.05 * rng.standard_normal((6, dim)))
    pool = np.concatenate([_clusters(rng, centres[:1], (120,), 0.04),
                           _clusters(rng, centres[1:], (60, 40, 30, 20, 20), 0.1)])
    knn = np.argsort(-(pool @ queries.T).max(axis=1), kind="stable")
    pool = pool[knn]
    cluster = np.repeat(np.arange(6), (120, 60, 40, 30, 20, 20))[knn]
    order, _ = flmi_order(pool, queries, steps=6, neighbours=8)
    assert len(set(cluster[order])) == 6, "one pick per mode"
    assert len(set(cluster[:6])) < 6, "while kNN's top-6 misses some"


def test_neighbours_alone_choose_the_sparse_path_and_bad_arguments_are_refused():
    import pytest

    rng = np.random.default_rng(12)
    pool, q = _unit(rng.standard_normal((150, 8))), _unit(rng.standard_normal((2, 8)))
    sparse = flmi_order(pool, q, steps=40, neighbours=2)
    assert sparse != flmi_order(pool, q, steps=40), "the scenario is one where 2 neighbours change the order"
    for bad in ({"ground": 0}, {"neighbours": 0}, {"neighbours": 5, "ground": 100}):
        with pytest.raises(ValueError):
            flmi_order(pool, q, steps=40, **bad)


# --- the sampled ground set for large pools ---------------------------------------------------------------------

def test_ground_rows_are_the_systematic_sample_over_the_knn_ranks():
    from retrogen.retrieval.diverse import GROUND_MAX, ground_rows, ground_size

    for m, s in ((10, 10), (10, 3), (7, 2), (1025, 1024), (2000, 1024), (20000, 1024), (99, 1), (5, 4)):
        rows = ground_rows(m, s)
        assert rows.tolist() == [round(j * m / s) for j in range(s)], (m, s)
        assert len(set(rows.tolist())) == s and rows[0] == 0 and rows[-1] < m, (m, s)
    assert ground_rows(300, 300).tolist() == list(range(300)), "s = m: every row"
    assert ground_rows(2000, 1000).tolist() == list(range(0, 2000, 2))
    assert (ground_size(GROUND_MAX), ground_size(GROUND_MAX + 1), ground_size(50)) == (GROUND_MAX, GROUND_MAX, 50)
    assert (ground_size(5000, 300), ground_size(200, 300), ground_size(GROUND_MAX + 1, 10**9)) == (
        300, 200, GROUND_MAX + 1)


def test_the_default_sample_shrinks_above_five_thousand_so_its_matrix_stays_flat():
    from retrogen.retrieval.diverse import COVER_ENTRIES, GROUND_MAX, GROUND_MIN, ground_size

    assert [ground_size(m) for m in (1024, 1025, 2000, 5000, 5001)] == [1024, 1024, 1024, 1024, 1023]
    assert [ground_size(m) for m in (10_000, 20_000, 40_000, 10**6)] == [512, 256, GROUND_MIN, GROUND_MIN]
    assert all(ground_size(m) * m <= COVER_ENTRIES for m in range(GROUND_MAX + 1, 20_001, 997))
    assert ground_size(20_000, 1024) == 1024, "an explicit ground is kept"


def test_a_ground_as_large_as_the_pool_is_the_exact_order(monkeypatch):
    from retrogen.retrieval import diverse

    rng = np.random.default_rng(13)
    for trial in range(4):
        m = (60, 150, 333, 700)[trial]
        pool, q = _unit(rng.standard_normal((m, 12))), _unit(rng.standard_normal((3, 12)))
        quality = rng.standard_normal(m) if trial % 2 else None
        exact = flmi_order(pool, q, steps=50, quality=quality, quality_weight=0.3)
        assert flmi_order(pool, q, steps=50, quality=quality, quality_weight=0.3, ground=m) == exact, trial
        assert flmi_order(pool, q, steps=50, quality=quality, quality_weight=0.3, ground=10 * m) == exact, trial
        if trial == 1:
            cover, r = _capped(pool, q)
            _check_against_naive_greedy(*exact, cover, _bonus(quality, 0.3, r))
    monkeypatch.setattr(diverse, "GROUND_MAX", 100)  # the pools above are now "large": the default samples
    assert flmi_order(pool, q, steps=50, ground=m) == flmi_order(pool, q, steps=50, ground=10**6)
    assert flmi_order(pool, q, steps=50) == flmi_order(pool, q, steps=50, ground=100)
    assert flmi_order(pool, q, steps=50) != flmi_order(pool, q, steps=50, ground=m), "the sample changes the order"
    assert flmi_order(pool[:100], q, steps=50) == flmi_order(pool[:100], q, steps=50, ground=100)


def test_the_greedy_on_a_sample_equals_plain_greedy_on_the_sampled_objective():
    """f_S(A) = (m / s) sum_{i in S} max_{a in A} K[i, a], S = the rows round(j m / s); every row a candidate."""
    rng = np.random.default_rng(14)
    for trial in range(5):
        m, s, eta = ((90, 25, 1.0), (90, 40, 0.5), (120, 7, 2.0), (120, 60, 1.0), (64, 63, 1.0))[trial]
        centres = _unit(rng.standard_normal((5, 10)))
        sizes = (m // 2, m // 4, m // 8, m // 16)
        pool = _clusters(rng, centres, (*sizes, m - sum(sizes)), 0.4)
        queries = _unit(centres[:2] + 0.2 * rng.standard_normal((2, 10)))
        quality = rng.standard_normal(m) if trial % 2 else None
        order, gains = flmi_order(pool, queries, steps=m, eta=eta, quality=quality, quality_weight=0.4, ground=s)
        cover, r = _capped(pool, queries, eta)
        sample = [round(j * m / s) for j in range(s)]
        bonus = _bonus(quality, 0.4, r) if quality is not None else np.zeros(m)  # from the whole pool's caps
        _check_against_naive_greedy(order, gains, (m / s) * cover[sample], bonus)
        assert any(c not in sample for c in order[:s]), "rows outside the sample are picked too"


def _modes(seed, sizes, dim=32):
    """Modes the queries reach, the first dense and tight (it fills kNN's top), in kNN order, with their labels."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((len(sizes), dim)))
    queries = _unit(centres + 0.05 * rng.standard_normal((len(sizes), dim)))
    pool = np.concatenate([_clusters(rng, centres[:1], sizes[:1], 0.04),
                           _clusters(rng, centres[1:], sizes[1:], 0.1)])
    knn = np.argsort(-(pool @ queries.T).max(axis=1), kind="stable")
    return pool[knn], queries, np.repeat(np.arange(len(sizes)), sizes)[knn]


def test_a_sample_still_spreads_over_the_modes_of_a_large_pool():
    from retrogen.retrieval.diverse import GROUND_MAX

    pool, queries, mode = _modes(15, (3000, 1200, 800, 400, 300, 150, 100, 50))  # 6000 rows, ~1 in 6 sampled
    assert len(pool) > 5 * GROUND_MAX
    order, gains = flmi_order(pool, queries, steps=8)
    assert len(set(mode[order])) >= 7 and len(set(mode[:8])) == 1, "the picks spread; kNN's top-8 is one mode"
    assert all(a >= b - 1e-6 for a, b in zip(gains, gains[1:], strict=False))


def test_a_sample_agrees_with_the_exact_greedy_on_most_picks():
    """m = 2000, ground 1024 (the default): seen 39 of 50 picks shared, 9 of the first 10, 7 modes of 8 each."""
    pool, queries, mode = _modes(0, (1200, 300, 200, 100, 80, 60, 40, 20))
    exact, _ = flmi_order(pool, queries, steps=50, ground=len(pool))
    sampled, _ = flmi_order(pool, queries, steps=50)
    shared = len(set(exact) & set(sampled))
    assert shared >= 30 and len(set(exact[:10]) & set(sampled[:10])) >= 7, shared
    per_mode = np.abs(np.bincount(mode[exact], minlength=8) - np.bincount(mode[sampled], minlength=8)).sum()
    assert per_mode <= 12, f"{per_mode} picks moved between modes"
    assert len(set(mode[sampled[:8]])) >= len(set(mode[exact[:8]])) - 1


def test_a_pool_of_twenty_thousand_keeps_a_sample_by_pool_matrix():
    import tracemalloc

    from retrogen.retrieval.diverse import COVER_ENTRIES, DIMS

    rng = np.random.default_rng(16)
    m = 20_000
    pool, q = _unit(rng.standard_normal((m, 128))), _unit(rng.standard_normal((2, 128)))
    tracemalloc.start()
    try:
        order, _ = flmi_order(pool, q, steps=20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(set(order)) == 20
    bound = 4 * (COVER_ENTRIES + 2 * m * (DIMS + len(q)))  # the (s, m) matrix, the projection and its copy
    assert peak < 1.2 * bound, f"peak {peak / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB"


# --- the projection on the sampled path ------------------------------------------------------------------------

def test_the_exact_path_ignores_dims_and_is_the_written_out_greedy():
    rng = np.random.default_rng(17)
    pool, q = _unit(rng.standard_normal((300, 96))), _unit(rng.standard_normal((3, 96)))
    quality = rng.standard_normal(300)
    exact = flmi_order(pool, q, steps=60, quality=quality, quality_weight=0.3)
    for dims in (None, 1, 4, 64, 500):
        assert flmi_order(pool, q, steps=60, quality=quality, quality_weight=0.3, dims=dims) == exact, dims
    cover, r = _capped(pool, q)
    _check_against_naive_greedy(*exact, cover, _bonus(quality, 0.3, r))


def test_dims_at_least_the_dimension_or_the_sample_is_no_projection():
    rng = np.random.default_rng(18)
    centres = _unit(rng.standard_normal((5, 48)))
    pool = _clusters(rng, centres, (200, 100, 50, 30, 20), 0.5)
    q = _unit(centres[:2] + 0.2 * rng.standard_normal((2, 48)))
    full = flmi_order(pool, q, steps=60, ground=100, dims=None)
    assert flmi_order(pool, q, steps=60, ground=100, dims=48) == full
    assert flmi_order(pool, q, steps=60, ground=100, dims=10**6) == full
    sample_wide = flmi_order(pool, q, steps=60, ground=40, dims=40)  # as many directions as the sample's rows
    assert sample_wide == flmi_order(pool, q, steps=60, ground=40, dims=None)
    assert flmi_order(pool, q, steps=60, ground=100, dims=2) != full, "a scenario where 2 directions change it"


def test_the_greedy_on_a_projected_sample_equals_plain_greedy_on_its_objective():
    """K[i, c] = min(max(x_c . P P^T x_i, 0), r(i), r(c)), P = principal_basis of the sample, r exact."""
    from retrogen.retrieval.diverse import principal_basis

    rng = np.random.default_rng(19)
    for trial in range(4):
        m, s, dims = ((120, 30, 6), (150, 50, 3), (90, 40, 12), (200, 64, 8))[trial]
        centres = _unit(rng.standard_normal((6, 40)))
        sizes = (m // 2, m // 4, m // 8, m // 16, m // 32)
        pool = _clusters(rng, centres, (*sizes, m - sum(sizes)), 0.4)
        queries = _unit(centres[:2] + 0.2 * rng.standard_normal((2, 40)))
        quality = rng.standard_normal(m) if trial % 2 else None
        order, gains = flmi_order(pool, queries, steps=m, quality=quality, quality_weight=0.4, ground=s, dims=dims)
        sample = [round(j * m / s) for j in range(s)]
        coords = pool @ principal_basis(pool[sample], dims)
        _, r = _capped(pool, queries)
        cover = np.minimum(np.minimum(np.clip(coords[sample] @ coords.T, 0, None), r[sample, None]), r[None, :])
        bonus = _bonus(quality, 0.4, r) if quality is not None else np.zeros(m)
        _check_against_naive_greedy(order, gains, (m / s) * cover, bonus)


def test_the_projected_greedy_is_deterministic():
    from retrogen.retrieval.diverse import GROUND_MAX, principal_basis

    pool, queries, _ = _modes(20, (1500, 600, 400, 200, 100), dim=128)
    assert len(pool) > GROUND_MAX
    quality = np.random.default_rng(20).standard_normal(len(pool))
    first = flmi_order(pool, queries, steps=80, quality=quality, quality_weight=0.2)
    assert flmi_order(pool, queries, steps=80, quality=quality, quality_weight=0.2) == first
    assert flmi_order(pool.copy(), queries.copy(), steps=80, quality=quality.copy(), quality_weight=0.2) == first
    assert np.array_equal(principal_basis(pool[:500], 16), principal_basis(pool[:500].copy(), 16))


def test_a_projected_sample_still_spreads_over_the_modes_of_a_large_pool():
    """8 modes in 256 dimensions, 6,000 rows: 64 or 16 directions keep them apart, 2 cannot."""
    pool, queries, mode = _modes(15, (3000, 1200, 800, 400, 300, 150, 100, 50), dim=256)
    assert len(set(mode[:8])) == 1, "kNN's top-8 is one mode"
    for dims in (None, 64, 16):
        order, gains = flmi_order(pool, queries, steps=8, dims=dims)
        assert len(set(mode[order])) >= 7, dims
        assert all(a >= b - 1e-6 for a, b in zip(gains, gains[1:], strict=False)), dims
    order, _ = flmi_order(pool, queries, steps=8, dims=2)
    assert len(set(mode[order])) < 7, "the scenario is one where too few directions merge modes"


def test_bad_dims_are_refused():
    import pytest

    rng = np.random.default_rng(21)
    pool, q = _unit(rng.standard_normal((40, 8))), _unit(rng.standard_normal((2, 8)))
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError):
            flmi_order(pool, q, steps=5, dims=bad)
    assert flmi_order(pool, q, steps=5, dims=np.int64(4)) == flmi_order(pool, q, steps=5)


def test_diverse_order_returns_the_picks_then_every_other_candidate_in_order():
    """Candidates repeat across queries (round-robin): the pool is each id's first occurrence; the picked
    objects leave the list, every other entry (a picked id's later copies too) stays in order."""
    from retrogen.retrieval.selection import Candidate

    rng = np.random.default_rng(22)
    vecs = _unit(rng.standard_normal((30, 8)))
    q = _unit(rng.standard_normal((2, 8)))
    ids = [int(i) for i in rng.integers(0, 30, 70)]
    cands = [Candidate(100 + i, "c", float(vecs[i] @ q[0]), k, {}) for k, i in enumerate(ids)]
    emb = {100 + i: vecs[i] for i in range(30)}
    out = diverse_order(cands, emb, q, pool_size=12, steps=5)
    first = list(dict.fromkeys(c.id for c in cands))[:12]
    picked = out[:5]
    assert [c.id for c in picked] != first[:5] and {c.id for c in picked} <= set(first)
    originals = [next(c for c in cands if c.id == p.id) for p in picked]  # the first occurrences were picked
    assert out[5:] == [c for c in cands if not any(c is o for o in originals)]
    assert len(out) == len(cands) - 5 + 5


def test_exact_ties_go_to_the_earlier_row_on_every_path():
    """A copy of a row ties with it exactly; float32 rounding of the gain updates must not hand the pick to the
    later copy (the earlier row is the nearer in kNN order)."""
    rng = np.random.default_rng(21)
    for m, ground in ((60, None), (300, 100)):
        base = _unit(rng.standard_normal((m, 16)))
        pool = np.concatenate([base, base[: m // 2]])  # rows m.. copy rows 0..m/2
        q = _unit(base[:3].mean(axis=0, keepdims=True))
        order, gains = flmi_order(pool, q, steps=m // 2, ground=ground)
        earning = [c for c, g in zip(order, gains, strict=True) if g > 0]
        assert earning and max(earning) < m, (m, [c for c in earning if c >= m])
