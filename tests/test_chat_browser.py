"""examples/chat in a real browser (headless Chromium through playwright-core), on each store
with the page's default long-poll reads, and on SQLite with SSE for the reply. One reply
streams while the page is reloaded, the browser goes offline for a second, and the relay is
killed with SIGKILL and restarted on the same data. The rendered reply, the stored stream and
the metadata must each equal what the deterministic model produced: nothing lost, nothing
doubled. Prints the time from each disruption to the next token on screen.

On Postgres (a private cluster with wal_level=logical) the chat's state stream is a table
stream the relay writes from the chat tables. A second test, on each store, kills the backend
between its database write and the model's first token, then the relay mid-reply and again as
the reply's last transaction commits: the page's rows must equal the database's, each once,
and its reply the model's.

The drivers are examples/chat/web/e2e/drive.mjs and crashes.mjs; scripts/test installs
Chromium (scripts/install-chromium) and the page's npm packages.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from examples.chat.backend.keys import ensure_keys
from examples.chat.backend.metadata import MESSAGE_COLUMNS
from examples.chat.backend.model import DeterministicModel
from protocol.state import fold
from tests import chat_pg
from tests.relay_process import RelayProcess, free_port
from tests.waits import wait_for_process, wait_for_sync

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "examples" / "chat" / "web"
CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "Tell me how a reply survives a crash"
TOKENS_PER_SECOND = 30
REPLY_TOKENS = 360  # 12 s at 30 tokens/s: room for three disruptions, a second apart
MODEL = DeterministicModel(TOKENS_PER_SECOND, REPLY_TOKENS)
DRIVER_TIMEOUT = 100

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (WEB / "node_modules").is_dir() or not CHROMIUM.exists(),
    reason="needs node, `npm ci` in examples/chat/web and /usr/bin/chromium "
    "(scripts/test runs npm ci and scripts/install-chromium)",
)


logical_pg = chat_pg.logical_pg
chat_db = chat_pg.chat_db


@pytest.fixture(scope="module")
def web_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page built from the current source with vite, as `examples/chat/run` builds it."""
    out = tmp_path_factory.mktemp("chat-web") / "dist"
    subprocess.run(
        ["npx", "vite", "build", "--logLevel", "warn", "--outDir", str(out), "--emptyOutDir"],
        cwd=WEB,
        check=True,
        timeout=120,
    )
    return out


