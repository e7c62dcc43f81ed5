"""The embedded store's directory, made and probed before ``relay serve`` starts anything.

A directory that cannot be made or written would otherwise surface as a traceback from deep
in the store's start-up (``mkdir``, the lock file, SQLite's own open); here it is one
``ConfigError`` that names ``--data-dir`` and the reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from relay.config import ConfigError

STORE_FILES = ("relay.sqlite3", "relay.sqlite3-wal", "relay.sqlite3-shm", "relay.lock")
"""What the store opens for writing in the directory, where they exist already."""


def prepare(data_dir: str) -> None:
    """Make ``data_dir`` (and missing parents) and prove the store can write there.

    Raises ``ConfigError`` when it is not a directory, cannot be made, or it or one of its
    store files cannot be written (no permission, a read-only file system, an immutable file).
    """
    where = Path(data_dir)

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"--data-dir {data_dir}: {problem}")

    try:
        _make(where, refuse)
    except OSError as exc:  # e.g. a parent this user may not search
        raise refuse(f"{exc.strerror}: {exc.filename}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".relay-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise refuse(f"cannot write in it: {exc.strerror}") from None
    for name in STORE_FILES:
        try:
            os.close(os.open(where / name, os.O_RDWR))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise refuse(f"cannot write {name}: {exc.strerror}") from None


def _make(where: Path, refuse: Callable[[str], ConfigError]) -> None:
    if where.exists():
        if not where.is_dir():
            raise refuse("not a directory")
        return
    base = next(p for p in where.parents if p.exists())  # "/" or "." at the latest
    if not base.is_dir():
        raise refuse(f"{base} is not a directory")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise refuse(f"cannot create it in {base}: {exc.strerror}") from None
