"""JobQueueCluster: start, scale, adapt and close, against an in-memory batch system."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
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
        self.variables: dict[str, dict[str, str] | None] = {}
        self.on_submit = lambda: None
        self.next_id = 100

    def submit(self, script_path, *, output=None, variables=None):
        self.on_submit()
        job_id = str(self.next_id)
        self.next_id += 1
        self.variables[job_id] = variables
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


@pytest.mark.parametrize("restart", ["resubmit", "none"])
def test_close_ends_the_restarts_the_cluster_job_submitted_itself(
    make_cluster, system, clock, restart
):
    """A successor the drained job named just before the close is cancelled too.

    The cluster also marks itself closed beside the scheduler file, so that the job
    does not restart after this, and a restart already submitted ends as it starts.
    """
    cluster, _ = running(make_cluster, system, clock, restart=restart)
    Path(f"{cluster.scheduler_file}.successor").write_text("555\n")  # not followed yet
    cluster.close()
    closed = rendezvous.closed_reason(cluster.scheduler_file)
    if restart == "none":  # nothing restarts: nothing to end, no marker left behind
        assert system.cancel_calls == [["100"]] and closed is None
    else:
        assert system.cancel_calls == [["100", "555"]]
        assert closed == "the cluster was closed"


def test_a_new_cluster_removes_the_closed_mark_of_an_earlier_one(make_cluster, system, clock):
    first = started(make_cluster, system, clock, restart="resubmit", scheduler_file="s.json")
    first.close()
    assert rendezvous.closed_reason(first.scheduler_file) is not None
    second = started(make_cluster, system, clock, restart="resubmit", scheduler_file="s.json")
    assert second.scheduler_file == first.scheduler_file
    assert rendezvous.closed_reason(second.scheduler_file) is None


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


# --- following the cluster job to its successor --------------------------------------

NEW_ADDRESS = "tcp://10.0.0.9:8786"


def scripted_sleeps(cluster, clock, steps):
    """Replace the cluster's sleep: after sleep number n (from 1), run ``steps[n]()``."""
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        clock.sleep(seconds)
        step = steps.get(len(calls))
        if step is not None:
            step()

    cluster._sleep = sleep
    return calls


def rewrite_scheduler_file(cluster, job_id, address=NEW_ADDRESS, **fields):
    """Write the scheduler file as a successor's scheduler would (``restart_of``, ...)."""
    document = {
        "address": address,
        "secret": SECRET.hex(),
        "pid": 5151,
        "started": 2e9,
        "job_id": job_id,
        **fields,
    }
    path = Path(cluster.scheduler_file)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document))
    tmp.chmod(0o600)
    os.replace(tmp, path)


def running(make_cluster, system, clock, **settings):
    """A started cluster (job 100 running) and its scheduler file's contents."""
    cluster = started(make_cluster, system, clock, **settings)
    assert cluster.cluster_job.job_id == "100"
    return cluster, dict(cluster.scheduler_info)


def test_a_resubmitted_successor_is_found_by_restart_of_and_adopted(make_cluster, system, clock):
    cluster, previous = running(make_cluster, system, clock, restart="resubmit")

    def runtime_resubmits():  # what the drained job's runtime does, as seen from here
        system.states.update({"100": JobState.COMPLETED, "555": JobState.RUNNING})
        rewrite_scheduler_file(cluster, "555", restart_of="100", restarts=1)

    calls = scripted_sleeps(cluster, clock, {2: runtime_resubmits})
    info = cluster._await_scheduler(previous, timeout=60)
    assert info is not None and info["address"] == NEW_ADDRESS and info["restart_of"] == "100"
    assert cluster.scheduler_info is info and cluster.scheduler_address == NEW_ADDRESS
    job = cluster.cluster_job
    assert job.job_id == "555" and job.kind is JobKind.CLUSTER
    assert job.script_path == cluster.jobs["100"].script_path  # the runtime resubmits it
    assert job.log_path == str(Path(cluster.spec.log_directory) / "hpc-555.log")
    assert set(cluster.jobs) == {"100", "555"} and system.next_id == 101  # nothing submitted
    assert calls == [0.5, 0.5]
    cluster.close()
    assert system.cancel_calls == [["555"]]


