-- Stream ids are never reused: without AUTOINCREMENT SQLite hands the newest deleted stream's
-- id to the next stream created, and every watch, cache and ETag keys on the id.
CREATE TABLE streams_v2 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    content_type TEXT NOT NULL,
    tail INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    ttl INTEGER,
    expires_at REAL,
    last_access REAL NOT NULL,
    created_at REAL NOT NULL,
    stream_seq TEXT,
    closed_by_id TEXT,
    closed_by_epoch INTEGER,
    closed_by_seq INTEGER,
    source_id INTEGER,
    forked_from TEXT,
    fork_offset INTEGER NOT NULL DEFAULT 0,
    soft_deleted INTEGER NOT NULL DEFAULT 0
);
INSERT INTO streams_v2 SELECT * FROM streams;
-- Ids freed before this migration may exceed every surviving one: start past any id that
-- still names data (rows a delete left behind), so an old id is not handed out again.
INSERT INTO sqlite_sequence (name, seq) SELECT 'streams_v2', 0
WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'streams_v2');
UPDATE sqlite_sequence SET seq = max(
    seq,
    coalesce((SELECT max(id) FROM streams), 0),
    coalesce((SELECT max(stream_id) FROM chunks), 0),
    coalesce((SELECT max(stream_id) FROM producers), 0)
) WHERE name = 'streams_v2';
DROP TABLE streams;
ALTER TABLE streams_v2 RENAME TO streams;
CREATE INDEX streams_source ON streams(source_id);
