"""Tests of runtime.worker: the Worker server, driven by a fake scheduler and fake peers.

The fake scheduler is a plain authenticated listener that records what the worker
sends and lets a test send it scheduler messages, so each worker behaviour is checked
message by message, without the real scheduler's policy in the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from runtime import comm, config, ioloop, serialize, testing
from runtime.errors import (
    CommClosedError,
    ConfigError,
    HandshakeError,
    SchedulerError,
    SerializationError,
)
from runtime.rendezvous import write_scheduler_file
from runtime.worker import (
    Worker,
    WorkerStatus,
    main,
    parse_memory_limit,
    read_secret_file,
)
from tests.runtime.conftest import SaveProbe

TIMEOUT = 20.0
REPO = Path(__file__).resolve().parents[2]


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    """Run an async test body on a fresh loop, with a deadline."""
    return asyncio.run(asyncio.wait_for(body(), TIMEOUT))


# -------------------------------------------------------------------------------------
# Task functions (module level: the worker loads them by reference in this process).

_EVENTS: dict[str, threading.Event] = {}
_CALLS: dict[str, list[Any]] = {}


def _event(name: str) -> threading.Event:
    return _EVENTS.setdefault(name, threading.Event())


def wait_for_gate(name: str, value: Any) -> Any:
    if not _event(name).wait(TIMEOUT):
        raise TimeoutError(f"gate {name} never opened")
    return value


def record(name: str, value: Any, signal_after: int = 0) -> Any:
    calls = _CALLS.setdefault(name, [])
    calls.append(value)
    if signal_after and len(calls) == signal_after:
        _event(name).set()
    return value


def identity(x: Any) -> Any:
    return x


def fail_with(exc: BaseException) -> None:
    raise exc


class UnpicklableError(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()  # locks cannot be pickled


class TwoArgumentError(Exception):
    """Pickles, but cannot be unpickled: BaseException.__reduce__ passes one arg."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


def raise_unpicklable() -> None:
    raise UnpicklableError("the disk is full")


def raise_two_argument() -> None:
    raise TwoArgumentError("left", "right")


def task(key: Any, spec: Any, who_has: dict[Any, list[str]] | None = None, priority=(0,)) -> dict:
    return {
        "op": "compute-task",
        "key": key,
        "task": serialize.dumps(spec),
        "who_has": who_has or {},
        "priority": priority,
    }


# -------------------------------------------------------------------------------------
# Fakes


