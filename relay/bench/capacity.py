"""``capacity``: N relays on one Postgres, chat-token appends, and where the ceiling is.

The question an operator asks before adding relays is which gives out first, the relays or the
database. Each run starts ``count - 1`` more relays like the bench's own on the same database,
spreads ``--connections`` idempotent producers over them (each POSTs 24-byte tokens to its
own stream as fast as it is answered) and measures, per token, the CPU of all relays, the CPU
of the local Postgres server (postmaster and every child, from ``/proc``), WAL bytes and the
database connections each relay holds. From those, per core: tokens a relay core carries,
tokens a Postgres core carries, and their ratio, the number of relay cores one Postgres core
keeps up with. More relays split the same load into smaller group commits, so the database's
cost per token (and with it the ceiling) is read at each count, not extrapolated from one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from protocol import headers as h
from relay.bench.report import Result, Usage, snapshot, usage
from relay.bench.targets import Target, start_target

if TYPE_CHECKING:
    from relay.bench.scenarios import Options

TOKEN = b"token-of-a-chat-reply-24"
CONTENT_TYPE = "text/plain"


async def capacity(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """One row per relay count in ``opts.relays``; Postgres relays only (nothing else scales
    out on one database)."""
    if target.name != "relay" or not target.database_url or target.spec is None:
        return []
    results = []
    for count in opts.relays:
        async with contextlib.AsyncExitStack() as stack:
            relays = [target]
            for _ in range(count - 1):
                extra = await stack.enter_async_context(start_target(target.spec))
                # The database is measured once per run, through the bench's own relay.
                relays.append(replace(extra, database_url="", read_database_urls=()))
            results.append(await _run(client, relays, opts))
    return results


async def _run(client: aiohttp.ClientSession, relays: list[Target], opts: Options) -> Result:
    connections = opts.connections
    home = [relays[i % len(relays)] for i in range(connections)]
    urls = [f"{t.url}/v1/stream/bench-capacity-{uuid.uuid4().hex[:12]}" for t in home]
    for url in urls:
        async with client.put(url, headers={"Content-Type": CONTENT_TYPE}) as response:
            if response.status not in (200, 201):
                raise RuntimeError(f"PUT {url}: {response.status}")
    latencies: list[float] = []
    counts = [0] * connections
    before = [await snapshot(client, t) for t in relays]
    deadline = time.perf_counter() + opts.duration

    async def producer(index: int) -> None:
        headers = {
            "Content-Type": CONTENT_TYPE,
            h.PRODUCER_ID: f"capacity-{index}",
            h.PRODUCER_EPOCH: "0",
        }
        while (opts.count == 0 or counts[index] < opts.count) and (
            opts.count or time.perf_counter() < deadline
        ):
            started = time.perf_counter()
            sent = {**headers, h.PRODUCER_SEQ: str(counts[index])}
            async with client.post(urls[index], data=TOKEN, headers=sent) as response:
                if response.status != 200:
                    raise RuntimeError(f"POST {urls[index]}: {response.status}")
            latencies.append(time.perf_counter() - started)
            counts[index] += 1

    await asyncio.gather(*(producer(i) for i in range(connections)))
    after = [await snapshot(client, t) for t in relays]
    held = await _connections(relays[0].database_url)
    lost = 0
    for url, count in zip(urls, counts, strict=True):
        async with client.get(f"{url}?offset=-1") as response:
            body = await response.read()
        lost += abs(len(body) - count * len(TOKEN)) // len(TOKEN)
    return Result(
        "capacity",
        relays[0],
        f"{len(relays)} relays, {connections} conns",
        sum(counts),
        "token",
        combined([usage(b, a) for b, a in zip(before, after, strict=True)]),
        latencies,
        lost=lost,
        note=f"{held / len(relays):.1f} db connections per relay",
    )


def combined(parts: Sequence[Usage]) -> Usage:
    """One usage for several relays measured over the same window: their CPU and counters
    add up; wall clock, generator and database come from the first (the others carry none)."""
    first = parts[0]

    def total(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(v for v in values if v)

    return replace(
        first,
        server_cpu=total([p.server_cpu for p in parts]),
        commits=total([p.commits for p in parts]),
        rows=total([p.rows for p in parts]),
        appends=total([p.appends for p in parts]),
        statements=total([p.statements for p in parts]),
    )


async def _connections(url: str) -> int:
    """Connections to the relays' database other than this one: what the relays hold."""
    conn = await asyncpg.connect(url)
    try:
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return int(held)


def summary(results: Sequence[Result]) -> list[str]:
    """Per core, from each capacity run: what a relay core and a Postgres core carry."""
    lines: list[str] = []
    for result in results:
        if result.scenario != "capacity" or not result.operations:
            continue
        u = result.usage
        if u.server_cpu is None:
            continue
        if not lines:
            lines += ["", "capacity: tokens per second per fully busy core, from CPU per token"]
        relay_core = result.operations / u.server_cpu if u.server_cpu else 0.0
        line = f"  {result.variant}: a relay core {relay_core:,.0f} tok/s"
        if u.db_cpu:
            database_core = result.operations / u.db_cpu
            line += (
                f", a Postgres core {database_core:,.0f} tok/s:"
                f" one Postgres core keeps up with {database_core / relay_core:.1f} relay cores"
            )
        if u.wal is not None:
            line += f"; {u.wal / result.operations:,.0f} WAL B/token"
        lines.append(line)
    return lines
