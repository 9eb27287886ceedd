"""``retrogen serve`` and ``retrogen worker`` (registered by ``retrogen/cli.py``). Only typer at the top, so
``retrogen --help`` stays fast."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from .core.config import Settings


def _settings(settings_file: Path | None) -> Settings:
    """The process's settings: environment (RETROGEN_*) > the settings file > defaults, read once here."""
    from .core.config import SETTINGS_FILE_ENV, Settings

    if settings_file is not None:
        os.environ[SETTINGS_FILE_ENV] = str(settings_file)
    return Settings()


def serve(
    *,
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    settings_file: Path = typer.Option(None, "--settings-file", help="JSON settings file (RETROGEN_* env wins)."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Run a job worker inside the web process."),
) -> None:
    """Serve the HTTP API (and, by default, an in-process job worker)."""
    import uvicorn

    from .api.main import create_app

    settings = _settings(settings_file)
    app = create_app(settings, start_worker=worker)  # also redacts API keys from every log line, access log included
    typer.echo(f"retrogen serving on http://{host}:{port} (data: {Path(settings.data_dir).resolve()}, "
               f"worker: {'in-process' if worker else 'external'})")
    uvicorn.run(app, host=host, port=port, log_level="info")


def worker(
    *,
    settings_file: Path = typer.Option(None, "--settings-file", help="JSON settings file (RETROGEN_* env wins)."),
) -> None:
    """Run a job worker outside the web process (same database and store settings as the server)."""
    import signal

    from .core.logs import install_log_redaction
    from .wiring import Services

    install_log_redaction()
    services = Services.from_settings(_settings(settings_file))
    w = services.worker
    signal.signal(signal.SIGTERM, lambda *_: w.request_stop())
    typer.echo(f"retrogen worker {w.name} polling {services.db.display_url}")
    try:
        w.run_forever()
    except KeyboardInterrupt:
        w.stop()
