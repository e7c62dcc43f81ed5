"""Subscription rules (sections 6-7, 12.8-12.10): one row per clause."""

from __future__ import annotations

import random
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import subscriptions as rules
from protocol.errors import ProtocolError
from protocol.offsets import format_offset
from protocol.subscriptions import LinkState, TokenClaims, UrlPolicy, WakeRequest

HOOK = {"url": "https://worker.example/hooks"}


def webhook(**extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "pattern": "events/*", "webhook": HOOK, **extra}


# -- configuration (6.2) ----------------------------------------------------------------------

BAD_CONFIGS = [
    ("not-an-object", [], "INVALID_REQUEST"),
    ("no-type", {"pattern": "a"}, "INVALID_REQUEST"),
    ("unknown-type", {"type": "email", "pattern": "a"}, "INVALID_REQUEST"),
    ("neither-pattern-nor-streams", {"type": "webhook", "webhook": HOOK}, "INVALID_REQUEST"),
    ("empty-streams-only", {"type": "webhook", "streams": [], "webhook": HOOK}, "INVALID_REQUEST"),
    ("stream-not-a-string", webhook(streams=[1]), "INVALID_REQUEST"),
    ("dot-dot-stream", webhook(streams=["a/../b"]), "INVALID_REQUEST"),
    ("reserved-stream", webhook(streams=["__ds/x"]), "INVALID_REQUEST"),
    ("partial-wildcard", webhook(pattern="events/a*"), "INVALID_REQUEST"),
    ("pattern-empty-segment", webhook(pattern="a//b"), "INVALID_REQUEST"),
    ("lease-too-short", webhook(lease_ttl_ms=999), "INVALID_REQUEST"),
    ("lease-too-long", webhook(lease_ttl_ms=600_001), "INVALID_REQUEST"),
    ("lease-not-integer", webhook(lease_ttl_ms=1500.5), "INVALID_REQUEST"),
    ("lease-boolean", webhook(lease_ttl_ms=True), "INVALID_REQUEST"),
    ("description-not-string", webhook(description=5), "INVALID_REQUEST"),
    ("webhook-without-url", {"type": "webhook", "pattern": "a"}, "INVALID_REQUEST"),
    (
        "webhook-url-not-string",
        {"type": "webhook", "pattern": "a", "webhook": {"url": 1}},
        "INVALID_REQUEST",
    ),
    ("pull-without-wake-stream", {"type": "pull-wake", "pattern": "a"}, "INVALID_REQUEST"),
]


@pytest.mark.parametrize(
    ("body", "code"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_invalid_configurations_are_400(body: Any, code: str) -> None:
    with pytest.raises(rules.InvalidRequest) as caught:
        rules.parse_config(body)
    assert caught.value.code == code


def test_defaults_and_normalization() -> None:
    config = rules.parse_config(
        {"type": "webhook", "pattern": "/events/*/", "streams": ["b", "/a/", "b"], "webhook": HOOK}
    )
    assert config.pattern == "events/*"
    assert config.streams == ("a", "b")  # sorted, unique, slashes trimmed
    assert config.lease_ttl_ms == rules.DEFAULT_LEASE_TTL_MS
    assert config.description is None


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        pytest.param(
            webhook(streams=["x", "y"]), webhook(streams=["y", "x", "x"]), True, id="streams-order"
        ),
        pytest.param(webhook(), webhook(lease_ttl_ms=30_000), True, id="explicit-default-lease"),
        pytest.param(webhook(), webhook(description="d"), False, id="description"),
        pytest.param(webhook(), webhook(lease_ttl_ms=1000), False, id="lease"),
        pytest.param(webhook(), webhook(pattern="events/**"), False, id="pattern"),
        pytest.param(
            webhook(), {**webhook(), "webhook": {"url": "https://other.example/"}}, False, id="url"
        ),
    ],
)
def test_config_hash_is_of_the_normalized_configuration(a: Any, b: Any, same: bool) -> None:
    assert (rules.parse_config(a).hash() == rules.parse_config(b).hash()) is same


