"""The distributed client: futures, refcounts, waiting, errors, executor, collections.

Two kinds of test:

* Protocol tests run the client against ``FakeScheduler``, a real authenticated
  listener (``runtime.comm``) that records every message a client sends and lets the
  test inject the scheduler's answers. They pin down what goes over the wire (one
  ``update-graph`` per map, ``release-keys`` when the last future is dropped, ...)
  and the client's reaction to each scheduler message, deterministically.
* End-to-end tests run on one module-scoped ``LocalCluster`` (2 worker processes).
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import pickle
import threading
import time
from typing import Any

import pytest

from runtime import comm, ioloop, serialize, testing
from runtime.client import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Client,
    Future,
    FutureStatus,
    RemoteTraceback,
    as_completed,
    get_default_client,
    wait,
)
from runtime.errors import SchedulerError, SerializationError

SECRET = b"s" * 32
DEADLINE = 10.0


# -- a scheduler stand-in -----------------------------------------------------------------


class FakeScheduler:
    """Accepts clients, records what they send, and sends what the test tells it to."""

    def __init__(self, hello: dict[str, Any] | None = None) -> None:
        self.hello = hello
        self.cond = threading.Condition()
        self.received: list[dict[str, Any]] = []
        self.batches: list[list[dict[str, Any]]] = []
        self.comms: list[Any] = []
        self.who_has: dict[Any, list[str]] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.listener: Any = None
        self.address = ""

    def start(self) -> FakeScheduler:
        async def start() -> None:
            self.listener = await comm.listen(
                "tcp://127.0.0.1:0", self._handle, SECRET, hello=self.hello
            )

        ioloop.run_sync(start(), DEADLINE)
        self.address = self.listener.address
        return self

    def stop(self) -> None:
        async def stop() -> None:
            self.listener.close()
            for c in self.comms:
                await c.close()

        ioloop.run_sync(stop(), DEADLINE)

    async def _handle(self, c: Any) -> None:
        first = await c.read()
        assert first[0]["op"] == "register-client"
        await c.write([{"op": "ok", "status": "OK"}])
        with self.cond:
            self.comms.append(c)
            self.received.extend(first)
            self.cond.notify_all()
        while True:
            try:
                msgs = await c.read()
            except comm.CommClosedError:
                return
            replies = []
            for m in msgs:
                if m["op"] == "who-has":
                    who_has = {k: self.who_has.get(k, []) for k in m["keys"]}
                    replies.append({"op": "who-has", "who_has": who_has, "id": m.get("id")})
                elif m["op"] == "scheduler-info":
                    info = {"op": "scheduler-info", "workers": self.workers, "id": m.get("id")}
                    replies.append(info)
            if replies:
                await c.write(replies)
            with self.cond:
                self.batches.append(msgs)
                self.received.extend(msgs)
                self.cond.notify_all()

    def send(self, *msgs: dict[str, Any]) -> None:
        """Send one batch to the (last) connected client."""

        async def send() -> None:
            await self.comms[-1].write(list(msgs))

        ioloop.run_sync(send(), DEADLINE)

    def wait_for(self, op: str, count: int = 1) -> list[dict[str, Any]]:
        """The first ``count`` messages with ``op``, waiting for them to arrive."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.ops(op)) >= count, DEADLINE), (
                f"no {count} {op!r} message(s) arrived; got {[m['op'] for m in self.received]}"
            )
            return self.ops(op)

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["op"] == op]

    def sync(self, client: Client) -> None:
        """Wait until everything the client queued so far has reached us."""
        before = len(self.ops("scheduler-info"))
        client.scheduler_info()
        self.wait_for("scheduler-info", before + 1)


@pytest.fixture
def fake():
    sched = FakeScheduler().start()
    try:
        yield sched
    finally:
        sched.stop()


@pytest.fixture
def client(fake):
    with Client(fake.address, secret=SECRET, timeout=DEADLINE) as c:
        yield c


def inc(x: int) -> int:
    return x + 1


# -- submitting ----------------------------------------------------------------------------


