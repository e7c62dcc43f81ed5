"""The live-read hub: parks long-poll and SSE readers and wakes them when data commits.

Each parked reader waits on one bare future in its stream's waiter set; a commit resolves the
whole set, so thousands of parked readers cost a future each plus their own coroutine, and
nobody polls.
The hub keeps the last few committed appends of every stream written through it (watched or
not), so a woken reader, and a catch-up read near a stream's tail, usually gets its bytes from
memory instead of reading the store. Commits made by other processes (Postgres LISTEN) arrive
without bytes; the hub fetches them once for all of that stream's readers.
That memory is capped per stream and in total, evicting the stream written least recently;
what the hub no longer holds, readers read from the store, so eviction costs a read, never
correctness.

A watch outlives its last reader by ``LINGER_SECONDS``, still following commits: a long-poll
reader re-polls right after each answer, and finds the stream's tail and newest bytes already
known instead of asking the store again. Committed bytes never change and ids are never reused,
so what the hub holds is always right to serve, until the stream is removed.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from protocol import jsonmode

log = structlog.get_logger("relay.hub")

RECENT_BYTES = 1024 * 1024
"""Most recent bytes held per stream; a longer append is never held."""
HELD_BYTES = 64 * 1024 * 1024
"""Default cap on recent bytes held across all streams."""
MAX_HELD_STREAMS = 100_000
"""Streams whose recent bytes are held at once: tiny appends to many streams are bounded too."""
COALESCE_BYTES = 4096
"""Adjacent held appends are joined up to this size. A stream of 6-byte tokens would otherwise
hold 170,000 entries per MiB (about 100 bytes of Python objects each, so 17 MiB to hold one),
and a read from the start of what is held walked every one of them (0.5 s of CPU per read of
a 600 KB stream in ``relay bench --scenarios long``)."""
LINGER_SECONDS = 10.0
MAX_LINGERING = 10_000

Fetch = Callable[[int, int, int], Awaitable[bytes | None]]
"""(stream_id, start, end) -> the committed bytes, or None if they cannot be had."""


@dataclass
class _Held:
    """A stream's most recent committed appends, contiguous, oldest first."""

    chunks: deque[tuple[int, bytes]] = field(default_factory=deque)
    size: int = 0

    def since(self, at: int) -> list[tuple[int, bytes]] | None:
        """The held appends from the one holding byte ``at`` on, oldest first; ``[]`` when
        ``at`` is the end of what is held, None when it is not held.

        Found from the newest end: readers are nearly always at or near the tail, and a stream
        of tokens holds thousands of tiny appends (scanning from the oldest was 6% of the
        relay's CPU at 50 chat sessions).
        """
        found: list[tuple[int, bytes]] = []
        for chunk in reversed(self.chunks):
            chunk_start, data = chunk
            if chunk_start + len(data) <= at:
                return found[::-1] if chunk_start + len(data) == at else None
            found.append(chunk)
            if chunk_start <= at:
                return found[::-1]
        return None  # before the oldest held byte (or nothing held)


_NOTHING_HELD = _Held()


class Parked(Protocol):
    """A reader parked without a coroutine of its own (``relay.http.parked``): the hub calls
    ``wake`` once, soon after the next signal, and forgets it."""

    def wake(self) -> None: ...


@dataclass
class _Watch:
    """Shared state of one watched stream; lives while any reader holds it."""

    tail: int | None = None
    closed: bool = False
    deleted: bool = False
    readers: int = 0
    waiters: set[asyncio.Future[None]] = field(default_factory=set)
    parked: set[Parked] = field(default_factory=set)
    shared: dict[object, object] = field(default_factory=dict)
    """What readers woken by one commit share (one rendered answer); emptied at the next."""

    def signal(self) -> None:
        self.shared.clear()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()
        if self.parked:
            # After what is already due (the commit's writers, answered first): a wake may
            # answer its reader at once, and thousands of them take a while.
            parked, self.parked = self.parked, set()
            asyncio.get_running_loop().call_soon(_wake_all, parked)


