"""Growth scenarios: how a relay's cost follows the number of streams and a stream's length.

``streams`` creates streams in steps (``--stream-counts``, cumulative: 10,000 then 100,000 adds
90,000), each with a few appends, and at every step reports the create rate, cold HEAD and
catch-up latency over a sample of the oldest streams, the relay's resident set, the database's
bytes per stream, and the relay's CPU while idle (its reaper and compaction passes must not
grow with idle streams). ``long`` writes one stream of ``--long-appends`` token appends and
compares reads at its start, middle and end (a read must not scan from the beginning), the
whole catch-up rate, and the rows the store keeps for it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from protocol import headers as h
from protocol.offsets import format_offset
from relay.bench.report import Result, snapshot, usage
from relay.bench.requests import BenchError, _create, _post, _read_all, _stream_url
from relay.bench.targets import Target

if TYPE_CHECKING:
    from relay.bench.scenarios import Options

WORKERS = 32
"""Concurrent requests while creating or appending: enough to fill group commits."""
SAMPLE = 300
"""Streams (or reads) sampled for cold-read latency."""
READS = 100
"""Reads at each position of the long stream."""
APPENDS_PER_STREAM = 2
TOKEN = b"token "


async def streams(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    results: list[Result] = []
    urls: list[str] = []
    for size in sorted(opts.stream_counts):
        todo = size - len(urls)
        if todo <= 0:
            continue
        before = await snapshot(client, target)
        urls += await _create_many(client, target, todo)
        created = usage(before, await snapshot(client, target))
        rss = target.resident_mib()
        per_stream = await _database_bytes(target)
        idle = await _idle_cpu(target, opts.idle_seconds)
        notes = [f"RSS {rss:,.0f} MiB" if rss is not None else "RSS -"]
        if per_stream is not None:
            notes.append(f"database {per_stream / size:,.0f} B/stream")
        if idle is not None:
            notes.append(f"idle CPU {idle:.2%} of a core")
        label = f"{size:,} streams"
        note = ", ".join(notes)
        results.append(
            Result("streams", target, f"{label}: create", todo, "stream", created, note=note)
        )
        oldest = urls[: max(SAMPLE, len(urls) // 10)]  # the least recently touched
        sample = random.sample(oldest, min(SAMPLE, len(oldest)))
        results.append(await _timed(client, target, f"{label}: cold HEAD", sample, "HEAD"))
        results.append(await _timed(client, target, f"{label}: cold catch-up", sample, "GET"))
    return results


async def _create_many(client: aiohttp.ClientSession, target: Target, count: int) -> list[str]:
    urls = [_stream_url(target, "growth") for _ in range(count)]
    queue = iter(urls)
    headers = {"Content-Type": "text/plain"}

    async def worker() -> None:
        for url in queue:
            await _create(client, url, "text/plain")
            for _ in range(APPENDS_PER_STREAM):
                await _post(client, url, TOKEN, headers)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return urls


async def _timed(
    client: aiohttp.ClientSession, target: Target, variant: str, urls: list[str], method: str
) -> Result:
    """One request per URL, one at a time: latency without queueing."""
    latencies: list[float] = []
    before = await snapshot(client, target)
    for url in urls:
        started = time.perf_counter()
        params = {"offset": "-1"} if method == "GET" else None
        async with client.request(method, url, params=params) as response:
            await response.read()
            if response.status != 200:
                raise BenchError(f"{method} {url}: {response.status}")
        latencies.append(time.perf_counter() - started)
    spent = usage(before, await snapshot(client, target))
    return Result("streams", target, variant, len(urls), "req", spent, latencies)


async def _idle_cpu(target: Target, seconds: float) -> float | None:
    """The relay's CPU share while nobody calls it: background passes only."""
    first = target.cpu_seconds()
    if first is None or seconds <= 0:
        return None
    await asyncio.sleep(seconds)
    last = target.cpu_seconds()
    return None if last is None else (last - first) / seconds


async def _database_bytes(target: Target) -> int | None:
    if target.database_url:
        conn = await asyncpg.connect(target.database_url)
        try:
            size: int = await conn.fetchval("SELECT pg_database_size(current_database())")
        finally:
            await conn.close()
        return size
    data = _data_dir(target)
    if data is None:
        return None
    return sum(p.stat().st_size for p in data.glob("relay.sqlite3*"))


def _data_dir(target: Target) -> Path | None:
    """The embedded store's directory, from the relay's command line."""
    if target.pid is None:
        return None
    args = Path(f"/proc/{target.pid}/cmdline").read_bytes().split(b"\0")
    for flag, value in itertools.pairwise(args):
        if flag == b"--data-dir":
            return Path(value.decode())
    return None


async def long(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    url = _stream_url(target, "long")
    await _create(client, url, "text/plain")
    headers = {"Content-Type": "text/plain"}
    left = opts.long_appends

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _post(client, url, TOKEN, headers)

    before = await snapshot(client, target)
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    written = usage(before, await snapshot(client, target))
    total = opts.long_appends * len(TOKEN)
    label = f"{opts.long_appends:,} appends"
    rows = await _rows(target, url)
    results = [
        Result(
            "long",
            target,
            f"{label}: write",
            opts.long_appends,
            "append",
            written,
            note=f"{rows:,} rows kept" if rows is not None else "",
        )
    ]
    for where, position in (("start", 0), ("middle", total // 2), ("end", max(0, total - 1024))):
        variant = f"{label}: read at {where}"
        results.append(await _reads_at(client, target, url, variant, position))
    before = await snapshot(client, target)
    data = await _read_all(client, url)
    spent = usage(before, await snapshot(client, target))
    mib = len(data) / (1024 * 1024)
    lost = 0 if len(data) == total else 1
    results.append(
        Result("long", target, f"{label}: whole catch-up", 1, "read", spent, lost=lost, mib=mib)
    )
    return results


async def _reads_at(
    client: aiohttp.ClientSession, target: Target, url: str, variant: str, position: int
) -> Result:
    """Catch-up reads from ``position`` (one chunk each, at most ``--max-chunk-bytes``; the
    relay's own offsets, so this scenario is for the relay)."""
    latencies: list[float] = []
    before = await snapshot(client, target)
    for _ in range(READS):
        started = time.perf_counter()
        async with client.get(url, params={"offset": format_offset(position)}) as response:
            await response.read()
            if response.status != 200 or h.STREAM_NEXT_OFFSET not in response.headers:
                raise BenchError(f"GET {url} at {position}: {response.status}")
        latencies.append(time.perf_counter() - started)
    spent = usage(before, await snapshot(client, target))
    return Result("long", target, variant, READS, "req", spent, latencies)


async def _rows(target: Target, url: str) -> int | None:
    """Data rows the store keeps for the stream at ``url`` (its path ends the URL)."""
    name = url.rpartition("/")[2]
    if target.database_url:
        conn = await asyncpg.connect(target.database_url)
        try:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM relay_chunks c JOIN relay_streams s ON s.id = c.stream_id "
                "WHERE s.path LIKE '%/' || $1 OR s.path = $1",
                name,
            )
        finally:
            await conn.close()
        return count
    data = _data_dir(target)
    if data is None:
        return None
    with sqlite3.connect(f"file:{data / 'relay.sqlite3'}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT count(*) FROM chunks c JOIN streams s ON s.id = c.stream_id "
            "WHERE s.path LIKE '%/' || ? OR s.path = ?",
            (name, name),
        ).fetchone()
    return int(row[0])