class FakeScheduler:
    """An authenticated listener that plays the scheduler's side of the worker link."""

    def __init__(self, secret: bytes | None = None, reply: dict | None = None) -> None:
        self.secret = secret or comm.new_secret()
        self.reply = reply or {"op": "ok"}
        self.registrations: list[dict] = []
        self.batches: list[list[dict]] = []
        self.comms: list[comm.Comm] = []
        self.by_address: dict[str, comm.Comm] = {}
        self.address = ""
        self._inbox: asyncio.Queue[dict] = asyncio.Queue()
        self._registered = asyncio.Condition()
        self._listener: comm.Listener | None = None

    async def __aenter__(self) -> FakeScheduler:
        self._listener = await comm.listen("tcp://127.0.0.1:0", self._serve, self.secret)
        self.address = self._listener.address
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Vanish: stop listening and drop every connection."""
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
        for c in self.comms:
            c.abort()

    async def _serve(self, c: comm.Comm) -> None:
        registration = (await c.read())[0]
        async with self._registered:
            self.registrations.append(registration)
            self._registered.notify_all()
        await c.write([self.reply])
        if self.reply.get("op") == "error":
            await c.close()
            return
        self.comms.append(c)
        self.by_address[registration["address"]] = c
        with contextlib.suppress(CommClosedError):
            while True:
                batch = await c.read()
                self.batches.append(batch)
                for msg in batch:
                    self._inbox.put_nowait(msg)

    async def wait_registrations(self, n: int) -> None:
        async with self._registered:
            await self._registered.wait_for(lambda: len(self.registrations) >= n)

    def send(self, *msgs: dict) -> None:
        self.comms[-1].write(list(msgs))

    async def expect(self, op: str) -> dict:
        """The next message with this op (others in between are skipped)."""
        while True:
            msg = await self._inbox.get()
            if msg["op"] == op:
                return msg


class FakePeer:
    """A peer holding ``data`` that answers get-data and records every request."""

    def __init__(self, data: dict, secret: bytes) -> None:
        self.data = data
        self.secret = secret
        self.requests: list[list] = []
        self.address = ""
        self._listener: comm.Listener | None = None

    async def __aenter__(self) -> FakePeer:
        self._listener = await comm.listen("tcp://127.0.0.1:0", self._serve, self.secret)
        self.address = self._listener.address
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._listener is not None
        self._listener.close()
        await self._listener.wait_closed()

    async def _serve(self, c: comm.Comm) -> None:
        with contextlib.suppress(CommClosedError):
            while True:
                replies = []
                for msg in await c.read():
                    keys = list(msg["keys"])
                    self.requests.append(keys)
                    found = {k: self.data[k] for k in keys if k in self.data}
                    replies.append({"op": "data", "data": found})
                await c.write(replies)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -------------------------------------------------------------------------------------
# Memory limits and secrets


def test_memory_limit_accepts_bytes_fractions_percent_auto_and_none() -> None:
    total = 8 * 10**9
    assert parse_memory_limit("2GB", total_memory=total) == 2 * 10**9
    assert parse_memory_limit("1 GiB", total_memory=total) == 2**30
    assert parse_memory_limit(10**9, total_memory=total) == 10**9
    assert parse_memory_limit(0.25, total_memory=total) == 2 * 10**9
    assert parse_memory_limit("50%", total_memory=total) == 4 * 10**9
    assert parse_memory_limit("auto", 2, total_memory=total, total_cores=8) == 2 * 10**9
    assert parse_memory_limit("auto", 16, total_memory=total, total_cores=8) == total
    for none in (None, 0, "0", "none", "None"):
        assert parse_memory_limit(none, total_memory=total) is None


def test_memory_limit_is_capped_at_the_machine_and_rejects_nonsense() -> None:
    assert parse_memory_limit("1TB", total_memory=10**9) == 10**9
    with pytest.raises(ConfigError, match="auto"):
        parse_memory_limit("lots", total_memory=10**9)
    with pytest.raises(ConfigError, match="negative"):
        parse_memory_limit(-5, total_memory=10**9)
    with pytest.raises(ConfigError, match="percentage"):
        parse_memory_limit("x%", total_memory=10**9)


def test_secret_file_holds_hex_or_is_a_scheduler_file(tmp_path: Path) -> None:
    secret = os.urandom(32)
    plain = tmp_path / "secret"
    plain.write_text(secret.hex() + "\n")
    plain.chmod(0o600)
    assert read_secret_file(plain) == secret
    sched = tmp_path / "scheduler.json"
    write_scheduler_file(sched, "tcp://127.0.0.1:1", secret)
    assert read_secret_file(sched) == secret


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o644)
    with pytest.raises(SchedulerError, match="chmod 600"):
        read_secret_file(path)
    with pytest.raises(SchedulerError, match="cannot read"):
        read_secret_file(tmp_path / "missing")


# -------------------------------------------------------------------------------------
# Registration and life cycle


def test_worker_registers_its_address_threads_memory_and_versions() -> None:
    async def body() -> None:
        async with (
            FakeScheduler() as s,
            Worker(s.address, secret=s.secret, nthreads=3, memory_limit="1GB", name="w1") as w,
        ):
            await s.wait_registrations(1)
            reg = s.registrations[0]
            assert reg["op"] == "register-worker"
            assert reg["address"] == w.address and reg["address"].startswith("tcp://127.0.0.1:")
            assert (reg["name"], reg["nthreads"], reg["memory_limit"]) == ("w1", 3, 10**9)
            assert reg["pid"] == os.getpid() and reg["host"] == socket.gethostname()
            assert reg["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
            assert w.status is WorkerStatus.RUNNING

    run(body)


def test_worker_closes_when_the_scheduler_says_close() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send({"op": "close"})
            await w.finished()
            assert w.status is WorkerStatus.CLOSED
            assert w.close_reason == "scheduler-close"

    run(body)


def test_close_requested_again_while_closing_does_not_stall_the_close() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            loop = asyncio.get_running_loop()
            tearing_down = asyncio.Event()
            teardown = w._teardown

            async def observed_teardown() -> None:
                tearing_down.set()  # the first close is under way
                await teardown()

            w._teardown = observed_teardown  # type: ignore[method-assign]
            started = loop.time()
            w.request_close("scheduler closing")
            await tearing_down.wait()
            assert w.status is WorkerStatus.CLOSING
            w.request_close("signal SIGTERM")  # e.g. SIGTERM arriving meanwhile
            await w.finished()
            assert w.close_reason == "scheduler closing"
            # A second close task used to be awaited by the first: a 2 s stall.
            assert loop.time() - started < 1.0

    run(body)


def test_start_fails_naming_the_address_when_no_scheduler_listens() -> None:
    async def body() -> None:
        address = f"tcp://127.0.0.1:{closed_port()}"
        worker = Worker(address, secret=os.urandom(32), death_timeout=0.3)
        with pytest.raises(SchedulerError, match=address):
            await worker.start()
        assert worker.status is WorkerStatus.CLOSED

    run(body)


def test_wrong_secret_fails_at_once_instead_of_retrying() -> None:
    async def body() -> None:
        async with FakeScheduler() as s:
            worker = Worker(s.address, secret=os.urandom(32), death_timeout=600)
            with pytest.raises(SchedulerError, match="secret"):
                await asyncio.wait_for(worker.start(), 10)

    run(body)


def test_registration_refused_by_the_scheduler_is_an_error_with_its_message() -> None:
    async def body() -> None:
        reply = {"op": "error", "message": "numpy: 1.26 here, 2.0 on the peer"}
        async with FakeScheduler(reply=reply) as s:
            worker = Worker(s.address, secret=s.secret, death_timeout=600)
            with pytest.raises(SchedulerError, match="numpy: 1.26 here"):
                await asyncio.wait_for(worker.start(), 10)

    run(body)


def test_worker_exits_when_the_scheduler_is_gone_past_death_timeout() -> None:
    async def body() -> None:
        async with FakeScheduler() as s:
            w = Worker(s.address, secret=s.secret, death_timeout=0.5)
            await w.start()
            await s.stop()
            await asyncio.wait_for(w.finished(), 10)
            assert w.close_reason == "death-timeout"

    run(body)


def test_worker_registers_again_after_a_dropped_connection_with_a_clean_slate() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret, death_timeout=10) as w:
            s.send(task("a", (identity, 1)))
            await s.expect("task-finished")
            assert w.data == {"a": 1}
            s.comms[-1].abort()
            await s.wait_registrations(2)
            assert s.registrations[1]["address"] == w.address
            assert w.data == {}
            s.send(task("b", (identity, 2)))
            assert (await s.expect("task-finished"))["key"] == "b"

    run(body)


def test_worker_closes_when_its_parent_process_is_gone() -> None:
    async def body() -> None:
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        async with FakeScheduler() as s:
            w = Worker(s.address, secret=s.secret, parent_pid=child.pid, heartbeat_interval=0.05)
            await w.start()
            await asyncio.wait_for(w.finished(), 10)
            assert w.close_reason == "parent-gone"

    run(body)


def test_heartbeats_carry_memory_and_task_counts() -> None:
    async def body() -> None:
        async with (
            FakeScheduler() as s,
            Worker(s.address, secret=s.secret, heartbeat_interval=0.05),
        ):
            metrics = (await s.expect("heartbeat"))["metrics"]
            assert metrics["memory"] > 0
            assert {"executing", "ready", "in_memory", "nbytes", "time"} <= set(metrics)

    run(body)


# -------------------------------------------------------------------------------------
# Running tasks


def test_result_stays_on_the_worker_and_completion_reports_size_and_type() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send(task("a", (operator.add, 1, 2)))
            done = await s.expect("task-finished")
            assert done["key"] == "a" and done["type"] == "int" and done["nbytes"] > 0
            assert done["start"] <= done["stop"]
            assert w.data == {"a": 3}
            s.send(task(("b", 0), (operator.mul, "a", 10), who_has={"a": [str(w.address)]}))
            assert (await s.expect("task-finished"))["key"] == ("b", 0)
            assert w.data[("b", 0)] == 30

    run(body)


def test_a_literal_equal_to_another_held_key_is_not_substituted() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send(task("a", (identity, 1)))
            await s.expect("task-finished")
            s.send(task("b", (identity, "a")))  # "a" is not a declared dependency
            await s.expect("task-finished")
            assert w.data["b"] == "a"

    run(body)


def test_completions_finishing_together_are_reported_in_one_wakeup_and_one_batch() -> None:
    n = 200

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret, nthreads=1) as w:
            name = "batch-completions"
            before = w.completion_wakeups
            w._handle_scheduler_messages([task(("t", i), (record, name, i, n)) for i in range(n)])
            # Block the loop until the pool ran every task: all completions queue up.
            assert _event(name).wait(TIMEOUT)
            keys = {(await s.expect("task-finished"))["key"] for _ in range(n)}
            assert keys == {("t", i) for i in range(n)}
            assert w.completion_wakeups - before == 1
            finished_batches = [b for b in s.batches if b[0]["op"] == "task-finished"]
            assert [len(b) for b in finished_batches] == [n]

    run(body)


def test_ready_tasks_run_in_priority_order() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret, nthreads=1) as w:
            name = "prio-order"
            prios = [3, 0, 4, 1, 2]
            w._handle_scheduler_messages(
                [task(("p", p), (record, name, p), priority=(p,)) for p in prios]
            )
            for _ in prios:
                await s.expect("task-finished")
            assert _CALLS[name] == [0, 1, 2, 3, 4]

    run(body)


def test_freed_tasks_do_not_run_or_report_and_freed_data_is_dropped() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret, nthreads=1) as w:
            gate, name = "free-gate", "free-record"
            s.send(task("x", (identity, 1)))
            await s.expect("task-finished")
            w._handle_scheduler_messages(
                [task("running", (wait_for_gate, gate, "r")), task("queued", (record, name, "q"))]
            )
            w._handle_scheduler_messages([{"op": "free-keys", "keys": ["running", "queued", "x"]}])
            assert "x" not in w.data
            w._handle_scheduler_messages([task("after", (record, name, "after"))])
            _event(gate).set()
            done = await s.expect("task-finished")
            assert done["key"] == "after"
            assert _CALLS[name] == ["after"]
            assert set(w.data) == {"after"}

    run(body)


# -------------------------------------------------------------------------------------
# Errors


def test_task_exception_comes_back_pickled_with_traceback_and_worker_identity() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send(task("bad", (fail_with, KeyError("no such column"))))
            err = await s.expect("task-erred")
            exc = serialize.loads(err["exception"])
            assert type(exc) is KeyError and exc.args == ("no such column",)
            assert err["exc_type"] == "builtins.KeyError"
            assert "in fail_with" in err["traceback"] and "KeyError" in err["traceback"]
            assert "_run_ready" not in err["traceback"]
            assert (err["worker"], err["pid"], err["host"]) == (
                w.address,
                os.getpid(),
                socket.gethostname(),
            )
            assert err["retryable"] is False
            assert "bad" not in w.data

    run(body)


def test_oserror_and_its_subclasses_are_retryable_by_default() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret):
            s.send(task("io", (fail_with, FileNotFoundError("/scratch/x"))))
            err = await s.expect("task-erred")
            assert err["retryable"] is True
            assert isinstance(serialize.loads(err["exception"]), FileNotFoundError)

    run(body)


class TransientError(Exception):
    pass


def test_retryable_exception_types_come_from_config() -> None:
    retry = ["KeyError", f"{__name__}.TransientError", "no_such_module.Error"]

    async def body() -> None:
        async with FakeScheduler() as s:
            with config.set({"distributed.retry-exceptions": retry}):
                worker = Worker(s.address, secret=s.secret)
            async with worker:
                cases = {"k": KeyError("x"), "t": TransientError(), "o": OSError("not listed")}
                for key, exc in cases.items():
                    s.send(task(key, (fail_with, exc)))
                    err = await s.expect("task-erred")
                    assert err["retryable"] is (key != "o"), key

    run(body)


def test_unpicklable_exception_arrives_as_its_builtin_base_with_type_and_message() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret):
            s.send(task("u", (raise_unpicklable,)))
            err = await s.expect("task-erred")
            exc = serialize.loads(err["exception"])
            assert type(exc) is ValueError
            assert "UnpicklableError" in str(exc) and "the disk is full" in str(exc)
            assert err["exc_type"].endswith("UnpicklableError")
            assert "raise_unpicklable" in err["traceback"]

            s.send(task("t", (raise_two_argument,)))
            err = await s.expect("task-erred")
            exc = serialize.loads(err["exception"])
            assert type(exc) is Exception and "left and right" in str(exc)

    run(body)


# -------------------------------------------------------------------------------------
# Dependencies from peers


def test_dependencies_held_by_one_peer_are_fetched_in_one_request() -> None:
    async def body() -> None:
        async with (
            FakeScheduler() as s,
            Worker(s.address, secret=s.secret) as w,
            FakePeer({"x": 1, "y": 2, "z": 3}, s.secret) as peer,
        ):
            who_has = {k: [peer.address] for k in "xyz"}
            s.send(task("sum", (sum, ["x", "y", "z"]), who_has=who_has))
            assert (await s.expect("task-finished"))["key"] == "sum"
            assert w.data == {"sum": 6}  # the fetched copies were dropped after use
            assert [sorted(r) for r in peer.requests] == [["x", "y", "z"]]

    run(body)


def test_missing_dependency_is_reported_and_fetched_from_another_holder() -> None:
    async def body() -> None:
        async with (
            FakeScheduler() as s,
            Worker(s.address, secret=s.secret) as w,
            FakePeer({}, s.secret) as empty,
            FakePeer({"x": 41}, s.secret) as full,
        ):
            s.send(task("y", (operator.add, "x", 1), who_has={"x": [empty.address, full.address]}))
            missing = await s.expect("missing-data")
            assert (missing["key"], missing["worker"]) == ("x", empty.address)
            assert (await s.expect("task-finished"))["key"] == "y"
            assert w.data["y"] == 42

    run(body)


def test_unreachable_holder_is_skipped_for_the_next_one() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            dead = f"tcp://127.0.0.1:{closed_port()}"
            async with FakePeer({"x": 1}, s.secret) as alive:
                w.peer_timeout = 0.2
                s.send(task("y", (identity, "x"), who_has={"x": [dead, alive.address]}))
                assert (await s.expect("missing-data"))["worker"] == dead
                await s.expect("task-finished")
                assert w.data["y"] == 1

    run(body)


def test_task_whose_dependency_no_holder_has_is_left_to_the_scheduler() -> None:
    async def body() -> None:
        async with (
            FakeScheduler() as s,
            Worker(s.address, secret=s.secret) as w,
            FakePeer({}, s.secret) as empty,
        ):
            s.send(task("y", (identity, "x"), who_has={"x": [empty.address]}))
            assert (await s.expect("missing-data"))["key"] == "x"
            assert "y" not in w._tasks  # given up in the same step that reported it
            # Sent again later (the scheduler recomputed x elsewhere), it runs.
            async with FakePeer({"x": 5}, s.secret) as full:
                s.send(task("y", (identity, "x"), who_has={"x": [full.address]}))
                await s.expect("task-finished")
            assert w.data == {"y": 5}

    run(body)


# -------------------------------------------------------------------------------------
# The peer server: get-data, update-data, run


def test_peers_get_data_scatter_with_update_data_and_call_run() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            assert w.address is not None
            c = await comm.connect(w.address, s.secret)
            try:
                await c.write([{"op": "update-data", "data": {"x": 41, ("y", 1): [1, 2]}}])
                ack = (await c.read())[0]
                assert ack["op"] == "ok" and set(ack["nbytes"]) == {"x", ("y", 1)}
                await c.write([{"op": "get-data", "keys": ["x", ("y", 1), "nope"]}])
                assert (await c.read())[0] == {"op": "data", "data": {"x": 41, ("y", 1): [1, 2]}}

                await c.write([{"op": "run", "function": serialize.dumps((os.getpid, (), {}))}])
                reply = (await c.read())[0]
                assert reply["status"] == "OK" and reply["result"] == os.getpid()

                def who(dask_worker: Worker) -> str:
                    return str(dask_worker.address)

                await c.write([{"op": "run", "function": serialize.dumps((who, (), {}))}])
                assert (await c.read())[0]["result"] == w.address

                spec: tuple = (fail_with, (ZeroDivisionError("nope"),), {})
                await c.write([{"op": "run", "function": serialize.dumps(spec)}])
                reply = (await c.read())[0]
                assert reply["status"] == "error"
                assert isinstance(serialize.loads(reply["exception"]), ZeroDivisionError)
                assert "fail_with" in reply["traceback"]
            finally:
                await c.close()

    run(body)


def test_values_that_cannot_be_sent_are_named_instead_of_dropping_the_reply() -> None:
    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send(task("lock", (threading.Lock,)), task("x", (identity, 1)))
            await s.expect("task-finished")
            await s.expect("task-finished")
            assert w.address is not None
            c = await comm.connect(w.address, s.secret)
            try:
                await c.write([{"op": "get-data", "keys": ["lock", "x"]}])
                reply = (await c.read())[0]
                assert reply["data"] == {"x": 1}
                assert "lock" in reply["errors"] and "lock" in reply["errors"]["lock"]
                await c.write(
                    [{"op": "run", "function": serialize.dumps((threading.Lock, (), {}))}]
                )
                reply = (await c.read())[0]
                assert reply["status"] == "error" and "lock" in reply["message"]
            finally:
                await c.close()

    run(body)


def test_task_whose_dependency_cannot_be_sent_errs_instead_of_looping() -> None:
    async def body() -> None:
        async with (
            FakeScheduler() as s,
            Worker(s.address, secret=s.secret, name="a") as a,
            Worker(s.address, secret=s.secret, name="b") as b,
        ):
            await s.wait_registrations(2)
            s.by_address[str(a.address)].write([task("lock", (threading.Lock,))])
            await s.expect("task-finished")
            s.by_address[str(b.address)].write(
                [task("use", (identity, "lock"), who_has={"lock": [str(a.address)]})]
            )
            err = await s.expect("task-erred")
            assert err["key"] == "use" and err["retryable"] is False
            exc = serialize.loads(err["exception"])
            assert isinstance(exc, SerializationError) and "'lock'" in str(exc)

    run(body)


# -------------------------------------------------------------------------------------
# Command line


def _start_fake_scheduler() -> FakeScheduler:
    async def start() -> FakeScheduler:
        return await FakeScheduler().__aenter__()

    return ioloop.run_sync(start(), TIMEOUT)


def _wait_registered(s: FakeScheduler, n: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait for ``n`` registrations; fail with the worker's stderr if it exits first."""
    deadline = time.monotonic() + TIMEOUT
    while len(s.registrations) < n:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"worker exited with {proc.returncode}: {err.decode()}")
        if time.monotonic() > deadline:
            pytest.fail("the worker did not register in time")
        with contextlib.suppress(TimeoutError):
            ioloop.run_sync(asyncio.wait_for(s.wait_registrations(n), 0.05), 1)


