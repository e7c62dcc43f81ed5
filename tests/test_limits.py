"""Admission limits answer at once with a status and Retry-After, never a hang or a 500."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from protocol.append import AppendRequest
from protocol.create import CreateRequest
from protocol.lifecycle import Expiry
from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT, Limits
from relay.store.sqlite import SqliteStore
from tests.serving import AppClient
from tests.waits import wait_for

STREAM = "/v1/stream/limits"
TEXT = {"Content-Type": "text/plain"}


@pytest.fixture
async def limited(tmp_path: Path, aiohttp_client: AiohttpClient) -> tuple[AppClient, SqliteStore]:
    config = Config(
        data_dir=str(tmp_path),
        max_inflight_writes=2,
        max_inflight_write_bytes=1500,
        max_live_readers=1,
        long_poll_timeout=5,
        max_body_bytes=1000,
    )
    store = SqliteStore(tmp_path)
    client = await aiohttp_client(make_app(config, store))
    response = await client.put(STREAM, headers={"Content-Type": "text/plain"})
    assert response.status == 201
    return client, store


async def test_writes_beyond_the_inflight_limit_get_503_with_retry_after(
    limited: tuple[AppClient, SqliteStore],
) -> None:
    client, store = limited
    async with writer_blocked(store):
        pending = [
            asyncio.create_task(client.post(STREAM, data=b"x", headers=TEXT)) for _ in range(2)
        ]
        await wait_for(lambda: limits_of(client).writes == 2, what="both writes admitted")
        rejected = await client.post(STREAM, data=b"y", headers=TEXT)
        assert rejected.status == 503
        assert rejected.headers["Retry-After"] == "1"
        assert (await rejected.json())["error"]["code"] == "unavailable"
    for task in pending:
        assert (await task).status == 204
    read = await client.get(STREAM, params={"offset": "-1"})
    assert await read.read() == b"xx"


async def test_live_readers_beyond_the_limit_get_429(
    limited: tuple[AppClient, SqliteStore],
) -> None:
    client, _ = limited
    head = await client.head(STREAM)
    tail = head.headers["Stream-Next-Offset"]
    parked = asyncio.create_task(client.get(STREAM, params={"offset": tail, "live": "long-poll"}))
    await wait_for(lambda: limits_of(client).readers == 1, what="the first reader admitted")
    rejected = await client.get(STREAM, params={"offset": tail, "live": "long-poll"})
    assert rejected.status == 429
    assert rejected.headers["Retry-After"] == "5"
    await client.post(STREAM, data=b"wake", headers={"Content-Type": "text/plain"})
    woken = await parked
    assert woken.status == 200
    assert await woken.read() == b"wake"


async def test_body_over_the_limit_is_413_and_appends_nothing(
    limited: tuple[AppClient, SqliteStore],
) -> None:
    client, _ = limited
    response = await client.post(STREAM, data=b"z" * 1001, headers={"Content-Type": "text/plain"})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"
    read = await client.get(STREAM, params={"offset": "-1"})
    assert await read.read() == b""


def limits_of(client: AppClient) -> Limits:
    return client.app[CONTEXT].limits


@asynccontextmanager
async def writer_blocked(store: SqliteStore) -> AsyncIterator[None]:
    """Test-side fault injection: occupy the store's writer thread so commits queue up."""
    release = threading.Event()
    blocker = store._writer.submit(release.wait)
    try:
        yield
    finally:
        release.set()
        blocker.result(timeout=5)


async def test_inflight_write_bytes_beyond_the_limit_get_503(
    limited: tuple[AppClient, SqliteStore],
) -> None:
    client, store = limited
    async with writer_blocked(store):
        pending = asyncio.create_task(client.post(STREAM, data=b"a" * 1000, headers=TEXT))
        await wait_for(lambda: limits_of(client).write_bytes == 1000)
        declared = await client.post(STREAM, data=b"b" * 600, headers=TEXT)
        assert declared.status == 503
        assert declared.headers["Retry-After"] == "1"

        async def undeclared() -> AsyncIterator[bytes]:  # chunked: counted as it is read
            for _ in range(6):
                yield b"c" * 100

        chunked = await client.post(STREAM, data=undeclared(), headers=TEXT)
        assert chunked.status == 503
        assert limits_of(client).write_bytes == 1000
    assert (await pending).status == 204
    assert limits_of(client).write_bytes == 0
    read = await client.get(STREAM, params={"offset": "-1"})
    assert await read.read() == b"a" * 1000


async def test_a_lone_write_is_admitted_whatever_its_size(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """So a byte limit below --max-body-bytes cannot lock out large bodies."""
    config = Config(data_dir=str(tmp_path), max_inflight_write_bytes=10, max_body_bytes=1000)
    client = await aiohttp_client(make_app(config, SqliteStore(tmp_path)))
    assert (await client.put(STREAM, data=b"p" * 500, headers=TEXT)).status == 201
    assert (await client.post(STREAM, data=b"q" * 1000, headers=TEXT)).status == 204


async def test_put_and_delete_go_through_admission(
    limited: tuple[AppClient, SqliteStore],
) -> None:
    client, store = limited
    async with writer_blocked(store):
        pending = [
            asyncio.create_task(client.post(STREAM, data=b"x", headers=TEXT)) for _ in range(2)
        ]
        await wait_for(lambda: limits_of(client).writes == 2)
        # Before admission covered them, these queued behind the blocked writer.
        created = await asyncio.wait_for(client.put("/v1/stream/other", headers=TEXT), 5)
        assert created.status == 503
        deleted = await asyncio.wait_for(client.delete(STREAM), 5)
        assert deleted.status == 503
    for task in pending:
        assert (await task).status == 204
    assert limits_of(client).writes == 0


async def test_a_fork_sub_offset_scans_at_most_the_configured_bytes(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    config = Config(data_dir=str(tmp_path), max_fork_scan_bytes=100_000)
    json_type = {"Content-Type": "application/json"}
    client = await aiohttp_client(make_app(config))
    big = b'"' + b"m" * 60_000 + b'"'
    source = await client.put(
        "/v1/stream/src", data=b"[" + b",".join([big] * 4) + b"]", headers=json_type
    )
    assert source.status == 201
    zero = "0000000000000000_0000000000000000"

    async def fork(name: str, messages: int) -> int:
        headers = {
            **json_type,
            "Stream-Forked-From": "/v1/stream/src",
            "Stream-Fork-Offset": zero,
            "Stream-Fork-Sub-Offset": str(messages),
        }
        response = await client.put(f"/v1/stream/{name}", headers=headers)
        return response.status

    assert await fork("near", 1) == 201
    assert await fork("far", 4) == 400  # past 100,000 bytes of the source


async def test_the_sqlite_metadata_cache_stays_within_its_bound_as_streams_are_created(
    tmp_path: Path,
) -> None:
    """Every commit puts the streams it wrote into the cache; creates alone must not grow it
    past its bound (at 1,000,000 streams it held them all: the relay's memory grew with
    the streams stored)."""
    store = SqliteStore(tmp_path / "data", cache_limit=50)
    await store.open()
    try:
        for i in range(200):
            path = f"s/{i}"
            await store.create(CreateRequest(path, "text/plain", Expiry(), False, b""), 1.0)
            await store.append(path, AppendRequest("text/plain", b"token "), 1.0)
            assert len(store._cache) <= 50
        meta = await store.head("s/3", 1.0, touch=False)  # evicted: loaded again
        assert await store.read(meta, 0, meta.tail) == b"token "
    finally:
        await store.close()
