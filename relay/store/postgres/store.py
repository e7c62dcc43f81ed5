"""The Postgres store: asyncpg, group commit, LISTEN/NOTIFY across relays, compaction.

Writes go through :class:`relay.store.batching.Committer`: every operation queued while the
previous commit was in flight runs in one transaction. A batch of appends to streams this relay
wrote last goes as one guarded statement (``statements.GUARDED_WRITE``); any other batch locks
the stream rows it touches (``FOR UPDATE``, in id order so relays never deadlock), runs the
protocol's decisions in Python against that locked state (``plan.stage_append``), writes all
appends to a stream in the batch as one row, and sends one ``NOTIFY`` listing the streams that
moved. Each relay LISTENs on one connection and tells its listener (the commit sink), which
wakes that stream's parked readers; the same notifications keep ``known`` exact, so reads
answer from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import structlog

from protocol.append import AppendRequest
from protocol.create import CreateRequest, plan_create
from protocol.errors import NotFound, ProtocolError, StorageFull, StreamDiverged, Unavailable
from protocol.lifecycle import check_visible, is_expired
from protocol.model import ProducerState, StreamMeta
from protocol.retention import plan_horizon
from relay.store.base import (
    AppendResult,
    CreateResult,
    Revocation,
    StoreEvents,
    StoreStartupError,
    StoreStats,
)
from relay.store.batching import (
    AppendOp,
    Committer,
    CreateOp,
    DeleteOp,
    ReapOp,
    RetainOp,
    Touches,
    WriteOp,
)
from relay.store.common import (
    META_COLUMNS,
    decode_acks,
    encode_acks,
    refuse_inherited,
    resolve_fork,
    row_meta,
)
from relay.store.postgres.compaction import COMPACT_PASS_BYTES, CompactionPass, compact_pass
from relay.store.postgres.connections import (
    DISCONNECTS,
    OFFLINE,
    RETRYABLE,
    connection_lost,
    keep_session,
    pooled_options,
)
from relay.store.postgres.known import Known, Owned, OwnedStreams
from relay.store.postgres.plan import Batch, notify_payload, parse_payload, stage_append
from relay.store.postgres.replicas import ReplicaReader
from relay.store.postgres.schema import apply_migrations, migrations
from relay.store.postgres.statements import (
    ERASE_BEYOND,
    GUARDED_WRITE,
    INHERITING,
    LOCK,
    PRODUCERS,
    PURGE_CHAIN,
    RETENTION_LIMIT,
    WRITE,
    read_range,
    with_segments,
)

log = structlog.get_logger("relay.postgres")

CHANNEL = "relay_commits"
RETRIES = 3


class PostgresStore:
    """Streams in Postgres (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        max_batch_ops: int = 1024,
        max_batch_bytes: int = 16 * 1024 * 1024,
        commit_interval: float = 0.0,
        max_fork_scan: int = 16 * 1024 * 1024,
        command_timeout: float = 5.0,
        compact_idle_seconds: float = 10.0,
        compact_interval: float = 2.0,
        pool_size: int = 8,
        clock: Callable[[], float] = time.time,
        direct_url: str = "",
        pooler: str = "none",
        read_urls: Sequence[str] = (),
        commit_pipeline: int = 1,
    ) -> None:
        self._url = url  # pooled work: the pool, the committer (through a pooler, if any)
        self._direct_url = direct_url or url  # LISTEN and migrations: a session of their own
        self._pooler = pooler
        self._pooled = pooled_options(pooler)
        self._replicas = (
            ReplicaReader(
                read_urls,
                command_timeout=command_timeout or None,
                pool_size=pool_size,
                options=self._pooled,  # standbys may sit behind the same kind of pooler
            )
            if read_urls
            else None
        )
        self._timeout = command_timeout or None
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._committer = Committer(
            self._apply,
            max_ops=max_batch_ops,
            max_bytes=max_batch_bytes,
            min_interval=commit_interval,
            depth=commit_pipeline,
        )
        # The committer's own connections, one per batch in flight (--commit-pipeline), idle
        # ones here: no pool acquire or reset per batch.
        self._writers: list[asyncpg.Connection] = []
        self._max_fork_scan = max_fork_scan
        self._origin = uuid.uuid4().hex[:12]
        self._events: StoreEvents | None = None
        self._known = Known()
        self._owned = OwnedStreams()
        self._diverged: set[int] = set()  # streams the database lost acknowledged appends of
        self._listening = False  # _known is trusted only while notifications flow
        self._listen_conn: asyncpg.Connection | None = None
        self._barrier: asyncio.Future[bool] | None = None  # the next barrier's callers
        self._barrier_running = False
        self._listen_task: asyncio.Task[None] | None = None
        self._compact_task: asyncio.Task[None] | None = None
        self._compact_idle = compact_idle_seconds
        self._compact_interval = compact_interval
        self._clock = clock
        self._stats = dict.fromkeys(
            (
                "appends",
                "rows_written",
                "rows_compacted",
                "bytes_compacted",
                "compaction_passes",
                "listen_reconnects",
                "unavailable",  # reads answered 503; the committer counts writes
                "statements",  # sent by the committer, BEGIN and COMMIT included
                "guarded_writes",  # batches committed in one round trip
                "guard_misses",  # guarded writes refused (a stream changed): re-run locked
                "diverged",  # streams found behind what this relay acknowledged
            ),
            0,
        )
        self._database_up = True  # as last seen; outages are logged on the change only
        # Callers waiting for the next lookup of a path; see _shared_load.
        self._lookups: dict[str, list[asyncio.Future[StreamMeta | None]]] = {}
        self._background: set[asyncio.Task[None]] = set()  # held so they are not collected

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL (subscription state shares the database, on its own pool)."""
        return self._url

    @property
    def pooler(self) -> str:
        """What ``url`` reaches: ``none`` (Postgres) or ``transaction`` (a pooler)."""
        return self._pooler

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self._direct_url, timeout=self._timeout or 10)
        except (*DISCONNECTS, asyncpg.PostgresError) as exc:
            raise StoreStartupError(f"cannot reach Postgres: {exc}") from None
        try:
            await apply_migrations(conn)
            if self._replicas is not None:
                await self._replicas.open(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=1,
            max_size=self._pool_size,
            command_timeout=self._timeout,
            timeout=self._timeout or 10,
            reset=keep_session,
            **self._pooled,
        )
        self._committer.start()
        self._listen_task = asyncio.create_task(self._listen_forever(), name="pg-listen")
        self._compact_task = asyncio.create_task(self._compact_forever(), name="pg-compact")

    async def close(self) -> None:
        await self._committer.stop()
        for task in (self._listen_task, self._compact_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for writer in self._writers:
            writer.terminate()  # idle between batches: nothing to flush
        self._writers.clear()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self._timeout or 10)
            except (*DISCONNECTS, asyncpg.PostgresError):
                self._pool.terminate()  # connections already lost: nothing left to flush
        if self._replicas is not None:
            await self._replicas.close()

    def set_listener(self, events: StoreEvents) -> None:
        self._events = events
        self._committer.events = events

    def stats(self) -> StoreStats:
        pool = self._pool
        size = pool.get_size() if pool is not None else 0
        base = self._committer.stats()
        counts = self._stats
        replicas = self._replicas
        return replace(
            base,
            replica_reads=replicas.reads if replicas else None,
            replica_fallbacks=replicas.fallbacks if replicas else None,
            replica_errors=replicas.errors if replicas else None,
            replicas_up=replicas.up if replicas else None,
            appends=counts["appends"],
            rows_written=counts["rows_written"],
            unavailable=base.unavailable + counts["unavailable"],
            rows_compacted=counts["rows_compacted"],
            bytes_compacted=counts["bytes_compacted"],
            compaction_passes=counts["compaction_passes"],
            listen_reconnects=counts["listen_reconnects"],
            statements=counts["statements"],
            guarded_writes=counts["guarded_writes"],
            guard_misses=counts["guard_misses"],
            diverged_streams=counts["diverged"],
            pool_in_use=size - pool.get_idle_size() if pool is not None else 0,
            pool_size=size,
        )

    async def ready(self) -> str | None:
        """Ready when a pooled connection answers and the schema is at this relay's version."""
        if self._pool is None:
            return "store is not open"
        fault = self._committer.write_fault()
        if fault is not None:
            return fault
        try:
            async with self._conn() as conn:
                version = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM relay_schema_version"
                )
        except Unavailable as exc:
            return str(exc)
        except asyncpg.PostgresError as exc:
            return f"database error: {type(exc).__name__}"
        wanted = migrations()[-1][0]
        if version < wanted:
            return f"schema at version {version}, this relay needs {wanted}"
        return None

    def _database_lost(self, reason: str) -> None:
        """Log an outage once, when it begins (every request during it gets 503 anyway)."""
        if self._database_up:
            self._database_up = False
            log.warning("postgres connection lost", reason=reason)

    def _database_back(self) -> None:
        if not self._database_up:
            self._database_up = True
            log.info("postgres connection restored")

    @contextlib.asynccontextmanager
    async def _conn(self) -> Any:
        """A pooled connection; losing the database becomes Unavailable (503).

        The wait for a connection and the work on it share one ``--db-timeout``: with a
        frozen link, a wait then a query each taking the whole timeout answered in twice it.
        """
        pool = self._pool
        assert pool is not None
        timeout = self._timeout
        try:
            if timeout is None:
                async with pool.acquire() as conn:
                    yield conn
                return
            deadline = asyncio.get_running_loop().time() + timeout
            conn = await pool.acquire(timeout=timeout)
            try:
                async with asyncio.timeout_at(deadline):
                    yield conn
            except TimeoutError:
                conn.terminate()  # a query cut short on a link that may be frozen: not reusable
                raise
            finally:
                await pool.release(conn, timeout=timeout)
        except DISCONNECTS as exc:
            if not connection_lost(exc):
                raise
            self._stats["unavailable"] += 1
            self._database_lost(type(exc).__name__)
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from None

    # -- the interface -----------------------------------------------------------------------

    async def create(self, request: CreateRequest, now: float) -> CreateResult:
        request = await resolve_fork(
            request,
            lambda path: self.head(path, now, touch=False),
            self.read,
            self._max_fork_scan,
        )
        result: CreateResult = await self._committer.submit(
            CreateOp(request, now), len(request.body)
        )
        return result

    async def append(self, path: str, request: AppendRequest, now: float) -> AppendResult:
        result: AppendResult = await self._committer.submit(
            AppendOp(path, request, now), len(request.data)
        )
        return result

    async def delete(self, path: str, now: float, revoke: Revocation | None = None) -> StreamMeta:
        result: StreamMeta = await self._committer.submit(DeleteOp(path, now, revoke))
        return result

    async def inheriting(self, path: str, offset: int) -> list[str]:
        async with self._conn() as conn:
            stream_id = await conn.fetchval("SELECT id FROM relay_streams WHERE path = $1", path)
            if stream_id is None:
                return []
            return [row[1] for row in await conn.fetch(INHERITING, stream_id, offset)]

    async def reap(self, now: float) -> int:
        result: int = await self._committer.submit(ReapOp(now))
        return result

    async def retain(self, path: str, offset: int, now: float) -> StreamMeta:
        result: StreamMeta = await self._committer.submit(RetainOp(path, offset, now))
        return result

    async def head(self, path: str, now: float, *, touch: bool) -> StreamMeta:
        try:
            # The barrier and the lookup share one --db-timeout: a frozen link cost both.
            async with asyncio.timeout(self._timeout):
                meta = await self._known_fresh(path, now)
                if meta is None:
                    meta = await self._shared_load(path)
        except TimeoutError:
            self._stats["unavailable"] += 1
            self._database_lost("TimeoutError")
            raise Unavailable("database unavailable: TimeoutError") from None
        if meta is None:
            raise NotFound()
        pending = self._committer.pending_touch(path, meta.stream_id)
        if pending is not None:
            meta = replace(meta, last_access=max(meta.last_access, pending))
        check_visible(meta, now)
        if touch and meta.ttl is not None:
            self._committer.touch(path, meta.stream_id, now)
            return replace(meta, last_access=max(meta.last_access, now))
        return meta

    def tracked(self, path: str, position: int, now: float) -> StreamMeta | None:
        """The stream for a live reader parking at ``position``, without a database round trip.

        Only when this relay's view says ``position`` is the tail of an open stream without a
        TTL: a commit it has not seen yet (another relay's, its NOTIFY in flight) wakes the
        parked reader, so nothing is missed. Anything else goes to the database.
        """
        if not self._listening:
            return None
        meta = self._known.by_path.get(path)
        if (
            meta is None
            or meta.tail != position
            or meta.closed
            or meta.soft_deleted
            or meta.ttl is not None
            or is_expired(meta, now)
        ):
            return None
        return meta

    async def _known_fresh(self, path: str, now: float) -> StreamMeta | None:
        """The stream as this relay knows it, once every commit acknowledged before this call
        (by any relay) has reached ``_known``; None when the database must answer.

        Any relay's commit NOTIFYs before it is acknowledged, and Postgres sends a listening
        session the notifications committed before a query ahead of that query's answer, so
        after one round trip on the LISTEN connection (:meth:`_notified`, shared by every
        caller waiting for it) ``_known`` is as fresh as a query would be. What a NOTIFY
        does not carry stays with the database: a closed stream (its close may have named a
        successor), a soft-deleted one (it may be purged and its path re-created) and a TTL
        stream that looks expired (other relays' reads extend it).
        """
        if not self._listening or path not in self._known.by_path:
            return None
        if not await self._notified():
            return None
        meta = self._known.by_path.get(path)
        if meta is None or meta.closed or meta.soft_deleted:
            return None
        if meta.ttl is not None and is_expired(meta, now):
            return None
        return meta

    async def _notified(self) -> bool:
        """Wait for a round trip on the LISTEN connection that began after this call; False
        if notifications stopped flowing meanwhile (then nothing cached may answer)."""
        waiter = self._barrier
        if waiter is None:
            waiter = self._barrier = asyncio.get_running_loop().create_future()
        if not self._barrier_running:
            self._barrier_running = True
            self._spawn(self._run_barriers())
        return await asyncio.shield(waiter)  # one caller's timeout must not cancel the others'

    async def _run_barriers(self) -> None:
        """One ``SELECT 1`` at a time on the LISTEN connection, each for everyone who asked
        before it was sent. asyncpg runs notification callbacks before it wakes the query's
        caller, so ``_known`` has them by the time a waiter resumes."""
        try:
            while (waiter := self._barrier) is not None:
                self._barrier = None
                ok = False
                conn = self._listen_conn
                if conn is not None and self._listening:
                    with contextlib.suppress(*DISCONNECTS, asyncpg.PostgresError):
                        await conn.execute("SELECT 1", timeout=self._timeout or 5)
                        ok = self._listening and self._listen_conn is conn
                if not waiter.done():
                    waiter.set_result(ok)
        finally:
            self._barrier_running = False

    async def _shared_load(self, path: str) -> StreamMeta | None:
        """Load a stream's row, one query serving every caller that asked before it began.

        When a commit wakes hundreds of parked readers they all ask for the same row at once.
        Callers queue per path; a loader runs one query for everyone queued, then another for
        whoever arrived meanwhile. Each query starts after its callers arrived, so a read
        never misses a write acknowledged before it (on this relay or any other).
        """
        waiter: asyncio.Future[StreamMeta | None] = asyncio.get_running_loop().create_future()
        queued = self._lookups.get(path)
        if queued is None:
            self._lookups[path] = [waiter]
            self._spawn(self._run_lookups(path))
        else:
            queued.append(waiter)
        return await waiter

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_lookups(self, path: str) -> None:
        try:
            while batch := self._lookups[path]:
                self._lookups[path] = []
                try:
                    listening = self._listening
                    since = self._known.mark()  # what the row may predate (Known.put)
                    meta = await self._load_pooled(path)
                    if meta is not None and listening and self._listening:
                        self._known.put(meta, since)
                except Exception as exc:
                    for waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(exc)
                else:
                    for waiter in batch:
                        if not waiter.done():
                            waiter.set_result(meta)
        finally:
            del self._lookups[path]

    async def _load_pooled(self, path: str) -> StreamMeta | None:
        async with self._conn() as conn:
            return await self._load(conn, path)

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        """From a read replica holding all of ``[start, end)`` if there is one (never for a
        stream the database lost appends of: a replica may hold bytes the primary lost), else
        the primary."""
        if start >= end:
            return b""
        replicas = self._replicas
        if replicas is not None and meta.stream_id not in self._diverged:
            data = await replicas.read(meta, start, end)
            if data is not None:
                return data
        async with self._conn() as conn:
            return await read_range(conn, meta, start, end)

    # -- the batch transaction ---------------------------------------------------------------

    async def _writer_conn(self) -> asyncpg.Connection:
        """An idle connection of the committer's own, or a new one: no pool acquire or reset
        per batch, and nothing after COMMIT that could fail and turn a committed batch into
        an error. The batch hands it back with ``_writer_done``."""
        while self._writers:
            conn = self._writers.pop()
            if not conn.is_closed():
                return conn
        try:
            conn = await asyncpg.connect(
                self._url,
                timeout=self._timeout or 10,
                command_timeout=self._timeout,
                **self._pooled,
            )
        except Exception as exc:  # refused, shutting down, timed out, TLS: all unreachable
            self._database_lost(type(exc).__name__)
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
        conn.add_query_logger(self._count_statement)
        return conn

    def _writer_done(self, conn: asyncpg.Connection) -> None:
        if not conn.is_closed():
            self._writers.append(conn)

    def _count_statement(self, _query: object) -> None:
        self._stats["statements"] += 1

    async def _apply(self, batch: list[WriteOp], touches: Touches) -> list[Any]:
        conn = await self._writer_conn()
        since = self._known.mark()  # notifications heard from here merge into its result
        try:
            return await self._apply_on(conn, batch, touches, since)
        except asyncpg.exceptions.DiskFullError as exc:  # SQLSTATE 53100: rolled back
            raise StorageFull(f"the database has no space left: {exc}") from None
        except asyncpg.exceptions.InsufficientResourcesError as exc:  # the rest of class 53
            raise Unavailable(f"the database is out of resources ({exc.sqlstate})") from None
        finally:
            self._writer_done(conn)  # unless it was lost or terminated on the way

    async def _apply_on(
        self, conn: asyncpg.Connection, batch: list[WriteOp], touches: Touches, since: int
    ) -> list[Any]:
        guarded = self._plan_guarded(batch, touches)
        if guarded is not None:
            outcomes = await self._write_guarded(conn, *guarded, since)
            if outcomes is not None:
                return outcomes
        for attempt in range(RETRIES):
            try:
                state, outcomes = await self._transaction(conn, batch, touches)
            except RETRYABLE:
                if attempt == RETRIES - 1:
                    raise Unavailable("database contention, retry") from None
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            except BaseException as exc:
                self._writer_failed(conn, exc)
                log.warning("batch transaction failed", error=type(exc).__name__)
                raise
            # Committed: from here on the outcomes stand, whatever else happens.
            if not self._database_up:
                self._database_back()
            self._committed(state, since)
            return outcomes
        raise AssertionError("unreachable")

    def _committed(self, state: Batch, since: int) -> None:
        """After COMMIT: what this relay now knows exactly, and who hears of removals.
        (Another relay's commit may have been heard since the batch began: ``Known.put``
        keeps the later tail.)"""
        self._stats["rows_written"] += state.written
        for meta in state.metas.values():
            self._known.put(meta, since)
            self._own(state, meta)
        for stream_id in state.removed:
            self._known.removed(stream_id)
            self._owned.drop(stream_id)
            if self._events is not None:
                self._events.deleted(stream_id)

    def _own(self, state: Batch, meta: StreamMeta) -> None:
        """Remember a stream this batch locked or wrote, with the producer states it knows:
        those it read or wrote now, plus what it knew before if nobody wrote in between."""
        sid = meta.stream_id
        producers = {pid: st for (stream, pid), st in state.producers.items() if stream == sid}
        before = self._owned.by_path.get(meta.path)
        locked = state.locked.get(sid)
        complete = sid in state.created
        if before is not None and before.meta.stream_id == sid:
            unchanged = locked is None or locked == (before.meta.tail, before.meta.closed)
            if unchanged:
                producers = {**before.producers, **producers}
                complete = complete or before.complete
        self._owned.put(Owned(meta, producers, complete))

    def _plan_guarded(
        self, batch: list[WriteOp], touches: Touches
    ) -> tuple[Batch, list[Any], dict[int, int]] | None:
        """Plan a batch against what this relay knows, if that is enough to skip the locks:
        only appends that all write, to streams it wrote last (no TTL, expiry or touches:
        other relays' reads change those), with every producer's state known. None: lock."""
        if touches:
            return None
        owned_streams = self._owned.by_path
        state = Batch()
        outcomes: list[Any] = []
        expected: dict[int, int] = {}
        for op in batch:
            if type(op) is not AppendOp:
                return None
            path, request = op.path, op.request
            meta = state.metas.get(path)
            owned = owned_streams.get(path)
            if owned is None or owned.meta.stream_id in self._diverged:
                return None
            if meta is None:
                meta = owned.meta
                if meta.ttl is not None or meta.expires_at is not None or meta.soft_deleted:
                    return None
                expected[meta.stream_id] = meta.tail
                state.metas[path] = meta
            producer_state = None
            if request.producer is not None:
                key = (meta.stream_id, request.producer.producer_id)
                if key in state.producers:
                    producer_state = state.producers[key]
                else:
                    known, producer_state = owned.producer(key[1])
                    if not known:
                        return None
                    state.producers[key] = producer_state
            try:
                result = stage_append(state, path, meta, producer_state, request, op.now)
            except ProtocolError:
                return None  # a refusal from a view that may be old: decide under the lock
            plan = result.plan
            if not plan.write:
                return None
            if plan.data and not state.rows.stage(meta.stream_id, result.start, plan.data):
                return None  # more than one statement's worth of rows
            outcomes.append(result)
        return state, outcomes, expected

    async def _write_guarded(
        self,
        conn: asyncpg.Connection,
        state: Batch,
        outcomes: list[Any],
        expected: dict[int, int],
        since: int,
    ) -> list[Any] | None:
        """The batch as one guarded statement; None if a stream changed underneath (then
        nothing of it was written and the caller takes the locking path)."""
        try:
            await self._write(conn, state, notify_payload(self._origin, state), expected=expected)
        except BaseException as exc:
            # RL001 (a tail moved), a chunk another relay wrote at the same offset, a deadlock
            # with it, or anything else the statement refused: it all rolled back together.
            self._writer_failed(conn, exc)
            self._guard_missed(state, exc)
            return None
        if not self._database_up:
            self._database_back()
        self._stats["guarded_writes"] += 1
        self._stats["appends"] += sum(1 for result in outcomes if result.plan.data)
        self._committed(state, since)
        return outcomes

    def _check_not_behind(self, meta: StreamMeta) -> None:
        """A locked row whose tail is below what this relay committed or heard for the same
        stream means the database lost acknowledged appends (a failover to a standby that
        was behind): tails never move back. Refuse writes to it from now on, loudly."""
        owned = self._owned.by_path.get(meta.path)
        views = (owned.meta if owned is not None else None, self._known.by_path.get(meta.path))
        seen = [v.tail for v in views if v is not None and v.stream_id == meta.stream_id]
        if meta.stream_id in self._diverged or not seen or max(seen) <= meta.tail:
            return
        self._diverged.add(meta.stream_id)
        self._stats["diverged"] += 1
        log.error(
            "database is behind what this relay acknowledged; refusing writes to the stream",
            path=meta.path,
            acknowledged_tail=max(seen),
            database_tail=meta.tail,
        )

    def _writer_failed(self, conn: asyncpg.Connection, exc: BaseException) -> None:
        """After a failed statement on the committer's connection: a connection that is gone
        means the database is (Unavailable); cancellation and the like propagate; anything
        else is the caller's to handle (the statement, or its transaction, rolled back)."""
        lost = connection_lost(exc) or conn.is_closed()
        if lost or not isinstance(exc, Exception):
            conn.terminate()  # so it is not handed back
        if lost:
            self._database_lost(type(exc).__name__)
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
        if not isinstance(exc, Exception):
            raise exc

    def _guard_missed(self, state: Batch, exc: BaseException) -> None:
        """Counted; the locking re-run replaces what this relay knew (and compares it first:
        a database behind it means lost appends, see ``_check_not_behind``)."""
        self._stats["guard_misses"] += 1
        sqlstate = getattr(exc, "sqlstate", None)
        log.debug("guarded write refused, locking", error=type(exc).__name__, sqlstate=sqlstate)
        return None

    async def _transaction(
        self, conn: asyncpg.Connection, batch: list[WriteOp], touches: Touches
    ) -> tuple[Batch, list[Any]]:
        state = Batch()
        outcomes: list[Any] = []
        async with conn.transaction():
            await self._lock(conn, state, batch, touches)
            for op in batch:
                try:
                    outcomes.append(await self._dispatch(conn, state, op))
                except ProtocolError as exc:
                    outcomes.append(exc)
            changed = state.moved or state.removed or state.retained
            notify = notify_payload(self._origin, state) if changed else None
            await self._write(conn, state, notify)
        return state, outcomes

    async def _dispatch(self, conn: asyncpg.Connection, state: Batch, op: WriteOp) -> Any:
        match op:
            case AppendOp(path, request, now):
                return await self._do_append(conn, state, path, request, now)
            case CreateOp(request, now):
                return await self._do_create(conn, state, request, now)
            case DeleteOp(path, now, revoke):
                return await self._do_delete(conn, state, path, now, revoke)
            case ReapOp(now):
                return await self._do_reap(conn, state, now)
            case RetainOp(path, offset, now):
                return await self._do_retain(conn, state, path, offset, now)

    async def _lock(
        self, conn: asyncpg.Connection, state: Batch, batch: list[WriteOp], touches: Touches
    ) -> None:
        """Lock the streams the batch appends to and those it touches, in id order, apply the
        touches (first, so a stream read before this batch is never reaped by it), then load
        the state of the producers the appends name (a second statement, so it sees what the
        lock's previous holder committed)."""
        appends = [op for op in batch if isinstance(op, AppendOp)]
        paths = {op.path for op in appends}
        if not paths and not touches:
            return
        touched = sorted({stream_id for stream_id, _ in touches.values()})
        for row in await conn.fetch(LOCK, sorted(paths), touched):
            if row["path"] in paths:
                meta = await with_segments(conn, row_meta(row))
                state.metas[meta.path] = meta
                state.locked[meta.stream_id] = (meta.tail, meta.closed)
                self._check_not_behind(meta)
        if touches:
            await conn.execute(
                "UPDATE relay_streams s SET last_access = greatest(s.last_access, t.at) "
                "FROM unnest($1::bigint[], $2::float8[]) AS t(id, at) WHERE s.id = t.id",
                [v[0] for v in touches.values()],
                [v[1] for v in touches.values()],
            )
            for path, (_, when) in touches.items():
                locked = state.metas.get(path)
                if locked is not None and when > locked.last_access:
                    state.metas[path] = replace(locked, last_access=when)
        wanted = {
            (state.metas[op.path].stream_id, op.request.producer.producer_id)
            for op in appends
            if op.request.producer and op.path in state.metas
        }
        if not wanted:
            return
        ids = sorted({key[0] for key in wanted})
        names = sorted({key[1] for key in wanted})
        state.producers = dict.fromkeys(wanted)  # named but not found: known to be absent
        for row in await conn.fetch(PRODUCERS, ids, names):
            state.producers[(row[0], row[1])] = ProducerState(row[2], row[3], decode_acks(row[4]))

    async def _producer(
        self, conn: asyncpg.Connection, state: Batch, key: tuple[int, str]
    ) -> ProducerState | None:
        """A producer's state, read under its stream's lock when the batch start missed it
        (a stream created meanwhile, here or by another relay)."""
        if key not in state.producers:
            row = await conn.fetchrow(
                "SELECT epoch, last_seq, acks FROM relay_producers "
                "WHERE stream_id = $1 AND producer_id = $2",
                *key,
            )
            state.producers[key] = (
                ProducerState(row[0], row[1], decode_acks(row[2])) if row else None
            )
        return state.producers[key]

    async def _write(
        self,
        conn: asyncpg.Connection,
        state: Batch,
        notify: str | None = None,
        *,
        expected: dict[int, int] | None = None,
    ) -> None:
        """Everything staged (rows, stream updates, producer states) and the batch's NOTIFY,
        as one statement: one round trip however many streams the batch touched. With
        ``expected`` (stream id -> tail it must still have) it is the guarded write."""
        rows = state.rows.drain()
        metas = sorted(state.stream_updates.values(), key=lambda m: m.stream_id)  # lock order
        keys = list(state.producer_writes)
        if not rows and not metas and not keys and notify is None:
            return
        producers = [state.producer_writes[k] for k in keys]
        guard = () if expected is None else ([expected[m.stream_id] for m in metas],)
        await conn.execute(
            WRITE if expected is None else GUARDED_WRITE,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [m.stream_id for m in metas],
            [m.tail for m in metas],
            [m.closed for m in metas],
            [m.last_access for m in metas],
            [m.stream_seq for m in metas],
            [m.closed_by.producer_id if m.closed_by else None for m in metas],
            [m.closed_by.epoch if m.closed_by else None for m in metas],
            [m.closed_by.seq if m.closed_by else None for m in metas],
            [k[0] for k in keys],
            [k[1] for k in keys],
            [p.epoch for p in producers],
            [p.last_seq for p in producers],
            CHANNEL,
            notify,
            [encode_acks(p.acks) for p in producers],
            [m.successor for m in metas],
            *guard,
        )
        state.written += len(rows)
        state.stream_updates.clear()
        state.producer_writes.clear()

    # -- operations (inside the batch transaction) -------------------------------------------

    async def _do_append(
        self,
        conn: asyncpg.Connection,
        state: Batch,
        path: str,
        request: AppendRequest,
        now: float,
    ) -> AppendResult:
        meta = state.metas.get(path)
        if meta is None:  # created earlier in this batch, or missing
            meta = await self._load(conn, path, lock=True)
            if meta is None:
                raise NotFound()
            state.metas[path] = meta
            state.locked[meta.stream_id] = (meta.tail, meta.closed)
            self._check_not_behind(meta)
        if meta.stream_id in self._diverged:
            raise StreamDiverged()
        key = (meta.stream_id, request.producer.producer_id) if request.producer else None
        producer_state = await self._producer(conn, state, key) if key else None
        result = stage_append(state, path, meta, producer_state, request, now)
        data = result.plan.data
        if result.plan.write and data:
            if not state.rows.stage(meta.stream_id, result.start, data):
                await self._write(conn, state)
                state.rows.stage(meta.stream_id, result.start, data)
            self._stats["appends"] += 1
        return result

    async def _do_create(
        self, conn: asyncpg.Connection, state: Batch, request: CreateRequest, now: float
    ) -> CreateResult:
        await self._write(conn, state)  # a fork may read what this batch appended
        existing = await self._load(conn, request.path, lock=True)
        if existing is not None and not existing.soft_deleted and is_expired(existing, now):
            await self._remove(conn, state, existing)
            existing = None
        source = None
        if request.fork is not None:
            source = await self._load(conn, request.fork.source_path, lock=True)
            if source is None or (not source.soft_deleted and is_expired(source, now)):
                raise NotFound("fork source not found")
        outcome = plan_create(existing, source, request)
        if isinstance(outcome, StreamMeta):
            return CreateResult(outcome, created=False)
        row = await conn.fetchrow(
            "INSERT INTO relay_streams (path, content_type, tail, closed, ttl, expires_at, "
            "last_access, created_at, last_append, source_id, forked_from, fork_offset, "
            "retained_from) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $7, $8, $9, $10, $11) "
            f"ON CONFLICT (path) DO NOTHING RETURNING {META_COLUMNS}",
            request.path,
            outcome.content_type,
            outcome.fork_offset + len(outcome.data),
            outcome.closed,
            outcome.expiry.ttl,
            outcome.expiry.expires_at,
            now,
            source.stream_id if source else None,
            source.path if source else None,
            outcome.fork_offset,
            outcome.retained_from,
        )
        if row is None:  # another relay created it concurrently: judge against theirs
            raced = await self._load(conn, request.path, lock=True)
            if raced is None:
                raise Unavailable("stream creation raced with a delete; retry")
            again = plan_create(raced, source, request)
            assert isinstance(again, StreamMeta)
            return CreateResult(again, created=False)
        meta = await with_segments(conn, row_meta(row))
        state.metas[meta.path] = meta
        state.created.add(meta.stream_id)
        if outcome.data:
            state.rows.stage(meta.stream_id, outcome.fork_offset, outcome.data)
            self._stats["appends"] += 1
        return CreateResult(meta, created=True)

    async def _do_delete(
        self,
        conn: asyncpg.Connection,
        state: Batch,
        path: str,
        now: float,
        revoke: Revocation | None = None,
    ) -> StreamMeta:
        await self._write(conn, state)
        meta = await self._load(conn, path, lock=True)
        if meta is None:
            raise NotFound()
        check_visible(meta, now)
        if revoke is not None:
            found = await conn.fetch(INHERITING, meta.stream_id, revoke.offset)
            doomed = refuse_inherited([(r[0], r[1]) for r in found], revoke.forks)
            if doomed:
                state.removed.extend(doomed)
                for fork_path in (r[1] for r in found):
                    state.metas.pop(fork_path, None)
                for table, column in (
                    ("relay_chunks", "stream_id"),
                    ("relay_producers", "stream_id"),
                    ("relay_streams", "id"),
                ):
                    await conn.execute(
                        f"DELETE FROM {table} WHERE {column} = ANY($1::bigint[])", doomed
                    )
        await self._remove(conn, state, meta)
        state.metas.pop(path, None)
        return meta

    async def _do_retain(
        self, conn: asyncpg.Connection, state: Batch, path: str, offset: int, now: float
    ) -> StreamMeta:
        """Advance the horizon under the stream's lock; delete the rows nobody can read now
        (before it and before every descendant fork's own horizon)."""
        await self._write(conn, state)
        meta = await self._load(conn, path, lock=True)
        if meta is None:
            raise NotFound()
        check_visible(meta, now)
        before = await read_range(conn, meta, offset - 1, offset) if offset > 0 else b""
        horizon = plan_horizon(meta, offset, before)
        if horizon is None:
            return meta
        await conn.execute(
            "UPDATE relay_streams SET retained_from = $2 WHERE id = $1", meta.stream_id, horizon
        )
        floor = await conn.fetchval(RETENTION_LIMIT, meta.stream_id)
        await conn.execute(
            "DELETE FROM relay_chunks WHERE stream_id = $1 AND end_pos <= $2",
            meta.stream_id,
            horizon if floor is None else min(horizon, floor),
        )
        after = replace(meta, retained_from=horizon)
        state.metas[path] = after
        state.retained.append(meta.stream_id)
        return after

    async def _do_reap(self, conn: asyncpg.Connection, state: Batch, now: float) -> int:
        await self._write(conn, state)
        rows = await conn.fetch(
            f"SELECT {META_COLUMNS} FROM relay_streams WHERE NOT soft_deleted AND ("
            "(expires_at IS NOT NULL AND expires_at <= $1) OR "
            "(ttl IS NOT NULL AND last_access + ttl <= $1)) "
            "ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED",
            now,
        )
        for row in rows:
            meta = row_meta(row)
            await self._remove(conn, state, meta)
            state.metas.pop(meta.path, None)
        orphans = await conn.fetch(
            "SELECT id FROM relay_streams s WHERE soft_deleted AND NOT EXISTS "
            "(SELECT 1 FROM relay_streams f WHERE f.source_id = s.id) "
            "LIMIT 1000 FOR UPDATE SKIP LOCKED"
        )
        for row in orphans:
            await self._purge(conn, row[0])
        return len(rows)

    async def _remove(self, conn: asyncpg.Connection, state: Batch, meta: StreamMeta) -> None:
        """Soft-delete while forks reference the stream, erasing every byte no fork inherits;
        otherwise purge and cascade."""
        state.removed.append(meta.stream_id)
        state.moved.pop(meta.stream_id, None)
        inherited = await conn.fetchval(
            "SELECT max(fork_offset) FROM relay_streams WHERE source_id = $1", meta.stream_id
        )
        if inherited is not None:
            await conn.execute(
                "UPDATE relay_streams SET soft_deleted = true WHERE id = $1", meta.stream_id
            )
            for statement in ERASE_BEYOND:
                await conn.execute(statement, meta.stream_id, inherited)
            return
        await self._purge(conn, meta.stream_id)

    async def _purge(self, conn: asyncpg.Connection, stream_id: int) -> None:
        doomed = [row[0] for row in await conn.fetch(PURGE_CHAIN, stream_id)]
        for table, column in (
            ("relay_chunks", "stream_id"),
            ("relay_producers", "stream_id"),
            ("relay_streams", "id"),
        ):
            await conn.execute(f"DELETE FROM {table} WHERE {column} = ANY($1::bigint[])", doomed)

    async def _load(
        self, conn: asyncpg.Connection, path: str, *, lock: bool = False
    ) -> StreamMeta | None:
        suffix = " FOR UPDATE" if lock else ""
        row = await conn.fetchrow(
            f"SELECT {META_COLUMNS} FROM relay_streams WHERE path = $1{suffix}", path
        )
        return await with_segments(conn, row_meta(row)) if row else None

    # -- LISTEN ------------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        """One LISTEN connection per process, re-established with backoff when lost."""
        delay = 0.1
        connected_before = False
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._direct_url, timeout=self._timeout or 10)
            except (*DISCONNECTS, asyncpg.PostgresError) as exc:
                self._database_lost(type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if connected_before:
                self._stats["listen_reconnects"] += 1
                log.info("listen connection re-established", channel=CHANNEL)
            connected_before = True
            self._database_back()
            if self._replicas is not None:
                with contextlib.suppress(*DISCONNECTS):
                    await self._replicas.follow(conn)  # a failover may have changed timelines
            try:
                conn.add_termination_listener(lambda _c, event=lost: event.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                # Whatever committed while we were not listening: forget what we knew and let
                # readers re-check.
                self._known.clear()
                self._forget_held()
                self._listen_conn = conn
                self._listening = True
                self._wake_watched()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                    if not lost.is_set() and not await self._notified():  # the keepalive
                        lost.set()
            except (*DISCONNECTS, asyncpg.PostgresError):
                await asyncio.sleep(delay)  # lost while subscribing: connect again
            finally:
                if lost.is_set():  # not on cancellation: that is the store closing
                    log.warning("listen connection lost", channel=CHANNEL)
                self._listening = False
                self._listen_conn = None
                self._known.clear()
                self._forget_held()  # the pool may reconnect first, perhaps to a new primary
                if self._replicas is not None:
                    self._replicas.forget()  # until LISTEN is back on whichever is primary
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """Another relay committed: what this relay knows follows, then its listener hears.
        (The caches must follow even with no listener: reads answer from them.)"""
        origin, _, body = payload.partition("|")
        events = self._events
        if origin == self._origin:
            return
        if body == "*":
            self._known.clear()
            self._owned.clear()
            self._wake_watched()
            return
        for sid, tail, flag in parse_payload(body):
            self._owned.drop(sid)  # another relay wrote it: lock before writing again
            if flag == "d":
                self._known.removed(sid)
                if events is not None:
                    events.deleted(sid)
            elif flag == "r":  # the horizon moved: this relay's copy may never answer again
                self._known.removed(sid)
            else:
                self._known.moved(sid, tail, flag == "1")
                if events is not None:
                    events.remote_commit(sid, tail, flag == "1")

    def _forget_held(self) -> None:
        if self._events is not None:
            self._events.forget_held()

    def _wake_watched(self) -> None:
        ids = list(self._events.watched_ids()) if self._events is not None else []
        if ids:
            self._spawn(self._refresh(ids))

    async def _refresh(self, ids: list[int]) -> None:
        """Re-read watched streams after missed notifications: tails, and which are gone."""
        with contextlib.suppress(*OFFLINE):
            async with self._conn() as conn:
                rows = await conn.fetch(
                    "SELECT id, tail, closed FROM relay_streams "
                    "WHERE id = ANY($1::bigint[]) AND NOT soft_deleted",
                    ids,
                )
            events = self._events
            if events is None:
                return
            alive = set()
            for row in rows:
                alive.add(row[0])
                events.remote_commit(row[0], row[1], row[2])
            for sid in ids:
                if sid not in alive:
                    events.deleted(sid)

    # -- compaction --------------------------------------------------------------------------

    async def _compact_forever(self) -> None:
        while True:
            await asyncio.sleep(self._compact_interval)
            try:
                await self.compact(self._clock())
            except OFFLINE:
                continue
            except Exception:
                log.exception("compaction failed")

    async def compact(self, now: float, *, budget: int = COMPACT_PASS_BYTES) -> CompactionPass:
        """One compaction pass (``compaction.compact_pass``), counted in the store's stats."""
        async with self._conn() as conn:
            done = await compact_pass(conn, now, self._compact_idle, budget)
        self._stats["rows_compacted"] += done.rows_removed
        self._stats["bytes_compacted"] += done.bytes_read
        self._stats["compaction_passes"] += 1
        return done