def _spawn_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.worker", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes]):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def test_cli_worker_from_scheduler_file_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    s = _start_fake_scheduler()
    try:
        path = tmp_path / "scheduler.json"
        write_scheduler_file(path, s.address, s.secret)
        with _reaped(_spawn_worker("--scheduler-file", str(path), "--nthreads", "2")) as proc:
            _wait_registered(s, 1, proc)
            assert s.registrations[0]["pid"] == proc.pid
            assert s.registrations[0]["nthreads"] == 2
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
    finally:
        ioloop.run_sync(s.stop(), TIMEOUT)


# Imported only when needed (not to start and register): importing them would add a
# good part of a worker's start-up time to every cluster start.
LATE_IMPORTS = ("importlib.metadata", "psutil", "numpy", "difflib", "email")


def test_cli_worker_registers_without_importing_what_it_needs_only_later(
    tmp_path: Path,
) -> None:
    s = _start_fake_scheduler()
    try:
        path = tmp_path / "scheduler.json"
        write_scheduler_file(path, s.address, s.secret)
        env = {
            "PYTHONPROFILEIMPORTTIME": "1",  # every import, on stderr
            "HPC_DISTRIBUTED__WORKER__HEARTBEAT_INTERVAL": "600s",  # no heartbeat yet
        }
        with _reaped(_spawn_worker("--scheduler-file", str(path), env=env)) as proc:
            _wait_registered(s, 1, proc)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
        imported = {
            line.rsplit("|", 1)[-1].strip()
            for line in err.decode().splitlines()
            if line.startswith("import time:")
        }
        assert "runtime.worker" in imported and "runtime.comm" in imported
        assert not imported & set(LATE_IMPORTS)
    finally:
        ioloop.run_sync(s.stop(), TIMEOUT)


