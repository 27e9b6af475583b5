"""Checkpoints on a real cluster: resuming after a lost scheduler or client, damage.

The resume tests run the scheduler, the workers and the client as separate processes
(``python -m runtime.scheduler``, ``python -m runtime.worker``, a client script), kill
one with SIGKILL mid-graph, start a replacement, and run the same client code again.
Task executions are counted with marker files a task writes when it finishes. Tasks
at the top of the graph wait for a gate file, so the kill always lands mid-graph; the
test opens the gate after the kill.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import hpc
from runtime import testing
from runtime.checkpoint import CheckpointStore, identity_tokens
from runtime.errors import SchedulerError
from runtime.rendezvous import read_scheduler_file

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

TIMEOUT = 60.0
LEAVES = 32  # 63 tasks
GATED_LEVEL = 4  # levels 4 and 5 (3 tasks) wait for the gate: 60 tasks run before it


# ----------------------------------------------------------------- task functions


def _finished(runs: str, label: str) -> None:
    Path(runs, f"{label}.{uuid.uuid4().hex}").touch()


def _wait_for(path: str) -> None:
    testing.wait_for_path(path, TIMEOUT)


def leaf(runs: str, label: str, value: int) -> int:
    _finished(runs, label)
    return value


def combine(runs: str, gate: str, label: str, a: int, b: int) -> int:
    if gate:
        _wait_for(gate)
    _finished(runs, label)
    return a + b


def build(runs: str, gate: str, leaves: int = LEAVES) -> Any:
    """A tree reduction whose top levels wait for ``gate`` (when not empty)."""
    level = [hpc.delayed(leaf)(runs, f"leaf-{i}", i) for i in range(leaves)]
    depth = 0
    while len(level) > 1:
        depth += 1
        gated = gate if depth >= GATED_LEVEL else ""
        level = [
            hpc.delayed(combine)(runs, gated, f"combine-{depth}-{j}", a, b)
            for j, (a, b) in enumerate(zip(level[::2], level[1::2]))
        ]
    return level[0]


def expected(leaves: int = LEAVES) -> int:
    return sum(range(leaves))


def finished_labels(runs: Path) -> list[str]:
    """The label of every task execution so far (a label twice: it ran twice)."""
    return [p.name.split(".")[0] for p in runs.iterdir()]


def finished_labels_expected(leaves: int = LEAVES) -> list[str]:
    labels = [f"leaf-{i}" for i in range(leaves)]
    depth, n = 0, leaves
    while n > 1:
        depth, n = depth + 1, n // 2
        labels += [f"combine-{depth}-{j}" for j in range(n)]
    return labels


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys
    import hpc
    from tests.runtime.test_checkpoint_distributed import build

    scheduler_file, runs, gate, store, how = sys.argv[1:6]
    with hpc.Client(scheduler_file=scheduler_file, timeout=30) as client:
        graph = build(runs, gate)
        if how == "hpc.compute":
            (result,) = hpc.compute(graph, checkpoint=store)
        else:
            result = client.compute(graph, checkpoint=store, sync=True)
    print("RESULT", result, flush=True)
    """
)


# ------------------------------------------------------------------- processes


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    testing.wait_until(predicate, what, timeout)


