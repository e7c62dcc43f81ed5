"""A webhook receiver for tests: records every request, verifies nothing, answers as told."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import subscriptions as rules


@dataclass
class Received:
    body: dict[str, Any]
    raw: bytes
    signature: str | None


Responder = Callable[[Received, int], Awaitable[web.StreamResponse]]


async def _ok(_: Received, __: int) -> web.StreamResponse:
    return web.json_response({})


@dataclass
class Receiver:
    """Start with ``async with Receiver(...) as r``; ``r.url`` is its hook URL."""

    respond: Responder = _ok
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    _server: TestServer | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        assert self._server is not None and self._server.port is not None
        return f"http://127.0.0.1:{self._server.port}/hook"

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        await self._server.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        got = Received(orjson.loads(raw), raw, request.headers.get("Webhook-Signature"))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        async with self._arrived:
            self.received.append(got)
            self._arrived.notify_all()
        try:
            return await self.respond(got, len(self.received))
        finally:
            self.in_flight -= 1

    async def wait_for(self, count: int, timeout: float = 10.0) -> Received:
        """The ``count``-th request (1-based), once it has arrived."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.received) >= count), timeout
            )
        return self.received[count - 1]


def verify(received: Received, jwks: dict[str, Any]) -> bool:
    """The signature check a receiver makes: kid from the header, key from the JWKS."""
    if received.signature is None:
        return False
    parsed = rules.parse_signature_header(received.signature)
    if parsed is None:
        return False
    timestamp, kid, signature = parsed
    key = next((k for k in jwks["keys"] if k["kid"] == kid), None)
    if key is None:
        return False
    public = Ed25519PublicKey.from_public_bytes(rules.b64url_decode(key["x"]))
    try:
        public.verify(signature, rules.signed_message(timestamp, received.raw))
    except Exception:
        return False
    return True
