"""What every handler needs: config, store, hub, clock, limits and metrics, in one place."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from protocol.errors import Overloaded, PayloadTooLarge, Unavailable
from relay.config import Config
from relay.hub import Hub
from relay.metrics import Metrics
from relay.store.base import Store


@dataclass
class Limits:
    """Admission control: bounded writes awaiting commit and bounded parked readers."""

    max_writes: int
    max_readers: int
    writes: int = 0
    readers: int = 0

    def enter_write(self) -> None:
        if self.writes >= self.max_writes:
            raise Unavailable("too many writes awaiting commit", retry_after=1)
        self.writes += 1

    def exit_write(self) -> None:
        self.writes -= 1

    def enter_reader(self) -> None:
        if self.readers >= self.max_readers:
            raise Overloaded("too many live readers", retry_after=5)
        self.readers += 1

    def exit_reader(self) -> None:
        self.readers -= 1


@dataclass
class Context:
    config: Config
    store: Store
    hub: Hub
    metrics: Metrics
    limits: Limits
    stopping: bool = False  # set when a stop begins; new requests get 503
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)


CONTEXT: web.AppKey[Context] = web.AppKey("relay_context", Context)


def context(request: web.Request) -> Context:
    return request.app[CONTEXT]


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, or 413 as soon as it passes ``limit``.

    A client that disconnects mid-upload raises here, before anything reaches the store.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(limit)
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(limit)
    return bytes(body)
