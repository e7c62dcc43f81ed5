"""What every request passes through, in one frame: routing, request id, Host check, admission
while stopping, the error table, the CORS and security headers, sending the answer (bounded),
metrics and the access log line.

``Front`` is the request handler of aiohttp's low-level ``web.Server`` (``RelayRunner``): the
application's router, middleware chain and ``on_response_prepare`` signal cost 10-30 us a
request (the ledger, Benchmarks), and Relay has six routes, which a prefix test and a dict
lookup resolve. The ``web.Application`` stays for what it does well (resources opened and
closed in ``cleanup_ctx``, the shutdown signal) and keeps one catch-all route to the same
``Front``, so an app run by a plain ``AppRunner`` answers the same, only slower.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from protocol import headers as h
from protocol.errors import BadRequest, MethodNotAllowed, NotFound, Unavailable
from relay.config import Config
from relay.http.connections import ConnectionRules, RelayProtocol, RelayServer
from relay.http.context import CONTINUE, CTX, DROP, REQUEST_ID, Context
from relay.http.errors import Handler, error_response
from relay.http.parked import DETACHED
from relay.http.paths import PREFIX, valid_host

CONTROL_PREFIX = f"{PREFIX}__ds/"
PROBE_METHODS = ("GET", "HEAD")


class Routes:
    """Relay's routes: the stream prefix, its reserved control prefix (section 6, resolved
    first), and exact probe paths, each probe with its metrics label."""

    def __init__(
        self, stream: Handler, control: Handler, probes: Mapping[str, tuple[Handler, str]]
    ) -> None:
        self._stream = (stream, "stream")
        self._control = (control, "subscriptions")
        self._probes = dict(probes)

    def resolve(self, request: web.Request) -> tuple[Handler, str]:
        """The handler and label for a request; unknown paths and methods raise (404, 405).
        Matched on the decoded path, as aiohttp's router did."""
        path = request.path
        if path.startswith(PREFIX):
            return self._control if path.startswith(CONTROL_PREFIX) else self._stream
        probe = self._probes.get(path)
        if probe is None:
            raise NotFound("no such resource")
        if request.method not in PROBE_METHODS:
            raise MethodNotAllowed(request.method, PROBE_METHODS)
        return probe


REQUEST_ID_HEADER = "X-Request-Id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}").fullmatch
"""An incoming X-Request-Id is kept only if short and plain, as it lands in logs and headers."""
_REQUEST_IDS = itertools.count(1)
_ID_PREFIX = secrets.token_hex(4)  # per process: workers and restarts never share ids


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id if sane, else a new one (a process prefix and a counter:
    unique without a syscall per request)."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _SANE_REQUEST_ID(given):
        return given
    return f"{_ID_PREFIX}-{next(_REQUEST_IDS):x}"


_LIVE_KIND = {"long-poll": "long-poll", "sse": "sse"}
_WRITE_METHODS = frozenset({"POST", "PUT", "DELETE"})


def request_kind(request: web.Request, route: str) -> str:
    """How a request is timed: write, read (catch-up), long-poll, sse or other. Live reads
    are held open by design, so they are timed apart from requests that should be quick."""
    if route != "stream":
        return "other"
    method = request.method
    if method == "GET":  # the handler has parsed (and cached) the query already
        return _LIVE_KIND.get(request.query.get("live", ""), "read")
    if method == "HEAD":
        return "read"
    return "write" if method in _WRITE_METHODS else "other"


