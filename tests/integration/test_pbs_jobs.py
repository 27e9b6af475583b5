"""Real qsub/qstat/qdel (SLURM's Torque-compatible commands) with PBS-rendered scripts.

Scripts are rendered in the Torque dialect (``#PBS -l nodes=N:ppn=C``), as the shipped
``pbs`` profile does; see conftest.py for the stand-in runtime.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launchers import (
    ClusterStatus,
    JobKind,
    JobSpec,
    JobState,
    JobStatusPoller,
    PBSCluster,
    PBSSystem,
)
from runtime import rendezvous

pytestmark = pytest.mark.slurm

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def pbs_cluster(tmp_path, standin_python, **settings):
    settings.setdefault("tasks_per_node", 2)
    return PBSCluster(
        profile="pbs",
        python=standin_python,
        mpi_launcher=MPIEXEC,
        walltime="00:10:00",
        working_directory=str(tmp_path),
        start_timeout="120s",
        interface="lo",  # loopback only in tests
        status_min_interval="0.5s",
        **settings,
    )


def test_qsub_runs_a_torque_rendered_job_and_qstat_reports_it_completed(
    tmp_path, standin_python, cancel_jobs
):
    cluster = pbs_cluster(tmp_path, standin_python)
    system = cluster.system
    assert isinstance(system, PBSSystem) and system.dialect == "torque"
    assert "#PBS -l nodes=1:ppn=2\n" in cluster.job_script("worker")
    # A worker job whose scheduler file and stop file exist already: it runs and ends.
    scheduler_file = tmp_path / "sched.json"
    rendezvous.write_scheduler_file(scheduler_file, "tcp://127.0.0.1:1", b"s")
    Path(f"{scheduler_file}.stop").touch()
    job = system.submit_job(cluster.spec, JobKind.WORKER, scheduler_file=str(scheduler_file))
    cancel_jobs(system, job.job_id)
    status = cluster.poller.wait([job.job_id], lambda s: s.state.is_terminal, timeout=90)
    status = status[job.job_id]
    log = Path(job.log_path).read_text()
    assert status.state is JobState.COMPLETED and status.native_state == "C", log
    assert status.source == "qstat"
    assert "stand-in worker rank 1 joined" in log
    cluster.close()


def test_qdel_ends_a_running_job(tmp_path, standin_python, cancel_jobs):
    cluster = pbs_cluster(tmp_path, standin_python)
    system = cluster.system
    job = system.submit_job(cluster.spec, scheduler_file=str(tmp_path / "s.json"))
    cancel_jobs(system, job.job_id)
    poller = cluster.poller
    poller.track(job.job_id)
    running = poller.wait([job.job_id], lambda s: s.state is JobState.RUNNING, timeout=60)
    assert running[job.job_id].native_state == "R"
    system.cancel([job.job_id])
    ended = poller.wait([job.job_id], lambda s: s.state.is_terminal, timeout=60)[job.job_id]
    assert ended.state.is_terminal and ended.native_state == "C"
    cluster.close()


@pytest.mark.timeout(240)
def test_pbs_cluster_starts_scales_and_closes_through_qsub(tmp_path, standin_python):
    with pbs_cluster(tmp_path, standin_python) as cluster:
        assert cluster.status is ClusterStatus.RUNNING
        assert cluster.scheduler_address.startswith("tcp://")
        cluster.scale(1)
        (worker,) = cluster.worker_jobs()
        logs = Path(cluster.spec.log_directory)
        cluster.poller.wait(
            [worker], lambda s: len(list(logs.glob("*.worker-*"))) == 2, timeout=120
        )
        assert sorted(p.name.rsplit("-", 1)[1] for p in logs.glob("*.worker-*")) == ["0", "1"]
        ids = [cluster.cluster_job.job_id, worker]
    final = cluster.poller.wait(ids, lambda s: s.state.is_terminal, timeout=60)
    assert all(s.state.is_terminal for s in final.values())


@pytest.mark.timeout(300)
def test_login_node_client_computes_a_graph_on_a_cluster_started_with_qsub(tmp_path):
    """The real runtime in Torque-dialect jobs submitted with qsub, a Client here."""
    from runtime.client import Client
    from runtime.delayed import delayed

    cluster = PBSCluster(
        profile="pbs",
        python=sys.executable,
        mpi_launcher=MPIEXEC,
        tasks_per_node=2,
        walltime="00:10:00",
        working_directory=str(tmp_path),
        start_timeout="120s",
        interface="lo",  # loopback only in tests
        status_min_interval="0.5s",
    )
    with cluster, Client(cluster) as client:
        total = delayed(sum)([delayed(pow)(i, 2) for i in range(20)])
        assert total.compute() == sum(i * i for i in range(20))
        assert client.submit(pow, 2, 5).result(timeout=60) == 32
        assert cluster.scheduler_info["job_id"] == cluster.cluster_job.job_id


def test_qsub_accepts_a_rerunnable_job(tmp_path, cancel_jobs):
    system = PBSSystem(dialect="torque")
    spec = JobSpec(
        walltime="00:10:00",
        restart="requeue",
        log_directory=str(tmp_path),
        extra_directives=["-h"],  # held: never runs
    )
    job = system.submit_job(spec, scheduler_file=str(tmp_path / "s.json"))
    cancel_jobs(system, job.job_id)
    assert "#PBS -r y\n" in Path(job.script_path).read_text()
    status = system.query([job.job_id])[job.job_id]
    assert status.state is JobState.PENDING


def test_a_restart_submitted_with_qsub_gets_its_variables_and_keeps_the_environment(
    tmp_path, cancel_jobs, monkeypatch
):
    # SLURM's qsub turns `-v` alone into `sbatch --export=NONE,...`: -V keeps the rest.
    monkeypatch.setenv("HPC_TEST_SUBMITTER", "kept")
    system = PBSSystem(dialect="torque")
    script = tmp_path / "env.sh"
    output = tmp_path / "env.out"
    script.write_text(
        '#!/bin/bash\necho "$HPC_JOB_RESTARTS $HPC_JOB_RESTART_OF $HPC_TEST_SUBMITTER"\n'
    )
    job_id = system.submit(
        str(script),
        output=str(output),
        variables={"HPC_JOB_RESTARTS": "3", "HPC_JOB_RESTART_OF": "12"},
    )
    cancel_jobs(system, job_id)
    poller = JobStatusPoller(system, min_interval=0.5)
    done = poller.wait([job_id], lambda s: s.state.is_terminal, timeout=60)[job_id]
    assert done.state is JobState.COMPLETED
    assert output.read_text().split() == ["3", "12", "kept"]
