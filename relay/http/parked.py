"""Parked live readers (long-poll and SSE), held off aiohttp's hands.

A reader that waits inside aiohttp keeps its connection's whole handler (the request parser,
the handler's own task and coroutine, the parsed request, a keep-alive timer) and its own
coroutine stack, task, future and timer: 12.6 KB of the relay's memory a long-poll reader and
16.5 KB an SSE reader (``docs/OPERATIONS.md``). A reader parked here is one object, which is
also its connection's protocol while it waits (``asyncio.Transport.set_protocol``); its
deadline sits in the shared ``Deadlines``, and it has no task until it is woken.

Woken (data, a close, a delete, its deadline, a credential that stopped being valid, the relay
stopping), a long-poll reader builds its answer as a waiting reader would
(``reads.long_poll_answer``), writes the bytes itself (``wire.encode``: no ``web.Response``, no
aiohttp serialisation) and hands the connection to a fresh ``RelayProtocol``, as if it had just
answered there. An SSE reader writes its feed's events as HTTP/1.1 chunks and parks again,
until the feed ends.

Only a plain HTTP/1.1 keep-alive GET with nothing else on its connection is parked this way
(``_parkable`` and ``RelayProtocol.detach`` say when); any other reader waits inside aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11

from relay.auth.errors import Unauthorized
from relay.deadlines import Deadlines
from relay.http import wire
from relay.http.connections import RelayProtocol, RelayServer
from relay.http.context import CONTINUE, DROP, REQUEST_ID, Context
from relay.http.errors import error_answer
from relay.http.paths import stream_url_path

if TYPE_CHECKING:
    from protocol.model import StreamMeta
    from relay.auth.authorizer import Access
    from relay.http.chunks import Chunk
    from relay.http.live import Hold, LiveRead, SseFeed
    from relay.http.reads import Asked

Render = Callable[
    ["Context", "StreamMeta", "Chunk | None", "Asked", bool, "Access | None"], wire.Answer
]
"""(ctx, meta, chunk or None on timeout, asked, is_now, access) -> the long-poll's answer."""

log = structlog.get_logger("relay.http")

PENDING_BYTES = 64 * 1024
"""Bytes a parked connection takes before it stops reading: a pipelined request, kept for the
handler that follows."""
FLUSH_POLL_SECONDS = 0.05


class _Detached(web.StreamResponse):
    """What a handler returns for a reader parked here: aiohttp has nothing left to send."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


DETACHED = _Detached()


class Parking:
    """A process's parked readers: their deadlines and the tasks of those answering now."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(self.loop)
        self.answering: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Wait for the answers being sent: a stop wakes every parked reader (``Hub.shutdown``),
        and their answers must go out before the store closes."""
        await asyncio.sleep(0)  # the wakes the hub has scheduled start their answers
        while self.answering:
            await asyncio.gather(*self.answering, return_exceptions=True)

    def spawn(self, answer: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(answer)
        self.answering.add(task)
        task.add_done_callback(self.answering.discard)


class Park:
    """One long-poll request's offer to park its reader here (``live.Parker``)."""

    __slots__ = ("_asked", "_is_now", "_position", "_render", "_request")

    def __init__(
        self, request: web.Request, position: int, asked: Asked, is_now: bool, render: Render
    ) -> None:
        self._request = request
        self._position = position
        self._asked = asked
        self._is_now = is_now
        self._render = render

    def __call__(self, live: LiveRead, hold: Hold, deadline: float) -> bool:
        request = self._request
        connection = _parkable(request)
        if connection is None:
            return False
        reader = ParkedPoll(
            _parking(live.ctx),
            live,
            hold,
            self._position,
            deadline,
            self._asked,
            self._is_now,
            self._render,
            request.get(REQUEST_ID),
            request.headers.get("Origin"),
            connection.server,
        )
        return _detach(connection, reader)


