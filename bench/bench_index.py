"""Index benchmarks: build images/s per embedder; per index kind, retrogen's search against bare faiss tuned by
hand to the same recall.

    .venv/bin/python bench/bench_index.py --quick        # 100k vectors only, a few minutes on 2 cores
    .venv/bin/python bench/bench_index.py                # 100k and 1M vectors (dim 512)

Vectors are a clustered synthetic corpus (a Gaussian mixture on the unit sphere, within-cluster cosine ~0.7,
like CLIP embeddings of a web crawl), stored as float16 shards and indexed through the same ``finish_index``
that ``retrogen index build`` uses, so each kind is tuned at build time to the default target recall (0.95).
Per kind, on 500 held-out queries with exact top-10 (over the stored vectors):

- retrogen: ``CorpusIndex.search`` at the operating point the build chose (recall@10, single-query p50);
- bare faiss: the same trained structure driven directly (``bare_index``), its search parameters swept by
  hand (``tune_bare``) to at least retrogen's recall on the same queries;
- ``--rounds`` alternated rounds of single-query timing, one side then the other; the ratio is retrogen's
  p50 over bare faiss's per round (min and median printed). Goal: within 1.2x.

Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# torch and faiss each ship an OpenMP runtime; PASSIVE keeps their idle threads from spinning against each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def mixture(n: int, dim: int, *, clusters: int, seed: int, centres: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sigma = 0.7 / np.sqrt(dim)  # noise norm ~0.7 against unit centres: within-cluster cosine ~0.67
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x = centres[rng.integers(0, len(centres), hi - lo)] + rng.standard_normal((hi - lo, dim)).astype(np.float32) * sigma
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def write_corpus(out: Path, vectors: np.ndarray, shard_rows: int = 100_000):
    from retrogen.retrieval.index_directory import IndexDirectory

    directory, shards = IndexDirectory(out), []
    for n, lo in enumerate(range(0, len(vectors), shard_rows)):
        hi = min(len(vectors), lo + shard_rows)
        rows = [{"key": str(i), "source": "synthetic"} for i in range(lo, hi)]
        shards.append(directory.write_shard(n, vectors[lo:hi], rows, first_id=lo, dtype="float16", start=lo, end=hi))
    return shards


def timed_queries(fn, queries: np.ndarray) -> np.ndarray:
    times = np.empty(len(queries))
    for i in range(len(queries)):
        t = time.perf_counter()
        fn(queries[i : i + 1])
        times[i] = time.perf_counter() - t
    return times


def recall_of(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[:10].tolist()) & set(t.tolist())) / 10 for a, t in zip(ids, truth, strict=True)]))


def bare_index(kind: str, product, vectors: np.ndarray):
    """The bare-faiss side, and its storage position -> row id map (None: the same): a flat ``IndexFlatIP``; for
    hnsw the product's own graph read with ``faiss.read_index`` and searched directly, not through the id map
    around it (the build adds its recall-probe rows last; results are mapped to row ids outside the timed
    calls); for ivfpq the product's
    trained IVF-PQ (quantizer and codebooks) filled in row order under ``IndexRefineFlat`` over the float32
    vectors, the refine a faiss user writes by hand. Same trained structures, so the ratio isolates what
    retrogen adds per query."""
    import faiss

    from retrogen.retrieval.index import row_ids, searching_index

    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return index, None
    index = faiss.read_index(str(product.directory.path / "image.index"))
    if kind == "ivfpq":
        inner = searching_index(index)
        ivfpq = faiss.clone_index(faiss.downcast_index(inner.base_index) if isinstance(inner, faiss.IndexRefine)
                                  else inner)
        ivfpq.reset()
        ivfpq.add(vectors)
        refined = faiss.IndexRefineFlat(ivfpq, faiss.swig_ptr(vectors))
        refined.referenced_objects = [ivfpq]
        return refined, None
    rows, inner = row_ids(index), searching_index(index)
    inner.referenced_objects = [index]  # the map owns the index under it
    return inner, (None if rows is None else rows.copy())


def bare_ladders(kind: str, index) -> list[list[dict]]:
    import faiss

    if kind == "hnsw":
        return [[{"efSearch": e} for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)]]
    if kind == "ivfpq":
        nlist = faiss.extract_index_ivf(index.base_index).nlist
        probes = [2 ** i for i in range(int(np.log2(nlist)) + 1)]
        return [[{"nprobe": p, "k_factor": f} for p in probes] for f in (2, 5, 10, 20, 50)]
    return [[{}]]


def bare_params(point: dict):
    import faiss

    if "efSearch" in point:
        return faiss.SearchParametersHNSW(efSearch=point["efSearch"])
    if "nprobe" in point:
        inner = faiss.SearchParametersIVF(nprobe=point["nprobe"])
        outer = faiss.IndexRefineSearchParameters(k_factor=float(point["k_factor"]), base_index_params=inner)
        outer.referenced_objects = [inner]
        return outer
    return None


def tune_bare(kind: str, index, row_of, queries: np.ndarray, truth: np.ndarray,
              target: float) -> tuple[dict, float]:
    """By hand, as a faiss user would: the first point of each ladder reaching ``target`` recall@10 on these
    queries, then the fastest of those by p50 over 100 single queries (else the most accurate point)."""
    reached, best = [], ({}, -1.0)
    for ladder in bare_ladders(kind, index):
        for point in ladder:
            found = index.search(queries, 10, params=bare_params(point))[1]
            r = recall_of(found if row_of is None else np.where(found >= 0, row_of[found], -1), truth)
            best = max(best, (point, r), key=lambda x: x[1])
            if r >= target:
                reached.append((point, r))
                break
    if not reached:
        return best
    timed = [(np.median(timed_queries(lambda q, p=bare_params(pt): index.search(q, 10, params=p), queries[:100])),
              pt, r) for pt, r in reached]
    _, point, r = min(timed, key=lambda x: x[0])
    return point, r


def bench_kind(kind: str, product, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
               rounds: int) -> dict:
    """Product vs bare faiss at (at least) the product's recall: single-query p50, alternated over ``rounds``."""
    ours_recall = recall_of(product.search(queries, 10)[1], truth)
    bare, row_of = bare_index(kind, product, vectors)
    point, bare_recall = tune_bare(kind, bare, row_of, queries, truth, ours_recall)
    params = bare_params(point)
    p50s = {"ours": [], "bare": []}
    for _ in range(rounds):  # alternate, so drift in the machine's load hits both sides alike
        p50s["ours"].append(np.median(timed_queries(lambda q: product.search(q, 10), queries)))
        p50s["bare"].append(np.median(timed_queries(lambda q: bare.search(q, 10, params=params), queries)))
    ratios = np.array(p50s["ours"]) / np.array(p50s["bare"])
    return {"recall": ours_recall, "bare_recall": bare_recall, "bare_point": point,
            "p50_ms": 1e3 * float(np.median(p50s["ours"])), "bare_p50_ms": 1e3 * float(np.median(p50s["bare"])),
            "ratio_min": float(ratios.min()), "ratio_median": float(np.median(ratios))}


