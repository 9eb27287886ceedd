"""A bounded schemathesis run against the retrieval routers with a real index loaded: generated requests to
``/v1/retrieve``, ``/v1/indexes/...``, ``/knn-service``, ``/metadata`` never get a server error.

The app is built at collection time (schemathesis parametrizes from it); its registry is lazy, so the index
path is filled in by a fixture once the session's index exists.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402

from retrogen.service.api.routes.knn import router as knn_router  # noqa: E402
from retrogen.service.api.routes.retrieve import router as retrieve_router  # noqa: E402
from retrogen.service.core.config import IndexConfig  # noqa: E402
from retrogen.service.domain.indexes import IndexRegistry  # noqa: E402
from tests.conftest import make_router_app  # noqa: E402

REGISTRY = IndexRegistry({})
APP = make_router_app(knn_router, retrieve_router, index_registry=REGISTRY)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.phases.coverage.enabled = False  # bounded: a few fuzzed examples per operation only


@pytest.fixture(scope="module", autouse=True)
def _index(service_index_dir):
    REGISTRY.configs = {"corpus": IndexConfig(path=service_index_dir)}
    REGISTRY.get("corpus")


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
