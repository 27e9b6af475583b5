"""Walltime on the real SLURM, end to end: drain, restart, and the client carries on.

A cluster job with a one-minute walltime runs a graph that needs longer. Ahead of the
limit (``--signal=USR2@<lead>`` and ``HPC_JOB_DRAIN_AT``) its scheduler stops starting
tasks, lets the running ones finish - their checkpoints are written - and the job
restarts: it submits its successor (``resubmit``) or SLURM runs it again
(``requeue``). The Client on this "login node" keeps waiting on its future, follows
the cluster to the successor's scheduler, sends its graph again, and receives the
result; tasks finished in the first job are loaded, not computed again. A node
failure (the node set DOWN) and a preemption (a job of a higher partition tier) are
met the same way: the cluster on the login node submits the replacement.

Each task leaves a marker named after the job (and restart) that ran it, so the test
can tell which run computed what.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launchers import JobState, SlurmCluster
from runtime import testing
from runtime.rendezvous import read_scheduler_file

pytestmark = pytest.mark.slurm

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
TASKS = 40
SECONDS_PER_TASK = 1.0


def slow(runs: str, i: int) -> int:
    time.sleep(SECONDS_PER_TASK)  # the workload: a task that takes a while
    run = f"{os.environ.get('SLURM_JOB_ID')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    Path(runs, f"task-{i}.{run}.{uuid.uuid4().hex}").touch()
    return i * i


def executions(runs: Path) -> list[tuple[str, str]]:
    """``(task label, "<job id>-<restart count>")`` of every execution so far."""
    out = []
    for p in runs.iterdir():
        label, job, _ = p.name.split(".")
        out.append((label, job))
    return out


def graph_of(value: int):
    from runtime.delayed import delayed

    return delayed(int)(value)


def graph(runs: Path):
    from runtime.delayed import delayed

    return delayed(sum)([delayed(slow)(str(runs), i) for i in range(TASKS)])


def make_cluster(tmp_path: Path, restart: str, **settings: Any) -> SlurmCluster:
    # Drain 25 s into the job: mid-graph.
    settings = {"walltime": "00:01:00", "drain_lead": "35s", **settings}
    return SlurmCluster(
        checkpoint=tmp_path / "store",  # every computation of its clients
        profile="slurm",  # srun: the ranks are a job step, which --signal reaches
        python=sys.executable,
        **settings,
        tasks_per_node=2,  # the scheduler and one worker with one thread
        restart=restart,
        working_directory=str(tmp_path),
        start_timeout="120s",
        interface="lo",  # loopback only in tests
        status_min_interval="0.5s",
        env=[f"PYTHONPATH={Path(__file__).resolve().parents[2]}"],
    )


def check_resumed(runs: Path, first_job: str) -> None:
    """The work spanned two job runs; what the first finished, the second did not redo."""
    done = executions(runs)
    jobs = Counter(job for _, job in done)
    assert first_job in jobs and len(jobs) >= 2, jobs
    assert sorted({label for label, _ in done}) == sorted(f"task-{i}" for i in range(TASKS))
    in_first = {label for label, job in done if job == first_job}
    counts = Counter(label for label, _ in done)
    again = sorted(label for label in in_first if counts[label] > 1)
    assert len(again) <= 0.1 * len(in_first), (again, jobs)


@pytest.mark.timeout(420)
def test_walltime_drain_resubmits_the_job_and_the_client_receives_the_result(
    tmp_path: Path,
) -> None:
    from runtime.client import Client

    runs = tmp_path / "runs"
    runs.mkdir()
    cluster = make_cluster(tmp_path, "resubmit")
    with cluster, Client(cluster) as client:
        first = cluster.cluster_job
        assert first is not None
        future = client.compute(graph(runs))
        assert future.result(timeout=360) == sum(i * i for i in range(TASKS))
        # SLURM may send the signal well before <lead> (its timer is coarse), so the
        # work may span more than two jobs: the cluster followed the whole chain.
        last = cluster.cluster_job
        assert last is not None and last.job_id != first.job_id
        info = read_scheduler_file(cluster.scheduler_file)
        assert info["job_id"] == last.job_id and info["restarts"] >= 1
        assert info["restart_of"] in cluster.jobs
        ended = cluster.poller.wait([first.job_id], lambda s: s.state.is_terminal, timeout=60)
        assert ended[first.job_id].state is JobState.COMPLETED  # it ended itself in time
    log = Path(first.log_path or "").read_text(errors="replace")
    assert "draining (" in log and "resubmitted: its successor is job" in log, log
    check_resumed(runs, f"{first.job_id}-0")


@pytest.mark.timeout(480)
def test_walltime_drain_requeues_the_job_and_the_client_receives_the_result(
    tmp_path: Path,
) -> None:
    """SLURM holds a requeued job for about two minutes before it runs again.

    The ranks are started by mpiexec here, so the drain comes from HPC_JOB_DRAIN_AT
    alone, 25 s into each run: two runs do the work.
    """
    from runtime.client import Client

    runs = tmp_path / "runs"
    runs.mkdir()
    cluster = make_cluster(tmp_path, "requeue", mpi_launcher=MPIEXEC, mpi_args=[])
    with cluster, Client(cluster) as client:
        job = cluster.cluster_job
        assert job is not None
        future = client.compute(graph(runs))
        assert future.result(timeout=420) == sum(i * i for i in range(TASKS))
        assert cluster.cluster_job is not None and cluster.cluster_job.job_id == job.job_id
        info = read_scheduler_file(cluster.scheduler_file)
        assert info["job_id"] == job.job_id and info["restarts"] == 1
    log = Path(job.log_path or "").read_text(errors="replace")
    assert "draining (" in log and "requeues itself (scontrol requeue" in log, log
    check_resumed(runs, f"{job.job_id}-0")


@pytest.mark.timeout(240)
def test_a_scaled_worker_job_gets_its_replacement_before_its_walltime(tmp_path: Path) -> None:
    """The keeper submits the replacement ``drain_lead`` before the walltime, not after.

    Worker job of a one-minute walltime with a 35 s lead: about 25 s into its run (plus
    up to one keeper interval) a second worker job is submitted while the first still
    runs, so that the replacement can queue and start in time.
    """
    from runtime.client import Client

    cluster = make_cluster(tmp_path, "resubmit")
    with cluster, Client(cluster) as client:
        # A finished task, so that the cluster job's own drain (also 25 s in) restarts
        # it rather than ending the cluster; the worker job's workers wait for it.
        assert client.compute(graph_of(3)).result(timeout=60) == 3
        assert cluster.cluster_job is not None
        initial = cluster.cluster_job.job_id
        cluster.scale(1)
        (first,) = cluster.worker_jobs()
        cluster.poller.wait([first], lambda s: s.state is JobState.RUNNING, timeout=60)
        seen_running = time.monotonic()

        def replacement() -> list[str]:
            return [j for j in cluster.worker_jobs() if j != first]

        (second,) = testing.wait_until(replacement, "a replacement worker job", 90, 0.5)
        waited = time.monotonic() - seen_running
        state = cluster.poller.poll()[first].state
        assert state is JobState.RUNNING, state  # the old job still works meanwhile
        assert 15 <= waited <= 45, waited  # hand-over at 25 s, give or take the polling

        def first_serves_the_successor() -> bool:
            # The cluster job drained (by 25 s into its run) and was replaced; the worker
            # job's workers were not closed with the drained scheduler: they joined the
            # successor's.
            job = cluster.cluster_job
            if job is None or job.job_id == initial:
                return False
            try:
                workers = client.scheduler_info()["workers"].values()
            except Exception:  # noqa: BLE001 - between two schedulers
                return False
            return any(w.get("job_id") == first for w in workers)

        testing.wait_until(first_serves_the_successor, "the old worker job in the successor", 60)


def _scontrol_node(node: str, state: str, reason: str = "") -> None:
    argv = ["scontrol", "update", f"nodename={node}", f"state={state}"]
    if reason:
        argv.append(f"reason={reason}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    # The node may be back already (ReturnToService=2 and a live slurmd): "resume" on
    # an idle node is "Invalid node state specified".
    if done.returncode != 0 and state != "resume":
        raise AssertionError(f"{' '.join(argv)}: {done.stderr or done.stdout}")


def _output(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def fail_the_node(job_id: str, tmp_path: Path) -> Callable[[], None]:
    """Set the job's node DOWN (its jobs end NODE_FAIL); return what brings it back."""
    node = _output(["squeue", "-h", "-j", job_id, "-o", "%N"]).strip()
    assert node, f"job {job_id} runs on no node"
    _scontrol_node(node, "down", "hpc-toolkit test: node failure")
    return lambda: _scontrol_node(node, "resume")


