"""Access control over HTTP, on both stores: every method against every kind of credential,
and refusals that look the same whether or not the stream exists.

Tests take ``backend`` before ``aiohttp_client`` so the app closes before its database is
dropped (fixtures tear down in reverse order).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web

from relay.app import make_app
from relay.config import Config
from tests.auth_helpers import (
    ALL,
    AUDIENCE,
    api_key_entry,
    bearer,
    jwks,
    token,
    write_json,
)
from tests.serving import AppClient
from tests.stores import Backend, backend

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

ClientFactory = Callable[[web.Application], Awaitable[AppClient]]
TEXT = {"Content-Type": "text/plain"}
ADMIN_KEY = "sk-admin-for-setup"


@dataclass
class Setup:
    root: Path
    config: Config

    @property
    def revoked(self) -> Path:
        return self.root / "revoked.json"

    @property
    def api_keys(self) -> Path:
        return self.root / "api-keys.json"


def auth_setup(backend: Backend, root: Path, **settings: Any) -> Setup:
    """Files and a Config with access control on: keys ed-1/ed-2, an admin API key for test
    setup, and ``revoked-jti`` revoked."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "jwks.json", jwks("ed-1", "ed-2"))
    admin = api_key_entry(ADMIN_KEY, "admin-1", [{"path": "**", "actions": ALL}])
    write_json(root / "api-keys.json", {"keys": [admin]})
    write_json(root / "revoked.json", {"revoked": [{"jti": "revoked-jti"}]})
    config = Config(
        data_dir=str(backend.data_dir),
        database_url=backend.url or "",
        auth_jwt_keys=str(root / "jwks.json"),
        auth_api_keys=str(root / "api-keys.json"),
        auth_revocations=str(root / "revoked.json"),
        auth_audience=AUDIENCE,
        **{"long_poll_timeout": 0.3, "sse_reconnect_interval": 0.3, **settings},
    )
    return Setup(root, config)


async def auth_client(
    aiohttp_client: ClientFactory, backend: Backend, root: Path, **settings: Any
) -> tuple[AppClient, Setup]:
    setup = auth_setup(backend, root, **settings)
    return await aiohttp_client(make_app(setup.config)), setup


def url(name: str) -> str:
    return f"/v1/stream/{name}"


async def seed(client: AppClient, name: str) -> None:
    """A stream holding some bytes, made with the setup key."""
    r = await client.put(url(name), data=b"seed", headers={**TEXT, **bearer(ADMIN_KEY)})
    assert r.status == 201


Send = Callable[[AppClient, str, dict[str, str]], Awaitable[ClientResponse]]


def _get(params: dict[str, str]) -> Send:
    async def send(client: AppClient, name: str, headers: dict[str, str]) -> ClientResponse:
        return await client.get(url(name), params=params, headers=headers)

    return send


async def _head(client: AppClient, name: str, headers: dict[str, str]) -> ClientResponse:
    return await client.head(url(name), headers=headers)


async def _append(client: AppClient, name: str, headers: dict[str, str]) -> ClientResponse:
    return await client.post(url(name), data=b"x", headers={**TEXT, **headers})


async def _close(client: AppClient, name: str, headers: dict[str, str]) -> ClientResponse:
    return await client.post(url(name), headers={"Stream-Closed": "true", **headers})


async def _create(client: AppClient, name: str, headers: dict[str, str]) -> ClientResponse:
    return await client.put(url(name + "-new"), headers={**TEXT, **headers})


async def _fork(client: AppClient, name: str, headers: dict[str, str]) -> ClientResponse:
    """A fork of ``name`` (the source) at a new path."""
    fork_headers = {"Stream-Forked-From": url(name), **TEXT, **headers}
    return await client.put(url(name + "-fork"), headers=fork_headers)


async def _delete(client: AppClient, name: str, headers: dict[str, str]) -> ClientResponse:
    return await client.delete(url(name), headers=headers)


# method -> (send, the action it needs, status when allowed on an existing stream)
METHODS: dict[str, tuple[Send, str, int]] = {
    "GET": (_get({"offset": "-1"}), "read", 200),
    "HEAD": (_head, "read", 200),
    "POST": (_append, "append", 204),
    "POST-close": (_close, "append", 204),
    "PUT": (_create, "admin", 201),
    "PUT-fork": (_fork, "admin", 201),
    "DELETE": (_delete, "admin", 204),
    "GET-long-poll": (_get({"offset": "-1", "live": "long-poll"}), "read", 200),
    "GET-sse": (_get({"offset": "-1", "live": "sse"}), "read", 200),
}


