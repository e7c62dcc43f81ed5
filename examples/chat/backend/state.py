"""The chat metadata as a Durable Streams State Protocol stream, one per chat.

Browsers materialise it with ``@durable-streams/state`` (``createStreamDB``): each database
write the backend makes is followed by a change message ``{"type", "key", "value",
"headers": {"operation"}}`` on ``chat/<chat-id>/state``, so the page's live queries follow the
database without polling the backend.
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


def change(entity: Chat | Message, operation: str) -> dict[str, Any]:
    """One State Protocol change message for ``entity`` (type ``chat`` or ``message``)."""
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    return {
        "type": "chat" if isinstance(entity, Chat) else "message",
        "key": entity.id,
        "value": entity.value(),
        "headers": {"operation": operation, "timestamp": now},
    }


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
        return f"{self.relay_url}/v1/stream/{path}"

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
