"""Header names and the grammar of each protocol header's value."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from protocol.errors import BadRequest

STREAM_NEXT_OFFSET = "Stream-Next-Offset"
STREAM_CLOSED = "Stream-Closed"
STREAM_TTL = "Stream-TTL"
STREAM_EXPIRES_AT = "Stream-Expires-At"
STREAM_SEQ = "Stream-Seq"
STREAM_CURSOR = "Stream-Cursor"
STREAM_UP_TO_DATE = "Stream-Up-To-Date"
STREAM_FORKED_FROM = "Stream-Forked-From"
STREAM_FORK_OFFSET = "Stream-Fork-Offset"
STREAM_FORK_SUB_OFFSET = "Stream-Fork-Sub-Offset"
STREAM_SSE_DATA_ENCODING = "Stream-SSE-Data-Encoding"
STREAM_SUCCESSOR = "Stream-Successor"  # Relay's extension: the stream that supersedes this one
STREAM_RETAIN_FROM = "Stream-Retain-From"  # Relay's extension (admin): advance the horizon
STREAM_RETAINED_FROM = "Stream-Retained-From"  # where a stream's retained data starts
STREAM_COMPACT = "Stream-Compact"  # Relay's extension (admin): fold State Protocol history
STREAM_COMPACTED = "Stream-Compacted"  # what a compaction folded
STREAM_REVOKE_FROM = "Stream-Revoke-From"  # Relay's extension, on DELETE: these bytes must go
STREAM_REVOKE_FORKS = "Stream-Revoke-Forks"  # ...and so must the forks that inherit them
LINK = "Link"
SUCCESSOR_REL = "successor-version"  # RFC 5829's relation, on every read of a superseded stream
PRODUCER_ID = "Producer-Id"
PRODUCER_EPOCH = "Producer-Epoch"
PRODUCER_SEQ = "Producer-Seq"
PRODUCER_EXPECTED_SEQ = "Producer-Expected-Seq"
PRODUCER_RECEIVED_SEQ = "Producer-Received-Seq"

# Every protocol header a browser must be allowed to send and to read (CORS).
REQUEST_HEADERS = (
    "Content-Type",
    STREAM_CLOSED,
    STREAM_TTL,
    STREAM_EXPIRES_AT,
    STREAM_SEQ,
    STREAM_FORKED_FROM,
    STREAM_FORK_OFFSET,
    STREAM_FORK_SUB_OFFSET,
    STREAM_SUCCESSOR,
    STREAM_RETAIN_FROM,
    STREAM_COMPACT,
    STREAM_REVOKE_FROM,
    STREAM_REVOKE_FORKS,
    PRODUCER_ID,
    PRODUCER_EPOCH,
    PRODUCER_SEQ,
    "If-None-Match",
    "Authorization",
)
RESPONSE_HEADERS = (
    STREAM_NEXT_OFFSET,
    STREAM_CLOSED,
    STREAM_TTL,
    STREAM_EXPIRES_AT,
    STREAM_CURSOR,
    STREAM_UP_TO_DATE,
    STREAM_SSE_DATA_ENCODING,
    STREAM_SUCCESSOR,
    STREAM_RETAINED_FROM,
    STREAM_COMPACTED,
    LINK,
    PRODUCER_EPOCH,
    PRODUCER_SEQ,
    PRODUCER_EXPECTED_SEQ,
    PRODUCER_RECEIVED_SEQ,
    "ETag",
    "Location",
    "Content-Type",
    "Retry-After",
)

MAX_SAFE_INTEGER = 2**53 - 1
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)\Z")
_INTEGER = re.compile(r"[0-9]{1,16}\Z")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:[Zz]|([+-])(\d{2}):(\d{2}))\Z"
)
# The instants an RFC 3339 UTC timestamp can spell: years 0000 to 9999 (4DIGIT), in milliseconds.
EARLIEST_MS = -62_167_219_200_000
LATEST_MS = 253_402_300_799_999
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_TOKEN_BYTES = 256  # Producer-Id and Stream-Seq: stored, and indexed (Producer-Id)
MAX_CONTENT_TYPE_BYTES = 256
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in field values


def is_true(value: str | None) -> bool:
    """``Stream-Closed``: present only when exactly ``true``, any case (section 4.1)."""
    return value is not None and value.strip().lower() == "true"


def parse_revoke_forks(value: str | None, revoke_from: str | None) -> bool:
    """``Stream-Revoke-Forks`` (Relay's): ``true`` or ``false``, and only with
    ``Stream-Revoke-From``. A DELETE deletes what it is told to, so a value it cannot read is
    refused rather than taken as "no"."""
    if value is None:
        return False
    flag = value.strip().lower()
    if flag not in ("true", "false"):
        raise BadRequest("invalid_revoke_forks", "Stream-Revoke-Forks must be true or false")
    if revoke_from is None:
        raise BadRequest(
            "revoke_forks_without_from", "Stream-Revoke-Forks needs Stream-Revoke-From"
        )
    return flag == "true"


def parse_ttl(value: str) -> int:
    """``Stream-TTL``: a non-negative decimal with no sign, leading zero, point or exponent."""
    if not _DECIMAL.match(value) or len(value) > 12:
        raise BadRequest("invalid_ttl", "Stream-TTL must be a non-negative integer of seconds")
    return int(value)


def parse_expires_at(value: str) -> float:
    """``Stream-Expires-At``: an RFC 3339 timestamp, returned as Unix seconds.

    Computed by calendar arithmetic rather than ``datetime``, whose years stop at 1..9999 in
    local time: ``9999-12-31T23:59:59-01:00`` and ``0000-01-01`` are grammatical. Fractions are
    truncated to the millisecond we echo back, so ``...59.999999999Z`` stays in year 9999; a
    leap second (``:60``) is the next second. An instant no UTC timestamp can spell is a 400.
    """
    match = _RFC3339.match(value)
    if not match:
        raise BadRequest("invalid_expires_at", "Stream-Expires-At must be an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    fraction, sign, offset_hour, offset_minute = match.group(7, 8, 9, 10)
    if not (1 <= month <= 12 and 1 <= day <= _days_in_month(year, month)):
        raise BadRequest("invalid_expires_at", "Stream-Expires-At is not a calendar date")
    if hour > 23 or minute > 59 or second > 60:
        raise BadRequest("invalid_expires_at", "Stream-Expires-At is not a time of day")
    offset = 0
    if sign is not None:
        if int(offset_hour) > 23 or int(offset_minute) > 59:
            raise BadRequest("invalid_expires_at", "Stream-Expires-At has an invalid UTC offset")
        offset = (int(offset_hour) * 60 + int(offset_minute)) * 60 * (-1 if sign == "-" else 1)
    seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
    millis = (seconds - offset) * 1000 + int((fraction or "0")[:3].ljust(3, "0"))
    if not EARLIEST_MS <= millis <= LATEST_MS:
        raise BadRequest("invalid_expires_at", "Stream-Expires-At is outside years 0000-9999 UTC")
    return millis / 1000


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's method)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """The inverse of ``days_from_civil``: (year, month, day) of a day count since 1970."""
    days += 719_468
    era = days // 146_097
    day_of_era = days - era * 146_097
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + (3 if shifted_month < 10 else -9)
    return year_of_era + era * 400 + (month <= 2), month, day


def parse_non_negative(name: str, value: str) -> int:
    """A producer epoch, seq or fork sub-offset: decimal digits, at most 2^53-1."""
    if not _INTEGER.match(value):
        raise BadRequest("invalid_header", f"{name} must be a non-negative integer")
    number = int(value)
    if number > MAX_SAFE_INTEGER:
        raise BadRequest("invalid_header", f"{name} must be at most 2^53-1")
    return number


@dataclass(frozen=True, slots=True)
class ProducerHeaders:
    """The idempotent-producer triple of a request (section 5.2.1)."""

    producer_id: str
    epoch: int
    seq: int


def parse_producer(
    producer_id: str | None, epoch: str | None, seq: str | None
) -> ProducerHeaders | None:
    """All three producer headers or none; a partial or malformed set is a 400."""
    given = [v is not None for v in (producer_id, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise BadRequest(
            "invalid_producer",
            "Producer-Id, Producer-Epoch and Producer-Seq must be sent together",
        )
    assert producer_id is not None and epoch is not None and seq is not None
    if producer_id == "":
        raise BadRequest("invalid_producer", "Producer-Id must not be empty")
    return ProducerHeaders(
        stored_text(PRODUCER_ID, producer_id, MAX_TOKEN_BYTES),
        parse_non_negative(PRODUCER_EPOCH, epoch),
        parse_non_negative(PRODUCER_SEQ, seq),
    )


def media_type(content_type: str | None) -> str:
    """The comparable essence of a Content-Type: lower-cased, parameters dropped."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    """JSON mode applies to ``application/json`` streams only (section 9.1)."""
    return media_type(content_type) == "application/json"


def is_text_like(content_type: str) -> bool:
    """SSE carries text/* and JSON natively; everything else is base64 (section 5.8)."""
    essence = media_type(content_type)
    return essence.startswith("text/") or essence == "application/json"


def stored_text(name: str, value: str, max_bytes: int) -> str:
    """A header value the store keeps as text: valid UTF-8, no control characters, bounded.

    Checked before a request reaches a transaction, so malformed input is the sender's 400
    and never fails the appends committed beside it. (aiohttp hands bytes that are not UTF-8
    through as lone surrogates, which no database will encode.)
    """
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("invalid_header", f"{name} is not valid UTF-8") from None
    if size > max_bytes:
        raise BadRequest("header_too_long", f"{name} exceeds {max_bytes} bytes")
    if _CONTROL.search(value):
        raise BadRequest("invalid_header", f"{name} contains control characters")
    return value


def parse_stream_seq(value: str | None) -> str | None:
    """``Stream-Seq``: an opaque token compared byte-wise; stored, so bounded."""
    return None if value is None else stored_text(STREAM_SEQ, value, MAX_TOKEN_BYTES)


def parse_content_type(value: str | None) -> str | None:
    """A request's Content-Type; a stream stores the one it was created with."""
    if value is None:
        return None
    return stored_text("Content-Type", value, MAX_CONTENT_TYPE_BYTES)


def successor_headers(successor: str | None) -> dict[str, str]:
    """What every read of a superseded stream carries: the successor's path, and a ``Link``
    a generic client can follow (RFC 8288; ``successor-version`` from RFC 5829)."""
    if successor is None:
        return {}
    target = quote(successor, safe="/")
    return {STREAM_SUCCESSOR: target, LINK: f'<{target}>; rel="{SUCCESSOR_REL}"'}
