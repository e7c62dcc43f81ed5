"""What every handler needs: config, store, hub, clock, limits and metrics, in one place."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError
from structlog.typing import FilteringBoundLogger

from protocol.errors import BadRequest, Overloaded, PayloadTooLarge, Unavailable
from relay.config import Config
from relay.http.compression import check_body_encoding
from relay.hub import Hub
from relay.metrics import Metrics
from relay.store.base import Store

if TYPE_CHECKING:
    from relay.auth.authorizer import Authorizer
    from relay.http.parked import Parking
    from relay.subscriptions.service import Subscriptions
    from relay.tables.follower import TableFollower
    from relay.workers import Worker


@dataclass
class Limits:
    """Admission control: bounded writes awaiting commit, bounded body bytes those writes hold,
    and bounded parked readers."""

    max_writes: int
    max_readers: int
    max_write_bytes: int = 256 * 1024 * 1024
    writes: int = 0
    write_bytes: int = 0
    readers: int = 0

    def admit_write(self) -> WriteAdmission:
        """A slot for one write (PUT, POST, DELETE), or 503 when all are taken."""
        if self.writes >= self.max_writes:
            raise Unavailable("too many writes awaiting commit", retry_after=1)
        self.writes += 1
        return WriteAdmission(self)

    def enter_reader(self) -> None:
        if self.readers >= self.max_readers:
            raise Overloaded("too many live readers", retry_after=5)
        self.readers += 1

    def exit_reader(self) -> None:
        self.readers -= 1


class WriteAdmission:
    """One admitted write: its slot and the body bytes it has claimed, released on exit."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.claimed = 0

    def __enter__(self) -> WriteAdmission:
        return self

    def __exit__(self, *exc: object) -> None:
        self._limits.writes -= 1
        self._limits.write_bytes -= self.claimed
        self.claimed = 0

    def claim(self, size: int) -> None:
        """Hold ``size`` body bytes in all (the declared length, then what has arrived).

        503 when that would pass the limit, unless no other write holds bytes: a lone write
        always goes through, so a limit below --max-body-bytes cannot lock out large bodies.
        """
        extra = size - self.claimed
        if extra <= 0:
            return
        limits = self._limits
        others = limits.write_bytes - self.claimed
        if others > 0 and limits.write_bytes + extra > limits.max_write_bytes:
            raise Unavailable("too many write bytes awaiting commit", retry_after=1)
        limits.write_bytes += extra
        self.claimed = size


@dataclass
class Context:
    config: Config
    store: Store
    hub: Hub
    metrics: Metrics
    limits: Limits
    stopping: bool = False  # set when a stop begins; new requests get 503
    access_log: FilteringBoundLogger | None = None  # where request lines go, if anywhere
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    worker: Worker | None = None  # under ``serve --workers N``: /metrics adds up the siblings
    auth: Authorizer | None = None  # None: access control is off (loopback, no key source)
    subscriptions: Subscriptions | None = None  # sections 6-7 (relay/subscriptions)
    tables: TableFollower | None = None  # table streams (relay/tables), on Postgres
    decorate: Callable[[web.Request, web.StreamResponse], None] = lambda _req, _resp: None
    """Adds the headers every answer carries; a handler that prepares its own answer (SSE)
    calls it first (``relay.http.front.ResponseHeaders``, set by ``Front``)."""
    common_headers: Callable[[MutableMapping[str, str], str | None, str | None], bool] = (
        lambda _out, _rid, _origin: False
    )
    """The same headers for an answer written without a request at hand (a parked reader's):
    (headers, request id, Origin) -> whether the origin was allowed."""
    parking: Parking | None = None
    """Parked live readers (``relay.http.parked``), made at the first."""


CONTEXT: web.AppKey[Context] = web.AppKey("relay_context", Context)
CTX = web.RequestKey("relay_context", Context)
"""The same Context on each request, set by ``Front``: requests served by the low-level
server have no ``request.app``."""
CONTINUE = web.RequestKey("relay_continue", bool)
"""Set (by ``Front``) while a client waits for ``100 Continue`` before sending its body."""
DROP = web.RequestKey("relay_drop_connection", bool)
"""Set when the rest of a request's body must not be read (a compressed body that passed the
limit or does not decode): ``Front`` ends the connection after the answer."""
REQUEST_ID = web.RequestKey("relay_request_id", str)
"""The request's id (the client's sane X-Request-Id, or ours), set by ``Front``."""


def context(request: web.Request) -> Context:
    return request[CTX]


async def continue_body(request: web.Request) -> None:
    """Invite the body a client holds back for ``100 Continue``, once; every body reader
    calls this just before it reads, so requests refused earlier never invite one."""
    if request.get(CONTINUE):
        request[CONTINUE] = False
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started


async def read_body(request: web.Request, limit: int, admission: WriteAdmission) -> bytes:
    """The whole request body, or 413 as soon as it passes ``limit``.

    The body's bytes are claimed from ``admission`` before they are read (the declared
    length) and as they arrive (chunked bodies), so 503 comes before the memory is spent.
    A compressed body (``compression.check_body_encoding``) arrives decoded, and ``limit``
    bounds what it decodes to.
    A client that disconnects mid-upload raises here, before anything reaches the store.
    """
    coding = request.headers.get(hdrs.CONTENT_ENCODING)
    check_body_encoding(coding)
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(limit)
    admission.claim(declared or 0)
    await continue_body(request)
    body = bytearray()
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                if coding:  # a bomb: decode no more of it to drain the connection
                    request[DROP] = True
                raise PayloadTooLarge(limit)
            admission.claim(len(body))
    except RequestPayloadError as exc:
        if not isinstance(exc.__cause__, ContentEncodingError):
            raise
        request[DROP] = True
        raise BadRequest(
            "invalid_body", "the body does not decode as its Content-Encoding"
        ) from None
    return bytes(body)
