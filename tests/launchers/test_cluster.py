"""JobQueueCluster: start, scale, adapt and close, against an in-memory batch system."""

from __future__ import annotations

import gc
import threading
from importlib import resources
from pathlib import Path

import pytest
import yaml

from launchers import (
    ClusterLoad,
    ClusterStartError,
    ClusterStatus,
    JobConfigError,
    JobKind,
    JobState,
    JobStatus,
    PBSCluster,
    SlurmCluster,
    SlurmSystem,
)
from runtime import rendezvous
from runtime.errors import SchedulerError

ADDRESS = "tcp://10.0.0.5:8786"
SECRET = b"\x01\x02secret"


class MemorySystem(SlurmSystem):
    """Renders real SLURM scripts; submits, cancels and reports states in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, JobState] = {}
        self.kinds: dict[str, str] = {}
        self.cancel_calls: list[list[str]] = []
        self.next_id = 100

    def submit(self, script_path, *, output=None):
        job_id = str(self.next_id)
        self.next_id += 1
        self.states[job_id] = JobState.PENDING
        self.kinds[job_id] = (
            "worker" if "--no-scheduler" in Path(script_path).read_text() else "cluster"
        )
        return job_id

    def cancel(self, job_ids):
        ids = list(job_ids)
        if ids:
            self.cancel_calls.append(ids)
        for job_id in ids:
            self.states[job_id] = JobState.CANCELLED

    def query(self, job_ids):
        return {
            j: JobStatus(j, self.states.get(j, JobState.UNKNOWN), source="memory") for j in job_ids
        }

    def worker_ids(self):
        return [j for j, k in self.kinds.items() if k == "worker"]


@pytest.fixture
def defaults():
    text = resources.files("launchers").joinpath("launchers.yaml").read_text()
    section = yaml.safe_load(text)["launchers"]
    section["profile-path"] = []
    return section


@pytest.fixture
def system():
    return MemorySystem()


@pytest.fixture
def make_cluster(defaults, system, clock, tmp_path):
    made = []

    def make(cls=SlurmCluster, sleep=None, **settings):
        settings.setdefault("working_directory", str(tmp_path))
        settings.setdefault("status_min_interval", 0)
        cluster = cls(
            config=defaults, system=system, clock=clock, sleep=sleep or clock.sleep, **settings
        )
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


def scheduler_appears(cluster, system, clock, *, after: int = 2, job_id=None):
    """A sleep for the cluster: on call number ``after`` the job runs and writes the file."""
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        clock.sleep(seconds)
        if len(calls) == after:
            job = cluster.cluster_job
            system.states[job.job_id] = JobState.RUNNING
            rendezvous.write_scheduler_file(
                cluster.scheduler_file, ADDRESS, SECRET, job_id=job_id or job.job_id
            )

    cluster._sleep = sleep
    return calls


def started(make_cluster, system, clock, **settings):
    cluster = make_cluster(**settings)
    scheduler_appears(cluster, system, clock)
    return cluster.start()


def test_start_submits_the_cluster_job_and_waits_for_its_scheduler_file(
    make_cluster, system, clock, tmp_path
):
    cluster = make_cluster()
    calls = scheduler_appears(cluster, system, clock, after=3)
    assert cluster.start() is cluster
    assert len(calls) == 3
    assert cluster.status is ClusterStatus.RUNNING
    assert cluster.scheduler_address == ADDRESS and cluster.secret == SECRET
    job = cluster.cluster_job
    assert job.kind is JobKind.CLUSTER and system.kinds == {job.job_id: "cluster"}
    script = Path(job.script_path).read_text()
    assert f"--scheduler-file {cluster.scheduler_file}" in script
    assert Path(job.script_path).parent == tmp_path / "hpc-logs"
    assert job.log_path == str(tmp_path / "hpc-logs" / f"hpc-{job.job_id}.log")


def test_scheduler_address_before_start_says_to_start(make_cluster):
    cluster = make_cluster()
    with pytest.raises(SchedulerError, match="start()"):
        _ = cluster.scheduler_address
    with pytest.raises(SchedulerError, match="start()"):
        _ = cluster.secret


def test_cluster_job_that_dies_before_its_scheduler_is_a_start_error_with_its_log(
    make_cluster, system, clock
):
    cluster = make_cluster()

    def sleep(seconds):
        clock.sleep(seconds)
        job = cluster.cluster_job
        system.states[job.job_id] = JobState.FAILED
        Path(job.log_path).write_text(
            "Traceback ...\nModuleNotFoundError: No module named 'runtime'\n"
        )

    cluster._sleep = sleep
    with pytest.raises(ClusterStartError) as info:
        cluster.start()
    assert info.value.state is JobState.FAILED
    assert "No module named 'runtime'" in str(info.value)
    assert info.value.log_path == cluster.cluster_job.log_path


def test_start_timeout_cancels_the_still_queued_job(make_cluster, system, clock):
    cluster = make_cluster(start_timeout="30s")
    with pytest.raises(ClusterStartError, match="within 30 s") as info:
        cluster.start()
    assert info.value.state is JobState.PENDING
    assert system.cancel_calls == [[cluster.cluster_job.job_id]]
    assert sum(clock.sleeps) == pytest.approx(30)


def test_a_stale_scheduler_file_is_removed_before_submitting(make_cluster, system, clock, tmp_path):
    path = tmp_path / "sched.json"
    rendezvous.write_scheduler_file(path, "tcp://10.9.9.9:1", b"old", job_id="1")
    cluster = make_cluster(scheduler_file=str(path))
    existed_at_first_wait = []
    calls = scheduler_appears(cluster, system, clock, after=2)
    original = cluster._sleep

    def sleep(seconds):
        if not calls:
            existed_at_first_wait.append(path.exists())
        original(seconds)

    cluster._sleep = sleep
    cluster.start()
    assert existed_at_first_wait == [False]
    assert cluster.scheduler_address == ADDRESS


def test_a_scheduler_file_written_by_another_job_is_not_taken(make_cluster, system, clock):
    cluster = make_cluster(start_timeout="5s")
    scheduler_appears(cluster, system, clock, after=1, job_id="424242")
    with pytest.raises(ClusterStartError):
        cluster.start()


def test_scale_adds_worker_jobs_then_cancels_queued_ones_newest_first(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock)
    cluster.scale(3)
    workers = system.worker_ids()
    assert len(workers) == 3 and cluster.worker_jobs() == workers
    system.states[workers[0]] = JobState.RUNNING
    cluster.scale(1)
    assert system.cancel_calls == [[workers[2], workers[1]]]
    assert cluster.worker_jobs() == [workers[0]]
    cluster.scale(1)
    assert len(system.worker_ids()) == 3 and len(system.cancel_calls) == 1


def test_scaling_down_running_jobs_retires_their_workers_first(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock)
    cluster.scale(2)
    for job_id in system.worker_ids():
        system.states[job_id] = JobState.RUNNING
    events = []
    cluster.retire_jobs = lambda ids: events.append(("retire", list(ids)))
    original_cancel = system.cancel
    system.cancel = lambda ids: (events.append(("cancel", list(ids))), original_cancel(ids))
    cluster.scale(0)
    newest_first = list(reversed(system.worker_ids()))
    assert events == [("retire", newest_first), ("cancel", newest_first)]


def test_finished_worker_jobs_no_longer_count(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock)
    cluster.scale(2)
    system.states[system.worker_ids()[0]] = JobState.TIMEOUT
    assert len(cluster.worker_jobs()) == 1
    cluster.scale(2)
    assert len(system.worker_ids()) == 3


def test_scale_needs_a_started_cluster_and_a_count(make_cluster, system, clock):
    cluster = make_cluster()
    with pytest.raises(SchedulerError, match="start the cluster"):
        cluster.scale(1)
    with pytest.raises(JobConfigError):
        cluster.scale(-1)


def test_adapt_step_follows_queued_work_and_retires_only_idle_jobs(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock, tasks_per_node=2)
    cluster.adapt(minimum_jobs=0, maximum_jobs=4, wait_count=1, interval="1h")
    # 2 workers per job: 5 queued tasks need 3 jobs.
    assert cluster.adapt_once(ClusterLoad(queued_tasks=5, idle_workers=0)) == 3
    workers = system.worker_ids()
    assert len(workers) == 3
    for job_id in workers:
        system.states[job_id] = JobState.RUNNING
    # All 6 workers idle but only the first job is reported wholly idle: only it goes.
    load = ClusterLoad(queued_tasks=0, idle_workers=6, idle_jobs=(workers[0],))
    cluster.adapt_once(load)
    assert system.cancel_calls == [[workers[0]]]


def test_adapt_without_a_load_source_waits_and_does_nothing(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock)
    cluster.adapt(interval="1h")
    assert cluster.adapt_once() is None
    assert system.worker_ids() == []


def test_adapt_thread_asks_the_load_source_and_stops_on_close(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock)
    asked = threading.Event()

    def load():
        asked.set()
        return ClusterLoad(queued_tasks=1, idle_workers=0)

    cluster.adapt(maximum_jobs=1, interval=0.01, load=load)
    assert asked.wait(10)
    thread = cluster._adapt_thread
    cluster.close()
    assert thread is not None and not thread.is_alive()
    assert len(system.worker_ids()) == 1


def test_scale_stops_adapting(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock)
    cluster.adapt(interval="1h", load=lambda: ClusterLoad(1, 0))
    cluster.scale(0)
    assert cluster.adapt_once() is None


def test_close_cancels_every_live_job_once_and_removes_the_scheduler_file(
    make_cluster, system, clock
):
    cluster = started(make_cluster, system, clock)
    cluster.scale(2)
    system.states[system.worker_ids()[0]] = JobState.COMPLETED
    cluster.job_states()  # close() skips jobs known to have ended; it does not ask again
    cluster.close()
    cluster.close()
    expected = [cluster.cluster_job.job_id, system.worker_ids()[1]]
    assert system.cancel_calls == [expected]
    assert cluster.status is ClusterStatus.CLOSED
    assert not Path(cluster.scheduler_file).exists()
    with pytest.raises(SchedulerError, match="closed"):
        cluster.scale(1)


def test_context_manager_starts_and_closes(make_cluster, system, clock):
    cluster = make_cluster()
    scheduler_appears(cluster, system, clock)
    with cluster as entered:
        assert entered is cluster and cluster.status is ClusterStatus.RUNNING
    assert cluster.status is ClusterStatus.CLOSED
    assert system.cancel_calls == [[cluster.cluster_job.job_id]]


def test_context_manager_closes_when_start_fails(make_cluster, system, clock):
    cluster = make_cluster(start_timeout="1s")
    with pytest.raises(ClusterStartError), cluster:
        pass
    assert cluster.status is ClusterStatus.CLOSED


def test_jobs_are_cancelled_when_the_cluster_is_garbage_collected(
    defaults, system, clock, tmp_path
):
    cluster = SlurmCluster(
        config=defaults, system=system, clock=clock, sleep=clock.sleep,
        working_directory=str(tmp_path), status_min_interval=0,
    )  # fmt: skip
    scheduler_appears(cluster, system, clock)
    cluster.start()
    cluster.scale(1)
    ids = [cluster.cluster_job.job_id, *system.worker_ids()]
    del cluster
    gc.collect()
    assert system.cancel_calls == [ids]


def test_detached_jobs_are_left_running(make_cluster, system, clock):
    cluster = started(make_cluster, system, clock)
    assert cluster.detach() == [cluster.cluster_job.job_id]
    cluster.close()
    assert system.cancel_calls == []


def test_batch_job_runs_the_script_by_absolute_path_and_outlives_the_cluster(
    make_cluster, system, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cluster = make_cluster(tasks_per_node=3)
    job = cluster.submit_batch("analysis.py", ["--n", "10"])
    script = Path(job.script_path).read_text()
    assert f"--script {tmp_path / 'analysis.py'} --n 10" in script
    cluster.close()
    assert system.cancel_calls == []


def test_job_script_shows_both_kinds(make_cluster):
    cluster = make_cluster(queue="debug")
    assert "#SBATCH --partition=debug" in cluster.job_script()
    assert "--no-scheduler" in cluster.job_script("worker")
    assert "--no-scheduler" not in cluster.job_script(JobKind.CLUSTER)


def test_cluster_class_fixes_the_system(defaults, tmp_path):
    with pytest.raises(JobConfigError, match="for slurm jobs, not pbs"):
        PBSCluster(config=defaults, profile="slurm", working_directory=str(tmp_path))
    cluster = PBSCluster(config=defaults, profile="pbs", working_directory=str(tmp_path))
    assert "#PBS -l nodes=1:ppn=2" in cluster.job_script()
    cluster.close()


def test_relative_log_directory_and_scheduler_file_are_under_the_working_directory(
    make_cluster, tmp_path
):
    cluster = make_cluster(log_directory="logs", scheduler_file="run/sched.json")
    assert cluster.spec.log_directory == str(tmp_path / "logs")
    assert cluster.scheduler_file == str(tmp_path / "run" / "sched.json")
