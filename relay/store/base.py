"""The storage interface every backend implements, and the contract its tests check.

Stores own durability and atomicity; protocol rules live in :mod:`protocol` (stores call
``plan_create`` and ``decide_append`` inside their transactions). Waking live readers is not a
store's job: the caller publishes committed appends to the hub, and the store reports what
the caller cannot see to its :class:`StoreEvents` listener: commits made by other processes,
and every stream removed (deleted, expired, replaced), locally or elsewhere.

A stream's ``stream_id`` is never reused, on any backend: every watch, cache and ETag keys on
it, so a reader of a removed stream can never be handed another stream's bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from protocol.append import AppendPlan, AppendRequest
from protocol.create import CreateRequest
from protocol.model import StreamMeta


class StoreStartupError(Exception):
    """The store cannot start (data directory in use, database unreachable, bad schema)."""


class StoreEvents(Protocol):
    """Who hears what the store learns after a commit (the live-read hub)."""

    def remote_commit(self, stream_id: int, tail: int, closed: bool) -> None:
        """Another process committed to the stream: its tail and closure now."""

    def deleted(self, stream_id: int) -> None:
        """The stream no longer exists as it was (deleted, soft-deleted, expired, replaced)."""

    def watched_ids(self) -> Iterable[int]:
        """Streams with parked readers, for re-checking after missed notifications."""
        ...


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

    def tracked(self, path: str, position: int, now: float) -> StreamMeta | None:
        """The stream, from what this process already knows, for a live reader about to park
        at ``position`` (its tail); None when only the store can tell.

        A store may answer only where any commit it has not seen yet will still wake the
        reader (so never for catch-up reads, which must see every acknowledged write).
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
        """Remove expired streams and unreferenced soft-deleted ones; returns how many expired.

        Every removed stream is reported to the listener's ``deleted``.
        """
        ...

    def set_listener(self, events: StoreEvents) -> None:
        """Register who hears of removals and of commits made by other processes."""

    def stats(self) -> StoreStats:
        """Counters since start."""
        ...
