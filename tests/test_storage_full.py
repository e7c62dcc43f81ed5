"""A full disk, for real: each store on a small tmpfs, filled by appends until it refuses.

A write the store cannot make for lack of space is a 503 with Retry-After and a JSON error
``storage_full`` (counted in ``relay_store_errors{kind="storage_full"}``), ``/readyz`` is 503
while writes fail, nothing refused is stored and nothing acknowledged is lost, and once space
comes back the next append succeeds and the relay is ready again, with no restart.

Postgres keeps its WAL on the big disk (a full WAL disk makes Postgres itself stop, which is
an outage, not a refused write); the test database lives in a tablespace on the small one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.pg import _with_database
from tests.relay_process import RelayProcess, read_all

BLOCK = 200 * 1024
ROOM = 2 * 1024 * 1024
"""Free space left when the appends start: the disk fills after about ten of them."""
OCTETS = {"Content-Type": "application/octet-stream"}


@contextlib.contextmanager
def small_disk(where: Path, size: str, owner: int = 0) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (the test needs root, as CI has)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},uid={owner},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (this test needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


def leave_free(disk: Path, room: int) -> Path:
    """A file taking all of ``disk`` but ``room`` bytes (freed later to give space back), so
    the store fills after a few appends whatever its schema took."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - room))
    return filler


async def fill_then_recover(relay: RelayProcess, disk: Path) -> None:
    """Append blocks until the store refuses, check every promise, free space, go on."""
    filler = leave_free(disk, ROOM)
    url = f"{relay.url}/v1/stream/full-{uuid.uuid4().hex[:6]}"
    acked = bytearray()
    async with aiohttp.ClientSession() as http:
        async with http.put(url, headers=OCTETS) as created:
            assert created.status == 201
        refused = None
        for _ in range(200):
            block = os.urandom(BLOCK)  # incompressible: Postgres compresses what it can
            async with http.post(url, data=block, headers=OCTETS) as r:
                if r.status == 204:
                    acked += block
                    continue
                refused = (r.status, r.headers.get("Retry-After"), await r.json())
                break
        assert refused is not None, "the disk never filled"
        status, retry_after, body = refused
        assert status == 503
        assert retry_after is not None and int(retry_after) > 0
        assert body["error"]["code"] == "storage_full"
        async with http.get(f"{relay.url}/readyz") as ready:
            assert ready.status == 503
            assert "writes refused" in await ready.text()
        async with http.get(f"{relay.url}/metrics") as scraped:
            text = await scraped.text()
        assert metric(text, 'relay_store_errors_total{kind="storage_full"}') >= 1
        assert await read_all(http, url) == bytes(acked)  # refused bytes were not stored

        filler.unlink()  # space comes back
        async with http.post(url, data=b"after", headers=OCTETS) as r:
            assert r.status == 204
        acked += b"after"
        async with http.get(f"{relay.url}/readyz") as ready:
            assert ready.status == 200
        assert await read_all(http, url) == bytes(acked)


def test_the_embedded_store_on_a_full_disk(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "16m") as disk:
        relay = RelayProcess(disk / "data")
        relay.start()
        try:
            asyncio.run(fill_then_recover(relay, disk))
        finally:
            relay.stop()


async def _server_uid(admin: str) -> int:
    conn = await asyncpg.connect(admin)
    try:
        data_dir: str = await conn.fetchval("SELECT current_setting('data_directory')")
    finally:
        await conn.close()
    return os.stat(data_dir).st_uid


async def _run(admin: str, *statements: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def test_postgres_with_its_tablespace_full(tmp_path: Path, pg_admin_url: str) -> None:
    uid = asyncio.run(_server_uid(pg_admin_url))
    name = f"relay_full_{uuid.uuid4().hex[:8]}"
    # Postgres runs as another user: the mount point must be reachable by it (not under
    # pytest's root-only temporary directory).
    mount_point = Path(tempfile.mkdtemp(prefix="relay-full-"))
    mount_point.chmod(0o755)
    with small_disk(mount_point, "32m", owner=uid) as disk:
        location = disk / "tablespace"
        location.mkdir()
        os.chown(location, uid, -1)
        asyncio.run(
            _run(
                pg_admin_url,
                f"CREATE TABLESPACE {name} LOCATION '{location}'",
                f"CREATE DATABASE {name} TABLESPACE {name}",
            )
        )
        relay = RelayProcess(
            tmp_path / "data", "--database-url", _with_database(pg_admin_url, name)
        )
        try:
            relay.start()
            asyncio.run(fill_then_recover(relay, disk))
        finally:
            relay.stop()
            asyncio.run(
                _run(
                    pg_admin_url,
                    f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
                    f"DROP TABLESPACE IF EXISTS {name}",
                )
            )
    mount_point.rmdir()
