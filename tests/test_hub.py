"""The live-read hub: one commit wakes every parked reader, with the bytes in hand."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.hub import Hub
from tests.waits import wait_for

READERS = 5000


def waiting(hub: Hub, stream_id: int) -> int:
    """Readers blocked in ``wait_beyond`` on the stream (``parked_readers`` counts every
    subscription, waiting or not)."""
    watch = hub._watches.get(stream_id)
    return len(watch.waiters) if watch else 0


async def test_one_publish_wakes_thousands_of_parked_readers_with_the_data() -> None:
    hub = Hub()
    results: list[bytes | None] = []

    async def reader() -> None:
        with hub.subscribe(7) as sub:
            sub.note_tail(10, closed=False)
            assert await sub.wait_beyond(10, timeout=5)
            results.append(sub.take(10, limit=1024))

    tasks = [asyncio.create_task(reader()) for _ in range(READERS)]
    await wait_for(lambda: waiting(hub, 7) == READERS)
    assert hub.parked_readers == READERS
    assert hub.watched_streams == 1
    hub.publish(7, start=10, data=b"token", tail=15, closed=False)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert results == [b"token"] * READERS
    assert hub.watched_streams == 0  # the last reader to leave forgets the stream


async def test_parked_readers_cost_little_memory() -> None:
    hub = Hub()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    subs = [hub.subscribe(1) for _ in range(READERS)]
    waits = [asyncio.create_task(s.wait_beyond(0, timeout=5)) for s in subs]
    await wait_for(lambda: waiting(hub, 1) == READERS)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    hub.publish(1, 0, b"x", 1, False)
    assert all(await asyncio.gather(*waits))
    # A parked reader is its task, its coroutine, one future and a timer: under 2 KiB.
    assert used / READERS < 2048, f"{used / READERS:.0f} bytes per parked reader"


async def test_wait_times_out_without_a_commit() -> None:
    hub = Hub()
    with hub.subscribe(3) as sub:
        sub.note_tail(0, closed=False)
        assert not await sub.wait_beyond(0, timeout=0.05)


async def test_close_and_delete_wake_readers() -> None:
    hub = Hub()
    with hub.subscribe(4) as closing, hub.subscribe(5) as deleting:
        closing.note_tail(3, closed=False)
        deleting.note_tail(3, closed=False)
        waits = [
            asyncio.create_task(closing.wait_beyond(3, timeout=5)),
            asyncio.create_task(deleting.wait_beyond(3, timeout=5)),
        ]
        await wait_for(lambda: waiting(hub, 4) == waiting(hub, 5) == 1)
        hub.publish(4, 3, b"", 3, closed=True)
        hub.deleted(5)
        assert await asyncio.gather(*waits) == [True, True]
        assert closing.closed and deleting.deleted


async def test_take_stitches_consecutive_appends_and_misses_what_it_never_saw() -> None:
    hub = Hub()
    with hub.subscribe(9) as sub:
        hub.publish(9, 100, b"abc", 103, False)
        hub.publish(9, 103, b"def", 106, False)
        assert sub.take(101, limit=100) == b"bcdef"
        assert sub.take(101, limit=3) == b"bcd"
        assert sub.take(50, limit=100) is None


async def test_remote_commit_fetches_once_for_all_readers() -> None:
    hub = Hub()
    fetches: list[tuple[int, int, int]] = []

    async def fetch(stream_id: int, start: int, end: int) -> bytes:
        fetches.append((stream_id, start, end))
        return b"r" * (end - start)

    hub.set_fetch(fetch)
    subs = [hub.subscribe(11) for _ in range(100)]
    for sub in subs:
        sub.note_tail(20, closed=False)
    waits = [asyncio.create_task(s.wait_beyond(20, timeout=5)) for s in subs]
    await wait_for(lambda: waiting(hub, 11) == 100)
    hub.remote_commit(11, 24, False)
    assert all(await asyncio.gather(*waits))
    assert fetches == [(11, 20, 24)]
    assert {s.take(20, 100) for s in subs} == {b"rrrr"}


async def test_json_take_cuts_after_a_whole_message() -> None:
    hub = Hub()
    with hub.subscribe(12) as sub:
        hub.publish(12, 0, b'{"a":1}\n{"b":2}\n', 16, False)
        hub.publish(12, 16, b'{"c":3}\n', 24, False)
        assert sub.take(0, limit=10, json_mode=True) == b'{"a":1}\n'
        assert sub.take(0, limit=20, json_mode=True) == b'{"a":1}\n{"b":2}\n'
        assert sub.take(8, limit=100, json_mode=True) == b'{"b":2}\n{"c":3}\n'
        assert sub.take(0, limit=3, json_mode=True) == b'{"a":1}\n'  # too big: sent whole


async def test_held_bytes_are_capped_across_streams_evicting_the_stalest() -> None:
    hub = Hub(max_bytes=250, stream_bytes=100, linger=0)
    subs = [hub.subscribe(n) for n in range(5)]
    for n in range(5):
        hub.publish(n, 0, bytes([65 + n]) * 100, 100, False)
    assert hub.held_bytes <= 250
    assert [s.take(0, 1000) is not None for s in subs] == [False, False, False, True, True]
    assert subs[4].take(0, 1000) == b"E" * 100
    for sub in subs:
        sub.__exit__(None, None, None)
    assert hub.held(4, 0, 100) == b"E" * 100  # held bytes outlive the watch, still capped
    hub.deleted(4)
    hub.deleted(3)
    assert hub.held_bytes == 0


async def test_bytes_of_an_unwatched_stream_are_held_for_catch_up_reads() -> None:
    """A catch-up read near the tail of a stream written here needs no store read."""
    hub = Hub(max_bytes=1000, stream_bytes=100)
    hub.publish(3, 0, b"hello", 5, False)
    hub.publish(3, 5, b" world", 11, False)
    assert hub.held(3, 0, 11) == b"hello world"
    assert hub.held(3, 4, 6) == b"o "
    hub.publish(3, 20, b"later", 25, False)  # another relay wrote 11..20: only 20.. is held
    assert hub.held(3, 0, 11) is None
    assert hub.held(3, 20, 25) == b"later"
    hub.deleted(3)
    assert hub.held(3, 20, 25) is None and hub.held_bytes == 0


async def test_an_append_larger_than_the_stream_cap_is_not_held() -> None:
    hub = Hub(max_bytes=1000, stream_bytes=100)
    with hub.subscribe(1) as sub:
        hub.publish(1, 0, b"x" * 101, 101, False)
        assert hub.held_bytes == 0
        assert sub.take(0, 1000) is None
        assert sub.known_tail() == 101


async def test_a_remote_commit_larger_than_the_stream_cap_is_not_fetched() -> None:
    hub = Hub(stream_bytes=100)
    fetches: list[tuple[int, int, int]] = []

    async def fetch(stream_id: int, start: int, end: int) -> bytes:
        fetches.append((stream_id, start, end))
        return b"r" * (end - start)

    hub.set_fetch(fetch)
    with hub.subscribe(2) as sub:
        sub.note_tail(0, closed=False)
        hub.remote_commit(2, 10_000_000, False)
        assert await sub.wait_beyond(0, timeout=5)
        assert sub.known_tail() == 10_000_000
        assert sub.take(0, 100) is None  # the reader reads the store, a window at a time
    assert fetches == []


async def test_a_watch_lingers_after_its_last_reader_and_keeps_following_commits() -> None:
    """A long-poll reader re-polls right after each answer: the stream's tail and newest bytes
    are still known, so neither a store lookup nor a read is needed."""
    fetched: list[tuple[int, int, int]] = []

    async def fetch(stream_id: int, start: int, end: int) -> bytes:
        fetched.append((stream_id, start, end))
        return b"?" * (end - start)

    hub = Hub()
    hub.set_fetch(fetch)
    with hub.subscribe(9) as sub:
        sub.note_tail(0, closed=False)
    assert hub.watched_streams == 0 and hub.parked_readers == 0
    hub.publish(9, 0, b"tok1", 4, False)  # committed while nobody was parked
    hub.remote_commit(9, 10, False)  # another relay's commit: tracked, not fetched
    await asyncio.sleep(0)  # a yield, not a wait: a fetch, had one been scheduled, would start
    assert fetched == []
    with hub.subscribe(9) as again:
        assert again.known_tail() == 10
        assert hub.held(9, 0, 4) == b"tok1"
        assert hub.held(9, 0, 10) is None  # the remote bytes were not fetched
    hub.deleted(9)  # a removed stream's watch is dropped at once
    with hub.subscribe(9) as fresh:
        assert fresh.known_tail() is None
        assert hub.held(9, 0, 4) is None


async def test_lingering_watches_expire() -> None:
    hub = Hub(linger=0.01)
    with hub.subscribe(1) as sub:
        sub.note_tail(5, closed=False)
    await asyncio.sleep(0.02)  # a sleep: the linger elapses on the loop's clock, not ours to move
    with hub.subscribe(2):
        pass  # any release sweeps what lingered too long
    with hub.subscribe(1) as again:
        assert again.known_tail() is None


async def test_the_number_of_streams_held_is_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny appends to very many streams must not grow the hub without bound."""
    monkeypatch.setattr("relay.hub.MAX_HELD_STREAMS", 3)
    hub = Hub()
    for stream_id in range(5):
        hub.publish(stream_id, 0, b"x", 1, False)
    assert [hub.held(n, 0, 1) is not None for n in range(5)] == [False, False, True, True, True]
    assert hub.held_bytes == 3


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    cap=st.integers(20, 400),
    start=st.integers(0, 2500),
    length=st.integers(0, 300),
    limit=st.integers(1, 500),
)
@settings(max_examples=300, deadline=None)
def test_held_and_take_give_exactly_the_held_bytes(
    sizes: list[int], cap: int, start: int, length: int, limit: int
) -> None:
    """Against a model (the concatenation of every append, less what the per-stream cap
    evicted): a range is answered only if every byte of it is held, and then exactly."""

    async def check() -> None:
        hub = Hub(stream_bytes=cap)
        stream = b""
        for n, size in enumerate(sizes):
            data = bytes([65 + n % 26]) * size
            hub.publish(3, len(stream), data, len(stream) + size, False)
            stream += data
        held = hub._held.get(3)
        chunks = held.chunks if held is not None else []
        oldest = chunks[0][0] if chunks else len(stream)
        newest = chunks[-1][0] + len(chunks[-1][1]) if chunks else len(stream)
        end = min(start + length, len(stream))
        expected = stream[start:end] if oldest <= start < end <= newest else None
        assert hub.held(3, start, end) == expected
        with hub.subscribe(3) as sub:
            taken = sub.take(start, limit)
        if oldest <= start < newest:
            assert taken is not None and stream[start:newest].startswith(taken)
            assert len(taken) >= min(limit, newest - start)  # whole appends, to the limit
        else:
            assert taken is None

    asyncio.run(check())


