"""The ledger: the server's CPU per request, one row per request depth.

Each depth adds one layer to the one before: ``healthz`` is routing and ``Front``,
``head`` adds a stream lookup, ``read`` a catch-up GET of a small stream (lookup, read,
render), ``append`` a durable POST of ``--payload`` bytes. Beside the same requests answered
by bare aiohttp it says what each layer of Relay costs above aiohttp's own floor, which is what
to cut (see docs/BENCHMARKS.md).

Load comes from ``wrk`` when it is installed (it keeps one core's server busy with little CPU of
its own), else (and for HEAD, which wrk cannot parse) from the bench's own aiohttp client:
slower, so the server idles between requests and each costs a little more; every target gets
the same generator for the same depth, so the rows still compare.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from relay.bench.report import Result, snapshot, usage
from relay.bench.targets import Target

if TYPE_CHECKING:
    from relay.bench.scenarios import Options

DEPTHS = ("healthz", "head", "read", "append")
SMALL_STREAM = b"hello"


@dataclass(frozen=True)
class _Load:
    """One depth's requests: what wrk and the fallback client send."""

    depth: str
    method: str
    paths: list[str]  # one per connection (appends) or shared (reads)
    body: bytes = b""
    content_type: str = ""


async def ledger(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """One row per depth: ``connections`` clients for ``duration`` seconds each."""
    connections, duration = opts.connections, opts.duration
    results = []
    for load in await _loads(client, target, connections, opts.payload):
        before = await snapshot(client, target)
        if load.method == "HEAD":  # wrk waits for a body after a HEAD answer: see _raw_heads
            done, failed = await _raw_heads(target.url, load, connections, duration, opts.count)
            generator = f"raw HTTP/1.1 client, {connections} connections"
        elif shutil.which("wrk") and not opts.count:
            done, failed, generator = await _wrk(target.url, load, connections, duration)
        else:
            done, failed = await _own_client(
                client, target.url, load, connections, duration, opts.count
            )
            generator = "aiohttp client"
        spent = usage(before, await snapshot(client, target))
        results.append(
            Result(
                "ledger",
                target,
                load.depth,
                done,
                "req",
                spent,
                lost=failed,
                note=f"{load.method} {_shape(load)}; load: {generator}",
            )
        )
    return results


def _shape(load: _Load) -> str:
    if load.depth == "append":
        return f"{len(load.body)} B, one stream per connection"
    if load.depth == "read":
        return f"?offset=-1 of a {len(SMALL_STREAM)}-byte stream"
    return load.paths[0] if load.depth == "healthz" else "of a stream"


async def _loads(
    client: aiohttp.ClientSession, target: Target, connections: int, payload: int
) -> list[_Load]:
    """Streams for each depth, created up front so the runs measure only their requests."""
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    small = f"/v1/stream/ledger-small-{stamp}"
    async with client.put(target.url + small, headers={"Content-Type": "text/plain"}) as r:
        r.raise_for_status()
    async with client.post(
        target.url + small, data=SMALL_STREAM, headers={"Content-Type": "text/plain"}
    ) as r:
        r.raise_for_status()
    appends = [f"/v1/stream/ledger-append-{stamp}-{i}" for i in range(connections)]
    for path in appends:
        headers = {"Content-Type": "application/octet-stream"}
        async with client.put(target.url + path, headers=headers) as r:
            r.raise_for_status()
    # The reference server has no health route; its ledger starts at HEAD.
    healthz = [_Load("healthz", "GET", ["/healthz"])] if target.name != "reference" else []
    return [
        *healthz,
        _Load("head", "HEAD", [small]),
        _Load("read", "GET", [small + "?offset=-1"]),
        _Load("append", "POST", appends, b"x" * payload, "application/octet-stream"),
    ]


async def _own_client(
    client: aiohttp.ClientSession,
    base: str,
    load: _Load,
    connections: int,
    duration: float,
    count: int,
) -> tuple[int, int]:
    """Requests from this process: ``count`` per connection, or for ``duration`` seconds."""
    done = failed = 0
    deadline = time.perf_counter() + duration
    headers = {"Content-Type": load.content_type} if load.content_type else {}

    async def connection(index: int) -> None:
        nonlocal done, failed
        url = base + load.paths[index % len(load.paths)]
        sent = 0
        while (sent < count) if count else (time.perf_counter() < deadline):
            sent += 1
            async with client.request(
                load.method, url, data=load.body or None, headers=headers
            ) as r:
                await r.read()
                if r.status >= 300:
                    failed += 1
            done += 1

    await asyncio.gather(*(connection(i) for i in range(connections)))
    return done, failed


async def _raw_heads(
    base: str, load: _Load, connections: int, duration: float, count: int
) -> tuple[int, int]:
    """HEAD requests on keep-alive connections, parsed no further than the status line.

    A HEAD answer carries no Content-Length (it would have to be the GET's), which wrk reads
    as "body until close"; aiohttp's client costs more CPU than the server under test.
    """
    host, _, port = base.removeprefix("http://").partition(":")
    request = f"HEAD {load.paths[0]} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    done = failed = 0
    deadline = time.perf_counter() + duration

    async def connection() -> None:
        nonlocal done, failed
        reader, writer = await asyncio.open_connection(host, int(port))
        sent = 0
        try:
            while (sent < count) if count else (time.perf_counter() < deadline):
                sent += 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    failed += 1
                done += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return done, failed


_WRK_SCRIPT = """
local paths = {%(paths)s}
local counter = 0
wrk.method = "%(method)s"
%(body)s
%(headers)s
setup = function(thread) end
init = function(args) end
request = function()
  counter = counter + 1
  return wrk.format(nil, paths[(counter %% #paths) + 1])
end
"""
_REQUESTS = re.compile(r"(\d+) requests in")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


async def _wrk(base: str, load: _Load, connections: int, duration: float) -> tuple[int, int, str]:
    """Run wrk (one thread, ``connections`` connections); return (requests, failed, label)."""
    paths = ", ".join(f'"{p}"' for p in load.paths)
    body = f"wrk.body = {_lua_string(load.body)}" if load.body else ""
    headers = f'wrk.headers["Content-Type"] = "{load.content_type}"' if load.content_type else ""
    script = _WRK_SCRIPT % {"paths": paths, "method": load.method, "body": body, "headers": headers}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        proc = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", handle.name,
            base,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out = (await proc.communicate())[0].decode(errors="replace")
    finally:
        os.unlink(handle.name)
    found = _REQUESTS.search(out)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed: {out.strip()[-400:]}")
    non_2xx = _NON_2XX.search(out)
    errors = _ERRORS.search(out)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    failed += sum(int(n) for n in errors.groups()) if errors else 0
    return int(found.group(1)), failed, f"wrk, {connections} connections"


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'
