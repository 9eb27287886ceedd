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


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    """The tiny SD pipeline loaded once per test module (tests load adapters into it: not shared wider)."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


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


def make_router_app(*routers, index_registry=None, settings=None):
    """A bare FastAPI app with the given routers, ``RetrogenError`` mapped to ``{"detail": message}`` + its
    ``http_status`` (as the service app does), ``app.state.settings`` (default ``Settings()``) and optionally
    ``app.state.index_registry``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from retrogen.errors import RetrogenError
    from retrogen.service.core.config import Settings

    app = FastAPI()
    app.state.settings = settings or Settings()
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
    """An img2dataset-style shard: ``{family}-{i}.png`` + ``.txt`` caption + ``.json`` with the source url and
    LAION's safety fields (``punsafe`` = i / 5: items 3, 4 and 5 of each family are above 0.5; item 5 is tagged NSFW)."""
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
                         f"{key}.json": json.dumps({"url": f"http://example.com/{key}.png", "punsafe": i / 5,
                                                    "NSFW": "NSFW" if i == 5 else "UNLIKELY",
                                                    "status": "success"}).encode()}
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def service_index_dir(tmp_path_factory, tiny_open_clip_dir):
    """A flat index (tiny open_clip, 18 items in 3 colour families) built by ``index_builder.build``."""
    from retrogen.index_builder.build import build_index
    from retrogen.index_builder.config import IndexBuildConfig
    from retrogen.retrieval.embedders import create_embedder

    root = tmp_path_factory.mktemp("service_index")
    tar = write_service_corpus_tar(root / "00000.tar")
    build_index([str(tar)], root / "index", embedder=create_embedder(f"open_clip:local-dir:{tiny_open_clip_dir}"),
                config=IndexBuildConfig(index_type="flat", num_workers=1))
    return root / "index"



class MeanColourEmbedder:
    """A deterministic fake embedder for index tests: per-quadrant mean colours (12-d) + 4 constants, L2-normalised.

    Registered as ``meancolour`` through the real embedder registry, so builds and queries take the same path
    as real models; cheap enough for dozens of images per test.
    """

    supports_text = False
    dim = 16

    def __init__(self, spec: str = "", *, device: str = "cpu"):
        self.name = f"meancolour:{spec}" if spec else "meancolour"
        self.scale = float(spec) if spec else 1.0

    def preprocess(self, image):
        return np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32).transpose(2, 0, 1) / 255.0

    def embed_preprocessed(self, batch):
        b = np.asarray(batch, dtype=np.float32)
        quads = [b[:, :, :4, :4], b[:, :, :4, 4:], b[:, :, 4:, :4], b[:, :, 4:, 4:]]
        feats = np.concatenate([q.mean(axis=(2, 3)) for q in quads] + [np.full((len(b), 4), 0.05 * self.scale)], 1)
        return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)

    def embed_images(self, images, batch_size=32):
        return self.embed_preprocessed(np.stack([self.preprocess(im) for im in images]))

    def manifest_entry(self):
        return {"name": self.name, "dim": self.dim, "normalized": True, "modalities": ["image"]}


@pytest.fixture(scope="session")
def mean_colour_embedder():
    """The ``meancolour`` fake embedder (index tests), registered in ``retrieval.embedders``, created by name."""
    from retrogen.retrieval.embedders import create_embedder, register_embedder

    register_embedder("meancolour")(MeanColourEmbedder)
    return create_embedder("meancolour")


def write_clip_retrieval_output(root, n: int, dim: int = 8) -> None:
    """A clip-retrieval output folder (``img_emb/img_emb_0.npy``, ``metadata/metadata_0.parquet``) of ``n``
    random unit vectors, for ``retrogen index import``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    np.save(root / "img_emb" / "img_emb_0.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    pq.write_table(pa.table({"image_path": [f"/d/{i}.jpg" for i in range(n)]}), root / "metadata" / "metadata_0.parquet")
