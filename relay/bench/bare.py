"""The ``bare`` target: aiohttp on uvloop answering every request at once, storing nothing.

POST gets a fixed 204, everything else an empty 200. It does what any aiohttp server must
(parse the request, read the body, write a response), so it is the ceiling an aiohttp relay
can approach on one core. Run as ``python -m relay.bench.bare PORT``.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

_NO_CONTENT = 204


async def _answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=_NO_CONTENT if request.method == "POST" else 200)


async def _serve(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until SIGTERM ends the process


def main(port: int) -> None:
    try:
        import uvloop

        uvloop.run(_serve(port))
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        asyncio.run(_serve(port))


if __name__ == "__main__":
    main(int(sys.argv[1]))
