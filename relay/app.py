"""The application factory: routes, middleware and resources, built from a Config."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from protocol import headers as h
from protocol.errors import BadRequest, MethodNotAllowed, NotFound, Unavailable
from protocol.model import Segment, StreamMeta
from protocol.subscriptions import UrlPolicy
from relay.auth.authorizer import Authorizer
from relay.auth.http import authorize_stream
from relay.config import Config
from relay.http import reads, writes
from relay.http.context import CONTEXT, REQUEST_ID, Context, Limits
from relay.http.errors import Handler, error_response
from relay.http.paths import stream_path, valid_host
from relay.hub import Hub
from relay.metrics import CONTENT_TYPE, Metrics
from relay.sink import CommitSink
from relay.store.base import Store
from relay.subscriptions import routes as subscription_routes
from relay.subscriptions.db import Database, PostgresDatabase, SqliteDatabase
from relay.subscriptions.outbound import Outbound
from relay.subscriptions.service import EngineSettings, Subscriptions

log = structlog.get_logger("relay")

ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")
_STREAM_HANDLERS: dict[str, Handler] = {
    "GET": reads.get,
    "HEAD": writes.head,
    "POST": writes.append,
    "PUT": writes.create,
    "DELETE": writes.delete,
}


def make_store(config: Config) -> Store:
    """The Postgres store when a database URL is set, else the embedded SQLite one."""
    if config.database_url:
        from relay.store.postgres import PostgresStore

        return PostgresStore(
            config.database_url,
            max_batch_ops=config.max_batch_ops,
            max_batch_bytes=config.max_batch_bytes,
            commit_interval=config.commit_interval,
            max_fork_scan=config.max_fork_scan_bytes,
            command_timeout=config.db_timeout,
            direct_url=config.direct_database_url,
            pooler=config.database_pooler,
            read_urls=config.read_database_url,
        )
    from relay.store.sqlite import SqliteStore

    return SqliteStore(
        config.data_dir,
        max_batch_ops=config.max_batch_ops,
        max_batch_bytes=config.max_batch_bytes,
        commit_interval=config.commit_interval,
        max_fork_scan=config.max_fork_scan_bytes,
    )


async def stream(request: web.Request) -> web.StreamResponse:
    handler = _STREAM_HANDLERS.get(request.method)
    if handler is None:
        return _without_handler(request)
    return await handler(request)


async def guarded_stream(request: web.Request) -> web.StreamResponse:
    """``stream`` behind access control: the route used only when it is on, so serving
    without it costs nothing. OPTIONS (CORS preflight) stays open: browsers send no
    credentials with it."""
    handler = _STREAM_HANDLERS.get(request.method)
    if handler is None:
        return _without_handler(request)
    await authorize_stream(request)
    return await handler(request)


def _without_handler(request: web.Request) -> web.Response:
    # Checked before OPTIONS and 405 too: the reserved __ds prefix is 404 for every method.
    stream_path(request.raw_path, request.app[CONTEXT].config.max_path_length)
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={"Allow": ", ".join(ALLOWED_METHODS)})
    raise MethodNotAllowed(request.method, ALLOWED_METHODS)


_PROBE_HEADERS = {"Cache-Control": "no-store"}


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests (``/health`` is the same)."""
    worker = request.app[CONTEXT].worker
    body: dict[str, object] = {"status": "ok"}
    if worker is not None:
        body["worker"] = worker.index  # who served this
    return web.json_response(body, headers=_PROBE_HEADERS)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: storage reachable and its schema current, else 503 with the reason."""
    reason = await request.app[CONTEXT].store.ready()
    if reason is None:
        return web.json_response({"status": "ready"}, headers=_PROBE_HEADERS)
    return web.json_response(
        {"status": "unavailable", "reason": reason}, status=503, headers=_PROBE_HEADERS
    )


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    body = ctx.metrics.render()
    if ctx.worker is not None:
        body = await ctx.worker.add_up(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


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


@web.middleware
async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every request passes through, in one frame: request id, Host check, admission
    while stopping, the error table, sending the body, metrics and the access log line."""
    ctx = request.app[CONTEXT]
    started = time.perf_counter()
    request[REQUEST_ID] = rid = request_id(request)
    raised: web.HTTPException | None = None
    try:
        check_host(request)
        if ctx.stopping:  # requests still arriving on open connections get 503, not a reset
            raise Unavailable("relay is shutting down")
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404 and request.method != "HEAD":
            response = error_response(request, NotFound("no such resource"))
        else:  # aiohttp's own answer (405, HEAD 404): sent, counted and logged here, then
            response = raised = exc  # re-raised, as aiohttp wants it raised, not returned
    except Exception as exc:
        response = error_response(request, exc)
    if ctx.stopping:
        response.force_close()  # clients reconnect elsewhere rather than race our close
    # Prepared ones (SSE) too: their end is sent here, bounded, and their length known.
    await _write_bounded(request, response, ctx.config.write_timeout)
    elapsed = time.perf_counter() - started
    route = ctx.routes.get(request.match_info.route, "other")
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
    if raised is not None:
        raise raised
    return response


