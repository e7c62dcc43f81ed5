"""Run real nginx with the shipped ``deploy/nginx/relay.conf`` in front of a test relay.

The deploy file is rendered, not rewritten: only its listen address, upstream address and the
two paths under /var change, and each must occur exactly once, so a test always runs what
``deploy/`` ships. nginx comes from the Debian package that ``scripts/install-nginx`` installs;
when it is missing the tests fail rather than skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from tests.relay_process import RelayProcess, free_port, listening
from tests.waits import wait_for_process, wait_for_sync

DEPLOY_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "relay.conf"

# Values in the deploy file that a test must change, and only these.
LISTEN = "listen 80;"
UPSTREAM = "server 127.0.0.1:4437;"
CACHE_PATH = "/var/cache/nginx/relay "
ACCESS_LOG = "/var/log/nginx/relay-access.log "

N = 20  # identical concurrent requests in a crowd

LOG_LINE = re.compile(
    r'"(?P<method>\S+) (?P<target>\S+) [^"]*" (?P<status>\d+) '
    r"cache=(?P<cache>\S*) upstream=(?P<upstream>\S+)"
)


def nginx_binary() -> str:
    """The nginx executable; a missing one is an error, never a skip."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):  # root's PATH may lack sbin
        found = "/usr/sbin/nginx"
    if found is None:
        raise RuntimeError("nginx is not installed: run scripts/install-nginx (scripts/test does)")
    return found


def render(deploy: str, *, port: int, relay_port: int, root: Path) -> str:
    """The deploy config with the test's addresses and paths substituted."""
    swaps = {
        LISTEN: f"listen 127.0.0.1:{port};",
        UPSTREAM: f"server 127.0.0.1:{relay_port};",
        CACHE_PATH: f"{root / 'cache'} ",
        ACCESS_LOG: f"{root / 'access.log'} ",
    }
    for old, new in swaps.items():
        count = deploy.count(old)
        if count != 1:
            raise AssertionError(f"deploy/nginx/relay.conf holds {old!r} {count} times, not once")
        deploy = deploy.replace(old, new)
    return deploy


def main_config(root: Path) -> str:
    """The top level that Debian's nginx.conf would provide, kept inside ``root``."""
    temps = "\n".join(
        f"    {name}_temp_path {root / 'tmp' / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach tmp_path
    return (
        f"{user}worker_processes 1;\n"
        f"pid {root / 'nginx.pid'};\n"
        f"error_log {root / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"{temps}\n"
        f"    access_log {root / 'default-access.log'};\n"
        f"    include {root / 'relay.conf'};\n"
        "}\n"
    )


@dataclass(frozen=True)
class Hit:
    """One request as nginx logged it."""

    method: str
    target: str
    status: int
    cache: str  # $upstream_cache_status: MISS, HIT, BYPASS, EXPIRED, REVALIDATED, ...
    upstream: bool  # the request (or its cache fill) reached Relay


class Nginx:
    """nginx in the foreground, as a child of the test, on a free port."""

    def __init__(self, root: Path, relay_port: int) -> None:
        self.root = root
        self.port = free_port()
        self.relay_port = relay_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        binary = nginx_binary()
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root / "tmp" / name).mkdir(parents=True, exist_ok=True)
        (self.root / "cache").mkdir(exist_ok=True)
        rendered = render(
            DEPLOY_CONF.read_text(), port=self.port, relay_port=self.relay_port, root=self.root
        )
        (self.root / "relay.conf").write_text(rendered)
        conf = self.root / "nginx.conf"
        conf.write_text(main_config(self.root))
        command = [binary, "-p", str(self.root), "-c", str(conf), "-e", "stderr"]
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        self.proc = subprocess.Popen([*command, "-g", "daemon off;"])
        ready = partial(listening, self.port)
        wait_for_process(self.proc, ready, timeout=timeout, what="nginx", detail=self.errors)

    def stop(self) -> None:
        """SIGTERM is nginx's fast shutdown; open long-polls are cut, which is fine here."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def errors(self) -> str:
        path = self.root / "error.log"
        return path.read_text() if path.exists() else ""

    def hits(self) -> list[Hit]:
        path = self.root / "access.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            found = LOG_LINE.search(line)
            if found is None:
                raise AssertionError(f"unexpected access log line: {line!r}")
            out.append(
                Hit(
                    method=found["method"],
                    target=found["target"],
                    status=int(found["status"]),
                    cache=found["cache"],
                    upstream=found["upstream"] != "-",
                )
            )
        return out

    def logged(self, target: str, count: int, timeout: float = 10.0) -> list[Hit]:
        """The log lines for ``target``, once ``count`` of them are written.

        nginx logs a request after its response is sent, so a client may see the response a
        moment before the line exists.
        """

        def found() -> list[Hit]:
            return [hit for hit in self.hits() if hit.target == target]

        def enough() -> list[Hit] | None:
            hits = found()
            return hits if len(hits) >= count else None

        try:
            return wait_for_sync(enough, timeout=timeout, what=f"{count} log lines for {target}")
        except AssertionError:
            return found()  # fewer: the caller's assertion shows which


@dataclass(frozen=True)
class Edge:
    """A relay and the nginx in front of it."""

    relay: RelayProcess
    nginx: Nginx

    def stream(self, name: str) -> str:
        return f"{self.nginx.url}/v1/stream/{name}"

    def upstream_count(self, target: str, requests: int) -> int:
        """How many of the ``requests`` logged for ``target`` reached Relay."""
        hits = self.nginx.logged(target, requests)
        assert len(hits) == requests, hits
        return sum(hit.upstream for hit in hits)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    async with session.request(method, url, headers=headers, data=data) as response:
        return Reply(response.status, response.headers, await response.read())


async def crowd(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    count: int = N,
) -> list[Reply]:
    """``count`` identical GETs at once."""
    return await asyncio.gather(*(call(session, "GET", url, headers) for _ in range(count)))


def target(url: str) -> str:
    """The request-target nginx logs for ``url``."""
    return URL(url, encoded=True).raw_path_qs
