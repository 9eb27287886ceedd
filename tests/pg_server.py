"""A throwaway PostgreSQL server for the tests, started from the machine's own binaries (Debian's
``postgresql`` package; ``scripts/test.sh`` installs it): ``initdb`` into a temp dir, ``postgres`` on a free
loopback port with its socket in that dir, one database per test, all removed at the end.

Use from a test module with ``pytest_plugins = ("tests.pg_server",)``: fixtures ``pg_server`` (session) and
``database_url`` (parametrized: a SQLite file, and a fresh Postgres database migrated to head). Without the
binaries the Postgres cases skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def bindir() -> Path | None:
    """Where ``initdb`` / ``pg_ctl`` live: ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        candidates.append(out)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster in ``root``. As root, the server commands run as user ``postgres`` (initdb refuses root)."""

    def __init__(self, bin_dir: Path, root: Path):
        self.bin, self.root = bin_dir, root
        self.data, self.port = root / "data", free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120, check=False)
        if r.returncode:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr or r.stdout}\n{log[-2000:]}")

    def start(self) -> None:
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        # durability is not under test here: fsync off keeps the many small claim transactions fast
        opts = (f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=300")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "-o", opts, "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as c:
            c.execute(sql)

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # closes connections a test left open


@pytest.fixture(scope="session")
def pg_server():
    found = bindir()
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("PostgreSQL server binaries not found (CI must install Debian's postgresql package)")
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql; scripts/test.sh does)")
    # not under pytest's tmp (root-only when run as root): user postgres must reach it
    root = Path(tempfile.mkdtemp(prefix="retrogen-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    server = PostgresServer(found, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_database(pg_server):
    """A fresh database on the session's server, migrated to head (as ``retrogen db upgrade`` would); its URL."""
    from sqlalchemy import create_engine

    from retrogen.service.core import migrations

    name = pg_server.create_database()
    url = pg_server.url(name)
    engine = create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    yield url
    pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """The same test on both engines: a SQLite file, and a Postgres database at head."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_database")
