"""The configured corpus indexes, by name: each loaded lazily, once, as a ``CorpusIndex`` plus its embedder.

The HTTP routes (``/v1/retrieve``, ``/knn-service``) and the job runners share one :class:`IndexRegistry` (the
app's, built once by ``service.wiring``), so an index and its model are in memory once per process however many
requests or jobs use it. Nothing here imports torch or faiss at import time; loading happens on first use of
a name. HTTP-free, so the benchmark times the same work in-process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from retrogen.errors import InvalidInputError, NotFoundError, RetrogenError

from ..core.config import IndexConfig, Settings
from .batching import BatchWork, EmbedBatchers, MicroBatcher

if TYPE_CHECKING:
    from retrogen.retrieval.embedders import Embedder
    from retrogen.retrieval.index import CorpusIndex
    from retrogen.retrieval.index_directory import Manifest
    from retrogen.retrieval.safety import ItemClassifier, ItemScreen

log = logging.getLogger(__name__)

#: Embedder families that embed texts as well as images: the fallback for a manifest that lists no modalities.
TEXT_FAMILIES = ("open_clip", "hf")
#: how deep a screened search may go: k x this many neighbours per query, at most
MAX_SCREEN_DEPTH = 64
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class QueryWork(BatchWork, Protocol):
    """A query's work (:meth:`LoadedIndex.answer`): ``model`` says which batcher embeds its inputs, or None when
    it needs no model (a query by vector)."""

    model: Literal["images", "texts"] | None


@dataclass(frozen=True)
class EmbedderInfo:
    """A configured index's embedder as a request needs to know it before any model is loaded."""

    index: str
    name: str
    supports_text: bool


def public_source_uri(meta: dict[str, Any], source_roots: list[str], index_dir: str | Path) -> str | None:
    """Where a corpus item's bytes come from, as a caller may see it (``source_uri``).

    A URL stays as it is. A server file becomes a path relative to the folder holding the corpus source it was
    read from (``shards/00000.tar#key.jpg``), else relative to the index folder, else its bare name: never an
    absolute server path. A tar member follows ``#``.
    """
    source = meta.get("source")
    if not source:
        return None
    public = _public_path(str(source), source_roots, str(index_dir))
    return f"{public}#{meta['member']}" if meta.get("member") else public


def _public_path(source: str, source_roots: list[str], index_dir: str) -> str:
    url = _URL.match(source)
    if url and url.group(1).lower() != "file":
        return source
    path = PurePosixPath(source.removeprefix("file://"))
    if not path.is_absolute():
        return path.name if ".." in path.parts else str(path)
    for root in sorted((PurePosixPath(r) for r in source_roots if r and r.startswith("/")), key=lambda r: -len(r.parts)):
        if path.is_relative_to(root):
            return str(path.relative_to(root.parent))
    if path.is_relative_to(index_dir):
        return str(path.relative_to(index_dir))
    return path.name


def _without_path(error: Exception, name: str, *paths: str | Path) -> Exception:
    """``error`` with the index's server folder (its URL, its local copy) replaced by its configured name
    (messages reach callers)."""
    from retrogen.retrieval.index_store import display

    message = str(error)
    for path in paths:
        for form in {str(path), display(path)}:
            message = message.replace(form, f"<index {name}>")
    error.args = (message,)
    return error


@dataclass(frozen=True)
class Hit:
    """One neighbour of one query: corpus row id, cosine similarity, 0-based rank, and its metadata row."""

    id: int
    similarity: float
    rank: int
    meta: dict[str, Any]


def _cut(row: list[Hit], excluded: dict[int, str], k: int) -> int:
    """How far down ``row`` a reader went to keep ``k`` items: the removed items counted are those above it."""
    kept = 0
    for n, h in enumerate(row):
        kept += h.id not in excluded
        if kept == k:
            return n + 1
    return len(row)


