"""Throughput and latency of ``POST /v1/retrieve`` over real HTTP, against the same work done in-process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_service.py [--corpus-size 2000] [--requests 200]
        [--concurrency 1,8,32] [--query image|text] [--k 10] [--embedder NAME]

Builds a corpus index (random-colour PNGs in a webdataset shard; default embedder: the tiny random open_clip of
the tests, so the figures measure the service's overhead rather than a model), starts uvicorn on 127.0.0.1 in a
subprocess, and drives it with httpx clients at each concurrency level, a bounded number of requests each.
The server is the service's own app (``create_app``: middleware, metrics, key check) with no job worker.
The in-process baseline runs the same decode + embed + search (``LoadedIndex``) on a thread pool of the same
size. Prints requests/s, p50 and p99 per level and the HTTP/in-process throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def make_corpus(path: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            arr = np.clip(rng.integers(0, 256, 3) + rng.integers(-8, 9, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr, "RGB").save(buf, format="PNG")
            for name, data in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.txt", f"item {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def make_app(index_dir: str, work: Path, max_concurrent_embeds: int):
    """The service's own app (middleware, metrics, error mapping), no job worker."""
    from retrogen.service.api.main import create_app
    from retrogen.service.core.config import IndexConfig, Settings

    settings = Settings(data_dir=work / "data", indexes={"bench": IndexConfig(path=Path(index_dir))},
                        enable_worker=False, max_concurrent_embeds=max_concurrent_embeds)
    return create_app(settings, start_worker=False)


def serve(index_dir: str, port: int, max_concurrent_embeds: int) -> None:
    import uvicorn

    app = make_app(index_dir, Path(index_dir).parent, max_concurrent_embeds)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(lat: list[float]) -> tuple[float, float]:
    a = np.asarray(lat) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


async def http_level(url: str, bodies: list[dict], concurrency: int, total: int) -> tuple[float, list[float]]:
    import httpx

    lat: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            for i in counter:
                t = time.perf_counter()
                r = await client.post("/v1/retrieve", json=bodies[i % len(bodies)])
                r.raise_for_status()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, lat


def inprocess_level(loaded, bodies: list[dict], concurrency: int, total: int, k: int) -> tuple[float, list[float]]:
    from retrogen.service.domain.queries import QueryLimits, decode_base64_image

    limits = QueryLimits()

    def one(i: int) -> float:
        t = time.perf_counter()
        body = bodies[i % len(bodies)]
        if "images" in body:
            vec = loaded.embed_images([decode_base64_image(body["images"][0], what="image", limits=limits)[0]])
        else:
            vec = loaded.embed_texts(body["texts"])
        loaded.neighbours(vec, k)
        return time.perf_counter() - t

    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        lat = list(pool.map(one, range(total)))
        return time.perf_counter() - t0, lat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-size", type=int, default=2000)
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (bounded)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--query", choices=("image", "text"), default="image")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--embedder", default=None, help="default: the tests' tiny random open_clip")
    p.add_argument("--max-concurrent-embeds", type=int, default=2, help="IndexRegistry bound on model calls")
    p.add_argument("--serve", nargs=2, metavar=("INDEX_DIR", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.max_concurrent_embeds)
        return

    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.service.core.config import IndexConfig
    from retrogen.service.domain.indexes import IndexRegistry

    work = Path(tempfile.mkdtemp(prefix="bench_service_"))
    embedder = args.embedder
    if embedder is None:
        from tests.tiny_clip import build_tiny_open_clip

        embedder = f"open_clip:local-dir:{build_tiny_open_clip(work / 'clip')}"
    t = time.perf_counter()
    tar = make_corpus(work / "00000.tar", args.corpus_size)
    build_index([str(tar)], work / "index", embedder=embedder, config=IndexBuildConfig(index_type="flat", num_workers=1))
    print(f"corpus: {args.corpus_size} items, flat index, embedder {embedder} (built in {time.perf_counter() - t:.1f} s)")

    rng = np.random.default_rng(1)
    bodies = []
    for i in range(16):
        if args.query == "text":
            bodies.append({"texts": [f"a photo of item {i}"], "k": args.k})
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8), "RGB").save(buf, format="PNG")
            bodies.append({"images": [base64.b64encode(buf.getvalue()).decode()], "k": args.k})

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(work / "index"), str(port),
                               "--max-concurrent-embeds", str(args.max_concurrent_embeds)])
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.post(url + "/v1/retrieve", json=bodies[0], timeout=60).raise_for_status()  # also loads the index
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        loaded = IndexRegistry({"bench": IndexConfig(path=work / "index")},
                               max_concurrent_embeds=args.max_concurrent_embeds).get("bench")
        inprocess_level(loaded, bodies, 1, 8, args.k)  # warm-up
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"query: {args.query}, k={args.k}, {args.requests} requests per level, "
              f"max_concurrent_embeds={args.max_concurrent_embeds}")
        print(f"{'clients':>7} | {'HTTP req/s':>10} {'p50 ms':>8} {'p99 ms':>8} | {'in-proc req/s':>13} "
              f"{'p50 ms':>8} {'p99 ms':>8} | {'HTTP/in-proc':>12}")
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            total = max(args.requests, 2 * c)
            wall_h, lat_h = asyncio.run(http_level(url, bodies, c, total))
            wall_i, lat_i = inprocess_level(loaded, bodies, c, total, args.k)
            rps_h, rps_i = total / wall_h, total / wall_i
            (p50h, p99h), (p50i, p99i) = percentiles(lat_h), percentiles(lat_i)
            rows.append({"clients": c, "requests": total, "http_rps": rps_h, "http_p50_ms": p50h,
                         "http_p99_ms": p99h, "inproc_rps": rps_i, "inproc_p50_ms": p50i, "inproc_p99_ms": p99i,
                         "ratio": rps_h / rps_i})
            print(f"{c:>7} | {rps_h:>10.1f} {p50h:>8.1f} {p99h:>8.1f} | {rps_i:>13.1f} {p50i:>8.1f} {p99i:>8.1f} | "
                  f"{rps_h / rps_i:>12.2f}")
        print(json.dumps({"corpus_size": args.corpus_size, "query": args.query, "k": args.k,
                          "max_concurrent_embeds": args.max_concurrent_embeds, "levels": rows}))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
