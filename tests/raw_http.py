"""Raw HTTP/1.1 over a socket, for requests a client library would normalize or refuse to send
(``..`` segments, bad percent-encoding, unknown methods, truncated bodies)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str:
        return str(orjson.loads(self.body)["error"]["code"])


async def raw_request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    declared_length: int | None = None,
    host: str | tuple[str, ...] | None = "test",
    version: str = "HTTP/1.1",
) -> RawResponse:
    """One request on a fresh connection. ``host`` is the Host line's value, several values
    for several lines, or None to send none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hosts = () if host is None else (host,) if isinstance(host, str) else host
    lines = [f"{method} {target} {version}", *(f"Host: {v}" for v in hosts), "Connection: close"]
    sent = dict(headers or {})
    if body or declared_length is not None:
        sent["Content-Length"] = str(len(body) if declared_length is None else declared_length)
    lines += [f"{name}: {value}" for name, value in sent.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        rest = _dechunk(rest)
    return RawResponse(int(status_line.split()[1]), parsed, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
