"""Serving a Relay app in tests the way ``relay serve`` does: through ``RelayRunner``."""

from __future__ import annotations

from typing import Any, TypeAlias

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay.http.front import RelayRunner

AppClient: TypeAlias = TestClient[web.Request, web.Application]
"""What pytest-aiohttp's ``aiohttp_client`` returns for an app: its ``.app`` is the app itself,
so ``client.app[CONTEXT]`` is typed."""


class RelayTestServer(TestServer):
    """``TestServer`` whose runner hands requests to the app's ``Front`` without aiohttp's
    router, as ``relay serve`` does."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return RelayRunner(self.app, **kwargs)
