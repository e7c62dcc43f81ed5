"""Open each storage backend the same way, for tests that must hold for every backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.store.base import AppendResult, Store
from relay.store.sqlite import SqliteStore

BACKENDS = ["sqlite", "postgres"]


@dataclass(frozen=True)
class Backend:
    """Where a backend keeps its data: a directory for sqlite, a database URL for Postgres
    (with ``options`` for every store opened, such as a pooler's, see tests/test_pgbouncer)."""

    name: str
    data_dir: Path
    url: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @asynccontextmanager
    async def open(self, **options: Any) -> AsyncIterator[Store]:
        store: Store
        if self.url is None:
            store = SqliteStore(self.data_dir, **options)
        else:
            from relay.store.postgres import PostgresStore

            store = PostgresStore(self.url, **{**self.options, **options})
        await store.open()
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn; a sync fixture, so the Postgres database is made outside the loop."""
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path / "data")
    return Backend("postgres", tmp_path / "data", request.getfixturevalue("pg_url"))


class Recorder:
    """A store listener that queues what it hears: (stream_id, tail, closed) for remote
    commits and (stream_id, "deleted") for removals."""

    def __init__(self, watched: list[int] | None = None) -> None:
        self.heard: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.watched = watched or []
        self.local: list[tuple[str, int, int]] = []  # (path, start, tail) of local appends
        self.forgotten = 0  # times the store said held bytes may be stale

    def appended(self, path: str, result: AppendResult) -> None:
        self.local.append((path, result.start, result.meta.tail))

    def remote_commit(self, stream_id: int, tail: int, closed: bool) -> None:
        self.heard.put_nowait((stream_id, tail, closed))

    def deleted(self, stream_id: int) -> None:
        self.heard.put_nowait((stream_id, "deleted"))

    def watched_ids(self) -> list[int]:
        return self.watched

    def forget_held(self) -> None:
        self.forgotten += 1

    async def next(self, timeout: float = 5) -> tuple[Any, ...]:
        return await asyncio.wait_for(self.heard.get(), timeout)
