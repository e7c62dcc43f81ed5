"""Offsets: opaque, ordered; reading from any returned offset yields exactly what followed."""

from __future__ import annotations

import random
from collections.abc import Callable

import httpx
import pytest

from conformance.helpers import append, catch_up


def test_offsets_increase_lexicographically_with_every_append(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    offsets = [client.head(url).headers["Stream-Next-Offset"]]
    for i in range(20):
        response = append(client, url, f"token-{i} ".encode())
        assert response.status_code in (200, 204)
        offsets.append(response.headers["Stream-Next-Offset"])
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == len(offsets)
    assert not {"-1", "now"} & set(offsets)


def test_every_returned_offset_resumes_exactly_after_its_append(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    pieces = [f"piece {i}|".encode() for i in range(15)]
    after: list[tuple[str, bytes]] = []
    for i, piece in enumerate(pieces):
        offset = append(client, url, piece).headers["Stream-Next-Offset"]
        after.append((offset, b"".join(pieces[i + 1 :])))
    for offset, expected in after:
        data, _, _ = catch_up(client, url, offset)
        assert data == expected


def test_offsets_from_reads_equal_offsets_from_appends(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    written = append(client, url, b"abc").headers["Stream-Next-Offset"]
    assert client.get(url, params={"offset": "-1"}).headers["Stream-Next-Offset"] == written
    assert client.head(url).headers["Stream-Next-Offset"] == written


def test_offset_minus_one_reads_from_the_start(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"hello ")
    append(client, url, b"world")
    data, _, _ = catch_up(client, url, "-1")
    assert data == b"hello world"


def test_offset_now_skips_history_and_reports_the_tail(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"history")
    tail = client.head(url).headers["Stream-Next-Offset"]
    response = client.get(url, params={"offset": "now"})
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["Stream-Next-Offset"] == tail
    assert response.headers["Stream-Up-To-Date"].lower() == "true"
    append(client, url, b" new")
    data, _, _ = catch_up(client, url, tail)
    assert data == b" new"


@pytest.mark.parametrize("bad", ["", "abc", "0_", "-2", "now!", "1;2", "../etc"])
def test_malformed_offsets_are_rejected_with_400(
    client: httpx.Client, new_stream: Callable[..., str], bad: str
) -> None:
    url = new_stream(body=b"x")
    response = client.get(url, params={"offset": bad})
    assert response.status_code == 400


@pytest.mark.parametrize("seed", range(4))
def test_catch_up_in_server_chosen_chunks_reconstructs_the_stream(
    client: httpx.Client, new_stream: Callable[..., str], seed: int
) -> None:
    rng = random.Random(seed)
    url = new_stream("application/octet-stream")
    expected = b""
    for _ in range(rng.randint(5, 40)):
        piece = rng.randbytes(rng.randint(1, 96 * 1024))
        response = append(client, url, piece, "application/octet-stream")
        assert response.status_code in (200, 204)
        expected += piece
    data, tail, _ = catch_up(client, url)
    assert data == expected
    assert tail == client.head(url).headers["Stream-Next-Offset"]
    # Resume from every offset a catch-up handed out: each continues with exactly the rest.
    offset, seen = "-1", b""
    while True:
        response = client.get(url, params={"offset": offset})
        seen += response.content
        offset = response.headers["Stream-Next-Offset"]
        rest, _, _ = catch_up(client, url, offset)
        assert seen + rest == expected
        if response.headers.get("Stream-Up-To-Date", "").lower() == "true":
            break


def test_json_offsets_fall_between_whole_messages(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream("application/json")
    offsets = []
    for i in range(5):
        response = append(client, url, f'{{"i": {i}}}'.encode(), "application/json")
        offsets.append(response.headers["Stream-Next-Offset"])
    for i, offset in enumerate(offsets):
        response = client.get(url, params={"offset": offset})
        assert response.json() == [{"i": j} for j in range(i + 1, 5)]