class Front:
    """The one request handler (see the module docstring)."""

    def __init__(self, ctx: Context, routes: Routes) -> None:
        self._ctx = ctx
        self.config = ctx.config
        self._routes = routes
        self._decorate = ResponseHeaders(ctx.config)
        ctx.decorate = self._decorate
        ctx.common_headers = self._decorate.apply

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        ctx = self._ctx
        started = time.perf_counter()
        request[CTX] = ctx
        request[REQUEST_ID] = rid = request_id(request)
        route = "other"
        connection = request.protocol
        over_cap = False
        if isinstance(connection, RelayProtocol):
            connection.request_started()
            over_cap = connection.over_cap
        try:
            handler, route = self._routes.resolve(request)
            check_host(request)
            if ctx.stopping:  # requests still arriving on open connections get 503, not a reset
                raise Unavailable("relay is shutting down")
            if over_cap:
                raise Unavailable("too many open connections", retry_after=1)
            if request.headers.get(hdrs.EXPECT) is not None:
                _expect(request)
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own refusals (a body past its limit)
            response = _plain(request, exc)
        except Exception as exc:
            response = error_response(request, exc)
        if response is DETACHED:
            return response  # a parked reader: it answers, counts and logs itself
        if ctx.stopping or over_cap or request.get(CONTINUE) or request.get(DROP):
            # Stopping: clients reconnect elsewhere rather than race our close. A body never
            # invited: the client may still send it, and it must not be read as a request.
            # A body dropped part-read: its rest is not worth decoding to reuse the connection.
            response.force_close()
        if not response.prepared:
            self._decorate(request, response)
        # Prepared ones (SSE) too: their end is sent here, bounded, and their length known.
        await _write_bounded(request, response, ctx.config.write_timeout)
        if request.get(DROP) and request.transport is not None:
            request.transport.close()  # else aiohttp decodes the rest of the body to drain it
        if isinstance(connection, RelayProtocol):
            connection.request_ended()
        elapsed = time.perf_counter() - started
        status = response.status
        ctx.metrics.observe_request(
            request.method, route, status, request_kind(request, route), elapsed
        )
        if ctx.access_log is not None:  # paths only: query strings may carry tokens
            ctx.access_log.info(
                "request",
                method=request.method,
                path=request.path,
                status=status,
                ms=round(elapsed * 1000, 3),
                bytes=response.body_length,
                request_id=rid,
            )
        return response


def _expect(request: web.Request) -> None:
    """``Expect: 100-continue`` (curl sends it before bodies over 1 KiB) is noted here and
    answered only when a handler starts reading the body (``context.continue_body``): a request
    refused first (401, 403, 413 by its declared length, 503) is answered without inviting a
    body it would not read. Any other expectation is 417 (RFC 9110 10.1.1)."""
    if request.version != HttpVersion11:
        return
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    request[CONTINUE] = True


