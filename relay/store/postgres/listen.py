"""LISTEN: what other relays committed reaches this one, and the barrier that makes ``Known``
as fresh as a query.

One connection per process LISTENs on :data:`~relay.store.postgres.notify.CHANNEL`,
re-established with backoff when lost. Each notification updates ``Known`` and
``OwnedStreams`` and goes to the store's listener (the commit sink). Whenever notifications
may have been missed (connecting, reconnecting, a ``*`` payload), what the relay knew is
forgotten and watched streams are re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import structlog

from relay.store.base import StoreEvents
from relay.store.postgres.connections import DISCONNECTS, OFFLINE
from relay.store.postgres.database import Database
from relay.store.postgres.known import Known, OwnedStreams
from relay.store.postgres.notify import CHANNEL, parse_payload
from relay.store.postgres.replicas import ReplicaReader
from relay.store.postgres.transaction import Q

log = structlog.get_logger("relay.postgres")


class Listener:
    """The LISTEN connection and its barrier (see the module docstring)."""

    def __init__(
        self,
        database: Database,
        known: Known,
        owned: OwnedStreams,
        origin: str,
        replicas: ReplicaReader | None,
        events: Callable[[], StoreEvents | None],
    ) -> None:
        self._db = database
        self._known = known
        self._owned = owned
        self._origin = origin
        self._replicas = replicas
        self._events = events
        self.listening = False  # Known is trusted only while notifications flow
        self.reconnects = 0
        self._conn: asyncpg.Connection | None = None
        self._barrier: asyncio.Future[bool] | None = None  # the next barrier's callers
        self._barrier_running = False
        self._background: set[asyncio.Task[None]] = set()  # held so they are not collected

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run_forever(self) -> None:
        """One LISTEN connection per process, re-established with backoff when lost."""
        delay = 0.1
        connected_before = False
        while True:
            lost = asyncio.Event()
            try:
                conn = await self._db.connect_direct()
            except (*DISCONNECTS, asyncpg.PostgresError) as exc:
                self._db.lost(type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if connected_before:
                self.reconnects += 1
                log.info("listen connection re-established", channel=CHANNEL)
            connected_before = True
            self._db.back()
            if self._replicas is not None:
                with contextlib.suppress(*DISCONNECTS):
                    await self._replicas.follow(conn)  # a failover may have changed timelines
            try:
                conn.add_termination_listener(lambda _c, event=lost: event.set())
                await conn.add_listener(CHANNEL, self.on_notify)
                # Whatever committed while we were not listening: forget what we knew and let
                # readers re-check.
                self._known.clear()
                self._forget_held()
                self._conn = conn
                self.listening = True
                self._wake_watched()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                    if not lost.is_set() and not await self.notified():  # the keepalive
                        lost.set()
            except (*DISCONNECTS, asyncpg.PostgresError):
                await asyncio.sleep(delay)  # lost while subscribing: connect again
            finally:
                if lost.is_set():  # not on cancellation: that is the store closing
                    log.warning("listen connection lost", channel=CHANNEL)
                self.listening = False
                self._conn = None
                self._known.clear()
                self._forget_held()  # the pool may reconnect first, perhaps to a new primary
                if self._replicas is not None:
                    self._replicas.forget()  # until LISTEN is back on whichever is primary
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)

    async def notified(self) -> bool:
        """Wait for a round trip on the LISTEN connection that began after this call; False
        if notifications stopped flowing meanwhile (then nothing cached may answer)."""
        waiter = self._barrier
        if waiter is None:
            waiter = self._barrier = asyncio.get_running_loop().create_future()
        if not self._barrier_running:
            self._barrier_running = True
            self.spawn(self._run_barriers())
        return await asyncio.shield(waiter)  # one caller's timeout must not cancel the others'

    async def _run_barriers(self) -> None:
        """One ``SELECT 1`` at a time on the LISTEN connection, each for everyone who asked
        before it was sent. asyncpg runs notification callbacks before it wakes the query's
        caller, so ``Known`` has them by the time a waiter resumes."""
        try:
            while (waiter := self._barrier) is not None:
                self._barrier = None
                ok = False
                conn = self._conn
                if conn is not None and self.listening:
                    with contextlib.suppress(*DISCONNECTS, asyncpg.PostgresError):
                        await conn.execute("SELECT 1", timeout=self._db.timeout or 5)
                        ok = self.listening and self._conn is conn
                if not waiter.done():
                    waiter.set_result(ok)
        finally:
            self._barrier_running = False

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """Another relay committed: what this relay knows follows, then its listener hears.
        (The caches must follow even with no listener: reads answer from them.)"""
        origin, _, body = payload.partition("|")
        events = self._events()
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
        events = self._events()
        if events is not None:
            events.forget_held()

    def _wake_watched(self) -> None:
        events = self._events()
        ids = list(events.watched_ids()) if events is not None else []
        if ids:
            self.spawn(self._refresh(ids))

    async def _refresh(self, ids: list[int]) -> None:
        """Re-read watched streams after missed notifications: tails, and which are gone."""
        with contextlib.suppress(*OFFLINE):
            async with self._db.conn() as conn:
                rows = await conn.fetch(Q["watched"], ids)
            events = self._events()
            if events is None:
                return
            alive = set()
            for row in rows:
                alive.add(row[0])
                events.remote_commit(row[0], row[1], row[2])
            for sid in ids:
                if sid not in alive:
                    events.deleted(sid)
