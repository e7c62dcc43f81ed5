"""Live reads (sections 5.7 and 5.8): a reader parked on a stream until data commits, the
stream closes or is deleted, its time runs out, or its credential stops being valid.

``LiveRead`` is one reader's hold on a stream: it learns the tail after subscribing, waits for
a wake, re-checks the reader's credential once per wake (here and nowhere else), and takes the
woken bytes. ``long_poll`` parks for one answer; ``SseFeed`` turns the same waits into the
events of one SSE response. Neither renders HTTP: ``reads.py`` parses, calls them and renders.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import replace
from typing import Literal, Protocol

from prometheus_client import Gauge

from protocol import headers as h
from protocol import sse
from protocol.errors import NotFound, ProtocolError
from protocol.model import StreamMeta
from protocol.offsets import format_offset
from relay.auth.authorizer import Access
from relay.auth.errors import Unauthorized
from relay.http import chunks
from relay.http.chunks import Chunk
from relay.http.context import Context
from relay.hub import Subscription


class Wake(enum.Enum):
    """Why a parked reader stopped waiting."""

    DATA = "data"  # the tail passed its position, or the stream closed or was deleted
    TIMEOUT = "timeout"  # its deadline passed, or the relay is stopping


class LiveRead:
    """One live reader's hold on a subscribed stream."""

    def __init__(
        self, ctx: Context, sub: Subscription, meta: StreamMeta, access: Access | None
    ) -> None:
        self.ctx = ctx
        self.sub = sub
        self.meta = meta
        self._access = access

    @property
    def access(self) -> Access | None:
        return self._access

    async def attach(self) -> bool:
        """Tell the subscription the stream's tail as the store has it now; False when the
        path names another stream since the reader's first look. Store errors (404, 410)
        propagate.

        The subscription comes first, this read second, so a commit landing between the
        reader's first look and its subscription is never missed.
        """
        ctx = self.ctx
        current = await ctx.store.head(self.meta.path, ctx.clock(), touch=False)
        if current.stream_id != self.meta.stream_id:
            return False
        self.sub.note_tail(current.tail, current.closed)
        return True

    async def wake(self, position: int, deadline: float) -> Wake:
        """Wait until data past ``position`` commits, the stream closes or is deleted
        (``DATA``, at once if that is already so), or the loop's clock reaches ``deadline``.

        A reader holding a credential waits in slices of ``recheck_seconds`` and re-checks it
        after each, raising ``Unauthorized`` once it is revoked or expired: a parked reader is
        cut off within seconds, and a reader catching up is checked before each chunk.
        """
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return Wake.TIMEOUT
        if self._access is None:
            return Wake.DATA if await self.sub.wait_beyond(position, remaining) else Wake.TIMEOUT
        auth = self.ctx.auth
        assert auth is not None
        every = auth.recheck_seconds
        while True:
            woke = await self.sub.wait_beyond(position, min(remaining, every))
            auth.recheck(self._access.principal)
            if woke:
                return Wake.DATA
            if self.ctx.stopping or remaining <= every:
                return Wake.TIMEOUT
            remaining = deadline - loop.time()

    async def woken(self, position: int) -> Chunk:
        """What a woken long-poll answers: the data past ``position``; 404 once the stream is
        deleted, as a fresh read gets (410 while forks keep it)."""
        if self.sub.deleted:
            current = await self.ctx.store.head(self.meta.path, self.ctx.clock(), touch=False)
            if current.stream_id != self.meta.stream_id:
                raise NotFound("stream was deleted")
        return await self.take(position)

    async def take(self, position: int) -> Chunk:
        """The data past ``position`` that woke the reader: from the hub's memory, else the
        store.

        Readers woken by one commit at the same position share one chunk, rendered once (the
        fan-out case: a thousand long-polls of one chat take the same bytes).
        """
        chunk = self.held(position)
        if chunk is not None:
            return chunk
        key = self._key(position)
        chunk = await chunks.read_chunk(self.ctx, self._latest(key), position)
        chunk = replace(chunk, rendered=chunks.render(self.meta, chunk.data))
        self.sub.shared[key] = chunk
        return chunk

    def held(self, position: int) -> Chunk | None:
        """``take`` without the store: the shared chunk, or one from the hub's memory; None
        when only the store has the bytes."""
        sub, meta = self.sub, self.meta
        key = self._key(position)
        shared = sub.shared.get(key)
        if isinstance(shared, Chunk):
            return shared
        json_mode = h.is_json(meta.content_type)
        data = sub.take(position, self.ctx.config.max_chunk_bytes, json_mode=json_mode)
        if data is None:
            return None
        chunk = chunks.chunk_of(self._latest(key), position, data)
        chunk = replace(chunk, rendered=chunks.render(meta, chunk.data))
        sub.shared[key] = chunk
        return chunk

    def _key(self, position: int) -> tuple[int, int, bool]:
        """What readers woken together share a chunk by: position, tail, closed."""
        tail = self.sub.known_tail()
        assert tail is not None
        return (position, tail, self.sub.closed)

    def _latest(self, key: tuple[int, int, bool]) -> StreamMeta:
        return replace(self.meta, tail=key[1], closed=key[2])


class Held(enum.Enum):
    PARKED = "parked"


PARKED = Held.PARKED
"""``long_poll``'s answer when ``park`` took the reader: it answers later, on its own."""