def test_cli_worker_exits_with_1_once_the_scheduler_is_gone_past_death_timeout(
    tmp_path: Path,
) -> None:
    s = _start_fake_scheduler()
    secret_file = tmp_path / "secret"
    secret_file.write_text(s.secret.hex())
    secret_file.chmod(0o600)
    args = (s.address, "--secret-file", str(secret_file), "--death-timeout", "0.5s")
    with _reaped(_spawn_worker(*args, "--name", "cli")) as proc:
        _wait_registered(s, 1, proc)
        assert s.registrations[0]["name"] == "cli"
        ioloop.run_sync(s.stop(), TIMEOUT)
        assert proc.wait(TIMEOUT) == 1
        _, err = proc.communicate()
        assert b"death timeout" in err


def test_cli_reads_the_secret_file_named_by_hpc_secret_file(tmp_path: Path) -> None:
    s = _start_fake_scheduler()
    try:
        secret_file = tmp_path / "secret"
        secret_file.write_text(s.secret.hex())
        secret_file.chmod(0o600)
        env = {"HPC_SECRET_FILE": str(secret_file)}
        with _reaped(_spawn_worker(s.address, env=env)) as proc:
            _wait_registered(s, 1, proc)
            assert s.registrations[0]["pid"] == proc.pid
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
    finally:
        ioloop.run_sync(s.stop(), TIMEOUT)


