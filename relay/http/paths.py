"""Request targets: where streams live, which paths are refused (section 12.2), and the Host
header every HTTP/1.1 request must carry (RFC 9112 3.2)."""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import unquote_to_bytes

from protocol.errors import BadRequest, NotFound

PREFIX = "/v1/stream/"
# Section 6: a first segment of ``__ds`` is reserved for subscription control APIs.
RESERVED_SEGMENT = "__ds"
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
_PORT = re.compile(r"[0-9]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def stream_path(raw_path: str, max_length: int) -> str:
    """Decode and check a request's raw target (a query string is ignored); returns the
    stream's name, the decoded path after :data:`PREFIX` (the key stores, grants and
    subscriptions use; see ``_checked_path``). The memo is keyed on the path alone: a reader's
    every request carries another offset and cursor, which would miss it every time."""
    return _checked_path(raw_path.partition("?")[0], max_length)


@functools.lru_cache(maxsize=2048)
def _checked_path(raw_path: str, max_length: int) -> str:
    """Decode and check a request path; the decoded name after the prefix is the stream's.

    Refuses invalid percent-encoding, invalid UTF-8, NUL and other control characters, ``.``
    and ``..`` segments, empty names and paths over ``max_length`` bytes. A path under the
    reserved ``__ds`` prefix names no stream (404), for every method. Memoised (refusals are
    raised anew, never cached): a chat's readers and producer ask about the same few paths
    thousands of times, and the checks were 2-3% of a read's CPU. At most 2,048 entries of at
    most ``3 * max_length`` bytes each.
    """
    raw = origin_form(raw_path)
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
    if name.split("/", 1)[0] == RESERVED_SEGMENT:
        raise NotFound(f"{PREFIX}{RESERVED_SEGMENT}/ is reserved for control APIs")
    return name


def stream_url_path(name: str) -> str:
    """The request path of the stream named ``name`` (the inverse of :func:`stream_path`,
    before percent-encoding)."""
    return PREFIX + name


def origin_form(target: str) -> str:
    """The path and query of a request target; RFC 9112 3.2.2 has servers accept the absolute
    form (``http://host/path``), whose authority aiohttp already took as the request's host."""
    if target.startswith("/"):
        return target
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    rest = target[match.end() :]
    return rest if rest.startswith("/") else "/" + rest


@functools.lru_cache(maxsize=256)  # a relay is reached under a handful of names
def valid_host(value: str) -> bool:
    """RFC 9112 3.2's ``uri-host [ ":" port ]``: a bracketed IPv6 address or a reg-name
    (which covers IPv4), then optional port digits. Not empty: an ``http`` URI's host never is
    (RFC 9110 4.2.1), and this one becomes our ``Location``. IPvFuture literals are refused: nothing
    sends them and yarl cannot build a URL (our ``Location``) from one."""
    host, port = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return False
        literal = value[1:end]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        if "%" in literal:  # a zone id: meaningless to a server
            return False
        rest = value[end + 1 :]
        if rest and not rest.startswith(":"):
            return False
        return _PORT.fullmatch(rest[1:]) is not None
    if ":" in value:
        host, port = value.split(":", 1)
    return (
        bool(host) and _REG_NAME.fullmatch(host) is not None and _PORT.fullmatch(port) is not None
    )


def source_path(header: str, max_length: int) -> str:
    """A ``Stream-Forked-From`` value (a stream path, absolute or relative to the prefix) as
    the stream's name."""
    value = header.strip()
    if "://" in value:
        value = "/" + value.split("://", 1)[1].split("/", 1)[-1]
    if not value.startswith("/"):
        value = PREFIX + value
    return stream_path(value, max_length)


def _check_percent_encoding(raw: str) -> None:
    if _BAD_ESCAPE.search(raw):
        raise BadRequest("invalid_path", "stream path has invalid percent-encoding")
