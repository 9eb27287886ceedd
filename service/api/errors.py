"""One error body across the API (``schemas.ErrorPublic``), and an OpenAPI document that says so.

Every error answer is ``{"detail": "<one line>", "errors": [...]}``: a ``RetrogenError`` keeps its message as
``detail``; a request that fails validation gets its problems joined into ``detail`` and listed in ``errors``
(location, message, kind). The received value is never echoed back: it may be huge, or not JSON at all
(``NaN``), which once turned a 422 into a 500. The OpenAPI document declares this body for every error status
an operation can answer, and only those statuses.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from retrogen.errors import RetrogenError

from .schemas import ErrorPublic

log = logging.getLogger(__name__)

MAX_ERRORS = 20
MAX_DETAIL_CHARS = 2000  # a message quoting a huge value stays readable
STATUS_TEXT = {400: "Malformed request", 401: "No or an unknown API key", 403: "Not allowed on this server",
               404: "Not found (another key's resources are reported as missing)", 409: "Conflicts with the "
               "resource's state", 413: "Request body or upload over a size limit", 422: "Invalid request",
               503: "Not ready"}


def error_body(detail: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
    return {"detail": detail, "errors": errors or []}


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """The problems of a failed validation, without the values received."""
    out = []
    for e in exc.errors()[:MAX_ERRORS]:
        loc = [p if isinstance(p, int) else str(p) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", "value_error"))})
    return out


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RetrogenError)
    async def _retrogen_error(request: Request, exc: RetrogenError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body(str(exc)), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        joined = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in errors[:5])
        return JSONResponse(error_body(f"invalid request: {joined}", errors), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (204, 304):  # answers that carry no body
            return Response(status_code=exc.status_code, headers=exc.headers)
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


def _error_statuses(op: dict[str, Any]) -> set[int]:
    """The error statuses an operation can answer, from what it takes: a key (401), a body (400 when it cannot
    be parsed at all, e.g. not UTF-8; 413 over the size limit), parameters or a body (422), plus those it
    declares itself."""
    codes = {int(c) for c in op.get("responses", {}) if c.isdigit() and int(c) >= 400}
    if op.get("security"):
        codes.add(401)
    if "requestBody" in op:
        codes |= {400, 413, 422}
    if op.get("parameters"):
        codes.add(422)
    return codes


def install_openapi(app: FastAPI) -> None:
    """Replace FastAPI's validation-error schema by :class:`ErrorPublic` on every error status, and add the
    statuses each operation can answer whatever its route says (401, 413, 422)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        error_schema = ErrorPublic.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorPublic"] = error_schema
        ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                for code in sorted(_error_statuses(op)):
                    entry = responses.setdefault(str(code), {"description": STATUS_TEXT.get(code, "Error")})
                    if "content" not in entry or "HTTPValidationError" in str(entry["content"]):
                        entry["content"] = ref  # a route's own error model (readiness) stays
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it answers beyond those :func:`install_openapi` adds."""
    return {code: {"model": ErrorPublic, "description": STATUS_TEXT.get(code, "Error")} for code in codes}