async def test_a_signal_wakes_parked_readers_after_what_is_already_due() -> None:
    """A commit's writers are answered (their tasks scheduled) before the sink signals; parked
    readers, which may answer at once inside their wake, come after them, not before."""
    hub = Hub()
    order: list[str] = []

    class Reader:
        def wake(self) -> None:
            order.append("reader")

    with hub.subscribe(1) as sub:
        sub.park(Reader())
        asyncio.get_running_loop().call_soon(order.append, "writer")
        hub.publish(1, 0, b"ab", 2, False)
        assert order == []  # not inside the signal
        await asyncio.sleep(0)
        assert order == ["writer", "reader"]
        hub.publish(1, 2, b"cd", 4, False)
        await asyncio.sleep(0)
        assert order == ["writer", "reader"]  # woken once, then forgotten


async def test_a_parked_reader_whose_wake_fails_leaves_the_others_woken() -> None:
    hub = Hub()
    woken: list[int] = []

    class Reader:
        def __init__(self, n: int) -> None:
            self.n = n

        def wake(self) -> None:
            woken.append(self.n)
            if self.n != 4:  # all but one fail: whichever comes first, the rest must still wake
                raise RuntimeError("broken")

    with hub.subscribe(1) as sub:
        for n in range(5):
            sub.park(Reader(n))
        hub.publish(1, 0, b"ab", 2, False)
        await asyncio.sleep(0)
        assert sorted(woken) == [0, 1, 2, 3, 4]
