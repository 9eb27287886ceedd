"""A bounded schemathesis run against the OpenAPI schema: generated requests never get a server error.

The app is built at collection time (schemathesis parametrizes from it; cheap: no model loads) in a
temporary folder removed after the module.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.service_fakes import dataset_files, fake_registry, make_settings, zip_bytes  # noqa: E402

_DATA = Path(tempfile.mkdtemp(prefix="retrogen-schema-"))


def _app():
    from retrogen.service.api.main import create_app

    return create_app(make_settings(_DATA / "data", max_upload_bytes=100_000), methods=fake_registry(),
                      start_worker=False)


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# Bounded: hypothesis fuzzing (3 examples per operation and mode) only; the coverage phase alone would make ~900.
schema.config.phases.coverage.enabled = False


@pytest.fixture(scope="module", autouse=True)
def _seeded():
    """One dataset and one finished job, so generated ids sometimes hit real rows."""
    from fastapi.testclient import TestClient

    client = TestClient(APP)
    ds = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(dataset_files(1)), "application/zip")})
    assert ds.status_code == 201
    assert client.post("/v1/jobs", json={"dataset": ds.json()["id"], "method": "fake-retrieval",
                                         "per_class": 1}).status_code == 202
    APP.state.worker.run_once("retrieval")
    yield
    APP.state.db.dispose()
    shutil.rmtree(_DATA, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])

