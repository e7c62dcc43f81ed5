"""``readers``: what live readers cost a relay as their number grows, and how fast they wake.

For each reader count (``--reader-counts``), live mode (``--live``) and layout (``--layouts``:
``spread`` over 1,000 streams, or ``one`` stream) the scenario starts a relay of its own, a
fresh process (memory an earlier run freed would hide what the next one costs) with an open-file
limit above the count and deadlines that do not fire during the run, then:

1. opens the readers' connections, each answered one request (``GET /healthz``), and reads the
   relay's resident set: KiB per idle keep-alive connection;
2. sends each a live GET from its stream's tail and waits until the relay's gauge says all are
   parked: KiB per parked reader (from before the connections, and above an idle one);
3. appends once to every stream (32 at a time) and times, per reader, from that append's
   POST being sent (the latency columns, as in every scenario) and from its acknowledgement
   (the note: negative where the reader had its bytes before the bench read the answer to the
   POST, as when the relay wakes readers before it answers) to the reader holding its bytes,
   which must be exactly the bytes appended, once. Long-poll
   readers poll again after their answer, as clients do, and the run ends once all are parked
   again, so the relay's CPU per delivered answer includes that re-poll.

The kernel's socket memory (``/proc/net/sockstat``, TCP ``mem``) is read beside the resident
set: it is not in the relay's RSS, it is machine-wide and it counts both ends of each loopback
connection. The client is one process of plain asyncio protocols (an aiohttp session per reader
would cost more than the relay's side) spread over source addresses 127.0.0.2, 127.0.0.3, ...
(one address has about 28,000 ephemeral ports). A size this machine cannot hold (open files,
memory) or a run that fails gives a row that says why instead of a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import aiohttp

from relay.bench.growth import WORKERS
from relay.bench.report import Result, Usage, snapshot, usage
from relay.bench.requests import BenchError, _create, _post, _stream_url
from relay.bench.targets import Target, start_target

if TYPE_CHECKING:
    from relay.bench.scenarios import Options

LAYOUTS = ("spread", "one")
SPREAD_STREAMS = 1000
PER_ADDRESS = 20_000
"""Connections per source address, below its ~28,000 ephemeral ports (32768-60999)."""
CONNECT_BATCH = 100
"""Connections opened at once: below the relay's listen backlog, so no SYN is dropped."""
FD_MARGIN = 512
"""Open files past the reader count, each side: the relay's store, log and listener, and its
``--max-connections`` default (the limit less 256), which must stay above the count and the
bench's own few connections."""
ROOM_KIB = 64
"""Memory a reader may need on this machine (relay, client and both sockets), generously."""
PATIENT = (
    "--long-poll-timeout", "3600",
    "--sse-reconnect-interval", "3600",
    "--idle-timeout", "3600",
    "--first-request-timeout", "3600",
    "--max-live-readers", "1000000",
)  # fmt: skip
"""No deadline of the relay's may close a connection or answer a reader 204 during a run: the
run measures readers held, and long-poll readers re-poll only after the wake."""
IDLE_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


async def readers(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """One row per (count, mode, layout); relay targets the bench started only (it starts
    relays like them and reads their memory)."""
    if target.name != "relay" or target.spec is None:
        return []
    return [
        await _size(client, target, count, live, layout)
        for count in opts.reader_counts
        for live in opts.live
        for layout in opts.layouts
    ]


async def _size(
    client: aiohttp.ClientSession, target: Target, count: int, live: str, layout: str
) -> Result:
    streams = min(count, SPREAD_STREAMS) if layout == "spread" else 1
    variant = f"{count:,} readers, {live}, {layout}"
    why = _room_for(count)
    if why:
        return _not_run(target, variant, f"not run: {why}")
    assert target.spec is not None
    spec = replace(
        target.spec, open_files=count + FD_MARGIN, extra_args=target.spec.extra_args + PATIENT
    )
    try:
        async with start_target(spec) as relay:
            return await _measure(client, relay, variant, count, live, streams)
    except (OSError, BenchError, TimeoutError, RuntimeError) as exc:
        return _not_run(target, variant, f"failed: {type(exc).__name__}: {exc}")


def _room_for(count: int) -> str:
    """Why this machine cannot hold ``count`` readers, or ``""``; raises the bench's own
    open-file limit as far as the count needs (as root, past its hard limit)."""
    need = count + FD_MARGIN
    nr_open = _read_int("/proc/sys/fs/nr_open", 1024 * 1024)
    if need > nr_open:
        return f"{need:,} open files per process needed, the kernel allows {nr_open:,} (nr_open)"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        try:
            top = hard if hard == resource.RLIM_INFINITY else max(hard, need)
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, top))
        except (ValueError, OSError) as exc:  # no CAP_SYS_RESOURCE (a container, say)
            return (
                f"{need:,} open files needed, and the hard limit here is {hard:,} ({exc}), "
                "for the bench and for the relay it starts"
            )
    available = _meminfo_kib("MemAvailable")
    if available is not None and available < count * ROOM_KIB:
        return f"{count * ROOM_KIB // 1024:,} MiB needed, {available // 1024:,} MiB available"
    return ""