def test_map_sends_one_update_graph_for_all_calls(fake, client):
    futures = client.map(inc, range(1000))
    (msg,) = fake.wait_for("update-graph")
    assert len(msg["tasks"]) == 1000
    assert msg["keys"] == [f.key for f in futures]
    assert msg["client"] == client.id
    priorities = [msg["priority"][f.key] for f in futures]
    assert priorities == sorted(priorities), "map order is the priority order"
    fake.sync(client)
    assert len(fake.ops("update-graph")) == 1


def test_task_payload_is_a_task_the_worker_can_execute(fake, client):
    from runtime.graph import execute_task

    future = client.submit(pow, 2, 10, mod=None)
    (msg,) = fake.wait_for("update-graph")
    task = serialize.loads(msg["tasks"][future.key])
    assert execute_task(task, {}) == 1024


def test_pure_calls_share_a_key_and_are_sent_once(fake, client):
    a = client.submit(inc, 1)
    b = client.submit(inc, 1)
    c = client.submit(inc, 2)
    assert a.key == b.key != c.key
    assert a.key.startswith("inc-")
    fake.sync(client)
    sent = [k for m in fake.ops("update-graph") for k in m["tasks"]]
    assert sorted(sent) == sorted({a.key, c.key})


def test_impure_calls_get_distinct_keys(client):
    a = client.submit(inc, 1, pure=False)
    b = client.submit(inc, 1, pure=False)
    assert a.key != b.key


def test_submit_options_reach_the_scheduler(fake, client):
    f = client.submit(inc, 1, key="my-key", retries=3, workers="tcp://10.0.0.1:1", priority=5)
    g = client.submit(inc, 2, priority=-5)
    fake.sync(client)
    first, second = fake.ops("update-graph")
    assert f.key == "my-key"
    assert first["retries"] == {"my-key": 3}
    assert first["workers"] == {"my-key": ["tcp://10.0.0.1:1"]}
    assert first["priority"]["my-key"] < second["priority"][g.key], "higher priority sorts first"


def test_nested_futures_become_dependencies(fake, client):
    from runtime.graph import execute_task

    a = client.submit(inc, 1)
    b = client.submit(inc, 2)
    total = client.submit(sum, [a, b])
    nested = client.submit(lambda d: d["x"][0] + d["y"], {"x": (a,), "y": b})
    fake.sync(client)
    graph = {k: v for m in fake.ops("update-graph") for k, v in m["dependencies"].items()}
    assert sorted(graph[total.key]) == sorted([a.key, b.key])
    assert sorted(graph[nested.key]) == sorted([a.key, b.key])
    tasks = {k: v for m in fake.ops("update-graph") for k, v in m["tasks"].items()}
    values = {a.key: 10, b.key: 20}
    assert execute_task(serialize.loads(tasks[total.key]), values) == 30
    assert execute_task(serialize.loads(tasks[nested.key]), values) == 30


def test_literal_arguments_are_never_read_as_tasks_or_keys(fake, client):
    from runtime.graph import execute_task

    a = client.submit(inc, 1)
    weird = ((len, [1, 2]), a.key, [(len, "ab")], {"k": (len, "x")})
    f = client.submit(lambda *args: args, *weird, a)
    fake.sync(client)
    tasks = {k: v for m in fake.ops("update-graph") for k, v in m["tasks"].items()}
    out = execute_task(serialize.loads(tasks[f.key]), {a.key: "VALUE"})
    assert out == (*weird, "VALUE")


def test_unpicklable_argument_error_names_task_and_position(client):
    lock = threading.Lock()
    with pytest.raises(SerializationError) as info:
        client.submit(inc, 1, lock, key="locked")
    message = str(info.value)
    assert "locked" in message
    assert "argument 1" in message


def test_futures_inside_other_objects_are_refused(client):
    class Box:
        def __init__(self, x):
            self.x = x

    a = client.submit(inc, 1)
    with pytest.raises(SerializationError, match="argument 0"):
        client.submit(lambda box: box.x, Box(a))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(a)


# -- completion and waiting ------------------------------------------------------------------


def test_key_in_memory_finishes_every_future_of_the_key(fake, client):
    a = client.submit(inc, 1)
    b = client.submit(inc, 1)
    assert a.status == "pending" and not a.done()
    fake.send({"op": "key-in-memory", "key": a.key, "nbytes": 28, "type": "int"})
    wait([a, b], timeout=DEADLINE)
    assert a.status is FutureStatus.FINISHED and b.done()
    assert a.type == "int"


