"""The ``Store`` operations every backend shares, over group commit.

Writes queue an operation on the :class:`~relay.store.batching.Committer`, which hands each
batch to the backend's ``_apply`` (one transaction that runs the batch's plans,
:mod:`relay.store.engine.plan`). A create first resolves a fork sub-offset from a snapshot of
its source, outside the transaction (:func:`resolve_fork`). ``head`` is one policy (pending
touches, visibility, TTL slides) over the backend's ``_lookup``. A backend supplies
``_apply``, ``_lookup`` and ``read``, and the rest of ``Store`` (lifecycle, ``tracked``,
``inheriting``, ``ready``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from protocol.append import AppendRequest
from protocol.create import CreateRequest, ForkRequest, needs_source_bytes
from protocol.errors import BadRequest, NotFound, ProtocolError
from protocol.headers import is_json
from protocol.jsonmode import SEPARATOR
from protocol.lifecycle import check_visible
from protocol.model import StreamMeta
from relay.store.base import AppendResult, CompactResult, CreateResult, Revocation, StoreEvents
from relay.store.batching import (
    AppendOp,
    Committer,
    CompactOp,
    CreateOp,
    DeleteOp,
    ReapOp,
    RetainOp,
    Touches,
    WriteOp,
)
from relay.store.engine.needs import Need
from relay.store.engine.plan import Batch, plan, run, run_async


class Engine:
    """Group commit and the operations that only queue a plan (see the module docstring)."""

    def __init__(
        self,
        max_batch_ops: int,
        max_batch_bytes: int,
        commit_interval: float,
        max_fork_scan: int,
        commit_pipeline: int = 1,
    ) -> None:
        self._committer = Committer(
            self._apply,
            max_ops=max_batch_ops,
            max_bytes=max_batch_bytes,
            min_interval=commit_interval,
            depth=commit_pipeline,
        )
        self._max_fork_scan = max_fork_scan
        self._events: StoreEvents | None = None

    # -- what a backend supplies ----------------------------------------------------------

    async def _apply(self, batch: list[WriteOp], touches: Touches) -> list[Any]:
        """Run the batch in one transaction (``run_batch``/``run_batch_async``); one outcome
        per operation, a value or the ``ProtocolError`` it was refused with."""
        raise NotImplementedError

    async def _lookup(self, path: str, now: float) -> StreamMeta | None:
        """The stream's committed state, or None if there is none."""
        raise NotImplementedError

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        raise NotImplementedError

    # -- Store ---------------------------------------------------------------------------

    def set_listener(self, events: StoreEvents) -> None:
        """Hears commits (through the committer) and removals (from the backend)."""
        self._events = events
        self._committer.events = events

    async def create(self, request: CreateRequest, now: float) -> CreateResult:
        request = await resolve_fork(
            request,
            lambda path: self.head(path, now, touch=False),
            self.read,
            self._max_fork_scan,
        )
        result: CreateResult = await self._committer.submit(
            CreateOp(request, now), len(request.body)
        )
        return result

    async def append(self, path: str, request: AppendRequest, now: float) -> AppendResult:
        result: AppendResult = await self._committer.submit(
            AppendOp(path, request, now), len(request.data)
        )
        return result

    async def delete(self, path: str, now: float, revoke: Revocation | None = None) -> StreamMeta:
        result: StreamMeta = await self._committer.submit(DeleteOp(path, now, revoke))
        return result

    async def reap(self, now: float) -> int:
        result: int = await self._committer.submit(ReapOp(now))
        return result

    async def retain(self, path: str, offset: int, now: float) -> StreamMeta:
        result: StreamMeta = await self._committer.submit(RetainOp(path, offset, now))
        return result

    async def compact_state(self, path: str, now: float) -> CompactResult:
        result: CompactResult = await self._committer.submit(CompactOp(path, now))
        return result

    async def head(self, path: str, now: float, *, touch: bool) -> StreamMeta:
        meta = await self._lookup(path, now)
        if meta is None:
            raise NotFound()
        pending = self._committer.pending_touch(path, meta.stream_id)
        if pending is not None:
            meta = with_access(meta, pending)
        check_visible(meta, now)
        if touch and meta.ttl is not None:
            self._committer.touch(path, meta.stream_id, now)
            return with_access(meta, now)
        return meta


def with_access(meta: StreamMeta, when: float) -> StreamMeta:
    return replace(meta, last_access=max(meta.last_access, when))


def run_batch(batch: Batch, ops: list[WriteOp], answer: Callable[[Need], Any]) -> list[Any]:
    """Every operation's plan in order, answered synchronously; a refusal is its outcome."""
    outcomes: list[Any] = []
    for op in ops:
        try:
            outcomes.append(run(plan(batch, op), answer))
        except ProtocolError as exc:
            outcomes.append(exc)
    return outcomes


async def run_batch_async(
    batch: Batch, ops: list[WriteOp], answer: Callable[[Need], Awaitable[Any]]
) -> list[Any]:
    """:func:`run_batch`, answered with awaits."""
    outcomes: list[Any] = []
    for op in ops:
        try:
            outcomes.append(await run_async(plan(batch, op), answer))
        except ProtocolError as exc:
            outcomes.append(exc)
    return outcomes


FORK_SCAN_WINDOW = 64 * 1024
Head = Callable[[str], Awaitable[StreamMeta]]
Read = Callable[[StreamMeta, int, int], Awaitable[bytes]]


async def resolve_fork(
    request: CreateRequest, head: Head, read: Read, max_scan: int
) -> CreateRequest:
    """Turn a fork sub-offset into an absolute fork point before the commit transaction.

    Committed bytes never change, so the point found in a snapshot of the source stays right;
    the transaction only checks that the source is still that stream. This keeps reading the
    source (bounded by ``max_scan`` bytes) out of the transaction that locks it.
    """
    fork = request.fork
    if fork is None or not needs_source_bytes(request):
        return request
    try:
        source = await head(fork.source_path)
    except ProtocolError:
        return request  # missing, expired or deleted: the transaction reports it
    anchor = source.tail if fork.offset is None else fork.offset
    if anchor > source.tail:
        return request  # the transaction refuses it with the spec's error
    point = await _sub_offset_point(source, anchor, fork.sub_offset, read, max_scan)
    if point is None:
        raise BadRequest("fork_sub_offset_overshoot", "Stream-Fork-Sub-Offset is past the data")
    resolved = ForkRequest(fork.source_path, point, 0, source_id=source.stream_id)
    return replace(request, fork=resolved)


async def _sub_offset_point(
    source: StreamMeta, anchor: int, sub_offset: int, read: Read, max_scan: int
) -> int | None:
    """Where ``sub_offset`` bytes (or, in JSON mode, messages) past ``anchor`` end."""
    if not is_json(source.content_type):
        point = anchor + sub_offset
        return point if point <= source.tail else None
    position, remaining = anchor, sub_offset
    while True:
        if position >= source.tail:
            return None
        if position - anchor >= max_scan:
            raise BadRequest("fork_sub_offset_too_far", f"sub-offset scans past {max_scan} bytes")
        window = await read(source, position, min(source.tail, position + FORK_SCAN_WINDOW))
        cut = 0
        while remaining:
            newline = window.find(SEPARATOR, cut)
            if newline < 0:
                break
            cut, remaining = newline + 1, remaining - 1
        if remaining == 0:
            return position + cut
        position += len(window)
