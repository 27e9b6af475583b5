"""The scheduler server over real authenticated TCP connections.

Most tests talk to the scheduler through fake peers made with ``runtime.comm`` (so
they see exactly the messages the scheduler sends); the last ones run real worker
processes (``python -m runtime.worker``) and kill them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from operator import add
from pathlib import Path
from typing import Any

import pytest

from runtime import comm, protocol, testing
from runtime.errors import CommClosedError, HandshakeError, KilledWorker
from runtime.rendezvous import read_scheduler_file
from runtime.scheduler import Scheduler, main
from runtime.serialize import dumps, loads

TIMEOUT = 30.0


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    await testing.async_wait_until(predicate, what or str(predicate), timeout)


class Peer:
    """A fake worker or client: one comm, and the messages it received so far."""

    def __init__(self, conn: comm.Comm) -> None:
        self.comm = conn
        self.inbox: list[dict] = []

    @classmethod
    async def worker(
        cls,
        scheduler: Scheduler,
        address: str,
        *,
        nthreads: int = 1,
        versions: Any = None,
        job_id: str | None = None,
    ) -> Peer:
        conn = await comm.connect(scheduler.address, scheduler.secret, role="worker")
        conn.write(
            [
                {
                    "op": "register-worker",
                    "address": address,
                    "name": address.rsplit(":", 1)[-1],
                    "nthreads": nthreads,
                    "memory_limit": 10**9,
                    "pid": 4242,
                    "host": "node-1",
                    "versions": protocol.versions() if versions is None else versions,
                    "job_id": job_id,
                }
            ]
        )
        return cls(conn)

    @classmethod
    async def client(cls, scheduler: Scheduler, client_id: str = "client-1") -> Peer:
        conn = await comm.connect(scheduler.address, scheduler.secret)
        conn.write(
            [{"op": "register-client", "client": client_id, "versions": protocol.versions()}]
        )
        peer = cls(conn)
        assert (await peer.expect("ok"))["client"] == client_id
        return peer

    def send(self, *msgs: dict) -> None:
        self.comm.write(list(msgs))

    async def expect(self, op: str, timeout: float = TIMEOUT, **fields: Any) -> dict:
        """Return the first message received with ``op`` (and ``fields``), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.inbox):
                if msg["op"] == op and all(msg.get(k) == v for k, v in fields.items()):
                    return self.inbox.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {op!r} {fields} within {timeout}s; got {self.inbox}")
            self.inbox.extend(await asyncio.wait_for(self.comm.read(), remaining))

    async def close(self) -> None:
        await asyncio.wait_for(self.comm.close(), 5)


def sched(tmp_path: Path | None = None, **kwargs: Any) -> Scheduler:
    kwargs.setdefault("validate", True)
    if tmp_path is not None:
        kwargs["scheduler_file"] = tmp_path / "scheduler.json"
    return Scheduler(host="127.0.0.1", **kwargs)


# ------------------------------------------------------------------- basic service


def test_scheduler_file_is_private_names_the_address_and_goes_away_on_close(
    tmp_path: Path,
) -> None:
    path = tmp_path / "scheduler.json"

    async def scenario() -> str:
        async with sched(tmp_path) as s:
            assert path.stat().st_mode & 0o777 == 0o600
            info = read_scheduler_file(path)
            assert info["address"] == s.address and info["pid"] == os.getpid()
            assert info["secret"] == s.secret
            return s.address

    address = run(scenario())
    assert address.startswith("tcp://127.0.0.1:")
    assert not path.exists()


def test_task_flows_from_client_to_worker_and_back() -> None:
    async def scenario() -> None:
        async with sched() as s:
            worker = await Peer.worker(s, "tcp://127.0.0.1:50001")
            assert (await worker.expect("ok"))["status"] == "OK"
            client = await Peer.client(s)
            frames = dumps((add, 1, 2))
            client.send(
                {"op": "update-graph", "tasks": {"x": frames}, "keys": ["x"], "client": "client-1"}
            )
            task = await worker.expect("compute-task", key="x")
            assert [bytes(f) for f in task["task"]] == [bytes(f) for f in frames]
            worker.send({"op": "task-finished", "key": "x", "nbytes": 28, "type": "int"})
            done = await client.expect("key-in-memory", key="x")
            assert done["workers"] == ["tcp://127.0.0.1:50001"] and done["nbytes"] == 28
            client.send(
                {"op": "who-has", "keys": ["x"], "id": 1}, {"op": "scheduler-info", "id": 2}
            )
            assert (await client.expect("who-has", id=1))["who_has"] == {
                "x": ["tcp://127.0.0.1:50001"]
            }
            info = await client.expect("scheduler-info", id=2)
            assert info["address"] == s.address
            assert info["workers"]["tcp://127.0.0.1:50001"]["host"] == "node-1"
            client.send({"op": "release-keys", "keys": ["x"], "client": "client-1"})
            assert (await worker.expect("free-keys"))["keys"] == ["x"]
            await client.close()
            await worker.close()

    run(scenario())


