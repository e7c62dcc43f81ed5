"""Kill -9 a relay under concurrent load; every acknowledged append must survive the restart.

Producers append numbered records with idempotent-producer headers and remember each
acknowledgement's offset. The relay is SIGKILLed mid-load and restarted on the same data. Then:
every acknowledged record reads back exactly at its offset, the stream holds whole records only,
and retrying the unacknowledged (possibly applied) request with the same producer headers
appends it at most once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from protocol.state import fold
from tests.relay_process import RelayProcess, read_all
from tests.waits import wait_for

PRODUCERS = 8
RECORD = 32


SNAPSHOT_START = {"control": "snapshot-start"}


def record(producer: int, seq: int) -> bytes:
    text = f"p{producer:02d}-s{seq:06d}|"
    return text.ljust(RECORD, ".").encode()


@pytest.fixture
def relay_args(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ...]]:
    if request.param == "sqlite":
        yield ()
    else:
        url = request.getfixturevalue("pg_url")
        yield ("--database-url", url)


def _backends() -> list[str]:
    try:
        import relay.store.postgres  # noqa: F401
        import tests.pg  # noqa: F401
    except ImportError:
        return ["sqlite"]
    return ["sqlite", "postgres"]


@pytest.mark.parametrize("relay_args", _backends(), indirect=True)
async def test_kill_9_loses_no_acknowledged_append(
    tmp_path: Path, relay_args: tuple[str, ...]
) -> None:
    relay = RelayProcess(tmp_path / "data", *relay_args)
    relay.start()
    stream = f"{relay.url}/v1/stream/crash"
    acked: dict[tuple[int, int], int] = {}  # (producer, seq) -> end offset position
    next_seq = [0] * PRODUCERS
    try:
        async with aiohttp.ClientSession() as session:
            async with session.put(stream, headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 201

            async def produce(p: int) -> None:
                while True:
                    seq = next_seq[p]
                    try:
                        async with session.post(
                            stream, data=record(p, seq), headers=_hdrs(p, seq)
                        ) as r:
                            if r.status != 200:
                                return
                            acked[(p, seq)] = _position(r.headers["Stream-Next-Offset"])
                    except (TimeoutError, aiohttp.ClientError):
                        return
                    next_seq[p] = seq + 1

            tasks = [asyncio.create_task(produce(p)) for p in range(PRODUCERS)]
            await wait_for(lambda: len(acked) >= 300, timeout=60, what="300 appends acked")
            relay.kill()
            await asyncio.gather(*tasks)

        relay.start()
        async with aiohttp.ClientSession() as session:
            data = await read_all(session, stream)
            assert len(data) % RECORD == 0, "a partial append is visible"
            for (p, seq), end in acked.items():
                assert data[end - RECORD : end] == record(p, seq)
            records = [data[i : i + RECORD] for i in range(0, len(data), RECORD)]
            assert len(set(records)) == len(records), "a record was stored twice"
            # Retry each producer's in-flight request: applied at most once, then continue.
            for p in range(PRODUCERS):
                seq = next_seq[p]
                for _ in range(2):
                    async with session.post(
                        stream, data=record(p, seq), headers=_hdrs(p, seq)
                    ) as r:
                        assert r.status in (200, 204)
            data = await read_all(session, stream)
            for p in range(PRODUCERS):
                assert data.count(record(p, next_seq[p])) == 1
    finally:
        relay.stop()


def _hdrs(producer: int, seq: int) -> dict[str, str]:
    return {
        "Content-Type": "text/plain",
        "Producer-Id": f"producer-{producer}",
        "Producer-Epoch": "0",
        "Producer-Seq": str(seq),
    }


def _position(offset: str) -> int:
    """White-box: Relay's offsets end in the byte position (see protocol/offsets.py)."""
    return int(offset.rsplit("_", 1)[1])


IN_FLIGHT = 4


