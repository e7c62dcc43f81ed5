"""What only the Postgres store does: migrations, group commit rows, NOTIFY across relays,
compaction, and behaviour while the database is unreachable (through a TCP proxy we cut)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from protocol.append import AppendRequest
from protocol.create import CreateRequest, ForkRequest
from protocol.errors import Gone, NotFound, StaleEpoch, Unavailable
from protocol.headers import ProducerHeaders
from protocol.lifecycle import Expiry
from relay.app import make_app
from relay.config import Config
from relay.store.common import numbered_sql
from relay.store.postgres import COMPACT_BYTES, PostgresStore, apply_migrations, migrate
from relay.store.postgres.schema import migrations
from tests.pg import blocked_on_locks, fresh_database
from tests.stores import Recorder
from tests.tcp_proxy import TcpProxy
from tests.waits import eventually, wait_for

NOW = 1_800_000_000.0


def text(body: bytes, close: bool = False) -> AppendRequest:
    return AppendRequest("text/plain", body, close=close, body_empty=not body)


def plain(path: str) -> CreateRequest:
    return CreateRequest(path, "text/plain", Expiry(), False, b"")


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    opened = PostgresStore(pg_url, compact_idle_seconds=0, compact_interval=3600)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def _schema(url: str) -> list[tuple[str, ...]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, coalesce(column_default, '')"
            " FROM information_schema.columns WHERE table_schema = 'public'"
            " ORDER BY table_name, column_name"
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            " ORDER BY indexname"
        )
        return [tuple(row) for row in rows] + [tuple(row) for row in indexes]
    finally:
        await conn.close()


async def test_migrating_again_and_concurrently_changes_nothing(pg_url: str) -> None:
    before = await _schema(pg_url)  # pg_url is cloned from a migrated template
    versions = await asyncio.gather(*(migrate(pg_url) for _ in range(4)))
    assert len(set(versions)) == 1 and versions[0] >= 1
    assert await _schema(pg_url) == before


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    with fresh_database(pg_admin_url) as url:
        yield url


@pytest.fixture
def second_empty_db_url(pg_admin_url: str) -> Iterator[str]:
    with fresh_database(pg_admin_url) as url:
        yield url


async def test_the_fresh_schema_equals_the_migrated_one(
    empty_db_url: str, second_empty_db_url: str
) -> None:
    fresh = await asyncpg.connect(empty_db_url)
    stepwise = await asyncpg.connect(second_empty_db_url)
    try:
        assert await apply_migrations(fresh) == await apply_migrations(
            stepwise, fresh_from_schema=False
        )
        versions = [
            await conn.fetch("SELECT version FROM relay_schema_version ORDER BY version")
            for conn in (fresh, stepwise)
        ]
    finally:
        await fresh.close()
        await stepwise.close()
    assert versions[0] == versions[1]
    assert await _schema(empty_db_url) == await _schema(second_empty_db_url)


async def test_stream_keys_lose_the_http_prefix_when_migrated(empty_db_url: str) -> None:
    """Before 009 streams were stored under their request path; now under their name (the
    path after ``/v1/stream/``), fork sources and successors included."""
    conn = await asyncpg.connect(empty_db_url)
    try:
        await conn.execute("CREATE TABLE relay_schema_version (version INT PRIMARY KEY)")
        for version, sql in migrations():
            if version < 9:
                await conn.execute(sql)
                await conn.execute("INSERT INTO relay_schema_version VALUES ($1)", version)
        await conn.execute(
            "INSERT INTO relay_streams (path, content_type, tail, last_access, created_at,"
            " last_append, forked_from, successor) VALUES"
            " ('/v1/stream/chat/a', 'text/plain', 0, 0, 0, 0, NULL, '/v1/stream/chat/b'),"
            " ('/v1/stream/chat/b', 'text/plain', 0, 0, 0, 0, '/v1/stream/chat/a', NULL)"
        )
        await apply_migrations(conn)
        rows = await conn.fetch(
            "SELECT path, forked_from, successor FROM relay_streams ORDER BY path"
        )
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [("chat/a", None, "chat/b"), ("chat/b", "chat/a", None)]


async def test_concurrent_first_migrations_agree(empty_db_url: str) -> None:
    """Several relays starting at once on an empty database: one migrates, all agree."""
    conns = [await asyncpg.connect(empty_db_url) for _ in range(3)]
    try:
        versions = await asyncio.gather(*(apply_migrations(conn) for conn in conns))
        applied = await conns[0].fetchval("SELECT count(*) FROM relay_schema_version")
    finally:
        for conn in conns:
            await conn.close()
    assert len(set(versions)) == 1
    migrations = numbered_sql("postgres")
    assert versions[0] == migrations[-1][0]
    assert applied == len(migrations)  # every migration recorded once (numbers may skip)


async def test_group_commit_writes_one_row_per_stream_per_batch(
    store: PostgresStore, pg_url: str
) -> None:
    await store.create(plain("g"), NOW)
    appends = 200
    await asyncio.gather(*(store.append("g", text(b"t"), NOW) for _ in range(appends)))
    stats = store.stats()
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetchval(
            "SELECT count(*) FROM relay_chunks c JOIN relay_streams s ON s.id = c.stream_id"
            " WHERE s.path = 'g'"
        )
        tail = await conn.fetchval("SELECT tail FROM relay_streams WHERE path = 'g'")
    finally:
        await conn.close()
    assert tail == appends
    assert stats.commits < appends
    assert rows < appends
    assert rows <= stats.commits  # never more than one row per batch for one stream


async def test_a_commit_on_one_relay_reaches_another_relays_listener(pg_url: str) -> None:
    writer = PostgresStore(pg_url)
    watcher = PostgresStore(pg_url)
    await writer.open()
    await watcher.open()
    recorder = Recorder()
    watcher.set_listener(recorder)
    try:
        created = await writer.create(plain("shared"), NOW)
        await _listening(watcher)
        await writer.append("shared", text(b"hello"), NOW)
        assert await recorder.next() == (created.meta.stream_id, 5, False)
        await writer.append("shared", text(b"", close=True), NOW)
        while (event := await recorder.next())[2] is False:
            pass
        assert event == (created.meta.stream_id, 5, True)
        await writer.delete("shared", NOW)
        assert await recorder.next() == (created.meta.stream_id, "deleted")
    finally:
        await writer.close()
        await watcher.close()


async def _chunk_rows(pg_url: str, path: str) -> list[tuple[int, int]]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT c.start_pos, c.end_pos FROM relay_chunks c JOIN relay_streams s"
            " ON s.id = c.stream_id WHERE s.path = $1 ORDER BY c.start_pos",
            path,
        )
    finally:
        await conn.close()
    return [(row[0], row[1]) for row in rows]


async def test_compaction_merges_rows_while_readers_race_it_and_see_the_same_bytes(
    store: PostgresStore, pg_url: str
) -> None:
    """Readers read before, during (the compactor's transaction open, rows deleted but not
    committed) and after the merge, and always see the same bytes."""
    await store.create(plain("c"), NOW)
    expected = b""
    for i in range(60):
        piece = f"<{i}>".encode()
        await store.append("c", text(piece), NOW)
        expected += piece
    meta = await store.head("c", NOW, touch=False)
    last_start = (await _chunk_rows(pg_url, "c"))[-1][0]
    reads = [0, 0, 0, 0]
    progressed = asyncio.Event()
    target = 0
    stop = asyncio.Event()

    async def read_repeatedly(reader: int) -> None:
        while not stop.is_set():
            for start in (0, 7, len(expected) // 2):
                assert await store.read(meta, start, meta.tail) == expected[start:]
            reads[reader] += 1
            if min(reads) >= target:
                progressed.set()
            await asyncio.sleep(0)  # a yield, not a wait: the compactor and other readers run

    async def all_read_twice_more() -> None:
        nonlocal target
        target = min(reads) + 2
        progressed.clear()
        await asyncio.wait_for(progressed.wait(), 10)

    readers = [asyncio.create_task(read_repeatedly(i)) for i in range(len(reads))]
    blocker = await asyncpg.connect(pg_url)
    try:
        await all_read_twice_more()  # before
        # A share lock on the last row: the compactor's DELETE waits on it mid-transaction.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM relay_chunks WHERE stream_id = $1 AND start_pos = $2 FOR SHARE",
            meta.stream_id,
            last_start,
        )
        compacted = asyncio.create_task(store.compact(NOW + 1))
        await blocked_on_locks(pg_url, statement="DELETE FROM relay_chunks")
        await all_read_twice_more()  # during
        assert not compacted.done()
        await tx.rollback()
        done = await compacted
        await all_read_twice_more()  # after
    finally:
        stop.set()
        await asyncio.gather(*readers)
        await blocker.close()
    assert done.rows_removed == 59
    assert await _chunk_rows(pg_url, "c") == [(0, len(expected))]
    await store.append("c", text(b"more"), NOW)
    after = await store.head("c", NOW, touch=False)
    assert await store.read(after, 0, after.tail) == expected + b"more"


async def _stream_xmax(pg_url: str, path: str) -> tuple[str, list[tuple[str, str]]]:
    """Row versions: a lock sets the stream row's xmax; a rewrite changes a chunk's ctid."""
    conn = await asyncpg.connect(pg_url)
    try:
        xmax = await conn.fetchval("SELECT xmax::text FROM relay_streams WHERE path = $1", path)
        chunks = await conn.fetch(
            "SELECT c.ctid::text, c.xmin::text FROM relay_chunks c JOIN relay_streams s"
            " ON s.id = c.stream_id WHERE s.path = $1 ORDER BY c.start_pos",
            path,
        )
    finally:
        await conn.close()
    return xmax, [(row[0], row[1]) for row in chunks]


async def test_compaction_converges_a_second_pass_touches_nothing(
    store: PostgresStore, pg_url: str
) -> None:
    """Merged rows end just under 1 MiB; they must not stay candidates forever, and neither may
    small rows that a row over 1 MiB keeps apart."""
    await store.create(plain("big"), NOW)
    piece = b"x" * 100_000
    for _ in range(25):
        await store.append("big", text(piece), NOW)
    await store.create(plain("apart"), NOW)
    for body in (b"a" * 10, b"b" * (COMPACT_BYTES + 1), b"c" * 10):
        await store.append("apart", text(body), NOW)

    first = await store.compact(NOW + 1)
    assert await _chunk_rows(pg_url, "big") == [
        (0, 1_000_000),
        (1_000_000, 2_000_000),
        (2_000_000, 2_500_000),
    ]
    versions = {path: await _stream_xmax(pg_url, path) for path in ("big", "apart")}

    second = await store.compact(NOW + 2)
    assert {path: await _stream_xmax(pg_url, path) for path in versions} == versions
    assert (first.rows_removed, first.bytes_read) == (22, 25 * 100_000)  # runs of 10, 10, 5
    assert (second.streams, second.rows_removed, second.bytes_read) == (0, 0, 0)
    meta = await store.head("big", NOW, touch=False)
    assert await store.read(meta, 0, meta.tail) == piece * 25


async def test_a_pass_costs_what_it_compacts_not_what_is_stored(
    store: PostgresStore, pg_url: str
) -> None:
    """100,000 closed streams whose rows are not marked (as compacted ones are): a pass looks
    at none of them, though each has two rows a merge would join; a write marks its stream."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO relay_streams (path, content_type, tail, closed, last_access, "
            "created_at, last_append) SELECT 'old/' || n, 'text/plain', 2, true, 0, 0, 0 "
            "FROM generate_series(1, 100000) AS n"
        )
        await conn.execute(
            "INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data) "
            "SELECT id, p, p + 1, 'x' FROM relay_streams, generate_series(0, 1) AS p "
            "WHERE path LIKE 'old/%'"
        )
        await conn.execute("ANALYZE relay_streams")
    finally:
        await conn.close()
    started = time.perf_counter()
    idle = await store.compact(NOW + 1)
    elapsed = time.perf_counter() - started
    print(f"compaction pass over 100,000 stored closed streams: {elapsed * 1000:.1f} ms")
    assert (idle.streams, idle.rows_removed, idle.bytes_read) == (0, 0, 0)

    await store.create(plain("fresh"), NOW)
    for body in (b"a", b"b", b"c"):
        await store.append("fresh", text(body), NOW)
    done = await store.compact(NOW + 1)
    assert (done.streams, done.rows_removed, done.bytes_read) == (1, 2, 3)
    assert await _chunk_rows(pg_url, "fresh") == [(0, 3)]
    assert len(await _chunk_rows(pg_url, "old/7")) == 2  # never looked at
    assert (await store.compact(NOW + 2)).streams == 0  # unmarked once merged