def test_result_timeout_raises_builtin_timeout_error(client):
    f = client.submit(inc, 1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.05)
    assert time.monotonic() - start < DEADLINE


def test_wait_first_completed_returns_as_soon_as_one_is_done(fake, client):
    a, b = client.map(inc, [1, 2])
    result: dict[str, Any] = {}

    def waiter():
        result["value"] = wait([a, b], timeout=DEADLINE, return_when=FIRST_COMPLETED)

    t = threading.Thread(target=waiter)
    t.start()
    fake.send({"op": "key-in-memory", "key": b.key, "nbytes": 1, "type": "int"})
    t.join(DEADLINE)
    done, not_done = result["value"]
    assert done == {b} and not_done == {a}


def test_wait_first_exception_stops_at_the_first_error(fake, client):
    a, b, c = client.map(inc, [1, 2, 3])
    fake.send({"op": "key-in-memory", "key": a.key, "nbytes": 1, "type": "int"})
    fake.send(_erred(b.key, ValueError("bad")))
    done, not_done = wait([a, b, c], timeout=DEADLINE, return_when=FIRST_EXCEPTION)
    assert done == {a, b} and not_done == {c}


def test_wait_all_completed_times_out_with_timeout_error(fake, client):
    a, b = client.map(inc, [1, 2])
    fake.send({"op": "key-in-memory", "key": a.key, "nbytes": 1, "type": "int"})
    with pytest.raises(TimeoutError):
        wait([a, b], timeout=0.05, return_when=ALL_COMPLETED)


def test_wait_rejects_unknown_return_when(client):
    with pytest.raises(ValueError, match="return_when"):
        wait([], return_when="SOMETIMES")


def test_as_completed_yields_in_completion_order_and_accepts_additions(fake, client):
    a, b, c = client.map(inc, [1, 2, 3])
    ac = as_completed([a, b], timeout=DEADLINE)
    fake.send({"op": "key-in-memory", "key": b.key, "nbytes": 1, "type": "int"})
    assert next(ac) is b
    ac.add(c)
    fake.send({"op": "key-in-memory", "key": c.key, "nbytes": 1, "type": "int"})
    assert next(ac) is c
    fake.send({"op": "key-in-memory", "key": a.key, "nbytes": 1, "type": "int"})
    assert list(ac) == [a]
    assert ac.is_empty()


def test_as_completed_batches_hand_out_everything_ready(fake, client):
    futures = client.map(inc, range(4))
    ac = as_completed(futures, timeout=DEADLINE)
    assert ac.next_batch(block=False) == [] and not ac.has_ready()
    fake.send(
        *({"op": "key-in-memory", "key": f.key, "nbytes": 1, "type": "int"} for f in futures[:3])
    )
    first = ac.next_batch()
    while len(first) < 3:
        first += ac.next_batch()
    assert set(first) == set(futures[:3]) and ac.count() == 1
    fake.send({"op": "key-in-memory", "key": futures[3].key, "nbytes": 1, "type": "int"})
    assert list(ac.batches()) == [[futures[3]]]
    assert ac.is_empty()


def test_as_completed_times_out(client):
    ac = as_completed([client.submit(inc, 1)], timeout=0.05)
    with pytest.raises(TimeoutError):
        next(ac)


def test_done_callbacks_run_once_outside_the_loop_thread(fake, client):
    f = client.submit(inc, 1)
    calls = []
    ran = threading.Event()

    def callback(future):
        calls.append((future, threading.current_thread().name))
        ran.set()

    f.add_done_callback(callback)
    fake.send({"op": "key-in-memory", "key": f.key, "nbytes": 1, "type": "int"})
    assert ran.wait(DEADLINE)
    assert calls[0][0] is f
    assert calls[0][1] != "hpc-ioloop"
    done_already = threading.Event()
    f.add_done_callback(lambda fut: done_already.set())
    assert done_already.wait(DEADLINE)
    assert len(calls) == 1


# -- errors ----------------------------------------------------------------------------------


