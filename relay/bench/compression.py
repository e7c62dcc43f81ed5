"""The compression scenario: what a catch-up read costs on the wire and in the server's CPU,
plain, gzip and zstd, for a chat (hundreds of JSON token messages) and a long one
(``--catchup-mib`` of them).

Each stream is read from ``-1`` to its tail once per coding; the bodies are counted as they
arrive (headers included), then decoded and checked against the plain read.
"""

from __future__ import annotations

import gzip
import sys
from typing import TYPE_CHECKING

import aiohttp
import orjson

from protocol import headers as h
from relay.bench.report import Result, snapshot, usage
from relay.bench.requests import BenchError, _create, _post, _stream_url
from relay.bench.targets import Target

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

if TYPE_CHECKING:
    from relay.bench.scenarios import Options

MIB = 1024 * 1024
CHAT_MESSAGES = 600
CHAT_READS = 1000
"""The chat is read this many times per coding: one read is below the CPU clock's tick."""
JSON = {"Content-Type": "application/json"}
CODINGS = ("identity", "gzip", "zstd")
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
]


def _tokens(first: int, count: int) -> bytes:
    """``count`` token messages as a model's stream writes them, as one JSON array."""
    return orjson.dumps(
        [
            {
                "type": "token",
                "id": f"msg-{n // 40}",
                "seq": n,
                "text": " " + WORDS[n * 7 % len(WORDS)],
            }
            for n in range(first, first + count)
        ]
    )


async def _stream(client: aiohttp.ClientSession, target: Target, size: int) -> str:
    """A new JSON stream of token messages, about ``size`` bytes, written in 1 MiB appends."""
    url = _stream_url(target, "compression")
    await _create(client, url, "application/json")
    written, seq = 0, 0
    while written < size:
        count = min(MIB // 60, max(1, (size - written) // 60))
        body = _tokens(seq, count)
        await _post(client, url, body, JSON)
        written += len(body)
        seq += count
    return url


async def _read(
    client: aiohttp.ClientSession, url: str, coding: str
) -> tuple[int, int, list[bytes]]:
    """GETs from ``-1`` to the tail in ``coding``: (GETs, bytes received, decoded bodies).
    The generator decodes too, so the server's CPU share is what to compare."""
    offset, gets, wire, bodies = "-1", 0, 0, []
    while True:
        async with client.get(
            url,
            params={"offset": offset},
            headers={"Accept-Encoding": coding},
            auto_decompress=False,
        ) as response:
            if response.status != 200:
                raise BenchError(f"GET {url}: {response.status}")
            raw = await response.read()
            got = response.headers.get("Content-Encoding", "identity")
            if got != coding and len(raw) >= 1024:
                raise BenchError(f"asked for {coding}, got {got}")
            wire += len(raw) + sum(len(k) + len(v) + 4 for k, v in response.raw_headers)
            bodies.append(_decode(raw, got))
            offset = response.headers[h.STREAM_NEXT_OFFSET]
            gets += 1
            if response.headers.get(h.STREAM_UP_TO_DATE) == "true":
                return gets, wire, bodies


def _decode(raw: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.decompress(raw)
    if coding == "zstd":
        return zstd.decompress(raw)
    return raw


async def compression(client: aiohttp.ClientSession, target: Target, opts: Options) -> list[Result]:
    """One row per stream and coding; ``lost`` counts reads that did not decode to the plain
    read's messages."""
    results: list[Result] = []
    chat = await _stream(client, target, 1)
    await _post(client, chat, _tokens(1, CHAT_MESSAGES - 1), JSON)
    long = await _stream(client, target, opts.catchup_mib * MIB)
    runs = ((chat, f"{CHAT_MESSAGES} msgs", CHAT_READS), (long, f"{opts.catchup_mib} MiB", 1))
    for url, label, reads in runs:
        plain: bytes | None = None
        plain_wire = 0
        for coding in CODINGS:
            before = await snapshot(client, target)
            for _ in range(reads):
                gets, wire, bodies = await _read(client, url, coding)
            spent = usage(before, await snapshot(client, target))
            gets *= reads
            messages = [m for body in bodies for m in orjson.loads(body)]
            data = orjson.dumps(messages)
            if plain is None:
                plain, plain_wire = data, wire
            note = f"{wire:,} B on the wire"
            if coding != "identity":
                note += f" ({plain_wire / wire:.1f}x less)"
            results.append(
                Result(
                    "compression",
                    target,
                    f"{label}, {coding}",
                    gets,
                    "GET",
                    spent,
                    lost=0 if data == plain else 1,
                    mib=len(data) * reads / MIB,
                    note=note,
                )
            )
    return results