def bench_size(n: int, dim: int, kinds: list[str], workdir: Path, args) -> list[dict]:
    import faiss

    from retrogen.index_builder.build import finish_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.retrieval.index import CorpusIndex
    from retrogen.retrieval.index_directory import IndexDirectory

    print(f"\n== {n:,} vectors, dim {dim} (clustered, {args.clusters} clusters, float16 shards), "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    t = time.perf_counter()
    vectors, centres = mixture(n, dim, clusters=args.clusters, seed=0)
    vectors = vectors.astype(np.float16).astype(np.float32)  # exactly what the shards store
    base = workdir / f"corpus-{n}"
    shutil.rmtree(base, ignore_errors=True)
    shards = write_corpus(base, vectors)
    queries, _ = mixture(args.latency_queries, dim, clusters=args.clusters, seed=1, centres=centres)
    truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    print(f"  data, shards and exact top-10 of {len(queries)} held-out queries in {time.perf_counter() - t:.1f} s",
          flush=True)
    entry = {"name": "synthetic", "dim": dim, "normalized": True, "modalities": ["image"]}
    rows = []
    for kind in kinds:
        out = workdir / f"idx-{n}-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        t = time.perf_counter()
        config = IndexBuildConfig(index_type=kind, dtype="float16", num_recall_queries=args.recall_queries)
        m = finish_index(IndexDirectory(out), shards, embedder_entry=entry, config=config, sources=[],
                         params={"bench": kind})
        build_s = time.perf_counter() - t
        product = CorpusIndex.open(out)
        tuned = (f"; tuned at build to {m.recall['operating_point']} (recall@10 {m.recall['recall_at_10']:.3f} on "
                 "its own held-out rows)") if m.recall else " (exact: nothing to tune)"
        print(f"  {kind}: built {m.faiss['factory']} in {build_s:.1f} s{tuned}", flush=True)
        few = kind == "flat" and n >= 500_000  # exact search at 1M: ~0.1 s per single query on 2 cores
        q, tr = (queries[:50], truth[:50]) if few else (queries, truth)
        product.search(q[:5], 10)  # warm up (page in, thread pools)
        t = time.perf_counter()
        product.search(q, 10)
        qps = len(q) / (time.perf_counter() - t)
        row = bench_kind(kind, product, vectors, q, tr, args.rounds)
        rows.append({**row, "n": n, "kind": kind, "factory": m.faiss["factory"], "build_s": build_s, "qps": qps})
        print(f"    retrogen recall@10 {row['recall']:.3f} p50 {row['p50_ms']:.3f} ms ({qps:.0f} q/s batched) | "
              f"bare faiss {row['bare_point'] or '(exact)'} recall@10 {row['bare_recall']:.3f} "
              f"p50 {row['bare_p50_ms']:.3f} ms | ratio min {row['ratio_min']:.2f} median {row['ratio_median']:.2f}",
              flush=True)
        del product
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    return rows


def bench_embedders(workdir: Path, num_images: int, names: list[str]) -> list[dict]:
    from PIL import Image

    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.retrieval.embedders import create_embedder

    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        arr = np.clip(rng.integers(0, 256, 3) + rng.integers(-50, 51, (256, 320, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:04d}.jpg", quality=90)
    print(f"\n== index build throughput, {num_images} JPEGs 320x256 (decode + preprocess + embed + write)")
    rows = []
    for name in names:
        kwargs = {}
        spec = name
        if name == "tiny-open_clip":
            from tests.tiny_clip import build_tiny_open_clip

            spec = f"open_clip:local-dir:{build_tiny_open_clip(workdir / 'tiny_open_clip')}"
        if name.endswith(":onnx"):
            kwargs["cache_dir"] = workdir / "onnx"
        emb = create_embedder(spec, **kwargs)
        out = workdir / f"build-{name.replace(':', '_')}"
        t = time.perf_counter()
        m = build_index([str(folder)], out, embedder=emb, config=IndexBuildConfig(batch_size=32, num_workers=2),
                        overwrite=True)
        total = time.perf_counter() - t
        row = {"embedder": name, "images_per_s": m.build["images_per_s"], "total_s": total}
        print(f"  {name:<24} embed {m.build['images_per_s']:8.1f} images/s   whole build {num_images / total:8.1f} "
              f"images/s ({total:.1f} s)", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100k vectors only.")
    p.add_argument("--sizes", default=None, help="Comma-separated corpus sizes (default 100000,1000000).")
    p.add_argument("--kinds", default="flat,hnsw,ivfpq", help="Index types (--index-type) or factory strings.")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--latency-queries", type=int, default=500, help="Held-out queries: recall, and p50 one by one.")
    p.add_argument("--rounds", type=int, default=3, help="Alternated product / bare timing rounds.")
    p.add_argument("--recall-queries", type=int, default=500)
    p.add_argument("--embedders", default="efficientnet-lite0,efficientnet-lite0:onnx,tiny-open_clip",
                   help="Comma-separated; empty to skip the build-throughput part.")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_index_"))
    workdir.mkdir(parents=True, exist_ok=True)
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; workdir {workdir}")
    if args.embedders:
        bench_embedders(workdir, args.num_images, [e for e in args.embedders.split(",") if e])
    sizes = [100_000] if args.quick else [int(s) for s in (args.sizes or "100000,1000000").split(",")]
    rows = []
    for n in sizes:
        rows += bench_size(n, args.dim, args.kinds.split(","), workdir, args)
    print(f"\nsummary (load at the end {os.getloadavg()[0]:.2f}): p50 = median over rounds of each round's "
          "single-query median; ratio = retrogen p50 / bare p50 per round, min and median")
    print("| vectors | kind | factory | build s | retrogen recall@10 | retrogen p50 ms | bare faiss setting "
          "| bare recall@10 | bare p50 ms | ratio min / median |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']:,} | {r['kind']} | {r['factory']} | {r['build_s']:.0f} | {r['recall']:.3f} "
              f"| {r['p50_ms']:.3f} | {r['bare_point'] or 'exact'} | {r['bare_recall']:.3f} | {r['bare_p50_ms']:.3f} "
              f"| {r['ratio_min']:.2f} / {r['ratio_median']:.2f} |")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