class Hold:
    """A live reader's slot (``--max-live-readers``, 429 when none is left, counted in
    ``gauge``) and its subscription: taken together, released together, once."""

    __slots__ = ("_ctx", "_gauge", "sub")

    def __init__(self, ctx: Context, gauge: Gauge, stream_id: int) -> None:
        ctx.limits.enter_reader()
        gauge.inc()
        self._ctx = ctx
        self._gauge: Gauge | None = gauge
        self.sub = ctx.hub.subscribe(stream_id)

    def release(self) -> None:
        gauge = self._gauge
        if gauge is not None:
            self._gauge = None
            self.sub.__exit__()
            self._ctx.limits.exit_reader()
            gauge.dec()


class Parker(Protocol):
    """Takes a reader that has to wait off the request's hands (``relay.http.parked``); False
    when it cannot (the reader then waits here)."""

    def __call__(self, live: LiveRead, hold: Hold, deadline: float) -> bool: ...


async def long_poll(
    ctx: Context,
    meta: StreamMeta,
    position: int,
    access: Access | None,
    park: Parker | None = None,
) -> Chunk | Literal[Held.PARKED] | None:
    """Park until data past ``position`` commits; the chunk (empty when the stream closed with
    nothing new), or None on timeout. 404 once the stream is deleted (410 while forks keep
    it), 401 once the credential is no longer valid. ``PARKED`` when ``park`` took over."""
    taken = Hold(ctx, ctx.metrics.long_poll_readers, meta.stream_id)
    hold: Hold | None = taken  # None once parked: the parked reader releases it
    try:
        sub = taken.sub
        live = LiveRead(ctx, sub, meta, access)
        # A watch already following the stream (a re-poll) knows its tail: no store read.
        if sub.known_tail() is None and not await live.attach():
            raise NotFound()
        deadline = asyncio.get_running_loop().time() + ctx.config.long_poll_timeout
        if (
            park is not None
            and not sub.beyond(position)
            and not ctx.hub.stopping
            and park(live, taken, deadline)
        ):
            hold = None
            return PARKED
        if await live.wake(position, deadline) is Wake.TIMEOUT:
            return None
        return await live.woken(position)
    finally:
        if hold is not None:
            hold.release()


class SseState(enum.Enum):
    """Where an SSE feed is; ``next_event`` moves it on."""

    OPENING = "opening"  # subscribed, the tail not yet learned
    SENDING = "sending"  # the next event is due from what the reader knows
    PARKED = "parked"  # everything known was sent: waiting for a wake
    ENDED = "ended"  # closed, deleted, replaced, revoked, or time to reconnect


class SseFeed:
    """The events of one SSE response, one ``next_event`` at a time, until the stream closes,
    is deleted, the reader's credential ends, or ``deadline`` (the reconnect interval) passes.

    Each data event comes together with its control event, so a reader never sees data without
    the offset that follows it. A reader far behind sends chunks back to back, but each passes
    through ``wake`` (the credential check, the deadline) like any other.
    """

    def __init__(self, live: LiveRead, position: int, deadline: float, cursor: Callable[[], str]):
        self._live = live
        self.position = position
        self._deadline = deadline
        self._cursor = cursor
        self.state = SseState.OPENING
        self._announced = False  # a control event for the current position went out
        content_type = live.meta.content_type
        self._json = h.is_json(content_type)
        self._binary = not h.is_text_like(content_type)

    @property
    def live(self) -> LiveRead:
        return self._live

    @property
    def deadline(self) -> float:
        return self._deadline

    def end(self) -> None:
        """End the feed: its reader's credential is no longer valid."""
        self.state = SseState.ENDED

    def would_wait(self) -> bool:
        """Whether ``next_event`` would wait for a wake: everything known is sent, nothing new
        has come, time is left and the relay is not stopping."""
        live = self._live
        return (
            self.state is SseState.PARKED
            and not live.sub.beyond(self.position)
            and not live.ctx.hub.stopping
            and asyncio.get_running_loop().time() < self._deadline
        )

    async def next_event(self) -> bytes | None:
        """The next bytes to send, or None once the feed has ended."""
        live = self._live
        while True:
            if self.state is SseState.OPENING:
                try:
                    attached = await live.attach()
                except ProtocolError:  # removed since the first look: the reader re-connects
                    attached = False
                self.state = SseState.SENDING if attached else SseState.ENDED
            elif self.state is SseState.PARKED:
                try:
                    woke = await live.wake(self.position, self._deadline)
                except Unauthorized:
                    woke = Wake.TIMEOUT
                self.state = SseState.SENDING if woke is Wake.DATA else SseState.ENDED
            elif self.state is SseState.SENDING:
                if live.sub.deleted:
                    self.state = SseState.ENDED
                    continue
                event, closed = await self._event()
                self.state = SseState.ENDED if closed else SseState.PARKED
                if event:
                    return event
            else:
                return None

    async def _event(self) -> tuple[bytes, bool]:
        """What is due from the known tail (data and/or control), and whether it ends the
        stream (the final control event of a closed stream)."""
        sub = self._live.sub
        position = self.position
        tail = sub.known_tail() or position
        event = b""
        if position < tail:
            chunk = await self._live.take(position)
            data = chunk.data
            if not (self._json or self._binary or chunk.up_to_date):
                data = data[: sse.text_chunk_end(data)]
            event = sse.data_event(data, json_mode=self._json, binary=self._binary)
            position = self.position = chunk.start + len(data)
            self._announced = False
            tail = sub.known_tail() or position
        closed = sub.closed and position >= tail
        if closed:
            self._announced = False  # the final control event must say streamClosed
        if not self._announced and (event or position >= tail):
            event += sse.control_event(
                format_offset(position),
                cursor=None if closed else self._cursor(),
                up_to_date=position >= tail,
                closed=closed,
            )
            self._announced = True
        return event, closed
