"""Engine and sessions: SQLite file by default (WAL, busy timeout, so web and worker processes share it),
Postgres by configuration (``postgresql+psycopg://...``). The schema is Alembic's (``core.migrations``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from retrogen.errors import NotFoundError, RetrogenError

from . import migrations
from .tables import Base

T = TypeVar("T", bound=Base)


class Database:
    """One engine + session factory, on a schema at the migrations' head.

    ``migrate`` (default: SQLite only) upgrades the schema on open; otherwise a schema behind head raises
    ``SchemaNotCurrentError`` telling the operator to run ``retrogen db upgrade`` (see ``core.migrations``).
    """

    def __init__(self, url: str, *, migrate: bool | None = None):
        self.url = url
        self.display_url = make_url(url).render_as_string(hide_password=True)  # what logs and messages may show
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        if migrate is None:
            migrate = self.dialect == "sqlite"
        try:
            if migrate:
                migrations.upgrade(self.engine)
            else:
                migrations.require_head(self.engine, self.display_url)
        except OperationalError as e:
            self.engine.dispose()
            raise unreachable(self.engine, e) from None
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """``sqlite`` | ``postgresql`` | ...: where claims differ (row locks exist on Postgres only)."""
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on any error."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def get_owned(self, table: type[T], row_id: str, owner: str, *, what: str) -> T:
        """The row if ``owner`` owns it; another key's row is reported as missing (no existence leak)."""
        with self.session() as s:
            row = s.get(table, row_id)
            if row is None or row.owner != owner:
                raise NotFoundError(f"no {what} {row_id!r}")
            return row

    def ping(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def unreachable(engine: Engine, error: OperationalError) -> RetrogenError:
    """A database that does not answer as one readable line: its URL without the password, and the driver's
    first line of why (``serve``, ``worker`` and ``db`` print it instead of a traceback)."""
    reason = str(error.orig if error.orig is not None else error).strip().splitlines()[0]
    return RetrogenError(f"database {engine.url.render_as_string(hide_password=True)}: {reason}")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; survives kill -9
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
