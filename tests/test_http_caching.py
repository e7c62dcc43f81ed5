"""What each kind of read tells caches (section 10, protocol/caching.py), one row per kind.

tests/test_cdn.py shows nginx acting on these headers; this pins the headers themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from protocol import caching
from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT
from tests.serving import AppClient, RelayTestServer
from tests.waits import wait_for

TEXT = {"Content-Type": "text/plain"}
OPEN = "/v1/stream/open"
CLOSED = "/v1/stream/closed"
TAIL = "public, max-age=0, s-maxage=1"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AppClient]:
    config = Config(data_dir=str(tmp_path), long_poll_timeout=0.2, max_chunk_bytes=2)
    async with TestClient(RelayTestServer(make_app(config))) as client:
        await client.put(OPEN, headers=TEXT, data=b"abcd")
        await client.put(CLOSED, headers={**TEXT, "Stream-Closed": "true"}, data=b"wxyz")
        yield client


async def tail_of(client: AppClient, path: str) -> str:
    head = await client.head(path)
    return head.headers["Stream-Next-Offset"]


@pytest.mark.parametrize(
    ("path", "query", "status", "cache_control"),
    [
        # Data never changes once written: shared for a minute (section 10.1).
        (OPEN, "offset=-1", 200, caching.CATCH_UP_CACHE_CONTROL),
        (OPEN, "offset=-1&live=long-poll", 200, caching.CATCH_UP_CACHE_CONTROL),
        # The empty answer at an open tail, and a long-poll that timed out there: one shared
        # second, so a collapsing cache releases its waiters together; nothing in browsers.
        (OPEN, "offset={tail}", 200, TAIL),
        (OPEN, "offset={tail}&live=long-poll", 204, TAIL),
        # A closed stream's end never changes.
        (CLOSED, "offset={tail}", 200, caching.CATCH_UP_CACHE_CONTROL),
        (CLOSED, "offset={tail}&live=long-poll", 204, caching.CATCH_UP_CACHE_CONTROL),
        # "now" moves under a fixed key: never stored (section 5.6 asks no-store).
        (OPEN, "offset=now", 200, "no-store"),
        (CLOSED, "offset=now", 200, "no-store"),
        (CLOSED, "offset=now&live=long-poll", 204, "no-store"),
        (OPEN, "offset=now&live=long-poll", 204, "no-store"),
        # Errors: caches may keep a bare 404 or 410 by heuristic.
        ("/v1/stream/missing", "offset=-1", 404, "no-store"),
        (OPEN, "offset=junk", 400, "no-store"),
    ],
)
async def test_read_cache_control(
    client: AppClient,
    path: str,
    query: str,
    status: int,
    cache_control: str,
) -> None:
    tail = await tail_of(client, path) if path != "/v1/stream/missing" else ""
    response = await client.get(f"{path}?{query.format(tail=tail)}")
    assert response.status == status
    assert response.headers["Cache-Control"] == cache_control


async def test_head_and_missing_head_are_not_stored(
    client: AppClient,
) -> None:
    assert (await client.head(OPEN)).headers["Cache-Control"] == "no-store"
    missing = await client.head("/v1/stream/missing")
    assert (missing.status, missing.headers["Cache-Control"]) == (404, "no-store")


async def test_a_long_poll_from_now_woken_by_data_is_not_stored(
    client: AppClient,
) -> None:
    """Its data is what arrived after "now"; a later "now" reader must not be handed it."""
    waiting = asyncio.create_task(client.get(OPEN, params={"offset": "now", "live": "long-poll"}))
    await wait_for(lambda: client.app[CONTEXT].hub.parked_readers == 1, what="the reader parked")
    await client.post(OPEN, headers=TEXT, data=b"e")
    response = await waiting
    assert (response.status, await response.read()) == (200, b"e")
    assert response.headers["Cache-Control"] == "no-store"


async def test_sse_is_not_cached_nor_buffered_by_a_proxy(
    client: AppClient,
) -> None:
    response = await client.get(CLOSED, params={"offset": "-1", "live": "sse"})
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    await response.read()
