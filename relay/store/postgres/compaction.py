"""Compaction on Postgres: merge a finished or idle stream's small rows into rows of up to
``COMPACT_BYTES`` (which rows: :mod:`relay.store.compaction`).

Each stream is merged in one transaction (delete and insert), so a reader's single SELECT
sees the old rows or the merged one, never a gap or an overlap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import structlog

from relay.store.compaction import (
    COMPACT_BYTES,
    COMPACT_CANDIDATES,
    COMPACT_PASS_BYTES,
    CompactionPass,
    merges,
)
from relay.store.postgres.connections import OFFLINE

log = structlog.get_logger("relay.postgres")

__all__ = ["COMPACT_BYTES", "COMPACT_PASS_BYTES", "CompactionPass", "Compactor", "compact_pass"]


async def compact_pass(
    conn: asyncpg.Connection, now: float, idle_seconds: float, budget: int
) -> CompactionPass:
    """Merge small rows of closed or idle streams, the longest idle first.

    Only streams marked ``compact_pending`` (set by every write) are candidates, so a pass
    costs what it compacts, never what is stored. A stream is unmarked, under its lock,
    once its greedy runs are merged: ``runs`` then leaves no two adjacent rows that fit in
    one, so a second pass locks and reads nothing.
    A pass reads at most ``budget`` bytes (at least one run, so it always progresses);
    what it leaves stays a candidate, at the front, for the next pass.
    """
    done = CompactionPass()
    candidates = await conn.fetch(
        "SELECT id FROM relay_streams WHERE compact_pending "
        "AND (closed OR last_append < $1) ORDER BY last_append, id LIMIT $2",
        now - idle_seconds,
        COMPACT_CANDIDATES,
    )
    for (stream_id,) in candidates:
        if done.bytes_read >= budget:
            break
        done = await compact_stream(conn, stream_id, budget, done)
    return done


async def compact_stream(
    conn: asyncpg.Connection, stream_id: int, budget: int, done: CompactionPass
) -> CompactionPass:
    """Merge one stream's runs in one transaction, reading only the rows being merged."""
    async with conn.transaction():
        locked = await conn.fetchval(
            "SELECT id FROM relay_streams WHERE id = $1 FOR UPDATE SKIP LOCKED", stream_id
        )
        if locked is None:
            return done
        bounds = await conn.fetch(
            "SELECT start_pos, end_pos FROM relay_chunks WHERE stream_id = $1 ORDER BY start_pos",
            stream_id,
        )
        removed = read = 0
        chosen, finished = merges(bounds, budget, done.bytes_read)
        for start, end, _ in chosen:
            rows = await conn.fetch(
                "DELETE FROM relay_chunks WHERE stream_id = $1 AND start_pos >= $2 "
                "AND start_pos < $3 RETURNING start_pos, data",
                stream_id,
                start,
                end,
            )
            rows.sort(key=lambda row: row[0])
            await conn.execute(
                "INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data) "
                "VALUES ($1, $2, $3, $4)",
                stream_id,
                start,
                end,
                b"".join(row[1] for row in rows),
            )
            removed += len(rows) - 1
            read += end - start
        if finished:
            await conn.execute(
                "UPDATE relay_streams SET compact_pending = false WHERE id = $1", stream_id
            )
    return CompactionPass(done.streams + 1, done.rows_removed + removed, done.bytes_read + read)


TOMBSTONE_SECONDS = 7 * 24 * 3600
"""How long a removed stream's tombstone (``relay_removed``) is kept: a relay that lost its
database for longer than this cannot tell that database's losses from removals anyway."""
PRUNE_TOMBSTONES = (
    "DELETE FROM relay_removed WHERE removed_at < extract(epoch FROM clock_timestamp()) - $1"
)


class Compactor:
    """Runs :func:`compact_pass` every ``interval`` seconds on a pooled connection, and counts.
    Each pass also drops tombstones older than ``TOMBSTONE_SECONDS`` (an indexed range)."""

    def __init__(
        self,
        conn: Callable[[], AbstractAsyncContextManager[Any]],
        clock: Callable[[], float],
        idle_seconds: float,
        interval: float,
    ) -> None:
        self._conn = conn
        self._clock = clock
        self._idle = idle_seconds
        self._interval = interval
        self.rows = 0
        self.bytes = 0
        self.passes = 0

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.compact(self._clock())
            except OFFLINE:
                continue
            except Exception:
                log.exception("compaction failed")

    async def compact(self, now: float, *, budget: int = COMPACT_PASS_BYTES) -> CompactionPass:
        """One pass, counted."""
        async with self._conn() as conn:
            done = await compact_pass(conn, now, self._idle, budget)
            await conn.execute(PRUNE_TOMBSTONES, TOMBSTONE_SECONDS)
        self.rows += done.rows_removed
        self.bytes += done.bytes_read
        self.passes += 1
        return done
