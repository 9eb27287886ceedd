"""The configured corpus indexes, by name: each loaded lazily, once, as a ``CorpusIndex`` plus its embedder.

The HTTP routes (``/v1/retrieve``, ``/knn-service``) and the job runners share one :class:`IndexRegistry`, so
an index and its model are in memory once per process however many requests or jobs use it. Nothing here
imports torch or faiss at import time; loading happens on first use of a name. The search helpers are
HTTP-free so the benchmark can time the same work in-process.
"""

from __future__ import annotations

import base64
import binascii
import logging
import mimetypes
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict

from retrogen.errors import InvalidInputError, NotFoundError
from retrogen.imageio import decode_image

log = logging.getLogger(__name__)

__all__ = ["IndexConfig", "IndexRegistry", "LoadedIndex", "Hit", "get_index_registry", "IndexRegistryDep",
           "registry_for_settings", "sniff_media_type", "decode_base64_image", "QueryLimits", "get_query_limits"]


class IndexConfig(BaseModel):
    """One configured index. ``embedder`` overrides the manifest's (e.g. the same model from a local dir)."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    embedder: str | None = None


@dataclass(frozen=True)
class Hit:
    """One neighbour of one query: corpus row id, cosine similarity, 0-based rank, and its metadata row."""

    id: int
    similarity: float
    rank: int
    meta: dict[str, Any]


@dataclass
class LoadedIndex:
    """A loaded index with the embedder that maps queries into its space."""

    name: str
    path: Path
    index: Any  # retrieval.index.CorpusIndex
    embedder: Any  # retrieval.embedders.Embedder
    # Bounds concurrent model calls on the embedder (shared by the indexes that share it): 32 request threads
    # each running a multi-threaded torch op oversubscribe the cores, and tail latency explodes.
    gate: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2), repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_id(self) -> str:
        return self.index.manifest.index_id

    @property
    def index_version(self) -> str | None:
        build = self.index.manifest.build
        return build.get("created") if isinstance(build, dict) else None

    def embed_images(self, images: list) -> np.ndarray:
        with self.gate:
            return self.embedder.embed_images(images)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not self.embedder.supports_text:
            raise InvalidInputError(
                f"index {self.name!r} uses the image-only embedder {self.embedder.name!r}; text queries need an "
                "image-text (CLIP) embedder"
            )
        with self.gate:
            return self.embedder.embed_texts(texts)

    def search(self, vectors: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search, ``k`` clipped to the corpus size (per-call parameters; the index is not mutated)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors must have shape (n, {self.dim}), got {tuple(vectors.shape)}")
        return self.index.search(vectors, min(k, self.ntotal), nprobe=nprobe, ef_search=ef_search)

    def neighbours(self, vectors: np.ndarray, k: int, *, nprobe: int | None = None,
                   ef_search: int | None = None) -> list[list[Hit]]:
        """k nearest corpus items per query row, with their metadata (one metadata read for all queries)."""
        scores, ids = self.search(vectors, k, nprobe=nprobe, ef_search=ef_search)
        wanted = sorted({int(i) for row in ids for i in row if i >= 0})
        metas = {int(m["id"]): m for m in self.index.metadata(wanted)} if wanted else {}
        return [
            [Hit(int(i), float(s), r, metas.get(int(i), {})) for r, (s, i) in enumerate(zip(srow, irow, strict=True))
             if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    @property
    def dim(self) -> int:
        return int(getattr(self.index.manifest, "dim", None) or self.embedder.dim)

    def describe(self) -> dict[str, Any]:
        m = self.index.manifest
        faiss_info = m.faiss if isinstance(m.faiss, dict) else {}
        return {
            "name": self.name, "loaded": True, "index_id": m.index_id, "index_version": self.index_version,
            "count": self.ntotal, "dim": self.dim, "embedder": self.embedder.name,
            "supports_text": bool(self.embedder.supports_text), "faiss_kind": faiss_info.get("kind"),
            "recall": m.recall,
        }


@dataclass
class IndexRegistry:
    """Configured indexes by name; :meth:`get` loads one on first use, once, even under concurrent requests."""

    configs: Mapping[str, IndexConfig]
    device: str = "cpu"
    max_concurrent_embeds: int = 2  # model calls at once per embedder; more requests queue (see LoadedIndex.gate)
    _loaded: dict[str, LoadedIndex] = field(default_factory=dict, repr=False)
    _embedders: dict[str, tuple[Any, threading.BoundedSemaphore]] = field(default_factory=dict, repr=False)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.configs = {name: _as_config(cfg) for name, cfg in dict(self.configs).items()}

    def names(self) -> list[str]:
        return list(self.configs)

    def default_name(self) -> str:
        if not self.configs:
            raise NotFoundError("no index is configured on this server (set RETROGEN_INDEXES)")
        return next(iter(self.configs))

    def resolve(self, name: str | None) -> str:
        """``None`` -> the first configured index; an unknown name -> NotFoundError listing the valid ones."""
        if name is None or name == "":
            return self.default_name()
        if name not in self.configs:
            raise NotFoundError(f"unknown index {name!r}; configured: {', '.join(self.configs) or '(none)'}")
        return name

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def get(self, name: str | None = None) -> LoadedIndex:
        """The loaded index ``name`` (default: the first). A failed load is not cached: the next call retries."""
        name = self.resolve(name)
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(name)
            return self._loaded[name]

    def _load(self, name: str) -> LoadedIndex:
        from retrogen.retrieval.embedders import create_embedder
        from retrogen.retrieval.index import CorpusIndex

        cfg = self.configs[name]
        if not (Path(cfg.path) / "manifest.json").is_file():
            raise NotFoundError(f"index {name!r}: {cfg.path} has no manifest.json (not a complete index directory)")
        index = CorpusIndex.open(cfg.path)
        embedder_name = cfg.embedder or index.manifest.embedder["name"]
        with self._guard:
            entry = self._embedders.get(embedder_name)
        if entry is None:
            created = create_embedder(embedder_name, device=self.device)
            with self._guard:
                entry = self._embedders.setdefault(
                    embedder_name, (created, threading.BoundedSemaphore(max(1, self.max_concurrent_embeds))))
        embedder, gate = entry
        if cfg.embedder is None:
            index.check_embedder(embedder.name)
        elif embedder.dim != index.manifest.dim:  # an override may rename the model, never change its space
            raise InvalidInputError(f"index {name!r}: embedder override {embedder.name!r} has dim {embedder.dim}, "
                                    f"the index has dim {index.manifest.dim}")
        log.info("loaded index %r from %s (%d items, embedder %s)", name, cfg.path, index.ntotal, embedder.name)
        return LoadedIndex(name, Path(cfg.path), index, embedder, gate)

    def describe(self) -> list[dict[str, Any]]:
        """Every configured index; loaded ones with their manifest facts. Never loads anything."""
        out = []
        for name, cfg in self.configs.items():
            loaded = self._loaded.get(name)
            out.append(loaded.describe() if loaded else
                       {"name": name, "loaded": False, "embedder": cfg.embedder})
        return out

    @classmethod
    def from_settings(cls, settings: Any) -> IndexRegistry:
        """From the service ``Settings`` (``indexes``; optional ``device``, ``max_concurrent_embeds``)."""
        return cls(dict(getattr(settings, "indexes", None) or {}), device=getattr(settings, "device", None) or "cpu",
                   max_concurrent_embeds=getattr(settings, "max_concurrent_embeds", None) or 2)


def _as_config(cfg: Any) -> IndexConfig:
    """Accept our IndexConfig, the service config's own model of the same shape, a dict or a bare path."""
    if isinstance(cfg, IndexConfig):
        return cfg
    if isinstance(cfg, (str, Path)):
        return IndexConfig(path=Path(cfg))
    if isinstance(cfg, Mapping):
        return IndexConfig(**cfg)
    return IndexConfig(path=Path(cfg.path), embedder=getattr(cfg, "embedder", None))


