"""The ``relay`` command: ``serve``, ``migrate``, ``revoke``, ``rotate-webhook-key``, ``tables``
and ``bench``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from relay import config as config_mod

if TYPE_CHECKING:
    from aiohttp import web

    from relay.workers import WorkerSpec


DATABASE_SETTINGS = (
    "database_url",
    "database_pooler",
    "direct_database_url",
    "db_timeout",
    "log_level",
    "log_format",
)
"""What the commands that only open the database read (migrate, revoke, rotate-webhook-key)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A durable stream relay speaking the Durable Streams HTTP protocol.",
    )
    from relay import __version__

    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the relay",
        description="Serve streams under /v1/stream/. Every flag can also be set as RELAY_<NAME>.",
    )
    config_mod.add_arguments(serve)
    serve.add_argument("--worker-of", dest="worker_of", default=None, help=argparse.SUPPRESS)
    migrate = commands.add_parser(
        "migrate",
        help="apply Postgres schema migrations and exit",
        description="Bring the database named by --database-url to this relay's schema.",
    )
    config_mod.add_arguments(migrate, DATABASE_SETTINGS)
    revoke = commands.add_parser(
        "revoke",
        help="revoke a credential on Postgres (every relay on the database stops it in seconds)",
        description="Add a row to relay_revocations: a JWT by its jti, or a key by its id"
        " (the kid of a JWT signing key, or an API key's id).",
    )
    config_mod.add_arguments(revoke, DATABASE_SETTINGS)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", dest="revoke_jti", help="a JWT's jti claim")
    which.add_argument("--kid", dest="revoke_kid", help="a signing key's kid or an API key's id")
    rotate = commands.add_parser(
        "rotate-webhook-key",
        help="add a new webhook signing key; the old one stays published for a day",
        description="Add a webhook signing key to the store's database (Postgres with"
        " --database-url, else the data directory's SQLite); the old key stays published"
        " in the JWKS for a day, so receivers that cached it keep verifying.",
    )
    config_mod.add_arguments(rotate, (*DATABASE_SETTINGS, "data_dir"))
    from relay.tables.cli import add_parser as add_tables_parser

    add_tables_parser(commands)
    bench = commands.add_parser(
        "bench", help="compare the relay with a bare aiohttp server and the reference server"
    )
    from relay.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from relay.bench import run as run_bench

        return run_bench(args)
    try:
        config = config_mod.load(args)
    except config_mod.ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        return _migrate(config)
    if args.command == "rotate-webhook-key":
        from relay.subscriptions.keys import rotate_command

        return rotate_command(config)
    if args.command == "revoke":
        return _revoke(config, args.revoke_jti, args.revoke_kid)
    if args.command == "tables":
        from relay.tables.cli import run as run_tables

        return run_tables(config, args)
    try:
        config_mod.check_serving(config)
        if not config.database_url:
            from relay.datadir import prepare

            prepare(config.data_dir)
    except config_mod.ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    worker = None
    if args.worker_of is not None:
        from relay.workers import WorkerSpec

        worker = WorkerSpec.parse(args.worker_of)
    return _serve(config, worker)


DRAIN_SECONDS = 0.5
"""How long a stop lets open connections finish and close before closing idle ones."""


def _serve(config: config_mod.Config, worker: WorkerSpec | None = None) -> int:
    """Serve in this process, or (``--workers`` > 1) supervise that many worker processes."""
    from relay.logging import configure

    configure(config.log_level, config.log_format)
    if worker is None and config.workers > 1:
        from relay.workers import supervise

        return supervise(config)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_serve_until_signalled(config, worker))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, handed to ``asyncio.Runner`` (the supported way since Python 3.11; no
    event-loop policy is installed), or None for asyncio's own where uvloop is missing."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop.Loop`` or ``asyncio.unix_events._UnixSelectorEventLoop``: what serves us."""
    kind = type(loop)
    return f"{kind.__module__}.{kind.__qualname__}"


