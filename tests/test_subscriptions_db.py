"""The subscriptions' own SQLite database (``relay/subscriptions/db.py``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.subscriptions.db import SqliteDatabase


async def test_a_transaction_cancelled_while_it_begins_leaves_the_connection_clean(
    tmp_path: Path,
) -> None:
    """A cancel while BEGIN waits for the database thread does not stop the BEGIN: the
    connection must still come out of it, or every later transaction fails (it did at
    shutdown, when the service's worker was cancelled there)."""
    db = SqliteDatabase(tmp_path / "subs.db")
    await db.open()
    try:
        for _ in range(20):

            async def begin_and_wait() -> None:
                async with db.transaction():
                    await asyncio.sleep(3600)

            task = asyncio.create_task(begin_and_wait())
            await asyncio.sleep(0)  # in the lock, the BEGIN handed to the thread
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            async with db.transaction() as tx:
                assert await tx.fetch("SELECT 1") == [(1,)]
    finally:
        await db.close()
