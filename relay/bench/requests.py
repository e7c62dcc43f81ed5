"""The few requests every scenario makes, with the checks that make their numbers mean
something (a refused request stops the run instead of being timed)."""

from __future__ import annotations

import uuid

import aiohttp

from protocol import headers as h
from relay.bench.targets import Target


class BenchError(RuntimeError):
    """A server refused something the bench needs (so the numbers would be meaningless)."""


def _stream_url(target: Target, kind: str) -> str:
    return f"{target.url}/v1/stream/bench-{kind}-{uuid.uuid4().hex[:12]}"


async def _create(client: aiohttp.ClientSession, url: str, content_type: str) -> str:
    """Create a stream; return its tail offset, where a live reader starts.

    The bare server sends no offset; it is never read from, so ``-1`` stands in.
    """
    async with client.put(url, headers={"Content-Type": content_type}) as response:
        if response.status not in (200, 201, 204):
            raise BenchError(f"PUT {url}: {response.status}")
        return response.headers.get(h.STREAM_NEXT_OFFSET, "-1")


async def _post(
    client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> None:
    async with client.post(url, data=body, headers=headers) as response:
        if response.status not in (200, 204):
            raise BenchError(f"POST {url}: {response.status} {await response.text()}")


async def _read_all(client: aiohttp.ClientSession, url: str) -> bytes:
    """Catch-up reads from the start until up to date."""
    parts: list[bytes] = []
    offset = "-1"
    while True:
        async with client.get(url, params={"offset": offset}) as response:
            if response.status != 200:
                raise BenchError(f"GET {url}: {response.status}")
            parts.append(await response.read())
            offset = response.headers[h.STREAM_NEXT_OFFSET]
            if response.headers.get(h.STREAM_UP_TO_DATE) == "true":
                return b"".join(parts)
