-- The embedded store's statements, by name (loaded once: relay.store.common.named_queries).
-- {meta_columns} stands for the stream row as relay.store.common.row_meta reads it.

-- name: load_stream
SELECT {meta_columns} FROM streams WHERE path = ?;

-- name: fork_chain
-- The stream and each fork source up its chain: (id, fork_offset), the stream first.
WITH RECURSIVE chain(id, fork_offset, source_id, depth) AS (
    SELECT id, fork_offset, source_id, 0 FROM streams WHERE id = ?
    UNION ALL
    SELECT s.id, s.fork_offset, s.source_id, c.depth + 1
    FROM streams s JOIN chain c ON s.id = c.source_id
)
SELECT id, fork_offset FROM chain ORDER BY depth;

-- name: stream_id
SELECT id FROM streams WHERE path = ?;

-- name: producer
SELECT epoch, last_seq, acks FROM producers WHERE stream_id = ? AND producer_id = ?;

-- name: read_rows
-- The rows holding [?2, ?3) of stream ?1: from the last one starting at or before ?2 (a
-- stream's rows are contiguous, so it holds ?2) up to ?3, both ends found by the key, so a
-- read from the middle of a long stream costs what a read from its start costs (bounded
-- above only, it walked every row before ?3).
SELECT start_pos, data FROM chunks
WHERE stream_id = ?1 AND start_pos < ?3 AND end_pos > ?2 AND start_pos >= coalesce(
    (SELECT max(start_pos) FROM chunks WHERE stream_id = ?1 AND start_pos <= ?2), 0)
ORDER BY start_pos;

-- name: inheriting
-- Every stream that can read stream ?1's bytes at or past offset ?2: its forks made past that
-- offset and all their descendants, as (id, path).
WITH RECURSIVE d(id, path) AS (
    SELECT id, path FROM streams WHERE source_id = ?1 AND fork_offset > ?2
    UNION ALL SELECT s.id, s.path FROM streams s JOIN d ON s.source_id = d.id
)
SELECT id, path FROM d;

-- name: retention_limit
-- The lowest horizon among the stream's descendant forks (NULL when it has none).
WITH RECURSIVE d(id, h) AS (
    SELECT id, retained_from FROM streams WHERE source_id = ?
    UNION ALL SELECT s.id, s.retained_from FROM streams s JOIN d ON s.source_id = d.id
)
SELECT min(h) FROM d;

-- name: inherited
SELECT max(fork_offset) FROM streams WHERE source_id = ?;

-- name: expired
SELECT {meta_columns} FROM streams WHERE soft_deleted = 0 AND (
    (expires_at IS NOT NULL AND expires_at <= ?1) OR (ttl IS NOT NULL AND last_access + ttl <= ?1));

-- name: orphans
SELECT id FROM streams s WHERE soft_deleted = 1
AND NOT EXISTS (SELECT 1 FROM streams f WHERE f.source_id = s.id);

-- name: purge_chain
-- (id, path) a purge of stream ? removes: it, then each soft-deleted source left with no
-- other fork, up the chain.
WITH RECURSIVE doomed(id, source_id, path) AS (
    SELECT id, source_id, path FROM streams WHERE id = ?
    UNION ALL SELECT s.id, s.source_id, s.path FROM streams s JOIN doomed d ON s.id = d.source_id
    WHERE s.soft_deleted AND NOT EXISTS (
        SELECT 1 FROM streams f WHERE f.source_id = s.id AND f.id <> d.id)
)
SELECT id, path FROM doomed;

-- name: insert_stream
INSERT INTO streams (path, content_type, tail, closed, ttl, expires_at, last_access,
    created_at, source_id, forked_from, fork_offset, retained_from)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11)
RETURNING {meta_columns};

-- name: touch
UPDATE streams SET last_access = max(last_access, ?) WHERE id = ?;

-- name: write_chunk
INSERT INTO chunks (stream_id, start_pos, end_pos, data) VALUES (?, ?, ?, ?);

-- name: write_stream
UPDATE streams SET tail = ?, closed = ?, last_access = max(last_access, ?), stream_seq = ?,
    closed_by_id = ?, closed_by_epoch = ?, closed_by_seq = ?, successor = ?
WHERE id = ?;

-- name: write_producer
INSERT INTO producers (stream_id, producer_id, epoch, last_seq, acks) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (stream_id, producer_id) DO UPDATE
SET epoch = excluded.epoch, last_seq = excluded.last_seq, acks = excluded.acks;

-- name: erase_chunks
DELETE FROM chunks WHERE stream_id IN (SELECT value FROM json_each(?));

-- name: erase_producers
DELETE FROM producers WHERE stream_id IN (SELECT value FROM json_each(?));

-- name: erase_streams
DELETE FROM streams WHERE id IN (SELECT value FROM json_each(?));

-- name: erase_compact_pending
DELETE FROM compact_pending WHERE stream_id IN (SELECT value FROM json_each(?));

-- name: soft_delete
UPDATE streams SET soft_deleted = 1 WHERE id = ?;

-- name: erase_beyond
DELETE FROM chunks WHERE stream_id = ?1 AND start_pos >= ?2;

-- name: cut_across
UPDATE chunks SET data = substr(data, 1, ?2 - start_pos), end_pos = ?2
WHERE stream_id = ?1 AND start_pos < ?2 AND end_pos > ?2;

-- name: set_horizon
UPDATE streams SET retained_from = ?2 WHERE id = ?1;

-- name: trim_before
DELETE FROM chunks WHERE stream_id = ?1 AND end_pos <= ?2;

-- name: mark_written
-- A stream whose rows a batch wrote: a compaction candidate once idle.
INSERT INTO compact_pending (stream_id, written_at) VALUES (?1, ?2)
ON CONFLICT (stream_id) DO UPDATE SET written_at = max(written_at, excluded.written_at);

-- name: compact_candidates
-- Streams unwritten since ?1, the longest idle first (the index alone answers).
SELECT stream_id FROM compact_pending WHERE written_at < ?1 ORDER BY written_at, stream_id
LIMIT ?2;

-- name: compact_bounds
SELECT start_pos, end_pos FROM chunks WHERE stream_id = ?1 ORDER BY start_pos;

-- name: compact_take
SELECT data FROM chunks WHERE stream_id = ?1 AND start_pos >= ?2 AND start_pos < ?3
ORDER BY start_pos;

-- name: compact_drop
DELETE FROM chunks WHERE stream_id = ?1 AND start_pos >= ?2 AND start_pos < ?3;

-- name: compacted
DELETE FROM compact_pending WHERE stream_id = ?1;