def _erred(key: Any, exc: BaseException, **extra: Any) -> dict[str, Any]:
    msg = {
        "op": "task-erred",
        "key": key,
        "exception": serialize.dumps(exc),
        "traceback": 'Traceback (most recent call last):\n  File "job.py", line 3, in f\nValueError: bad\n',
        "worker": "tcp://10.1.2.3:4567",
        "host": "node17",
        "pid": 4242,
    }
    msg.update(extra)
    return msg


def test_remote_exception_keeps_its_type_with_the_remote_traceback_as_cause(fake, client):
    f = client.submit(inc, 1)
    fake.send(_erred(f.key, ValueError("bad")))
    with pytest.raises(ValueError, match="bad") as info:
        f.result(timeout=DEADLINE)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)
    assert f.key in text and "tcp://10.1.2.3:4567" in text and "node17" in text
    assert "job.py" in text
    assert (cause.key, cause.worker, cause.host, cause.pid) == (
        f.key,
        "tcp://10.1.2.3:4567",
        "node17",
        4242,
    )
    assert f.status == "error"
    assert isinstance(f.exception(), ValueError)
    assert "job.py" in (f.traceback() or "")


def test_gather_errors_raise_or_skip(fake, client):
    a, b, c = client.map(inc, [1, 2, 3])
    fake.send(_erred(b.key, KeyError("missing")))
    fake.send({"op": "key-in-memory", "key": a.key, "nbytes": 1, "type": "int"})
    with pytest.raises(KeyError):
        client.gather([a, b], timeout=DEADLINE)
    fake.send(_erred(c.key, KeyError("missing")))
    assert client.gather([b, c], errors="skip", timeout=DEADLINE) == []
    assert client.gather({"b": b}, errors="skip", timeout=DEADLINE) == {}


def test_exception_that_cannot_be_unpickled_becomes_a_serialization_error(fake, client):
    f = client.submit(inc, 1)
    fake.send(_erred(f.key, ValueError("x"), exception=[b"garbage"], exc_type="mod.Special"))
    with pytest.raises(SerializationError, match="mod.Special") as info:
        f.result(timeout=DEADLINE)
    assert isinstance(info.value.__cause__, RemoteTraceback)


# -- cancelling and releasing --------------------------------------------------------------------


def test_cancel_marks_all_futures_of_the_key_and_tells_the_scheduler(fake, client):
    a = client.submit(inc, 1)
    b = client.submit(inc, 1)
    assert a.cancel()
    assert a.cancelled() and b.cancelled() and b.done()
    with pytest.raises(cf.CancelledError):
        b.result(timeout=DEADLINE)
    (msg,) = fake.wait_for("cancel-keys")
    assert msg["keys"] == [a.key]
    with pytest.raises(cf.CancelledError):
        client.submit(inc, a)


def test_resubmitting_a_cancelled_key_sends_it_again(fake, client):
    a = client.submit(inc, 1)
    a.cancel()
    b = client.submit(inc, 1)
    assert b.key == a.key and b.status == "pending"
    fake.sync(client)
    assert [list(m["tasks"]) for m in fake.ops("update-graph")] == [[a.key], [a.key]]


def test_dropping_the_last_future_releases_the_key_once(fake, client):
    a = client.submit(inc, 1)
    b = client.submit(inc, 1)
    key = a.key
    del a
    gc.collect()
    fake.sync(client)
    assert fake.ops("release-keys") == []
    b.release()
    b.release()  # idempotent
    (msg,) = fake.wait_for("release-keys")
    assert msg["keys"] == [key] and msg["client"] == client.id
    del b
    fake.sync(client)
    assert len(fake.ops("release-keys")) == 1


def test_releases_are_batched(fake, client):
    futures = client.map(inc, range(500))
    keys = [f.key for f in futures]
    del futures
    fake.wait_for("release-keys")
    fake.sync(client)
    released = [k for m in fake.ops("release-keys") for k in m["keys"]]
    assert sorted(released) == sorted(keys)
    # Dropping 500 futures wakes the loop at most a few times (only if it happens to
    # run while the list is being freed), never once per key.
    assert len(fake.ops("release-keys")) <= 10


def test_release_never_overtakes_the_submission(fake, client):
    for i in range(50):
        client.submit(inc, i)  # dropped at once
    fake.wait_for("release-keys")
    fake.sync(client)
    seen: set = set()
    for m in fake.received:
        if m["op"] == "update-graph":
            seen.update(m["tasks"])
        elif m["op"] == "release-keys":
            assert set(m["keys"]) <= seen


