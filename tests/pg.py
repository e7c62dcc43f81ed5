"""Real Postgres for tests: the local server if one answers, else a throwaway cluster.

Fixtures (a pytest plugin, registered in tests/conftest.py):
- ``pg_admin_url``: session-wide admin URL (``RELAY_TEST_PG_URL``, default the local server at
  127.0.0.1:5432 as ``root``; when nothing answers there, a cluster started with ``initdb`` and
  ``pg_ctl`` in a temporary directory, stopped at the end).
- ``pg_url``: a fresh database per test, cloned from a migrated template, dropped afterwards.

Also a command line for scripts: ``python -m tests.pg available`` exits 0 when Postgres can be
had, and ``python -m tests.pg run -- CMD ... {url} ...`` runs CMD against a fresh database.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from relay.store.postgres import migrate
from tests.waits import eventually

DEFAULT_URL = "postgresql://root@127.0.0.1:5432/test"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def blocked_on_locks(url: str, count: int = 1, statement: str = "") -> None:
    """Until ``count`` backends in ``url``'s database wait on a lock, running a statement that
    starts with ``statement``. Polls pg_stat_activity outside any transaction, since inside one
    its snapshot never changes."""
    conn = await asyncpg.connect(url)

    async def blocked() -> bool:
        waiting: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND starts_with(query, $1)",
            statement,
        )
        return waiting >= count

    try:
        what = f"{count} backends blocked running {statement or 'anything'}"
        await eventually(blocked, interval=0.01, what=what)
    finally:
        await conn.close()


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class ThrowawayCluster:
    """A private Postgres in a temporary directory, on a free port, for this run only."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("no Postgres server answers and no initdb is installed")
        self.bin_dir = bin_dir
        self.root = tempfile.mkdtemp(prefix="relay-pg-")
        self.data = os.path.join(self.root, "data")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True)

    def start(self) -> str:
        self._run(
            f"{self.bin_dir}/initdb", "-D", self.data, "-A", "trust", "-U", "relay", "--no-sync"
        )
        self.resume()
        return f"postgresql://relay@127.0.0.1:{self.port}/postgres"

    def halt(self) -> None:
        """Stop the server, keeping its data (a database outage)."""
        self._run(f"{self.bin_dir}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(self.root, "server.log")  # not our pipe: the server outlives pg_ctl
        self._run(
            f"{self.bin_dir}/pg_ctl", "-D", self.data, "-o", options, "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(f"{self.bin_dir}/pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def admin_url() -> Iterator[str]:
    """A URL with rights to create databases: the configured server or a throwaway one."""
    url = os.environ.get("RELAY_TEST_PG_URL", DEFAULT_URL)
    if asyncio.run(_answers(url)):
        yield url
        return
    cluster = ThrowawayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextlib.contextmanager
def fresh_database(admin: str, template: str | None = None) -> Iterator[str]:
    """A new database (optionally cloned from ``template``), dropped on exit."""
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    clause = f" TEMPLATE {template}" if template else ""
    asyncio.run(_execute(admin, f"CREATE DATABASE {name}{clause}"))
    try:
        yield _with_database(admin, name)
    finally:
        asyncio.run(_execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with admin_url() as url:
        yield url


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> Iterator[str]:
    """A database migrated once per session; tests clone it instead of migrating again."""
    with fresh_database(pg_admin_url) as url:
        asyncio.run(migrate(url))
        name = urlsplit(url).path.lstrip("/")
        asyncio.run(_execute(pg_admin_url, f"ALTER DATABASE {name} WITH IS_TEMPLATE true"))
        try:
            yield name
        finally:
            asyncio.run(_execute(pg_admin_url, f"ALTER DATABASE {name} WITH IS_TEMPLATE false"))


@pytest.fixture
def pg_url(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    with fresh_database(pg_admin_url, pg_template) as url:
        yield url


def main(argv: list[str]) -> int:
    if argv[:1] == ["available"]:
        url = os.environ.get("RELAY_TEST_PG_URL", DEFAULT_URL)
        return 0 if asyncio.run(_answers(url)) or _bin_dir() else 1
    if argv[:2] == ["run", "--"] and len(argv) > 2:
        with admin_url() as admin, fresh_database(admin) as url:
            command = [arg.replace("{url}", url) for arg in argv[2:]]
            return subprocess.run(command).returncode
    print("usage: python -m tests.pg available | run -- CMD ... {url} ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
