"""``tables``: table streams measured (Postgres with ``wal_level = logical``; opt-in).

The scenario makes a table in the bench's database, starts a relay of its own following it
(``--table-stream``, its own slot, the slot polled every 50 ms), and reports:
- a burst of one-row transactions from 4 writers over 1 chat and over 50: changes a second the
  relay follows, the slot's peak lag, and the database's CPU and WAL per change (the app's
  insert, the relay's append and the slot's work together);
- commit-to-reader latency of single-row transactions as a long-poll reader sees them;
- the bytes a late reader downloads of a chat whose rows were updated many times, before and
  after the stream compacts (``Stream-Compact: state``).
Afterwards it drops its table, slot and publication.
"""

from __future__ import annotations

import asyncio
import json
import operator
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
import asyncpg

from relay.bench.report import Result, snapshot, usage
from relay.bench.requests import BenchError
from relay.bench.targets import Target, start_target

if TYPE_CHECKING:
    from relay.bench.scenarios import Options

WRITERS = 4
LATENCY_SAMPLES = 200
UPDATES = 40  # per row of the late-reader chat, as a streamed reply's row is updated


async def tables(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    if target.name != "relay" or not target.database_url or target.spec is None:
        return []
    db = target.database_url
    conn = await asyncpg.connect(db)
    try:
        if await conn.fetchval("SHOW wal_level") != "logical":
            raise BenchError("tables needs a --database-url whose wal_level is logical")
        name = f"bench_items_{uuid.uuid4().hex[:8]}"
        await conn.execute(
            f"CREATE TABLE {name} (id bigint PRIMARY KEY, chat text NOT NULL, body text);"
            f" ALTER TABLE {name} REPLICA IDENTITY FULL"
        )
        try:
            flags = (
                "--table-stream", f"{name}:chat/{{chat}}/{name}:type=item:columns=id,chat,body",
                "--table-slot", name, "--table-poll-interval", "0.05",
                "--table-compact-ratio", "0",  # the late-reader row compares by hand
            )  # fmt: skip
            spec = replace(target.spec, extra_args=flags)
            async with start_target(spec) as relay:
                measured = Measure(client, relay, conn, db, name, opts)
                return await measured.run()
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
            await conn.execute(f"DROP PUBLICATION IF EXISTS {name}")
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = $1 AND NOT active",
                name,
            )
    finally:
        await conn.close()


