"""Relay's access control behind real nginx (deploy/nginx/relay.conf): a cache never gives an
authenticated body to another credential, or to a request with none.

Relay answers reads under a private grant ``Cache-Control: private`` (never stored) and under a
public grant ``public`` (stored, keyed by credential in the deploy config). Streams are created
by a relay without access control, which is then restarted on the same data with
``--auth-api-keys``, so these tests use only the read side of the key file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.nginx_proxy import Edge, Nginx, Reply, call, crowd, target
from tests.relay_process import RelayProcess

TEXT = {"Content-Type": "text/plain"}
PRIVATE_1 = "private-reader-one"
PRIVATE_2 = "private-reader-two"
PUBLIC_1 = "public-reader-one"
PUBLIC_2 = "public-reader-two"
QUEUED = 5  # requests under a private answer go upstream one at a time: keep the crowd small


def key_file(path: Path) -> Path:
    def entry(key_id: str, key: str, pattern: str, public: bool) -> dict[str, object]:
        return {
            "id": key_id,
            "sha256": hashlib.sha256(key.encode()).hexdigest(),
            "grants": [{"path": pattern, "actions": ["read"], "public": public}],
        }

    keys = [
        entry("private-1", PRIVATE_1, "chat/**", False),
        entry("private-2", PRIVATE_2, "chat/**", False),
        entry("public-1", PUBLIC_1, "news/**", True),
        entry("public-2", PUBLIC_2, "news/**", True),
    ]
    path.write_text(json.dumps({"keys": keys}))
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    root = tmp_path_factory.mktemp("cdn-auth")
    open_relay = RelayProcess(root / "data")
    open_relay.start()
    try:
        asyncio.run(_create_streams(open_relay.url))
    finally:
        open_relay.stop()
    keys = key_file(root / "keys.json")
    relay = RelayProcess(root / "data", "--auth-api-keys", str(keys), port=open_relay.port)
    relay.start()
    (root / "nginx").mkdir()
    nginx = Nginx(root / "nginx", relay.port)
    try:
        nginx.start()
        yield Edge(relay, nginx)
    finally:
        nginx.stop()
        relay.stop()


async def _create_streams(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for path, body in (("chat/room", b"secret"), ("news/today", b"headline")):
            created = await call(session, "PUT", f"{base}/v1/stream/{path}", TEXT, body)
            assert created.status == 201, created.body


def _statuses(replies: list[Reply]) -> set[tuple[int, bytes]]:
    return {(r.status, r.body) for r in replies}


async def _gather(session: aiohttp.ClientSession, url: str, key: str, count: int) -> list[Reply]:
    return await asyncio.gather(*(call(session, "GET", url, bearer(key)) for _ in range(count)))


async def test_a_private_read_is_never_served_from_the_cache(edge: Edge) -> None:
    """Every request under a private grant reaches Relay, even identical ones with one key."""
    read = f"{edge.stream('chat/room')}?offset=-1"
    async with aiohttp.ClientSession() as session:
        first = await _gather(session, read, PRIVATE_1, QUEUED)
        second = await _gather(session, read, PRIVATE_2, QUEUED)
        again = await _gather(session, read, PRIVATE_1, 1)
    for reply in first + second + again:
        assert (reply.status, reply.body) == (200, b"secret")
        assert "private" in reply.headers["Cache-Control"]
        assert reply.headers["X-Cache-Status"] != "HIT"
    assert edge.upstream_count(target(read), 2 * QUEUED + 1) == 2 * QUEUED + 1


async def test_a_public_grant_read_is_collapsed_per_credential(edge: Edge) -> None:
    read = f"{edge.stream('news/today')}?offset=-1"
    async with aiohttp.ClientSession() as session:
        one = await crowd(session, read, bearer(PUBLIC_1))
        two = await crowd(session, read, bearer(PUBLIC_2))
        again = await crowd(session, read, bearer(PUBLIC_1))
    assert _statuses(one + two + again) == {(200, b"headline")}
    assert "public" in one[0].headers["Cache-Control"]
    assert {r.headers["X-Cache-Status"] for r in again} == {"HIT"}
    # One trip per credential: the second key never got the first key's stored copy.
    assert edge.upstream_count(target(read), 3 * len(one)) == 2


async def test_without_a_valid_credential_a_cached_body_is_never_given(edge: Edge) -> None:
    read = edge.stream("news/today")  # no offset: a cache key no other test fills
    async with aiohttp.ClientSession() as session:
        cached = await call(session, "GET", read, bearer(PUBLIC_1))
        assert (cached.status, cached.body) == (200, b"headline")
        stored = await call(session, "GET", read, bearer(PUBLIC_1))
        assert stored.headers["X-Cache-Status"] == "HIT"
        anonymous = await crowd(session, read, count=QUEUED)
        wrong = await call(session, "GET", read, bearer("not-a-key"))
    assert {r.status for r in anonymous} == {401}
    assert wrong.status in (401, 403)  # an unknown key: refused, whichever way
    for reply in [*anonymous, wrong]:
        assert b"headline" not in reply.body
    # The stored copy answered only its own credential's second request; every request
    # without a valid credential was Relay's to refuse.
    hits = edge.nginx.logged(target(read), 2 + QUEUED + 1)
    assert [hit.cache for hit in hits].count("HIT") == 1
    assert sum(hit.upstream for hit in hits) == 1 + QUEUED + 1
