"""Resume: catching up, tailing live (long-poll and SSE), and picking up after a lost connection."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from conformance.helpers import append, catch_up, read_sse, sse_events

TEXT = {"Content-Type": "text/plain"}
CLOSE = {**TEXT, "Stream-Closed": "true"}


def _later(url: str, body: bytes, headers: dict[str, str]) -> threading.Timer:
    """POST from another connection in 0.3 s, while this test's reader is parked."""
    timer = threading.Timer(0.3, lambda: httpx.post(url, content=body, headers=headers))
    timer.start()
    return timer


def _long_poll_at_tail(
    client: httpx.Client, url: str, body: bytes, headers: dict[str, str]
) -> tuple[str, httpx.Response]:
    """Park a long-poll at the tail while ``body`` is posted; return the tail and the answer."""
    tail = client.head(url).headers["Stream-Next-Offset"]
    timer = _later(url, body, headers)
    response = client.get(url, params={"offset": tail, "live": "long-poll"})
    timer.join()
    return tail, response


def test_long_poll_at_the_tail_wakes_on_append(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"seen")
    tail, response = _long_poll_at_tail(client, url, b"fresh", TEXT)
    assert response.status_code == 200
    assert response.content == b"fresh"
    assert response.headers["Stream-Next-Offset"] > tail
    assert "Stream-Cursor" in response.headers


def test_long_poll_timeout_is_204_with_the_same_offset(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"seen")
    tail = client.head(url).headers["Stream-Next-Offset"]
    response = client.get(url, params={"offset": tail, "live": "long-poll"})
    assert response.status_code == 204
    assert response.headers["Stream-Next-Offset"] == tail
    assert response.headers["Stream-Up-To-Date"].lower() == "true"
    assert "Stream-Cursor" in response.headers


def test_long_poll_behind_the_tail_returns_at_once(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"backlog")
    response = client.get(url, params={"offset": "-1", "live": "long-poll"})
    assert response.status_code == 200
    assert response.content == b"backlog"


def test_long_poll_at_the_tail_of_a_closed_stream_returns_at_once(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"done")
    client.post(url, headers=CLOSE)
    tail = client.head(url).headers["Stream-Next-Offset"]
    started = time.monotonic()
    response = client.get(url, params={"offset": tail, "live": "long-poll"})
    assert time.monotonic() - started < 0.9  # the configured timeout is longer than this
    assert response.status_code in (200, 204)
    assert response.content == b""
    assert response.headers["Stream-Closed"].lower() == "true"