def _wake_all(parked: set[Parked]) -> None:
    for reader in parked:
        try:
            reader.wake()
        except Exception:  # one reader's failure must not leave the others parked
            log.exception("waking a parked reader failed")


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Subscription:
    """A reader's handle on one stream. Use as a context manager so the hub can forget it."""

    def __init__(self, hub: Hub, stream_id: int, watch: _Watch) -> None:
        self._hub = hub
        self.stream_id = stream_id
        self._watch = watch

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self._hub._release(self.stream_id)

    @property
    def deleted(self) -> bool:
        return self._watch.deleted

    @property
    def closed(self) -> bool:
        return self._watch.closed

    @property
    def shared(self) -> dict[object, object]:
        """Scratch space every reader of this stream shares until the next commit wakes them:
        readers woken together at the same position render their answer once."""
        return self._watch.shared

    def known_tail(self) -> int | None:
        return self._watch.tail

    def note_tail(self, tail: int, closed: bool) -> None:
        """Tell the hub what the reader just read from the store, after subscribing."""
        watch = self._watch
        if watch.tail is None or tail > watch.tail:
            watch.tail = tail
        watch.closed = watch.closed or closed

    def beyond(self, offset: int) -> bool:
        """Whether a reader at ``offset`` has something to be woken for: data past it, the
        stream closed or deleted."""
        watch = self._watch
        return watch.deleted or watch.closed or (watch.tail is not None and watch.tail > offset)

    def park(self, reader: Parked) -> None:
        """Call ``reader.wake()`` at the next signal (a commit, a close, a delete, the hub
        stopping), once. The caller checks ``beyond`` and ``Hub.stopping`` first."""
        self._watch.parked.add(reader)

    def unpark(self, reader: Parked) -> None:
        self._watch.parked.discard(reader)

    async def wait_beyond(self, offset: int, timeout: float) -> bool:
        """Wait until the stream's tail passes ``offset``, it closes, or it is deleted.

        Returns False on timeout, or straight away once the hub shuts down, so a stopping
        relay answers every parked reader as a timeout would.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watch = self._watch
        while True:
            if self.beyond(offset):
                return True
            remaining = deadline - loop.time()
            if remaining <= 0 or self._hub.stopping:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            watch.waiters.add(waiter)
            # A bare timer resolving the same future: cheaper than asyncio.timeout's context,
            # which showed up at 8% of the relay's CPU with 1,000 readers woken per message.
            timer = loop.call_at(deadline, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                watch.waiters.discard(waiter)

    def take(self, start: int, limit: int, *, json_mode: bool = False) -> bytes | None:
        """Committed bytes from ``start`` held in memory, up to ``limit``; None if not held.

        In JSON mode the cut falls after a whole message (``jsonmode.chunk_end``), and a first
        message longer than ``limit`` comes whole. Held appends are whole messages, so gathering
        stops at the first append that reaches ``limit``, and the copy stays under ``limit``
        plus one held append.
        """
        parts: list[memoryview] = []
        size = 0
        at = start
        for chunk_start, data in self._hub._held.get(self.stream_id, _NOTHING_HELD).since(at) or ():
            piece = memoryview(data)[at - chunk_start :]
            parts.append(piece)
            size += len(piece)
            at = chunk_start + len(data)
            if size >= limit:
                break
        if not parts:
            return None
        out = b"".join(parts)
        if not json_mode:
            return out[:limit]
        cut = jsonmode.chunk_end(out, limit)
        return out[:cut] if cut else None


class Hub:
    """Wakes parked readers of a stream when its tail moves, it closes, or it is deleted."""

    def __init__(
        self,
        max_bytes: int = HELD_BYTES,
        stream_bytes: int = RECENT_BYTES,
        linger: float = LINGER_SECONDS,
    ) -> None:
        self._watches: dict[int, _Watch] = {}
        self._linger = linger
        self._lingering: OrderedDict[int, float] = OrderedDict()  # readerless, oldest first
        self._fetch: Fetch | None = None
        self._fetching: set[int] = set()
        self._max_bytes = max_bytes
        self._stream_bytes = stream_bytes
        # Recent bytes by stream, least recently published first: the eviction order.
        self._held: OrderedDict[int, _Held] = OrderedDict()
        self._held_bytes = 0
        self.stopping = False

    def set_fetch(self, fetch: Fetch) -> None:
        self._fetch = fetch

    @property
    def held_bytes(self) -> int:
        """Recent bytes held for all watched streams together."""
        return self._held_bytes

    @property
    def watched_streams(self) -> int:
        """Streams with readers (lingering watches are not counted)."""
        return len(self._watches) - len(self._lingering)

    @property
    def parked_readers(self) -> int:
        return sum(w.readers for w in self._watches.values())

    def watched_ids(self) -> list[int]:
        return list(self._watches)

    def subscribe(self, stream_id: int) -> Subscription:
        watch = self._watches.get(stream_id)
        if watch is None:
            watch = self._watches[stream_id] = _Watch()
        elif not watch.readers:
            self._lingering.pop(stream_id, None)
        watch.readers += 1
        return Subscription(self, stream_id, watch)

    def _release(self, stream_id: int) -> None:
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        watch.readers -= 1
        if watch.readers > 0:
            return
        now = asyncio.get_running_loop().time()
        if self._linger > 0 and not watch.deleted and not self.stopping:
            self._lingering[stream_id] = now
        else:
            self._drop(stream_id, watch)
        while self._lingering:
            oldest, since = next(iter(self._lingering.items()))
            if now - since < self._linger and len(self._lingering) <= MAX_LINGERING:
                break
            self._drop(oldest, self._watches[oldest])

    def _drop(self, stream_id: int, watch: _Watch) -> None:
        self._lingering.pop(stream_id, None)
        del self._watches[stream_id]

    def held(self, stream_id: int, start: int, end: int) -> bytes | None:
        """Committed bytes ``[start, end)`` of a stream if the hub holds all of them."""
        held = self._held.get(stream_id)
        if held is None or start >= end:
            return None
        parts: list[memoryview] = []
        at = start
        for chunk_start, data in held.since(start) or ():
            parts.append(memoryview(data)[at - chunk_start : min(len(data), end - chunk_start)])
            at = min(chunk_start + len(data), end)
            if at >= end:
                return b"".join(parts)
        return None

    def _remember(self, stream_id: int, start: int, data: bytes) -> None:
        """Hold a committed append for readers, within the per-stream and total caps.

        The total cap evicts from the stream published least recently, oldest bytes first:
        its readers have most likely taken them already.
        """
        if not data or len(data) > self._stream_bytes:
            return
        held = self._held.get(stream_id)
        if held is None:
            if len(self._held) >= MAX_HELD_STREAMS:
                self._forget(next(iter(self._held)))
            held = self._held[stream_id] = _Held()
        else:
            self._held.move_to_end(stream_id)
            last_start, last = held.chunks[-1] if held.chunks else (start, b"")
            if last_start + len(last) != start:  # a gap (another relay wrote): start afresh
                self._held_bytes -= held.size
                held.chunks.clear()
                held.size = 0
            elif last and len(last) + len(data) <= COALESCE_BYTES:
                # Joined appends are still whole appends (whole JSON messages) end to end.
                held.chunks[-1] = (last_start, last + data)
                held.size += len(data)
                self._held_bytes += len(data)
                self._trim(held)
                return
        held.chunks.append((start, data))
        held.size += len(data)
        self._held_bytes += len(data)
        self._trim(held)

    def _trim(self, held: _Held) -> None:
        """Back under the per-stream and total caps, oldest bytes first."""
        while held.size > self._stream_bytes:
            self._drop_oldest(held)
        while self._held_bytes > self._max_bytes:
            victim_id, victim = next(iter(self._held.items()))
            self._drop_oldest(victim)
            if not victim.chunks:
                del self._held[victim_id]

    def _drop_oldest(self, held: _Held) -> None:
        size = len(held.chunks.popleft()[1])
        held.size -= size
        self._held_bytes -= size

    def _forget(self, stream_id: int) -> None:
        held = self._held.pop(stream_id, None)
        if held is not None:
            self._held_bytes -= held.size

    def shutdown(self) -> None:
        """Wake every parked reader for good: from now on waits end at once, as on timeout."""
        self.stopping = True
        for watch in self._watches.values():
            watch.signal()

    def publish(self, stream_id: int, start: int, data: bytes, tail: int, closed: bool) -> None:
        """A local commit: ``data`` now sits at ``[start, tail)``."""
        self._remember(stream_id, start, data)
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        if watch.tail is None or tail > watch.tail:
            watch.tail = tail
        watch.closed = watch.closed or closed
        watch.signal()

    def forget_held(self) -> None:
        """Drop every held byte and every shared render: the database may no longer be the one
        they were committed to (a reconnect after an outage or a failover may reach a promoted
        standby with another history), so readers read from it again."""
        self._held.clear()
        self._held_bytes = 0
        for watch in self._watches.values():
            watch.shared.clear()

    def deleted(self, stream_id: int) -> None:
        self._forget(stream_id)
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        if not watch.readers:
            self._drop(stream_id, watch)
            return
        watch.deleted = True
        watch.signal()

    def remote_commit(self, stream_id: int, tail: int, closed: bool) -> None:
        """Another process committed; fetch its bytes once for every reader of the stream."""
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        known = watch.tail
        if (
            self._fetch is None
            or not watch.readers  # lingering: track the tail, fetch only for real readers
            or known is None
            or tail <= known
            or tail - known > self._stream_bytes  # more than the hub would hold: readers read
            or stream_id in self._fetching
        ):
            self._advance(watch, tail, closed)
            return
        self._fetching.add(stream_id)
        asyncio.get_running_loop().create_task(
            self._fetch_then_wake(stream_id, known, tail, closed)
        )

    async def _fetch_then_wake(self, stream_id: int, start: int, tail: int, closed: bool) -> None:
        try:
            assert self._fetch is not None
            data = await self._fetch(stream_id, start, tail)
        except Exception:
            data = None
        finally:
            self._fetching.discard(stream_id)
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        if data is not None and len(data) == tail - start:
            self._remember(stream_id, start, data)
        self._advance(watch, tail, closed)

    @staticmethod
    def _advance(watch: _Watch, tail: int, closed: bool) -> None:
        if watch.tail is None or tail > watch.tail:
            watch.tail = tail
        watch.closed = watch.closed or closed
        watch.signal()
