"""``relay serve --workers 2`` on one Postgres database: real processes sharing one port.

Which worker served a request is told by ``/health`` on the same keep-alive connection (each
client session here holds one connection), so tests open connections until both workers have
served instead of trusting the kernel's spread. Parked readers are awaited through the summed
``relay_live_readers`` gauge, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import WORKERS_NEED_POSTGRES
from relay.metrics import Metrics, sum_expositions
from relay.store.base import StoreStats
from tests.pg import blocked_on_locks
from tests.relay_process import RelayProcess, listening, parked_at
from tests.waits import eventually, wait_for

TEXT = {"Content-Type": "text/plain"}
WORKERS = 2
MAX_CONNECTIONS = 200  # all on one worker would be a 2**-199 chance with an even spread
EXIT_BOUND = 5.0  # seconds; a hung stop takes 10 s or more


@pytest.fixture
def relay(pg_url: str, tmp_path: Path) -> Iterator[RelayProcess]:
    process = RelayProcess(
        tmp_path / "unused",
        "--database-url",
        pg_url,
        "--workers",
        str(WORKERS),
        "--long-poll-timeout",
        "20",
    )
    process.start()
    # /health answers once any worker serves; the summed /metrics once all of them do.
    asyncio.run(samples(process))
    try:
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def connection(relay: RelayProcess) -> AsyncIterator[tuple[aiohttp.ClientSession, int]]:
    """A session holding one keep-alive connection, and the worker at its other end."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        async with http.get(f"{relay.url}/health") as response:
            worker: int = (await response.json())["worker"]
        yield http, worker


