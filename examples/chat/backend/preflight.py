"""``python3 -m examples.chat.backend.preflight PORT NAME [PORT NAME ...]``: are the ports free?

``examples/chat/run`` asks before it builds or starts anything, so a taken port is one line that
names the port and, where it can tell, what holds it, rather than a relay or backend dying after
the chat URL was printed. Standard library only: it runs on the system ``python3``, before the
virtual environment exists.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def is_free(port: int) -> bool:
    """Whether a server could listen on ``HOST:port`` now (with SO_REUSEADDR, as aiohttp binds,
    so connections in TIME_WAIT from an earlier run do not count as taken)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (any address), from /proc/net (Linux)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:  # 0A: LISTEN
                inodes.add(cols[9])
    return inodes


def holder(port: int) -> str:
    """``pid N (command)`` of the process listening on ``port``, if this user may see it."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) in wanted for fd in (proc / "fd").iterdir()):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                command = " ".join(a.decode(errors="replace") for a in argv if a)
                return f"pid {proc.name} ({command[:80]})"
        except OSError:  # another user's process, or gone while we looked
            continue
    return ""


def speaks_durable_streams(port: int) -> bool:
    """Whether a relay answers there: its ``/healthz`` is ``{"status": "ok"}`` and its CORS
    headers expose the protocol's ``Stream-Next-Offset``."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1) as resp:
            exposed = resp.headers.get("Access-Control-Expose-Headers", "")
            return bool(json.loads(resp.read()) == {"status": "ok"}) and (
                "Stream-Next-Offset" in exposed
            )
    except (OSError, ValueError):
        return False


def explain(port: int, role: str) -> str:
    """One line: which port is taken, by what, and how to get past it."""
    what = "a relay" if speaks_durable_streams(port) else "another process"
    who = holder(port)
    if who:
        what += f", {who}"
    flag = "--relay-port" if role == "relay" else "--port"
    return (
        f"examples/chat/run: port {port}, for the {role}, is taken by {what}; "
        f"stop it or choose another with {flag}"
    )


def main(argv: list[str]) -> int:
    roles = dict(zip(argv[1::2], argv[0::2], strict=True))  # role -> port
    if not all(port.isdigit() and 0 < int(port) < 65536 for port in roles.values()):
        print(f"examples/chat/run: not a port number in {argv}", file=sys.stderr)
        return 1
    if len(set(roles.values())) < len(roles):
        listed = ", ".join(f"{role} {port}" for role, port in roles.items())
        print(f"examples/chat/run: each needs its own port, got {listed}", file=sys.stderr)
        return 1
    for role, port in roles.items():
        if not is_free(int(port)):
            print(explain(int(port), role), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
