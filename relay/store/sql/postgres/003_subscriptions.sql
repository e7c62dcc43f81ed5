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
