"""The chat metadata as a Durable Streams State Protocol stream, one per chat, and the reply
streams' plumbing.

Browsers materialise ``chat/<chat-id>/state`` with ``@durable-streams/state``
(``createStreamDB``), so the page's live queries follow the database without polling the
backend. On Postgres, Relay's table streams write it from the committed rows
(``metadata.TABLE_STREAMS``). On SQLite, which Relay cannot follow, ``StatePublisher`` appends
each change message ``{"type", "key", "value", "headers": {"operation"}}`` after the database
write, a second step that a crash between the two leaves undone.
"""

from __future__ import annotations

import datetime
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from relay_producer import StreamProducer

from examples.chat.backend.metadata import Chat, Message


def state_path(chat_id: str) -> str:
    return f"chat/{chat_id}/state"


def reply_path(chat_id: str, message_id: str) -> str:
    return f"chat/{chat_id}/reply/{message_id}"


def stream_url(relay_url: str, path: str) -> str:
    return f"{relay_url.rstrip('/')}/v1/stream/{path}"


def change(entity: Chat | Message, operation: str) -> dict[str, Any]:
    """One State Protocol change message for ``entity`` (type ``chat`` or ``message``)."""
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    return {
        "type": "chat" if isinstance(entity, Chat) else "message",
        "key": entity.id,
        "value": entity.value(),
        "headers": {"operation": operation, "timestamp": now},
    }


async def create_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    """Create a JSON stream if it does not exist (a PUT), retrying while the relay restarts."""
    async with StreamProducer(
        url,
        producer_id="chat-backend-create",
        headers=headers,
        session=session,
        max_backoff=0.5,
        max_retries=40,
    ):
        pass  # entering is the PUT; nothing is appended


async def read_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[list[Any], bool]:
    """A JSON stream's messages so far, and whether it is closed (none, open: no stream)."""
    out: list[Any] = []
    offset = "-1"
    while True:
        async with session.get(url, params={"offset": offset}, headers=headers) as resp:
            if resp.status == 404:
                return out, False
            resp.raise_for_status()
            out += await resp.json(content_type=None) or []
            offset = resp.headers["Stream-Next-Offset"]
            if resp.headers.get("Stream-Up-To-Date") == "true":
                return out, resp.headers.get("Stream-Closed") == "true"


class StatePublisher:
    """Appends change messages to each chat's state stream, in the order they are published.

    One idempotent producer per chat: its retries (a relay restart, a 503) are applied once.
    A message can still be repeated if the backend dies after the relay stored it and is
    restarted to publish again; the State Protocol tolerates that, since replaying an insert
    or update with the same value leaves the same state.
    """

    def __init__(
        self, session: aiohttp.ClientSession, relay_url: str, headers: dict[str, str]
    ) -> None:
        self.session = session
        self.relay_url = relay_url.rstrip("/")
        self.headers = headers
        self._producers: dict[str, StreamProducer] = {}
        self._open = AsyncExitStack()  # flushes every producer on close

    def url(self, path: str) -> str:
        return stream_url(self.relay_url, path)

    async def publish(self, chat_id: str, *changes: dict[str, Any]) -> None:
        producer = self._producers.get(chat_id)
        if producer is None:
            producer = StreamProducer(
                self.url(state_path(chat_id)),
                producer_id="chat-backend-state",
                headers=self.headers,
                session=self.session,
                max_backoff=0.5,
                max_retries=40,
            )
            # Entering creates the stream (a PUT, idempotent when it exists).
            self._producers[chat_id] = await self._open.enter_async_context(producer)
        await producer.append(list(changes), many=True)

    async def close(self) -> None:
        self._producers.clear()
        await self._open.aclose()
