"""What one scenario run cost, and the side-by-side tables.

Each run is bracketed by two snapshots: wall clock, the server's CPU time, the generator's CPU
time and (relay only) the store counters from /metrics. The differences say what the server
spent per operation and whether the generator, not the server, set the pace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from relay.bench.targets import Target, postgres_cpu_seconds

GENERATOR_LIMITED = 0.9
"""Share of its core the generator may use before a run says it measured the generator."""

_STORE_COUNTERS = (
    "relay_store_commits",
    "relay_store_rows_written",
    "relay_store_appends",
    "relay_store_statements",
    "relay_store_replica_reads",
    "relay_store_replica_fallbacks",
)


@dataclass(frozen=True)
class Snapshot:
    wall: float
    server_cpu: float | None
    generator_cpu: float
    counters: dict[str, float]
    wal: int | None  # Postgres WAL position, bytes
    db_cpu: float | None = None  # CPU seconds so far of the primary's server (on this machine)
    replica_cpu: float | None = None  # ... and of its read replicas' servers


@dataclass(frozen=True)
class Usage:
    wall: float
    server_cpu: float | None
    generator_cpu: float
    commits: float | None
    rows: float | None
    appends: float | None
    wal: int | None  # WAL bytes Postgres wrote meanwhile (any database of that server)
    statements: float | None = None  # the committer's (Postgres), BEGIN and COMMIT included
    db_cpu: float | None = None  # the primary's server processes (Postgres on this machine)
    replica_cpu: float | None = None  # the read replicas' server processes
    replica_reads: float | None = None
    replica_fallbacks: float | None = None

    @property
    def generator_share(self) -> float:
        return self.generator_cpu / self.wall if self.wall else 0.0


async def snapshot(client: aiohttp.ClientSession, target: Target) -> Snapshot:
    counters = await _store_counters(client, target) if target.has_metrics else {}
    wal, db_cpu = await database_position(target.database_url)
    replica_cpu: float | None = None
    for url in target.read_database_urls:
        spent = (await database_position(url, wal=False))[1]
        replica_cpu = None if spent is None else (replica_cpu or 0.0) + spent
    return Snapshot(
        time.perf_counter(),
        target.cpu_seconds(),
        time.process_time(),
        counters,
        wal,
        db_cpu,
        replica_cpu,
    )


async def database_position(url: str, *, wal: bool = True) -> tuple[int | None, float | None]:
    """How far Postgres's write-ahead log has come (the write amplification of tokens) and how
    much CPU its server has used: the postmaster and all its children, exited ones included
    (see ``postgres_cpu_seconds``), when it runs on this machine."""
    if not url:
        return None, None
    conn = await asyncpg.connect(url)
    try:
        pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        position = None
        if wal:
            position = int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
        return position, postgres_cpu_seconds(pid)  # while that backend exists
    finally:
        await conn.close()


async def replicas_caught_up(target: Target) -> None:
    """Wait until every read replica has replayed what the primary has written so far, so a
    catch-up read measures reading old data from a replica, not replication lag."""
    if not target.read_database_urls:
        return
    conn = await asyncpg.connect(target.database_url)
    try:
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    finally:
        await conn.close()
    for url in target.read_database_urls:
        replica = await asyncpg.connect(url)
        try:
            query = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn"
            while not await replica.fetchval(query, lsn):
                await asyncio.sleep(0.05)
        finally:
            await replica.close()


def usage(before: Snapshot, after: Snapshot) -> Usage:
    def delta(name: str) -> float | None:
        if name in before.counters and name in after.counters:
            return after.counters[name] - before.counters[name]
        return None

    def cpu(first: float | None, last: float | None) -> float | None:
        return None if first is None or last is None else last - first

    server = None
    if before.server_cpu is not None and after.server_cpu is not None:
        server = after.server_cpu - before.server_cpu
    return Usage(
        wall=after.wall - before.wall,
        server_cpu=server,
        generator_cpu=after.generator_cpu - before.generator_cpu,
        commits=delta("relay_store_commits"),
        rows=delta("relay_store_rows_written"),
        appends=delta("relay_store_appends"),
        wal=None if before.wal is None or after.wal is None else after.wal - before.wal,
        statements=delta("relay_store_statements"),
        db_cpu=cpu(before.db_cpu, after.db_cpu),
        replica_cpu=cpu(before.replica_cpu, after.replica_cpu),
        replica_reads=delta("relay_store_replica_reads"),
        replica_fallbacks=delta("relay_store_replica_fallbacks"),
    )


async def _store_counters(client: aiohttp.ClientSession, target: Target) -> dict[str, float]:
    async with client.get(f"{target.url}/metrics") as response:
        text = await response.text()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        name = name.removesuffix("_total")
        if name in _STORE_COUNTERS:
            counters[name] = float(value)
    return counters


@dataclass
class Result:
    """One row: a scenario run against one target with one setting (``variant``)."""

    scenario: str
    target: Target
    variant: str
    operations: int
    unit: str
    usage: Usage
    latencies: list[float] = field(default_factory=list)
    lost: int = 0
    """Operations a reader never got, got twice or got out of order (must be zero)."""
    mib: float = 0.0
    held: float | None = None
    """Share of the planned write rate the producers kept (they wait for each answer)."""
    note: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    """Measures a scenario's summary reads back (``readers``: KiB per connection)."""

    @property
    def rate(self) -> float:
        return self.operations / self.usage.wall if self.usage.wall else 0.0

    def p(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def generator_limited(self) -> bool:
        return self.usage.generator_share >= GENERATOR_LIMITED


@dataclass(frozen=True)
class Headline:
    """The number a scenario's ratio columns compare, and which way is better."""

    name: str
    higher_is_better: bool

    def of(self, result: Result) -> float | None:
        if self.name == "ops/s":
            return result.rate
        if self.name == "MiB/s":
            return result.mib / result.usage.wall if result.usage.wall else None
        if self.name == "CPU/req":
            cpu = result.usage.server_cpu
            return cpu / result.operations if cpu is not None and result.operations else None
        return result.p(0.99)


HEADLINES = {
    "append": Headline("ops/s", True),
    "tokens": Headline("p99", False),
    "fanout": Headline("p99", False),
    "catchup": Headline("MiB/s", True),
    "memory": Headline("p99", False),
    "ledger": Headline("CPU/req", False),
    "capacity": Headline("ops/s", True),
    "streams": Headline("p99", False),
    "long": Headline("p99", False),
    "compression": Headline("CPU/req", False),
    "tables": Headline("p99", False),
    "readers": Headline("p99", False),
}


def render(scenario: str, results: Sequence[Result]) -> str:
    """One markdown table; relay rows carry relay / reference and relay / bare ratios."""
    headline = HEADLINES[scenario]
    header = ["target", "setting", "ops", "rate", "p50 ms", "p99 ms", "lost", "server CPU"]
    header += ["db CPU", "replica CPU", "replica reads"]
    header += ["gen CPU", "commits/op", "stmts/commit", "rows/op", "batch", "WAL B/op"]
    header += ["held rate"]
    header += ["/ reference", "/ bare"]
    header += ["notes"]
    rows = [header]
    for result in results:
        rows.append(
            _cells(
                result,
                _ratio(result, results, "reference", headline),
                _ratio(result, results, "bare", headline),
            )
        )
    # Columns no row fills (no bare run, no store counters) only widen the table.
    keep = [i for i in range(len(header)) if any(row[i] not in ("-", "") for row in rows[1:])]
    rows = [[row[i] for i in keep] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(keep))]
    better = "higher" if headline.higher_is_better else "lower"
    lines = [f"{scenario}: ratios compare {headline.name} ({better} is better)"]
    for index, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _ratio(result: Result, results: Sequence[Result], other: str, headline: Headline) -> str:
    if result.target.name != "relay":
        return "-"
    for candidate in results:
        if candidate.target.name == other and candidate.variant == result.variant:
            mine, theirs = headline.of(result), headline.of(candidate)
            if mine is not None and theirs:
                return f"{mine / theirs:.2f}"
    return "-"


