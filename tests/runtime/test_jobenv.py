"""The job environment: drain deadline, drain signal, and how a drained job restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from runtime import jobenv
from runtime.jobenv import DrainGuard, JobEnvironment, JobEnvironmentError
from runtime.rendezvous import mark_closed, successor_path
from runtime.scheduler import Scheduler

SLURM = {"SLURM_JOB_ID": "77", "HPC_JOB_SCRIPT": "/home/a/job.sh"}


def test_outside_a_job_nothing_drains_or_restarts() -> None:
    env = JobEnvironment.from_environ({})
    assert not env.drains and env.restart == "none" and env.job_id is None
    assert env.restart_refusal() is not None


def test_slurm_job_variables_are_read() -> None:
    env = JobEnvironment.from_environ(
        {
            **SLURM,
            "HPC_JOB_DRAIN_AT": "1700000000",
            "HPC_JOB_RESTART": "resubmit",
            "HPC_JOB_MAX_RESTARTS": "3",
            "HPC_JOB_RESTARTS": "1",
            "HPC_JOB_RESTART_OF": "76",
        }
    )
    assert env.system == "slurm" and env.job_id == "77"
    assert env.drain_at == 1700000000.0 and env.drain_signal is signal.SIGUSR2
    assert (env.restarts, env.max_restarts, env.restart_of) == (1, 3, "76")
    assert env.restart_refusal() is None
    assert env.restart_command() == [
        "sbatch",
        "--parsable",
        "--export=ALL,HPC_JOB_RESTARTS=2,HPC_JOB_RESTART_OF=77",
        "/home/a/job.sh",
    ]


def test_requeued_slurm_job_counts_its_restarts_and_stops_at_the_limit() -> None:
    env = JobEnvironment.from_environ(
        {**SLURM, "HPC_JOB_RESTART": "requeue", "SLURM_RESTART_COUNT": "4"}
    )
    assert env.restarts == 4 and env.restart_command() == ["scontrol", "requeue", "77"]
    capped = JobEnvironment.from_environ(
        {
            **SLURM,
            "HPC_JOB_RESTART": "requeue",
            "SLURM_RESTART_COUNT": "4",
            "HPC_JOB_MAX_RESTARTS": "4",
        }
    )
    refusal = capped.restart_refusal()
    assert refusal is not None and "max-restarts" in refusal


def test_pbs_commands() -> None:
    base = {"PBS_JOBID": "12.server", "HPC_JOB_SCRIPT": "/s.sh"}
    requeue = JobEnvironment.from_environ({**base, "HPC_JOB_RESTART": "requeue"})
    assert requeue.restart_command() == ["qrerun", "12.server"]
    resubmit = JobEnvironment.from_environ({**base, "HPC_JOB_RESTART": "resubmit"})
    assert resubmit.restart_command() == [
        "qsub",
        "-V",
        "-v",
        "HPC_JOB_RESTARTS=1,HPC_JOB_RESTART_OF=12.server",
        "/s.sh",
    ]


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"HPC_JOB_RESTART": "sometimes"}, "HPC_JOB_RESTART"),
        ({"HPC_JOB_DRAIN_AT": "soon"}, "HPC_JOB_DRAIN_AT"),
        ({"HPC_JOB_DRAIN_SIGNAL": "USR1"}, "USR1"),
        ({"HPC_JOB_DRAIN_SIGNAL": "NOPE"}, "NOPE"),
        ({"HPC_JOB_MAX_RESTARTS": "-1"}, "HPC_JOB_MAX_RESTARTS"),
        ({"HPC_JOB_RESTARTS": "x"}, "HPC_JOB_RESTARTS"),
    ],
)
def test_malformed_variables_are_named(variables: dict[str, str], named: str) -> None:
    with pytest.raises(JobEnvironmentError, match=named):
        JobEnvironment.from_environ({**SLURM, **variables})


def test_resubmit_without_a_script_is_refused() -> None:
    env = JobEnvironment.from_environ({"SLURM_JOB_ID": "5", "HPC_JOB_RESTART": "resubmit"})
    refusal = env.restart_refusal()
    assert refusal is not None and "HPC_JOB_SCRIPT" in refusal


def _completed(code: int, out: str = "", err: str = "") -> Any:
    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        run.calls.append(command)  # type: ignore[attr-defined]
        return subprocess.CompletedProcess(command, code, out, err)

    run.calls = []  # type: ignore[attr-defined]
    return run


def test_resubmission_records_the_successor_beside_the_scheduler_file(tmp_path: Path) -> None:
    env = JobEnvironment.from_environ({**SLURM, "HPC_JOB_RESTART": "resubmit"})
    run = _completed(0, "78;cluster\n")
    assert env.restart_job(tmp_path / "s.json", run=run) == "78"
    assert Path(successor_path(tmp_path / "s.json")).read_text().strip() == "78"


def test_failed_requeue_without_a_script_leaves_no_successor_record(tmp_path: Path) -> None:
    env = JobEnvironment.from_environ({"SLURM_JOB_ID": "77", "HPC_JOB_RESTART": "requeue"})
    run = _completed(1, err="Requested operation is presently disabled")
    assert env.restart_job(tmp_path / "s.json", run=run) is None
    assert run.calls == [["scontrol", "requeue", "77"]]
    assert not Path(successor_path(tmp_path / "s.json")).exists()


def test_a_refused_requeue_falls_back_to_submitting_the_script(tmp_path: Path) -> None:
    env = JobEnvironment.from_environ(
        {"PBS_JOBID": "12.pbs", "HPC_JOB_SCRIPT": "/s.sh", "HPC_JOB_RESTART": "requeue"}
    )
    answers = iter(
        [
            subprocess.CompletedProcess([], 159, "", "qrerun: Unauthorized Request"),
            subprocess.CompletedProcess([], 0, "13.pbs\n", ""),
        ]
    )
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return next(answers)

    assert env.restart_job(tmp_path / "s.json", run=run) == "13.pbs"
    assert [c[0] for c in calls] == ["qrerun", "qsub"]
    assert Path(successor_path(tmp_path / "s.json")).read_text().strip() == "13.pbs"


def test_a_missing_batch_command_is_a_logged_refusal(tmp_path: Path) -> None:
    env = JobEnvironment.from_environ({**SLURM, "HPC_JOB_RESTART": "resubmit"})

    def missing(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(command[0])

    assert env.restart_job(tmp_path / "s.json", run=missing) is None


def _serve_until_drained(env: JobEnvironment, poke: Any = None) -> tuple[list, Scheduler]:
    done: list = []

    async def scenario() -> Scheduler:
        async with Scheduler(host="127.0.0.1") as s:
            guard = DrainGuard(s, env, timeout=1.0, on_done=done.append)
            guard.install(asyncio.get_running_loop())
            if poke is not None:
                poke()
            await asyncio.wait_for(s.finished(), 30)
            await guard.finished()
            return s

    return done, asyncio.run(scenario())


def test_deadline_drains_and_closes_the_scheduler_without_a_restart() -> None:
    env = JobEnvironment(drain_at=time.time(), restart="none")
    done, s = _serve_until_drained(env)
    assert done == [None] and s.closed and s.state.paused


def test_drain_signal_drains_the_scheduler() -> None:
    env = JobEnvironment(drain_signal=signal.SIGUSR2)
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        done, s = _serve_until_drained(env, lambda: os.kill(os.getpid(), signal.SIGUSR2))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert done == [None] and s.closed


@pytest.mark.parametrize(
    ("sig", "ahead", "reason"),
    [
        (signal.SIGUSR2, 2.5, "the job's walltime is near"),
        (signal.SIGUSR2, 200.0, "received SIGUSR2"),
        (signal.SIGTERM, 2.5, "received SIGTERM"),
    ],
    ids=["batch-system-warning", "by-hand", "term-may-precede-a-kill"],
)
def test_a_drain_signal_just_before_the_drain_time_leaves_the_drain_to_that_time(
    sig: signal.Signals, ahead: float, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SLURM's warning may come up to a minute early; a signal long before is meant now."""
    env = JobEnvironment(drain_at=time.time() + ahead, drain_signal=sig)
    previous = signal.getsignal(sig)
    try:
        with caplog.at_level("INFO"):
            done, s = _serve_until_drained(env, lambda: os.kill(os.getpid(), sig))
    finally:
        signal.signal(sig, previous)
    assert done == [None] and s.closed
    assert f"draining ({reason})" in caplog.text
    early = "s before the job's drain time (HPC_JOB_DRAIN_AT): taken for the batch system's"
    assert (early in caplog.text) is (reason == "the job's walltime is near")


