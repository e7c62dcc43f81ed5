"""HTTP handlers for ``/v1/stream/__ds/...`` (sections 6-7): parse, call, render.

Routed before stream operations, so no control path is ever taken for a stream. Callback,
ack and release check their own bearer tokens (12.9). With access control on, managing a
subscription (create, read, delete, membership) needs ``admin`` on
``__ds/subscriptions/<id>`` plus ``read`` on every explicit stream it names, and claiming its
work needs ``append`` there; the JWKS is public, since receivers must verify signatures.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from protocol import subscriptions as rules
from protocol.errors import MethodNotAllowed, NotFound, PayloadTooLarge
from protocol.subscriptions import LinkState
from relay.auth.grants import ADMIN, APPEND, READ, Principal
from relay.auth.http import authorize
from relay.http.context import Context, context, continue_body
from relay.http.paths import PREFIX
from relay.subscriptions.service import Subscriptions
from relay.subscriptions.state import View

CONTROL = PREFIX + "__ds/"
MAX_CONTROL_BODY = 1024 * 1024
JSON = "application/json"


def _engine(ctx: Context) -> Subscriptions:
    if ctx.subscriptions is None:
        raise NotFound("subscriptions are not enabled")
    return ctx.subscriptions


class _Preflight(Exception):
    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed


async def control(request: web.Request) -> web.StreamResponse:
    """Dispatch a reserved path to its handler; anything else under ``__ds`` is 404."""
    try:
        return await _dispatch(request)
    except _Preflight as preflight:
        return web.Response(status=204, headers={"Allow": ", ".join(preflight.allowed)})


async def _dispatch(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    raw = request.raw_path.split("?", 1)[0]
    if not raw.startswith(CONTROL):
        raise NotFound("no such control resource")
    parts = raw[len(CONTROL) :].split("/")
    method = request.method
    if parts == ["jwks.json"]:
        _allow(method, ("GET", "HEAD"))
        return _jwks(ctx)
    if len(parts) < 2 or parts[0] != "subscriptions" or not parts[1]:
        raise NotFound("no such control resource")
    sub_id = rules.check_id(_decode(parts[1]))
    rest = parts[2:]
    engine = _engine(ctx)
    grant_path = f"__ds/subscriptions/{sub_id}"
    if not rest:
        _allow(method, ("GET", "PUT", "DELETE"))
        principal = await authorize(request, ADMIN, grant_path)
        if method == "PUT":
            return await _put(request, ctx, engine, sub_id, principal)
        if method == "DELETE":
            await engine.state.delete(sub_id, ctx.clock())
            engine.unindexed(sub_id)
            return web.Response(status=204)
        view = await engine.state.get(sub_id)
        return _json(200, _render(request, ctx, engine, view))
    if rest == ["streams"]:
        _allow(method, ("POST",))
        principal = await authorize(request, ADMIN, grant_path)
        paths = rules.parse_stream_list(await _body(request))
        _may_read(ctx, principal, paths)
        await engine.state.add_streams(sub_id, paths)
        engine.indexed(sub_id, None, list(paths))
        return web.Response(status=204)
    if rest[0] == "streams":
        _allow(method, ("DELETE",))
        await authorize(request, ADMIN, grant_path)
        path = rules.normalize_path(_decode("/".join(rest[1:])))
        await engine.state.remove_stream(sub_id, path)
        return web.Response(status=204)
    if len(rest) == 1 and rest[0] in ("callback", "ack", "release", "claim"):
        _allow(method, ("POST",))
        if rest[0] == "claim":
            await authorize(request, APPEND, grant_path)
            return await _claim(request, ctx, engine, sub_id)
        return await _finish(request, ctx, engine, sub_id, rest[0])
    raise NotFound("no such control resource")


def _may_read(ctx: Context, principal: Principal, paths: Iterable[str]) -> None:
    """A subscription reveals its streams' offsets: naming one needs read on it (403 if not)."""
    if ctx.auth is not None:
        for path in paths:
            ctx.auth.permit(principal, READ, path)


def _decode(raw: str) -> str:
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise rules.InvalidRequest("path is not UTF-8") from None


def _allow(method: str, allowed: tuple[str, ...]) -> None:
    if method == "OPTIONS":  # CORS preflight: answered here, headers added on prepare
        raise _Preflight(allowed)
    if method not in allowed:
        raise MethodNotAllowed(method, allowed)


