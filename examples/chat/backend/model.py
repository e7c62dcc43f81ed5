"""Model adapters: where reply tokens come from.

The deterministic model needs no network and no key, so the example runs anywhere and a test
can know the exact reply in advance; the OpenAI-compatible adapter streams from any server
speaking ``POST /chat/completions`` with ``stream: true``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

WORDS = (
    "durable", "streams", "keep", "every", "token", "a", "reader", "that", "drops", "can",
    "resume", "from", "its", "offset", "and", "see", "each", "one", "exactly", "once", "while",
    "the", "reply", "is", "still", "being", "written", "relay", "commits", "before", "it",
    "acknowledges", "any", "client", "may", "catch", "up", "then", "follow", "live",
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of the conversation as a model sees it."""

    role: str  # "user" or "assistant"
    text: str


class Model(Protocol):
    def reply(self, history: Sequence[Turn]) -> AsyncIterator[str]:
        """The tokens of the next assistant message, as they are generated."""
        ...


class DeterministicModel:
    """A stand-in LLM: the same prompt always yields the same tokens, at a steady rate."""

    def __init__(
        self, tokens_per_second: float = 30.0, reply_tokens: int = 120, first_token_delay: float = 0
    ) -> None:
        self.interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.reply_tokens = reply_tokens
        self.first_token_delay = first_token_delay  # a real model's time to first token

    def tokens(self, prompt: str) -> list[str]:
        """The whole reply to ``prompt``, token by token (what ``reply`` will stream)."""
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        rng = random.Random(seed)
        out = [f"Reply to “{prompt[:40]}”:"]
        for n in range(1, self.reply_tokens):
            word = rng.choice(WORDS)
            # A running number every tenth token makes a lost or doubled stretch visible.
            out.append(f" {word}" if n % 10 else f" [{n}]")
        out.append(".")
        return out

    async def reply(self, history: Sequence[Turn]) -> AsyncIterator[str]:
        prompt = history[-1].text if history else ""
        if self.first_token_delay:
            await asyncio.sleep(self.first_token_delay)
        for token in self.tokens(prompt):
            if self.interval:
                await asyncio.sleep(self.interval)
            yield token


class OpenAICompatibleModel:
    """Streams a chat completion from ``{base_url}/chat/completions`` (OpenAI's wire format,
    which most hosted and local model servers speak)."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, api_key: str, model: str
    ) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model

    async def reply(self, history: Sequence[Turn]) -> AsyncIterator[str]:
        body = {
            "model": self.model,
            "stream": True,
            "messages": [{"role": t.role, "content": t.text} for t in history],
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with self.session.post(self.url, json=body, headers=headers) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                for choice in json.loads(data).get("choices", []):
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        yield delta
