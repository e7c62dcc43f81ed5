"""What the stores' hot and periodic statements touch, from the databases' own plans: a read
from anywhere in a long stream touches the rows it returns (not every row before it), and the
reaper's statements look only at streams that can expire or are soft-deleted."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import asyncpg

from relay.store.postgres.transaction import Q as PG
from relay.store.sqlite import Q as SQLITE
from relay.store.sqlite import migrate


def sqlite_plan(name: str, *args: object) -> list[str]:
    conn = sqlite3.connect(":memory:")
    migrate(conn)
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + SQLITE[name], args)]


def test_sqlite_reads_seek_both_ends_of_the_range() -> None:
    plan = sqlite_plan("read_rows", 1, 5_000_000, 5_001_000)
    assert plan[0].startswith("SEARCH chunks USING INDEX")
    assert "start_pos>? AND start_pos<?" in plan[0]


def test_sqlite_reaper_statements_use_only_partial_indexes() -> None:
    for name, args in (("expired", (1.0,)), ("orphans", ())):
        plan = sqlite_plan(name, *args)
        scans = [step for step in plan if step.startswith(("SCAN", "SEARCH"))]
        assert scans and all("USING" in step and "INDEX" in step for step in scans), plan
    assert any("streams_expiry" in step for step in sqlite_plan("expired", 1.0))
    assert any("streams_soft_deleted" in step for step in sqlite_plan("orphans"))


def test_sqlite_compaction_candidates_come_from_the_pending_index_alone() -> None:
    """A compaction pass looks only at streams written since their last merge."""
    plan = sqlite_plan("compact_candidates", 1.0, 100)
    assert plan == [
        "SEARCH compact_pending USING COVERING INDEX compact_pending_idle (written_at<?)"
    ]


def _rows_touched(node: dict[str, Any]) -> int:
    """Rows every scan in a plan read (returned plus removed by a filter)."""
    touched = 0
    if "Scan" in node["Node Type"]:
        loops = node.get("Actual Loops", 1)
        touched += (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * loops
    for child in node.get("Plans", []):
        touched += _rows_touched(child)
    return touched


async def test_postgres_reads_from_the_end_of_a_long_stream_touch_few_rows(pg_url: str) -> None:
    rows = 20_000
    conn = await asyncpg.connect(pg_url)
    try:
        stream_id = await conn.fetchval(
            "INSERT INTO relay_streams (path, content_type, tail, last_access, created_at, "
            "last_append) VALUES ('long', 'text/plain', $1, 0, 0, 0) RETURNING id",
            rows * 6,
        )
        await conn.execute(
            "INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data) "
            "SELECT $1, g * 6, g * 6 + 6, 'token '::bytea FROM generate_series(0, $2 - 1) g",
            stream_id,
            rows,
        )
        await conn.execute("ANALYZE relay_chunks")
        for lo in (0, rows * 3, rows * 6 - 60):  # start, middle, end
            explained = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + PG["read_rows"], stream_id, lo, lo + 60
            )
            plan = json.loads(explained)[0]["Plan"]
            assert _rows_touched(plan) <= 30, (lo, plan)  # 10 rows read, a few probed
    finally:
        await conn.close()
