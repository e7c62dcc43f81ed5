"""The read path over HTTP: every chunk holds whole JSON messages, and each request does
bounded work however the stream is shaped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pytest_aiohttp import AiohttpClient

from protocol.model import StreamMeta
from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT, Context
from tests.relay_process import RelayProcess
from tests.serving import AppClient
from tests.stores import Backend, backend
from tests.waits import wait_for

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
STREAM = "/v1/stream/j"
MESSAGES = [{"n": n, "pad": "m" * (n % 7) * 5} for n in range(100)]


Serve = Callable[..., Awaitable[AppClient]]
"""Starts a relay on the test's backend with the given settings; returns its client."""


@pytest.fixture
def serve(backend: Backend, aiohttp_client: AiohttpClient) -> Serve:
    async def start(**settings: Any) -> AppClient:
        config = Config(data_dir=str(backend.data_dir), database_url=backend.url or "", **settings)
        return await aiohttp_client(make_app(config))

    return start


def ctx_of(client: AppClient) -> Context:
    return client.app[CONTEXT]


async def read_all(client: AppClient, offset: str) -> list[Any]:
    """Catch-up reads from ``offset`` to the tail; each body must be a whole JSON array."""
    out: list[Any] = []
    while True:
        response = await client.get(STREAM, params={"offset": offset})
        assert response.status == 200
        out += json.loads(await response.read())
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return out


async def test_long_poll_woken_by_many_messages_gets_whole_messages(serve: Serve) -> None:
    client = await serve(max_chunk_bytes=256)
    created = await client.put(STREAM, headers=JSON)
    tail = created.headers["Stream-Next-Offset"]
    poll = asyncio.create_task(client.get(STREAM, params={"offset": tail, "live": "long-poll"}))
    await wait_for(lambda: ctx_of(client).hub.parked_readers == 1)
    assert (await client.post(STREAM, data=orjson.dumps(MESSAGES), headers=JSON)).status == 204
    woken = await poll
    assert woken.status == 200
    first = json.loads(await woken.read())  # a cut message would not parse
    assert 0 < len(first) < len(MESSAGES)
    rest = await read_all(client, woken.headers["Stream-Next-Offset"])
    assert first + rest == MESSAGES


