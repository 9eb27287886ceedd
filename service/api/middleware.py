"""HTTP middleware: a request body limit enforced while the body streams in, and request latency for /metrics.

The limit counts the bytes actually received, so it holds for chunked bodies (no ``Content-Length``) as much as
for declared ones: the app never reads more than the limit, and the client gets a 413 instead of whatever the
half-read body would have caused. The multipart dataset upload may be large (``max_upload_bytes``); every other
body is JSON and far smaller (``max_json_bytes``).
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.config import Settings
from .metrics import Metrics

MULTIPART_SLACK_BYTES = 64 * 1024  # a multipart upload's framing around the file itself
UPLOAD_ROUTES = (("POST", "/v1/datasets"),)  # the multipart routes: the large limit


class BodyTooLargeError(Exception):
    """Raised into the app by ``receive`` once the body passes the limit; the middleware answers 413."""


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail, "errors": []}).encode()  # the API's one error shape (ErrorPublic)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Answer 413 once a request body passes its limit: at once when ``Content-Length`` says so, otherwise as
    soon as the received bytes pass it (the rest is never read)."""

    def __init__(self, app: ASGIApp, *, json_limit: int, upload_limit: int):
        self.app, self.json_limit, self.upload_limit = app, json_limit, upload_limit

    def limit_for(self, scope: Scope) -> int:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # served under a prefix (--root-path): match the app's own path
            path = path[len(root):]
        return self.upload_limit if (scope["method"], path) in UPLOAD_ROUTES else self.json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        too_big = f"request body exceeds the {limit}-byte limit for {scope['method']} {scope['path']}"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _answer(send, 400, "bad Content-Length header")
                return
            if length > limit:
                await _answer(send, 413, too_big)
                return
        state = {"received": 0, "exceeded": False, "started": False}

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["exceeded"] = True
                    raise BodyTooLargeError(too_big)
            return message

        async def guarded_send(message: Message) -> None:
            if state["exceeded"] and not state["started"]:
                return  # the app's answer to a cut-off body (often a 400 or 422) is replaced by the 413 below
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLargeError:
            if state["started"]:
                raise
        if state["exceeded"] and not state["started"]:
            await _answer(send, 413, too_big)


class LatencyMiddleware:
    """Request latency per route and status for /metrics. Plain ASGI: ``@app.middleware("http")`` (Starlette's
    BaseHTTPMiddleware) re-streams every response through a task and a memory stream, a fixed cost per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.request_latency.labels(scope["method"], getattr(route, "path", "unmatched"),
                                                str(status[0])).observe(time.perf_counter() - t0)


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    # Added first, so it runs inside the latency middleware: a 413 is timed like any other answer.
    app.add_middleware(BodyLimitMiddleware, json_limit=settings.max_json_bytes,
                       upload_limit=settings.max_upload_bytes + MULTIPART_SLACK_BYTES)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
