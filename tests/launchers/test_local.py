"""LocalSystem and LocalMPICluster: real processes and real mpiexec, no batch system.

The cluster tests run the rendered script under the MPICH wheel's ``mpiexec`` with
``tests/launchers/standin_runtime.py`` in place of ``python -m runtime.mpi``.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from launchers import (
    ClusterStatus,
    JobKind,
    JobSpec,
    JobState,
    JobStatusPoller,
    LocalMPICluster,
    LocalSystem,
)
from runtime import testing

MPIEXEC = Path(sys.executable).parent / "mpiexec"
STANDIN = Path(__file__).with_name("standin_runtime.py")


def process_ends(pid: int, timeout: float) -> bool:
    """Whether ``pid`` exits (or is a zombie awaiting its reaper) within ``timeout``."""

    def ended() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    try:
        return testing.wait_until(ended, f"process {pid} to end", timeout)
    except TimeoutError:
        return False


def wait_until_ended(system, job_id, timeout=30.0):
    poller = JobStatusPoller(system, min_interval=0.05)
    return poller.wait([job_id], lambda s: s.state.is_terminal, timeout=timeout)[job_id]


def run_script(tmp_path, body: str):
    system = LocalSystem()
    path = tmp_path / "job.sh"
    path.write_text(f"#!/bin/bash\n{body}\n")
    log = tmp_path / "job.log"
    return system, system.submit(str(path), output=str(log)), log


def test_a_script_that_succeeds_is_completed_with_its_output_in_the_log(tmp_path):
    system, job_id, log = run_script(tmp_path, "echo hello from the job")
    status = wait_until_ended(system, job_id)
    assert (status.state, status.exit_code, status.source) == (JobState.COMPLETED, 0, "local")
    assert log.read_text() == "hello from the job\n"


def test_a_script_that_fails_is_failed_with_its_exit_code(tmp_path):
    system, job_id, _ = run_script(tmp_path, "exit 3")
    status = wait_until_ended(system, job_id)
    assert (status.state, status.exit_code) == (JobState.FAILED, 3)


def test_cancel_ends_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    system, job_id, _ = run_script(tmp_path, f"sleep 600 & echo $! > {pid_file}; wait")
    assert system.query([job_id])[job_id].state is JobState.RUNNING
    poller = JobStatusPoller(system, min_interval=0.05)
    poller.wait(
        [job_id], lambda s: pid_file.exists() and pid_file.read_text().strip() != "", timeout=10
    )
    child = int(pid_file.read_text())
    system.cancel([job_id])
    assert system.query([job_id])[job_id].state is JobState.CANCELLED
    assert process_ends(child, timeout=10)


def test_jobs_it_did_not_start_are_unknown_and_never_signalled():
    system = LocalSystem()
    assert system.query(["1"])["1"].state is JobState.UNKNOWN
    system.cancel([str(os.getpid())])  # must not touch this process


@pytest.fixture
def standin_python(tmp_path):
    """An executable that runs the stand-in runtime in place of `python -m runtime.mpi`."""
    wrapper = tmp_path / "bin" / "python-standin"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def local_cluster(tmp_path, standin_python):
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable} (pip install mpich)")
    text = resources.files("launchers").joinpath("launchers.yaml").read_text()
    section = yaml.safe_load(text)["launchers"]
    section["profile-path"] = []
    cluster = LocalMPICluster(
        profile="local-mpi",
        config=section,
        python=standin_python,
        mpi_launcher=str(MPIEXEC),
        tasks_per_node=2,
        working_directory=str(tmp_path),
        start_timeout="60s",
        status_min_interval="0.05s",
    )
    yield cluster
    cluster.close()


def test_local_mpi_cluster_starts_scales_and_closes(local_cluster, tmp_path):
    cluster = local_cluster.start()
    assert cluster.status is ClusterStatus.RUNNING
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    assert len(cluster.secret) == 32
    cluster.scale(1)
    (worker,) = cluster.worker_jobs()
    poller = JobStatusPoller(cluster.system, min_interval=0.05)
    markers = lambda: sorted(Path(tmp_path / "hpc-logs").glob("scheduler-*.json.worker-*"))  # noqa: E731
    poller.wait([worker], lambda s: len(markers()) == 2, timeout=30)
    assert [m.name.rsplit("-", 1)[1] for m in markers()] == ["0", "1"]
    cluster_job = cluster.cluster_job.job_id
    cluster.close()
    states = cluster.system.query([cluster_job, worker])
    assert {s.state for s in states.values()} == {JobState.CANCELLED}


def test_local_batch_job_exits_with_the_script_status(local_cluster, tmp_path):
    local_cluster.spec.tasks_per_node = 3
    script = tmp_path / "user script.py"
    script.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(7)\n")
    job = local_cluster.submit_batch(str(script), ["a b", "$x"])
    status = wait_until_ended(local_cluster.system, job.job_id)
    assert (status.state, status.exit_code) == (JobState.FAILED, 7)
    assert "args ['a b', '$x']" in Path(job.log_path).read_text()


def test_local_script_has_no_directives():
    text = LocalSystem().render(JobSpec(python="/p"), JobKind.WORKER, scheduler_file="/s")
    assert "#SBATCH" not in text and "#PBS" not in text
