"""``retrogen serve`` and ``retrogen worker`` (registered by ``retrogen/cli.py``). Only typer at the top, so
``retrogen --help`` stays fast."""

from __future__ import annotations

import contextlib
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


db_app = typer.Typer(no_args_is_help=True, help="The job database's schema (Alembic migrations).")


def _database_engine(database_url: str | None, settings_file: Path | None):
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError

    from retrogen.errors import InvalidInputError

    url = database_url or _settings(settings_file).resolved_database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return create_engine(url)
    except (ArgumentError, ImportError) as e:  # a malformed URL, or a driver that is not installed
        raise InvalidInputError(f"--database-url: {e}") from None


@contextlib.contextmanager
def _reaching(engine):
    """One readable line (the URL without its password) instead of a driver traceback when the database does
    not answer; the engine is disposed either way."""
    from sqlalchemy.exc import OperationalError

    from .core.db import unreachable

    try:
        yield
    except OperationalError as e:
        raise unreachable(engine, e) from None
    finally:
        engine.dispose()


_URL_HELP = "SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: the settings' database_url)."


@db_app.command("upgrade")
def db_upgrade(
    *,
    database_url: str = typer.Option(None, "--database-url", help=_URL_HELP),
    settings_file: Path = typer.Option(None, "--settings-file", help="JSON settings file (RETROGEN_* env wins)."),
    revision: str = typer.Option("head", help="Target revision."),
) -> None:
    """Migrate the schema (run once per release against a shared Postgres, before starting serve/worker;
    SQLite is migrated on start). Safe to run twice, or from two hosts at once."""
    from .core import migrations

    engine = _database_engine(database_url, settings_file)
    with _reaching(engine):
        before, after = migrations.upgrade(engine, revision)
    where = engine.url.render_as_string(hide_password=True)
    typer.echo(f"{where}: schema {before or 'empty'} -> {after}" if before != after else f"{where}: already at {after}")


@db_app.command("current")
def db_current(
    *,
    database_url: str = typer.Option(None, "--database-url", help=_URL_HELP),
    settings_file: Path = typer.Option(None, "--settings-file", help="JSON settings file (RETROGEN_* env wins)."),
) -> None:
    """Print the database's schema revision and this release's head."""
    from .core import migrations

    engine = _database_engine(database_url, settings_file)
    with _reaching(engine):
        at = migrations.current(engine)
    head = migrations.head()
    typer.echo(f"{at or 'empty'} (head {head}{', up to date' if at == head else ', run `retrogen db upgrade`'})")
