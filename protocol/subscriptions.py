"""Subscriptions (PROTOCOL.md sections 6-7) as pure rules: no I/O, no clock reads.

What lives here: the request shapes (create, membership, callback/ack/release, claim) and
their validation, the normalized configuration and its hash (6.2), generation fencing and the
ack rule (7.1-7.3), the retry schedule, webhook URL and address classification (6.2, 12.8),
the wake event, webhook body and signature header shapes, and callback tokens (12.9). The
relay's ``relay/subscriptions`` package does the I/O around them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from protocol.errors import BadRequest, Conflict, NotFound, Unauthorized
from protocol.glob import check_pattern
from protocol.offsets import format_offset, parse_offset

WEBHOOK = "webhook"
PULL_WAKE = "pull-wake"
KINDS = (WEBHOOK, PULL_WAKE)
DEFAULT_LEASE_TTL_MS = 30_000
MIN_LEASE_TTL_MS = 1_000
MAX_LEASE_TTL_MS = 600_000
MAX_ID_BYTES = 256
MAX_PATH_BYTES = 1024
MAX_STREAMS = 1000
MAX_DESCRIPTION_BYTES = 4096
MAX_URL_BYTES = 2048
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
RETRY_JITTER = 0.2
TOKEN_TTL_SECONDS = 3600.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# -- errors: codes are the spec's (and the official suite's) ------------------------------


class InvalidRequest(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__("INVALID_REQUEST", message)


class WebhookUrlRejected(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__("WEBHOOK_URL_REJECTED", message)


class SubscriptionNotFound(NotFound):
    def __init__(self, message: str = "subscription not found") -> None:
        super().__init__(message)
        self.code = "SUBSCRIPTION_NOT_FOUND"


class SubscriptionExists(Conflict):
    def __init__(self) -> None:
        super().__init__(
            "SUBSCRIPTION_ALREADY_EXISTS", "subscription exists with a different configuration"
        )


class Fenced(Conflict):
    def __init__(self) -> None:
        super().__init__("FENCED", "wake generation is stale")


class AlreadyClaimed(Conflict):
    """409 naming the worker that holds the lease (7.2)."""

    def __init__(self, holder: str, generation: int) -> None:
        super().__init__("ALREADY_CLAIMED", "another worker holds the lease")
        self.holder = holder
        self.generation = generation

    def details(self) -> dict[str, object]:
        return {"current_holder": self.holder, "generation": self.generation}


class NoPendingWork(Conflict):
    def __init__(self) -> None:
        super().__init__("NO_PENDING_WORK", "subscription has no pending work")


class InvalidAck(Conflict):
    def __init__(self, message: str) -> None:
        super().__init__("INVALID_OFFSET", message)


class TokenRejected(Unauthorized):
    """401: the bearer token is missing, forged, expired or for another subscription."""

    def __init__(self, code: str = "TOKEN_INVALID", message: str = "token invalid") -> None:
        super().__init__(code, message)


# -- configuration (6.2) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """A subscription's normalized configuration; equal configs hash equal."""

    kind: str
    pattern: str | None
    streams: tuple[str, ...]  # sorted, unique
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None

    def canonical(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "pattern": self.pattern,
            "streams": list(self.streams),
            "webhook": {"url": self.webhook_url} if self.webhook_url is not None else None,
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
        }

    def hash(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys): what idempotent re-confirmation compares."""
        body = orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(body).hexdigest()

    def to_json(self) -> str:
        return orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS).decode()

    @staticmethod
    def from_json(text: str) -> SubscriptionConfig:
        raw = orjson.loads(text)
        webhook = raw.get("webhook")
        return SubscriptionConfig(
            kind=raw["type"],
            pattern=raw.get("pattern"),
            streams=tuple(raw.get("streams") or ()),
            webhook_url=webhook["url"] if webhook else None,
            wake_stream=raw.get("wake_stream"),
            lease_ttl_ms=raw["lease_ttl_ms"],
            description=raw.get("description"),
        )


def check_id(raw: str) -> str:
    """A client-chosen subscription id: 1..256 bytes, no control characters, no ``/``."""
    if not raw or len(raw.encode()) > MAX_ID_BYTES or _CONTROL.search(raw) or "/" in raw:
        raise InvalidRequest("subscription id must be 1..256 bytes without / or controls")
    return raw


def normalize_path(raw: object, what: str = "stream path") -> str:
    """A stream-root-relative path: leading and trailing slashes dropped, never empty, no
    ``.``/``..`` or empty segments, not under the reserved ``__ds`` prefix."""
    if not isinstance(raw, str):
        raise InvalidRequest(f"{what} must be a string")
    path = raw.strip("/")
    if not path or len(path.encode()) > MAX_PATH_BYTES or _CONTROL.search(path):
        raise InvalidRequest(f"{what} must be 1..{MAX_PATH_BYTES} bytes without controls")
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidRequest(f"{what} must not have empty, . or .. segments")
    if segments[0] == "__ds":
        raise InvalidRequest(f"{what} must not be under the reserved __ds prefix")
    return path


def parse_config(body: object) -> SubscriptionConfig:
    """Validate a PUT body; raises InvalidRequest (400). URL safety is checked separately
    (:func:`check_webhook_url`) because it depends on the operator's policy."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    kind = body.get("type")
    if kind not in KINDS:
        raise InvalidRequest('type must be "webhook" or "pull-wake"')
    pattern = body.get("pattern")
    if pattern is not None:
        pattern = normalize_path(pattern, "pattern")
        try:
            check_pattern(pattern)
        except BadRequest as exc:
            raise InvalidRequest(exc.message) from None
    streams = body.get("streams", [])
    if streams is None:
        streams = []
    if not isinstance(streams, list) or len(streams) > MAX_STREAMS:
        raise InvalidRequest(f"streams must be an array of at most {MAX_STREAMS} paths")
    normalized = tuple(sorted({normalize_path(s) for s in streams}))
    if pattern is None and not normalized:
        raise InvalidRequest("at least one of pattern or streams is required")
    lease = body.get("lease_ttl_ms", DEFAULT_LEASE_TTL_MS)
    if (
        not isinstance(lease, int)
        or isinstance(lease, bool)
        or not MIN_LEASE_TTL_MS <= lease <= MAX_LEASE_TTL_MS
    ):
        raise InvalidRequest(
            f"lease_ttl_ms must be an integer from {MIN_LEASE_TTL_MS} to {MAX_LEASE_TTL_MS}"
        )
    description = body.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description.encode()) > MAX_DESCRIPTION_BYTES
    ):
        raise InvalidRequest(f"description must be a string of at most {MAX_DESCRIPTION_BYTES}")
    url = wake_stream = None
    if kind == WEBHOOK:
        webhook = body.get("webhook")
        url = webhook.get("url") if isinstance(webhook, dict) else None
        if not isinstance(url, str) or not url or len(url) > MAX_URL_BYTES:
            raise InvalidRequest("webhook subscriptions require webhook.url")
    else:
        raw_wake = body.get("wake_stream")
        if raw_wake is None:
            raise InvalidRequest("pull-wake subscriptions require wake_stream")
        wake_stream = normalize_path(raw_wake, "wake_stream")
    return SubscriptionConfig(kind, pattern, normalized, url, wake_stream, lease, description)


