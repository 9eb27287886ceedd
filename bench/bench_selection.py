"""Selection policies: time per class of the ``diverse`` greedy (FLMI) against ``knn``, beside the search itself.

    .venv/bin/python bench/bench_selection.py            # ~5 minutes on 2 cores (3 of them build the HNSW index)
    .venv/bin/python bench/bench_selection.py --quick    # smaller corpus, dense pools only

For one class (``--queries`` user images, N = ``--per-class``) over a clustered synthetic corpus (the mixture
of bench_index.py: unit-sphere Gaussian clusters, within-cluster cosine ~0.67), each round, alternated:

- search: bare ``faiss.IndexFlatIP.search`` for the candidates (the baseline: what the library alone costs),
  asking each query for M (the pool size) neighbours;
- retrogen search: the same M per query from retrogen's own index of the corpus (``--product-index``, default
  auto: HNSW at 200k, built and tuned to recall 0.95 as ``retrogen index build`` does; HNSW searches at least
  M deep), then the candidates' embeddings read from its shards, as retrieval's candidate step does
  (``augment._candidates``, timed there as ``search_s``): what a user of the product pays for the candidates
  (timed only: both policies select from the exact candidates);
- knn: retrogen's round-robin + ``select`` (its filters on) over those candidates;
- diverse: ``diverse_order`` (its pool of the first M distinct candidates and the greedy, timed alone: the
  policy's own cost), then the same ``select``.

Pools up to ``GROUND_MAX`` (1024) take the exact objective; larger ones sum it over a systematic sample
(``ground_size``: 1024 rows up to a pool of 5,000, then 5,120,000 / M rows, at least 256; ``--ground`` sets
another size, ``--neighbours`` forces the sparse kNN path instead), with similarities in the sample's top
``DIMS`` (64) principal directions (``--dims``; 0: full cosines); the table says which path ran and, from one
extra untimed call per pool under tracemalloc, the greedy's peak memory. Prints median and min-max over
rounds per pool size M, the ratio greedy / search, how similar the N picks are to each other under each
policy, and the load average at the start and the end. Asserts nothing. The ratio moves with the machine's
load (the flat search slows more under load than the greedy): compare milliseconds across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def one_round(index, corpus: np.ndarray, queries: np.ndarray, *, pool: int, per_class: int,
              neighbours: int | None = None, ground: int | None = None, dims: int | None = None,
              trace: bool = False, product=None) -> dict[str, float]:
    from retrogen.retrieval.diverse import diverse_order
    from retrogen.retrieval.selection import Candidate, SelectionPolicy, round_robin, select

    policy = SelectionPolicy(dedup_threshold=0.97, leakage_threshold=0.95)
    t0 = time.perf_counter()
    scores, ids = index.search(queries, pool)
    t_search = time.perf_counter() - t0
    t_product = float("nan")
    if product is not None:  # what the user's own index costs for the same M per query, as retrieval's
        t0 = time.perf_counter()  # candidate step does it: the search, then the candidates' embeddings
        _, found = product.search(queries, pool)
        product.embeddings(np.unique(found[found >= 0]).tolist()).astype(np.float32)
        t_product = time.perf_counter() - t0

    t0 = time.perf_counter()
    lists = [[Candidate(int(i), "c", float(s), r, {"q": qi})
              for r, (s, i) in enumerate(zip(srow, irow, strict=True))]
             for qi, (srow, irow) in enumerate(zip(scores, ids, strict=True))]
    cands = round_robin(lists)
    uniq = sorted({c.id for c in cands})
    emb = dict(zip(uniq, corpus[uniq], strict=True))
    t_prep = time.perf_counter() - t0  # shared by both policies

    t0 = time.perf_counter()
    knn = select({"c": cands}, per_class, embeddings=emb, policy=policy, protected=queries)
    t_knn = time.perf_counter() - t0

    t0 = time.perf_counter()
    kw = {"neighbours": neighbours, "ground": ground}
    if dims is not None:  # else the module's default
        kw["dims"] = dims or None
    picked = diverse_order(cands, emb, queries, pool_size=pool, steps=2 * per_class, **kw)
    t_greedy = time.perf_counter() - t0  # the policy's own cost (its pool, the greedy)
    div = select({"c": picked}, per_class, embeddings=emb, policy=policy, protected=queries)
    t_div = time.perf_counter() - t0
    peak = float("nan")
    if trace:  # once more, untimed: the greedy's peak memory (numpy reports its buffers to tracemalloc)
        tracemalloc.start()
        diverse_order(cands, emb, queries, pool_size=pool, steps=2 * per_class, **kw)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    spread = {}
    for name, sel in (("knn", knn), ("diverse", div)):
        vecs = np.stack([emb[c.id] for c in sel.chosen["c"]])
        sims = vecs @ vecs.T
        spread[name] = float(sims[np.triu_indices(len(vecs), 1)].mean())
    return {"search": t_search, "product": t_product, "prep": t_prep, "knn": t_knn, "diverse": t_div, "greedy": t_greedy,
            "sim_knn": spread["knn"], "sim_diverse": spread["diverse"], "peak": peak}


def product_index(corpus: np.ndarray, kind: str):
    """retrogen's own index of ``corpus`` (float16 shards, built and tuned as ``retrogen index build`` does)."""
    import tempfile

    from bench_index import write_corpus

    from retrogen.index_builder.build import finish_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.retrieval.index import CorpusIndex
    from retrogen.retrieval.index_directory import IndexDirectory

    out = Path(tempfile.mkdtemp(prefix="bench_selection_")) / "index"
    t = time.perf_counter()
    shards = write_corpus(out, corpus)
    entry = {"name": "synthetic", "dim": corpus.shape[1], "normalized": True, "modalities": ["image"]}
    m = finish_index(IndexDirectory(out), shards, embedder_entry=entry, sources=[], params={},
                     config=IndexBuildConfig(index_type=kind, dtype="float16", num_recall_queries=500))
    print(f"retrogen index: {m.faiss['factory']}, search defaults {m.faiss.get('search_defaults')}, "
          f"built in {time.perf_counter() - t:.0f} s", flush=True)
    return CorpusIndex.open(out)