async def _body(request: web.Request) -> Any:
    """The whole JSON body, at most ``MAX_CONTROL_BODY`` bytes (413 beyond). ``read(n)`` returns
    what has arrived so far, not n bytes, so read until the end or the limit."""
    data = b""
    await continue_body(request)
    while len(data) <= MAX_CONTROL_BODY:
        piece = await request.content.read(MAX_CONTROL_BODY + 1 - len(data))
        if not piece:
            break
        data += piece
    if len(data) > MAX_CONTROL_BODY:
        raise PayloadTooLarge(MAX_CONTROL_BODY)
    if not data.strip():
        return {}
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise rules.InvalidRequest("body is not valid JSON") from None


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


def _base_url(request: web.Request, engine: Subscriptions) -> str:
    return engine.settings.public_url or f"{request.scheme}://{request.host}"


def _jwks(ctx: Context) -> web.Response:
    engine = _engine(ctx)
    assert engine.keys is not None
    return web.Response(
        body=orjson.dumps(engine.keys.jwks()),
        headers={
            "Content-Type": "application/jwk-set+json",
            "Cache-Control": "public, max-age=300",
        },
    )


async def _put(
    request: web.Request, ctx: Context, engine: Subscriptions, sub_id: str, principal: Principal
) -> web.Response:
    config = rules.parse_config(await _body(request))
    if ctx.auth is not None:
        # What a subscription watches, its creator must be able to read; where it writes
        # wake events, append.
        _may_read(ctx, principal, config.streams)
        if config.pattern is not None:
            ctx.auth.permit_pattern(principal, READ, config.pattern)
        if config.wake_stream is not None:
            ctx.auth.permit(principal, APPEND, config.wake_stream)
    if config.webhook_url is not None:
        rules.check_webhook_url(config.webhook_url, engine.outbound.policy)
    view, created = await engine.state.create(
        sub_id, config, _base_url(request, engine), ctx.clock()
    )
    engine.indexed(sub_id, config.pattern, [link.path for link in view.links])
    return _json(201 if created else 200, _render(request, ctx, engine, view))


def _render(
    request: web.Request, ctx: Context, engine: Subscriptions, view: View
) -> dict[str, Any]:
    sub, config = view.sub, view.sub.config
    webhook = None
    if config.webhook_url is not None:
        assert engine.keys is not None
        webhook = {
            "url": config.webhook_url,
            "signing": {
                "alg": "ed25519",
                "kid": engine.keys.active.kid,
                "jwks_url": f"{_base_url(request, engine)}{CONTROL}jwks.json",
            },
        }
    created = datetime.fromtimestamp(sub.created_at, UTC)
    return {
        "id": sub.id,
        "subscription_id": sub.id,
        "type": config.kind,
        "pattern": config.pattern,
        "streams": [rules.link_json(link, with_tail=False) for link in view.links],
        "webhook": webhook,
        "wake_stream": config.wake_stream,
        "lease_ttl_ms": config.lease_ttl_ms,
        "created_at": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "status": sub.status,
        "description": config.description,
    }


async def _claim(
    request: web.Request, ctx: Context, engine: Subscriptions, sub_id: str
) -> web.Response:
    worker = rules.parse_worker(await _body(request))
    now = ctx.clock()
    view = await engine.state.claim(sub_id, worker, now)
    sub = view.sub
    assert sub.wake_id is not None and engine.keys is not None
    claims = rules.TokenClaims(sub.id, sub.generation, sub.wake_id, now + rules.TOKEN_TTL_SECONDS)
    links: tuple[LinkState, ...] = view.links
    return _json(
        200,
        {
            "wake_id": sub.wake_id,
            "generation": sub.generation,
            "token": rules.make_token(engine.keys.token_secret, claims),
            "streams": [rules.link_json(link, with_tail=True) for link in links],
            "lease_ttl_ms": sub.config.lease_ttl_ms,
        },
    )


async def _finish(
    request: web.Request, ctx: Context, engine: Subscriptions, sub_id: str, action: str
) -> web.Response:
    assert engine.keys is not None
    now = ctx.clock()
    token = rules.bearer(request.headers.get("Authorization"))
    claims = rules.verify_token(engine.keys.token_secret, token, sub_id, now)
    wake = rules.parse_wake_request(await _body(request))
    kind = rules.WEBHOOK if action == "callback" else rules.PULL_WAKE
    outcome = await engine.state.finish(
        sub_id, claims, wake, kind, now, release=action == "release"
    )
    if outcome.woke:
        engine.kick()
    if action == "release":
        return web.Response(status=204)
    return _json(200, {"ok": True, "next_wake": outcome.next_wake})