def _plain(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    """An aiohttp ``HTTPException`` as an ordinary answer (a low-level handler returns it,
    never raises it); a 404 gets our JSON error body like every other."""
    if exc.status == 404:
        return error_response(request, NotFound("no such resource"))
    response = web.Response(status=exc.status, reason=exc.reason, body=exc.body)
    for name, value in exc.headers.items():
        if name.lower() != "content-length":
            response.headers.add(name, value)
    return response


FLUSH_POLL_SECONDS = 0.05


async def _write_bounded(request: web.Request, response: web.StreamResponse, limit: float) -> None:
    """Send the whole response here, within ``limit`` seconds, instead of leaving it to
    aiohttp after the handler returns, where a client that never reads would hold the
    connection and up to a chunk of buffered bytes forever."""
    transport = request.transport
    if transport is not None and _small(response) and not transport.get_write_buffer_size():
        # The common case, without a timer (arming one was 6% of a small read's CPU): an
        # unprepared body under aiohttp's drain threshold, on a connection whose earlier
        # answers are all flushed, is handed to the transport without waiting for the client.
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            return
        if not transport.get_write_buffer_size():
            return  # all of it is with the kernel; else wait for the client below, bounded
    timer = asyncio.get_running_loop().call_later(limit, transport.abort) if transport else None
    try:
        await response.prepare(request)
        await response.write_eof()
        # write_eof returns once the body is handed to the transport; a large one may still
        # be waiting there for the client to read it.
        while transport is not None and transport.get_write_buffer_size():
            await asyncio.sleep(FLUSH_POLL_SECONDS)
    except ConnectionError:
        pass  # the client went away, or stopped reading and was cut off
    finally:
        if timer is not None:
            timer.cancel()


SMALL_BODY = 32 * 1024
"""Bodies up to this go out without a write timer: aiohttp waits for the transport only past
64 KiB written (its ``StreamWriter`` drain limit), so prepare and write_eof cannot block."""


def _small(response: web.StreamResponse) -> bool:
    if response.prepared or not isinstance(response, web.Response):
        return False  # SSE and other streamed answers: their end may wait for the client
    body = response.body
    return body is None or (isinstance(body, bytes | bytearray) and len(body) <= SMALL_BODY)


def check_host(request: web.Request) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request needs exactly one Host, and any Host must be a valid
    ``host[:port]``; it becomes our ``Location``. An absolute-form target's own authority
    replaces Host (3.2.2), so there the field is ignored. aiohttp itself refuses a missing or
    repeated Host; this catches the rest, and would still catch those if it stopped."""
    if request.raw_path.startswith("/"):
        hosts = request.headers.getall("Host", [])
        if len(hosts) > 1 or (not hosts and request.version >= (1, 1)):
            raise BadRequest("invalid_host", "HTTP/1.1 requests carry exactly one Host header")
        if hosts and not valid_host(hosts[0]):
            raise BadRequest("invalid_host", "Host must be host[:port]")


ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")


class ResponseHeaders:
    """The headers every answer carries (request id, nosniff, CORP) and, for an allowed
    Origin, the CORS ones. Applied once per answer, just before its headers go out: by
    ``Front`` for whole answers, by a handler that streams (SSE) before it prepares."""

    def __init__(self, config: Config) -> None:
        self._allowed = {o.strip() for o in config.cors_origins.split(",") if o.strip()}
        self._any = "*" in self._allowed
        self._expose = ", ".join((*h.RESPONSE_HEADERS, "WWW-Authenticate"))
        self._allow_headers = ", ".join((*h.REQUEST_HEADERS, "Authorization"))

    def __call__(self, request: web.Request, response: web.StreamResponse) -> None:
        out = response.headers
        cors = self.apply(out, request.get(REQUEST_ID), request.headers.get("Origin"))
        if cors and request.method == "OPTIONS":
            requested = request.headers.get("Access-Control-Request-Headers")
            out["Access-Control-Allow-Methods"] = ", ".join(ALLOWED_METHODS)
            out["Access-Control-Allow-Headers"] = (
                f"{self._allow_headers}, {requested}" if requested else self._allow_headers
            )
            out["Access-Control-Max-Age"] = "86400"

    def apply(self, out: MutableMapping[str, str], rid: str | None, origin: str | None) -> bool:
        """The common headers and, for an allowed ``origin``, the CORS ones but the
        preflight's own (which need the request's); whether the origin was allowed."""
        if rid is not None:
            out[REQUEST_ID_HEADER] = rid
        out["X-Content-Type-Options"] = "nosniff"
        out["Cross-Origin-Resource-Policy"] = "cross-origin"
        if self._any:
            out["Access-Control-Allow-Origin"] = "*"
        elif origin in self._allowed:
            out["Access-Control-Allow-Origin"] = origin
            vary = out.get("Vary")
            out["Vary"] = f"{vary}, Origin" if vary else "Origin"  # keep what the handler set
        else:
            return False
        out["Access-Control-Expose-Headers"] = self._expose
        return True


FRONT: web.AppKey[Front] = web.AppKey("relay_front", Front)


class RelayRunner(web.AppRunner):
    """An ``AppRunner`` whose server hands every request straight to the app's ``Front``:
    the application starts, serves its cleanup contexts and stops as usual, but no request
    passes its router, middleware or signals. Its connections are ``RelayProtocol``s, with
    the request-head deadlines, idle timeout and cap of the app's config."""

    def __init__(
        self,
        app: web.Application,
        *,
        handle_signals: bool = False,
        shutdown_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            app, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout, **kwargs
        )
        self._protocol_kwargs = kwargs

    @property
    def connection_cap(self) -> int:
        """How many connections it serves before answering new ones 503 (after setup)."""
        server = self.server
        assert isinstance(server, RelayServer)
        return server.rules.cap

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # starts the app, which makes the Context
        config = self.app[FRONT].config
        kwargs = {"keepalive_timeout": config.idle_timeout, **self._protocol_kwargs}
        return RelayServer(
            # The server still builds web.Request objects (the app's request factory), so the
            # BaseRequest this attribute is typed with is always a Request here.
            cast(_LowLevelHandler, self.app[FRONT]),
            rules=ConnectionRules.from_config(config),
            loop=asyncio.get_running_loop(),
            request_factory=server.request_factory,
            **kwargs,
        )


_LowLevelHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
