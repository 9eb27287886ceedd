"""``retrogen serve`` and ``retrogen worker`` (registered by ``retrogen/cli.py``). Only typer at the top."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def _use_settings_file(settings_file: Path | None) -> None:
    if settings_file is not None:
        from retrogen.service.config import SETTINGS_FILE_ENV

        os.environ[SETTINGS_FILE_ENV] = str(settings_file)


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    settings_file: Path = typer.Option(None, "--settings-file", help="JSON settings file (RETROGEN_* env wins)."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Run a job worker inside the web process."),
) -> None:
    """Serve the HTTP API (and, by default, an in-process job worker)."""
    _use_settings_file(settings_file)
    import uvicorn

    from retrogen.service.api.main import create_app
    from retrogen.service.config import get_settings

    settings = get_settings()
    app = create_app(settings, start_worker=worker)
    typer.echo(f"retrogen serving on http://{host}:{port} (data: {Path(settings.data_dir).resolve()}, "
               f"worker: {'in-process' if worker else 'external'})")
    uvicorn.run(app, host=host, port=port, log_level="info")


def worker(
    settings_file: Path = typer.Option(None, "--settings-file", help="JSON settings file (RETROGEN_* env wins)."),
) -> None:
    """Run a job worker outside the web process (same database and store settings as the server)."""
    _use_settings_file(settings_file)
    import signal
    from pathlib import Path as P

    from retrogen.service.config import get_settings
    from retrogen.service.db import Database
    from retrogen.service.indexes import registry_for_settings
    from retrogen.service.methods import default_registry
    from retrogen.service.storage import Store
    from retrogen.service.worker import Worker

    settings = get_settings()
    db = Database(settings.resolved_database_url)
    store = Store(settings.resolved_storage_url, P(settings.data_dir) / "cache")
    w = Worker(settings, db, store, default_registry(), registry_for_settings(settings))
    signal.signal(signal.SIGTERM, lambda *_: w.request_stop())
    typer.echo(f"retrogen worker {w.name} polling {settings.resolved_database_url}")
    try:
        w.run_forever()
    except KeyboardInterrupt:
        w.stop()
