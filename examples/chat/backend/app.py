"""The chat backend: an aiohttp app that stores chats, runs the model, and writes each reply
to its own Relay stream while the browser reads it from the relay directly."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from relay_producer import StreamProducer

from examples.chat.backend.config import Settings
from examples.chat.backend.credentials import browser_token, load_signing_key
from examples.chat.backend.metadata import Chat, Message, MetadataStore, open_store
from examples.chat.backend.model import DeterministicModel, Model, OpenAICompatibleModel, Turn
from examples.chat.backend.state import StatePublisher, change, reply_path, state_path

log = logging.getLogger("chat")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", MetadataStore)
PUBLISHER = web.AppKey("publisher", StatePublisher)
MODEL = web.AppKey("model", Model)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REPLIES: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("replies")
TITLE_CHARS = 48


def make_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[REPLIES] = set()
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/api/chats", create_chat)
    app.router.add_get("/api/chats/{chat_id}/session", chat_session)
    app.router.add_post("/api/chats/{chat_id}/messages", send_message)
    web_dir = Path(settings.web_dir)

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(web_dir / "index.html")

    app.router.add_get("/", index)
    if (web_dir / "assets").is_dir():
        app.router.add_static("/assets", web_dir / "assets")
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = open_store(settings.database_url, Path(settings.sqlite_path))
    await store.open()
    session = aiohttp.ClientSession()
    app[STORE], app[SESSION] = store, session
    app[PUBLISHER] = StatePublisher(session, settings.relay_url, _write_headers(settings))
    app[MODEL] = (
        OpenAICompatibleModel(
            session, settings.openai_url, settings.openai_key, settings.openai_model
        )
        if settings.model == "openai"
        else DeterministicModel(settings.tokens_per_second, settings.reply_tokens)
    )
    try:
        yield
    finally:
        replies: set[asyncio.Task[None]] = app[REPLIES]
        for task in list(replies):
            task.cancel()
        await asyncio.gather(*replies, return_exceptions=True)
        await app[PUBLISHER].close()
        await session.close()
        await store.close()


def _write_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.relay_api_key}"}


async def create_chat(request: web.Request) -> web.Response:
    chat = Chat(uuid.uuid4().hex[:12], "New chat", time.time())
    await request.app[STORE].create_chat(chat)
    await request.app[PUBLISHER].publish(chat.id, change(chat, "insert"))
    return web.json_response({"id": chat.id}, status=201)


async def _chat_or_404(request: web.Request) -> Chat:
    chat = await request.app[STORE].chat(request.match_info["chat_id"])
    if chat is None:
        raise web.HTTPNotFound(text="no such chat")
    return chat


async def chat_session(request: web.Request) -> web.Response:
    """What a browser needs to read a chat from the relay: where, and a read-only token.

    The page asks again shortly before the token expires; the token covers only this chat's
    streams (``chat/<id>/**``) and only ``read``."""
    chat = await _chat_or_404(request)
    settings = request.app[SETTINGS]
    key = load_signing_key(Path(settings.jwt_keys))  # re-read: the key file may be rotated
    token, expires = browser_token(key, chat.id, settings.token_lifetime, settings.jwt_audience)
    relay = (settings.public_relay_url or settings.relay_url).rstrip("/")
    return web.json_response(
        {
            "relay_url": relay,
            "state_url": f"{relay}/v1/stream/{state_path(chat.id)}",
            "token": token,
            "expires_at": expires,
        }
    )


async def send_message(request: web.Request) -> web.Response:
    """Store the user's message and an empty reply, create the reply's stream, publish both
    to the chat's state stream, and leave the model writing tokens into the stream."""
    chat = await _chat_or_404(request)
    body = await request.json()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise web.HTTPBadRequest(text="text: a non-empty string")
    app, now = request.app, time.time()
    # The model sees the finished turns (a reply still streaming or failed has no text yet).
    history = [Turn(m.role, m.text) for m in await app[STORE].messages(chat.id) if m.text]
    history.append(Turn("user", text))
    reply_id = uuid.uuid4().hex[:12]
    stream = reply_path(chat.id, reply_id)
    user, reply = await app[STORE].add_turn(
        Message(uuid.uuid4().hex[:12], chat.id, 0, "user", text, "done", None, now),
        Message(reply_id, chat.id, 0, "assistant", "", "streaming", stream, now),
    )
    created: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_write_reply(app, reply, history, created))
    app[REPLIES].add(task)
    task.add_done_callback(app[REPLIES].discard)
    try:
        await created  # the stream exists before any browser learns of the message
    except Exception as exc:
        log.exception("could not create the reply stream")
        raise web.HTTPBadGateway(text="the relay did not create the reply stream") from exc
    changes = [change(user, "insert"), change(reply, "insert")]
    if user.position == 0:
        title = " ".join(text.split())[:TITLE_CHARS]
        await app[STORE].set_title(chat.id, title)
        changes.append(change(Chat(chat.id, title, chat.created_at), "update"))
    await app[PUBLISHER].publish(chat.id, *changes)
    return web.json_response({"user": user.value(), "reply": reply.value()}, status=201)


async def _write_reply(
    app: web.Application, reply: Message, history: list[Turn], created: asyncio.Future[None]
) -> None:
    """Stream the model's tokens into the reply's own stream, then close it.

    Appends are not awaited one by one: the model runs at its own pace while the producer
    batches whatever arrived during a POST (or during a relay restart) into the next one."""
    assert reply.stream is not None
    settings, parts = app[SETTINGS], []
    status = "error"
    try:
        async with StreamProducer(
            app[PUBLISHER].url(reply.stream),
            producer_id=f"reply-{reply.id}",
            headers=_write_headers(settings),
            session=app[SESSION],
            linger=settings.linger,
            max_backoff=0.5,  # a restarted relay is found within half a second
            max_retries=40,
        ) as producer:
            created.set_result(None)
            pending: list[asyncio.Task[str]] = []
            async for token in app[MODEL].reply(history):
                parts.append(token)
                message = {"type": "token", "delta": token}
                pending.append(asyncio.create_task(producer.append(message)))
            await asyncio.gather(*pending)
            await producer.close()
            status = "done"
    except Exception as exc:
        if not created.done():
            created.set_exception(exc)
            return
        log.exception("reply %s failed", reply.id)
    finally:
        if created.done() and not created.cancelled() and created.exception() is None:
            finished = await app[STORE].finish(reply.id, "".join(parts), status)
            await app[PUBLISHER].publish(reply.chat_id, change(finished, "update"))
