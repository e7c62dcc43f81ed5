"""The live read on its own (relay/http/live.py): a real hub, a store that is a list of bytes,
no HTTP. Each test drives the SSE feed or a long-poll through one of its ways to end."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import cast

import pytest

from protocol.errors import NotFound, Overloaded
from protocol.model import StreamMeta
from protocol.offsets import format_offset
from relay.auth.authorizer import Access, Authorizer
from relay.auth.errors import Unauthorized
from relay.auth.grants import Principal
from relay.config import Config
from relay.http import live
from relay.http.chunks import Chunk
from relay.http.context import Context, Limits
from relay.hub import Hub
from relay.metrics import Metrics
from relay.store.base import Store
from tests.waits import wait_for

PATH = "/v1/stream/chat"
STREAM_ID = 7
TEXT = "text/plain"


class Memory:
    """What a live read asks of a store: the stream's head and its bytes."""

    def __init__(self, content_type: str = TEXT, data: bytes = b"") -> None:
        self.meta: StreamMeta | None = StreamMeta(STREAM_ID, PATH, content_type, tail=len(data))
        self.data = data

    async def head(self, path: str, now: float, *, touch: bool) -> StreamMeta:
        if self.meta is None:
            raise NotFound()
        return self.meta

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        return self.data[start:end]


class Auth:
    """A credential that holds until ``revoked`` is set; counts its checks."""

    recheck_seconds = 0.01

    def __init__(self) -> None:
        self.revoked = False
        self.checks = 0

    def recheck(self, principal: Principal) -> None:
        self.checks += 1
        if self.revoked:
            raise Unauthorized("revoked")


ACCESS = Access(Principal("reader", ()), public=False)


def make_ctx(store: Memory, auth: Auth | None = None, **config: object) -> Context:
    return Context(
        config=Config(**config),  # type: ignore[arg-type]
        store=cast(Store, store),
        hub=Hub(),
        metrics=Metrics(),
        limits=Limits(max_writes=10, max_readers=10),
        auth=cast(Authorizer, auth),
    )


def append(ctx: Context, store: Memory, data: bytes, *, closed: bool = False) -> None:
    """Commit ``data`` as the sink would: the store first, then the hub's wake."""
    assert store.meta is not None
    start = len(store.data)
    store.data += data
    store.meta = replace(store.meta, tail=len(store.data), closed=closed)
    ctx.hub.publish(STREAM_ID, start, data, len(store.data), closed)


def feed(
    ctx: Context, store: Memory, position: int, *, access: Access | None = None
) -> live.SseFeed:
    assert store.meta is not None
    sub = ctx.hub.subscribe(STREAM_ID)
    reader = live.LiveRead(ctx, sub, store.meta, access)
    deadline = asyncio.get_running_loop().time() + 60
    return live.SseFeed(reader, position, deadline, lambda: "cur")


def control(event: bytes) -> dict[str, object]:
    data = event.split(b"event: control\ndata:")[1]
    return cast(dict[str, object], json.loads(data))


async def parked(ctx: Context) -> None:
    """Until a reader holds the stream (whether it waits yet or not, a wake finds it: the
    subscription keeps what happened since)."""
    await wait_for(lambda: ctx.hub.parked_readers)


async def test_sse_announces_the_tail_then_sends_each_commit_with_its_offset() -> None:
    store = Memory(data=b"hello")
    ctx = make_ctx(store)
    sse = feed(ctx, store, 5)
    first = await sse.next_event()
    assert first is not None and b"event: data" not in first
    assert control(first) == {
        "streamNextOffset": format_offset(5),
        "streamCursor": "cur",
        "upToDate": True,
    }
    assert sse.state is live.SseState.PARKED
    waiting = asyncio.create_task(sse.next_event())
    await parked(ctx)
    append(ctx, store, b"-world")
    event = await waiting
    assert event is not None and event.startswith(b"event: data\ndata:-world\n")
    assert control(event)["streamNextOffset"] == format_offset(11)


async def test_sse_close_sends_the_final_control_event_and_ends() -> None:
    store = Memory(data=b"ab")
    ctx = make_ctx(store)
    sse = feed(ctx, store, 2)
    assert await sse.next_event() is not None
    append(ctx, store, b"c", closed=True)
    event = await sse.next_event()
    assert event is not None
    assert control(event) == {
        "streamNextOffset": format_offset(3),
        "upToDate": True,
        "streamClosed": True,
    }
    assert sse.state is live.SseState.ENDED
    assert await sse.next_event() is None


