"""The live-read hub: parks long-poll and SSE readers and wakes them when data commits.

Each parked reader waits on one bare future in its stream's waiter set; a commit resolves the
whole set, so thousands of parked readers cost a future each plus their own coroutine, and
nobody polls.
The hub keeps the last few committed appends of watched streams, so a woken reader usually gets
its bytes from memory instead of reading the store. Commits made by other processes (Postgres
LISTEN) arrive without bytes; the hub fetches them once for all of that stream's readers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

RECENT_BYTES = 1024 * 1024

Fetch = Callable[[int, int, int], Awaitable[bytes | None]]
"""(stream_id, start, end) -> the committed bytes, or None if they cannot be had."""


@dataclass
class _Watch:
    """Shared state of one watched stream; lives while any reader holds it."""

    tail: int | None = None
    closed: bool = False
    deleted: bool = False
    readers: int = 0
    recent: deque[tuple[int, bytes]] = field(default_factory=deque)
    recent_bytes: int = 0
    waiters: set[asyncio.Future[None]] = field(default_factory=set)

    def signal(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    def remember(self, start: int, data: bytes) -> None:
        if not data:
            return
        if self.recent and self.recent[-1][0] + len(self.recent[-1][1]) != start:
            self.recent.clear()
            self.recent_bytes = 0
        self.recent.append((start, data))
        self.recent_bytes += len(data)
        while self.recent_bytes > RECENT_BYTES and len(self.recent) > 1:
            self.recent_bytes -= len(self.recent.popleft()[1])


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

    def known_tail(self) -> int | None:
        return self._watch.tail

    def note_tail(self, tail: int, closed: bool) -> None:
        """Tell the hub what the reader just read from the store, after subscribing."""
        watch = self._watch
        if watch.tail is None or tail > watch.tail:
            watch.tail = tail
        watch.closed = watch.closed or closed

    async def wait_beyond(self, offset: int, timeout: float) -> bool:
        """Wait until the stream's tail passes ``offset``, it closes, or it is deleted.

        Returns False on timeout, or straight away once the hub shuts down, so a stopping
        relay answers every parked reader as a timeout would.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watch = self._watch
        while True:
            if watch.deleted or watch.closed or (watch.tail is not None and watch.tail > offset):
                return True
            remaining = deadline - loop.time()
            if remaining <= 0 or self._hub.stopping:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            watch.waiters.add(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return False
            finally:
                watch.waiters.discard(waiter)

    def take(self, start: int, limit: int) -> bytes | None:
        """Committed bytes from ``start`` held in memory, up to ``limit``; None if not held."""
        for chunk_start, data in self._watch.recent:
            if chunk_start <= start < chunk_start + len(data):
                out = bytearray(data[start - chunk_start :])
                break
        else:
            return None
        for chunk_start, data in self._watch.recent:
            if chunk_start >= start + len(out) and len(out) < limit:
                if chunk_start != start + len(out):
                    break
                out += data
        return bytes(out[:limit])


class Hub:
    """Wakes parked readers of a stream when its tail moves, it closes, or it is deleted."""

    def __init__(self) -> None:
        self._watches: dict[int, _Watch] = {}
        self._fetch: Fetch | None = None
        self._fetching: set[int] = set()
        self.stopping = False

    def set_fetch(self, fetch: Fetch) -> None:
        self._fetch = fetch

    @property
    def watched_streams(self) -> int:
        return len(self._watches)

    @property
    def parked_readers(self) -> int:
        return sum(w.readers for w in self._watches.values())

    def watched_ids(self) -> list[int]:
        return list(self._watches)

    def subscribe(self, stream_id: int) -> Subscription:
        watch = self._watches.get(stream_id)
        if watch is None:
            watch = self._watches[stream_id] = _Watch()
        watch.readers += 1
        return Subscription(self, stream_id, watch)

    def _release(self, stream_id: int) -> None:
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        watch.readers -= 1
        if watch.readers <= 0:
            del self._watches[stream_id]

    def shutdown(self) -> None:
        """Wake every parked reader for good: from now on waits end at once, as on timeout."""
        self.stopping = True
        for watch in self._watches.values():
            watch.signal()

    def publish(self, stream_id: int, start: int, data: bytes, tail: int, closed: bool) -> None:
        """A local commit: ``data`` now sits at ``[start, tail)``."""
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        watch.remember(start, data)
        if watch.tail is None or tail > watch.tail:
            watch.tail = tail
        watch.closed = watch.closed or closed
        watch.signal()

    def deleted(self, stream_id: int) -> None:
        watch = self._watches.get(stream_id)
        if watch is not None:
            watch.deleted = True
            watch.signal()

    def remote_commit(self, stream_id: int, tail: int, closed: bool) -> None:
        """Another process committed; fetch its bytes once for every reader of the stream."""
        watch = self._watches.get(stream_id)
        if watch is None:
            return
        known = watch.tail
        if self._fetch is None or known is None or tail <= known or stream_id in self._fetching:
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
            watch.remember(start, data)
        self._advance(watch, tail, closed)

    @staticmethod
    def _advance(watch: _Watch, tail: int, closed: bool) -> None:
        if watch.tail is None or tail > watch.tail:
            watch.tail = tail
        watch.closed = watch.closed or closed
        watch.signal()
