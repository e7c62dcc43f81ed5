"""Compressed answers (``Accept-Encoding``) and compressed request bodies (``Content-Encoding``).

Answers: a chunk of a textual stream (catch-up, or a long-poll answer) of at least
``--compress-min-bytes`` goes out as zstd or gzip when the client takes one. zstd (level 3,
``backports.zstd``, the standard library's ``compression.zstd`` from Python 3.14) first on a
tie: it compresses a chat's JSON tokens about as well as gzip at twice its speed. gzip at
level 1: level 6 saves another 12% of a chat's bytes for four times the CPU. Brotli was left
out: at the qualities that cost no more CPU than gzip it compressed no better (the ledger in
the commit that added this). Binary streams (``application/octet-stream`` and every type not
named in ``TEXTUAL``) go as they are: Relay cannot know their bytes, which are most often
compressed already (media, archives) or compact; a producer that wants them smaller compresses
its messages itself. SSE is never compressed (``reads._sse`` says why).

Request bodies: aiohttp's parser decodes gzip, deflate and zstd (and br with Brotli installed)
as the body arrives, in bounded pieces, so ``read_body``'s byte limit applies to what the body
decompresses to: a small bomb is a 413 after at most the limit in memory. Any other coding
would reach the store still encoded, so it is refused (415) before the body is read.
"""

from __future__ import annotations

import sys
import zlib

from aiohttp import compression_utils

from protocol import headers as h
from protocol.errors import UnsupportedEncoding

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

GZIP = "gzip"
ZSTD = "zstd"
ANSWER_ENCODINGS = (ZSTD, GZIP)
"""What Relay compresses answers with, in its order of preference."""
GZIP_LEVEL = 1
ZSTD_LEVEL = 3

TEXTUAL = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/json-seq",
        "application/xml",
        "application/javascript",
        "application/yaml",
        "application/x-yaml",
        "application/csv",
    }
)
"""Media types compressed besides ``text/*``, ``*/*+json`` and ``*/*+xml``."""


def compressible(content_type: str) -> bool:
    """Whether a stream's answers are worth compressing: text, JSON, NDJSON, XML and kin."""
    essence = h.media_type(content_type)
    return essence.startswith("text/") or essence in TEXTUAL or essence.endswith(("+json", "+xml"))


def negotiate(accept_encoding: str | None) -> str | None:
    """The coding to answer in (RFC 9110 12.5.3): the highest ``q`` among ours, ties to our
    order; None for identity. ``*`` stands for any coding the client did not name."""
    if not accept_encoding:
        return None
    named: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        coding = name.strip().lower()
        if coding:
            named[coding] = _q(params)
    best, best_q = None, 0.0
    for coding in ANSWER_ENCODINGS:
        q = named.get(coding, named.get("*", 0.0))
        if q > best_q:
            best, best_q = coding, q
    return best


def _q(params: str) -> float:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


_ZSTD = zstd.ZstdCompressor(level=ZSTD_LEVEL)
"""One context for every answer, each a whole frame: a new one per answer (``zstd.compress``)
spent 25 us allocating it, 44% of compressing a 32 KB chat. Safe on the one event loop thread:
a frame is made in one call."""


def encode(body: bytes, coding: str) -> bytes:
    """``body`` compressed with ``coding`` (one of ``ANSWER_ENCODINGS``)."""
    if coding == ZSTD:
        return _ZSTD.compress(body, mode=zstd.ZstdCompressor.FLUSH_FRAME)
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()


BODY_ENCODINGS = (
    ("identity", "gzip", "deflate")
    + (("zstd",) if getattr(compression_utils, "HAS_ZSTD", False) else ())
    + (("br",) if getattr(compression_utils, "HAS_BROTLI", False) else ())
)
"""Content codings aiohttp decodes as a request body arrives (identity: none; zstd from
aiohttp 3.12, with ``backports.zstd`` before Python 3.14)."""


def check_body_encoding(content_encoding: str | None) -> None:
    """415 for a request body in a coding Relay would store still encoded: anything but one
    of ``BODY_ENCODINGS`` (a list of several, ``gzip, gzip``, is not decoded either)."""
    if content_encoding is None:
        return
    coding = content_encoding.strip().lower()
    if coding and coding not in BODY_ENCODINGS:
        raise UnsupportedEncoding(BODY_ENCODINGS)