def park_sse(request: web.Request, feed: SseFeed, hold: Hold, sent: int) -> bool:
    """Park an SSE reader whose feed would wait (``SseFeed.would_wait``), ``sent`` bytes into
    its body; False (nothing changes) when its connection cannot be taken."""
    connection = _parkable(request)
    if connection is None:
        return False
    reader = ParkedSse(
        _parking(feed.live.ctx),
        feed,
        hold,
        sent,
        request.get(REQUEST_ID),
        request.headers.get("Origin"),
        connection.server,
    )
    return _detach(connection, reader)


def _parkable(request: web.Request) -> RelayProtocol | None:
    """The request's connection, if its reader may be parked: a plain HTTP/1.1 keep-alive
    request without a body (nor one held back for ``100 Continue``), on a ``RelayProtocol``."""
    connection = request.protocol
    if (
        not isinstance(connection, RelayProtocol)
        or request.version != HttpVersion11
        or not request.keep_alive
        or request.body_exists
        or request.get(CONTINUE)
        or request.get(DROP)
    ):
        return None
    return connection


def _parking(ctx: Context) -> Parking:
    if ctx.parking is None:
        ctx.parking = Parking(ctx)
    return ctx.parking


def _detach(connection: RelayProtocol, reader: _Parked) -> bool:
    transport = connection.detach(reader)
    if transport is None:
        return False
    reader.start(transport)
    return True


class _State(enum.Enum):
    PARKED = 1  # waiting, the connection's protocol
    SENDING = 2  # woken: its task builds and sends what is due
    GONE = 3  # the client went away, or the answer is sent and the connection handed on


