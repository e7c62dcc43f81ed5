"""The store's named statements (its ports into the database), and the reads built on them."""

from __future__ import annotations

from dataclasses import replace

import asyncpg

from protocol.model import StreamMeta, fork_segments
from relay.store.common import (
    META_COLUMNS,
    inheriting_sql,
    purge_chain_sql,
    retention_limit_sql,
    segment_ranges,
    stitch,
)

PURGE_CHAIN = purge_chain_sql("relay_streams", "$1")
RETENTION_LIMIT = retention_limit_sql("relay_streams", "$1")
INHERITING = inheriting_sql("relay_streams", "$1", "$2")
ERASE_BEYOND = (
    "DELETE FROM relay_chunks WHERE stream_id = $1 AND start_pos >= $2",
    "UPDATE relay_chunks SET data = substring(data FROM 1 FOR ($2 - start_pos)::int), "
    "end_pos = $2 WHERE stream_id = $1 AND start_pos < $2 AND end_pos > $2",
)
"""Erase a soft-deleted stream's bytes from offset $2 on (none of its forks reads them): rows
beyond go, the row across is cut there."""
CHAIN = """
WITH RECURSIVE chain(id, fork_offset, source_id, depth) AS (
    SELECT id, fork_offset, source_id, 0 FROM relay_streams WHERE id = $1
    UNION ALL
    SELECT s.id, s.fork_offset, s.source_id, c.depth + 1
    FROM relay_streams s JOIN chain c ON s.id = c.source_id
)
SELECT id, fork_offset FROM chain ORDER BY depth
"""

LOCK = (
    f"SELECT {META_COLUMNS} FROM relay_streams "
    "WHERE path = ANY($1::text[]) OR id = ANY($2::bigint[]) ORDER BY id FOR UPDATE"
)
"""Every row a batch changes up front, locked in one id-ordered pass so relays never deadlock."""
PRODUCERS = """
SELECT stream_id, producer_id, epoch, last_seq, acks FROM relay_producers
WHERE stream_id = ANY($1::bigint[]) AND producer_id = ANY($2::text[])
"""
"""Run after LOCK, never inside it: in READ COMMITTED a statement's snapshot is taken before
it waits for a lock, so producer state read by the locking statement could miss what the lock's
previous holder (another relay) committed."""
WRITE = """
WITH chunks AS (
    INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[])
), streams AS (
    UPDATE relay_streams s SET tail = u.tail, closed = u.closed,
        last_access = greatest(s.last_access, u.at), last_append = u.at, stream_seq = u.seq,
        compact_pending = true,
        closed_by_id = u.cid, closed_by_epoch = u.cepoch, closed_by_seq = u.cseq,
        successor = u.successor
    FROM unnest($5::bigint[], $6::bigint[], $7::bool[], $8::float8[], $9::text[], $10::text[],
                $11::bigint[], $12::bigint[], $20::text[])
        AS u(id, tail, closed, at, seq, cid, cepoch, cseq, successor)
    WHERE s.id = u.id
), producers AS (
    INSERT INTO relay_producers (stream_id, producer_id, epoch, last_seq, acks)
    SELECT * FROM unnest($13::bigint[], $14::text[], $15::bigint[], $16::bigint[], $19::text[])
    ON CONFLICT (stream_id, producer_id) DO UPDATE
    SET epoch = excluded.epoch, last_seq = excluded.last_seq, acks = excluded.acks
)
SELECT pg_notify($17, $18) WHERE $18::text IS NOT NULL
"""
"""A batch's writes in one statement (data-modifying CTEs all apply; one round trip)."""
GUARDED_WRITE = """
WITH streams AS (
    UPDATE relay_streams s SET tail = u.tail, closed = u.closed,
        last_access = greatest(s.last_access, u.at), last_append = u.at, stream_seq = u.seq,
        compact_pending = true,
        closed_by_id = u.cid, closed_by_epoch = u.cepoch, closed_by_seq = u.cseq,
        successor = u.successor
    FROM unnest($5::bigint[], $6::bigint[], $7::bool[], $8::float8[], $9::text[], $10::text[],
                $11::bigint[], $12::bigint[], $20::text[], $21::bigint[])
        AS u(id, tail, closed, at, seq, cid, cepoch, cseq, successor, expected)
    WHERE s.id = u.id AND s.tail = u.expected AND NOT s.closed AND NOT s.soft_deleted
    RETURNING s.id
), chunks AS (
    INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[])
), producers AS (
    INSERT INTO relay_producers (stream_id, producer_id, epoch, last_seq, acks)
    SELECT * FROM unnest($13::bigint[], $14::text[], $15::bigint[], $16::bigint[], $19::text[])
    ON CONFLICT (stream_id, producer_id) DO UPDATE
    SET epoch = excluded.epoch, last_seq = excluded.last_seq, acks = excluded.acks
)
SELECT pg_notify($17, $18)
FROM (SELECT relay_guard((SELECT count(*) FROM streams) = cardinality($5::bigint[]))) AS checked
"""
"""The whole batch in one implicit transaction, committed in the same round trip, provided
every stream it writes still has the tail this relay planned against (else RL001 rolls it all
back). Producer state and ``Stream-Seq`` change only with a stream's tail or closure, so an
unchanged tail means the producer states the plan used are the database's too."""


async def read_range(conn: asyncpg.Connection, meta: StreamMeta, start: int, end: int) -> bytes:
    out = bytearray()
    for stream_id, lo, hi in segment_ranges(meta, start, end):
        rows = await conn.fetch(
            "SELECT start_pos, data FROM relay_chunks WHERE stream_id = $1 AND end_pos > $2 "
            "AND start_pos < $3 ORDER BY start_pos",
            stream_id,
            lo,
            hi,
        )
        stitch(out, rows, lo, hi)
    return bytes(out)


async def with_segments(conn: asyncpg.Connection, meta: StreamMeta) -> StreamMeta:
    if meta.source_id is None:
        chain = [(meta.stream_id, meta.fork_offset)]
    else:
        rows = await conn.fetch(CHAIN, meta.stream_id)
        chain = [(row[0], row[1]) for row in rows]
    return replace(meta, segments=fork_segments(chain))