class Processes:
    """Starts the cluster's processes and kills whatever is left at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.scheduler_file = tmp / "scheduler.json"
        self.env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        self.started: list[subprocess.Popen] = []
        self.logs: dict[subprocess.Popen, Path] = {}
        (tmp / "logs").mkdir()

    def _start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        path = self.tmp / "logs" / f"{name}-{len(self.started)}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=REPO,
            )
        self.started.append(proc)
        self.logs[proc] = path
        return proc

    def scheduler(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        with contextlib.suppress(FileNotFoundError):
            self.scheduler_file.unlink()  # a killed scheduler leaves its file behind
        proc = self._start(
            "scheduler",
            [
                "-m",
                "runtime.scheduler",
                "--scheduler-file",
                str(self.scheduler_file),
                "--host",
                "127.0.0.1",
            ],
            env,
        )
        wait_until(self.scheduler_file.exists, "the scheduler file")
        return proc

    def workers(self, n: int = 2, nthreads: int = 3) -> list[subprocess.Popen]:
        return [
            self._start(
                "worker",
                [
                    "-m",
                    "runtime.worker",
                    "--scheduler-file",
                    str(self.scheduler_file),
                    "--nthreads",
                    str(nthreads),
                    "--memory-limit",
                    "none",
                ],
            )
            for _ in range(n)
        ]

    def client(self, runs: Path, gate: Path, store: Path, how: str) -> subprocess.Popen:
        script = self.tmp / "client.py"
        script.write_text(CLIENT_SCRIPT)
        return self._start(
            "client",
            [str(script), str(self.scheduler_file), str(runs), str(gate), str(store), how],
        )

    def output(self, proc: subprocess.Popen) -> str:
        return self.logs[proc].read_text(errors="replace")

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        child.kill()
                proc.kill()
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def result_of(procs: Processes, client: subprocess.Popen) -> int:
    try:
        client.wait(timeout=TIMEOUT * 2)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the client did not finish:\n{procs.output(client)}")
    out = procs.output(client)
    assert client.returncode == 0, out
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, out
    return int(line.split()[1])


def assert_mostly_not_executed_again(before: list[str], after: list[str]) -> None:
    """At least 90% of the tasks finished ``before`` the kill ran only once in all."""
    done = set(before)
    assert len(done) == len(before)  # nothing ran twice before the kill
    counts = Counter(after)
    again = sorted(label for label in done if counts[label] > 1)
    assert len(again) <= 0.1 * len(done), (len(again), len(done), again)


def run_until_gate(
    procs: Processes, tmp: Path, how: str
) -> tuple[Path, Path, Path, subprocess.Popen]:
    runs, gate, store = tmp / "runs", tmp / "gate", tmp / "store"
    runs.mkdir()
    client = procs.client(runs, gate, store, how)
    below = 2 * LEAVES - 1 - (2 ** (LEAVES.bit_length() - GATED_LEVEL) - 1)
    wait_until(
        lambda: len(finished_labels(runs)) >= below or client.poll() is not None,
        "the tasks below the gate",
    )
    assert client.poll() is None, procs.output(client)
    assert len(finished_labels(runs)) == below
    return runs, gate, store, client


# ------------------------------------------------------------------------ tests


@pytest.mark.timeout(240)
def test_scheduler_killed_mid_graph_resumes_from_checkpoints(
    procs: Processes, tmp_path: Path
) -> None:
    scheduler = procs.scheduler()
    procs.workers()
    runs, gate, store, client = run_until_gate(procs, tmp_path, "hpc.compute")

    scheduler.send_signal(signal.SIGKILL)
    scheduler.wait(timeout=10)
    before = finished_labels(runs)
    client.wait(timeout=TIMEOUT)  # it loses its scheduler and fails
    gate.touch()

    procs.scheduler()  # the old workers find it through the scheduler file
    again = procs.client(runs, gate, store, "hpc.compute")
    assert result_of(procs, again) == expected()
    after = finished_labels(runs)
    assert_mostly_not_executed_again(before, after)
    assert set(after) == set(finished_labels_expected())


@pytest.mark.timeout(240)
def test_client_killed_mid_computation_the_work_goes_on_and_a_new_client_gets_it(
    procs: Processes, tmp_path: Path
) -> None:
    procs.scheduler()
    procs.workers()
    runs, gate, store, client = run_until_gate(procs, tmp_path, "client.compute")

    client.send_signal(signal.SIGKILL)
    client.wait(timeout=10)
    gate.touch()
    # The cluster goes on for the client's grace period (client-grace, 60 s): the
    # whole graph finishes with no client connected.
    total = len(finished_labels_expected())
    wait_until(lambda: len(finished_labels(runs)) >= total, "the work to finish without a client")

    again = procs.client(runs, gate, store, "client.compute")
    assert result_of(procs, again) == expected()
    after = finished_labels(runs)
    assert sorted(after) == sorted(finished_labels_expected())  # each task ran once


class Successions:
    """Stands for a job-queue cluster whose job restarts: the client follows it.

    ``_await_scheduler`` is the hook :class:`runtime.client.Client` calls when its
    scheduler goes away; a job-queue cluster waits there for its job's successor.
    Here the successor is a new scheduler and workers, started on the spot.
    """

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.calls = 0
        self.scheduler_info = read_scheduler_file(procs.scheduler_file)
        self.scheduler_address = self.scheduler_info["address"]
        self.secret = self.scheduler_info["secret"]

    def _await_scheduler(self, previous: dict[str, Any], timeout: float | None) -> Any:
        self.calls += 1
        assert previous["address"] == self.scheduler_address
        self.procs.scheduler()
        self.procs.workers()
        return read_scheduler_file(self.procs.scheduler_file)


class FirstSuccessorGone(Successions):
    """The first successor is gone before the client reaches it; the next one is there.

    As when a job drains as soon as it starts (SLURM may send ``--signal`` that early)
    and restarts in its turn: the client must wait again, from the gone one.
    """

    def __init__(self, procs: Processes) -> None:
        super().__init__(procs)
        with socket.socket() as unused:  # a port nothing listens on once closed
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        self.gone = {**self.scheduler_info, "address": f"tcp://127.0.0.1:{port}", "pid": 1}
        self.previous: list[str] = []

    def _await_scheduler(self, previous: dict[str, Any], timeout: float | None) -> Any:
        self.previous.append(previous["address"])
        if not self.calls:
            self.calls += 1
            return self.gone
        return super()._await_scheduler(self.scheduler_info, timeout)


@pytest.mark.parametrize("succession", [Successions, FirstSuccessorGone])
@pytest.mark.timeout(240)
def test_drained_scheduler_the_client_waits_for_its_successor_and_gets_the_result(
    procs: Processes, tmp_path: Path, succession: type[Successions]
) -> None:
    runs, gate, store = tmp_path / "runs", tmp_path / "gate", tmp_path / "store"
    runs.mkdir()
    scheduler = procs.scheduler(
        {"HPC_JOB_DRAIN_SIGNAL": "USR2", "HPC_DISTRIBUTED__SCHEDULER__DRAIN_TIMEOUT": "0.2s"}
    )
    procs.workers()
    cluster = succession(procs)
    # A short connect timeout: the gone successor is given up on sooner.
    with hpc.Client(cluster, set_as_default=False, timeout=5) as client:
        future = client.compute(build(str(runs), str(gate)), checkpoint=store)
        below = 2 * LEAVES - 1 - (2 ** (LEAVES.bit_length() - GATED_LEVEL) - 1)
        wait_until(lambda: len(finished_labels(runs)) >= below, "the tasks below the gate")
        scheduler.send_signal(signal.SIGUSR2)  # what SLURM sends ahead of the walltime
        assert scheduler.wait(timeout=TIMEOUT) == 0, procs.output(scheduler)
        log = procs.output(scheduler)
        assert "draining (received SIGUSR2)" in log and "abandoning 2 running" in log
        before = finished_labels(runs)
        gate.touch()
        assert future.result(timeout=TIMEOUT) == expected()
        if isinstance(cluster, FirstSuccessorGone):
            first = cluster.scheduler_address
            assert (cluster.calls, cluster.previous) == (2, [first, cluster.gone["address"]])
        else:
            assert cluster.calls == 1
    after = finished_labels(runs)
    assert_mostly_not_executed_again(before, after)
    assert set(after) == set(finished_labels_expected())


# -------------------------------------------------- damage, on an in-process cluster


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with hpc.LocalCluster(n_workers=2, threads_per_worker=2) as cluster, hpc.Client(cluster) as c:
        yield c


def labels_by_token(graph: Any) -> dict[str, str]:
    """``{identity token: label}`` of every task of ``graph``."""
    tokens = identity_tokens(graph.dask, graph.key)
    labels = {}
    for key, task in graph.dask.items():
        quoted = task[2] if task[0] is leaf else task[3]  # (literal(label),)
        labels[tokens[key]] = quoted[0].data
    return labels


def test_damaged_input_checkpoint_is_recomputed_by_the_cluster(client: Any, tmp_path: Path) -> None:
    runs, store = tmp_path / "runs", tmp_path / "store"
    runs.mkdir()
    assert hpc.compute(build(str(runs), ""), checkpoint=store)[0] == expected()
    by_label = {label: token for token, label in labels_by_token(build(str(runs), "")).items()}
    checkpoints = CheckpointStore(store)
    # Damage combine-2-0 (an input of combine-3-0); make its dependents run again.
    damaged = Path(checkpoints.path(by_label["combine-2-0"]))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    for label in ("combine-3-0", "combine-4-0", "combine-5-0"):
        os.unlink(checkpoints.path(by_label[label]))

    assert client.compute(build(str(runs), ""), checkpoint=store, sync=True) == expected()
    again = finished_labels(runs)
    extra = sorted(label for label in set(again) if again.count(label) > 1)
    assert extra == ["combine-2-0", "combine-3-0", "combine-4-0", "combine-5-0"]
    assert Path(str(damaged) + ".corrupt").exists()
    assert checkpoints.load(by_label["combine-2-0"]) == sum(range(4))  # rewritten


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_result_checkpoint_the_client_wants_is_recomputed(
    client: Any, tmp_path: Path, damage: str
) -> None:
    runs, store = tmp_path / "runs", tmp_path / "store"
    runs.mkdir()
    graph = build(str(runs), "", leaves=8)
    assert client.compute(graph, checkpoint=store, sync=True) == expected(8)
    root = identity_tokens(graph.dask, graph.key)[graph.key]
    path = Path(CheckpointStore(store).path(root))
    data = bytearray(path.read_bytes())
    if damage == "truncated":  # the scheduler's lookup sees it
        del data[-5:]
    else:  # only loading does: the worker's load fails, and the task is computed
        data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    assert client.compute(build(str(runs), "", leaves=8), checkpoint=store, sync=True) == expected(
        8
    )
    again = finished_labels(runs)
    assert sorted(label for label in set(again) if again.count(label) > 1) == ["combine-3-0"]


def test_second_run_on_a_cluster_executes_nothing(client: Any, tmp_path: Path) -> None:
    runs, store = tmp_path / "runs", tmp_path / "store"
    runs.mkdir()
    assert hpc.compute(build(str(runs), ""), checkpoint=store)[0] == expected()
    n = len(finished_labels(runs))
    assert n == 2 * LEAVES - 1
    assert hpc.compute(build(str(runs), ""), checkpoint=store)[0] == expected()
    (persisted,) = hpc.persist(build(str(runs), ""), checkpoint=store)
    assert persisted.compute() == expected()
    assert len(finished_labels(runs)) == n


def test_explicit_checkpoint_on_a_cluster_cuts_the_lineage(client: Any, tmp_path: Path) -> None:
    runs, store = tmp_path / "runs", tmp_path / "store"
    runs.mkdir()
    x = hpc.checkpoint(build(str(runs), "", leaves=8), store)
    assert len(x.dask) == 1
    assert (x + 1).compute() == expected(8) + 1
    assert hpc.checkpoint(build(str(runs), "", leaves=8), store).key == x.key
    assert len(finished_labels(runs)) == 15
    assert len(CheckpointStore(store).list()) == 1


def test_cluster_checkpoint_directory_is_the_default_of_its_clients(tmp_path: Path) -> None:
    runs, store = tmp_path / "runs", tmp_path / "store"
    runs.mkdir()
    with (
        hpc.LocalCluster(n_workers=1, threads_per_worker=2, checkpoint=store) as cluster,
        hpc.Client(cluster, set_as_default=False) as c,
    ):
        assert c.compute(build(str(runs), ""), sync=True) == expected()
        written = len(CheckpointStore(store).list())
        assert written == len(finished_labels_expected())
        # Run again: everything loads; and checkpoint=False opts out.
        assert c.compute(build(str(runs), ""), sync=True) == expected()
        assert len(finished_labels(runs)) == written
        assert c.compute(build(str(runs), ""), sync=True, checkpoint=False) == expected()
        assert len(finished_labels(runs)) == 2 * written


class NoSuccessorYet(Successions):
    """A cluster whose successor never comes: its wait ends only when released."""

    def __init__(self, procs: Processes) -> None:
        super().__init__(procs)
        self.waiting = threading.Event()
        self.release = threading.Event()

    def _await_scheduler(self, previous: dict[str, Any], timeout: float | None) -> Any:
        self.waiting.set()
        self.release.wait(TIMEOUT)
        return None


@pytest.mark.timeout(120)
def test_closing_a_client_that_waits_for_a_successor_fails_its_futures_at_once(
    procs: Processes, tmp_path: Path
) -> None:
    scheduler = procs.scheduler()
    procs.workers(1)
    cluster = NoSuccessorYet(procs)
    client = hpc.Client(cluster, set_as_default=False)
    try:
        gate = tmp_path / "gate"
        future = client.submit(_wait_for, str(gate))
        wait_until(lambda: client.scheduler_info()["tasks"].get("processing"), "the task")
        scheduler.send_signal(signal.SIGKILL)
        assert cluster.waiting.wait(TIMEOUT)
        client.close(timeout=10)
        with pytest.raises(SchedulerError, match="closed"):
            future.result(timeout=10)
    finally:
        cluster.release.set()
        client.close()


def counted(runs: str, gate: str) -> int:
    """A task that waits for ``gate`` and leaves a marker per execution."""
    _wait_for(gate)
    _finished(runs, "counted")
    return 42


def test_a_broken_connection_to_a_live_scheduler_is_mended_without_losing_work(
    tmp_path: Path,
) -> None:
    from runtime import ioloop

    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    with hpc.LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        scheduler = cluster._state["scheduler"]
        client = hpc.Client(scheduler_file=cluster.scheduler_file, set_as_default=False)
        try:
            future = client.submit(counted, str(runs), str(gate))
            wait_until(lambda: scheduler.state.processing_count() == 1, "the task to start")

            async def break_connection() -> None:
                scheduler._comms[client.id].abort()

            old = client._comm
            ioloop.run_sync(break_connection())
            wait_until(lambda: client._comm not in (None, old), "the client to reconnect")
            gate.touch()
            assert future.result(timeout=TIMEOUT) == 42
            assert client.id in scheduler.state.clients and not scheduler._orphans
        finally:
            client.close()
    assert finished_labels(runs) == ["counted"]  # computed once: the work was kept
