"""Background passes cost what they do, not what is stored: a reaper pass over many idle
streams (none expiring) reads none of them.

Postgres tells how many rows each table's sequential scans read (``pg_stat_user_tables``);
the reaper must not add to it for ``relay_streams``. A backend reports its counts when it
exits at the latest, so the test closes the store and waits for its sessions to end.
"""

from __future__ import annotations

import asyncpg

from protocol.create import CreateRequest
from protocol.lifecycle import Expiry
from relay.store.postgres import PostgresStore
from tests.waits import eventually

IDLE_STREAMS = 3000
NOW = 1_000_000.0


async def _seq_reads(conn: asyncpg.Connection) -> int:
    """Rows read by sequential scans of relay_streams, by every session that has ended."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    others = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    # The store's sessions end: their counts are in.
    await eventually(lambda: _none(conn, others), what="the store's sessions to end")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    reads: int = await conn.fetchval(
        "SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = 'relay_streams'"
    )
    return reads


async def test_a_reaper_pass_reads_no_idle_stream(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO relay_streams (path, content_type, tail, last_access, created_at, "
            "last_append) SELECT 'idle/' || i, 'text/plain', 0, $1, $1, $1 "
            "FROM generate_series(1, $2) AS i",
            NOW,
            IDLE_STREAMS,
        )
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


async def _none(conn: asyncpg.Connection, query: str) -> bool:
    count: int = await conn.fetchval(query)
    return count == 0
