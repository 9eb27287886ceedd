"""``IndexBuildConfig``: the settings of ``build_index`` and ``import_clip_retrieval`` besides sources and output.

A :class:`~retrogen.config.LibraryConfig`: bad values are refused when the config is built (before any
work), and each field's description is the help of the ``retrogen index build`` option derived from it.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from retrogen.config import LibraryConfig
from retrogen.imageio import DEFAULT_MAX_PIXELS
from retrogen.retrieval.index_directory import Dtype

from .errors import IndexBuildError


def parse_memory(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GB"``, ``"1000000"`` -> bytes (powers of 1024)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise IndexBuildError(f"memory budget {text!r} is not a size like 4G, 512M or 1.5G")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")
    if value <= 0:
        raise IndexBuildError(f"memory budget must be positive, got {text!r}")
    return int(value)


class IndexBuildConfig(LibraryConfig):
    """How to embed, store and index a corpus."""

    error: ClassVar[type[IndexBuildError]] = IndexBuildError
    kind: ClassVar[str] = "index build"
    #: settings that only matter while embedding images (``index import`` has none of them)
    EMBEDDING_FIELDS: ClassVar[tuple[str, ...]] = ("shard_size", "batch_size", "num_workers", "max_pixels")
    #: settings that change the speed of a build, not its output (a resumed build may change them)
    SPEED_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "num_workers", "faiss_device")

    index_type: str = Field(
        "auto",
        description="auto | flat | hnsw | ivfpq | a FAISS factory string (e.g. 'IVF1024,PQ64np').")
    memory_budget: str | None = Field(
        None, description="RAM the FAISS index may use, e.g. 4G or 512M; checked before any work.")
    shard_size: int = Field(10_000, ge=1, description="Input images per embedding shard (the unit of resume).")
    dtype: Dtype = Field("float16", description="Stored embedding dtype: float16 or float32.")
    batch_size: int = Field(32, ge=1, description="Images per model batch.")
    num_workers: int = Field(2, ge=1, description="Threads reading and decoding images.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Larger images are skipped as decompression bombs.")
    num_recall_queries: int = Field(
        1000, ge=1, description="Stored vectors used as queries to measure an approximate index's recall@10.")
    target_recall: float = Field(
        0.95, gt=0.0, le=1.0, description="recall@10 the build tunes the search defaults to reach (the cheapest "
        "efSearch, or nprobe x re-rank depth, that reaches it on held-out queries).")
    ef_construction: int | None = Field(
        None, ge=8, le=4096, description="HNSW graph build depth; default: 128, and built again deeper (x2, up to "
        "512) while the target recall is missed (faiss's default 40 levels off near recall 0.92).")
    rerank_k_factor: int | None = Field(
        None, ge=1, le=1000, description="Exact re-rank depth (x k) of lossy indexes; default: tuned to "
        "target_recall.")
    seed: int = Field(0, description="Seed of the training sample and the recall queries.")
    faiss_device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where an IVF index's k-means runs: the GPU when faiss-gpu sees one (auto), or as "
        "told; recorded in the manifest (faiss.train_device).")
    faiss_storage: Literal["memory", "ondisk"] = Field(
        "memory", description="memory: one FAISS index built in RAM. ondisk (large corpora): an IVF index trained "
        "on a sample, filled one part per shard in parallel (Ray tasks with --engine ray) and merged into "
        "image.ivfdata, memory-mapped when read.")

    @field_validator("memory_budget")
    @classmethod
    def _budget_is_a_size(cls, value: str | None) -> str | None:
        parse_memory(value)  # raises IndexBuildError, a ValueError: reported as this field's error
        return value

    def output_parameters(self, *, embedding: bool = True) -> dict[str, Any]:
        """The settings that shape the index directory (recorded in the manifest; a resume must match them).

        ``embedding=False`` for an import, which embeds nothing.
        """
        skip = set(self.SPEED_FIELDS) | (set() if embedding else set(self.EMBEDDING_FIELDS))
        return {k: v for k, v in self.to_dict().items() if k not in skip}
