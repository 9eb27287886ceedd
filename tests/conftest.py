"""Shared fixtures: tiny random models in their standard layouts, and small image sets made on the fly.

Each engineer appends fixtures here; keep them session-scoped when they build models.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory):
    from tests.tiny_clip import build_tiny_open_clip

    return build_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"))


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory):
    from tests.tiny_clip import build_tiny_hf_clip

    return build_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip"))


@pytest.fixture(scope="session")
def onnx_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


def colour_image(rgb, size=(40, 32), noise_seed=None) -> Image.Image:
    """A flat-colour image, optionally with a little noise (distinct bytes, near-identical content)."""
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = rgb
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        arr = np.clip(arr.astype(int) + rng.integers(-6, 7, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random Stable Diffusion model directory (+ image encoder and IP-Adapter), see tests/tiny_sd.py."""
    from tests.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL model directory (+ image encoder and IP-Adapter), see tests/tiny_sd.py."""
    from tests.tiny_sd import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


class ThreadedUvicorn:
    """A real uvicorn server on 127.0.0.1 (free port) in a background thread; ``with`` stops it.

    Cheaper than a subprocess (no second model load) while still speaking real HTTP over loopback.
    """

    def __init__(self, app):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))

    def __enter__(self):
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def make_router_app(*routers, index_registry=None):
    """A bare FastAPI app with the given routers, ``RetrogenError`` mapped to ``{"detail": message}`` + its
    ``http_status`` (as the service app does), and optionally ``app.state.index_registry``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from retrogen.errors import RetrogenError

    app = FastAPI()
    for router in routers:
        app.include_router(router)

    @app.exception_handler(RetrogenError)
    async def _retrogen_error(request, exc: RetrogenError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)

    if index_registry is not None:
        app.state.index_registry = index_registry
    return app


# -- a small corpus index for the service tests --------------------------------------------------------------

SERVICE_FAMILIES = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
SERVICE_PER_FAMILY = 6


def png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_service_corpus_tar(path):
    """An img2dataset-style shard: ``{family}-{i}.png`` + ``.txt`` caption + ``.json`` with the source url."""
    import io
    import json
    import tarfile

    with tarfile.open(path, "w") as tar:
        for fam, rgb in SERVICE_FAMILIES.items():
            for i in range(SERVICE_PER_FAMILY):
                key = f"{fam}-{i:03d}"
                shade = tuple(int(np.clip(c + (i - 3) * 8, 0, 255)) for c in rgb)
                files = {f"{key}.png": png_bytes(colour_image(shade, noise_seed=i)),
                         f"{key}.txt": f"a {fam} square".encode(),
                         f"{key}.json": json.dumps({"url": f"http://example.com/{key}.png"}).encode()}
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def service_index_dir(tmp_path_factory, tiny_open_clip_dir):
    """A flat index (tiny open_clip, 18 items in 3 colour families) built by ``index_builder.build``."""
    try:
        from index_builder.build import build_index
    except ImportError:  # the index builder has not landed yet: write the same contract directly
        build_index = _contract_build_index
    from retrieval.embedders import create_embedder

    root = tmp_path_factory.mktemp("service_index")
    tar = write_service_corpus_tar(root / "00000.tar")
    build_index([str(tar)], root / "index", embedder=create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}"))
    return root / "index"


def _contract_build_index(sources, out, *, embedder):
    """Minimal writer of the index-directory contract (one tar shard, flat IP index); a stand-in only."""
    import hashlib
    import tarfile
    from pathlib import Path

    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from retrieval.index_format import INDEX_FILE, Manifest, emb_path, meta_path, metadata_schema, write_manifest

    rows, images = [], []
    for source in sources:
        with tarfile.open(source) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                if not name.endswith(".png"):
                    continue
                key = name[:-4]
                data = tar.extractfile(m).read()
                meta = __import__("json").loads(tar.extractfile(members[key + ".json"]).read())
                img = Image.open(__import__("io").BytesIO(data)).convert("RGB")
                images.append(img)
                rows.append({"id": len(rows), "key": key, "source": str(source), "member": name,
                             "offset": m.offset_data, "size": m.size,
                             "caption": tar.extractfile(members[key + ".txt"]).read().decode(),
                             "url": meta["url"], "licence": None, "width": img.width, "height": img.height,
                             "sha256": hashlib.sha256(data).hexdigest()})
    out = Path(out)
    emb = embedder.embed_images(images).astype(np.float32)
    emb_path(out, 0).parent.mkdir(parents=True, exist_ok=True)
    meta_path(out, 0).parent.mkdir(parents=True, exist_ok=True)
    np.save(emb_path(out, 0), emb)
    pq.write_table(pa.Table.from_pylist(rows, schema=metadata_schema()), meta_path(out, 0))
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    faiss.write_index(index, str(out / INDEX_FILE))
    write_manifest(out, Manifest(
        index_id="test-corpus", embedder=embedder.manifest_entry(), dtype="float32", count=len(rows),
        dim=emb.shape[1], faiss={"factory": "Flat", "kind": "flat", "search_defaults": {}, "rerank_k_factor": 1},
        shards=[{"emb": "img_emb/img_emb_0000.npy", "meta": "metadata/metadata_0000.parquet", "rows": len(rows)}],
        build={"created": "2026-01-01T00:00:00+00:00"}))
