"""Group commit, shared by every store: queue operations, apply them in batches, then answer.

Requests queue typed operations and await their futures. One loop takes everything queued (up
to the batch limits), hands it to the store's ``apply`` (one transaction), and resolves each
future with its outcome only after ``apply`` returns, i.e. after the commit. There is no fixed
delay: a lone operation commits at once, and under load the next batch fills while the previous
one commits. Optionally (``min_interval``, ``--commit-interval``) batches start at most that often:
a write arriving after a quiet spell still commits at once, but a steady trickle (chat tokens at
light load) is gathered into fewer, larger commits, at the cost of up to that much latency.
TTL "touches" from reads ride along with the next batch, or go alone once the oldest has waited
``TOUCH_FLUSH_SECONDS``, so reads never wait for a write and never cause one of their own while
writes are flowing.

Once a batch commits, every append in it that wrote (and every create with a body, as the
append of that body) goes to ``events`` (the relay's commit
sink: hub, metrics, subscriptions) in commit order, before any appender resumes, and whether
or not the client that sent it is still waiting.

Pipelining (``depth`` > 1, Postgres's ``--commit-pipeline``): while batches are committing,
another may start on its own connection, so a request waits for one commit rather than for
the rest of the one in flight and then its own. Only appends to streams no batch in flight
touches may join, taken in queue order, and never past a queued operation of another kind
(create, delete, reap, retention), which waits until nothing is in flight and commits as
today; touches go only with a batch that starts alone. So batches in flight never share a
stream, and each stream's commits (and wakes) stay in order.

Isolation: a batch whose transaction fails for a reason other than a lost database is re-run
one operation per transaction, so one poisonous request fails alone (answered 500 without
detail) and never takes the appends batched beside it down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from protocol.append import AppendRequest
from protocol.create import CreateRequest
from protocol.errors import StorageFull, Unavailable
from relay.store.base import (
    BATCH_OPS_BOUNDS,
    COMMIT_SECONDS_BOUNDS,
    AppendResult,
    CompactResult,
    CreateResult,
    Distribution,
    Revocation,
    StoreEvents,
    StoreStats,
)

log = structlog.get_logger("relay.store")

TOUCH_FLUSH_SECONDS = 0.2
FULL_HOLD_SECONDS = 5.0
"""How long a refusal for lack of space keeps ``/readyz`` at 503 when no write follows."""

Touches = dict[str, tuple[int, float]]
"""path -> (stream id, when it was read): TTL slides to apply."""


@dataclass(frozen=True, slots=True)
class CreateOp:
    request: CreateRequest
    now: float


@dataclass(frozen=True, slots=True)
class AppendOp:
    path: str
    request: AppendRequest
    now: float


@dataclass(frozen=True, slots=True)
class DeleteOp:
    path: str
    now: float
    revoke: Revocation | None = None


@dataclass(frozen=True, slots=True)
class ReapOp:
    now: float


@dataclass(frozen=True, slots=True)
class RetainOp:
    path: str
    offset: int
    now: float


@dataclass(frozen=True, slots=True)
class CompactOp:
    """Fold a State Protocol stream's history into a snapshot (``Store.compact_state``)."""

    path: str
    now: float


WriteOp = CreateOp | AppendOp | DeleteOp | ReapOp | RetainOp | CompactOp
"""One queued write; stores dispatch on its type with ``match``."""


class InternalError(Exception):
    """An operation failed for a reason that is neither the client's nor the database's
    availability (a bug, a constraint the validation missed). Answered 500 without detail."""


@dataclass(slots=True)
class _Pending:
    op: WriteOp
    future: asyncio.Future[Any]
    size: int


Apply = Callable[[list[WriteOp], Touches], Awaitable[list[Any]]]
"""Runs a batch in one transaction; returns one outcome (value or exception) per op.

Raises Unavailable when the database is unreachable; anything else it raises means the
transaction failed as a whole and nothing of it was committed.
"""