def _produce_then_close(url: str, tokens: list[bytes], pause: float) -> threading.Thread:
    def run() -> None:
        with httpx.Client() as producer:
            for token in tokens:
                assert append(producer, url, token).status_code in (200, 204)
                time.sleep(pause)  # a sleep: the producer's pace is what the test varies
            producer.post(url, headers=CLOSE)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_tailing_reader_following_offsets_sees_every_token_once(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    tokens = [f"t{i};".encode() for i in range(40)]
    writer = _produce_then_close(url, tokens, 0)
    received, offset = b"", "-1"
    for _ in range(1000):
        response = client.get(url, params={"offset": offset, "live": "long-poll"})
        received += response.content
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Closed", "").lower() == "true":
            break
    writer.join()
    assert received == b"".join(tokens)


def test_a_reader_that_drops_and_reconnects_loses_and_repeats_nothing(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream()
    for i in range(10):
        append(client, url, f"a{i};".encode())
    # The first connection reads part of the history, then "crashes".
    first = client.get(url, params={"offset": "-1"})
    kept_offset = first.headers["Stream-Next-Offset"]
    kept = first.content
    for i in range(10):
        append(client, url, f"b{i};".encode())
    rest, _, _ = catch_up(client, url, kept_offset)
    expected = b"".join(f"a{i};".encode() for i in range(10))
    expected += b"".join(f"b{i};".encode() for i in range(10))
    assert kept + rest == expected


def test_sse_delivers_history_then_live_data_with_resumable_offsets(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"history")
    first = read_sse(client, url, "-1")
    assert "".join(first.data) == "history"
    assert first.controls[-1]["upToDate"] is True
    assert first.last_offset == client.head(url).headers["Stream-Next-Offset"]

    writer = _later(url, b"live", TEXT)
    second = read_sse(client, url, first.last_offset, min_data=1)
    writer.join()
    assert "".join(second.data) == "live"
    assert second.last_offset == client.head(url).headers["Stream-Next-Offset"]


def test_sse_on_a_closed_stream_ends_with_a_closed_control_event(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"final answer")
    client.post(url, headers=CLOSE)
    read = read_sse(client, url, "-1", stop_when_up_to_date=False)
    assert "".join(read.data) == "final answer"
    assert read.controls[-1].get("streamClosed") is True


def test_sse_json_mode_resumes_on_message_boundaries(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream("application/json", body=b'[{"n": 1}, {"n": 2}]')
    first = read_sse(client, url, "-1")
    append(client, url, b'{"n": 3}', "application/json")
    second = read_sse(client, url, first.last_offset, min_data=1)
    assert [m for d in first.data for m in json.loads(d)] == [{"n": 1}, {"n": 2}]
    assert [m for d in second.data for m in json.loads(d)] == [{"n": 3}]


@pytest.mark.parametrize("seed", range(3))
def test_long_poll_readers_dropping_at_random_points_end_with_exactly_what_was_written(
    base_url: str, new_stream: Callable[..., str], seed: int
) -> None:
    rng = random.Random(seed)
    url = new_stream()
    tokens = [f"<{seed}:{i}>".encode() for i in range(50)]
    # One reader abandoned while parked on the empty stream, before anything is written: the
    # drops below depend on timing, this one does not, so the resume is always exercised.
    tail = httpx.head(url).headers["Stream-Next-Offset"]
    with pytest.raises(httpx.TimeoutException), httpx.Client(timeout=0.05) as abandoned:
        abandoned.get(url, params={"offset": tail, "live": "long-poll"})
    writer = _produce_then_close(url, tokens, 0.03)
    received, offset, drops = b"", "-1", 1
    for _ in range(5000):
        # Each request either completes or is abandoned mid-flight by a short client timeout.
        timeout = rng.choice([0.005, 0.015, 30.0])
        try:
            with httpx.Client(timeout=timeout) as reader:
                response = reader.get(url, params={"offset": offset, "live": "long-poll"})
        except httpx.TimeoutException:
            drops += 1
            continue
        assert response.status_code in (200, 204)
        received += response.content
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Closed", "").lower() == "true":
            break
    writer.join()
    assert received == b"".join(tokens)
    assert drops > 0


@pytest.mark.parametrize("seed", range(3))
def test_sse_readers_dropping_at_random_points_end_with_exactly_what_was_written(
    client: httpx.Client, new_stream: Callable[..., str], seed: int
) -> None:
    """Data counts once its control event arrives; a reader resumes from the last control offset,
    so data seen without its control event before a drop is read again, never lost or doubled."""
    rng = random.Random(seed)
    url = new_stream()
    tokens = [f"[{seed}:{i}]".encode() for i in range(50)]
    writer = _produce_then_close(url, tokens, 0.01)
    received, offset, closed, connections = "", "-1", False, 0
    while not closed:
        connections += 1
        assert connections < 500
        budget = rng.randint(1, 4)  # events to read before dropping the connection
        pending: list[str] = []
        with client.stream("GET", url, params={"offset": offset, "live": "sse"}) as response:
            assert response.status_code == 200
            for event, payload in sse_events(response):
                if event == "control":
                    control = json.loads(payload)
                    received += "".join(pending)
                    pending = []
                    offset = control["streamNextOffset"]
                    closed = bool(control.get("streamClosed"))
                else:
                    pending.append(payload)
                budget -= 1
                if closed or budget <= 0:
                    break
    writer.join()
    assert received == b"".join(tokens).decode()
    assert connections > 1


def test_parked_readers_observe_a_close_without_data(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"answer")
    _, response = _long_poll_at_tail(client, url, b"", CLOSE)
    assert response.status_code in (200, 204)
    assert response.content == b""
    assert response.headers["Stream-Closed"].lower() == "true"

    url = new_stream(body=b"answer")
    tail = client.head(url).headers["Stream-Next-Offset"]
    closer = _later(url, b"", CLOSE)
    read = read_sse(client, url, tail, stop_when_up_to_date=False)
    closer.join()
    assert read.data == []
    assert read.controls[-1].get("streamClosed") is True
    assert read.last_offset == tail