@dataclass
class LoadedIndex:
    """A loaded index with the embedder that maps queries into its space."""

    name: str
    path: Path
    corpus: CorpusIndex
    embedder: Embedder
    # Concurrent requests' inputs go to the model together, at most ``max_concurrent_embeds`` calls at once
    # (shared by the indexes that share the embedder): 32 request threads each running a multi-threaded torch
    # op oversubscribe the cores, and batch-1 calls waste the model's throughput.
    batchers: EmbedBatchers | None = field(default=None, repr=False)
    classifiers: dict[str, ItemClassifier] = field(default_factory=dict, repr=False)
    _classifier_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.batchers is None:
            self.batchers = EmbedBatchers.of(self.embedder, workers=2)

    @property
    def ntotal(self) -> int:
        return int(self.corpus.ntotal)

    @property
    def index_id(self) -> str:
        return self.corpus.manifest.index_id

    def embed_images(self, images: list) -> np.ndarray:
        """Preprocessed here, in the request's thread (in parallel); embedded with other requests' images."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.batchers.images(self.preprocess(images))

    def preprocess(self, images: list) -> np.ndarray:
        """The model inputs for ``images``, stacked."""
        return np.stack([self.embedder.preprocess(im) for im in images])

    def answer(self, work: QueryWork) -> Any:
        """A query's answer: ``work.prepare()``, its inputs embedded with other queries' (one model call), then
        ``work.finish(rows)``, all in a worker of the embedder's batcher; with no model, in this thread."""
        if work.model is None:
            return work.finish(work.prepare())
        return self._batcher(work.model).do(work)

    async def answer_async(self, work: QueryWork) -> Any:
        """:meth:`answer` awaited on an event loop: one trip to the worker and back (with no model, a thread's)."""
        if work.model is None:
            return await asyncio.to_thread(lambda: work.finish(work.prepare()))
        return await self._batcher(work.model).do_async(work)

    def _batcher(self, model: str) -> MicroBatcher:
        if model == "texts" and not self.embedder.supports_text:
            raise InvalidInputError(f"index {self.name!r} uses the image-only embedder {self.embedder.name!r}; "
                                    "text queries need an image-text (CLIP) embedder")
        return self.batchers.images if model == "images" else self.batchers.texts

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._batcher("texts")(list(texts))

    def search(self, vectors: np.ndarray, k: int, **overrides: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search, ``k`` clipped to the corpus size; ``overrides``: CorpusIndex.search's per-call
        ``nprobe`` / ``ef_search`` / ``rerank_k_factor`` (the shared index is never mutated)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors must have shape (n, {self.dim}), got {tuple(vectors.shape)}")
        return self.corpus.search(vectors, min(k, self.ntotal), **overrides)

    def neighbours(self, vectors: np.ndarray, k: int, **overrides: int | None) -> list[list[Hit]]:
        """k nearest corpus items per query row, with their metadata (one metadata read for all queries)."""
        scores, ids = self.search(vectors, k, **overrides)
        wanted = sorted({int(i) for row in ids for i in row if i >= 0})
        metas = {int(m["id"]): m for m in self.corpus.metadata(wanted)} if wanted else {}
        return [
            [Hit(int(i), float(s), r, metas.get(int(i), {})) for r, (s, i) in enumerate(zip(srow, irow, strict=True))
             if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def classifier(self, spec: str) -> ItemClassifier:
        """The safety classifier ``spec`` on this index's embedder, built once (zero-shot ones embed prompts)."""
        from retrogen.retrieval.safety import load_classifier

        with self._classifier_lock:
            if spec not in self.classifiers:
                self.classifiers[spec] = load_classifier(spec, self.embedder)
            return self.classifiers[spec]

    def screened_neighbours(self, vectors: np.ndarray, k: int, screen: ItemScreen,
                            **overrides: int | None) -> tuple[list[list[Hit]], list[Counter]]:
        """:meth:`neighbours` without the items ``screen`` excludes, searching deeper (x4 at a time, up to
        ``MAX_SCREEN_DEPTH`` x k) so each query still gets ``k`` when the corpus has them; with the count of
        removed items per query and reason."""
        depth = k
        while True:
            rows = self.neighbours(vectors, depth, **overrides)
            ids = sorted({h.id for row in rows for h in row})
            excluded = screen.excluded_in(self.corpus, ids)
            kept = [[h for h in row if h.id not in excluded] for row in rows]
            if all(len(r) >= k for r in kept) or depth >= min(self.ntotal, MAX_SCREEN_DEPTH * k):
                break
            depth = min(self.ntotal, MAX_SCREEN_DEPTH * k, depth * 4)
        removed = [Counter(excluded[h.id] for h in row[: _cut(row, excluded, k)] if h.id in excluded) for row in rows]
        return [[replace(h, rank=r) for r, h in enumerate(row[:k])] for row in kept], removed

    @property
    def dim(self) -> int:
        return int(self.corpus.dim)

    def public_source_uri(self, meta: dict[str, Any]) -> str | None:
        """The item's ``source_uri`` as callers see it (see :func:`public_source_uri`)."""
        roots = [str(s.get("path") or "") for s in self.corpus.manifest.sources]
        return public_source_uri(meta, roots, self.path)

    def describe(self) -> dict[str, Any]:
        m = self.corpus.manifest
        return {
            "name": self.name, "loaded": True, "index_id": m.index_id, "index_version": m.version,
            "count": self.ntotal, "dim": self.dim, "embedder": self.embedder.name,
            "supports_text": bool(self.embedder.supports_text), "faiss_kind": m.faiss.get("kind"),
            "recall": m.recall, "faiss_device": self.corpus.device,
            "faiss_train_device": m.faiss.get("train_device"), "faiss_build": m.build.get("faiss_build"),
        }


@dataclass
class IndexRegistry:
    """Configured indexes by name; :meth:`get` loads one on first use, once, even under concurrent requests."""

    configs: Mapping[str, IndexConfig | Mapping[str, Any] | str | Path]
    device: str = "cpu"
    max_concurrent_embeds: int = 2  # model calls at once per embedder and input kind (see LoadedIndex.batchers)
    # where indexes configured by URL are copied (a folder per URL); None: the user's cache (~/.cache/retrogen)
    cache_dir: Path | None = None
    _loaded: dict[str, LoadedIndex] = field(default_factory=dict, repr=False)
    _preload: dict[str, str] = field(default_factory=dict, repr=False)  # name -> loading | ok | error: why
    _embedders: dict[str, tuple[Embedder, EmbedBatchers]] = field(default_factory=dict, repr=False)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.configs: dict[str, IndexConfig] = {name: _as_config(cfg) for name, cfg in dict(self.configs).items()}

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

    async def get_async(self, name: str | None = None) -> LoadedIndex:
        """:meth:`get` from an event loop: a load (seconds of disk reads) runs in a thread, never on the loop."""
        name = self.resolve(name)
        return self._loaded.get(name) or await asyncio.to_thread(self.get, name)

    def start_preload(self, *, retry_s: float = 30.0) -> threading.Thread:
        """Load every configured index in a background thread (``Settings.preload_indexes``); until it is done
        :meth:`preload_status` says which are still loading or failed."""
        self._preload.update((name, "loading") for name in self.configs)
        thread = threading.Thread(target=self.preload, kwargs={"retry_s": retry_s}, name="index-preload",
                                  daemon=True)
        thread.start()
        return thread

    def preload(self, *, retry_s: float | None = None) -> None:
        """Load every configured index, in order. A failure is recorded for :meth:`preload_status` and logged, and
        the others still load; with ``retry_s`` the failed ones are retried (the interval doubling up to 10x), so a
        replica whose store was down at start becomes ready once it is back. Our errors' messages name no server
        path; any other error shows its type only."""
        todo, wait = list(self.configs), retry_s
        self._preload.update((name, "loading") for name in todo)
        while True:
            todo = [name for name in todo if not self._preload_one(name)]
            if not todo or wait is None:
                return
            time.sleep(wait)
            wait = min(2 * wait, 10 * retry_s)

    def _preload_one(self, name: str) -> bool:
        try:
            self.get(name)
        except RetrogenError as e:
            self._preload[name] = f"error: {e}"
            log.warning("index %r did not load at start: %s", name, e)
            return False
        except Exception as e:  # noqa: BLE001 - a query would meet it again; the log has the detail
            self._preload[name] = f"error: {type(e).__name__} (see the server log)"
            log.exception("index %r did not load at start", name)
            return False
        self._preload[name] = "ok"
        return True

    def preload_status(self) -> str:
        """``ok`` once every index is loaded (by the preload or since by a query); else which are loading or
        failed (messages name no server path)."""
        state = {n: "ok" if n in self._loaded else v for n, v in self._preload.items()}
        waiting = [n for n, v in state.items() if v == "loading"]
        failed = [f"{n}: {v[len('error: '):]}" for n, v in state.items() if v.startswith("error: ")]
        if failed:
            return "error: " + "; ".join(failed)
        return f"loading: {', '.join(waiting)}" if waiting else "ok"

    def embedder_of(self, name: str | None = None) -> EmbedderInfo:
        """The embedder of index ``name`` and whether it embeds text: from the loaded model if the index is
        loaded, otherwise from its manifest (a small JSON read; no model, no FAISS index is loaded).

        An ``embedder`` override is the same model from another place, so the manifest's modalities hold.
        """
        name = self.resolve(name)
        loaded = self._loaded.get(name)
        if loaded is not None:
            return EmbedderInfo(name, loaded.embedder.name, bool(loaded.embedder.supports_text))
        entry = self.manifest(name).embedder
        embedder = self.configs[name].embedder or str(entry.get("name") or "unknown")
        modalities = entry.get("modalities")
        supports_text = ("text" in modalities if isinstance(modalities, list)
                         else embedder.partition(":")[0] in TEXT_FAMILIES)
        return EmbedderInfo(name, embedder, supports_text)

    def manifest(self, name: str | None = None) -> Manifest:
        """Index ``name``'s manifest (read from disk unless loaded; no model, no FAISS index is loaded)."""
        name = self.resolve(name)
        if name in self._loaded:
            return self._loaded[name].corpus.manifest
        from retrogen.retrieval.errors import IndexFormatError, IndexNotFoundError, IndexStoreError
        from retrogen.retrieval.index_directory import IndexDirectory
        from retrogen.retrieval.index_store import RemoteIndex, is_remote

        cfg = self.configs[name]
        try:
            if is_remote(cfg.path):  # one small read of the store, no copy
                return RemoteIndex(cfg.path).read_manifest()
            return IndexDirectory(cfg.path).read_manifest()
        except IndexNotFoundError as e:  # a configured name whose folder holds no complete index
            raise NotFoundError(f"index {name!r}: {_without_path(e, name, cfg.path)}") from None
        except (IndexFormatError, IndexStoreError) as e:
            raise _without_path(e, name, cfg.path) from None

    def _load(self, name: str) -> LoadedIndex:
        from retrogen.retrieval.embedders import create_embedder
        from retrogen.retrieval.errors import IndexFormatError, IndexNotFoundError, IndexStoreError
        from retrogen.retrieval.index import CorpusIndex
        from retrogen.retrieval.index_store import default_cache_dir, display, is_remote

        cfg = self.configs[name]
        cache = default_cache_dir(cfg.path, self.cache_dir) if is_remote(cfg.path) else None
        hidden = (cfg.path, cache) if cache else (cfg.path,)  # neither the URL nor the local copy reaches callers
        try:
            index = CorpusIndex.open(cfg.path, mmap=cfg.mmap, device=cfg.faiss_device, cache_dir=cache)
        except IndexNotFoundError as e:  # a configured name whose folder holds no complete index
            raise NotFoundError(f"index {name!r}: {_without_path(e, name, *hidden)}") from None
        except (IndexFormatError, IndexStoreError) as e:
            raise _without_path(e, name, *hidden) from None
        # the override, else the manifest's embedder with the runtime it was built with (ONNX stays ONNX)
        embedder_name = cfg.embedder or str(index.manifest.embedder.get("load_name") or index.manifest.embedder["name"])
        with self._guard:
            entry = self._embedders.get(embedder_name)
        if entry is None:
            created = create_embedder(embedder_name, device=self.device)
            with self._guard:
                entry = self._embedders.setdefault(
                    embedder_name, (created, EmbedBatchers.of(created, workers=self.max_concurrent_embeds)))
        embedder, batchers = entry
        if cfg.embedder is None:
            index.check_embedder(embedder.name)
        elif embedder.dim != index.manifest.dim:  # an override may rename the model, never change its space
            raise InvalidInputError(f"index {name!r}: embedder override {embedder.name!r} has dim {embedder.dim}, "
                                    f"the index has dim {index.manifest.dim}")
        log.info("loaded index %r from %s (%d items, embedder %s)", name, display(cfg.path), index.ntotal,
                 embedder.name)
        return LoadedIndex(name, index.directory.path, index, embedder, batchers)

    def describe(self) -> list[dict[str, Any]]:
        """Every configured index; loaded ones with their manifest facts. Never loads anything."""
        out = []
        for name, cfg in self.configs.items():
            loaded = self._loaded.get(name)
            out.append(loaded.describe() if loaded else
                       {"name": name, "loaded": False, "embedder": cfg.embedder})
        return out

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexRegistry:
        return cls(settings.indexes, device=settings.device, max_concurrent_embeds=settings.max_concurrent_embeds,
                   cache_dir=Path(settings.data_dir) / "cache" / "indexes")


def _as_config(cfg: IndexConfig | Mapping[str, Any] | str | Path) -> IndexConfig:
    """An IndexConfig from itself, its JSON shape, or a bare path."""
    if isinstance(cfg, IndexConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return IndexConfig(**cfg)
    return IndexConfig(path=cfg)
