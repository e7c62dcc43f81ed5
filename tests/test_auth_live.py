"""Revocation reaching live readers and other relays, and credentials kept out of logs."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path

import aiohttp
import pytest
import structlog

from relay import cli
from relay.app import make_app
from relay.auth.authorizer import Authorizer
from relay.http.context import CONTEXT
from relay.logging import configure
from relay.store.postgres import revoke
from tests.auth_helpers import ALL, AUDIENCE, api_key_entry, bearer, jwks, token, write_json
from tests.relay_process import RelayProcess
from tests.serving import AppClient
from tests.stores import Backend, backend
from tests.test_auth_http import ADMIN_KEY, TEXT, ClientFactory, auth_setup, seed, url
from tests.waits import eventually, wait_for

__all__ = ["backend"]


def fast_rechecks(client: AppClient) -> Authorizer:
    auth = client.app[CONTEXT].auth
    assert auth is not None
    auth.recheck_seconds = 0.1
    auth.poll_seconds = 0.05
    return auth


async def parked(client: AppClient, count: int = 1) -> None:
    await wait_for(lambda: client.app[CONTEXT].hub.parked_readers >= count, what="parked")


async def test_a_parked_long_poll_is_cut_off_when_its_token_is_revoked(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    setup = auth_setup(backend, tmp_path, long_poll_timeout=60)
    client = await aiohttp_client(make_app(setup.config))
    fast_rechecks(client)
    await seed(client, "chat/lp")
    tail = (await client.head(url("chat/lp"), headers=bearer(ADMIN_KEY))).headers
    offset = tail["Stream-Next-Offset"]
    reader = bearer(token([{"path": "chat/**", "actions": ["read"]}], jti="reader-7"))
    poll = asyncio.create_task(
        client.get(url("chat/lp"), params={"offset": offset, "live": "long-poll"}, headers=reader)
    )
    await parked(client)
    write_json(setup.revoked, {"revoked": [{"jti": "reader-7"}]})
    async with asyncio.timeout(10):  # the long-poll itself would wait 60 s
        response = await poll
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="relay", error="invalid_token"'


async def test_a_parked_long_poll_is_cut_off_when_its_token_expires(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    setup = auth_setup(backend, tmp_path, long_poll_timeout=60, auth_clock_skew=0)
    client = await aiohttp_client(make_app(setup.config))
    fast_rechecks(client)
    await seed(client, "chat/exp")
    reader = bearer(token([{"path": "chat/**", "actions": ["read"]}], lifetime=1.5))
    r = await client.get(url("chat/exp"), params={"offset": "-1"}, headers=reader)
    assert r.status == 200
    offset = r.headers["Stream-Next-Offset"]
    poll = asyncio.create_task(
        client.get(url("chat/exp"), params={"offset": offset, "live": "long-poll"}, headers=reader)
    )
    async with asyncio.timeout(10):
        response = await poll
    assert response.status == 401


async def test_an_sse_reader_is_cut_off_when_its_key_is_revoked(
    backend: Backend, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    setup = auth_setup(backend, tmp_path, sse_reconnect_interval=60)
    client = await aiohttp_client(make_app(setup.config))
    fast_rechecks(client)
    reader_grants = [{"path": "chat/**", "actions": ["read"]}]
    keys = json.loads(setup.api_keys.read_text())
    keys["keys"].append(api_key_entry("sk-reader", "reader-key", reader_grants))
    write_json(setup.api_keys, keys)
    await seed(client, "chat/sse")

    async def key_taken() -> bool:
        read = await client.get(
            url("chat/sse"), params={"offset": "-1"}, headers=bearer("sk-reader")
        )
        return read.status == 200

    await eventually(key_taken, what="the key file picked up by the poll")
    response = await client.get(
        url("chat/sse"), params={"offset": "-1", "live": "sse"}, headers=bearer("sk-reader")
    )
    assert response.status == 200
    first = await response.content.readuntil(b"event: control")
    assert b"seed" in first
    write_json(setup.revoked, {"revoked": [{"kid": "reader-key"}]})
    post = await client.post(url("chat/sse"), data=b"after", headers={**TEXT, **bearer(ADMIN_KEY)})
    assert post.status == 204
    async with asyncio.timeout(10):  # the connection would otherwise stay open for 60 s
        rest = await response.read()
    # Whether the append raced the revocation or not, the stream ended without a 60 s wait.
    assert response.content.at_eof()
    del rest
    refused = await client.get(
        url("chat/sse"), params={"offset": "-1"}, headers=bearer("sk-reader")
    )
    assert refused.status == 401


async def test_the_revocation_table_reaches_every_relay_on_the_database(
    pg_url: str, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    backend = Backend("postgres", tmp_path / "data", pg_url)
    Authorizer.db_poll_seconds, saved = 0.1, Authorizer.db_poll_seconds
    try:
        first = await aiohttp_client(make_app(auth_setup(backend, tmp_path / "a").config))
        second = await aiohttp_client(make_app(auth_setup(backend, tmp_path / "b").config))
        await seed(first, "chat/shared")
        held = bearer(token(jti="shared-jti"))
        for client in (first, second):
            r = await client.get(url("chat/shared"), params={"offset": "-1"}, headers=held)
            assert r.status == 200
        await revoke(pg_url, "jti", "shared-jti")

        async def refused(client: AppClient) -> bool:
            r = await client.get(url("chat/shared"), params={"offset": "-1"}, headers=held)
            return r.status == 401

        for client in (first, second):
            await eventually(partial(refused, client), what="the revocation read by each relay")
    finally:
        Authorizer.db_poll_seconds = saved


def test_relay_revoke_adds_a_row(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["revoke", "--database-url", pg_url, "--kid", "old-key"]) == 0
    assert "revoked kid old-key" in capsys.readouterr().out

    async def rows() -> list[tuple[str, str]]:
        import asyncpg

        conn = await asyncpg.connect(pg_url)
        try:
            found = await conn.fetch("SELECT kind, value FROM relay_revocations")
        finally:
            await conn.close()
        return [(r["kind"], r["value"]) for r in found]

    assert asyncio.run(rows()) == [("kid", "old-key")]


def test_revoke_without_postgres_points_at_the_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_DATABASE_URL", raising=False)
    assert cli.main(["revoke", "--jti", "x"]) == 2
    assert "--auth-revocations" in capsys.readouterr().err


async def test_credentials_never_reach_the_logs_or_metrics(
    backend: Backend,
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure("debug", "json")
    try:
        setup = auth_setup(backend, tmp_path, log_level="debug")
        client = await aiohttp_client(make_app(setup.config))
        fast_rechecks(client)
        good = token(jti="logged-jti")
        bad = token(kid="ed-1", signer="ed-2")
        secret_key = "sk-do-not-log-me"
        keys = json.loads(setup.api_keys.read_text())
        keys["keys"].append(api_key_entry(secret_key, "k", [{"path": "x/**", "actions": ALL}]))
        write_json(setup.api_keys, keys)

        async def reloaded() -> bool:
            created = await client.put(url("x/y"), headers={**TEXT, **bearer(secret_key)})
            return created.status == 201

        await eventually(reloaded, what="the reload (which is logged) taking the key")
        for credential in (good, bad, secret_key, "garbage-" + "z" * 40):
            for method in ("GET", "PUT", "POST"):
                await client.request(method, url("chat/log"), headers=bearer(credential))
        metrics = await (await client.get("/metrics")).text()
        out, err = capfd.readouterr()
    finally:
        structlog.reset_defaults()
    logged = out + err
    assert '"request"' in logged and "credentials reloaded" in logged  # logging was on
    for secret in (good, bad, secret_key, "z" * 40, good.split(".")[2]):
        assert secret not in logged
        assert secret not in metrics


async def test_a_real_relay_with_a_token(tmp_path: Path) -> None:
    """The shipped process: keys from files given as flags, a token in, a wrong one out."""
    write_json(tmp_path / "jwks.json", jwks("ed-1"))
    flags = ("--auth-jwt-keys", str(tmp_path / "jwks.json"), "--auth-audience", AUDIENCE)
    process = RelayProcess(tmp_path / "data", *flags)
    await asyncio.to_thread(process.start)
    try:
        async with aiohttp.ClientSession() as session:
            target = f"{process.url}{url('chat/real')}"
            async with session.put(target, headers={**TEXT, **bearer(token())}) as r:
                assert r.status == 201
            async with session.get(target, headers=bearer(token(aud="elsewhere"))) as r:
                assert r.status == 401
    finally:
        await asyncio.to_thread(process.stop)
