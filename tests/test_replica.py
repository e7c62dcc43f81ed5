"""Read replicas: catch-up bytes come from a hot standby (a real ``pg_basebackup -R`` one, see
tests/failover.py) only when it holds all of them; anything it has not replayed (replay paused
with ``pg_wal_replay_pause()``), a stream re-created meanwhile, a standby that is down or no
standby at all is read from the primary, so the answer is always the primary's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from protocol.append import AppendRequest
from protocol.create import CreateRequest, ForkRequest
from protocol.lifecycle import Expiry
from protocol.model import StreamMeta
from relay.bench import report, run_results
from relay.cli import build_parser
from relay.config import ConfigError, env_value, parse
from relay.store.postgres import PostgresStore
from relay.store.postgres.replicas import covered
from tests.failover import ReplicatedPair
from tests.relay_process import RelayProcess, read_all
from tests.waits import eventually

NOW = 1_800_000_000.0


def text(body: bytes) -> AppendRequest:
    return AppendRequest("text/plain", body, close=False, body_empty=not body)


def plain(path: str, body: bytes = b"", fork: ForkRequest | None = None) -> CreateRequest:
    return CreateRequest(path, "text/plain", Expiry(), False, body, fork=fork)


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPair]:
    replicated = ReplicatedPair(synchronous=False)
    try:
        replicated.start()
        yield replicated
    finally:
        replicated.close()


async def _fetchval(url: str, query: str, *args: object) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def pause_replay(pair: ReplicatedPair) -> None:
    """From now on the standby applies no WAL record (it checks before each one)."""
    await _fetchval(pair.url("standby"), "SELECT pg_wal_replay_pause()")


async def resume_replay(pair: ReplicatedPair) -> None:
    await _fetchval(pair.url("standby"), "SELECT pg_wal_replay_resume()")


@pytest.fixture
async def store(pair: ReplicatedPair) -> AsyncIterator[PostgresStore]:
    replicated = PostgresStore(
        pair.url("primary"),
        read_urls=[pair.url("standby")],
        compact_idle_seconds=0,
        compact_interval=3600,
    )
    await replicated.open()
    try:
        yield replicated
    finally:
        await replicated.close()
        await resume_replay(pair)


async def on_both(store: PostgresStore, pair: ReplicatedPair, path: str, body: bytes) -> StreamMeta:
    """A stream created with ``body``, once the standby has it too."""
    meta = (await store.create(plain(path, body), NOW)).meta
    await pair.caught_up()
    return meta


async def primary_bytes(pair: ReplicatedPair, meta: StreamMeta) -> bytes:
    """What a store without replicas reads: the primary's answer."""
    alone = PostgresStore(pair.url("primary"), compact_interval=3600)
    await alone.open()
    try:
        return await alone.read(meta, 0, meta.tail)
    finally:
        await alone.close()


def counts(store: PostgresStore) -> tuple[int | None, int | None, int | None]:
    stats = store.stats()
    return stats.replica_reads, stats.replica_fallbacks, stats.replica_errors


def test_coverage_needs_every_byte_contiguously() -> None:
    assert covered([(0, b"abc"), (3, b"def")], 1, 5) == b"bcde"
    assert covered([(0, b"abc"), (4, b"ef")], 0, 6) is None  # a gap
    assert covered([(0, b"abc")], 0, 4) is None  # short: not replayed that far
    assert covered([], 0, 1) is None  # no rows: an id newer than the replay


