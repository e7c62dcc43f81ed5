"""A real PgBouncer (Debian's ``pgbouncer``, see scripts/install-pgbouncer) in transaction
pooling mode, in front of the test database, on a free port.

Fixture ``pgbouncer``: a running PgBouncer for the test's ``pg_url`` database, stopped before
that database is dropped. Its ``url`` reaches the same database through the pooler.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.relay_process import free_port, listening
from tests.waits import wait_for_process

POOL_SIZE = 3  # server connections per database: fewer than a relay's clients, so they share


def _binary() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError("pgbouncer is not installed: run scripts/install-pgbouncer as root")
    return found


def _version() -> tuple[int, ...]:
    """``pgbouncer --version``'s first line, ``PgBouncer 1.18.0``, as (1, 18, 0)."""
    out = subprocess.run([_binary(), "--version"], capture_output=True, text=True, check=True)
    return tuple(int(part) for part in re.findall(r"\d+", out.stdout.split()[1])[:3])


class PgBouncer:
    """One pgbouncer process and its files in a temporary directory."""

    def __init__(self, database_url: str, *, pool_size: int = POOL_SIZE) -> None:
        self.target = urlsplit(database_url)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="relay-pgbouncer-"))
        self.pool_size = pool_size
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``database_url`` with PgBouncer's address in place of the server's."""
        netloc = f"{self.target.username}@127.0.0.1:{self.port}"
        return urlunsplit(self.target._replace(netloc=netloc))

    def _write_config(self) -> Path:
        user = self.target.username or "postgres"
        (self.root / "users.txt").write_text(f'"{user}" ""\n')
        ini = self.root / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.target.hostname} port={self.target.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 500\n"
            "server_round_robin = 0\n"  # LIFO, the default: see test_pgbouncer's hop test
            # PgBouncer 1.21+ can track named prepared statements itself (on by default from
            # 1.22; 1.18 rejects the setting); off, every version behaves as Debian 12's 1.18.
            + ("max_prepared_statements = 0\n" if _version() >= (1, 21) else "")
        )
        return ini

    def start(self, timeout: float = 10.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        ini = self._write_config()
        command = [_binary(), str(ini)]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root: become nobody
            nobody = pwd.getpwnam("nobody")
            os.chmod(self.root, 0o755)
            for path in self.root.iterdir():
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            command[1:1] = ["-u", "nobody"]
        with (self.root / "pgbouncer.log").open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log)
        ready = partial(listening, self.port)
        wait_for_process(self.proc, ready, timeout=timeout, what="pgbouncer", detail=self.log)

    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: close every connection and exit
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def pgbouncer(pg_url: str) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(pg_url)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()