def test_config_round_trips_through_its_stored_form() -> None:
    config = rules.parse_config(
        {"type": "pull-wake", "streams": ["s"], "wake_stream": "wake/pool", "description": "d"}
    )
    assert rules.SubscriptionConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("raw", ["", "a/b", "x" * 257, "a\nb"])
def test_bad_subscription_ids(raw: str) -> None:
    with pytest.raises(rules.InvalidRequest):
        rules.check_id(raw)


# -- webhook URLs and addresses (6.2, 12.8) ---------------------------------------------------

URLS = [
    ("https-public-name", "https://hooks.example.com/x", True),
    ("https-public-ip", "https://93.184.216.34/x", True),
    ("http-localhost", "http://localhost:8080/hook", True),
    ("http-127-0-0-1", "http://127.0.0.1:9/hook", True),
    ("http-127-x", "http://127.0.0.7/hook", True),
    ("http-public", "http://hooks.example.com/x", False),
    ("https-localhost", "https://localhost/x", False),
    ("rfc1918-10", "http://10.0.0.1/hook", False),
    ("rfc1918-10-https", "https://10.0.0.1/hook", False),
    ("rfc1918-172", "https://172.16.5.4/", False),
    ("rfc1918-192", "https://192.168.1.1/", False),
    ("metadata", "https://169.254.169.254/latest/meta-data", False),
    ("link-local", "https://169.254.1.1/", False),
    ("unspecified", "https://0.0.0.0/", False),
    ("cgnat", "https://100.64.0.1/", False),
    ("ipv6-loopback", "http://[::1]/hook", False),
    ("ipv6-loopback-https", "https://[::1]/hook", False),
    ("ipv6-ula", "https://[fd00::1]/", False),
    ("ipv6-link-local", "https://[fe80::1]/", False),
    ("ipv4-mapped-private", "https://[::ffff:10.0.0.1]/", False),
    ("ipv4-mapped-loopback", "https://[::ffff:127.0.0.1]/", False),
    ("nat64-metadata", "https://[64:ff9b::a9fe:a9fe]/", False),
    ("single-label-host", "https://intranet/", False),
    ("dot-localhost", "https://app.localhost/", False),
    ("credentials", "https://user:pw@hooks.example.com/", False),
    ("ftp", "ftp://hooks.example.com/", False),
    ("no-host", "https:///x", False),
    ("garbage", "not a url", False),
    ("bad-port", "https://hooks.example.com:99999/", False),
]


@pytest.mark.parametrize(("url", "ok"), [u[1:] for u in URLS], ids=[u[0] for u in URLS])
def test_webhook_url_rules(url: str, ok: bool) -> None:
    if ok:
        rules.check_webhook_url(url, UrlPolicy())
    else:
        with pytest.raises(rules.WebhookUrlRejected) as caught:
            rules.check_webhook_url(url, UrlPolicy())
        assert caught.value.code == "WEBHOOK_URL_REJECTED"


def test_operator_can_forbid_loopback() -> None:
    with pytest.raises(rules.WebhookUrlRejected):
        rules.check_webhook_url("http://127.0.0.1:9/hook", UrlPolicy(allow_loopback=False))


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://hooks.example.com/", True),
        ("https://a.b.partner.io/", True),
        ("https://partner.io.evil.com/", False),
        ("https://other.example.com/", False),
    ],
)
def test_allow_list(url: str, ok: bool) -> None:
    policy = UrlPolicy(allowed_hosts=("hooks.example.com", "*.partner.io"))
    if ok:
        rules.check_webhook_url(url, policy)
    else:
        with pytest.raises(rules.WebhookUrlRejected):
            rules.check_webhook_url(url, policy)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("93.184.216.34", "public"),
        ("2606:4700::1111", "public"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.3", "loopback"),
        ("::1", "forbidden"),
        ("10.1.2.3", "forbidden"),
        ("169.254.169.254", "forbidden"),
        ("fd12::1", "forbidden"),
        ("fe80::1%eth0", "forbidden"),
        ("::ffff:192.168.0.1", "forbidden"),
        ("::ffff:93.184.216.34", "public"),
        ("2002:0a00:0001::1", "forbidden"),  # 6to4 wrapping 10.0.0.1
        ("224.0.0.1", "forbidden"),
        ("255.255.255.255", "forbidden"),
        ("not-an-ip", "forbidden"),
    ],
)
def test_address_classes(address: str, kind: str) -> None:
    assert rules.classify_address(address) == kind


