"""Tests of runtime.cluster.LocalCluster: start, inspect, and above all leave nothing behind.

Every test checks with psutil that no child process of the test process survives it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runtime import config, ioloop, testing
from runtime.cluster import LocalCluster, _default_shape
from runtime.errors import ConfigError

TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[2]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    testing.wait_until(predicate, what, timeout)


def gone(pids: set[int] | list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    before = children()
    yield
    leftover = children() - before
    for pid in leftover:  # clean up for the next test, then fail this one
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert not leftover or gone(leftover), f"processes left behind: {leftover}"


@pytest.fixture
def cluster(no_leftover_processes: None) -> Iterator[LocalCluster]:
    c = LocalCluster(n_workers=2, threads_per_worker=1)
    try:
        yield c
    finally:
        c.close()


def test_default_shape_fills_the_cores() -> None:
    assert _default_shape(None, None, True, 2) == (2, 1)
    assert _default_shape(None, None, True, 4) == (4, 1)
    assert _default_shape(None, None, True, 16) == (4, 4)
    assert _default_shape(None, None, True, 12) == (4, 3)
    assert _default_shape(None, None, False, 8) == (1, 8)
    assert _default_shape(3, None, True, 8) == (3, 2)
    assert _default_shape(None, 2, True, 8) == (4, 2)
    assert _default_shape(2, 3, True, 8) == (2, 3)
    with pytest.raises(ConfigError, match="threads_per_worker"):
        _default_shape(1, 0, True, 8)
    with pytest.raises(ConfigError, match="n_workers"):
        _default_shape(-1, None, True, 8)


def test_cluster_starts_registered_workers_and_close_leaves_no_process(
    no_leftover_processes: None,
) -> None:
    before = children()
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        workers = cluster.workers
        assert sorted(workers) == ["0", "1"]
        pids = {w["pid"] for w in workers.values()}
        assert pids == children() - before
        for info in workers.values():
            assert info["status"] == "running"
            assert info["address"].startswith("tcp://127.0.0.1:")
            assert info["nthreads"] == 1
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert len(cluster.secret) == 32
        text = repr(cluster)
        assert cluster.scheduler_address in text and "workers=2" in text
    assert children() == before
    assert cluster.status == "closed"
    assert all(p.returncode is not None for p in cluster.worker_processes)
    cluster.close()  # closing twice is harmless


def test_scheduler_file_holds_address_and_secret_readable_by_owner_only(
    cluster: LocalCluster,
) -> None:
    path = Path(cluster.scheduler_file)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["address"] == cluster.scheduler_address
    assert bytes.fromhex(document["secret"]) == cluster.secret


def test_close_kills_a_worker_that_does_not_stop_on_sigterm(no_leftover_processes: None) -> None:
    cluster = LocalCluster(n_workers=1, threads_per_worker=1)
    proc = cluster.worker_processes[0]
    os.kill(proc.pid, signal.SIGSTOP)  # a stopped process handles no signal but KILL
    started = time.monotonic()
    cluster.close()
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < TIMEOUT


def test_cluster_dropped_without_close_is_cleaned_up(no_leftover_processes: None) -> None:
    cluster = LocalCluster(n_workers=1, threads_per_worker=1)
    pids = [p.pid for p in cluster.worker_processes]
    tmpdir = Path(cluster.scheduler_file).parent
    del cluster
    gc.collect()
    assert gone(pids)
    assert not tmpdir.exists()


def _run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )


def test_cluster_left_open_by_a_failing_program_leaves_no_process() -> None:
    result = _run_script(
        """
        from runtime.cluster import LocalCluster
        cluster = LocalCluster(n_workers=2, threads_per_worker=1)
        print(" ".join(str(p.pid) for p in cluster.worker_processes), flush=True)
        raise RuntimeError("the test failed")
        """
    )
    assert "the test failed" in result.stderr
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    wait_until(lambda: gone(pids), "the worker processes to be gone")


def test_workers_exit_on_their_own_when_the_cluster_process_is_killed() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from runtime.cluster import LocalCluster
                cluster = LocalCluster(n_workers=2, threads_per_worker=1)
                print(" ".join(str(p.pid) for p in cluster.worker_processes), flush=True)
                sys.stdin.read()  # until the test kills us
                """
            ),
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.kill()  # no atexit, no finalizer: the workers are on their own
        proc.wait(TIMEOUT)
        wait_until(lambda: gone(pids), "orphaned workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)
        for pid in pids:  # never leave an orphan behind, even when failing
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_workers_exit_cleanly_when_the_scheduler_closes(no_leftover_processes: None) -> None:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1)
    try:
        procs = cluster.worker_processes
        ioloop.run_sync(cluster._state["scheduler"].close(), TIMEOUT)
        for proc in procs:
            assert proc.wait(TIMEOUT) == 0  # told to close by the scheduler
        assert {w["status"] for w in cluster.workers.values()} == {"exited (code 0)"}
    finally:
        cluster.close()


