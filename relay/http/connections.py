"""Connections, before and between requests: how long a client may take to send a request's
head, how long a connection may sit idle, and how many may be open.

aiohttp's ``RequestHandler`` has one timer, its keep-alive timeout, armed when a connection
opens and after each answer: it closes a connection that has sent no complete request head by
then. Left at aiohttp's default (an hour) a silent or byte-a-second client holds its socket
that long. ``RelayProtocol`` adds a second, shorter deadline for the request head: from the
connection's opening (``--first-request-timeout``) and from the first byte of each later
request (``--header-timeout``), and the keep-alive timer becomes ``--idle-timeout``. Neither
runs while a request is being answered, so a parked long-poll or SSE reader is never cut.

The cap (``--max-connections``): a connection opened while that many are open is answered 503
with ``Retry-After`` once its request head arrives (so the client reads an answer, not a
reset), then closed; it can wait for that head no longer than any other.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError

from protocol.errors import UnsupportedEncoding
from relay.config import Config
from relay.http.compression import BODY_ENCODINGS
from relay.http.errors import error_response
from relay.resources import connection_cap

LINGER_SECONDS = 2.0
"""How long a connection cut off mid-head is kept half-open, reading nothing, after its 408:
the client's bytes already in flight are taken instead of answered with a reset."""


@dataclass(frozen=True)
class ConnectionRules:
    """The deadlines and the cap, in seconds and connections."""

    first_request: float
    header: float
    cap: int

    @classmethod
    def from_config(cls, config: Config) -> ConnectionRules:
        cap = config.max_connections or connection_cap()
        return cls(config.first_request_timeout, config.header_timeout, cap)


def _timeout_answer() -> bytes:
    body = orjson.dumps(
        {"error": {"code": "request_timeout", "message": "request head not received in time"}}
    )
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "Content-Type: application/json\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


REQUEST_TIMEOUT = _timeout_answer()
"""Written (outside ``Front``: there is no request) to a client cut off mid-head."""


class RelayServer(web.Server):
    """aiohttp's low-level server, making ``RelayProtocol`` connections and counting them."""

    def __init__(
        self,
        handler: Any,
        *,
        rules: ConnectionRules,
        loop: asyncio.AbstractEventLoop,
        request_factory: Any,
        handler_cancellation: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            loop=loop,
            **kwargs,
        )
        self.rules = rules
        self.open = 0
        self.event_loop = loop
        self._protocol_kwargs = kwargs  # RequestHandler's own (keepalive_timeout, access_log)

    def __call__(self) -> RelayProtocol:
        return RelayProtocol(self, loop=self.event_loop, **self._protocol_kwargs)


class RelayProtocol(web.RequestHandler):
    """One client connection: aiohttp's handler plus the request-head deadline and the cap.

    ``Front`` tells it when a request starts and ends (``request_started``, ``request_ended``):
    the deadline runs only outside requests, from the connection's opening or a request's
    first byte, until a request head is complete.
    """

    def __init__(self, manager: RelayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._clock = manager.event_loop.time
        self._due: float | None = None
        """When the request head now arriving must be complete; None inside a request."""
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._partial = False  # bytes of a request head have arrived, the head is not whole
        self._counted = False
        self._lingering = False
        self._clean_end = True  # the last bytes received ended a request head
        self._read_in_request = False  # bytes arrived while a request was being answered
        self.over_cap = False
        """Opened while ``cap`` connections were open: its request is answered 503."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._server
        self.over_cap = server.open >= server.rules.cap
        server.open += 1
        self._counted = True
        self._due = self._clock() + server.rules.first_request
        self._timer = asyncio.get_running_loop().call_at(self._due, self._check)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._server.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a request cut off by its deadline
        self._clean_end = data.endswith(b"\r\n\r\n")
        if self._in_request:
            self._read_in_request = True
        elif data:
            self._partial = True
            if self._due is None:  # the first byte of the next request
                due = self._due = self._clock() + self._server.rules.header
                timer = self._timer
                if timer is None or timer.when() > due:
                    if timer is not None:
                        timer.cancel()
                    self._timer = asyncio.get_running_loop().call_at(due, self._check)
        super().data_received(data)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused, except a body in a coding it
        knows but cannot decode here (``br`` without Brotli): that is the 415 every other
        coding Relay does not take gets, with the same JSON body, not a plain-text 400."""
        if isinstance(exc, ContentEncodingError):
            response = error_response(
                cast(web.Request, request), UnsupportedEncoding(BODY_ENCODINGS)
            )
            response.force_close()
            return response
        return super().handle_error(request, status, exc, message)

    def request_started(self) -> None:
        """A request's head is complete; its answer may take as long as it takes."""
        self._due = None
        self._in_request = True
        self._read_in_request = False
        self._partial = False

    @property
    def server(self) -> RelayServer:
        return self._server

    def detach(self, to: asyncio.Protocol) -> asyncio.Transport | None:
        """Give the connection to ``to`` in the middle of a bodiless request (a parked
        reader, ``relay.http.parked``) and forget it, as if it had closed: aiohttp's handler,
        its parser and its task go, the transport stays open. None (nothing changes) when the
        connection holds anything else: a request queued behind this one, bytes read since
        it, or part of a request head (the last bytes read did not end a head), which only
        the parser holds; or reading is paused.
        """
        transport = self.transport  # uvloop's: not an asyncio.Transport subclass, only alike
        if (
            transport is None
            or transport.is_closing()
            or self._messages
            or self._read_in_request
            or not self._clean_end
            or self._buffer_paused
            or self._upgraded
        ):
            return None
        transport.set_protocol(to)
        self.transport = None  # what aiohttp still does with this request writes nothing
        self.connection_lost(None)
        return transport

    def resume(self, transport: asyncio.Transport, pending: bytes) -> None:
        """Take a connection back from a parked reader that has just answered: it is idle
        (the keep-alive timer runs, no request-head deadline yet), counted against the cap as
        before, and ``pending`` holds what the client sent meanwhile.

        This is aiohttp's ``connection_made`` without setting the socket's options again
        (TCP_NODELAY, keep-alive): they hold from the connection's opening, and each asks the
        transport for its socket, which uvloop builds anew every time (with the TLS lookup,
        a fifth of a woken long-poll's CPU in ``relay bench --scenarios fanout``).
        """
        self.transport = transport
        manager = self._manager
        assert manager is not None
        manager.connection_made(self, transport)
        loop = self._loop
        if self._keepalive_timeout > 0:
            close_time = loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
        self._task_handler = loop.create_task(self.start())
        self._server.open += 1
        self._counted = True
        transport.resume_reading()
        if pending:
            self.data_received(pending)

    def request_ended(self) -> None:
        self._in_request = False

    def _check(self) -> None:
        """The one timer: a deadline set or moved since it was armed is looked at again then,
        so keep-alive requests cost a clock read each, not a timer each (arming one was 6% of
        a small read's CPU, see ``front._write_bounded``)."""
        self._timer = None
        due = self._due
        if due is None or self._in_request:
            return
        if self._clock() < due:
            self._timer = asyncio.get_running_loop().call_at(due, self._check)
            return
        self._due = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._partial:
            transport.close()
            return
        # It sent part of a request: say why it ends, then close only the sending side and
        # drop what still comes for a moment. Closing outright while its bytes are in flight
        # makes the kernel answer them with a reset, which may destroy the 408 unread.
        transport.write(REQUEST_TIMEOUT)
        self._lingering = True
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
