"""Stream URL paths: where streams live and which paths are refused (section 12.2)."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from protocol.errors import BadRequest

PREFIX = "/v1/stream/"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def stream_path(raw_path: str, max_length: int) -> str:
    """Decode and check a request's raw path; the decoded form names the stream.

    Refuses invalid percent-encoding, invalid UTF-8, NUL and other control characters, ``.``
    and ``..`` segments, empty names and paths over ``max_length`` bytes.
    """
    raw = raw_path.split("?", 1)[0]
    if len(raw.encode()) > max_length * 3:
        raise BadRequest("path_too_long", "stream path is too long")
    if not raw.startswith(PREFIX) or raw == PREFIX:
        raise BadRequest("invalid_path", f"streams live under {PREFIX}<name>")
    _check_percent_encoding(raw)
    try:
        decoded = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid_path", "stream path is not UTF-8") from None
    if len(decoded.encode()) > max_length:
        raise BadRequest("path_too_long", f"stream path exceeds {max_length} bytes")
    if _CONTROL.search(decoded):
        raise BadRequest("invalid_path", "stream path contains control characters")
    name = decoded[len(PREFIX) :]
    if any(segment in (".", "..") for segment in name.split("/")):
        raise BadRequest("invalid_path", "stream path must not contain . or .. segments")
    return decoded


def source_path(header: str, max_length: int) -> str:
    """A ``Stream-Forked-From`` value: a stream path, absolute or relative to the prefix."""
    value = header.strip()
    if "://" in value:
        value = "/" + value.split("://", 1)[1].split("/", 1)[-1]
    if not value.startswith("/"):
        value = PREFIX + value
    return stream_path(value, max_length)


def _check_percent_encoding(raw: str) -> None:
    if _BAD_ESCAPE.search(raw):
        raise BadRequest("invalid_path", "stream path has invalid percent-encoding")
