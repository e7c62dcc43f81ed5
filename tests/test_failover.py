"""Failover without losing an acknowledged append: a relay whose database URL names a primary
and its synchronous standby (``target_session_attrs=read-write``) keeps every acknowledged
append when the primary is SIGKILLed and the standby promoted, and finds the new primary by
itself. Idempotent producers on several streams write throughout; they retry what the switch
answers 503 (or cuts off) with the same ``Producer-*`` headers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.failover import ReplicatedPair
from tests.relay_process import RelayProcess, read_all

STREAMS = 10
RECORD = 24


def record(stream: int, seq: int) -> bytes:
    return f"s{stream:02d}-{seq:06d}|".ljust(RECORD, ".").encode()


@pytest.fixture
def pair() -> Iterator[ReplicatedPair]:
    replicated = ReplicatedPair(synchronous=True)
    try:
        yield replicated
    finally:
        replicated.close()


async def test_a_synchronous_standby_keeps_every_acknowledged_append_across_failover(
    pair: ReplicatedPair, tmp_path: Path
) -> None:
    url = pair.start()
    relay = RelayProcess(tmp_path / "data", "--database-url", url, "--db-timeout", "2")
    relay.start()
    acked: dict[tuple[int, int], int] = {}
    failures = 0
    first_failure: float | None = None
    recovered: float | None = None
    switched = asyncio.Event()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            base = f"{relay.url}/v1/stream/fail"
            for n in range(STREAMS):
                async with http.put(f"{base}-{n}", headers={"Content-Type": "text/plain"}) as r:
                    assert r.status == 201

            async def produce(n: int) -> None:
                nonlocal failures, first_failure, recovered
                seq = 0
                while seq < 60 or not switched.is_set() or seq < after_switch[n] + 20:
                    headers = {
                        "Content-Type": "text/plain",
                        "Producer-Id": f"p{n}",
                        "Producer-Epoch": "0",
                        "Producer-Seq": str(seq),
                    }
                    try:
                        async with http.post(
                            f"{base}-{n}", data=record(n, seq), headers=headers
                        ) as r:
                            status = r.status
                            offset = r.headers.get("Stream-Next-Offset", "")
                    except (TimeoutError, aiohttp.ClientError):
                        status, offset = 0, ""
                    if status in (200, 204):
                        acked[(n, seq)] = int(offset.rsplit("_", 1)[1])
                        if first_failure is not None and recovered is None:
                            recovered = time.monotonic()
                        seq += 1
                        if switched.is_set() and after_switch[n] < 0:
                            after_switch[n] = seq
                    else:
                        assert status in (0, 503), status
                        failures += 1
                        first_failure = first_failure or time.monotonic()
                        await asyncio.sleep(0.05)

            after_switch = [-1] * STREAMS
            tasks = [asyncio.create_task(produce(n)) for n in range(STREAMS)]
            while len(acked) < 200:
                await asyncio.sleep(0.01)
            pair.kill_primary()
            await asyncio.to_thread(pair.promote)
            switched.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 90)
            for n in range(STREAMS):
                data = await read_all(http, f"{base}-{n}")
                records = [data[i : i + RECORD] for i in range(0, len(data), RECORD)]
                assert records == [record(n, s) for s in range(len(records))], "lost or doubled"
                for (stream, seq), end in acked.items():
                    if stream == n:
                        assert data[end - RECORD : end] == record(n, seq)
    finally:
        relay.stop()
    assert first_failure is not None and recovered is not None
    print(
        f"\nfailover to a synchronous standby: {len(acked)} acknowledged appends, none lost; "
        f"write outage {recovered - first_failure:.2f} s, {failures} requests answered 503 "
        "or cut off meanwhile"
    )


async def test_after_failing_over_to_a_standby_that_was_behind_writes_are_refused_loudly(
    tmp_path: Path,
) -> None:
    """An asynchronous standby taken away falls behind; appends acknowledged meanwhile are
    lost when the primary dies and the standby is promoted. The relay notices (the database's
    tail is below what it acknowledged) and refuses further writes to that stream with 409
    stream_diverged, a log line and a metric, instead of handing out different bytes at offsets
    readers already have."""
    pair = ReplicatedPair(synchronous=False)
    try:
        url = pair.start()
        log = tmp_path / "relay.log"
        args = ("--database-url", url, "--db-timeout", "2")
        relay = RelayProcess(tmp_path / "data", *args, log=log)
        relay.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                stream = f"{relay.url}/v1/stream/behind"
                text = {"Content-Type": "text/plain"}
                async with http.put(stream, headers=text) as r:
                    assert r.status == 201
                async with http.post(stream, data=b"replicated;", headers=text) as r:
                    assert r.status == 204
                await asyncio.sleep(0.5)  # the standby has it
                await asyncio.to_thread(pair.stop_standby)
                async with http.post(stream, data=b"lost-in-failover;", headers=text) as r:
                    assert r.status == 204  # acknowledged by the primary alone
                pair.kill_primary()
                await asyncio.to_thread(pair.start_standby)
                await asyncio.to_thread(pair.promote)
                status = 0
                for _ in range(100):  # until the relay reaches the new primary
                    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                        async with http.post(stream, data=b"after;", headers=text) as r:
                            status, body = r.status, await r.text()
                            if status != 503:
                                break
                    await asyncio.sleep(0.1)
                assert status == 409 and "stream_diverged" in body
                async with http.get(f"{relay.url}/metrics") as r:
                    assert "relay_store_diverged_streams_total 1.0" in await r.text()
        finally:
            relay.stop()
        assert "database is behind what this relay acknowledged" in log.read_text()
    finally:
        pair.close()
