"""Shared fixtures. Postgres fixtures (pg_url, pg_admin_url) live in tests/pg.py.

``RELAY_TEST_LOOP=uvloop`` runs every async test, and so every app pytest-aiohttp serves, on
uvloop, as ``relay serve`` runs (pytest-asyncio's ``pytest_asyncio_loop_factories`` hook, its
supported way since 1.x; no event-loop policy is set). Unset or ``asyncio``: asyncio's loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import structlog

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