def _read_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def _meminfo_kib(name: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    return None


def _kernel_kib() -> tuple[int, int] | None:
    """The kernel's memory in TCP socket buffers (``/proc/net/sockstat``, TCP ``mem``) and in
    its slab caches (``/proc/meminfo``, ``Slab``: socket, file and epoll structures among
    others), machine-wide."""
    slab = _meminfo_kib("Slab")
    with contextlib.suppress(OSError), open("/proc/net/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:") and slab is not None:
                fields = line.split()
                pages = int(fields[fields.index("mem") + 1])
                return pages * resource.getpagesize() // 1024, slab
    return None


def _not_run(target: Target, variant: str, note: str) -> Result:
    nothing = Usage(0.0, None, 0.0, None, None, None, None)
    return Result("readers", target, variant, 0, "answer", nothing, note=note)


class _Run:
    """What every reader of one run shares: the streams, the counters, the first failure."""

    def __init__(self, live: str, paths: list[str], tails: list[str]) -> None:
        self.live = live
        self.paths = paths
        self.tails = tails
        self.expected: list[bytes] = []
        self.idle = 0
        self.delivered = 0
        self.refused = 0
        """Live GETs answered 503 (a store timeout in a herd of them), each tried again after
        its ``Retry-After``, as clients do."""
        self.failure = ""
        self.closing = False

    async def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.failure:
                raise BenchError(self.failure)
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not within {timeout:.0f} s")
            await asyncio.sleep(0.05)


class _Reader(asyncio.Protocol):
    """One connection: one plain request, then a live reader of one stream, speaking just
    enough HTTP/1.1 (Content-Length answers, and the chunked event stream of SSE)."""

    def __init__(self, run: _Run, stream: int) -> None:
        self.run = run
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: tuple[int, dict[str, str]] | None = None
        self.events = bytearray()
        self.live = False
        self.offset = run.tails[stream]
        self.cursor = ""
        self.got: bytes | None = None
        self.arrived = 0.0
        self.extra = 0
        """Data delivered after the first: each is one too many (every stream gets one append)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(IDLE_REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.run.closing and not self.run.failure:
            self.run.failure = f"the relay closed a reader's connection ({exc or 'EOF'})"

    def park(self) -> None:
        self.live = True
        query = f"offset={self.offset}&live={self.run.live}"
        if self.cursor:
            query += f"&cursor={self.cursor}"
        path = self.run.paths[self.stream]
        assert self.transport is not None
        self.transport.write(f"GET {path}?{query} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                status_line, *lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
                del self.buffer[: end + 4]
                fields = (line.partition(":") for line in lines)
                headers = {name.strip().lower(): value.strip() for name, _, value in fields}
                self.head = (int(status_line.split()[1]), headers)
            status, headers = self.head
            if headers.get("transfer-encoding") == "chunked":
                self._event_stream(status)
                return
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < length:
                return
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            self.head = None
            self._answer(status, headers, body)

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        if not self.live:
            if status != 200:
                self.run.failure = f"GET /healthz: {status}"
            self.run.idle += 1
            return
        if status == 503:
            self.run.refused += 1
            delay = float(headers.get("retry-after", "1"))
            asyncio.get_running_loop().call_later(delay, self.park)
            return
        if status not in (200, 204):
            self.run.failure = f"{self.run.live}: {status} {body[:200]!r}"
            return
        if status == 200 and body:
            self._deliver(body)
        self.offset = headers.get("stream-next-offset", self.offset)
        self.cursor = headers.get("stream-cursor", self.cursor)
        self.park()  # as a client does: the next poll at once

    def _event_stream(self, status: int) -> None:
        """Chunks of an SSE answer, each decoded into ``events`` as it completes."""
        from relay.bench.scenarios import _parse_event

        if status != 200:
            self.run.failure = f"SSE: {status}"
            return
        while (end := self.buffer.find(b"\r\n")) >= 0:
            if self.buffer.startswith(b"HTTP/1."):
                line = bytes(self.buffer[:end]).decode("latin-1")
                self.run.failure = f"a second answer inside an SSE stream, after its 200: {line}"
                return
            size = int(bytes(self.buffer[:end]).split(b";")[0], 16)
            if len(self.buffer) < end + 2 + size + 2:
                break
            if size == 0:
                self.run.failure = "the relay ended an SSE answer"
                return
            self.events += self.buffer[end + 2 : end + 2 + size]
            del self.buffer[: end + 4 + size]
        while (end := self.events.find(b"\n\n")) >= 0:
            kind, data = _parse_event(bytes(self.events[:end]))
            del self.events[: end + 2]
            if kind == "data":
                self._deliver(data)

    def _deliver(self, body: bytes) -> None:
        if self.got is not None:
            self.extra += 1
            return
        self.got = body
        self.arrived = time.perf_counter()
        self.run.delivered += 1


def _same(reader: _Reader) -> _Reader:
    return reader


_next_address = [2]
"""The first source address of the next run: each run takes fresh ones, because the ports of
the last run's connections (closed by the bench) sit in TIME_WAIT for a minute."""


async def _connect(run: _Run, port: int, count: int, opened: list[_Reader]) -> None:
    """Open ``count`` readers' connections into ``opened`` (so a failure part-way leaves
    every open one there to close)."""
    loop = asyncio.get_running_loop()
    streams = len(run.paths)
    first = _next_address[0]
    if first + count // PER_ADDRESS > 254:
        first = 2
    _next_address[0] = first + count // PER_ADDRESS + 1

    def _source(index: int) -> str:
        return f"127.0.0.{first + index // PER_ADDRESS}"

    for start in range(0, count, CONNECT_BATCH):
        batch = [_Reader(run, i % streams) for i in range(start, min(count, start + CONNECT_BATCH))]
        opened += batch
        outcomes = await asyncio.gather(
            *(
                loop.create_connection(
                    partial(_same, reader), "127.0.0.1", port, local_addr=(_source(start + i), 0)
                )
                for i, reader in enumerate(batch)
            ),
            return_exceptions=True,  # every attempt ends before a failure is raised
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


async def _settled_kib(target: Target) -> float:
    """The relay's resident set once it stops moving (it has taken every connection)."""
    last = -1.0
    for _ in range(60):
        await asyncio.sleep(0.5)
        now = target.resident_mib()
        if now is None:
            raise BenchError("the relay's resident set cannot be read")
        if now == last:
            break
        last = now
    return last * 1024


async def _measure(
    client: aiohttp.ClientSession, relay: Target, variant: str, count: int, live: str, streams: int
) -> Result:
    urls = [_stream_url(relay, "readers") for _ in range(streams)]
    tails = [await _create(client, url, "text/plain") for url in urls]
    run = _Run(live, [urlsplit(url).path for url in urls], tails)
    port = urlsplit(relay.url).port
    assert port is not None
    patience = 60 + count / 200  # bounds a failure only: 50,000 readers get five minutes
    memory = [(await _settled_kib(relay), _kernel_kib())]
    conns: list[_Reader] = []
    try:
        await _connect(run, port, count, conns)
        await run.until(lambda: run.idle == count, patience, "idle connections answered")
        memory.append((await _settled_kib(relay), _kernel_kib()))
        for reader in conns:
            reader.park()
        await _all_parked(run, client, relay, count, patience)
        memory.append((await _settled_kib(relay), _kernel_kib()))

        run.expected = [f"wake {i:06d} ".encode() for i in range(streams)]
        sent = [0.0] * streams
        acked = [0.0] * streams
        todo = iter(range(streams))

        async def append() -> None:
            for i in todo:
                sent[i] = time.perf_counter()
                await _post(client, urls[i], run.expected[i], {"Content-Type": "text/plain"})
                acked[i] = time.perf_counter()

        before = await snapshot(client, relay)
        await asyncio.gather(*(append() for _ in range(min(WORKERS, streams))))
        await run.until(lambda: run.delivered == count, patience, "every reader woken")
        if live == "long-poll":  # their next poll is part of what an answer costs
            await _all_parked(run, client, relay, count, patience)
        spent = usage(before, await snapshot(client, relay))
    finally:
        run.closing = True
        for reader in conns:
            if reader.transport is not None:
                reader.transport.close()
    woken = [r for r in conns if r.got is not None]
    latencies = [r.arrived - sent[r.stream] for r in woken]
    from_ack = sorted(r.arrived - acked[r.stream] for r in woken)
    lost = sum(r.got != run.expected[r.stream] for r in conns) + sum(r.extra for r in conns)
    figures = _footprint(memory, count)
    return Result(
        "readers",
        relay,
        variant,
        count,
        "answer",
        spent,
        latencies,
        lost=lost,
        note=f"{streams:,} stream(s); " + _note(figures, from_ack) + _refused(run.refused),
        figures=figures,
    )


async def _all_parked(
    run: _Run, client: aiohttp.ClientSession, relay: Target, count: int, patience: float
) -> None:
    """Until the relay's gauge says ``count`` readers are parked; a reader's failure ends
    the wait at once, with its reason."""
    from relay.bench.scenarios import _parked

    parked = asyncio.ensure_future(_parked(client, relay, count, patience))
    try:
        await run.until(parked.done, patience + 1, "readers parked")
    finally:
        parked.cancel()
    await parked


def _refused(count: int) -> str:
    return f"; {count:,} live GETs answered 503 and tried again" if count else ""


def _footprint(
    memory: Sequence[tuple[float, tuple[int, int] | None]], count: int
) -> dict[str, float]:
    """KiB per connection from the three readings: before, idle, parked."""
    (base, kernel0), (idle, kernel1), (parked, kernel2) = memory
    figures = {
        "base_mib": base / 1024,
        "parked_mib": parked / 1024,
        "idle_kib": (idle - base) / count,
        "parked_kib": (parked - base) / count,
        "above_idle_kib": (parked - idle) / count,
    }
    if kernel0 is not None and kernel1 is not None and kernel2 is not None:
        figures["socket_idle_kib"] = (kernel1[0] - kernel0[0]) / count
        figures["socket_parked_kib"] = (kernel2[0] - kernel0[0]) / count
        figures["slab_idle_kib"] = (kernel1[1] - kernel0[1]) / count
        figures["slab_parked_kib"] = (kernel2[1] - kernel0[1]) / count
    return figures


def _note(figures: dict[str, float], from_ack: list[float]) -> str:
    note = (
        f"parked {figures['parked_kib']:.1f} KiB/reader ({figures['above_idle_kib']:+.1f} "
        f"above idle), idle {figures['idle_kib']:.1f} KiB/conn, RSS {figures['base_mib']:,.0f}"
        f" -> {figures['parked_mib']:,.0f} MiB"
    )
    if "socket_parked_kib" in figures:
        note += (
            f"; kernel, machine-wide, both ends: TCP buffers {figures['socket_idle_kib']:.1f} "
            f"KiB/conn idle, {figures['socket_parked_kib']:.1f} parked, slab "
            f"{figures['slab_idle_kib']:.1f} idle, {figures['slab_parked_kib']:.1f} parked"
        )
    if from_ack:
        first = sum(1 for late in from_ack if late <= 0) / len(from_ack)
        at = [from_ack[int(q * (len(from_ack) - 1))] * 1000 for q in (0.5, 0.99, 1.0)]
        note += (
            f"; from the append's ack: p50 {at[0]:,.1f} p99 {at[1]:,.1f} max {at[2]:,.1f} ms "
            f"({first:.0%} had their bytes first)"
        )
    return note


def summary(results: Sequence[Result]) -> list[str]:
    """Per mode and layout: KiB per parked reader at each count, the slope of the relay's
    growth across counts (least squares over the runs), and the first size that did not run."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        if result.scenario == "readers":
            _, _, setting = result.variant.partition(" readers, ")
            groups.setdefault((result.target.label, setting), []).append(result)
    if not groups:
        return []
    lines = ["", "readers: relay KiB per parked reader by count; slope = marginal KiB per reader"]
    for (label, setting), rows in groups.items():
        ran = [r for r in rows if "parked_kib" in r.figures]
        sizes = ", ".join(f"{r.operations:,}: {r.figures['parked_kib']:.1f}" for r in ran)
        line = f"  {label}, {setting}: {sizes or 'no run'}"
        if len(ran) >= 2:
            xs = [float(r.operations) for r in ran]
            ys = [r.figures["parked_kib"] * r.operations for r in ran]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
            slope /= sum((x - mx) ** 2 for x in xs) or 1.0
            line += f"; slope {slope:.1f} KiB/reader"
        broke = next((r for r in rows if "parked_kib" not in r.figures), None)
        if broke is not None:
            size = broke.variant.partition(", ")[0]
            line += f"; first that did not run: {size} ({broke.note})"
        lines.append(line)
    return lines