def _cells(result: Result, vs_reference: str, vs_bare: str) -> list[str]:
    u = result.usage
    p50, p99 = result.p(0.50), result.p(0.99)
    per_op = result.operations or 1

    def spent(seconds: float | None) -> str:
        if seconds is None or not u.wall:
            return "-"
        return f"{seconds * 1e6 / per_op:,.0f} us/{result.unit} ({seconds / u.wall:.0%})"

    replicated = "-"
    if u.replica_reads is not None and result.target.read_database_urls:
        replicated = f"{u.replica_reads:.0f} (+{u.replica_fallbacks or 0:.0f} fell back)"
    generator = f"{u.generator_share:.0%}"
    if result.generator_limited:
        generator += " generator-limited"
    commits = "-" if u.commits is None else f"{u.commits / per_op:.3f}"
    statements = "-" if u.statements is None or not u.commits else f"{u.statements / u.commits:.2f}"
    rows = "-" if u.rows is None else f"{u.rows / per_op:.3f}"
    batch = "-" if not u.commits or u.appends is None else f"{u.appends / u.commits:.1f}"
    wal = "-" if u.wal is None else f"{u.wal / per_op:,.0f}"
    rate = f"{result.rate:,.0f} {result.unit}/s"
    if result.mib:
        rate = f"{result.mib / u.wall:,.0f} MiB/s"
    return [
        result.target.label,
        result.variant,
        f"{result.operations}",
        rate,
        "-" if p50 is None else f"{p50 * 1000:.2f}",
        "-" if p99 is None else f"{p99 * 1000:.2f}",
        f"{result.lost}",
        spent(u.server_cpu),
        spent(u.db_cpu),
        spent(u.replica_cpu),
        replicated,
        generator,
        commits,
        statements,
        rows,
        batch,
        wal,
        "-" if result.held is None else f"{result.held:.0%}",
        vs_reference,
        vs_bare,
        result.note,
    ]
