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

State: the jobs this cluster submitted (id, kind, script, log) and which of them it
cancelled; the scheduler file's contents once read; the adaptive controller and its
thread when adapting. Job states come from one shared :class:`JobStatusPoller`, so
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
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from launchers._adapt import Adaptive, AdaptivePolicy, ClusterLoad
from launchers._errors import ClusterStartError, JobConfigError, JobQueueError
from launchers._load import SchedulerLoad
from launchers._poller import JobStatusPoller
from launchers._settings import LauncherSettings, resolve_settings
from launchers._spec import JobSpec
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
_LOG_TAIL_LINES = 20


class ClusterStatus(enum.Enum):
    """Where a cluster object is in its life."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


def _cancel_quietly(system: JobSystem, job_ids: list[str]) -> None:
    """Finalizer: cancel what is left; never raise (it may run at interpreter exit)."""
    if not job_ids:
        return
    try:
        system.cancel(list(job_ids))
    except Exception as exc:  # noqa: BLE001 - a finalizer must not raise
        logger.warning("could not cancel jobs %s on exit: %s", job_ids, exc)


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
        **settings: Any,
    ) -> None:
        resolved = resolve_settings(
            system=self.system_name, profile=profile, config=config, **settings
        )
        self.settings: LauncherSettings = resolved
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
        self._finalizer = weakref.finalize(self, _cancel_quietly, self.system, self._live_ids)

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
            self.spec,
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

    def _remove_stale_scheduler_file(self) -> None:
        # A file left by an earlier cluster at this path would send workers and clients
        # to a scheduler that is gone.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._scheduler_file)
            logger.info("removed stale scheduler file %s", self._scheduler_file)

    def _wait_for_scheduler(self, job: SubmittedJob, timeout: float | None) -> None:
        deadline = math.inf if timeout is None else self._clock() + timeout
        while True:
            info = self._read_scheduler_file(job)
            if info is not None:
                with self._lock:
                    self._info = info
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

    def _read_scheduler_file(self, job: SubmittedJob) -> dict[str, Any] | None:
        if not os.path.exists(self._scheduler_file):
            return None
        info = rendezvous.read_scheduler_file(self._scheduler_file)
        written_by = info.get("job_id")
        if written_by and not same_job(str(written_by), job.job_id):
            logger.debug("ignoring %s: written by job %s", self._scheduler_file, written_by)
            return None
        return info

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
        with self._lock:
            ids = self._live_job_ids()
            address = self._info["address"] if self._info else None
            self._finalizer.detach()
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

    def _submit(self, kind: JobKind) -> SubmittedJob:
        job = self.system.submit_job(self.spec, kind, scheduler_file=self._scheduler_file)
        self._jobs[job.job_id] = job
        self._live_ids.append(job.job_id)
        self.poller.track(job.job_id)
        logger.info("submitted %s job %s (%s)", kind.value, job.job_id, job.script_path)
        return job

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
        :attr:`retire_jobs` when it is set. Stops :meth:`adapt`.

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

    def _scale_to(self, target: int, idle_jobs: Sequence[str] | None) -> None:
        """Add or cancel worker jobs; ``idle_jobs`` limits which running ones may go."""
        with self._lock:
            self._check_open()
            if self._cluster_job is None:
                raise SchedulerError(
                    f"start the cluster before scaling it: {type(self).__name__}.start()"
                )
            live = self.worker_jobs()
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
            self._adapt_thread = threading.Thread(
                target=self._adapt_loop,
                args=(self._adapt_stop,),
                name=f"{type(self).__name__}-adapt",
                daemon=True,
            )
            self._adapt_thread.start()
        return adaptive

    def _adapt_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self._adapt_interval):
            try:
                self.adapt_once()
            except Exception:  # noqa: BLE001 - keep adapting; the next step may work
                if stop.is_set() or self._status is ClusterStatus.CLOSED:
                    return
                logger.exception("adapt step failed")

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
        thread = self._adapt_thread
        self._adapt_stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
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