@pytest.mark.parametrize("relay_args", _backends(), indirect=True)
async def test_after_kill_9_every_retry_is_acknowledged_with_its_own_offset(
    tmp_path: Path, relay_args: tuple[str, ...]
) -> None:
    """Each producer keeps IN_FLIGHT appends in flight; the relay is killed; each producer
    then retries its batch in flight until answered. Whether the answer is the first (200)
    or a duplicate's (204), its Stream-Next-Offset is where that very record ends in the
    stream: an offset a client can name later (a revision, a fork) as "after my append"."""
    relay = RelayProcess(tmp_path / "data", *relay_args)
    relay.start()
    stream = f"{relay.url}/v1/stream/pipelined"
    answered: dict[tuple[int, int], int] = {}
    sent = [0] * PRODUCERS

    async def send(session: aiohttp.ClientSession, p: int, seq: int) -> bool:
        """POST until answered; True once acknowledged, False if the relay went away."""
        for _ in range(200):
            try:
                async with session.post(stream, data=record(p, seq), headers=_hdrs(p, seq)) as r:
                    if r.status in (200, 204):
                        answered[(p, seq)] = _position(r.headers["Stream-Next-Offset"])
                        return True
                    assert r.status == 409, await r.text()  # an earlier seq not in yet
            except (TimeoutError, aiohttp.ClientError):
                return False
            await asyncio.sleep(0.005)  # a sleep: a producer's pause before it retries
        raise AssertionError(f"producer {p} seq {seq} never went in")

    async def produce(session: aiohttp.ClientSession, p: int) -> None:
        while len(answered) < 400:
            batch = range(sent[p], sent[p] + IN_FLIGHT)
            sent[p] += IN_FLIGHT
            if not all(await asyncio.gather(*(send(session, p, seq) for seq in batch))):
                return

    try:
        async with aiohttp.ClientSession() as session:
            async with session.put(stream, headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 201
            tasks = [asyncio.create_task(produce(session, p)) for p in range(PRODUCERS)]
            await wait_for(lambda: len(answered) >= 200, timeout=60, what="200 appends answered")
            relay.kill()
            await asyncio.gather(*tasks)
        relay.start()
        answered_before = dict(answered)
        async with aiohttp.ClientSession() as session:
            for p in range(PRODUCERS):  # the batch in flight at the kill, answered or not
                for seq in range(max(0, sent[p] - IN_FLIGHT), sent[p]):
                    assert await send(session, p, seq)
            data = await read_all(session, stream)
    finally:
        relay.stop()
    records = [data[i : i + RECORD] for i in range(0, len(data), RECORD)]
    assert len(set(records)) == len(records) == sum(sent), "a record lost or stored twice"
    for (p, seq), end in answered.items():
        assert data[end - RECORD : end] == record(p, seq), f"ack of p{p} s{seq} is not its own"
        if (p, seq) in answered_before:
            assert answered_before[(p, seq)] == end  # the retry got the first answer's offset


@pytest.mark.parametrize("relay_args", _backends(), indirect=True)
async def test_kill_9_during_a_compaction_leaves_it_done_or_not_at_all(
    tmp_path: Path, relay_args: tuple[str, ...]
) -> None:
    """A compaction is one transaction: after a kill -9 at any moment of it, a reader from -1
    gets either the whole history or exactly one snapshot, and the same live rows either way."""
    relay = RelayProcess(tmp_path / "data", *relay_args)
    stream = f"{relay.url}/v1/stream/state"
    json_type = {"Content-Type": "application/json"}
    expected: dict[tuple[str, str], object] = {}

    async def write_history(http: aiohttp.ClientSession, first: int) -> None:
        for n in range(first, first + 300):
            key = str(n % 30)
            op = "insert" if (("row", key) not in expected) else "update"
            change = {"type": "row", "key": key, "value": {"n": n}, "headers": {"operation": op}}
            async with http.post(stream, json=change) as r:
                assert r.status == 204
            expected[("row", key)] = {"n": n}

    relay.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.put(stream, headers=json_type) as r:
                assert r.status == 201
            for round_, delay in enumerate((0.0, 0.002, 0.01, 0.05)):
                await write_history(http, round_ * 300)
                compaction = asyncio.create_task(
                    http.put(stream, headers={"Stream-Compact": "state"})
                )
                await asyncio.sleep(delay)  # kill at another moment of the compaction each round
                await asyncio.to_thread(relay.kill)
                await asyncio.gather(compaction, return_exceptions=True)
                await asyncio.to_thread(relay.start)
                messages = json.loads(await read_all(http, stream) or b"[]")
                assert fold(messages) == expected
                snapshots = [m for m in messages if m.get("headers") == SNAPSHOT_START]
                print(f"round {round_}: {'compacted' if snapshots else 'not compacted'}")
                if snapshots:  # it committed: the history is gone, one snapshot is left
                    assert messages[0]["headers"] == SNAPSHOT_START
                    assert len(snapshots) == 1 and len(messages) == len(expected) + 2
    finally:
        relay.stop()