class Committer:
    """The batching loop (see the module docstring)."""

    def __init__(
        self,
        apply: Apply,
        *,
        max_ops: int,
        max_bytes: int,
        min_interval: float = 0.0,
        depth: int = 1,
    ) -> None:
        self._apply = apply
        self._min_interval = min_interval
        self._depth = max(1, depth)
        self._flights: dict[asyncio.Task[None], list[_Pending]] = {}  # batches committing
        self._busy: set[str] = set()  # paths the batches in flight append to
        self._exclusive = False  # a batch in flight holds more than appends: nothing joins it
        self._crashed: BaseException | None = None
        self._last_start = float("-inf")
        self._max_ops = max_ops
        self._max_bytes = max_bytes
        self._queue: list[_Pending] = []
        self._committing: list[_Pending] = []  # the batch now in its transaction (depth 1)
        self.touches: Touches = {}
        self._touch_deadline = 0.0
        self._inflight: Touches = {}  # touches in the transaction now being committed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._dead: BaseException | None = None
        self.commits = 0
        self.unavailable = 0  # operations answered 503 (database unreachable)
        self.storage_full = 0  # operations refused for lack of space (503 too)
        self._full_since: tuple[str, float] | None = None  # the last refusal, until a commit
        self.failed = 0  # transactions that failed otherwise
        self.batch_ops = Distribution(BATCH_OPS_BOUNDS)
        self.commit_seconds = Distribution(COMMIT_SECONDS_BOUNDS)
        self.events: StoreEvents | None = None
        """Hears every committed append that wrote, before its future resolves."""

    @property
    def pending(self) -> int:
        return len(self._queue)

    def write_fault(self, hold: float = FULL_HOLD_SECONDS) -> str | None:
        """Why writes fail now, for ``/readyz``: a refusal for lack of space, until a write
        commits or ``hold`` seconds pass without another refusal. The hold ends even with no
        write: a load balancer that stops sending writes to a relay not ready would otherwise
        never let one through to find out that space came back."""
        fault = self._full_since
        if fault is None or time.monotonic() - fault[1] > hold:
            return None
        return f"writes refused: {fault[0]}"

    def stats(self) -> StoreStats:
        """The committer's counters; a store adds what only it knows (``dataclasses.replace``)."""
        return StoreStats(
            commits=self.commits,
            queue_depth=len(self._queue),
            unavailable=self.unavailable,
            storage_full=self.storage_full,
            failed=self.failed,
            batch_ops=self.batch_ops,
            commit_seconds=self.commit_seconds,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_guarded(), name="group-commit")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def submit(self, op: WriteOp, size: int = 0) -> Any:
        if self._closing:
            raise Unavailable("store is shutting down")
        if self._dead is not None:
            raise Unavailable("store is not committing")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(op, future, size))
        self._wake.set()
        return await future

    def touch(self, path: str, stream_id: int, when: float) -> None:
        """Slide a TTL with the next commit, or within ``TOUCH_FLUSH_SECONDS`` if none comes."""
        if not self.touches:
            self._touch_deadline = asyncio.get_running_loop().time() + TOUCH_FLUSH_SECONDS
            self._wake.set()  # the loop may be idle with no deadline to wait for
        self.touches[path] = (stream_id, when)

    def pending_touch(self, path: str, stream_id: int) -> float | None:
        """The latest access not yet committed (queued or in flight), so reads never miss it."""
        if not self.touches and not self._inflight:
            return None
        times = [
            entry[1]
            for entry in (self.touches.get(path), self._inflight.get(path))
            if entry is not None and entry[0] == stream_id
        ]
        return max(times) if times else None

    async def _run_guarded(self) -> None:
        """If the loop itself dies, nobody may wait for it: fail everyone at once."""
        try:
            await self._run()
        except BaseException as exc:
            self._dead = exc
            if isinstance(exc, Exception):
                log.exception("group commit loop died")
            flying = [pending for batch in self._flights.values() for pending in batch]
            for task in self._flights:
                task.cancel()
            for pending in [*self._committing, *flying, *self._queue]:
                if not pending.future.done():
                    pending.future.set_exception(Unavailable("store is not committing"))
            self._queue.clear()
            if not isinstance(exc, Exception):
                raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._crashed is not None:
                raise self._crashed
            if self._flights:  # depth > 1: join those in flight, or wait for one to land
                joining = self._take_joining() if len(self._flights) < self._depth else []
                if joining:
                    self._fly(joining, {})
                else:
                    await self._wait(None)  # a batch landing, or a new operation, wakes us
                continue
            if not self._queue:
                if self._closing and not self.touches:
                    return
                due = self._closing or (self.touches and loop.time() >= self._touch_deadline)
                if not due:
                    await self._wait(self._touch_deadline - loop.time() if self.touches else None)
                    continue
            if self._min_interval and self._queue and not self._closing:
                # Pace commits: wait out the interval since the last one began, unless a full
                # batch is already waiting.
                wait = self._last_start + self._min_interval - loop.time()
                if wait > 0 and len(self._queue) < self._max_ops:
                    await asyncio.sleep(wait)
            self._last_start = loop.time()
            batch = self._take()
            touches, self.touches = self.touches, {}
            if not batch and not touches:
                continue
            if self._depth == 1:
                self._inflight, self._committing = touches, batch
                await self._land(batch, touches)  # raises only if the loop must die
                self._inflight, self._committing = {}, []
            else:
                self._fly(batch, touches)

    async def _wait(self, timeout: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _fly(self, batch: list[_Pending], touches: Touches) -> None:
        """Commit ``batch`` beside the others in flight (depth > 1)."""
        paths = {p.op.path for p in batch if isinstance(p.op, AppendOp)}
        exclusive = bool(touches) or not all(isinstance(p.op, AppendOp) for p in batch)
        if exclusive:
            self._exclusive = True
            self._inflight = touches
        self._busy |= paths
        task = asyncio.create_task(self._land(batch, touches), name="group-commit-batch")
        self._flights[task] = batch

        def landed(done: asyncio.Task[None]) -> None:
            del self._flights[done]
            self._busy -= paths
            if exclusive:
                self._exclusive = False
                self._inflight = {}
            if not done.cancelled() and done.exception() is not None:
                self._crashed = done.exception()  # the loop dies with it, failing the rest
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(Unavailable("store is not committing"))
            self._wake.set()

        task.add_done_callback(landed)

    def _take_joining(self) -> list[_Pending]:
        """Queued appends that may commit beside the batches in flight, in queue order: none
        while one of those holds more than appends; else up to the first operation of another
        kind, skipping (with everything after them for the same stream) appends to streams in
        flight, within the batch limits."""
        if self._exclusive:
            return []
        taken: list[_Pending] = []
        rest: list[_Pending] = []
        held: set[str] = set()
        size = 0
        queue = self._queue
        for index, pending in enumerate(queue):
            op = pending.op
            if type(op) is not AppendOp or (
                taken and (len(taken) >= self._max_ops or size + pending.size > self._max_bytes)
            ):
                rest.extend(queue[index:])
                break
            if op.path in self._busy or op.path in held:
                held.add(op.path)
                rest.append(pending)
                continue
            taken.append(pending)
            size += pending.size
        self._queue = rest
        return taken

    async def _land(self, batch: list[_Pending], touches: Touches) -> None:
        """Commit one batch, answer its requests, then tell the sink.

        Both happen before any task runs (nothing here awaits after the commit), so a writer
        that reads right after its answer finds what the sink updated. Answering first puts
        the writers ahead of the readers the sink wakes: a commit to a stream with thousands
        of parked readers is acknowledged before they are answered, not after.
        """
        outcomes = await self._commit(batch, touches)  # raises only if the loop must die
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        events = self.events
        if events is None:
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            kind = type(outcome)
            if kind is AppendResult and outcome.plan.write and type(pending.op) is AppendOp:
                events.appended(pending.op.path, outcome)
            elif kind is CreateResult and outcome.initial is not None:
                events.appended(outcome.meta.path, outcome.initial)
            elif kind is CompactResult:
                events.appended(outcome.meta.path, outcome.snapshot)

    async def _commit(self, batch: list[_Pending], touches: Touches) -> list[Any]:
        """Outcomes for ``batch``; a failing batch is split so only the culprit fails."""
        ops = [pending.op for pending in batch]
        started = time.perf_counter()
        try:
            outcomes = await self._apply(ops, touches)
        except Unavailable as exc:  # the database is gone: every op gets 503, touches wait
            if isinstance(exc, StorageFull):
                self.storage_full += len(batch)
                if self._full_since is None:
                    log.error("storage full: refusing writes until one succeeds", reason=str(exc))
                self._full_since = (str(exc), time.monotonic())
            else:
                self.unavailable += len(batch)
            if not self._closing:
                for path, entry in touches.items():
                    self.touches.setdefault(path, entry)
            return [exc] * len(batch)
        except Exception:
            self.failed += 1
            if len(ops) <= 1 and not touches:
                log.exception("operation failed", op=type(ops[0]).__name__ if ops else None)
                return [InternalError("operation failed")] * len(ops)
            # Touches are dropped rather than retried: a poisonous one must not loop forever.
            log.warning("batch failed; retrying its operations one by one", ops=len(ops))
            return [(await self._commit([pending], {}))[0] for pending in batch]
        self.commit_seconds.observe(time.perf_counter() - started)
        if self._full_since is not None:
            self._full_since = None
            log.info("storage has room again: a write committed")
        self.commits += 1
        self.batch_ops.observe(len(batch))
        return outcomes

    def _take(self) -> list[_Pending]:
        taken, size = 0, 0
        for pending in self._queue:
            if taken and (taken >= self._max_ops or size + pending.size > self._max_bytes):
                break
            taken += 1
            size += pending.size
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch
