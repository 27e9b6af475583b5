"""Clusters made of batch jobs: one cluster job, and worker jobs added and removed.

::

    login node                            compute nodes (batch jobs)
    ----------                            -----------------------------------------
    SlurmCluster.start() --sbatch-->      cluster job: mpiexec -n N python -m runtime.mpi
          |                                 rank 0: scheduler -> writes scheduler file
          |<-- waits for scheduler file --  ranks 1..N-1: workers
    Client(cluster) --tcp + secret-->     scheduler
    cluster.scale(jobs=3) --sbatch x3-->  worker jobs: ... runtime.mpi --no-scheduler
    cluster.adapt(...)                      (join through the scheduler file)
    cluster.close() --scancel-->          every job this cluster started

Near its walltime the cluster job drains and, with ``restart="requeue"`` or
``"resubmit"``, comes back (see :class:`~launchers.RestartMode`). A Client that lost
the scheduler then calls :meth:`JobQueueCluster._await_scheduler`, which follows the
cluster job to its successor::

    cluster job 101 (draining)  --sbatch script-->  job 102   (resubmit; the runtime
      writes <scheduler file>.successor = "102", then ends; 102's scheduler writes
      the scheduler file with job_id 102, restart_of 101)
    cluster job 101 (draining)  --scontrol requeue-->  job 101 again (requeue; the
      new scheduler file has job_id 101 and another address, pid, start time)
    cluster job 101 ended TIMEOUT / PREEMPTED / NODE_FAIL, nothing in its place
      --sbatch, from here-->  job 103 (restart_of 101)

State: the jobs this cluster submitted or followed (id, kind, script, log) and which
of them it cancelled; which one is the cluster job now, and how often it restarted;
the scheduler file's contents once read; the adaptive controller and its thread when
adapting. Job states come from one shared :class:`JobStatusPoller`, so
however many callers ask, the batch system sees one batched query per interval. A
lock serialises scaling decisions between the caller and the adapt thread.

If the cluster object is garbage-collected or the interpreter exits without
``close()``, its jobs are cancelled anyway (a ``weakref.finalize``); batch-mode jobs
(:meth:`JobQueueCluster.submit_batch`) and :meth:`~JobQueueCluster.detach`-ed clusters
are meant to outlive this process and are left alone.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from launchers._adapt import Adaptive, AdaptivePolicy, ClusterLoad
from launchers._errors import ClusterStartError, JobConfigError, JobQueueError
from launchers._load import SchedulerLoad
from launchers._poller import JobStatusPoller
from launchers._settings import LauncherSettings, resolve_settings
from launchers._spec import JobSpec, RestartMode
from launchers._states import JobKind, JobState, JobStatus
from launchers._system import JobSystem, SubmittedJob, new_token, same_job
from runtime import rendezvous
from runtime.errors import SchedulerError
from runtime.units import parse_timedelta

__all__ = ["ClusterStatus", "JobQueueCluster", "LocalMPICluster", "PBSCluster", "SlurmCluster"]

logger = logging.getLogger("launchers.cluster")

# How often start() looks for the scheduler file. Job states are polled at the
# poller's own (slower) rate.
_FILE_POLL_INTERVAL = 0.25
# How often _await_scheduler looks for a successor's scheduler file.
_SUCCESSOR_POLL_INTERVAL = 0.5
# Workers of a restarting cluster wait this long for a successor scheduler when the
# cluster's start-timeout is unlimited.
_DEATH_TIMEOUT_VARIABLE = "HPC_DISTRIBUTED__WORKER__DEATH_TIMEOUT"
_RESTART_DEATH_TIMEOUT = 3600.0
# Least time between two looks for worker jobs to replace (see _keep_workers).
_KEEPER_INTERVAL = 5.0
_LOG_TAIL_LINES = 20
_JOB_ID = re.compile(r"^[A-Za-z0-9_.\-\[\]@]+$")


class ClusterStatus(enum.Enum):
    """Where a cluster object is in its life."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


def _cancel_quietly(
    system: JobSystem, job_ids: list[str], scheduler_file: str | None, known: Mapping[str, Any]
) -> None:
    """Finalizer: cancel what is left; never raise (it may run at interpreter exit).

    ``scheduler_file`` is that of a cluster whose job may restart itself (else ``None``).
    """
    if not job_ids:
        return
    ids = list(job_ids)
    if scheduler_file is not None:
        ids += _end_restarts(scheduler_file, known)
    try:
        system.cancel(ids)
    except Exception as exc:  # noqa: BLE001 - a finalizer must not raise
        logger.warning("could not cancel jobs %s on exit: %s", ids, exc)


def _end_restarts(scheduler_file: str, known: Iterable[str]) -> list[str]:
    """Stop the cluster job's restarts; return the restart it submitted that is not ``known``.

    Marks the cluster closed beside its scheduler file first: a cluster job that drains
    after this does not restart, and a restart submitted meanwhile ends as it starts.
    Then a successor the job already named (it submitted its own replacement just
    before the cluster closed, not yet followed) is returned, to be cancelled too.
    """
    with contextlib.suppress(OSError):
        rendezvous.mark_closed(scheduler_file, "the cluster was closed")
    named = _announced_successor(scheduler_file)
    if named is None or any(same_job(named, job_id) for job_id in known):
        return []
    return [named]


