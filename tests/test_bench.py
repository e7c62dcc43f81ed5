"""``relay bench`` end to end at toy sizes: it must start a relay, run every scenario, read
back every byte it wrote and print a row per run. Speed is not asserted; a 2-core CI box
says nothing about it."""

from __future__ import annotations

import asyncio

import asyncpg

from relay.bench import report, run_results
from relay.cli import build_parser
from relay.store.postgres import migrate
from tests.pg import ThrowawayCluster, _execute, _with_database

TINY = [
    "bench",
    "--targets", "relay",
    "--no-pin",
    "--connections", "2",
    "--count", "20",
    "--sessions", "1,2",
    "--rate", "40",
    "--token-seconds", "0.25",
    "--live", "long-poll,sse",
    "--readers", "5",
    "--messages", "4",
    "--message-rate", "40",
    "--catchup-mib", "2",
    "--streams", "3",
    "--parked", "7",
]  # fmt: skip


def test_tiny_bench_reads_back_everything_and_prints_every_row() -> None:
    args = build_parser().parse_args(TINY)
    results = run_results(args)

    runs = [(r.scenario, r.variant) for r in results]
    assert runs == [
        ("append", "2 conns, 100 B"),
        ("tokens", "1 sessions, long-poll"),
        ("tokens", "2 sessions, long-poll"),
        ("tokens", "1 sessions, sse"),
        ("tokens", "2 sessions, sse"),
        ("fanout", "5 readers, 4 msgs"),
        ("catchup", "2 MiB"),
        ("memory", "3 streams, 7 readers"),
        ("ledger", "healthz"),
        ("ledger", "head"),
        ("ledger", "read"),
        ("ledger", "append"),
    ]
    assert all(r.lost == 0 for r in results)
    counts = {(r.scenario, r.variant): r.operations for r in results}
    assert counts[("append", "2 conns, 100 B")] == 40
    assert counts[("tokens", "2 sessions, sse")] == 2 * 10
    assert counts[("fanout", "5 readers, 4 msgs")] == 5 * 4
    assert counts[("catchup", "2 MiB")] == 2
    assert counts[("memory", "3 streams, 7 readers")] == 7
    assert all(counts[("ledger", depth)] == 2 * 20 for depth in ("healthz", "head", "read"))
    assert counts[("ledger", "append")] == 2 * 20
    memory = runs.index(("memory", "3 streams, 7 readers"))
    assert results[memory].note.startswith("RSS ")
    assert all(r.usage.server_cpu is not None for r in results)
    assert all(r.usage.commits is not None and r.usage.commits > 0 for r in results[: memory - 1])
    ledger = {r.variant: r.usage.commits for r in results if r.scenario == "ledger"}
    assert ledger["head"] == ledger["read"] == 0 and ledger["append"]  # reads commit nothing

    table = report(results, args)
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| relay")]
    assert [(target.strip(), variant.strip()) for target, variant in rows] == [
        ("relay (sqlite)", variant) for _, variant in runs
    ]
    for scenario in ("append", "tokens", "fanout", "catchup", "memory", "ledger"):
        assert f"\n{scenario}: ratios compare" in table


async def test_a_pinned_server_gets_its_own_core() -> None:
    """The server must not share the generator's core: pinning is decided before the
    generator pins itself (asked afterwards, the process sees one core and pins nothing)."""
    import os

    from relay.bench.targets import (
        GENERATOR_CPU,
        SERVER_CPU,
        TargetSpec,
        can_pin,
        pin_generator,
        start_target,
    )

    pin = can_pin()
    unpin = pin_generator() if pin else None
    try:
        async with start_target(TargetSpec("bare", "", "", pin)) as target:
            assert target.pid is not None
            server_cores = os.sched_getaffinity(target.pid)
    finally:
        if unpin is not None:
            unpin()
    if pin:  # CI has two cores
        assert server_cores == {SERVER_CPU}
        assert GENERATOR_CPU not in server_cores
    else:
        assert SERVER_CPU in server_cores or len(server_cores) == 1


def test_capacity_runs_relays_side_by_side_on_one_database(pg_url: str) -> None:
    """Every relay count gets its run, every token is read back from the relay it went to,
    and the database's side (CPU of the local server, WAL, connections) is measured."""
    argv = ["bench", "--targets", "relay", "--no-pin", "--scenarios", "capacity"]
    argv += ["--relays", "1,3", "--connections", "3", "--count", "15", "--database-url", pg_url]
    args = build_parser().parse_args(argv)
    results = run_results(args)

    assert [(r.scenario, r.variant) for r in results] == [
        ("capacity", "1 relays, 3 conns"),
        ("capacity", "3 relays, 3 conns"),
    ]
    for result in results:
        assert result.lost == 0
        assert result.operations == 3 * 15
        assert result.usage.appends == 3 * 15  # summed over every relay's /metrics
        assert result.usage.wal is not None and result.usage.wal > 0
        assert result.note.endswith("db connections per relay")
    one, three = results
    assert one.usage.server_cpu is not None and three.usage.server_cpu is not None
    table = report(results, args)
    assert "\ncapacity: tokens per second per fully busy core" in table
    assert "  3 relays, 3 conns: a relay core " in table


def test_capacity_needs_postgres() -> None:
    args = build_parser().parse_args(
        ["bench", "--no-pin", "--scenarios", "capacity", "--relays", "2", "--count", "1"]
    )
    results = run_results(args)
    assert results == []
    assert "capacity: not run, it needs --database-url" in report(results, args)


