-- The newest schema in one piece, applied to empty databases. Every change also gets a
-- numbered migration; tests/test_postgres.py proves this file equals all migrations applied.
-- Every data table is keyed by stream_id first, so the schema can be distributed by stream
-- (for example on Citus) without changing a query.
CREATE TABLE relay_streams (
    id BIGSERIAL PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    content_type TEXT NOT NULL,
    tail BIGINT NOT NULL,
    closed BOOLEAN NOT NULL DEFAULT false,
    ttl BIGINT,
    expires_at DOUBLE PRECISION,
    last_access DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_append DOUBLE PRECISION NOT NULL,
    stream_seq TEXT,
    closed_by_id TEXT,
    closed_by_epoch BIGINT,
    closed_by_seq BIGINT,
    source_id BIGINT,
    forked_from TEXT,
    fork_offset BIGINT NOT NULL DEFAULT 0,
    soft_deleted BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX relay_streams_source ON relay_streams (source_id) WHERE source_id IS NOT NULL;
CREATE INDEX relay_streams_expiry ON relay_streams (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX relay_streams_ttl ON relay_streams ((last_access + ttl)) WHERE ttl IS NOT NULL;

-- One row per committed run of appends: [start_pos, end_pos) of the stream's byte space.
CREATE TABLE relay_chunks (
    stream_id BIGINT NOT NULL,
    start_pos BIGINT NOT NULL,
    end_pos BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (stream_id, start_pos)
);

CREATE TABLE relay_producers (
    stream_id BIGINT NOT NULL,
    producer_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (stream_id, producer_id)
);

-- Credentials revoked before they expire, by JWT id (kind 'jti') or by key id (kind 'kid': a
-- JWT signing key's kid, or an API key's id). Every relay polls this table every few seconds.
CREATE TABLE relay_revocations (
    kind TEXT NOT NULL CHECK (kind IN ('jti', 'kid')),
    value TEXT NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);