async def samples(relay: RelayProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The public ``/metrics``, waiting out the 503 it answers while a worker is starting."""
    async with aiohttp.ClientSession() as http:

        async def exposition() -> str | None:
            async with http.get(f"{relay.url}/metrics") as response:
                return await response.text() if response.status == 200 else None

        text = await eventually(exposition, what="/metrics answered by every worker")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow, or none in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_workers_without_postgres_refuse_to_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--workers", "2", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"relay: {WORKERS_NEED_POSTGRES}"
    assert "--workers > 1 needs --database-url" in WORKERS_NEED_POSTGRES


class _Stats:
    """A store as the metrics collector sees it: only ``stats()``."""

    def __init__(self, stats: StoreStats) -> None:
        self._stats = stats

    def stats(self) -> StoreStats:
        return self._stats


def test_summed_exposition_adds_counters_gauges_and_histograms() -> None:
    one, two = Metrics(), Metrics()
    one.observe_request("POST", "stream", 204, "write", 0.003)
    two.observe_request("POST", "stream", 204, "write", 0.3)
    two.observe_request("GET", "stream", 200, "read", 0.003)
    two.observe_request("GET", "stream", 200, "long-poll", 20.0)
    one.long_poll_readers.set(2)
    two.long_poll_readers.set(3)
    two.sse_readers.set(4)
    for metrics, sizes, in_use in ((one, [1, 3], 2), (two, [8], 5)):
        stats = StoreStats(commits=len(sizes), pool_in_use=in_use, pool_size=8)
        for size in sizes:
            stats.batch_ops.observe(size)
            stats.commit_seconds.observe(0.002)
        metrics.watch_store(_Stats(stats))  # type: ignore[arg-type]  # only stats() is read
    text = sum_expositions([one.render().decode(), two.render().decode()]).decode()
    got = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    post = frozenset({("method", "POST"), ("route", "stream"), ("status", "204")})
    get = frozenset({("method", "GET"), ("route", "stream"), ("status", "200")})
    assert got[("relay_http_requests_total", post)] == 2
    assert got[("relay_http_requests_total", get)] == 2
    assert got[("relay_live_readers", frozenset({("mode", "long-poll")}))] == 5
    assert got[("relay_live_readers", frozenset({("mode", "sse")}))] == 4
    write = frozenset({("kind", "write")})
    assert got[("relay_http_request_duration_seconds_bucket", write | {("le", "0.005")})] == 1
    assert got[("relay_http_request_duration_seconds_count", write)] == 2
    assert got[("relay_http_request_duration_seconds_sum", write)] == 0.303
    # A 20 s long-poll is timed apart, never as a slow request.
    assert got[("relay_http_request_duration_seconds_count", frozenset({("kind", "read")}))] == 1
    polls = frozenset({("mode", "long-poll")})
    assert got[("relay_http_live_read_duration_seconds_count", polls)] == 1
    assert got[("relay_http_live_read_duration_seconds_bucket", polls | {("le", "10.0")})] == 0
    assert got[("relay_http_live_read_duration_seconds_bucket", polls | {("le", "30.0")})] == 1
    # The stores' histograms and gauges, read at scrape time, add up too.
    assert got[("relay_store_batch_operations_count", frozenset())] == 3
    assert got[("relay_store_batch_operations_sum", frozenset())] == 12
    assert got[("relay_store_batch_operations_bucket", frozenset({("le", "2.0")}))] == 1
    assert got[("relay_store_batch_operations_bucket", frozenset({("le", "4.0")}))] == 2
    assert got[("relay_store_batch_operations_bucket", frozenset({("le", "+Inf")}))] == 3
    assert got[("relay_store_commit_duration_seconds_count", frozenset())] == 3
    assert got[("relay_store_pool_connections_in_use", frozenset())] == 7
    assert got[("relay_store_pool_connections", frozenset())] == 16
    assert got[("relay_store_commits_total", frozenset())] == 3
    created = ("relay_http_requests_created", post)
    firsts = [
        s.value
        for m in (one, two)
        for f in text_string_to_metric_families(m.render().decode())
        for s in f.samples
        if (s.name, frozenset(s.labels.items())) == created
    ]
    assert got[created] == min(firsts)  # a timestamp: the earliest, not a sum
    started = [
        s.value
        for f in text_string_to_metric_families(one.render().decode())
        for s in f.samples
        if s.name == "process_start_time_seconds"
    ]
    assert got[("process_start_time_seconds", frozenset())] == started[0]  # not doubled
    alone = one.render()  # once: process CPU time moves between renders
    assert sum_expositions([alone.decode()]) == alone


async def test_appends_spread_over_both_workers_and_metrics_add_up(relay: RelayProcess) -> None:
    stream = f"{relay.url}/v1/stream/spread"
    async with aiohttp.ClientSession() as http, http.put(stream, headers=TEXT) as created:
        assert created.status == 201
    served = [0] * WORKERS
    sent = b""
    for i in range(MAX_CONNECTIONS):
        async with connection(relay) as (http, worker):
            body = f"{i:04d};".encode()
            async with http.post(stream, data=body, headers=TEXT) as response:
                assert response.status == 204
            sent += body
            served[worker] += 1
        if i >= 20 and all(served):
            break
    assert all(served), served

    got = await samples(relay)
    assert got[("relay_store_appends_total", frozenset())] == sum(served)
    assert got[("relay_appended_bytes_total", frozenset())] == len(sent)
    posts = frozenset({("method", "POST"), ("route", "stream"), ("status", "204")})
    assert got[("relay_http_requests_total", posts)] == sum(served)
    async with aiohttp.ClientSession() as http:
        async with http.get(stream, params={"offset": "-1"}) as r:
            assert await r.read() == sent
        async with http.get(f"{relay.url}/metrics/local") as r:
            assert r.status == 404  # private: only on each worker's loopback port


async def test_a_long_poll_on_one_worker_wakes_on_an_append_through_the_other(
    relay: RelayProcess,
) -> None:
    stream = f"{relay.url}/v1/stream/cross"
    async with aiohttp.ClientSession() as http, http.put(stream, headers=TEXT) as created:
        tail = created.headers["Stream-Next-Offset"]
    async with connection(relay) as (reader, reader_worker):
        for _ in range(MAX_CONNECTIONS):
            async with connection(relay) as (writer, writer_worker):
                if writer_worker == reader_worker:
                    continue
                waiting = asyncio.create_task(
                    reader.get(stream, params={"offset": tail, "live": "long-poll"})
                )
                await parked_at(
                    relay.url, 1
                )  # else the POST may land first: a catch-up, not a wake
                async with writer.post(stream, data=b"across", headers=TEXT) as response:
                    assert response.status == 204
                async with await asyncio.wait_for(waiting, 15) as woken:
                    assert woken.status == 200
                    assert await woken.read() == b"across"
                for http, worker in ((reader, reader_worker), (writer, writer_worker)):
                    async with http.get(f"{relay.url}/health") as still:  # same connections
                        assert (await still.json())["worker"] == worker
                return
    pytest.fail("every connection reached the same worker")


async def test_sigterm_stops_every_worker_gracefully_and_the_parent_exits_0(
    relay: RelayProcess,
) -> None:
    assert relay.proc is not None
    await samples(relay)  # every worker is up
    workers = relay.children()
    assert len(workers) == WORKERS
    stream = f"{relay.url}/v1/stream/stop"
    async with aiohttp.ClientSession() as http:
        async with http.put(stream, headers=TEXT) as created:
            tail = created.headers["Stream-Next-Offset"]
        polling = asyncio.create_task(
            http.get(stream, params={"offset": tail, "live": "long-poll"})
        )
        await parked_at(relay.url, 1)
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        async with await polling as response:
            assert response.status == 204  # answered as a timeout would, not cut off
        code = await asyncio.to_thread(relay.proc.wait, EXIT_BOUND * 3)
    assert code == 0
    assert time.monotonic() - started < EXIT_BOUND
    assert not [pid for pid in workers if running(pid)]


async def test_a_dead_worker_stops_the_others_and_the_parent_exits_1(
    relay: RelayProcess,
) -> None:
    assert relay.proc is not None
    await samples(relay)
    first, *rest = relay.children()
    os.kill(first, signal.SIGKILL)
    code = await asyncio.to_thread(relay.proc.wait, EXIT_BOUND * 3)
    assert code == 1
    assert not [pid for pid in rest if running(pid)]


async def test_workers_stop_when_the_parent_is_killed(relay: RelayProcess) -> None:
    """kill -9 of the parent closes the workers' stdin pipes; they stop on their own."""
    await samples(relay)
    workers = relay.children()
    relay.kill()
    await wait_for(lambda: not any(running(pid) for pid in workers), timeout=EXIT_BOUND)


async def test_a_worker_whose_parent_is_gone_exits_on_a_second_signal(
    relay: RelayProcess, pg_url: str
) -> None:
    """A worker leaves repeated stop signals to its parent, which kills workers whose stop
    hangs. With the parent gone nobody would: there a second SIGTERM exits at once.

    Each worker's stop is made to hang on an append waiting for a table lock."""
    async with aiohttp.ClientSession() as http, http.put(f"{relay.url}/v1/stream/w", headers=TEXT):
        pass
    workers = relay.children()
    lock = await asyncpg.connect(pg_url)
    transaction = lock.transaction()
    await transaction.start()
    await lock.execute("LOCK TABLE relay_streams IN ACCESS EXCLUSIVE MODE")
    stuck: list[asyncio.Task[None]] = []
    sessions = contextlib.AsyncExitStack()
    try:
        seen: set[int] = set()
        for _ in range(MAX_CONNECTIONS):
            http, worker = await sessions.enter_async_context(connection(relay))
            if worker in seen:
                continue
            seen.add(worker)
            stuck.append(asyncio.create_task(_post(http, f"{relay.url}/v1/stream/w")))
            if len(seen) == WORKERS:
                break
        assert len(seen) == WORKERS
        await blocked_on_locks(pg_url, WORKERS)  # each worker's append waits on the lock
        relay.kill()  # the workers see their pipe close and begin stopping
        await wait_for(lambda: not listening(relay.port), timeout=EXIT_BOUND, interval=0.02)
        assert all(running(pid) for pid in workers), "the stop did not wait for the appends"
        # A sleep: only time apart on the real clock makes it a second stop, not the first
        # delivered twice.
        await asyncio.sleep(0.3)
        started = time.monotonic()
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        await wait_for(
            lambda: not any(running(pid) for pid in workers), timeout=EXIT_BOUND, interval=0.02
        )
        assert time.monotonic() - started < 2.0
    finally:
        for task in stuck:
            task.cancel()
        await sessions.aclose()
        await transaction.rollback()
        await lock.close()


async def _post(http: aiohttp.ClientSession, url: str) -> None:
    with contextlib.suppress(aiohttp.ClientError):
        async with http.post(url, data=b"x", headers=TEXT):
            pass