def parse_stream_list(body: object) -> tuple[str, ...]:
    """``{"streams": [...]}`` for explicit membership (6.4): a non-empty array of paths."""
    streams = body.get("streams") if isinstance(body, dict) else None
    if not isinstance(streams, list) or not streams or len(streams) > MAX_STREAMS:
        raise InvalidRequest(f"streams must be a non-empty array of at most {MAX_STREAMS}")
    return tuple(sorted({normalize_path(s) for s in streams}))


def parse_worker(body: object) -> str:
    worker = body.get("worker") if isinstance(body, dict) else None
    if not isinstance(worker, str) or not worker or len(worker.encode()) > MAX_ID_BYTES:
        raise InvalidRequest("worker must be a non-empty string")
    return worker


# -- wake requests, fencing and acks (7.1-7.3) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class WakeRequest:
    """The body of a callback, ack or release."""

    wake_id: str | None
    generation: int | None
    acks: tuple[tuple[str, int], ...]  # (stream path, offset position)
    done: bool


def parse_wake_request(body: object) -> WakeRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    wake_id = body.get("wake_id")
    generation = body.get("generation")
    if wake_id is not None and not isinstance(wake_id, str):
        raise InvalidRequest("wake_id must be a string")
    if generation is not None and (not isinstance(generation, int) or isinstance(generation, bool)):
        raise InvalidRequest("generation must be an integer")
    raw_acks = body.get("acks", [])
    if raw_acks is None:
        raw_acks = []
    if not isinstance(raw_acks, list) or len(raw_acks) > MAX_STREAMS:
        raise InvalidRequest("acks must be an array")
    acks = []
    for ack in raw_acks:
        if not isinstance(ack, dict):
            raise InvalidRequest("each ack must be an object")
        path = normalize_path(ack.get("stream", ack.get("path")), "ack stream")
        offset = ack.get("offset")
        if not isinstance(offset, str):
            raise InvalidRequest("ack offset must be a string")
        try:
            position = parse_offset(offset)
        except BadRequest:
            raise InvalidAck(f"ack offset {offset[:64]!r} is not an offset") from None
        acks.append((path, position))
    done = body.get("done", False)
    if not isinstance(done, bool):
        raise InvalidRequest("done must be a boolean")
    return WakeRequest(wake_id, generation, tuple(acks), done)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subscription_id: str
    generation: int
    wake_id: str
    expires_at: float


