"""The four scenarios. Each is bounded in count and time, checks what it read, and returns rows.

Latency is always measured from just before the POST is sent to the moment the generator has
the bytes (a response or an SSE event fully read), so it includes both HTTP hops.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import aiohttp
import orjson

from protocol import headers as h
from relay.bench import growth
from relay.bench import readers as live_readers
from relay.bench.capacity import capacity
from relay.bench.compression import compression
from relay.bench.ledger import ledger
from relay.bench.report import Result, replicas_caught_up, snapshot, usage
from relay.bench.requests import BenchError, _create, _post, _read_all, _stream_url
from relay.bench.tables import tables
from relay.bench.targets import Target

TOKEN_BYTES = 24
FANOUT_BYTES = 16
CATCHUP_BLOCK = 1024 * 1024
LIVE_SLACK = 5.0
"""Seconds past the last write a reader may take before the run gives up on it."""
OVERRUN = 2.0
"""A producer that cannot keep its rate stops after this many times its planned duration."""


@dataclass(frozen=True)
class Options:
    connections: int = 16
    duration: float = 5.0
    count: int = 0
    """Appends per connection; 0 runs for ``duration`` instead."""
    payload: int = 100
    sessions: tuple[int, ...] = (25, 50, 100)
    rate: float = 50.0
    token_seconds: float = 5.0
    live: tuple[str, ...] = ("long-poll",)
    json: bool = False
    readers: int = 1000
    messages: int = 25
    message_rate: float = 5.0
    catchup_mib: int = 64
    streams: int = 1000
    """memory: streams the parked readers spread over."""
    parked: int = 5000
    """memory: parked long-poll readers."""
    relays: tuple[int, ...] = (1, 2)
    """capacity: how many relays share the database, one run per count."""
    stream_counts: tuple[int, ...] = (10_000,)
    """streams: total streams at each step (cumulative)."""
    idle_seconds: float = 5.0
    """streams: how long the relay's idle CPU is measured at each step."""
    long_appends: int = 100_000
    """long: token appends to the one stream."""
    reader_counts: tuple[int, ...] = (1000, 10_000, 50_000)
    """readers: live readers at each run (each run on a fresh relay)."""
    layouts: tuple[str, ...] = live_readers.LAYOUTS
    """readers: ``spread`` over 1,000 streams, ``one`` stream, or both."""
    long_append_bytes: int = 6
    """long: bytes per append (6: one token; 65,536 with 16,384 appends is 1 GiB)."""


