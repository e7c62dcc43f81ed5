"""Client-side helpers the conformance tests share: catch-up loops and a minimal SSE reader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx


def append(
    client: httpx.Client, url: str, body: bytes, content_type: str = "text/plain", **headers: str
) -> httpx.Response:
    sent = {"Content-Type": content_type, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return client.post(url, content=body, headers=sent)


def catch_up(client: httpx.Client, url: str, offset: str = "-1") -> tuple[bytes, str, int]:
    """Follow ``Stream-Next-Offset`` until up to date; return (bytes, final offset, requests)."""
    data = b""
    requests = 0
    while True:
        response = client.get(url, params={"offset": offset})
        requests += 1
        assert response.status_code == 200, response.text
        data += response.content
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date", "").lower() == "true":
            return data, offset, requests
        assert requests < 10_000, "catch-up never reached the tail"


@dataclass
class SseRead:
    """What one SSE connection delivered before the reader stopped."""

    data: list[str] = field(default_factory=list)
    controls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_offset(self) -> str:
        return str(self.controls[-1]["streamNextOffset"])


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from an open SSE response, parsed as an EventSource would."""
    event, lines = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
        elif line == "" and lines:
            yield event, "\n".join(lines)
            event, lines = "message", []


def read_sse(
    client: httpx.Client,
    url: str,
    offset: str,
    *,
    stop_when_up_to_date: bool = True,
    min_data: int = 0,
) -> SseRead:
    """Read events until a control event says closed, or up to date after ``min_data`` data."""
    read = SseRead()
    with client.stream("GET", url, params={"offset": offset, "live": "sse"}) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for event, payload in sse_events(response):
            if event != "control":
                read.data.append(payload)
                continue
            control = json.loads(payload)
            read.controls.append(control)
            if control.get("streamClosed"):
                break
            if stop_when_up_to_date and control.get("upToDate") and len(read.data) >= min_data:
                break
    return read