def test_key_resubmitted_after_release_is_sent_again(fake, client):
    key = client.submit(inc, 1).key
    fake.wait_for("release-keys")
    again = client.submit(inc, 1)
    assert again.key == key
    fake.wait_for("update-graph", 2)


def test_key_released_while_resubmitting_is_sent_again(fake, client):
    """A key held when submit checks, released before it commits, is still sent."""
    old = client.submit(inc, 1)
    key = old.key
    old.release()  # queued: the release flush comes a little later
    real_dumps = client._dumps

    async def flush() -> None:
        client._flush()

    def dumps_then_release(obj: Any) -> Any:
        ioloop.run_sync(flush(), DEADLINE)  # the release lands while we serialize
        return real_dumps(obj)

    client._dumps = dumps_then_release
    futures = client.map(inc, [2, 1])
    client._dumps = real_dumps
    assert futures[1].key == key
    fake.sync(client)
    ops = [(m["op"], sorted(m.get("tasks") or m.get("keys") or [])) for m in fake.received[1:]]
    assert ops[:3] == [
        ("update-graph", [key]),
        ("release-keys", [key]),
        ("update-graph", sorted([key, futures[0].key])),
    ]


# -- connection and defaults ---------------------------------------------------------------------


def test_wrong_secret_is_refused(fake):
    with pytest.raises(comm.HandshakeError):
        Client(fake.address, secret=b"x" * 32, timeout=2)


def test_missing_secret_is_a_clear_error(fake):
    with pytest.raises(SchedulerError, match="secret"):
        Client(fake.address)


def test_version_mismatch_is_an_error_listing_the_differences():
    from runtime import config, protocol
    from runtime.errors import VersionMismatchError

    theirs = {**protocol.versions(), "python": "3.0.1", "cloudpickle": "0.1"}
    sched = FakeScheduler(hello={"versions": theirs}).start()
    try:
        with pytest.raises(VersionMismatchError) as info:
            Client(sched.address, secret=SECRET, timeout=DEADLINE)
        assert "python: " in str(info.value) and "3.0.1" in str(info.value)
        assert "cloudpickle" in str(info.value)
        with config.set({"distributed.version-mismatch": "warn"}):
            Client(sched.address, secret=SECRET, timeout=DEADLINE).close()
    finally:
        sched.stop()


def test_scheduler_file_gives_address_and_secret(fake, tmp_path):
    from runtime.rendezvous import write_scheduler_file

    path = tmp_path / "scheduler.json"
    write_scheduler_file(path, address=fake.address, secret=SECRET)
    with Client(scheduler_file=path, timeout=DEADLINE) as c:
        assert c.scheduler_address == fake.address
        assert c.status == "running"


def test_client_is_the_default_while_open(fake):
    assert get_default_client() is None
    with Client(fake.address, secret=SECRET, timeout=DEADLINE) as first:
        assert get_default_client() is first
        second = Client(fake.address, secret=SECRET, timeout=DEADLINE, set_as_default=False)
        try:
            assert get_default_client() is first
            with second.as_current():
                assert get_default_client() is second
            assert get_default_client() is first
        finally:
            second.close()
    assert get_default_client() is None


def test_lost_scheduler_fails_pending_futures(fake):
    c = Client(fake.address, secret=SECRET, timeout=DEADLINE)
    try:
        f = c.submit(inc, 1)
        fake.stop()
        with pytest.raises(SchedulerError, match="lost the connection"):
            f.result(timeout=DEADLINE)
        with pytest.raises(SchedulerError):
            c.submit(inc, 2)
        assert get_default_client() is None
    finally:
        c.close()


def test_closing_fails_pending_futures_and_is_idempotent(fake):
    c = Client(fake.address, secret=SECRET, timeout=DEADLINE)
    f = c.submit(inc, 1)
    c.close()
    c.close()
    assert c.status == "closed"
    with pytest.raises(SchedulerError, match="closed"):
        f.result(timeout=DEADLINE)
    (msg,) = fake.wait_for("close-client")
    assert msg["client"] == c.id


