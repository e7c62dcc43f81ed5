"""Read replicas: hot standbys of the primary that serve the bytes of catch-up reads.

Only bytes: which range is readable (the stream, its id, tail, fork segments, horizon) is
always decided from the primary (the store's ``known`` cache or a query there). A replica is
asked for the rows of one stream id over one range and answers only if it holds every byte of
it; anything less (it has not replayed that far, the stream id is newer than its replay, it is
down, it refused the query) and the primary answers instead. Committed bytes at a stream id and
offset never change (appends go at the tail, compaction merges rows without changing bytes,
ids are never reused), so a replica's complete answer is the primary's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from protocol.model import StreamMeta
from relay.store.common import segment_ranges
from relay.store.postgres.connections import DISCONNECTS, connection_lost, keep_session

log = structlog.get_logger("relay.postgres.replicas")

RETRY_SECONDS = 2.0
"""How long a replica found down is left alone before a read tries it again."""

ROWS = (
    "SELECT start_pos, data FROM relay_chunks WHERE stream_id = $1 AND end_pos > $2 "
    "AND start_pos < $3 AND start_pos >= coalesce((SELECT max(start_pos) FROM relay_chunks "
    "WHERE stream_id = $1 AND start_pos <= $2), 0) AND pg_is_in_recovery() "
    "AND (SELECT timeline_id FROM pg_control_checkpoint()) = $4 ORDER BY start_pos"
)
"""A segment's rows; none from a server that is no longer a standby (promoted by a failover)
or is not on the primary's timeline (left behind by one: its history may hold appends the new
primary lost, then wrote differently). A standby that follows a new primary counts from its
first restartpoint on the new timeline; until then the primary answers."""
TIMELINE = "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
"""The primary's current timeline (its WAL file names start with it)."""


class NotAStandby(Exception):
    """The server at a read URL is not a hot standby of this relay's primary."""


def covered(rows: Sequence[tuple[int, bytes]], lo: int, hi: int) -> bytes | None:
    """The bytes ``[lo, hi)`` from rows ordered by start, or None unless they hold every one
    of them, contiguously."""
    out = bytearray()
    at = lo
    for start, data in rows:
        if start > at:
            return None  # a gap: rows missing in between
        if start + len(data) > at:
            out += data[at - start : hi - start]
            at = min(hi, start + len(data))
    return bytes(out) if at == hi else None


@dataclass
class Replica:
    """One standby: its pool and whether it is in use (down ones wait ``RETRY_SECONDS``)."""

    url: str
    pool: asyncpg.Pool | None = None
    up: bool = True
    retry_at: float = 0.0


class ReplicaReader:
    """Round-robin over the read URLs; see the module docstring for when one answers."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        command_timeout: float | None,
        pool_size: int,
        options: dict[str, Any] | None = None,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._replicas = [Replica(url) for url in urls]
        self._timeout = command_timeout
        self._pool_size = pool_size
        self._options = dict(options or {})  # asyncpg's, as the primary's pooled connections
        self._retry = retry_seconds
        self._clock = clock
        self._next = 0
        self._system: int | None = None  # the primary's system identifier
        self._timeline: int | None = None  # the primary's, as last seen; None: use no replica
        self.reads = 0  # reads a replica answered
        self.fallbacks = 0  # reads a replica could not answer whole (not replayed yet)
        self.errors = 0  # reads a replica failed (down, refused): the primary answered

    @property
    def up(self) -> int:
        """Replicas in use right now."""
        return sum(1 for replica in self._replicas if replica.up)

    async def open(self, primary: asyncpg.Connection) -> None:
        """Pools that connect on first use: a replica down at start-up only means reads go to
        the primary until it answers."""
        self._system = await primary.fetchval("SELECT system_identifier FROM pg_control_system()")
        await self.follow(primary)
        for replica in self._replicas:
            replica.pool = await asyncpg.create_pool(
                replica.url,
                min_size=0,
                max_size=self._pool_size,
                command_timeout=self._timeout,
                timeout=self._timeout or 10,
                reset=keep_session,
                init=self._check_standby,
                **self._options,
            )

    async def follow(self, primary: asyncpg.Connection) -> None:
        """Learn the primary's timeline (at start and whenever LISTEN connects again, as after
        a failover): replicas answer only while they are on it. Between losing LISTEN and
        this, none does: a failover may be under way."""
        try:
            self._timeline = await primary.fetchval(TIMELINE)
        except asyncpg.PostgresError:  # not a primary after all (recovery): no replica then
            self._timeline = None

    def forget(self) -> None:
        """The primary may be changing (its connection was lost): no replica answers until
        ``follow`` has read the timeline again."""
        self._timeline = None

    async def close(self) -> None:
        for replica in self._replicas:
            if replica.pool is not None:
                try:
                    await asyncio.wait_for(replica.pool.close(), self._timeout or 10)
                except (*DISCONNECTS, asyncpg.PostgresError):
                    replica.pool.terminate()

    async def _check_standby(self, conn: asyncpg.Connection) -> None:
        """Each new connection: a standby in recovery, cloned from this primary's cluster."""
        row = await conn.fetchrow(
            "SELECT pg_is_in_recovery(), system_identifier FROM pg_control_system()"
        )
        if not row[0]:
            raise NotAStandby("it is not in recovery (a primary, or promoted)")
        if row[1] != self._system:
            raise NotAStandby("it is not a standby of --database-url (another cluster)")

    def _pick(self) -> Replica | None:
        now = self._clock()
        count = len(self._replicas)
        for step in range(count):
            replica = self._replicas[(self._next + step) % count]
            if replica.up or now >= replica.retry_at:
                self._next = (self._next + step + 1) % count
                return replica
        return None

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes | None:
        """``[start, end)`` of ``meta``'s stream from a replica holding all of it, else None."""
        if start < meta.retained_from:
            return None  # the primary may have deleted those rows: it decides what is left
        replica = self._pick()
        if replica is None or replica.pool is None or self._timeline is None:
            return None
        timeline = self._timeline
        try:
            async with replica.pool.acquire(timeout=self._timeout) as conn:
                out = bytearray()
                for stream_id, lo, hi in segment_ranges(meta, start, end):
                    part = covered(await conn.fetch(ROWS, stream_id, lo, hi, timeline), lo, hi)
                    if part is None:
                        self.fallbacks += 1
                        self._back(replica)
                        return None
                    out += part
        except (*DISCONNECTS, asyncpg.PostgresError, NotAStandby) as exc:
            self.errors += 1
            if connection_lost(exc) or isinstance(exc, NotAStandby):
                self._down(replica, exc)
            return None  # a query conflict with replay (or the like): this read only
        self.reads += 1
        self._back(replica)
        return bytes(out)

    def _down(self, replica: Replica, exc: BaseException) -> None:
        """Logged once, when it stops answering; retried after ``retry_seconds``."""
        replica.retry_at = self._clock() + self._retry
        if replica.up:
            replica.up = False
            log.warning(
                "read replica unavailable, reading from the primary",
                replica=_host(replica.url),
                error=type(exc).__name__,
                reason=str(exc) if isinstance(exc, NotAStandby) else None,
            )

    def _back(self, replica: Replica) -> None:
        if not replica.up:
            replica.up = True
            log.info("read replica answering again", replica=_host(replica.url))


def _host(url: str) -> str:
    """A URL without its credentials, for logs."""
    rest = url.partition("://")[2]
    with contextlib.suppress(ValueError):
        rest = rest[rest.rindex("@", 0, rest.find("/") if "/" in rest else len(rest)) + 1 :]
    return rest