class _Parked(asyncio.Protocol):
    """What a parked reader of either kind is: its connection's protocol while it waits, a
    deadline in ``Parking.deadlines``, a place in its stream's parked set, a reader slot."""

    __slots__ = (
        "_key",
        "_live",
        "_origin",
        "_parking",
        "_paused",
        "_pending",
        "_rid",
        "_server",
        "_started",
        "_state",
        "_transport",
    )
    kind = ""

    def __init__(
        self,
        parking: Parking,
        live: LiveRead,
        rid: str | None,
        origin: str | None,
        server: RelayServer,
    ) -> None:
        self._parking = parking
        self._live = live
        self._rid = rid
        self._origin = origin
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._key = 0
        self._pending = b""
        self._paused: asyncio.Future[None] | None = None
        self._started = time.perf_counter()
        self._state = _State.PARKED

    # What each kind says

    @property
    def _deadline(self) -> float:
        raise NotImplementedError

    @property
    def _hold(self) -> Hold:
        raise NotImplementedError

    async def _send(self, woke: bool) -> None:
        """Woken (``woke``: by data, a close or a delete): send what is due, then park again
        (``_park``) or end (``_hand_back``)."""
        raise NotImplementedError

    # Parking

    def start(self, transport: asyncio.Transport) -> None:
        """Wait on ``transport``, which this now holds (and counts as an open connection)."""
        self._transport = transport
        self._server.open += 1
        self._park()

    def _park(self) -> None:
        self._state = _State.PARKED
        self._live.sub.park(self)
        when = self._deadline
        auth = self._parking.ctx.auth
        if self._live.access is not None and auth is not None:
            when = min(when, self._parking.loop.time() + auth.recheck_seconds)
        self._key = self._parking.deadlines.add(when, self)

    def wake(self) -> None:
        """A signal on the stream (``Hub``): data, a close, a delete, or the relay stopping."""
        if self._state is _State.PARKED:
            self._parking.deadlines.discard(self._key, self)
            self._wake(woke=self._live.sub.beyond(self._position()))

    def due(self) -> None:
        """Its deadline, or the time to re-check its credential (as ``LiveRead.wake`` does)."""
        if self._state is not _State.PARKED:
            return
        parking = self._parking
        access = self._live.access
        if parking.loop.time() < self._deadline and access is not None:
            auth = parking.ctx.auth
            assert auth is not None
            try:
                auth.recheck(access.principal)
            except Unauthorized:
                self._revoked()
            else:
                self._park()
                return
        self._live.sub.unpark(self)
        self._wake(woke=False)

    def _revoked(self) -> None:
        """Its credential stopped being valid while it waited; it is woken next."""
        raise NotImplementedError

    def _position(self) -> int:
        raise NotImplementedError

    def _wake(self, woke: bool) -> None:
        self._state = _State.SENDING
        self._parking.spawn(self._sending(woke))

    async def _sending(self, woke: bool) -> None:
        try:
            await self._send(woke)
        except Exception:  # an SSE event that could not be had (the store failed): cut off,
            # as a reader whose response fails mid-body is; it resumes from its last offset
            log.warning("live reader cut off", kind=self.kind, request_id=self._rid, exc_info=True)
            if self._transport is not None:
                self._transport.abort()

    def _gone(self) -> bool:
        """Whether the client went away (``connection_lost``) while this was sending."""
        return self._state is _State.GONE

    def _write(self, data: bytes) -> bool:
        """Hand ``data`` to the transport; False when the client is gone."""
        transport = self._transport
        if self._gone() or transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    async def _drained(self, limit: float, *, empty: bool) -> None:
        """Wait, up to ``limit``, for the transport to take writes again (``empty``: to have
        passed everything to the kernel); a client that does not read by then is cut off, as
        ``front._write_bounded`` and SSE's ``_send`` do."""
        transport = self._transport
        if transport is None:
            return
        loop = self._parking.loop
        end = loop.time() + limit
        while not self._gone() and not transport.is_closing():
            if empty and not transport.get_write_buffer_size():
                return
            if not empty and self._paused is None:
                return
            if loop.time() >= end:
                transport.abort()
                return
            if self._paused is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(end - loop.time()):
                        await asyncio.shield(self._paused)
            else:
                await asyncio.sleep(FLUSH_POLL_SECONDS)

    def _hand_back(self, close: bool) -> None:
        """Done: the connection goes to a fresh ``RelayProtocol`` (or is closed)."""
        transport = self._transport
        if self._gone() or transport is None:
            return
        self._state = _State.GONE
        self._server.open -= 1
        if close or transport.is_closing():
            transport.close()
            return
        connection = self._server()
        transport.set_protocol(connection)
        connection.resume(transport, self._pending)

    def _observe(self, status: int, size: int) -> None:
        ctx = self._parking.ctx
        elapsed = time.perf_counter() - self._started
        ctx.metrics.observe_request("GET", "stream", status, self.kind, elapsed)
        if ctx.access_log is not None:
            ctx.access_log.info(
                "request",
                method="GET",
                path=stream_url_path(self._live.meta.path),
                status=status,
                ms=round(elapsed * 1000, 3),
                bytes=size,
                request_id=self._rid,
            )

    # asyncio.Protocol: the connection while it waits

    def data_received(self, data: bytes) -> None:
        """A pipelined request: kept for the handler that follows this answer."""
        self._pending += data
        if len(self._pending) > PENDING_BYTES and self._transport is not None:
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # as aiohttp's handler: the transport closes

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = self._parking.loop.create_future()

    def resume_writing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        state = self._state
        if state is _State.GONE:
            return
        self._state = _State.GONE
        self._server.open -= 1
        self.resume_writing()
        if state is _State.PARKED:
            self._parking.deadlines.discard(self._key, self)
            self._live.sub.unpark(self)
            self._hold.release()