class Measure:
    """One relay following one table; each method one row of the report."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        relay: Target,
        conn: asyncpg.Connection,
        db: str,
        table: str,
        opts: Options,
    ) -> None:
        self.client, self.relay, self.conn, self.db = client, relay, conn, db
        self.table = table
        self.burst_size = max(WRITERS, opts.count or 4000)  # --count sizes a toy run
        self.samples = min(LATENCY_SAMPLES, self.burst_size)
        self.next_id = 1

    def url(self, chat: str) -> str:
        return f"{self.relay.url}/v1/stream/chat/{chat}/{self.table}"

    async def run(self) -> list[Result]:
        await self._insert("warm", 1)
        await self._until(self.url("warm"), lambda n: n >= 1)  # following
        results = [await self.burst(1), await self.burst(50), await self.latency()]
        results.append(await self.late_reader())
        return results

    async def _insert(self, chat: str, count: int) -> None:
        for _ in range(count):
            await self.conn.execute(
                f"INSERT INTO {self.table} VALUES ($1, $2, 'x')", self.next_id, chat
            )
            self.next_id += 1

    async def _count(self, url: str) -> int:
        total, offset = 0, "-1"
        while True:
            async with self.client.get(url, params={"offset": offset}) as r:
                if r.status == 404:
                    return 0
                total += len(json.loads(await r.read()))
                offset = r.headers["Stream-Next-Offset"]
                if r.headers.get("Stream-Up-To-Date") == "true":
                    return total

    async def _until(self, url: str, done: Callable[[int], bool]) -> None:
        deadline = time.monotonic() + 120
        while not done(await self._count(url)):
            if time.monotonic() > deadline:
                raise BenchError(f"{url} never caught up")
            await asyncio.sleep(0.02)

    async def _slot_lag(self) -> int:
        lag = await self.conn.fetchval(
            "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots "
            "WHERE slot_name = $1",
            self.table,
        )
        return int(lag or 0)

    async def burst(self, chats: int) -> Result:
        """One-row transactions as fast as the writers commit, then until all are appended."""
        size = self.burst_size
        first = self.next_id
        self.next_id += size
        chat_names = [f"burst{chats}-{c}" for c in range(chats)]
        peak = 0
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, await self._slot_lag())
                await asyncio.sleep(0.05)

        async def writer(n: int) -> None:
            w = await asyncpg.connect(self.db)
            try:
                for i in range(n, size, WRITERS):
                    await w.execute(
                        f"INSERT INTO {self.table} VALUES ($1, $2, 'x')",
                        first + i,
                        chat_names[i % chats],
                    )
            finally:
                await w.close()

        before = await snapshot(self.client, self.relay)
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(writer(n) for n in range(WRITERS)))
        for index, chat in enumerate(chat_names):
            want = len(range(index, size, chats))  # the rows written to this chat
            await self._until(self.url(chat), partial(operator.le, want))
        stop.set()
        await sampler
        spent = usage(before, await snapshot(self.client, self.relay))
        note = f"peak slot lag {peak / 1024:,.0f} KiB"
        return Result(
            "tables", self.relay, f"burst over {chats} chat(s)", size, "change", spent, note=note
        )

    async def latency(self) -> Result:
        """Commit to a parked long-poll reader, one single-row transaction at a time."""
        url = self.url("latency")
        await self._insert("latency", 1)
        await self._until(url, lambda n: n >= 1)
        async with self.client.head(url) as head:
            offset = head.headers["Stream-Next-Offset"]
        latencies: list[float] = []
        before = await snapshot(self.client, self.relay)
        for _ in range(self.samples):
            params = {"offset": offset, "live": "long-poll"}
            waiting = asyncio.create_task(self.client.get(url, params=params))
            await asyncio.sleep(0.01)  # the reader parks before the commit (pacing, too)
            committed = time.perf_counter()
            await self._insert("latency", 1)
            response = await waiting
            await response.read()
            latencies.append(time.perf_counter() - committed)
            offset = response.headers["Stream-Next-Offset"]
        spent = usage(before, await snapshot(self.client, self.relay))
        return Result(
            "tables",
            self.relay,
            "commit to a long-poll reader",
            self.samples,
            "change",
            spent,
            latencies,
        )

    async def late_reader(self) -> Result:
        """A chat of 20 rows each updated UPDATES times: a late reader's download, before and
        after the stream compacts."""
        url = self.url("late")
        ids = list(range(self.next_id, self.next_id + 20))
        self.next_id += 20
        for key in ids:
            await self.conn.execute(f"INSERT INTO {self.table} VALUES ($1, 'late', 'v0')", key)
        for n in range(1, UPDATES):
            await self.conn.execute(
                f"UPDATE {self.table} SET body = $1 WHERE chat = 'late'", f"version {n}"
            )
        await self._until(url, lambda n: n >= 20 * UPDATES)
        before_bytes = await self._download(url)
        before = await snapshot(self.client, self.relay)
        async with self.client.put(url, headers={"Stream-Compact": "state"}) as r:
            if r.status != 200:
                raise BenchError(f"compaction of {url}: {r.status} {await r.text()}")
        spent = usage(before, await snapshot(self.client, self.relay))
        after_bytes = await self._download(url)
        note = f"late reader: {before_bytes:,} B before compaction, {after_bytes:,} B after"
        return Result(
            "tables", self.relay, "late reader of a 20-row chat", 1, "compaction", spent, note=note
        )

    async def _download(self, url: str) -> int:
        total, offset = 0, "-1"
        while True:
            async with self.client.get(url, params={"offset": offset}) as r:
                total += len(await r.read())
                offset = r.headers["Stream-Next-Offset"]
                if r.headers.get("Stream-Up-To-Date") == "true":
                    return total
