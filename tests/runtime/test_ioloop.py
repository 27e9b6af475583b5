"""Tests for runtime.ioloop: one background loop per process, run_sync from threads."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

import pytest

from runtime import ioloop
from runtime.ioloop import get_loop, in_loop_thread, run_sync


@pytest.fixture
def fresh_loop():
    ioloop._stop_loop()
    yield
    ioloop._stop_loop()


def test_get_loop_returns_one_running_loop_for_all_threads(fresh_loop):
    loops = []
    threads = [threading.Thread(target=lambda: loops.append(get_loop())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(loop) for loop in loops}) == 1
    assert loops[0] is get_loop()
    assert loops[0].is_running()


def test_run_sync_returns_the_result_from_the_loop_thread(fresh_loop):
    async def where() -> bool:
        return in_loop_thread()

    assert run_sync(where()) is True
    assert not in_loop_thread()


def test_run_sync_raises_the_coroutine_exception(fresh_loop):
    async def fails() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        run_sync(fails())


def test_run_sync_timeout_cancels_the_coroutine(fresh_loop):
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        run_sync(forever(), timeout=0.05)
    assert cancelled.wait(10)


def test_run_sync_from_the_loop_thread_refuses_instead_of_deadlocking(fresh_loop):
    async def answer() -> str:
        return "x"

    async def nested() -> str:
        inner = answer()  # a coroutine handed to run_sync, never awaited here
        try:
            run_sync(inner)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    assert "would deadlock" in run_sync(nested(), timeout=10)


def test_a_stopped_loop_is_replaced_on_next_use(fresh_loop):
    first = get_loop()
    ioloop._stop_loop()
    assert first.is_closed()
    second = get_loop()
    assert second is not first and second.is_running()


def _child_uses_loop(queue: multiprocessing.Queue) -> None:
    async def answer() -> int:
        return 42

    queue.put(run_sync(answer(), timeout=10))


def test_forked_child_gets_a_loop_of_its_own(fresh_loop):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    get_loop()  # the parent's loop thread exists and is not inherited by the child
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_uses_loop, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=30) == 42
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
