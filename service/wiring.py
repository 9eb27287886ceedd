"""The one place that wires the service together from ``Settings``: database, store, corpus indexes, job
methods and a worker. ``retrogen serve`` (through ``api.main.create_app``) and ``retrogen worker`` both start
from :meth:`Services.from_settings`, so a web process and a worker process on another host see the same parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core.config import Settings
from .core.db import Database
from .domain import evaluations
from .domain.indexes import IndexRegistry
from .domain.runners import (
    MethodRegistry,
    MethodSpec,
    check_retrieval,
    generation_runner,
    run_retrieval,
    validate_generation,
    validate_retrieval,
)
from .domain.storage import Store
from .domain.worker import Worker


def default_methods() -> MethodRegistry:
    """``retrieval``, every generation method (listing them loads no torch) and ``evaluation`` (queued only by
    ``POST /v1/evaluations``)."""
    from retrogen.generation import list_methods

    methods = MethodRegistry()
    methods.register(MethodSpec("retrieval", "retrieval", run_retrieval, needs_index=True, validate=validate_retrieval,
                                check=check_retrieval,
                                description="nearest corpus neighbours; params.mode: image | text | mixed"))
    for name in list_methods():
        methods.register(MethodSpec(name, "generation", generation_runner(name), needs_model=True,
                                    validate=validate_generation, description=f"Stable Diffusion: {name}"))
    methods.register(evaluations.SPEC)
    return methods


@dataclass
class Services:
    """What a web or worker process holds for its lifetime."""

    settings: Settings
    db: Database
    store: Store
    methods: MethodRegistry
    index_registry: IndexRegistry
    worker: Worker

    @classmethod
    def from_settings(cls, settings: Settings, *, methods: MethodRegistry | None = None,
                      index_registry: IndexRegistry | None = None) -> Services:
        """Open the database (creating its tables) and the store; ``methods`` / ``index_registry`` default to
        the real ones (tests pass fakes)."""
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        store = Store(settings.resolved_storage_url, Path(settings.data_dir) / "cache")
        methods = methods or default_methods()
        index_registry = index_registry or IndexRegistry.from_settings(settings)
        worker = Worker(settings, db, store, methods, index_registry)
        return cls(settings, db, store, methods, index_registry, worker)
