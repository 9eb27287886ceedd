"""A bounded schemathesis run against the OpenAPI schema, with API keys off and on: generated requests never get
a server error, every answer has a documented status and content type and matches its documented schema (error
bodies included: one shape, ``ErrorPublic``), and no error message carries a Python object repr.

The apps are built at collection time (schemathesis parametrizes from them; cheap: no model loads) in a
temporary folder removed after the module; their shared index registry gets the session's tiny index (real
retrieval answers) once it exists. Bounded: the fuzzing phase only, a few examples per operation.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zlib
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service_fakes import dataset_files, fake_registry, make_settings, zip_bytes  # noqa: E402

_DATA = Path(tempfile.mkdtemp(prefix="retrogen-schema-"))
KEY = "schema-key-0123456"
# PIL's <_io.BytesIO object at 0x...>, PosixPath('/srv/...'), <class 'ValueError'>, b'...' and the like
PYTHON_REPR = re.compile(r"object at 0x[0-9a-f]+|\b(?:Posix|Windows)?Path\(|<class '|\bb'[^']*'")


def _registry():
    from retrogen.service.domain.indexes import IndexRegistry

    return IndexRegistry({})


REGISTRY = _registry()


def _app(name: str, **overrides):
    from retrogen.service.api.main import create_app

    return create_app(make_settings(_DATA / name, max_upload_bytes=100_000, **overrides), methods=fake_registry(),
                      index_registry=REGISTRY, start_worker=False)


OPEN, KEYED = _app("open"), _app("keyed", api_keys=[KEY])
open_schema = schemathesis.openapi.from_asgi("/openapi.json", OPEN)
keyed_schema = schemathesis.openapi.from_asgi("/openapi.json", KEYED)
for _schema in (open_schema, keyed_schema):
    _schema.config.phases.coverage.enabled = False  # the coverage phase alone would make ~900 requests


def no_python_reprs(ctx, response, case) -> None:
    """Error messages are for people: no Python object reprs (nor the server paths they tend to carry)."""
    if response.status_code >= 400 and "json" in response.headers.get("content-type", [""])[0]:
        detail = str(response.json().get("detail", ""))
        assert not PYTHON_REPR.search(detail), f"a Python repr in the error message: {detail[:300]}"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          no_python_reprs]


def _seed(app, headers):
    """One dataset and one finished job, so generated ids sometimes hit real rows."""
    from fastapi.testclient import TestClient

    client = TestClient(app, headers=headers)
    ds = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(dataset_files(1)), "application/zip")})
    assert ds.status_code == 201, ds.text
    assert client.post("/v1/jobs", json={"dataset": ds.json()["id"], "method": "fake-retrieval",
                                         "per_class": 1}).status_code == 202
    app.state.worker.run_once("retrieval")


@pytest.fixture(scope="module", autouse=True)
def _seeded(service_index_dir):
    from retrogen.service.core.config import IndexConfig

    REGISTRY.configs = {"corpus": IndexConfig(path=service_index_dir)}
    REGISTRY.get("corpus")
    _seed(OPEN, {})
    _seed(KEYED, {"X-API-Key": KEY})
    yield
    OPEN.state.db.dispose()
    KEYED.state.db.dispose()
    shutil.rmtree(_DATA, ignore_errors=True)


@open_schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_keys_off_conforms(case):
    case.call_and_validate(checks=CHECKS)


@keyed_schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_keys_on_conforms(case):
    """Half the examples carry the key (the routes' behaviour), half none (401, documented as such)."""
    keyed = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode()) % 2 == 0
    case.call_and_validate(headers={"X-API-Key": KEY} if keyed else {}, checks=CHECKS)


def _schema_validator(app):
    """A validator of the OpenAPI document's ErrorPublic (with the components it refers to)."""
    import jsonschema_rs  # schemathesis's own validator

    doc = app.openapi()
    return doc, jsonschema_rs.Draft202012Validator({"$ref": "#/components/schemas/ErrorPublic",
                                                    "components": doc["components"]})


def test_every_422_has_the_one_documented_error_shape():
    """Validation failures (FastAPI's) and RetrogenError 422s (the service's) answer the body the OpenAPI
    document declares for every 422, ``ErrorPublic``; nothing refers to FastAPI's own validation schema."""
    from fastapi.testclient import TestClient

    doc, validator = _schema_validator(OPEN)
    assert "HTTPValidationError" not in str(doc)
    declared = {op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
                for ops in doc["paths"].values() for op in ops.values() if "422" in op["responses"]}
    assert declared == {"#/components/schemas/ErrorPublic"}
    client = TestClient(OPEN)
    validation = [client.post("/v1/jobs", json={"dataset": "ds_x", "method": "fake-retrieval", "per_class": "many"}),
                  client.post("/v1/jobs", content=b'{"dataset": "ds_x", "method": "m", "per_class": NaN}',
                              headers={"content-type": "application/json"}),
                  client.get("/v1/jobs", params={"offset": 2**63})]
    service = client.post("/v1/jobs", json={"dataset": _dataset_id(client), "method": "nope", "per_class": 1})
    for r in [*validation, service]:
        assert r.status_code == 422, r.text
        validator.validate(r.json())
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert all(r.json()["errors"] and r.json()["errors"][0]["loc"][0] in ("body", "query") for r in validation)
    assert service.json()["errors"] == [] and "fake-retrieval" in service.json()["detail"]


def _dataset_id(client) -> str:
    return client.get("/v1/datasets").json()["data"][0]["id"]
