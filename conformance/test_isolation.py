"""Isolation: a stream's readers get that stream's bytes and nothing else, across deletes,
re-creation at the same path and neighbouring streams; and a JSON read, at any offset the
server returned, is always whole messages (a JSON array), never half of one.

Writers run on other connections while this test's reader is parked; as elsewhere in the suite,
a writer waits 0.3 s first so that the reader is parked before the write lands.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from conformance.helpers import append, sse_events

TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}
PARK = 0.3


class _Writer(threading.Thread):
    """Runs ``action`` on its own connection once this test's reader is parked; keeps what it
    raised for ``_join`` to raise in the test's thread."""

    def __init__(self, action: Callable[[httpx.Client], None]) -> None:
        super().__init__()
        self.action = action
        self.failure: BaseException | None = None

    def run(self) -> None:
        # A sleep: a server's parked readers are invisible through the protocol. A write that
        # lands before the park still passes, as a catch-up; only the park shows isolation.
        time.sleep(PARK)
        try:
            with httpx.Client(timeout=30) as other:
                self.action(other)
        except BaseException as exc:
            self.failure = exc


def _after(action: Callable[[httpx.Client], None]) -> _Writer:
    writer = _Writer(action)
    writer.start()
    return writer


def _join(writer: _Writer) -> None:
    writer.join()
    if writer.failure is not None:
        raise writer.failure


def _fresh_url(base_url: str) -> str:
    return f"{base_url}/v1/stream/conformance-isolation-{uuid.uuid4().hex}"


def _parked_long_poll(client: httpx.Client, url: str, offset: str) -> httpx.Response:
    return client.get(url, params={"offset": offset, "live": "long-poll"})


def _assert_no_foreign_bytes(response: httpx.Response, *foreign: bytes) -> None:
    """A parked read of a stream that got nothing new returns nothing, whatever its status."""
    assert response.status_code in (200, 204, 404, 410), response.status_code
    for data in foreign:
        assert data[:16] not in response.content
    if response.status_code == 200:
        assert response.content == b""


def test_a_parked_long_poll_never_sees_a_stream_recreated_at_its_path(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"old stream")
    tail = client.head(url).headers["Stream-Next-Offset"]
    first, second = b"NEW-" * 64, b"MORE-" * 64

    def recreate(other: httpx.Client) -> None:
        assert other.delete(url).status_code == 204
        assert other.put(url, content=first, headers=TEXT).status_code == 201
        assert append(other, url, second).status_code in (200, 204)

    writer = _after(recreate)
    response = _parked_long_poll(client, url, tail)
    _join(writer)
    _assert_no_foreign_bytes(response, first, second)
    assert client.get(url, params={"offset": "-1"}).content == first + second


