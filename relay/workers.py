"""``relay serve --workers N``: N processes serving one port, so one relay uses every core.

Each worker is ``relay serve`` in worker mode: its own app, hub and Postgres store, binding the
public address with SO_REUSEPORT (the kernel spreads connections over the workers). They behave
as N relays on one database, which Relay already supports: NOTIFY wakes readers parked on one
worker by commits through another, and offsets and producer fencing live in the database.

The parent only supervises. It forwards SIGTERM/SIGINT (each worker stops gracefully; a second
signal kills them), restarts nothing (a worker that dies stops the others and the parent exits
1, so systemd or the like restarts the whole relay), and exits once every worker has.

Metrics: each worker also listens on a private ``127.0.0.1`` port, serving only
``/metrics/local`` (its own samples), and writes that port into a directory the parent made.
Public ``/metrics``, on whichever worker answers, scrapes its siblings there and adds up.
Like the process runners here, this module is part of the entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from protocol.errors import Unavailable
from relay.config import SETTINGS, Config, env_name, env_value
from relay.metrics import CONTENT_TYPE, sum_expositions

log = structlog.get_logger("relay")

WORKER_FLAG = "--worker-of"
"""Internal ``serve`` flag: ``INDEX:DIR``, this process's index and the parent's directory."""

SCRAPE_TIMEOUT = 5.0
"""Seconds a public scrape waits for one sibling's samples before answering 503."""


@dataclass(frozen=True)
class WorkerSpec:
    """What the parent tells one worker: its index and where siblings leave their ports."""

    index: int
    rendezvous: Path

    def flag_value(self) -> str:
        return f"{self.index}:{self.rendezvous}"

    @classmethod
    def parse(cls, value: str) -> WorkerSpec:
        index, _, rendezvous = value.partition(":")
        return cls(int(index), Path(rendezvous))


# ---- the parent -------------------------------------------------------------------------


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_PARENT_SIGNALS = STOP_SIGNALS | {signal.SIGCHLD}


def supervise(config: Config) -> int:
    """Start ``config.workers`` workers and wait for all of them; 0 only after a clean stop.

    The parent blocks its signals and takes them one at a time with ``sigwait`` (no handler
    can interrupt a log line or a reap); workers unblock them first thing.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
    with (
        tempfile.TemporaryDirectory(prefix="relay-workers-") as rendezvous,
        _port_for_workers(config.host, config.port) as port,
    ):
        environ = _worker_environ(replace(config, port=port))
        group = _Group()
        for index in range(config.workers):
            spec = WorkerSpec(index, Path(rendezvous))
            command = [sys.executable, "-m", "relay", "serve", WORKER_FLAG, spec.flag_value()]
            # stdin is a pipe we never write: its EOF tells a worker the parent is gone.
            group.add(subprocess.Popen(command, env=environ, stdin=subprocess.PIPE), index)
        log.info("workers started", workers=config.workers, port=port, pid=os.getpid())
        while group.alive:
            signum = signal.sigwait(_PARENT_SIGNALS)
            if signum == signal.SIGCHLD:
                group.reap()
            else:
                group.on_signal(signum)
    log.info("stopped", failed=group.failed)
    return 1 if group.failed else 0


def unblock_stop_signals() -> None:
    """Undo the parent's signal mask, which a worker inherits across exec. Called once the
    worker's own handlers are in place, so a stop sent while it started is held until then
    and taken gracefully."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)


class _Group:
    """The worker processes, reaped here only (never by ``Popen.poll``)."""

    def __init__(self) -> None:
        self.alive: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
        self.stopping = False
        self.failed = False  # a worker failed, or exited without being asked to

    def add(self, proc: subprocess.Popen[bytes], index: int) -> None:
        self.alive[proc.pid] = (index, proc)

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            log.warning("second signal, killing workers", signal=name)
            self.forward(signal.SIGKILL)
            return
        log.info("stopping workers", signal=name)
        self.stopping = True
        self.forward(signum)

    def forward(self, signum: int) -> None:
        for pid in self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def reap(self) -> None:
        """Collect every worker that has exited (one SIGCHLD may stand for several)."""
        while self.alive:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index, proc = self.alive.pop(pid)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
            if proc.stdin is not None:
                proc.stdin.close()
            if code == 0 and self.stopping:
                continue
            self.failed = True
            log.error("worker exited", worker=index, code=code, stopping=self.stopping)
            if not self.stopping:
                self.stopping = True
                self.forward(signal.SIGTERM)


@contextlib.contextmanager
def _port_for_workers(host: str, port: int) -> Iterator[int]:
    """The port every worker binds. Port 0 is resolved once here, and the port is held (bound,
    never listening, so it gets no connections) until the workers are gone."""
    if port != 0:
        yield port
        return
    family, kind, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        chosen: int = sock.getsockname()[1]
        yield chosen


def _worker_environ(config: Config) -> dict[str, str]:
    """The resolved settings as ``RELAY_*`` variables (not argv: no URL shows in ``ps``)."""
    environ = dict(os.environ)
    for setting in SETTINGS:
        environ[env_name(setting.name)] = env_value(getattr(config, setting.name))
    return environ


# ---- one worker ---------------------------------------------------------------------------


class Worker:
    """This process's place among the workers: its index, its private metrics listener and
    its siblings' private ports, for adding up ``/metrics``."""

    def __init__(self, spec: WorkerSpec, count: int) -> None:
        self.index = spec.index
        self._spec = spec
        self._count = count
        self._ports: dict[int, int] = {}
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self, render_local: Callable[[], bytes]) -> None:
        """Serve ``/metrics/local`` on a private loopback port and publish that port."""

        async def metrics_local(request: web.Request) -> web.Response:
            return web.Response(body=render_local(), headers={"Content-Type": CONTENT_TYPE})

        private = web.Application()
        private.router.add_get("/metrics/local", metrics_local)
        self._runner = web.AppRunner(private, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        staged = self._spec.rendezvous / f"{self.index}.tmp"
        staged.write_text(str(port))
        staged.replace(self._spec.rendezvous / str(self.index))  # siblings never see half
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def add_up(self, own: bytes) -> bytes:
        """Our samples plus every sibling's; 503 when one cannot be had, since a partial sum
        would look like a counter reset."""
        others = [i for i in range(self._count) if i != self.index]
        texts = await asyncio.gather(*(self._scrape(i) for i in others))
        return sum_expositions([own.decode(), *texts])

    async def _scrape(self, index: int) -> str:
        port = self._ports.get(index)
        if port is None:
            try:
                port = self._ports[index] = int((self._spec.rendezvous / str(index)).read_text())
            except FileNotFoundError:
                raise Unavailable(f"worker {index} has not started") from None
        assert self._http is not None
        try:
            async with self._http.get(f"http://127.0.0.1:{port}/metrics/local") as response:
                response.raise_for_status()
                return await response.text()
        except (aiohttp.ClientError, TimeoutError):
            raise Unavailable(f"worker {index} did not give its metrics") from None


def watch_parent(stop: asyncio.Event) -> None:
    """Stop gracefully when stdin (the parent's pipe) reaches EOF: the parent died unasked."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if os.read(fd, 4096):
            return
        loop.remove_reader(fd)
        if not stop.is_set():
            log.warning("parent process gone, stopping")
            stop.set()

    loop.add_reader(fd, readable)
