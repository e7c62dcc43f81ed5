"""Correcting a stream a producer wrote (Relay's docs/CORRECTIONS.md).

Bytes at an offset never change (readers and caches keep them), so each correction is new data
or a new stream, never a rewrite:

- :func:`revise`: while readers are live, append a revision envelope to a JSON token stream
  through the reply's own producer (exactly once, like any token).
- :func:`supersede`: regenerate from a point a late reader must not see past: fork a successor
  at the last good offset and close the old stream naming it (``Stream-Successor``), so readers
  of the old URL get ``Link: <successor>; rel="successor-version"``; the continuation is then
  appended to the successor.
- :func:`retain`: move a stream's retention horizon forward (``Stream-Retain-From``): reads
  before it get 410 and ``offset=-1`` starts there (for a State Protocol stream, after a
  snapshot: compaction).

``supersede`` and ``retain`` are Relay extensions of the protocol; other servers ignore the
headers (a fork still forks). Offsets are the opaque strings the server acknowledged.
"""

from __future__ import annotations

import aiohttp

from relay_producer.errors import ProducerError, error_for
from relay_producer.producer import StreamProducer
from relay_producer.revisions import revision


async def revise(producer: StreamProducer, from_index: int, delta: str) -> str:
    """Replace the tokens from ``from_index`` on with ``delta``; returns the acknowledged
    offset. Readers folding the stream with ``ReplyText`` end with the corrected text."""
    return await producer.append(revision(from_index, delta))


async def supersede(
    session: aiohttp.ClientSession,
    url: str,
    successor_url: str,
    from_offset: str,
    *,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> str:
    """Fork ``url`` at ``from_offset`` (the offset acknowledged for the last good append) into
    ``successor_url``, then close ``url`` naming it; returns ``successor_url``.

    The fork comes first, so the successor exists when readers are pointed at it; they tail it
    live while the corrected continuation is appended. A producer still writing to ``url``
    gets 409 (closed) from then on. Closing an already closed stream this way only records
    the successor (once; naming another later is a 409). If the close is refused, a successor
    this call created is deleted again, so a failed supersede leaves no orphan fork.
    """
    base = dict(headers or {})
    fork = {
        **base,
        "Content-Type": content_type,
        "Stream-Forked-From": url,
        "Stream-Fork-Offset": from_offset,
    }
    created, _ = await _request(session, "PUT", successor_url, fork, {200, 201})
    close = {**base, "Stream-Closed": "true", "Stream-Successor": successor_url}
    try:
        await _request(session, "POST", url, close, {200, 204})
    except ProducerError:
        if created == 201:  # ours, and no reader was pointed at it
            async with session.delete(successor_url, headers=base):
                pass
        raise
    return successor_url


async def retain(
    session: aiohttp.ClientSession,
    url: str,
    from_offset: str,
    *,
    headers: dict[str, str] | None = None,
) -> str:
    """Keep ``url`` from ``from_offset`` on (the admin action); returns the horizon the server
    now reports. The horizon never moves back: an earlier offset is a 409."""
    sent = {**(headers or {}), "Stream-Retain-From": from_offset}
    _, answer = await _request(session, "PUT", url, sent, {200})
    return answer.get("Stream-Retained-From", from_offset)


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    ok: set[int],
) -> tuple[int, dict[str, str]]:
    async with session.request(method, url, headers=headers) as resp:
        text = await resp.text()
        if resp.status in ok:
            return resp.status, dict(resp.headers)
        raise error_for(resp.status, resp.headers, text)