async def test_a_compaction_pass_reads_at_most_its_budget_oldest_streams_first(
    store: PostgresStore, pg_url: str
) -> None:
    """Each pass is bounded, and the stream idle longest goes first, so none starves."""
    idle_since = {"s1": NOW + 5, "s2": NOW + 1, "s3": NOW + 3}
    for path, at in idle_since.items():
        await store.create(plain(path), NOW)
        for _ in range(30):
            await store.append(path, text(b"y" * 10_000), at)

    order = []
    for _ in idle_since:
        done = await store.compact(NOW + 10, budget=400_000)
        assert done.bytes_read == 300_000
        order += [
            p for p in idle_since if len(await _chunk_rows(pg_url, p)) == 1 and p not in order
        ]
    assert order == ["s2", "s3", "s1"]
    assert (await store.compact(NOW + 10, budget=400_000)).bytes_read == 0


async def test_a_pass_splits_a_large_stream_across_passes_and_still_converges(
    store: PostgresStore, pg_url: str
) -> None:
    await store.create(plain("long"), NOW)
    for _ in range(40):
        await store.append("long", text(b"z" * 100_000), NOW)
    passes = []
    while (done := await store.compact(NOW + 1, budget=1_500_000)).bytes_read:
        assert done.bytes_read <= 1_500_000
        passes.append(done.rows_removed)
    assert len(passes) == 4  # runs of ten appends, one per pass within the budget
    assert len(await _chunk_rows(pg_url, "long")) == 4
    meta = await store.head("long", NOW, touch=False)
    assert await store.read(meta, 0, meta.tail) == b"z" * 4_000_000


