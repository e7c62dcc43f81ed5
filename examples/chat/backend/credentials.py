"""Short-lived, read-only JWTs for browsers, signed with an HS256 key the relay also holds.

The browser gets read access to its own chat's streams and nothing else; the backend's write
credential (an API key) never leaves the backend.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    secret: bytes


def load_signing_key(jwks_file: Path) -> SigningKey:
    """The first HS256 (``"kty": "oct"``) key of a JWK Set file, the file the relay reads with
    ``--auth-jwt-keys``."""
    for key in json.loads(jwks_file.read_text())["keys"]:
        if key.get("kty") == "oct":
            raw = key["k"] + "=" * (-len(key["k"]) % 4)
            return SigningKey(key.get("kid", ""), base64.urlsafe_b64decode(raw))
    raise ValueError(f"{jwks_file}: no HS256 (kty oct) key")


def browser_token(
    key: SigningKey, chat_id: str, lifetime: float, audience: str = ""
) -> tuple[str, int]:
    """A JWT allowing ``read`` on ``chat/<chat_id>/**`` for ``lifetime`` seconds, and its
    expiry (epoch seconds)."""
    expires = int(time.time() + lifetime)
    claims: dict[str, object] = {
        "sub": f"chat-ui:{chat_id}",
        "jti": uuid.uuid4().hex,
        "exp": expires,
        "grants": [{"path": f"chat/{chat_id}/**", "actions": ["read"]}],
    }
    if audience:
        claims["aud"] = audience
    headers = {"kid": key.kid} if key.kid else {}
    return jwt.encode(claims, key.secret, algorithm="HS256", headers=headers), expires
