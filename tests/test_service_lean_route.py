"""``LeanRoute``: the same OpenAPI operation and the same answers as FastAPI's own route for the same endpoint,
with the key checked before the body is read, and endpoints it cannot serve refused when the route is made."""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from retrogen.service.api.errors import add_error_handlers
from retrogen.service.api.lean_route import LeanRoute, is_json, lean_post
from retrogen.service.core.errors import UnauthorizedError


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1)
    tags: list[str] = Field(default_factory=list, max_length=2)


async def caller(request: Request) -> str:
    if request.headers.get("x-api-key") != "secret":
        raise UnauthorizedError("an API key is required")
    return "owner"


Caller = Annotated[str, Depends(caller)]


async def echo(body: Body, request: Request, owner: Caller) -> Response:
    return JSONResponse({"n": body.n, "tags": body.tags, "owner": owner, "path": request.url.path})


def make_app() -> FastAPI:
    """The endpoint twice: as a LeanRoute (/lean) and as FastAPI's own route (/plain)."""
    router = APIRouter()
    lean_post(router, "/lean", summary="echo")(echo)
    router.post("/plain", summary="echo")(echo)
    app = FastAPI()
    add_error_handlers(app)
    app.include_router(router)
    return app


@pytest.fixture(scope="module")
def client():
    return TestClient(make_app())


KEY = {"x-api-key": "secret"}


def test_the_openapi_operation_is_fastapis_own(client):
    paths = client.get("/openapi.json").json()["paths"]
    lean, plain = paths["/lean"]["post"], paths["/plain"]["post"]
    assert lean.pop("operationId") != plain.pop("operationId")
    assert lean == plain
    assert lean["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Body"}


def test_a_valid_request_reaches_the_endpoint(client):
    r = client.post("/lean", json={"n": 3, "tags": ["a"]}, headers=KEY)
    assert r.status_code == 200
    assert r.json() == {"n": 3, "tags": ["a"], "owner": "owner", "path": "/lean"}


@pytest.mark.parametrize(("content", "headers"), [
    (b'{"n": 0}', {}),  # out of range
    (b'{"n": "x"}', {}),  # wrong type
    (b'{"n": 1, "colour": "red"}', {}),  # unknown field
    (b'{"n": 1, "tags": ["a", "b", "c"]}', {}),  # too long a list
    (b'{"tags": []}', {}),  # missing field
    (b"[1, 2]", {}),  # not an object
    (b'{"n": 1}', {"content-type": "text/plain"}),  # not declared JSON: not parsed
    (b'{"n": 1}', {"content-type": ""}),
    (b"", {}),  # no body
])
def test_validation_answers_as_fastapi_does(client, content, headers):
    headers = {"content-type": "application/json", **KEY, **headers}
    lean = client.post("/lean", content=content, headers=headers)
    plain = client.post("/plain", content=content, headers=headers)
    assert lean.status_code == plain.status_code == 422
    assert [e["loc"] for e in lean.json()["errors"]] == [e["loc"] for e in plain.json()["errors"]]
    assert lean.json()["detail"].startswith("invalid request: body")


@pytest.mark.parametrize("content", [b'{"n": ', b"\xff\xfe{"])
def test_unparsable_json_is_a_clear_422(client, content):
    r = client.post("/lean", content=content, headers={"content-type": "application/json", **KEY})
    assert r.status_code == 422
    assert r.json()["errors"][0]["type"] == "json_invalid" and r.json()["errors"][0]["loc"] == ["body"]
    assert "Invalid JSON" in r.json()["detail"]


def test_the_key_is_checked_before_the_body_is_read(client):
    for content in (b'{"n": 1}', b"not json", b'{"n": 0}'):
        r = client.post("/lean", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 401, content
        assert r.json()["detail"] == "an API key is required"


def test_json_content_types():
    assert is_json("application/json") and is_json("Application/JSON; charset=utf-8")
    assert is_json("application/vnd.api+json")
    assert not is_json(None) and not is_json("text/json") and not is_json("application/jsonx")


def _sync(request: Request) -> Response:
    return Response()


async def _query_param(request: Request, q: int) -> Response:
    return Response()


async def _needs_more(request: Request, other: int) -> str:
    return "x"


async def _dep_with_params(request: Request, who: Annotated[str, Depends(_needs_more)]) -> Response:
    return Response()


async def _two_bodies(a: Body, b: Body) -> Response:
    return Response()


async def _unannotated(request: Request, other) -> Response:
    return Response()


async def _needs_an_unannotated(request: Request, other) -> str:
    return "x"


async def _dep_with_unannotated(request: Request, who: Annotated[str, Depends(_needs_an_unannotated)]) -> Response:
    return Response()


@pytest.mark.parametrize("endpoint", [_sync, _query_param, _dep_with_params, _two_bodies, _unannotated,
                                      _dep_with_unannotated])
def test_endpoints_it_cannot_serve_are_refused_when_made(endpoint):
    with pytest.raises(TypeError, match="LeanRoute"):
        lean_post(APIRouter(), "/x")(endpoint)


def test_route_dependencies_are_refused():
    with pytest.raises(TypeError, match="dependencies"):
        APIRouter().add_api_route("/x", echo, methods=["POST"], route_class_override=LeanRoute,
                                  dependencies=[Depends(caller)])


async def _not_a_response(request: Request) -> dict:
    return {"ok": True}


def test_an_endpoint_must_answer_a_response():
    router = APIRouter()
    lean_post(router, "/x")(_not_a_response)
    app = FastAPI()
    app.include_router(router)
    with pytest.raises(TypeError, match="not a Response"):
        TestClient(app).post("/x")
