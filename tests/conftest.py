"""Shared fixtures. Postgres fixtures (pg_url, pg_admin_url) live in tests/pg.py.

``RELAY_TEST_LOOP=uvloop`` runs every async test, and so every app pytest-aiohttp serves, on
uvloop, as ``relay serve`` runs (pytest-asyncio's ``pytest_asyncio_loop_factories`` hook, its
supported way since 1.x; no event-loop policy is set). Unset or ``asyncio``: asyncio's loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import pytest
import pytest_asyncio
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay.http.front import FRONT
from tests.serving import RelayTestServer

pytest_plugins = ["tests.pg"]

TEST_LOOP = os.environ.get("RELAY_TEST_LOOP", "asyncio")

if TEST_LOOP == "uvloop":
    import uvloop

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, object]:
        return {"uvloop": uvloop.new_event_loop}

elif TEST_LOOP != "asyncio":
    raise pytest.UsageError(f"RELAY_TEST_LOOP must be asyncio or uvloop, not {TEST_LOOP!r}")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that configure logging as ``relay`` does: put the test process's back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)


@pytest.fixture
def aiohttp_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """pytest-aiohttp's client factory, serving Relay apps through ``RelayRunner`` (as
    ``relay serve`` does) rather than aiohttp's router; other apps as before."""

    async def go(
        app: object, *, server_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> TestClient[Any, Any]:
        if isinstance(app, web.Application) and FRONT in app:
            return await aiohttp_client(RelayTestServer(app, **(server_kwargs or {})), **kwargs)
        return await aiohttp_client(app, server_kwargs=server_kwargs, **kwargs)

    return go


@pytest_asyncio.fixture
async def aiohttp_server() -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """pytest-aiohttp's server factory, likewise: Relay apps through ``RelayRunner``."""
    servers: list[TestServer] = []

    async def go(
        app: web.Application, *, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any
    ) -> TestServer:
        server_class = RelayTestServer if FRONT in app else TestServer
        server = server_class(app, host=host, port=port)
        await server.start_server(**kwargs)
        servers.append(server)
        return server

    yield go
    while servers:
        await servers.pop().close()
