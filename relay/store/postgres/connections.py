"""What losing the database looks like to asyncpg, and how pooled connections are kept."""

from __future__ import annotations

import asyncpg

from protocol.errors import Unavailable

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
