"""The embedded store: SQLite in WAL mode with group commit.

One writer thread owns the write connection. Requests queue operations; the committer takes
everything queued, applies it in one transaction (running the protocol's decisions against
the state as it stands inside that transaction), commits with ``synchronous=FULL`` (the WAL
is fsynced), and only then resolves each request. While one batch commits, the next fills.
Readers use their own connections in a small thread pool; WAL lets them run beside the writer.

Stream metadata is cached in memory. Only the writer thread changes the cache (after each
commit, and when loading a missing entry between commits), so a cached entry always equals
committed state and request paths that only need metadata never touch the database.
"""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from protocol.append import AppendRequest, decide_append
from protocol.create import CreatePlan, CreateRequest, needs_source_bytes, plan_create
from protocol.errors import NotFound, ProtocolError
from protocol.headers import ProducerHeaders
from protocol.lifecycle import check_visible, is_expired
from protocol.model import ProducerState, StreamMeta, fork_segments
from relay.store.base import (
    AppendResult,
    CreateResult,
    RemoteCommit,
    StoreStartupError,
    StoreStats,
    WatchedIds,
)
from relay.store.batching import Committer, Op, Touches

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    content_type TEXT NOT NULL,
    tail INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    ttl INTEGER,
    expires_at REAL,
    last_access REAL NOT NULL,
    created_at REAL NOT NULL,
    stream_seq TEXT,
    closed_by_id TEXT,
    closed_by_epoch INTEGER,
    closed_by_seq INTEGER,
    source_id INTEGER,
    forked_from TEXT,
    fork_offset INTEGER NOT NULL DEFAULT 0,
    soft_deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS streams_source ON streams(source_id);