async def test_losing_the_database_answers_unavailable_then_recovers(pg_url: str) -> None:
    proxy, proxied = TcpProxy.for_url(pg_url)
    await proxy.start()
    store = PostgresStore(proxied, command_timeout=2)
    await store.open()
    try:
        await store.create(plain("f"), NOW)
        await store.append("f", text(b"before "), NOW)
        await proxy.cut()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await store.append("f", text(b"lost?"), NOW)
        with pytest.raises(Unavailable):
            await store.head("f", NOW, touch=False)
        assert time.monotonic() - started < 10  # bounded by the command timeout, not a hang
        await proxy.restore()

        async def appended() -> bool:
            try:
                await store.append("f", text(b"after"), NOW)
            except Unavailable:
                return False
            return True

        await eventually(appended, interval=0.2, what="an append once the database is back")
        meta = await store.head("f", NOW, touch=False)
        stored = await store.read(meta, 0, meta.tail)
        # The append during the outage was refused, so it must not be there.
        assert stored == b"before after"
    finally:
        await store.close()
        await proxy.cut()


async def test_listen_reconnects_and_readers_catch_up_after_an_outage(pg_url: str) -> None:
    proxy, proxied = TcpProxy.for_url(pg_url)
    await proxy.start()
    writer = PostgresStore(pg_url)
    watcher = PostgresStore(proxied, command_timeout=2)
    await writer.open()
    await watcher.open()
    created = await writer.create(plain("w"), NOW)
    gone = await writer.create(plain("gone"), NOW)
    recorder = Recorder([created.meta.stream_id, gone.meta.stream_id])
    watcher.set_listener(recorder)
    try:
        await proxy.cut()
        await writer.append("w", text(b"missed while cut"), NOW)
        await writer.delete("gone", NOW)
        await proxy.restore()
        # On reconnect the watcher re-reads watched streams: new tails, and which are gone.
        seen: set[tuple[object, ...]] = set()
        while not {(created.meta.stream_id, 16, False), (gone.meta.stream_id, "deleted")} <= seen:
            seen.add(await recorder.next(15))
    finally:
        await writer.close()
        await watcher.close()
        await proxy.cut()


