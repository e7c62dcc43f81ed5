"""What a plan asks of the database: one typed request per read or write it needs.

A plan (:mod:`relay.store.engine.plan`) yields these and is sent back each one's answer; a
backend's transaction answers them (SQLite on its writer thread, Postgres with awaits). Reads
come first in this list, then writes; each says what it answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.create import CreatePlan
from protocol.model import StreamMeta


@dataclass(frozen=True, slots=True)
class Load:
    """The stream at ``path`` with its fork segments, or None; locked (on Postgres) until the
    transaction ends."""

    path: str


@dataclass(frozen=True, slots=True)
class Producer:
    """A producer's stored state (``ProducerState``), or None."""

    stream_id: int
    producer_id: str


@dataclass(frozen=True, slots=True)
class Inheriting:
    """``[(id, path)]`` of every stream that reads ``stream_id``'s bytes at or past ``offset``:
    forks made past it and all their descendants."""

    stream_id: int
    offset: int


@dataclass(frozen=True, slots=True)
class ReadRange:
    """The bytes ``[start, end)`` of ``meta``, as this transaction sees them."""

    meta: StreamMeta
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class RetentionLimit:
    """The lowest horizon among the stream's descendant forks (None: it has none)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Inherited:
    """How far the stream's forks read into it (the largest ``fork_offset``; None: no forks)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Expired:
    """Streams (not soft-deleted) whose expiry or TTL has passed at ``now``."""

    now: float


@dataclass(frozen=True, slots=True)
class Orphans:
    """Ids of soft-deleted streams no fork references any more."""


@dataclass(frozen=True, slots=True)
class Flush:
    """Write everything the batch has staged (rows, stream updates, producer states) now:
    what comes next reads the database, or the staged row cannot grow."""


@dataclass(frozen=True, slots=True)
class Insert:
    """Insert the stream ``plan`` describes; answers its row (``StreamMeta`` with segments),
    or None when another relay created ``path`` first."""

    path: str
    plan: CreatePlan
    now: float

    def params(self) -> tuple[object, ...]:
        """The row's values in the order both backends' ``insert_stream`` takes them."""
        plan, source = self.plan, self.plan.source
        return (
            self.path,
            plan.content_type,
            plan.fork_offset + len(plan.data),
            plan.closed,
            plan.expiry.ttl,
            plan.expiry.expires_at,
            self.now,
            source.stream_id if source else None,
            source.path if source else None,
            plan.fork_offset,
            plan.retained_from,
        )


@dataclass(frozen=True, slots=True)
class Erase:
    """Delete these streams, their rows and their producers outright."""

    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SoftDelete:
    """Mark the stream soft-deleted and erase its bytes from ``inherited`` on (no fork reads
    them): rows beyond go, the row across is cut there."""

    stream_id: int
    inherited: int


@dataclass(frozen=True, slots=True)
class PurgeChain:
    """``[(id, path)]`` a purge of ``stream_id`` removes: the stream, then each soft-deleted
    source left with no other fork, up the chain."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Retain:
    """Set the stream's horizon and delete its rows ending at or before ``upto``."""

    stream_id: int
    horizon: int
    upto: int


Need = (
    Load
    | Producer
    | Inheriting
    | ReadRange
    | RetentionLimit
    | Inherited
    | Expired
    | Orphans
    | Flush
    | Insert
    | Erase
    | SoftDelete
    | PurgeChain
    | Retain
)
