"""How a batch is planned: every write operation once, as a generator over typed needs.

Each operation (:func:`create`, :func:`append`, :func:`delete`, :func:`retain`, :func:`reap`)
is the protocol's rules applied to rows it asks for: it yields a need
(:mod:`relay.store.engine.needs`: load a stream, a producer's state, the forks inheriting
bytes, ...), is sent the answer, and returns the typed outcome or raises the
``ProtocolError`` it refuses with. Small writes (new streams, removals) are needs too; appends
are staged in the :class:`Batch` (one row per stream, stream updates, producer states) and
written by a ``Flush`` or at the end of the batch. No I/O happens here: SQLite answers the
needs on its writer thread (:func:`run`), Postgres with awaits (:func:`run_async`), and the
Postgres guarded write answers them from what the relay knows, without the database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import orjson

from protocol.append import AppendPlan, AppendRequest, decide_append
from protocol.create import CreateRequest, plan_create
from protocol.errors import Conflict, NotFound, StreamDiverged, Unavailable
from protocol.headers import is_json
from protocol.jsonmode import SEPARATOR, split_messages
from protocol.lifecycle import check_visible, is_expired
from protocol.model import ProducerState, StreamMeta
from protocol.retention import plan_horizon
from protocol.state import NotStateProtocol, fold, snapshot
from relay.store.base import AppendResult, CompactResult, CreateResult, Revocation
from relay.store.batching import (
    AppendOp,
    CompactOp,
    CreateOp,
    DeleteOp,
    ReapOp,
    RetainOp,
    WriteOp,
)
from relay.store.common import StagedRows, after_append
from relay.store.engine.needs import (
    Erase,
    Expired,
    Flush,
    Inherited,
    Inheriting,
    Insert,
    Load,
    Need,
    Orphans,
    Producer,
    PurgeChain,
    ReadRange,
    Retain,
    RetentionLimit,
    SoftDelete,
)

T = TypeVar("T")
Plan = Generator[Need, Any, T]
"""An operation's plan: yields needs, is sent their answers, returns the outcome."""


@dataclass
class Batch:
    """What one transaction has staged, and what caches and listeners learn once it commits."""

    rows: StagedRows = field(default_factory=StagedRows)
    stream_updates: dict[int, StreamMeta] = field(default_factory=dict)  # appended or closed
    producer_writes: dict[tuple[int, str], ProducerState] = field(default_factory=dict)
    metas: dict[str, StreamMeta] = field(default_factory=dict)  # streams as the batch leaves them
    gone: dict[str, int] = field(default_factory=dict)  # path -> id of streams it removed
    producers: dict[tuple[int, str], ProducerState | None] = field(default_factory=dict)
    locked: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id -> (tail, closed)
    moved: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id -> (tail, closed)
    removed: list[int] = field(default_factory=list)  # ids deleted, soft-deleted or expired
    retained: list[int] = field(default_factory=list)  # ids whose retention horizon moved
    created: set[int] = field(default_factory=set)  # no producer has state on these yet
    diverged: set[int] | frozenset[int] = frozenset()  # the database lost appends of these
    written: int = 0  # rows written (the backend counts them as it flushes)
    appends: int = 0  # operations that wrote data

    def keep(self, meta: StreamMeta) -> None:
        self.metas[meta.path] = meta
        self.gone.pop(meta.path, None)

    def forget(self, stream_id: int, path: str) -> None:
        known = self.metas.get(path)
        if known is None or known.stream_id == stream_id:
            self.metas.pop(path, None)
            self.gone[path] = stream_id
        self.moved.pop(stream_id, None)


def plan(batch: Batch, op: WriteOp) -> Plan[Any]:
    """The plan of one queued operation."""
    match op:
        case AppendOp(path, request, now):
            return append(batch, path, request, now)
        case CreateOp(request, now):
            return create(batch, request, now)
        case DeleteOp(path, now, revoke):
            return delete(batch, path, now, revoke)
        case ReapOp(now):
            return reap(batch, now)
        case RetainOp(path, offset, now):
            return retain(batch, path, offset, now)
        case CompactOp(path, now):
            return compact_state(batch, path, now)