async def test_bytes_held_from_before_an_outage_are_not_served_after_it(
    pg_url: str, tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """After the connection to the database is lost, the server it comes back to may be
    another one (a promoted standby with another history at the same offsets): the relay must
    answer from that database, not from bytes its hub held from before."""
    async with app_behind_proxy(pg_url, tmp_path, aiohttp_client) as (proxy, store, client):
        url, plain_text = "/v1/stream/history", {"Content-Type": "text/plain"}
        assert (await client.put(url, headers=plain_text)).status == 201
        assert (await client.post(url, data=b"original", headers=plain_text)).status == 204
        read = await client.get(url, params={"offset": "-1"})
        assert await read.read() == b"original"  # from the hub's memory
        await proxy.cut()
        await wait_for(lambda: not store._listening, what="the lost LISTEN noticed")
        conn = await asyncpg.connect(pg_url)  # meanwhile the database's history changes
        try:
            await conn.execute(
                "UPDATE relay_chunks SET data = 'replaced'::bytea WHERE stream_id ="
                " (SELECT id FROM relay_streams WHERE path = $1)",
                "history",
            )
        finally:
            await conn.close()
        await proxy.restore()
        await _listening(store)
        read = await client.get(url, params={"offset": "-1"})
        assert await read.read() == b"replaced"


@contextlib.asynccontextmanager
async def app_behind_proxy(
    pg_url: str, tmp_path: Path, aiohttp_client: AiohttpClient
) -> AsyncIterator[tuple[TcpProxy, PostgresStore, Any]]:
    """The relay app on a store that reaches Postgres through a proxy the test can cut; the
    client (and with it the store) closes once the test has given the database back."""
    proxy, proxied = TcpProxy.for_url(pg_url)
    await proxy.start()
    config = Config(data_dir=str(tmp_path), database_url=proxied, db_timeout=2)
    store = PostgresStore(proxied, command_timeout=2)
    try:
        client = await aiohttp_client(make_app(config, store))
        yield proxy, store, client
        await client.close()
    finally:
        await proxy.cut()


async def test_http_answers_503_with_retry_after_while_the_database_is_down(
    pg_url: str, tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    async with app_behind_proxy(pg_url, tmp_path, aiohttp_client) as (proxy, _, client):
        url = "/v1/stream/outage"
        assert (await client.put(url, headers={"Content-Type": "text/plain"})).status == 201
        await proxy.cut()
        response = await client.post(url, data=b"x", headers={"Content-Type": "text/plain"})
        assert response.status == 503
        assert response.headers["Retry-After"].isdigit()
        assert (await response.json())["error"]["code"] == "unavailable"
        await proxy.restore()

        async def accepted() -> int | None:
            response = await client.post(url, data=b"y", headers={"Content-Type": "text/plain"})
            return None if response.status == 503 else response.status

        assert await eventually(accepted, interval=0.2, what="an append not answered 503") == 204
        read = await client.get(url, params={"offset": "-1"})
        assert await read.read() == b"y"


async def test_the_reaper_reclaims_every_row_of_expired_streams(
    store: PostgresStore, pg_url: str
) -> None:
    short = CreateRequest("short", "text/plain", Expiry(ttl=10), False, b"")
    await store.create(short, NOW)
    await store.create(plain("keep"), NOW)
    for path in ("short", "keep"):
        await store.append(
            path, AppendRequest("text/plain", b"data", producer=ProducerHeaders("w", 0, 0)), NOW
        )
    assert await store.reap(NOW + 5) == 0
    assert await store.reap(NOW + 11) == 1
    conn = await asyncpg.connect(pg_url)
    try:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM relay_streams) AS streams,"
            " (SELECT count(*) FROM relay_chunks) AS chunks,"
            " (SELECT count(*) FROM relay_producers) AS producers"
        )
    finally:
        await conn.close()
    assert dict(counts) == {"streams": 1, "chunks": 1, "producers": 1}


