"""SIGTERM stops a relay gracefully: parked readers and in-flight appends are answered first.

Each test runs ``relay serve`` as a real process on both stores, signals it, and checks what
clients saw: a parked long-poll gets the 204 a timeout would give, an SSE reader's stream ends
cleanly after a control event, every append is answered (and every acknowledged one survives),
the process exits promptly, and a second signal cuts a hung stop short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from relay.cli import DRAIN_SECONDS, REPEAT_WINDOW, stop_seconds
from relay.config import Config
from relay.hub import Hub
from tests.relay_process import RelayProcess, listening, parked_at, read_all
from tests.waits import wait_for

EXIT_BOUND = 5.0  # seconds; a correctness bound (a hung stop takes 10 s or more), not a benchmark
PRODUCERS = 24
STREAMS = 4


@pytest.fixture
def relay_args(request: pytest.FixtureRequest) -> Iterator[tuple[str, ...]]:
    if request.param == "sqlite":
        yield ()
    else:
        yield ("--database-url", request.getfixturevalue("pg_url"))


def _backends() -> list[str]:
    try:
        import relay.store.postgres  # noqa: F401
        import tests.pg  # noqa: F401
    except ImportError:
        return ["sqlite"]
    return ["sqlite", "postgres"]


both_stores = pytest.mark.parametrize("relay_args", _backends(), indirect=True)


async def test_hub_shutdown_ends_parked_waits_as_timeouts() -> None:
    hub = Hub()
    with hub.subscribe(1) as sub:
        sub.note_tail(5, closed=False)
        parked = asyncio.create_task(sub.wait_beyond(5, timeout=3600))
        await asyncio.sleep(0)  # one step parks it: nothing in wait_beyond awaits before
        assert not parked.done()
        hub.shutdown()
        assert await parked is False
        assert await sub.wait_beyond(5, timeout=3600) is False
        assert await sub.wait_beyond(4, timeout=3600) is True  # data already there wins


async def _exit_code(relay: RelayProcess, since: float) -> tuple[int, float]:
    """Wait (bounded) for the process to exit; its exit code and seconds since ``since``."""
    assert relay.proc is not None
    code = await asyncio.to_thread(relay.proc.wait, EXIT_BOUND * 3)
    return code, time.monotonic() - since


def _sse_events(body: bytes) -> list[tuple[str, str]]:
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(":", 1) for line in block.splitlines())
        events.append((fields["event"].strip(), fields["data"]))
    return events


@both_stores
async def test_sigterm_answers_parked_long_poll_and_ends_sse(
    tmp_path: Path, relay_args: tuple[str, ...]
) -> None:
    relay = RelayProcess(tmp_path / "data", *relay_args)
    relay.start()
    assert relay.proc is not None
    stream = f"{relay.url}/v1/stream/parked"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.put(
                stream, data=b"hello", headers={"Content-Type": "text/plain"}
            ) as r:
                assert r.status == 201
                tail = r.headers["Stream-Next-Offset"]

            async def long_poll() -> tuple[int, dict[str, str]]:
                params = {"offset": tail, "live": "long-poll"}
                async with session.get(stream, params=params) as r:
                    await r.read()
                    return r.status, dict(r.headers)

            async def sse() -> tuple[int, bytes]:
                async with session.get(stream, params={"offset": tail, "live": "sse"}) as r:
                    return r.status, await r.read()  # raises if the stream is cut off

            polling = asyncio.create_task(long_poll())
            streaming = asyncio.create_task(sse())
            await parked_at(relay.url, 2)
            started = time.monotonic()
            relay.proc.send_signal(signal.SIGTERM)

            status, headers = await polling
            assert status == 204
            assert headers["Stream-Next-Offset"] == tail
            assert headers["Stream-Up-To-Date"] == "true"

            status, body = await streaming
            assert status == 200
            events = _sse_events(body)
            assert events, "the SSE reader got no events"
            kind, data = events[-1]
            assert kind == "control"
            control = json.loads(data)
            assert control["streamNextOffset"] == tail
            assert control.get("upToDate") is True

        code, elapsed = await _exit_code(relay, started)
        assert code == 0
        assert elapsed < EXIT_BOUND
    finally:
        relay.stop()


def _record(producer: int, seq: int) -> bytes:
    return f"p{producer:02d}s{seq:06d};".encode()


def _headers(producer: int, seq: int) -> dict[str, str]:
    return {
        "Content-Type": "text/plain",
        "Producer-Id": f"producer-{producer}",
        "Producer-Epoch": "0",
        "Producer-Seq": str(seq),
    }


@both_stores
async def test_sigterm_under_append_load_answers_every_accepted_append(
    tmp_path: Path, relay_args: tuple[str, ...]
) -> None:
    """Each producer appends in sequence until its first non-2xx answer or connection error.

    A refused connection or a 503 is a fine answer during shutdown. A connection dropped
    without an answer is only fine if the server never took the request, so its record must
    not be in the store: after a restart every stream holds exactly its producers'
    acknowledged records, in order.
    """
    relay = RelayProcess(tmp_path / "data", *relay_args)
    relay.start()
    assert relay.proc is not None
    streams = [f"{relay.url}/v1/stream/load-{i}" for i in range(STREAMS)]
    acked: list[list[int]] = [[] for _ in range(PRODUCERS)]
    endings: dict[str, int] = {}
    enough = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            for url in streams:
                async with session.put(url, headers={"Content-Type": "text/plain"}) as r:
                    assert r.status == 201

            async def produce(p: int) -> None:
                url, seq = streams[p % STREAMS], 0
                while True:
                    try:
                        async with session.post(
                            url, data=_record(p, seq), headers=_headers(p, seq)
                        ) as r:
                            await r.read()
                            status = r.status
                    except aiohttp.ClientConnectorError:
                        endings["refused"] = endings.get("refused", 0) + 1
                        return
                    except aiohttp.ClientError:
                        endings["dropped"] = endings.get("dropped", 0) + 1
                        return
                    if status == 503:
                        endings["503"] = endings.get("503", 0) + 1
                        return
                    assert status in (200, 204), status
                    acked[p].append(seq)
                    seq += 1
                    if sum(map(len, acked)) >= PRODUCERS * 20:
                        enough.set()

            producers = [asyncio.create_task(produce(p)) for p in range(PRODUCERS)]
            await enough.wait()
            started = time.monotonic()
            relay.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*producers)
        assert "dropped" not in endings, endings

        code, elapsed = await _exit_code(relay, started)
        assert code == 0
        assert elapsed < EXIT_BOUND

        relay.start()
        async with aiohttp.ClientSession() as session:
            for i, url in enumerate(streams):
                data = await read_all(session, url)
                mine = range(i, PRODUCERS, STREAMS)
                records = data.decode().split(";")[:-1]
                for p in mine:
                    stored = [int(r[4:]) for r in records if r.startswith(f"p{p:02d}s")]
                    assert stored == acked[p], (p, endings)
    finally:
        relay.stop()


@contextlib.asynccontextmanager
async def _database_locked(relay_args: tuple[str, ...], data_dir: Path) -> AsyncIterator[None]:
    """Hold the store's write lock from outside, so the relay's next commit hangs on it."""
    if relay_args:
        conn = await asyncpg.connect(relay_args[1])
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE relay_streams IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
            await conn.close()
    else:
        lite = sqlite3.connect(data_dir / "relay.sqlite3", isolation_level=None)
        lite.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            lite.rollback()
            lite.close()


def _start_append(port: int) -> socket.socket:
    """Send an append and return once the relay has routed it (its ``100 Continue``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/stream/locked HTTP/1.1\r\nHost: relay\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    seen = b""
    while b"\r\n\r\n" not in seen:
        chunk = sock.recv(1024)
        assert chunk, "the relay closed the connection"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 100"), seen
    sock.sendall(b"hello")
    return sock


@both_stores
async def test_second_signal_exits_at_once_while_a_stop_waits(
    tmp_path: Path, relay_args: tuple[str, ...]
) -> None:
    """The first SIGTERM waits for an append stuck on a database lock; the second does not."""
    relay = RelayProcess(tmp_path / "data", *relay_args)
    relay.start()
    assert relay.proc is not None
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.put(
                f"{relay.url}/v1/stream/locked", headers={"Content-Type": "text/plain"}
            ) as r,
        ):
            assert r.status == 201
        async with _database_locked(relay_args, tmp_path / "data"):
            stuck = await asyncio.to_thread(_start_append, relay.port)
            try:
                relay.proc.send_signal(signal.SIGTERM)
                # The stop has begun once the listener is gone.
                await wait_for(lambda: not listening(relay.port), interval=0.02)
                assert relay.proc.poll() is None, "the stop did not wait for the stuck append"
                # A sleep: only time apart on the real clock makes it a second stop, not the
                # first delivered twice.
                await asyncio.sleep(2 * REPEAT_WINDOW)
                started = time.monotonic()
                relay.proc.send_signal(signal.SIGTERM)
                code, elapsed = await _exit_code(relay, started)
                assert code != 0
                assert elapsed < 2.0
            finally:
                stuck.close()
    finally:
        relay.stop()


def test_one_stop_delivered_twice_at_once_is_still_graceful(tmp_path: Path) -> None:
    """``timeout``, and wrappers that signal both a process and its group, deliver one stop
    twice within microseconds: that is not a second stop, and must not skip the graceful one."""
    relay = RelayProcess(tmp_path / "data")
    relay.start()
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(timeout=EXIT_BOUND) == 0  # a graceful stop exits 0, os._exit 143


def test_a_stop_past_its_deadline_exits_the_process() -> None:
    """Whatever a stop hangs on, the process ends once ``stop_seconds`` have passed (here a
    stop that never returns, as the event loop of a stuck process would not)."""
    code = "import time; from relay.cli import _stop_deadline; _stop_deadline(0.2); time.sleep(30)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20)
    assert done.returncode == 1
    assert b"stop did not finish in time" in done.stdout + done.stderr


def test_the_stop_deadline_leaves_room_for_every_bounded_step() -> None:
    config = Config(shutdown_timeout=7.0, db_timeout=3.0)
    assert stop_seconds(config) > DRAIN_SECONDS + 7.0 + 2 * 3.0
