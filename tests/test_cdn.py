"""Relay behind real nginx running the shipped deploy/nginx/relay.conf (a one-node CDN).

What reaches Relay is counted from nginx's own access log (one line per request, with the
upstream address, "-" when the cache answered), so no count here depends on Relay's metrics
(only the waits for parked readers read its gauge).
Shown: identical concurrent catch-up reads and long-polls reach Relay once and every waiter
gets the answer; nothing is served past the lifetime Relay's Cache-Control gives it; HEAD,
offset=now and SSE are never answered from the cache; and a cached body is never given to a
request with another Authorization value, or with none.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from backports import zstd

from tests.nginx_proxy import Edge, N, Nginx, call, crowd, target
from tests.relay_process import RelayProcess, parked_at

LONG_POLL_TIMEOUT = 6  # past nginx's default lock age (5 s): the deploy file's own bounds must hold
CHUNK = 1024
TEXT = {"Content-Type": "text/plain"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    root = tmp_path_factory.mktemp("cdn")
    relay = RelayProcess(
        root / "data",
        "--long-poll-timeout",
        str(LONG_POLL_TIMEOUT),
        "--max-chunk-bytes",
        str(CHUNK),
    )
    relay.start()
    (root / "nginx").mkdir()
    nginx = Nginx(root / "nginx", relay.port)
    try:
        nginx.start()
        yield Edge(relay, nginx)
    finally:
        nginx.stop()
        relay.stop()


async def make_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> str:
    """Create a text stream; returns its tail offset."""
    created = await call(session, "PUT", url, {**TEXT, **(headers or {})}, body)
    assert created.status == 201, created.body
    return created.headers["Stream-Next-Offset"]


async def test_identical_catch_up_reads_reach_relay_once(edge: Edge) -> None:
    url = edge.stream("catch-up")
    async with aiohttp.ClientSession() as session:
        await make_stream(session, url, b"a" * (3 * CHUNK))
        first = f"{url}?offset=-1"
        replies = await crowd(session, first)
        assert {r.status for r in replies} == {200}
        assert {r.body for r in replies} == {b"a" * CHUNK}
        assert {r.headers["ETag"] for r in replies} == {replies[0].headers["ETag"]}
        assert edge.upstream_count(target(first), N) == 1

        middle = f"{url}?offset={replies[0].headers['Stream-Next-Offset']}"
        replies = await crowd(session, middle)
        assert {r.body for r in replies} == {b"a" * CHUNK}
        assert edge.upstream_count(target(middle), N) == 1


async def test_a_closed_streams_final_read_is_collapsed_and_cached(edge: Edge) -> None:
    url = edge.stream("closed")
    async with aiohttp.ClientSession() as session:
        tail = await make_stream(session, url, b"done", {"Stream-Closed": "true"})
        eof = f"{url}?offset={tail}"
        replies = await crowd(session, eof)
        assert {(r.status, r.body, r.headers["Stream-Closed"]) for r in replies} == {
            (200, b"", "true")
        }
        later = await call(session, "GET", eof)  # closure is final: still the cached answer
        assert later.headers["X-Cache-Status"] == "HIT"
        assert edge.upstream_count(target(eof), N + 1) == 1


async def test_identical_long_polls_at_the_tail_reach_relay_once(edge: Edge) -> None:
    url = edge.stream("long-poll")
    async with aiohttp.ClientSession() as session:
        await make_stream(session, url, b"first")
        opening = await call(session, "GET", f"{url}?offset=-1&live=long-poll")
        assert opening.status == 200 and opening.body == b"first"
        tail, cursor = opening.headers["Stream-Next-Offset"], opening.headers["Stream-Cursor"]
        poll = f"{url}?cursor={cursor}&live=long-poll&offset={tail}"

        waiting = asyncio.gather(*(call(session, "GET", poll) for _ in range(N)))
        await parked_at(edge.relay.url, 1)  # the one nginx lets through; the others
        # queue on its cache lock, and one that comes late is answered the same
        appended = await call(session, "POST", url, TEXT, b"second")
        assert appended.status == 204
        replies = await asyncio.wait_for(waiting, LONG_POLL_TIMEOUT * 4)
        assert {(r.status, r.body) for r in replies} == {(200, b"second")}
        assert len({r.headers["Stream-Cursor"] for r in replies}) == 1
        assert edge.upstream_count(target(poll), N) == 1


async def test_long_polls_that_time_out_collapse_and_the_next_round_is_a_new_key(
    edge: Edge,
) -> None:
    """A 204 is stored for one shared second, so the crowd leaves together with one cursor
    instead of being let upstream one by one; the next round (that cursor) is a new key."""
    url = edge.stream("quiet")
    async with aiohttp.ClientSession() as session:
        tail = await make_stream(session, url, b"x")
        poll = f"{url}?live=long-poll&offset={tail}"
        replies = await asyncio.wait_for(crowd(session, poll), LONG_POLL_TIMEOUT * 4)
        assert {r.status for r in replies} == {204}
        cursors = {r.headers["Stream-Cursor"] for r in replies}
        assert len(cursors) == 1
        assert edge.upstream_count(target(poll), N) == 1

        next_round = f"{url}?cursor={cursors.pop()}&live=long-poll&offset={tail}"
        waiting = asyncio.create_task(call(session, "GET", next_round))
        await parked_at(edge.relay.url, 1)
        await call(session, "POST", url, TEXT, b"y")
        reply = await asyncio.wait_for(waiting, LONG_POLL_TIMEOUT * 4)
        assert (reply.status, reply.body) == (200, b"y")
        assert edge.upstream_count(target(next_round), 1) == 1


async def test_a_read_at_the_open_tail_is_never_stale_past_its_second(edge: Edge) -> None:
    """The empty answer at an open tail is shared for one second (so a crowd collapses), and
    an append is visible once that second is over; HEAD always reports the live tail."""
    url = edge.stream("tail")
    async with aiohttp.ClientSession() as session:
        tail = await make_stream(session, url, b"old")
        at_tail = f"{url}?offset={tail}"
        replies = await crowd(session, at_tail)
        assert {(r.status, r.body, r.headers["Stream-Up-To-Date"]) for r in replies} == {
            (200, b"", "true")
        }
        assert edge.upstream_count(target(at_tail), N) == 1

        appended = await call(session, "POST", url, TEXT, b"new")
        written_at = time.monotonic()
        head = await call(session, "HEAD", url)
        assert head.headers["Stream-Next-Offset"] == appended.headers["Stream-Next-Offset"]
        while True:
            reply = await call(session, "GET", at_tail)
            if reply.body == b"new":
                break
            # nginx counts whole seconds, so "s-maxage=1" may last up to two.
            assert time.monotonic() - written_at < 3, "a stale tail outlived its lifetime"
            await asyncio.sleep(0.1)  # a sleep: the poll's pace; the lifetime is what is tested


async def test_head_is_never_cached_nor_turned_into_a_get(edge: Edge) -> None:
    """HEAD reports the live tail (section 5.5). nginx caches HEAD with GET whatever
    proxy_cache_methods says: by default it sends Relay a GET (a catch-up read from the start,
    whose Stream-Next-Offset is the first chunk's end) and answers HEAD from a stored GET of
    the same URI. And, sharing the cache lock, a crowd of HEADs would queue."""
    url = edge.stream("head")
    async with aiohttp.ClientSession() as session:
        tail = await make_stream(session, url, b"h" * (3 * CHUNK))
        read = await call(session, "GET", url)  # stored under the very URI HEAD uses
        assert read.headers["Stream-Next-Offset"] != tail
        heads = await asyncio.gather(*(call(session, "HEAD", url) for _ in range(N)))
        assert {h.headers["Stream-Next-Offset"] for h in heads} == {tail}
        assert {h.headers["Cache-Control"] for h in heads} == {"no-store"}
        assert {h.headers["X-Cache-Status"] for h in heads} == {"BYPASS"}
        appended = await call(session, "POST", url, TEXT, b"more")
        head = await call(session, "HEAD", url)
        assert head.headers["Stream-Next-Offset"] == appended.headers["Stream-Next-Offset"]
        # PUT, GET, the HEADs, POST, HEAD: every one but the GET's repeats went to Relay.
        assert edge.upstream_count(target(url), N + 4) == N + 4


async def test_offset_now_always_reaches_relay(edge: Edge) -> None:
    """``now`` names a moving position under a fixed key: no stored answer can be right."""
    url = edge.stream("now")
    async with aiohttp.ClientSession() as session:
        await make_stream(session, url, b"before")
        now = f"{url}?offset=now"
        first = await call(session, "GET", now)
        appended = await call(session, "POST", url, TEXT, b"after")
        second = await call(session, "GET", now)
        assert first.headers["Stream-Next-Offset"] != second.headers["Stream-Next-Offset"]
        assert second.headers["Stream-Next-Offset"] == appended.headers["Stream-Next-Offset"]

        assert edge.upstream_count(target(now), 2) == 2

        # A crowd joining live at "now" parks at Relay, every member: under the cache lock
        # they would queue, each let upstream only after the one before it was answered.
        live_now = f"{url}?live=long-poll&offset=now"
        waiting = asyncio.gather(*(call(session, "GET", live_now) for _ in range(N)))
        await parked_at(edge.relay.url, N)  # every one: none queued behind a lock
        await call(session, "POST", url, TEXT, b"one")
        replies = await asyncio.wait_for(waiting, LONG_POLL_TIMEOUT * 4)
        assert {(r.status, r.body, r.headers["X-Cache-Status"]) for r in replies} == {
            (200, b"one", "BYPASS")
        }
        later = asyncio.create_task(call(session, "GET", live_now))
        await parked_at(edge.relay.url, 1)
        await call(session, "POST", url, TEXT, b"two")
        assert (await asyncio.wait_for(later, LONG_POLL_TIMEOUT * 4)).body == b"two"
        assert edge.upstream_count(target(live_now), N + 1) == N + 1


async def test_sse_bypasses_the_cache_and_streams_live(edge: Edge) -> None:
    url = edge.stream("sse")
    async with aiohttp.ClientSession() as session:
        await make_stream(session, url, b"hello")
        sse = f"{url}?live=sse&offset=-1"

        async def first_events(response: aiohttp.ClientResponse) -> bytes:
            seen = b""
            while b"event: control" not in seen:
                seen += await response.content.readany()
            return seen

        async with session.get(sse) as one, session.get(sse) as two:
            assert one.headers["X-Cache-Status"] == two.headers["X-Cache-Status"] == "BYPASS"
            for response in (one, two):
                events = await asyncio.wait_for(first_events(response), 10)
                assert b"data:hello" in events
            await call(session, "POST", url, TEXT, b" world")
            # Delivered while the response is still open: nothing waits for the end.
            later = await asyncio.wait_for(first_events(one), 10)
            assert b"world" in later
            await call(session, "POST", url, {"Stream-Closed": "true"})
            for response in (one, two):  # closing the stream ends both responses
                rest = await asyncio.wait_for(response.content.read(), 10)
                assert b'"streamClosed":true' in rest
        assert edge.upstream_count(target(sse), 2) == 2


async def test_errors_are_not_cached_and_expiry_ends_cached_data(edge: Edge) -> None:
    """A 404 is not remembered once the stream exists; a cached chunk of a stream with a
    deadline is not served after the deadline (no stale-while-revalidate past it)."""
    async with aiohttp.ClientSession() as session:
        url = edge.stream("later")
        missing = await call(session, "GET", f"{url}?offset=-1")
        assert missing.status == 404
        await make_stream(session, url, b"here")
        found = await call(session, "GET", f"{url}?offset=-1")
        assert (found.status, found.body) == (200, b"here")

        url = edge.stream("expiring")
        expires = datetime.now(UTC) + timedelta(seconds=4)
        stamp = expires.isoformat(timespec="seconds").replace("+00:00", "Z")
        await make_stream(session, url, b"short-lived", {"Stream-Expires-At": stamp})
        read = f"{url}?offset=-1"
        first = await call(session, "GET", read)
        assert first.status == 200
        assert "stale-while-revalidate" not in first.headers["Cache-Control"]
        again = await call(session, "GET", read)
        assert (again.status, again.headers["X-Cache-Status"]) == (200, "HIT")
        # Past the deadline, plus the second nginx may round up: a sleep, since the deadline is
        # on the real clock that nginx and Relay read.
        await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.5)
        gone = await call(session, "GET", read)
        assert gone.status == 404, (gone.status, gone.headers.get("X-Cache-Status"))


async def test_a_cached_body_is_never_given_to_another_credential(edge: Edge) -> None:
    """Relay here has no access control, so its answers are public and identical for all:
    only the cache key keeps credentials apart. Each credential fills its own entry."""
    url = edge.stream("credentials")
    async with aiohttp.ClientSession() as session:
        await make_stream(session, url, b"data")
        read = f"{url}?offset=-1"
        alice = {"Authorization": "Bearer alice"}
        bob = {"Authorization": "Bearer bob"}
        for headers in (alice, bob, None):
            replies = await crowd(session, read, headers)
            assert {(r.status, r.body) for r in replies} == {(200, b"data")}
            assert [r.headers["X-Cache-Status"] for r in replies].count("MISS") == 1
        again = await crowd(session, read, alice)
        assert {r.headers["X-Cache-Status"] for r in again} == {"HIT"}
        # Three credentials (bob, alice, none) → three trips; alice's second crowd → none.
        assert edge.upstream_count(target(read), 4 * N) == 3


async def test_revalidation_uses_relays_etag(edge: Edge) -> None:
    """A client's If-None-Match is answered 304 from the store; an expired entry is
    revalidated with Relay's ETag, and a 304 from Relay keeps the stored body."""
    url = edge.stream("etag")
    async with aiohttp.ClientSession() as session:
        tail = await make_stream(session, url, b"abc")
        chunk = f"{url}?offset=-1"
        first = await call(session, "GET", chunk)
        conditional = await call(session, "GET", chunk, {"If-None-Match": first.headers["ETag"]})
        assert (conditional.status, conditional.headers["X-Cache-Status"]) == (304, "HIT")

        at_tail = f"{url}?offset={tail}"  # stored for one second
        await call(session, "GET", at_tail)
        # A sleep: the entry's second passes on nginx's real clock, rounded up to whole seconds.
        await asyncio.sleep(2.5)
        again = await call(session, "GET", at_tail)
        assert (again.status, again.body) == (200, b"")
        assert again.headers["X-Cache-Status"] == "REVALIDATED"
        assert edge.upstream_count(target(chunk), 2) == 1


async def test_a_deleted_stream_is_404_once_its_entries_expire(edge: Edge) -> None:
    """HEAD knows at once; the stored answer at the tail lasts its one second, then 404. (A
    stored chunk of data would last its max-age, 60 s: the rules allow it, so not shown.)"""
    url = edge.stream("deleted")
    async with aiohttp.ClientSession() as session:
        tail = await make_stream(session, url, b"bye")
        at_tail = f"{url}?offset={tail}"
        assert (await call(session, "GET", at_tail)).status == 200
        assert (await call(session, "DELETE", url)).status == 204
        deleted_at = time.monotonic()
        assert (await call(session, "HEAD", url)).status == 404
        while (reply := await call(session, "GET", at_tail)).status != 404:
            assert reply.headers["X-Cache-Status"] == "HIT"
            assert time.monotonic() - deleted_at < 3, "a deleted stream's tail outlived its second"
            await asyncio.sleep(0.1)  # a sleep: the poll's pace; the lifetime is what is tested
        assert reply.headers["Cache-Control"] == "no-store"


async def test_compressed_catch_ups_are_cached_per_coding(edge: Edge) -> None:
    """Relay compresses a catch-up as each client's Accept-Encoding allows and says Vary:
    nginx keeps an entry per coding, each answered from the cache the second time, and never
    hands one coding's body to a client that asked for another or for none."""
    url = edge.stream("coded")
    decoders: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.decompress,
        "zstd": zstd.decompress,
        "identity": bytes,
    }
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await make_stream(session, url, b"tok " * CHUNK)
        read = f"{url}?offset=-1"
        for status in ("MISS", "HIT"):
            for coding, decode in decoders.items():
                reply = await call(session, "GET", read, {"Accept-Encoding": coding})
                assert reply.headers.get("Content-Encoding", "identity") == coding
                assert reply.headers["Vary"] == "Accept-Encoding"
                assert reply.headers["X-Cache-Status"] == status
                assert decode(reply.body) == b"tok " * (CHUNK // 4)
        assert edge.upstream_count(target(read), 6) == 3
        mixed = await asyncio.gather(
            *(
                call(session, "GET", read, {"Accept-Encoding": coding})
                for coding in list(decoders) * 5
            )
        )
        for reply, coding in zip(mixed, list(decoders) * 5, strict=True):
            assert decoders[coding](reply.body) == b"tok " * (CHUNK // 4)
        assert edge.upstream_count(target(read), 21) == 3
