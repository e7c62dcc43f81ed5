"""Configuration: one frozen dataclass, read once from CLI flags and ``RELAY_*`` variables.

Flags win over the environment, the environment over defaults. A bad value fails at start-up
with a message naming the setting. Nothing else in Relay reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A setting has a value Relay cannot use; the message names it."""


@dataclass(frozen=True)
class Setting:
    """One configuration knob: its flag, type, default and help text."""

    name: str
    kind: Callable[[str], Any]
    default: Any
    help: str
    repeatable: bool = False
    """The flag may be given more than once (its values are joined with commas)."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


MAX_COMMIT_PIPELINE = 16


def _pipeline_depth(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_COMMIT_PIPELINE:  # each is a database connection
        raise ValueError(f"must be 1..{MAX_COMMIT_PIPELINE}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535")
    return value


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return level


def _host_list(text: str) -> str:
    hosts = [h.strip().lower() for h in text.split(",") if h.strip()]
    for host in hosts:
        if "/" in host or ":" in host or " " in host:
            raise ValueError("must be host names (or *.domain), comma-separated")
    return ",".join(hosts)


def _pooler(text: str) -> str:
    kind = text.strip().lower()
    if kind not in ("none", "transaction"):
        raise ValueError("must be none or transaction")
    return kind


def _log_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in ("auto", "console", "json"):
        raise ValueError("must be auto, console or json")
    return fmt


_URL_START = re.compile(r",\s*(?=postgres(?:ql)?://)")


def _database_urls(text: str) -> tuple[str, ...]:
    """Comma-separated Postgres URLs. A comma splits only before ``postgres[ql]://``: one URL
    may itself name several hosts with commas (``postgresql://u@h1:5432,h2:5432/db``)."""
    urls = tuple(url.strip() for url in _URL_START.split(text) if url.strip())
    for url in urls:
        if not url.startswith(("postgres://", "postgresql://")):
            raise ValueError("must be postgresql:// URLs, comma-separated or the flag repeated")
    return urls


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _switch(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be on or off (true/false, yes/no, 1/0)")


def _table_streams(text: str) -> str:
    """Table stream definitions (``relay.tables.spec``), checked and written back the same
    way, comma-joined (what ``RELAY_TABLE_STREAM`` holds)."""
    from relay.tables.spec import parse_many

    return ",".join(spec.render() for spec in parse_many(text))


_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


def _slot_name(text: str) -> str:
    if not _SLOT_NAME.fullmatch(text):
        raise ValueError("must be 1-63 of a-z, 0-9 and _ (a replication slot's name)")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "127.0.0.1", "address to listen on"),
    Setting("port", _port, 4437, "TCP port to listen on (0 picks a free one)"),
    Setting(
        "workers",
        _positive_int,
        1,
        "processes serving the port (SO_REUSEPORT), one per core; more than 1 needs Postgres",
    ),
    Setting("data_dir", str, "./data", "directory of the embedded SQLite store"),
    Setting(
        "database_url",
        str,
        "",
        "Postgres URL (postgresql://...); when set, streams live in Postgres, not data-dir",
    ),
    Setting(
        "database_pooler",
        _pooler,
        "none",
        "none, or transaction: database-url is a transaction-mode pooler such as PgBouncer "
        "(no prepared-statement cache on its connections; needs direct-database-url)",
    ),
    Setting(
        "direct_database_url",
        str,
        "",
        "Postgres URL bypassing any pooler, for LISTEN and migrations (session state); "
        "default: database-url",
    ),
    Setting(
        "long_poll_timeout",
        _positive_float,
        30.0,
        "seconds a long-poll waits for data before answering 204 (decimals allowed)",
    ),
    Setting(
        "sse_reconnect_interval",
        _positive_float,
        60.0,
        "seconds after which an SSE connection is closed so clients reconnect (CDN collapsing)",
    ),
    Setting("max_body_bytes", _positive_int, 16 * 1024 * 1024, "largest accepted request body"),
    Setting("max_chunk_bytes", _positive_int, 1024 * 1024, "most bytes one GET returns"),
    Setting(
        "compress_min_bytes",
        _non_negative_int,
        1024,
        "smallest read answer of a textual stream sent compressed (zstd or gzip, as the "
        "client's Accept-Encoding allows); 0: never compress",
    ),
    Setting(
        "max_fork_scan_bytes",
        _positive_int,
        16 * 1024 * 1024,
        "most source bytes a fork's Stream-Fork-Sub-Offset may scan (400 beyond)",
    ),
    Setting("max_path_length", _positive_int, 1024, "longest accepted stream path, in bytes"),
    Setting(
        "max_batch_ops",
        _positive_int,
        1024,
        "most operations the store commits in one transaction (group commit)",
    ),
    Setting(
        "max_batch_bytes",
        _positive_int,
        16 * 1024 * 1024,
        "most appended bytes the store commits in one transaction",
    ),
    Setting(
        "commit_interval",
        _non_negative_float,
        0.0,
        "seconds between the starts of group commits (0: the next commit starts as soon as the "
        "previous ends); gathers a trickle of small writes into fewer commits, adding up to "
        "this much latency under load",
    ),
    Setting(
        "commit_pipeline",
        _pipeline_depth,
        1,
        "Postgres: group commits in flight at once, each on its own connection; with 2 or "
        "more, appends to streams no commit in flight touches start the next one at once, "
        "cutting latency for more commits (1: one at a time)",
    ),
    Setting(
        "max_inflight_writes",
        _positive_int,
        10000,
        "writes waiting for a commit before new ones get 503 with Retry-After",
    ),
    Setting(
        "max_inflight_write_bytes",
        _positive_int,
        256 * 1024 * 1024,
        "request body bytes of writes in flight before new ones get 503 with Retry-After",
    ),
    Setting(
        "max_live_readers",
        _positive_int,
        100000,
        "parked long-poll and SSE readers before new ones get 429 with Retry-After",
    ),
    Setting(
        "hub_memory_bytes",
        _positive_int,
        64 * 1024 * 1024,
        "recent appends held in memory for woken live readers, across all streams",
    ),
    Setting(
        "write_timeout",
        _positive_float,
        30.0,
        "seconds a response body (or one SSE event) may take to reach a client that stops "
        "reading before the connection is dropped",
    ),
    Setting(
        "first_request_timeout",
        _positive_float,
        10.0,
        "seconds a new connection may take to send its first request's headers before it is closed",
    ),
    Setting(
        "header_timeout",
        _positive_float,
        10.0,
        "seconds a client may take to send a request's headers from their first byte before "
        "it gets 408 and the connection is closed",
    ),
    Setting(
        "idle_timeout",
        _positive_float,
        75.0,
        "seconds an idle keep-alive connection is kept open between requests (longer than a "
        "proxy's own upstream idle timeout, 60 s in nginx and AWS ALB)",
    ),
    Setting(
        "max_connections",
        _non_negative_int,
        0,
        "open client connections before a new one's request gets 503 with Retry-After and the "
        "connection is closed; 0: the open-file limit less 256",
    ),
    Setting(
        "reap_interval",
        _positive_float,
        0.5,
        "seconds between sweeps that reclaim expired and unreferenced deleted streams",
    ),
    Setting(
        "cors_origins",
        str,
        "*",
        "allowed browser origins, comma-separated, or * for any",
    ),
    Setting("log_level", _log_level, "info", "debug, info, warning or error"),
    Setting(
        "log_format",
        _log_format,
        "auto",
        "json (one JSON object a line), console, or auto: console on a terminal, else json",
    ),
    Setting(
        "access_log",
        _switch,
        True,
        "log one line per request at info (method, path, status, duration, bytes, request id)",
    ),
    Setting(
        "db_timeout",
        _non_negative_float,
        5.0,
        "seconds a database call may take before the request is answered 503",
    ),
    Setting(
        "read_database_url",
        _database_urls,
        (),
        "hot standby of --database-url serving catch-up reads (repeat the flag, or separate "
        "URLs with commas, for several); bytes it has not replayed yet come from the primary",
        repeatable=True,
    ),
    Setting(
        "shutdown_timeout",
        _non_negative_float,
        10.0,
        "seconds a stop waits for in-flight requests before cutting them off",
    ),
    Setting(
        "auth_api_keys",
        str,
        "",
        "JSON file of API keys (SHA-256 hashes and their grants); reloaded when it changes",
    ),
    Setting("auth_jwt_keys", str, "", "JWK Set file of keys that sign accepted JWTs"),
    Setting(
        "auth_jwks_url",
        str,
        "",
        "URL of a JWK Set, fetched in the background and on an unknown kid",
    ),
    Setting("auth_audience", str, "", "required JWT aud (unchecked when empty)"),
    Setting("auth_issuer", str, "", "required JWT iss (unchecked when empty)"),
    Setting(
        "auth_clock_skew",
        _non_negative_float,
        30.0,
        "seconds of clock skew allowed when checking JWT exp and nbf",
    ),
    Setting(
        "auth_revocations",
        str,
        "",
        'JSON file {"revoked": [{"jti": ...} | {"kid": ...}]}; reloaded when it changes',
    ),
    Setting(
        "insecure_no_auth",
        _boolean,
        False,
        "serve a non-loopback address without any credentials (anyone may do anything)",
    ),
    Setting(
        "webhook_allow_loopback",
        _boolean,
        True,
        "allow http webhooks to localhost / 127.0.0.x (development); false forbids them",
    ),
    Setting(
        "webhook_allowed_hosts",
        _host_list,
        "",
        "if set, the only webhook hosts allowed (comma-separated; *.example.com for subdomains)",
    ),
    Setting("webhook_timeout", _positive_float, 10.0, "seconds one webhook call may take in all"),
    Setting("webhook_concurrency", _positive_int, 64, "webhook calls in flight at once, per relay"),
    Setting(
        "subscription_poll_interval",
        _positive_float,
        0.25,
        "seconds between looks for due subscription deliveries (retries, other relays' wakes)",
    ),
    Setting(
        "table_stream",
        _table_streams,
        "",
        "a Postgres table whose committed row changes are appended to streams as State "
        "Protocol messages: TABLE:PATH:columns=A,B[:type=T][:key=K], PATH filled from the row "
        "(chat/{chat_id}/state); repeat the flag for several",
        repeatable=True,
    ),
    Setting(
        "table_database_url",
        str,
        "",
        "Postgres URL (a direct session, not a pooler) of the tables of --table-stream; "
        "default: direct-database-url, else database-url",
    ),
    Setting(
        "table_slot",
        _slot_name,
        "relay_tables",
        "name of the logical replication slot and publication table streams use",
    ),
    Setting(
        "table_max_retained_bytes",
        _positive_int,
        1024 * 1024 * 1024,
        "WAL the table streams' slot may keep before /readyz answers 503 (pair it with "
        "Postgres's max_slot_wal_keep_size)",
    ),
    Setting(
        "table_poll_interval",
        _positive_float,
        0.2,
        "seconds between looks at the table streams' slot when it had nothing new",
    ),
    Setting(
        "table_compact_ratio",
        _non_negative_float,
        4.0,
        "fold a table stream into a snapshot once its history from the horizon is this many "
        "times its last snapshot (and over --table-compact-min-bytes); 0: never",
    ),
    Setting(
        "table_compact_min_bytes",
        _positive_int,
        64 * 1024,
        "history below which a table stream is never compacted by policy",
    ),
    Setting(
        "public_url",
        str,
        "",
        "base URL clients use to reach this relay (callback and JWKS URLs); default: the "
        "request's own",
    ),
)


