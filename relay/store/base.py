"""The storage interface every backend implements, and the contract its tests check.

Stores own durability and atomicity; protocol rules live in :mod:`protocol`, applied once for
every backend by the engine's plans (:mod:`relay.store.engine.plan` calls ``plan_create`` and
``decide_append`` inside the backend's transaction). Waking live readers is not a store's
job: it reports to its :class:`StoreEvents` listener (the commit sink) every committed append
(a create's body included), commits made by other processes, and every stream removed
(deleted, expired, replaced), locally or elsewhere.

A stream's ``stream_id`` is never reused, on any backend: every watch, cache and ETag keys on
it, so a reader of a removed stream can never be handed another stream's bytes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from protocol.append import AppendPlan, AppendRequest
from protocol.create import CreateRequest
from protocol.model import StreamMeta
from relay.store.compaction import COMPACT_PASS_BYTES, CompactionPass


class StoreStartupError(Exception):
    """The store cannot start (data directory in use, database unreachable, bad schema)."""


class StoreEvents(Protocol):
    """Who hears what the store learns after a commit (``relay.sink.CommitSink``)."""

    def appended(self, path: str, result: AppendResult) -> None:
        """An append that wrote (data, a close or both), or a create with a body (as the
        append of that body), committed here; called by the committer before the writer's
        future resolves, whether or not it is still waiting."""

    def remote_commit(self, stream_id: int, tail: int, closed: bool) -> None:
        """Another process committed to the stream: its tail and closure now."""

    def deleted(self, stream_id: int) -> None:
        """The stream no longer exists as it was (deleted, soft-deleted, expired, replaced)."""

    def watched_ids(self) -> Iterable[int]:
        """Streams with parked readers, for re-checking after missed notifications."""
        ...

    def forget_held(self) -> None:
        """Bytes held from earlier commits may not be the database's any more (its connection
        was lost: it may come back as another server); drop them."""


@dataclass(frozen=True, slots=True)
class Revocation:
    """A DELETE's ``Stream-Revoke-From``: bytes from ``offset`` on must be erased; ``forks``
    are the inheriting streams the caller may delete with it (already authorized)."""

    offset: int
    forks: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CreateResult:
    meta: StreamMeta
    created: bool  # False: an idempotent repeat of an existing, matching stream
    initial: AppendResult | None = None  # the body it was created with, as the sink hears it


@dataclass(frozen=True, slots=True)
class CompactResult:
    """A State Protocol stream folded into a snapshot: the stream after (its horizon at the
    snapshot's start), the snapshot's append as the sink hears it, and what was folded."""

    meta: StreamMeta
    snapshot: AppendResult
    messages: int  # history messages folded
    rows: int  # live rows the snapshot holds
    history_bytes: int  # bytes a reader from the old horizon had to download


@dataclass(frozen=True, slots=True)
class AppendResult:
    meta: StreamMeta  # the stream after the append (or unchanged, for duplicates)
    plan: AppendPlan
    start: int  # where the appended data begins (== meta.tail - len(plan.data))


class Distribution:
    """A histogram kept by a store without a metrics library: counts per upper bound (a value
    lands in the first bound it does not exceed, as Prometheus's ``le``), their sum and count.
    One ``observe`` per commit, so it costs a bisect, not a label lookup."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of values <= le)`` per bound, then ``+Inf``: Prometheus buckets."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
        return out


BATCH_OPS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COMMIT_SECONDS_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store counts, read at scrape time (relay.metrics exports it). Fields a backend
    does not have (a connection pool, LISTEN, compaction on SQLite) stay None."""

    commits: int = 0
    appends: int = 0
    rows_written: int = 0
    queue_depth: int = 0  # operations waiting for a group commit
    unavailable: int = 0  # operations answered 503: the database could not be reached
    storage_full: int = 0  # operations answered 503 for lack of space (a full disk)
    failed: int = 0  # transactions that failed for another reason (re-run one by one)
    batch_ops: Distribution = field(default_factory=lambda: Distribution(BATCH_OPS_BOUNDS))
    commit_seconds: Distribution = field(
        default_factory=lambda: Distribution(COMMIT_SECONDS_BOUNDS)
    )
    rows_compacted: int | None = None
    bytes_compacted: int | None = None
    compaction_passes: int | None = None
    listen_reconnects: int | None = None
    statements: int | None = None  # sent by the committer (Postgres), BEGIN and COMMIT included
    guarded_writes: int | None = None  # batches committed in one round trip, without locks
    guard_misses: int | None = None  # guarded writes refused (a stream changed), re-run locked
    diverged_streams: int | None = None  # found behind what this relay acknowledged (failover)
    pool_in_use: int | None = None
    pool_size: int | None = None
    replica_reads: int | None = None  # reads a read replica answered (Postgres with replicas)
    replica_fallbacks: int | None = None  # reads it had not replayed far enough for: primary
    replica_errors: int | None = None  # reads it failed (down, refused): the primary answered
    replicas_up: int | None = None  # read replicas in use now


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

    async def delete(self, path: str, now: float, revoke: Revocation | None = None) -> StreamMeta:
        """Delete a stream (soft-delete while forks reference it, erasing every byte no fork
        inherits); returns what was deleted. With ``revoke``, its bytes from ``revoke.offset``
        on must go: the forks that inherit any of them (and their descendants) are deleted too
        when all are in ``revoke.forks``, else nothing is and Conflict says which.

        Raises NotFound, Gone (already soft-deleted), Conflict, Unavailable.
        """
        ...

    async def inheriting(self, path: str, offset: int) -> list[str]:
        """Paths of every stream that can read ``path``'s bytes at or past ``offset`` (forks
        made past it and their descendants): what revoking those bytes would delete."""
        ...

    async def retain(self, path: str, offset: int, now: float) -> StreamMeta:
        """Advance the stream's retention horizon to ``offset`` (never back) and delete the
        rows before it that no descendant fork can still read; returns the stream after.

        Raises NotFound, Gone, BadRequest (past the tail, not a JSON message boundary),
        Conflict (before the current horizon), Unavailable.
        """
        ...

    async def compact_state(self, path: str, now: float) -> CompactResult:
        """Fold the stream's messages, read from its horizon to its tail, by ``(type, key)``
        into the live rows, append them as a snapshot (``snapshot-start``, one insert per
        row, ``snapshot-end``) and move the horizon to the snapshot's start, all in one
        transaction: a late reader downloads the live rows and what follows, never the
        history.

        Raises NotFound, Gone, Conflict (not JSON, not State Protocol messages, closed),
        Unavailable.
        """
        ...

    async def reap(self, now: float) -> int:
        """Remove expired streams and unreferenced soft-deleted ones; returns how many expired.

        Every removed stream is reported to the listener's ``deleted``.
        """
        ...

    async def compact(self, now: float, *, budget: int = COMPACT_PASS_BYTES) -> CompactionPass:
        """One compaction pass (the store also runs them on its own, every few seconds): merge
        the rows of streams closed or idle for the store's idle time, reading at most
        ``budget`` bytes, each stream in one transaction. Bytes and offsets do not change.

        Raises Unavailable.
        """
        ...

    def set_listener(self, events: StoreEvents) -> None:
        """Register who hears of removals and of commits made by other processes."""

    def stats(self) -> StoreStats:
        """Counters since start."""
        ...

    async def ready(self) -> str | None:
        """None when the store can serve (storage reachable, schema current), else why not.

        Never raises; bounded by the store's own timeouts (``/readyz`` calls it).
        """
        ...
