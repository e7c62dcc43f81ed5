"""The Postgres store: asyncpg, group commit, LISTEN/NOTIFY across relays, compaction.

Writes go through :class:`relay.store.batching.Committer`: every operation queued while the
previous commit was in flight runs in one transaction. The batch locks the stream rows it
touches (``FOR UPDATE``, in id order so relays never deadlock), runs the protocol's decisions in
Python against that locked state, writes all appends to a stream in the batch as one row, and
sends one ``NOTIFY`` listing the streams that moved. Each relay LISTENs on one connection and
tells its hub, which wakes that stream's parked readers.

A compactor merges small rows of closed or idle streams into rows of up to ``COMPACT_BYTES``;
it deletes and inserts in one transaction, so a reader's single SELECT sees either the old rows
or the merged one, never a gap or an overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import asyncpg
import structlog

from protocol.append import AppendRequest, decide_append
from protocol.create import CreateRequest, plan_create
from protocol.errors import NotFound, ProtocolError, Unavailable
from protocol.lifecycle import check_visible, is_expired
from protocol.model import ProducerState, StreamMeta, fork_segments
from relay.store.base import (
    AppendResult,
    CreateResult,
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
    Touches,
    WriteOp,
)
from relay.store.common import (
    META_COLUMNS,
    StagedRows,
    after_append,
    numbered_sql,
    purge_chain_sql,
    resolve_fork,
    row_meta,
    segment_ranges,
    stitch,
)

log = structlog.get_logger("relay.postgres")

CHANNEL = "relay_commits"
NOTIFY_LIMIT = 7900  # Postgres caps a payload at 8000 bytes
COMPACT_BYTES = 1024 * 1024
COMPACT_PASS_BYTES = 16 * COMPACT_BYTES  # read per compaction pass, per relay
COMPACT_CANDIDATES = 100
RETRIES = 3
MIGRATION_LOCK = 0x52454C4159  # pg_advisory_lock key: "RELAY"

_PURGE_CHAIN = purge_chain_sql("relay_streams", "$1")
_CHAIN = """
WITH RECURSIVE chain(id, fork_offset, source_id, depth) AS (
    SELECT id, fork_offset, source_id, 0 FROM relay_streams WHERE id = $1
    UNION ALL
    SELECT s.id, s.fork_offset, s.source_id, c.depth + 1
    FROM relay_streams s JOIN chain c ON s.id = c.source_id
)
SELECT id, fork_offset FROM chain ORDER BY depth
"""

_LOCK = (
    f"SELECT {META_COLUMNS} FROM relay_streams "
    "WHERE path = ANY($1::text[]) OR id = ANY($2::bigint[]) ORDER BY id FOR UPDATE"
)
"""Every row a batch changes up front, locked in one id-ordered pass so relays never deadlock."""
_PRODUCERS = """
SELECT stream_id, producer_id, epoch, last_seq FROM relay_producers
WHERE stream_id = ANY($1::bigint[]) AND producer_id = ANY($2::text[])
"""
"""Run after _LOCK, never inside it: in READ COMMITTED a statement's snapshot is taken before
it waits for a lock, so producer state read by the locking statement could miss what the lock's
previous holder (another relay) committed."""
_WRITE = """
WITH chunks AS (
    INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[])
), streams AS (
    UPDATE relay_streams s SET tail = u.tail, closed = u.closed,
        last_access = greatest(s.last_access, u.at), last_append = u.at, stream_seq = u.seq,
        compact_pending = true,
        closed_by_id = u.cid, closed_by_epoch = u.cepoch, closed_by_seq = u.cseq
    FROM unnest($5::bigint[], $6::bigint[], $7::bool[], $8::float8[], $9::text[], $10::text[],
                $11::bigint[], $12::bigint[]) AS u(id, tail, closed, at, seq, cid, cepoch, cseq)
    WHERE s.id = u.id
), producers AS (
    INSERT INTO relay_producers (stream_id, producer_id, epoch, last_seq)
    SELECT * FROM unnest($13::bigint[], $14::text[], $15::bigint[], $16::bigint[])
    ON CONFLICT (stream_id, producer_id) DO UPDATE
    SET epoch = excluded.epoch, last_seq = excluded.last_seq
)
SELECT pg_notify($17, $18) WHERE $18::text IS NOT NULL
"""
"""A batch's writes in one statement (data-modifying CTEs all apply; one round trip)."""
_GUARDED_WRITE = """
WITH streams AS (
    UPDATE relay_streams s SET tail = u.tail, closed = u.closed,
        last_access = greatest(s.last_access, u.at), last_append = u.at, stream_seq = u.seq,
        compact_pending = true,
        closed_by_id = u.cid, closed_by_epoch = u.cepoch, closed_by_seq = u.cseq
    FROM unnest($5::bigint[], $6::bigint[], $7::bool[], $8::float8[], $9::text[], $10::text[],
                $11::bigint[], $12::bigint[], $19::bigint[])
        AS u(id, tail, closed, at, seq, cid, cepoch, cseq, expected)
    WHERE s.id = u.id AND s.tail = u.expected AND NOT s.closed AND NOT s.soft_deleted
    RETURNING s.id
), chunks AS (
    INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[])
), producers AS (
    INSERT INTO relay_producers (stream_id, producer_id, epoch, last_seq)
    SELECT * FROM unnest($13::bigint[], $14::text[], $15::bigint[], $16::bigint[])
    ON CONFLICT (stream_id, producer_id) DO UPDATE
    SET epoch = excluded.epoch, last_seq = excluded.last_seq
)
SELECT pg_notify($17, $18)
FROM (SELECT relay_guard((SELECT count(*) FROM streams) = cardinality($5::bigint[]))) AS checked
"""
"""The whole batch in one implicit transaction, committed in the same round trip, provided
every stream it writes still has the tail this relay planned against (else RL001 rolls it all
back). Producer state and ``Stream-Seq`` change only with a stream's tail or closure, so an
unchanged tail means the producer states the plan used are the database's too."""