def test_growth_scenarios_at_toy_sizes() -> None:
    """streams: a row per step and kind, a second relay started on the data; long: every byte
    read back, rows counted."""
    growth = ["--scenarios", "streams,long", "--stream-counts", "20,50", "--idle-seconds", "0.2"]
    long = ["--long-appends", "300", "--long-append-bytes", "1000"]
    args = build_parser().parse_args(["bench", "--no-pin", *growth, *long])
    results = run_results(args)
    steps = [
        (f"{size} streams: {kind}", count)
        for size, created in ((20, 20), (50, 30))
        for kind, count in (
            ("create", created),
            ("cold HEAD", size),
            ("cold catch-up", size),
            ("reaper pass", 20),
            ("start-up", 1),
        )
    ]
    assert [(r.scenario, r.variant, r.operations) for r in results] == [
        *(("streams", variant, count) for variant, count in steps),
        ("long", "300 appends of 1,000 B: write", 300),
        ("long", "300 appends of 1,000 B: read at start", 100),
        ("long", "300 appends of 1,000 B: read at middle", 100),
        ("long", "300 appends of 1,000 B: read at end", 100),
        ("long", "300 appends of 1,000 B: whole catch-up", 1),
    ]
    assert all(r.lost == 0 for r in results)
    created = results[0]
    assert "RSS " in created.note and "B/stream" in created.note and "idle CPU" in created.note
    assert results[4].note.startswith("RSS ") and results[4].latencies[0] > 0
    assert results[10].note.endswith("rows kept")
    assert results[-1].mib * 1024 * 1024 == 300_000


def test_the_compression_scenario_reads_every_coding_back_whole() -> None:
    """Each coding decodes to the plain read's messages, and the compressed ones take fewer
    bytes on the wire (a JSON chat compresses several times over)."""
    args = build_parser().parse_args(
        [
            "bench",
            "--targets",
            "relay",
            "--no-pin",
            "--scenarios",
            "compression",
            "--catchup-mib",
            "1",
        ]
    )
    results = run_results(args)
    assert [r.variant for r in results] == [
        f"{size}, {coding}"
        for size in ("600 msgs", "1 MiB")
        for coding in ("identity", "gzip", "zstd")
    ]
    assert all(r.lost == 0 for r in results)
    for plain, *packed in (results[:3], results[3:]):
        sent = int(plain.note.split(" B")[0].replace(",", ""))
        for row in packed:
            assert int(row.note.split(" B")[0].replace(",", "")) * 4 < sent
    assert "\ncompression: ratios compare" in report(results, args)


def test_the_tables_scenario_at_toy_size_and_what_it_leaves_behind() -> None:
    """On a wal_level=logical cluster: a row per measure, every change followed, and no table,
    slot or publication left in the database afterwards."""
    cluster = ThrowawayCluster({"wal_level": "logical"})
    admin = cluster.start()
    try:
        asyncio.run(_execute(admin, "CREATE DATABASE bench"))
        url = _with_database(admin, "bench")
        asyncio.run(migrate(url))
        args = build_parser().parse_args(
            ["bench", "--no-pin", "--scenarios", "tables", "--database-url", url, "--count", "40"]
        )
        results = run_results(args)
        assert [(r.variant, r.operations) for r in results] == [
            ("burst over 1 chat(s)", 40),
            ("burst over 50 chat(s)", 40),
            ("commit to a long-poll reader", 40),
            ("late reader of a 20-row chat", 1),
        ]
        assert results[3].note.startswith("late reader: ")
        left = asyncio.run(_leftovers(url))
        assert left == (0, 0, 0)
    finally:
        cluster.stop()


async def _leftovers(url: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_%'"
        )
        slots = await conn.fetchval("SELECT count(*) FROM pg_replication_slots")
        publications = await conn.fetchval("SELECT count(*) FROM pg_publication")
    finally:
        await conn.close()
    return tables, slots, publications


def test_the_readers_scenario_at_toy_size() -> None:
    """A row per count, mode and layout, each on its own relay: every reader woken once with
    exactly its stream's bytes (long-poll ones parked again), and the memory figures read."""
    argv = ["bench", "--no-pin", "--scenarios", "readers", "--reader-counts", "4,30"]
    args = build_parser().parse_args([*argv, "--live", "long-poll,sse"])
    results = run_results(args)
    assert [(r.variant, r.operations) for r in results] == [
        (f"{count} readers, {live}, {layout}", count)
        for count in (4, 30)
        for live in ("long-poll", "sse")
        for layout in ("spread", "one")
    ]
    assert all(r.lost == 0 for r in results)
    assert all(len(r.latencies) == r.operations for r in results)
    for result in results:
        assert result.note.startswith(("4 stream(s); parked ", "30 stream(s); parked ", "1 stream"))
        assert {"idle_kib", "parked_kib", "above_idle_kib"} <= result.figures.keys()
        assert result.usage.server_cpu is not None
    assert [r.usage.appends for r in results] == [4, 1, 4, 1, 30, 1, 30, 1]
    table = report(results, args)
    assert "\nreaders: ratios compare" in table
    assert "  relay (sqlite), sse, one: 4: " in table and "slope" in table


def test_a_readers_size_the_machine_cannot_hold_says_why() -> None:
    """More readers than the kernel lets one process open files: a row that says so."""
    argv = ["bench", "--no-pin", "--scenarios", "readers", "--reader-counts", "2000000000"]
    args = build_parser().parse_args([*argv, "--layouts", "one"])
    [result] = run_results(args)
    assert result.operations == 0
    assert result.note.startswith("not run: ") and "nr_open" in result.note
    assert "first that did not run: 2,000,000,000 readers" in report([result], args)
