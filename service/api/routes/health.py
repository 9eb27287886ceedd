"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...domain.readiness import NotReadyError, check_store
from ..deps import DbDep, IndexRegistryDep, StoreDep
from ..schemas import ReadinessPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers, the store's root exists and takes a write, and (with "
            "preload_indexes) every configured index is loaded",
            response_model=ReadinessPublic,
            responses={503: {"model": ReadinessPublic, "description": "not ready: the failing check says why"}})
def readyz(db: DbDep, store: StoreDep, registry: IndexRegistryDep, request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        db.ping()
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"error: {type(e).__name__}"
    try:
        check_store(store)
        checks["store"] = "ok"
    except NotReadyError as e:
        checks["store"] = f"error: {e}"
    except Exception as e:
        checks["store"] = f"error: {type(e).__name__}"
    if request.app.state.settings.preload_indexes:
        checks["indexes"] = registry.preload_status()
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
