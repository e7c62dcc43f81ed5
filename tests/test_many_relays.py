"""Several relay processes on one Postgres database behave as one server.

Offsets never collide, producer fencing holds across processes, and a reader parked at one relay
is woken by an append through another (LISTEN/NOTIFY; the long-poll timeout here is long, so a
204 would mean the wake-up was missed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from protocol.offsets import parse_offset
from tests.relay_process import RelayProcess, parked_at

TEXT = {"Content-Type": "text/plain"}


@contextlib.contextmanager
def relay_pair(tmp_path: Path, *database: str) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    """Two started relays on the database that the ``database`` flags name."""
    pair = tuple(
        RelayProcess(tmp_path / name, *database, "--long-poll-timeout", "20") for name in "ab"
    )
    try:
        for relay in pair:
            relay.start()
        yield pair[0], pair[1]
    finally:
        for relay in pair:
            relay.stop()


@pytest.fixture
def relays(pg_url: str, tmp_path: Path) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    with relay_pair(tmp_path, "--database-url", pg_url) as pair:
        yield pair


async def test_a_long_poll_at_one_relay_wakes_on_an_append_through_another(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = relays
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{a.url}/v1/stream/chat", headers=TEXT) as created:
            tail = created.headers["Stream-Next-Offset"]
        waiting = asyncio.create_task(
            http.get(f"{b.url}/v1/stream/chat", params={"offset": tail, "live": "long-poll"})
        )
        await parked_at(b.url, 1)  # else the POST may land first and the read is a catch-up
        async with http.post(f"{a.url}/v1/stream/chat", data=b"hi from a", headers=TEXT) as r:
            assert r.status == 204
        response = await asyncio.wait_for(waiting, 15)
        assert response.status == 200
        assert await response.read() == b"hi from a"


async def test_sse_at_one_relay_streams_appends_and_the_close_made_through_another(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = relays
    async with aiohttp.ClientSession() as http:
        await http.put(f"{a.url}/v1/stream/sse", headers=TEXT)

        async def read_all() -> bytes:
            async with http.get(
                f"{b.url}/v1/stream/sse", params={"offset": "-1", "live": "sse"}
            ) as response:
                body = b""
                async for line in response.content:
                    body += line
                    if b'"streamClosed":true' in line:
                        return body
            return body

        reader = asyncio.create_task(read_all())
        await parked_at(b.url, 1)
        for word in (b"one ", b"two ", b"three"):
            await http.post(f"{a.url}/v1/stream/sse", data=word, headers=TEXT)
        await http.post(f"{a.url}/v1/stream/sse", headers={**TEXT, "Stream-Closed": "true"})
        events = await asyncio.wait_for(reader, 15)
        data = b"".join(
            line[5:].strip() + b" "
            for line in events.splitlines()
            if line.startswith(b"data:") and not line.startswith(b"data:{")
        )
        assert data.split() == [b"one", b"two", b"three"]
        assert b'"streamClosed":true' in events


async def test_concurrent_appends_through_both_relays_never_collide(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = relays
    record = 16
    async with aiohttp.ClientSession() as http:
        await http.put(f"{a.url}/v1/stream/shared", headers=TEXT)

        async def write(relay: RelayProcess, i: int) -> tuple[int, bytes]:
            body = f"{relay.port % 100:02d}-{i:012d}|".encode()
            assert len(body) == record
            async with http.post(f"{relay.url}/v1/stream/shared", data=body, headers=TEXT) as r:
                assert r.status == 204
                return parse_offset(r.headers["Stream-Next-Offset"]), body

        acks = await asyncio.gather(*(write(relay, i) for i in range(100) for relay in (a, b)))
        async with http.get(f"{b.url}/v1/stream/shared", params={"offset": "-1"}) as r:
            stored = await r.read()
    ends = [end for end, _ in acks]
    assert len(set(ends)) == len(ends) == 200
    assert len(stored) == 200 * record
    for end, body in acks:
        assert stored[end - record : end] == body


async def test_producer_fencing_holds_across_relays(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = relays

    def producer(epoch: int, seq: int) -> dict[str, str]:
        return {
            **TEXT,
            "Producer-Id": "llm",
            "Producer-Epoch": str(epoch),
            "Producer-Seq": str(seq),
        }

    async with aiohttp.ClientSession() as http:
        url = "/v1/stream/fenced"
        await http.put(a.url + url, headers=TEXT)
        async with http.post(a.url + url, data=b"old", headers=producer(0, 0)) as r:
            assert r.status == 200
        async with http.post(b.url + url, data=b"new", headers=producer(1, 0)) as r:
            assert r.status == 200
        async with http.post(a.url + url, data=b"zombie", headers=producer(0, 1)) as r:
            assert r.status == 403
            assert r.headers["Producer-Epoch"] == "1"
        async with http.post(a.url + url, data=b"new", headers=producer(1, 0)) as r:
            assert r.status == 204  # the retry through the other relay is a duplicate
        async with http.get(a.url + url, params={"offset": "-1"}) as r:
            assert await r.read() == b"oldnew"


async def test_a_delete_through_one_relay_ends_readers_parked_at_another(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = relays
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{a.url}/v1/stream/gone", headers=TEXT) as created:
            tail = created.headers["Stream-Next-Offset"]
        params = {"offset": tail, "live": "long-poll"}
        poll = asyncio.create_task(http.get(f"{b.url}/v1/stream/gone", params=params))
        sse = await http.get(f"{b.url}/v1/stream/gone", params={"offset": tail, "live": "sse"})
        await parked_at(b.url, 2)
        async with http.delete(f"{a.url}/v1/stream/gone") as deleted:
            assert deleted.status == 204
        # Well inside the 20 s long-poll timeout: a 204 would mean the delete woke no one.
        assert (await asyncio.wait_for(poll, 10)).status == 404
        await asyncio.wait_for(sse.read(), 10)


async def test_expiry_ends_readers_parked_at_every_relay(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = relays
    async with aiohttp.ClientSession() as http:
        headers = {**TEXT, "Stream-TTL": "1"}
        async with http.put(f"{a.url}/v1/stream/brief", headers=headers) as created:
            tail = created.headers["Stream-Next-Offset"]
        params = {"offset": tail, "live": "long-poll"}
        polls = [
            asyncio.create_task(http.get(f"{relay.url}/v1/stream/brief", params=params))
            for relay in (a, b)
        ]
        await parked_at(a.url, 1)
        await parked_at(b.url, 1)
        responses = await asyncio.wait_for(asyncio.gather(*polls), 10)
        assert [r.status for r in responses] == [404, 404]


async def test_a_long_poll_right_after_another_relays_ack_always_gets_the_write(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    """Read-your-writes across relays for live readers: relay B may park a reader on what it
    already knows, but a write acknowledged by A must reach it (here or via NOTIFY), never a
    20 s timeout."""
    a, b = relays
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{a.url}/v1/stream/ryw", headers=TEXT) as created:
            offset = created.headers["Stream-Next-Offset"]
        for i in range(20):
            async with http.get(f"{b.url}/v1/stream/ryw", params={"offset": offset}) as seen:
                assert seen.headers["Stream-Next-Offset"] == offset  # B knows this tail
            body = f"<{i}>".encode()
            async with http.post(f"{a.url}/v1/stream/ryw", data=body, headers=TEXT) as r:
                assert r.status == 204
            params = {"offset": offset, "live": "long-poll"}
            async with asyncio.timeout(10):
                async with http.get(f"{b.url}/v1/stream/ryw", params=params) as response:
                    assert response.status == 200
                    assert await response.read() == body
                    offset = response.headers["Stream-Next-Offset"]


async def test_catch_up_reads_and_heads_right_after_another_relays_ack_see_it(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    """Relay B answers HEAD and catch-up reads from what it knows, warm from earlier reads;
    every write, delete and re-create acknowledged by A is in B's very next answer."""
    a, b = relays
    url_a, url_b = f"{a.url}/v1/stream/warm", f"{b.url}/v1/stream/warm"
    async with aiohttp.ClientSession() as http:
        async with http.put(url_a, headers=TEXT) as created:
            assert created.status == 201
        written = b""
        for i in range(30):
            body = f"<{i}>".encode()
            async with http.post(url_a, data=body, headers=TEXT) as r:
                acked = r.headers["Stream-Next-Offset"]
            written += body
            async with http.head(url_b) as head:
                assert head.headers["Stream-Next-Offset"] == acked
            async with http.get(url_b, params={"offset": "-1"}) as read:
                assert await read.read() == written
        async with http.delete(url_a) as deleted:
            assert deleted.status == 204
        async with http.head(url_b) as head:
            assert head.status == 404
        async with http.put(url_a, headers={"Content-Type": "application/json"}) as again:
            assert again.status == 201
        async with http.head(url_b) as head:
            assert head.status == 200
            assert head.headers["Content-Type"] == "application/json"


