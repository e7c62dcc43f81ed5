"""Group commit in isolation: who fails when a batch fails, when touches commit, and what
happens to waiting requests if the loop itself dies. ``apply`` here is a scripted fake."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.append import AppendRequest
from protocol.errors import Unavailable
from relay.store import batching
from relay.store.batching import (
    AppendOp,
    Committer,
    DeleteOp,
    InternalError,
    Touches,
    WriteOp,
)
from tests.waits import wait_for


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
    await asyncio.sleep(0.05)  # a sleep: the loop runs meanwhile and must not commit the touch
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
    await wait_for(lambda: script.calls, interval=0.005, what="the touches committed")
    assert script.calls == [([], ["read"])]
    await committer.stop()


class LoopBug(BaseException):
    """Something that escapes every handler inside the loop."""


@pytest.mark.parametrize("depth", [1, 3])
async def test_if_the_loop_dies_waiting_and_later_requests_fail_at_once(depth: int) -> None:
    """Pipelined too: the batch whose commit killed the loop is answered, not left waiting."""

    async def broken(ops: list[WriteOp], touches: Touches) -> list[Any]:
        raise LoopBug()

    committer = Committer(broken, max_ops=100, max_bytes=1 << 20, depth=depth)
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
            await asyncio.sleep(start)  # a sleep: producers start out of step
            for i in range(5):
                await committer.submit(op(f"{name}-{i}"))
                await asyncio.sleep(0.01)  # a sleep: the next token comes a little later

        await asyncio.gather(*(producer(f"p{k}", k * 0.002) for k in range(8)))
        await committer.stop()
        return len(script.calls), first_wait

    alone, _ = await trickle(0.0)
    paced, first_wait = await trickle(0.05)
    assert first_wait < 0.05  # the first write did not wait out an interval
    assert alone >= 2 * paced  # same 41 writes, at most half the commits


# -- pipelining (depth > 1) ------------------------------------------------------------------


def append(path: str, tag: int) -> AppendOp:
    """An append whose payload names it, so the fake can tell operations apart."""
    return AppendOp(path, AppendRequest("text/plain", str(tag).encode()), 0.0)


class Flights:
    """A fake transaction that takes a while and records what was committing at once."""

    def __init__(self, delays: list[float] | None = None) -> None:
        self.delays = delays or [0.005]
        self.running: list[list[WriteOp]] = []
        self.overlaps: list[tuple[list[WriteOp], list[list[WriteOp]]]] = []
        self.committed: list[WriteOp] = []  # in commit order
        self.alone: list[bool] = []  # per batch with touches: was it alone?
        self.most = 0

    async def __call__(self, ops: list[WriteOp], touches: Touches) -> list[Any]:
        self.overlaps.append((ops, [list(batch) for batch in self.running]))
        if touches:
            self.alone.append(not self.running)
        self.running.append(ops)
        self.most = max(self.most, len(self.running))
        await asyncio.sleep(self.delays[len(self.overlaps) % len(self.delays)])  # its duration
        self.running.remove(ops)
        self.committed.extend(ops)
        return [f"done {id(o)}" for o in ops]


def _paths(ops: list[WriteOp]) -> set[str]:
    return {o.path for o in ops if isinstance(o, AppendOp | DeleteOp)}


def _check_pipeline(flights: Flights, submitted: Sequence[WriteOp], depth: int) -> None:
    assert flights.most <= depth
    for ops, beside in flights.overlaps:
        for other in beside:
            # Batches in flight together are appends only, to different streams.
            assert all(isinstance(o, AppendOp) for o in [*ops, *other])
            assert not _paths(ops) & _paths(other)
    assert all(flights.alone)  # touches only ever went with a batch that started alone
    # Each stream's operations committed in the order they were submitted.
    for path in {p for o in submitted for p in _paths([o])}:
        mine = [o for o in submitted if path in _paths([o])]
        assert [o for o in flights.committed if path in _paths([o])] == mine


async def test_pipelined_batches_overlap_only_on_different_streams() -> None:
    flights = Flights([0.01])
    committer = Committer(flights, max_ops=4, max_bytes=1 << 20, depth=3)
    committer.start()
    ops = [append(f"s{i % 12}", i) for i in range(60)]
    results = await asyncio.gather(*(committer.submit(o) for o in ops))
    await committer.stop()
    assert results == [f"done {id(o)}" for o in ops]
    assert flights.most == 3  # it did pipeline
    _check_pipeline(flights, ops, 3)


async def test_an_operation_other_than_an_append_commits_with_nothing_beside_it() -> None:
    flights = Flights([0.01])
    committer = Committer(flights, max_ops=100, max_bytes=1 << 20, depth=4)
    committer.start()
    early = [append(f"a{i}", i) for i in range(3)]
    first = [asyncio.create_task(committer.submit(o)) for o in early]
    await wait_for(lambda: flights.overlaps, interval=0)  # the first batch is in flight
    later = [append(f"b{i}", i) for i in range(3)]
    ops: list[WriteOp] = [*later[:1], DeleteOp("a1", 0.0), *later[1:]]
    rest = [asyncio.create_task(committer.submit(o)) for o in ops]
    await asyncio.gather(*first, *rest)
    await committer.stop()
    with_delete = next(
        i
        for i, (batch, _) in enumerate(flights.overlaps)
        if not all(isinstance(o, AppendOp) for o in batch)
    )
    assert flights.overlaps[with_delete][1] == []  # it started alone
    _check_pipeline(flights, [*early, *ops], 4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from(["append", "append", "append", "delete", "touch"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=40,
    ),
    depth=st.integers(1, 4),
    max_ops=st.integers(1, 5),
    delays=st.lists(st.sampled_from([0.0, 0.001, 0.003]), min_size=1, max_size=4),
)
def test_pipelining_keeps_each_streams_order_and_never_shares_a_stream_in_flight(
    plan: list[tuple[str, str, int]], depth: int, max_ops: int, delays: list[float]
) -> None:
    """Operations arrive in bursts (``pause`` turns of the loop apart) while batches of random
    length commit; whatever the interleaving, the invariants of ``_check_pipeline`` hold and
    every operation is answered."""

    async def run() -> None:
        flights = Flights(delays)
        committer = Committer(flights, max_ops=max_ops, max_bytes=1 << 20, depth=depth)
        committer.start()
        submitted: list[WriteOp] = []
        waiting = []
        for index, (kind, path, pause) in enumerate(plan):
            for _ in range(pause):
                await asyncio.sleep(0)  # a yield: the interleaving hypothesis chose
            if kind == "touch":
                committer.touch(path, 1, float(index))
                continue
            o: WriteOp = append(path, index) if kind == "append" else DeleteOp(path, 0.0)
            submitted.append(o)
            waiting.append(asyncio.create_task(committer.submit(o)))
        results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        await committer.stop()
        assert results == [f"done {id(o)}" for o in submitted]
        _check_pipeline(flights, submitted, depth)

    asyncio.run(run())