async def test_catch_up_reads_come_from_the_replica_with_the_primarys_bytes(
    store: PostgresStore, pair: ReplicatedPair
) -> None:
    parts = [bytes([65 + i]) * (1000 + i) for i in range(20)]
    await store.create(plain("/r/source"), NOW)
    for part in parts:
        await store.append("/r/source", text(part), NOW)
    await store.compact(NOW + 1)  # merged rows, as replicated
    await store.append("/r/source", text(b"tail"), NOW)  # and one row after them
    source = await store.head("/r/source", NOW, touch=False)
    fork = plain("/r/fork", b"-forked", ForkRequest("/r/source", 5000, 0))
    forked = (await store.create(fork, NOW)).meta
    await pair.caught_up()
    expected = b"".join(parts) + b"tail"

    assert await store.read(source, 0, source.tail) == expected
    assert await store.read(source, 999, 3001) == expected[999:3001]
    assert await store.read(forked, 0, forked.tail) == expected[:5000] + b"-forked"
    assert counts(store) == (3, 0, 0)
    assert await primary_bytes(pair, forked) == expected[:5000] + b"-forked"
    assert store.stats().replicas_up == 1


async def test_bytes_the_replica_has_not_replayed_come_from_the_primary(
    store: PostgresStore, pair: ReplicatedPair
) -> None:
    await on_both(store, pair, "/r/paused", b"replayed.")
    await pause_replay(pair)
    meta = (await store.append("/r/paused", text(b"not yet on the replica"), NOW)).meta

    assert await store.read(meta, 0, meta.tail) == b"replayed.not yet on the replica"
    assert counts(store) == (0, 1, 0)
    assert await store.read(meta, 0, 9) == b"replayed."  # the replica holds all of that
    assert counts(store) == (1, 1, 0)

    await resume_replay(pair)
    await pair.caught_up()
    assert await store.read(meta, 0, meta.tail) == b"replayed.not yet on the replica"
    assert counts(store) == (2, 1, 0)


async def test_a_stream_recreated_while_replay_is_paused_reads_only_its_new_bytes(
    store: PostgresStore, pair: ReplicatedPair
) -> None:
    await on_both(store, pair, "/r/again", b"old bytes, replayed")
    await pause_replay(pair)
    await store.delete("/r/again", NOW)
    await store.create(plain("/r/again", b"new bytes, same size"[:19]), NOW)
    meta = await store.head("/r/again", NOW, touch=False)

    assert await store.read(meta, 0, meta.tail) == b"new bytes, same siz"
    assert counts(store) == (0, 1, 0)


async def test_a_replica_that_is_down_leaves_reads_to_the_primary_and_says_so_once(
    store: PostgresStore, pair: ReplicatedPair
) -> None:
    meta = await on_both(store, pair, "/r/down", b"still readable")
    assert await store.read(meta, 0, meta.tail) == b"still readable"
    pair.stop_standby()
    try:
        with capture_logs() as logs:
            for _ in range(5):
                assert await store.read(meta, 0, meta.tail) == b"still readable"
        assert store.stats().replicas_up == 0
        warnings = [e for e in logs if e["event"].startswith("read replica unavailable")]
        assert len(warnings) == 1
    finally:
        pair.start_standby()

    async def used_again() -> bool:  # tried again a little later, then used again
        assert await store.read(meta, 0, meta.tail) == b"still readable"
        return (store.stats().replica_reads or 0) > 1

    await eventually(used_again, timeout=60, interval=0.1, what="the replica used again")
    assert store.stats().replicas_up == 1


async def test_a_server_that_is_not_a_standby_is_never_read(pair: ReplicatedPair) -> None:
    """A primary (or a standby promoted by a failover) may hold history of its own."""
    store = PostgresStore(pair.url("primary"), read_urls=[pair.url("primary")])
    await store.open()
    try:
        meta = (await store.create(plain("/r/not-a-standby", b"bytes"), NOW)).meta
        with capture_logs() as logs:
            assert await store.read(meta, 0, meta.tail) == b"bytes"
        assert store.stats().replica_reads == 0 and store.stats().replicas_up == 0
        assert any("not in recovery" in str(e.get("reason")) for e in logs)
    finally:
        await store.close()


