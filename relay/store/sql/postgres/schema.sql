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
    soft_deleted BOOLEAN NOT NULL DEFAULT false,
    -- Written since its last compaction: the compactor looks at these streams only.
    compact_pending BOOLEAN NOT NULL DEFAULT false,
    -- The stream that supersedes this closed one (Stream-Successor), named by every read.
    successor TEXT,
    -- The retention horizon: reads before it are 410 Gone (a fork inherits its source's).
    retained_from BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX relay_streams_source ON relay_streams (source_id) WHERE source_id IS NOT NULL;
CREATE INDEX relay_streams_expiry ON relay_streams (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX relay_streams_ttl ON relay_streams ((last_access + ttl)) WHERE ttl IS NOT NULL;
CREATE INDEX relay_streams_compact ON relay_streams (last_append, id) WHERE compact_pending;
CREATE INDEX relay_streams_soft_deleted ON relay_streams (id) WHERE soft_deleted;

-- Streams removed for good, kept for a week: a stream a relay acknowledged that is missing with
-- no tombstone was lost in a failover, not deleted.
CREATE TABLE relay_removed (
    stream_id BIGINT PRIMARY KEY,
    removed_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX relay_removed_at ON relay_removed (removed_at);

-- Raises RL001 unless ok: the one-round-trip write's check that nothing changed underneath.
CREATE OR REPLACE FUNCTION relay_guard(ok boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'relay: a stream changed since this relay last wrote it'
            USING ERRCODE = 'RL001';
    END IF;
    RETURN true;
END
$$;

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
    acks TEXT NOT NULL DEFAULT '',
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

-- Subscriptions (PROTOCOL.md sections 6-7): durable, shared by every relay of the database.
-- One row per subscription holds its configuration and its wake state: the fencing
-- generation, the current wake, the lease holder, and the pending delivery (due_at) with the
-- relay that has claimed it (owner, owner_until) so exactly one relay delivers it at a time.
CREATE TABLE relay_subscriptions (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    pattern TEXT,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    base_url TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    deleted_at DOUBLE PRECISION,
    generation BIGINT NOT NULL DEFAULT 0,
    wake_id TEXT,
    trigger_path TEXT,
    holder TEXT,
    lease_until DOUBLE PRECISION,
    status TEXT NOT NULL DEFAULT 'active',
    attempt INTEGER NOT NULL DEFAULT 0,
    due_at DOUBLE PRECISION,
    owner TEXT,
    owner_until DOUBLE PRECISION
);
CREATE INDEX relay_subscriptions_due ON relay_subscriptions (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX relay_subscriptions_lease ON relay_subscriptions (lease_until)
    WHERE lease_until IS NOT NULL;

-- One row per linked stream: the cursor (acked position, inclusive), the tail the current
-- wake's snapshot saw, and the id of the stream the cursor belongs to (a stream deleted and
-- created again at the same path starts over). Paths are stream-root-relative.
CREATE TABLE relay_subscription_links (
    subscription_id TEXT NOT NULL,
    path TEXT NOT NULL,
    explicit INTEGER NOT NULL DEFAULT 0,
    glob INTEGER NOT NULL DEFAULT 0,
    acked BIGINT NOT NULL,
    snapshot BIGINT,
    stream_id BIGINT,
    PRIMARY KEY (subscription_id, path)
);
CREATE INDEX relay_subscription_links_path ON relay_subscription_links (path);

-- Webhook signing keys (Ed25519 private keys) and the callback-token secret, generated once
-- and shared by every relay so signatures and tokens verify across restarts and relays.
-- Retired keys stay published in the JWKS until retire_at.
CREATE TABLE relay_subscription_keys (
    kid TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    material BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    retire_at DOUBLE PRECISION
);
