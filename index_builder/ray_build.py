"""``--engine ray``: the index build's embedding (and an on-disk index's parts) on a Ray cluster with Ray Data.

What runs where (docs/index-ray.md):

- driver: resolves and scans the sources (``sources.py``, so records, their order and hence row ids are those of
  a local build), decides resume (``IndexDirectory.complete_shards``), and commits each shard in order through
  ``IndexDirectory.write_shard`` as its rows arrive: the same files, metadata and manifest as a local build;
- Ray Data: the records not yet in a complete shard become Arrow blocks (``block_records`` each); CPU tasks read,
  decode and preprocess them (``embed.load_record``: a bad file is skipped with the local build's reason and
  detail); an actor pool (``concurrency=(1, max_actors)``, one model per actor, ``num_gpus`` per actor when the
  driver sees CUDA) runs the model on whole batches;
- Ray tasks fill an on-disk FAISS index's per-shard parts (``faiss_ondisk``).

A killed driver loses at most the shard being collected: a rerun keeps every committed shard and sends only the
rest to the cluster. A killed worker is retried by Ray Data itself (tasks and actors are restartable).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrogen.imageio import DEFAULT_MAX_BYTES
from retrogen.progress import CancelFn, ProgressEvent, ProgressFn, check_cancel, emit
from retrogen.retrieval.embedders import Embedder, create_embedder, l2_normalize
from retrogen.retrieval.index_directory import IndexDirectory, ShardInfo

from .config import IndexBuildConfig
from .embed import load_record
from .errors import IndexBuildError
from .sources import Record

log = logging.getLogger(__name__)

#: attributes that hold a model (or a runtime session) in the embedders of ``retrieval.embedders``; the copy of
#: an embedder sent to the decode tasks has them removed, so only its preprocessing travels
MODEL_ATTRIBUTES = ("_model", "_session", "_tokenizer")
RECORD_FIELDS = ("key", "source", "member", "offset", "size", "caption", "url", "licence")


@dataclass
class RayEngine:
    """Runs a build's embedding and on-disk index parts on a Ray cluster (see the module docstring).

    Args:
        address: ``None`` starts a local cluster in this process (``init_kwargs`` go to ``ray.init``); ``auto``,
            ``host:port`` or ``ray://host:10001`` joins an existing one. If Ray is already initialised, it is used.
        max_actors: embedding actors at most (the pool starts at one and grows while work waits).
        gpus_per_actor: GPUs per embedding actor; None: 1 when the driver sees CUDA, else 0.
        embedder_factory: ``factory(device) -> Embedder`` run in each actor (picklable); default: the
            embedder's ``load_name`` through ``create_embedder``, as ``retrogen index build --embedder`` names it.
        block_records: records per Ray Data block (the unit of a read + decode task).
    """

    address: str | None = None
    max_actors: int = 1
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    embedder_factory: Callable[[str], Embedder] | None = None
    block_records: int = 256
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "ray"

    def connect(self) -> None:
        """Join (or start) the cluster unless this process is already connected."""
        import ray

        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, **self.init_kwargs}
            ray.init(address=self.address, **kwargs)
            log.info("ray cluster: %s", ray.cluster_resources())

    def resolved_gpus(self) -> float:
        if self.gpus_per_actor is not None:
            return float(self.gpus_per_actor)
        try:
            import torch
        except ImportError:
            return 0.0
        return 1.0 if torch.cuda.is_available() else 0.0

    def embed_missing_shards(self, directory: IndexDirectory, records: list[Record], embedder: Embedder,
                             config: IndexBuildConfig, *, progress: ProgressFn | None = None,
                             should_cancel: CancelFn | None = None) -> tuple[list[ShardInfo], dict[str, Any]]:
        """Keep the complete shards, embed the rest on the cluster, commit them in order from this driver."""
        shards = directory.complete_shards(dim=embedder.dim, dtype=config.dtype)
        first_new, total = len(shards), len(records)
        begin = shards[-1].end if shards else 0
        if shards:
            log.info("resuming: %d complete shard(s) kept, %d of %d records done", len(shards), begin, total)
        t0, embedded = time.perf_counter(), 0
        if begin < total:
            self.connect()
            writer = ShardCollector(directory, shards, config, total, embedder.dim)
            for batch in self.dataset(records, begin, embedder, config).iter_batches(batch_size=None,
                                                                                     batch_format="numpy"):
                writer.add(batch)
                embedded += len(batch["idx"])
                rate = embedded / max(1e-9, time.perf_counter() - t0)
                emit(progress, ProgressEvent("embed", begin + embedded, total,
                                             extra={"images_per_s": round(rate, 1)}))
                check_cancel(should_cancel)
            writer.finish()
        seconds = time.perf_counter() - t0
        rate = round(embedded / seconds, 2) if embedded and seconds > 0 else None
        return shards, {"images_per_s": rate, "embed_s": round(seconds, 3), "embedded_this_run": embedded,
                        "resumed_from_shard": first_new or None, "batch_size": config.batch_size,
                        "ray": self.manifest_entry()}

    def manifest_entry(self) -> dict[str, Any]:
        import ray

        resources = ray.cluster_resources() if ray.is_initialized() else {}
        return {"address": self.address, "max_actors": self.max_actors, "gpus_per_actor": self.resolved_gpus(),
                "block_records": self.block_records, "ray_version": ray.__version__,
                "cluster_cpus": resources.get("CPU"), "cluster_gpus": resources.get("GPU", 0.0)}

    def dataset(self, records: list[Record], begin: int, embedder: Embedder, config: IndexBuildConfig):
        """records[begin:] as Arrow blocks -> decode + preprocess tasks -> embedding actor pool."""
        import pyarrow as pa
        import ray

        table = pa.table(record_columns(records, begin))
        blocks = [table.slice(lo, self.block_records) for lo in range(0, table.num_rows, self.block_records)]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete in order: the driver buffers about one
        shape = preprocessed_shape(embedder)
        decode = functools.partial(decode_batch, preprocess=preprocess_only(embedder).preprocess, shape=shape,
                                   max_pixels=config.max_pixels)
        gpus = self.resolved_gpus()
        factory = self.embedder_factory or functools.partial(create_by_name, embedder.load_name)
        return (ray.data.from_arrow(blocks)
                # A decode task declares the memory of its batch (preprocessed float32 arrays, held twice while
                # they become Arrow); besides, remote arguments that differ from the actors' keep Ray Data from
                # fusing the decode tasks into the actors (it fuses stages whose arguments match).
                .map_batches(decode, batch_format="pyarrow", batch_size=config.batch_size, num_cpus=1,
                             memory=decode_memory(config.batch_size, shape))
                .map_batches(EmbedActor, fn_constructor_kwargs={"factory": factory,
                                                                "device": "cuda" if gpus > 0 else "cpu"},
                             batch_format="numpy", batch_size=config.batch_size, num_gpus=gpus,
                             num_cpus=self.cpus_per_actor,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, self.max_actors))))

    def map_parts(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
        """``[fn(*job) for job in jobs]`` as Ray tasks (one CPU each), results in order."""
        import ray

        self.connect()
        remote = ray.remote(num_cpus=1)(fn)
        return ray.get([remote.remote(*job) for job in jobs])


def decode_memory(batch_size: int, shape: tuple[int, ...]) -> int:
    """Bytes a decode task reserves: its batch of preprocessed float32 inputs, twice (numpy, then Arrow)."""
    return int(2 * batch_size * int(np.prod(shape)) * 4)


def create_by_name(name: str, device: str) -> Embedder:
    """The default ``embedder_factory``: the embedder ``name`` (its ``load_name``) on ``device``."""
    return create_embedder(name, device=device)


def preprocess_only(embedder: Embedder) -> Embedder:
    """A shallow copy of ``embedder`` without its model: what the decode tasks need of it (its ``preprocess``)."""
    import copy

    light = copy.copy(embedder)
    for name in MODEL_ATTRIBUTES:
        if hasattr(light, name):
            setattr(light, name, None)
    return light


def preprocessed_shape(embedder: Embedder) -> tuple[int, ...]:
    """The shape ``embedder.preprocess`` gives every image (a bad image's row is zeros of it)."""
    from PIL import Image

    return tuple(np.asarray(embedder.preprocess(Image.new("RGB", (64, 48), (128, 128, 128)))).shape)


def record_columns(records: list[Record], begin: int) -> dict[str, list]:
    """``records[begin:]`` as columns (``idx``: position in the scanned corpus; ``extra`` as JSON)."""
    part = records[begin:]
    cols: dict[str, list] = {"idx": list(range(begin, begin + len(part)))}
    for name in RECORD_FIELDS:
        cols[name] = [getattr(r, name) for r in part]
    cols["extra"] = [json.dumps(r.extra) if r.extra else None for r in part]
    return cols


def decode_batch(batch, *, preprocess: Callable, shape: tuple[int, ...], max_pixels: int) -> dict[str, np.ndarray]:
    """A Ray Data task: read + decode + preprocess a block's records (``embed.load_record``, as locally)."""
    rows = batch.to_pylist()
    pixels = np.zeros((len(rows), *shape), np.float32)
    ok = np.zeros(len(rows), bool)
    infos = []
    for i, row in enumerate(rows):
        extra = json.loads(row["extra"]) if row["extra"] else {}
        record = Record(**{name: row[name] for name in RECORD_FIELDS}, extra=extra)
        array, info = load_record(record, preprocess, max_pixels, DEFAULT_MAX_BYTES)
        if array is not None:
            pixels[i], ok[i] = array, True
        infos.append(json.dumps(info))
    return {"idx": np.asarray([r["idx"] for r in rows], np.int64), "ok": ok, "pixels": pixels,
            "info": np.asarray(infos, dtype=object)}


class EmbedActor:
    """A Ray Data actor: one model, built once, embeds the decoded rows of each batch."""

    def __init__(self, factory: Callable[[str], Embedder], device: str):
        self.embedder = factory(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        vectors = np.zeros((len(ok), self.embedder.dim), np.float32)
        if ok.any():
            vectors[ok] = np.asarray(self.embedder.embed_preprocessed(batch["pixels"][ok]), np.float32)
        return {"idx": batch["idx"], "ok": ok, "vector": vectors, "info": batch["info"]}


class ShardCollector:
    """Gathers embedded rows by shard on the driver and commits each complete shard, in shard order."""

    def __init__(self, directory: IndexDirectory, shards: list[ShardInfo], config: IndexBuildConfig, total: int,
                 dim: int):
        self.directory, self.shards, self.config, self.total, self.dim = directory, shards, config, total, dim
        self.pending: dict[int, list[tuple[int, bool, np.ndarray, str]]] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        size = self.config.shard_size
        for idx, ok, vec, info in zip(batch["idx"].tolist(), batch["ok"].tolist(), batch["vector"], batch["info"],
                                      strict=True):
            self.pending.setdefault(idx // size, []).append((idx, ok, vec, info))
        while self._complete(len(self.shards)):
            self._write(len(self.shards))

    def _complete(self, n: int) -> bool:
        start, end = n * self.config.shard_size, min(self.total, (n + 1) * self.config.shard_size)
        return start < self.total and len(self.pending.get(n, ())) == end - start

    def _write(self, n: int) -> None:
        size = self.config.shard_size
        start, end = n * size, min(self.total, (n + 1) * size)
        items = sorted(self.pending.pop(n), key=lambda t: t[0])
        rows = [json.loads(info) for _, ok, _, info in items if ok]
        skipped = [json.loads(info) for _, ok, _, info in items if not ok]
        for s in skipped:
            log.warning("skipping %s: %s", s["path"], s["reason"])
        vecs = np.stack([v for _, ok, v, _ in items if ok]) if rows else np.zeros((0, self.dim), np.float32)
        self.shards.append(self.directory.write_shard(
            n, l2_normalize(vecs), rows, first_id=sum(s.rows for s in self.shards), dtype=self.config.dtype,
            start=start, end=end, skipped=skipped))

    def finish(self) -> None:
        if self.pending:
            raise IndexBuildError(f"the cluster returned incomplete shards {sorted(self.pending)}")
