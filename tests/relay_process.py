"""Run ``relay serve`` as a real process for tests that kill, restart or load it."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from tests.waits import eventually, wait_for_process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RelayProcess:
    """A relay subprocess on a fixed port, restartable on the same data."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        port: int | None = None,
        log: Path | None = None,
        open_files: tuple[int, int] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.extra = extra  # after the defaults, so e.g. a --log-level here wins
        self.log = log  # where its stderr (the log) goes; inherited when None
        self.open_files = open_files
        """Its RLIMIT_NOFILE (soft, hard), set before exec; inherited when None."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        command = [sys.executable, "-m", "relay", "serve", "--port", str(self.port)]
        command += ["--data-dir", str(self.data_dir), "--log-level", "warning", *self.extra]
        limit: Callable[[], None] | None = None
        if self.open_files is not None:
            limit = partial(resource.setrlimit, resource.RLIMIT_NOFILE, self.open_files)
        if self.log is None:
            self.proc = subprocess.Popen(command, env=dict(os.environ), preexec_fn=limit)
        else:
            with self.log.open("ab") as sink:
                self.proc = subprocess.Popen(
                    command, env=dict(os.environ), stderr=sink, preexec_fn=limit
                )
        wait_for_process(self.proc, self.healthy, timeout=timeout, what="relay serve")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                return True
        except OSError:
            return False

    def children(self) -> list[int]:
        """Pids of the relay's child processes (``--workers`` > 1), from ``/proc``."""
        assert self.proc is not None
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # gone while we looked
                continue
            ppid = int(text.rpartition(")")[2].split()[1])  # the name may hold spaces or ")"
            if ppid == self.proc.pid:
                found.append(int(stat.parent.name))
        return found

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush; what was acknowledged must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def listening(port: int) -> bool:
    """Whether something accepts connections on ``port`` (a stop closes the listener first)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def live_readers(exposition: str) -> float:
    """Parked live readers of every mode, from a ``/metrics`` text."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in exposition.splitlines()
        if line.startswith("relay_live_readers{")
    )


async def parked_at(url: str, count: int) -> None:
    """Until the relay at ``url`` has exactly ``count`` live readers parked, by its own gauge
    (a write meant to wake them must not land before they wait for it). A ``/metrics`` that
    answers 503 while workers start counts none."""
    async with aiohttp.ClientSession() as session:

        async def parked() -> bool:
            async with session.get(f"{url}/metrics") as r:
                return live_readers(await r.text()) == count

        await eventually(parked, interval=0.02, what=f"{count} live readers parked at {url}")


async def read_all(session: aiohttp.ClientSession, url: str) -> bytes:
    """A stream's whole content over HTTP, chunk by chunk until up to date."""
    out, offset = bytearray(), "-1"
    while True:
        async with session.get(url, params={"offset": offset}) as r:
            assert r.status == 200
            out += await r.read()
            offset = r.headers["Stream-Next-Offset"]
            if r.headers.get("Stream-Up-To-Date") == "true":
                return bytes(out)


@contextlib.contextmanager
def on_store(request: Any, tmp_path: Path, *extra: str) -> Iterator[RelayProcess]:
    """A started relay on the store ``request.param`` names (``sqlite`` or ``postgres``, on a
    database from the ``pg_url`` fixture), stopped afterwards; for parametrized fixtures."""
    args = tuple(extra)
    if request.param == "postgres":
        args += ("--database-url", request.getfixturevalue("pg_url"))
    process = RelayProcess(tmp_path / "data", *args)
    process.start()
    try:
        yield process
    finally:
        process.stop()
