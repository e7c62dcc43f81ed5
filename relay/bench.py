"""``relay bench``: load a relay over HTTP and print what it sustained.

Without ``--url`` it starts ``relay serve`` in a subprocess (embedded store in a temporary
directory, or Postgres with ``--database-url``), so client and server do not share a loop.
Scenarios: token-sized appends from many producers (one stream each, and all on one stream),
live fan-out to parked long-poll readers, and catch-up reads. Counts are bounded; it stops
by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp

from protocol import headers as h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default="", help="base URL of a running relay (default: start one)"
    )
    parser.add_argument("--database-url", default="", help="start the relay on this Postgres")
    parser.add_argument("--producers", type=int, default=32, help="concurrent producers")
    parser.add_argument("--appends", type=int, default=200, help="appends per producer")
    parser.add_argument("--payload", type=int, default=24, help="bytes per append (a token)")
    parser.add_argument("--readers", type=int, default=200, help="parked long-poll readers")
    parser.add_argument("--fanout-appends", type=int, default=50, help="appends seen by readers")
    parser.add_argument("--catchup-mib", type=int, default=32, help="MiB read back in catch-up")


@dataclass
class Row:
    scenario: str
    operations: int
    seconds: float
    latencies: list[float]
    unit: str = "ops/s"
    note: str = ""

    def cells(self) -> list[str]:
        lat = sorted(self.latencies)
        p50 = _pct(lat, 0.50)
        p99 = _pct(lat, 0.99)
        rate = self.operations / self.seconds if self.seconds else 0.0
        return [
            self.scenario,
            f"{self.operations}",
            f"{rate:,.0f} {self.unit}",
            f"{p50 * 1000:.2f}" if lat else "-",
            f"{p99 * 1000:.2f}" if lat else "-",
            self.note,
        ]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(_relay(args))
        connector = aiohttp.TCPConnector(limit=max(args.producers, args.readers) + 16)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        rows = [
            await _appends(session, base, args, shared=False),
            await _appends(session, base, args, shared=True),
            await _fanout(session, base, base, args),
        ]
        if args.database_url and not args.url:
            # A second relay on the same database: readers there are woken by NOTIFY.
            other = await stack.enter_async_context(_relay(args))
            rows.append(await _fanout(session, other, base, args, across=True))
        rows.append(await _catchup(session, base, args))
    _print_table(rows, args)
    return 0


@contextlib.asynccontextmanager
async def _relay(args: argparse.Namespace) -> AsyncIterator[str]:
    if args.url:
        yield args.url.rstrip("/")
        return
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as data_dir:
        env = dict(os.environ)
        command = [sys.executable, "-m", "relay", "serve", "--port", str(port)]
        command += ["--data-dir", data_dir, "--log-level", "warning", "--long-poll-timeout", "30"]
        if args.database_url:
            command += ["--database-url", args.database_url]
        proc = subprocess.Popen(command, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            await _wait_healthy(base, proc)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_healthy(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if proc.poll() is not None:
                raise RuntimeError("relay exited during start-up")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError("relay did not become healthy")


async def _create(session: aiohttp.ClientSession, url: str, content_type: str) -> None:
    async with session.put(url, headers={"Content-Type": content_type}) as response:
        if response.status not in (200, 201):
            raise RuntimeError(f"create failed: {response.status}")


async def _appends(
    session: aiohttp.ClientSession, base: str, args: argparse.Namespace, *, shared: bool
) -> Row:
    run_id = uuid.uuid4().hex[:8]
    streams = [
        f"{base}/v1/stream/bench-{run_id}-{i}" for i in range(1 if shared else args.producers)
    ]
    for url in streams:
        await _create(session, url, "text/plain")
    payload = b"x" * args.payload
    latencies: list[float] = []

    async def producer(index: int) -> None:
        url = streams[0 if shared else index]
        headers = {
            "Content-Type": "text/plain",
            h.PRODUCER_ID: f"p{index}",
            h.PRODUCER_EPOCH: "0",
        }
        for seq in range(args.appends):
            started = time.perf_counter()
            async with session.post(
                url, data=payload, headers={**headers, h.PRODUCER_SEQ: str(seq)}
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"append failed: {response.status}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(producer(i) for i in range(args.producers)))
    elapsed = time.perf_counter() - started
    name = "append, one stream each" if not shared else "append, all on one stream"
    total = args.producers * args.appends
    await _verify_length(session, streams, total * args.payload)
    return Row(name, total, elapsed, latencies, note=f"{args.producers} producers")


async def _verify_length(
    session: aiohttp.ClientSession, streams: Sequence[str], total: int
) -> None:
    """A benchmark that lost data would be measuring the wrong thing: count the bytes."""
    seen = 0
    for url in streams:
        offset = "-1"
        while True:
            async with session.get(url, params={"offset": offset}) as response:
                seen += len(await response.read())
                offset = response.headers[h.STREAM_NEXT_OFFSET]
                if response.headers.get(h.STREAM_UP_TO_DATE) == "true":
                    break
    if seen != total:
        raise RuntimeError(f"read back {seen} bytes, appended {total}")


async def _fanout(
    session: aiohttp.ClientSession,
    read_base: str,
    write_base: str,
    args: argparse.Namespace,
    *,
    across: bool = False,
) -> Row:
    """Parked long-poll readers at ``read_base``; a producer appends through ``write_base``."""
    name = f"bench-fanout-{uuid.uuid4().hex[:8]}"
    write_url = f"{write_base}/v1/stream/{name}"
    url = f"{read_base}/v1/stream/{name}"
    await _create(session, write_url, "text/plain")
    async with session.head(url) as response:
        tail = response.headers[h.STREAM_NEXT_OFFSET]
    sent_at: dict[str, float] = {}
    latencies: list[float] = []

    async def reader() -> None:
        """Read until every token arrived; a reader that falls behind gets several at once."""
        offset, received = tail, 0
        while received < 16 * args.fanout_appends:
            async with session.get(url, params={"offset": offset, "live": "long-poll"}) as response:
                body = await response.read()
                arrived = time.perf_counter()
                offset = response.headers[h.STREAM_NEXT_OFFSET]
                received += len(body)
                for at in range(0, len(body), 16):
                    key = body[at : at + 16].decode()
                    if key in sent_at:
                        latencies.append(arrived - sent_at[key])

    readers = [asyncio.create_task(reader()) for _ in range(args.readers)]
    await asyncio.sleep(0.5)  # let the readers park
    started = time.perf_counter()
    for i in range(args.fanout_appends):
        token = f"{i:016d}"
        sent_at[token] = time.perf_counter()
        post = session.post(write_url, data=token.encode(), headers={"Content-Type": "text/plain"})
        async with post:
            pass
        await asyncio.sleep(0.02)
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    elapsed = time.perf_counter() - started
    deliveries = len(latencies)
    return Row(
        "live fan-out, other relay" if across else "live fan-out (long-poll)",
        deliveries,
        elapsed,
        latencies,
        unit="deliveries/s",
        note=f"{args.readers} readers x {args.fanout_appends} appends",
    )


async def _catchup(session: aiohttp.ClientSession, base: str, args: argparse.Namespace) -> Row:
    url = f"{base}/v1/stream/bench-catchup-{uuid.uuid4().hex[:8]}"
    await _create(session, url, "application/octet-stream")
    block = os.urandom(256 * 1024)
    for _ in range(args.catchup_mib * 4):
        async with session.post(
            url, data=block, headers={"Content-Type": "application/octet-stream"}
        ) as response:
            if response.status != 204:
                raise RuntimeError(f"append failed: {response.status}")
    latencies: list[float] = []
    offset, total = "-1", 0
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        async with session.get(url, params={"offset": offset}) as response:
            total += len(await response.read())
            offset = response.headers[h.STREAM_NEXT_OFFSET]
            done = response.headers.get(h.STREAM_UP_TO_DATE) == "true"
        latencies.append(time.perf_counter() - t0)
        if done:
            break
    elapsed = time.perf_counter() - started
    mib = total / (1024 * 1024)
    return Row(
        "catch-up read",
        len(latencies),
        elapsed,
        latencies,
        unit="chunks/s",
        note=f"{mib:.0f} MiB at {mib / elapsed:,.0f} MiB/s",
    )


def _print_table(rows: list[Row], args: argparse.Namespace) -> None:
    store = "postgres" if args.database_url else ("external" if args.url else "sqlite")
    print(f"relay bench: store={store} payload={args.payload}B cores={os.cpu_count()}")
    header = ["scenario", "ops", "throughput", "p50 ms", "p99 ms", "notes"]
    table = [header] + [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for index, cells in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if rows and rows[0].latencies:
        mean = statistics.fmean(rows[0].latencies) * 1000
        print(f"mean append latency (one stream each): {mean:.2f} ms")
