"""The service's one ``Settings``: environment (``RETROGEN_`` prefix) > settings file > defaults.

The settings file is JSON, named by ``RETROGEN_SETTINGS_FILE``; nested values (``indexes``, ``models``,
``api_keys``) are JSON in the environment too, e.g. ``RETROGEN_INDEXES='{"laion": {"path": "/idx"}}'``.
Libraries never read the environment; only this module does. The settings are read once per process by the
command (``retrogen serve`` / ``retrogen worker``) and travel from there: the app keeps them in ``app.state``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SETTINGS_FILE_ENV = "RETROGEN_SETTINGS_FILE"


class IndexConfig(BaseModel):
    """One configured corpus index. ``embedder`` overrides the manifest's (e.g. the same model from a local dir)."""

    model_config = ConfigDict(extra="forbid")

    # a folder, or an fsspec URL (s3://bucket/prefix) copied into {data_dir}/cache/indexes before it is opened
    path: Path | str
    embedder: str | None = None
    # what /knn-service's use_safety_model runs when the corpus has no punsafe scores (a safety_classifiers
    # entry or a built-in, e.g. zero-shot:nsfw); None: the flag is reported unavailable for this index
    safety_classifier: str | None = None
    # hold the FAISS index memory-mapped (True) or in RAM (False); None: by size (mapped above 2 GiB)
    mmap: bool | None = None
    # search a flat / IVF index on the GPU (a copy in GPU memory) with faiss-gpu: auto when it sees one
    faiss_device: Literal["auto", "cpu", "gpu"] = "auto"

    @field_validator("path", mode="before")
    @classmethod
    def _folder_or_url(cls, value: object) -> object:
        """A URL stays a string (``Path`` would fold its ``//``); anything else is a folder."""
        from retrogen.retrieval.index_store import is_remote

        return value if is_remote(value) else Path(value) if isinstance(value, str) else value


class Settings(BaseSettings):
    """Every service setting. Defaults run locally with no setup: SQLite + a local folder, no API keys."""

    model_config = SettingsConfigDict(env_prefix="RETROGEN_", extra="forbid", validate_default=True)

    # Storage
    data_dir: Path = Path("retrogen-data")  # SQLite file, work folders and (by default) the object store
    database_url: str | None = None  # default: sqlite:///{data_dir}/retrogen.db; Postgres: postgresql+psycopg://...
    storage_url: str | None = None  # fsspec URL for datasets/results (s3://bucket/prefix); default {data_dir}/store
    # Security: keys are off when the list is empty (the local default)
    api_keys: list[str] = Field(default_factory=list)
    server_root: Path | None = None  # JSON manifests may name server-side files only under this folder
    # What jobs may use
    indexes: dict[str, IndexConfig] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=dict)  # name -> hub id or local diffusers dir
    # unsafe-image classifiers (package.module:factory) jobs and queries may name, besides the built-in zero-shot
    # ones: importing code is the operator's decision, never a request's
    safety_classifiers: list[str] = Field(default_factory=list)
    device: str = "cpu"  # embedders of the index registry; generation jobs use GenerationConfig.device
    # model calls at once per query embedder (more requests queue and join the next batch); these workers also
    # decode and search for the synchronous query routes: raise it on a many-core host with large query images
    max_concurrent_embeds: int = Field(2, ge=1)
    # load every configured index (an s3:// one copied first) when the app starts, in the background; /readyz
    # answers 503 until all are in, so a load balancer sends no query to a replica still copying gigabytes
    preload_indexes: bool = False
    # Limits
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)  # the multipart dataset upload's body
    max_json_bytes: int = Field(32 * 1024 * 1024, ge=1)  # the body of every other request (JSON manifests included)
    max_dataset_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=1)  # decompressed total of one dataset
    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # decoded pixels of one dataset, summed from the image headers before anything is decoded: a few KB of
    # 1-bit PNGs can declare gigapixels, each costing seconds of CPU and gigabytes to check
    max_dataset_pixels: int = Field(5_000_000_000, ge=1)  # decoded pixels of one dataset, charged from headers
    max_concurrent_decodes: int = Field(2, ge=1)  # upload images decoded at once in this process; more wait
    max_images_per_dataset: int = Field(10_000, ge=1)
    max_per_class: int = Field(1000, ge=1)
    max_queries: int = Field(32, ge=1)  # synchronous /v1/retrieve
    max_k: int = Field(1000, ge=1)
    # Jobs and workers
    enable_worker: bool = True  # `retrogen serve` runs an in-process worker
    num_retrieval_threads: int = Field(1, ge=1)
    num_generation_threads: int = Field(1, ge=0)  # per device: one GPU-bound generation at a time
    # loaded diffusers pipelines a worker keeps across jobs (LRU, by weights + buffers); None: the last model only
    pipeline_cache_gb: float | None = Field(None, gt=0)
    job_lease_s: float = Field(30.0, gt=0)  # a running job whose worker misses heartbeats this long is re-claimed
    job_max_attempts: int = Field(3, ge=1)  # claims before a job that keeps killing its worker is failed
    poll_interval_s: float = Field(0.5, gt=0)

    @field_validator("api_keys")
    @classmethod
    def _keys_not_placeholder(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if len(k) < 8 or k in ("changethis", "changeme"):
                raise ValueError("API keys must be at least 8 characters and not a placeholder")
        return keys

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir).resolve() / 'retrogen.db'}"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or str(Path(self.data_dir).resolve() / "store")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        sources = [init_settings, env_settings]
        path = os.environ.get(SETTINGS_FILE_ENV)
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{SETTINGS_FILE_ENV}={path}: no such settings file")
            sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)
