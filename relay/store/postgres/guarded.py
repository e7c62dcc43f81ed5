"""The one-round-trip path: a batch of appends planned against what this relay knows, written
as one guarded statement without locks, and the divergence check that keeps it honest.

:func:`plan_guarded` runs the engine's own append plans, answering their needs from
:class:`~relay.store.postgres.known.OwnedStreams` (streams this relay wrote last, as it wrote
them) instead of the database; a need it cannot answer so means the batch takes the locking
path. The guarded write (``guarded_write`` in ``sql/postgres/queries.sql``) then checks in the
database that every stream still has the tail the plan used.
"""

from __future__ import annotations

from typing import Any

import structlog

from protocol.errors import ProtocolError, StreamDiverged
from protocol.model import StreamMeta
from relay.store.base import AppendResult
from relay.store.batching import AppendOp, Touches, WriteOp
from relay.store.engine import needs
from relay.store.engine.plan import Batch, append, run
from relay.store.postgres.known import Known, OwnedStreams

log = structlog.get_logger("relay.postgres")


class _Unknown(Exception):
    """The relay's own view cannot answer: lock."""


def plan_guarded(
    ops: list[WriteOp], touches: Touches, owned: OwnedStreams, diverged: set[int]
) -> tuple[Batch, list[Any], dict[int, int]] | None:
    """The batch, its outcomes and the tail each stream must still have, if what this relay
    knows is enough to skip the locks: only appends that all write, to streams it wrote last
    (no TTL, expiry or touches: other relays' reads change those), with every producer's
    state known. None: lock."""
    if touches:
        return None
    batch = Batch(diverged=diverged)
    current = ""  # the path of the append being planned

    def answer(need: needs.Need) -> Any:
        match need:
            case needs.Load(path):
                known = owned.by_path.get(path)
                if known is None or known.meta.stream_id in diverged:
                    raise _Unknown
                meta = known.meta
                if meta.ttl is not None or meta.expires_at is not None or meta.soft_deleted:
                    raise _Unknown
                return meta
            case needs.Producer(stream_id, producer_id):
                known = owned.by_path.get(current)
                if known is None or known.meta.stream_id != stream_id:
                    raise _Unknown
                found, state = known.producer(producer_id)
                if not found:
                    raise _Unknown
                return state
        raise _Unknown  # a Flush: more than one statement's worth of rows

    outcomes: list[Any] = []
    for op in ops:
        if type(op) is not AppendOp:
            return None
        current = op.path
        try:
            result: AppendResult = run(append(batch, op.path, op.request, op.now), answer)
        except (_Unknown, ProtocolError):
            return None  # a refusal from a view that may be old: decide under the lock
        if not result.plan.write:
            return None
        outcomes.append(result)
    expected = {stream_id: tail for stream_id, (tail, _) in batch.locked.items()}
    return batch, outcomes, expected


ACKNOWLEDGED_LIMIT = 100_000
"""Streams whose acknowledged writes this relay remembers (the oldest are forgotten first)."""


class Divergence:
    """Streams the database lost acknowledged writes of (a failover to a standby that was
    behind): found when a locked row's tail is below what this relay committed or heard, or
    when a stream this relay created or appended to is missing and no delete removed it (a
    removal leaves a tombstone in ``relay_removed``, so a delete by any relay, heard or not,
    is told apart from a loss)."""

    def __init__(self, owned: OwnedStreams, known: Known) -> None:
        self.diverged: set[int] = set()
        self.missing_paths: set[str] = set()  # paths whose stream the database lost
        self._owned = owned
        self._known = known
        # path -> id of the stream there this relay created or wrote: kept across LISTEN
        # outages and failovers, which is when it matters.
        self._acknowledged: dict[str, int] = {}

    @property
    def count(self) -> int:
        """Streams found diverged: behind, or missing."""
        return len(self.diverged) + len(self.missing_paths)

    def committed(self, batch: Batch) -> None:
        """Remember the streams a committed batch created or wrote; forget those it removed."""
        for path, stream_id in batch.gone.items():
            if self._acknowledged.get(path) == stream_id:
                del self._acknowledged[path]
        for meta in batch.metas.values():
            sid = meta.stream_id
            if sid in batch.moved or sid in batch.created:
                self._acknowledged.pop(meta.path, None)  # re-inserted last: the newest
                if len(self._acknowledged) >= ACKNOWLEDGED_LIMIT:
                    del self._acknowledged[next(iter(self._acknowledged))]
                self._acknowledged[meta.path] = sid

    def acknowledged(self, path: str) -> int | None:
        """The stream at ``path`` this relay created or wrote, if it remembers one."""
        return self._acknowledged.get(path)

    def missing(self, path: str, stream_id: int, removed: bool) -> None:
        """``path`` has no stream in the database, though this relay acknowledged writes to
        ``stream_id`` there. ``removed``: a tombstone says a delete (or expiry) took it, so it
        is forgotten. Otherwise the database lost it: refuse writes there, creates included
        (a new stream would hand out offsets already acknowledged for other bytes)."""
        if removed:
            if self._acknowledged.get(path) == stream_id:
                del self._acknowledged[path]
            return
        if path not in self.missing_paths:
            self.missing_paths.add(path)
            log.error(
                "a stream this relay acknowledged is missing from the database; "
                "refusing writes to its path",
                path=path,
                stream_id=stream_id,
            )
        raise StreamDiverged()

    def check(self, meta: StreamMeta) -> None:
        """Tails never move back: a row behind this relay's views of the same stream marks it
        diverged, and writes to it are refused from now on, loudly."""
        owned = self._owned.by_path.get(meta.path)
        views = (owned.meta if owned is not None else None, self._known.by_path.get(meta.path))
        seen = [v.tail for v in views if v is not None and v.stream_id == meta.stream_id]
        if meta.stream_id in self.diverged or not seen or max(seen) <= meta.tail:
            return
        self.diverged.add(meta.stream_id)
        log.error(
            "database is behind what this relay acknowledged; refusing writes to the stream",
            path=meta.path,
            acknowledged_tail=max(seen),
            database_tail=meta.tail,
        )