def _announced_successor(scheduler_file: str) -> str | None:
    """The job id a drained cluster job wrote beside its scheduler file, if any."""
    try:
        text = Path(rendezvous.successor_path(scheduler_file)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = text.strip()
    return text if _JOB_ID.match(text) else None  # empty, or not a job id: none


def _log_tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    if not lines:
        return ""
    return "\n--- last lines of the job's output ---\n" + "\n".join(lines[-_LOG_TAIL_LINES:])


def _halt(thread: threading.Thread | None, stop: threading.Event) -> None:
    """Stop a :meth:`JobQueueCluster._repeat` thread and wait for it (unless it is us)."""
    stop.set()
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def _describe(status: JobStatus) -> str:
    text = status.state.value
    if status.reason:
        text += f", reason: {status.reason}"
    if status.exit_code is not None:
        text += f", exit code {status.exit_code}"
    if status.signal is not None:
        text += f", signal {status.signal}"
    return text


class JobQueueCluster:
    """A cluster of batch jobs: a cluster job (scheduler + workers) and worker jobs.

    Use a subclass: :class:`SlurmCluster`, :class:`PBSCluster`, :class:`LocalMPICluster`.

    Parameters
    ----------
    profile
        Site profile by name (``"slurm"``, ``"pbs"``, ``"local-mpi"``, or one of yours
        on ``launchers.profile-path``) or path; ``None``: ``launchers.profile``.
    config
        The ``launchers`` config section to start from (default: the process config).
    system
        A ready job system (tests pass one with a fake runner); default: built from
        the settings.
    clock, sleep
        Time source and sleep for waiting and polling (tests pass fakes).
    checkpoint
        A directory on the shared filesystem: the computations of this cluster's
        clients are checkpointed there unless they say otherwise - what lets a job
        that drained before its walltime resume in its successor.
    **settings
        Job settings and options; see :func:`launchers.resolve_settings`. Unknown ones
        are errors that list the valid ones. ``working_directory`` defaults to the
        current directory and ``log_directory`` to ``<working_directory>/hpc-logs``.

    Examples
    --------
    >>> with SlurmCluster(queue="debug", walltime="00:30:00") as cluster:  # doctest: +SKIP
    ...     cluster.scale(jobs=4)
    ...     client = Client(cluster)
    """

    #: The job system this class drives; ``None`` takes it from the settings.
    system_name: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        profile: str | None = None,
        config: Mapping[str, Any] | None = None,
        system: JobSystem | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        checkpoint: str | os.PathLike[str] | None = None,
        **settings: Any,
    ) -> None:
        resolved = resolve_settings(
            system=self.system_name, profile=profile, config=config, **settings
        )
        self.settings: LauncherSettings = resolved
        #: Default ``checkpoint=`` of the computations of this cluster's clients.
        self.checkpoint = os.path.abspath(checkpoint) if checkpoint is not None else None
        spec = resolved.job
        if spec.working_directory is None:
            spec.working_directory = os.getcwd()
        log_dir = os.path.join(spec.working_directory, spec.log_directory or "hpc-logs")
        spec.log_directory = os.path.abspath(log_dir)
        self.spec: JobSpec = spec
        self.system: JobSystem = system or resolved.make_system(sleep=sleep)
        self.poller = JobStatusPoller(
            self.system,
            min_interval=resolved.seconds("status", "min-interval") or 0.0,
            max_interval=resolved.seconds("status", "max-interval") or 0.0,
            backoff=float(resolved.value("status", "backoff")),
            clock=clock,
        )
        configured = resolved.value("cluster", "scheduler-file")
        self._scheduler_file = (
            os.path.abspath(os.path.join(spec.working_directory, configured))
            if configured
            else os.path.join(spec.log_directory, f"scheduler-{new_token()}.json")
        )
        self.start_timeout: float | None = resolved.seconds("cluster", "start-timeout")
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.RLock()
        self._jobs: dict[str, SubmittedJob] = {}
        self._cancelled: set[str] = set()
        self._cluster_job: SubmittedJob | None = None
        #: Times the cluster job was requeued or replaced, as far as we know.
        self._restarts = 0
        # Worker jobs to keep after scale(n) (None: not scaled), the worker jobs already
        # replaced after an interrupted end, and the thread that replaces them.
        self._worker_target: int | None = None
        self._worker_replaced: set[str] = set()
        self._worker_running_since: dict[str, float] = {}  # first seen running (clock)
        self._worker_restarts = 0
        self._keeper_stop = threading.Event()
        self._keeper_thread: threading.Thread | None = None
        self._info: dict[str, Any] | None = None
        self._status = ClusterStatus.CREATED
        self._adaptive: Adaptive | None = None
        self._adapt_interval = resolved.seconds("adapt", "interval") or 10.0
        self._adapt_stop = threading.Event()
        self._adapt_thread: threading.Thread | None = None
        #: Returns the scheduler's load for :meth:`adapt`; set when a Client connects
        #: to this cluster (see :meth:`_client_connected`).
        self.load_source: Callable[[], ClusterLoad] | None = None
        #: Asked to retire the workers of these job ids (moving their results away)
        #: before the jobs are cancelled by a scale-down; set when a Client connects.
        self.retire_jobs: Callable[[Sequence[str]], None] | None = None
        # Shared with the finalizer: ids of jobs to cancel if close() is never called.
        self._live_ids: list[str] = []
        restarting = self._scheduler_file if spec.restart is not RestartMode.NONE else None
        self._finalizer = weakref.finalize(
            self, _cancel_quietly, self.system, self._live_ids, restarting, self._jobs
        )

    # --- scripts -------------------------------------------------------------------

    def job_script(
        self,
        kind: JobKind | str = JobKind.CLUSTER,
        *,
        script: str | None = None,
        script_args: Sequence[str] = (),
    ) -> str:
        """Return the script a job of ``kind`` (``"cluster"`` or ``"worker"``) would run."""
        return self.system.render(
            self._spec_for(JobKind(kind)),
            JobKind(kind),
            scheduler_file=self._scheduler_file,
            script=os.path.abspath(script) if script else None,
            script_args=script_args,
            token=new_token(),
        )

    # --- life cycle ------------------------------------------------------------------

    @property
    def status(self) -> ClusterStatus:
        """Created, starting, running or closed."""
        return self._status

    def start(self, *, wait: bool = True, timeout: float | None = None) -> JobQueueCluster:
        """Submit the cluster job and wait until its scheduler has written the scheduler file.

        Parameters
        ----------
        wait
            Return right after submitting when ``False``.
        timeout
            Seconds to wait (queue time included); default ``start_timeout``.

        Raises
        ------
        SubmissionError
            The batch system refused the job.
        ClusterStartError
            The job ended, or the timeout passed, before the scheduler file appeared.
            A job still queued at the timeout is cancelled.
        """
        with self._lock:
            self._check_open()
            if self._cluster_job is None:
                self._remove_stale_scheduler_file()
                self._cluster_job = self._submit(JobKind.CLUSTER)
                self._status = ClusterStatus.STARTING
            job = self._cluster_job
        if wait and self._info is None:
            self._wait_for_scheduler(job, self.start_timeout if timeout is None else timeout)
        return self

    @property
    def _successor_file(self) -> str:
        # The runtime of a cluster job that submitted its own replacement writes the
        # new job's id here before it ends.
        return rendezvous.successor_path(self._scheduler_file)

    def _remove_stale_scheduler_file(self) -> None:
        # A file left by an earlier cluster at this path would send workers and clients
        # to a scheduler that is gone, or the cluster to a job that is not its own.
        closed = rendezvous.closed_path(self._scheduler_file)
        for path in (self._scheduler_file, self._successor_file, closed):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                logger.info("removed stale %s", path)

    def _wait_for_scheduler(self, job: SubmittedJob, timeout: float | None) -> None:
        deadline = math.inf if timeout is None else self._clock() + timeout
        while True:
            info = self._read_scheduler_file()
            if info is not None:
                with self._lock:
                    self._adopt(info)
                    if self._status is ClusterStatus.STARTING:
                        self._status = ClusterStatus.RUNNING
                return
            status = self.poller.poll().get(job.job_id)
            if status is not None and (
                status.state.is_terminal or self.poller.is_settled(job.job_id)
            ):
                raise ClusterStartError(
                    f"cluster job {job.job_id} ended ({_describe(status)}) before its "
                    f"scheduler wrote {self._scheduler_file}; see its output {job.log_path} "
                    f"and script {job.script_path}{_log_tail(job.log_path)}",
                    job_id=job.job_id,
                    state=status.state,
                    log_path=job.log_path,
                )
            remaining = deadline - self._clock()
            if remaining <= 0:
                described = _describe(status) if status else "unknown"
                with contextlib.suppress(JobQueueError):
                    self._cancel([job.job_id])
                raise ClusterStartError(
                    f"cluster job {job.job_id} did not write {self._scheduler_file} within "
                    f"{timeout:g} s (its state: {described}); it was cancelled. Raise "
                    "start_timeout if the queue is slow, or check the job's output "
                    f"{job.log_path}",
                    job_id=job.job_id,
                    state=status.state if status else None,
                    log_path=job.log_path,
                )
            self._sleep(min(_FILE_POLL_INTERVAL, remaining))

    def _read_scheduler_file(self) -> dict[str, Any] | None:
        """The scheduler file's contents, if its scheduler belongs to this cluster.

        It does when it runs in the cluster job, in no batch job at all (local runs),
        or in a successor of one of our cluster jobs (``restart_of``).
        """
        try:
            info = rendezvous.read_scheduler_file(self._scheduler_file)
        except SchedulerError:
            if os.path.exists(self._scheduler_file):
                raise  # unreadable, not absent: say so
            return None
        written_by = info.get("job_id")
        if not written_by:
            return info
        restart_of = info.get("restart_of")
        with self._lock:
            current = self._cluster_job
            if current is not None and same_job(str(written_by), current.job_id):
                return info
            if restart_of and any(
                same_job(str(restart_of), job.job_id)
                for job in self._jobs.values()
                if job.kind is JobKind.CLUSTER
            ):
                return info
        logger.debug("ignoring %s: written by job %s", self._scheduler_file, written_by)
        return None

    def _adopt(self, info: dict[str, Any]) -> None:
        """Take ``info`` as the scheduler's; the job it names becomes the cluster job.

        Call with the lock held.
        """
        written_by = info.get("job_id")
        current = self._cluster_job
        if written_by and current is not None and not same_job(str(written_by), current.job_id):
            self._cluster_job = self._follow(str(written_by), current)
        restarts = info.get("restarts")
        if isinstance(restarts, int) and not isinstance(restarts, bool):
            self._restarts = max(self._restarts, restarts)
        self._info = info

    def _follow(self, job_id: str, predecessor: SubmittedJob) -> SubmittedJob:
        """Track a job that another process submitted to replace ``predecessor``.

        It runs the predecessor's script (the runtime resubmits ``HPC_JOB_SCRIPT``),
        so its output goes where that script says. Call with the lock held.
        """
        for known in self._jobs.values():
            if same_job(known.job_id, job_id):
                return known
        job = SubmittedJob(
            job_id,
            JobKind.CLUSTER,
            predecessor.script_path,
            self.system.log_path(predecessor.output, job_id),
            predecessor.output,
        )
        self._track(job)
        logger.info("following cluster job %s, which replaced job %s", job_id, predecessor.job_id)
        return job

    def _await_scheduler(
        self, previous: Mapping[str, Any], timeout: float | None
    ) -> dict[str, Any] | None:
        """Wait for the scheduler that replaces the one at ``previous["address"]``.

        The scheduler described by ``previous`` (the scheduler file's contents, as
        :attr:`scheduler_info` gave them) is gone. Follow the cluster job to its
        successor and return the successor's scheduler file, adopted: it becomes
        :attr:`scheduler_info`, its job the :attr:`cluster_job`, tracked and cancelled
        by :meth:`close` like the first.

        A scheduler file is the successor's when it differs from ``previous``
        (``address``, ``started`` or ``pid``) and was written by the cluster job (a
        requeued job keeps its id) or by a job that replaced one of ours
        (``restart_of``). With ``restart="none"`` only a successor already there is
        taken; otherwise, while waiting, the cluster job's state is polled (at the
        poller's rate) and the file looked at every half second:

        - the runtime of a job that resubmitted itself names the new job in
          ``<scheduler file>.successor``: that job becomes the cluster job;
        - a job that ended ``TIMEOUT``, ``PREEMPTED`` or ``NODE_FAIL`` with no
          successor in sight after two poll intervals (SLURM or PBS may requeue it
          meanwhile) is replaced from here: the same cluster job is submitted again,
          counting towards ``max_restarts``;
        - a job that ended otherwise (``COMPLETED``, ``FAILED``, ``CANCELLED``, ...)
          with no successor in sight after two poll intervals has none coming.

        Called by a Client's helper thread; safe beside the caller's and the adapt
        thread's use of the cluster.

        Parameters
        ----------
        previous
            The scheduler file's contents when the scheduler was last reachable.
        timeout
            Seconds to wait, queue time of a successor included; ``None``: no limit.

        Returns
        -------
        dict or None
            The successor's scheduler file (as :func:`runtime.rendezvous.read_scheduler_file`
            returns it), or ``None`` when no successor is coming: ``restart`` is
            ``"none"`` (returned at once), the job ended in a state a restart would not mend,
            ``max_restarts`` was reached, the cluster was closed - or ``timeout`` passed.

        Raises
        ------
        JobQueueError
            The replacement job could not be submitted, or status queries fail in a
            way retrying will not fix.
        SchedulerError
            The scheduler file exists but cannot be read (bad permissions, not a
            scheduler file).
        """
        deadline = math.inf if timeout is None else self._clock() + timeout
        ended_at: float | None = None  # when the cluster job was first seen ended
        while True:
            with self._lock:
                job = self._cluster_job
                if self._status is ClusterStatus.CLOSED or job is None:
                    return None
            status = self.poller.poll().get(job.job_id)
            # The files after the state: what the job wrote before it ended is there.
            info = self._read_scheduler_file()
            if info is not None and not rendezvous.same_scheduler(info, previous):
                with self._lock:
                    if self._status is ClusterStatus.CLOSED:
                        return None
                    self._adopt(info)
                    job_id = self._cluster_job.job_id if self._cluster_job else None
                logger.info("cluster job %s has a new scheduler at %s", job_id, info["address"])
                return info
            if self.spec.restart is RestartMode.NONE:
                logger.info("cluster job %s is not restarted: restart is 'none'", job.job_id)
                return None
            if self._follow_announced_successor(job):
                ended_at = None
                continue
            if status is None or not (
                status.state.is_terminal or self.poller.is_settled(job.job_id)
            ):
                ended_at = None  # queued, running or draining: a successor may come
            else:
                if self.spec.restart is RestartMode.REQUEUE:
                    self.poller.unsettle(job.job_id)  # it may come back under its id
                now = self._clock()
                ended_at = now if ended_at is None else ended_at
                if now - ended_at >= self._settle_time():
                    if not status.state.is_interrupted:
                        logger.info(
                            "cluster job %s ended (%s) and nothing replaced it",
                            job.job_id,
                            _describe(status),
                        )
                        return None
                    if self._replace(job, status, previous) is None:
                        return None
                    ended_at = None
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            self._sleep(min(_SUCCESSOR_POLL_INTERVAL, remaining))

    def _settle_time(self) -> float:
        """How long an ended cluster job is given to show a successor (two poll intervals)."""
        return 2 * max(self.poller.interval, _SUCCESSOR_POLL_INTERVAL)

    def _follow_announced_successor(self, job: SubmittedJob) -> bool:
        """Follow the job named in the successor file, if it is news; whether it was."""
        text = _announced_successor(self._scheduler_file)
        if text is None:
            return False
        with self._lock:
            if self._status is ClusterStatus.CLOSED or self._cluster_job is not job:
                return False
            if any(same_job(text, known) for known in self._jobs):
                return False  # one we follow already, or followed before
            self._cluster_job = self._follow(text, job)
            self._restarts += 1
        return True

    def _replace(
        self, job: SubmittedJob, status: JobStatus, previous: Mapping[str, Any]
    ) -> SubmittedJob | None:
        """Submit the cluster job again in place of ``job``; ``None`` if it may not be."""
        with self._lock:
            if self._status is ClusterStatus.CLOSED:
                return None
            if self._cluster_job is not job:
                return self._cluster_job  # another caller followed or replaced it already
            restarts = self._restarts + 1
            if restarts > self.spec.max_restarts:
                logger.warning(
                    "cluster job %s ended (%s); not submitting it again: it was restarted "
                    "%d times, max_restarts is %d",
                    job.job_id,
                    _describe(status),
                    self._restarts,
                    self.spec.max_restarts,
                )
                return None
            address = previous.get("address")
            if address:  # do not send workers to the scheduler that is gone
                with contextlib.suppress(SchedulerError, OSError):
                    rendezvous.remove_scheduler_file(self._scheduler_file, str(address))
            replacement = self._submit(
                JobKind.CLUSTER,
                variables={"HPC_JOB_RESTARTS": str(restarts), "HPC_JOB_RESTART_OF": job.job_id},
            )
            self._cluster_job = replacement
            self._restarts = restarts
        logger.warning(
            "cluster job %s ended (%s) and nothing replaced it; submitted cluster job %s "
            "in its place (restart %d of at most %d)",
            job.job_id,
            _describe(status),
            replacement.job_id,
            restarts,
            self.spec.max_restarts,
        )
        return replacement

    def close(self) -> None:
        """Stop adapting and cancel every job this cluster started. Idempotent.

        Raises
        ------
        JobQueueError
            Cancelling failed; the cluster is closed anyway (jobs may be left: the
            message names them).
        """
        with self._lock:
            if self._status is ClusterStatus.CLOSED:
                return
            self._status = ClusterStatus.CLOSED
        self.stop_adapt()
        self._stop_keeper()
        with self._lock:
            ids = self._live_job_ids()
            address = self._info["address"] if self._info else None
            self._finalizer.detach()
            known = list(self._jobs)
        if ids and self.spec.restart is not RestartMode.NONE:  # it may restart itself
            ids += _end_restarts(self._scheduler_file, known)
        try:
            self._cancel(ids)
        finally:
            if address is not None:
                with contextlib.suppress(SchedulerError, OSError):
                    rendezvous.remove_scheduler_file(self._scheduler_file, address)

    def detach(self) -> list[str]:
        """Leave the jobs running after this object is gone; return their ids.

        For a cluster started for other processes (``hpc submit --scheduler-file``):
        ``close()`` and interpreter exit then cancel nothing.
        """
        with self._lock:
            ids = self._live_job_ids()
            self._finalizer.detach()
            self._live_ids.clear()
            self._status = ClusterStatus.CLOSED
        self.stop_adapt()
        self._stop_keeper()
        return ids

    def __enter__(self) -> JobQueueCluster:
        if self._cluster_job is None:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._status is ClusterStatus.CLOSED:
            raise SchedulerError(f"{type(self).__name__} is closed; create a new one")

    # --- batch mode ------------------------------------------------------------------

    def submit_batch(self, script: str, script_args: Sequence[str] = ()) -> SubmittedJob:
        """Submit a cluster job that runs ``script`` as its client (batch mode).

        The job's exit status is the script's. It is not waited for, and not cancelled
        by :meth:`close` or at exit: it is meant to run on after this process ends.
        """
        with self._lock:
            self._check_open()
            return self.system.submit_job(
                self.spec,
                JobKind.CLUSTER,
                scheduler_file=self._scheduler_file,
                script=os.path.abspath(script),
                script_args=script_args,
            )

    # --- the scheduler, for Client(cluster) -------------------------------------------

    @property
    def scheduler_file(self) -> str:
        """Path of the cluster job's scheduler file."""
        return self._scheduler_file

    @property
    def scheduler_info(self) -> dict[str, Any] | None:
        """The scheduler file's contents once read (address, secret, pid, job id, ...)."""
        return self._info

    def _require_info(self) -> dict[str, Any]:
        if self._info is None:
            raise SchedulerError(
                f"{type(self).__name__} has no scheduler yet: call start() (or use it in a "
                "`with` block) and let it wait for the scheduler file"
            )
        return self._info

    @property
    def scheduler_address(self) -> str:
        """The scheduler's ``tcp://host:port``.

        Raises
        ------
        SchedulerError
            The cluster has not started yet.
        """
        return str(self._require_info()["address"])

    @property
    def secret(self) -> bytes:
        """The cluster secret that connections must prove (from the scheduler file)."""
        return bytes(self._require_info()["secret"])

    # --- jobs ----------------------------------------------------------------------

    @property
    def cluster_job(self) -> SubmittedJob | None:
        """The cluster job, once submitted."""
        return self._cluster_job

    @property
    def jobs(self) -> dict[str, SubmittedJob]:
        """Every job this cluster submitted (ended ones included), by id."""
        with self._lock:
            return dict(self._jobs)

    def job_states(self) -> dict[str, JobStatus]:
        """Status of every job this cluster submitted (one batched query at most)."""
        return self.poller.poll()

    def worker_jobs(self) -> list[str]:
        """Ids of worker jobs not ended and not cancelled, oldest first."""
        statuses = self.poller.poll()
        with self._lock:
            return [
                j
                for j, job in self._jobs.items()
                if job.kind is JobKind.WORKER and self._is_live(j, statuses.get(j))
            ]

    def _is_live(self, job_id: str, status: JobStatus | None) -> bool:
        if job_id in self._cancelled or self.poller.is_settled(job_id):
            return False
        return status is None or not status.state.is_terminal

    def _live_job_ids(self) -> list[str]:
        statuses = self.poller.statuses()
        return [j for j in self._jobs if self._is_live(j, statuses.get(j))]

    def _spec_for(self, kind: JobKind) -> JobSpec:
        """The spec a job of ``kind`` is written from.

        Worker jobs of a restarting cluster wait for a successor scheduler as long as a
        cluster start may take (requeued jobs are held about two minutes, and then
        queue), not the default minute - unless ``env`` sets the death-timeout.
        """
        spec = self.spec
        if (
            kind is not JobKind.WORKER
            or spec.restart is RestartMode.NONE
            or any(name == _DEATH_TIMEOUT_VARIABLE for name, _ in spec.env)
        ):
            return spec
        wait = max(self.start_timeout or _RESTART_DEATH_TIMEOUT, 60.0)
        env = [f"{k}={v}" for k, v in spec.env]
        return spec.replace(env=[*env, f"{_DEATH_TIMEOUT_VARIABLE}={wait:g}s"])

    def _submit(self, kind: JobKind, variables: Mapping[str, str] | None = None) -> SubmittedJob:
        job = self.system.submit_job(
            self._spec_for(kind), kind, scheduler_file=self._scheduler_file, variables=variables
        )
        self._track(job)
        logger.info("submitted %s job %s (%s)", kind.value, job.job_id, job.script_path)
        return job

    def _track(self, job: SubmittedJob) -> None:
        """Count ``job`` as this cluster's: its state followed, cancelled at the end."""
        self._jobs[job.job_id] = job
        self._live_ids.append(job.job_id)
        self.poller.track(job.job_id)

    def _cancel(self, ids: Sequence[str]) -> None:
        ids = [j for j in ids if j not in self._cancelled]
        if not ids:
            return
        self.system.cancel(ids)
        with self._lock:
            self._cancelled.update(ids)
            for job_id in ids:
                with contextlib.suppress(ValueError):
                    self._live_ids.remove(job_id)
        logger.info("cancelled jobs %s", ", ".join(ids))

    def _client_connected(self, client: Any) -> None:
        """Called by ``runtime.client.Client(cluster)``: follow load through that client.

        Adaptive scaling reads the scheduler's task counts and idle workers with it,
        and retires a job's workers through it before cancelling the job.
        """
        if self.load_source is None:
            watcher = SchedulerLoad(client)
            self.load_source = watcher
            if self.retire_jobs is None:
                self.retire_jobs = watcher.retire

    # --- scaling ---------------------------------------------------------------------

    def scale(self, jobs: int) -> None:
        """Have exactly ``jobs`` worker jobs (besides the cluster job).

        Adds worker jobs, or cancels some: queued ones first (newest first), then
        running ones (newest first), whose workers are first retired through
        :attr:`retire_jobs` when it is set. Stops :meth:`adapt`. With a ``restart``
        setting, a background thread keeps the count through walltimes: a worker job
        gets its replacement ``drain_lead`` before its walltime (both run meanwhile),
        and one that ends ``TIMEOUT``, ``PREEMPTED`` or ``NODE_FAIL`` unreplaced gets
        one then (at most ``max_restarts`` replacements per job of the target). Worker
        jobs outlive a drained cluster job: their workers join its successor.

        Raises
        ------
        JobConfigError
            ``jobs`` is negative.
        SubmissionError
            A worker job was refused.
        """
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
            raise JobConfigError(f"scale(jobs=...) needs a whole number >= 0, got {jobs!r}")
        self.stop_adapt()
        self._scale_to(jobs, idle_jobs=None)
        with self._lock:
            self._worker_target = jobs
        if jobs and self.spec.restart is not RestartMode.NONE:
            self._start_keeper()

    # --- keeping worker jobs through walltimes -------------------------------------

    def _start_keeper(self) -> None:
        with self._lock:
            if self._keeper_thread is not None and self._keeper_thread.is_alive():
                return
            self._keeper_stop = threading.Event()
            self._keeper_thread = self._repeat(
                "keeper",
                lambda: max(self.poller.interval, _KEEPER_INTERVAL),
                self._keep_workers,
                self._keeper_stop,
                "replacing ended worker jobs",
            )

    def _stop_keeper(self) -> None:
        _halt(self._keeper_thread, self._keeper_stop)
        self._keeper_thread = None

    def _repeat(
        self,
        name: str,
        interval: Callable[[], float],
        step: Callable[[], Any],
        stop: threading.Event,
        what: str,
    ) -> threading.Thread:
        """Start a daemon thread calling ``step`` every ``interval()`` s until ``stop``.

        A failing step is logged and tried again at the next interval, unless the
        cluster closed or ``stop`` was set meanwhile.
        """

        def loop() -> None:
            while not stop.wait(interval()):
                try:
                    step()
                except Exception:  # noqa: BLE001 - the next step may work
                    if stop.is_set() or self._status is ClusterStatus.CLOSED:
                        return
                    logger.exception("%s failed", what)

        thread = threading.Thread(target=loop, name=f"{type(self).__name__}-{name}", daemon=True)
        thread.start()
        return thread

    def _keep_workers(self) -> list[str]:
        """Replace worker jobs near or past their walltime, keeping the :meth:`scale` target.

        - A running worker job whose walltime ends within ``drain_lead`` (counted from
          when this cluster first saw it running) gets its replacement now, so that the
          replacement can queue and start while the old job still works: for up to
          ``drain_lead`` both run.
        - A worker job that ended ``TIMEOUT``, ``PREEMPTED`` or ``NODE_FAIL`` without
          a replacement gets one.

        Up to the :meth:`scale` target (``adapt`` keeps its own), and at most
        ``max_restarts`` replacements per worker job of the target. Returns the ids
        submitted. A worker job that ended otherwise (completed, failed, cancelled) is
        not replaced: that is not what a restart mends.
        """
        with self._lock:
            target = self._worker_target
            if (
                self._status is ClusterStatus.CLOSED
                or self._adaptive is not None
                or not target
                or self.spec.restart is RestartMode.NONE
            ):
                return []
            statuses = self.poller.poll()
            live = self.worker_jobs()
            replaced = self._worker_replaced
            now = self._clock()
            since = self._worker_running_since
            for j in live:
                st = statuses.get(j)
                if st is not None and st.state is JobState.RUNNING:
                    since.setdefault(j, now)
            for j in [j for j in since if j not in live]:
                del since[j]
            interrupted = [
                j
                for j, job in self._jobs.items()
                if job.kind is JobKind.WORKER
                and j not in replaced
                and j not in self._cancelled
                and (st := statuses.get(j)) is not None
                and st.state.is_interrupted
            ]
            expiring: list[str] = []
            walltime = self.spec.walltime
            if walltime is not None and self.spec.drain_lead < walltime:
                handover = walltime - self.spec.drain_lead
                expiring = [
                    j
                    for j in live
                    if j not in replaced and j in since and now - since[j] >= handover
                ]
            staying = [j for j in live if j not in replaced and j not in expiring]
            submitted: list[str] = []
            budget = self.spec.max_restarts * target - self._worker_restarts
            due = interrupted + expiring
            for job_id in due[: max(0, min(target - len(staying), budget))]:
                replacement = self._submit(JobKind.WORKER)
                replaced.add(job_id)
                self._worker_restarts += 1
                submitted.append(replacement.job_id)
                if job_id in expiring:
                    logger.warning(
                        "worker job %s reaches its walltime in about %d s; submitted worker "
                        "job %s to take over",
                        job_id,
                        max(0, round(walltime - (now - since[job_id]))) if walltime else 0,
                        replacement.job_id,
                    )
                else:
                    logger.warning(
                        "worker job %s ended (%s); submitted worker job %s in its place",
                        job_id,
                        _describe(statuses[job_id]),
                        replacement.job_id,
                    )
            if due and budget <= 0:
                logger.warning(
                    "worker jobs %s are not replaced: max_restarts (%d per job) is used up",
                    ", ".join(due),
                    self.spec.max_restarts,
                )
                replaced.update(due)
            return submitted

    def _scale_to(self, target: int, idle_jobs: Sequence[str] | None) -> None:
        """Add or cancel worker jobs; ``idle_jobs`` limits which running ones may go."""
        with self._lock:
            self._check_open()
            if self._cluster_job is None:
                raise SchedulerError(
                    f"start the cluster before scaling it: {type(self).__name__}.start()"
                )
            live = self.worker_jobs()
            # Jobs replaced ahead of their walltime are on their way out: they do not
            # count, and go early only when no worker is wanted at all.
            leaving = [j for j in live if j in self._worker_replaced]
            live = [j for j in live if j not in self._worker_replaced]
            if target == 0 and leaving:
                if self.retire_jobs is not None:
                    self.retire_jobs(leaving)
                self._cancel(leaving)
            if target > len(live):
                for _ in range(target - len(live)):
                    self._submit(JobKind.WORKER)
                return
            excess = len(live) - target
            if excess <= 0:
                return
            statuses = self.poller.statuses()
            running_ids = {
                j
                for j in live
                if (s := statuses.get(j)) is not None and s.state is JobState.RUNNING
            }
            pending = [j for j in reversed(live) if j not in running_ids]
            running = [j for j in reversed(live) if j in running_ids]
            if idle_jobs is not None:
                running = [j for j in running if any(same_job(j, i) for i in idle_jobs)]
            doomed_pending = pending[:excess]
            doomed_running = running[: excess - len(doomed_pending)]
            if doomed_running and self.retire_jobs is not None:
                self.retire_jobs(doomed_running)
            self._cancel([*doomed_pending, *doomed_running])

    def adapt(
        self,
        minimum_jobs: int | None = None,
        maximum_jobs: int | None = None,
        *,
        interval: float | str | None = None,
        wait_count: int | None = None,
        load: Callable[[], ClusterLoad] | None = None,
    ) -> Adaptive:
        """Follow the scheduler's load between ``minimum_jobs`` and ``maximum_jobs`` worker jobs.

        A background thread decides every ``interval`` (see :class:`AdaptivePolicy`):
        more jobs while work is queued, fewer once workers sit idle - only jobs whose
        workers are all idle, retired first so no result is lost. Defaults come from
        the ``launchers.adapt`` settings. :meth:`scale` or :meth:`close` stop it.

        Parameters
        ----------
        load
            Returns the scheduler's current :class:`ClusterLoad`; default
            :attr:`load_source`, which a connected Client sets. Until one exists, the
            thread waits.
        """
        settings = self.settings
        policy = AdaptivePolicy(
            minimum_jobs=int(
                settings.value("adapt", "minimum-jobs") if minimum_jobs is None else minimum_jobs
            ),
            maximum_jobs=int(
                settings.value("adapt", "maximum-jobs") if maximum_jobs is None else maximum_jobs
            ),
            workers_per_job=self.spec.total_tasks,
            threads_per_worker=self.spec.cores_per_task,
        )
        adaptive = Adaptive(
            policy, int(settings.value("adapt", "wait-count") if wait_count is None else wait_count)
        )
        self.stop_adapt()
        with self._lock:
            self._check_open()
            if load is not None:
                self.load_source = load
            self._adaptive = adaptive
            if interval is not None:
                self._adapt_interval = parse_timedelta(interval) or self._adapt_interval
            self._adapt_stop = threading.Event()
            self._adapt_thread = self._repeat(
                "adapt",
                lambda: self._adapt_interval,
                self.adapt_once,
                self._adapt_stop,
                "adapt step",
            )
        return adaptive

    def adapt_once(self, load: ClusterLoad | None = None) -> int | None:
        """Take one adaptive decision now; return the target number of worker jobs.

        Returns ``None`` (doing nothing) when not adapting or no load is available.
        """
        adaptive = self._adaptive
        source = self.load_source
        if adaptive is None or (load is None and source is None):
            return None
        if load is None and source is not None:
            load = source()
        if load is None:
            return None
        with self._lock:
            live = self.worker_jobs()
            statuses = self.poller.statuses()
            running = sum(
                1
                for j in live
                if (s := statuses.get(j)) is not None and s.state is JobState.RUNNING
            )
            target = adaptive.step(load, running_jobs=running, pending_jobs=len(live) - running)
            self._scale_to(target, idle_jobs=load.idle_jobs)
        return target

    def stop_adapt(self) -> None:
        """Stop adapting (the jobs stay as they are)."""
        _halt(self._adapt_thread, self._adapt_stop)
        self._adapt_thread = None
        self._adaptive = None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._status.value}: "
            f"{len(self._live_ids)} live jobs, scheduler file {self._scheduler_file}>"
        )


class SlurmCluster(JobQueueCluster):
    """A cluster of SLURM jobs; see :class:`JobQueueCluster` for the parameters."""

    system_name = "slurm"


class PBSCluster(JobQueueCluster):
    """A cluster of PBS jobs (``dialect="pbspro"`` or ``"torque"``); see :class:`JobQueueCluster`."""

    system_name = "pbs"


class LocalMPICluster(JobQueueCluster):
    """The same cluster job run with ``mpiexec`` on this machine, no batch system.

    See :class:`JobQueueCluster`; the ``local-mpi`` profile suits it.
    """

    system_name = "local"
