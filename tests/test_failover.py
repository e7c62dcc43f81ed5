"""Failover without losing an acknowledged append: relays whose database URL names a primary
and its synchronous standby (``target_session_attrs=read-write``) keeps every acknowledged
append when the primary is SIGKILLed and the standby promoted, and finds the new primary by
itself. Idempotent producers on several streams write throughout; they retry what the switch
answers 503 (or cuts off) with the same ``Producer-*`` headers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.failover import ReplicatedPair
from tests.relay_process import RelayProcess, read_all
from tests.waits import eventually, wait_for

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


def position(offset: str) -> int:
    return 0 if offset == "-1" else int(offset.rsplit("_", 1)[1])


class Follower:
    """A live reader of one stream that rides out the failover: on a 503, a cut connection or
    a timeout it resumes from the last offset it was given, as the official clients do. It
    ends once it has read up to the stream's final tail (set when the producers are done)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, live: str) -> None:
        self.http, self.url, self.live = http, url, live
        self.offset = "-1"
        self.data = bytearray()
        self.interruptions = 0
        self.final: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def done(self) -> bool:
        return self.final.done() and position(self.offset) >= self.final.result()

    async def run(self) -> None:
        while not self.done():
            try:
                await (self._sse() if self.live == "sse" else self._long_poll())
            except (TimeoutError, aiohttp.ClientError, _Refused):
                self.interruptions += 1
                await asyncio.sleep(0.1)  # a sleep: a reconnecting client's pause, as in life

    async def _long_poll(self) -> None:
        params = {"offset": self.offset, "live": "long-poll"}
        async with self.http.get(self.url, params=params) as r:
            if r.status not in (200, 204):
                raise _Refused(r.status)
            body = await r.read()
            self.data += body
            self.offset = r.headers.get("Stream-Next-Offset", self.offset)

    async def _sse(self) -> None:
        params = {"offset": self.offset, "live": "sse"}
        async with self.http.get(self.url, params=params) as r:
            if r.status != 200:
                raise _Refused(r.status)
            buffer, pending = b"", bytearray()
            async for chunk in r.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    lines = event.split(b"\n")
                    kind = next((x[6:].strip() for x in lines if x.startswith(b"event:")), b"")
                    data = b"\n".join(
                        x[5:].removeprefix(b" ") for x in lines if x.startswith(b"data:")
                    )
                    if kind == b"data":
                        pending += data  # kept only once its control event names the offset
                    elif kind == b"control":
                        self.data += pending
                        pending.clear()
                        self.offset = json.loads(data)["streamNextOffset"]
                        if self.done():
                            return


class _Refused(Exception):
    """The relay answered, but not with data (503 while the database switches)."""


async def test_a_synchronous_standby_keeps_every_acknowledged_append_across_failover(
    pair: ReplicatedPair, tmp_path: Path
) -> None:
    """Two relays name both hosts; each takes half the producers, and long-poll and SSE readers
    of those streams are parked at the other relay (woken across relays by NOTIFY). After the
    primary is SIGKILLed and the standby promoted, every acknowledged append is stored once at
    its acknowledged offset, and every reader has exactly the stored bytes."""
    url = pair.start()
    relays = [
        RelayProcess(tmp_path / name, "--database-url", url, "--db-timeout", "2",
                     "--long-poll-timeout", "2", log=tmp_path / f"{name}.log")
        for name in ("a", "b")
    ]  # fmt: skip
    for relay in relays:
        relay.start()
    acked: dict[tuple[int, int], int] = {}
    failures = 0
    first_failure: float | None = None
    recovered: float | None = None
    switched = asyncio.Event()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            def stream(n: int, relay: int) -> str:
                return f"{relays[relay].url}/v1/stream/fail-{n}"

            for n in range(STREAMS):
                async with http.put(stream(n, n % 2), headers={"Content-Type": "text/plain"}) as r:
                    assert r.status == 201
            followers = [
                Follower(http, stream(n, 1 - n % 2), "long-poll" if n < 2 else "sse")
                for n in range(4)
            ]
            reading = [asyncio.create_task(f.run()) for f in followers]

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
                            stream(n, n % 2), data=record(n, seq), headers=headers
                        ) as r:
                            status = r.status
                            offset = r.headers.get("Stream-Next-Offset", "")
                    except (TimeoutError, aiohttp.ClientError):
                        status, offset = 0, ""
                    if status in (200, 204):
                        acked[(n, seq)] = position(offset)
                        if first_failure is not None and recovered is None:
                            recovered = time.monotonic()
                        seq += 1
                        if switched.is_set() and after_switch[n] < 0:
                            after_switch[n] = seq
                    else:
                        assert status in (0, 503), status
                        failures += 1
                        first_failure = first_failure or time.monotonic()
                        await asyncio.sleep(0.05)  # a sleep: a retrying producer's pause

            after_switch = [-1] * STREAMS
            tasks = [asyncio.create_task(produce(n)) for n in range(STREAMS)]
            await wait_for(lambda: len(acked) >= 200, timeout=60, what="200 appends acked")
            pair.kill_primary()
            await asyncio.to_thread(pair.promote)
            switched.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 90)
            stored = []
            for n in range(STREAMS):
                data = await read_all(http, stream(n, (n + 1) % 2))
                stored.append(data)
                records = [data[i : i + RECORD] for i in range(0, len(data), RECORD)]
                assert records == [record(n, s) for s in range(len(records))], "lost or doubled"
                for (which, seq), end in acked.items():
                    if which == n:
                        assert data[end - RECORD : end] == record(n, seq)
            for n, follower in enumerate(followers):
                follower.final.set_result(len(stored[n]))
            await asyncio.wait_for(asyncio.gather(*reading), 60)
            for n, follower in enumerate(followers):
                assert bytes(follower.data) == stored[n], f"{follower.live} reader of {n}"
        # What the relays served is what the promoted standby holds (not what backends the
        # dead primary left behind were still answering): asked directly.
        promoted = await asyncpg.connect(pair.url("standby"))
        try:
            assert not await promoted.fetchval("SELECT pg_is_in_recovery()")
            for n in range(STREAMS):
                tail = await promoted.fetchval(
                    "SELECT tail FROM relay_streams WHERE path = $1", f"fail-{n}"
                )
                assert tail == len(stored[n])
        finally:
            await promoted.close()
    finally:
        for relay in relays:
            relay.stop()
    # A promotion fast enough that every request in flight waited it out is no outage at all.
    assert first_failure is None or recovered is not None
    for relay in relays:  # an outage is one line when it starts, not a traceback per task
        assert relay.log is not None
        assert "reaper failed" not in relay.log.read_text()
    outage = (
        f"write outage {recovered - first_failure:.2f} s"
        if first_failure is not None and recovered is not None
        else "no request failed"
    )
    print(
        f"\nfailover to a synchronous standby, two relays: {len(acked)} acknowledged appends, "
        f"none lost; {outage}, {failures} requests "
        "answered 503 or cut off meanwhile; 2 long-poll and 2 SSE readers parked at the other "
        f"relay got every byte once ({sum(f.interruptions for f in followers)} reconnects)"
    )


