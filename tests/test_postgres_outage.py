"""Stop Postgres under a running relay: writes answer 503 with Retry-After in bounded time, never
500 or a hang, and the relay recovers by itself when the database returns. Producers retrying
with their producer headers end with every append exactly once.

Uses a private cluster (initdb + pg_ctl), because stopping the shared server is not ours to do.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.pg import ThrowawayCluster, _bin_dir
from tests.relay_process import RelayProcess
from tests.waits import eventually, wait_for

TEXT = {"Content-Type": "text/plain"}

pytestmark = pytest.mark.skipif(
    _bin_dir() is None, reason="needs Postgres server binaries (initdb, pg_ctl)"
)


@pytest.fixture
def cluster() -> Iterator[tuple[ThrowawayCluster, str]]:
    private = ThrowawayCluster()
    try:
        yield private, private.start()
    finally:
        private.stop()


async def test_stopping_postgres_mid_load_gives_503_then_recovers_without_restart(
    cluster: tuple[ThrowawayCluster, str], tmp_path: Path
) -> None:
    pg, url = cluster
    log = tmp_path / "relay.log"
    relay = RelayProcess(
        tmp_path, "--database-url", url, "--db-timeout", "2", "--log-level", "info", log=log
    )
    relay.start()
    stream = f"{relay.url}/v1/stream/outage"
    acked: list[bytes] = []
    statuses: list[int] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            assert (await http.put(stream, headers=TEXT)).status == 201

            async def producer(name: str, stop: asyncio.Event) -> None:
                # A 503 may hide an append that committed as the database went away, so the
                # producer retries with the same producer headers, as the official clients do.
                i = 0
                while not stop.is_set():
                    body = f"{name}{i};".encode()
                    headers = {
                        **TEXT,
                        "Producer-Id": name,
                        "Producer-Epoch": "0",
                        "Producer-Seq": str(i),
                    }
                    async with http.post(stream, data=body, headers=headers) as response:
                        statuses.append(response.status)
                        if response.status in (200, 204):
                            acked.append(body)
                            i += 1
                        else:
                            assert response.status == 503, await response.text()
                            assert response.headers["Retry-After"].isdigit()
                            await asyncio.sleep(0.05)  # a sleep: a producer's pause to retry

            stop = asyncio.Event()
            load = [asyncio.create_task(producer(f"p{n}-", stop)) for n in range(4)]
            await wait_for(lambda: len(acked) >= 20, what="the load running")
            await asyncio.to_thread(pg.halt)
            started = time.monotonic()
            async with http.post(stream, data=b"during", headers=TEXT) as response:
                assert response.status == 503
                assert response.headers["Retry-After"].isdigit()
            assert time.monotonic() - started < 10  # bounded: db timeout, not a hang
            await asyncio.sleep(1)  # a sleep: the outage lasts a while, the load meeting it
            await asyncio.to_thread(pg.resume)

            async def recovered() -> bool:
                async with http.get(stream, params={"offset": "-1"}) as response:
                    return response.status == 200

            await eventually(recovered, timeout=30, interval=0.2, what="reads answered again")
            count = len(acked)
            await wait_for(lambda: len(acked) > count, what="producers acknowledged again")
            relisten = "listen connection re-established"
            await wait_for(lambda: relisten in log.read_text(), what="LISTEN back (its log line)")
            stop.set()
            await asyncio.gather(*load)
            assert len(acked) > count  # producers are being acknowledged again
            async with http.get(stream, params={"offset": "-1"}) as response:
                stored = await response.read()
    finally:
        relay.stop()
    assert 503 in statuses
    assert 500 not in statuses
    # The outage is logged as it begins and as it ends (not per request), and LISTEN came back.
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    outage = [
        (line["level"], line["event"])
        for line in lines
        if line["event"].startswith("postgres connection")
    ]
    assert outage[0] == ("warning", "postgres connection lost")
    assert outage[-1] == ("info", "postgres connection restored")
    assert len(outage) < statuses.count(503)
    assert ("info", "listen connection re-established") in [
        (line["level"], line["event"]) for line in lines
    ]
    for body in acked:  # every acknowledged append survived the outage exactly once
        assert stored.count(body) == 1
    for n in range(4):  # and each producer's appends are all there, in order, nothing else
        name = f"p{n}-"
        mine = [piece for piece in stored.decode().split(";") if piece.startswith(name)]
        assert mine == [f"{name}{i}" for i in range(len(mine))]
        assert len(mine) == sum(body.startswith(name.encode()) for body in acked)
