"""A small TCP proxy for fault tests: put it between the relay and Postgres, then cut it.

``cut()`` drops every open connection and refuses new ones (the database "goes away");
``restore()`` listens again on the same port. ``freeze()`` keeps every connection open but
forwards nothing (a link that hangs), ``thaw()`` lets the held bytes through. Fault injection
lives here, never in the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0

    @classmethod
    def for_url(cls, url: str) -> tuple[TcpProxy, str]:
        """A proxy to the database at ``url``, and the URL that goes through it."""
        parts = urlsplit(url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 5432)
        netloc = (
            f"{parts.username}@127.0.0.1:{proxy.port}"
            if parts.username
            else (f"127.0.0.1:{proxy.port}")
        )
        return proxy, urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = [client_w]
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            writers.append(server_w)
            self._writers.add(server_w)
            self.connections += 1
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            for writer in writers:
                writer.transport.abort()
                self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()
