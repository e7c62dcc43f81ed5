"""Erasure reaches the files: once a revocation, a delete or a retention horizon is answered
(or the reaper has removed an expired stream), the bytes it removed are in no file of the
embedded store's data directory (relay.sqlite3 and its -wal and -shm), not merely unreadable
through the API. Each test first shows the marker IS in the files, so a store that only hid it
would fail. On Postgres the bytes stay on disk until their space is reused (docs say what
remains); the last test checks the one claim there that a test can: NOTIFY carries no data."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from protocol.offsets import format_offset
from relay.app import make_app
from relay.config import Config
from relay.store.postgres.notify import CHANNEL
from tests.serving import AppClient
from tests.waits import wait_for

TEXT = {"Content-Type": "text/plain"}
R = "/v1/stream"


@pytest.fixture
async def client(tmp_path: Path, aiohttp_client: AiohttpClient) -> AppClient:
    return await aiohttp_client(make_app(Config(data_dir=str(tmp_path))))


@pytest.fixture(params=["small", "overflow"])
def marker(request: pytest.FixtureRequest) -> bytes:
    """A unique secret; "overflow" puts it in a 20 KiB append, on SQLite's overflow pages."""
    secret = b"SECRET-" + secrets.token_hex(16).encode()
    if request.param == "small":
        return secret
    return b"x" * 12_000 + secret + b"y" * 8_000


def holders(data_dir: Path, marker: bytes) -> list[str]:
    """The files in the data directory whose raw bytes contain the marker's secret."""
    secret = marker.strip(b"xy")
    return sorted(p.name for p in data_dir.iterdir() if p.is_file() and secret in p.read_bytes())


async def tail(client: AppClient, path: str) -> str:
    async with client.head(path) as response:
        return response.headers["Stream-Next-Offset"]


async def append(client: AppClient, path: str, data: bytes) -> None:
    async with client.post(path, data=data, headers=TEXT) as response:
        assert response.status == 204


async def create(
    client: AppClient, path: str, fork_of: str = "", at: str = "", ttl: str = ""
) -> None:
    """Create ``path``, as a fork of stream ``fork_of`` at offset ``at`` when given, living
    ``ttl`` seconds when given."""
    fork = {"Stream-Forked-From": fork_of, "Stream-Fork-Offset": at} if fork_of else {}
    expiry = {"Stream-TTL": ttl} if ttl else {}
    async with client.put(path, headers={**TEXT, **fork, **expiry}) as response:
        assert response.status == 201


async def delete(client: AppClient, path: str, **headers: str) -> None:
    async with client.delete(path, headers=headers) as response:
        assert response.status == 204


async def stored_then_appended(
    client: AppClient, tmp_path: Path, path: str, marker: bytes
) -> str:
    """Create ``path`` with a good prefix, append the marker; the offset where it starts."""
    await create(client, path)
    await append(client, path, b"The capital is ")
    start = await tail(client, path)
    await append(client, path, marker)
    await on_disk(client, tmp_path, marker)
    return start


async def on_disk(client: AppClient, tmp_path: Path, marker: bytes) -> None:
    """The control: the marker is in relay.sqlite3 itself, not only in the WAL (as after any
    automatic checkpoint), and shares its pages with a row that stays."""
    with contextlib.closing(sqlite3.connect(tmp_path / "relay.sqlite3")) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert "relay.sqlite3" in holders(tmp_path, marker)
    async with client.head(f"{R}/neighbour") as response:
        missing = response.status == 404
    if missing:
        await create(client, f"{R}/neighbour")
    await append(client, f"{R}/neighbour", b"stays")


async def test_revoked_bytes_leave_every_file(
    client: AppClient, tmp_path: Path, marker: bytes
) -> None:
    good = await stored_then_appended(client, tmp_path, f"{R}/answer-1", marker)
    await create(client, f"{R}/answer-2", fork_of="answer-1", at=good)
    await append(client, f"{R}/answer-2", b"Paris.")
    await delete(client, f"{R}/answer-1", **{"Stream-Revoke-From": good})
    assert holders(tmp_path, marker) == []
    async with client.get(f"{R}/answer-2", params={"offset": "-1"}) as response:
        assert await response.read() == b"The capital is Paris."  # the fork keeps the prefix