def credential(case: str, method: str) -> dict[str, str]:
    """The Authorization header (if any) for a credential case and a method."""
    needed = METHODS[method][1]
    if case == "none":
        return {}
    if case == "malformed":
        return bearer("not.a.jwt")
    if case == "bad-signature":
        return bearer(token(kid="ed-1", signer="ed-2"))
    if case == "expired":
        return bearer(token(lifetime=-3600))
    if case == "revoked":
        return bearer(token(jti="revoked-jti"))
    if case == "wrong-audience":
        return bearer(token(aud="another-service"))
    if case == "outside-path":
        return bearer(token([{"path": "elsewhere/**", "actions": ALL}]))
    if case == "wrong-kind":
        if method == "PUT-fork":  # admin on the new path, but no read on the source
            return bearer(token([{"path": "**", "actions": ["admin", "append"]}]))
        others = [a for a in ALL if a != needed]
        return bearer(token([{"path": "**", "actions": others}]))
    if case == "valid":
        return bearer(token([{"path": "chat/**", "actions": ALL}]))
    assert case == "valid-api-key"
    return bearer(ADMIN_KEY)


CASES = {
    "none": (401, 'Bearer realm="relay"', "missing"),
    "malformed": (401, 'Bearer realm="relay", error="invalid_token"', "malformed"),
    "bad-signature": (401, 'Bearer realm="relay", error="invalid_token"', "bad_signature"),
    "expired": (401, 'Bearer realm="relay", error="invalid_token"', "expired"),
    "revoked": (401, 'Bearer realm="relay", error="invalid_token"', "revoked"),
    "wrong-audience": (401, 'Bearer realm="relay", error="invalid_token"', "wrong_audience"),
    "outside-path": (403, None, "forbidden"),
    "wrong-kind": (403, None, "forbidden"),
}


def comparable(response: ClientResponse, body: bytes) -> tuple[int, dict[str, str], bytes]:
    per_request = ("Date", "X-Request-ID")
    headers = {k: v for k, v in response.headers.items() if k not in per_request}
    return response.status, headers, body


@pytest.mark.parametrize("case", list(CASES))
async def test_refusals_are_the_same_for_existing_and_missing_streams(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path, case: str
) -> None:
    client, _ = await auth_client(aiohttp_client, backend, tmp_path)
    status, challenge, reason = CASES[case]
    for method, (send, _action, _ok) in METHODS.items():
        existing, missing = f"chat/{method}-here", f"chat/{method}-absent"
        await seed(client, existing)
        seen = []
        for name in (existing, missing):
            response = await send(client, name, credential(case, method))
            seen.append(comparable(response, await response.read()))
        assert seen[0] == seen[1], method
        got_status, headers, body = seen[0]
        assert got_status == status, method
        assert headers.get("WWW-Authenticate") == challenge, method
        if method != "HEAD":
            assert headers["Content-Type"] == "application/json"
            assert b'"error"' in body
    metrics = await (await client.get("/metrics")).text()
    count = re.search(rf'relay_auth_failures_total{{reason="{reason}"}} (\S+)', metrics)
    assert count is not None and float(count.group(1)) >= len(METHODS) * 2


@pytest.mark.parametrize("case", ["valid", "valid-api-key"])
async def test_granted_requests_succeed(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path, case: str
) -> None:
    client, _ = await auth_client(aiohttp_client, backend, tmp_path)
    for method, (send, _action, ok) in METHODS.items():
        name = f"chat/{method}"
        await seed(client, name)
        response = await send(client, name, credential(case, method))
        await response.read()
        assert response.status == ok, method
    metrics = await (await client.get("/metrics")).text()
    assert not re.search(r'relay_auth_failures_total\{reason="\w+"\} [1-9]', metrics)