def test_cli_by_address_without_a_secret_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["tcp://127.0.0.1:1"]) == 2
    assert "--secret-file" in capsys.readouterr().err
    assert main([]) == 2
    assert "--scheduler-file" in capsys.readouterr().err


def test_cli_missing_scheduler_file_fails_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    started = time.monotonic()
    assert main(["--scheduler-file", str(path), "--death-timeout", "0.2"]) == 1
    assert time.monotonic() - started < TIMEOUT


# -------------------------------------------------------------------------------------
# Checkpoints: writing results, loading them instead of computing, loading inputs

CKPT = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def _damage(path: str) -> None:
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_task_with_a_checkpoint_writes_it_before_reporting(tmp_path: Path) -> None:
    from runtime.checkpoint import CheckpointStore

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send({**task("a", (operator.add, 1, 2)), "checkpoint": [str(tmp_path), CKPT]})
            await s.expect("task-finished")
            assert w.data == {"a": 3}
            assert CheckpointStore(tmp_path).load(CKPT) == 3

    run(body)


def test_task_thread_goes_on_while_a_checkpoint_is_written_and_reports_it_once_written(
    tmp_path: Path, checkpoint_saves: SaveProbe
) -> None:
    from runtime.checkpoint import CheckpointStore

    release, written = checkpoint_saves.hold().release, checkpoint_saves.written

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret, nthreads=1) as w:
            s.send({**task("a", (operator.add, 1, 2)), "checkpoint": [str(tmp_path), CKPT]})
            s.send(task("b", (operator.add, 2, 2)))
            # The one task thread ran b while a's checkpoint was still being written...
            assert (await s.expect("task-finished"))["key"] == "b"
            assert not written.is_set() and "a" not in w.data
            assert not CheckpointStore(tmp_path).exists(CKPT)
            release.set()
            # ...and a is reported only once its file is there.
            assert (await s.expect("task-finished"))["key"] == "a"
            assert written.is_set() and CheckpointStore(tmp_path).load(CKPT) == 3
            assert w.data == {"a": 3, "b": 4}

    run(body)


