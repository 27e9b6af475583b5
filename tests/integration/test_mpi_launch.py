"""``python -m runtime.mpi`` under a real ``mpiexec`` (MPICH from PyPI in our venv)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import testing

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")

if MPIEXEC is None:
    if os.environ.get("HPC_REQUIRE_MPI") == "1":
        raise RuntimeError("HPC_REQUIRE_MPI=1 but no mpiexec: pip install '.[mpi]'")
    pytest.skip("mpiexec not installed (pip install '.[mpi]')", allow_module_level=True)


def mpi_cmd(n: int, *args: str) -> list[str]:
    return [
        MPIEXEC,
        "-n",
        str(n),
        "-disable-auto-cleanup",
        sys.executable,
        "-m",
        "runtime.mpi",
        "--host",
        "127.0.0.1",
        *args,
    ]


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    return testing.wait_until(predicate, what, timeout)


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def spawn(procs, cmd, **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    procs.append(p)
    return p


def test_script_mode_runs_the_client_and_exits_with_its_code(tmp_path):
    script = tmp_path / "job with space.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import hpc

            def inc(x):
                return x + 1

            total = hpc.delayed(sum)([hpc.delayed(inc)(i) for i in range(100)])
            print("RESULT", total.compute(), sys.argv[1:])
            sys.exit(7)
            """
        )
    )
    proc = subprocess.run(
        mpi_cmd(
            4, "--scheduler-file", str(tmp_path / "sched.json"), "--script", str(script), "a b"
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "RESULT 5050 ['a b']" in proc.stdout, proc.stderr
    assert proc.returncode == 7, proc.stderr
    assert not (tmp_path / "sched.json").exists()  # removed when the cluster shut down


def test_two_rank_batch_job_runs_the_script_beside_the_scheduler(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import hpc\n"
        "client = hpc.Client()\n"
        "print('WORKERS', len(client.scheduler_info()['workers']))\n"
        "print('RESULT', sum(client.gather(client.map(abs, range(-5, 0)))))\n"
    )
    proc = subprocess.run(
        mpi_cmd(2, "--scheduler-file", str(tmp_path / "s.json"), "--script", str(script)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WORKERS 1" in proc.stdout and "RESULT 15" in proc.stdout, proc.stderr


def test_failing_script_fails_the_job(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("raise ValueError('broken input')\n")
    proc = subprocess.run(
        mpi_cmd(3, "--scheduler-file", str(tmp_path / "s.json"), "--script", str(script)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "ValueError: broken input" in proc.stderr


def test_too_few_ranks_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        mpi_cmd(1, "--scheduler-file", str(tmp_path / "s.json")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "at least 2 MPI ranks" in proc.stderr


def block_until(path: str, value: int) -> int:
    return testing.wait_for_path(path, 60, value * 2)


def test_losing_a_worker_rank_leaves_the_others_and_the_work_completes(tmp_path, procs):
    from runtime.client import Client

    sched = tmp_path / "sched.json"
    log = open(tmp_path / "mpi.log", "w")  # noqa: SIM115
    job = spawn(procs, mpi_cmd(4, "--scheduler-file", str(sched)), stderr=log, stdout=log)
    with Client(scheduler_file=str(sched), timeout=60) as client:
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 3, what="3 workers")
        go = str(tmp_path / "go")
        # Six tasks that block until `go` exists: every worker holds some when one dies.
        futures = client.map(block_until, [go] * 6, range(6))
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, what="worker loss seen")
        Path(go).touch()
        assert client.gather(futures) == [2 * i for i in range(6)]
        assert job.poll() is None  # the other ranks are still serving
        client.shutdown()
    job.wait(timeout=60)


def test_no_scheduler_adds_worker_ranks_to_an_existing_cluster(tmp_path, procs):
    from runtime.client import Client

    sched = tmp_path / "sched.json"
    spawn(
        procs,
        [
            sys.executable,
            "-m",
            "runtime.scheduler",
            "--scheduler-file",
            str(sched),
            "--host",
            "127.0.0.1",
        ],
        stderr=subprocess.DEVNULL,
    )
    wait_until(sched.exists, what="scheduler file")
    extra = spawn(
        procs,
        mpi_cmd(2, "--no-scheduler", "--scheduler-file", str(sched)),
        stderr=subprocess.DEVNULL,
    )
    with Client(scheduler_file=str(sched), timeout=60) as client:
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, what="2 worker ranks")
        assert sum(client.gather(client.map(abs, range(-10, 0)))) == 55
        client.shutdown()
    extra.wait(timeout=60)
