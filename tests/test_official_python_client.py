"""The official Python client (PyPI ``durable-streams``) against a real relay process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from durable_streams import DurableStream, DurableStreamError, stream

from tests.auth_helpers import AUDIENCE, jwks, token, write_json
from tests.relay_process import RelayProcess


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    process = RelayProcess(Path(tmp_path_factory.mktemp("client")), "--long-poll-timeout", "1")
    process.start()
    yield process
    process.stop()


def test_json_stream_written_and_read_by_the_client(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/client-json"
    with DurableStream.create(url, content_type="application/json") as handle:
        for i in range(20):
            handle.append({"token": i})
    with stream(url, live=False) as response:
        items = response.read_json()
    assert items == [{"token": i} for i in range(20)]


def test_client_resumes_from_an_offset_it_was_given(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/client-resume"
    with DurableStream.create(url, content_type="text/plain") as handle:
        handle.append("hello ")
        middle = handle.head().offset
        handle.append("world")
    with stream(url, offset=middle, live=False) as response:
        assert response.read_text() == "world"


def test_client_tails_live_appends(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/client-live"
    received: list[object] = []

    def consume() -> None:
        # The client omits offset unless given one; live reads require it (section 5.7).
        with stream(url, offset="-1", live="long-poll") as response:
            for item in response.iter_json():
                received.append(item)
                if len(received) == 5:
                    return

    with DurableStream.create(url, content_type="application/json") as handle:
        reader = threading.Thread(target=consume)
        reader.start()
        for i in range(5):
            handle.append({"live": i})
    reader.join(timeout=20)
    assert not reader.is_alive()
    assert received == [{"live": i} for i in range(5)]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """A relay with access control on, trusting the test key ed-1."""
    root = Path(tmp_path_factory.mktemp("guarded"))
    write_json(root / "jwks.json", jwks("ed-1"))
    flags = ("--auth-jwt-keys", str(root / "jwks.json"), "--auth-audience", AUDIENCE)
    process = RelayProcess(root / "data", "--long-poll-timeout", "1", *flags)
    process.start()
    yield process
    process.stop()


def test_client_passes_a_token_and_a_wrong_one_is_refused(guarded: RelayProcess) -> None:
    url = f"{guarded.url}/v1/stream/chat/python-client"
    writer = token([{"path": "chat/**", "actions": ["admin", "append"]}])
    reader = token([{"path": "chat/**", "actions": ["read"]}])
    with pytest.raises(DurableStreamError) as refused:
        DurableStream.create(url, content_type="application/json")
    assert refused.value.status == 401
    with pytest.raises(DurableStreamError) as refused:
        DurableStream.create(
            url, content_type="application/json", headers={"Authorization": f"Bearer {reader}"}
        )
    assert refused.value.status == 403
    # A callable header value is resolved per request (how a client refreshes its token).
    with DurableStream.create(
        url, content_type="application/json", headers={"Authorization": lambda: f"Bearer {writer}"}
    ) as handle:
        for i in range(5):
            handle.append({"token": i})
    with stream(url, live=False, headers={"Authorization": f"Bearer {reader}"}) as response:
        assert response.read_json() == [{"token": i} for i in range(5)]
    with (
        pytest.raises(DurableStreamError) as refused,
        stream(url, live=False, headers={"Authorization": "Bearer wrong"}) as response,
    ):
        response.read_json()
    assert refused.value.status == 401
