"""Idempotency: retried creates, producer (id, epoch, seq) deduplication and fencing, Stream-Seq."""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

from conformance.helpers import append, catch_up


def produce(
    client: httpx.Client, url: str, body: bytes, producer: str, epoch: int, seq: int, **headers: str
) -> httpx.Response:
    return append(
        client,
        url,
        body,
        Producer_Id=producer,
        Producer_Epoch=str(epoch),
        Producer_Seq=str(seq),
        **headers,
    )


def test_create_is_idempotent_for_the_same_config_and_conflicts_otherwise(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream("text/plain")
    again = client.put(url, headers={"Content-Type": "text/plain"})
    assert again.status_code == 200
    other = client.put(url, headers={"Content-Type": "application/json"})
    assert other.status_code == 409


def test_a_retried_producer_append_is_stored_once(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    first = produce(client, url, b"token", "p1", 0, 0)
    assert first.status_code == 200
    retry = produce(client, url, b"token", "p1", 0, 0)
    assert retry.status_code == 204
    assert retry.headers["Producer-Epoch"] == "0"
    assert retry.headers["Producer-Seq"] == "0"
    assert catch_up(client, url)[0] == b"token"


def test_an_older_duplicate_is_acknowledged_without_rewriting(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    for seq in range(3):
        assert produce(client, url, f"{seq}".encode(), "p", 0, seq).status_code == 200
    assert produce(client, url, b"0", "p", 0, 0).status_code == 204
    assert catch_up(client, url)[0] == b"012"


def test_a_sequence_gap_is_409_naming_expected_and_received(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    assert produce(client, url, b"a", "p", 0, 0).status_code == 200
    gap = produce(client, url, b"c", "p", 0, 2)
    assert gap.status_code == 409
    assert gap.headers["Producer-Expected-Seq"] == "1"
    assert gap.headers["Producer-Received-Seq"] == "2"
    assert catch_up(client, url)[0] == b"a"


def test_a_new_epoch_fences_the_old_one(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    assert produce(client, url, b"old ", "p", 0, 0).status_code == 200
    assert produce(client, url, b"new ", "p", 1, 0).status_code == 200
    zombie = produce(client, url, b"zombie", "p", 0, 1)
    assert zombie.status_code == 403
    assert zombie.headers["Producer-Epoch"] == "1"
    assert catch_up(client, url)[0] == b"old new "


def test_a_new_epoch_must_start_at_sequence_zero(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    assert produce(client, url, b"a", "p", 0, 0).status_code == 200
    assert produce(client, url, b"b", "p", 1, 5).status_code == 400


def test_producers_are_independent(client: httpx.Client, new_stream: Callable[..., str]) -> None:
    url = new_stream()
    assert produce(client, url, b"a", "alice", 0, 0).status_code == 200
    assert produce(client, url, b"b", "bob", 0, 0).status_code == 200
    assert produce(client, url, b"a", "alice", 0, 0).status_code == 204
    assert catch_up(client, url)[0] == b"ab"


@pytest.mark.parametrize(
    "headers",
    [
        {"Producer-Id": "p"},
        {"Producer-Id": "p", "Producer-Epoch": "0"},
        {"Producer-Epoch": "0", "Producer-Seq": "0"},
        {"Producer-Id": "p", "Producer-Epoch": "x", "Producer-Seq": "0"},
        {"Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": "-1"},
    ],
)
def test_incomplete_or_malformed_producer_headers_are_400(
    client: httpx.Client, new_stream: Callable[..., str], headers: dict[str, str]
) -> None:
    url = new_stream()
    response = client.post(url, content=b"x", headers={"Content-Type": "text/plain", **headers})
    assert response.status_code == 400
    assert catch_up(client, url)[0] == b""


def test_a_retried_append_and_close_deduplicates(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    closing = produce(client, url, b"last", "p", 0, 0, Stream_Closed="true")
    assert closing.status_code in (200, 204)
    assert closing.headers["Stream-Closed"].lower() == "true"
    retry = produce(client, url, b"last", "p", 0, 0, Stream_Closed="true")
    assert retry.status_code == 204
    assert catch_up(client, url)[0] == b"last"


def test_close_is_idempotent_and_later_appends_conflict(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"body")
    for _ in range(2):
        closed = client.post(url, headers={"Content-Type": "text/plain", "Stream-Closed": "true"})
        assert closed.status_code == 204
        assert closed.headers["Stream-Closed"].lower() == "true"
    late = append(client, url, b"late")
    assert late.status_code == 409
    assert late.headers["Stream-Closed"].lower() == "true"
    assert late.headers["Stream-Next-Offset"] == client.head(url).headers["Stream-Next-Offset"]


def test_stream_seq_must_increase(client: httpx.Client, new_stream: Callable[..., str]) -> None:
    url = new_stream()
    assert append(client, url, b"a", Stream_Seq="0002").status_code in (200, 204)
    assert append(client, url, b"b", Stream_Seq="0001").status_code == 409
    assert append(client, url, b"c", Stream_Seq="0002").status_code == 409
    assert append(client, url, b"d", Stream_Seq="0003").status_code in (200, 204)
    assert catch_up(client, url)[0] == b"ad"


def test_a_retry_after_the_response_was_lost_stores_the_append_once(
    base_url: str, client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    target = urlsplit(url)
    body = b"token-after-lost-response"
    request = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\nContent-Type: text/plain\r\n"
        f"Producer-Id: lossy\r\nProducer-Epoch: 0\r\nProducer-Seq: 0\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((target.hostname, target.port or 80), timeout=30) as sock:
        sock.sendall(request)
        assert sock.recv(1)  # the server has answered, so it has handled the append; we hang
        # up without reading the acknowledgement, as if the response were lost on the way
    retry = produce(client, url, body, "lossy", 0, 0)
    assert retry.status_code in (200, 204)
    assert catch_up(client, url)[0] == body
    next_one = produce(client, url, b"+next", "lossy", 0, 1)
    assert next_one.status_code == 200
    assert catch_up(client, url)[0] == body + b"+next"