CREATE TABLE IF NOT EXISTS chunks (
    stream_id INTEGER NOT NULL,
    start_pos INTEGER NOT NULL,
    end_pos INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (stream_id, start_pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS producers (
    stream_id INTEGER NOT NULL,
    producer_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (stream_id, producer_id)
) WITHOUT ROWID;
"""

_META_COLUMNS = (
    "id, path, content_type, tail, closed, ttl, expires_at, last_access, created_at, "
    "stream_seq, closed_by_id, closed_by_epoch, closed_by_seq, source_id, forked_from, "
    "fork_offset, soft_deleted"
)
CACHE_LIMIT = 100_000


@dataclass
class _Batch:
    """Appends gathered in one transaction: consecutive ones to a stream become one row."""

    pending: dict[int, tuple[int, bytearray]] = field(default_factory=dict)
    rows: int = 0
    updated: dict[str, StreamMeta | None] = field(default_factory=dict)  # None: gone


class SqliteStore:
    """The embedded, durable default store (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        max_batch_ops: int = 1024,
        max_batch_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._dir = Path(data_dir)
        self._db_path = self._dir / "relay.sqlite3"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="relay-sqlite-writer")
        self._committer = Committer(
            self._apply_in_writer, max_ops=max_batch_ops, max_bytes=max_batch_bytes
        )
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="relay-sqlite-reader")
        self._local = threading.local()
        self._write_conn: sqlite3.Connection | None = None
        self._cache: dict[str, StreamMeta] = {}
        self._lock_file: IO[str] | None = None
        self._stats = {"appends": 0, "rows_written": 0}

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_directory()
        loop = asyncio.get_running_loop()
        self._write_conn = await loop.run_in_executor(self._writer, self._connect_writer)
        self._committer.start()

    def _lock_directory(self) -> None:
        """One process per data directory: the metadata cache assumes it is the only writer."""
        self._lock_file = open(self._dir / "relay.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreStartupError(f"another relay is using {self._dir}") from None

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
        return conn

    async def close(self) -> None:
        await self._committer.stop()
        loop = asyncio.get_running_loop()
        if self._write_conn is not None:
            await loop.run_in_executor(self._writer, self._write_conn.close)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self._lock_file is not None:
            self._lock_file.close()

    def set_remote_listener(self, listener: RemoteCommit, watched: WatchedIds) -> None:
        """One process owns the data directory, so there are no remote commits."""

    def stats(self) -> StoreStats:
        return StoreStats(
            commits=self._committer.commits,
            appends=self._stats["appends"],
            rows_written=self._stats["rows_written"],
            batch_sizes=tuple(self._committer.batch_sizes),
        )

    # -- the interface -----------------------------------------------------------------------

    async def create(self, request: CreateRequest, now: float) -> CreateResult:
        result: CreateResult = await self._committer.submit(
            "create", (request, now), len(request.body)
        )
        return result

    async def append(self, path: str, request: AppendRequest, now: float) -> AppendResult:
        result: AppendResult = await self._committer.submit(
            "append", (path, request, now), len(request.data)
        )
        return result

    async def delete(self, path: str, now: float) -> StreamMeta:
        result: StreamMeta = await self._committer.submit("delete", (path, now), 0)
        return result

    async def reap(self, now: float) -> int:
        result: int = await self._committer.submit("reap", (now,), 0)
        return result

    async def head(self, path: str, now: float, *, touch: bool) -> StreamMeta:
        meta = self._cache.get(path)
        if meta is None:
            loop = asyncio.get_running_loop()
            meta = await loop.run_in_executor(self._writer, self._load_into_cache, path)
        if meta is None:
            raise NotFound()
        pending = self._committer.pending_touch(path, meta.stream_id)
        if pending is not None:
            meta = _with_access(meta, pending)
        check_visible(meta, now)
        if touch and meta.ttl is not None:
            self._committer.touch(path, meta.stream_id, now)
            return _with_access(meta, now)
        return meta

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_range, meta, start, end)

    # -- group commit ------------------------------------------------------------------------

    async def _apply_in_writer(self, batch: list[Op], touches: Touches) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._apply_batch, batch, touches)

    def _load_into_cache(self, path: str) -> StreamMeta | None:
        """Writer thread, between commits: what it loads is committed and stays current."""
        assert self._write_conn is not None
        meta = self._load(self._write_conn, path)
        if meta is not None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[path] = meta
        return meta

    def _apply_batch(self, batch: list[Op], touches: Touches) -> list[Any]:
        """Runs on the writer thread: one transaction for the whole batch."""
        conn = self._write_conn
        assert conn is not None
        state = _Batch()
        outcomes: list[Any] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                try:
                    outcomes.append(self._apply(conn, state, op))
                except ProtocolError as exc:
                    outcomes.append(exc)
            self._flush_rows(conn, state)
            for stream_id, when in touches.values():
                conn.execute(
                    "UPDATE streams SET last_access = max(last_access, ?) WHERE id = ?",
                    (when, stream_id),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            self._cache.clear()
            raise
        for path, meta in state.updated.items():
            if meta is None:
                self._cache.pop(path, None)
            else:
                self._cache[path] = meta
        for path, (stream_id, when) in touches.items():
            cached = self._cache.get(path)
            if cached is not None and cached.stream_id == stream_id:
                self._cache[path] = _with_access(cached, when)
        self._stats["rows_written"] += state.rows
        return outcomes

    def _apply(self, conn: sqlite3.Connection, state: _Batch, op: Op) -> Any:
        handler: Callable[..., Any] = getattr(self, f"_do_{op.kind}")
        return handler(conn, state, *op.args)

    def _flush_rows(self, conn: sqlite3.Connection, state: _Batch) -> None:
        for stream_id, (start, data) in state.pending.items():
            conn.execute(
                "INSERT INTO chunks (stream_id, start_pos, end_pos, data) VALUES (?, ?, ?, ?)",
                (stream_id, start, start + len(data), bytes(data)),
            )
            state.rows += 1
        state.pending.clear()

    def _stage(self, state: _Batch, stream_id: int, start: int, data: bytes) -> None:
        if not data:
            return
        staged = state.pending.get(stream_id)
        if staged is not None and staged[0] + len(staged[1]) == start:
            staged[1].extend(data)
        else:
            state.pending[stream_id] = (start, bytearray(data))

    # -- operations (writer thread, inside the batch transaction) ----------------------------

    def _do_create(
        self, conn: sqlite3.Connection, state: _Batch, request: CreateRequest, now: float
    ) -> CreateResult:
        existing = self._load(conn, request.path)
        if existing is not None and _is_dead(existing, now):
            self._remove(conn, state, existing)
            existing = None
        source: StreamMeta | None = None
        after_anchor = b""
        if request.fork is not None:
            self._flush_rows(conn, state)
            source = self._load(conn, request.fork.source_path)
            if source is None or (not source.soft_deleted and is_expired(source, now)):
                raise NotFound("fork source not found")
            if needs_source_bytes(request):
                anchor = source.tail if request.fork.offset is None else request.fork.offset
                if anchor <= source.tail:
                    after_anchor = self._read_range_conn(conn, source, anchor, source.tail)
        outcome = plan_create(existing, source, request, after_anchor)
        if isinstance(outcome, StreamMeta):
            return CreateResult(outcome, created=False)
        meta = self._insert(conn, request.path, outcome, now)
        state.updated[meta.path] = meta
        self._stage(state, meta.stream_id, outcome.fork_offset, outcome.data)
        self._stats["appends"] += 1 if outcome.data else 0
        return CreateResult(meta, created=True)

    def _insert(
        self, conn: sqlite3.Connection, path: str, plan: CreatePlan, now: float
    ) -> StreamMeta:
        source_id = plan.source.stream_id if plan.source is not None else None
        forked_from = plan.source.path if plan.source is not None else None
        tail = plan.fork_offset + len(plan.data)
        cursor = conn.execute(
            "INSERT INTO streams (path, content_type, tail, closed, ttl, expires_at, "
            "last_access, created_at, source_id, forked_from, fork_offset) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                path,
                plan.content_type,
                tail,
                int(plan.closed),
                plan.expiry.ttl,
                plan.expiry.expires_at,
                now,
                now,
                source_id,
                forked_from,
                plan.fork_offset,
            ),
        )
        stream_id = cursor.lastrowid
        assert stream_id is not None
        meta = self._load_id(conn, stream_id)
        assert meta is not None
        return meta

    def _do_append(
        self,
        conn: sqlite3.Connection,
        state: _Batch,
        path: str,
        request: AppendRequest,
        now: float,
    ) -> AppendResult:
        meta = self._visible(conn, path, now)
        producer_state = None
        if request.producer is not None:
            producer_state = self._producer(conn, meta.stream_id, request.producer.producer_id)
        plan = decide_append(meta, producer_state, request)
        if not plan.write:
            return AppendResult(meta, plan, meta.tail)
        start = meta.tail
        tail = start + len(plan.data)
        closed_by = plan.producer if plan.close else None
        conn.execute(
            "UPDATE streams SET tail = ?, closed = closed OR ?, last_access = ?, "
            "stream_seq = coalesce(?, stream_seq), closed_by_id = coalesce(?, closed_by_id), "
            "closed_by_epoch = coalesce(?, closed_by_epoch), "
            "closed_by_seq = coalesce(?, closed_by_seq) WHERE id = ?",
            (
                tail,
                int(plan.close),
                now,
                plan.stream_seq,
                closed_by.producer_id if closed_by else None,
                closed_by.epoch if closed_by else None,
                closed_by.seq if closed_by else None,
                meta.stream_id,
            ),
        )
        if plan.producer is not None and plan.producer_state is not None:
            conn.execute(
                "INSERT INTO producers (stream_id, producer_id, epoch, last_seq) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (stream_id, producer_id) "
                "DO UPDATE SET epoch = excluded.epoch, last_seq = excluded.last_seq",
                (
                    meta.stream_id,
                    plan.producer.producer_id,
                    plan.producer_state.epoch,
                    plan.producer_state.last_seq,
                ),
            )
        self._stage(state, meta.stream_id, start, plan.data)
        if plan.data:
            self._stats["appends"] += 1
        after = _replace(
            meta,
            tail=tail,
            closed=meta.closed or plan.close,
            last_access=now,
            stream_seq=plan.stream_seq or meta.stream_seq,
            closed_by=closed_by or meta.closed_by,
        )
        state.updated[path] = after
        return AppendResult(after, plan, start)

    def _do_delete(
        self, conn: sqlite3.Connection, state: _Batch, path: str, now: float
    ) -> StreamMeta:
        meta = self._visible(conn, path, now)
        self._flush_rows(conn, state)
        self._remove(conn, state, meta)
        return meta

    def _do_reap(self, conn: sqlite3.Connection, state: _Batch, now: float) -> int:
        self._flush_rows(conn, state)
        rows = conn.execute(
            f"SELECT {_META_COLUMNS} FROM streams WHERE soft_deleted = 0 AND ("
            "(expires_at IS NOT NULL AND expires_at <= ?) OR "
            "(ttl IS NOT NULL AND last_access + ttl <= ?))",
            (now, now),
        ).fetchall()
        for row in rows:
            self._remove(conn, state, _row_meta(row))
        orphans = conn.execute(
            "SELECT id FROM streams s WHERE soft_deleted = 1 AND NOT EXISTS "
            "(SELECT 1 FROM streams f WHERE f.source_id = s.id)"
        ).fetchall()
        for (stream_id,) in orphans:
            self._purge(conn, state, stream_id)
        return len(rows)

    # -- helpers -----------------------------------------------------------------------------

    def _remove(self, conn: sqlite3.Connection, state: _Batch, meta: StreamMeta) -> None:
        """Soft-delete while forks reference the stream; otherwise purge and cascade."""
        if conn.execute("SELECT 1 FROM streams WHERE source_id = ?", (meta.stream_id,)).fetchone():
            conn.execute("UPDATE streams SET soft_deleted = 1 WHERE id = ?", (meta.stream_id,))
            state.updated[meta.path] = replace(meta, soft_deleted=True)
            return
        self._purge(conn, state, meta.stream_id)

    def _purge(self, conn: sqlite3.Connection, state: _Batch, stream_id: int) -> None:
        while True:
            row = conn.execute(
                "SELECT source_id, path FROM streams WHERE id = ?", (stream_id,)
            ).fetchone()
            if row is not None:
                state.updated[row[1]] = None
            conn.execute("DELETE FROM chunks WHERE stream_id = ?", (stream_id,))
            conn.execute("DELETE FROM producers WHERE stream_id = ?", (stream_id,))
            conn.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
            source_id = row[0] if row else None
            if source_id is None:
                return
            source = conn.execute(
                "SELECT soft_deleted FROM streams WHERE id = ?", (source_id,)
            ).fetchone()
            still_used = conn.execute(
                "SELECT 1 FROM streams WHERE source_id = ?", (source_id,)
            ).fetchone()
            if source is None or not source[0] or still_used:
                return
            stream_id = source_id

    def _producer(
        self, conn: sqlite3.Connection, stream_id: int, producer_id: str
    ) -> ProducerState | None:
        row = conn.execute(
            "SELECT epoch, last_seq FROM producers WHERE stream_id = ? AND producer_id = ?",
            (stream_id, producer_id),
        ).fetchone()
        return ProducerState(row[0], row[1]) if row else None

    def _visible(self, conn: sqlite3.Connection, path: str, now: float) -> StreamMeta:
        meta = self._load(conn, path)
        if meta is None:
            raise NotFound()
        check_visible(meta, now)
        return meta

    def _load(self, conn: sqlite3.Connection, path: str) -> StreamMeta | None:
        row = conn.execute(
            f"SELECT {_META_COLUMNS} FROM streams WHERE path = ?", (path,)
        ).fetchone()
        return self._with_segments(conn, _row_meta(row)) if row else None

    def _load_id(self, conn: sqlite3.Connection, stream_id: int) -> StreamMeta | None:
        row = conn.execute(
            f"SELECT {_META_COLUMNS} FROM streams WHERE id = ?", (stream_id,)
        ).fetchone()
        return self._with_segments(conn, _row_meta(row)) if row else None

    def _with_segments(self, conn: sqlite3.Connection, meta: StreamMeta) -> StreamMeta:
        chain = [(meta.stream_id, meta.fork_offset)]
        source_id = meta.source_id
        while source_id is not None:
            row = conn.execute(
                "SELECT id, fork_offset, source_id FROM streams WHERE id = ?", (source_id,)
            ).fetchone()
            if row is None:
                break
            chain.append((row[0], row[1]))
            source_id = row[2]
        return _replace(meta, segments=fork_segments(chain))

    def _read_range(self, meta: StreamMeta, start: int, end: int) -> bytes:
        return self._read_range_conn(self._reader(), meta, start, end)

    def _read_range_conn(
        self, conn: sqlite3.Connection, meta: StreamMeta, start: int, end: int
    ) -> bytes:
        out = bytearray()
        for segment in meta.segments:
            seg_end = end if segment.end is None else min(end, segment.end)
            lo, hi = max(start, segment.start), seg_end
            if lo >= hi:
                continue
            rows = conn.execute(
                "SELECT start_pos, data FROM chunks WHERE stream_id = ? AND end_pos > ? "
                "AND start_pos < ? ORDER BY start_pos",
                (segment.stream_id, lo, hi),
            ).fetchall()
            for row_start, data in rows:
                out += data[max(0, lo - row_start) : hi - row_start]
        return bytes(out)


def _row_meta(row: tuple[Any, ...]) -> StreamMeta:
    closed_by = ProducerHeaders(row[10], row[11], row[12]) if row[10] is not None else None
    return StreamMeta(
        stream_id=row[0],
        path=row[1],
        content_type=row[2],
        tail=row[3],
        closed=bool(row[4]),
        ttl=row[5],
        expires_at=row[6],
        last_access=row[7],
        created_at=row[8],
        stream_seq=row[9],
        closed_by=closed_by,
        forked_from=row[14],
        fork_offset=row[15],
        soft_deleted=bool(row[16]),
        source_id=row[13],
    )


def _replace(meta: StreamMeta, **changes: Any) -> StreamMeta:
    return replace(meta, **changes)


def _with_access(meta: StreamMeta, when: float) -> StreamMeta:
    return _replace(meta, last_access=max(meta.last_access, when))


def _is_dead(meta: StreamMeta, now: float) -> bool:
    return not meta.soft_deleted and is_expired(meta, now)
