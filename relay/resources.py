"""The process's own limits: open files.

Every connection, parked reader included, holds a file descriptor, and distributions still
start processes with a soft limit of 1,024 while the hard limit is far higher. Relay raises
its soft limit to the hard one at start-up and logs both, so the limit an operator meets is
the one they configured (``ulimit -Hn``, systemd's ``LimitNOFILE``), not an accident.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """The open-file limits before and after start-up."""

    before: int
    soft: int
    hard: int  # resource.RLIM_INFINITY is -1


def raise_open_files() -> OpenFiles:
    """Raise the soft RLIMIT_NOFILE to the hard limit (never lowers it; an infinite hard limit
    is capped at what the kernel takes for one process, ``/proc/sys/fs/nr_open``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return OpenFiles(soft, soft, hard)
        return OpenFiles(soft, target, hard)
    return OpenFiles(soft, soft, hard)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


FD_RESERVE = 256
"""Open files kept back from the connection cap when it follows the open-file limit: the
store, the log, webhook calls and listening sockets need some."""


def connection_cap() -> int:
    """``--max-connections 0``: the open-file limit (as raised) less ``FD_RESERVE``. Past
    the limit accept() fails with EMFILE, and every client, the health check included, waits
    in the kernel's backlog instead of being answered 503."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _nr_open() - FD_RESERVE
    return max(1, soft - FD_RESERVE)