@dataclass(frozen=True)
class Config:
    """Every setting, resolved. See SETTINGS for meaning and defaults."""

    host: str = "127.0.0.1"
    port: int = 4437
    workers: int = 1
    data_dir: str = "./data"
    database_url: str = ""
    database_pooler: str = "none"
    direct_database_url: str = ""
    long_poll_timeout: float = 30.0
    sse_reconnect_interval: float = 60.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_chunk_bytes: int = 1024 * 1024
    compress_min_bytes: int = 1024
    max_fork_scan_bytes: int = 16 * 1024 * 1024
    max_path_length: int = 1024
    max_batch_ops: int = 1024
    max_batch_bytes: int = 16 * 1024 * 1024
    commit_interval: float = 0.0
    commit_pipeline: int = 1
    max_inflight_writes: int = 10000
    max_inflight_write_bytes: int = 256 * 1024 * 1024
    max_live_readers: int = 100000
    hub_memory_bytes: int = 64 * 1024 * 1024
    write_timeout: float = 30.0
    first_request_timeout: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 0
    reap_interval: float = 0.5
    cors_origins: str = "*"
    log_level: str = "info"
    log_format: str = "auto"
    access_log: bool = True
    db_timeout: float = 5.0
    read_database_url: tuple[str, ...] = ()
    shutdown_timeout: float = 10.0
    auth_api_keys: str = ""
    auth_jwt_keys: str = ""
    auth_jwks_url: str = ""
    auth_audience: str = ""
    auth_issuer: str = ""
    auth_clock_skew: float = 30.0
    auth_revocations: str = ""
    insecure_no_auth: bool = False

    @property
    def auth_enabled(self) -> bool:
        """Credentials are checked once any key source is configured."""
        return bool(self.auth_api_keys or self.auth_jwt_keys or self.auth_jwks_url)

    webhook_allow_loopback: bool = True
    webhook_allowed_hosts: str = ""
    webhook_timeout: float = 10.0
    webhook_concurrency: int = 64
    subscription_poll_interval: float = 0.25
    table_stream: str = ""
    table_database_url: str = ""
    table_slot: str = "relay_tables"
    table_max_retained_bytes: int = 1024 * 1024 * 1024
    table_poll_interval: float = 0.2
    table_compact_ratio: float = 4.0
    table_compact_min_bytes: int = 64 * 1024
    public_url: str = ""

    @property
    def tables_url(self) -> str:
        """Where table streams' tables live: a direct session (the advisory lock)."""
        return self.table_database_url or self.direct_database_url or self.database_url