def preempt(job_id: str, tmp_path: Path) -> Callable[[], None]:
    """Start an exclusive job in the higher-tier 'urgent' partition (.ci/setup-slurm.sh)."""
    argv = ["sbatch", "--parsable", "-p", "urgent", "--exclusive", "-N1"]
    argv += [f"--output={tmp_path}/urgent-%j.out", "--wrap", "sleep 2"]
    urgent = _output(argv).strip()
    return lambda: subprocess.run(["scancel", urgent], capture_output=True, timeout=30)


@pytest.mark.parametrize(
    ("interrupt", "state"),
    [(fail_the_node, JobState.NODE_FAIL), (preempt, JobState.PREEMPTED)],
    ids=["node-failure", "preemption"],
)
@pytest.mark.timeout(420)
def test_interrupted_cluster_job_is_resubmitted_and_the_client_receives_the_result(
    tmp_path: Path, interrupt: Callable[[str, Path], Callable[[], None]], state: JobState
) -> None:
    """The cluster job ends with no drain and no warning; the login node replaces it.

    A node failure sets the job's node DOWN; a preemption starts a job of a higher
    partition tier that needs the whole node. Either way the job ends (NODE_FAIL,
    PREEMPTED), the cluster on this "login node" submits a replacement, which runs once
    the node is free, and the Client follows it. (Both end every job on the node: this
    file runs after the SLURM tests that keep a job running across tests.)
    """
    from runtime.client import Client

    runs = tmp_path / "runs"
    runs.mkdir()
    cluster = make_cluster(tmp_path, "resubmit", walltime="00:10:00")
    with cluster, Client(cluster) as client:
        first = cluster.cluster_job
        assert first is not None
        future = client.compute(graph(runs))
        # No drain here: the task running at the interruption may have left its marker
        # but not yet its checkpoint. With one worker thread that is one task, under
        # 10% of the 15 done before.
        testing.wait_until(lambda: len(executions(runs)) >= 15, "15 tasks done", 120)
        restore = interrupt(first.job_id, tmp_path)
        try:
            done = cluster.poller.wait([first.job_id], lambda s: s.state.is_terminal, timeout=120)
        finally:
            restore()
        assert done[first.job_id].state is state, done
        assert future.result(timeout=300) == sum(i * i for i in range(TASKS))
        last = cluster.cluster_job
        assert last is not None and last.job_id != first.job_id
        assert read_scheduler_file(cluster.scheduler_file)["restart_of"] == first.job_id
    check_resumed(runs, f"{first.job_id}-0")