def append(batch: Batch, path: str, request: AppendRequest, now: float) -> Plan[AppendResult]:
    """The protocol's decision (``decide_append``) against the batch's view of the stream,
    staged: stream update, producer state, the data row and the stream's new tail."""
    meta = batch.metas.get(path)
    if meta is None:  # not locked at the batch's start: created meanwhile, or missing
        meta = yield Load(path)
        if meta is None:
            raise NotFound()
        batch.keep(meta)
        batch.locked[meta.stream_id] = (meta.tail, meta.closed)
    if meta.stream_id in batch.diverged:
        raise StreamDiverged()
    producer_state = None
    if request.producer is not None:
        key = (meta.stream_id, request.producer.producer_id)
        if key not in batch.producers:
            batch.producers[key] = yield Producer(*key)
        producer_state = batch.producers[key]
    check_visible(meta, now)
    decided = decide_append(meta, producer_state, request)
    if not decided.write:
        return AppendResult(meta, decided, meta.tail)
    after = after_append(meta, decided, now)
    batch.keep(after)
    batch.stream_updates[meta.stream_id] = after
    if request.producer is not None and decided.producer_state is not None:
        key = (meta.stream_id, request.producer.producer_id)
        batch.producers[key] = batch.producer_writes[key] = decided.producer_state
    batch.moved[meta.stream_id] = (after.tail, after.closed)
    if decided.data:
        if not batch.rows.stage(meta.stream_id, meta.tail, decided.data):
            yield Flush()  # a gap from the staged row: write that one first
            batch.rows.stage(meta.stream_id, meta.tail, decided.data)
        batch.appends += 1
    return AppendResult(after, decided, meta.tail)


def create(batch: Batch, request: CreateRequest, now: float) -> Plan[CreateResult]:
    """Create the stream (a fork from its locked source), or confirm an identical one."""
    yield Flush()  # a fork may read what this batch appended
    existing = yield Load(request.path)
    if existing is not None and not existing.soft_deleted and is_expired(existing, now):
        yield from remove(batch, existing)
        existing = None
    source = None
    if request.fork is not None:
        source = yield Load(request.fork.source_path)
        if source is None or (not source.soft_deleted and is_expired(source, now)):
            raise NotFound("fork source not found")
    outcome = plan_create(existing, source, request)
    if isinstance(outcome, StreamMeta):
        return CreateResult(outcome, created=False)
    meta: StreamMeta | None = yield Insert(request.path, outcome, now)
    if meta is None:  # another relay created it concurrently: judge against theirs
        raced = yield Load(request.path)
        if raced is None:
            raise Unavailable("stream creation raced with a delete; retry")
        again = plan_create(raced, source, request)
        if not isinstance(again, StreamMeta):
            raise Conflict("stream_exists", "a stream with another configuration exists here")
        return CreateResult(again, created=False)
    batch.keep(meta)
    batch.created.add(meta.stream_id)
    if not outcome.data:
        return CreateResult(meta, created=True)
    staged = batch.rows.stage(meta.stream_id, outcome.fork_offset, outcome.data)
    assert staged  # nothing was staged since the Flush above
    batch.appends += 1
    body = AppendPlan(True, outcome.data, outcome.closed, None, None, None)
    return CreateResult(meta, True, AppendResult(meta, body, outcome.fork_offset))


def delete(
    batch: Batch, path: str, now: float, revoke: Revocation | None = None
) -> Plan[StreamMeta]:
    """Remove the stream; with a revocation, first the forks inheriting the revoked bytes (all
    of them, or none and Conflict naming them)."""
    meta = yield from _visible(batch, path, now)
    if revoke is not None:
        found: list[tuple[int, str]] = yield Inheriting(meta.stream_id, revoke.offset)
        refused = sorted(fork for _, fork in found if fork not in revoke.forks)
        if refused:
            names = ", ".join(refused[:5]) + (" ..." if len(refused) > 5 else "")
            raise Conflict("inherited_by_fork", f"forks inherit these bytes: {names}")
        if found:
            yield Erase(tuple(stream_id for stream_id, _ in found))
            for stream_id, fork in found:
                batch.removed.append(stream_id)
                batch.forget(stream_id, fork)
    yield from remove(batch, meta)
    return meta


