"""Structured logging: every line the process writes goes through structlog, in one format.

Relay's own loggers are structlog's (a filtering bound logger writing straight to stderr: a
filtered-out level costs a no-op method call). The standard library's loggers (aiohttp's,
asyncpg's, anything else) are routed through ``structlog.stdlib.ProcessorFormatter`` with the
same renderer, so a log pipeline sees one format. JSON lines are rendered with orjson.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import Processor


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` is console on a terminal (people read it) and JSON elsewhere (pipelines do)."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure(level: str, fmt: str, stream: TextIO | None = None) -> str:
    """Set up structlog and route the standard library through it; returns the format used."""
    out = stream if stream is not None else sys.stderr
    resolved = resolve_format(fmt, out)
    numeric = getattr(logging, level.upper())
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if resolved == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    timestamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.captureWarnings(True)
    return resolved