async def test_after_failing_over_to_a_standby_that_was_behind_writes_are_refused_loudly(
    tmp_path: Path,
) -> None:
    """An asynchronous standby taken away falls behind; appends acknowledged meanwhile are
    lost when the primary dies and the standby is promoted, and so is a stream created then.
    The relay notices (the database's tail is below what it acknowledged; a stream it wrote is
    missing and no delete left a tombstone) and refuses further writes there with 409
    stream_diverged, a log line and a metric, instead of handing out different bytes at offsets
    readers already have. Re-creating the missing stream is refused too: it would start again
    at offset 0. A stream deleted before the failover is still just gone (404)."""
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
                deleted = f"{relay.url}/v1/stream/deleted"
                async with http.put(deleted, headers=text, data=b"gone;") as r:
                    assert r.status == 201
                async with http.delete(deleted) as r:
                    assert r.status == 204
                await pair.caught_up()  # the standby has it
                await asyncio.to_thread(pair.stop_standby)
                async with http.post(stream, data=b"lost-in-failover;", headers=text) as r:
                    assert r.status == 204  # acknowledged by the primary alone
                never_seen = f"{relay.url}/v1/stream/never-seen"
                async with http.put(never_seen, headers=text, data=b"created;") as r:
                    assert r.status == 201  # so is this stream, which the standby never sees
                async with http.post(never_seen, data=b"appended;", headers=text) as r:
                    assert r.status == 204
                pair.kill_primary()
                await asyncio.to_thread(pair.start_standby)
                await asyncio.to_thread(pair.promote)

                async def answered() -> tuple[int, str] | None:
                    """An answer from the new primary: not a 503, nor a cut connection."""
                    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                        async with http.post(stream, data=b"after;", headers=text) as r:
                            if r.status != 503:
                                return r.status, await r.text()
                    return None

                what = "the relay reaching the new primary"
                status, body = await eventually(answered, timeout=60, interval=0.1, what=what)
                assert status == 409 and "stream_diverged" in body
                async with http.post(never_seen, data=b"after;", headers=text) as r:
                    assert r.status == 409 and "stream_diverged" in await r.text()
                async with http.put(never_seen, headers=text) as r:
                    assert r.status == 409  # never re-created at offsets already acknowledged
                async with http.head(never_seen) as r:
                    assert r.status == 404  # the database has no such stream to read
                async with http.post(deleted, data=b"x", headers=text) as r:
                    assert r.status == 404  # deleted before: a tombstone, not a loss
                async with http.get(f"{relay.url}/metrics") as r:
                    assert "relay_store_diverged_streams_total 2.0" in await r.text()
        finally:
            relay.stop()
        text_log = log.read_text()
        assert "database is behind what this relay acknowledged" in text_log
        assert "a stream this relay acknowledged is missing from the database" in text_log
    finally:
        pair.close()


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    shutil.which("npx") is None or not (ROOT / "conformance/official/node_modules").is_dir(),
    reason="needs node and `npm ci` in conformance/official (scripts/test does both)",
)
def test_the_official_suite_passes_against_a_relay_naming_both_hosts(pair: ReplicatedPair) -> None:
    """The whole protocol with the URL an operator gives for failover: both hosts,
    ``target_session_attrs=read-write``, every commit acknowledged by the synchronous standby."""
    url = pair.start()
    done = subprocess.run(
        [str(ROOT / "scripts/official-suite"), "--database-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    plain = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)  # vitest colours even without a tty
    summary = [line for line in plain.splitlines() if line.strip().startswith("Tests")]
    assert done.returncode == 0, (summary, plain[-3000:], done.stderr[-3000:])
    assert summary and "failed" not in summary[-1], summary
    print(f"\nofficial suite, database URL naming primary and standby: {summary[-1].strip()}")
