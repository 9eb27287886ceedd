"""Loaded pipelines kept across calls: an LRU within a memory budget, so a worker does not reload the same
model for every job.

A pipeline is cached per (model folder, weights hash, device, dtype, offload, compile): what loading fixes. A
job's own settings (scheduler, size, VAE slicing, batch size) are applied to it per call. After a call the
pipeline is reset (:func:`~.runtime.reset_pipeline`: LoRA / IP-Adapter / textual-inversion tokens off, the base
UNet back), so no adapter leaks into the next job; if the reset fails the pipeline is dropped instead. Evicting
one frees its GPU memory (``torch.cuda.empty_cache``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import GenerationConfig
from .models import ModelRef, weights_hash
from .runtime import LoadedPipeline, Runtime, load_pipeline, make_runtime, reset_pipeline, resolve_device

log = logging.getLogger(__name__)

#: environment variable: the cache's budget in GiB when the caller gives none
BUDGET_ENV = "RETROGEN_PIPELINE_CACHE_GB"
DEFAULT_MAX_ENTRIES = 1  # no budget given: keep the last model only (what one model's job holds anyway)


def pipeline_key(ref: ModelRef, config: GenerationConfig) -> tuple:
    """What a loaded pipeline depends on; calls with the same key share it."""
    device, dtype = resolve_device(config)
    compiled = (config.enable_compile, config.lora_rank if config.enable_compile else None)
    return (str(ref.path), weights_hash(ref.path), str(device), str(dtype), config.enable_cpu_offload, compiled)


def budget_from_env() -> int | None:
    value = os.environ.get(BUDGET_ENV)
    return int(float(value) * (1 << 30)) if value else None


@dataclass
class _Entry:
    loaded: LoadedPipeline
    nbytes: int
    in_use: bool = False


@dataclass
class PipelineCache:
    """Pipelines by :func:`pipeline_key`, least recently used evicted first while over ``max_bytes`` (weights
    and buffers of the model components) or ``max_entries``. ``use`` is safe from several threads: a pipeline
    in use by one call is never evicted, and a second concurrent call on the same key loads its own (uncached).

    ``loads`` / ``hits`` / ``evictions`` count what happened (tests, logs).
    """

    max_bytes: int | None = None
    max_entries: int | None = DEFAULT_MAX_ENTRIES
    loads: int = 0
    hits: int = 0
    evictions: int = 0
    _entries: OrderedDict[tuple, _Entry] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_env(cls, max_bytes: int | None = None) -> PipelineCache:
        """A cache with ``max_bytes``, else ``RETROGEN_PIPELINE_CACHE_GB``; with a budget, as many pipelines as
        fit, without one only the last."""
        budget = max_bytes if max_bytes is not None else budget_from_env()
        return cls(max_bytes=budget, max_entries=None if budget is not None else DEFAULT_MAX_ENTRIES)

    @property
    def keys(self) -> list[tuple]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    @contextlib.contextmanager
    def use(self, ref: ModelRef, config: GenerationConfig) -> Iterator[Runtime]:
        """A runtime for ``config`` on the cached pipeline for ``ref`` (loaded when missing); reset and kept
        (within the budget) when the call ends, however it ends."""
        key = pipeline_key(ref, config)
        entry, cached = self._checkout(key, ref, config)
        try:
            yield make_runtime(entry.loaded, ref, config)
        finally:
            self._checkin(key, entry, cached)

    def _checkout(self, key: tuple, ref: ModelRef, config: GenerationConfig) -> tuple[_Entry, bool]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.in_use:
                entry.in_use = True
                self._entries.move_to_end(key)
                self.hits += 1
                return entry, True
            busy = entry is not None
            if not busy:  # make room first, so the old and the new model are not on the GPU together
                self._evict_until(extra_entries=1, extra_bytes=0)
        loaded = load_pipeline(ref, config)
        entry = _Entry(loaded, loaded.nbytes, in_use=True)
        with self._lock:
            self.loads += 1
            if busy or (self.max_bytes is not None and entry.nbytes > self.max_bytes):
                return entry, False  # used for this call only
            self._entries[key] = entry
            self._evict_until(extra_entries=0, extra_bytes=0)
        return entry, True

    def _checkin(self, key: tuple, entry: _Entry, cached: bool) -> None:
        try:
            reset_pipeline(entry.loaded)
            ok = True
        except Exception:  # a pipeline that cannot be reset must not serve another job
            log.exception("could not reset the pipeline for %s; dropping it", key[0])
            ok = False
        with self._lock:
            entry.in_use = False
            if cached and not ok and self._entries.get(key) is entry:
                del self._entries[key]
                self.evictions += 1
            self._evict_until(extra_entries=0, extra_bytes=0)
        if not (cached and ok):
            _free(entry)

    def _evict_until(self, *, extra_entries: int, extra_bytes: int) -> None:
        """Drop least recently used idle pipelines while over a limit (with the lock held)."""
        def over() -> bool:
            n = len(self._entries) + extra_entries
            total = sum(e.nbytes for e in self._entries.values()) + extra_bytes
            return ((self.max_entries is not None and n > self.max_entries)
                    or (self.max_bytes is not None and total > self.max_bytes))

        for key in list(self._entries):
            if not over():
                break
            if self._entries[key].in_use:
                continue
            entry = self._entries.pop(key)
            self.evictions += 1
            log.info("evicting pipeline %s (%.0f MB)", key[0], entry.nbytes / 2**20)
            _free(entry)

    def clear(self) -> None:
        """Drop every idle pipeline and free its memory."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if not e.in_use]:
                _free(self._entries.pop(key))


def _free(entry: _Entry) -> None:
    """Release a pipeline's memory: drop the references, collect, and return CUDA's cached blocks."""
    device_type = entry.loaded.device.type
    entry.loaded = None  # type: ignore[assignment]
    gc.collect()
    if device_type == "cuda":
        import torch

        torch.cuda.empty_cache()


def cached_pipelines(max_bytes: Any = None) -> PipelineCache:
    """The process-wide cache (created on first use; ``max_bytes`` only counts then)."""
    global _PROCESS_CACHE
    with _process_lock:
        if _PROCESS_CACHE is None:
            _PROCESS_CACHE = PipelineCache.from_env(max_bytes)
        return _PROCESS_CACHE


_PROCESS_CACHE: PipelineCache | None = None
_process_lock = threading.Lock()
