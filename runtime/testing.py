"""Waiting helpers for tests and examples: poll a condition with a deadline.

No state is kept. Use these where no event exists to wait on (another process's
files, a batch system, a remote cluster's membership): they poll with a growing
interval up to ``max_interval`` and fail, naming what was awaited, at the deadline,
instead of each test writing its own sleep loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["async_wait_until", "wait_for_path", "wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    what: str = "a condition",
    timeout: float = 60.0,
    max_interval: float = 0.1,
) -> T:
    """Return ``predicate()``'s first true value; raise ``TimeoutError`` at the deadline.

    Examples
    --------
    >>> wait_until(lambda: 42, "the answer")
    42
    """
    deadline = time.monotonic() + timeout
    interval = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 2, max_interval)


def wait_for_path(path: str | os.PathLike[str], timeout: float = 60.0, value: Any = None) -> Any:
    """Wait until ``path`` exists and return ``value`` (usable as a task a test releases)."""
    wait_until(lambda: os.path.exists(path), f"{os.fspath(path)} to exist", timeout, 0.02)
    return value


async def async_wait_until(
    predicate: Callable[[], T],
    what: str = "a condition",
    timeout: float = 60.0,
    max_interval: float = 0.05,
) -> T:
    """:func:`wait_until` for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    interval = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
        interval = min(interval * 2, max_interval)
