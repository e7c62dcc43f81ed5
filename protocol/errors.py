"""Domain errors carrying their context; relay/http/errors.py maps them to responses."""

from __future__ import annotations


class ProtocolError(Exception):
    """A request the protocol rejects. ``code`` is a stable machine-readable string."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def details(self) -> dict[str, object]:
        """Extra fields for the JSON error object, beside code and message."""
        return {}


class Unauthorized(ProtocolError):
    """A missing, forged or expired bearer token (401)."""


class BadRequest(ProtocolError):
    """Malformed input (400)."""


class NotFound(ProtocolError):
    """No such stream (404)."""

    def __init__(self, message: str = "stream not found") -> None:
        super().__init__("not_found", message)


class Gone(ProtocolError):
    """The stream was deleted but forks keep it (410)."""

    def __init__(self, message: str = "stream is deleted") -> None:
        super().__init__("gone", message)


class Conflict(ProtocolError):
    """The request conflicts with the stream's state or configuration (409)."""


class StreamDiverged(Conflict):
    """The database holds less of this stream than this relay acknowledged (a failover to a
    standby that was behind): writing now would hand out different bytes at offsets already
    served, so writes are refused until an operator decides (409)."""

    def __init__(self) -> None:
        super().__init__(
            "stream_diverged",
            "the database lost acknowledged appends of this stream (failover?); writes refused",
        )


class StreamClosed(Conflict):
    """An append to a closed stream (409 with Stream-Closed and the final offset)."""

    def __init__(self, tail: int) -> None:
        super().__init__("stream_closed", "stream is closed")
        self.tail = tail


class SequenceGap(Conflict):
    """A producer skipped sequence numbers (409 with expected and received)."""

    def __init__(self, expected: int, received: int) -> None:
        super().__init__("producer_seq_gap", f"expected producer seq {expected}, got {received}")
        self.expected = expected
        self.received = received


class StaleEpoch(ProtocolError):
    """A fenced (zombie) producer epoch (403 with the current epoch)."""

    def __init__(self, current_epoch: int) -> None:
        super().__init__("producer_epoch_stale", f"producer epoch is fenced by {current_epoch}")
        self.current_epoch = current_epoch


class PayloadTooLarge(ProtocolError):
    """Body over the configured limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__("payload_too_large", f"body exceeds {limit} bytes")
        self.limit = limit


class UnsupportedEncoding(ProtocolError):
    """A request body in a content coding the server does not decode (415, RFC 9110
    15.5.16), with the codings it does take."""

    def __init__(self, accepted: tuple[str, ...]) -> None:
        super().__init__(
            "unsupported_content_encoding",
            f"Content-Encoding must be one of {', '.join(accepted)}",
        )
        self.accepted = accepted


class MethodNotAllowed(ProtocolError):
    """Unsupported method on a stream URL (405 with Allow)."""

    def __init__(self, method: str, allow: tuple[str, ...]) -> None:
        super().__init__("method_not_allowed", f"method {method} is not allowed")
        self.allow = allow


class Unavailable(Exception):
    """The store cannot serve right now (503 with Retry-After); not the client's fault."""

    code = "unavailable"

    def __init__(self, message: str = "storage unavailable", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageFull(Unavailable):
    """A write the store could not make for lack of space (a full disk, SQLite's
    ``SQLITE_FULL``, Postgres's SQLSTATE class 53): nothing of it was stored. Answered 503 with
    Retry-After like any outage, because producers' clients retry a 503 and space may come
    back (an operator frees it) without a restart; 507 would read as final to most of them."""

    code = "storage_full"

    def __init__(self, message: str = "storage full", retry_after: int = 5) -> None:
        super().__init__(message, retry_after)


class Overloaded(Exception):
    """Too many requests in flight (429 or 503 with Retry-After)."""

    code = "overloaded"

    def __init__(self, message: str = "too many requests", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