_DISCONNECTS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.OperatorInterventionError,
)
_OFFLINE: tuple[type[BaseException], ...] = (Unavailable, *_DISCONNECTS)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook: skip asyncpg's reset query (``RESET ALL``, ``UNLISTEN *``, ...).

    Pooled connections only run reads and self-contained transactions; they never change
    session state, and the reset was a round trip per lookup (29% of the relay's CPU under the
    chat workload). asyncpg still rolls back any transaction left open before this runs.
    """


def _lost(exc: BaseException) -> bool:
    """The database connection is gone (503), as opposed to a query it refused.

    asyncpg's DataError (input it cannot encode, such as a string that is not UTF-8) is an
    InterfaceError too, but the request is at fault, not the connection.
    """
    return isinstance(exc, _DISCONNECTS) and not isinstance(exc, asyncpg.DataError)


_RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


def _migrations() -> list[tuple[int, str]]:
    """``sql/postgres/NNN_name.sql``, in order: how an existing database reaches the newest."""
    return numbered_sql("postgres")


def _schema() -> str:
    """``sql/postgres/schema.sql``: the newest schema in one piece, for empty databases."""
    return (resources.files("relay.store") / "sql" / "postgres" / "schema.sql").read_text()


async def apply_migrations(conn: asyncpg.Connection, *, fresh_from_schema: bool = True) -> int:
    """Bring the schema to the newest version; safe when several relays start at once.

    An empty database gets ``schema.sql`` in one step (and every migration recorded as
    applied); an older one runs the migrations it lacks. A test proves both paths end in the
    same schema. ``fresh_from_schema=False`` forces the step-by-step path (for that test).
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS relay_schema_version (version INT PRIMARY KEY)"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM relay_schema_version")
        migrations = _migrations()
        if current == 0 and fresh_from_schema:
            async with conn.transaction():
                await conn.execute(_schema())
                await conn.executemany(
                    "INSERT INTO relay_schema_version VALUES ($1)", [(v,) for v, _ in migrations]
                )
            return migrations[-1][0]
        for version, sql in migrations:
            if version <= current:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO relay_schema_version VALUES ($1)", version)
            current = version
        return int(current)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def migrate(url: str) -> int:
    """``relay migrate``: apply migrations and report the schema version."""
    conn = await asyncpg.connect(url)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()


