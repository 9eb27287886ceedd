"""Index benchmarks: build images/s per embedder; query throughput, p50/p99 latency and recall@10 per index type.

    .venv/bin/python bench/bench_index.py --quick        # 100k vectors only, a few minutes on 2 cores
    .venv/bin/python bench/bench_index.py                # 100k and 1M vectors (dim 512)

Vectors are a clustered synthetic corpus (a Gaussian mixture on the unit sphere, within-cluster cosine ~0.7,
like CLIP embeddings of a web crawl), stored as float16 shards and indexed through the same ``finish_index``
that ``retrogen index build`` uses. "overhead" is the share of per-query time spent outside FAISS:
``CorpusIndex.search`` (parameters, re-rank, bookkeeping) against the raw ``index.search`` it wraps.
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


def bench_search(corpus, queries: np.ndarray, batch: np.ndarray, label: str, recall: float) -> dict:
    from retrogen.retrieval.index import search_parameters

    k = 10
    defaults = corpus.search_defaults
    params = search_parameters(corpus.faiss_index, nprobe=defaults.get("nprobe"), ef_search=defaults.get("efSearch"))
    kk = k * corpus.rerank_k_factor
    corpus.search(queries[:5], k)  # warm up (page in the mmap, thread pools)
    ours = timed_queries(lambda q: corpus.search(q, k), queries)
    raw = timed_queries(lambda q: corpus.faiss_index.search(q, kk, params=params), queries)
    t = time.perf_counter()
    corpus.search(batch, k)
    qps = len(batch) / (time.perf_counter() - t)
    row = {"index": label, "qps_batch": qps, "p50_ms": 1e3 * np.percentile(ours, 50),
           "p99_ms": 1e3 * np.percentile(ours, 99), "raw_p50_ms": 1e3 * np.percentile(raw, 50),
           "overhead": max(0.0, 1 - raw.mean() / ours.mean()), "recall_at_10": recall}
    print(f"  {label:<28} {qps:>9.0f} q/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
          f"raw faiss p50 {row['raw_p50_ms']:7.2f} ms  overhead {100 * row['overhead']:5.1f}%  "
          f"recall@10 {recall:.3f}", flush=True)
    return row


def bench_size(n: int, dim: int, kinds: list[str], workdir: Path, args) -> list[dict]:
    from retrogen.index_builder.build import finish_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.index_builder.faiss_build import measure_recall
    from retrogen.retrieval.index import CorpusIndex
    from retrogen.retrieval.index_directory import IndexDirectory

    print(f"\n== {n:,} vectors, dim {dim} (clustered, {args.clusters} clusters, float16 shards)", flush=True)
    t = time.perf_counter()
    vectors, centres = mixture(n, dim, clusters=args.clusters, seed=0)
    base = workdir / f"corpus-{n}"
    shutil.rmtree(base, ignore_errors=True)
    shards = write_corpus(base, vectors)
    del vectors
    queries, _ = mixture(args.latency_queries, dim, clusters=args.clusters, seed=1, centres=centres)
    batch, _ = mixture(args.batch_queries, dim, clusters=args.clusters, seed=2, centres=centres)
    print(f"  data + shards written in {time.perf_counter() - t:.1f} s", flush=True)
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
        corpus = CorpusIndex.open(out)
        recall = m.recall["recall_at_10"] if m.recall else 1.0
        print(f"  built {m.faiss['factory']} in {build_s:.1f} s (incl. recall on {args.recall_queries} queries)",
              flush=True)
        # exact search at 1M costs ~1 s per single query on 2 cores: time fewer of them
        few = kind == "flat" and n >= 500_000
        row = bench_search(corpus, queries[:50] if few else queries, batch[:100] if few else batch,
                           f"{kind} {m.faiss['factory']}", recall)
        rows.append({**row, "n": n, "build_s": build_s})
        if corpus.rerank_k_factor > 1:  # the same index without re-rank: what PQ alone gives
            plain = CorpusIndex(out, m.model_copy(update={"faiss": {**m.faiss, "rerank_k_factor": 1}}),
                                corpus.faiss_index)
            r = measure_recall(plain, lambda out=out: IndexDirectory(out).iter_vectors(shards),
                               num_queries=args.recall_queries)
            row = bench_search(plain, queries, batch, f"{kind} without re-rank", r["recall_at_10"])
            rows.append({**row, "n": n, "build_s": build_s})
        del corpus
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
    p.add_argument("--latency-queries", type=int, default=200, help="Single queries timed one by one.")
    p.add_argument("--batch-queries", type=int, default=500, help="Queries in the throughput batch.")
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
    print("\nsummary (n, index, q/s batch, p50 ms, p99 ms, overhead outside faiss, recall@10, build s)")
    for r in rows:
        print(f"  {r['n']:>9,} {r['index']:<28} {r['qps_batch']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{100 * r['overhead']:>6.1f}% {r['recall_at_10']:>6.3f} {r['build_s']:>7.1f}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