def test_a_requeued_job_keeps_its_id_and_its_rewritten_file_is_adopted(make_cluster, system, clock):
    cluster, previous = running(make_cluster, system, clock, restart="requeue")

    def node_fails():
        system.states["100"] = JobState.NODE_FAIL

    def slurm_requeues():
        system.states["100"] = JobState.PENDING

    def runs_again():
        system.states["100"] = JobState.RUNNING
        rewrite_scheduler_file(cluster, "100", restarts=1)  # SLURM_RESTART_COUNT

    scripted_sleeps(cluster, clock, {1: node_fails, 2: slurm_requeues, 6: runs_again})
    info = cluster._await_scheduler(previous, timeout=60)
    assert info is not None and info["address"] == NEW_ADDRESS
    assert cluster.cluster_job.job_id == "100" and list(cluster.jobs) == ["100"]
    assert system.next_id == 101  # SLURM brought it back: nothing submitted from here
    assert cluster._restarts == 1


def test_a_node_failure_with_nothing_in_its_place_is_resubmitted_from_here(
    make_cluster, system, clock, caplog
):
    cluster, previous = running(make_cluster, system, clock, restart="resubmit")
    file_at_submit = []
    system.on_submit = lambda: file_at_submit.append(Path(cluster.scheduler_file).exists())

    def node_fails():
        system.states["100"] = JobState.NODE_FAIL

    def replacement_starts():
        assert system.next_id == 102, "the replacement was not submitted"
        system.states["101"] = JobState.RUNNING
        rewrite_scheduler_file(cluster, "101", restart_of="100", restarts=1)

    calls = scripted_sleeps(cluster, clock, {1: node_fails, 6: replacement_starts})
    with caplog.at_level(logging.WARNING, logger="launchers.cluster"):
        info = cluster._await_scheduler(previous, timeout=60)
    assert info is not None and info["job_id"] == "101"
    assert cluster.cluster_job.job_id == "101" and system.kinds["101"] == "cluster"
    assert system.variables["101"] == {"HPC_JOB_RESTARTS": "1", "HPC_JOB_RESTART_OF": "100"}
    assert file_at_submit == [False]  # the gone scheduler's file was removed first
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "cluster job 100 ended (NODE_FAIL)" in warning and "cluster job 101" in warning
    assert all(0 < c <= 0.5 for c in calls)
    cluster.close()
    assert system.cancel_calls == [["101"]]


def test_a_successor_named_by_the_drained_job_is_followed_not_submitted_again(
    make_cluster, system, clock
):
    cluster, previous = running(make_cluster, system, clock, restart="resubmit")
    successor = Path(f"{cluster.scheduler_file}.successor")

    def resubmitted_then_timed_out():
        # The runtime submitted job 777 and named it, then the walltime caught it.
        successor.write_text("777\n")
        system.states.update({"100": JobState.TIMEOUT, "777": JobState.PENDING})

    def successor_starts():
        system.states["777"] = JobState.RUNNING
        rewrite_scheduler_file(cluster, "777", restart_of="100", restarts=1)

    scripted_sleeps(cluster, clock, {1: resubmitted_then_timed_out, 10: successor_starts})
    info = cluster._await_scheduler(previous, timeout=60)
    assert info is not None and info["job_id"] == "777"
    assert system.next_id == 101  # long past the settle time, and still no second job
    assert cluster.cluster_job.job_id == "777" and set(cluster.jobs) == {"100", "777"}


def test_without_restarts_nothing_is_awaited(make_cluster, system, clock):
    cluster, previous = running(make_cluster, system, clock)  # restart="none", the default
    calls = scripted_sleeps(cluster, clock, {})
    assert cluster._await_scheduler(previous, timeout=None) is None
    assert calls == [] and system.next_id == 101


@pytest.mark.parametrize("restart", ["resubmit", "requeue"])
def test_a_completed_job_with_no_successor_has_none_coming(make_cluster, system, clock, restart):
    cluster, previous = running(make_cluster, system, clock, restart=restart)
    stale = Path(f"{cluster.scheduler_file}.successor")
    stale.write_text("100\n")  # a requeue named the job itself, long ago: no news

    def completes():
        system.states["100"] = JobState.COMPLETED

    calls = scripted_sleeps(cluster, clock, {1: completes})
    assert cluster._await_scheduler(previous, timeout=60) is None
    assert system.next_id == 101
    assert len(calls) == 3  # a successor gets two poll intervals (1 s) to show up