class _DrainedScheduler:
    """Stands in for a Scheduler whose drain ended with ``summary``."""

    def __init__(self, summary: dict[str, int]) -> None:
        self.summary = summary
        self.closed = False
        self.successor: bool | None = None
        self.scheduler_file = "/shared/s.json"

    async def drain(self, reason: str, *, timeout: Any = None, restart: Any = None) -> dict:
        return self.summary

    async def close(self, reason: str, *, successor: bool = False) -> None:
        self.closed = True
        self.successor = successor


def _drain_once(
    scheduler: _DrainedScheduler, env: JobEnvironment, caplog: pytest.LogCaptureFixture
) -> list[Any]:
    """Drain ``scheduler`` once, at the walltime, with warnings captured; what on_done got."""
    done: list[Any] = []

    async def scenario() -> None:
        guard = DrainGuard(scheduler, env, timeout=1.0, on_done=done.append)
        guard.trigger("the job's walltime is near")
        await guard.finished()

    with caplog.at_level("WARNING", logger=jobenv.__name__):
        asyncio.run(scenario())
    return done


@pytest.mark.parametrize(
    ("finished", "abandoned", "restarted"),
    [(0, 2, False), (0, 0, True), (3, 1, True), (5, 0, True)],
    ids=["no-progress", "idle", "progress-and-abandoned", "progress"],
)
def test_a_job_restarts_unless_its_running_tasks_could_not_finish_in_it(
    finished: int,
    abandoned: int,
    restarted: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = JobEnvironment(system="slurm", job_id="9", restart="resubmit", script="/x.sh")
    calls: list[Any] = []
    monkeypatch.setattr(
        JobEnvironment, "restart_job", lambda self, path, **kw: calls.append(path) or "10"
    )
    scheduler = _DrainedScheduler({"finished": finished, "abandoned": abandoned})
    done = _drain_once(scheduler, env, caplog)
    assert scheduler.closed
    if restarted:
        assert calls == ["/shared/s.json"] and done == ["10"]
        assert scheduler.successor  # other jobs' workers are left to wait for it
    else:
        assert calls == [] and done == [None]
        assert not scheduler.successor  # every worker is told to close
        assert "no task finished in this job and 2 were still running" in caplog.text
        assert "raise the walltime" in caplog.text


def test_a_job_of_a_closed_cluster_is_not_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cluster on the login node was closed: a drain ends the chain, whatever was done."""
    scheduler_file = tmp_path / "s.json"
    env = JobEnvironment.from_environ({**SLURM, "HPC_JOB_RESTART": "resubmit"})
    assert env.restart_refusal(scheduler_file) is None
    mark_closed(scheduler_file, "the cluster was closed")
    refusal = env.restart_refusal(scheduler_file)
    assert refusal == "the cluster that started it was closed (the cluster was closed)"
    run = _completed(0, "78;cluster\n")
    assert env.restart_job(scheduler_file, run=run) is None
    assert run.calls == [] and not Path(successor_path(scheduler_file)).exists()

    scheduler = _DrainedScheduler({"finished": 5, "abandoned": 0})
    scheduler.scheduler_file = str(scheduler_file)
    done = _drain_once(scheduler, env, caplog)
    assert done == [None] and not scheduler.successor  # its workers are told to close
    assert "the cluster that started it was closed" in caplog.text


class _Comm:
    """The two calls ``runtime.mpi.run`` makes of a communicator before its role."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size


@pytest.mark.parametrize("restarts", ["1", "0"])
def test_a_restart_of_a_closed_cluster_ends_as_it_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    restarts: str,
) -> None:
    """Submitted just before the cluster closed, a restart finds the mark and ends."""
    from runtime import mpi

    scheduler_file = tmp_path / "s.json"
    mark_closed(scheduler_file, "the cluster was closed")
    for name, value in {
        **SLURM,
        "HPC_JOB_RESTART": "resubmit",
        "HPC_JOB_RESTARTS": restarts,
    }.items():
        monkeypatch.setenv(name, value)
    finalized: list[bool] = []
    monkeypatch.setattr(mpi, "_finalize_mpi", lambda: finalized.append(True))
    started: list[int] = []
    monkeypatch.setattr(
        mpi, "_supervise_worker", lambda args, **kw: started.append(kw["rank"]) or 0
    )
    args = mpi.make_parser().parse_args(["--no-scheduler", "--scheduler-file", str(scheduler_file)])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        with caplog.at_level("WARNING", logger=mpi.__name__):
            assert mpi.run(args, comm=_Comm(0, 2)) == 0
    finally:  # run() sets them for its process: not for the rest of this session
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if restarts == "1":
        assert started == [] and finalized == [True]
        assert "job 77 restarts a cluster that was closed" in caplog.text
    else:  # the first job of a cluster is never turned away: the mark is an old one
        assert started == [0]