def path(pool: int, neighbours: int | None, ground: int | None, dims: int | None, dim: int) -> str:
    """Which similarity ``flmi_order`` builds for a pool of this size (as it decides)."""
    from retrogen.retrieval.diverse import DIMS, ground_size

    if neighbours is not None:
        return f"sparse, {min(neighbours, pool - 1)} nb"
    size = ground_size(pool, ground)
    dims = DIMS if dims is None else (dims or None)
    projected = dims is not None and dims < min(dim, size)
    return "exact" if size == pool else f"sample {size}" + (f", {dims} dims" if projected else "")


def main(argv: list[str] | None = None) -> int:
    import faiss
    from bench_index import mixture

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--pools", default="100,250,1000,2500,4096,5000,10000,20000")
    p.add_argument("--neighbours", type=int, default=None, help="force the sparse path with this many")
    p.add_argument("--ground", type=int, default=None, help="rows the objective sums over (default: the module's)")
    p.add_argument("--dims", type=int, default=None, help="sampled path's directions (default: module's; 0: all)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--product-index", default="auto", help="also time retrogen's own search of the corpus with "
                   "this --index-type (auto: HNSW at 200k, tuned at build to recall 0.95); '' to skip")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.corpus, a.pools, a.rounds = 50_000, "100,1000", 3
    corpus, centres = mixture(a.corpus, a.dim, clusters=1000, seed=0)
    index = faiss.IndexFlatIP(a.dim)
    index.add(corpus)
    product = product_index(corpus, a.product_index) if a.product_index else None
    print(f"corpus {a.corpus} x {a.dim} (flat), {a.queries} queries per class, N = {a.per_class}, "
          f"{a.rounds} rounds, faiss threads {faiss.omp_get_max_threads()}, load {os.getloadavg()[0]:.2f}")
    kind = product.manifest.faiss["factory"] if product is not None else "-"
    print("| pool M | path | search ms (bare faiss, exact) | search + embeddings ms (retrogen, " + kind + ") | knn: select ms "
          "| diverse: greedy ms | diverse: greedy + select ms | greedy / search: exact, retrogen | greedy peak MB "
          "| mean cosine among the N picks, knn → diverse |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(1)
    for pool in (int(x) for x in a.pools.split(",")):
        rows = []
        for r in range(a.rounds):
            # the class's images: a few of one cluster, as a user's shots of one class would be
            centre = centres[[rng.integers(len(centres))]]
            q, _ = mixture(a.queries, a.dim, clusters=1, seed=100 + r, centres=centre)
            rows.append(one_round(index, corpus, q, pool=pool, per_class=a.per_class, neighbours=a.neighbours,
                                  ground=a.ground, dims=a.dims, trace=r == 0, product=product))
        med = {k: float(np.median([x[k] for x in rows])) for k in rows[0]}
        lo = {k: min(x[k] for x in rows) for k in rows[0]}
        hi = {k: max(x[k] for x in rows) for k in rows[0]}

        def ms(k, med=med, lo=lo, hi=hi):
            return f"{1e3 * med[k]:.1f} ({1e3 * lo[k]:.1f}–{1e3 * hi[k]:.1f})"

        label = f"{pool} (2N, the default)" if pool == 2 * a.per_class else str(pool)
        print(f"| {label} | {path(pool, a.neighbours, a.ground, a.dims, a.dim)} | {ms('search')} | {ms('product')} "
              f"| {ms('knn')} | {ms('greedy')} | {ms('diverse')} "
              f"| {med['greedy'] / med['search']:.2f}×, {med['greedy'] / med['product']:.2f}× | {rows[0]['peak'] / 1e6:.1f} "
              f"| {med['sim_knn']:.3f} → {med['sim_diverse']:.3f} |", flush=True)
    print("ms: median (min–max) over rounds. Both policies share the candidate bookkeeping (round-robin, "
          "embedding lookup), not counted; 'select' is the filters' walk down the order. Peak MB: one untimed "
          f"greedy call under tracemalloc (its pool copy and similarity, not the candidates). "
          f"Load at the end {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
