"""The ``relay`` command: ``serve``, ``migrate`` and ``bench``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from relay import config as config_mod


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A durable stream relay speaking the Durable Streams HTTP protocol.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the relay",
        description="Serve streams under /v1/stream/. Every flag can also be set as RELAY_<NAME>.",
    )
    config_mod.add_arguments(serve)
    migrate = commands.add_parser("migrate", help="apply Postgres schema migrations and exit")
    config_mod.add_arguments(migrate)
    bench = commands.add_parser("bench", help="measure appends and reads against a relay")
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
    return _serve(config)


def _serve(config: config_mod.Config) -> int:
    from aiohttp import web

    from relay.app import make_app
    from relay.logging import configure

    configure(config.log_level, config.log_format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        pass
    from relay.store.base import StoreStartupError

    try:
        web.run_app(
            make_app(config),
            host=config.host,
            port=config.port,
            print=lambda text: print(text, flush=True),
            access_log=None,
            shutdown_timeout=5,
        )
    except StoreStartupError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


def _migrate(config: config_mod.Config) -> int:
    if not config.database_url:
        print("relay: migrate needs --database-url or RELAY_DATABASE_URL", file=sys.stderr)
        return 2
    from relay.store.postgres import migrate

    applied = asyncio.run(migrate(config.database_url))
    print(f"schema at version {applied}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