async def running_task(s: Scheduler) -> tuple[Peer, Peer]:
    """A worker and a client, and the client's task ``x`` running on the worker."""
    worker = await Peer.worker(s, "tcp://127.0.0.1:50001")
    client = await Peer.client(s)
    client.send({"op": "update-graph", "tasks": {"x": [b"p"]}, "keys": ["x"]})
    await worker.expect("compute-task", key="x")
    return worker, client


def test_client_disconnect_without_grace_releases_its_keys_on_the_workers() -> None:
    async def scenario() -> None:
        async with sched(client_grace=0) as s:
            worker, client = await running_task(s)
            await client.close()
            assert (await worker.expect("free-keys"))["keys"] == ["x"]
            await until(lambda: not s.state.clients and not s.state.tasks)

    run(scenario())


def test_disconnected_client_keeps_its_work_for_the_grace_period_and_can_reconnect() -> None:
    async def scenario() -> None:
        async with sched(client_grace=600) as s:
            worker, client = await running_task(s)
            await client.close()  # dropped, not close-client
            await until(lambda: "client-1" in s._orphans)
            # The work goes on without the client: the task finishes and is kept.
            worker.send({"op": "task-finished", "key": "x", "nbytes": 8, "type": "int"})
            await until(lambda: s.state.tasks["x"].state.value == "memory")
            assert "client-1" in s.state.clients
            # The same client comes back and asks again: the result is there.
            again = await Peer.client(s, "client-1")
            assert not s._orphans
            again.send({"op": "update-graph", "tasks": {"x": [b"p"]}, "keys": ["x"]})
            assert (await again.expect("key-in-memory", key="x"))["workers"] == [
                "tcp://127.0.0.1:50001"
            ]

    run(scenario())


def test_disconnected_client_is_released_when_its_grace_period_ends() -> None:
    async def scenario() -> None:
        async with sched(client_grace=0.05) as s:
            worker, client = await running_task(s)
            await client.close()
            assert (await worker.expect("free-keys"))["keys"] == ["x"]
            await until(lambda: not s.state.clients and not s.state.tasks and not s._orphans)

    run(scenario())


def test_close_client_releases_at_once_despite_the_grace_period() -> None:
    async def scenario() -> None:
        async with sched(client_grace=600) as s:
            worker, client = await running_task(s)
            client.send({"op": "close-client", "client": "client-1"})
            assert (await worker.expect("free-keys"))["keys"] == ["x"]
            await until(lambda: not s.state.clients and not s.state.tasks)
            assert not s._orphans

    run(scenario())


def test_drain_sends_no_new_tasks_and_waits_for_running_ones() -> None:
    async def scenario() -> None:
        async with sched() as s:
            worker = await Peer.worker(s, "tcp://127.0.0.1:50001", nthreads=1)
            client = await Peer.client(s)
            tasks = {k: [b"p"] for k in ("a", "b", "c", "d", "e", "f")}
            client.send({"op": "update-graph", "tasks": tasks, "keys": list(tasks)})
            await worker.expect("compute-task")
            running = sorted(ts.key for ws in s.state.workers.values() for ts in ws.processing)
            assert 0 < len(running) < len(tasks)
            drained = asyncio.ensure_future(s.drain("test", timeout=None, restart="requeue"))
            notice = await client.expect("scheduler-draining")
            assert notice["reason"] == "test" and notice["restart"] == "requeue"
            for key in running:
                assert not drained.done()
                worker.send({"op": "task-finished", "key": key, "nbytes": 8, "type": "int"})
            summary = await asyncio.wait_for(drained, TIMEOUT)
            assert summary == {"finished": len(running), "abandoned": 0}
            # Nothing more was sent while draining, though slots are free and tasks wait.
            sent = [m["key"] for m in worker.inbox if m["op"] == "compute-task"]
            assert set(sent) <= set(running)
            assert s.state.processing_count() == 0
            assert s.state.queued_count() == len(tasks) - len(running)
            # resume() sends the waiting work out.
            s._dispatch(s.state.resume())
            again = (await worker.expect("compute-task"))["key"]
            while again in running:  # sent before the drain, still unread
                again = (await worker.expect("compute-task"))["key"]
            assert again in set(tasks) - set(running)

    run(scenario())


