"""examples/chat in a real browser (headless Chromium through playwright-core), on each store
with the page's default long-poll reads, and on SQLite with SSE for the reply. One reply
streams while the page is reloaded, the browser goes offline for a second, and the relay is
killed with SIGKILL and restarted on the same data. The rendered reply, the stored stream and
the metadata must each equal what the deterministic model produced: nothing lost, nothing
doubled. Prints the time from each disruption to the next token on screen.

The driver is examples/chat/web/e2e/drive.mjs; scripts/test installs Chromium
(scripts/install-chromium) and the page's npm packages.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from examples.chat.backend.keys import ensure_keys
from examples.chat.backend.model import DeterministicModel
from tests.relay_process import RelayProcess, free_port
from tests.waits import wait_for_process

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
    """The example's backend as a process (as `examples/chat/run` starts it)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "examples.chat.backend", "--port", str(self.port), *args],
                cwd=ROOT,
                stdout=sink,
                stderr=sink,
            )
        wait_for_process(
            self.proc, self.answering, timeout=20, what="backend", detail=log.read_text
        )

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


@pytest.fixture(
    params=[("sqlite", "long-poll"), ("postgres", "long-poll"), ("sqlite", "sse")],
    ids=lambda p: "-".join(p),
)
def chat(request: pytest.FixtureRequest, tmp_path: Path, web_dist: Path) -> Iterator[Chat]:
    store, live = request.param
    keys = tmp_path / "keys"
    ensure_keys(keys)
    database: tuple[str, ...] = ()
    if store == "postgres":
        database = ("--database-url", request.getfixturevalue("pg_url"))
    relay = RelayProcess(
        tmp_path / "relay",
        "--auth-jwt-keys", str(keys / "jwks.json"),
        "--auth-api-keys", str(keys / "api-keys.json"),
        *database,
        log=tmp_path / "relay.log",
    )  # fmt: skip
    relay.start()
    metadata = database or ("--sqlite-path", str(tmp_path / "chat.sqlite"))
    backend = Backend(
        [
            "--relay-url", relay.url,
            "--relay-api-key-file", str(keys / "backend.key"),
            "--jwt-keys", str(keys / "jwks.json"),
            "--web-dir", str(web_dist),
            "--tokens-per-second", str(TOKENS_PER_SECOND),
            "--reply-tokens", str(REPLY_TOKENS),
            *metadata,
        ],
        tmp_path / "backend.log",
    )  # fmt: skip
    try:
        yield Chat(relay, backend, keys, store, live)
    finally:
        backend.stop()
        relay.stop()


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


def _read_json(url: str, key: str) -> list[dict[str, object]]:
    """A whole JSON stream, read with the backend's credential."""
    out: list[dict[str, object]] = []
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
    result: dict[str, object] = {}
    stored_after_restart_ms = -1.0
    with subprocess.Popen(
        ["node", "e2e/drive.mjs", backend.url, PROMPT, chat.live],
        cwd=WEB,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as driver:
        watchdog = threading.Timer(DRIVER_TIMEOUT, driver.kill)
        watchdog.start()
        try:
            assert driver.stdin is not None and driver.stdout is not None
            for line in driver.stdout:
                event = json.loads(line)
                if event["event"] == "kill":
                    relay.kill()
                    relay.start()
                    driver.stdin.write("restarted\n")
                    driver.stdin.flush()
                    stored_after_restart_ms = _first_append_ms(relay, event["stream"], key)
                elif event["event"] == "result":
                    result = event
            assert driver.wait() == 0
        finally:
            watchdog.cancel()
            driver.kill()
    assert result, "the driver ended without a result"

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
