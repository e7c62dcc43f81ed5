"""Group commit, shared by every store: queue operations, apply them in batches, then answer.

Requests queue operations and await their futures. One loop takes everything queued (up to
the batch limits), hands it to the store's ``apply`` (one transaction), and resolves each
future with its outcome only after ``apply`` returns, i.e. after the commit. There is no fixed
delay: a lone operation commits at once, and under load the next batch fills while the previous
one commits. TTL "touches" from reads ride along with the next batch, or go alone after
``TOUCH_FLUSH_SECONDS``, so reads never wait for a write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import Unavailable

TOUCH_FLUSH_SECONDS = 0.2

Touches = dict[str, tuple[int, float]]
"""path -> (stream id, when it was read): TTL slides to apply."""


@dataclass
class Op:
    """One queued write: the store method to run, its arguments, and who awaits it."""

    kind: str
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    size: int = 0


Apply = Callable[[list[Op], Touches], Awaitable[list[Any]]]
"""Runs a batch in one transaction; returns one outcome (value or exception) per op."""


class Committer:
    """The batching loop. ``apply`` raising means the whole transaction failed."""

    def __init__(self, apply: Apply, *, max_ops: int, max_bytes: int) -> None:
        self._apply = apply
        self._max_ops = max_ops
        self._max_bytes = max_bytes
        self._queue: list[Op] = []
        self.touches: Touches = {}
        self._inflight: Touches = {}  # touches in the transaction now being committed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batch_sizes: list[int] = []
        self.commits = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def submit(self, kind: str, args: tuple[Any, ...], size: int = 0) -> Any:
        if self._closing:
            raise Unavailable("store is shutting down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(Op(kind, args, future, size))
        self._wake.set()
        return await future

    def touch(self, path: str, stream_id: int, when: float) -> None:
        self.touches[path] = (stream_id, when)
        self._wake.set()

    def pending_touch(self, path: str, stream_id: int) -> float | None:
        """The latest access not yet committed (queued or in flight), so reads never miss it."""
        times = [
            entry[1]
            for entry in (self.touches.get(path), self._inflight.get(path))
            if entry is not None and entry[0] == stream_id
        ]
        return max(times) if times else None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing and not self.touches:
                    return
                self._wake.clear()
                if self.touches:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), TOUCH_FLUSH_SECONDS)
                else:
                    await self._wake.wait()
            batch = self._take()
            touches, self.touches = self.touches, {}
            if not batch and not touches:
                continue
            self._inflight = touches
            try:
                outcomes = await self._apply(batch, touches)
            except Exception as exc:  # the transaction failed as a whole
                if not self._closing:  # keep them for the next commit; on shutdown, let go
                    for path, entry in touches.items():
                        self.touches.setdefault(path, entry)
                error = (
                    exc if isinstance(exc, Unavailable) else Unavailable(f"commit failed: {exc}")
                )
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(error)
                continue
            finally:
                self._inflight = {}
            self.commits += 1
            self.batch_sizes.append(len(batch))
            del self.batch_sizes[:-1000]
            for op, outcome in zip(batch, outcomes, strict=True):
                if op.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    op.future.set_exception(outcome)
                else:
                    op.future.set_result(outcome)

    def _take(self) -> list[Op]:
        taken, size = 0, 0
        for op in self._queue:
            if taken and (taken >= self._max_ops or size + op.size > self._max_bytes):
                break
            taken += 1
            size += op.size
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch
