"""Group commit in isolation: who fails when a batch fails, when touches commit, and what
happens to waiting requests if the loop itself dies. ``apply`` here is a scripted fake."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from protocol.errors import Unavailable
from relay.store import batching
from relay.store.batching import Committer, DeleteOp, InternalError, Touches, WriteOp


class Poison(Exception):
    """What a store raises for an operation it cannot apply (an encoding error, say)."""


class Script:
    """A fake transaction: fails whole whenever it holds a poisoned op or touch."""

    def __init__(self, poisoned: set[str] | None = None) -> None:
        self.poisoned = poisoned or set()
        self.calls: list[tuple[list[str], list[str]]] = []

    async def __call__(self, ops: list[WriteOp], touches: Touches) -> list[Any]:
        names = [op.path for op in ops if isinstance(op, DeleteOp)]
        self.calls.append((names, list(touches)))
        if self.poisoned & {*names, *touches}:
            raise Poison("cannot encode")
        return [f"done {name}" for name in names]


def op(name: str) -> DeleteOp:
    return DeleteOp(name, 0.0)


async def test_a_poisoned_operation_fails_alone_and_its_batch_neighbours_commit() -> None:
    script = Script({"bad"})
    committer = Committer(script, max_ops=100, max_bytes=1 << 20)
    committer.start()
    names = [f"good-{i}" for i in range(10)]
    results = await asyncio.gather(
        *(committer.submit(op(n)) for n in [*names[:5], "bad", *names[5:]]),
        return_exceptions=True,
    )
    await committer.stop()
    assert results[:5] + results[6:] == [f"done {n}" for n in names]
    assert isinstance(results[5], InternalError)  # a 500 without detail, not a 503
    assert not isinstance(results[5], Unavailable)


async def test_a_lost_database_fails_the_batch_with_503_and_keeps_touches() -> None:
    attempts = 0

    async def offline(ops: list[WriteOp], touches: Touches) -> list[Any]:
        nonlocal attempts
        attempts += 1
        raise Unavailable("database unavailable")

    committer = Committer(offline, max_ops=100, max_bytes=1 << 20)
    committer.start()
    committer.touch("p", 1, 5.0)
    with pytest.raises(Unavailable):
        await committer.submit(op("a"))
    assert committer.pending_touch("p", 1) == 5.0  # kept for the next commit
    assert attempts == 1  # not split: every op would fail the same way
    committer._closing = True  # let go of the touches rather than retrying forever
    await committer.stop()


async def test_a_poisoned_touch_is_dropped_instead_of_failing_every_later_batch() -> None:
    script = Script({"bad-touch"})
    committer = Committer(script, max_ops=100, max_bytes=1 << 20)
    committer.start()
    committer.touch("bad-touch", 1, 1.0)
    assert await committer.submit(op("a")) == "done a"
    assert await committer.submit(op("b")) == "done b"
    await committer.stop()
    assert committer.pending_touch("bad-touch", 1) is None
    assert sum("bad-touch" in touches for _, touches in script.calls) == 1


async def test_a_touch_waits_for_the_next_batch_instead_of_committing_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batching, "TOUCH_FLUSH_SECONDS", 30.0)
    script = Script()
    committer = Committer(script, max_ops=100, max_bytes=1 << 20)
    committer.start()
    committer.touch("read", 1, 1.0)
    await asyncio.sleep(0.05)  # the loop runs meanwhile: it must not commit the touch alone
    assert script.calls == []
    assert await committer.submit(op("w")) == "done w"
    assert script.calls == [(["w"], ["read"])]  # the touch rode along with the write
    await committer.stop()


async def test_touches_alone_commit_once_their_deadline_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batching, "TOUCH_FLUSH_SECONDS", 0.01)
    script = Script()
    committer = Committer(script, max_ops=100, max_bytes=1 << 20)
    committer.start()
    committer.touch("read", 1, 1.0)
    async with asyncio.timeout(5):
        while not script.calls:
            await asyncio.sleep(0.005)
    assert script.calls == [([], ["read"])]
    await committer.stop()


class LoopBug(BaseException):
    """Something that escapes every handler inside the loop."""


async def test_if_the_loop_dies_waiting_and_later_requests_fail_at_once() -> None:
    async def broken(ops: list[WriteOp], touches: Touches) -> list[Any]:
        raise LoopBug()

    committer = Committer(broken, max_ops=100, max_bytes=1 << 20)
    committer.start()
    waiting = [asyncio.create_task(committer.submit(op(str(i)))) for i in range(3)]
    done, _ = await asyncio.wait(waiting, timeout=5)
    assert len(done) == 3
    assert all(isinstance(task.exception(), Unavailable) for task in waiting)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(committer.submit(op("later")), 1)
    with pytest.raises(LoopBug):
        await committer.stop()


async def test_a_commit_interval_gathers_a_trickle_but_a_lone_write_goes_at_once() -> None:
    """With ``min_interval``, writes arriving one by one (each after the previous answer,
    as a chat producer sends tokens) share commits; without it each commits alone. A first
    write after a quiet spell does not wait."""

    async def trickle(min_interval: float) -> tuple[int, float]:
        script = Script()
        committer = Committer(script, max_ops=100, max_bytes=1 << 20, min_interval=min_interval)
        committer.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await committer.submit(op("first"))
        first_wait = loop.time() - started

        async def producer(name: str, start: float) -> None:
            await asyncio.sleep(start)
            for i in range(5):
                await committer.submit(op(f"{name}-{i}"))
                await asyncio.sleep(0.01)  # the next token comes a little later

        await asyncio.gather(*(producer(f"p{k}", k * 0.002) for k in range(8)))
        await committer.stop()
        return len(script.calls), first_wait

    alone, _ = await trickle(0.0)
    paced, first_wait = await trickle(0.05)
    assert first_wait < 0.05  # the first write did not wait out an interval
    assert alone >= 2 * paced  # same 41 writes, at most half the commits
