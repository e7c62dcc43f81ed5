"""Waiting in tests for a condition rather than for a length of time.

A fixed sleep is slow on a fast machine and flaky on a loaded one; these poll the condition the
sleep was hoping for, return as soon as it holds, and fail with a message naming it when it never
does. The timeout bounds a failure only: nothing asserts how fast the condition came.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

TIMEOUT = 10.0
"""Seconds before a condition that never holds fails the test (generous: CI machines are busy)."""


class _Deadline:
    """When polling ``condition`` gives up, and the failure that names it."""

    def __init__(self, condition: object, timeout: float, what: str | None) -> None:
        self.at = time.monotonic() + timeout
        name = what or getattr(condition, "__qualname__", repr(condition))
        self.failure = f"{name} did not hold within {timeout} s"

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise AssertionError(self.failure)


async def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = TIMEOUT,
    interval: float = 0.01,
    what: str | None = None,
) -> T:
    """Yield to the event loop until ``condition()`` (a gauge, a counter, a flag) is truthy;
    returns that value."""
    deadline = _Deadline(condition, timeout, what)
    while not (result := condition()):
        deadline.check()
        await asyncio.sleep(interval)
    return result


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = TIMEOUT,
    interval: float = 0.05,
    what: str | None = None,
) -> T:
    """Like ``wait_for`` for a check that must await (a request, a query); returns its first
    truthy result."""
    deadline = _Deadline(check, timeout, what)
    while not (result := await check()):
        deadline.check()
        await asyncio.sleep(interval)
    return result


def wait_for_sync(
    condition: Callable[[], T | None],
    *,
    timeout: float = TIMEOUT,
    interval: float = 0.05,
    what: str | None = None,
) -> T:
    """``wait_for`` for code with no event loop (subprocesses, the conformance suite): blocks
    between polls."""
    deadline = _Deadline(condition, timeout, what)
    while not (result := condition()):
        deadline.check()
        time.sleep(interval)
    return result


def wait_for_process(
    proc: subprocess.Popen[Any],
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    detail: Callable[[], str] = lambda: "",
) -> None:
    """Until a server process is ``ready()`` (listening, healthy); fails at once, with
    ``detail()`` (its log), if the process exits first."""

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode} {detail()}".rstrip())
        return ready()

    wait_for_sync(up, timeout=timeout, what=what)
