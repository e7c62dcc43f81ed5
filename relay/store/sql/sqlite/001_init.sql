-- The first embedded schema, as data directories made before schema versions were recorded
-- have it (hence IF NOT EXISTS: such a directory passes through this step unchanged).
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
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
CREATE INDEX IF NOT EXISTS streams_source ON streams(source_id);
CREATE TABLE IF NOT EXISTS chunks (
    stream_id INTEGER NOT NULL,
    start_pos INTEGER NOT NULL,
    end_pos INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (stream_id, start_pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS producers (
    stream_id INTEGER NOT NULL,
    producer_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (stream_id, producer_id)
) WITHOUT ROWID;
