"""Parked live readers held off aiohttp's hands (``relay/http/parked.py``), over real sockets:
what they answer, that their connection stays usable, what they hold while they wait (no task,
no aiohttp handler, one deadline tick), and what happens around them (pipelined requests, a
client that leaves, a stop, a credential that ends)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from protocol.errors import Unavailable
from relay.app import begin_shutdown, make_app
from relay.config import Config
from relay.deadlines import Deadlines
from relay.http.connections import RelayServer
from relay.http.context import CONTEXT, Context
from relay.http.parked import Parking
from tests.waits import wait_for

Start = Callable[..., Awaitable[TestServer]]
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
TAIL2 = "0000000000000000_0000000000000002"


OPENED: list[asyncio.StreamWriter] = []


async def connect(port: int) -> Conn:
    """A connection closed at the test's end (``closes``), whatever the test left open."""
    conn = await asyncio.open_connection("127.0.0.1", port)
    OPENED.append(conn[1])
    return conn


@pytest.fixture(autouse=True)
async def closes() -> AsyncIterator[None]:
    yield
    while OPENED:
        writer = OPENED.pop()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
def start(aiohttp_server: Any, tmp_path: Path) -> Start:
    async def go(**settings: Any) -> TestServer:
        server: TestServer = await aiohttp_server(
            make_app(Config(data_dir=str(tmp_path), access_log=False, **settings))
        )
        return server

    return go


async def started(start: Start, **settings: Any) -> tuple[TestServer, int]:
    """A relay with stream ``s`` holding ``ab``; the relay and its port."""
    server = await start(**settings)
    port = server.port
    assert port is not None
    await create(port)
    return server, port


def runner_server(server: TestServer) -> RelayServer:
    assert server.runner is not None
    found = server.runner.server
    assert isinstance(found, RelayServer)
    return found


def ctx_of(server: TestServer) -> Context:
    return server.app[CONTEXT]


def parking(server: TestServer) -> Parking:
    found = ctx_of(server).parking
    assert found is not None
    return found


async def send(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request with Connection: close; (status, headers, body)."""
    conn = await connect(port)
    conn[1].write(head.encode() + b"Connection: close\r\n\r\n" + body)
    return await answer(conn)


async def answer(conn: Conn) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer read off ``conn``: by Content-Length, chunks, or none (204)."""
    reader = conn[0]
    async with asyncio.timeout(30):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)}
        if "content-length" in headers:
            return status, headers, await reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readexactly(2)
            return status, headers, body
        return status, headers, b""


async def create(port: int, body: bytes = b"ab") -> None:
    status, _, _ = await send(
        port,
        "PUT /v1/stream/s HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n",
        body,
    )
    assert status == 201


async def append(port: int, data: bytes) -> None:
    status, _, _ = await send(
        port,
        "POST /v1/stream/s HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(data)}\r\n",
        data,
    )
    assert status == 204


def poll(offset: str = TAIL2, extra: str = "") -> bytes:
    target = f"/v1/stream/s?offset={offset}&live=long-poll"
    return f"GET {target} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def parked_count(server: TestServer, count: int) -> None:
    await wait_for(
        lambda: ctx_of(server).parking is not None and len(parking(server).deadlines) == count
    )


