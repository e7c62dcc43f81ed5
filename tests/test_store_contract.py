"""The store contract: every backend passes the same cases (sqlite and Postgres).

Protocol rules themselves are tested in tests/test_protocol_*; these cases check that a store
applies them atomically and durably: what is acknowledged is readable at the reported offsets,
rejected appends change nothing, forks stitch their source's bytes, deletes and expiry hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from protocol.append import AppendRequest
from protocol.create import CreateRequest, ForkRequest
from protocol.errors import (
    BadRequest,
    Conflict,
    Gone,
    NotFound,
    SequenceGap,
    StaleEpoch,
    StreamClosed,
)
from protocol.headers import ProducerHeaders
from protocol.lifecycle import Expiry
from relay.store.base import AppendResult, Store
from relay.store.batching import InternalError
from tests.stores import Backend, Recorder, backend

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

NOW = 1_800_000_000.0
TEXT = "text/plain"


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with backend.open() as opened:
        yield opened


def create(
    path: str,
    *,
    content_type: str | None = TEXT,
    body: bytes = b"",
    closed: bool = False,
    expiry: Expiry | None = None,
    fork: ForkRequest | None = None,
) -> CreateRequest:
    return CreateRequest(path, content_type, expiry or Expiry(), closed, body, fork)


def data(body: bytes, **kwargs: object) -> AppendRequest:
    return AppendRequest(TEXT, body, body_empty=not body, **kwargs)  # type: ignore[arg-type]


async def read_all(store: Store, path: str, now: float = NOW) -> bytes:
    meta = await store.head(path, now, touch=False)
    return await store.read(meta, 0, meta.tail)


async def test_create_then_repeat_is_idempotent_and_a_different_config_conflicts(
    store: Store,
) -> None:
    first = await store.create(create("a", body=b"init"), NOW)
    assert first.created and first.meta.tail == 4
    again = await store.create(create("a", body=b"init"), NOW)
    assert not again.created and again.meta.stream_id == first.meta.stream_id
    with pytest.raises(Conflict):
        await store.create(create("a", content_type="application/json"), NOW)
    assert await read_all(store, "a") == b"init"


async def test_appends_land_at_the_reported_offsets(store: Store) -> None:
    await store.create(create("s"), NOW)
    expected = b""
    for i in range(20):
        piece = f"<{i}>".encode()
        result = await store.append("s", data(piece), NOW)
        assert result.start == len(expected)
        expected += piece
        assert result.meta.tail == len(expected)
    meta = await store.head("s", NOW, touch=False)
    for start in range(0, len(expected), 7):
        for end in (start, min(start + 5, meta.tail), meta.tail):
            assert await store.read(meta, start, end) == expected[start:end]


async def test_concurrent_appends_are_all_stored_whole_and_in_commit_order(store: Store) -> None:
    await store.create(create("c"), NOW)
    pieces = [f"[{i:04d}]".encode() for i in range(300)]
    results = await asyncio.gather(*(store.append("c", data(p), NOW) for p in pieces))
    stored = await read_all(store, "c")
    assert len(stored) == 6 * len(pieces)
    for piece, result in zip(pieces, results, strict=True):
        assert stored[result.start : result.meta.tail] == piece
    assert sorted(result.start for result in results) == list(range(0, len(stored), 6))
    assert store.stats().commits < len(pieces)  # group commit shared the work


async def test_concurrent_appends_across_streams_share_commits(store: Store) -> None:
    paths = [f"many-{i}" for i in range(20)]
    for path in paths:
        await store.create(create(path), NOW)
    before = store.stats().commits
    await asyncio.gather(*(store.append(p, data(b"x" * n), NOW) for p in paths for n in (1, 2)))
    assert store.stats().commits - before < 40
    for path in paths:
        assert await read_all(store, path) == b"xxx"


async def test_rejected_appends_change_nothing(store: Store) -> None:
    await store.create(create("r", body=b"keep"), NOW)
    with pytest.raises(Conflict):
        await store.append("r", AppendRequest("application/json", b"[]"), NOW)
    with pytest.raises(NotFound):
        await store.append("missing", data(b"x"), NOW)
    await store.append("r", data(b"!", stream_seq="5"), NOW)
    with pytest.raises(Conflict):
        await store.append("r", data(b"?", stream_seq="4"), NOW)
    assert await read_all(store, "r") == b"keep!"


async def test_close_is_atomic_with_the_last_append_and_final(store: Store) -> None:
    await store.create(create("z"), NOW)
    closed = await store.append("z", data(b"bye", close=True), NOW)
    assert closed.meta.closed and closed.meta.tail == 3
    again = await store.append("z", AppendRequest(TEXT, b"", close=True, body_empty=True), NOW)
    assert not again.plan.write
    with pytest.raises(StreamClosed):
        await store.append("z", data(b"late"), NOW)
    assert (await store.head("z", NOW, touch=False)).closed
    assert await read_all(store, "z") == b"bye"


async def test_producer_state_commits_with_the_data(store: Store) -> None:
    await store.create(create("p"), NOW)

    def produced(body: bytes, epoch: int, seq: int) -> AppendRequest:
        return data(body, producer=ProducerHeaders("w", epoch, seq))

    assert (await store.append("p", produced(b"a", 0, 0), NOW)).plan.write
    duplicate = await store.append("p", produced(b"a", 0, 0), NOW)
    assert duplicate.plan.duplicate and not duplicate.plan.write
    with pytest.raises(SequenceGap):
        await store.append("p", produced(b"c", 0, 2), NOW)
    assert (await store.append("p", produced(b"b", 1, 0), NOW)).plan.write
    with pytest.raises(StaleEpoch):
        await store.append("p", produced(b"z", 0, 1), NOW)
    assert await read_all(store, "p") == b"ab"


async def test_a_duplicate_gets_the_offset_its_own_append_was_acknowledged_with(
    backend: Backend,
) -> None:
    """Several appends in flight, then a retry of an early one (a client that lost its
    answer): the retry names where that append's data ends, not the tail the later ones made,
    also after a restart. Beyond the newest RECENT_ACKS a duplicate gets the tail."""
    tokens = [f"<{seq}>".encode() for seq in range(12)]
    async with backend.open() as first:
        await first.create(create("acks"), NOW)
        acks = await asyncio.gather(
            *(
                first.append("acks", data(token, producer=ProducerHeaders("w", 0, seq)), NOW)
                for seq, token in enumerate(tokens)
            )
        )
        ends = [result.meta.tail for result in acks]
        assert ends == [sum(map(len, tokens[: seq + 1])) for seq in range(12)]
        retry = await first.append(
            "acks", data(tokens[9], producer=ProducerHeaders("w", 0, 9)), NOW
        )
        assert retry.plan.duplicate and retry.plan.acked_offset == ends[9]
    async with backend.open() as second:
        for seq in (4, 11):
            request = data(tokens[seq], producer=ProducerHeaders("w", 0, seq))
            again = await second.append("acks", request, NOW)
            assert again.plan.duplicate and again.plan.acked_offset == ends[seq]
        oldest = data(tokens[0], producer=ProducerHeaders("w", 0, 0))
        assert (await second.append("acks", oldest, NOW)).plan.acked_offset is None


async def test_concurrent_retries_of_one_producer_append_store_it_once(store: Store) -> None:
    await store.create(create("once"), NOW)
    request = data(b"token", producer=ProducerHeaders("w", 0, 0))
    results = await asyncio.gather(*(store.append("once", request, NOW) for _ in range(10)))
    assert sum(result.plan.write for result in results) == 1
    assert await read_all(store, "once") == b"token"


async def test_forks_read_the_source_prefix_then_their_own_data(store: Store) -> None:
    await store.create(create("src", body=b"0123456789"), NOW)
    fork = await store.create(create("fork", content_type=None, fork=ForkRequest("src", 4)), NOW)
    assert fork.meta.tail == 4 and fork.meta.forked_from == "src"
    await store.append("fork", data(b"abc"), NOW)
    await store.append("src", data(b"XYZ"), NOW)
    assert await read_all(store, "fork") == b"0123abc"
    assert await read_all(store, "src") == b"0123456789XYZ"
    grandchild = create("gc", content_type=None, fork=ForkRequest("fork", 6))
    await store.create(grandchild, NOW)
    await store.append("gc", data(b"!"), NOW)
    assert await read_all(store, "gc") == b"0123ab!"
    with pytest.raises(BadRequest):
        await store.create(create("bad", content_type=None, fork=ForkRequest("src", 99)), NOW)
    with pytest.raises(NotFound):
        await store.create(create("bad", content_type=None, fork=ForkRequest("nope", 0)), NOW)


async def test_deleting_a_forked_source_soft_deletes_until_its_forks_go(store: Store) -> None:
    await store.create(create("base", body=b"shared"), NOW)
    await store.create(create("child", content_type=None, fork=ForkRequest("base", 6)), NOW)
    await store.delete("base", NOW)
    with pytest.raises(Gone):
        await store.head("base", NOW, touch=False)
    with pytest.raises(Conflict):
        await store.create(create("base"), NOW)
    assert await read_all(store, "child") == b"shared"  # the fork still reads its prefix
    await store.delete("child", NOW)
    await store.reap(NOW)
    with pytest.raises(NotFound):
        await store.head("base", NOW, touch=False)
    recreated = await store.create(create("base"), NOW)
    assert recreated.created and recreated.meta.tail == 0


async def test_expiry_hides_streams_and_reads_slide_the_ttl(store: Store) -> None:
    await store.create(create("ttl", expiry=Expiry(ttl=10)), NOW)
    await store.create(create("abs", expiry=Expiry(expires_at=NOW + 5)), NOW)
    await store.head("ttl", NOW + 8, touch=True)  # a read slides the TTL
    assert (await store.head("ttl", NOW + 15, touch=False)).path == "ttl"
    with pytest.raises(NotFound):
        await store.head("ttl", NOW + 19, touch=False)
    with pytest.raises(NotFound):
        await store.head("abs", NOW + 5, touch=True)
    assert await store.reap(NOW + 30) >= 2
    assert (await store.create(create("ttl"), NOW + 31)).created


async def test_deleted_streams_are_gone_and_their_path_reusable(store: Store) -> None:
    await store.create(create("d", body=b"old"), NOW)
    deleted = await store.delete("d", NOW)
    assert deleted.path == "d"
    with pytest.raises(NotFound):
        await store.delete("d", NOW)
    with pytest.raises(NotFound):
        await store.append("d", data(b"x"), NOW)
    await store.create(create("d", body=b"new"), NOW)
    assert await read_all(store, "d") == b"new"


async def test_json_streams_store_whole_messages(store: Store) -> None:
    await store.create(create("j", content_type="application/json", body=b"[1, 2]"), NOW)
    await store.append("j", AppendRequest("application/json", b'{"a":1}\n'), NOW)
    assert await read_all(store, "j") == b'1\n2\n{"a":1}\n'


async def test_data_survives_reopening_the_store(backend: Backend) -> None:
    async with backend.open() as first:
        await first.create(create("durable"), NOW)
        await first.append("durable", data(b"kept", producer=ProducerHeaders("w", 0, 0)), NOW)
        await first.append("durable", data(b"!", close=True), NOW)
    async with backend.open() as second:
        assert await read_all(second, "durable") == b"kept!"
        meta = await second.head("durable", NOW, touch=False)
        assert meta.closed
        again = data(b"kept", producer=ProducerHeaders("w", 0, 0))
        with pytest.raises(StreamClosed):
            await second.append("durable", again, NOW)


async def test_stream_ids_are_never_reused(store: Store) -> None:
    """Every watch, cache and ETag keys on the id: a new stream must never inherit one."""
    seen = set()
    for path in ("a", "b", "a"):
        created = await store.create(create(path, expiry=Expiry(ttl=5)), NOW)
        assert created.meta.stream_id not in seen
        seen.add(created.meta.stream_id)
        await store.delete(path, NOW)
    expiring = await store.create(create("e", expiry=Expiry(ttl=5)), NOW)
    assert await store.reap(NOW + 10) == 1
    after = await store.create(create("e"), NOW + 10)
    assert expiring.meta.stream_id != after.meta.stream_id
    assert after.meta.stream_id not in seen


async def test_a_create_with_a_body_reaches_the_listener_like_an_append(store: Store) -> None:
    recorder = Recorder()
    store.set_listener(recorder)
    await store.create(create("empty"), NOW)  # nothing for readers: not reported
    await store.create(create("src", body=b"abc"), NOW)
    fork = ForkRequest("src", 2)
    forked = await store.create(create("fork", content_type=None, body=b"de", fork=fork), NOW)
    assert (await store.create(create("src", body=b"abc"), NOW)).created is False  # a repeat
    assert recorder.local == [("src", 0, 3), ("fork", 2, 4)]
    assert forked.initial is not None and forked.initial.plan.data == b"de"


async def test_removals_reach_the_listener_after_their_commit(store: Store) -> None:
    recorder = Recorder()
    store.set_listener(recorder)
    deleted = await store.create(create("del"), NOW)
    expired = await store.create(create("exp", expiry=Expiry(ttl=1)), NOW)
    source = await store.create(create("src", body=b"x"), NOW)
    await store.create(create("child", content_type=None, fork=ForkRequest("src", 1)), NOW)
    await store.delete("del", NOW)
    assert await recorder.next() == (deleted.meta.stream_id, "deleted")
    await store.delete("src", NOW)  # soft-deleted: its readers must learn it too (410)
    assert await recorder.next() == (source.meta.stream_id, "deleted")
    replaced = await store.create(create("exp"), NOW + 5)  # replaces the expired stream
    assert replaced.created
    assert await recorder.next() == (expired.meta.stream_id, "deleted")


async def test_a_poisoned_append_fails_alone_and_never_as_unavailable(store: Store) -> None:
    """Input that slipped past validation fails inside the transaction: only its request
    fails (500), never the appends batched beside it, and never as a 503 to retry forever."""
    paths = [f"ok-{i}" for i in range(20)]
    for path in [*paths, "bad"]:
        await store.create(create(path), NOW)
    poisoned = data(b"x", producer=ProducerHeaders("caf\udce9", 0, 0))  # not encodable
    results = await asyncio.gather(
        store.append("bad", poisoned, NOW),
        *(store.append(path, data(b"token"), NOW) for path in paths),
        return_exceptions=True,
    )
    assert isinstance(results[0], InternalError)
    assert all(isinstance(result, AppendResult) for result in results[1:]), results[1:]
    for path in paths:
        assert await read_all(store, path) == b"token"
    assert await read_all(store, "bad") == b""


async def test_a_read_just_before_expiry_keeps_the_stream_from_the_same_batchs_reap(
    store: Store,
) -> None:
    await store.create(create("kept", expiry=Expiry(ttl=10)), NOW)
    await store.head("kept", NOW + 9, touch=True)  # queued as a touch, not committed alone
    assert await store.reap(NOW + 11) == 0  # the reap commits with the touch applied first
    assert (await store.head("kept", NOW + 11, touch=False)).path == "kept"


async def test_json_fork_sub_offsets_count_messages_across_read_windows(store: Store) -> None:
    big = b'"' + b"m" * 40_000 + b'"'
    body = b"[" + b",".join([big, b"1", big, b"2", big]) + b"]"
    await store.create(create("jsrc", content_type="application/json", body=body), NOW)
    messages = (await read_all(store, "jsrc")).split(b"\n")[:-1]
    for count in range(1, 6):
        fork = ForkRequest("jsrc", 0, sub_offset=count)
        made = await store.create(create(f"jf{count}", content_type=None, fork=fork), NOW)
        assert made.meta.tail == sum(len(m) + 1 for m in messages[:count])
        assert await read_all(store, f"jf{count}") == b"".join(m + b"\n" for m in messages[:count])
    with pytest.raises(BadRequest):
        await store.create(create("jf6", content_type=None, fork=ForkRequest("jsrc", 0, 6)), NOW)


async def test_fork_sub_offset_scans_are_bounded(backend: Backend) -> None:
    async with backend.open(max_fork_scan=100_000) as store:
        body = b"[" + b",".join([b'"' + b"m" * 60_000 + b'"'] * 4) + b"]"
        await store.create(create("long", content_type="application/json", body=body), NOW)
        fork = ForkRequest("long", 0, sub_offset=1)
        assert (await store.create(create("near", content_type=None, fork=fork), NOW)).created
        with pytest.raises(BadRequest):
            await store.create(
                create("far", content_type=None, fork=ForkRequest("long", 0, 4)), NOW
            )


async def test_an_append_batched_with_a_read_just_before_expiry_sees_the_slid_ttl(
    store: Store,
) -> None:
    await store.create(create("slid", expiry=Expiry(ttl=10)), NOW)
    await store.head("slid", NOW + 9, touch=True)  # queued: commits with the append below
    appended = await store.append("slid", data(b"late"), NOW + 11)
    assert appended.meta.tail == 4


async def test_an_idle_stream_of_small_appends_keeps_rows_that_follow_its_bytes(
    store: Store,
) -> None:
    """Compaction: 300 appends committed one by one leave 300 rows; once the stream is idle a
    pass merges them into one (well under 1 MiB), a second pass touches nothing, and every read
    returns what it did before."""
    await store.create(create("long"), NOW)
    for _ in range(300):
        await store.append("long", data(b"token "), NOW)
    busy = await store.compact(NOW + 1)  # written a second ago: not idle yet
    assert (busy.streams, busy.rows_removed) == (0, 0)

    done = await store.compact(NOW + 60)
    assert (done.streams, done.rows_removed, done.bytes_read) == (1, 299, 1800)
    again = await store.compact(NOW + 61)
    assert (again.streams, again.rows_removed, again.bytes_read) == (0, 0, 0)
    meta = await store.head("long", NOW + 61, touch=False)
    assert await store.read(meta, 0, meta.tail) == b"token " * 300
    assert await store.read(meta, 903, 915) == b"token token "[3:] + b"tok"

    await store.append("long", data(b"more"), NOW + 62)  # marked again by the write
    assert (await store.compact(NOW + 63)).streams == 0
    assert (await store.compact(NOW + 120)).rows_removed == 1
    assert await read_all(store, "long", NOW + 120) == b"token " * 300 + b"more"
