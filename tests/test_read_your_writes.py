"""Read-your-writes across relays: a read that starts after an append was acknowledged (at any
relay on the same database) sees that append, even when other reads overlapped its commit.

Each round creates a stream at relay A, fires catch-up reads at relay B while A appends one
byte, and once A has acknowledged it asks B for the stream every way a reader can: a catch-up
GET, a HEAD, a long-poll from the old tail and SSE from the old tail. Relay B answers from what
it knows of the stream, so a lookup that overlapped A's commit must not leave B a stale view.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.relay_process import RelayProcess

TEXT = {"Content-Type": "text/plain"}
ROUNDS = 200
OVERLAPPING_READS = 4


@contextlib.contextmanager
def two_relays(tmp_path: Path, pg_url: str, *extra: str) -> Iterator[tuple[str, str]]:
    relays = [
        RelayProcess(tmp_path / name, "--database-url", pg_url, "--long-poll-timeout", "20", *extra)
        for name in "ab"
    ]
    try:
        for relay in relays:
            relay.start()
        yield relays[0].url, relays[1].url
    finally:
        for relay in relays:
            relay.stop()


async def sse_first_data(http: aiohttp.ClientSession, url: str, offset: str) -> bytes:
    """The first data event of an SSE read from ``offset`` (the stream is text/plain)."""
    params = {"offset": offset, "live": "sse"}
    async with http.get(url, params=params) as response:
        assert response.status == 200
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "data":
                return line.partition(":")[2].removeprefix(" ").encode()
    raise AssertionError("SSE ended without a data event")


async def one_round(http: aiohttp.ClientSession, a: str, b: str, name: str) -> list[str]:
    """One round; the list of stale answers B gave after A's acknowledgement."""
    url_a, url_b = f"{a}/v1/stream/{name}", f"{b}/v1/stream/{name}"
    async with http.put(url_a, headers=TEXT) as created:
        assert created.status == 201
        start = created.headers["Stream-Next-Offset"]

    async def overlapping_read() -> None:
        async with http.get(url_b, params={"offset": "-1"}) as read:
            assert read.status == 200
            await read.read()

    readers = [asyncio.create_task(overlapping_read()) for _ in range(OVERLAPPING_READS)]
    async with http.post(url_a, data=b"x", headers=TEXT) as appended:
        assert appended.status == 204
        acked = appended.headers["Stream-Next-Offset"]
    stale: list[str] = []
    async with http.get(url_b, params={"offset": "-1"}) as read:
        if await read.read() != b"x":
            stale.append("catch-up GET")
    async with http.head(url_b) as head:
        if head.headers.get("Stream-Next-Offset") != acked:
            stale.append("HEAD")
    params = {"offset": start, "live": "long-poll"}
    try:
        async with asyncio.timeout(5):  # parked on a stale tail it would wait 20 s
            async with http.get(url_b, params=params) as polled:
                if polled.status != 200 or await polled.read() != b"x":
                    stale.append("long-poll")
    except TimeoutError:
        stale.append("long-poll (parked past the acknowledged append)")
    try:
        async with asyncio.timeout(5):
            if await sse_first_data(http, url_b, start) != b"x":
                stale.append("SSE")
    except TimeoutError:
        stale.append("SSE (parked past the acknowledged append)")
    await asyncio.gather(*readers)
    return stale


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="one-worker"),
        pytest.param(("--workers", "2", "--commit-pipeline", "3"), id="two-workers-pipelined"),
    ],
)
async def test_reads_after_another_relays_ack_see_the_append(
    pg_url: str, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    with two_relays(tmp_path, pg_url, *extra) as (a, b):
        failures: dict[int, list[str]] = {}
        async with aiohttp.ClientSession() as http:
            for i in range(ROUNDS):
                stale = await one_round(http, a, b, f"ryw-{i}")
                if stale:
                    failures[i] = stale
        assert failures == {}, f"{len(failures)} of {ROUNDS} rounds read stale: {failures}"
