"""Table streams: committed Postgres row changes appended as State Protocol messages, once.

One relay follows at a time: it holds a session-level advisory lock on a connection of its own,
so when that session ends (the relay stops or is killed) another relay's next try takes over.
The follower reads the slot with ``pg_logical_slot_peek_binary_changes`` (pgoutput), appends
each transaction's messages per stream as one append whose ``Stream-Seq`` is the commit LSN,
and only then advances the slot (``pg_replication_slot_advance``). A crash between the two
replays those transactions; the store refuses each replayed append as not greater than the
stream's last ``Stream-Seq`` (the sequence is committed with the append, on either store), and
the follower counts it as already applied.

A table stream starts with a snapshot: the slot exists first, then one REPEATABLE READ
transaction reads ``pg_current_snapshot()`` and the rows, which are appended bracketed by
``snapshot-start`` and ``snapshot-end``; a later transaction that snapshot already contains is
skipped for that stream, so no row is missing or twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import asyncpg
import orjson
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from protocol.append import AppendRequest
from protocol.create import CreateRequest
from protocol.errors import Conflict, NotFound, ProtocolError, Unavailable
from protocol.jsonmode import SEPARATOR
from protocol.lifecycle import Expiry
from relay.store.base import Store, StoreStartupError
from relay.tables import catalog
from relay.tables.catalog import Declared
from relay.tables.pgoutput import Assembler, PgoutputError, Transaction
from relay.tables.plan import (
    Message,
    Plan,
    Problem,
    Snapshot,
    commit_seq,
    control,
    plan_snapshot,
    plan_transaction,
    snapshot_seq,
)
from relay.tables.spec import TableStream

log = structlog.get_logger("relay.tables")

CONTENT_TYPE = "application/json"
APPEND_CONCURRENCY = 64
"""Paths appended to at once while applying a batch (the store group-commits them)."""
RECHECK_SECONDS = 5.0
"""How often the follower looks again for dropped tables when nothing else changed."""


@dataclass(frozen=True, slots=True)
class FollowerSettings:
    url: str  # a direct connection (session state: the advisory lock)
    declared: tuple[TableStream, ...]  # from flags; more may come from ``relay tables add``
    slot: str = "relay_tables"
    poll_interval: float = 0.2
    batch_changes: int = 10000
    max_retained_bytes: int = 1 << 30
    lock_retry: float = 1.0
    max_path_length: int = 1024
    connect_timeout: float = 5.0
    compact_ratio: float = 4.0  # 0: never compact by policy
    compact_min_bytes: int = 64 * 1024


@dataclass
class TableStats:
    """What the follower counts (``relay_table_*`` in /metrics)."""

    following: bool = False
    transactions: Counter[str] = field(default_factory=Counter)  # applied, already_applied
    messages: Counter[str] = field(default_factory=Counter)  # by operation
    problems: Counter[str] = field(default_factory=Counter)  # by Problem.reason
    snapshot_rows: int = 0
    compactions: int = 0  # table streams folded by policy
    lag_bytes: int | None = None  # WAL written since the slot's confirmed position
    retained_bytes: int | None = None  # WAL the slot keeps (since restart_lsn)
    errors: int = 0


class TableFollower:
    """The background service: opened after the store, closed before it."""

    def __init__(
        self, settings: FollowerSettings, store: Store, clock: Callable[[], float]
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.stats = TableStats()
        self._task: asyncio.Task[None] | None = None
        self._snapshots: dict[str, Snapshot] = {}
        self._streams: dict[str, list[TableStream]] = {}
        self._names: tuple[str, ...] | None = None
        self._after_lsn = 0  # the last commit applied (or skipped) in this session
        self._reported: set[tuple[str, str]] = set()
        self._checked_at = 0.0
        # path -> bytes of its last snapshot, for the compaction policy (bounded: cleared when
        # full, which only makes the next compaction of a forgotten path come sooner)
        self._snapshot_bytes: dict[str, int] = {}

    async def open(self) -> None:
        """Refuse to start (StoreStartupError, one line) when Postgres cannot decode or a
        declared table stream cannot be followed; then follow in the background. Without
        flags, follow only if ``relay tables add`` declared some before this start."""
        try:
            conn = await asyncpg.connect(self.settings.url, timeout=self.settings.connect_timeout)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            if not self.settings.declared:  # none asked for here: never block serving
                log.warning("table streams: cannot look for declared ones", error=str(exc))
                return
            raise StoreStartupError(f"table streams: cannot reach Postgres: {exc}") from None
        try:
            if not self.settings.declared and not await catalog.any_declared(conn):
                return  # no table streams here: nothing to check, nothing to follow
            refusal = await catalog.check_wal_level(conn)
            if refusal is not None:
                raise StoreStartupError(refusal)
            await catalog.ensure_schema(conn)
            for spec in self.settings.declared:
                problem = await catalog.problem_with(conn, spec)
                if problem is not None:
                    raise StoreStartupError(f"table stream {spec.name}: {problem}")
                await catalog.declare(conn, spec)
        finally:
            await conn.close()
        self._task = asyncio.create_task(self._run(), name="table-streams")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def ready(self) -> str | None:
        """Not ready while the slot retains more WAL than the bound (nobody follows it)."""
        retained = self.stats.retained_bytes
        if retained is not None and retained > self.settings.max_retained_bytes:
            return (
                f"table stream slot {self.settings.slot} retains {retained} bytes of WAL "
                f"(bound {self.settings.max_retained_bytes}): is a relay following it?"
            )
        return None

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(
                    self.settings.url, timeout=self.settings.connect_timeout
                )
                try:
                    await self._session(conn)
                finally:
                    self.stats.following = False
                    conn.terminate()  # the lock goes with the session
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, TimeoutError, Unavailable) as exc:
                self.stats.errors += 1
                log.warning("table streams: follower stopped, retrying", error=str(exc))
            except Exception:
                self.stats.errors += 1
                log.exception("table streams: follower failed, retrying")
            await asyncio.sleep(self.settings.lock_retry)

    async def _session(self, conn: asyncpg.Connection) -> None:
        # Text output as to_json expects it: ISO timestamps in UTC, bytea in hex.
        await conn.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET bytea_output = 'hex'")
        slot = self.settings.slot
        while not await conn.fetchval(catalog.LOCK, slot):
            await self._measure(conn)
            await asyncio.sleep(self.settings.lock_retry)
        self.stats.following = True
        self._names = None  # re-read everything: another relay may have changed it
        self._after_lsn = 0  # and start from the slot's position, wherever that relay left it
        log.info("table streams: following", slot=slot)
        while True:
            moved = await self._step(conn)
            await self._measure(conn)
            if not moved:
                await asyncio.sleep(self.settings.poll_interval)

    async def _measure(self, conn: asyncpg.Connection) -> None:
        row = await conn.fetchrow(catalog.SLOT, self.settings.slot)
        self.stats.lag_bytes = None if row is None else row["lag"]
        self.stats.retained_bytes = None if row is None else row["retained"]

    async def _step(self, conn: asyncpg.Connection) -> bool:
        """One pass: follow the declared set, apply what the slot holds, start new streams.
        True when it did something (the next pass comes at once)."""
        declared = await catalog.declared(conn)
        await self._follow_set(conn, declared)
        slot = self.settings.slot
        if not declared:
            if await catalog.drop_slot(conn, slot):
                log.info("table streams: none declared, slot dropped", slot=slot)
            return False
        row = await conn.fetchrow(catalog.SLOT, slot)
        if row is None or row["wal_status"] == "lost":
            await self._new_slot(conn, lost=row is not None)
            return True
        if not self._after_lsn:
            self._after_lsn = row["confirmed_flush_lsn"] - 1  # below any commit still to come
        moved = await self._apply_pending_changes(conn)
        pending = [d.spec for d in declared if not d.live]
        if pending:
            await self._take_snapshot(conn, pending, declared)
            return True
        return moved

    async def _follow_set(self, conn: asyncpg.Connection, declared: Sequence[Declared]) -> None:
        names = tuple(d.spec.name + d.spec.render() + str(d.live) for d in declared)
        now = asyncio.get_running_loop().time()
        if names == self._names and now < self._checked_at + RECHECK_SECONDS:
            return
        self._checked_at = now
        streams: dict[str, list[TableStream]] = {}
        tables: set[str] = set()
        for d in declared:
            if not await catalog.exists(conn, d.spec):  # dropped since it was declared
                self._problem(Problem("table", d.spec.name, f"table {d.spec.table} is gone"))
                continue
            spec = d.spec
            if not spec.key:  # the primary key (or replica identity index) names the entity
                spec = replace(spec, key=tuple(await catalog.identity_columns(conn, spec)))
            tables.add(spec.table)
            streams.setdefault(spec.table, []).append(spec)
        if tables or not declared:
            # Never dropped while table streams remain: the slot's decoding needs it to exist
            # (Postgres takes a dropped table out of it by itself).
            await catalog.sync_publication(conn, self.settings.slot, tables)
        self._streams = streams
        self._snapshots = {d.spec.name: d.snapshot for d in declared if d.live and d.snapshot}
        self._names = names

    async def _new_slot(self, conn: asyncpg.Connection, *, lost: bool) -> None:
        """Create the slot; every table stream then starts over with a snapshot (a slot that
        was dropped or lost its WAL can no longer say what changed meanwhile). Their earlier
        snapshots stay recorded while pending: that marks a restart, which the new snapshot
        opens with ``reset`` so rows deleted meanwhile do not linger in readers."""
        slot = self.settings.slot
        if lost:
            log.error("table streams: slot lost its WAL (max_slot_wal_keep_size?)", slot=slot)
            self.stats.problems["slot_lost"] += 1
            await catalog.drop_slot(conn, slot)
        await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
        await conn.execute("UPDATE relay_table_streams SET state = 'pending'")
        self._after_lsn = 0
        self._names = None
        log.info("table streams: slot created", slot=slot)

    async def _apply_pending_changes(self, conn: asyncpg.Connection) -> bool:
        rows = await conn.fetch(
            catalog.PEEK, self.settings.slot, self.settings.batch_changes, self.settings.slot
        )
        if not rows:
            return False
        assembler = Assembler()
        last: Transaction | None = None
        plans: list[tuple[Plan, str]] = []
        for row in rows:
            try:
                txn = assembler.feed(row["data"])
            except PgoutputError as exc:  # never expected; a stuck slot would be worse
                self._problem(Problem("decode", self.settings.slot, str(exc)))
                continue
            if txn is None:
                continue
            plan = plan_transaction(
                txn, self._streams, self._snapshots, self.settings.max_path_length
            )
            plans.append((plan, commit_seq(txn.commit_lsn)))
            last = txn
        if last is None:
            return False
        await self._apply(plans)
        self._after_lsn = max(self._after_lsn, last.commit_lsn)
        await conn.fetchval(catalog.ADVANCE, self.settings.slot, catalog.lsn_text(last.end_lsn))
        return True

    async def _apply(self, plans: Sequence[tuple[Plan, str]]) -> None:
        """Append every plan's messages (``(plan, Stream-Seq)`` in commit order). Each path
        takes its appends in order; paths go concurrently (up to APPEND_CONCURRENCY), so the
        store can commit many chats' appends together. A crash leaves some paths further on
        than others: the replay is refused path by path."""
        chains: dict[str, list[tuple[int, list[Message], str]]] = {}
        for index, (plan, seq) in enumerate(plans):
            for problem in plan.problems:
                self._problem(problem)
            for path, messages in plan.appends.items():
                chains.setdefault(path, []).append((index, messages, seq))
        applied: set[int] = set()
        gate = asyncio.Semaphore(APPEND_CONCURRENCY)

        async def run(path: str, chain: list[tuple[int, list[Message], str]]) -> None:
            async with gate:
                for index, messages, seq in chain:
                    if await self._append(path, messages, seq):
                        applied.add(index)
                        for m in messages:
                            self.stats.messages[m["headers"].get("operation", "control")] += 1

        tasks = [asyncio.create_task(run(path, chain)) for path, chain in chains.items()]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # one failed (the store went away): stop the others too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for index, (plan, _seq) in enumerate(plans):
            if plan.appends:
                self.stats.transactions["applied" if index in applied else "already_applied"] += 1

    async def _append(self, path: str, messages: list[Message], seq: str) -> bool:
        """Append once; False when the stream already has it (a replay) or refuses it."""
        request = AppendRequest(CONTENT_TYPE, encode(messages), stream_seq=seq)
        try:
            try:
                result = await self.store.append(path, request, self.clock())
            except NotFound:
                empty = CreateRequest(path, CONTENT_TYPE, Expiry(), closed=False, body=b"")
                await self.store.create(empty, self.clock())
                result = await self.store.append(path, request, self.clock())
            await self._maybe_compact(path, result.meta.tail - result.meta.retained_from)
        except Conflict as exc:
            if exc.code == "stream_seq_regression":
                return False  # appended before a crash, or by the relay that followed before
            self._problem(Problem("stream", path, exc.message))
            return False
        except Unavailable:
            raise
        except ProtocolError as exc:  # closed, deleted: the change cannot go there
            self._problem(Problem("stream", path, exc.message))
            return False
        return True

    async def _maybe_compact(self, path: str, history: int) -> None:
        """The compaction policy: once what a reader from the horizon downloads (``history``)
        is over ``compact_ratio`` times the stream's last snapshot, and over
        ``compact_min_bytes``, fold it (``Store.compact_state``). A refusal (someone else wrote
        there) is a problem to report, never a failed batch."""
        settings = self.settings
        if settings.compact_ratio <= 0:
            return
        last = self._snapshot_bytes.get(path, 0)
        if history <= max(settings.compact_min_bytes, settings.compact_ratio * last):
            return
        try:
            done = await self.store.compact_state(path, self.clock())
        except Unavailable:
            raise
        except ProtocolError as exc:
            self._problem(Problem("stream", path, f"not compacted: {exc.message}"))
            self._snapshot_bytes[path] = history  # not again until it doubles... and more
            return
        if len(self._snapshot_bytes) >= 100_000:
            self._snapshot_bytes.clear()
        self._snapshot_bytes[path] = done.meta.tail - done.meta.retained_from
        self.stats.compactions += 1

    async def _take_snapshot(
        self, conn: asyncpg.Connection, pending: list[TableStream], declared: Sequence[Declared]
    ) -> None:
        """Start ``pending`` table streams: their rows as of one snapshot, appended after
        everything applied so far and before everything after."""
        following = [
            s for s in pending if s.name in {x.name for v in self._streams.values() for x in v}
        ]
        if not following:
            return
        round_ = max(d.round for d in declared) + 1
        names = [s.name for s in following]
        # Each try takes a new round, so a snapshot re-taken after a crash is appended anew.
        await conn.execute(
            "UPDATE relay_table_streams SET round = $1 WHERE name = ANY($2::text[])", round_, names
        )
        plan = Plan()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            text = await conn.fetchval("SELECT pg_current_snapshot()::text")
            for spec in following:
                types = await catalog.column_types(conn, spec)
                types = {c: types[c] for c in spec.columns if c in types}
                key = list(spec.key) or await catalog.identity_columns(conn, spec)
                columns = ", ".join(f"{catalog.quote(c)}::text" for c in types)
                rows = await conn.fetch(
                    f"SELECT xmin::text AS xmin__, {columns} FROM {catalog.qualified(spec.table)}"
                )
                self.stats.snapshot_rows += len(rows)
                plan_snapshot(
                    spec,
                    types,
                    key,
                    [(r["xmin__"], {c: r[c] for c in types}) for r in rows],
                    self.settings.max_path_length,
                    plan,
                )
        seq = snapshot_seq(self._after_lsn, round_)
        # Reset readers first when this snapshot may follow an earlier one on the same paths
        # (a restart after the slot was lost, or a retry after a crash mid-snapshot), provided
        # every table stream is in this round: then no rows on these paths are left out.
        restart = any(d.snapshot is not None or d.round > 0 for d in declared if not d.live)
        everyone = all(not d.live for d in declared) and len(following) == len(declared)
        opening = [control("reset")] if restart and everyone else []
        bracketed = Plan(
            {
                p: [*opening, control("snapshot-start"), *m, control("snapshot-end")]
                for p, m in plan.appends.items()
            },
            plan.problems,
        )
        await self._apply([(bracketed, seq)])
        await conn.execute(
            "UPDATE relay_table_streams SET state = 'live', snapshot = $1"
            " WHERE name = ANY($2::text[])",
            text,
            names,
        )
        for name in names:
            self._snapshots[name] = Snapshot.parse(text)
        self._names = None
        log.info("table streams: started", streams=names, snapshot=text, paths=len(plan.appends))

    def _problem(self, problem: Problem) -> None:
        self.stats.problems[problem.reason] += 1
        if (problem.reason, problem.detail) in self._reported and problem.reason == "table":
            return  # said once per process
        self._reported.add((problem.reason, problem.detail))
        log.warning(
            "table streams: change not published as declared",
            reason=problem.reason,
            stream=problem.stream,
            detail=problem.detail,
        )


def encode(messages: Sequence[Message]) -> bytes:
    """Messages as JSON mode stores them: compact JSON, one per line."""
    out = bytearray()
    for m in messages:
        try:
            out += orjson.dumps(m)
        except (TypeError, orjson.JSONEncodeError):  # an integer beyond 64 bits in json
            out += json.dumps(m, separators=(",", ":")).encode()
        out += SEPARATOR
    return bytes(out)


class TablesCollector(Collector):
    """The follower's figures at scrape time. Slot figures come only from the relay that
    follows, so ``--workers`` (whose samples are summed) reports them once."""

    def __init__(self, stats: TableStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield GaugeMetricFamily(
            "relay_table_following", "1 while this relay follows the table streams' slot",
            int(stats.following),
        )  # fmt: skip
        txns = CounterMetricFamily(
            "relay_table_transactions",
            "Transactions with messages for table streams: applied, or already_applied "
            "(a replay the store refused by Stream-Seq)",
            labels=["outcome"],
        )
        for outcome in ("applied", "already_applied"):
            txns.add_metric([outcome], stats.transactions[outcome])
        yield txns
        messages = CounterMetricFamily(
            "relay_table_messages", "State Protocol messages appended, by operation",
            labels=["operation"],
        )  # fmt: skip
        for operation in ("insert", "update", "delete", "control"):
            messages.add_metric([operation], stats.messages[operation])
        yield messages
        problems = CounterMetricFamily(
            "relay_table_problems",
            "Changes not published as declared, by reason (path, key, value, truncate, "
            "column, toast, stream, table, decode, slot_lost)",
            labels=["reason"],
        )
        for reason, count in sorted(stats.problems.items()):
            problems.add_metric([reason], count)
        yield problems
        yield CounterMetricFamily(
            "relay_table_snapshot_rows", "Rows appended by table streams' snapshots",
            stats.snapshot_rows,
        )  # fmt: skip
        yield CounterMetricFamily(
            "relay_table_follower_errors", "Follower sessions ended by an error", stats.errors
        )
        yield CounterMetricFamily(
            "relay_table_compactions", "Table streams folded into a snapshot by policy",
            stats.compactions,
        )  # fmt: skip
        if stats.following and stats.lag_bytes is not None:
            yield GaugeMetricFamily(
                "relay_table_slot_lag_bytes",
                "WAL written since the slot's confirmed position",
                stats.lag_bytes,
            )
        if stats.following and stats.retained_bytes is not None:
            yield GaugeMetricFamily(
                "relay_table_slot_retained_bytes",
                "WAL the slot keeps on the database's disk",
                stats.retained_bytes,
            )