async def test_bytes_cut_from_a_row_a_fork_shares_leave_every_file(
    client: AppClient, tmp_path: Path, marker: bytes
) -> None:
    """One append holds the good prefix and the marker; the fork's offset falls inside it, so
    the delete cuts that row rather than deleting it."""
    await create(client, f"{R}/answer-1")
    await append(client, f"{R}/answer-1", b"The capital is " + marker)
    await on_disk(client, tmp_path, marker)
    await create(client, f"{R}/answer-2", fork_of="answer-1", at=format_offset(15))
    await delete(client, f"{R}/answer-1")
    assert holders(tmp_path, marker) == []
    async with client.get(f"{R}/answer-2", params={"offset": "-1"}) as response:
        assert await response.read() == b"The capital is "


async def test_revoking_forks_erases_their_bytes_too(
    client: AppClient, tmp_path: Path, marker: bytes
) -> None:
    start = await stored_then_appended(client, tmp_path, f"{R}/a", marker)
    late = await tail(client, f"{R}/a")
    await create(client, f"{R}/b", fork_of="a", at=late)
    await append(client, f"{R}/b", marker)  # the fork's own copy, after the inherited one
    await delete(client, f"{R}/a", **{"Stream-Revoke-From": start, "Stream-Revoke-Forks": "true"})
    assert holders(tmp_path, marker) == []


async def test_a_deleted_stream_leaves_every_file(
    client: AppClient, tmp_path: Path, marker: bytes
) -> None:
    await stored_then_appended(client, tmp_path, f"{R}/gone", marker)
    await delete(client, f"{R}/gone")
    assert holders(tmp_path, marker) == []


async def test_bytes_before_a_retention_horizon_leave_every_file(
    client: AppClient, tmp_path: Path, marker: bytes
) -> None:
    await stored_then_appended(client, tmp_path, f"{R}/log", marker)
    keep = await tail(client, f"{R}/log")
    await append(client, f"{R}/log", b"new")
    async with client.put(f"{R}/log", headers={"Stream-Retain-From": keep}) as response:
        assert response.status == 200
    assert holders(tmp_path, marker) == []
    async with client.get(f"{R}/log", params={"offset": "-1"}) as response:
        assert await response.read() == b"new"


async def test_an_expired_stream_leaves_every_file(
    tmp_path: Path, aiohttp_client: AiohttpClient, marker: bytes
) -> None:
    """The reaper's removal erases too: no request waits on it, so wait for the files."""
    config = Config(data_dir=str(tmp_path), reap_interval=0.05)
    client = await aiohttp_client(make_app(config))
    await create(client, f"{R}/short", ttl="1")
    await append(client, f"{R}/short", marker)
    await on_disk(client, tmp_path, marker)
    await wait_for(
        lambda: not holders(tmp_path, marker), timeout=20, what="no file holds the marker"
    )


async def test_postgres_notify_payloads_carry_no_data(
    pg_url: str, aiohttp_client: AiohttpClient, marker: bytes
) -> None:
    """What docs say of Postgres: the NOTIFY that tells other relays of a commit names streams,
    tails and flags, never bytes, so the notification queue holds none of an erased stream."""
    heard: list[str] = []
    listener = await asyncpg.connect(pg_url)
    try:
        await listener.add_listener(CHANNEL, lambda *args: heard.append(str(args[3])))
        client = await aiohttp_client(make_app(Config(database_url=pg_url)))
        await create(client, f"{R}/told")
        await append(client, f"{R}/told", marker)
        await delete(client, f"{R}/told")
        await listener.execute("SELECT 1")  # notifications committed before it arrive first
    finally:
        await listener.close()
    assert len(heard) >= 2  # the append's and the delete's, at least
    secret = marker.strip(b"xy").decode()
    assert not [payload for payload in heard if secret in payload or "x" * 64 in payload]
