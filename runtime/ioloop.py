"""The process-wide background asyncio loop used by synchronous callers.

Users call the distributed client synchronously (``client.submit(...)``,
``future.result()``), while its network I/O, and the in-process scheduler of a
``LocalCluster``, run on asyncio. This module keeps exactly one event loop per process
running in a daemon thread, started on first use, and lets any other thread run a
coroutine on it (:func:`run_sync`).

State kept here, guarded by a lock:

- the loop and its thread, created lazily by :func:`get_loop`;
- the pid that created them: a forked child inherits the loop object but not the
  thread driving it, so a pid change means "start a fresh loop in this process".

One loop per process (rather than one per client) keeps the scheduler and the client
on one thread, so they exchange messages without crossing threads or taking the GIL
back and forth.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["get_loop", "in_loop_thread", "run_sync"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None


def _run_forever(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    try:
        loop.run_forever()
    finally:
        loop.close()


def get_loop() -> asyncio.AbstractEventLoop:
    """Return the process-wide background event loop, starting it on first use.

    The loop runs in a daemon thread named ``hpc-ioloop`` for the rest of the process
    (or until stopped by :func:`_stop_loop`, which only tests use). Safe to call from
    any thread, and after ``fork``: the child gets a loop of its own.

    Returns
    -------
    asyncio.AbstractEventLoop
        A running loop. Schedule work on it with :func:`run_sync` or
        ``loop.call_soon_threadsafe``; never call its methods directly from another
        thread.
    """
    global _loop, _thread, _pid
    loop = _loop
    if loop is not None and _pid == os.getpid() and not loop.is_closed():
        return loop
    with _lock:
        if _loop is not None and _pid == os.getpid() and not _loop.is_closed():
            return _loop
        loop = asyncio.new_event_loop()
        started = threading.Event()
        thread = threading.Thread(
            target=_run_forever, args=(loop, started), name="hpc-ioloop", daemon=True
        )
        thread.start()
        started.wait()
        _loop, _thread, _pid = loop, thread, os.getpid()
        return loop


def in_loop_thread() -> bool:
    """Return True when called from the thread that runs the background loop."""
    return _thread is not None and _pid == os.getpid() and threading.current_thread() is _thread


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on the background loop and wait for its result.

    Parameters
    ----------
    coro
        The coroutine object to run, e.g. ``comm.read()``.
    timeout
        Seconds to wait; None waits forever. On timeout the coroutine is cancelled.

    Returns
    -------
    The coroutine's result; its exception is raised here.

    Raises
    ------
    RuntimeError
        When called from the loop's own thread (that would deadlock: await the
        coroutine there instead).
    TimeoutError
        When ``timeout`` passed first.
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError(
            "run_sync() called from the hpc-ioloop thread would deadlock; "
            "await the coroutine instead"
        )
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"operation did not finish within {timeout} s") from None
    except BaseException:
        # KeyboardInterrupt while waiting: do not leave the coroutine running.
        future.cancel()
        raise


def _stop_loop(timeout: float = 5.0) -> None:
    """Stop and close the background loop (tests only; the next use starts a new one)."""
    global _loop, _thread, _pid
    with _lock:
        loop, thread = _loop, _thread
        _loop = _thread = _pid = None
    if loop is None or thread is None or loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)
