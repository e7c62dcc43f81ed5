-- Credentials revoked before they expire, by JWT id (kind 'jti') or by key id (kind 'kid': a
-- JWT signing key's kid, or an API key's id). Every relay polls this table every few seconds.
CREATE TABLE relay_revocations (
    kind TEXT NOT NULL CHECK (kind IN ('jti', 'kid')),
    value TEXT NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);