async def test_a_parked_long_poll_answers_and_its_connection_serves_the_next_request(
    start: Start,
) -> None:
    server, port = await started(start)
    conn = await connect(port)
    conn[1].write(poll(extra="Origin: https://app.example\r\nX-Request-Id: poll-1\r\n"))
    await parked_count(server, 1)
    await append(port, b"cd")
    status, headers, body = await answer(conn)
    assert (status, body) == (200, b"cd")
    assert headers["stream-next-offset"] == "0000000000000000_0000000000000004"
    assert headers["x-request-id"] == "poll-1"
    assert headers["content-type"] == "text/plain"
    assert "stream-cursor" in headers and "etag" in headers and "date" in headers
    assert headers["access-control-allow-origin"] == "*"
    assert ctx_of(server).limits.readers == 0
    # The same connection: a catch-up read, then a poll that parks again and times out.
    conn[1].write(b"GET /v1/stream/s?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await answer(conn))[::2] == (200, b"abcd")
    conn[1].close()


async def test_a_parked_long_poll_times_out_with_204_at_its_deadline(start: Start) -> None:
    server, port = await started(start, long_poll_timeout=0.5)
    conn = await connect(port)
    conn[1].write(poll())
    status, headers, body = await answer(conn)
    assert (status, body) == (204, b"")
    assert headers["stream-next-offset"] == TAIL2 and headers["stream-up-to-date"] == "true"
    assert "content-length" not in headers
    assert len(parking(server).deadlines) == 0 and ctx_of(server).limits.readers == 0
    conn[1].close()


async def test_parked_readers_hold_no_task_and_no_aiohttp_handler(start: Start) -> None:
    """The design's bound: a parked reader is an object and a deadline entry, so tasks,
    aiohttp's connection handlers and loop timers do not grow with parked readers."""
    server, port = await started(start)
    tasks_before = len(asyncio.all_tasks())
    readers = 200
    conns = [await connect(port) for _ in range(readers)]
    for i, conn in enumerate(conns):
        conn[1].write(poll() if i % 2 else sse_request())
    await parked_count(server, readers)
    # aiohttp's handlers end once their requests return: it holds none of the readers
    await wait_for(lambda: not runner_server(server).connections)
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before)
    # One loop timer per 50 ms tick in which readers parked (their deadlines fall in as many
    # ticks), not one per reader: a few while 200 readers connect, never 200.
    assert parking(server).deadlines.armed < 20
    assert ctx_of(server).limits.readers == readers
    await append(port, b"cd")
    for i, conn in enumerate(conns):
        if i % 2:
            assert (await answer(conn))[::2] == (200, b"cd")
        else:
            head = (await conn[0].readuntil(b"\r\n\r\n")).decode()
            assert head.startswith("HTTP/1.1 200") and "chunked" in head.lower()
            assert b"data:cd" in await read_until(conn, b"data:cd")
        conn[1].close()
    await wait_for(lambda: ctx_of(server).limits.readers == 0)


async def test_a_reader_that_leaves_while_parked_frees_its_slot_and_connection(
    start: Start,
) -> None:
    server, port = await started(start)
    conn_server = runner_server(server)
    conns = [await connect(port) for _ in range(5)]
    for conn in conns:
        conn[1].write(poll())
    await parked_count(server, 5)
    open_before = conn_server.open
    for conn in conns:
        conn[1].close()
    await wait_for(lambda: ctx_of(server).limits.readers == 0)
    await wait_for(lambda: conn_server.open == open_before - 5)
    assert ctx_of(server).hub.parked_readers == 0
    await append(port, b"cd")  # wakes nobody, breaks nothing
    assert (await send(port, "GET /v1/stream/s?offset=-1 HTTP/1.1\r\nHost: t\r\n"))[2] == b"abcd"


