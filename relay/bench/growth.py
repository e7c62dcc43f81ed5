"""Growth scenarios: how a relay's cost follows the number of streams and a stream's length.

``streams`` creates streams in steps (``--stream-counts``, cumulative: 10,000 then 100,000 adds
90,000), each with a few appends, and at every step reports the create rate, cold HEAD and
catch-up latency over a sample of the oldest streams, the relay's resident set, the database's
bytes per stream, the relay's CPU while idle, the time a relay takes from spawn to ``/readyz``
with that many streams, and what one reaper pass and one compaction pass cost (neither may
grow with idle streams). ``long`` writes one stream of ``--long-appends`` appends of
``--long-append-bytes`` each and compares reads at its start, middle and end (a read must not
scan from the beginning), the whole catch-up rate, and the rows the store keeps for it once its
compactor has merged them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import random
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from protocol import headers as h
from protocol.offsets import format_offset
from relay.bench.report import Result, snapshot, usage
from relay.bench.requests import BenchError, _create, _post, _stream_url
from relay.bench.targets import Target, _command, _free_port, stop
from relay.store.postgres import PostgresStore
from relay.store.sqlite import Q as SQLITE

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
PASSES = 20
"""Reaper and compaction passes timed at each step."""
START_TIMEOUT = 600.0
COMPACTED_WAIT = 300.0
"""long: how long to wait for the compactor to stop merging the stream's rows."""


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
        results += await _passes(client, target, label)
        started = await _startup(client, target, label)
        if started is not None:
            results.append(started)
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


async def _passes(client: aiohttp.ClientSession, target: Target, label: str) -> list[Result]:
    """PASSES reaper passes (none expires) and, on Postgres, compaction passes, one at a time.

    On Postgres through a store of the bench's own (the relay's code, the relay's database);
    SQLite's directory belongs to the running relay, so its reaper's two statements run on a
    read-only connection: what a pass reads when nothing expires.
    """
    if target.database_url:
        store = PostgresStore(target.database_url, compact_interval=3600)
        await store.open()
        try:
            reaped = await _timed_passes(client, target, f"{label}: reaper pass", store.reap)
            merged = 0

            async def compact(now: float) -> None:
                nonlocal merged
                merged += (await store.compact(now)).streams

            compacted = await _timed_passes(client, target, f"{label}: compaction pass", compact)
            compacted.note = f"{merged / PASSES:,.0f} streams merged a pass"
        finally:
            await store.close()
        return [reaped, compacted]
    data = _data_dir(target)
    if data is None:
        return []
    with sqlite3.connect(f"file:{data / 'relay.sqlite3'}?mode=ro", uri=True) as db:

        async def reap(now: float) -> None:
            db.execute(SQLITE["expired"], (now,)).fetchall()
            db.execute(SQLITE["orphans"]).fetchall()

        return [await _timed_passes(client, target, f"{label}: reaper pass", reap)]


async def _timed_passes(
    client: aiohttp.ClientSession,
    target: Target,
    variant: str,
    one: Callable[[float], Awaitable[object]],
) -> Result:
    latencies: list[float] = []
    before = await snapshot(client, target)
    for _ in range(PASSES):
        started = time.perf_counter()
        await one(time.time())
        latencies.append(time.perf_counter() - started)
    spent = usage(before, await snapshot(client, target))
    return Result("streams", target, variant, PASSES, "pass", spent, latencies)


async def _startup(client: aiohttp.ClientSession, target: Target, label: str) -> Result | None:
    """A second relay like the target, from spawn to ``/readyz`` answering 200, and its
    resident set then: on the same Postgres database, or on a copy of the SQLite file (one
    relay per directory)."""
    spec = target.spec
    if spec is None or target.name != "relay":
        return None
    with tempfile.TemporaryDirectory(prefix="relay-bench-start-") as scratch:
        if not spec.database_url:
            data = _data_dir(target)
            if data is None:
                return None
            source = sqlite3.connect(f"file:{data / 'relay.sqlite3'}?mode=ro", uri=True)
            with (
                contextlib.closing(source),
                sqlite3.connect(Path(scratch) / "relay.sqlite3") as copy,
            ):
                source.backup(copy)
        port = _free_port()
        command, cwd, _ = _command(spec, port, Path(scratch))
        before = await snapshot(client, target)
        started = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await _ready(client, f"http://127.0.0.1:{port}/readyz", proc)
            elapsed = time.perf_counter() - started
            spent = usage(before, await snapshot(client, target))
            rss = Target("relay", "", "", proc.pid, False).resident_mib() or 0.0
        finally:
            stop(proc)
    note = f"RSS {rss:,.0f} MiB when ready"
    return Result("streams", target, f"{label}: start-up", 1, "start", spent, [elapsed], note=note)


async def _ready(client: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"a second relay exited during start-up ({proc.returncode})")
        with contextlib.suppress(aiohttp.ClientError):
            async with client.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.02)
    raise BenchError(f"a second relay was not ready within {START_TIMEOUT:.0f} s")


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
    body = _body(opts.long_append_bytes)
    left = opts.long_appends

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _post(client, url, body, headers)

    before = await snapshot(client, target)
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    written = usage(before, await snapshot(client, target))
    total = opts.long_appends * len(body)
    label = f"{opts.long_appends:,} appends"
    if len(body) != len(TOKEN):
        label += f" of {len(body):,} B"
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
    size = await _read_through(client, url)
    spent = usage(before, await snapshot(client, target))
    mib = size / (1024 * 1024)
    lost = 0 if size == total else 1
    kept = await _compacted_rows(target, url, rows)
    note = f"{kept:,} rows kept after compaction" if kept is not None else ""
    results.append(
        Result(
            "long",
            target,
            f"{label}: whole catch-up",
            1,
            "read",
            spent,
            lost=lost,
            mib=mib,
            note=note,
        )
    )
    return results


def _body(size: int) -> bytes:
    """One append: a token, or ``size`` bytes of random text (Postgres compresses a repeated
    token in its TOAST storage: 1 GiB of them wrote 1,500 bytes of WAL an append)."""
    if size == len(TOKEN):
        return TOKEN
    return base64.b64encode(os.urandom(size))[:size]


async def _read_through(client: aiohttp.ClientSession, url: str) -> int:
    """Catch-up reads from the start until up to date; the bytes read, none kept (a 1 GiB
    stream must not need 1 GiB of the bench's memory)."""
    size = 0
    offset = "-1"
    while True:
        async with client.get(url, params={"offset": offset}) as response:
            if response.status != 200:
                raise BenchError(f"GET {url}: {response.status}")
            async for piece in response.content.iter_any():
                size += len(piece)
            offset = response.headers[h.STREAM_NEXT_OFFSET]
            if response.headers.get(h.STREAM_UP_TO_DATE) == "true":
                return size


async def _compacted_rows(target: Target, url: str, rows: int | None) -> int | None:
    """The stream's rows once the compactor has stopped merging them (the stream idles now)."""
    deadline = time.monotonic() + COMPACTED_WAIT
    steady = 0
    while rows is not None and time.monotonic() < deadline and steady < 3:
        await asyncio.sleep(5)
        now = await _rows(target, url)
        steady = steady + 1 if now == rows else 0
        rows = now
    return rows


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