async def test_a_standby_left_on_the_old_timeline_by_a_failover_is_never_read(
    tmp_path: Path,
) -> None:
    """Standby B is stopped, an append reaches only the primary and standby C, the primary
    dies and B is promoted: C still holds that lost append, at offsets where the new primary
    then takes a different one. C is in recovery, of the same cluster, and holds every byte
    asked for; only its timeline tells it apart."""
    trio = ReplicatedPair(synchronous=False)
    try:
        trio.start()
        left_behind = trio.add_standby("left-behind")
        old = PostgresStore(trio.url("primary"), compact_interval=3600)
        await old.open()
        try:
            await old.create(plain("/r/timeline", b"v1|"), NOW)
            await trio.caught_up()
            trio.stop_standby()
            await old.append("/r/timeline", text(b"lost"), NOW)
            await trio.caught_up("left-behind")
        finally:
            await old.close()
        trio.kill_primary()
        trio.start_standby()
        trio.promote()
        new = PostgresStore(trio.url("standby"), read_urls=[left_behind], compact_interval=3600)
        await new.open()
        try:
            meta = (await new.append("/r/timeline", text(b"diff"), NOW)).meta
            assert await new.read(meta, 0, meta.tail) == b"v1|diff"
            assert counts(new) == (0, 1, 0)
        finally:
            await new.close()
    finally:
        trio.close()


async def test_relay_serve_reads_catch_up_from_the_replica(
    pair: ReplicatedPair, tmp_path: Path
) -> None:
    urls = ("--database-url", pair.url("primary"), "--read-database-url", pair.url("standby"))
    relay = RelayProcess(tmp_path / "data", *urls)
    body = b"".join(b"line %06d\n" % n for n in range(30000))
    relay.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{relay.url}/v1/stream/replicated"
            async with http.put(url, headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 201
            async with http.post(url, data=body, headers={"Content-Type": "text/plain"}) as r:
                assert r.status in (200, 204)
            relay.stop()  # a fresh relay holds nothing in memory: every byte is a store read
            await pair.caught_up()
            relay.start()
            assert await read_all(http, url) == body
            async with http.get(f"{relay.url}/metrics") as r:
                metrics = await r.text()
    finally:
        relay.stop()
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line[:1] != "#")
    assert float(values["relay_store_replica_reads_total"]) >= 1
    assert float(values["relay_store_replica_fallbacks_total"]) == 0
    assert values["relay_store_replicas_up"] == "1.0"


def test_read_database_url_is_repeatable_or_comma_separated_and_needs_a_primary() -> None:
    one, two = "postgresql://r@h1:5432,h2:5432/db", "postgres://r@h3/db"
    primary = ["--database-url", "postgresql://p/db"]
    both = (one, two)
    repeated = parse([*primary, "--read-database-url", one, "--read-database-url", two])
    assert repeated.read_database_url == both
    assert parse(primary, {"RELAY_READ_DATABASE_URL": f"{one}, {two}"}).read_database_url == both
    assert parse(primary).read_database_url == ()
    as_workers_get_it = {"RELAY_READ_DATABASE_URL": env_value(both)}  # --workers children
    assert parse(primary, as_workers_get_it).read_database_url == both
    with pytest.raises(ConfigError, match="--read-database-url needs --database-url"):
        parse(["--read-database-url", one])
    with pytest.raises(ConfigError, match="RELAY_READ_DATABASE_URL"):
        parse(primary, {"RELAY_READ_DATABASE_URL": "h1:5432"})


def test_relay_bench_catchup_reads_from_the_replica_and_reports_both_servers_cpu(
    pair: ReplicatedPair,
) -> None:
    argv = ["bench", "--scenarios", "catchup", "--catchup-mib", "3", "--no-pin"]
    argv += ["--database-url", pair.url("primary"), "--read-database-url", pair.url("standby")]
    args = build_parser().parse_args(argv)
    (result,) = run_results(args)

    assert result.lost == 0
    assert result.usage.replica_reads and result.usage.replica_fallbacks == 0
    assert result.usage.db_cpu is not None and result.usage.replica_cpu is not None
    assert "relay (postgres + replica)" in report([result], args)
