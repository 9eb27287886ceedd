"""The per-class selection policy on synthetic vectors where the right answer is known."""

import numpy as np
import pytest

from retrogen.retrieval.selection import Candidate, SelectionPolicy, round_robin, select


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def cand(i, label, sim, rank=0, q="q"):
    return Candidate(i, label, sim, rank, {"type": "image", "id": q})


def orthogonal(n, dim=32, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return {i: q[:, i].astype(np.float32) for i in range(n)}


NO_FILTERS = SelectionPolicy(dedup_threshold=None, leakage_threshold=None, min_similarity=None)


def test_round_robin_takes_rank_zero_of_every_query_first():
    a = [cand(1, "x", 0.9, 0, "a"), cand(2, "x", 0.8, 1, "a")]
    b = [cand(3, "x", 0.7, 0, "b")]
    assert [c.id for c in round_robin([a, b])] == [1, 3, 2]


def test_exactly_n_per_class_when_enough():
    emb = orthogonal(20)
    cands = {"a": [cand(i, "a", 0.9) for i in range(10)], "b": [cand(i, "b", 0.9) for i in range(10, 20)]}
    sel = select(cands, 4, embeddings=emb, policy=NO_FILTERS)
    assert [c.id for c in sel.chosen["a"]] == [0, 1, 2, 3]
    assert [c.id for c in sel.chosen["b"]] == [10, 11, 12, 13]
    assert not any(sel.exhausted.values())


def test_same_item_from_two_queries_is_returned_once():
    emb = orthogonal(5)
    cands = {"a": [cand(0, "a", 0.9, q="q1"), cand(0, "a", 0.8, q="q2"), cand(1, "a", 0.7)]}
    sel = select(cands, 3, embeddings=emb, policy=NO_FILTERS)
    assert [c.id for c in sel.chosen["a"]] == [0, 1]
    assert sel.removed["duplicate"] == 1
    assert sel.exhausted["a"]


@pytest.mark.parametrize("conflict, expect_a, expect_b", [("assign", [], [7]), ("drop", [], [])])
def test_item_wanted_by_two_classes(conflict, expect_a, expect_b):
    emb = orthogonal(10)
    cands = {"a": [cand(7, "a", 0.5)], "b": [cand(7, "b", 0.9)]}
    policy = SelectionPolicy(None, None, None, conflict)
    sel = select(cands, 1, embeddings=emb, policy=policy)
    assert [c.id for c in sel.chosen["a"]] == expect_a
    assert [c.id for c in sel.chosen["b"]] == expect_b
    assert sel.removed["conflict"] == (1 if conflict == "assign" else 2)


def test_near_duplicates_are_grouped_and_one_kept():
    base = unit(np.arange(1, 17))
    near = unit(base + 0.01 * np.random.default_rng(1).normal(size=16))
    far = unit(np.random.default_rng(2).normal(size=16))
    emb = {0: base, 1: near, 2: far}
    assert float(base @ near) > 0.99
    cands = {"a": [cand(0, "a", 0.9), cand(1, "a", 0.8), cand(2, "a", 0.7)]}
    sel = select(cands, 3, embeddings=emb, policy=SelectionPolicy(0.97, None, None))
    assert [c.id for c in sel.chosen["a"]] == [0, 2]
    assert sel.removed["near_duplicate"] == 1


def test_near_duplicate_across_classes_is_removed_too():
    base = unit(np.ones(16))
    emb = {0: base, 1: unit(base + 1e-3), 2: unit(-np.arange(16.0))}
    cands = {"a": [cand(0, "a", 0.9)], "b": [cand(1, "b", 0.9), cand(2, "b", 0.5)]}
    sel = select(cands, 1, embeddings=emb, policy=SelectionPolicy(0.97, None, None))
    assert [c.id for c in sel.chosen["a"]] == [0]
    assert [c.id for c in sel.chosen["b"]] == [2]


def test_leakage_filter_removes_copies_of_user_images():
    emb = orthogonal(6)
    protected = np.stack([emb[2], emb[4]])
    cands = {"a": [cand(i, "a", 0.9) for i in range(6)]}
    sel = select(cands, 6, embeddings=emb, policy=SelectionPolicy(None, 0.95, None), protected=protected)
    assert [c.id for c in sel.chosen["a"]] == [0, 1, 3, 5]
    assert sel.removed["leakage"] == 2


def test_min_similarity_threshold():
    emb = orthogonal(4)
    cands = {"a": [cand(0, "a", 0.9), cand(1, "a", 0.2), cand(2, "a", 0.6)]}
    sel = select(cands, 3, embeddings=emb, policy=SelectionPolicy(None, None, 0.5))
    assert [c.id for c in sel.chosen["a"]] == [0, 2]
    assert sel.removed["min_similarity"] == 1


def test_label_check_keeps_only_items_predicted_as_their_class():
    emb = orthogonal(4)
    cands = {"a": [cand(i, "a", 0.9) for i in range(4)]}
    predicted = {0: "a", 1: "b", 2: "a", 3: "b"}
    sel = select(cands, 4, embeddings=emb, policy=NO_FILTERS, predicted_label=predicted)
    assert [c.id for c in sel.chosen["a"]] == [0, 2]
    assert sel.removed["label_check"] == 2


def test_opted_out_items_are_never_chosen_and_never_cause_a_conflict():
    emb = orthogonal(10)
    # 7 is opted out: class a would have lost it to b in a conflict; now neither gets it, and a keeps 8
    cands = {"a": [cand(7, "a", 0.5), cand(8, "a", 0.4)], "b": [cand(7, "b", 0.9), cand(9, "b", 0.3)]}
    sel = select(cands, 1, embeddings=emb, policy=NO_FILTERS, excluded={7: "opt_out"})
    assert [c.id for c in sel.chosen["a"]] == [8] and [c.id for c in sel.chosen["b"]] == [9]
    assert sel.removed["opt_out"] == 2 and sel.removed["conflict"] == 0


def test_opt_out_entries_by_url_hash_and_domain():
    from retrogen.retrieval.opt_out import OptOut

    sha = "AB" * 32
    opt = OptOut.parse(["HTTPS://Example.org/a.png", sha, "*.photos.net", "artist.com."])
    assert opt.matches("https://example.org/a.png", None), "scheme and host compare case-insensitively"
    assert not opt.matches("https://example.org/A.png", None), "the path is exact"
    assert opt.matches(None, sha.lower())
    assert opt.matches("http://cdn.photos.net/x.jpg", None) and opt.matches("http://photos.net/x.jpg", None)
    assert opt.matches("http://www.artist.com:8080/x", None)
    assert not opt.matches("http://notartist.com/x", None), "a domain matches whole labels only"
    assert not opt.matches(None, None) and not OptOut.parse([])
