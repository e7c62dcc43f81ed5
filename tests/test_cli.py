"""The command line as an operator meets it: a version, and start-up errors as one clean line
(a port in use; a --data-dir that is a file, unwritable, read-only or not a store; a database
the schema cannot go into)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from relay import __version__
from relay.datadir import prepare
from tests.pg import fresh_database


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


def _one_line_refusal(*serve_args: str, code: int = 2) -> str:
    """`relay serve` that stops at start-up: its exit code, and its whole stderr one line."""
    done = _relay("serve", "--port", "0", *serve_args)
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@contextlib.contextmanager
def _unwritable(path: Path) -> Iterator[None]:
    """``path`` this user cannot write: mode bits for a user, the immutable flag for root (who
    ignores mode bits); skips where the file system has no such flag (e.g. tmpfs)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("root ignores mode bits, and chattr is missing")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip(f"chattr +i is not supported where {path} is")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    line = _one_line_refusal("--data-dir", str(tmp_path / "file"))
    assert line == f"relay: --data-dir {tmp_path / 'file'}: not a directory"
    below = tmp_path / "file" / "data"
    line = _one_line_refusal("--data-dir", str(below))
    assert line == f"relay: --data-dir {below}: {tmp_path / 'file'} is not a directory"


def test_an_unwritable_data_dir_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with _unwritable(data):
        line = _one_line_refusal("--data-dir", str(data))
        assert line.startswith(f"relay: --data-dir {data}: cannot write in it: ")
        below = data / "missing" / "parent"
        line = _one_line_refusal("--data-dir", str(below))
    assert line.startswith(f"relay: --data-dir {below}: cannot create it in {data}: ")


def test_an_unwritable_store_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "relay.sqlite3").touch()
    with _unwritable(tmp_path / "relay.sqlite3"):
        line = _one_line_refusal("--data-dir", str(tmp_path))
    assert line.startswith(f"relay: --data-dir {tmp_path}: cannot write relay.sqlite3: ")


def test_a_data_dir_on_a_read_only_file_system_is_one_line(tmp_path: Path) -> None:
    """A read-only tmpfs mounted in a mount namespace of the relay's own (unshare)."""
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-rm"]
    mount = 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"'
    probe = [*unshare, "sh", "-c", mount, str(tmp_path), "true"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("cannot mount a read-only file system here (unshare)")
    done = subprocess.run(
        [*unshare, "sh", "-c", mount, str(tmp_path), sys.executable, "-m", "relay", "serve",
         "--port", "0", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"relay: --data-dir {tmp_path / 'data'}: cannot create it in {tmp_path}: "
        "Read-only file system"
    ]


def test_a_data_dir_that_is_not_a_store_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "relay.sqlite3").write_bytes(b"not a database " * 100)
    line = _one_line_refusal("--data-dir", str(tmp_path), "--log-format", "json", code=1)
    assert "Traceback" not in line
    reason = f"cannot open {tmp_path / 'relay.sqlite3'}: file is not a database"
    assert json.loads(line)["reason"] == reason


def test_missing_parents_of_the_data_dir_are_made(tmp_path: Path) -> None:
    prepare(str(tmp_path / "a" / "b" / "data"))
    assert (tmp_path / "a" / "b" / "data").is_dir()
    assert list((tmp_path / "a" / "b" / "data").iterdir()) == []  # the write probe is gone


def test_a_database_the_schema_cannot_go_into_is_one_line(pg_admin_url: str) -> None:
    """Any other failure while the store opens (here the migration meets a table of the same
    name that is not Relay's) is one line too, naming the error."""

    async def clash(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE relay_streams (x int)")
        finally:
            await conn.close()

    with fresh_database(pg_admin_url) as url:  # empty: no Relay schema yet
        asyncio.run(clash(url))
        line = _one_line_refusal("--database-url", url, "--log-format", "json", code=1)
    assert json.loads(line)["reason"] == (
        'DuplicateTableError: relation "relay_streams" already exists'
    )
