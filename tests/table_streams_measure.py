"""Measure table streams on this machine: ``python -m tests.table_streams_measure``.

A private Postgres (wal_level=logical, fsync off) and one relay on it (store in the same
database, polling the slot every 50 ms). Prints: snapshot rows per second, changes per second
one relay follows through a burst with the slot's peak lag, WAL per change (the app's insert,
the relay's append and its slot work together), and commit-to-reader latency of single-row
transactions as a long-poll reader sees them. Numbers, not assertions.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import asyncpg

from relay.store.postgres import migrate
from tests.pg import ThrowawayCluster, _with_database
from tests.relay_process import RelayProcess

SNAPSHOT_ROWS = 20000
BURST = 4000
WRITERS = 4
LATENCY_SAMPLES = 200


def gauge(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def count(http: aiohttp.ClientSession, url: str) -> int:
    total, offset = 0, "-1"
    while True:
        async with http.get(url, params={"offset": offset}) as r:
            if r.status == 404:
                return 0
            total += len(json.loads(await r.read()))
            offset = r.headers["Stream-Next-Offset"]
            if r.headers.get("Stream-Up-To-Date") == "true":
                return total


async def until(http: aiohttp.ClientSession, url: str, want: int) -> None:
    while await count(http, url) < want:
        await asyncio.sleep(0.02)


async def main() -> None:
    cluster = ThrowawayCluster({"wal_level": "logical"})
    admin = cluster.start()
    try:
        conn = await asyncpg.connect(admin)
        await conn.execute("CREATE DATABASE measure")
        await conn.close()
        db = _with_database(admin, "measure")
        await migrate(db)
        conn = await asyncpg.connect(db)
        await conn.execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, chat text NOT NULL, body text);"
            " ALTER TABLE items REPLICA IDENTITY FULL"
        )
        await conn.execute(
            "INSERT INTO items SELECT g, 'snap', 'row ' || g FROM generate_series(1, $1) g",
            SNAPSHOT_ROWS,
        )
        with tempfile.TemporaryDirectory() as tmp:
            relay = RelayProcess(
                Path(tmp),
                "--database-url", db,
                "--table-poll-interval", "0.05",
                "--access-log", "off",
                "--table-stream", "items:chat/{chat}/items:type=item:columns=id,chat,body",
            )  # fmt: skip
            started = time.monotonic()
            relay.start()
            try:
                await measure(relay, conn, db, started)
            finally:
                relay.stop()
        await conn.close()
    finally:
        cluster.stop()


async def burst(
    relay: RelayProcess, conn: asyncpg.Connection, db: str, chats: int, first: int
) -> None:
    """BURST one-row transactions spread over ``chats`` chats, as fast as WRITERS can commit:
    how long until the relay has applied them all, and the slot's peak lag meanwhile."""
    wal_before = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    applied_before = applied(relay.url)
    peak_lag = 0.0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak_lag
        while not stop.is_set():
            lag = await asyncio.to_thread(gauge, relay.url, "relay_table_slot_lag_bytes")
            peak_lag = max(peak_lag, lag)
            await asyncio.sleep(0.05)

    async def writer(n: int) -> None:
        w = await asyncpg.connect(db)
        for i in range(BURST // WRITERS):
            key = first + n * BURST + i
            await w.execute("INSERT INTO items VALUES ($1, $2, 'x')", key, f"b{key % chats}")
        await w.close()

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    await asyncio.gather(*(writer(n) for n in range(WRITERS)))
    committed = time.monotonic() - started
    while await asyncio.to_thread(applied, relay.url) < applied_before + BURST:
        await asyncio.sleep(0.02)
    followed = time.monotonic() - started
    stop.set()
    await sampler
    wal = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn") - wal_before
    print(
        f"burst over {chats} chat(s): {BURST} one-row transactions from {WRITERS} writers "
        f"committed in {committed:.2f} s, all appended after {followed:.2f} s: "
        f"{BURST / followed:.0f} changes/s followed; peak slot lag {peak_lag / 1024:.0f} KiB;"
        f" WAL {wal / BURST:.0f} bytes per change (insert + append + slot)"
    )


def applied(url: str) -> float:
    return gauge(url, 'relay_table_transactions_total{outcome="applied"}')


async def measure(relay: RelayProcess, conn: asyncpg.Connection, db: str, started: float) -> None:
    base = f"{relay.url}/v1/stream/chat"
    async with aiohttp.ClientSession() as http:
        await until(http, f"{base}/snap/items", SNAPSHOT_ROWS + 2)
        seconds = time.monotonic() - started
        print(f"snapshot: {SNAPSHOT_ROWS} rows in {seconds:.2f} s (relay start included)")

        for chats in (1, 50):
            await burst(relay, conn, db, chats, 10_000_000 * chats)

        latencies: list[float] = []
        commits: dict[str, float] = {}
        url = f"{base}/lat/items"
        await conn.execute("INSERT INTO items VALUES (30000000, 'lat', 'first')")
        await until(http, url, 1)
        offset = "now"
        done = asyncio.Event()

        async def reader() -> None:
            nonlocal offset
            while not done.is_set():
                params = {"offset": offset, "live": "long-poll"}
                async with http.get(url, params=params) as r:
                    seen = time.monotonic()
                    offset = r.headers.get("Stream-Next-Offset", offset)
                    if r.status == 200:
                        for m in json.loads(await r.read()):
                            if m.get("key") in commits:
                                latencies.append(seen - commits[m["key"]])
                                if len(latencies) == LATENCY_SAMPLES:
                                    done.set()

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.2)
        for i in range(LATENCY_SAMPLES):
            key = 20_000_000 + i
            await conn.execute("INSERT INTO items VALUES ($1, 'lat', 'x')", key)
            commits[str(key)] = time.monotonic()
            await asyncio.sleep(0.02)
        await done.wait()
        task.cancel()
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        print(
            f"commit to long-poll reader, {LATENCY_SAMPLES} one-row transactions: "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (slot polled every 50 ms when idle)"
        )


if __name__ == "__main__":
    asyncio.run(main())