ROUTE_LABELS: dict[object, str] = {
    stream: "stream",
    guarded_stream: "stream",
    subscription_routes.control: "subscriptions",
    healthz: "health",
    readyz: "ready",
    metrics: "metrics",
}
"""The ``route`` label of each handler's requests; anything unrouted is ``other``."""


def begin_shutdown(app: web.Application) -> None:
    """First step of a graceful stop: refuse new requests and answer every parked reader.

    In-flight appends finish on their own (the store closes only after the server has
    waited for its handlers, and closing it commits what is queued).
    """
    ctx = app[CONTEXT]
    ctx.stopping = True
    ctx.hub.shutdown()


async def _on_shutdown(app: web.Application) -> None:
    """For runners other than ``relay serve`` (tests, embedding), which skip the first step."""
    begin_shutdown(app)


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


def _cors_and_security(config: Config) -> object:
    allowed = {o.strip() for o in config.cors_origins.split(",") if o.strip()}
    expose = ", ".join((*h.RESPONSE_HEADERS, "WWW-Authenticate"))
    allow_headers = ", ".join((*h.REQUEST_HEADERS, "Authorization"))

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        out = response.headers
        rid = request.get(REQUEST_ID)
        if rid is not None:
            out[REQUEST_ID_HEADER] = rid
        out["X-Content-Type-Options"] = "nosniff"
        out["Cross-Origin-Resource-Policy"] = "cross-origin"
        origin = request.headers.get("Origin")
        if "*" in allowed:
            out["Access-Control-Allow-Origin"] = "*"
        elif origin in allowed:
            out["Access-Control-Allow-Origin"] = origin
            vary = out.get("Vary")
            out["Vary"] = f"{vary}, Origin" if vary else "Origin"  # keep what the handler set
        else:
            return
        out["Access-Control-Expose-Headers"] = expose
        if request.method == "OPTIONS":
            requested = request.headers.get("Access-Control-Request-Headers")
            out["Access-Control-Allow-Methods"] = ", ".join(ALLOWED_METHODS)
            out["Access-Control-Allow-Headers"] = (
                f"{allow_headers}, {requested}" if requested else allow_headers
            )
            out["Access-Control-Max-Age"] = "86400"

    return on_prepare