_SETTINGS_REGISTRIES: dict[int, tuple[Any, IndexRegistry]] = {}
_SETTINGS_LOCK = threading.Lock()


def registry_for_settings(settings: Any) -> IndexRegistry:
    """One registry per Settings object, shared by the web routes and in-process job runners."""
    with _SETTINGS_LOCK:
        entry = _SETTINGS_REGISTRIES.get(id(settings))
        if entry is None or entry[0] is not settings:
            entry = (settings, IndexRegistry.from_settings(settings))
            _SETTINGS_REGISTRIES[id(settings)] = entry
        return entry[1]


def get_index_registry(request: Request) -> IndexRegistry:
    """FastAPI dependency: ``app.state.index_registry`` if the app set one, else the one for ``get_settings()``.

    Tests either set ``app.state.index_registry`` or override this function in ``app.dependency_overrides``.
    """
    registry = getattr(request.app.state, "index_registry", None)
    if registry is None:
        from retrogen.service.config import (
            get_settings,  # the service's one Settings (lazy: avoids an import cycle)
        )

        registry = registry_for_settings(get_settings())
    return registry


IndexRegistryDep = Annotated[IndexRegistry, Depends(get_index_registry)]

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def sniff_media_type(data: bytes, name: str | None = None) -> str:
    """The content type of stored image bytes: magic numbers first (names lie), then the file name."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type(name or "")[0]
    # never label corpus bytes as SVG (scriptable): a crawled file must not run in our origin
    if guessed and guessed.startswith("image/") and "svg" not in guessed:
        return guessed
    return "application/octet-stream"


@dataclass(frozen=True)
class QueryLimits:
    """Bounds on one synchronous query request (the service Settings may override each by the same name)."""

    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 16 * 1024 * 1024
    max_queries: int = 32
    max_k: int = 1000


def get_query_limits() -> QueryLimits:
    """FastAPI dependency: the defaults, overridden by same-named fields of the service Settings if present."""
    try:
        from retrogen.service.config import get_settings
    except ImportError:
        return QueryLimits()
    settings = get_settings()
    names = QueryLimits.__dataclass_fields__
    return QueryLimits(**{n: getattr(settings, n) for n in names if getattr(settings, n, None) is not None})


def decode_base64_image(data: str, *, what: str, limits: QueryLimits):
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> (RGB PIL image, the decoded bytes).

    Raises:
        InvalidInputError: not base64, too large, or not a safe decodable image (the message names ``what``).
    """
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise InvalidInputError(f"{what}: a data URL must be base64-encoded")
    if len(data) > (limits.max_image_bytes * 4) // 3 + 4:
        raise InvalidInputError(f"{what}: image is larger than {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{what}: not valid base64 ({e})") from None
    try:
        return decode_image(raw, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes), raw
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}: {e}") from None