@pytest.mark.parametrize(
    ("url", "address", "ok"),
    [
        ("https://hooks.example.com/", "93.184.216.34", True),
        ("https://hooks.example.com/", "10.0.0.5", False),  # DNS rebinding to a private host
        ("https://hooks.example.com/", "127.0.0.1", False),
        ("http://localhost/", "127.0.0.1", True),
        ("http://localhost/", "93.184.216.34", False),  # "localhost" must stay on this machine
        ("http://localhost/", "::1", False),
    ],
)
def test_connect_time_address_rule(url: str, address: str, ok: bool) -> None:
    target = rules.check_webhook_url(url, UrlPolicy())
    assert rules.address_allowed(target, address) is ok


# -- fencing, acks and leases (7) --------------------------------------------------------------

CLAIMS = TokenClaims("sub", 7, "w_a", 0.0)


@pytest.mark.parametrize(
    ("claims", "request_", "generation", "wake_id", "fenced"),
    [
        pytest.param(CLAIMS, WakeRequest("w_a", 7, (), True), 7, "w_a", False, id="current"),
        pytest.param(CLAIMS, WakeRequest("w_a", 6, (), True), 7, "w_a", True, id="old-request-gen"),
        pytest.param(CLAIMS, WakeRequest("w_b", 7, (), True), 7, "w_a", True, id="other-wake-id"),
        pytest.param(CLAIMS, WakeRequest("w_a", 7, (), True), 8, "w_a", True, id="token-gen-stale"),
        pytest.param(CLAIMS, WakeRequest("w_a", 7, (), True), 7, None, True, id="no-wake-out"),
        pytest.param(
            CLAIMS, WakeRequest(None, None, (), True), 7, "w_a", True, id="missing-fields"
        ),
    ],
)
def test_generation_fencing(
    claims: TokenClaims, request_: WakeRequest, generation: int, wake_id: str | None, fenced: bool
) -> None:
    if fenced:
        with pytest.raises(rules.Fenced) as caught:
            rules.check_fence(claims, request_, generation, wake_id)
        assert caught.value.code == "FENCED"
    else:
        rules.check_fence(claims, request_, generation, wake_id)


LINKS = (LinkState("a", True, False, 10, 50, 40), LinkState("b", False, True, 0, 0, 0))


@pytest.mark.parametrize(
    ("acks", "result"),
    [
        pytest.param([("a", 20)], {"a": 20}, id="forward"),
        pytest.param([("a", 10)], {"a": 10}, id="same-offset-is-idempotent"),
        pytest.param([("a", 50)], {"a": 50}, id="up-to-tail"),
        pytest.param([("a", 9)], "regress", id="regress"),
        pytest.param([("a", 51)], "beyond", id="beyond-tail"),
        pytest.param([("zzz", 1)], "unknown", id="unlinked-stream"),
        pytest.param([("a", 30), ("a", 20)], "regress", id="regress-within-one-request"),
    ],
)
def test_ack_rules(acks: list[tuple[str, int]], result: Any) -> None:
    if isinstance(result, dict):
        assert rules.check_acks(LINKS, acks) == result
    else:
        with pytest.raises(rules.InvalidAck) as caught:
            rules.check_acks(LINKS, acks)
        assert caught.value.code == "INVALID_OFFSET"


def test_done_acks_the_snapshot_not_the_tail() -> None:
    """7.1: appends after the snapshot stay pending and wake again."""
    assert rules.snapshot_acks(LINKS) == {"a": 40}
    assert rules.has_pending(LINKS)
    assert rules.first_pending(LINKS) == "a"