async def test_long_polls_woken_by_one_commit_share_one_rendered_answer(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One render per wake: a thousand readers of one chat cost their writes, not a render
    each. Each still gets its own complete answer (and its own cursor)."""
    from relay.http import chunks

    renders = 0
    render = chunks.render

    def counted(meta: StreamMeta, data: bytes) -> bytes:
        nonlocal renders
        renders += 1
        return render(meta, data)

    monkeypatch.setattr(chunks, "render", counted)
    client = await serve()
    tail = (await client.put(STREAM, headers=JSON)).headers["Stream-Next-Offset"]
    params = {"offset": tail, "live": "long-poll"}
    polls = [asyncio.create_task(client.get(STREAM, params=params)) for _ in range(20)]
    await wait_for(lambda: ctx_of(client).hub.parked_readers == 20)
    assert (await client.post(STREAM, data=b'[{"n":1}]', headers=JSON)).status == 204
    answers = await asyncio.gather(*polls)
    assert [await answer.json() for answer in answers] == [[{"n": 1}]] * 20
    assert {answer.headers["ETag"] for answer in answers} == {answers[0].headers["ETag"]}
    assert renders == 1


def sse_events(body: bytes) -> list[tuple[str, str]]:
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = "", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:])
        events.append((name, "\n".join(data)))
    return events


async def test_sse_woken_by_many_messages_sends_whole_messages(serve: Serve) -> None:
    client = await serve(max_chunk_bytes=256)
    created = await client.put(STREAM, headers=JSON)
    tail = created.headers["Stream-Next-Offset"]
    response = await client.get(STREAM, params={"offset": tail, "live": "sse"})
    await wait_for(lambda: ctx_of(client).hub.parked_readers == 1)
    assert (await client.post(STREAM, data=orjson.dumps(MESSAGES), headers=JSON)).status == 204
    closed = await client.post(STREAM, headers={**JSON, "Stream-Closed": "true"})
    assert closed.status == 204
    body = await asyncio.wait_for(response.read(), 10)  # the close ends the stream
    received: list[Any] = []
    data_events = 0
    for name, data in sse_events(body):
        if name == "data":
            received += json.loads(data)  # a cut message would not parse
            data_events += 1
    assert data_events > 1
    assert received == MESSAGES


async def test_a_message_over_the_chunk_limit_is_read_in_bounded_windows(
    serve: Serve,
) -> None:
    """Finding the end of one big message must not read the whole rest of the stream."""
    limit = 1024
    big = {"big": "b" * 3000}
    client = await serve(max_chunk_bytes=limit)
    await client.put(STREAM, headers=JSON, data=orjson.dumps([big]))
    after = [{"n": n} for n in range(20_000)]  # ~200 KB behind the big message
    assert (await client.post(STREAM, data=orjson.dumps(after), headers=JSON)).status == 204
    store = ctx_of(client).store
    reads: list[tuple[int, int]] = []
    original: Callable[[StreamMeta, int, int], Awaitable[bytes]] = store.read

    async def recording(meta: StreamMeta, start: int, end: int) -> bytes:
        reads.append((start, end))
        return await original(meta, start, end)

    store.read = recording  # type: ignore[method-assign]
    response = await client.get(STREAM, params={"offset": "-1"})
    assert json.loads(await response.read()) == [big]
    big_size = len(orjson.dumps(big)) + 1
    assert max(end for _, end in reads) <= big_size + limit
    assert sum(end - start for start, end in reads) <= big_size + limit


async def test_an_sse_reader_that_stops_reading_is_dropped_and_its_slot_freed(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    config = Config(data_dir=str(tmp_path), write_timeout=0.3)
    client = await aiohttp_client(make_app(config))
    await client.put("/v1/stream/big", headers=TEXT)
    for _ in range(16):  # far more than the kernel and transport buffers together
        await client.post("/v1/stream/big", data=b"x" * (900 << 10), headers=TEXT)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", client.port))
    try:
        request = b"GET /v1/stream/big?offset=-1&live=sse HTTP/1.1\r\nHost: t\r\n\r\n"
        await loop.sock_sendall(sock, request)  # and never read a byte
        ctx = ctx_of(client)
        await wait_for(lambda: ctx.limits.readers == 1)
        await wait_for(lambda: ctx.limits.readers == 0)
        assert ctx.hub.parked_readers == 0
    finally:
        sock.close()


async def test_sse_text_events_never_split_a_character(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """An EventSource decodes each event as UTF-8: half a character would become U+FFFD."""
    text = "héllo wörld ✓ 𝄞\r\n" * 40
    config = Config(data_dir=str(tmp_path), max_chunk_bytes=7)
    client = await aiohttp_client(make_app(config))
    await client.put(STREAM, headers={**TEXT, "Stream-Closed": "true"}, data=text.encode())
    response = await client.get(STREAM, params={"offset": "-1", "live": "sse"})
    body = await asyncio.wait_for(response.read(), 10)
    received = ""
    for event in body.split(b"\n\n"):
        if event.startswith(b"event: data"):
            lines = [line[5:] for line in event.split(b"\n") if line[:5] == b"data:"]
            values = [v[1:] if v.startswith(b" ") else v for v in lines]
            received += b"\n".join(values).decode()  # strict: a split character raises
    assert received == text.replace("\r\n", "\n")


async def test_an_sse_reader_far_behind_still_reconnects_on_the_interval(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """A slow reader catching up on a long stream must not hold one response forever: the
    response ends on the reconnect interval after a control event, and the reader resumes."""
    config = Config(data_dir=str(tmp_path), max_chunk_bytes=1024, sse_reconnect_interval=0.3)
    total = 4 * 1024 * 1024
    client = await aiohttp_client(make_app(config))
    await client.put(STREAM, headers=TEXT)
    for _ in range(total // (256 * 1024)):
        await client.post(STREAM, headers=TEXT, data=b"x" * (256 * 1024))
    response = await client.get(STREAM, params={"offset": "-1", "live": "sse"})
    body = bytearray()
    async with asyncio.timeout(30):
        while chunk := await response.content.read(4096):
            body += chunk
            await asyncio.sleep(0.002)  # a sleep: a reader slower than the relay writes
    assert body.count(b"x") < total  # ended before catching up
    assert body.rstrip().rsplit(b"\n\n", 1)[-1].startswith(b"event: control")


async def test_a_client_that_pipelines_small_reads_and_never_reads_is_dropped(
    tmp_path: Path,
) -> None:
    """Small answers go out without a write timer; once they pile up unread (pipelined GETs,
    nothing read back) the timer is armed again and the connection is cut, while other
    clients are served. A relay process of its own, so it fills the socket at full speed
    while this test does not read (in-process, the test's own loop paces it)."""
    relay = RelayProcess(tmp_path / "data", "--write-timeout", "0.3")
    relay.start()
    try:
        async with aiohttp.ClientSession(relay.url) as session:
            await session.put("/v1/stream/small", headers=TEXT)
            await session.post("/v1/stream/small", data=b"hello", headers=TEXT)
            request = b"GET /v1/stream/small?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n"
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(request)
            one = await reader.readuntil(b"hello")  # one whole answer: headers, then body
            count = 40_000  # about 30 MB of answers, far more than the buffers hold
            try:
                writer.write(request * count)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                await asyncio.sleep(2.0)  # a sleep: the write timeout runs out while we do not read
                async with session.get("/v1/stream/small", params={"offset": "-1"}) as other:
                    assert await other.text() == "hello"
                received = 0
                async with asyncio.timeout(30):
                    with contextlib.suppress(ConnectionError):
                        while chunk := await reader.read(1 << 20):  # EOF: cut off
                            received += len(chunk)
                assert received < count * len(one) // 2  # cut off long before the end
            finally:
                writer.close()
    finally:
        relay.kill()


async def test_a_catch_up_reader_that_stops_reading_is_dropped(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """A plain GET's body is sent within --write-timeout too: a client that stops reading must
    not hold its connection and a chunk of buffered bytes forever."""
    config = Config(data_dir=str(tmp_path), write_timeout=0.3, max_chunk_bytes=16 << 20)
    body = 16 * (900 << 10)
    client = await aiohttp_client(make_app(config))
    await client.put("/v1/stream/big", headers=TEXT)
    for _ in range(16):  # far more than the kernel and transport buffers together
        await client.post("/v1/stream/big", data=b"x" * (900 << 10), headers=TEXT)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"GET /v1/stream/big?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(4 * config.write_timeout)  # a sleep: not reading, past the timeout
        received = 0
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(1 << 20):  # EOF: the relay cut us off
                    received += len(chunk)
        assert received < body  # it did not wait for us to read it all
    finally:
        writer.close()
