"""Webhook signing keys (Ed25519) and the callback-token secret, kept in the database.

Generated once by whichever relay first finds none, then shared: every relay of a database
signs with the same newest key and verifies tokens with the same secret, across restarts.
Rotation adds a new key and keeps the old ones published in the JWKS for an overlap period
(longer than the receivers' five-minute replay window), then drops them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import subscriptions as rules
from relay.config import Config
from relay.subscriptions.db import Database, Tx

TOKEN_SECRET_KID = "callback-token-secret"
ROTATION_OVERLAP_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    public_raw: bytes
    created_at: float


def _key(seed: bytes, created_at: float) -> SigningKey:
    private = Ed25519PrivateKey.from_private_bytes(seed)
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SigningKey(rules.jwk_kid(raw), private, raw, created_at)


def _new_seed() -> bytes:
    return secrets.token_bytes(32)


class Keys:
    """The keys in force: the newest signs, every published one verifies."""

    def __init__(self, signing: list[SigningKey], token_secret: bytes) -> None:
        assert signing, "at least one signing key"
        self.published = sorted(signing, key=lambda k: (k.created_at, k.kid))
        self.active = self.published[-1]  # the newest; retired keys are never newer
        self.token_secret = token_secret

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [rules.public_jwk(k.public_raw) for k in self.published]}

    def sign(self, body: bytes, timestamp: int) -> str:
        """The ``Webhook-Signature`` header for ``body`` sent at ``timestamp``."""
        signature = self.active.private.sign(rules.signed_message(timestamp, body))
        return rules.signature_header(timestamp, self.active.kid, signature)


async def _ensure(tx: Tx, now: float) -> None:
    await tx.execute(
        "INSERT INTO relay_subscription_keys (kid, kind, material, created_at) "
        "VALUES (?, 'hmac', ?, ?) ON CONFLICT (kid) DO NOTHING",
        TOKEN_SECRET_KID,
        secrets.token_bytes(32),
        now,
    )
    rows = await tx.fetch(
        "SELECT kid FROM relay_subscription_keys WHERE kind = 'ed25519' AND retire_at IS NULL"
    )
    if not rows:
        await _insert_signing(tx, now)


async def _insert_signing(tx: Tx, now: float) -> str:
    seed = _new_seed()
    key = _key(seed, now)
    await tx.execute(
        "INSERT INTO relay_subscription_keys (kid, kind, material, created_at) "
        "VALUES (?, 'ed25519', ?, ?)",
        key.kid,
        seed,
        now,
    )
    return key.kid


async def load(db: Database, now: float) -> Keys:
    """The keys in force, generating the first ones if the database has none."""
    for write in (False, True):
        async with db.transaction(write=write) as tx:
            if write:
                await _ensure(tx, now)
            rows = await tx.fetch(
                "SELECT kind, material, created_at, retire_at FROM relay_subscription_keys "
                "WHERE retire_at IS NULL OR retire_at > ?",
                now,
            )
        secret = next((bytes(r[1]) for r in rows if r[0] == "hmac"), None)
        signing = [_key(bytes(r[1]), r[2]) for r in rows if r[0] == "ed25519"]
        if secret is not None and any(r[0] == "ed25519" and r[3] is None for r in rows):
            return Keys(signing, secret)
    raise AssertionError("keys were just ensured")


async def rotate(db: Database, now: float, overlap: float = ROTATION_OVERLAP_SECONDS) -> str:
    """Add a new signing key; the old ones stay published for ``overlap`` seconds."""
    async with db.transaction() as tx:
        await tx.execute(
            "UPDATE relay_subscription_keys SET retire_at = ? "
            "WHERE kind = 'ed25519' AND retire_at IS NULL",
            now + overlap,
        )
        return await _insert_signing(tx, now)


def rotate_command(config: Config) -> int:
    """``relay rotate-webhook-key``: add a signing key in the relay's database. Running relays
    sign with it from their next sweep (about a second); the old key stays in the JWKS for
    a day so receivers can still verify what it signed."""
    import asyncio
    import time
    from pathlib import Path

    from relay.subscriptions.db import PostgresDatabase, SqliteDatabase

    async def run() -> str:
        db: Database
        if config.database_url:
            from relay.store.postgres import migrate
            from relay.store.postgres.connections import direct_url

            await migrate(direct_url(config))
            db = PostgresDatabase(
                config.database_url, config.db_timeout, pooler=config.database_pooler
            )
        else:
            path = Path(config.data_dir) / "relay.sqlite3"
            if not path.exists():
                raise SystemExit(f"relay: no embedded store at {path}; start the relay once first")
            db = SqliteDatabase(path)
        await db.open()
        try:
            await load(db, time.time())  # the first key, if there was none
            return await rotate(db, time.time())
        finally:
            await db.close()

    print(f"new webhook signing key {asyncio.run(run())}")
    return 0