def test_workers_exit_on_their_own_once_a_killed_scheduler_is_gone_past_death_timeout(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    # The batch-job layout: scheduler and workers are separate processes, joined by
    # the scheduler file. A killed scheduler says nothing; the workers must notice.
    path = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "runtime.scheduler", "--scheduler-file", str(path)],
        cwd=REPO,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    worker_args = ["--scheduler-file", str(path), "--nthreads", "1", "--death-timeout", "1s"]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        from runtime.client import Client

        # The client waits for the scheduler file; the workers' short death timeout
        # would also bound their wait for it.
        with Client(scheduler_file=str(path), timeout=TIMEOUT) as client:
            workers += [
                subprocess.Popen(
                    [sys.executable, "-m", "runtime.worker", *worker_args],
                    cwd=REPO,
                    env=env,
                    stderr=subprocess.PIPE,
                )
                for _ in range(2)
            ]
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, "2 workers")
        scheduler.kill()
        scheduler.wait(TIMEOUT)
        for proc in workers:
            assert proc.wait(TIMEOUT) == 1
            assert b"death timeout" in proc.communicate()[1]
    finally:
        for proc in [scheduler, *workers]:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=TIMEOUT)


def test_sigkilled_worker_is_seen_gone_and_close_is_still_clean(cluster: LocalCluster) -> None:
    victim = cluster.worker_processes[0]
    address = cluster.workers["0"]["address"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(TIMEOUT)
    wait_until(
        lambda: address not in cluster._registered(), "the scheduler to drop the killed worker"
    )
    workers = cluster.workers
    assert workers["0"]["status"] == f"exited (code {-signal.SIGKILL})"
    assert workers["1"]["status"] == "running"


def test_worker_processes_inherit_config_set_in_this_process(
    no_leftover_processes: None,
) -> None:
    with (
        config.set({"distributed.worker.heartbeat-interval": "123ms"}),
        LocalCluster(n_workers=1, threads_per_worker=1) as cluster,
    ):
        env = psutil.Process(cluster.worker_processes[0].pid).environ()
        assert env["HPC_DISTRIBUTED__WORKER__HEARTBEAT_INTERVAL"] == repr("123ms")


def test_in_process_workers_start_no_process(no_leftover_processes: None) -> None:
    before = children()
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False) as cluster:
        assert children() == before
        workers = cluster.workers
        assert {w["pid"] for w in workers.values()} == {os.getpid()}
        assert {w["status"] for w in workers.values()} == {"running"}
        assert "threads" in repr(cluster)
    assert cluster.status == "closed"


def test_tasks_run_end_to_end_through_a_client(cluster: LocalCluster) -> None:
    from runtime.client import Client

    with Client(cluster) as client:
        futures = client.map(abs, range(-50, 0))
        assert client.gather(futures) == list(range(50, 0, -1))
        pids = client.run(os.getpid)
        assert set(pids.values()) == {p.pid for p in cluster.worker_processes}