async def test_preflight_health_and_metrics_need_no_credential(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, _ = await auth_client(aiohttp_client, backend, tmp_path)
    preflight = await client.options(
        url("chat/x"),
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status == 204
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed.split(", ")
    for path in ("/health", "/metrics"):
        assert (await client.get(path)).status == 200
    refused = await client.get(url("chat/x"), headers={"Origin": "https://app.example"})
    assert refused.status == 401
    assert "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"]


async def test_reads_are_private_unless_the_grant_is_public(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, _ = await auth_client(aiohttp_client, backend, tmp_path)
    await seed(client, "chat/c")
    private = bearer(token([{"path": "chat/**", "actions": ["read"]}]))
    public = bearer(token([{"path": "chat/**", "actions": ["read"], "public": True}]))
    catch_up = {"offset": "-1"}
    sse = {"offset": "-1", "live": "sse"}
    r = await client.get(url("chat/c"), params=catch_up, headers=private)
    assert r.headers["Cache-Control"] == "private, max-age=60, stale-while-revalidate=300"
    r = await client.get(url("chat/c"), params=catch_up, headers=public)
    assert r.headers["Cache-Control"] == "public, max-age=60, stale-while-revalidate=300"
    r = await client.get(url("chat/c"), params=sse, headers=private)
    assert r.headers["Cache-Control"] == "private, no-cache"
    await r.read()
    r = await client.get(url("chat/c"), params=sse, headers=public)
    assert r.headers["Cache-Control"] == "no-cache"
    await r.read()
    r = await client.get(url("chat/c"), params={"offset": "now"}, headers=private)
    assert r.headers["Cache-Control"] == "no-store"


async def test_without_key_sources_nothing_is_asked(
    backend: Backend, aiohttp_client: ClientFactory
) -> None:
    """The loopback default: no credential needed, and the protocol's public caching."""
    config = Config(data_dir=str(backend.data_dir), database_url=backend.url or "")
    client = await aiohttp_client(make_app(config))
    assert (await client.put(url("chat/open"), data=b"hi", headers=TEXT)).status == 201
    r = await client.get(url("chat/open"), params={"offset": "-1"})
    assert r.status == 200 and r.headers["Cache-Control"].startswith("public")


async def test_subscription_routes_use_the_same_grants(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """Managing ``__ds/subscriptions/<id>`` needs admin there, plus read on everything the
    subscription watches (a pattern must lie inside a read grant) and append on its wake
    stream; claiming its work needs append; the JWKS is public."""
    client, _ = await auth_client(aiohttp_client, backend, tmp_path)
    sub = url("__ds/subscriptions/w1")
    body = {"type": "pull-wake", "pattern": "events/*", "wake_stream": "wake/pool"}
    manage = {"path": "__ds/subscriptions/*", "actions": ["admin", "append"]}
    reader = {"path": "events/**", "actions": ["read"]}
    waker = {"path": "wake/*", "actions": ["append"]}
    narrow = {"path": "events/one", "actions": ["read"]}

    r = await client.put(sub, json=body)
    assert r.status == 401 and "WWW-Authenticate" in r.headers
    for grants in ([reader, waker], [manage, waker], [manage, reader], [manage, narrow, waker]):
        r = await client.put(sub, json=body, headers=bearer(token(grants, aud=AUDIENCE)))
        assert r.status == 403, grants
    r = await client.put(
        sub,
        json={**body, "pattern": None, "streams": ["other/x"]},
        headers=bearer(token([manage, reader, waker], aud=AUDIENCE)),
    )
    assert r.status == 403  # an explicit stream outside the read grant
    allowed = bearer(token([manage, reader, waker], aud=AUDIENCE))
    assert (await client.put(sub, json=body, headers=allowed)).status == 201
    assert (await client.get(sub, headers=allowed)).status == 200
    assert (await client.get(sub, headers=bearer(token([reader], aud=AUDIENCE)))).status == 403
    r = await client.post(sub + "/streams", json={"streams": ["other/x"]}, headers=allowed)
    assert r.status == 403
    claim_only_admin = bearer(token([{**manage, "actions": ["admin"]}], aud=AUDIENCE))
    assert (await client.post(sub + "/claim", json={}, headers=claim_only_admin)).status == 403
    r = await client.post(sub + "/claim", json={"worker": "w"}, headers=allowed)
    assert r.status not in (401, 403)  # past access control (nothing is pending: 409)
    r = await client.get(url("__ds/jwks.json"))
    assert r.status == 200 and r.content_type == "application/jwk-set+json"
    assert (await client.delete(sub, headers=bearer(token([reader], aud=AUDIENCE)))).status == 403
    assert (await client.delete(sub, headers=allowed)).status == 204


async def test_naming_a_successor_needs_read_on_it(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """A successor's existence is checked, so a writer may only name streams it can read."""
    client, _ = await auth_client(aiohttp_client, backend, tmp_path)
    await seed(client, "chat/old")
    await seed(client, "chat/new")
    await seed(client, "private/other")
    writer = bearer(token([{"path": "chat/**", "actions": ["read", "append"]}]))
    closing = {**TEXT, **writer, "Stream-Closed": "true"}
    elsewhere = await client.post(
        url("chat/old"), headers={**closing, "Stream-Successor": "private/other"}
    )
    assert elsewhere.status == 403
    assert "Stream-Closed" not in (await client.head(url("chat/old"), headers=writer)).headers
    named = await client.post(url("chat/old"), headers={**closing, "Stream-Successor": "chat/new"})
    assert named.status == 204


async def test_revoking_with_forks_needs_admin_on_every_fork(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, _ = await auth_client(aiohttp_client, backend, tmp_path)
    await seed(client, "chat/src")
    fork = {**TEXT, **bearer(ADMIN_KEY), "Stream-Forked-From": "chat/src"}
    assert (await client.put(url("elsewhere/copy"), headers=fork)).status == 201
    moderator = bearer(token([{"path": "chat/**", "actions": ALL}]))
    revoke = {"Stream-Revoke-From": "0000000000000000_0000000000000000"}
    refused = await client.delete(
        url("chat/src"), headers={**moderator, **revoke, "Stream-Revoke-Forks": "true"}
    )
    assert refused.status == 403
    assert (await client.head(url("elsewhere/copy"), headers=bearer(ADMIN_KEY))).status == 200
