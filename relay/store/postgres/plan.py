"""The batch planner: what one transaction stages and what its listeners learn, without I/O.

The locking path and the one-round-trip path both plan appends with :func:`stage_append` (the
protocol's decision, ``protocol.append.decide_append``, applied to the batch's view); a NOTIFY
payload carries each moved stream's commit record to other relays, and :func:`parse_payload`
reads it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from protocol.append import AppendRequest, decide_append
from protocol.lifecycle import check_visible
from protocol.model import ProducerState, StreamMeta
from relay.store.base import AppendResult
from relay.store.common import StagedRows, after_append

NOTIFY_LIMIT = 7900  # Postgres caps a payload at 8000 bytes


@dataclass
class Batch:
    """What one transaction has staged, and what the listeners learn once it commits."""

    rows: StagedRows = field(default_factory=StagedRows)
    moved: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id -> (tail, closed)
    removed: list[int] = field(default_factory=list)  # ids deleted, soft-deleted or expired
    retained: list[int] = field(default_factory=list)  # ids whose retention horizon moved
    metas: dict[str, StreamMeta] = field(default_factory=dict)  # locked this transaction
    producers: dict[tuple[int, str], ProducerState | None] = field(default_factory=dict)
    producer_writes: dict[tuple[int, str], ProducerState] = field(default_factory=dict)
    stream_updates: dict[int, StreamMeta] = field(default_factory=dict)
    locked: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id -> (tail, closed)
    created: set[int] = field(default_factory=set)  # no producer has state on these yet
    written: int = 0


def stage_append(
    state: Batch,
    path: str,
    meta: StreamMeta,
    producer_state: ProducerState | None,
    request: AppendRequest,
    now: float,
) -> AppendResult:
    """The protocol's decision on one append against the batch's view, staged into the batch
    (stream update, producer state, NOTIFY entry); the caller stages the data row. Pure: the
    locking and the guarded path plan with it alike. Raises the ProtocolError it refuses with."""
    check_visible(meta, now)
    plan = decide_append(meta, producer_state, request)
    if not plan.write:
        return AppendResult(meta, plan, meta.tail)
    after = after_append(meta, plan, now)
    state.metas[path] = after
    state.stream_updates[meta.stream_id] = after
    if request.producer is not None and plan.producer_state is not None:
        key = (meta.stream_id, request.producer.producer_id)
        state.producers[key] = plan.producer_state
        state.producer_writes[key] = plan.producer_state
    state.moved[meta.stream_id] = (after.tail, after.closed)
    return AppendResult(after, plan, meta.tail)


def parse_payload(body: str) -> Iterator[tuple[int, int, str]]:
    for entry in body.split(","):
        parts = entry.split(":")
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            yield int(parts[0]), int(parts[1]), parts[2]


def notify_payload(origin: str, state: Batch) -> str:
    """``origin|id:tail:flag,...``; flag 0 open, 1 closed, d removed, r horizon moved; ``*``:
    re-check all."""
    entries = [f"{sid}:{tail}:{int(closed)}" for sid, (tail, closed) in state.moved.items()]
    entries += [f"{sid}:0:d" for sid in state.removed]
    entries += [f"{sid}:0:r" for sid in state.retained]
    text = f"{origin}|" + ",".join(entries)
    return text if len(text) <= NOTIFY_LIMIT else f"{origin}|*"
