"""FastAPI dependencies: the app's parts (from ``app.state``, set once by ``create_app``), the caller's key,
and path objects (a job or 404)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from ..core.config import Settings
from ..core.db import Database
from ..core.errors import UnauthorizedError
from ..core.tables import Job
from ..crud.jobs import get_job
from ..domain.indexes import IndexRegistry
from ..domain.queries import QueryLimits
from ..domain.runners import MethodRegistry
from ..domain.storage import Store

ANONYMOUS = "anonymous"  # the owner of everything when API keys are off

# The dependencies below that only read app state or compare keys are ``async def``: FastAPI runs a plain
# ``def`` dependency in its thread pool, a thread hop per dependency per request. Those that query the
# database stay plain ``def``.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_methods(request: Request) -> MethodRegistry:
    return request.app.state.methods


async def get_index_registry(request: Request) -> IndexRegistry:
    return request.app.state.index_registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Database, Depends(get_db)]
StoreDep = Annotated[Store, Depends(get_store)]
MethodsDep = Annotated[MethodRegistry, Depends(get_methods)]
IndexRegistryDep = Annotated[IndexRegistry, Depends(get_index_registry)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (when keys are on)")
bearer_token = HTTPBearer(auto_error=False, description="the API key as a bearer token")


def key_owner(key: str) -> str:
    """What rows store: a hash of the key, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def check_key(settings: Settings, given: str | None) -> str:
    """The caller's owner id. Keys off: everyone is one anonymous owner. Keys on: a configured key or 401."""
    if not settings.api_keys:
        return ANONYMOUS
    if not given:
        raise UnauthorizedError("an API key is required: send X-API-Key or Authorization: Bearer <key>")
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in settings.api_keys):
        raise UnauthorizedError("unknown API key")
    return key_owner(given)


async def current_key(settings: SettingsDep, header_key: Annotated[str | None, Depends(api_key_header)] = None,
                bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_token)] = None) -> str:
    """The caller's owner id, from ``X-API-Key`` or ``Authorization: Bearer``."""
    return check_key(settings, header_key or (bearer.credentials if bearer else None))


async def current_key_or_query(settings: SettingsDep,
                         api_key: Annotated[str | None, Query(include_in_schema=False)] = None,
                         header_key: Annotated[str | None, Depends(api_key_header)] = None,
                         bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_token)] = None) -> str:
    """As :func:`current_key`, also accepting ``?api_key=``: clip-retrieval's ClipClient sends no headers, but
    its URL may carry a query string, and an ``<img src>`` cannot send one either. Prefer a header where
    possible; the query value is redacted from every log line (``core.logs``)."""
    return check_key(settings, header_key or api_key or (bearer.credentials if bearer else None))


CurrentKey = Annotated[str, Depends(current_key)]


@dataclass(frozen=True)
class QueryContext:
    """What a query route (``/v1/retrieve``, ``/knn-service``) needs from the app, its caller's key checked."""

    registry: IndexRegistry
    limits: QueryLimits


def _query_context(request: Request, given: str | None) -> QueryContext:
    state = request.app.state
    check_key(state.settings, given)
    return QueryContext(state.index_registry, QueryLimits.from_settings(state.settings))


def given_key(request: Request, *, in_url: bool = False) -> str | None:
    """The key as :func:`current_key` (``in_url``: :func:`current_key_or_query`) takes it, read straight from the
    request: ``X-API-Key``, then ``?api_key=`` where allowed, then ``Authorization: Bearer``."""
    key = request.headers.get(api_key_header.model.name)
    if not key and in_url:
        key = request.query_params.get("api_key")
    if not key:
        scheme, credentials = get_authorization_scheme_param(request.headers.get("Authorization"))
        key = credentials if scheme.lower() == "bearer" else None
    return key or None


# The query routes (``/v1/retrieve``, ``/knn-service``) are ``LeanRoute``s (``api.lean_route``): they call their
# one dependency with the request alone. So it reads the key itself instead of through the two header schemes,
# and the routes declare those schemes in OpenAPI with ``KEY_SECURITY``, as the schemes would.
async def query_context(request: Request) -> QueryContext:
    """As :func:`current_key` (the key from ``X-API-Key`` or ``Authorization: Bearer``), with the query's parts."""
    return _query_context(request, given_key(request))


async def query_context_key_in_url(request: Request) -> QueryContext:
    """As :func:`current_key_or_query` (``?api_key=`` too, for clip-retrieval's ClipClient), with the query's
    parts."""
    return _query_context(request, given_key(request, in_url=True))


#: ``openapi_extra`` of a route that takes :data:`QueryContextDep` or :data:`QueryContextKeyInUrlDep`
KEY_SECURITY = {"security": [{api_key_header.scheme_name: []}, {bearer_token.scheme_name: []}]}

QueryContextDep = Annotated[QueryContext, Depends(query_context)]
QueryContextKeyInUrlDep = Annotated[QueryContext, Depends(query_context_key_in_url)]

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="job id")]
DatasetId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="dataset id")]


def get_job_dep(job_id: JobId, owner: CurrentKey, db: DbDep) -> Job:
    return get_job(db, owner, job_id)


def get_job_dep_key_in_url(job_id: JobId, owner: Annotated[str, Depends(current_key_or_query)], db: DbDep) -> Job:
    return get_job(db, owner, job_id)


JobDep = Annotated[Job, Depends(get_job_dep)]
#: The job, for URLs a client may only be able to fetch bare (image URLs): the key may come as ``?api_key=``.
JobDepKeyInUrl = Annotated[Job, Depends(get_job_dep_key_in_url)]
