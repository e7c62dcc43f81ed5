"""``relay bench``: the same scenarios against the relay, a bare aiohttp server and the reference.

The bench starts every server itself, one at a time, pinned to CPU 0 while the generator runs
on CPU 1 (where there are two cores), so it can read each server's CPU time and the ratios
compare servers, not schedulers. Scenarios (``relay.bench.scenarios``) are bounded in count
and time and stop by themselves; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp

from relay.bench import capacity, readers
from relay.bench.report import Result, render
from relay.bench.scenarios import BARE_SCENARIOS, DEFAULT_SCENARIOS, SCENARIOS, Options
from relay.bench.targets import TARGETS, TargetSpec, can_pin, pin_generator, start_target

TOKEN_P99_BUDGET = 0.100
"""The tokens scenario's pass mark: p99 token latency at most this, and nothing lost."""
HELD_RATE = 0.95
"""...and the producers kept at least this share of their rate (they wait for each answer)."""


def _names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return names

    return parse


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Options()
    add = parser.add_argument
    add(
        "--targets",
        type=_names(TARGETS),
        default=("relay",),
        help="servers to compare, comma-separated: relay, bare, reference (default: relay)",
    )
    add(
        "--scenarios",
        type=_names(tuple(SCENARIOS)),
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated: {', '.join(SCENARIOS)} (default: all but capacity, streams, "
        "long, compression, tables and readers)",
    )
    add("--url", default="", help="bench a relay already running here instead of starting one")
    add("--database-url", default="", help="start the relay on this Postgres (default: embedded)")
    add(
        "--read-database-url",
        action="append",
        default=[],
        help="a hot standby of --database-url for the relay's catch-up reads (repeatable); "
        "catchup then waits for it to replay what was written before reading",
    )
    add("--no-pin", dest="pin", action="store_false", help="do not pin server and generator")
    add(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="the relay's --access-log (its lines go to /dev/null; default on, as in production)",
    )
    add(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "relay-bench",
        help="where the reference server is installed if conformance/official has no npm ci",
    )
    add(
        "--connections",
        "--producers",
        type=int,
        default=defaults.connections,
        help="append, ledger: concurrent connections (append: one stream each)",
    )
    add(
        "--duration",
        type=float,
        default=defaults.duration,
        help="append, ledger: seconds to run (ledger: per depth)",
    )
    add(
        "--count",
        "--appends",
        type=int,
        default=defaults.count,
        help="append, ledger: requests per connection instead of --duration",
    )
    add("--payload", type=int, default=defaults.payload, help="append: bytes per body")
    add(
        "--sessions",
        type=_counts,
        default=defaults.sessions,
        help="tokens: session counts to try, comma-separated",
    )
    add("--rate", type=float, default=defaults.rate, help="tokens: tokens/s per session")
    add(
        "--token-seconds",
        type=float,
        default=defaults.token_seconds,
        help="tokens: seconds each producer writes",
    )
    add(
        "--live",
        type=_names(("long-poll", "sse")),
        default=defaults.live,
        help="tokens, readers: how readers tail, long-poll, sse or both",
    )
    add("--json", action="store_true", help="tokens: JSON-mode streams")
    add("--readers", type=int, default=defaults.readers, help="fanout: parked long-poll readers")
    add("--streams", type=int, default=defaults.streams, help="memory: streams")
    add(
        "--stream-counts",
        type=_counts,
        default=defaults.stream_counts,
        help="streams: total streams at each step, comma-separated (cumulative)",
    )
    add(
        "--idle-seconds",
        type=float,
        default=defaults.idle_seconds,
        help="streams: seconds the idle relay's CPU is measured at each step",
    )
    add(
        "--long-appends",
        type=int,
        default=defaults.long_appends,
        help="long: token appends to the one long stream",
    )
    add(
        "--long-append-bytes",
        type=int,
        default=defaults.long_append_bytes,
        help="long: bytes per append (16384 appends of 65536 B make a 1 GiB stream)",
    )
    add(
        "--parked",
        type=int,
        default=defaults.parked,
        help="memory: parked long-poll readers, spread over --streams",
    )
    add(
        "--messages",
        "--fanout-appends",
        type=int,
        default=defaults.messages,
        help="fanout: messages written",
    )
    add("--message-rate", type=float, default=defaults.message_rate, help="fanout: messages/s")
    add("--catchup-mib", type=int, default=defaults.catchup_mib, help="catchup: MiB read back")
    add(
        "--reader-counts",
        type=_counts,
        default=defaults.reader_counts,
        help="readers: live readers at each run, comma-separated (each on a fresh relay)",
    )
    add(
        "--layouts",
        type=_names(readers.LAYOUTS),
        default=defaults.layouts,
        help="readers: spread (over 1,000 streams), one (stream) or both",
    )
    add(
        "--relays",
        type=_counts,
        default=defaults.relays,
        help="capacity: relay processes on the one database, counts to try, comma-separated",
    )


def options(args: argparse.Namespace) -> Options:
    return Options(
        connections=args.connections,
        duration=args.duration,
        count=args.count,
        payload=args.payload,
        sessions=args.sessions,
        rate=args.rate,
        token_seconds=args.token_seconds,
        live=args.live,
        json=args.json,
        readers=args.readers,
        messages=args.messages,
        message_rate=args.message_rate,
        catchup_mib=args.catchup_mib,
        streams=args.streams,
        parked=args.parked,
        relays=args.relays,
        stream_counts=args.stream_counts,
        idle_seconds=args.idle_seconds,
        long_appends=args.long_appends,
        reader_counts=args.reader_counts,
        layouts=args.layouts,
        long_append_bytes=args.long_append_bytes,
    )


def run(args: argparse.Namespace) -> int:
    results = run_results(args)
    print(report(results, args))
    return 0


def run_results(args: argparse.Namespace) -> list[Result]:
    """Run every scenario against every target; the generator is pinned only meanwhile."""
    args.pin = args.pin and can_pin()  # decided once, while every core is still ours
    unpin = pin_generator() if args.pin else None
    try:
        try:
            import uvloop

            return uvloop.run(_run(args))
        except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
            return asyncio.run(_run(args))
    finally:
        if unpin is not None:
            unpin()


async def _run(args: argparse.Namespace) -> list[Result]:
    opts = options(args)
    results: list[Result] = []
    for name in args.targets:
        spec = TargetSpec(
            name,
            args.database_url,
            args.url,
            args.pin,
            args.cache_dir,
            args.access_log,
            tuple(args.read_database_url),
        )
        async with start_target(spec) as target, _client(opts) as client:
            for scenario in args.scenarios:
                if name == "bare" and scenario not in BARE_SCENARIOS:
                    continue
                results.extend(await SCENARIOS[scenario](client, target, opts))
    return results


@contextlib.asynccontextmanager
async def _client(opts: Options) -> AsyncIterator[aiohttp.ClientSession]:
    """One session, its pool large enough that no reader or producer waits for a connection.

    ``identity`` keeps servers from compressing: the reference would otherwise gzip what the
    relay sends plain.
    """
    limit = max(opts.connections, 2 * max(opts.sessions), opts.readers, opts.parked) + 32
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers={"Accept-Encoding": "identity"}
    ) as client:
        yield client