async def _serve_until_signalled(config: config_mod.Config, spec: WorkerSpec | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully; a second signal exits at once.

    The stop closes the listener, refuses requests still arriving on open connections (503),
    answers parked readers, lets in-flight requests finish (up to ``shutdown_timeout``), and
    only then closes the store, whose committer commits what is queued.

    A worker (``spec``) shares the port with its siblings (SO_REUSEPORT), serves its own
    samples on a private port, and stops when its parent's pipe closes too.
    """
    import structlog
    from aiohttp import web

    from relay import __version__
    from relay.app import begin_shutdown, make_app
    from relay.http.context import CONTEXT
    from relay.http.front import RelayRunner
    from relay.resources import raise_open_files
    from relay.store.base import StoreStartupError
    from relay.workers import Worker, unblock_stop_signals, watch_parent

    log = structlog.get_logger("relay")
    open_files = raise_open_files()  # each connection and parked reader holds one
    try:
        app = make_app(config)
    except config_mod.ConfigError as exc:  # a credential file that cannot be used
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    worker = None
    if spec is not None:
        log = log.bind(worker=spec.index)
        worker = app[CONTEXT].worker = Worker(spec, config.workers)
    runner = RelayRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=config.shutdown_timeout
    )
    try:
        await runner.setup()
    except StoreStartupError as exc:
        log.error("cannot start", reason=str(exc))
        return 1
    except Exception as exc:  # e.g. a database whose schema the migration cannot create
        # Still one line naming it; the traceback only when asked for (--log-level debug).
        reason = f"{type(exc).__name__}: {exc}"
        log.error("cannot start", reason=reason, exc_info=config.log_level == "debug")
        return 1
    deadline: threading.Timer | None = None
    try:
        stop = asyncio.Event()
        _on_stop_signals(stop, parent=os.getppid() if worker is not None else None)
        site = web.TCPSite(runner, config.host, config.port, reuse_port=worker is not None)
        try:
            await site.start()
        except OSError as exc:  # port in use, address not on this host, no permission
            log.error("cannot start", reason=f"cannot listen on {site.name}: {exc.strerror}")
            return 1
        if worker is not None:
            unblock_stop_signals()  # a stop sent while we started is taken now, gracefully
            watch_parent(stop)
            # After the public site: once every worker's private port is known (the summed
            # /metrics answers 200), every worker is serving the public port.
            await worker.start(app[CONTEXT].metrics.render)
        log.info(
            "relay started",
            url=site.name,
            store="postgres" if config.database_url else "sqlite",
            version=__version__,
            loop=loop_name(asyncio.get_running_loop()),
            auth=config.auth_enabled,
            pid=os.getpid(),
            open_files=open_files.soft,
            open_files_hard=open_files.hard,
            open_files_before=open_files.before,
            max_connections=runner.connection_cap,
        )
        await stop.wait()
        deadline = _stop_deadline(stop_seconds(config))
        begin_shutdown(app)
        await site.stop()
        await _drain(runner, DRAIN_SECONDS)
    finally:
        await runner.cleanup()
        if worker is not None:
            await worker.close()
    if deadline is not None:
        deadline.cancel()
    log.info("relay stopped")
    return 0


STOP_GRACE = 5.0


def stop_seconds(config: config_mod.Config) -> float:
    """How long a graceful stop may take: the drain, in-flight handlers (shutdown-timeout),
    then the store's last commit and its connections' close (each bounded by db-timeout)."""
    return DRAIN_SECONDS + config.shutdown_timeout + 2 * config.db_timeout + STOP_GRACE


def _stop_deadline(seconds: float) -> threading.Timer:
    """Exit if the stop has not finished in ``seconds``: a stop stuck on something
    unbounded must not leave a process holding its port and database connections (a worker
    whose parent is gone has nobody to kill it). Safe, as after kill -9: what was
    acknowledged is durable. A thread, so it fires even if the event loop is stuck."""
    import structlog

    def expire() -> None:
        structlog.get_logger("relay").error("stop did not finish in time, exiting", seconds=seconds)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


REPEAT_WINDOW = 0.1
"""Seconds within which a repeated stop signal is taken as the same stop, delivered twice."""


def _on_stop_signals(stop: asyncio.Event, *, parent: int | None = None) -> None:
    """The first SIGTERM/SIGINT sets ``stop``; the next one exits without any cleanup.

    Exiting at once is safe: every acknowledged append is already durable, exactly as
    after a kill -9. A worker (``parent``: its supervisor's pid) ignores repeats while that
    parent lives: Ctrl-C or systemd's stop signals the whole group and the parent forwards
    the same signal, so one stop reaches it twice; a second stop is the parent's to act on
    (it kills the workers). Once the parent is gone, a repeat exits, as for a lone relay.
    """
    import structlog

    log = structlog.get_logger("relay")

    loop = asyncio.get_running_loop()
    first = 0.0

    def handle(signum: int) -> None:
        nonlocal first
        name = signal.Signals(signum).name
        if stop.is_set():
            # One stop delivered twice (``timeout`` or a wrapper signals the process and its
            # group, microseconds apart) is not an operator asking again.
            if os.getppid() == parent or loop.time() - first < REPEAT_WINDOW:
                return
            log.warning("second signal, exiting now", signal=name)
            os._exit(128 + signum)
        log.info("stopping", signal=name)
        first = loop.time()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, handle, signum)


async def _drain(runner: web.AppRunner, limit: float) -> None:
    """Wait (up to ``limit``) for open connections to finish their requests and close.

    Responses sent while stopping close their connection, so busy clients go away on their
    own; the idle ones left after ``limit`` are closed by ``runner.cleanup``.
    """
    from relay.http.context import CONTEXT

    server = runner.server
    parking = runner.app[CONTEXT].parking
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline and (
        (server is not None and server.connections) or (parking is not None and parking.answering)
    ):
        await asyncio.sleep(0.02)


def _migrate(config: config_mod.Config) -> int:
    if not config.database_url:
        print("relay: migrate needs --database-url or RELAY_DATABASE_URL", file=sys.stderr)
        return 2
    from relay.logging import configure
    from relay.store.postgres import migrate
    from relay.store.postgres.connections import direct_url

    configure(config.log_level, config.log_format)
    applied = asyncio.run(migrate(direct_url(config)))  # the migration lock needs a session
    structlog.get_logger("relay").info("schema migrated", version=applied)
    return 0


def _revoke(config: config_mod.Config, jti: str | None, kid: str | None) -> int:
    if not config.database_url:
        print(
            "relay: revoke needs --database-url (without Postgres, list revocations in the"
            " --auth-revocations file)",
            file=sys.stderr,
        )
        return 2
    from relay.store.postgres import revoke
    from relay.store.postgres.connections import direct_url

    kind, value = ("jti", jti) if jti is not None else ("kid", kid)
    assert value is not None
    asyncio.run(revoke(direct_url(config), kind, value))  # it migrates first: a session
    print(f"revoked {kind} {value}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
