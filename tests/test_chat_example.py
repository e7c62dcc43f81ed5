"""examples/chat without a browser: `examples/chat/run` starts a working chat with one command,
the browser's token reads its own chat and nothing else, and the metadata store behaves the
same on SQLite and Postgres. (The browser itself: tests/test_chat_browser.py.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from examples.chat.backend.metadata import Chat, Message, MetadataStore, open_store
from examples.chat.backend.model import DeterministicModel
from tests.relay_process import free_port
from tests.waits import wait_for_sync

ROOT = Path(__file__).resolve().parent.parent
REPLY_TOKENS = 25


def _call(
    method: str, url: str, body: Any = None, token: str | None = None
) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            parsed = json.loads(raw) if "json" in resp.headers.get("Content-Type", "") else raw
            return resp.status, parsed, dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, None, dict(err.headers)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`examples/chat/run` on free ports with its data in tmp_path; (chat URL, relay URL)."""
    if shutil.which("npx") is None or not (ROOT / "examples/chat/web/node_modules").is_dir():
        pytest.skip("needs npm ci in examples/chat/web (scripts/test runs it)")
    port, relay_port = free_port(), free_port()
    proc = subprocess.Popen(
        [str(ROOT / "examples/chat/run"), "--port", str(port), "--relay-port", str(relay_port),
         "--data", str(tmp_path / "data"), "--reply-tokens", str(REPLY_TOKENS),
         "--tokens-per-second", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline, url = time.monotonic() + 90, ""
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "examples/chat/run exited before printing its URL"
            if line.startswith("chat on "):
                url = line.removeprefix("chat on ").strip().rstrip("/")
        assert url == f"http://127.0.0.1:{port}"
        yield url, f"http://127.0.0.1:{relay_port}"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops the relay and the backend
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()
    for p in (port, relay_port):  # both processes are gone: their ports are free again
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{p}/", timeout=2)


def _read_all(url: str, token: str) -> list[Any]:
    status, body, headers = _call("GET", f"{url}?offset=-1", token=token)
    assert status == 200
    assert headers.get("Stream-Up-To-Date") == "true"
    return list(body or [])


def test_run_serves_a_chat_with_read_only_browser_tokens(running: tuple[str, str]) -> None:
    url, relay = running
    status, _, _ = _call("GET", url + "/")
    assert status == 200
    _, created, _ = _call("POST", url + "/api/chats")
    _, other, _ = _call("POST", url + "/api/chats")
    chat = created["id"]
    _, session, _ = _call("GET", f"{url}/api/chats/{chat}/session")
    token = session["token"]
    assert session["state_url"] == f"{relay}/v1/stream/chat/{chat}/state"

    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["grants"] == [{"path": f"chat/{chat}/**", "actions": ["read"]}]
    assert 0 < claims["exp"] - time.time() <= 300

    status, sent, _ = _call("POST", f"{url}/api/chats/{chat}/messages", {"text": "hi"})
    assert status == 201
    reply = sent["reply"]
    assert reply["stream"] == f"chat/{chat}/reply/{reply['id']}"

    expected = DeterministicModel(reply_tokens=REPLY_TOKENS).tokens("hi")

    def done() -> list[Any] | None:
        changes = _read_all(session["state_url"], token)
        return changes if changes[-1]["value"].get("status") == "done" else None

    try:
        changes = wait_for_sync(done, timeout=20, interval=0.1, what="the reply done")
    except AssertionError:
        changes = _read_all(session["state_url"], token)  # the assertions below show how far
    last = changes[-1]
    assert [(c["type"], c["headers"]["operation"]) for c in changes] == [
        ("chat", "insert"),
        ("message", "insert"),  # the user's
        ("message", "insert"),  # the reply, streaming
        ("chat", "update"),  # its title, from the first message
        ("message", "update"),  # the reply, done, with its whole text
    ]
    assert changes[3]["value"]["title"] == "hi"
    assert last["key"] == reply["id"] and last["value"]["text"] == "".join(expected)
    reply_url = f"{relay}/v1/stream/{reply['stream']}"
    assert _read_all(reply_url, token) == [{"type": "token", "delta": t} for t in expected]

    # The browser's token: read this chat only; never write, never another chat; none is 401.
    assert _call("POST", reply_url, [{"type": "token", "delta": "x"}], token)[0] == 403
    assert _call("PUT", f"{relay}/v1/stream/chat/{chat}/extra", token=token)[0] == 403
    other_state = f"{relay}/v1/stream/chat/{other['id']}/state?offset=-1"
    assert _call("GET", other_state, token=token)[0] == 403
    assert _call("GET", f"{reply_url}?offset=-1")[0] == 401
    assert _call("GET", f"{url}/api/chats/nope/session")[0] == 404


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Empty for SQLite."""
    return str(request.getfixturevalue("pg_url")) if request.param == "postgres" else ""


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    opened = open_store(database_url, tmp_path / "chat.sqlite")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_metadata_store(store: MetadataStore) -> None:
    await store.create_chat(Chat("c1", "New chat", 1.0))
    await store.create_chat(Chat("c2", "New chat", 2.0))

    def msg(mid: str, chat: str, role: str, stream: str | None = None) -> Message:
        return Message(mid, chat, -1, role, "", "streaming" if stream else "done", stream, 3.0)

    turns = [
        await store.add_turn(msg("u1", "c1", "user"), msg("a1", "c1", "assistant", "s1")),
        await store.add_turn(msg("u2", "c2", "user"), msg("a2", "c2", "assistant", "s2")),
        await store.add_turn(msg("u3", "c1", "user"), msg("a3", "c1", "assistant", "s3")),
    ]
    assert [(u.position, a.position) for u, a in turns] == [(0, 1), (0, 1), (2, 3)]
    done = await store.finish("a1", "the reply", "done")
    assert (done.text, done.status, done.stream) == ("the reply", "done", "s1")
    assert [m.id for m in await store.messages("c1")] == ["u1", "a1", "u3", "a3"]
    await store.set_title("c1", "greetings")
    assert await store.chat("c1") == Chat("c1", "greetings", 1.0)
    assert await store.chat("c3") is None
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.create_chat(Chat("c1", "again", 4.0))