async def revoke(url: str, kind: str, value: str) -> None:
    """``relay revoke``: add a credential to ``relay_revocations`` (polled by every relay)."""
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
        await conn.execute(
            "INSERT INTO relay_revocations (kind, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            kind,
            value,
        )
    finally:
        await conn.close()


@dataclass
class _Batch:
    """What one transaction has staged, and what the listeners learn once it commits."""

    rows: StagedRows = field(default_factory=StagedRows)
    moved: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id -> (tail, closed)
    removed: list[int] = field(default_factory=list)  # ids deleted, soft-deleted or expired
    metas: dict[str, StreamMeta] = field(default_factory=dict)  # locked this transaction
    producers: dict[tuple[int, str], ProducerState | None] = field(default_factory=dict)
    producer_writes: dict[tuple[int, str], ProducerState] = field(default_factory=dict)
    stream_updates: dict[int, StreamMeta] = field(default_factory=dict)
    locked: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id -> (tail, closed)
    created: set[int] = field(default_factory=set)  # no producer has state on these yet
    written: int = 0


@dataclass(frozen=True, slots=True)
class _Owned:
    """A stream exactly as this relay's last commit to it left it, and the producer states it
    knows for it (``complete``: no other producer has state, as for a stream it created)."""

    meta: StreamMeta
    producers: dict[str, ProducerState | None]
    complete: bool = False

    def producer(self, producer_id: str) -> tuple[bool, ProducerState | None]:
        """(known, state) of one producer."""
        if producer_id in self.producers:
            return True, self.producers[producer_id]
        return self.complete, None


