"""HTTP middleware: refuse over-long bodies before they are read, and time every request for /metrics."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..core.config import Settings
from .metrics import Metrics

MULTIPART_SLACK_BYTES = 64 * 1024  # a multipart upload's framing around the file itself


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    @app.middleware("http")
    async def _limits_and_latency(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and request.method == "POST":
            try:
                too_big = int(length) > settings.max_upload_bytes + MULTIPART_SLACK_BYTES
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
