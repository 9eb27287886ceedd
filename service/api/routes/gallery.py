"""The per-job web gallery: a static page that reads ``GET /v1/jobs/{id}/results`` in the browser.

No server-side templating: the page takes the job id from its own URL, so nothing from a request is ever
written into HTML. Assets are a fixed allowlist from ``service/web/``.

Unknown jobs: with API keys off, ``/gallery/{id}`` answers 404 for a job that does not exist. With keys on, a
page load carries no key (the page reads it from the URL fragment, which never reaches the server), so the
server cannot tell whose job it is: it serves the same page for every well-formed id, revealing nothing; the
page's own keyed request for the results then answers 404 for a job the key does not own.
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from retrogen.errors import NotFoundError

from ...crud.jobs import get_job
from ..deps import ANONYMOUS, DbDep, SettingsDep

router = APIRouter(tags=["gallery"], include_in_schema=False)

WEB_DIR = FsPath(__file__).resolve().parents[2] / "web"
ASSETS = {"gallery.js": "text/javascript", "gallery.css": "text/css"}
# The page loads only its own script/style and talks only to this origin; images may be blob: URLs.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/gallery/{job_id}")
def gallery_page(job_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,40}$")], settings: SettingsDep,
                 db: DbDep) -> FileResponse:
    if not settings.api_keys:
        get_job(db, ANONYMOUS, job_id)  # 404 for an unknown job (with keys on, see the module docstring)
    return FileResponse(WEB_DIR / "gallery.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/gallery/assets/{name}")
def gallery_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFoundError(f"no gallery asset {name!r}")
    return FileResponse(WEB_DIR / name, media_type=ASSETS[name], headers=HEADERS)
