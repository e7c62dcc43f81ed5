"""Servers the bench compares: started here, so their pid (CPU time, pinning) is known.

A target is a base URL plus, when the bench started it, the process behind it. ``relay`` runs
``relay serve`` (embedded store in a temporary directory, or Postgres), ``bare`` a tiny aiohttp
server that answers everything at once (the ceiling for appends), and ``reference`` the upstream
Node reference server, in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp

TARGETS = ("relay", "bare", "reference")
SERVER_CPU = 0
GENERATOR_CPU = 1
REFERENCE_PACKAGE = "@durable-streams/server"
REFERENCE_FALLBACK_VERSION = "0.3.7"
OFFICIAL_DIR = Path(__file__).resolve().parents[2] / "conformance" / "official"

# The long-poll timeout matches relay serve's default, so neither server answers parked readers
# with 204 more often than the other.
_REFERENCE_SCRIPT = """
import { DurableStreamTestServer } from "@durable-streams/server"
const server = new DurableStreamTestServer({
  port: Number(process.argv[1]), host: "127.0.0.1", longPollTimeout: 30000, compression: false,
})
await server.start()
"""


@dataclass(frozen=True)
class TargetSpec:
    """How to start one target: its name plus what the relay needs."""

    name: str
    database_url: str = ""
    url: str = ""
    """A relay already running here: nothing is started, so no CPU time is reported."""
    pin: bool = True
    cache_dir: Path = Path.home() / ".cache" / "relay-bench"
    access_log: str = "on"
    """The relay runs at log level info, as deployed, so its access log costs what it costs."""
    read_database_urls: tuple[str, ...] = ()
    """Hot standbys of ``database_url`` the relay reads catch-up bytes from."""
    extra_args: tuple[str, ...] = ()
    """More ``relay serve`` flags (a scenario's own relay: table streams, say)."""
    open_files: int = 0
    """The server's soft and hard RLIMIT_NOFILE, set before exec (raising the hard limit takes
    root); 0 inherits the bench's."""


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    url: str
    pid: int | None
    has_metrics: bool
    database_url: str = ""
    """Where a relay target keeps its streams (Postgres), to read the WAL position."""
    read_database_urls: tuple[str, ...] = ()
    """Its read replicas, to wait for their replay and read their CPU time."""
    spec: TargetSpec | None = None
    """How it was started, so a scenario can start more relays like it (``capacity``)."""

    def resident_mib(self) -> float | None:
        """The server process's resident set (VmRSS), in MiB."""
        if self.pid is None:
            return None
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return None

    def cpu_seconds(self) -> float | None:
        """User plus system time of the whole server process (all threads) so far."""
        return process_cpu_seconds(self.pid) if self.pid is not None else None


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from the state field on (the command name may contain spaces)."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    return text[text.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int) -> float:
    # utime and stime are fields 14 and 15, so 11 and 12 after the state field.
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(backend_pid: int) -> float | None:
    """CPU time of the whole local Postgres server one of whose backends is ``backend_pid``.

    That is the postmaster's own time, what its exited children used (cutime and cstime:
    backends of closed connections), and every live child's (backends, WAL writer,
    checkpointer). None when the server is not on this machine (no such process here).
    """
    try:
        with open(f"/proc/{backend_pid}/comm") as comm:
            if not comm.read().startswith("postgres"):
                return None
        root = int(_stat(backend_pid)[1])
        fields = _stat(root)
    except (OSError, ValueError, IndexError):
        return None
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                child = _stat(int(entry))
            except (OSError, ValueError):
                continue  # exited meanwhile; the root's cutime has it now or soon
            if child[1] == str(root):
                ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def pin_generator() -> Callable[[], None]:
    """Move this process to the generator's core; return how to undo it."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {GENERATOR_CPU})
    return lambda: os.sched_setaffinity(0, before)


def _prepare_server(pin: bool, open_files: int) -> None:
    """Runs in the child before exec, so every thread the server starts inherits the core and
    the limit."""
    if pin:
        os.sched_setaffinity(0, {SERVER_CPU})
    if open_files:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))


@contextlib.asynccontextmanager
async def start_target(spec: TargetSpec) -> AsyncIterator[Target]:
    if spec.name == "relay" and spec.url:
        yield Target("relay", "relay (external)", spec.url.rstrip("/"), None, True)
        return
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as scratch:
        command, cwd, label = _command(spec, port, Path(scratch))
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if spec.name == "relay" else None,  # its JSON log lines
            # spec.pin is decided before the generator pins itself: asked afterwards, this
            # process sees one core and would leave the server on the generator's.
            preexec_fn=(
                partial(_prepare_server, spec.pin, spec.open_files)
                if spec.pin or spec.open_files
                else None
            ),
        )
        try:
            await _wait_ready(base, proc, label)
            relay = spec.name == "relay"
            database = spec.database_url if relay else ""
            replicas = spec.read_database_urls if relay else ()
            yield Target(spec.name, label, base, proc.pid, relay, database, replicas, spec)
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _command(spec: TargetSpec, port: int, scratch: Path) -> tuple[list[str], Path | None, str]:
    if spec.name == "relay":
        command = [sys.executable, "-m", "relay", "serve", "--port", str(port)]
        command += ["--data-dir", str(scratch), "--log-level", "info", "--log-format", "json"]
        command += ["--access-log", spec.access_log]
        if spec.database_url:
            command += ["--database-url", spec.database_url]
        for url in spec.read_database_urls:
            command += ["--read-database-url", url]
        command += list(spec.extra_args)
        label = "relay (sqlite)"
        if spec.database_url:
            label = "relay (postgres + replica)" if spec.read_database_urls else "relay (postgres)"
        return command, None, label
    if spec.name == "bare":
        return [sys.executable, "-m", "relay.bench.bare", str(port)], None, "bare aiohttp"
    if spec.name == "reference":
        where = reference_install(spec.cache_dir)
        command = ["node", "--input-type=module", "-e", _REFERENCE_SCRIPT, str(port)]
        return command, where, "reference (node, memory)"
    raise ValueError(f"unknown target {spec.name!r}; choose from {', '.join(TARGETS)}")


def reference_install(cache_dir: Path) -> Path:
    """A directory whose node_modules holds the reference server, installing it if need be.

    The conformance project's own install (``npm ci`` in conformance/official) is used when
    present, so the bench measures the very version the official suite runs against.
    """
    for where in (OFFICIAL_DIR, cache_dir):
        if (where / "node_modules" / REFERENCE_PACKAGE / "package.json").exists():
            return where
    version = REFERENCE_FALLBACK_VERSION
    with contextlib.suppress(OSError, KeyError, ValueError):
        manifest = json.loads((OFFICIAL_DIR / "package.json").read_text())
        version = manifest["dependencies"][REFERENCE_PACKAGE]
    package = f"{REFERENCE_PACKAGE}@{version}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"relay bench: installing {package} into {cache_dir}", flush=True)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(cache_dir), package],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return cache_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_ready(base: str, proc: subprocess.Popen[bytes], label: str) -> None:
    """Any HTTP answer means the server listens (the reference has no /health)."""
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{label} exited during start-up ({proc.returncode})")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/health"):
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{label} did not start listening")
