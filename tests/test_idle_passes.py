"""Background passes and writes cost what they do, not what is stored: a reaper pass over many
idle streams (none expiring) reads none of them, and neither do creates and appends made after
the table grew under a running relay.

Postgres tells how many rows each table's scans read (``pg_stat_user_tables``: sequential
scans' rows and the rows index scans fetched); the reaper must not add to it for
``relay_streams``, with statistics or without (a table never analyzed). A backend reports its
counts when it exits at the latest, so the test closes the store and waits for its sessions to
end.
"""

from __future__ import annotations

import asyncpg
import pytest

from protocol.append import AppendRequest
from protocol.create import CreateRequest
from protocol.lifecycle import Expiry
from relay.store.postgres import PostgresStore
from tests.waits import eventually

IDLE_STREAMS = 30_000
NOW = 1_000_000.0


async def _seq_reads(conn: asyncpg.Connection) -> int:
    """Rows of relay_streams read by scans (sequential, or fetched by an index), by every
    session that has ended."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    others = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    # The store's sessions end: their counts are in.
    await eventually(lambda: _none(conn, others), what="the store's sessions to end")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    reads: int = await conn.fetchval(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables "
        "WHERE relname = 'relay_streams'"
    )
    return reads


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed", "never-analyzed"])
async def test_a_reaper_pass_reads_no_idle_stream(pg_url: str, analyzed: bool) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("ALTER TABLE relay_streams SET (autovacuum_enabled = false)")
        await _add_idle(conn)
        if analyzed:
            await conn.execute("ANALYZE relay_streams")
        store = PostgresStore(pg_url, compact_interval=3600)
        await store.open()
        try:
            short = CreateRequest("short", "text/plain", Expiry(ttl=10), False, b"")
            await store.create(short, NOW)
        finally:
            await store.close()
        before = await _seq_reads(conn)
        store = PostgresStore(pg_url, compact_interval=3600)
        await store.open()
        try:
            for _ in range(5):
                assert await store.reap(NOW + 1) == 0
            assert await store.reap(NOW + 20) == 1  # the one that can expire, found by index
        finally:
            await store.close()
        after = await _seq_reads(conn)
    finally:
        await conn.close()
    assert after - before < IDLE_STREAMS, "a reaper pass read the idle streams"


async def test_writes_read_no_idle_stream_after_the_table_grows(pg_url: str) -> None:
    """A relay started on an empty, never-analyzed table (autovacuum off or not yet run) has
    its statements prepared, and planned generically, while the table is tiny; creates and
    appends must still find their rows by index once idle streams fill the table."""
    conn = await asyncpg.connect(pg_url)
    store = PostgresStore(pg_url, compact_interval=3600)
    try:
        await store.open()
        for table in ("relay_streams", "relay_chunks"):
            await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")

        async def rounds(prefix: str, count: int) -> None:
            for i in range(count):  # one at a time: the same committer connection each time
                path = f"{prefix}/{i}"
                await store.create(CreateRequest(path, "text/plain", Expiry(), False, b""), NOW)
                for _ in range(2):
                    await store.append(path, AppendRequest("text/plain", b"token "), NOW)

        await rounds("early", 10)  # past the 5 runs after which Postgres may plan generically
        await _add_idle(conn)
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        before: int = await conn.fetchval(
            "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables "
            "WHERE relname = 'relay_streams'"
        )
        await rounds("late", 10)
    finally:
        await store.close()
    try:
        after = await _seq_reads(conn)
    finally:
        await conn.close()
    # Without an index plan each of the 30 late writes would read all 30,000 idle rows.
    assert after - before < IDLE_STREAMS, "a create or append read the idle streams"


async def _add_idle(conn: asyncpg.Connection) -> None:
    """IDLE_STREAMS streams that nothing touches (no expiry, never soft-deleted)."""
    await conn.execute(
        "INSERT INTO relay_streams (path, content_type, tail, last_access, created_at, "
        "last_append) SELECT 'idle/' || i, 'text/plain', 0, $1, $1, $1 "
        "FROM generate_series(1, $2) AS i",
        NOW,
        IDLE_STREAMS,
    )


async def _none(conn: asyncpg.Connection, query: str) -> bool:
    count: int = await conn.fetchval(query)
    return count == 0
