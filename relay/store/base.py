"""The storage interface every backend implements, and the contract its tests check.

Stores own durability and atomicity; protocol rules live in :mod:`protocol` (stores call
``plan_create`` and ``decide_append`` inside their transactions). Waking live readers is not a
store's job: the caller publishes committed appends to the hub, and a store that learns of
commits made by other processes reports them through ``on_remote_commit``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from protocol.append import AppendPlan, AppendRequest
from protocol.create import CreateRequest
from protocol.model import StreamMeta


class StoreStartupError(Exception):
    """The store cannot start (data directory in use, database unreachable, bad schema)."""


RemoteCommit = Callable[[int, int, bool], None]
"""Called with (stream_id, new_tail, closed) for commits made by another process."""
WatchedIds = Callable[[], Iterable[int]]


@dataclass(frozen=True, slots=True)
class CreateResult:
    meta: StreamMeta
    created: bool  # False: an idempotent repeat of an existing, matching stream


@dataclass(frozen=True, slots=True)
class AppendResult:
    meta: StreamMeta  # the stream after the append (or unchanged, for duplicates)
    plan: AppendPlan
    start: int  # where the appended data begins (== meta.tail - len(plan.data))


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Plain counters; relay.metrics exports them."""

    commits: int = 0
    appends: int = 0
    rows_written: int = 0
    rows_compacted: int = 0
    batch_sizes: tuple[int, ...] = ()


class Store(Protocol):
    """Durable streams. ``now`` is Unix seconds, passed in so tests control time."""

    async def open(self) -> None:
        """Connect, migrate, and start background work (group commit, reaper)."""

    async def close(self) -> None:
        """Flush pending commits and release resources."""

    async def create(self, request: CreateRequest, now: float) -> CreateResult:
        """Create a stream or confirm an identical one.

        Raises Conflict (existing stream differs, path soft-deleted, fork source deleted or
        of another type), NotFound (fork source missing), BadRequest (fork offset past the
        source's tail, invalid initial JSON), Unavailable.
        """
        ...

    async def append(self, path: str, request: AppendRequest, now: float) -> AppendResult:
        """Append (and/or close) durably; returns only after the commit.

        Raises NotFound, Gone (soft-deleted), StreamClosed, Conflict, SequenceGap,
        StaleEpoch, BadRequest (from :func:`protocol.append.decide_append`), Unavailable.
        """
        ...

    async def head(self, path: str, now: float, *, touch: bool) -> StreamMeta:
        """The stream's committed state. ``touch`` slides its TTL (reads do, HEAD does not).

        Raises NotFound (missing or expired), Gone (soft-deleted), Unavailable.
        """
        ...

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        """The bytes in ``[start, end)`` of ``meta``'s stream, stitched across fork segments.

        ``end`` must not exceed ``meta.tail``. Raises Unavailable.
        """
        ...

    async def delete(self, path: str, now: float) -> StreamMeta:
        """Delete a stream (soft-delete while forks reference it); returns what was deleted.

        Raises NotFound, Gone (already soft-deleted), Unavailable.
        """
        ...

    async def reap(self, now: float) -> int:
        """Remove expired streams and unreferenced soft-deleted ones; returns how many."""
        ...

    def set_remote_listener(self, listener: RemoteCommit, watched: WatchedIds) -> None:
        """Register who hears of commits made by other processes (no-op if there are none).

        ``watched`` lists the streams with parked readers, for when the store cannot say
        exactly what moved (after a lost LISTEN connection) and must re-read their tails.
        """

    def stats(self) -> StoreStats:
        """Counters since start."""
        ...