def make_app(config: Config, store: Store | None = None) -> web.Application:
    """Build the aiohttp application. Resources open and close in ``cleanup_ctx``."""
    app = web.Application(
        middlewares=[front],
        client_max_size=config.max_body_bytes + 1,
    )
    the_store = store if store is not None else make_store(config)
    hub = Hub(max_bytes=config.hub_memory_bytes)
    metrics_ = Metrics()
    auth = Authorizer(config, metrics_.auth_failed) if config.auth_enabled else None
    ctx = Context(
        config=config,
        store=the_store,
        hub=hub,
        metrics=metrics_,
        # Bound once (a lazy proxy costs a bind per call); None skips the line, arguments and all.
        access_log=structlog.get_logger("relay.access").bind()
        if config.access_log and config.log_level in ("debug", "info")
        else None,
        limits=Limits(
            config.max_inflight_writes, config.max_live_readers, config.max_inflight_write_bytes
        ),
        auth=auth,
    )
    app[CONTEXT] = ctx
    ctx.subscriptions = make_subscriptions(ctx)
    app.on_response_prepare.append(_cors_and_security(config))  # type: ignore[arg-type]
    # Section 6: the reserved control prefix is routed before stream operations.
    app.router.add_route("*", r"/v1/stream/__ds/{rest:[\s\S]*}", subscription_routes.control)
    # any char, even newline
    app.router.add_route(
        "*", r"/v1/stream/{path:[\s\S]*}", stream if auth is None else guarded_stream
    )
    # Probes and metrics sit outside the stream routes, so access control never covers them.
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/health", healthz)  # what older scripts and probes ask for
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    ctx.routes = {route: ROUTE_LABELS.get(route.handler, "other") for route in app.router.routes()}
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_lifecycle)
    return app


def make_subscriptions(ctx: Context) -> Subscriptions | None:
    """Subscription state lives beside the streams: the same Postgres database, or the same
    SQLite file. None (control routes answer 404) for any other store, such as test doubles."""
    from relay.store.postgres import PostgresStore
    from relay.store.sqlite import SqliteStore

    config = ctx.config
    db: Database
    if isinstance(ctx.store, PostgresStore):
        db = PostgresDatabase(ctx.store.url, config.db_timeout, pooler=ctx.store.pooler)
    elif isinstance(ctx.store, SqliteStore):
        db = SqliteDatabase(ctx.store.db_path)
    else:
        return None
    allowed = tuple(h for h in config.webhook_allowed_hosts.split(",") if h)
    outbound = Outbound(
        UrlPolicy(allow_loopback=config.webhook_allow_loopback, allowed_hosts=allowed),
        timeout=config.webhook_timeout,
        concurrency=config.webhook_concurrency,
    )

    async def append_json(path: str, message: bytes) -> None:
        await writes.append_json(ctx, path, message)

    settings = EngineSettings(
        poll_interval=config.subscription_poll_interval,
        webhook_timeout=config.webhook_timeout,
        public_url=config.public_url.rstrip("/"),
    )
    return Subscriptions(
        db, outbound, ctx.metrics.subscriptions, append_json, settings, clock=ctx.clock
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    await ctx.store.open()
    if ctx.subscriptions is not None:
        # A database-wide count: under --workers, one worker reports it, or /metrics would
        # add it up once per worker.
        ctx.subscriptions.report_failed = ctx.worker is None or ctx.worker.index == 0
        await ctx.subscriptions.open()  # after the store: its migrations made our tables
    ctx.metrics.watch_store(ctx.store)
    ctx.store.set_listener(CommitSink(ctx.hub, ctx.metrics, ctx.subscriptions))

    async def fetch(stream_id: int, start: int, end: int) -> bytes:
        meta = StreamMeta(stream_id, "", "", end, segments=(Segment(stream_id, 0, None),))
        return await ctx.store.read(meta, start, end)

    ctx.hub.set_fetch(fetch)
    if ctx.auth is not None:
        await ctx.auth.open()
    reaper = asyncio.create_task(_reap_forever(ctx), name="reaper")
    yield
    reaper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reaper
    if ctx.subscriptions is not None:
        await ctx.subscriptions.close()
    if ctx.auth is not None:
        await ctx.auth.close()
    await ctx.store.close()


async def _reap_forever(ctx: Context) -> None:
    """Reap expired streams every ``reap_interval``. While the database is unreachable the
    store logs the outage (once) and requests get 503; a pass then just waits for the next."""
    while True:
        await asyncio.sleep(ctx.config.reap_interval)
        try:
            expired = await ctx.store.reap(ctx.clock())
            if expired:
                ctx.metrics.streams_expired.inc(expired)
        except Unavailable:
            continue
        except Exception:
            log.exception("reaper failed")