def test_closing_worker_waits_for_the_checkpoints_being_written(
    tmp_path: Path, checkpoint_saves: SaveProbe
) -> None:
    from runtime.checkpoint import CheckpointStore

    started, release = checkpoint_saves.hold().started, checkpoint_saves.release

    async def body() -> None:
        async with FakeScheduler() as s:
            w = await Worker(s.address, secret=s.secret, nthreads=1).start()
            s.send({**task("a", (operator.add, 1, 2)), "checkpoint": [str(tmp_path), CKPT]})
            assert await asyncio.to_thread(started.wait, TIMEOUT)
            closing = asyncio.ensure_future(w.close())
            writer = w._checkpoint_writer
            assert writer is not None
            await testing.async_wait_until(lambda: writer.closed, "the close to reach the writer")
            assert not closing.done()  # it waits for the write
            release.set()
            await closing
            assert CheckpointStore(tmp_path).load(CKPT) == 3

    run(body)


def test_checkpoint_writes_happen_in_the_task_thread_when_background_writes_are_off(
    tmp_path: Path, checkpoint_saves: SaveProbe
) -> None:
    threads = checkpoint_saves.threads

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret, name="w1") as w:
            s.send({**task("a", (operator.add, 1, 2)), "checkpoint": [str(tmp_path), CKPT]})
            await s.expect("task-finished")
            assert w.data == {"a": 3}

    with config.set({"checkpoint.background-writes": False}):
        run(body)
    assert len(threads) == 1 and threads[0].startswith("hpc-worker-w1")