def retain(batch: Batch, path: str, offset: int, now: float) -> Plan[StreamMeta]:
    """Advance the horizon; delete the rows nobody can read now (before it and before every
    descendant fork's own horizon)."""
    meta = yield from _visible(batch, path, now)
    before: bytes = (yield ReadRange(meta, offset - 1, offset)) if offset > 0 else b""
    horizon = plan_horizon(meta, offset, before)
    if horizon is None:
        return meta
    floor: int | None = yield RetentionLimit(meta.stream_id)
    yield Retain(meta.stream_id, horizon, horizon if floor is None else min(horizon, floor))
    after = replace(meta, retained_from=horizon)
    batch.keep(after)
    batch.retained.append(meta.stream_id)
    return after


def compact_state(batch: Batch, path: str, now: float) -> Plan[CompactResult]:
    """Fold the history from the horizon into its live rows, append them as a snapshot and move
    the horizon to the snapshot's start (``Store.compact_state``). Readers past the old tail
    read the snapshot as new messages; an insert of a row they already hold, unchanged, is an
    update to them, so they see no row twice."""
    meta = yield from _visible(batch, path, now)
    if not is_json(meta.content_type):
        raise Conflict("not_state_protocol", "only a JSON stream of State Protocol messages folds")
    history: bytes = yield ReadRange(meta, meta.retained_from, meta.tail)
    messages = [orjson.loads(text) for text in split_messages(history)]
    try:
        rows = fold(messages)
    except NotStateProtocol as exc:
        raise Conflict("not_state_protocol", f"the stream is not State Protocol: {exc}") from None
    body = b"".join(orjson.dumps(message) + SEPARATOR for message in snapshot(rows))
    appended = yield from append(batch, path, AppendRequest(meta.content_type, body), now)
    horizon = meta.tail  # where the snapshot starts: a message boundary, as every tail
    floor: int | None = yield RetentionLimit(meta.stream_id)
    yield Retain(meta.stream_id, horizon, horizon if floor is None else min(horizon, floor))
    after = replace(appended.meta, retained_from=horizon)
    batch.keep(after)
    batch.retained.append(meta.stream_id)
    snapshot_result = replace(appended, meta=after)
    return CompactResult(after, snapshot_result, len(messages), len(rows), len(history))


def reap(batch: Batch, now: float) -> Plan[int]:
    """Remove expired streams, then purge soft-deleted ones no fork references; returns how
    many expired."""
    yield Flush()
    expired: list[StreamMeta] = yield Expired(now)
    for meta in expired:
        yield from remove(batch, meta)
    orphans: list[int] = yield Orphans()
    for stream_id in orphans:
        yield from purge(batch, stream_id)
    return len(expired)


def remove(batch: Batch, meta: StreamMeta) -> Plan[None]:
    """Soft-delete while forks reference the stream, erasing every byte no fork inherits;
    otherwise purge and cascade."""
    batch.removed.append(meta.stream_id)
    inherited: int | None = yield Inherited(meta.stream_id)
    if inherited is None:
        yield from purge(batch, meta.stream_id)
        return
    yield SoftDelete(meta.stream_id, inherited)
    batch.forget(meta.stream_id, meta.path)
    batch.keep(replace(meta, soft_deleted=True))


def purge(batch: Batch, stream_id: int) -> Plan[None]:
    """The stream and each soft-deleted source it leaves without forks, up the chain."""
    doomed: list[tuple[int, str]] = yield PurgeChain(stream_id)
    yield Erase(tuple(doomed_id for doomed_id, _ in doomed))
    for doomed_id, path in doomed:
        batch.forget(doomed_id, path)


def _visible(batch: Batch, path: str, now: float) -> Plan[StreamMeta]:
    yield Flush()
    meta: StreamMeta | None = yield Load(path)
    if meta is None:
        raise NotFound()
    check_visible(meta, now)
    return meta


def run(steps: Plan[T], answer: Callable[[Need], Any]) -> T:
    """Drive a plan synchronously (SQLite's writer thread)."""
    try:
        need = next(steps)
        while True:
            need = steps.send(answer(need))
    except StopIteration as done:
        result: T = done.value
        return result


async def run_async(steps: Plan[T], answer: Callable[[Need], Awaitable[Any]]) -> T:
    """Drive a plan with awaits (Postgres)."""
    try:
        need = next(steps)
        while True:
            need = steps.send(await answer(need))
    except StopIteration as done:
        result: T = done.value
        return result