class Backend:
    """The example's backend as a process (as `examples/chat/run` starts it), restartable."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.log = args, log
        self.start()

    def start(self) -> None:
        command = [sys.executable, "-m", "examples.chat.backend", "--port", str(self.port)]
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [*command, *self.args],
                cwd=ROOT,
                stdout=sink,
                stderr=sink,
            )
        wait_for_process(
            self.proc, self.answering, timeout=20, what="backend", detail=self.log.read_text
        )

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no clean-up runs
        self.proc.wait()

    def answering(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/", timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Chat:
    relay: RelayProcess
    backend: Backend
    keys: Path
    store: str
    live: str  # how the page reads: long-poll (its default) or sse


@contextlib.contextmanager
def _running(
    tmp_path: Path, web_dist: Path, database_url: str, store: str, live: str, *backend_args: str
) -> Iterator[Chat]:
    """A relay and the backend as `examples/chat/run` starts them: on Postgres (a database
    URL) the relay follows the chat tables into the state streams."""
    keys = tmp_path / "keys"
    ensure_keys(keys)
    database = ["--database-url", database_url] if database_url else []
    tables = chat_pg.prepare(database_url) if database_url else []
    relay = RelayProcess(
        tmp_path / "relay",
        "--auth-jwt-keys", str(keys / "jwks.json"),
        "--auth-api-keys", str(keys / "api-keys.json"),
        *database, *tables,
        log=tmp_path / "relay.log",
    )  # fmt: skip
    relay.start()
    metadata = database or ["--sqlite-path", str(tmp_path / "chat.sqlite")]
    try:
        backend = Backend(
            [
                "--relay-url", relay.url,
                "--relay-api-key-file", str(keys / "backend.key"),
                "--jwt-keys", str(keys / "jwks.json"),
                "--web-dir", str(web_dist),
                "--tokens-per-second", str(TOKENS_PER_SECOND),
                *metadata, *backend_args,
            ],
            tmp_path / "backend.log",
        )  # fmt: skip
        try:
            yield Chat(relay, backend, keys, store, live)
        finally:
            backend.stop()
    finally:
        relay.stop()


@pytest.fixture(
    params=[("sqlite", "long-poll"), ("postgres", "long-poll"), ("sqlite", "sse")],
    ids=lambda p: "-".join(p),
)
def chat(request: pytest.FixtureRequest, tmp_path: Path, web_dist: Path) -> Iterator[Chat]:
    store, live = request.param
    url = str(request.getfixturevalue("chat_db")) if store == "postgres" else ""
    with _running(tmp_path, web_dist, url, store, live, "--reply-tokens", str(REPLY_TOKENS)) as c:
        yield c


def _drive(
    on: Callable[[dict[str, Any], Callable[[str], None]], None], script: str, *args: str
) -> dict[str, Any]:
    """Run the driver ``e2e/<script>``: ``on(event, answer)`` gets each event it prints but
    the last, ``{"event": "result", ...}``, which is returned; ``answer`` writes it a line."""
    result: dict[str, Any] = {}
    with subprocess.Popen(
        ["node", f"e2e/{script}", *args],
        cwd=WEB,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as driver:
        watchdog = threading.Timer(DRIVER_TIMEOUT, driver.kill)
        watchdog.start()
        try:
            assert driver.stdin is not None and driver.stdout is not None
            stdin = driver.stdin

            def answer(line: str) -> None:
                stdin.write(line + "\n")
                stdin.flush()

            for line in driver.stdout:
                event = json.loads(line)
                if event["event"] == "result":
                    result = event
                else:
                    on(event, answer)
            assert driver.wait() == 0
        finally:
            watchdog.cancel()
            driver.kill()
    assert result, "the driver ended without a result"
    return result


def _first_append_ms(relay: RelayProcess, stream: str, key: str) -> float:
    """Milliseconds until the stream's tail moves, polled every 5 ms from now."""
    start, first = time.monotonic(), None
    req = urllib.request.Request(
        f"{relay.url}/v1/stream/{stream}", method="HEAD", headers={"Authorization": f"Bearer {key}"}
    )
    while time.monotonic() - start < 20:
        with urllib.request.urlopen(req, timeout=5) as resp:
            tail = resp.headers["Stream-Next-Offset"]
        if first is None:
            first = tail
        elif tail != first:
            return (time.monotonic() - start) * 1000
        time.sleep(0.005)  # a sleep: the polling pace of what this measures
    raise AssertionError("the producer did not append after the relay restarted")


