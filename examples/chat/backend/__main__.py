"""``python -m examples.chat.backend``: serve the chat backend (the runner lives only here)."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from examples.chat.backend.app import make_app
from examples.chat.backend.config import SettingsError, read_settings


def main() -> int:
    try:
        settings = read_settings()
    except SettingsError as exc:
        print(f"chat backend: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = f"http://{settings.host}:{settings.port}/"

    def listening(_banner: str) -> None:
        """run_app calls this once the socket listens: only then is the URL true."""
        logging.getLogger("chat").info("backend on %s", url)

    web.run_app(make_app(settings), host=settings.host, port=settings.port, print=listening)
    return 0


if __name__ == "__main__":
    sys.exit(main())
