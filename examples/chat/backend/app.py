"""The chat backend: an aiohttp app that stores chats, runs the model, and writes each reply
to its own Relay stream while the browser reads it from the relay directly."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from relay_producer import StreamProducer

from examples.chat.backend.config import Settings
from examples.chat.backend.credentials import browser_token, load_signing_key
from examples.chat.backend.metadata import Chat, Message, MetadataStore, open_store
from examples.chat.backend.model import DeterministicModel, Model, OpenAICompatibleModel, Turn
from examples.chat.backend.state import (
    StatePublisher,
    change,
    create_stream,
    read_stream,
    reply_path,
    state_path,
    stream_url,
)

log = logging.getLogger("chat")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", MetadataStore)
PUBLISHER: web.AppKey[StatePublisher | None] = web.AppKey("publisher")  # SQLite only
MODEL = web.AppKey("model", Model)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REPLIES: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("replies")
TITLE_CHARS = 48
RESUME_TRIES = 40  # reading an unfinished reply's stream: 20 s of a relay restarting


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
    # On Postgres the relay follows the tables (metadata.TABLE_STREAMS): nothing to publish.
    app[PUBLISHER] = (
        None
        if settings.database_url
        else StatePublisher(session, settings.relay_url, _write_headers(settings))
    )
    app[MODEL] = (
        OpenAICompatibleModel(
            session, settings.openai_url, settings.openai_key, settings.openai_model
        )
        if settings.model == "openai"
        else DeterministicModel(
            settings.tokens_per_second, settings.reply_tokens, settings.first_token_delay
        )
    )
    _track(app, _resume_unfinished(app))
    try:
        yield
    finally:
        replies: set[asyncio.Task[None]] = app[REPLIES]
        for task in list(replies):
            task.cancel()
        await asyncio.gather(*replies, return_exceptions=True)
        publisher = app[PUBLISHER]
        if publisher is not None:
            await publisher.close()
        await session.close()
        await store.close()


def _track(app: web.Application, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` in the background until it ends or the app stops."""
    task = asyncio.create_task(work)
    app[REPLIES].add(task)
    task.add_done_callback(app[REPLIES].discard)


def _url(app: web.Application, path: str) -> str:
    return stream_url(app[SETTINGS].relay_url, path)


def _write_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.relay_api_key}"}


async def create_chat(request: web.Request) -> web.Response:
    app = request.app
    chat = Chat(uuid.uuid4().hex[:12], "New chat", time.time())
    # The state stream exists before the page reads it (on Postgres the relay appends to it
    # only once it has followed the chat's row).
    await _create_stream(app, state_path(chat.id))
    await app[STORE].create_chat(chat)
    publisher = app[PUBLISHER]
    if publisher is not None:
        await publisher.publish(chat.id, change(chat, "insert"))
    return web.json_response({"id": chat.id}, status=201)


async def _create_stream(app: web.Application, path: str) -> None:
    try:
        await create_stream(app[SESSION], _url(app, path), _write_headers(app[SETTINGS]))
    except Exception as exc:
        log.exception("could not create %s", path)
        raise web.HTTPBadGateway(text=f"the relay did not create {path}") from exc


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
    """Create the reply's stream, then store the user's message, the reply (naming its
    stream) and the chat's title in one transaction, and leave the model writing tokens into
    the stream. On SQLite the changes are then published to the chat's state stream; on
    Postgres the relay follows the transaction, and ``txid`` says which one it was."""
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
    await _create_stream(app, stream)  # it exists before any browser learns of the message
    written = await app[STORE].add_turn(
        chat,
        Message(uuid.uuid4().hex[:12], chat.id, 0, "user", text, "done", None, now),
        Message(reply_id, chat.id, 0, "assistant", "", "streaming", stream, now),
        " ".join(text.split())[:TITLE_CHARS],
    )
    publisher = app[PUBLISHER]
    if publisher is not None:
        changes = [change(written.user, "insert"), change(written.reply, "insert")]
        if written.chat is not None:
            changes.append(change(written.chat, "update"))
        await publisher.publish(chat.id, *changes)
    _track(app, _write_reply(app, written.reply, history))
    return web.json_response(
        {"user": written.user.value(), "reply": written.reply.value(), "txid": written.txid},
        status=201,
    )