SCRIPT = """
import sys
from runtime.client import get_default_client
from runtime.testing import wait_for_path

client = get_default_client()
print("result", client.submit(wait_for_path, sys.argv[1], 60).result())
"""


@pytest.mark.parametrize(("restart", "status"), [("resubmit", 0), (None, 1)])
def test_a_batch_script_stopped_by_a_drain_for_a_restart_is_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restart: str | None, status: int
) -> None:
    import sys
    import threading

    from runtime import client as client_module
    from runtime import ioloop, mpi, testing
    from runtime.cluster import LocalCluster

    monkeypatch.setattr(client_module, "_drain_notice", None)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("HPC_SCHEDULER_FILE", "")
    script, gate = tmp_path / "job.py", tmp_path / "gate"
    script.write_text(SCRIPT)
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        scheduler = cluster._state["scheduler"]

        def drain_when_running() -> None:
            testing.wait_until(lambda: scheduler.state.processing_count() == 1, "the task")
            ioloop.run_sync(scheduler.drain("test", timeout=0, restart=restart))
            ioloop.run_sync(scheduler.close("drained"))

        drainer = threading.Thread(target=drain_when_running)
        drainer.start()
        try:
            code = mpi._run_script(
                [str(script), str(gate)],
                cluster.scheduler_address,
                cluster.secret,
                cluster.scheduler_file,
                1,
            )
        finally:
            gate.touch()
            drainer.join(timeout=60)
    assert code == status
