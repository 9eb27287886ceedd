"""FastAPI dependencies: settings, the app's services, the caller's key, and path objects (job or 404)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from retrogen.service.config import Settings, get_settings
from retrogen.service.db import Database
from retrogen.service.errors import UnauthorizedError
from retrogen.service.methods import MethodRegistry
from retrogen.service.models import Job
from retrogen.service.storage import Store

SettingsDep = Annotated[Settings, Depends(get_settings)]

ANONYMOUS = "anonymous"  # the owner of everything when API keys are off


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_methods(request: Request) -> MethodRegistry:
    return request.app.state.methods


DbDep = Annotated[Database, Depends(get_db)]
StoreDep = Annotated[Store, Depends(get_store)]
MethodsDep = Annotated[MethodRegistry, Depends(get_methods)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (when keys are on)")
_bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")


def key_owner(key: str) -> str:
    """What rows store: a hash of the key, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def current_key(settings: SettingsDep, header_key: Annotated[str | None, Depends(_api_key_header)] = None,
                bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> str:
    """The caller's owner id. Keys off: everyone is one anonymous owner. Keys on: a configured key or 401."""
    if not settings.api_keys:
        return ANONYMOUS
    given = header_key or (bearer.credentials if bearer else None)
    if not given:
        raise UnauthorizedError("an API key is required: send X-API-Key or Authorization: Bearer <key>")
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in settings.api_keys):
        raise UnauthorizedError("unknown API key")
    return key_owner(given)


CurrentKey = Annotated[str, Depends(current_key)]

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="job id")]
DatasetId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="dataset id")]


def get_job_dep(job_id: JobId, owner: CurrentKey, db: DbDep) -> Job:
    from retrogen.service.jobs import get_job

    return get_job(db, owner, job_id)


JobDep = Annotated[Job, Depends(get_job_dep)]
