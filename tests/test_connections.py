"""Hostile and idle connections, over real sockets: silent ones, ones that send their request
head a byte at a time, idle keep-alives and more connections than the cap. Each is closed by
its deadline while ordinary requests beside them are answered and parked live readers stay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT
from tests.raw_http import raw_request
from tests.waits import eventually, wait_for

SILENT = 300
SLOW = 100
HEALTH = "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"

Start = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def start(aiohttp_server: Any, tmp_path: Path) -> Start:
    async def go(**settings: Any) -> TestServer:
        server: TestServer = await aiohttp_server(
            make_app(Config(data_dir=str(tmp_path), **settings))
        )
        return server

    return go


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def connections(port: int, count: int) -> AsyncIterator[list[Conn]]:
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    try:
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    async with asyncio.timeout(30):
        return await reader.read()


async def slowloris(conn: Conn, head: str) -> bytes:
    """Send ``head`` a byte at a time until the server closes the connection; what it sent.
    Reading runs beside the writing, so the answer is read before a write could fail."""
    reader, writer = conn
    answer = asyncio.create_task(until_closed(reader))
    with contextlib.suppress(ConnectionError):
        for byte in head.encode():
            if answer.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)  # the point: a client this slow
    return await answer


async def health(port: int) -> int:
    return (await raw_request(port, "GET", "/healthz")).status


async def answered(port: int) -> bool:
    return await health(port) == 200


async def test_silent_and_slow_connections_are_closed_and_others_answered(start: Start) -> None:
    server = await start(first_request_timeout=1, header_timeout=1)
    port = server.port
    assert port is not None
    async with connections(port, SILENT) as silent, connections(port, SLOW) as slow:
        trickling = [asyncio.create_task(slowloris(conn, HEALTH + "X" * 1000)) for conn in slow]
        answered = [await health(port) for _ in range(20)]  # beside them, meanwhile
        assert answered == [200] * 20
        assert await asyncio.gather(*(until_closed(r) for r, _ in silent)) == [b""] * SILENT
        cut = await asyncio.gather(*trickling)
        # A slow head is told why (408); a silent connection is just closed.
        assert all(answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for answer in cut)
    assert await health(port) == 200


async def test_a_request_head_is_timed_from_its_first_byte(start: Start) -> None:
    """On a connection that has served a request, the next head gets --header-timeout from
    its first byte, however long the connection idled before it, and however long the first
    request was given (a deadline later than 30 s fails the read)."""
    server = await start(first_request_timeout=120, header_timeout=0.5, idle_timeout=120)
    port = server.port
    assert port is not None
    async with connections(port, 1) as [(reader, writer)]:
        writer.write(HEALTH.encode())
        first = await reader.readuntil(b'"ok"}')
        assert first.startswith(b"HTTP/1.1 200 ")
        assert (await slowloris((reader, writer), HEALTH + "X" * 1000)).startswith(b"HTTP/1.1 408 ")


async def test_an_idle_keep_alive_connection_is_closed(start: Start) -> None:
    server = await start(idle_timeout=0.5)
    port = server.port
    assert port is not None
    async with connections(port, 1) as [(reader, writer)]:
        writer.write(HEALTH.encode())
        assert (await reader.readuntil(b'"ok"}')).startswith(b"HTTP/1.1 200 ")
        assert await until_closed(reader) == b""  # closed after the answer, nothing more said


async def test_parked_readers_outlive_every_connection_deadline(start: Start) -> None:
    server = await start(
        first_request_timeout=0.5, header_timeout=0.5, idle_timeout=0.5, long_poll_timeout=60
    )
    port = server.port
    assert port is not None
    base = f"http://127.0.0.1:{port}/v1/stream/room"
    async with aiohttp.ClientSession() as session:
        put = await session.put(base, headers={"Content-Type": "text/plain"})
        tail = put.headers["Stream-Next-Offset"]
        poll = asyncio.create_task(session.get(base, params={"offset": tail, "live": "long-poll"}))
        sse = await session.get(base, params={"offset": tail, "live": "sse"})
        hub = server.app[CONTEXT].hub
        await wait_for(lambda: hub.parked_readers == 2)
        # Connections opened after the readers parked: once their deadlines have closed them,
        # the readers have been parked longer than any deadline.
        async with connections(port, 20) as silent:
            await asyncio.gather(*(until_closed(r) for r, _ in silent))
        assert hub.parked_readers == 2
        await session.post(base, data=b"hello", headers={"Content-Type": "text/plain"})
        woken = await poll
        assert (woken.status, await woken.read()) == (200, b"hello")
        async with asyncio.timeout(10):
            while b"data:hello" not in await sse.content.readline():
                pass
        sse.close()


async def test_past_the_cap_new_connections_get_503_and_are_closed(start: Start) -> None:
    server = await start(max_connections=50, first_request_timeout=30)
    port = server.port
    assert port is not None
    async with connections(port, 50) as held:
        refused = await raw_request(port, "GET", "/healthz", {"Connection": "keep-alive"})
        assert refused.status == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        assert refused.error_code() == "unavailable"
        for _, writer in held[:10]:
            writer.close()
        await eventually(lambda: answered(port), what="a connection under the cap again")
        for reader, writer in held[10:]:  # those under the cap are served as ever
            writer.write(HEALTH.encode())
            assert (await reader.readuntil(b'"ok"}')).startswith(b"HTTP/1.1 200 ")