async def append(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """N connections, each POSTing fixed-size bodies to its own stream as fast as answered."""
    urls = [_stream_url(target, "append") for _ in range(opts.connections)]
    for url in urls:
        await _create(client, url, "application/octet-stream")
    body = b"x" * opts.payload
    headers = {"Content-Type": "application/octet-stream"}
    latencies: list[float] = []
    counts = [0] * opts.connections
    before = await snapshot(client, target)
    deadline = time.perf_counter() + opts.duration

    async def connection(index: int) -> None:
        while (opts.count == 0 or counts[index] < opts.count) and (
            opts.count or time.perf_counter() < deadline
        ):
            started = time.perf_counter()
            await _post(client, urls[index], body, headers)
            latencies.append(time.perf_counter() - started)
            counts[index] += 1

    await asyncio.gather(*(connection(i) for i in range(opts.connections)))
    spent = usage(before, await snapshot(client, target))
    lost = 0
    if target.name != "bare":  # bare stores nothing; everyone else must give every byte back
        for url, count in zip(urls, counts, strict=True):
            lost += abs(len(await _read_all(client, url)) - count * opts.payload) // opts.payload
    return [
        Result(
            "append",
            target,
            f"{opts.connections} conns, {opts.payload} B",
            sum(counts),
            "append",
            spent,
            latencies,
            lost=lost,
        )
    ]


def _token(session: int, seq: int) -> bytes:
    return f"{seq:08d}.{session:06d}.".encode().ljust(TOKEN_BYTES, b"t")


async def tokens(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """Chat sessions: a paced idempotent producer and one live reader per stream.

    One row per (live mode, session count). A run passes when p99 <= 100 ms and every reader
    got exactly what was written, in order.
    """
    results = []
    for live in opts.live:
        for sessions in opts.sessions:
            results.append(await _token_run(client, target, opts, live, sessions))
    return results


async def _token_run(
    client: aiohttp.ClientSession, target: Target, opts: Options, live: str, sessions: int
) -> Result:
    content_type = "application/json" if opts.json else "text/plain"
    urls = [_stream_url(target, "tokens") for _ in range(sessions)]
    tails = [await _create(client, url, content_type) for url in urls]
    per_session = max(1, int(opts.rate * opts.token_seconds))
    sent_at = [[0.0] * per_session for _ in range(sessions)]
    written = [0] * sessions
    latencies: list[float] = []
    received: list[list[bytes]] = [[] for _ in range(sessions)]
    interval = 1.0 / opts.rate

    def deliver(session: int, tokens_in: list[bytes]) -> None:
        arrived = time.perf_counter()
        for token in tokens_in:
            seq = int(token[:8])
            if 0 <= seq < per_session and sent_at[session][seq]:
                latencies.append(arrived - sent_at[session][seq])
        received[session].extend(tokens_in)

    async def produce(session: int, start: float) -> None:
        headers = {
            "Content-Type": content_type,
            h.PRODUCER_ID: f"llm-{session}",
            h.PRODUCER_EPOCH: "0",
        }
        stop = start + OVERRUN * opts.token_seconds
        for seq in range(per_session):
            if time.perf_counter() > stop:
                return
            delay = start + seq * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            token = _token(session, seq)
            body = orjson.dumps(token.decode()) if opts.json else token
            sent_at[session][seq] = time.perf_counter()
            await _post(client, urls[session], body, {**headers, h.PRODUCER_SEQ: str(seq)})
            written[session] += 1

    before = await snapshot(client, target)
    t0 = time.perf_counter() + 0.2
    follow = _follow_sse if live == "sse" else _follow_long_poll
    readers = [
        asyncio.create_task(
            follow(client, urls[i], tails[i], per_session, opts.json, partial(deliver, i))
        )
        for i in range(sessions)
    ]
    # Producers start spread over one token interval, as independent chats would.
    await asyncio.gather(*(produce(i, t0 + interval * i / sessions) for i in range(sessions)))
    produced = time.perf_counter() - t0
    await _finish(readers)
    spent = usage(before, await snapshot(client, target))
    lost = sum(
        _mismatches([_token(session, seq) for seq in range(written[session])], received[session])
        for session in range(sessions)
    )
    delivered = sum(len(got) for got in received)
    return Result(
        "tokens",
        target,
        f"{sessions} sessions, {live}",
        delivered,
        "token",
        spent,
        latencies,
        lost=lost,
        held=sum(written) / (sessions * opts.rate * max(produced, opts.token_seconds)),
        note=f"{opts.rate:g} tok/s each{', json' if opts.json else ''}",
    )


async def _finish(readers: list[asyncio.Task[None]]) -> None:
    """Give readers ``LIVE_SLACK`` seconds after the last write, then stop the stragglers.

    What a stopped reader never got counts as lost.
    """
    if readers:
        _, pending = await asyncio.wait(readers, timeout=LIVE_SLACK)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in readers:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error


def _mismatches(expected: list[bytes], got: list[bytes]) -> int:
    """Items missing, extra, repeated or out of place: zero means exactly once, in order."""
    wrong = sum(1 for a, b in zip(expected, got, strict=False) if a != b)
    return wrong + abs(len(expected) - len(got))


def _split(body: bytes, json_mode: bool, size: int) -> list[bytes]:
    if json_mode:
        return [str(message).encode() for message in orjson.loads(body)] if body else []
    return [body[at : at + size] for at in range(0, len(body), size)]


async def _follow_long_poll(
    client: aiohttp.ClientSession,
    url: str,
    offset: str,
    expected: int,
    json_mode: bool,
    deliver: Callable[[list[bytes]], None],
    size: int = TOKEN_BYTES,
) -> None:
    """Tail with long-poll until ``expected`` items arrived."""
    got = 0
    cursor: str | None = None
    while got < expected:
        params = {"offset": offset, "live": "long-poll"}
        if cursor:
            params["cursor"] = cursor
        async with client.get(url, params=params) as response:
            if response.status not in (200, 204):
                raise BenchError(f"long-poll {url}: {response.status}")
            body = await response.read()
            offset = response.headers[h.STREAM_NEXT_OFFSET]
            cursor = response.headers.get(h.STREAM_CURSOR)
        items = _split(body, json_mode, size)
        if items:
            deliver(items)
            got += len(items)


async def _follow_sse(
    client: aiohttp.ClientSession,
    url: str,
    offset: str,
    expected: int,
    json_mode: bool,
    deliver: Callable[[list[bytes]], None],
    size: int = TOKEN_BYTES,
) -> None:
    """Tail with SSE, reconnecting from the last control offset when the server closes."""
    got = 0
    while got < expected:
        async with client.get(url, params={"offset": offset, "live": "sse"}) as response:
            if response.status != 200:
                raise BenchError(f"SSE {url}: {response.status}")
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    kind, data = _parse_event(event)
                    if kind == "data":
                        items = _split(data, json_mode, size)
                        if items:
                            deliver(items)
                            got += len(items)
                    elif kind == "control":
                        offset = orjson.loads(data)["streamNextOffset"]
                if got >= expected:
                    break


def _parse_event(event: bytes) -> tuple[str, bytes]:
    kind = ""
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            kind = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return kind, b"\n".join(data)


async def fanout(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """M parked long-poll readers of one stream; K messages at a fixed rate."""
    url = _stream_url(target, "fanout")
    tail = await _create(client, url, "application/octet-stream")
    sent_at = [0.0] * opts.messages
    latencies: list[float] = []
    received: list[list[bytes]] = [[] for _ in range(opts.readers)]

    def deliver(reader: int, items: list[bytes]) -> None:
        arrived = time.perf_counter()
        for item in items:
            index = int(item)
            if 0 <= index < opts.messages and sent_at[index]:
                latencies.append(arrived - sent_at[index])
        received[reader].extend(items)

    readers = [
        asyncio.create_task(
            _follow_long_poll(
                client, url, tail, opts.messages, False, partial(deliver, i), FANOUT_BYTES
            )
        )
        for i in range(opts.readers)
    ]
    await _parked(client, target, opts.readers)
    before = await snapshot(client, target)
    start = time.perf_counter()
    headers = {"Content-Type": "application/octet-stream"}
    for index in range(opts.messages):
        delay = start + index / opts.message_rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[index] = time.perf_counter()
        await _post(client, url, f"{index:0{FANOUT_BYTES}d}".encode(), headers)
    await _finish(readers)
    spent = usage(before, await snapshot(client, target))
    expected = [f"{index:0{FANOUT_BYTES}d}".encode() for index in range(opts.messages)]
    lost = sum(_mismatches(expected, got) for got in received)
    return [
        Result(
            "fanout",
            target,
            f"{opts.readers} readers, {opts.messages} msgs",
            sum(len(got) for got in received),
            "delivery",
            spent,
            latencies,
            lost=lost,
            note=f"{opts.message_rate:g} msg/s",
        )
    ]


async def _parked(
    client: aiohttp.ClientSession, target: Target, readers: int, timeout: float = 10.0
) -> None:
    """Wait until the readers are parked, so the first message is not read by catch-up.

    The relay says how many readers it holds; for other servers a fixed pause has to do.
    """
    if not target.has_metrics:
        await asyncio.sleep(1.0 + readers / 1000)
        return
    for _ in range(int(timeout / 0.05)):
        async with client.get(f"{target.url}/metrics") as response:
            text = await response.text()
        parked = sum(  # one gauge per mode (long-poll, sse)
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("relay_live_readers{")
        )
        if parked >= readers:
            return
        await asyncio.sleep(0.05)
    raise BenchError(f"only some of {readers} readers parked")


async def catchup(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """Write a large stream in 1 MiB appends, then time reading it back from -1."""
    url = _stream_url(target, "catchup")
    await _create(client, url, "application/octet-stream")
    written = hashlib.sha256()
    headers = {"Content-Type": "application/octet-stream"}
    for _ in range(opts.catchup_mib):
        block = os.urandom(CATCHUP_BLOCK)
        written.update(block)
        await _post(client, url, block, headers)
    await replicas_caught_up(target)
    before = await snapshot(client, target)
    chunks = 0
    parts: list[bytes] = []
    offset = "-1"
    while True:
        async with client.get(url, params={"offset": offset}) as response:
            parts.append(await response.read())
            offset = response.headers[h.STREAM_NEXT_OFFSET]
            done = response.headers.get(h.STREAM_UP_TO_DATE) == "true"
        chunks += 1
        if done:
            break
    spent = usage(before, await snapshot(client, target))
    data = b"".join(parts)
    intact = len(data) == opts.catchup_mib * CATCHUP_BLOCK
    intact = intact and hashlib.sha256(data).digest() == written.digest()
    mib = len(data) / CATCHUP_BLOCK
    return [
        Result(
            "catchup",
            target,
            f"{opts.catchup_mib} MiB",
            round(mib),
            "MiB",
            spent,
            lost=0 if intact else 1,
            mib=mib,
            note=f"{chunks} GETs",
        )
    ]


async def memory(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """The server's resident set with many streams and many parked long-poll readers, then
    one append per stream that must wake every reader with exactly its stream's byte."""
    urls = [_stream_url(target, "memory") for _ in range(opts.streams)]
    tails = [await _create(client, url, "text/plain") for url in urls]
    streams_only = target.resident_mib()
    readers = [
        asyncio.create_task(_one_long_poll(client, urls[i % opts.streams], tails[i % opts.streams]))
        for i in range(opts.parked)
    ]
    await _parked(client, target, opts.parked)
    before = await snapshot(client, target)
    parked = target.resident_mib()
    start = time.perf_counter()
    for index, url in enumerate(urls):
        await _post(client, url, bytes([65 + index % 26]), {"Content-Type": "text/plain"})
    got = await asyncio.gather(*readers)
    latencies = [arrived - start for arrived, _ in got]
    spent = usage(before, await snapshot(client, target))
    lost = sum(body != bytes([65 + i % opts.streams % 26]) for i, (_, body) in enumerate(got))
    rss = "-" if parked is None else f"RSS {parked:,.0f} MiB parked ({streams_only:,.0f} before)"
    return [
        Result(
            "memory",
            target,
            f"{opts.streams} streams, {opts.parked} readers",
            opts.parked,
            "reader",
            spent,
            latencies,
            lost=lost,
            note=rss,
        )
    ]


async def _one_long_poll(
    client: aiohttp.ClientSession, url: str, offset: str
) -> tuple[float, bytes]:
    params = {"offset": offset, "live": "long-poll"}
    while True:
        async with client.get(url, params=params) as response:
            body = await response.read()
            if response.status == 200 and body:
                return time.perf_counter(), body
            if response.status not in (200, 204):
                raise BenchError(f"long-poll {url}: {response.status}")


SCENARIOS = {
    "append": append,
    "tokens": tokens,
    "fanout": fanout,
    "catchup": catchup,
    "memory": memory,
    "ledger": ledger,
    "capacity": capacity,
    "streams": growth.streams,
    "long": growth.long,
    "compression": compression,
    "tables": tables,
    "readers": live_readers.readers,
}
OPT_IN = ("capacity", "streams", "long", "compression", "tables", "readers")
DEFAULT_SCENARIOS = tuple(name for name in SCENARIOS if name not in OPT_IN)
"""What ``relay bench`` runs unless told: capacity starts more relays and needs Postgres; the
growth scenarios (streams, long, readers) run for minutes at the sizes they are meant for;
compression measures a feature rather than the server's speed."""
BARE_SCENARIOS = ("append", "ledger")
"""The bare server stores nothing, so it is only a ceiling for appends and the ledger's floor."""