def test_load_task_reads_its_checkpoint_instead_of_running(tmp_path: Path) -> None:
    from runtime.checkpoint import CheckpointStore

    CheckpointStore(tmp_path).save(CKPT, {"stored": True})

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send(
                {
                    "op": "compute-task",
                    "key": "a",
                    "task": None,
                    "who_has": {},
                    "priority": (0,),
                    "checkpoint": [str(tmp_path), CKPT],
                    "load": True,
                }
            )
            await s.expect("task-finished")
            assert w.data == {"a": {"stored": True}}

    run(body)


def test_load_task_with_a_damaged_checkpoint_errs_with_checkpoint_error(tmp_path: Path) -> None:
    from runtime.checkpoint import CheckpointStore

    _damage(CheckpointStore(tmp_path).save(CKPT, list(range(100))).path)

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            s.send(
                {
                    "op": "compute-task",
                    "key": "a",
                    "task": None,
                    "who_has": {},
                    "priority": (0,),
                    "checkpoint": [str(tmp_path), CKPT],
                    "load": True,
                }
            )
            erred = await s.expect("task-erred")
            assert erred["exc_type"] == "runtime.errors.CheckpointError"
            assert "a" not in w.data

    run(body)


def test_input_no_peer_holds_is_loaded_from_its_checkpoint_and_dropped_after(
    tmp_path: Path,
) -> None:
    from runtime.checkpoint import CheckpointStore

    CheckpointStore(tmp_path).save(CKPT, 41)

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            msg = task("y", (operator.add, "x", 1), who_has={"x": []})
            s.send({**msg, "stored": {"x": [str(tmp_path), CKPT]}})
            assert (await s.expect("task-finished"))["key"] == "y"
            assert w.data == {"y": 42}  # x was a replica: dropped after use

    run(body)


