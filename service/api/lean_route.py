"""``LeanRoute``: a FastAPI route that answers a request in one step, for the per-query routes.

FastAPI documents and matches it like any other route: the endpoint's signature still gives its OpenAPI
operation. What changes is the work done per request. FastAPI's general handler does four things:

- it reads the body, finds the content type with ``email.message``, and parses the body with ``json.loads``;
- it validates the resulting dict;
- it solves the dependency graph;
- it checks the endpoint's answer.

This route calls the endpoint directly instead:

- the caller's key (the endpoint's dependencies) is checked first, before the body is parsed;
- the body is parsed and validated in one pass by pydantic-core (``model_validate_json``).

That took ~0.2 ms off each ``/v1/retrieve`` request here, about a quarter of what a query paid outside its own
work through the ASGI app (docs/service-retrieval.md).

It serves only endpoints of that shape:

- ``Request`` parameters;
- at most one pydantic model, which is the JSON body;
- ``async`` dependencies that take the request alone;
- a ``Response`` returned.

Anything else is refused when the route is made. A failed validation raises FastAPI's own
``RequestValidationError`` with its locations (``["body", ...]``), so the app's 422 answer is unchanged.

It cannot see dependencies given to ``include_router``, nor ``app.dependency_overrides``. Declare the key on
the endpoint.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, ValidationError


class LeanRoute(APIRoute):
    """An ``APIRoute`` whose requests skip FastAPI's general handler (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        if self.dependencies:
            raise TypeError(f"{self.path}: a LeanRoute takes its dependencies as parameters of the endpoint")
        return lean_handler(self.endpoint)


def lean_post(router: APIRouter, path: str, **kwargs: Any) -> Callable[[Callable], Callable]:
    """``@router.post(path, **kwargs)``, as a :class:`LeanRoute`."""

    def register(endpoint: Callable) -> Callable:
        router.add_api_route(path, endpoint, methods=["POST"], route_class_override=LeanRoute, **kwargs)
        return endpoint

    return register


def lean_handler(endpoint: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """``request -> response`` for ``endpoint``: its dependencies awaited in order, then its body parsed."""
    if not inspect.iscoroutinefunction(endpoint):
        raise TypeError(f"{endpoint.__qualname__}: a LeanRoute's endpoint is async")
    request_names, deps, body = [], [], None
    hints = typing.get_type_hints(endpoint, include_extras=True)
    for name in inspect.signature(endpoint).parameters:  # every parameter: an unannotated one is refused too
        hint = hints.get(name)
        dep = next((m.dependency for m in getattr(hint, "__metadata__", ()) if isinstance(m, Depends)), None)
        if dep is not None and inspect.iscoroutinefunction(dep) and _takes_request_alone(dep):
            deps.append((name, dep))
        elif hint is Request:
            request_names.append(name)
        elif body is None and isinstance(hint, type) and issubclass(hint, BaseModel):
            body = (name, hint)
        else:
            raise TypeError(f"{endpoint.__qualname__}: parameter {name!r} ({hint}) is not one a LeanRoute serves")

    async def handle(request: Request) -> Response:
        kwargs = {name: request for name in request_names}
        for name, dep in deps:
            kwargs[name] = await dep(request)
        if body is not None:
            kwargs[body[0]] = await json_body(request, body[1])
        response = await endpoint(**kwargs)
        if not isinstance(response, Response):
            raise TypeError(f"{endpoint.__qualname__} returned {type(response).__name__}, not a Response")
        return response

    return handle


def _takes_request_alone(dep: Callable) -> bool:
    params = list(inspect.signature(dep).parameters)
    return len(params) == 1 and typing.get_type_hints(dep).get(params[0]) is Request


async def json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as ``model``, with FastAPI's rules and error locations. A missing body is ``body: Field
    required``. A body not declared as JSON is not parsed (FastAPI's strict content type). Invalid JSON is
    ``json_invalid`` at ``body``."""
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    if not is_json(request.headers.get("content-type")):
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",),
                                       "msg": "Input should be a valid dictionary or object to extract fields from "
                                              "(send Content-Type: application/json)", "input": None}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False, include_input=False)]) from None


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters aside (as FastAPI decides)."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