def test_closing_for_a_successor_leaves_the_workers_of_other_jobs_to_wait_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "700")  # the scheduler's own batch job

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with sched() as s:
            own = await Peer.worker(s, "tcp://127.0.0.1:50001", job_id="700")
            other = await Peer.worker(s, "tcp://127.0.0.1:50002", job_id="701")
            await own.expect("ok")
            await other.expect("ok")
            await s.close("drained: test", successor=True)
            for peer in (own, other):
                with contextlib.suppress(CommClosedError):
                    while True:
                        peer.inbox.extend(await asyncio.wait_for(peer.comm.read(), TIMEOUT))
            return own.inbox, other.inbox

    own, other = run(scenario())
    assert [m["reason"] for m in own if m["op"] == "close"] == ["drained: test"]
    assert not [m for m in other if m["op"] == "close"]  # only the connection ended


def test_drain_abandons_tasks_still_running_at_its_timeout() -> None:
    async def scenario() -> None:
        async with sched() as s:
            worker = await Peer.worker(s, "tcp://127.0.0.1:50001", nthreads=1)
            client = await Peer.client(s)
            client.send({"op": "update-graph", "tasks": {"x": [b"p"]}, "keys": ["x"]})
            await worker.expect("compute-task", key="x")
            summary = await s.drain("walltime", timeout=0.01)
            assert summary == {"finished": 0, "abandoned": 1}

    run(scenario())


def test_requests_on_an_unregistered_connection_are_answered() -> None:
    async def scenario() -> None:
        async with sched() as s:
            await Peer.worker(s, "tcp://127.0.0.1:50001")
            await until(lambda: len(s.state.workers) == 1)
            conn = await comm.connect(s.address, s.secret)
            conn.write(
                [
                    {"op": "scheduler-info", "id": "a"},
                    {"op": "who-has", "keys": ["k"]},
                    {"op": "bogus"},
                ]
            )
            info, who_has, error = await conn.read()
            assert info["id"] == "a" and list(info["workers"]) == ["tcp://127.0.0.1:50001"]
            assert who_has["who_has"] == {"k": []}
            assert error["op"] == "error" and "bogus" in error["message"]
            await conn.close()

    run(scenario())


# --------------------------------------------------------------- registration checks


def test_worker_with_other_versions_is_refused_with_the_differences() -> None:
    async def scenario() -> None:
        async with sched(version_mismatch="error") as s:
            theirs = dict(protocol.versions(), cloudpickle="0.0.1")
            worker = await Peer.worker(s, "tcp://127.0.0.1:50001", versions=theirs)
            reply = await worker.expect("error")
            assert "cloudpickle" in reply["message"] and "0.0.1" in reply["message"]
            assert not s.state.workers

    run(scenario())


def test_version_mismatch_in_warn_mode_is_accepted() -> None:
    async def scenario() -> None:
        async with sched(version_mismatch="warn") as s:
            theirs = dict(protocol.versions(), cloudpickle="0.0.1")
            worker = await Peer.worker(s, "tcp://127.0.0.1:50001", versions=theirs)
            assert (await worker.expect("ok"))["status"] == "OK"
            assert list(s.state.workers) == ["tcp://127.0.0.1:50001"]

    run(scenario())


def test_wrong_secret_and_garbage_bytes_are_refused_and_the_scheduler_keeps_working() -> None:
    async def scenario() -> None:
        async with sched(validate=True) as s:
            with pytest.raises(HandshakeError):
                await comm.connect(s.address, b"\x00" * 32, timeout=5)
            host, port = comm.parse_address(s.address)
            for junk in (os.urandom(4096), b"HPCTK\x00" + os.urandom(100), b"\xff" * 12):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(junk)
                await writer.drain()
                writer.close()
            client = await Peer.client(s)
            client.send({"op": "scheduler-info", "id": 1})
            assert (await client.expect("scheduler-info"))["id"] == 1

    run(scenario())


# ------------------------------------------------------------------------ failures


def test_closed_worker_connection_reschedules_its_tasks_elsewhere() -> None:
    async def scenario() -> None:
        async with sched() as s:
            w1 = await Peer.worker(s, "tcp://127.0.0.1:50001")
            await w1.expect("ok")
            client = await Peer.client(s)
            client.send({"op": "update-graph", "tasks": {"x": [b"p"]}, "keys": ["x"]})
            await w1.expect("compute-task", key="x")
            w2 = await Peer.worker(s, "tcp://127.0.0.1:50002")
            await w2.expect("ok")
            w1.comm.abort()  # the worker process died
            await w2.expect("compute-task", key="x")
            assert s.state.tasks["x"].suspicious == 1
            w2.send({"op": "task-finished", "key": "x", "nbytes": 1, "type": "int"})
            await client.expect("key-in-memory", key="x")

    run(scenario())


