"""The diverse selection policy (greedy facility-location mutual information) on synthetic vectors."""

import numpy as np

from retrogen.retrieval.diverse import flmi_order


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


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
    dim = 16
    q = _unit(rng.standard_normal((1, dim)))
    relevant = _unit(q + 0.3 * rng.standard_normal((8, dim)))
    ortho = rng.standard_normal((8, dim))
    ortho -= (ortho @ q.T) * q  # orthogonal to the query: cosine 0
    pool = np.concatenate([_unit(ortho), relevant])
    order, gains = flmi_order(pool, q, steps=16)  # off-topic rows first: pool order does not rescue them
    earning = [c for c, g in zip(order, gains, strict=True) if g > 0]
    assert earning and all(c >= 8 for c in earning), "only relevant items earn a gain"
    assert order[: len(earning)] == earning, "every earning pick comes before any zero-gain one"
    zero = order[len(earning):]
    assert zero == sorted(zero), "zero gain: the pool's own (kNN) order is kept"


def test_lazy_greedy_equals_plain_greedy_on_the_written_out_objective():
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