def check_fence(
    claims: TokenClaims,
    request: WakeRequest,
    generation: int,
    wake_id: str | None,
) -> None:
    """7.3: token generation, request generation and request wake id must all name the
    current wake; anything else is FENCED (409)."""
    if (
        wake_id is None
        or claims.generation != generation
        or claims.wake_id != wake_id
        or request.generation != generation
        or request.wake_id != wake_id
    ):
        raise Fenced()


@dataclass(frozen=True, slots=True)
class LinkState:
    """One stream link as delivery sees it: cursor, tail now and tail at the wake snapshot."""

    path: str
    explicit: bool
    glob: bool
    acked: int
    tail: int
    snapshot: int | None = None

    @property
    def link_type(self) -> str:
        return "explicit" if self.explicit else "glob"

    @property
    def pending(self) -> bool:
        return self.tail > self.acked


def check_acks(links: Sequence[LinkState], acks: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Acks are last-processed inclusive; each must name a linked stream and lie between its
    cursor and its tail (409 INVALID_OFFSET otherwise). Returns the new cursor per path."""
    by_path = {link.path: link for link in links}
    out: dict[str, int] = {}
    for path, position in acks:
        link = by_path.get(path)
        if link is None:
            raise InvalidAck(f"ack names a stream the subscription does not link: {path}")
        if position < max(link.acked, out.get(path, link.acked)):
            raise InvalidAck(f"ack offset regresses the cursor of {path}")
        if position > link.tail:
            raise InvalidAck(f"ack offset is beyond the tail of {path}")
        out[path] = position
    return out


def snapshot_acks(links: Iterable[LinkState]) -> dict[str, int]:
    """What ``{"done": true}`` from a webhook acks: every stream's tail in the wake snapshot."""
    return {
        link.path: link.snapshot
        for link in links
        if link.snapshot is not None and link.snapshot > link.acked
    }


def has_pending(links: Iterable[LinkState]) -> bool:
    return any(link.pending for link in links)


def first_pending(links: Iterable[LinkState]) -> str | None:
    return next((link.path for link in links if link.pending), None)


def retry_delay(attempt: int, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1-based): 1 s doubling to 60 s, +-20% jitter."""
    exponent = min(max(0, attempt - 1), 16)
    base = min(RETRY_BASE_SECONDS * float(2**exponent), RETRY_MAX_SECONDS)
    jitter: float = rng.uniform(-1.0, 1.0)
    return max(0.0, base * (1.0 + RETRY_JITTER * jitter))


# -- serialization (6.3, 7.1, 7.2) -----------------------------------------------------------


def render_offset(position: int) -> str:
    return format_offset(position)


def link_json(link: LinkState, *, with_tail: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": link.path,
        "link_type": link.link_type,
        "acked_offset": format_offset(link.acked),
    }
    if with_tail:
        tail = link.snapshot if link.snapshot is not None else link.tail
        out["tail_offset"] = format_offset(tail)
        out["has_pending"] = tail > link.acked
    return out


def wake_event(subscription_id: str, stream: str, generation: int, ts_ms: int) -> dict[str, Any]:
    return {
        "type": "wake",
        "subscription_id": subscription_id,
        "stream": stream,
        "generation": generation,
        "ts": ts_ms,
    }


def webhook_body(
    subscription_id: str,
    wake_id: str,
    generation: int,
    links: Iterable[LinkState],
    callback_url: str,
    callback_token: str,
) -> bytes:
    return orjson.dumps(
        {
            "subscription_id": subscription_id,
            "wake_id": wake_id,
            "generation": generation,
            "streams": [link_json(link, with_tail=True) for link in links],
            "callback_url": callback_url,
            "callback_token": callback_token,
        }
    )


# -- signatures and tokens (7.1, 12.9, 12.10) -------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_message(timestamp: int, body: bytes) -> bytes:
    """What Ed25519 signs: ``<timestamp>.<raw body>``."""
    return f"{timestamp}.".encode() + body


def signature_header(timestamp: int, kid: str, signature: bytes) -> str:
    return f"t={timestamp},kid={kid},ed25519={b64url(signature)}"


_SIGNATURE = re.compile(r"t=(\d+),kid=([^,]+),ed25519=([A-Za-z0-9_-]+)")


def parse_signature_header(value: str) -> tuple[int, str, bytes] | None:
    match = _SIGNATURE.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)), match.group(2), b64url_decode(match.group(3))


def jwk_kid(x: bytes) -> str:
    """``ds_`` + the RFC 7638 thumbprint of an Ed25519 public key: stable, from key material."""
    canonical = orjson.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64url(x)})
    return "ds_" + b64url(hashlib.sha256(canonical).digest())


def public_jwk(x: bytes) -> dict[str, str]:
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "kid": jwk_kid(x),
        "use": "sig",
        "alg": "EdDSA",
        "x": b64url(x),
    }


def make_token(secret: bytes, claims: TokenClaims) -> str:
    """An HMAC-SHA256-signed token binding subscription, generation, wake and expiry."""
    payload = orjson.dumps(
        {
            "sub": claims.subscription_id,
            "gen": claims.generation,
            "wake": claims.wake_id,
            "exp": int(claims.expires_at),
        }
    )
    body = b64url(payload)
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{b64url(mac)}"


def verify_token(secret: bytes, token: str | None, subscription_id: str, now: float) -> TokenClaims:
    """The token's claims, or TokenRejected (401): forged, expired, or another subscription's."""
    if not token or len(token) > 4096 or token.count(".") != 1:
        raise TokenRejected()
    body, mac = token.split(".")
    expected = b64url(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, mac):
        raise TokenRejected()
    try:
        raw = orjson.loads(b64url_decode(body))
        claims = TokenClaims(str(raw["sub"]), int(raw["gen"]), str(raw["wake"]), float(raw["exp"]))
    except (ValueError, KeyError, TypeError):
        raise TokenRejected() from None
    if claims.subscription_id != subscription_id:
        raise TokenRejected()
    if claims.expires_at < now:
        raise TokenRejected("TOKEN_EXPIRED", "token expired")
    return claims


def bearer(header: str | None) -> str | None:
    if header is None or not header.startswith("Bearer "):
        return None
    return header[len("Bearer ") :].strip() or None


# -- webhook URL and address policy (6.2, 12.8) -----------------------------------------------

AddressClass = Literal["public", "loopback", "forbidden"]
LOCALHOST_NAMES = frozenset({"localhost", "localhost."})


def classify_address(address: str) -> AddressClass:
    """Where an IP address points: the public internet, this machine's IPv4 loopback, or
    anywhere else local (private, link-local and metadata, ULA, IPv6 loopback, multicast,
    reserved, unspecified, and IPv4-mapped or embedded forms of those)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "forbidden"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return "forbidden" if classify_address(str(embedded)) != "public" else "public"
        if ip.teredo is not None:
            return "forbidden"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.IPv4Network("127.0.0.0/8"):
        return "loopback"
    if ip.is_global and not ip.is_multicast:
        return "public"
    return "forbidden"


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """What the operator allows: loopback ``http`` targets for development, and optionally
    only named hosts (exact, or ``*.example.com`` for subdomains)."""

    allow_loopback: bool = True
    allowed_hosts: tuple[str, ...] = ()

    def host_allowed(self, host: str) -> bool:
        if not self.allowed_hosts:
            return True
        for entry in self.allowed_hosts:
            if entry.startswith("*.") and host.endswith(entry[1:]):
                return True
            if host == entry:
                return True
        return False


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    scheme: str
    host: str  # lower-case, IPv6 without brackets
    port: int
    literal: bool  # the host is an IP address
    loopback_ok: bool  # loopback addresses may be connected to (the dev exception)


def check_webhook_url(url: str, policy: UrlPolicy) -> WebhookTarget:
    """6.2/12.8: https anywhere public; plain http only to ``localhost`` or ``127.0.0.x``
    (when the policy allows loopback); never private, link-local, metadata or other local
    addresses; no credentials in the URL. Raises WebhookUrlRejected (400). Host names are
    checked again when connecting, against the addresses they resolve to."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookUrlRejected("webhook.url must be a valid URL") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        raise WebhookUrlRejected("webhook.url must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlRejected("webhook.url must not carry credentials")
    if _CONTROL.search(url) or " " in url:
        raise WebhookUrlRejected("webhook.url must not contain spaces or control characters")
    literal = True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        literal = False
    kind = classify_address(host) if literal else None
    is_local_name = host in LOCALHOST_NAMES
    dev_host = (is_local_name or kind == "loopback") and (literal or is_local_name)
    if scheme == "http" or dev_host or kind == "loopback":
        if not dev_host or scheme != "http":
            raise WebhookUrlRejected(
                "http webhook URLs are allowed only for localhost or 127.0.0.x, which must use http"
            )
        if not policy.allow_loopback:
            raise WebhookUrlRejected("loopback webhook URLs are disabled on this server")
    elif literal and kind != "public":
        raise WebhookUrlRejected("webhook.url must not target private or local addresses")
    elif not literal and (host.endswith(".localhost") or "." not in host.rstrip(".")):
        raise WebhookUrlRejected("webhook.url must name a public host")
    if not policy.host_allowed(host):
        raise WebhookUrlRejected("webhook.url host is not on this server's allow list")
    default_port = 443 if scheme == "https" else 80
    return WebhookTarget(scheme, host, port or default_port, literal, dev_host)


def address_allowed(target: WebhookTarget, address: str) -> bool:
    """Connect-time rule for one resolved address of ``target``'s host."""
    kind = classify_address(address)
    if kind == "public":
        return not target.loopback_ok  # the development exception is for this machine only
    if kind == "loopback":
        return target.loopback_ok
    return False
