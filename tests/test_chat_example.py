"""examples/chat without a browser: `examples/chat/run` starts a working chat with one command,
refuses a taken port in one line before it starts anything, prints the chat's URL only once the
chat answers and never puts the backend's key in a process's argv; the browser's token reads its
own chat and nothing else, and the metadata store behaves the same on SQLite and Postgres. On
Postgres (a private cluster with wal_level=logical) `run` has the relay write the state stream
from the chat tables. (The browser itself: tests/test_chat_browser.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from examples.chat.backend.config import SettingsError, read_settings
from examples.chat.backend.metadata import (
    MESSAGE_COLUMNS,
    Chat,
    Message,
    MetadataStore,
    open_store,
)
from examples.chat.backend.model import DeterministicModel
from tests import chat_pg
from tests.relay_process import RelayProcess, free_port
from tests.waits import wait_for_sync

ROOT = Path(__file__).resolve().parent.parent
RUN = str(ROOT / "examples/chat/run")
REPLY_TOKENS = 25
needs_web = pytest.mark.skipif(
    shutil.which("npx") is None or not (ROOT / "examples/chat/web/node_modules").is_dir(),
    reason="needs npm ci in examples/chat/web (scripts/test runs it)",
)


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


@contextlib.contextmanager
def _run(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """`examples/chat/run` on free ports with its data in tmp_path; (chat URL, relay URL)."""
    if shutil.which("npx") is None or not (ROOT / "examples/chat/web/node_modules").is_dir():
        pytest.skip("needs npm ci in examples/chat/web (scripts/test runs it)")
    port, relay_port = free_port(), free_port()
    proc = subprocess.Popen(
        [RUN, "--port", str(port), "--relay-port", str(relay_port),
         "--data", str(tmp_path / "data"), "--reply-tokens", str(REPLY_TOKENS),
         "--tokens-per-second", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, **(env or {})},
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


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with _run(tmp_path) as urls:
        yield urls


def _read_all(url: str, token: str) -> list[Any]:
    status, body, headers = _call("GET", f"{url}?offset=-1", token=token)
    assert status == 200
    assert headers.get("Stream-Up-To-Date") == "true"
    return list(body or [])


def _argvs() -> list[bytes]:
    """Every process's command line this user can read, as ps shows it to any local user."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(cmdline.read_bytes())
        except OSError:  # gone while we looked
            continue
    return found


def test_run_serves_a_chat_with_read_only_browser_tokens(
    running: tuple[str, str], tmp_path: Path
) -> None:
    url, relay = running
    status, _, _ = _call("GET", url + "/")
    assert status == 200
    key = (tmp_path / "data" / "backend.key").read_bytes().strip()
    argvs = _argvs()
    assert any(b"examples.chat.backend" in argv for argv in argvs)  # the backend is there
    assert not [argv for argv in argvs if key in argv]  # but its key is in no one's argv
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


logical_pg = chat_pg.logical_pg
chat_db = chat_pg.chat_db


def test_run_on_postgres_writes_the_state_stream_from_the_tables(
    chat_db: str, tmp_path: Path
) -> None:
    """Given a database (as RELAY_DATABASE_URL, out of argv), `run` creates the chat tables and
    starts the relay following them: the state stream carries the same changes as on SQLite,
    written by the relay, each with the transaction it came from."""
    with _run(tmp_path, {"RELAY_DATABASE_URL": chat_db}) as (url, _relay):
        _, created, _ = _call("POST", url + "/api/chats")
        chat = created["id"]
        _, session, _ = _call("GET", f"{url}/api/chats/{chat}/session")
        status, sent, _ = _call("POST", f"{url}/api/chats/{chat}/messages", {"text": "hi"})
        assert status == 201 and sent["txid"].isdigit()

        def done() -> list[Any] | None:
            changes = _read_all(session["state_url"], session["token"])
            last = changes[-1]["value"] if changes else {}
            return changes if last.get("status") == "done" else None

        changes = wait_for_sync(done, timeout=30, interval=0.1, what="the reply done")
    assert [(c["type"], c["headers"]["operation"]) for c in changes] == [
        ("chat", "insert"),
        ("message", "insert"),  # the user's
        ("message", "insert"),  # the reply, streaming, naming its stream
        ("chat", "update"),  # its title: the same transaction as the two messages
        ("message", "update"),  # the reply, done, with its whole text
    ]
    txids = [c["headers"]["txid"] for c in changes]
    assert txids[1] == txids[2] == txids[3] == sent["txid"]
    assert len(set(txids)) == 3
    expected = "".join(DeterministicModel(reply_tokens=REPLY_TOKENS).tokens("hi"))
    assert changes[-1]["value"] == {**sent["reply"], "text": expected, "status": "done"}
    select = f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE id = $1"
    assert chat_pg.rows(chat_db, select, sent["reply"]["id"]) == [changes[-1]["value"]]