def test_no_restart_is_made_past_max_restarts(make_cluster, system, clock, caplog):
    cluster, previous = running(make_cluster, system, clock, restart="requeue", max_restarts=1)

    def node_fails(job_id):
        return lambda: system.states.__setitem__(job_id, JobState.NODE_FAIL)

    def replacement_starts():
        system.states["101"] = JobState.RUNNING
        rewrite_scheduler_file(cluster, "101", restart_of="100", restarts=1)

    scripted_sleeps(cluster, clock, {1: node_fails("100"), 6: replacement_starts})
    second = cluster._await_scheduler(previous, timeout=60)
    assert second is not None and second["job_id"] == "101"
    scripted_sleeps(cluster, clock, {1: node_fails("101")})
    with caplog.at_level(logging.WARNING, logger="launchers.cluster"):
        assert cluster._await_scheduler(second, timeout=60) is None
    assert system.next_id == 102
    assert "max_restarts is 1" in caplog.text


def test_waiting_for_a_successor_ends_at_the_timeout(make_cluster, system, clock):
    cluster, previous = running(make_cluster, system, clock, restart="resubmit")
    before = clock.now
    calls = scripted_sleeps(cluster, clock, {})  # the job runs on, writing nothing
    assert cluster._await_scheduler(previous, timeout=7.2) is None
    assert clock.now - before == pytest.approx(7.2)
    assert max(calls) == 0.5 and min(calls) > 0 and system.next_id == 101


def test_closing_the_cluster_ends_the_wait(make_cluster, system, clock):
    cluster, previous = running(make_cluster, system, clock, restart="resubmit")
    scripted_sleeps(cluster, clock, {3: cluster.close})
    assert cluster._await_scheduler(previous, timeout=None) is None


def test_start_takes_the_file_of_a_successor_of_its_job(make_cluster, system, clock):
    cluster = make_cluster(restart="resubmit")

    def drained_and_resubmitted_before_we_looked():
        system.states.update({"100": JobState.COMPLETED, "900": JobState.RUNNING})
        rewrite_scheduler_file(cluster, "900", restart_of="100", restarts=1)

    scripted_sleeps(cluster, clock, {2: drained_and_resubmitted_before_we_looked})
    cluster.start()
    assert cluster.scheduler_address == NEW_ADDRESS
    assert cluster.cluster_job.job_id == "900" and set(cluster.jobs) == {"100", "900"}


def test_a_client_thread_waits_for_the_successor_while_the_cluster_is_used(
    defaults, system, tmp_path
):
    # Real time and a real helper thread, as runtime.client.Client calls it.
    cluster = SlurmCluster(
        config=defaults, system=system, working_directory=str(tmp_path),
        status_min_interval=0, restart="resubmit",
    )  # fmt: skip

    def scheduler_starts(seconds):
        system.states["100"] = JobState.RUNNING
        rewrite_scheduler_file(cluster, "100", address=ADDRESS)

    cluster._sleep = scheduler_starts
    cluster.start()
    cluster._sleep = time.sleep
    previous = dict(cluster.scheduler_info)
    found = {}
    waiter = threading.Thread(
        target=lambda: found.update(info=cluster._await_scheduler(previous, timeout=30))
    )
    waiter.start()
    try:
        cluster.scale(2)  # the waiter does not hold the cluster's lock while it waits
        assert len(cluster.worker_jobs()) == 2
        system.states.update({"100": JobState.COMPLETED, "555": JobState.RUNNING})
        rewrite_scheduler_file(cluster, "555", restart_of="100")
        waiter.join(30)
        assert not waiter.is_alive() and found["info"]["job_id"] == "555"
        assert cluster.cluster_job.job_id == "555"
    finally:
        cluster.close()
        waiter.join(30)
    assert sorted(system.cancel_calls[0]) == ["101", "102", "555"]


def test_scaled_worker_jobs_that_hit_their_walltime_are_replaced(make_cluster, system, clock):
    cluster, _ = running(make_cluster, system, clock, restart="requeue", max_restarts=1)
    cluster._start_keeper = lambda: None  # the test calls the keeper's step itself
    cluster.scale(2)
    first, second = cluster.worker_jobs()
    assert cluster._keep_workers() == []  # nothing ended
    system.states.update({first: JobState.TIMEOUT, second: JobState.FAILED})
    replaced = cluster._keep_workers()
    # Only the walltime is mended by a restart; a failed job is not resubmitted.
    assert len(replaced) == 1 and system.kinds[replaced[0]] == "worker"
    assert sorted(cluster.worker_jobs()) == sorted([replaced[0]])
    assert cluster._keep_workers() == []  # each ended job is replaced once
    system.states[replaced[0]] = JobState.NODE_FAIL
    again = cluster._keep_workers()
    assert len(again) == 1  # max_restarts=1 per job of the target of 2: two in all
    system.states[again[0]] = JobState.PREEMPTED
    assert cluster._keep_workers() == []  # the budget is used up
    cluster.close()