BATCH_SCRIPT = """
import os, sys, time, uuid
from pathlib import Path
import hpc

runs, store = sys.argv[1], sys.argv[2]

def slow(i):
    time.sleep(1.0)
    run = f"{os.environ.get('SLURM_JOB_ID')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    Path(runs, f"task-{i}.{run}.{uuid.uuid4().hex}").touch()
    return i * i

total = hpc.delayed(sum)([hpc.delayed(slow)(i) for i in range(40)])
sys.stdout.write(f"RESULT {hpc.compute(total, checkpoint=store)[0]}\\n")  # one write: shared log
sys.stdout.flush()
"""


@pytest.mark.timeout(420)
def test_a_batch_script_drained_at_its_walltime_runs_again_and_finishes(tmp_path: Path) -> None:
    """`hpc submit --restart resubmit`: the script is the client, inside the job."""
    runs, store, script = tmp_path / "runs", tmp_path / "store", tmp_path / "job.py"
    runs.mkdir()
    script.write_text(BATCH_SCRIPT)
    hpc = str(Path(sys.executable).parent / "hpc")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    argv = [hpc, "submit", "--profile", "slurm", "--walltime", "00:01:00"]
    argv += ["--drain-lead", "35s", "--restart", "resubmit", "--"]
    argv += ["python", str(script), str(runs), str(store)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    first = done.stdout.split()[3]
    logs = tmp_path / "hpc-logs"

    def result() -> str:
        text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
        complete = text.split("\n")[:-1]  # not a line still being written
        return next((line for line in complete if line.startswith("RESULT")), "")

    try:
        line = testing.wait_until(result, "the script's result in a job log", 360, 1.0)
    except TimeoutError:
        text = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs.glob("*.log")
        )
        pytest.fail(f"no RESULT line in the chain's job logs:\n{text}")
    finally:
        ids = [p.stem.rsplit("-", 1)[-1] for p in logs.glob("*.log")]
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)
    assert line == f"RESULT {sum(i * i for i in range(40))}"
    first_log = next(logs.glob(f"*-{first}.log")).read_text(errors="replace")
    assert "draining (" in first_log and "the batch script stops here" in first_log
    check_resumed(runs, f"{first}-0")