class ParkedPoll(_Parked):
    """One parked long-poll reader: one answer, then the connection goes back to aiohttp."""

    __slots__ = ("_asked", "_deadline_at", "_held", "_is_now", "_position_at", "_render")
    kind = "long-poll"

    def __init__(
        self,
        parking: Parking,
        live: LiveRead,
        hold: Hold,
        position: int,
        deadline: float,
        asked: Asked,
        is_now: bool,
        render: Render,
        rid: str | None,
        origin: str | None,
        server: RelayServer,
    ) -> None:
        super().__init__(parking, live, rid, origin, server)
        self._held = hold
        self._position_at = position
        self._deadline_at = deadline
        self._asked = asked
        self._is_now = is_now
        self._render = render

    @property
    def _deadline(self) -> float:
        return self._deadline_at

    @property
    def _hold(self) -> Hold:
        return self._held

    def _position(self) -> int:
        return self._position_at

    def _revoked(self) -> None:
        pass  # ``_send`` checks the credential again and answers 401

    def wake(self) -> None:
        """Woken by data the hub holds, with no credential to re-check (the common case: a
        token a reader is waiting for), it answers at once, without a task of its own."""
        if self._state is not _State.PARKED:
            return
        live = self._live
        sub = live.sub
        if live.access is None and sub.beyond(self._position_at) and not sub.deleted:
            found = live.held(self._position_at)
            if found is not None:
                self._parking.deadlines.discard(self._key, self)
                self._state = _State.SENDING
                try:
                    answer = self._answer(found)
                except Exception as exc:  # never into the hub's signal, which wakes others
                    answer = error_answer(exc, "GET", stream_url_path(live.meta.path), self._rid)
                finally:
                    self._held.release()
                if not self._deliver(answer):
                    self._parking.spawn(self._flush())
                return
        super().wake()

    async def _send(self, woke: bool) -> None:
        live = self._live
        access = live.access
        try:
            if access is not None and live.ctx.auth is not None:
                live.ctx.auth.recheck(access.principal)
            found = await live.woken(self._position_at) if woke else None
            answer = self._answer(found)
        except Exception as exc:  # what Front answers a waiting reader's exception
            answer = error_answer(exc, "GET", stream_url_path(live.meta.path), self._rid)
        finally:
            self._held.release()
        if not self._deliver(answer):
            await self._flush()

    def _answer(self, found: Chunk | None) -> wire.Answer:
        live = self._live
        return self._render(live.ctx, live.meta, found, self._asked, self._is_now, live.access)

    def _deliver(self, answer: wire.Answer) -> bool:
        """Send ``answer``; False when it waits in the transport's buffer (``_flush`` then)."""
        ctx = self._parking.ctx
        ctx.common_headers(answer.headers, self._rid, self._origin)
        close = ctx.stopping
        try:
            data = wire.encode(answer, close=close)
        except ValueError as exc:
            path = stream_url_path(self._live.meta.path)
            answer = error_answer(exc, "GET", path, self._rid)
            data = wire.encode(answer, close=close)
        self._observe(answer.status, len(answer.body or b""))
        transport = self._transport
        if self._write(data) and transport is not None and transport.get_write_buffer_size():
            return False
        self._hand_back(close)
        return True

    async def _flush(self) -> None:
        ctx = self._parking.ctx
        await self._drained(ctx.config.write_timeout, empty=True)
        self._hand_back(ctx.stopping)


class ParkedSse(_Parked):
    """One parked SSE reader: its response's head and first events went out through aiohttp;
    the rest are written here, as HTTP/1.1 chunks, until the feed ends."""

    __slots__ = ("_feed", "_held", "_sent")
    kind = "sse"

    def __init__(
        self,
        parking: Parking,
        feed: SseFeed,
        hold: Hold,
        sent: int,
        rid: str | None,
        origin: str | None,
        server: RelayServer,
    ) -> None:
        super().__init__(parking, feed.live, rid, origin, server)
        self._feed = feed
        self._held = hold
        self._sent = sent

    @property
    def _deadline(self) -> float:
        return self._feed.deadline

    @property
    def _hold(self) -> Hold:
        return self._held

    def _position(self) -> int:
        return self._feed.position

    def _revoked(self) -> None:
        self._feed.end()

    async def _send(self, woke: bool) -> None:
        feed = self._feed
        limit = self._parking.ctx.config.write_timeout
        try:
            while True:
                if feed.would_wait():
                    self._park()
                    return
                try:
                    event = await feed.next_event()
                except Exception:  # the store failed: end the stream, as reads._sse does
                    log.warning("SSE feed ended by an error", request_id=self._rid, exc_info=True)
                    event = None
                if event is None:
                    break
                if not self._write(b"%x\r\n%b\r\n" % (len(event), event)):
                    break
                self._sent += len(event)
                await self._drained(limit, empty=False)
        finally:
            if self._state is not _State.PARKED:
                self._held.release()
        ctx = self._parking.ctx
        self._observe(200, self._sent)
        if self._write(b"0\r\n\r\n"):
            await self._drained(limit, empty=True)
            self._hand_back(ctx.stopping)
