"""Schema migrations (Alembic), configured from Python: no alembic.ini ships, the scripts are this package.

SQLite (one host) is migrated by every process on start, serialised by a lock file beside the database.
A shared database (Postgres) is migrated once, by the operator: ``retrogen db upgrade``; ``serve`` and
``worker`` only check that it is at head, so a fleet of replicas never races to alter one schema (and an old
replica never runs against a schema it does not know). ``upgrade`` also holds a Postgres advisory lock, in
case two operators or deploy hooks run it at once.

A database made by ``create_all`` before migrations existed (tables, no ``alembic_version``) holds exactly
revision ``0001``; ``upgrade`` adopts it by stamping that revision first.
"""

from __future__ import annotations

import contextlib
import logging

# before alembic is imported: it logs its plugins' setup at INFO then; ``upgrade`` logs the line that matters
logging.getLogger("alembic").setLevel(logging.WARNING)

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Connection, Engine, inspect, text  # noqa: E402

from retrogen.errors import RetrogenError  # noqa: E402

log = logging.getLogger(__name__)

BASELINE = "0001"  # the schema create_all made before migrations existed
# pg_advisory_xact_lock(namespace, key): a namespace of our own, so other applications' keys never collide
LOCK_NAMESPACE = 0x52_47_4E  # "RGN"
MIGRATION_LOCK_KEY = 0


class SchemaNotCurrentError(RetrogenError):
    """The database's schema is not the one this release of retrogen expects."""

    exit_code = 2
    http_status = 503


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's config for this package; commands run on ``connection`` (see env.py)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this release knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def known(revision: str) -> bool:
    return revision in {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def current(engine: Engine) -> str | None:
    """The database's revision; None for an empty (or pre-migration) database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema to ``revision`` (adopting a pre-migration database); returns (before, after)."""
    with _migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # held to commit: a second upgrader waits, then finds it done
            conn.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                         {"ns": LOCK_NAMESPACE, "key": MIGRATION_LOCK_KEY})
        before = MigrationContext.configure(conn).get_current_revision()
        cfg = alembic_config(conn)
        if before is None and inspect(conn).has_table("jobs"):
            command.stamp(cfg, BASELINE)
            before = BASELINE
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if after != before:
        log.info("database schema migrated: %s -> %s", before or "empty", after)
    return before, after


def require_head(engine: Engine, display_url: str) -> None:
    """Raise one readable line unless the schema is at this release's head (a shared database is migrated by
    the operator, never by a replica on start)."""
    at, want = current(engine), head()
    if at == want:
        return
    if at is not None and not known(at):
        raise SchemaNotCurrentError(
            f"database {display_url} has schema revision {at}, newer than this retrogen knows (head {want}): "
            "upgrade retrogen on this host")
    raise SchemaNotCurrentError(
        f"database {display_url} schema is at {at or 'nothing (empty or pre-migration)'}, this retrogen needs "
        f"{want}: run `retrogen db upgrade --database-url URL` once, then start serve/worker")


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """SQLite: an exclusive lock file beside the database, so a server and workers starting together migrate
    one at a time (SQLite's own locks do not cover Alembic's check-then-create). Other engines: nothing here."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.migrate.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
