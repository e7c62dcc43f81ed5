"""The command line as an operator meets it: a version, and start-up errors as one clean line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from relay import __version__


def _relay(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_version_is_printed() -> None:
    done = _relay("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"relay {__version__}"


def test_a_port_in_use_is_one_error_line_without_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _relay(
            "serve", "--data-dir", str(tmp_path), "--port", str(port), "--log-format", "json"
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if '"error"' in line]
    assert len(errors) == 1
    assert "cannot listen on" in errors[0] and str(port) in errors[0]


def test_database_commands_offer_only_their_own_flags() -> None:
    for command in ("migrate", "revoke", "rotate-webhook-key"):
        done = _relay(command, "--help")
        assert done.returncode == 0
        assert "--database-url" in done.stdout
        assert "--long-poll-timeout" not in done.stdout  # a serve flag
        assert "--auth-api-keys" not in done.stdout
