"""A real relay at its open-file limit (RLIMIT_NOFILE soft = hard = 512, set before exec).

Under its default connection cap (the limit less ``FD_RESERVE``) a connection past the cap is
answered 503 with ``Retry-After`` while the connections it holds, a parked reader among them,
are served as ever. With ``--max-connections`` above the limit, accept() itself fails (EMFILE):
the relay must neither die nor spin, and must serve again once descriptors are free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from relay.bench.targets import process_cpu_seconds
from relay.resources import FD_RESERVE
from tests.raw_http import raw_request
from tests.relay_process import RelayProcess, live_readers
from tests.waits import eventually

LIMIT = 512
PATIENT = (
    "--log-level", "info",
    "--log-format", "json",
    "--access-log", "off",
    "--first-request-timeout", "3600",
    "--idle-timeout", "3600",
    "--long-poll-timeout", "3600",
)  # fmt: skip
"""No deadline closes a held connection or answers the parked reader during a test."""
HEALTH = "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
STREAM = "/v1/stream/room"


class Conn:
    """One keep-alive connection, asked one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next answer on the connection (a Content-Length body)."""
        async with asyncio.timeout(30):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.strip().split("\r\n")
            fields = (line.partition(":") for line in lines)
            headers = {name.strip().lower(): value.strip() for name, _, value in fields}
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def ask(self, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(head.encode() + body)
        return await self.answer()

    def close(self) -> None:
        self.writer.close()


async def connect(port: int) -> Conn:
    return Conn(*await asyncio.open_connection("127.0.0.1", port))


@contextlib.asynccontextmanager
async def limited_relay(tmp_path: Path, *extra: str) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(
        tmp_path / "data", *PATIENT, *extra, log=tmp_path / "relay.log", open_files=(LIMIT, LIMIT)
    )
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def started(relay: RelayProcess) -> dict[str, Any]:
    assert relay.log is not None
    text = relay.log.read_text()
    entries: list[dict[str, Any]] = [json.loads(x) for x in text.splitlines() if x[:1] == "{"]
    [entry] = [e for e in entries if e["event"] == "relay started"]
    return entry


async def parked_reader(relay: RelayProcess) -> Conn:
    """A long-poll reader parked at the tail of a new stream, on its own connection. Every
    request it took to get there is on a connection the relay has closed (``raw_request``)."""
    put = await raw_request(relay.port, "PUT", STREAM, {"Content-Type": "text/plain"})
    assert put.status == 201
    reader = await connect(relay.port)
    offset = put.headers["stream-next-offset"]
    reader.writer.write(
        f"GET {STREAM}?offset={offset}&live=long-poll HTTP/1.1\r\nHost: test\r\n\r\n".encode()
    )

    async def parked() -> bool:
        metrics = await raw_request(relay.port, "GET", "/metrics")
        return live_readers(metrics.body.decode()) == 1

    await eventually(parked, what="the long-poll reader parked")
    return reader


async def append(conn: Conn, body: bytes) -> int:
    head = f"POST {STREAM} HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\n"
    status, _, _ = await conn.ask(head + f"Content-Length: {len(body)}\r\n\r\n", body)
    return status


async def answered(port: int) -> bool:
    """Whether a new connection is answered 200 (not dropped: no answer parses as IndexError)."""
    with contextlib.suppress(OSError, IndexError):
        return (await raw_request(port, "GET", "/healthz")).status == 200
    return False


async def test_a_relay_logs_both_limits_and_raises_its_soft_one(tmp_path: Path) -> None:
    relay = RelayProcess(
        tmp_path / "data", *PATIENT, log=tmp_path / "relay.log", open_files=(256, LIMIT)
    )
    relay.start()
    relay.stop()
    entry = started(relay)
    assert (entry["open_files_before"], entry["open_files"], entry["open_files_hard"]) == (
        256,
        LIMIT,
        LIMIT,
    )
    assert entry["max_connections"] == LIMIT - FD_RESERVE


async def test_past_the_default_cap_a_new_connection_is_answered_503_and_readers_are_kept(
    tmp_path: Path,
) -> None:
    async with limited_relay(tmp_path) as relay:
        cap = started(relay)["max_connections"]
        assert cap == LIMIT - FD_RESERVE
        port = relay.port
        reader = await parked_reader(relay)
        held: list[Conn] = []
        try:
            while True:  # every connection under the cap is served; the first past it is not
                conn = await connect(port)
                status, headers, _ = await conn.ask(HEALTH)
                if status != 200:
                    break
                held.append(conn)
            assert len(held) + 1 == cap  # the parked reader holds the last place
            assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
            assert await conn.reader.read() == b""  # then closed, by the relay
            conn.close()
            for _ in range(5):  # answered, not reset, however many come
                refused = await raw_request(port, "GET", "/healthz", {"Connection": "keep-alive"})
                assert (refused.status, refused.error_code()) == (503, "unavailable")
                assert refused.headers["retry-after"] == "1"

            assert await append(held[0], b"hello") == 204
            assert (await reader.answer())[::2] == (200, b"hello")
            assert (await held[-1].ask(HEALTH))[0] == 200

            for conn in held[:10]:
                conn.close()
            await eventually(lambda: answered(port), what="a new connection served again")
        finally:
            reader.close()
            for conn in held:
                conn.close()


async def knock(port: int) -> Conn | None:
    """A new connection asking /healthz: the connection when answered 200, None when it is
    dropped unanswered (the relay could not take its descriptor)."""
    try:
        conn = await connect(port)
    except OSError:
        return None
    try:
        status, _, _ = await conn.ask(HEALTH)
    except (OSError, asyncio.IncompleteReadError):
        conn.close()
        return None
    assert status == 200
    return conn


async def test_out_of_descriptors_the_relay_neither_dies_nor_spins_and_serves_again(
    tmp_path: Path,
) -> None:
    async with limited_relay(tmp_path, "--max-connections", "100000") as relay:
        assert relay.proc is not None
        assert started(relay)["max_connections"] == 100_000
        port = relay.port
        reader = await parked_reader(relay)
        writer = await connect(port)
        held: list[Conn | None] = []
        try:
            assert (await writer.ask(HEALTH))[0] == 200
            held = list(await asyncio.gather(*(knock(port) for _ in range(LIMIT + 100))))
            served = [conn for conn in held if conn is not None]
            assert 0 < len(served) < LIMIT  # the rest found no descriptor left

            # At the limit, with more clients knocking meanwhile: its CPU over an interval
            # (not a wait for a state; a spinning accept loop would take all of it).
            cpu, wall = process_cpu_seconds(relay.proc.pid), time.monotonic()
            more = await asyncio.gather(*(knock(port) for _ in range(100)))
            await asyncio.sleep(2.0)
            used = process_cpu_seconds(relay.proc.pid) - cpu
            assert used < 0.5 * (time.monotonic() - wall)
            assert relay.proc.poll() is None
            held += more

            assert await append(writer, b"hello") == 204  # what it holds is served as ever
            assert (await reader.answer())[::2] == (200, b"hello")

            for conn in held:
                if conn is not None:
                    conn.close()
            await eventually(lambda: answered(port), what="a new connection served again")
            assert relay.proc.poll() is None
        finally:
            reader.close()
            writer.close()
            for conn in held:
                if conn is not None:
                    conn.close()
