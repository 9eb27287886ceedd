"""The FastAPI app factory: the wired services (``service.wiring``) in ``app.state``, error mapping,
middleware, and the routers."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from retrogen import __version__

from ..core.config import Settings
from ..core.logs import install_log_redaction
from ..domain.indexes import IndexRegistry
from ..domain.runners import MethodRegistry
from ..wiring import Services
from .errors import add_error_handlers, install_openapi
from .metrics import Metrics
from .middleware import add_middleware
from .routes import datasets, evaluations, gallery, health, jobs, knn, models, retrieve


def create_app(settings: Settings | None = None, *, methods: MethodRegistry | None = None,
               index_registry: IndexRegistry | None = None, start_worker: bool | None = None) -> FastAPI:
    """Build the app. ``settings`` default to ``Settings()`` (environment / settings file).

    Args:
        methods: the job method registry (default: retrieval + the generation methods); tests pass fakes.
        index_registry: shared corpus indexes (default: the configured ones).
        start_worker: run an in-process worker while the app is up (default: ``settings.enable_worker``).
    """
    install_log_redaction()  # before anything logs: uvicorn's access log would show ?api_key= otherwise
    services = Services.from_settings(settings or Settings(), methods=methods, index_registry=index_registry)
    run_worker = services.settings.enable_worker if start_worker is None else start_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if services.settings.preload_indexes:
            services.index_registry.start_preload()
        if run_worker:
            services.worker.start()
        try:
            yield
        finally:
            if run_worker:
                services.worker.stop()

    app = FastAPI(title="retrogen", version=__version__, lifespan=lifespan,
                  description="Augment a labelled image dataset by retrieval or generation, with provenance.")
    for name, part in vars(services).items():
        setattr(app.state, name, part)
    app.state.metrics = metrics = Metrics(services.db)
    add_error_handlers(app)
    add_middleware(app, services.settings, metrics)
    # FastAPI matches a request against the routers in this order, walking each router's routes: the per-query
    # routes first (a retrieval request walked five routers before its own, ~0.3 ms of ~1 ms outside the
    # handler); no two routers' paths overlap, so the order changes nothing else
    for module in (retrieve, knn, datasets, jobs, evaluations, models, health, gallery):
        app.include_router(module.router)
    install_openapi(app)
    return app