def test_silent_worker_is_removed_after_worker_ttl_and_a_chatty_one_is_kept() -> None:
    async def scenario() -> None:
        async with sched(worker_ttl=0.5) as s:
            silent = await Peer.worker(s, "tcp://127.0.0.1:50001")
            chatty = await Peer.worker(s, "tcp://127.0.0.1:50002")
            await silent.expect("ok")
            await chatty.expect("ok")
            start = time.monotonic()

            def silent_one_removed() -> bool:
                # Each poll (at most 50 ms apart) is a heartbeat of the chatty worker.
                chatty.send({"op": "heartbeat", "metrics": {"memory": 1}})
                return "tcp://127.0.0.1:50001" not in s.state.workers

            await until(silent_one_removed, what="the silent worker to be removed")
            assert time.monotonic() - start >= 0.4
            assert list(s.state.workers) == ["tcp://127.0.0.1:50002"]
            assert s.state.workers["tcp://127.0.0.1:50002"].metrics == {"memory": 1}
            assert (await silent.expect("close"))["reason"] == "missed heartbeats"

    run(scenario())


def test_shutdown_closes_workers_and_the_scheduler(tmp_path: Path) -> None:
    async def scenario() -> None:
        s = sched(tmp_path)
        await s.start()
        worker = await Peer.worker(s, "tcp://127.0.0.1:50001")
        client = await Peer.client(s)
        client.send({"op": "shutdown"})
        await client.expect("ok")
        await worker.expect("close")
        await asyncio.wait_for(s.finished(), TIMEOUT)
        assert s.closed
        with pytest.raises(OSError):
            await asyncio.open_connection(*comm.parse_address(s.address))

    run(scenario())
    assert not (tmp_path / "scheduler.json").exists()


def test_retire_workers_removes_them_and_moves_their_work() -> None:
    async def scenario() -> None:
        async with sched() as s:
            w1 = await Peer.worker(s, "tcp://127.0.0.1:50001")
            await w1.expect("ok")
            client = await Peer.client(s)
            client.send({"op": "update-graph", "tasks": {"x": [b"p"]}, "keys": ["x"]})
            await w1.expect("compute-task", key="x")
            w2 = await Peer.worker(s, "tcp://127.0.0.1:50002")
            await w2.expect("ok")
            client.send({"op": "retire-workers", "workers": ["50001"], "id": 3})
            reply = await client.expect("retire-workers", id=3)
            assert reply["workers"] == ["tcp://127.0.0.1:50001"]
            assert (await w1.expect("close"))["reason"] == "retired"
            await w2.expect("compute-task", key="x")

    run(scenario())


# --------------------------------------------------------------- the entry point


def test_main_rejects_host_and_interface_together() -> None:
    with pytest.raises(SystemExit):
        main(["--scheduler-file", "f.json", "--host", "127.0.0.1", "--interface", "lo"])


def test_python_m_runtime_scheduler_serves_until_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime.scheduler",
            "--scheduler-file",
            str(path),
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        info = read_scheduler_file(path, timeout=TIMEOUT)
        assert info["pid"] == proc.pid

        async def ask() -> dict:
            conn = await comm.connect(info["address"], info["secret"])
            conn.write([{"op": "scheduler-info"}])
            [reply] = await conn.read()
            await conn.close()
            return reply

        assert run(ask())["workers"] == {}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


# ------------------------------------------------------- with real worker processes


