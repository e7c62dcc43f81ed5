-- The Postgres store's statements, by name (loaded once: relay.store.common.named_queries;
-- asyncpg prepares each on first use). {meta_columns} stands for the stream row as
-- relay.store.common.row_meta reads it.

-- name: load_stream
SELECT {meta_columns} FROM relay_streams WHERE path = $1;

-- name: load_stream_locked
SELECT {meta_columns} FROM relay_streams WHERE path = $1 FOR UPDATE;

-- name: fork_chain
-- The stream and each fork source up its chain: (id, fork_offset), the stream first.
WITH RECURSIVE chain(id, fork_offset, source_id, depth) AS (
    SELECT id, fork_offset, source_id, 0 FROM relay_streams WHERE id = $1
    UNION ALL
    SELECT s.id, s.fork_offset, s.source_id, c.depth + 1
    FROM relay_streams s JOIN chain c ON s.id = c.source_id
)
SELECT id, fork_offset FROM chain ORDER BY depth;

-- name: stream_id
SELECT id FROM relay_streams WHERE path = $1;

-- name: lock
-- Every row a batch changes up front, locked in one id-ordered pass so relays never deadlock.
SELECT {meta_columns} FROM relay_streams
WHERE path = ANY($1::text[]) OR id = ANY($2::bigint[]) ORDER BY id FOR UPDATE;

-- name: touch
UPDATE relay_streams s SET last_access = greatest(s.last_access, t.at)
FROM unnest($1::bigint[], $2::float8[]) AS t(id, at) WHERE s.id = t.id;

-- name: producers
-- Run after lock, never inside it: in READ COMMITTED a statement's snapshot is taken before it
-- waits for a lock, so producer state read by the locking statement could miss what the
-- lock's previous holder (another relay) committed.
SELECT stream_id, producer_id, epoch, last_seq, acks FROM relay_producers
WHERE stream_id = ANY($1::bigint[]) AND producer_id = ANY($2::text[]);

-- name: producer
SELECT epoch, last_seq, acks FROM relay_producers WHERE stream_id = $1 AND producer_id = $2;

-- name: read_rows
-- The rows holding [$2, $3) of stream $1: from the last one starting at or before $2 (a
-- stream's rows are contiguous, so it holds $2) up to $3, both ends found by the key, so a
-- read from the middle of a long stream costs what a read from its start costs.
SELECT start_pos, data FROM relay_chunks
WHERE stream_id = $1 AND start_pos < $3 AND end_pos > $2 AND start_pos >= coalesce(
    (SELECT max(start_pos) FROM relay_chunks WHERE stream_id = $1 AND start_pos <= $2), 0)
ORDER BY start_pos;

-- name: inheriting
-- Every stream that can read stream $1's bytes at or past offset $2: its forks made past that
-- offset and all their descendants, as (id, path).
WITH RECURSIVE d(id, path) AS (
    SELECT id, path FROM relay_streams WHERE source_id = $1 AND fork_offset > $2
    UNION ALL SELECT s.id, s.path FROM relay_streams s JOIN d ON s.source_id = d.id
)
SELECT id, path FROM d;

-- name: retention_limit
-- The lowest horizon among the stream's descendant forks (NULL when it has none).
WITH RECURSIVE d(id, h) AS (
    SELECT id, retained_from FROM relay_streams WHERE source_id = $1
    UNION ALL SELECT s.id, s.retained_from FROM relay_streams s JOIN d ON s.source_id = d.id
)
SELECT min(h) FROM d;

-- name: inherited
SELECT max(fork_offset) FROM relay_streams WHERE source_id = $1;

-- name: expired
-- Candidates from the two partial indexes first, then the rows by id. Asked in one piece, a
-- planner with no statistics for relay_streams (never analyzed) took a third of the streams
-- for expiring and walked the primary key in id order to fill the LIMIT: every pass read
-- every stream (29 ms of database CPU at 100,000 streams).
WITH due AS MATERIALIZED (
    (SELECT id FROM relay_streams WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT 1000)
    UNION
    (SELECT id FROM relay_streams WHERE ttl IS NOT NULL AND last_access + ttl <= $1 LIMIT 1000)
)
SELECT {meta_columns} FROM relay_streams
WHERE id = ANY(ARRAY(SELECT id FROM due)) AND NOT soft_deleted AND (
    (expires_at IS NOT NULL AND expires_at <= $1) OR (ttl IS NOT NULL AND last_access + ttl <= $1))
ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED;

-- name: orphans
SELECT id FROM relay_streams s WHERE soft_deleted
AND NOT EXISTS (SELECT 1 FROM relay_streams f WHERE f.source_id = s.id)
LIMIT 1000 FOR UPDATE SKIP LOCKED;

-- name: purge_chain
-- (id, path) a purge of stream $1 removes: it, then each soft-deleted source left with no
-- other fork, up the chain.
WITH RECURSIVE doomed(id, source_id, path) AS (
    SELECT id, source_id, path FROM relay_streams WHERE id = $1
    UNION ALL SELECT s.id, s.source_id, s.path FROM relay_streams s
    JOIN doomed d ON s.id = d.source_id
    WHERE s.soft_deleted AND NOT EXISTS (
        SELECT 1 FROM relay_streams f WHERE f.source_id = s.id AND f.id <> d.id)
)
SELECT id, path FROM doomed;

-- name: insert_stream
INSERT INTO relay_streams (path, content_type, tail, closed, ttl, expires_at, last_access,
    created_at, last_append, source_id, forked_from, fork_offset, retained_from)
VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $7, $8, $9, $10, $11)
ON CONFLICT (path) DO NOTHING RETURNING {meta_columns};