WORKERS_NEED_POSTGRES = (
    "--workers > 1 needs --database-url: the embedded store is one process's"
    " (its data directory is locked by one writer)"
)


POOLER_NEEDS_DIRECT_URL = (
    "--database-pooler transaction needs --direct-database-url (RELAY_DIRECT_DATABASE_URL): a"
    " URL that reaches Postgres itself, not the pooler, for LISTEN and the migration lock,"
    " which need a session of their own"
)
READ_REPLICAS_NEED_POSTGRES = (
    "--read-database-url needs --database-url: read replicas are standbys of the Postgres"
    " primary, which keeps every write, long-poll and NOTIFY"
)


TABLES_NEED_POSTGRES = (
    "--table-stream needs Postgres: --database-url (the tables are in the store's database)"
    " or --table-database-url"
)


NEEDS_AUTH = (
    "--host {host} is not a loopback address and no credentials are configured: set"
    " --auth-api-keys, --auth-jwt-keys or --auth-jwks-url, or pass --insecure-no-auth to let"
    " anyone who can reach it read, write and delete every stream"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a hostname, or empty (every interface)


def check_serving(config: Config) -> None:
    """Refuse to serve without credentials anywhere but loopback, unless told to."""
    if not config.auth_enabled and not config.insecure_no_auth and not is_loopback(config.host):
        raise ConfigError(NEEDS_AUTH.format(host=config.host or "''"))


def env_name(setting: str) -> str:
    return "RELAY_" + setting.upper()


def env_value(value: Any) -> str:
    """A resolved value as its ``RELAY_*`` variable spells it (lists comma-separated)."""
    return ",".join(value) if isinstance(value, tuple) else str(value)


def add_arguments(parser: argparse.ArgumentParser, only: Collection[str] | None = None) -> None:
    """Add one ``--flag`` per setting (or per setting named in ``only``, for commands that
    use a few); defaults stay None so the environment can apply."""
    for setting in SETTINGS:
        if only is not None and setting.name not in only:
            continue
        flag = "--" + setting.name.replace("_", "-")
        if setting.kind is _boolean and setting.default is False:
            # An off-by-default boolean is a bare switch; the environment takes true/false.
            parser.add_argument(
                flag,
                dest=setting.name,
                action="store_const",
                const="true",
                default=None,
                help=f"{setting.help} (env {env_name(setting.name)}=true)",
            )
            continue
        parser.add_argument(
            flag,
            dest=setting.name,
            action="append" if setting.repeatable else "store",
            default=None,
            metavar=setting.name.upper(),
            help=f"{setting.help} (env {env_name(setting.name)}, default {setting.default!r})",
        )


def load(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Resolve every setting from flags, then ``RELAY_*`` variables, then defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None) if args is not None else None
        source = "--" + setting.name.replace("_", "-")
        if raw is None:
            raw = env.get(env_name(setting.name))
            source = env_name(setting.name)
        if raw is None:
            values[setting.name] = setting.default
            continue
        if isinstance(raw, list):  # a repeatable flag, given once per value
            raw = ",".join(raw)
        try:
            values[setting.name] = setting.kind(str(raw))
        except ValueError as exc:
            raise ConfigError(f"invalid {source}={raw!r}: {exc}") from None
    if values["workers"] > 1 and not values["database_url"]:
        raise ConfigError(WORKERS_NEED_POSTGRES)
    if values["database_pooler"] != "none" and not values["direct_database_url"]:
        raise ConfigError(POOLER_NEEDS_DIRECT_URL)
    if values["read_database_url"] and not values["database_url"]:
        raise ConfigError(READ_REPLICAS_NEED_POSTGRES)
    if values["table_stream"] and not (values["table_database_url"] or values["database_url"]):
        raise ConfigError(TABLES_NEED_POSTGRES)
    known = {f.name for f in fields(Config)}
    assert known == set(values), "SETTINGS and Config disagree"
    return Config(**values)


def parse(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Parse only settings flags (used by tests and tools that embed Relay)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load(parser.parse_args(list(argv)), environ)