class Cluster:
    """A scheduler on this loop and worker processes reading its scheduler file."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "scheduler.json"
        self.tmp_path = tmp_path
        self.scheduler = sched(tmp_path, validate=False)
        self.procs: list[subprocess.Popen] = []

    async def start_workers(self, n: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        have = len(self.scheduler.state.workers)
        for _ in range(n):
            i = len(self.procs)
            log = open(self.tmp_path / f"worker-{i}.log", "wb")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "runtime.worker",
                        "--scheduler-file",
                        str(self.path),
                        "--nthreads",
                        "1",
                        "--name",
                        f"w{i}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )  # fmt: skip
            )
            log.close()
        await until(lambda: len(self.scheduler.state.workers) == have + n, what="workers")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()


async def fetch(address: str, secret: bytes, key: Any) -> Any:
    conn = await comm.connect(address, secret)
    conn.write([{"op": "get-data", "keys": [key]}])
    [reply] = await conn.read()
    await conn.close()
    return reply["data"][key]


def in_cluster(tmp_path: Path, body: Callable[[Cluster], Awaitable[None]]) -> None:
    cluster = Cluster(tmp_path)

    async def scenario() -> None:
        await cluster.scheduler.start()
        try:
            await body(cluster)
        finally:
            await cluster.scheduler.close()

    try:
        run(scenario(), timeout=120)
    finally:
        cluster.kill_all()


def test_real_workers_compute_a_tree_reduction_and_a_chain(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        s = cluster.scheduler
        await cluster.start_workers(2)
        client = await Peer.client(s)
        tasks: dict[Any, Any] = {}
        deps: dict[Any, list] = {}
        level: list[Any] = []
        for i in range(64):
            tasks[("leaf", i)] = dumps((int, str(i)))
            level.append(("leaf", i))
        depth = 0
        while len(level) > 1:
            depth += 1
            nxt: list[Any] = []
            for j in range(0, len(level), 2):
                key = ("sum", depth, j)
                tasks[key] = dumps((add, level[j], level[j + 1]))
                deps[key] = [level[j], level[j + 1]]
                nxt.append(key)
            level = nxt
        chain: dict[Any, Any] = {("c", 0): dumps((add, 0, 1))}
        for i in range(1, 50):
            chain[("c", i)] = dumps((add, ("c", i - 1), 1))
            deps[("c", i)] = [("c", i - 1)]
        tasks.update(chain)
        root: Any = level[0]
        last: Any = ("c", 49)
        client.send(
            {"op": "update-graph", "tasks": tasks, "dependencies": deps, "keys": [root, last]}
        )
        for key, expected in ((root, sum(range(64))), (last, 50)):
            msg = await client.expect("key-in-memory", key=key)
            assert await fetch(msg["workers"][0], s.secret, key) == expected
        # Only the two wanted results are still held on the workers.
        held = [ts.key for ws in s.state.workers.values() for ts in ws.has_what]
        assert sorted(held, key=repr) == sorted([root, last], key=repr)
        s.state.validate()

    in_cluster(tmp_path, body)


def test_worker_killed_mid_computation_still_gives_the_right_answer(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        s = cluster.scheduler
        await cluster.start_workers(2)
        client = await Peer.client(s)
        n = 40
        tasks: dict[Any, Any] = {("slow", i): dumps((time.sleep, 0.05)) for i in range(n)}
        tasks.update({("inc", i): dumps((add, i, 1)) for i in range(n)})
        # total depends on every inc; inc i is independent, slow keeps workers busy.
        tasks["total"] = dumps((sum, [("inc", i) for i in range(n)]))
        deps = {"total": [("inc", i) for i in range(n)]}
        keys = ["total", *(("slow", i) for i in range(n))]
        client.send({"op": "update-graph", "tasks": tasks, "dependencies": deps, "keys": keys})
        await until(lambda: sum(len(ws.has_what) for ws in s.state.workers.values()) >= 4)
        victim = next(ws for ws in s.state.workers.values() if ws.has_what)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        msg = await client.expect("key-in-memory", key="total", timeout=60)
        assert await fetch(msg["workers"][0], s.secret, "total") == sum(range(1, n + 1))
        assert victim.address not in s.state.workers
        s.state.validate()

    in_cluster(tmp_path, body)


def test_task_that_kills_its_workers_fails_with_killed_worker(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        s = cluster.scheduler
        await cluster.start_workers(3)
        client = await Peer.client(s)
        client.send(
            {"op": "update-graph", "tasks": {"bomb": dumps((os._exit, 1))}, "keys": ["bomb"]}
        )
        msg = await client.expect("task-erred", key="bomb", timeout=60)
        exc = loads(msg["exception"])
        assert isinstance(exc, KilledWorker)
        assert exc.key == "bomb" and len(exc.workers) == 3
        assert not s.state.workers  # each of the three died once
        assert json.dumps(msg["traceback"])  # a string, for the client to show

    in_cluster(tmp_path, body)


def test_get_ip_of_the_listener_is_reachable() -> None:
    # Binding to every interface advertises this host's routable address.
    async def scenario() -> str:
        async with Scheduler(port=0) as s:
            host, port = comm.parse_address(s.address)
            with socket.create_connection((host, port), timeout=5):
                pass
            return host

    assert run(scenario()) != "0.0.0.0"