-- name: erase_chunks
DELETE FROM relay_chunks WHERE stream_id = ANY($1::bigint[]);

-- name: erase_producers
DELETE FROM relay_producers WHERE stream_id = ANY($1::bigint[]);

-- name: erase_streams
DELETE FROM relay_streams WHERE id = ANY($1::bigint[]);

-- name: tombstones
-- Streams removed for good (deleted, revoked, expired): what tells a removal from a loss
-- after a failover (relay.store.postgres.guarded.Divergence).
INSERT INTO relay_removed (stream_id, removed_at)
SELECT unnest($1::bigint[]), extract(epoch FROM clock_timestamp()) ON CONFLICT DO NOTHING;

-- name: removed
SELECT true FROM relay_removed WHERE stream_id = $1;

-- name: soft_delete
UPDATE relay_streams SET soft_deleted = true WHERE id = $1;

-- name: erase_beyond
DELETE FROM relay_chunks WHERE stream_id = $1 AND start_pos >= $2;

-- name: cut_across
UPDATE relay_chunks SET data = substring(data FROM 1 FOR ($2 - start_pos)::int), end_pos = $2
WHERE stream_id = $1 AND start_pos < $2 AND end_pos > $2;

-- name: set_horizon
UPDATE relay_streams SET retained_from = $2 WHERE id = $1;

-- name: trim_before
DELETE FROM relay_chunks WHERE stream_id = $1 AND end_pos <= $2;

-- name: watched
SELECT id, tail, closed FROM relay_streams WHERE id = ANY($1::bigint[]) AND NOT soft_deleted;

-- name: schema_version
SELECT coalesce(max(version), 0) FROM relay_schema_version;

-- name: insert_chunks
INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[]);

-- name: set_written
-- What a write sets on each stream row it moves (u: the unnest of its new state).
tail = u.tail, closed = u.closed, last_access = greatest(s.last_access, u.at),
last_append = u.at, stream_seq = u.seq, compact_pending = true, closed_by_id = u.cid,
closed_by_epoch = u.cepoch, closed_by_seq = u.cseq, successor = u.successor;

-- name: upsert_producers
INSERT INTO relay_producers (stream_id, producer_id, epoch, last_seq, acks)
SELECT * FROM unnest($13::bigint[], $14::text[], $15::bigint[], $16::bigint[], $19::text[])
ON CONFLICT (stream_id, producer_id) DO UPDATE
SET epoch = excluded.epoch, last_seq = excluded.last_seq, acks = excluded.acks;

-- name: write
-- A batch's writes in one statement (data-modifying CTEs all apply; one round trip).
WITH chunks AS ({insert_chunks}), streams AS (
    UPDATE relay_streams s SET {set_written}
    FROM unnest($5::bigint[], $6::bigint[], $7::bool[], $8::float8[], $9::text[], $10::text[],
                $11::bigint[], $12::bigint[], $20::text[])
        AS u(id, tail, closed, at, seq, cid, cepoch, cseq, successor)
    WHERE s.id = u.id
), producers AS ({upsert_producers})
SELECT pg_notify($17, $18) WHERE $18::text IS NOT NULL;

-- name: guarded_write
-- The whole batch in one implicit transaction, committed in the same round trip, provided
-- every stream it writes still has the tail this relay planned against ($21; else RL001 rolls
-- it all back). Producer state and Stream-Seq change only with a stream's tail or closure, so
-- an unchanged tail means the producer states the plan used are the database's too.
WITH streams AS (
    UPDATE relay_streams s SET {set_written}
    FROM unnest($5::bigint[], $6::bigint[], $7::bool[], $8::float8[], $9::text[], $10::text[],
                $11::bigint[], $12::bigint[], $20::text[], $21::bigint[])
        AS u(id, tail, closed, at, seq, cid, cepoch, cseq, successor, expected)
    WHERE s.id = u.id AND s.tail = u.expected AND NOT s.closed AND NOT s.soft_deleted
    RETURNING s.id
), chunks AS ({insert_chunks}), producers AS ({upsert_producers})
SELECT pg_notify($17, $18)
FROM (SELECT relay_guard((SELECT count(*) FROM streams) = cardinality($5::bigint[]))) AS checked;