async def _resume_unfinished(app: web.Application) -> None:
    """Finish the replies a stopped backend left ``streaming``: each goes on from where its
    stream stands (the model is asked again and what the stream already holds is skipped)."""
    for reply in await app[STORE].unfinished():
        earlier = await app[STORE].messages(reply.chat_id)
        history = [Turn(m.role, m.text) for m in earlier if m.position < reply.position and m.text]
        log.info("resuming reply %s", reply.id)
        _track(app, _write_reply(app, reply, history, resume=True))


async def _stored_tokens(app: web.Application, path: str) -> tuple[list[str], bool]:
    """The reply's tokens the stream already holds, and whether it is closed."""
    for attempt in range(RESUME_TRIES):
        try:
            found, closed = await read_stream(
                app[SESSION], _url(app, path), _write_headers(app[SETTINGS])
            )
            return [m["delta"] for m in found if m.get("type") == "token"], closed
        except aiohttp.ClientError:
            if attempt == RESUME_TRIES - 1:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


class ReplyDiverged(Exception):
    """Asked again, the model did not repeat what the stream holds (not a deterministic one)."""


async def _write_reply(
    app: web.Application, reply: Message, history: list[Turn], *, resume: bool = False
) -> None:
    """Stream the model's tokens into the reply's own stream, close it, and store the whole
    text with status ``done`` (``error`` if the model or the relay failed).

    Appends are not awaited one by one: the model runs at its own pace while the producer
    batches whatever arrived during a POST (or during a relay restart) into the next one.
    Stopped (the backend shuts down), the reply stays ``streaming`` for the next start."""
    assert reply.stream is not None
    settings, parts, status = app[SETTINGS], list[str](), "error"
    stored: list[str] = []
    try:
        stored, closed = await _stored_tokens(app, reply.stream) if resume else ([], False)
        if closed:
            parts, status = stored, "done"
        else:
            async with StreamProducer(
                _url(app, reply.stream),
                producer_id=f"reply-{reply.id}",
                headers=_write_headers(settings),
                session=app[SESSION],
                linger=settings.linger,
                max_backoff=0.5,  # a restarted relay is found within half a second
                max_retries=40,
            ) as producer:
                pending: list[asyncio.Task[str]] = []
                async for token in app[MODEL].reply(history):
                    if len(parts) < len(stored):  # resuming: this one is stored already
                        if token != stored[len(parts)]:
                            raise ReplyDiverged(reply.id)
                        parts.append(token)
                        continue
                    parts.append(token)
                    message = {"type": "token", "delta": token}
                    pending.append(asyncio.create_task(producer.append(message)))
                await asyncio.gather(*pending)
                await producer.close()
                status = "done"
    except asyncio.CancelledError:
        raise
    except ReplyDiverged:
        log.error("reply %s: the model did not repeat what was streamed; it ends there", reply.id)
        parts = stored
    except Exception:
        log.exception("reply %s failed", reply.id)
    finished = await app[STORE].finish(reply.id, "".join(parts), status)
    publisher = app[PUBLISHER]
    if publisher is None:
        return
    if not resume:
        await publisher.publish(reply.chat_id, change(finished, "update"))
        return
    # The backend may have died between a transaction and its publish: publish the chat's
    # rows again, as inserts (a reader that has a row takes its insert as an update).
    chat = await app[STORE].chat(reply.chat_id)
    rows: list[Chat | Message] = [] if chat is None else [chat]
    rows += [m for m in await app[STORE].messages(reply.chat_id) if m.position <= reply.position]
    await publisher.publish(reply.chat_id, *(change(row, "insert") for row in rows))