def test_parse_wake_request() -> None:
    request = rules.parse_wake_request(
        {"wake_id": "w", "generation": 3, "acks": [{"stream": "/a/", "offset": format_offset(5)}]}
    )
    assert request == WakeRequest("w", 3, (("a", 5),), False)
    with pytest.raises(rules.InvalidAck):
        rules.parse_wake_request({"acks": [{"stream": "a", "offset": "-1"}]})
    with pytest.raises(rules.InvalidRequest):
        rules.parse_wake_request({"done": "yes"})
    with pytest.raises(rules.InvalidRequest):
        rules.parse_wake_request({"generation": True})


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [
        (1, 0.8, 1.2),
        (2, 1.6, 2.4),
        (3, 3.2, 4.8),
        (6, 25.6, 38.4),
        (7, 48.0, 72.0),
        (50, 48.0, 72.0),
    ],
)
def test_retry_backoff_doubles_to_a_minute_with_20_percent_jitter(
    attempt: int, low: float, high: float
) -> None:
    rng = random.Random(attempt)
    delays = [rules.retry_delay(attempt, rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 4  # jittered, not constant


# -- shapes, signatures, tokens ---------------------------------------------------------------


def test_wake_event_and_link_shapes() -> None:
    assert rules.wake_event("s", "events/a", 7, 123) == {
        "type": "wake", "subscription_id": "s", "stream": "events/a", "generation": 7, "ts": 123,
    }  # fmt: skip
    assert rules.link_json(LINKS[0], with_tail=True) == {
        "path": "a",
        "link_type": "explicit",
        "acked_offset": format_offset(10),
        "tail_offset": format_offset(40),  # the snapshot, not the live tail
        "has_pending": True,
    }
    assert rules.link_json(LINKS[1], with_tail=False)["link_type"] == "glob"


def test_signature_header_verifies_with_the_published_jwk() -> None:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    jwk = rules.public_jwk(raw)
    assert jwk["kid"].startswith("ds_") and jwk["kid"] == rules.jwk_kid(raw)
    body = b'{"a":1}'
    header = rules.signature_header(
        1700000000, jwk["kid"], private.sign(rules.signed_message(1700000000, body))
    )
    parsed = rules.parse_signature_header(header)
    assert parsed is not None
    timestamp, kid, signature = parsed
    assert (timestamp, kid) == (1700000000, jwk["kid"])
    private.public_key().verify(signature, b"1700000000." + body)
    assert rules.parse_signature_header("t=1,kid=x,ed25519=a+b") is None


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        pytest.param(lambda t: t, None, id="valid"),
        pytest.param(
            lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
            "TOKEN_INVALID",
            id="forged-mac",
        ),
        pytest.param(lambda t: "x" + t, "TOKEN_INVALID", id="tampered-body"),
        pytest.param(lambda t: "", "TOKEN_INVALID", id="empty"),
        pytest.param(lambda t: t + ".x", "TOKEN_INVALID", id="extra-part"),
    ],
)
def test_tokens(mutate: Any, code: str | None) -> None:
    secret = b"k" * 32
    token = mutate(rules.make_token(secret, TokenClaims("sub", 3, "w_1", 1000.0)))
    if code is None:
        assert rules.verify_token(secret, token, "sub", 999.0) == TokenClaims(
            "sub", 3, "w_1", 1000.0
        )
    else:
        with pytest.raises(ProtocolError) as caught:
            rules.verify_token(secret, token, "sub", 999.0)
        assert caught.value.code == code


def test_token_is_bound_to_subscription_secret_and_expiry() -> None:
    token = rules.make_token(b"k" * 32, TokenClaims("sub", 3, "w_1", 1000.0))
    for secret, sub, now, code in [
        (b"k" * 32, "other", 999.0, "TOKEN_INVALID"),
        (b"j" * 32, "sub", 999.0, "TOKEN_INVALID"),
        (b"k" * 32, "sub", 1001.0, "TOKEN_EXPIRED"),
    ]:
        with pytest.raises(rules.TokenRejected) as caught:
            rules.verify_token(secret, token, sub, now)
        assert caught.value.code == code


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", None),
        ("Basic abc", None),
        (None, None),
        ("Bearer ", None),
    ],
)
def test_bearer(header: str | None, token: str | None) -> None:
    assert rules.bearer(header) == token
