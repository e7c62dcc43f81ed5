"""The application factory: handlers, routes and resources, built from a Config."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from protocol.errors import MethodNotAllowed, Unavailable
from protocol.model import Segment, StreamMeta
from protocol.subscriptions import UrlPolicy
from relay.auth.authorizer import Authorizer
from relay.auth.http import authorize_stream
from relay.config import Config
from relay.http import reads, writes
from relay.http.context import CONTEXT, Context, Limits, context
from relay.http.errors import Handler
from relay.http.front import ALLOWED_METHODS, CONTROL_PREFIX, FRONT, Front, Routes
from relay.http.paths import stream_path
from relay.hub import Hub
from relay.metrics import CONTENT_TYPE, Metrics
from relay.sink import CommitSink
from relay.store.base import Store
from relay.subscriptions import routes as subscription_routes
from relay.subscriptions.db import Database, PostgresDatabase, SqliteDatabase
from relay.subscriptions.outbound import Outbound
from relay.subscriptions.service import EngineSettings, Subscriptions

if TYPE_CHECKING:
    from relay.tables.follower import TableFollower

log = structlog.get_logger("relay")

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
            commit_pipeline=config.commit_pipeline,
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
    stream_path(request.raw_path, context(request).config.max_path_length)
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={"Allow": ", ".join(ALLOWED_METHODS)})
    raise MethodNotAllowed(request.method, ALLOWED_METHODS)


_PROBE_HEADERS = {"Cache-Control": "no-store"}


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests (``/health`` is the same)."""
    worker = context(request).worker
    body: dict[str, object] = {"status": "ok"}
    if worker is not None:
        body["worker"] = worker.index  # who served this
    return web.json_response(body, headers=_PROBE_HEADERS)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: storage reachable and its schema current, else 503 with the reason."""
    ctx = context(request)
    reason = await ctx.store.ready()
    if reason is None and ctx.tables is not None:
        reason = ctx.tables.ready()
    if reason is None:
        return web.json_response({"status": "ready"}, headers=_PROBE_HEADERS)
    return web.json_response(
        {"status": "unavailable", "reason": reason}, status=503, headers=_PROBE_HEADERS
    )


async def metrics(request: web.Request) -> web.Response:
    ctx = context(request)
    body = ctx.metrics.render()
    if ctx.worker is not None:
        body = await ctx.worker.add_up(body)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


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


def make_app(config: Config, store: Store | None = None) -> web.Application:
    """Build the aiohttp application. Resources open and close in ``cleanup_ctx``."""
    app = web.Application(client_max_size=config.max_body_bytes + 1)
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
    ctx.tables = make_tables(ctx)
    routes = Routes(
        stream if auth is None else guarded_stream,
        subscription_routes.control,
        # Probes and metrics sit outside the stream routes, so access control never covers
        # them; /health is what older scripts and probes ask for.
        {
            "/healthz": (healthz, "health"),
            "/health": (healthz, "health"),
            "/readyz": (readyz, "ready"),
            "/metrics": (metrics, "metrics"),
        },
    )
    app[FRONT] = front = Front(ctx, routes)
    # What a plain AppRunner serves; RelayRunner hands requests to ``front`` without it.
    # Front answers Expect itself, for both.
    app.router.add_route("*", r"/{any:[\s\S]*}", front.__call__, expect_handler=_no_expectation)
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _no_expectation(_request: web.Request) -> None:
    return None


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
        control_path=CONTROL_PREFIX,
        poll_interval=config.subscription_poll_interval,
        webhook_timeout=config.webhook_timeout,
        public_url=config.public_url.rstrip("/"),
    )
    return Subscriptions(
        db, outbound, ctx.metrics.subscriptions, append_json, settings, clock=ctx.clock
    )


def make_tables(ctx: Context) -> TableFollower | None:
    """The table-stream follower, wherever there is a Postgres to follow (it starts only if
    table streams are declared: by flags, or earlier with ``relay tables add``)."""
    config = ctx.config
    if not config.tables_url:
        return None
    from relay.tables.follower import FollowerSettings, TableFollower, TablesCollector
    from relay.tables.spec import parse_many

    settings = FollowerSettings(
        url=config.tables_url,
        declared=parse_many(config.table_stream) if config.table_stream else (),
        slot=config.table_slot,
        poll_interval=config.table_poll_interval,
        max_retained_bytes=config.table_max_retained_bytes,
        max_path_length=config.max_path_length,
        connect_timeout=max(config.db_timeout, 1.0),
        compact_ratio=config.table_compact_ratio,
        compact_min_bytes=config.table_compact_min_bytes,
    )
    follower = TableFollower(settings, ctx.store, ctx.clock)
    ctx.metrics.registry.register(TablesCollector(follower.stats))
    return follower


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
    if ctx.tables is not None:
        await ctx.tables.open()  # after the store and the listener: it appends
    reaper = asyncio.create_task(_reap_forever(ctx), name="reaper")
    yield
    reaper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reaper
    if ctx.parking is not None:
        await ctx.parking.drain()
    if ctx.tables is not None:
        await ctx.tables.close()
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