async def test_a_successor_named_through_one_relay_is_linked_by_the_other_at_once(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    """Relay B has the open stream cached; A's close names a successor; B's next read says so."""
    a, b = relays
    old, new = "/v1/stream/draft-1", "/v1/stream/draft-2"
    async with aiohttp.ClientSession() as http:
        for path in (old, new):
            async with http.put(f"{a.url}{path}", headers=TEXT) as created:
                assert created.status == 201
        async with http.head(f"{b.url}{old}") as warm:
            assert "Link" not in warm.headers
        closing = {**TEXT, "Stream-Closed": "true", "Stream-Successor": new}
        async with http.post(f"{a.url}{old}", headers=closing) as closed:
            assert closed.status == 204
        async with http.head(f"{b.url}{old}") as head:
            assert head.headers["Link"] == f'<{new}>; rel="successor-version"'
            assert head.headers["Stream-Closed"] == "true"


async def test_a_horizon_advanced_through_one_relay_holds_at_the_other_at_once(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    a, b = relays
    url_a, url_b = f"{a.url}/v1/stream/kept", f"{b.url}/v1/stream/kept"
    async with aiohttp.ClientSession() as http:
        async with http.put(url_a, headers=TEXT) as created:
            assert created.status == 201
        for part in (b"old-", b"new"):
            async with http.post(url_a, data=part, headers=TEXT) as r:
                assert r.status == 204
        async with http.get(url_b, params={"offset": "-1"}) as warm:  # B knows the stream
            assert await warm.read() == b"old-new"
        horizon = "0000000000000000_0000000000000004"
        async with http.put(url_a, headers={"Stream-Retain-From": horizon}) as r:
            assert r.status == 200
        async with http.get(url_b, params={"offset": "-1"}) as read:
            assert await read.read() == b"new"
        async with http.get(url_b, params={"offset": "0000000000000000_0000000000000000"}) as r:
            assert r.status == 410 and r.headers["Stream-Retained-From"] == horizon


async def test_a_compaction_through_one_relay_holds_at_the_other_and_wakes_its_readers(
    relays: tuple[RelayProcess, RelayProcess],
) -> None:
    """Relay A folds a State Protocol stream; relay B, which had it cached and a reader parked
    at its tail, answers from the new horizon at once and wakes that reader with the snapshot."""
    a, b = relays
    url_a, url_b = f"{a.url}/v1/stream/state", f"{b.url}/v1/stream/state"
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        assert (await http.put(url_a, headers=json_type)).status == 201
        for n in range(5):
            op = "insert" if n == 0 else "update"
            change = {"type": "row", "key": "1", "value": {"n": n}, "headers": {"operation": op}}
            async with http.post(url_a, json=change) as r:
                assert r.status == 204
        async with http.get(url_b, params={"offset": "-1"}) as warm:  # B knows the stream
            assert len(await warm.json()) == 5
            tail = warm.headers["Stream-Next-Offset"]
        waiting = asyncio.create_task(http.get(url_b, params={"offset": tail, "live": "long-poll"}))
        await parked_at(b.url, 1)
        async with http.put(url_a, headers={"Stream-Compact": "state"}) as r:
            assert r.status == 200
            horizon = r.headers["Stream-Retained-From"]
        woken = await asyncio.wait_for(waiting, 15)
        assert woken.status == 200
        assert (await woken.json())[0]["headers"] == {"control": "snapshot-start"}
        async with http.get(url_b, params={"offset": "-1"}) as late:
            messages = await late.json()
        assert [m.get("value") for m in messages] == [None, {"n": 4}, None]
        async with http.get(url_b, params={"offset": "0000000000000000_0000000000000000"}) as r:
            assert r.status == 410 and r.headers["Stream-Retained-From"] == horizon
