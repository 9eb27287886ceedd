"""Alembic migrations on SQLite and a real Postgres: head is exactly the declared schema, a pre-migration
database is adopted, SQLite migrates on open, a shared Postgres is migrated only by ``retrogen db upgrade``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, select

from retrogen.service.core import migrations
from retrogen.service.core.db import Database
from retrogen.service.core.tables import Base, Job

pytest_plugins = ("tests.pg_server",)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request, tmp_path):
    """An empty database on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'r.db'}"
        return
    server = request.getfixturevalue("pg_server")
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)


def schema_diff(engine) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def retrogen(*args: str, **env: str) -> subprocess.CompletedProcess:
    code = "import sys; from retrogen.cli import main; sys.argv[0] = 'retrogen'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)} | env)


def test_upgrade_from_empty_builds_exactly_the_declared_schema(empty_url):
    engine = create_engine(empty_url)
    try:
        assert migrations.current(engine) is None
        # two hosts upgrading at once: one migrates, the other waits for it and finds the schema at head
        results = []
        threads = [threading.Thread(target=lambda: results.append(migrations.upgrade(engine))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results, key=str) == sorted([(None, "0001"), ("0001", "0001")], key=str)
        assert migrations.current(engine) == migrations.head() == "0001"
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_pre_migration_database_is_adopted_not_broken(empty_url):
    """A database that ``create_all`` made before migrations existed (tables, rows, no alembic_version)."""
    engine = create_engine(empty_url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as c:
            c.execute(insert(Job).values(id="job_old", owner="o", dataset_id="ds", dataset_key="k", kind="retrieval",
                                         method="retrieval", per_class=1, params={}, state="succeeded",
                                         cancel_requested=False, attempts=1, progress={}, created=1.0))
        if empty_url.startswith("sqlite"):
            db = Database(empty_url)  # SQLite: adopted on open
            db.dispose()
        else:
            with pytest.raises(migrations.SchemaNotCurrentError, match="retrogen db upgrade"):
                Database(empty_url)
            assert migrations.upgrade(engine) == ("0001", "0001")  # stamped as the baseline it is
        assert migrations.current(engine) == "0001" and schema_diff(engine) == []
        with engine.connect() as c:
            assert c.execute(select(Job.id)).scalars().all() == ["job_old"]
    finally:
        engine.dispose()


def test_sqlite_migrates_on_open_and_concurrent_opens_agree(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'a.db'}"
    errors: list[BaseException] = []

    def open_db():
        try:
            Database(url).dispose()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_db) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = create_engine(url)
    assert migrations.current(engine) == "0001" and schema_diff(engine) == []
    engine.dispose()


def test_shared_postgres_is_migrated_by_the_operator_not_by_replicas(pg_server):
    name = pg_server.create_database()
    url = pg_server.url(name)
    try:
        # a worker on an unmigrated Postgres: one readable line naming the command, exit code 2, no traceback
        r = retrogen("worker", RETROGEN_DATABASE_URL=url, RETROGEN_DATA_DIR=str(pg_server.root / "w"))
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "run `retrogen db upgrade" in lines[0] and "Traceback" not in r.stderr, r.stderr
        r = retrogen("db", "current", "--database-url", url)
        assert r.returncode == 0 and r.stdout.startswith("empty (head 0001"), r.stdout + r.stderr
        r = retrogen("db", "upgrade", "--database-url", url)
        assert r.returncode == 0 and "schema empty -> 0001" in r.stdout, r.stdout + r.stderr
        r = retrogen("db", "upgrade", "--database-url", url)
        assert r.returncode == 0 and "already at 0001" in r.stdout, r.stdout + r.stderr
        Database(url).dispose()  # now a replica starts
    finally:
        pg_server.drop_database(name)


def test_db_commands_report_an_unreachable_or_malformed_database_in_one_line():
    r = retrogen("db", "current", "--database-url", "postgresql+psycopg://ops:s3cret-pw@127.0.0.1:1/jobs")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "postgresql+psycopg://ops:***@127.0.0.1:1/jobs" in r.stderr and "s3cret-pw" not in r.stderr
    r = retrogen("worker", RETROGEN_DATABASE_URL="postgresql+psycopg://ops:s3cret-pw@127.0.0.1:1/jobs")
    assert r.returncode == 1 and r.stderr.startswith("error: database postgresql+psycopg://ops:***@") \
        and "s3cret-pw" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = retrogen("db", "upgrade", "--database-url", "nosuchdb://x")
    assert r.returncode == 2 and r.stderr.startswith("error: --database-url:") and "Traceback" not in r.stderr
