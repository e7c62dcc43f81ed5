"""What losing the database looks like to asyncpg, how pooled connections are kept, and
which connections may go through a pooler such as PgBouncer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from protocol.errors import Unavailable

if TYPE_CHECKING:
    from relay.config import Config

DISCONNECTS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.OperatorInterventionError,
)
OFFLINE: tuple[type[BaseException], ...] = (Unavailable, *DISCONNECTS)


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook: skip asyncpg's reset query (``RESET ALL``, ``UNLISTEN *``, ...).

    Pooled connections only run reads and self-contained transactions; they never change
    session state, and the reset was a round trip per lookup (29% of the relay's CPU under the
    chat workload). asyncpg still rolls back any transaction left open before this runs.
    """


def connection_lost(exc: BaseException) -> bool:
    """The database connection is gone (503), as opposed to a query it refused.

    asyncpg's DataError (input it cannot encode, such as a string that is not UTF-8) is an
    InterfaceError too, but the request is at fault, not the connection.
    """
    return isinstance(exc, DISCONNECTS) and not isinstance(exc, asyncpg.DataError)


RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


def pooled_options(pooler: str) -> dict[str, Any]:
    """asyncpg options for connections to ``database_url``, which may be a pooler.

    Behind a transaction-mode pooler each transaction of one client connection may run in a
    different server session, so a named prepared statement (asyncpg caches every query as
    one) is missing there, or clashes with another client's. With the cache off asyncpg sends
    each statement's Parse with its Bind, in one message, unnamed: nothing outlives the
    transaction. Relay's pooled work keeps no other session state (no ``SET``, session locks
    or LISTEN); what needs a session goes to :func:`direct_url`.

    Straight to Postgres, asyncpg keeps each statement prepared, and Postgres settles on a
    generic plan by its sixth run. A relay started on a small or never-analyzed
    ``relay_streams`` (autovacuum off, or not yet run) got sequential scans for the batch lock
    and the write's ``UPDATE ... FROM unnest`` (a hash join over the whole table) and kept
    them as the table grew: database CPU per create went from 452 us at 10,000 streams to
    2,345 us at 100,000. Every statement Relay sends finds its rows by an index, so the
    planner is told not to scan (``enable_seqscan=off`` makes a sequential scan the last
    resort, never forbidden). Through a transaction pooler statements are unnamed and
    planned at each run for the table as it is.
    """
    if pooler == "transaction":
        return {"statement_cache_size": 0}
    return {"server_settings": {"enable_seqscan": "off"}}


def direct_url(config: Config) -> str:
    """Where work that needs a session of its own connects (LISTEN and its barrier, the
    migration lock): ``direct_database_url``, else ``database_url`` (no pooler)."""
    return config.direct_database_url or config.database_url