def _read_json(url: str, key: str) -> list[dict[str, Any]]:
    """A whole JSON stream, read with the backend's credential."""
    out: list[dict[str, Any]] = []
    offset = "-1"
    while True:
        req = urllib.request.Request(
            f"{url}?offset={offset}", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            out += json.loads(resp.read() or b"[]")
            offset = resp.headers["Stream-Next-Offset"]
            if resp.headers.get("Stream-Up-To-Date") == "true":
                return out


def test_reply_survives_reload_offline_and_relay_kill(
    chat: Chat, capsys: pytest.CaptureFixture[str]
) -> None:
    relay, backend, keys = chat.relay, chat.backend, chat.keys
    key = (keys / "backend.key").read_text()
    stored_after_restart_ms = -1.0

    def on(event: dict[str, Any], answer: Callable[[str], None]) -> None:
        nonlocal stored_after_restart_ms
        if event["event"] == "kill":
            relay.kill()
            relay.start()
            answer("restarted")
            stored_after_restart_ms = _first_append_ms(relay, event["stream"], key)

    result = _drive(on, "drive.mjs", backend.url, PROMPT, chat.live)
    expected = "".join(MODEL.tokens(PROMPT))
    before, restored, text = (str(result[k]) for k in ("before", "restored", "text"))
    assert result["errors"] == []
    assert result["replies"] == 1
    assert restored.startswith(before) and text.startswith(restored)
    assert result["resumedAt"] not in (None, "-1"), "after the reload the read started over"
    assert text == expected  # nothing lost, nothing doubled, on screen

    # What was stored: the reply stream is the model's tokens once, and the chat's state
    # stream ends with the finished reply (its full text) as the database holds it.
    changes = _read_json(f"{relay.url}/v1/stream/chat/{result['chat']}/state", key)
    messages = [c for c in changes if c["type"] == "message"]
    final = messages[-1]["value"]
    assert isinstance(final, dict)
    assert final["role"] == "assistant" and final["status"] == "done"
    assert final["text"] == expected
    tokens = _read_json(f"{relay.url}/v1/stream/{final['stream']}", key)
    assert tokens == [{"type": "token", "delta": t} for t in MODEL.tokens(PROMPT)]

    timings = result["timings"]
    assert isinstance(timings, dict)
    # Of the time from the relay answering to the next token on screen, this much passed
    # before the backend's producer had stored its next batch; the rest is the page's.
    timings["relay_answering_to_next_append_stored_ms"] = round(stored_after_restart_ms)
    with capsys.disabled():
        print(f"\nchat in Chromium, {chat.store}, {chat.live}: disruption to next token on screen")
        for name, ms in timings.items():
            print(f"  {name}: {ms} ms")


CRASH_REPLY_TOKENS = 240  # 8 s at 30 tokens/s
FIRST_TOKEN_DELAY = 3.0  # the window in which the test kills the backend
CRASH_MODEL = DeterministicModel(TOKENS_PER_SECOND, CRASH_REPLY_TOKENS)
CHAT_COLUMNS = ("id", "title", "created_at")
MESSAGE_FIELDS = tuple(MESSAGE_COLUMNS.split(", "))


@pytest.fixture(params=["postgres", "sqlite"])
def crash_chat(
    request: pytest.FixtureRequest, tmp_path: Path, web_dist: Path
) -> Iterator[tuple[Chat, str]]:
    """A chat whose model thinks before its first token; and its database (URL or path)."""
    store = request.param
    url = str(request.getfixturevalue("chat_db")) if store == "postgres" else ""
    with _running(
        tmp_path, web_dist, url, store, "long-poll",
        "--reply-tokens", str(CRASH_REPLY_TOKENS),
        "--first-token-delay", str(FIRST_TOKEN_DELAY),
    ) as chat:  # fmt: skip
        yield chat, url or str(tmp_path / "chat.sqlite")


def test_rows_survive_backend_and_relay_kills(
    crash_chat: tuple[Chat, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Kill -9 the backend after its send's transaction committed and before the model's
    first token (the restarted backend resumes the reply), then the relay mid-reply and again
    as the reply's last transaction commits (each restarted on the same data). On Postgres the
    relay follows the tables into the state stream; on SQLite the backend publishes it."""
    chat, database_url = crash_chat
    relay, backend = chat.relay, chat.backend
    key = (chat.keys / "backend.key").read_text()
    reply = ""

    def on(event: dict[str, Any], answer: Callable[[str], None]) -> None:
        nonlocal reply
        if event["event"] == "sending":
            reply = _kill_backend_after_its_write(chat, database_url, event["chat"], key)
            backend.start()  # it resumes the reply, which is still streaming
            answer("backend restarted")
        elif event["event"] == "kill-relay":
            relay.kill()
            relay.start()
            answer("restarted")
            # Kill again as the reply's last transaction commits: the relay had not followed
            # it yet (or not all the way), and the next one must.
            _wait_until_done(database_url, reply)
            relay.kill()
            relay.start()

    result = _drive(on, "crashes.mjs", backend.url, PROMPT)
    assert result["errors"] == []
    expected = "".join(CRASH_MODEL.tokens(PROMPT))
    assert result["text"] == expected  # on screen: the model's reply, nothing lost or doubled
    # The send's answer: none if the kill came first; else, on Postgres, its txid was awaited.
    assert result["status"] in ("", "send failed: no answer from the backend")

    chat_id = result["chat"]
    chats = chat_pg.rows(
        database_url, "SELECT id, title, created_at FROM chat_chats WHERE id = $1", chat_id
    )
    messages = chat_pg.rows(
        database_url,
        f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE chat_id = $1 ORDER BY position",
        chat_id,
    )
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert (messages[1]["text"], messages[1]["status"]) == (expected, "done")
    # The page's rows are the database's, each once (on screen too, in order).
    rows = result["rows"]
    assert [{c: r[c] for c in CHAT_COLUMNS} for r in rows["chats"]] == chats
    page_messages = sorted(rows["messages"], key=lambda r: r["position"])
    assert [{c: r[c] for c in MESSAGE_FIELDS} for r in page_messages] == messages
    assert result["listed"] == [m["id"] for m in messages]

    # The state stream, folded, is the database's rows.
    state = _read_json(f"{relay.url}/v1/stream/chat/{chat_id}/state", key)
    assert fold(state) == {
        **{("chat", c["id"]): c for c in chats},
        **{("message", m["id"]): m for m in messages},
    }
    if chat.store == "postgres":
        # As the relay wrote it across its kills: each transaction's change once, each row
        # inserted once. (On SQLite the resumed backend publishes the chat's rows again.)
        changes = [c for c in state if "operation" in c["headers"]]
        applied = Counter(
            (c["type"], c["key"], c["headers"]["operation"], c["headers"]["txid"]) for c in changes
        )
        assert [k for k, n in applied.items() if n > 1] == []
        inserts = Counter(
            (c["type"], c["key"]) for c in changes if c["headers"]["operation"] == "insert"
        )
        assert sorted(inserts.values()) == [1, 1, 1]
    tokens = _read_json(f"{relay.url}/v1/stream/{messages[1]['stream']}", key)
    assert tokens == [{"type": "token", "delta": t} for t in CRASH_MODEL.tokens(PROMPT)]
    if chat.store == "postgres":
        # Where the last kill fell (not asserted: either way each change is in once).
        with urllib.request.urlopen(f"{relay.url}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        replays = sum(
            float(line.rpartition(" ")[2])
            for line in metrics.splitlines()
            if line.startswith("relay_table_transactions_total")
            and 'outcome="already_applied"' in line
        )
        with capsys.disabled():
            print(
                "\nchat crash test: the restarted relay found the reply's last transaction "
                + ("appended before the kill (replay refused)" if replays else "still to append")
            )


def _wait_until_done(database_url: str, reply: str) -> None:
    wait_for_sync(
        lambda: chat_pg.rows(
            database_url, "SELECT 1 FROM chat_messages WHERE id = $1 AND status = 'done'", reply
        ),
        timeout=60,
        interval=0.005,
        what="the reply's last transaction",
    )


def _kill_backend_after_its_write(chat: Chat, database_url: str, chat_id: str, key: str) -> str:
    """Once the send's transaction is in the database, SIGKILL the backend; the reply's
    stream must still be empty (the kill came before the model's first token). Returns the
    reply's id."""
    found = wait_for_sync(
        lambda: chat_pg.rows(
            database_url,
            "SELECT id, stream FROM chat_messages WHERE chat_id = $1 AND role = 'assistant'",
            chat_id,
        ),
        timeout=30,
        interval=0.005,
        what="the send's transaction",
    )
    chat.backend.kill()
    (reply,) = found
    stored = _read_json(f"{chat.relay.url}/v1/stream/{reply['stream']}", key)
    assert stored == [], "the model's first token came before the backend was killed"
    return str(reply["id"])
