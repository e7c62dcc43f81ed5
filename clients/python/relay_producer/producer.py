"""StreamProducer: batches tokens within a linger window into one idempotent POST.

One POST is in flight at a time: the server accepts Producer-Seq strictly in order, so a
pipelined batch behind a failed one would only earn a 409 gap; serial sends keep retries simple
(the same seq is resent, the server answers a duplicate with 204 and changes nothing).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from types import TracebackType
from typing import Any

import aiohttp

from relay_producer.errors import ProducerError, ProducerFenced, error_for

_TRANSIENT = {429, 500, 502, 503, 504}


class StreamProducer:
    """Exactly-once appends to one stream for one ``producer_id``."""

    def __init__(
        self,
        url: str,
        *,
        producer_id: str,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        linger: float = 0.005,
        epoch: int | None = None,
        create: bool = True,
        max_retries: int = 8,
        max_backoff: float = 5.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url
        self.producer_id = producer_id
        self.headers = dict(headers or {})
        self.content_type = content_type
        self.json_mode = content_type.split(";")[0].strip().lower() == "application/json"
        self.linger = linger
        self._auto_epoch = epoch is None
        # A millisecond clock is a fresh, larger epoch after each restart of this process.
        self.epoch = int(time.time() * 1000) if epoch is None else epoch
        self.seq = 0
        self.create = create
        self.max_retries = max_retries
        self.max_backoff = max_backoff
        self.offset: str | None = None
        self._session = session
        self._own_session = session is None
        self._pending: list[tuple[Any, asyncio.Future[str]]] = []
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> StreamProducer:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        if self.create:
            try:
                await self._request("PUT", b"", {})
            except BaseException:
                if self._own_session:
                    await self._session.close()
                raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if et is None and not self._closed:
                await self.flush()
        finally:
            if self._own_session and self._session is not None:
                await self._session.close()

    async def append(self, item: Any, *, many: bool = False) -> str:
        """Queue one message (or, with ``many``, each of a list) and wait for its offset."""
        if self._closed:
            raise RuntimeError("producer is closed")
        items = list(item) if many else [item]
        loop = asyncio.get_running_loop()
        futures = []
        for one in items:
            fut: asyncio.Future[str] = loop.create_future()
            self._pending.append((self._check(one), fut))
            futures.append(fut)
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._linger_then_send())
        return (await asyncio.gather(*futures))[-1]

    async def flush(self) -> str | None:
        """Send whatever is queued now; returns the acknowledged offset."""
        await self._send_pending()
        return self.offset

    async def close(self) -> str | None:
        """Flush, then close the stream, as the next seq so a retried close is a duplicate."""
        await self.flush()
        async with self._lock:
            if not self._closed:
                await self._post(b"", {"Stream-Closed": "true"})
                self._closed = True
        return self.offset

    def _check(self, item: Any) -> Any:
        if self.json_mode:
            return item
        if isinstance(item, str):
            return item.encode()
        if isinstance(item, bytes | bytearray):
            return bytes(item)
        raise TypeError("a text stream takes str or bytes")

    async def _linger_then_send(self) -> None:
        await asyncio.sleep(self.linger)
        await self._send_pending()

    async def _send_pending(self) -> None:
        async with self._lock:
            while self._pending:
                batch, self._pending = self._pending, []
                if self.json_mode:
                    body = json.dumps([m for m, _ in batch], separators=(",", ":")).encode()
                else:
                    body = b"".join(m for m, _ in batch)
                try:
                    offset = await self._post(body, {})
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(offset)

    async def _post(self, body: bytes, extra: dict[str, str]) -> str:
        while True:
            headers = {
                "Producer-Id": self.producer_id,
                "Producer-Epoch": str(self.epoch),
                "Producer-Seq": str(self.seq),
                **extra,
            }
            try:
                offset = await self._request("POST", body, headers)
            except ProducerFenced as fenced:
                # Auto-claim (epoch=None): a newer epoch than the one that fenced us, seq 0.
                if not self._auto_epoch or fenced.current_epoch is None:
                    raise
                self.epoch, self.seq = fenced.current_epoch + 1, 0
                continue
            self.seq += 1
            return offset

    async def _request(self, method: str, body: bytes, extra: dict[str, str]) -> str:
        """One request with bounded, jittered exponential backoff on transient failures."""
        assert self._session is not None
        headers = {**self.headers, "Content-Type": self.content_type, **extra}
        delay = 0.05
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                async with self._session.request(
                    method, self.url, data=body, headers=headers
                ) as resp:
                    text = await resp.text()
                    if resp.status < 300:
                        offset = resp.headers.get("Stream-Next-Offset")
                        if offset is not None:
                            self.offset = offset
                        return self.offset or ""
                    if resp.status not in _TRANSIENT:
                        raise error_for(resp.status, resp.headers, text)
                    retry_after = resp.headers.get("Retry-After", "")
                    if retry_after.isdigit():
                        wait = min(float(retry_after), self.max_backoff)
                    if attempt == self.max_retries:
                        raise ProducerError(resp.status, text)
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == self.max_retries:
                    raise
            await asyncio.sleep(wait if wait is not None else delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")