class _OwnedStreams:
    """What lets a batch skip the locks: streams this relay wrote last, as it wrote them.

    Only a guess: the guarded write checks every tail it relies on in the database. Another
    relay's commit (its NOTIFY), a removal or a failed guard drops an entry.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.by_path: dict[str, _Owned] = {}
        self._paths: dict[int, str] = {}
        self._limit = limit

    def put(self, owned: _Owned) -> None:
        if len(self.by_path) >= self._limit and owned.meta.path not in self.by_path:
            self.clear()
        self.by_path[owned.meta.path] = owned
        self._paths[owned.meta.stream_id] = owned.meta.path

    def drop(self, stream_id: int) -> None:
        path = self._paths.pop(stream_id, None)
        if path is not None:
            owned = self.by_path.get(path)
            if owned is not None and owned.meta.stream_id == stream_id:
                del self.by_path[path]

    def drop_path(self, path: str) -> None:
        owned = self.by_path.pop(path, None)
        if owned is not None:
            self._paths.pop(owned.meta.stream_id, None)

    def clear(self) -> None:
        self.by_path.clear()
        self._paths.clear()


class _Known:
    """Streams as of the last commit or notification this relay saw: never fresher than the
    database, but any later commit reaches it (local commits, NOTIFY) while LISTEN is up."""

    def __init__(self, limit: int = 100_000) -> None:
        self.by_path: dict[str, StreamMeta] = {}
        self._paths: dict[int, str] = {}
        self._gone: set[int] = set()  # removed ids: a lookup that began earlier must not revive one
        self._limit = limit

    def put(self, meta: StreamMeta) -> None:
        if meta.stream_id in self._gone:
            return
        known = self.by_path.get(meta.path)
        if known is not None and known.stream_id > meta.stream_id:
            return  # a lookup that began before the path was re-created
        if known is not None and known.stream_id == meta.stream_id:
            # Tails only grow and closing is final: keep whichever view saw more.
            if known.tail > meta.tail or known.closed > meta.closed:
                closed = known.closed or meta.closed
                meta = replace(meta, tail=max(known.tail, meta.tail), closed=closed)
        elif len(self.by_path) >= self._limit:
            self.clear()
        self.by_path[meta.path] = meta
        self._paths[meta.stream_id] = meta.path

    def moved(self, stream_id: int, tail: int, closed: bool) -> None:
        path = self._paths.get(stream_id)
        known = self.by_path.get(path) if path is not None else None
        if known is not None and known.stream_id == stream_id:
            self.by_path[known.path] = replace(
                known, tail=max(known.tail, tail), closed=known.closed or closed
            )

    def removed(self, stream_id: int) -> None:
        if len(self._gone) >= self._limit:
            self.clear()
        self._gone.add(stream_id)
        path = self._paths.pop(stream_id, None)
        known = self.by_path.get(path) if path is not None else None
        if known is not None and known.stream_id == stream_id:
            del self.by_path[known.path]

    def clear(self) -> None:
        self.by_path.clear()
        self._paths.clear()
        self._gone.clear()


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
    ) -> None:
        self._url = url
        self._timeout = command_timeout or None
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._committer = Committer(
            self._apply,
            max_ops=max_batch_ops,
            max_bytes=max_batch_bytes,
            min_interval=commit_interval,
        )
        self._writer: asyncpg.Connection | None = None  # owned by the committer alone
        self._max_fork_scan = max_fork_scan
        self._origin = uuid.uuid4().hex[:12]
        self._events: StoreEvents | None = None
        self._known = _Known()
        self._owned = _OwnedStreams()
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

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self._url, timeout=self._timeout or 10)
        except (*_DISCONNECTS, asyncpg.PostgresError) as exc:
            raise StoreStartupError(f"cannot reach Postgres: {exc}") from None
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=1,
            max_size=self._pool_size,
            command_timeout=self._timeout,
            timeout=self._timeout or 10,
            reset=_keep_session,
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
        if self._writer is not None:
            self._writer.terminate()  # idle between batches: nothing to flush
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self._timeout or 10)
            except (*_DISCONNECTS, asyncpg.PostgresError):
                self._pool.terminate()  # connections already lost: nothing left to flush

    def set_listener(self, events: StoreEvents) -> None:
        self._events = events
        self._committer.events = events

    def stats(self) -> StoreStats:
        pool = self._pool
        size = pool.get_size() if pool is not None else 0
        base = self._committer.stats()
        counts = self._stats
        return replace(
            base,
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
            pool_in_use=size - pool.get_idle_size() if pool is not None else 0,
            pool_size=size,
        )

    async def ready(self) -> str | None:
        """Ready when a pooled connection answers and the schema is at this relay's version."""
        if self._pool is None:
            return "store is not open"
        try:
            async with self._conn() as conn:
                version = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) FROM relay_schema_version"
                )
        except Unavailable as exc:
            return str(exc)
        except asyncpg.PostgresError as exc:
            return f"database error: {type(exc).__name__}"
        wanted = _migrations()[-1][0]
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
        """A pooled connection; losing the database becomes Unavailable (503)."""
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except _DISCONNECTS as exc:
            if not _lost(exc):
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

    async def delete(self, path: str, now: float) -> StreamMeta:
        result: StreamMeta = await self._committer.submit(DeleteOp(path, now))
        return result

    async def reap(self, now: float) -> int:
        result: int = await self._committer.submit(ReapOp(now))
        return result

    async def head(self, path: str, now: float, *, touch: bool) -> StreamMeta:
        meta = await self._known_fresh(path, now)
        if meta is None:
            meta = await self._shared_load(path)
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
        caller waiting for it) ``_known`` is as fresh as a query would be. What no NOTIFY
        announces stays with the database: a soft-deleted stream (it may be purged and its
        path re-created) and a TTL stream that looks expired (other relays' reads extend it).
        """
        if not self._listening or path not in self._known.by_path:
            return None
        if not await self._notified():
            return None
        meta = self._known.by_path.get(path)
        if meta is None or meta.soft_deleted or (meta.ttl is not None and is_expired(meta, now)):
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
        return await waiter

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
                    with contextlib.suppress(*_DISCONNECTS, asyncpg.PostgresError):
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
                    meta = await self._load_pooled(path)
                    if meta is not None and listening and self._listening:
                        self._known.put(meta)
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
        if start >= end:
            return b""
        async with self._conn() as conn:
            return await _read_range(conn, meta, start, end)

    # -- the batch transaction ---------------------------------------------------------------

    async def _writer_conn(self) -> asyncpg.Connection:
        """The committer's own connection: no pool acquire or reset per batch, and nothing
        after COMMIT that could fail and turn a committed batch into an error."""
        if self._writer is None or self._writer.is_closed():
            try:
                self._writer = await asyncpg.connect(
                    self._url, timeout=self._timeout or 10, command_timeout=self._timeout
                )
                self._writer.add_query_logger(self._count_statement)
            except Exception as exc:  # refused, shutting down, timed out, TLS: all unreachable
                self._database_lost(type(exc).__name__)
                raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
        return self._writer

    def _count_statement(self, _query: object) -> None:
        self._stats["statements"] += 1

    async def _apply(self, batch: list[WriteOp], touches: Touches) -> list[Any]:
        guarded = self._plan_guarded(batch, touches)
        if guarded is not None:
            outcomes = await self._write_guarded(*guarded)
            if outcomes is not None:
                return outcomes
        for attempt in range(RETRIES):
            conn = await self._writer_conn()
            try:
                state, outcomes = await self._transaction(conn, batch, touches)
            except _RETRYABLE:
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
            self._committed(state)
            return outcomes
        raise AssertionError("unreachable")

    def _committed(self, state: _Batch) -> None:
        """After COMMIT: what this relay now knows exactly, and who hears of removals."""
        self._stats["rows_written"] += state.written
        for meta in state.metas.values():
            self._known.put(meta)
            self._own(state, meta)
        for stream_id in state.removed:
            self._known.removed(stream_id)
            self._owned.drop(stream_id)
            if self._events is not None:
                self._events.deleted(stream_id)

    def _own(self, state: _Batch, meta: StreamMeta) -> None:
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
        self._owned.put(_Owned(meta, producers, complete))

    def _plan_guarded(
        self, batch: list[WriteOp], touches: Touches
    ) -> tuple[_Batch, list[Any], dict[int, int]] | None:
        """Plan a batch against what this relay knows, if that is enough to skip the locks:
        only appends that all write, to streams it wrote last (no TTL, expiry or touches:
        other relays' reads change those), with every producer's state known. None: lock."""
        if touches:
            return None
        owned_streams = self._owned.by_path
        state = _Batch()
        outcomes: list[Any] = []
        expected: dict[int, int] = {}
        for op in batch:
            if type(op) is not AppendOp:
                return None
            path, request = op.path, op.request
            meta = state.metas.get(path)
            owned = owned_streams.get(path)
            if owned is None:
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
                result = _stage_append(state, path, meta, producer_state, request, op.now)
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
        self, state: _Batch, outcomes: list[Any], expected: dict[int, int]
    ) -> list[Any] | None:
        """The batch as one guarded statement; None if a stream changed underneath (then
        nothing of it was written and the caller takes the locking path)."""
        conn = await self._writer_conn()
        try:
            await self._write(conn, state, self._payload(state), expected=expected)
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
        self._committed(state)
        return outcomes

    def _writer_failed(self, conn: asyncpg.Connection, exc: BaseException) -> None:
        """After a failed statement on the committer's connection: a connection that is gone
        means the database is (Unavailable); cancellation and the like propagate; anything
        else is the caller's to handle (the statement, or its transaction, rolled back)."""
        lost = _lost(exc) or conn.is_closed()
        if lost or not isinstance(exc, Exception):
            conn.terminate()
            self._writer = None
        if lost:
            self._database_lost(type(exc).__name__)
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
        if not isinstance(exc, Exception):
            raise exc

    def _guard_missed(self, state: _Batch, exc: BaseException) -> None:
        self._stats["guard_misses"] += 1
        sqlstate = getattr(exc, "sqlstate", None)
        log.debug("guarded write refused, locking", error=type(exc).__name__, sqlstate=sqlstate)
        for path in state.metas:
            self._owned.drop_path(path)
        return None

    async def _transaction(
        self, conn: asyncpg.Connection, batch: list[WriteOp], touches: Touches
    ) -> tuple[_Batch, list[Any]]:
        state = _Batch()
        outcomes: list[Any] = []
        async with conn.transaction():
            await self._lock(conn, state, batch, touches)
            for op in batch:
                try:
                    outcomes.append(await self._dispatch(conn, state, op))
                except ProtocolError as exc:
                    outcomes.append(exc)
            notify = self._payload(state) if state.moved or state.removed else None
            await self._write(conn, state, notify)
        return state, outcomes

    async def _dispatch(self, conn: asyncpg.Connection, state: _Batch, op: WriteOp) -> Any:
        match op:
            case AppendOp(path, request, now):
                return await self._do_append(conn, state, path, request, now)
            case CreateOp(request, now):
                return await self._do_create(conn, state, request, now)
            case DeleteOp(path, now):
                return await self._do_delete(conn, state, path, now)
            case ReapOp(now):
                return await self._do_reap(conn, state, now)

    async def _lock(
        self, conn: asyncpg.Connection, state: _Batch, batch: list[WriteOp], touches: Touches
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
        for row in await conn.fetch(_LOCK, sorted(paths), touched):
            if row["path"] in paths:
                meta = await _with_segments(conn, row_meta(row))
                state.metas[meta.path] = meta
                state.locked[meta.stream_id] = (meta.tail, meta.closed)
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
        for row in await conn.fetch(_PRODUCERS, ids, names):
            state.producers[(row[0], row[1])] = ProducerState(row[2], row[3])

    async def _producer(
        self, conn: asyncpg.Connection, state: _Batch, key: tuple[int, str]
    ) -> ProducerState | None:
        """A producer's state, read under its stream's lock when the batch start missed it
        (a stream created meanwhile, here or by another relay)."""
        if key not in state.producers:
            row = await conn.fetchrow(
                "SELECT epoch, last_seq FROM relay_producers "
                "WHERE stream_id = $1 AND producer_id = $2",
                *key,
            )
            state.producers[key] = ProducerState(row[0], row[1]) if row else None
        return state.producers[key]

    async def _write(
        self,
        conn: asyncpg.Connection,
        state: _Batch,
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
            _WRITE if expected is None else _GUARDED_WRITE,
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
            *guard,
        )
        state.written += len(rows)
        state.stream_updates.clear()
        state.producer_writes.clear()

    def _payload(self, state: _Batch) -> str:
        """``origin|id:tail:flag,...``; flag 0 open, 1 closed, d removed; ``*``: re-check all."""
        entries = [f"{sid}:{tail}:{int(closed)}" for sid, (tail, closed) in state.moved.items()]
        entries += [f"{sid}:0:d" for sid in state.removed]
        payload = f"{self._origin}|" + ",".join(entries)
        return payload if len(payload) <= NOTIFY_LIMIT else f"{self._origin}|*"

    # -- operations (inside the batch transaction) -------------------------------------------

    async def _do_append(
        self,
        conn: asyncpg.Connection,
        state: _Batch,
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
        key = (meta.stream_id, request.producer.producer_id) if request.producer else None
        producer_state = await self._producer(conn, state, key) if key else None
        result = _stage_append(state, path, meta, producer_state, request, now)
        data = result.plan.data
        if result.plan.write and data:
            if not state.rows.stage(meta.stream_id, result.start, data):
                await self._write(conn, state)
                state.rows.stage(meta.stream_id, result.start, data)
            self._stats["appends"] += 1
        return result

    async def _do_create(
        self, conn: asyncpg.Connection, state: _Batch, request: CreateRequest, now: float
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
            "last_access, created_at, last_append, source_id, forked_from, fork_offset) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $7, $8, $9, $10) "
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
        )
        if row is None:  # another relay created it concurrently: judge against theirs
            raced = await self._load(conn, request.path, lock=True)
            if raced is None:
                raise Unavailable("stream creation raced with a delete; retry")
            again = plan_create(raced, source, request)
            assert isinstance(again, StreamMeta)
            return CreateResult(again, created=False)
        meta = await _with_segments(conn, row_meta(row))
        state.metas[meta.path] = meta
        state.created.add(meta.stream_id)
        if outcome.data:
            state.rows.stage(meta.stream_id, outcome.fork_offset, outcome.data)
            self._stats["appends"] += 1
        return CreateResult(meta, created=True)

    async def _do_delete(
        self, conn: asyncpg.Connection, state: _Batch, path: str, now: float
    ) -> StreamMeta:
        await self._write(conn, state)
        meta = await self._load(conn, path, lock=True)
        if meta is None:
            raise NotFound()
        check_visible(meta, now)
        await self._remove(conn, state, meta)
        state.metas.pop(path, None)
        return meta

    async def _do_reap(self, conn: asyncpg.Connection, state: _Batch, now: float) -> int:
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

    async def _remove(self, conn: asyncpg.Connection, state: _Batch, meta: StreamMeta) -> None:
        """Soft-delete while forks reference the stream; otherwise purge and cascade."""
        state.removed.append(meta.stream_id)
        state.moved.pop(meta.stream_id, None)
        if await conn.fetchval(
            "SELECT 1 FROM relay_streams WHERE source_id = $1 LIMIT 1", meta.stream_id
        ):
            await conn.execute(
                "UPDATE relay_streams SET soft_deleted = true WHERE id = $1", meta.stream_id
            )
            return
        await self._purge(conn, meta.stream_id)

    async def _purge(self, conn: asyncpg.Connection, stream_id: int) -> None:
        doomed = [row[0] for row in await conn.fetch(_PURGE_CHAIN, stream_id)]
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
        return await _with_segments(conn, row_meta(row)) if row else None

    # -- LISTEN ------------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        """One LISTEN connection per process, re-established with backoff when lost."""
        delay = 0.1
        connected_before = False
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._url, timeout=self._timeout or 10)
            except (*_DISCONNECTS, asyncpg.PostgresError) as exc:
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
            try:
                conn.add_termination_listener(lambda _c, event=lost: event.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                # Whatever committed while we were not listening: forget what we knew and let
                # readers re-check.
                self._known.clear()
                self._listen_conn = conn
                self._listening = True
                self._wake_watched()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                    if not lost.is_set() and not await self._notified():  # the keepalive
                        lost.set()
            except (*_DISCONNECTS, asyncpg.PostgresError):
                await asyncio.sleep(delay)  # lost while subscribing: connect again
            finally:
                if lost.is_set():  # not on cancellation: that is the store closing
                    log.warning("listen connection lost", channel=CHANNEL)
                self._listening = False
                self._listen_conn = None
                self._known.clear()
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
        for sid, tail, flag in _split(body):
            self._owned.drop(sid)  # another relay wrote it: lock before writing again
            if flag == "d":
                self._known.removed(sid)
                if events is not None:
                    events.deleted(sid)
            else:
                self._known.moved(sid, tail, flag == "1")
                if events is not None:
                    events.remote_commit(sid, tail, flag == "1")

    def _wake_watched(self) -> None:
        ids = list(self._events.watched_ids()) if self._events is not None else []
        if ids:
            self._spawn(self._refresh(ids))

    async def _refresh(self, ids: list[int]) -> None:
        """Re-read watched streams after missed notifications: tails, and which are gone."""
        with contextlib.suppress(*_OFFLINE):
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
            except _OFFLINE:
                continue
            except Exception:
                log.exception("compaction failed")

    async def compact(self, now: float, *, budget: int = COMPACT_PASS_BYTES) -> CompactionPass:
        """Merge small rows of closed or idle streams, the longest idle first.

        Only streams marked ``compact_pending`` (set by every write) are candidates, so a pass
        costs what it compacts, never what is stored. A stream is unmarked, under its lock,
        once its greedy runs are merged: ``_runs`` then leaves no two adjacent rows that fit in
        one, so a second pass locks and reads nothing.
        A pass reads at most ``budget`` bytes (at least one run, so it always progresses);
        what it leaves stays a candidate, at the front, for the next pass.
        """
        done = CompactionPass()
        async with self._conn() as conn:
            candidates = await conn.fetch(
                "SELECT id FROM relay_streams WHERE compact_pending "
                "AND (closed OR last_append < $1) ORDER BY last_append, id LIMIT $2",
                now - self._compact_idle,
                COMPACT_CANDIDATES,
            )
            for (stream_id,) in candidates:
                if done.bytes_read >= budget:
                    break
                done = await self._compact_stream(conn, stream_id, budget, done)
        self._stats["rows_compacted"] += done.rows_removed
        self._stats["bytes_compacted"] += done.bytes_read
        self._stats["compaction_passes"] += 1
        return done

    async def _compact_stream(
        self, conn: asyncpg.Connection, stream_id: int, budget: int, done: CompactionPass
    ) -> CompactionPass:
        """Merge one stream's runs in one transaction, reading only the rows being merged."""
        async with conn.transaction():
            locked = await conn.fetchval(
                "SELECT id FROM relay_streams WHERE id = $1 FOR UPDATE SKIP LOCKED", stream_id
            )
            if locked is None:
                return done
            bounds = await conn.fetch(
                "SELECT start_pos, end_pos FROM relay_chunks WHERE stream_id = $1 "
                "ORDER BY start_pos",
                stream_id,
            )
            removed = read = 0
            finished = True
            for run in _runs(bounds):
                if len(run) < 2:
                    continue
                start, end = run[0][0], run[-1][1]
                spent = done.bytes_read + read
                if spent and spent + end - start > budget:
                    finished = False  # stays marked: the next pass goes on from here
                    break
                rows = await conn.fetch(
                    "DELETE FROM relay_chunks WHERE stream_id = $1 AND start_pos >= $2 "
                    "AND start_pos < $3 RETURNING start_pos, data",
                    stream_id,
                    start,
                    end,
                )
                rows.sort(key=lambda row: row[0])
                await conn.execute(
                    "INSERT INTO relay_chunks (stream_id, start_pos, end_pos, data) "
                    "VALUES ($1, $2, $3, $4)",
                    stream_id,
                    start,
                    end,
                    b"".join(row[1] for row in rows),
                )
                removed += len(rows) - 1
                read += end - start
            if finished:
                await conn.execute(
                    "UPDATE relay_streams SET compact_pending = false WHERE id = $1", stream_id
                )
        return CompactionPass(done.streams + 1, done.rows_removed + removed, done.bytes_read + read)


@dataclass(frozen=True, slots=True)
class CompactionPass:
    """What one compaction pass did: streams locked, rows merged away, bytes read."""

    streams: int = 0
    rows_removed: int = 0
    bytes_read: int = 0


def _runs(rows: list[asyncpg.Record]) -> Iterator[list[asyncpg.Record]]:
    """``(start_pos, end_pos)`` rows grouped greedily into contiguous runs of at most
    COMPACT_BYTES: after merging, no two adjacent rows fit in COMPACT_BYTES together."""
    run: list[asyncpg.Record] = []
    size = 0
    for row in rows:
        length = row[1] - row[0]
        contiguous = run and run[-1][1] == row[0]
        if run and (not contiguous or size + length > COMPACT_BYTES):
            yield run
            run, size = [], 0
        run.append(row)
        size += length
    if run:
        yield run


def _split(body: str) -> Iterator[tuple[int, int, str]]:
    for entry in body.split(","):
        parts = entry.split(":")
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            yield int(parts[0]), int(parts[1]), parts[2]


async def _read_range(conn: asyncpg.Connection, meta: StreamMeta, start: int, end: int) -> bytes:
    out = bytearray()
    for stream_id, lo, hi in segment_ranges(meta, start, end):
        rows = await conn.fetch(
            "SELECT start_pos, data FROM relay_chunks WHERE stream_id = $1 AND end_pos > $2 "
            "AND start_pos < $3 ORDER BY start_pos",
            stream_id,
            lo,
            hi,
        )
        stitch(out, rows, lo, hi)
    return bytes(out)


async def _with_segments(conn: asyncpg.Connection, meta: StreamMeta) -> StreamMeta:
    if meta.source_id is None:
        chain = [(meta.stream_id, meta.fork_offset)]
    else:
        rows = await conn.fetch(_CHAIN, meta.stream_id)
        chain = [(row[0], row[1]) for row in rows]
    return replace(meta, segments=fork_segments(chain))


def _stage_append(
    state: _Batch,
    path: str,
    meta: StreamMeta,
    producer_state: ProducerState | None,
    request: AppendRequest,
    now: float,
) -> AppendResult:
    """The protocol's decision on one append against the batch's view, staged into the batch
    (stream update, producer state, NOTIFY entry); the caller stages the data row. Pure: the
    locking and the guarded path plan with it alike. Raises the ProtocolError it refuses with."""
    check_visible(meta, now)
    plan = decide_append(meta, producer_state, request)
    if not plan.write:
        return AppendResult(meta, plan, meta.tail)
    after = after_append(meta, plan, now)
    state.metas[path] = after
    state.stream_updates[meta.stream_id] = after
    if request.producer is not None and plan.producer_state is not None:
        key = (meta.stream_id, request.producer.producer_id)
        state.producers[key] = plan.producer_state
        state.producer_writes[key] = plan.producer_state
    state.moved[meta.stream_id] = (after.tail, after.closed)
    return AppendResult(after, plan, meta.tail)
