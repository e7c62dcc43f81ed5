"""Header grammar (sections 4, 5.2.1, 9): each value either parses to one meaning or is a 400."""

from __future__ import annotations

import pytest

from protocol.errors import BadRequest
from protocol.headers import (
    MAX_SAFE_INTEGER,
    ProducerHeaders,
    is_json,
    is_text_like,
    is_true,
    media_type,
    parse_expires_at,
    parse_non_negative,
    parse_producer,
    parse_revoke_forks,
    parse_ttl,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0), ("1", 1), ("3600", 3600), ("999999999999", 999999999999)],
)
def test_ttl_accepts_plain_decimals(value: str, seconds: int) -> None:
    assert parse_ttl(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["", "-1", "+1", "01", "1.0", "1e3", " 1", "1 ", "0x10", "one", "1_000", "9999999999999"],
)
def test_ttl_rejects_everything_else(value: str) -> None:
    with pytest.raises(BadRequest):
        parse_ttl(value)


@pytest.mark.parametrize(
    ("value", "timestamp"),
    [
        ("1970-01-01T00:00:00Z", 0.0),
        ("2030-01-01T00:00:00Z", 1893456000.0),
        ("2030-01-01T00:00:00.5Z", 1893456000.5),
        ("2030-01-01t00:00:00z", 1893456000.0),
        ("2030-01-01T01:00:00+01:00", 1893456000.0),
        ("2030-01-01T00:00:00.123456789Z", 1893456000.123),  # truncated to what we echo
        ("9999-12-31T23:59:59.999999999Z", 253402300799.999),
        ("9999-12-31T23:59:59+23:59", 253402214459.0),
        ("0000-01-01T00:00:00Z", -62167219200.0),
        ("0000-01-01T23:59:00+23:59", -62167219200.0),
        ("2016-12-31T23:59:60Z", 1483228800.0),  # a leap second is the next second
        ("2000-02-29T00:00:00Z", 951782400.0),
    ],
)
def test_expires_at_accepts_rfc3339(value: str, timestamp: float) -> None:
    assert parse_expires_at(value) == pytest.approx(timestamp, abs=1e-6)


@pytest.mark.parametrize(
    "value",
    [
        "2030-01-01",
        "2030-01-01 00:00:00Z",
        "2030-01-01T00:00:00",
        "1893456000",
        "2030-13-01T00:00:00Z",
        "2030-02-30T00:00:00Z",
        "2100-02-29T00:00:00Z",
        "2030-00-01T00:00:00Z",
        "2030-01-00T00:00:00Z",
        "2030-01-01T24:00:00Z",
        "2030-01-01T00:60:00Z",
        "2030-01-01T00:00:61Z",
        "2030-01-01T00:00:00+24:00",
        "2030-01-01T00:00:00+00:60",
        "9999-12-31T23:59:60Z",
        "9999-12-31T23:59:59-00:01",
        "0000-01-01T00:00:00+00:01",
        "tomorrow",
    ],
)
def test_expires_at_rejects_other_forms(value: str) -> None:
    with pytest.raises(BadRequest):
        parse_expires_at(value)


@pytest.mark.parametrize(
    ("value", "number"), [("0", 0), ("7", 7), (str(MAX_SAFE_INTEGER), MAX_SAFE_INTEGER)]
)
def test_non_negative_integers(value: str, number: int) -> None:
    assert parse_non_negative("Producer-Seq", value) == number


@pytest.mark.parametrize("value", ["", "-1", "1.5", "x", str(MAX_SAFE_INTEGER + 1), "9" * 17])
def test_non_negative_rejects_others(value: str) -> None:
    with pytest.raises(BadRequest):
        parse_non_negative("Producer-Seq", value)


@pytest.mark.parametrize(
    ("id_", "epoch", "seq", "expected"),
    [
        pytest.param(None, None, None, None, id="none-sent"),
        pytest.param("p", "1", "2", ProducerHeaders("p", 1, 2), id="all-three"),
    ],
)
def test_producer_headers_all_or_none(
    id_: str | None, epoch: str | None, seq: str | None, expected: ProducerHeaders | None
) -> None:
    assert parse_producer(id_, epoch, seq) == expected


@pytest.mark.parametrize(
    ("id_", "epoch", "seq"),
    [
        pytest.param("p", None, None, id="id-only"),
        pytest.param("p", "0", None, id="no-seq"),
        pytest.param(None, "0", "0", id="no-id"),
        pytest.param("", "0", "0", id="empty-id"),
        pytest.param("p", "-1", "0", id="negative-epoch"),
        pytest.param("p", "0", "x", id="bad-seq"),
    ],
)
def test_partial_or_malformed_producer_headers_are_400(
    id_: str | None, epoch: str | None, seq: str | None
) -> None:
    with pytest.raises(BadRequest):
        parse_producer(id_, epoch, seq)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" true ", True),
        ("false", False),
        ("1", False),
        ("", False),
        (None, False),
    ],
)
def test_stream_closed_is_exactly_true(value: str | None, expected: bool) -> None:
    assert is_true(value) is expected


@pytest.mark.parametrize(
    ("content_type", "essence", "json", "text_like"),
    [
        ("application/json", "application/json", True, True),
        ("Application/JSON; charset=utf-8", "application/json", True, True),
        ("text/plain", "text/plain", False, True),
        ("text/event-stream;x=y", "text/event-stream", False, True),
        ("application/octet-stream", "application/octet-stream", False, False),
        ("application/ndjson", "application/ndjson", False, False),
        ("", "", False, False),
    ],
)
def test_media_types(content_type: str, essence: str, json: bool, text_like: bool) -> None:
    assert media_type(content_type) == essence
    assert is_json(content_type) is json
    assert is_text_like(content_type) is text_like


@pytest.mark.parametrize(
    ("value", "revoke_from", "forks"),
    [
        (None, None, False),
        (None, "0000000000000000_0000000000000004", False),
        ("true", "0000000000000000_0000000000000004", True),
        (" TRUE ", "0000000000000000_0000000000000004", True),
        ("false", "0000000000000000_0000000000000004", False),
    ],
)
def test_revoke_forks_reads_true_or_false(
    value: str | None, revoke_from: str | None, forks: bool
) -> None:
    assert parse_revoke_forks(value, revoke_from) is forks


@pytest.mark.parametrize(
    ("value", "revoke_from", "code"),
    [
        ("maybe", "0000000000000000_0000000000000004", "invalid_revoke_forks"),
        ("1", "0000000000000000_0000000000000004", "invalid_revoke_forks"),
        ("", "0000000000000000_0000000000000004", "invalid_revoke_forks"),
        ("true", None, "revoke_forks_without_from"),
        ("false", None, "revoke_forks_without_from"),
    ],
)
def test_a_delete_refuses_a_revoke_forks_it_cannot_act_on(
    value: str, revoke_from: str | None, code: str
) -> None:
    """A DELETE deletes what it is told to: an unreadable flag is a 400, never a guess."""
    with pytest.raises(BadRequest) as refused:
        parse_revoke_forks(value, revoke_from)
    assert refused.value.code == code