def test_future_dropped_after_close_sends_nothing(fake):
    c = Client(fake.address, secret=SECRET, timeout=DEADLINE)
    f = c.submit(inc, 1)
    c.close()
    del f
    gc.collect()
    assert fake.ops("release-keys") == []


def test_gather_fetches_from_each_worker_in_one_request(fake, client):
    """Results come from the workers (one get-data each), never via the scheduler."""
    served: list[list] = []

    async def serve(c):
        while True:
            try:
                msgs = await c.read()
            except comm.CommClosedError:
                return
            served.append(msgs[0]["keys"])
            await c.write([{"op": "data", "data": {k: f"value of {k}" for k in msgs[0]["keys"]}}])

    async def start():
        return await comm.listen("tcp://127.0.0.1:0", serve, SECRET, role="worker")

    w1, w2 = ioloop.run_sync(start(), DEADLINE), ioloop.run_sync(start(), DEADLINE)
    try:
        futures = client.map(inc, range(10))
        for i, f in enumerate(futures):
            worker = (w1 if i % 2 else w2).address
            hint = {"workers": [worker]} if i < 5 else {}
            fake.who_has[f.key] = [worker]
            fake.send({"op": "key-in-memory", "key": f.key, "nbytes": 1, "type": "str", **hint})
        assert client.gather(futures, timeout=DEADLINE) == [f"value of {f.key}" for f in futures]
        assert sorted(len(keys) for keys in served) == [5, 5]
    finally:
        w1.close()
        w2.close()


def test_importing_the_client_module_does_not_import_the_network_stack():
    import subprocess
    import sys

    code = (
        "import sys, runtime.client; print('asyncio' in sys.modules, 'runtime.comm' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ}
    )
    assert out.stdout.split() == ["False", "False"]


# -- end to end on a LocalCluster ------------------------------------------------------------
#
# Task functions live at module level: workers import them as
# tests.runtime.test_client (the LocalCluster puts the repository on their path).


def slow_until(path: str, value: Any = None) -> Any:
    """Block until ``path`` exists (the test creates it): a task the test controls."""
    return testing.wait_for_path(path, DEADLINE, value)


def flaky(path: str, exc_type: type[BaseException], failures: int) -> int:
    """Record an attempt in ``path``; raise ``exc_type`` for the first ``failures`` ones."""
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        attempts = len(f.read())
    if attempts <= failures:
        raise exc_type(f"attempt {attempts} failed")
    return attempts


def fail(message: str) -> None:
    raise ValueError(message)


def holds(key: Any, dask_worker: Any = None) -> bool:
    return key in dask_worker.data


@pytest.fixture(scope="module")
def cluster():
    from runtime.cluster import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1) as c:
        yield c


@pytest.fixture
def c(cluster):
    with Client(cluster, timeout=DEADLINE) as client:
        yield client


def test_submit_map_and_gather(c):
    assert c.submit(inc, 1).result(timeout=DEADLINE) == 2
    futures = c.map(inc, range(200))
    assert c.gather(futures, timeout=DEADLINE) == list(range(1, 201))
    assert c.gather({"a": futures[0], "b": [futures[1], (futures[2],)], "c": 5}) == {
        "a": 1,
        "b": [2, (3,)],
        "c": 5,
    }


def test_futures_nested_in_arguments_are_replaced_by_results(c):
    a, b = c.map(inc, [10, 20])
    total = c.submit(sum, [a, b])
    mixed = c.submit(lambda d, t: d["x"] + d["y"][0] + t[1], {"x": a, "y": [b]}, (0, total))
    assert mixed.result(timeout=DEADLINE) == 11 + 21 + 32


def test_chain_of_dependent_tasks(c):
    f = c.submit(inc, 0)
    for _ in range(50):
        f = c.submit(inc, f)
    assert f.result(timeout=DEADLINE) == 51


def test_scatter_spreads_data_and_futures_use_it(c, cluster):
    futures = c.scatter(list(range(10)))
    assert [f.status for f in futures] == ["finished"] * 10
    who_has = c.who_has(futures)
    assert set().union(*who_has.values()) == set(c.scheduler_info()["workers"]), "spread over both"
    assert c.submit(sum, futures).result(timeout=DEADLINE) == 45
    assert c.gather(futures) == list(range(10))
    named = c.scatter({"answer": 42})
    assert named["answer"].key == "answer"
    assert c.submit(inc, named["answer"]).result(timeout=DEADLINE) == 43


