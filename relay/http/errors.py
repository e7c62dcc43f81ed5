"""One table from domain errors to HTTP responses, applied by ``Front``.

Lookup walks the exception's class hierarchy, so a new error subclass inherits its parent's
status until it needs its own row. Anything unknown is logged and answered 500 without detail.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web

from protocol import headers as h
from protocol.caching import NO_STORE
from protocol.errors import (
    BadRequest,
    Conflict,
    Gone,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    SequenceGap,
    StaleEpoch,
    StreamClosed,
    Unauthorized,
    Unavailable,
    UnsupportedEncoding,
)
from protocol.offsets import format_offset
from protocol.retention import BeforeRetention
from relay.auth.errors import Forbidden
from relay.http.context import REQUEST_ID
from relay.http.wire import Answer

log = structlog.get_logger("relay.http")

HeaderFn = Callable[[BaseException], dict[str, str]]


def _none(_: BaseException) -> dict[str, str]:
    return {}


def _closed(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, StreamClosed)
    return {h.STREAM_CLOSED: "true", h.STREAM_NEXT_OFFSET: format_offset(exc.tail)}


def _gap(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, SequenceGap)
    return {h.PRODUCER_EXPECTED_SEQ: str(exc.expected), h.PRODUCER_RECEIVED_SEQ: str(exc.received)}


def _stale(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, StaleEpoch)
    return {h.PRODUCER_EPOCH: str(exc.current_epoch)}


def _challenge(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, Unauthorized)
    # Access control says whether a credential was given; any other refusal (a callback
    # token, say) was about a token that was.
    return {"WWW-Authenticate": INVALID_TOKEN if getattr(exc, "given", True) else CHALLENGE}


CHALLENGE = 'Bearer realm="relay"'
INVALID_TOKEN = 'Bearer realm="relay", error="invalid_token"'


def _before_retention(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, BeforeRetention)
    # no-store: the horizon only moves forward, but a cache must not pin this answer either
    return {h.STREAM_RETAINED_FROM: format_offset(exc.retained_from), "Cache-Control": NO_STORE}


def _allow(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, MethodNotAllowed)
    return {"Allow": ", ".join(exc.allow)}


def _accept_encoding(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, UnsupportedEncoding)
    return {"Accept-Encoding": ", ".join(exc.accepted)}


def _retry(exc: BaseException) -> dict[str, str]:
    assert isinstance(exc, Unavailable | Overloaded)
    return {"Retry-After": str(exc.retry_after)}


ERROR_TABLE: dict[type[BaseException], tuple[int, HeaderFn]] = {
    BadRequest: (400, _none),
    Unauthorized: (401, _challenge),
    Forbidden: (403, _none),
    StaleEpoch: (403, _stale),
    NotFound: (404, _none),
    MethodNotAllowed: (405, _allow),
    Conflict: (409, _none),
    StreamClosed: (409, _closed),
    SequenceGap: (409, _gap),
    Gone: (410, _none),
    BeforeRetention: (410, _before_retention),
    PayloadTooLarge: (413, _none),
    UnsupportedEncoding: (415, _accept_encoding),
    Overloaded: (429, _retry),
    Unavailable: (503, _retry),
}


def lookup(exc: BaseException) -> tuple[int, dict[str, str]] | None:
    for cls in type(exc).__mro__:
        row = ERROR_TABLE.get(cls)
        if row is not None:
            status, header_fn = row
            return status, header_fn(exc)
    return None


def error_response(request: web.Request, exc: BaseException) -> web.Response:
    return error_answer(exc, request.method, request.path, request.get(REQUEST_ID)).response()


def error_answer(exc: BaseException, method: str, path: str, request_id: str | None) -> Answer:
    """The table's answer to ``exc`` (a JSON error body but for HEAD); anything the table does
    not know is logged and answered 500 without detail."""
    found = lookup(exc)
    if found is None:
        log.exception("unhandled error", method=method, path=path, request_id=request_id)
        status, code, message = 500, "internal", "internal server error"
        extra: dict[str, str] = {}
        details: dict[str, object] = {}
    else:
        status, extra = found
        if isinstance(exc, ProtocolError):
            code, message, details = exc.code, exc.message, exc.details()
        else:
            details = {}
            code = getattr(exc, "code", "unavailable")
            message = str(exc)
    # RFC 9110 lets caches keep some errors (404, 410) with no header saying so; a CDN would
    # then answer 404 for a stream created a moment later.
    extra = {**extra, "Cache-Control": NO_STORE}
    if method == "HEAD":
        return Answer(status, extra)
    body = orjson.dumps({"error": {"code": code, "message": message, **details}})
    return Answer(status, {**extra, "Content-Type": "application/json"}, body)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
