"""Isolation over HTTP, on every store: a stream's bytes reach only its own readers, a removed
stream's readers learn it at once, and one malformed request never fails another.

Time is a fake clock the test moves, so expiry happens exactly when the test says.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import pytest
from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient

from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT
from relay.hub import Hub
from tests.raw_http import raw_request
from tests.serving import AppClient
from tests.stores import Backend, backend
from tests.waits import wait_for

__all__ = ["backend"]

TEXT = {"Content-Type": "text/plain"}
START = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Relay:
    client: AppClient
    clock: FakeClock
    hub: Hub
    port: int

    async def parked(self, count: int) -> None:
        """Wait until ``count`` readers are parked in the hub (not a guess with a sleep)."""
        await wait_for(lambda: self.hub.parked_readers >= count, interval=0.005)


@pytest.fixture
async def relay(backend: Backend, aiohttp_client: AiohttpClient) -> Relay:
    config = Config(
        data_dir=str(backend.data_dir),
        database_url=backend.url or "",
        long_poll_timeout=30,
        sse_reconnect_interval=30,
        reap_interval=0.02,
    )
    app = make_app(config)
    clock = FakeClock()
    app[CONTEXT].clock = clock
    client = await aiohttp_client(app)
    assert client.port is not None
    return Relay(client, clock, app[CONTEXT].hub, client.port)


async def put(relay: Relay, path: str, **headers: str) -> ClientResponse:
    response = await relay.client.put(f"/v1/stream/{path}", headers={**TEXT, **headers})
    assert response.status == 201, await response.text()
    return response


async def post(relay: Relay, path: str, body: bytes, **headers: str) -> ClientResponse:
    return await relay.client.post(f"/v1/stream/{path}", data=body, headers={**TEXT, **headers})


async def test_a_parked_reader_of_an_expired_stream_never_gets_the_next_streams_bytes(
    relay: Relay,
) -> None:
    await put(relay, "tenant-a", **{"Stream-TTL": "1"})
    assert (await post(relay, "tenant-a", b"hello")).status == 204
    offset = "0000000000000000_0000000000000005"
    poll = asyncio.create_task(
        relay.client.get(f"/v1/stream/tenant-a?offset={offset}&live=long-poll")
    )
    await relay.parked(1)
    relay.clock.now += 5  # tenant-a expires; the reaper removes it
    response = await asyncio.wait_for(poll, 10)  # woken by the removal, not the 30 s timeout
    body = await response.read()
    await put(relay, "tenant-b")
    assert (await post(relay, "tenant-b", b"secret of b")).status == 204
    assert response.status == 404
    assert b"secret" not in body


async def test_delete_wakes_parked_long_poll_and_sse_readers(relay: Relay) -> None:
    await put(relay, "doomed")
    await post(relay, "doomed", b"abc")
    tail = "0000000000000000_0000000000000003"
    poll = asyncio.create_task(relay.client.get(f"/v1/stream/doomed?offset={tail}&live=long-poll"))
    sse = await relay.client.get(f"/v1/stream/doomed?offset={tail}&live=sse")
    await relay.parked(2)
    assert (await relay.client.delete("/v1/stream/doomed")).status == 204
    assert (await asyncio.wait_for(poll, 10)).status == 404
    await asyncio.wait_for(sse.read(), 10)  # the event stream ends instead of idling on


async def test_a_soft_deleted_source_answers_its_parked_readers_410(relay: Relay) -> None:
    await put(relay, "source")
    await post(relay, "source", b"abc")
    await put(relay, "fork", **{"Stream-Forked-From": "/v1/stream/source"})
    tail = "0000000000000000_0000000000000003"
    poll = asyncio.create_task(relay.client.get(f"/v1/stream/source?offset={tail}&live=long-poll"))
    await relay.parked(1)
    assert (await relay.client.delete("/v1/stream/source")).status == 204
    assert (await asyncio.wait_for(poll, 10)).status == 410


async def test_a_replaced_expired_stream_wakes_its_readers(relay: Relay) -> None:
    await put(relay, "short", **{"Stream-TTL": "1"})
    poll = asyncio.create_task(relay.client.get("/v1/stream/short?offset=-1&live=long-poll"))
    await relay.parked(1)
    relay.clock.now += 5
    response = await asyncio.wait_for(poll, 10)
    assert response.status == 404
    await put(relay, "short")  # the path is free again, as a new stream
    assert (await post(relay, "short", b"new")).status == 204


BAD_HEADERS = [
    (
        "producer-id-not-utf8",
        {"Producer-Id": "caf\xe9", "Producer-Epoch": "0", "Producer-Seq": "0"},
    ),
    ("stream-seq-not-utf8", {"Stream-Seq": "caf\xe9"}),
    (
        "producer-id-4k",
        {"Producer-Id": os.urandom(2048).hex(), "Producer-Epoch": "0", "Producer-Seq": "0"},
    ),
    ("stream-seq-4k", {"Stream-Seq": "s" * 4096}),
    ("content-type-not-utf8", {"Content-Type": "text/pl\xe9in"}),
]


@pytest.mark.parametrize(("name", "headers"), BAD_HEADERS, ids=[n for n, _ in BAD_HEADERS])
async def test_malformed_headers_get_400_and_never_fail_the_appends_beside_them(
    relay: Relay, name: str, headers: dict[str, str]
) -> None:
    paths = [f"good-{i}" for i in range(40)]
    for path in [*paths, "target"]:
        await put(relay, path)
    for _round in range(3):
        bad = raw_request(relay.port, "POST", "/v1/stream/target", {**TEXT, **headers}, b"poison")
        good = asyncio.gather(*(post(relay, path, b"token") for path in paths))
        bad_answer, good_answers = await asyncio.gather(bad, good)
        assert bad_answer.status == 400, bad_answer.body
        assert [r.status for r in good_answers] == [204] * len(paths)
    for path in paths:
        assert await (await relay.client.get(f"/v1/stream/{path}?offset=-1")).read() == b"token" * 3
    assert await (await relay.client.get("/v1/stream/target?offset=-1")).read() == b""


@pytest.mark.parametrize("live", ["", "&live=long-poll", "&live=sse"])
async def test_a_json_read_from_inside_a_message_is_refused(relay: Relay, live: str) -> None:
    """Offsets Relay returns fall between messages; one inside a message would yield half of
    it, which no JSON reader can parse."""
    response = await relay.client.put(
        "/v1/stream/msgs", data=b'[{"a":1},{"b":2}]', headers={"Content-Type": "application/json"}
    )
    assert response.status == 201
    inside = "0000000000000000_0000000000000003"  # within {"a":1}
    answer = await relay.client.get(f"/v1/stream/msgs?offset={inside}{live}")
    assert answer.status == 400
    boundary = "0000000000000000_0000000000000008"  # after {"a":1}\n
    if not live:
        whole = await relay.client.get(f"/v1/stream/msgs?offset={boundary}")
        assert whole.status == 200
        assert await whole.json() == [{"b": 2}]