def test_worker_jobs_near_their_walltime_get_a_replacement_before_they_end(
    make_cluster, system, clock, caplog
):
    cluster, _ = running(
        make_cluster, system, clock, restart="resubmit", walltime="01:00:00", drain_lead="10min"
    )
    cluster._start_keeper = lambda: None  # the test calls the keeper's step itself
    cluster.scale(2)
    first, second = cluster.worker_jobs()
    system.states[first] = JobState.RUNNING
    assert cluster._keep_workers() == []  # first seen running now; second still queued
    clock.advance(20 * 60)
    system.states[second] = JobState.RUNNING
    assert cluster._keep_workers() == []
    clock.advance(30 * 60)  # first: 50 min into its hour, the hand-over time
    with caplog.at_level(logging.WARNING, logger="launchers"):
        (new,) = cluster._keep_workers()
    assert system.kinds[new] == "worker"
    assert f"worker job {first} reaches its walltime in about 600 s" in caplog.text
    assert sorted(cluster.worker_jobs()) == sorted([first, second, new])  # both run a while
    assert cluster._keep_workers() == []
    cluster.scale(2)  # the leaving job does not count: nothing to add or cancel
    assert system.cancel_calls == [] and sorted(cluster.worker_jobs()) == sorted(
        [first, second, new]
    )
    system.states[first] = JobState.TIMEOUT  # it ends as expected: it was replaced already
    assert cluster._keep_workers() == []
    clock.advance(20 * 60)  # second's turn
    (newer,) = cluster._keep_workers()
    system.states[second] = JobState.TIMEOUT
    assert cluster._keep_workers() == []
    assert sorted(cluster.worker_jobs()) == sorted([new, newer])
    cluster.close()


def test_scaling_to_zero_also_cancels_worker_jobs_replaced_ahead_of_their_walltime(
    make_cluster, system, clock
):
    cluster, _ = running(
        make_cluster, system, clock, restart="resubmit", walltime="01:00:00", drain_lead="10min"
    )
    cluster._start_keeper = lambda: None
    cluster.scale(1)
    (first,) = cluster.worker_jobs()
    system.states[first] = JobState.RUNNING
    cluster._keep_workers()
    clock.advance(50 * 60)
    (new,) = cluster._keep_workers()
    cluster.scale(0)
    assert cluster.worker_jobs() == []
    assert sorted(j for call in system.cancel_calls for j in call) == sorted([first, new])
    cluster.close()


def test_without_restarts_or_when_adapting_ended_workers_are_left_alone(
    make_cluster, system, clock
):
    cluster, _ = running(make_cluster, system, clock)  # restart="none"
    cluster.scale(1)
    assert cluster._keeper_thread is None
    (job,) = cluster.worker_jobs()
    system.states[job] = JobState.TIMEOUT
    assert cluster._keep_workers() == []
    cluster.close()


def test_the_keeper_thread_runs_while_scaled_with_restarts_and_stops_on_close(
    make_cluster, system, clock
):
    cluster, _ = running(make_cluster, system, clock, restart="resubmit")
    cluster.scale(1)
    thread = cluster._keeper_thread
    assert thread is not None and thread.is_alive()
    cluster.close()
    assert not thread.is_alive() and cluster._keeper_thread is None


def test_workers_of_a_restarting_cluster_wait_as_long_as_a_start_may_take(make_cluster):
    variable = "HPC_DISTRIBUTED__WORKER__DEATH_TIMEOUT"
    restarting = make_cluster(restart="requeue", start_timeout="15min")
    assert f"export {variable}=900s" in restarting.job_script("worker")
    # The cluster job's own workers end with its scheduler: they keep the default.
    assert variable not in restarting.job_script("cluster")
    assert variable not in make_cluster().job_script("worker")  # no restarts: the default
    mine = make_cluster(restart="resubmit", env=[f"{variable}=2h"])
    assert f"export {variable}=2h" in mine.job_script("worker")
    assert "900s" not in mine.job_script("worker")
