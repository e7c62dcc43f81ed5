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
        self.active = self.published[-1]
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
    async with db.transaction() as tx:
        await _ensure(tx, now)
        rows = await tx.fetch(
            "SELECT kind, material, created_at FROM relay_subscription_keys "
            "WHERE retire_at IS NULL OR retire_at > ?",
            now,
        )
    secret = next(bytes(r[1]) for r in rows if r[0] == "hmac")
    signing = [_key(bytes(r[1]), r[2]) for r in rows if r[0] == "ed25519"]
    return Keys(signing, secret)


async def rotate(db: Database, now: float, overlap: float = ROTATION_OVERLAP_SECONDS) -> str:
    """Add a new signing key; the old ones stay published for ``overlap`` seconds."""
    async with db.transaction() as tx:
        await tx.execute(
            "UPDATE relay_subscription_keys SET retire_at = ? "
            "WHERE kind = 'ed25519' AND retire_at IS NULL",
            now + overlap,
        )
        return await _insert_signing(tx, now)
