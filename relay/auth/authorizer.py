"""Who may do what: bearer credentials verified once, cached, and checked against grants.

The Authorizer owns every credential source (API key file, JWK Set file and URL, revocation
file and table) and keeps them fresh in the background, so a request never waits on a file or
the network, except a JWT naming a ``kid`` nobody has seen, which may wait (briefly, without
blocking the loop) for one rate-limited refetch of the JWK Set URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import structlog
from aiohttp import web

from protocol.glob import covers
from relay.auth.errors import Forbidden, Reason, Unauthorized
from relay.auth.grants import Action, Grant, GrantError, Principal, parse_grants
from relay.auth.sources import (
    ApiKey,
    AuthConfigError,
    KeySet,
    Revoked,
    WatchedFile,
    key_digest,
    parse_api_keys,
    parse_jwks,
    parse_revocations,
)
from relay.config import Config

log = structlog.get_logger("relay.auth")

MAX_TOKEN_BYTES = 8192
CACHE_ENTRIES = 10_000
# RFC 6750's b64token is stricter; any visible ASCII is taken, so an API key of any shape works.
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([!-~]+) *")


@dataclass(frozen=True, slots=True)
class Access:
    principal: Principal
    public: bool


ACCESS = web.RequestKey("relay_access", Access)
"""Set on a request once authorized: who, and whether its reads may be cached publicly."""


class Authorizer:
    """Verifies bearer tokens (JWTs and API keys) and decides actions on stream paths.

    Verified credentials are cached by header text until they expire, so a producer sending
    many appends with one bearer verifies its signature once; revocation and expiry are
    checked on every use, and any change to the key sources empties the cache.
    """

    poll_seconds = 1.0  # files: mtime checks
    db_poll_seconds = 2.0  # relay_revocations on Postgres
    jwks_refresh_seconds = 300.0
    unknown_kid_refetch_seconds = 10.0  # at most one extra JWKS fetch per this
    recheck_seconds = 5.0  # live readers re-check their credential at least this often

    def __init__(
        self,
        config: Config,
        on_failure: Callable[[Reason], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._audience = config.auth_audience or None
        self._issuer = config.auth_issuer or None
        self._skew = config.auth_clock_skew
        self._database_url = config.database_url
        self._database_pooler = config.database_pooler
        self._jwks_url = config.auth_jwks_url or None
        self._on_failure = on_failure
        self.clock = clock
        self._files: list[tuple[WatchedFile, Callable[[Any], None]]] = []
        self._api_keys: dict[str, ApiKey] = {}
        self._api_key_ids: frozenset[str] = frozenset()
        self._file_keys = KeySet()
        self._url_keys = KeySet()
        self._url_doc: Any = None
        self._keys = KeySet()
        self._file_revoked = Revoked()
        self._db_revoked = Revoked()
        self._revoked = Revoked()
        self._cache: dict[str, Principal] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._db: Any = None  # an asyncpg connection, imported only with Postgres
        self._refetch: asyncio.Task[None] | None = None
        self._last_refetch = -float("inf")
        if config.auth_api_keys:
            self._files.append((WatchedFile(config.auth_api_keys), self._set_api_keys))
        if config.auth_jwt_keys:
            self._files.append((WatchedFile(config.auth_jwt_keys), self._set_file_keys))
        if config.auth_revocations:
            self._files.append((WatchedFile(config.auth_revocations), self._set_file_revoked))
        for watched, apply in self._files:  # at start-up a bad file is fatal
            try:
                apply(watched.read())
            except AuthConfigError as exc:
                raise AuthConfigError(f"{watched.path}: {exc}") from None

    # -- sources -------------------------------------------------------------------------

    def _set_api_keys(self, doc: Any) -> None:
        self._api_keys = parse_api_keys(doc)
        self._api_key_ids = frozenset(key.id for key in self._api_keys.values())
        self._cache.clear()

    def _set_file_keys(self, doc: Any) -> None:
        self._file_keys = parse_jwks(doc, strict=True)
        self._keys = self._file_keys.merged(self._url_keys)
        self._cache.clear()

    def _set_url_keys(self, doc: Any) -> None:
        if doc == self._url_doc:
            return  # the periodic refresh usually finds nothing new: keep verified tokens
        self._url_keys = parse_jwks(doc, strict=False)
        self._url_doc = doc
        self._keys = self._file_keys.merged(self._url_keys)
        self._cache.clear()

    def _set_file_revoked(self, doc: Any) -> None:
        self._file_revoked = parse_revocations(doc)
        self._revoked = self._file_revoked.merged(self._db_revoked)

    def _set_db_revoked(self, revoked: Revoked) -> None:
        self._db_revoked = revoked
        self._revoked = self._file_revoked.merged(revoked)

    def reload_changed_files(self) -> None:
        """Re-read every source file that changed; a broken one keeps its last good value."""
        for watched, apply in self._files:
            if not watched.changed():
                continue
            try:
                apply(watched.read())
                log.info("credentials reloaded", file=str(watched.path))
            except AuthConfigError as exc:
                log.error("credential file not reloaded, keeping the last good one", error=str(exc))

    async def open(self) -> None:
        """Start the background refreshers; the first JWKS fetch is waited for (briefly)."""
        if self._files:
            self._tasks.append(asyncio.create_task(self._poll_files(), name="auth-files"))
        if self._database_url:  # read once before serving: a revoked credential never gets in
            await self._read_db_revocations()
            self._tasks.append(asyncio.create_task(self._poll_db(), name="auth-revocations"))
        if self._jwks_url:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            await self._fetch_jwks()
            self._tasks.append(asyncio.create_task(self._refresh_jwks(), name="auth-jwks"))

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._refetch] if self._refetch else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        if self._db is not None:
            await self._db.close()

    async def _poll_files(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            self.reload_changed_files()

    async def _read_db_revocations(self) -> None:
        """Mirror ``relay_revocations`` on a connection of our own, reconnecting when lost."""
        import asyncpg

        from relay.store.postgres.connections import pooled_options

        if self._db is None or self._db.is_closed():
            self._db = None
            self._db = await asyncpg.connect(
                self._database_url, timeout=10, **pooled_options(self._database_pooler)
            )
        rows = await self._db.fetch("SELECT kind, value FROM relay_revocations", timeout=10)
        jtis = frozenset(r["value"] for r in rows if r["kind"] == "jti")
        kids = frozenset(r["value"] for r in rows if r["kind"] == "kid")
        if (jtis, kids) != (self._db_revoked.jtis, self._db_revoked.kids):
            self._set_db_revoked(Revoked(jtis, kids))

    async def _poll_db(self) -> None:
        while True:
            await asyncio.sleep(self.db_poll_seconds)
            try:
                await self._read_db_revocations()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # lost, dropped, refused: this loop must outlive it
                log.warning("revocation table not read, keeping the last copy", error=repr(exc))
                if self._db is not None:
                    self._db.terminate()
                    self._db = None

    async def _fetch_jwks(self) -> None:
        assert self._session is not None and self._jwks_url is not None
        self._last_refetch = time.monotonic()
        try:
            async with self._session.get(self._jwks_url) as response:
                response.raise_for_status()
                doc = await response.json(content_type=None)
            self._set_url_keys(doc)
        except (aiohttp.ClientError, TimeoutError, ValueError, AuthConfigError) as exc:
            # The URL itself is not logged: it may carry a credential of its own.
            log.warning("JWK Set not fetched, keeping the last copy", error=type(exc).__name__)

    async def _refresh_jwks(self) -> None:
        while True:
            await asyncio.sleep(self.jwks_refresh_seconds)
            await self._fetch_jwks()

    async def _refetch_for_unknown_kid(self) -> None:
        """One shared, rate-limited refetch; callers wait for it without blocking the loop."""
        if self._refetch is None or self._refetch.done():
            if time.monotonic() - self._last_refetch < self.unknown_kid_refetch_seconds:
                return
            self._refetch = asyncio.create_task(self._fetch_jwks(), name="auth-jwks-refetch")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._refetch), 5)

    # -- verification --------------------------------------------------------------------

    def fail(self, reason: Reason) -> Unauthorized:
        """Count a refusal and build the error to raise."""
        if self._on_failure is not None:
            self._on_failure(reason)
        return Unauthorized(reason)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization: Bearer`` header, or Unauthorized."""
        if authorization is None:
            raise self.fail("missing")
        principal = self._cache.get(authorization)  # keyed by the whole header: no parsing
        if principal is None:
            match = (
                _BEARER.fullmatch(authorization) if len(authorization) <= MAX_TOKEN_BYTES else None
            )
            if match is None:
                raise self.fail("malformed")
            principal = await self._verify(match.group(1))
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[authorization] = principal
        reason = self.invalid_reason(principal)
        if reason is not None:
            raise self.fail(reason)
        return principal

    def invalid_reason(self, principal: Principal) -> Reason | None:
        """Why a once-valid principal may no longer act (expired, revoked, key removed)."""
        if principal.expires_at is not None and self.clock() > principal.expires_at:
            return "expired"
        revoked = self._revoked
        if principal.jti is not None and principal.jti in revoked.jtis:
            return "revoked"
        if principal.key_id is not None and principal.key_id in revoked.kids:
            return "revoked"
        if principal.kind == "api_key" and principal.key_id not in self._api_key_ids:
            return "unknown_key"
        return None

    def recheck(self, principal: Principal) -> None:
        """For live readers: raise Unauthorized once their credential stops being valid."""
        reason = self.invalid_reason(principal)
        if reason is not None:
            raise self.fail(reason)

    async def _verify(self, token: str) -> Principal:
        if token.count(".") != 2:
            key = self._api_keys.get(key_digest(token))
            if key is None:
                raise self.fail("unknown_key")
            return Principal(key.id, key.grants, key.id, None, key.expires_at, kind="api_key")
        return await self._verify_jwt(token)

    async def _verify_jwt(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise self.fail("malformed") from None
        kid, alg = header.get("kid"), header.get("alg")
        if (kid is not None and not isinstance(kid, str)) or not isinstance(alg, str):
            raise self.fail("malformed")
        if kid is not None:
            key = self._keys.by_kid.get(kid)
            if key is None and self._jwks_url is not None:
                await self._refetch_for_unknown_kid()
                key = self._keys.by_kid.get(kid)
            if key is None:
                raise self.fail("unknown_key")
            candidates: tuple[jwt.PyJWK, ...] = (key,)
        else:
            candidates = self._keys.keys
            if not candidates:
                raise self.fail("unknown_key")
        claims: dict[str, Any] | None = None
        reason: Reason = "bad_signature"
        for key in candidates:
            if key.algorithm_name != alg:  # never let the token pick how a key is used
                continue
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[key.algorithm_name],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._skew,
                    options={"verify_aud": self._audience is not None},
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
                reason = "expired"
            except jwt.InvalidAudienceError:
                reason = "wrong_audience"
            except jwt.InvalidIssuerError:
                reason = "wrong_issuer"
            except jwt.PyJWTError:
                reason = "malformed"
            raise self.fail(reason)
        if claims is None:
            raise self.fail(reason)
        return self._principal(claims, kid)

    def _principal(self, claims: dict[str, Any], kid: str | None) -> Principal:
        jti, sub, exp = claims.get("jti"), claims.get("sub"), claims.get("exp")
        try:
            grants: tuple[Grant, ...] = parse_grants(claims.get("grants"))
        except GrantError:
            raise self.fail("malformed") from None
        if jti is not None and not isinstance(jti, str):
            raise self.fail("malformed")
        expires_at = float(exp) + self._skew if isinstance(exp, int | float) else None
        subject = sub if isinstance(sub, str) else "jwt"
        return Principal(subject, grants, kid, jti, expires_at, kind="jwt")

    # -- decisions -----------------------------------------------------------------------

    def permit_pattern(self, principal: Principal, action: Action, pattern: str) -> None:
        """Allow ``action`` on every path ``pattern`` could match (a subscription's glob), or
        403: some grant for the action must cover the whole pattern."""
        if not any(
            action in grant.actions and covers(grant.pattern, pattern) for grant in principal.grants
        ):
            if self._on_failure is not None:
                self._on_failure("forbidden")
            raise Forbidden()

    def permit(self, principal: Principal, action: Action, path: str) -> Grant:
        """The grant allowing ``action`` on ``path`` (relative to ``/v1/stream/``), or 403."""
        grant = principal.grant_for(action, path)
        if grant is None:
            if self._on_failure is not None:
                self._on_failure("forbidden")
            raise Forbidden()
        return grant
