"""Where credentials come from: the API key file, JWK Sets and revocation lists.

Each parser takes decoded JSON and returns an immutable value, or raises AuthConfigError
naming what is wrong, so a bad file stops start-up and a bad reload keeps the last good one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson

from relay.auth.grants import Grant, GrantError, parse_grants
from relay.config import ConfigError


class AuthConfigError(ConfigError):
    """A credential source Relay cannot use; the message names the file and the entry."""


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def key_digest(key: str) -> str:
    """How an API key is stored and looked up: the hex SHA-256 of its text. Looking keys up
    by digest keeps the comparison off the secret itself (no timing leak on its bytes)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    grants: tuple[Grant, ...]
    expires_at: float | None = None


def parse_api_keys(doc: Any) -> dict[str, ApiKey]:
    """``{"keys": [{"id", "sha256", "grants", "expires_at"?}]}`` -> {digest: ApiKey}."""
    entries = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(entries, list):
        raise AuthConfigError('an API key file is {"keys": [...]}')
    out: dict[str, ApiKey] = {}
    for index, entry in enumerate(entries):
        where = f"keys[{index}]"
        if not isinstance(entry, Mapping):
            raise AuthConfigError(f"{where} must be an object")
        key_id, digest = entry.get("id"), entry.get("sha256")
        if not isinstance(key_id, str) or not key_id:
            raise AuthConfigError(f"{where}.id must be a non-empty string")
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
            raise AuthConfigError(f"{where}.sha256 must be 64 hex digits")
        try:
            grants = parse_grants(entry.get("grants"))
        except GrantError as exc:
            raise AuthConfigError(f"{where}: {exc}") from None
        expires = entry.get("expires_at")
        out[digest.lower()] = ApiKey(key_id, grants, _instant(expires, where))
    return out


def _instant(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise AuthConfigError(f"{where}.expires_at must be an ISO-8601 string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise AuthConfigError(f"{where}.expires_at is not ISO-8601: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(frozen=True, slots=True)
class KeySet:
    """Verification keys: by ``kid``, and all of them for tokens that name none."""

    by_kid: Mapping[str, jwt.PyJWK] = field(default_factory=dict)
    keys: tuple[jwt.PyJWK, ...] = ()

    def merged(self, other: KeySet) -> KeySet:
        return KeySet({**self.by_kid, **other.by_kid}, self.keys + other.keys)


_PRIVATE = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


def parse_jwks(doc: Any, *, strict: bool) -> KeySet:
    """A JWK Set. ``strict`` (our own file) refuses any key PyJWT cannot use; a fetched set
    skips them (an identity provider may publish encryption keys or algorithms we lack)."""
    entries = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(entries, list):
        raise AuthConfigError('a JWK Set is {"keys": [...]}')
    by_kid: dict[str, jwt.PyJWK] = {}
    keys: list[jwt.PyJWK] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, Mapping) and entry.get("use", "sig") != "sig":
            continue
        try:
            if not isinstance(entry, Mapping):
                raise TypeError("a JWK must be an object")
            # A private asymmetric JWK verifies with its public half: drop the private members.
            members = {
                k: v for k, v in entry.items() if entry.get("kty") == "oct" or k not in _PRIVATE
            }
            key = jwt.PyJWK(members)
        except (jwt.PyJWTError, TypeError, ValueError, KeyError) as exc:
            if strict:
                raise AuthConfigError(f"keys[{index}]: {exc}") from None
            continue
        keys.append(key)
        if key.key_id is not None:
            by_kid[key.key_id] = key
    return KeySet(by_kid, tuple(keys))


@dataclass(frozen=True, slots=True)
class Revoked:
    jtis: frozenset[str] = frozenset()
    kids: frozenset[str] = frozenset()

    def merged(self, other: Revoked) -> Revoked:
        return Revoked(self.jtis | other.jtis, self.kids | other.kids)


def parse_revocations(doc: Any) -> Revoked:
    """``{"revoked": [{"jti": ...} | {"kid": ...}]}``."""
    entries = doc.get("revoked") if isinstance(doc, Mapping) else None
    if not isinstance(entries, list):
        raise AuthConfigError('a revocation file is {"revoked": [...]}')
    jtis, kids = set(), set()
    for index, entry in enumerate(entries):
        jti = entry.get("jti") if isinstance(entry, Mapping) else None
        kid = entry.get("kid") if isinstance(entry, Mapping) else None
        if isinstance(jti, str) and jti:
            jtis.add(jti)
        elif isinstance(kid, str) and kid:
            kids.add(kid)
        else:
            raise AuthConfigError(f'revoked[{index}] must be {{"jti": ...}} or {{"kid": ...}}')
    return Revoked(frozenset(jtis), frozenset(kids))


class WatchedFile:
    """A JSON file re-read when its mtime, size or inode changes (an atomic rename too)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # gone for now (mid-replace): keep what we have
        return (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp

    def read(self) -> Any:
        """The decoded JSON; AuthConfigError names the file when it cannot be used."""
        try:
            st = os.stat(self.path)
            data = self.path.read_bytes()
        except OSError as exc:
            raise AuthConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise AuthConfigError(f"{self.path} is not JSON: {exc}") from None
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return doc
