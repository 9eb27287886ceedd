"""The FastAPI app factory: settings, database, store, method registry, in-process worker, /v1 routers."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from retrogen import __version__
from retrogen.errors import RetrogenError
from retrogen.service.api.deps import current_key
from retrogen.service.api.routes import datasets, evaluations, health, jobs, models
from retrogen.service.config import Settings, get_settings
from retrogen.service.db import Database
from retrogen.service.indexes import QueryLimits, get_index_registry, get_query_limits, registry_for_settings
from retrogen.service.methods import MethodRegistry, default_registry
from retrogen.service.metrics import Metrics
from retrogen.service.storage import Store
from retrogen.service.worker import Worker

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, methods: MethodRegistry | None = None,
               index_registry=None, start_worker: bool | None = None) -> FastAPI:
    """Build the app. ``settings`` default to ``get_settings()`` (environment / settings file).

    Args:
        methods: the job method registry (default: retrieval + the generation methods); tests pass fakes.
        index_registry: shared corpus indexes (default: one per settings object).
        start_worker: run an in-process worker while the app is up (default: ``settings.enable_worker``).
    """
    settings = settings or get_settings()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    store = Store(settings.resolved_storage_url, Path(settings.data_dir) / "cache")
    methods = methods or default_registry()
    index_registry = index_registry or registry_for_settings(settings)
    worker = Worker(settings, db, store, methods, index_registry)
    run_worker = settings.enable_worker if start_worker is None else start_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if run_worker:
            worker.start()
        try:
            yield
        finally:
            if run_worker:
                worker.stop()

    app = FastAPI(title="retrogen", version=__version__, lifespan=lifespan,
                  description="Augment a labelled image dataset by retrieval or generation, with provenance.")
    app.state.settings, app.state.db, app.state.store = settings, db, store
    app.state.methods, app.state.index_registry, app.state.worker = methods, index_registry, worker
    app.state.metrics = metrics = Metrics(db)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_index_registry] = lambda: index_registry
    limits = QueryLimits(settings.max_image_pixels, settings.max_image_bytes, settings.max_queries, settings.max_k)
    app.dependency_overrides[get_query_limits] = lambda: limits

    @app.exception_handler(RetrogenError)
    async def _retrogen_error(request: Request, exc: RetrogenError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)

    @app.middleware("http")
    async def _limits_and_latency(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and request.method == "POST":
            try:
                too_big = int(length) > settings.max_upload_bytes + 64 * 1024  # multipart framing slack
            except ValueError:
                return JSONResponse({"detail": "bad Content-Length header"}, status_code=400)
            if too_big:
                return JSONResponse({"detail": f"request body exceeds the {settings.max_upload_bytes}-byte limit"},
                                    status_code=413)
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request_latency.labels(request.method, getattr(route, "path", "unmatched"),
                                       str(response.status_code)).observe(time.perf_counter() - t0)
        return response

    keyed = [Depends(current_key)]
    for router in (datasets.router, jobs.router, evaluations.router, models.router, health.router):
        app.include_router(router)
    from retrogen.service.api.routes import gallery, knn, retrieve

    app.include_router(retrieve.router, dependencies=keyed)
    # knn checks keys itself: ClipClient sends no headers, so it also accepts ?api_key= in the URL
    app.include_router(knn.router)
    app.include_router(gallery.router)
    return app
