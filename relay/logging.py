"""Structured logging: every line the process writes goes through structlog, in one format.

Relay's own loggers are structlog's (a filtering bound logger: a filtered-out level costs a
no-op method call). The standard library's loggers (aiohttp's, asyncpg's, anything else) are
routed through ``structlog.stdlib.ProcessorFormatter`` with the same renderer, so a log pipeline
sees one format. JSON lines are rendered with orjson. Both write through one :class:`LineWriter`,
which writes each event-loop turn's lines with one call.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


class _Timestamp:
    """ISO 8601 UTC with milliseconds, ``2026-01-02T03:04:05.678Z``. The part up to the second
    is formatted once a second: structlog's TimeStamper builds a datetime per line, which was
    the largest cost of an access log line (2.8 of 9 us)."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # (second, its text), swapped whole: threads log too

    def __call__(self, _logger: Any, _name: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        event["timestamp"] = f"{cached[1]}.{int((now - second) * 1000):03d}Z"
        return event


class LineWriter:
    """The sink for every rendered line: lines logged on an event loop are written together
    when the loop turn ends (one ``write`` for all the requests a turn answered), others and
    errors at once.

    Measured with ``relay bench --scenarios append`` (embedded store, 16 connections): a
    write and flush per access line cost about 60 us of server CPU per append, rendering the
    line about 7 us; writing once per turn brings the access log's cost within the run-to-run
    noise. A ``kill -9`` can lose at most the lines of the turn it interrupts.
    """

    def __init__(self, out: TextIO | None) -> None:
        self._out = out  # None: whatever sys.stderr is at write time (tests swap it)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._scheduled = False
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        with self._lock:
            self._lines.append(message)
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: nobody would flush later
                loop = None
            else:
                self._scheduled = True
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    def urgent(self, message: str) -> None:
        """An error: written now, with whatever is buffered before it."""
        with self._lock:
            self._lines.append(message)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            if not self._lines:
                return
            text = "\n".join(self._lines) + "\n"
            self._lines.clear()
            out = self._out if self._out is not None else sys.stderr
            try:
                out.write(text)
                out.flush()
            except (OSError, ValueError):  # stderr gone (closed pipe, closed file): drop
                pass

    # structlog calls the method named like the level.
    debug = info = warning = log = msg
    error = critical = exception = fatal = err = urgent


class _Handler(logging.Handler):
    """Standard-library records, formatted by ProcessorFormatter, into the same writer."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.ERROR:
            self._writer.urgent(line)
        else:
            self._writer.msg(line)


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
    timestamp = _Timestamp()
    # Loggers bound before a later configure() (cache_logger_on_first_use) keep their writer;
    # with the default stream it follows sys.stderr, so their lines still land where expected.
    writer = LineWriter(stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    handler = _Handler(writer)
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
