"""Logs: every line a real ``relay serve`` writes is one JSON object (``--log-format auto`` off a
terminal), one line per request with its id, a start-up line naming the event loop, and no
credentials, query strings or stream contents. The standard library's loggers (aiohttp's,
asyncpg's) come out in the same format."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from relay.logging import configure
from relay.resources import FD_RESERVE
from tests.relay_process import RelayProcess

TEXT = {"Content-Type": "text/plain"}
SECRETS = ("Bearer-SECRET-a1", "QUERY-SECRET-b2", "BODY-SECRET-c3")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def parse(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines
    parsed = []
    for line in lines:
        entry = json.loads(line)  # no line is anything but JSON
        assert isinstance(entry, dict), line
        assert TIMESTAMP.fullmatch(entry["timestamp"]), line
        assert entry["level"] in ("debug", "info", "warning", "error", "critical"), line
        parsed.append(entry)
    return parsed


async def test_a_served_relay_logs_json_lines_one_per_request(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    relay = RelayProcess(tmp_path / "data", "--log-level", "info", log=log)
    relay.start()
    stream = f"{relay.url}/v1/stream/logged"
    secret = {"Authorization": SECRETS[0]}
    echoed: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession() as http:
            sent = [
                ("t-put", "PUT", stream, {**TEXT, **secret}, None, 201),
                ("t-post", "POST", stream, {**TEXT, **secret}, SECRETS[2].encode(), 204),
                ("t-get", "GET", f"{stream}?offset=-1&token={SECRETS[1]}", secret, None, 200),
                ("t-404", "GET", f"{relay.url}/nowhere", {}, None, 404),
                ("not sane!", "GET", f"{relay.url}/healthz", {}, None, 200),
            ]
            for rid, method, url, headers, body, status in sent:
                async with http.request(
                    method, url, headers={**headers, "X-Request-Id": rid}, data=body
                ) as response:
                    assert response.status == status
                    echoed[rid] = response.headers["X-Request-Id"]
                    await response.read()
    finally:
        relay.stop()
    text = log.read_text()
    entries = parse(text)
    for word in SECRETS:
        assert word not in text  # no credentials, query strings or stream bytes
    assert "Running on" not in text  # aiohttp's banner

    started = [e for e in entries if e["event"] == "relay started"]
    assert len(started) == 1
    assert started[0]["loop"] == "uvloop.Loop"
    assert started[0]["store"] == "sqlite"
    assert started[0]["url"] == relay.url
    assert started[0]["version"]
    assert started[0]["open_files"] >= started[0]["open_files_before"]  # raised to the hard one
    assert started[0]["max_connections"] == started[0]["open_files"] - FD_RESERVE  # the default
    assert entries[-1]["event"] == "relay stopped"

    assert {rid: echoed[rid] for rid in echoed if rid != "not sane!"} == {
        rid: rid for rid in echoed if rid != "not sane!"
    }
    assert echoed["not sane!"] != "not sane!"  # replaced by one of ours
    requests = [e for e in entries if e["event"] == "request"]
    for rid, method, url, _, _, status in sent:
        mine = [e for e in requests if e["request_id"] == echoed[rid]]
        assert len(mine) == 1, rid  # one line per request
        line = mine[0]
        assert line["level"] == "info"
        assert line["method"] == method
        assert line["path"] == url.removeprefix(relay.url).split("?")[0]  # the path only
        assert line["status"] == status
        assert isinstance(line["ms"], float) and line["ms"] >= 0
        assert isinstance(line["bytes"], int) and line["bytes"] > 0


async def test_the_access_log_can_be_turned_off(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    relay = RelayProcess(tmp_path / "data", "--log-level", "info", "--access-log", "off", log=log)
    relay.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{relay.url}/healthz") as response:
            assert response.status == 200
            assert response.headers["X-Request-Id"]  # ids are still given out
    finally:
        relay.stop()
    events = [entry["event"] for entry in parse(log.read_text())]
    assert "relay started" in events
    assert "request" not in events


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_standard_library_loggers_come_out_in_the_same_json(restore_logging: None) -> None:
    out = io.StringIO()
    assert configure("info", "auto", stream=out) == "json"  # not a terminal
    structlog.get_logger("relay").info("own line", n=1)
    logging.getLogger("aiohttp.server").warning("bad request from %s", "client")
    logging.getLogger("asyncpg.pool").debug("below the level: dropped")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    own, aiohttp_line, failure = parse(out.getvalue())
    assert own["event"] == "own line" and own["n"] == 1
    assert aiohttp_line["event"] == "bad request from client"
    assert aiohttp_line["logger"] == "aiohttp.server"
    assert aiohttp_line["level"] == "warning"
    assert failure["level"] == "error"
    assert "ValueError: boom" in failure["exception"]


def test_auto_is_console_on_a_terminal(restore_logging: None) -> None:
    out = _Terminal()
    assert configure("info", "auto", stream=out) == "console"
    structlog.get_logger("relay").info("for people", n=1)
    logging.getLogger("aiohttp.access").info("stdlib too")
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2  # (colours stripped: a terminal gets them)
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    assert "for people" in lines[0] and "n=1" in lines[0]
    assert "stdlib too" in lines[1]


def test_a_relay_that_cannot_start_says_why_in_a_json_line(tmp_path: Path) -> None:
    holder = RelayProcess(tmp_path / "data")
    holder.start()  # holds the data directory
    try:
        second = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "--port", "0"],
            env={**os.environ, "RELAY_DATA_DIR": str(tmp_path / "data")},
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        holder.stop()
    assert second.returncode == 1
    assert second.stdout == ""
    (line,) = parse(second.stderr)
    assert line["level"] == "error"
    assert line["event"] == "cannot start"
    assert "another relay is using" in line["reason"]