async def test_a_reader_far_behind_gets_chunks_back_to_back_each_credential_checked() -> None:
    store = Memory(data=b"x" * 100)
    auth = Auth()
    ctx = make_ctx(store, auth, max_chunk_bytes=10)
    sse = feed(ctx, store, 0, access=ACCESS)
    events = [await sse.next_event() for _ in range(10)]  # none of these waits
    assert all(e is not None and e.startswith(b"event: data") for e in events)
    assert control(cast(bytes, events[-1]))["upToDate"] is True
    assert auth.checks == 9  # once per wake: every event after the first
    auth.revoked = True
    assert await sse.next_event() is None  # the next wake finds the credential revoked


async def test_a_parked_sse_reader_ends_within_a_recheck_once_revoked() -> None:
    store = Memory()
    auth = Auth()
    ctx = make_ctx(store, auth)
    sse = feed(ctx, store, 0, access=ACCESS)
    assert await sse.next_event() is not None
    waiting = asyncio.create_task(sse.next_event())
    await parked(ctx)
    auth.revoked = True
    assert await asyncio.wait_for(waiting, 10) is None


async def test_sse_ends_when_the_stream_is_deleted_or_replaced_or_time_is_up() -> None:
    store = Memory()
    ctx = make_ctx(store)
    deleted = feed(ctx, store, 0)
    assert await deleted.next_event() is not None
    waiting = asyncio.create_task(deleted.next_event())
    await parked(ctx)
    ctx.hub.deleted(STREAM_ID)
    assert await waiting is None

    store = Memory()
    ctx = make_ctx(store)
    replaced = feed(ctx, store, 0)
    store.meta = replace(cast(StreamMeta, store.meta), stream_id=STREAM_ID + 1)
    assert await replaced.next_event() is None  # nothing is sent about another stream

    store = Memory()
    ctx = make_ctx(store)
    sub = ctx.hub.subscribe(STREAM_ID)
    reader = live.LiveRead(ctx, sub, cast(StreamMeta, store.meta), None)
    now = asyncio.get_running_loop().time()
    expired = live.SseFeed(reader, 0, now, lambda: "cur")
    assert await expired.next_event() is not None  # the first announcement still goes out
    assert await expired.next_event() is None


async def test_a_long_poll_takes_the_commit_that_wakes_it() -> None:
    store = Memory(data=b"ab")
    ctx = make_ctx(store)
    meta = cast(StreamMeta, store.meta)
    poll = asyncio.create_task(live.long_poll(ctx, meta, 2, None))
    await parked(ctx)
    assert ctx.limits.readers == 1
    append(ctx, store, b"cd")
    chunk = await poll
    assert isinstance(chunk, Chunk) and (chunk.data, chunk.start, chunk.end) == (b"cd", 2, 4)
    assert chunk.rendered == b"cd"
    assert ctx.limits.readers == 0


async def test_a_long_poll_times_out_with_none_and_frees_its_slot() -> None:
    store = Memory()
    ctx = make_ctx(store, long_poll_timeout=0.01)
    assert await live.long_poll(ctx, cast(StreamMeta, store.meta), 0, None) is None
    assert ctx.limits.readers == 0


async def test_a_long_poll_is_refused_once_revoked_or_deleted() -> None:
    store = Memory()
    auth = Auth()
    ctx = make_ctx(store, auth)
    poll = asyncio.create_task(live.long_poll(ctx, cast(StreamMeta, store.meta), 0, ACCESS))
    await parked(ctx)
    auth.revoked = True
    with pytest.raises(Unauthorized):
        await asyncio.wait_for(poll, 10)

    store = Memory()
    ctx = make_ctx(store)
    poll = asyncio.create_task(live.long_poll(ctx, cast(StreamMeta, store.meta), 0, None))
    await parked(ctx)
    store.meta = None
    ctx.hub.deleted(STREAM_ID)
    with pytest.raises(NotFound):
        await asyncio.wait_for(poll, 10)
    assert ctx.limits.readers == 0


async def test_live_readers_past_the_cap_are_refused_before_parking() -> None:
    store = Memory()
    ctx = make_ctx(store)
    ctx.limits.max_readers = 1
    poll = asyncio.create_task(live.long_poll(ctx, cast(StreamMeta, store.meta), 0, None))
    await parked(ctx)
    with pytest.raises(Overloaded):
        await live.long_poll(ctx, cast(StreamMeta, store.meta), 0, None)
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poll
    assert ctx.limits.readers == 0
