"""Credentials for access-control tests: signing keys, a JWK Set, minted JWTs, API key files."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jwt.algorithms import HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from relay.auth.sources import key_digest

AUDIENCE = "relay-test"
HS_SECRET = b"a-test-secret-that-is-long-enough-for-hs256!"
ALL = ["read", "append", "admin"]


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ed_key(name: str = "ed-1") -> ed25519.Ed25519PrivateKey:
    """One Ed25519 key per name, stable within a test run."""
    return ed25519.Ed25519PrivateKey.generate()


def jwk(kid: str) -> dict[str, Any]:
    """The public JWK for ``kid``: ``hs-*`` HMAC, ``rsa-*`` RSA, anything else Ed25519."""
    if kid.startswith("hs-"):
        out = HMACAlgorithm.to_jwk(HS_SECRET, as_dict=True)
    elif kid.startswith("rsa-"):
        out = RSAAlgorithm.to_jwk(rsa_key().public_key(), as_dict=True)
    else:
        out = OKPAlgorithm.to_jwk(ed_key(kid).public_key(), as_dict=True)
    return {**out, "kid": kid}


def jwks(*kids: str) -> dict[str, Any]:
    return {"keys": [jwk(kid) for kid in kids]}


def token(
    grants: list[dict[str, Any]] | str | None = None,
    *,
    kid: str | None = "ed-1",
    signer: str | None = None,
    lifetime: float = 300,
    **claims: Any,
) -> str:
    """A JWT for ``grants`` (default: everything under ``chat/``), signed by ``signer``'s key
    (default: the key ``kid`` names) with ``kid`` in its header (None: no kid). A string for
    ``grants`` signs a malformed token."""
    name = signer or kid or "ed-1"
    body: dict[str, Any] = {
        "sub": "tester",
        "aud": AUDIENCE,
        "exp": int(time.time() + lifetime),
        "grants": grants if grants is not None else [{"path": "chat/**", "actions": ALL}],
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid is not None else {}
    if name.startswith("hs-"):
        return jwt.encode(body, HS_SECRET, algorithm="HS256", headers=headers)
    if name.startswith("rsa-"):
        return jwt.encode(body, rsa_key(), algorithm="RS256", headers=headers)
    return jwt.encode(body, ed_key(name), algorithm="EdDSA", headers=headers)


def api_key_entry(
    key: str, key_id: str, grants: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {"id": key_id, "sha256": key_digest(key), "grants": grants, **extra}


def write_json(path: Path, doc: Any) -> None:
    """Replace ``path`` atomically (as an operator's deploy would), so a poll never sees half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}