def test_input_whose_holder_fails_falls_back_to_its_checkpoint(tmp_path: Path) -> None:
    from runtime.checkpoint import CheckpointStore

    CheckpointStore(tmp_path).save(CKPT, 41)

    async def body() -> None:
        async with (
            FakeScheduler() as s,
            Worker(s.address, secret=s.secret) as w,
            FakePeer({}, s.secret) as empty,
        ):
            msg = task("y", (operator.add, "x", 1), who_has={"x": [empty.address]})
            s.send({**msg, "stored": {"x": [str(tmp_path), CKPT]}})
            assert (await s.expect("missing-data"))["worker"] == empty.address
            assert (await s.expect("task-finished"))["key"] == "y"
            assert w.data == {"y": 42}

    run(body)


def test_input_with_a_damaged_checkpoint_is_reported_missing_and_left_to_the_scheduler(
    tmp_path: Path,
) -> None:
    from runtime.checkpoint import CheckpointStore

    _damage(CheckpointStore(tmp_path).save(CKPT, list(range(100))).path)

    async def body() -> None:
        async with FakeScheduler() as s, Worker(s.address, secret=s.secret) as w:
            msg = task("y", (len, "x"), who_has={"x": []})
            s.send({**msg, "stored": {"x": [str(tmp_path), CKPT]}})
            missing = await s.expect("missing-data")
            assert missing == {"op": "missing-data", "key": "x", "worker": None, "checkpoint": True}
            assert "y" not in w._tasks
            # The scheduler computed x meanwhile and sends y again.
            async with FakePeer({"x": [1, 2]}, s.secret) as full:
                s.send(task("y", (len, "x"), who_has={"x": [full.address]}))
                await s.expect("task-finished")
            assert w.data == {"y": 2}

    run(body)


def test_worker_serves_peers_with_the_secret_of_a_restarted_scheduler(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"

    async def body() -> None:
        async with FakeScheduler() as first:
            write_scheduler_file(path, first.address, first.secret)
            w = Worker(scheduler_file=path, death_timeout=15)
            await w.start()
            try:
                await first.wait_registrations(1)
                address = w.address
                await first.stop()  # the scheduler dies; a new one writes a new secret
                async with FakeScheduler() as second:
                    write_scheduler_file(path, second.address, second.secret)
                    await second.wait_registrations(1)
                    assert second.registrations[0]["address"] == w.address == address
                    second.send(task("a", (identity, 7)))
                    await second.expect("task-finished")
                    c = await comm.connect(w.address, second.secret)
                    await c.write([{"op": "get-data", "keys": ["a"]}])
                    assert (await c.read())[0]["data"] == {"a": 7}
                    await c.close()
                    with pytest.raises(HandshakeError):
                        await comm.connect(w.address, first.secret, timeout=2)
            finally:
                await w.close()

    run(body)
