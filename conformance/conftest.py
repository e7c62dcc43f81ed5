"""Black-box conformance suite: every test takes only a base URL.

``pytest conformance --server-url http://host:port`` runs it against any Durable Streams server
(ours, or the upstream reference server); without the option it starts a throwaway ``relay serve``.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.waits import wait_for_process


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--server-url",
        default=None,
        help="base URL of the server under test; default: start a local relay",
    )
    parser.addoption(
        "--database-url",
        default=None,
        help="when starting a local relay, keep its streams in this Postgres database",
    )
    parser.addoption(
        "--long-poll-timeout",
        type=float,
        default=1.0,
        help="the server's long-poll timeout in seconds (bounds how long tests wait)",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    given = request.config.getoption("--server-url")
    if given:
        yield str(given).rstrip("/")
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as data:
        timeout = str(request.config.getoption("--long-poll-timeout"))
        command = [sys.executable, "-m", "relay", "serve", "--port", str(port)]
        command += ["--data-dir", data, "--long-poll-timeout", timeout, "--log-level", "warning"]
        database_url = request.config.getoption("--database-url")
        if database_url:
            command += ["--database-url", str(database_url)]
        proc = subprocess.Popen(command, env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"

        def answering() -> bool:
            try:
                httpx.get(f"{url}/v1/stream/__probe__", timeout=1)
            except httpx.TransportError:
                return False
            return True

        try:
            wait_for_process(proc, answering, timeout=20, what="relay serve")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def long_poll_timeout(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--long-poll-timeout"))


@pytest.fixture
def client(long_poll_timeout: float) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=long_poll_timeout + 10) as session:
        yield session


_names = itertools.count()


@pytest.fixture
def new_stream(base_url: str, client: httpx.Client) -> Callable[..., str]:
    """Create a fresh stream and return its URL: ``new_stream("text/plain", body=b"...")``."""

    def create(content_type: str = "text/plain", body: bytes = b"", **headers: str) -> str:
        url = f"{base_url}/v1/stream/conformance-{uuid.uuid4().hex}-{next(_names)}"
        sent = {
            "Content-Type": content_type,
            **{k.replace("_", "-"): v for k, v in headers.items()},
        }
        response = client.put(url, content=body, headers=sent)
        assert response.status_code == 201, response.text
        return url

    return create