def _count_lookups(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``store`` looks up in the database from now on, in order."""
    paths: list[str] = []
    load = store._load_pooled

    async def counted(path: str) -> object:
        paths.append(path)
        return await load(path)

    monkeypatch.setattr(store, "_load_pooled", counted)
    return paths


async def test_readers_share_stream_lookups_but_always_see_acknowledged_writes(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create(plain("hot"), NOW)
    store._known.clear()  # as if another relay had created it: every HEAD needs the row
    queries = _count_lookups(store, monkeypatch)
    metas = await asyncio.gather(*(store.head("hot", NOW, touch=False) for _ in range(200)))
    assert {meta.tail for meta in metas} == {0}
    assert len(queries) < 20  # one shared query per wave, not one per reader

    stop = asyncio.Event()

    async def background_reader() -> None:
        while not stop.is_set():
            await store.head("hot", NOW, touch=False)

    readers = [asyncio.create_task(background_reader()) for _ in range(20)]
    try:
        for i in range(100):
            acked = await store.append("hot", text(b"x"), NOW)
            seen = await store.head("hot", NOW, touch=False)
            assert seen.tail >= acked.meta.tail == i + 1  # read-your-writes holds
    finally:
        stop.set()
        await asyncio.gather(*readers)


async def test_at_most_one_notify_per_committed_batch(store: PostgresStore, pg_url: str) -> None:
    payloads: list[str] = []
    listener = await asyncpg.connect(pg_url)
    await listener.add_listener("relay_commits", lambda *args: payloads.append(args[3]))
    try:
        for i in range(10):
            await store.create(plain(f"n{i}"), NOW)
        await _all_notifications_heard(listener)
        payloads.clear()
        before = store.stats().commits
        await asyncio.gather(*(store.append(f"n{i % 10}", text(b"t"), NOW) for i in range(300)))
        commits = store.stats().commits - before
        await _all_notifications_heard(listener)
    finally:
        await listener.close()
    assert 0 < len(payloads) <= commits < 300
    moved: dict[str, int] = {}
    for payload in payloads:
        for entry in payload.partition("|")[2].split(","):
            stream_id, tail, _closed = entry.split(":")
            moved[stream_id] = max(moved.get(stream_id, 0), int(tail))
    assert sorted(moved.values()) == [30] * 10  # every stream's final tail was announced


async def test_closing_while_the_database_is_down_does_not_hang_on_pending_touches(
    pg_url: str,
) -> None:
    proxy, proxied = TcpProxy.for_url(pg_url)
    await proxy.start()
    store = PostgresStore(proxied, command_timeout=1)
    await store.open()
    try:
        await store.create(CreateRequest("t", "text/plain", Expiry(ttl=60), False, b""), NOW)
        await store.head("t", NOW + 1, touch=True)  # a TTL touch waits for the next commit
        await proxy.cut()
        await asyncio.wait_for(store.close(), 15)
    finally:
        await proxy.cut()


async def test_a_committed_batch_stands_even_if_releasing_a_connection_fails(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once COMMIT returns, the outcomes stand: nothing afterwards may turn them into 503s."""
    await store.create(plain("after-commit"), NOW)

    async def broken_release(*args: object, **kwargs: object) -> None:
        raise OSError("connection reset while releasing")

    monkeypatch.setattr(asyncpg.pool.Pool, "release", broken_release)
    results = await asyncio.gather(
        *(store.append("after-commit", text(b"x"), NOW) for _ in range(5))
    )
    assert sorted(r.meta.tail for r in results) == [1, 2, 3, 4, 5]


async def test_producer_state_is_read_under_the_lock_of_a_stream_created_mid_batch(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's first lock missed the stream (another relay created it right after): the
    producer's state must still be read, so a retried seq 0 is a duplicate, not a second copy."""
    relay_a = PostgresStore(pg_url)
    relay_b = PostgresStore(pg_url)
    await relay_a.open()
    await relay_b.open()
    producer = ProducerHeaders("llm", 0, 0)
    original_lock = PostgresStore._lock

    async def lock_then_let_b_create(self: PostgresStore, *args: Any) -> None:
        await original_lock(self, *args)
        if self is relay_a:  # the stream did not exist when relay A locked its batch
            await relay_b.create(plain("late"), NOW)
            first = AppendRequest("text/plain", b"token", producer=producer)
            assert (await relay_b.append("late", first, NOW)).plan.write

    monkeypatch.setattr(PostgresStore, "_lock", lock_then_let_b_create)
    try:
        retry = AppendRequest("text/plain", b"token", producer=producer)
        result = await relay_a.append("late", retry, NOW)
        assert result.plan.duplicate and not result.plan.write
        meta = await relay_a.head("late", NOW, touch=False)
        assert await relay_a.read(meta, 0, meta.tail) == b"token"
    finally:
        monkeypatch.undo()
        await relay_a.close()
        await relay_b.close()


async def test_live_readers_park_on_what_the_relay_already_knows_and_nothing_else(
    pg_url: str,
) -> None:
    """``tracked`` spares a parking reader the lookup only where a commit it has not seen
    would still wake it: an open, TTL-less stream at exactly the known tail, while LISTEN is
    up; its view follows local commits and other relays' notifications."""
    here = PostgresStore(pg_url)
    there = PostgresStore(pg_url)
    await here.open()
    await there.open()
    recorder = Recorder()
    here.set_listener(recorder)
    try:
        await _listening(here)
        created = await here.create(plain("known"), NOW)
        assert here.tracked("known", 0, NOW) == created.meta  # learnt from its own commit
        await here.append("known", text(b"abc"), NOW)
        assert here.tracked("known", 0, NOW) is None  # not the tail any more
        assert here.tracked("known", 3, NOW) is not None
        await there.append("known", text(b"de"), NOW)  # another relay's commit
        assert await recorder.next() == (created.meta.stream_id, 5, False)
        assert here.tracked("known", 3, NOW) is None
        assert here.tracked("known", 5, NOW) is not None
        await there.delete("known", NOW)
        assert await recorder.next() == (created.meta.stream_id, "deleted")
        assert here.tracked("known", 5, NOW) is None
        await here.create(CreateRequest("ttl", "text/plain", Expiry(ttl=60), False, b""), NOW)
        assert here.tracked("ttl", 0, NOW) is None  # reads must slide its TTL: ask the store
    finally:
        await here.close()
        await there.close()


async def test_nothing_is_tracked_or_cached_while_notifications_may_be_missed(
    pg_url: str,
) -> None:
    proxy, proxied = TcpProxy.for_url(pg_url)
    await proxy.start()
    store = PostgresStore(proxied, command_timeout=2)
    await store.open()
    store.set_listener(Recorder())
    try:
        await _listening(store)
        await store.create(plain("blind"), NOW)
        assert store.tracked("blind", 0, NOW) is not None
        assert (await store.head("blind", NOW, touch=False)).tail == 0
        await proxy.cut()
        with pytest.raises(Unavailable):  # not the cached answer: it may be stale by now
            await store.head("blind", NOW, touch=False)
        await wait_for(lambda: not store._listening, timeout=15, what="the lost LISTEN noticed")
        assert store.tracked("blind", 0, NOW) is None
    finally:
        await proxy.restore()
        await store.close()
        await proxy.cut()


async def test_producer_state_is_read_after_waiting_for_another_relays_lock(
    store: PostgresStore, pg_url: str
) -> None:
    """A batch that waited for a stream's lock must judge producers by what the lock holder
    committed: in READ COMMITTED a statement's snapshot predates its lock wait, so producer
    state read in the locking statement itself would be stale and a retry stored twice."""
    created = await store.create(plain("contended"), NOW)
    sid = created.meta.stream_id
    other = await asyncpg.connect(pg_url)  # another relay, mid-commit of the same append
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM relay_streams WHERE id = $1 FOR UPDATE", sid)
        retry = AppendRequest("text/plain", b"token", producer=ProducerHeaders("llm", 0, 0))
        pending = asyncio.create_task(store.append("contended", retry, NOW))

        async def lock_awaited() -> int:
            waiting: int = await other.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
            )
            return waiting

        await eventually(lock_awaited, interval=0.01, what="our batch waiting for that lock")
        await other.execute("INSERT INTO relay_chunks VALUES ($1, 0, 5, 'token'::bytea)", sid)
        await other.execute("UPDATE relay_streams SET tail = 5 WHERE id = $1", sid)
        await other.execute("INSERT INTO relay_producers VALUES ($1, 'llm', 0, 0)", sid)
        await tx.commit()
        result = await asyncio.wait_for(pending, 10)
    finally:
        await other.close()
    assert result.plan.duplicate and not result.plan.write
    meta = await store.head("contended", NOW, touch=False)
    assert await store.read(meta, 0, meta.tail) == b"token"


async def _listening(*stores: PostgresStore) -> None:
    """Until each store's LISTEN connection is up, so no commit's NOTIFY can pass it by."""
    await wait_for(lambda: all(s._listening for s in stores), what="LISTEN up")


async def _all_notifications_heard(listener: asyncpg.Connection) -> None:
    """Until every NOTIFY committed so far has reached ``listener``: Postgres delivers
    notifications in commit order, so one it sends itself now arrives after all of them."""
    heard = asyncio.Event()

    def barrier(*_: object) -> None:
        heard.set()

    await listener.add_listener("relay_test_barrier", barrier)
    try:
        await listener.execute("NOTIFY relay_test_barrier")
        async with asyncio.timeout(10):
            await heard.wait()
    finally:
        await listener.remove_listener("relay_test_barrier", barrier)


@contextlib.asynccontextmanager
async def two_relays(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two relay processes would be, both LISTENing."""
    stores = (PostgresStore(pg_url), PostgresStore(pg_url))
    for store in stores:
        await store.open()
    try:
        await _listening(*stores)
        yield stores
    finally:
        for store in stores:
            await store.close()


async def test_heads_answer_from_what_the_relay_knows_yet_never_miss_another_relays_ack(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HEAD of a stream this relay knows costs no lookup, yet every commit another relay
    acknowledged before the HEAD began is in its answer: appends, closes, deletes, re-creates."""
    async with two_relays(pg_url) as (here, there):
        here.set_listener(Recorder())
        lookups = _count_lookups(here, monkeypatch)
        await there.create(plain("seen"), NOW)
        first = await here.head("seen", NOW, touch=False)  # a lookup: here never saw it
        assert len(lookups) == 1
        for i in range(1, 101):
            acked = await there.append("seen", text(b"x"), NOW)
            seen = await here.head("seen", NOW, touch=False)
            assert seen.tail == acked.meta.tail == i  # the ack's NOTIFY arrived first
        assert len(lookups) == 1  # ...and no HEAD asked the database
        await there.append("seen", text(b"", close=True), NOW)
        assert (await here.head("seen", NOW, touch=False)).closed
        await there.delete("seen", NOW)
        with pytest.raises(NotFound):
            await here.head("seen", NOW, touch=False)
        recreated = CreateRequest("seen", "application/json", Expiry(), False, b"")
        await there.create(recreated, NOW)
        again = await here.head("seen", NOW, touch=False)
        assert again.content_type == "application/json"
        assert again.stream_id != first.stream_id


async def test_heads_ask_the_database_for_what_no_notify_announces(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soft-deleted stream (it may be purged and its path re-created) and a TTL stream that
    looks expired here (another relay's reads may have extended it) are looked up."""
    async with two_relays(pg_url) as (here, there):
        here.set_listener(Recorder())
        await here.create(CreateRequest("ttl", "text/plain", Expiry(ttl=10), False, b""), NOW)
        await there.head("ttl", NOW + 8, touch=True)  # another relay's read extends it

        conn = await asyncpg.connect(pg_url)

        async def touch_committed() -> bool:
            last: float = await conn.fetchval(
                "SELECT max(last_access) FROM relay_streams WHERE path = 'ttl'"
            )
            return last >= NOW + 8

        try:
            await eventually(touch_committed, what="the pending touch committed")
        finally:
            await conn.close()
        await there.reap(NOW + 8)
        meta = await here.head("ttl", NOW + 12, touch=False)  # here alone would call it expired
        assert meta.path == "ttl"
        await here.create(plain("source"), NOW)
        fork = CreateRequest("fork", "text/plain", Expiry(), False, b"")
        await here.create(replace(fork, fork=ForkRequest("source", 0)), NOW)
        await there.delete("source", NOW)  # soft-deleted: a fork inherits it
        with pytest.raises(Gone):
            await here.head("source", NOW, touch=False)


def produced(body: bytes, producer: str, epoch: int, seq: int) -> AppendRequest:
    return AppendRequest(
        "text/plain", body, producer=ProducerHeaders(producer, epoch, seq), body_empty=not body
    )


async def test_a_relay_appending_to_its_own_streams_commits_in_one_round_trip(
    store: PostgresStore, pg_url: str
) -> None:
    """The common case: one relay writes its streams. After the stream is created here, every
    batch of appends is one statement: no BEGIN, no locks, no COMMIT of its own."""
    await store.create(plain("mine"), NOW)
    await store.append("mine", produced(b"<0>", "llm", 0, 0), NOW)  # asyncpg's first use of
    before = store.stats()  # a statement may ask for type details, once per connection
    for seq in range(1, 21):
        await store.append("mine", produced(f"<{seq}>".encode(), "llm", 0, seq), NOW)
    after = store.stats()
    assert after.guarded_writes is not None and before.guarded_writes is not None
    assert after.guarded_writes - before.guarded_writes == 20
    assert after.statements is not None and before.statements is not None
    assert after.statements - before.statements == 20
    assert after.guard_misses == before.guard_misses == 0
    duplicate = await store.append("mine", produced(b"<20>", "llm", 0, 20), NOW)
    assert not duplicate.plan.write  # a duplicate is judged under the lock, and written nowhere
    assert await store.read(duplicate.meta, 0, duplicate.meta.tail) == b"".join(
        f"<{seq}>".encode() for seq in range(21)
    )


async def test_a_stale_view_never_commits_it_takes_the_locks_and_the_protocol_decides(
    pg_url: str,
) -> None:
    """Relay A still believes what it last wrote (its NOTIFY from B not yet heard, forced
    here): its one-round-trip write is refused by the tail check, and the locked re-run judges
    against the database: B's fencing epoch fences A's producer, B's bytes are not overwritten."""
    async with two_relays(pg_url) as (a, b):
        await a.create(plain("shared"), NOW)
        await a.append("shared", produced(b"a0", "llm", 0, 0), NOW)
        stale = a._owned.by_path["shared"]
        await b.append("shared", produced(b"b0", "llm", 1, 0), NOW)  # a new epoch, via B
        await wait_for(lambda: "shared" not in a._owned.by_path, what="B's NOTIFY heard by A")
        a._owned.put(stale)  # as if B's NOTIFY had not arrived yet
        misses = a.stats().guard_misses
        with pytest.raises(StaleEpoch):
            await a.append("shared", produced(b"a1", "llm", 0, 1), NOW)
        assert a.stats().guard_misses == (misses or 0) + 1
        a._owned.put(stale)
        plain_append = await a.append("shared", text(b"a2"), NOW)
        assert plain_append.start == 4  # after B's bytes, not over them
        assert await a.read(plain_append.meta, 0, 6) == b"a0b0a2"
        a._owned.put(stale)  # a close writes no row: only the tail check can refuse it
        closed = await a.append("shared", text(b"", close=True), NOW)
        assert (closed.meta.tail, closed.meta.closed) == (6, True)
        assert (await b.head("shared", NOW, touch=False)).tail == 6


async def test_two_relays_interleaving_appends_lose_and_double_nothing(pg_url: str) -> None:
    """Guarded writes race the other relay's locked and guarded writes: every acknowledged
    append is stored once, at the offset its acknowledgement gave."""
    async with two_relays(pg_url) as (a, b):
        await a.create(plain("race"), NOW)

        async def writer(store: PostgresStore, name: str) -> list[tuple[int, bytes]]:
            acks = []
            for seq in range(60):
                body = f"{name}{seq:02d};".encode()
                result = await store.append("race", produced(body, name, 0, seq), NOW)
                acks.append((result.start, body))
            return acks

        acks = [ack for run in await asyncio.gather(writer(a, "a"), writer(b, "b")) for ack in run]
        meta = await a.head("race", NOW, touch=False)
        data = await a.read(meta, 0, meta.tail)
        assert len(data) == sum(len(body) for _, body in acks)
        for start, body in acks:
            assert data[start : start + len(body)] == body
        assert (a.stats().guarded_writes or 0) + (b.stats().guarded_writes or 0) > 0


async def test_pipelined_commits_keep_every_streams_bytes_and_offsets(pg_url: str) -> None:
    """``commit_pipeline=3``: chat-like producers (each waits for its answer), plain appends,
    creates and deletes, and a second relay writing one of the same streams, all at once.
    Every acknowledged append sits at its acknowledged offset, in order; each stream's local
    commits reach the listener in order; and commits did overlap (more than one writer)."""
    one = PostgresStore(pg_url, compact_idle_seconds=0, compact_interval=3600, commit_pipeline=3)
    other = PostgresStore(pg_url, compact_idle_seconds=0, compact_interval=3600)
    await one.open()
    await other.open()
    heard = Recorder()
    one.set_listener(heard)
    streams = [f"pipe-{i}" for i in range(8)]
    try:
        for path in streams:
            await one.create(plain(path), NOW)
        acked: dict[str, list[tuple[int, bytes]]] = {path: [] for path in streams}

        async def producer(path: str) -> None:
            for seq in range(40):
                await asyncio.sleep(0.001 * (seq % 3))  # a sleep: tokens arrive unevenly
                body = f"{path}:{seq};".encode()
                request = AppendRequest(
                    "text/plain", body, producer=ProducerHeaders(f"p-{path}", 0, seq)
                )
                result = await one.append(path, request, NOW)
                acked[path].append((result.start, body))

        async def plain_appends(store: PostgresStore, path: str, tag: bytes) -> None:
            for _ in range(40):
                result = await store.append(path, text(tag), NOW)
                acked[path].append((result.start, tag))

        async def churn() -> None:
            for i in range(10):
                await one.create(plain(f"churn-{i}"), NOW)
                await one.delete(f"churn-{i}", NOW)

        await asyncio.gather(
            *(producer(path) for path in streams[:6]),
            plain_appends(one, streams[6], b"a"),
            plain_appends(one, streams[7], b"b"),
            plain_appends(other, streams[7], b"c"),  # another relay: guards miss, locks
            churn(),
        )
        overlapped = len(one._writers)  # idle writer connections: one per batch that overlapped
        conn = await asyncpg.connect(pg_url)
        try:
            for path in streams:
                stored = await conn.fetchval(
                    "SELECT string_agg(c.data, ''::bytea ORDER BY c.start_pos) FROM relay_chunks c"
                    " JOIN relay_streams s ON s.id = c.stream_id WHERE s.path = $1",
                    path,
                )
                for start, body in acked[path]:
                    assert stored[start : start + len(body)] == body, (path, start)
                assert len(stored) == sum(len(body) for _, body in acked[path])
        finally:
            await conn.close()
        for path in streams[:7]:  # streams only this relay wrote: every commit heard, in order
            starts = [start for p, start, _ in heard.local if p == path]
            assert starts == sorted(start for start, _ in acked[path])
        assert overlapped >= 2
    finally:
        await one.close()
        await other.close()
