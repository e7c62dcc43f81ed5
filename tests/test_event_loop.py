"""The event loop: ``relay serve`` runs on uvloop through ``asyncio.Runner(loop_factory=...)``
(no deprecated policy or ``uvloop.install``), and the in-process suite runs on whichever loop
``RELAY_TEST_LOOP`` selects (tests/conftest.py), so the HTTP tests can be run on uvloop too."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import uvloop
from pytest_aiohttp import AiohttpClient

from relay import cli
from relay.app import make_app
from relay.config import Config

ROOT = Path(__file__).parent.parent


async def test_the_app_under_test_runs_on_the_selected_loop(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """The test server serves in the test's own loop, so the loop the relay's handlers run on
    is the one this test sees (a route added to the app would never be reached: the relay's
    Front owns every path)."""
    client = await aiohttp_client(make_app(Config(data_dir=str(tmp_path))))
    response = await client.put("/v1/stream/x", headers={"Content-Type": "text/plain"})
    assert response.status == 201  # the relay answers in this loop
    expected = "uvloop.Loop" if os.environ.get("RELAY_TEST_LOOP") == "uvloop" else None
    served_on = cli.loop_name(asyncio.get_running_loop())
    if expected is None:
        assert served_on.startswith("asyncio."), served_on
    else:
        assert served_on == expected


def test_serve_uses_uvloop_through_the_runner() -> None:
    factory = cli.loop_factory()
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert cli.loop_name(runner.get_loop()) == "uvloop.Loop"


def test_no_deprecated_loop_installation_remains() -> None:
    """``uvloop.install()`` and event-loop policies are deprecated from Python 3.12 on."""
    banned = ("uvloop.install", "set_event_loop_policy", "EventLoopPolicy")
    for folder in ("relay", "protocol", "tests", "conformance"):
        for source in (ROOT / folder).rglob("*.py"):
            if "node_modules" in source.parts or source == Path(__file__):
                continue
            text = source.read_text()
            assert not [word for word in banned if word in text], source