def test_scatter_broadcast_places_data_on_every_worker(c):
    f = c.scatter({"config": "shared"}, broadcast=True)["config"]
    workers = set(c.scheduler_info()["workers"])
    assert set(c.who_has([f])["config"]) == workers
    assert all(c.run(holds, "config").values())


def test_scatter_to_chosen_workers_with_random_keys(c):
    first, second = sorted(c.scheduler_info()["workers"])
    a, b = c.scatter([1, 1], workers=[second], hash=False)
    assert a.key != b.key
    assert c.who_has([a, b]) == {a.key: [second], b.key: [second]}


def test_releasing_the_last_future_frees_worker_memory(c):
    f = c.submit(bytes, 10_000, pure=False)
    f.result(timeout=DEADLINE)
    key = f.key
    assert any(c.run(holds, key).values())
    del f
    deadline = time.monotonic() + DEADLINE
    while any(c.run(holds, key).values()):
        assert time.monotonic() < deadline, "the result stayed in worker memory"


def test_task_errors_keep_their_type_and_name_task_worker_and_host(c):
    f = c.submit(fail, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        f.result(timeout=DEADLINE)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert cause.key == f.key
    assert cause.worker in c.scheduler_info()["workers"]
    assert cause.host
    assert "fail" in cause.traceback and "boom" in cause.traceback
    assert f.key in str(cause)


def test_oserror_is_retried(c, tmp_path):
    log = str(tmp_path / "attempts")
    f = c.submit(flaky, log, OSError, 2, retries=2)
    assert f.result(timeout=DEADLINE) == 3


def test_other_exceptions_are_not_retried(c, tmp_path):
    log = str(tmp_path / "attempts")
    f = c.submit(flaky, log, KeyError, 1, retries=3)
    with pytest.raises(KeyError):
        f.result(timeout=DEADLINE)
    with open(log) as attempts:
        assert attempts.read() == "x"


def test_cancel_a_queued_task(c, tmp_path):
    gate = str(tmp_path / "gate")
    blockers = c.map(slow_until, [gate] * 2, range(2), pure=False)
    queued = c.submit(inc, 41, pure=False)
    queued.cancel()
    open(gate, "w").close()
    assert c.gather(blockers, timeout=DEADLINE) == [0, 1]
    assert queued.cancelled()
    with pytest.raises(cf.CancelledError):
        queued.result(timeout=DEADLINE)
    assert c.who_has([queued]) == {}


def test_wait_and_as_completed_on_the_cluster(c, tmp_path):
    gate = str(tmp_path / "gate")
    first, second = sorted(c.scheduler_info()["workers"])
    slow = c.submit(slow_until, gate, "slow", pure=False, workers=first)
    fast = c.submit(inc, 1, workers=[second])
    done, not_done = wait([slow, fast], timeout=DEADLINE, return_when=FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    assert c.who_has([fast])[fast.key] == [second]
    ac = as_completed([slow, fast], with_results=True, timeout=DEADLINE)
    assert next(ac) == (fast, 2)
    open(gate, "w").close()
    ac.add(c.submit(inc, 2))
    assert sorted(str(r) for _, r in ac) == ["3", "slow"]


def test_as_completed_with_results_raises_or_yields_errors(c):
    good, bad = c.submit(inc, 1), c.submit(fail, "no")
    assert dict((f.key, r) for f, r in as_completed([good], with_results=True)) == {good.key: 2}
    with pytest.raises(ValueError, match="no"):
        list(as_completed([bad], with_results=True, timeout=DEADLINE))
    pairs = list(as_completed([bad, good], with_results=True, raise_errors=False, timeout=DEADLINE))
    outcome = {f.key: r for f, r in pairs}
    assert outcome[good.key] == 2 and isinstance(outcome[bad.key], ValueError)


def test_executor_is_a_concurrent_futures_executor(c):
    with c.get_executor() as ex:
        assert isinstance(ex, cf.Executor)
        assert list(ex.map(inc, range(20))) == list(range(1, 21))
        fs = [ex.submit(inc, i) for i in range(5)]
        assert all(isinstance(f, cf.Future) for f in fs)
        done, _ = cf.wait(fs, timeout=DEADLINE)
        assert len(done) == 5
        assert sorted(f.result() for f in cf.as_completed(fs, timeout=DEADLINE)) == [1, 2, 3, 4, 5]
        err = ex.submit(fail, "executor")
        with pytest.raises(ValueError, match="executor"):
            err.result(timeout=DEADLINE)
        exc = err.exception()
        assert exc is not None and isinstance(exc.__cause__, RemoteTraceback)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(inc, 1)


def test_executor_cancel_cancels_the_task(c, tmp_path):
    gate = str(tmp_path / "gate")
    with c.get_executor() as ex:
        blockers = [ex.submit(slow_until, gate, i) for i in range(2)]
        queued = ex.submit(inc, 1)
        assert queued.cancel()
        open(gate, "w").close()
        assert [b.result(timeout=DEADLINE) for b in blockers] == [0, 1]
        assert queued.cancelled()


def test_executor_shutdown_can_cancel_what_is_pending(c, tmp_path):
    gate = str(tmp_path / "gate")
    ex = c.get_executor()
    blockers = [ex.submit(slow_until, gate, i) for i in range(2)]
    queued = [ex.submit(inc, i) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in blockers + queued)
    open(gate, "w").close()


def test_compute_persist_and_get_collections(c):
    from runtime.delayed import delayed

    total = delayed(sum)([delayed(inc)(i) for i in range(10)])
    future = c.compute(total)
    assert isinstance(future, Future)
    assert future.result(timeout=DEADLINE) == 55
    assert c.compute([total, 7], sync=True) == [55, 7]
    persisted = c.persist(total)
    assert c.compute(persisted + 1, sync=True) == 56
    assert c.get({"x": 1, "y": (inc, "x"), ("z", 0): (sum, ["x", "y"])}, [["y"], ("z", 0)]) == [
        [2],
        3,
    ]


def test_hpc_compute_uses_the_default_client(c):
    from runtime.compute import compute
    from runtime.delayed import delayed

    (pid,) = compute(delayed(os.getpid)(pure=False))
    assert pid != os.getpid()
    assert pid in {w["pid"] for w in c.scheduler_info()["workers"].values()}


def test_run_calls_a_function_on_every_worker(c):
    pids = c.run(os.getpid)
    assert set(pids) == set(c.scheduler_info()["workers"])
    assert len(set(pids.values())) == 2
    with pytest.raises(ValueError, match="on every worker"):
        c.run(fail, "on every worker")


def test_scheduler_info_describes_the_workers(c):
    info = c.scheduler_info()
    assert len(info["workers"]) == 2
    for addr, w in info["workers"].items():
        assert addr.startswith("tcp://")
        assert w["nthreads"] == 1


def test_script_exiting_with_live_futures_exits_cleanly(cluster):
    """Futures dropped at interpreter exit release nothing and raise nothing."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from runtime.client import Client\n"
        "c = Client(sys.argv[1], secret=bytes.fromhex(sys.argv[2]))\n"
        "futures = c.map(abs, range(-50, 0), pure=False)\n"
        "assert c.gather(futures) == list(range(50, 0, -1))\n"
        "pending = c.submit(sum, futures)\n"
        "print('done')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, cluster.scheduler_address, cluster.secret.hex()],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_client_without_address_starts_and_closes_its_own_cluster(monkeypatch):
    monkeypatch.delenv("HPC_SCHEDULER_FILE", raising=False)
    with Client(timeout=DEADLINE) as client:
        assert client.submit(inc, 1).result(timeout=DEADLINE) == 2
        cluster = client._cluster
        procs = cluster.worker_processes
    assert cluster.status == "closed"
    assert all(p.poll() is not None for p in procs)


def test_shutdown_stops_the_cluster():
    from runtime.cluster import LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1)
    try:
        procs = cluster.worker_processes
        client = Client(cluster, timeout=DEADLINE)
        assert client.submit(inc, 1).result(timeout=DEADLINE) == 2
        client.shutdown()
        assert client.status == "closed"
        for p in procs:
            p.wait(DEADLINE)
    finally:
        cluster.close()