async def test_a_request_pipelined_behind_a_parked_poll_is_answered_after_it(
    start: Start,
) -> None:
    server, port = await started(start)
    conn = await connect(port)
    conn[1].write(poll())
    await parked_count(server, 1)
    conn[1].write(b"GET /v1/stream/s?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0.1)  # the pipelined request reaches the parked connection first
    await append(port, b"cd")
    assert (await answer(conn))[::2] == (200, b"cd")
    assert (await answer(conn))[::2] == (200, b"abcd")
    conn[1].close()


async def test_a_poll_with_a_request_pipelined_in_its_packet_is_not_parked(
    start: Start,
) -> None:
    """The parser may hold part of the next request: that connection stays with aiohttp."""
    server, port = await started(start)
    conn = await connect(port)
    conn[1].write(poll() + b"GET /healthz HTTP/1.1\r\nHo")
    await wait_for(lambda: ctx_of(server).limits.readers == 1)
    assert ctx_of(server).parking is None or len(parking(server).deadlines) == 0
    conn[1].write(b"st: t\r\n\r\n")
    await append(port, b"cd")
    assert (await answer(conn))[::2] == (200, b"cd")
    assert (await answer(conn))[0] == 200
    conn[1].close()


async def test_a_stop_answers_parked_readers_and_closes_their_connections(
    start: Start,
) -> None:
    server, port = await started(start)
    polls = [await connect(port) for _ in range(3)]
    for conn in polls:
        conn[1].write(poll())
    sse = await connect(port)
    sse[1].write(sse_request())
    await parked_count(server, 4)
    begin_shutdown(server.app)
    await parking(server).drain()
    for conn in polls:
        status, headers, _ = await answer(conn)
        assert status == 204 and headers["connection"] == "close"
        assert await conn[0].read() == b""  # closed after the answer
    rest = await sse[0].read()
    assert rest.endswith(b"0\r\n\r\n")  # the SSE body ended, then the connection closed
    assert ctx_of(server).limits.readers == 0


def sse_request(offset: str = TAIL2) -> bytes:
    return f"GET /v1/stream/s?offset={offset}&live=sse HTTP/1.1\r\nHost: t\r\n\r\n".encode()


async def read_until(conn: Conn, marker: bytes) -> bytes:
    got = b""
    async with asyncio.timeout(30):
        while marker not in got:
            more = await conn[0].read(65536)
            assert more, f"closed before {marker!r}: {got!r}"
            got += more
    return got


async def test_a_parked_sse_reader_gets_each_append_then_ends_and_keeps_its_connection(
    start: Start,
) -> None:
    server, port = await started(start, sse_reconnect_interval=1.0)
    conn = await connect(port)
    conn[1].write(sse_request())
    head = await conn[0].readuntil(b"\r\n\r\n")
    assert b"200 OK" in head and b"chunked" in head.lower()
    await parked_count(server, 1)
    await append(port, b"cd")
    got = await read_until(conn, b"data:cd")
    await parked_count(server, 1)  # parked again after sending
    await append(port, b"ef")
    got += await read_until(conn, b"data:ef")
    got += await read_until(conn, b"0\r\n\r\n")  # the reconnect interval ends the body
    assert b'"streamNextOffset":"0000000000000000_0000000000000006"' in got
    assert ctx_of(server).limits.readers == 0
    conn[1].write(b"GET /v1/stream/s?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await answer(conn))[::2] == (200, b"abcdef")
    conn[1].close()


async def test_a_parked_sse_reader_that_stops_reading_is_cut_off(start: Start) -> None:
    server, port = await started(start, write_timeout=1.0, max_chunk_bytes=1024 * 1024)
    conn = await connect(port)
    conn[1].write(sse_request())
    await parked_count(server, 1)
    big = b"x" * (1024 * 1024)
    for _ in range(16):  # far more than the socket buffers take; the reader reads none
        await append(port, big)
        if ctx_of(server).limits.readers == 0:
            break
    await wait_for(lambda: ctx_of(server).limits.readers == 0)
    conn[1].close()


def test_deadlines_fire_in_order_never_early_and_can_be_discarded() -> None:
    loop = asyncio.new_event_loop()
    try:
        deadlines = Deadlines(loop, tick=0.01)
        fired: list[tuple[str, float]] = []

        class Item:
            def __init__(self, name: str, when: float) -> None:
                self.name = name
                self.when = when

            def due(self) -> None:
                fired.append((self.name, loop.time()))

        now = loop.time()
        items = [Item(n, now + d) for n, d in (("b", 0.05), ("a", 0.02), ("c", 0.08))]
        keys = {item.name: deadlines.add(item.when, item) for item in items}
        dropped = Item("dropped", now + 0.03)
        deadlines.discard(deadlines.add(dropped.when, dropped), dropped)
        assert len(deadlines) == 3
        loop.run_until_complete(asyncio.sleep(0.2))
        assert [name for name, _ in fired] == ["a", "b", "c"]
        for item in items:
            at = dict(fired)[item.name]
            assert at >= item.when - 1e-6  # the loop may run a timer a clock tick early
        assert len(deadlines) == 0 and keys["a"] < keys["b"] < keys["c"]
    finally:
        loop.close()


async def test_a_poll_that_holds_back_a_body_for_100_continue_is_not_parked(
    start: Start,
) -> None:
    """Its client may still send the body after the answer: that connection is closed after
    it (as ``Front`` does), so it stays with aiohttp."""
    server, port = await started(start)
    conn = await connect(port)
    conn[1].write(poll(extra="Expect: 100-continue\r\n"))
    await wait_for(lambda: ctx_of(server).limits.readers == 1)
    assert ctx_of(server).parking is None or len(parking(server).deadlines) == 0
    await append(port, b"cd")
    status, headers, body = await answer(conn)
    assert (status, body, headers["connection"]) == (200, b"cd", "close")


async def test_an_sse_feed_whose_store_read_fails_after_its_head_ends_cleanly(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the 200 and its first events, an error answer would land inside the event
    stream (it did: a second ``HTTP/1.1 503`` in the body); the stream ends instead."""
    server, port = await started(start)
    ctx = ctx_of(server)
    ctx.hub.forget_held()  # the read must go to the store

    async def failing_read(*_args: object, **_kwargs: object) -> bytes:
        raise Unavailable("database unavailable: TimeoutError")

    monkeypatch.setattr(ctx.store, "read", failing_read)
    conn = await connect(port)
    conn[1].write(sse_request(offset="-1"))
    rest = await read_until(conn, b"\r\n0\r\n\r\n")  # the body's last chunk
    head, _, body = rest.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"HTTP/1.1" not in body
