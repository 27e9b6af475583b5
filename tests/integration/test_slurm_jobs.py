"""Real sbatch/squeue/scontrol/scancel on this machine's SLURM (see conftest.py).

The TIMEOUT test is last on purpose: its job was submitted at the session's first
SLURM test and has been running out its walltime meanwhile.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import (
    ClusterStatus,
    JobKind,
    JobSpec,
    JobState,
    JobStatusPoller,
    SlurmCluster,
    SlurmSystem,
    SubmissionError,
    run_command,
)
from launchers._slurm import parse_scontrol
from runtime import rendezvous, testing

pytestmark = pytest.mark.slurm

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def poller_for(system, interval=0.5):
    return JobStatusPoller(system, min_interval=interval)


def submit_shell(system, tmp_path, body: str, **sbatch_options) -> str:
    """Submit a plain shell script (not a rendered one) and return its id."""
    lines = ["#!/bin/bash", f"#SBATCH --output={tmp_path}/job-%j.out"]
    lines += [f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in sbatch_options.items()]
    path = tmp_path / "job.sh"
    path.write_text("\n".join([*lines, body, ""]))
    return system.submit(str(path))


def test_trivial_job_is_seen_queued_or_running_then_completed(tmp_path, cancel_jobs):
    system = SlurmSystem()
    go = tmp_path / "go"
    # The job waits for the test to have seen it run, so RUNNING cannot be missed.
    body = f"for i in $(seq 600); do [ -e {go} ] && exit 0; sleep 0.1; done; exit 9"
    job_id = cancel_jobs(system, submit_shell(system, tmp_path, body))
    poller = poller_for(system)
    poller.track(job_id)
    first = poller.poll()[job_id]
    assert first.state in (JobState.PENDING, JobState.RUNNING)
    assert first.source == "squeue"
    running = poller.wait([job_id], lambda s: s.state is JobState.RUNNING, timeout=60)[job_id]
    assert running.state is JobState.RUNNING and running.source == "squeue"
    go.touch()
    done = poller.wait([job_id], lambda s: s.state.is_terminal, timeout=60)[job_id]
    assert done.state is JobState.COMPLETED
    assert done.source in ("scontrol", "sacct")  # it left squeue's default view
    assert done.exit_code == 0


def test_failing_job_is_failed_with_its_exit_code(tmp_path, cancel_jobs):
    system = SlurmSystem()
    job_id = cancel_jobs(system, submit_shell(system, tmp_path, "exit 3"))
    done = poller_for(system).wait([job_id], lambda s: s.state.is_terminal, timeout=60)[job_id]
    assert (done.state, done.exit_code) == (JobState.FAILED, 3)


def test_scancel_gives_cancelled(tmp_path, cancel_jobs):
    system = SlurmSystem()
    job_id = cancel_jobs(system, submit_shell(system, tmp_path, "sleep 600"))
    poller = poller_for(system)
    poller.wait([job_id], lambda s: s.state is JobState.RUNNING, timeout=60)
    system.cancel([job_id])
    done = poller.wait([job_id], lambda s: s.state.is_terminal, timeout=60)[job_id]
    assert done.state is JobState.CANCELLED
    system.cancel([job_id])  # cancelling an ended job again is not an error


def test_bad_partition_is_a_permanent_submission_error_and_not_retried(tmp_path):
    calls = []

    def counting(argv, **kw):
        calls.append(list(argv))
        return run_command(argv, **kw)

    system = SlurmSystem(runner=counting)
    spec = JobSpec(queue="no-such-partition", tasks_per_node=2, log_directory=str(tmp_path))
    with pytest.raises(SubmissionError) as info:
        system.submit_job(spec, JobKind.CLUSTER, scheduler_file=str(tmp_path / "s.json"))
    error = info.value
    assert not error.transient
    assert len(calls) == 1 and calls[0][0] == "sbatch"
    assert "invalid partition" in error.stderr.lower()
    assert error.script_path and Path(error.script_path).exists()
    assert "no-such-partition" in str(error)


def test_rendered_job_writes_its_output_into_a_hostile_log_directory(
    tmp_path, standin_python, cancel_jobs
):
    # A worker job whose scheduler file and stop file already exist: its ranks join,
    # say so, and end - a rendered job that runs to completion on real MPI.
    logs = tmp_path / 'it\'s a "log" dir $HOME 100%'
    scheduler_file = tmp_path / "sched.json"
    rendezvous.write_scheduler_file(scheduler_file, "tcp://127.0.0.1:1", b"s")
    Path(f"{scheduler_file}.stop").touch()
    system = SlurmSystem()
    spec = JobSpec(
        name="hpc worker; echo pwned",
        walltime="00:05:00",
        tasks_per_node=2,
        python=standin_python,
        mpi_launcher=MPIEXEC,
        log_directory=str(logs),
        working_directory=str(tmp_path),
    )
    job = system.submit_job(spec, JobKind.WORKER, scheduler_file=str(scheduler_file))
    cancel_jobs(system, job.job_id)
    done = poller_for(system).wait([job.job_id], lambda s: s.state.is_terminal, timeout=90)
    log = Path(job.log_path)
    assert done[job.job_id].state is JobState.COMPLETED, log.read_text()
    assert log.parent == logs
    assert sorted(line for line in log.read_text().splitlines() if "stand-in" in line) == [
        f"stand-in worker rank {r} joined {scheduler_file}" for r in (0, 1)
    ]
    record = subprocess.run(
        ["scontrol", "-o", "show", "job", job.job_id], capture_output=True, text=True, check=True
    ).stdout
    assert "JobName=hpc worker; echo pwned " in record


@pytest.mark.parametrize("profile", [None, "slurm"], ids=["mpiexec", "srun-profile"])
@pytest.mark.timeout(240)
def test_slurm_cluster_starts_scales_and_closes_through_real_jobs(
    tmp_path, standin_python, profile
):
    launcher = {} if profile else {"mpi_launcher": MPIEXEC}
    cluster = SlurmCluster(
        profile=profile,
        python=standin_python,
        tasks_per_node=2,
        walltime="00:10:00",
        working_directory=str(tmp_path),
        start_timeout="120s",
        interface="lo",  # loopback only in tests
        status_min_interval="0.5s",
        **launcher,
    )
    with cluster:
        assert cluster.status is ClusterStatus.RUNNING
        assert cluster.scheduler_info["job_id"] == cluster.cluster_job.job_id
        cluster.scale(2)
        workers = cluster.worker_jobs()
        assert len(workers) == 2
        poller = cluster.poller
        logs = Path(cluster.spec.log_directory)

        def ready(_status):
            return len(list(logs.glob("scheduler-*.json.worker-*"))) == 4

        poller.wait(workers, ready, timeout=120)
        markers = sorted(p.name.split(".worker-")[1] for p in logs.glob("*.worker-*"))
        assert markers == sorted(f"{j}-{r}" for j in workers for r in (0, 1))
        statuses = poller.poll()
        assert {statuses[j].state for j in workers} == {JobState.RUNNING}
        cluster.scale(1)
        (gone,) = [j for j in workers if j not in cluster.worker_jobs()]
        ended = poller.wait([gone], lambda s: s.state.is_terminal, timeout=60)[gone]
        assert ended.state is JobState.CANCELLED
        cluster_job = cluster.cluster_job.job_id
    everything = [cluster_job, *workers]
    final = poller.wait(everything, lambda s: s.state.is_terminal, timeout=60)
    assert {s.state for s in final.values()} == {JobState.CANCELLED}


def wait_for_workers(client, count: int, timeout: float = 120.0) -> int:
    def joined() -> int:
        workers = len(client.scheduler_info()["workers"])
        return workers if workers >= count else 0

    return testing.wait_until(joined, f"{count} workers", timeout, max_interval=0.2)


@pytest.mark.parametrize("profile", [None, "slurm"], ids=["mpiexec", "srun-profile"])
@pytest.mark.timeout(300)
def test_login_node_client_computes_a_graph_on_a_real_slurm_cluster(tmp_path, profile):
    """The real runtime: `python -m runtime.mpi` ranks in sbatch jobs, a Client here."""
    from runtime.client import Client
    from runtime.delayed import delayed

    launcher = {} if profile else {"mpi_launcher": MPIEXEC}
    cluster = SlurmCluster(
        profile=profile,
        python=sys.executable,
        tasks_per_node=2,
        walltime="00:10:00",
        working_directory=str(tmp_path),
        start_timeout="120s",
        interface="lo",  # loopback only in tests
        status_min_interval="0.5s",
        **launcher,
    )
    with cluster, Client(cluster) as client:
        total = delayed(sum)([delayed(pow)(i, 2) for i in range(20)])
        assert total.compute() == sum(i * i for i in range(20))
        cluster.scale(1)
        assert wait_for_workers(client, 3) == 3
        assert client.submit(pow, 3, 4).result(timeout=60) == 81
        ids = [cluster.cluster_job.job_id, *cluster.worker_jobs()]
    final = cluster.poller.wait(ids, lambda s: s.state.is_terminal, timeout=60)
    assert all(s.state.is_terminal for s in final.values()), final


@pytest.mark.timeout(300)
def test_adapt_adds_a_worker_job_for_queued_work_and_cancels_it_when_idle(tmp_path):
    from runtime.client import Client

    cluster = SlurmCluster(
        python=sys.executable,
        mpi_launcher=MPIEXEC,
        tasks_per_node=2,
        walltime="00:10:00",
        working_directory=str(tmp_path),
        start_timeout="120s",
        interface="lo",  # loopback only in tests
        status_min_interval="0.5s",
    )
    go = tmp_path / "go"

    def wait_on_file(path: str, value: int) -> int:
        # Defined here so it travels by value: job processes cannot import this module.
        from runtime.testing import wait_for_path

        return wait_for_path(path, 120, value)

    with cluster, Client(cluster) as client:
        cluster.adapt(minimum_jobs=0, maximum_jobs=1, interval="0.5s", wait_count=2)
        # More blocked tasks than the one cluster-job worker can take: work queues up.
        futures = client.map(wait_on_file, [str(go)] * 8, range(8))
        poller = cluster.poller
        # The adapt thread decides on its own interval.
        (job,) = testing.wait_until(cluster.worker_jobs, "adapt to add a worker job", 120)
        # The new job's workers joined the cluster job's one.
        assert wait_for_workers(client, 1 + cluster.spec.total_tasks) == 3
        go.touch()
        assert client.gather(futures) == list(range(8))
        del futures
        final = poller.wait([job], lambda s: s.state.is_terminal, timeout=120)
        assert final[job].state is JobState.CANCELLED
        assert cluster.worker_jobs() == []
        assert client.submit(pow, 2, 5).result(timeout=60) == 32  # the cluster still works


def test_drain_signal_and_requeue_directives_are_accepted_by_sbatch(tmp_path, cancel_jobs):
    system = SlurmSystem()
    spec = JobSpec(
        walltime="00:10:00",
        restart="requeue",
        drain_lead="3min",
        mpi_launcher="srun",
        tasks_per_node=2,
        log_directory=str(tmp_path),
        extra_directives=["--hold"],  # never runs: only sbatch's verdict matters here
    )
    job = system.submit_job(
        spec,
        JobKind.CLUSTER,
        scheduler_file=str(tmp_path / "s.json"),
        variables={"HPC_JOB_RESTARTS": "1", "HPC_JOB_RESTART_OF": "1"},
    )
    cancel_jobs(system, job.job_id)
    script = Path(job.script_path).read_text()
    assert "#SBATCH --signal=USR2@180\n#SBATCH --requeue\n" in script
    record = parse_scontrol(
        subprocess.run(
            ["scontrol", "-o", "show", "job", job.job_id],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert (record["JobState"], record["Reason"], record["Requeue"]) == (
        "PENDING",
        "JobHeldUser",
        "1",
    )
    test_only = subprocess.run(
        ["sbatch", "--test-only", job.script_path], capture_output=True, text=True, check=False
    )
    assert test_only.returncode == 0, test_only.stderr


def test_srun_ranks_start_with_the_drain_signal_ignored(tmp_path, cancel_jobs):
    """SLURM may send ``--signal`` as the step starts: no rank may die of it then.

    The ranks' "python" here is a shell script that records which signals its process
    started with ignored (``SigIgn`` in ``/proc``), as the interpreter would inherit
    them. With a walltime the drain signal (USR2) must be among them; without one
    (no ``--signal``) it is not, so the ignore comes from the rendered launch line.
    """
    probe = tmp_path / "rank-python"
    record = f"{tmp_path}/sigign.$SLURM_JOB_ID.$SLURM_PROCID"
    probe.write_text(f"#!/bin/sh\ngrep SigIgn /proc/$$/status > {record}\n")
    probe.chmod(0o755)
    system = SlurmSystem()
    jobs = {}
    for walltime in ("00:05:00", None):
        spec = JobSpec(
            walltime=walltime,
            mpi_launcher="srun",
            tasks_per_node=2,
            python=str(probe),
            log_directory=str(tmp_path),
            working_directory=str(tmp_path),
        )
        job = system.submit_job(spec, JobKind.WORKER, scheduler_file=str(tmp_path / "s.json"))
        jobs[walltime] = cancel_jobs(system, job.job_id)
    done = poller_for(system).wait(list(jobs.values()), lambda s: s.state.is_terminal, timeout=90)
    assert {s.state for s in done.values()} == {JobState.COMPLETED}, done

    def usr2_ignored(job_id: str) -> list[bool]:
        masks = [(tmp_path / f"sigign.{job_id}.{rank}").read_text().split()[1] for rank in (0, 1)]
        return [bool(int(mask, 16) & (1 << (signal.SIGUSR2 - 1))) for mask in masks]

    assert usr2_ignored(jobs["00:05:00"]) == [True, True]
    assert usr2_ignored(jobs[None]) == [False, False]


def test_a_restart_submission_passes_its_variables_and_keeps_the_environment(
    tmp_path, cancel_jobs, monkeypatch
):
    monkeypatch.setenv("HPC_TEST_SUBMITTER", "kept")
    system = SlurmSystem()
    script = tmp_path / "env.sh"
    output = tmp_path / "env.out"
    body = 'echo "$HPC_JOB_RESTARTS $HPC_JOB_RESTART_OF $HPC_TEST_SUBMITTER"'
    script.write_text(f"#!/bin/bash\n#SBATCH --output={output}\n{body}\n")
    job_id = system.submit(
        str(script), variables={"HPC_JOB_RESTARTS": "2", "HPC_JOB_RESTART_OF": "12"}
    )
    cancel_jobs(system, job_id)
    done = poller_for(system).wait([job_id], lambda s: s.state.is_terminal, timeout=60)
    assert done[job_id].state is JobState.COMPLETED
    assert output.read_text().split() == ["2", "12", "kept"]


@pytest.mark.timeout(300)
def test_job_exceeding_its_walltime_is_timeout(walltime_job):
    """Last in this file: the job started with the session's first SLURM test."""
    system = SlurmSystem()
    status = poller_for(system, interval=2).wait(
        [walltime_job], lambda s: s.state.is_terminal, timeout=240
    )[walltime_job]
    assert status.state is JobState.TIMEOUT, status
    assert status.reason == "TimeLimit"