def report(results: Sequence[Result], args: argparse.Namespace) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    pinned = args.pin
    store = "postgres" if args.database_url else "sqlite"
    if args.read_database_url:
        store += f" + {len(args.read_database_url)} read replica(s)"
    lines = [
        f"relay bench: relay store={store}, {cores} cores ({_cpu_model()}), "
        + ("server on CPU 0, generator on CPU 1" if pinned else "not pinned")
    ]
    for scenario in SCENARIOS:
        rows = [r for r in results if r.scenario == scenario]
        if rows:
            lines += ["", render(scenario, rows)]
    lines += _token_summary(results)
    lines += capacity.summary(results)
    lines += readers.summary(results)
    if "capacity" in args.scenarios and not args.database_url:
        lines += ["", "capacity: not run, it needs --database-url (relays sharing a Postgres)"]
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown CPU"


def _token_summary(results: Sequence[Result]) -> list[str]:
    """The largest session count each target held at p99 <= 100 ms with nothing lost."""
    lines: list[str] = []
    held: dict[tuple[str, str], int] = {}
    for result in results:
        if result.scenario != "tokens":
            continue
        sessions, _, live = result.variant.partition(" sessions, ")
        key = (result.target.label, live)
        held.setdefault(key, 0)
        p99 = result.p(0.99)
        kept_up = result.held is None or result.held >= HELD_RATE
        if result.lost == 0 and kept_up and p99 is not None and p99 <= TOKEN_P99_BUDGET:
            held[key] = max(held[key], int(sessions))
    if held:
        lines += ["", "tokens: most sessions with p99 <= 100 ms, zero loss and >= 95% of the rate"]
        for (label, live), most in held.items():
            lines.append(f"  {label}, {live}: {most or 'none of those tried'}")
    return lines