def _run_refused(*args: str) -> subprocess.CompletedProcess[str]:
    """`examples/chat/run` that must stop on its own, having printed no chat URL."""
    done = subprocess.run([RUN, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "chat on" not in done.stdout
    return done


def test_run_names_a_taken_port_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        relay_port = str(free_port())
        done = _run_refused("--port", str(port), "--relay-port", relay_port, "--data", str(data))
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"port {port}, for the chat, is taken by another process, pid " in lines[0]
    assert "--port" in lines[0]
    assert not data.exists()  # refused before it wrote credentials or started a relay


def test_run_says_a_relay_holds_its_relay_port(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "other")
    relay.start()
    try:
        done = _run_refused("--port", str(free_port()), "--relay-port", str(relay.port),
                            "--data", str(tmp_path / "data"))  # fmt: skip
    finally:
        relay.stop()
    (line,) = done.stderr.splitlines()
    assert f"port {relay.port}, for the relay, is taken by a relay, pid " in line
    assert line.endswith("choose another with --relay-port")


def test_run_needs_two_ports(tmp_path: Path) -> None:
    port = str(free_port())
    done = _run_refused("--port", port, "--relay-port", port, "--data", str(tmp_path / "data"))
    assert done.stderr.splitlines() == [
        f"examples/chat/run: each needs its own port, got chat {port}, relay {port}"
    ]


@needs_web
def test_run_prints_no_url_when_the_backend_fails(tmp_path: Path) -> None:
    """A backend that exits at start-up (here: an unknown model) ends the run without a URL."""
    done = _run_refused("--port", str(free_port()), "--relay-port", str(free_port()),
                        "--data", str(tmp_path / "data"), "--model", "nope")  # fmt: skip
    assert "chat backend: --model: deterministic or openai" in done.stderr
    assert "the backend exited before it answered" in done.stderr


def test_backend_reads_its_relay_key_from_a_file_or_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "backend.key"
    key_file.write_text("k-123\n")
    jwks = ["--jwt-keys", "jwks.json"]
    by_file = read_settings([*jwks, "--relay-api-key-file", str(key_file)], {})
    assert by_file.relay_api_key == "k-123"
    assert read_settings(jwks, {"CHAT_RELAY_API_KEY": "k-456"}).relay_api_key == "k-456"
    for argv, message in [
        (jwks, "--relay-api-key-file .or CHAT_RELAY_API_KEY.: the backend's write credential"),
        ([*jwks, "--relay-api-key-file", str(tmp_path / "none")], "cannot read .*none"),
        ([*jwks, "--relay-api-key-file", str(key_file), "--relay-api-key", "x"], "not both"),
    ]:
        with pytest.raises(SettingsError, match=message):
            read_settings(argv, {})


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


async def test_metadata_store(store: MetadataStore, database_url: str) -> None:
    c1, c2 = Chat("c1", "New chat", 1.0), Chat("c2", "New chat", 2.0)
    await store.create_chat(c1)
    await store.create_chat(c2)

    def msg(mid: str, chat: str, role: str, stream: str | None = None) -> Message:
        return Message(mid, chat, -1, role, "", "streaming" if stream else "done", stream, 3.0)

    turns = [
        await store.add_turn(c1, msg("u1", "c1", "user"), msg("a1", "c1", "assistant", "s1"), "hi"),
        await store.add_turn(c2, msg("u2", "c2", "user"), msg("a2", "c2", "assistant", "s2"), "yo"),
        await store.add_turn(c1, msg("u3", "c1", "user"), msg("a3", "c1", "assistant", "s3"), "x"),
    ]
    assert [(t.user.position, t.reply.position) for t in turns] == [(0, 1), (0, 1), (2, 3)]
    # The title comes with the chat's first message, in the same transaction, and only then.
    assert [t.chat for t in turns] == [Chat("c1", "hi", 1.0), Chat("c2", "yo", 2.0), None]
    assert await store.chat("c1") == Chat("c1", "hi", 1.0)
    txids = [t.txid for t in turns]
    if database_url:  # each send is one transaction, named as table streams name it
        assert all(t is not None and t.isdigit() for t in txids) and len(set(txids)) == 3
    else:
        assert txids == [None, None, None]
    assert [m.id for m in await store.unfinished()] == ["a1", "a2", "a3"]
    done = await store.finish("a1", "the reply", "done")
    assert (done.text, done.status, done.stream) == ("the reply", "done", "s1")
    assert [m.id for m in await store.unfinished()] == ["a2", "a3"]
    assert [m.id for m in await store.messages("c1")] == ["u1", "a1", "u3", "a3"]
    assert await store.chat("c3") is None
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.create_chat(Chat("c1", "again", 4.0))