def test_a_parked_long_poll_on_a_deleted_stream_never_sees_a_newly_created_one(
    base_url: str, client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream(body=b"doomed")
    tail = client.head(url).headers["Stream-Next-Offset"]
    other_url = _fresh_url(base_url)
    first, second = b"OTHER-" * 64, b"LATER-" * 64

    def delete_then_create_another(other: httpx.Client) -> None:
        assert other.delete(url).status_code == 204
        assert other.put(other_url, content=first, headers=TEXT).status_code == 201
        assert append(other, other_url, second).status_code in (200, 204)

    writer = _after(delete_then_create_another)
    response = _parked_long_poll(client, url, tail)
    _join(writer)
    _assert_no_foreign_bytes(response, first, second)
    assert client.get(url, params={"offset": "-1"}).status_code in (404, 410)


def _follow_long_poll(client: httpx.Client, url: str, offset: str, want: int) -> bytes:
    """Long-poll from ``offset`` until ``want`` bytes have arrived."""
    received = b""
    for _ in range(100):
        response = _parked_long_poll(client, url, offset)
        assert response.status_code in (200, 204), response.status_code
        received += response.content
        offset = response.headers["Stream-Next-Offset"]
        if len(received) >= want:
            break
    return received


def test_a_parked_reader_gets_only_its_own_streams_bytes_while_neighbours_churn(
    base_url: str, client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    mine = new_stream(body=b"mine:")
    tail = client.head(mine).headers["Stream-Next-Offset"]
    doomed = new_stream(body=b"doomed:")
    others = [_fresh_url(base_url) for _ in range(3)]

    def churn(other: httpx.Client) -> None:
        assert other.delete(doomed).status_code == 204
        for url in others:
            assert other.put(url, content=b"neighbour:", headers=TEXT).status_code == 201
            assert append(other, url, b"NEIGHBOUR-BYTES").status_code in (200, 204)
        assert append(other, mine, b"my-bytes").status_code in (200, 204)

    writer = _after(churn)
    received = _follow_long_poll(client, mine, tail, len(b"my-bytes"))
    _join(writer)
    assert received == b"my-bytes"


def test_parked_readers_on_many_streams_each_get_exactly_their_own_bytes(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    urls = [new_stream() for _ in range(6)]
    results: dict[str, bytes] = {}

    def read(url: str) -> None:
        with httpx.Client(timeout=client.timeout) as reader:
            results[url] = _follow_long_poll(reader, url, "-1", len(f"<{url}>") * 3)

    readers = [threading.Thread(target=read, args=(url,)) for url in urls]
    for thread in readers:
        thread.start()

    def write_round_robin(other: httpx.Client) -> None:
        for _ in range(3):
            for url in urls:
                assert append(other, url, f"<{url}>".encode()).status_code in (200, 204)

    _join(_after(write_round_robin))
    for thread in readers:
        thread.join()
    assert results == {url: f"<{url}>".encode() * 3 for url in urls}


def _messages(count: int) -> list[dict[str, Any]]:
    """Messages of very different sizes, a few larger than a typical read chunk (1 MiB)."""
    sizes = [0, 10, 1000, 70_000, 300_000]
    out: list[dict[str, Any]] = [{"i": i, "pad": "x" * sizes[i % len(sizes)]} for i in range(count)]
    out[count // 2]["pad"] = "y" * 1_300_000
    return out


def _post_json(client: httpx.Client, url: str, messages: list[dict[str, Any]]) -> None:
    """One POST per message, with every fourth pair sent together as one array."""
    i = 0
    while i < len(messages):
        if i % 4 == 0 and i + 1 < len(messages):
            body, i = json.dumps(messages[i : i + 2]).encode(), i + 2
        else:
            body, i = json.dumps(messages[i]).encode(), i + 1
        assert append(client, url, body, "application/json").status_code in (200, 204)


def _array(response: httpx.Response) -> list[Any]:
    if response.status_code == 204:
        return []
    assert response.status_code == 200, response.status_code
    parsed = json.loads(response.content)
    assert isinstance(parsed, list)
    return parsed


def test_json_reads_at_every_returned_offset_are_whole_messages(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream("application/json")
    messages = _messages(24)
    _post_json(client, url, messages)
    seen: list[Any] = []
    offsets: list[tuple[str, int]] = []  # (offset, messages before it)
    offset = "-1"
    for _ in range(1000):
        offsets.append((offset, len(seen)))
        response = client.get(url, params={"offset": offset})
        seen += _array(response)
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date", "").lower() == "true":
            break
    assert seen == messages
    for offset, before in offsets:
        response = client.get(url, params={"offset": offset})
        batch = _array(response)
        assert batch == messages[before : before + len(batch)]
        assert batch or before == len(messages)


def test_json_long_poll_readers_parked_while_many_messages_land_get_whole_arrays(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream("application/json", body=b'{"i": -1}')
    tail = client.head(url).headers["Stream-Next-Offset"]
    messages = _messages(60)
    writer = _after(lambda other: _post_json(other, url, messages))
    seen: list[Any] = []
    offset = tail
    for _ in range(1000):
        response = _parked_long_poll(client, url, offset)
        seen += _array(response)
        offset = response.headers["Stream-Next-Offset"]
        if len(seen) >= len(messages):
            break
    _join(writer)
    assert seen == messages


def test_json_sse_readers_parked_while_many_messages_land_get_whole_arrays(
    client: httpx.Client, new_stream: Callable[..., str]
) -> None:
    url = new_stream("application/json", body=b'{"i": -1}')
    tail = client.head(url).headers["Stream-Next-Offset"]
    messages = _messages(60)
    writer = _after(lambda other: _post_json(other, url, messages))
    seen: list[Any] = []
    offset = tail
    for _ in range(100):  # reconnect after each server-closed SSE connection
        with client.stream("GET", url, params={"offset": offset, "live": "sse"}) as response:
            assert response.status_code == 200
            for event, payload in sse_events(response):
                if event == "control":
                    offset = json.loads(payload)["streamNextOffset"]
                    if len(seen) >= len(messages):
                        break
                    continue
                parsed = json.loads(payload)
                assert isinstance(parsed, list)
                seen += parsed
        if len(seen) >= len(messages):
            break
    _join(writer)
    assert seen == messages
