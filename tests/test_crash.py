"""Kill -9 a relay under concurrent load; every acknowledged append must survive the restart.

Producers append numbered records with idempotent-producer headers and remember each
acknowledgement's offset. The relay is SIGKILLed mid-load and restarted on the same data. Then:
every acknowledged record reads back exactly at its offset, the stream holds whole records only,
and retrying the unacknowledged (possibly applied) request with the same producer headers
appends it at most once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.relay_process import RelayProcess, read_all

PRODUCERS = 8
RECORD = 32


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
            while len(acked) < 300:
                await asyncio.sleep(0.01)
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
