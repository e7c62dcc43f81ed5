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
    print(f"chat backend on http://{settings.host}:{settings.port}/", flush=True)
    web.run_app(make_app(settings), host=settings.host, port=settings.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
