"""The official TypeScript client (npm ``@durable-streams/client``) against a real relay, on each
store: an IdempotentProducer streams a reply and closes it while a live subscriber reads along
(see conformance/official/ts-client-check.mjs)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.auth_helpers import ALL, AUDIENCE, jwks, token, write_json
from tests.relay_process import RelayProcess, on_store

OFFICIAL = Path(__file__).resolve().parent.parent / "conformance" / "official"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (OFFICIAL / "node_modules").is_dir(),
    reason="needs node and `npm ci` in conformance/official (scripts/test does both)",
)


@pytest.fixture(params=["sqlite", "postgres"])
def relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayProcess]:
    with on_store(request, tmp_path, "--long-poll-timeout", "2") as process:
        yield process


def test_typescript_producer_and_live_reader(relay: RelayProcess) -> None:
    result = subprocess.run(
        ["node", "ts-client-check.mjs", relay.url],
        cwd=OFFICIAL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 301 items" in result.stdout


def test_typescript_client_with_a_token(tmp_path: Path) -> None:
    """Access control on: the client passes a JWT through its ``headers`` option, and the
    script checks that a wrong or missing token is refused."""
    write_json(tmp_path / "jwks.json", jwks("ed-1"))
    flags = ("--auth-jwt-keys", str(tmp_path / "jwks.json"), "--auth-audience", AUDIENCE)
    process = RelayProcess(tmp_path / "data", "--long-poll-timeout", "2", *flags)
    process.start()
    try:
        result = subprocess.run(
            ["node", "ts-client-check.mjs", process.url, token([{"path": "*", "actions": ALL}])],
            cwd=OFFICIAL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        process.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 301 items live and in catch-up, with a token" in result.stdout
