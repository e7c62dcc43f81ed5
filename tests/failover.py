"""A Postgres primary with a streaming standby, both private to one test, for failover tests.

Built from the same binaries as ``tests.pg.ThrowawayCluster``: ``initdb`` a primary, clone it
with ``pg_basebackup -R`` (the standby then follows it over streaming replication), kill the
primary's postmaster with SIGKILL, and ``pg_ctl promote`` the standby.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess

import asyncpg

from tests.pg import ThrowawayCluster
from tests.waits import eventually


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ReplicatedPair:
    """``primary`` and ``standby`` data directories under one temporary root."""

    def __init__(self, *, synchronous: bool) -> None:
        self._base = ThrowawayCluster()  # binaries, root directory, runs as postgres if root
        self.root = self._base.root
        self.ports = {"primary": self._base.port, "standby": _free_port()}
        self.synchronous = synchronous

    def _run(self, *args: str) -> None:
        self._base._run(*args)

    def _dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _start(self, name: str, *settings: str) -> None:
        options = f"-p {self.ports[name]} -k {self.root} -c listen_addresses=127.0.0.1"
        options += " -c fsync=off " + " ".join(f"-c {s}" for s in settings)
        log = os.path.join(self.root, f"{name}.log")
        bin_dir = self._base.bin_dir
        self._run(
            f"{bin_dir}/pg_ctl", "-D", self._dir(name), "-o", options, "-l", log, "-w", "start"
        )

    def start(self) -> str:
        """Both servers up, the standby streaming; returns a URL naming both hosts."""
        bin_dir = self._base.bin_dir
        self._run(f"{bin_dir}/initdb", "-D", self._dir("primary"), "-A", "trust", "-U", "relay")
        sync = ["synchronous_standby_names='*'"] if self.synchronous else []
        self._start("primary", "wal_level=replica", *sync)
        self._clone("standby")
        hosts = ",".join(f"127.0.0.1:{self.ports[n]}" for n in ("primary", "standby"))
        return f"postgresql://relay@{hosts}/postgres?target_session_attrs=read-write"

    def _clone(self, name: str) -> None:
        """A standby of the primary in its own directory, started and streaming from it."""
        self._run(
            f"{self._base.bin_dir}/pg_basebackup", "-h", "127.0.0.1",
            "-p", str(self.ports["primary"]), "-U", "relay", "-D", self._dir(name), "-R",
            "-X", "stream",
        )  # fmt: skip
        self._start(name)

    def add_standby(self, name: str) -> str:
        """One more standby of the primary (after ``start``); returns its URL."""
        self.ports[name] = _free_port()
        self._clone(name)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql://relay@127.0.0.1:{self.ports[name]}/postgres"

    async def caught_up(self, name: str = "standby", timeout: float = 60) -> None:
        """Until standby ``name`` has replayed everything the primary has written so far."""
        primary = await asyncpg.connect(self.url("primary"))
        try:
            written: str = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
        finally:
            await primary.close()
        standby = await asyncpg.connect(self.url(name))

        async def replayed() -> bool:
            done: bool = await standby.fetchval(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", written
            )
            return done

        try:
            what = f"{name} replaying the primary's WAL to {written}"
            await eventually(replayed, timeout=timeout, interval=0.02, what=what)
        finally:
            await standby.close()

    def stop_standby(self) -> None:
        """Take the standby away (fast shutdown, data kept): from now on it falls behind."""
        self._run(f"{self._base.bin_dir}/pg_ctl", "-D", self._dir("standby"), "-m", "fast", "stop")

    def start_standby(self) -> None:
        self._start("standby")

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster, as a machine or process crash would."""
        with open(os.path.join(self._dir("primary"), "postmaster.pid")) as pidfile:
            os.kill(int(pidfile.readline()), signal.SIGKILL)

    def promote(self) -> None:
        self._run(f"{self._base.bin_dir}/pg_ctl", "-D", self._dir("standby"), "-w", "promote")

    def close(self) -> None:
        for name in reversed(list(self.ports)):  # standbys first
            with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
                self._run(
                    f"{self._base.bin_dir}/pg_ctl", "-D", self._dir(name), "-m", "immediate", "stop"
                )
        self._base.stop()
