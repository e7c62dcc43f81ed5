-- Tombstones of streams removed for good, kept for a week: a stream a relay acknowledged writes
-- to that is missing with no tombstone was lost (a failover to a standby that never had it),
-- not deleted, and its path is refused rather than re-created at offsets already handed out.
CREATE TABLE relay_removed (
    stream_id BIGINT PRIMARY KEY,
    removed_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX relay_removed_at ON relay_removed (removed_at);
