"""The batch job a runtime process runs in: when it must stop, and how it comes back.

A cluster job that reaches its walltime is killed by the batch system. To lose
nothing, the job's scheduler *drains* shortly before: it starts no more tasks, lets
the running ones finish (their results are checkpointed by the workers, see
:mod:`runtime.checkpoint`), closes, and then either requeues its own job or submits a
replacement. The successor's scheduler writes the same scheduler file; clients that
were told a restart is coming reconnect to it and send their graphs again, and every
task that finished before is loaded from its checkpoint instead of computed.

The job script written by :mod:`launchers` says what to do, in environment
variables (every one optional; without them nothing here happens):

``HPC_JOB_DRAIN_AT``
    Epoch seconds at which to drain: the job's start plus its walltime minus the
    ``launchers.job.drain-lead``.
``HPC_JOB_DRAIN_SIGNAL``
    A signal name (default ``USR2``) that starts the drain too: SLURM sends it ahead
    of the time limit when the job asked for ``--signal=USR2@<lead>``. SLURM may send
    it up to a minute early; one that comes that little before ``HPC_JOB_DRAIN_AT``
    leaves the drain to that time (see :meth:`DrainGuard.on_drain_signal`).
``HPC_JOB_RESTART``
    ``requeue`` (``scontrol requeue`` / ``qrerun``: same job id, the batch system
    starts it again), ``resubmit`` (``sbatch`` / ``qsub`` of ``HPC_JOB_SCRIPT``: a new
    job id), or ``none``.
``HPC_JOB_SCRIPT``, ``HPC_JOB_MAX_RESTARTS``
    The script to resubmit, and how many restarts in a row are allowed (default 10).
``HPC_JOB_RESTARTS``, ``HPC_JOB_RESTART_OF``
    Set on a resubmitted job's command line: its restart count and the job it
    replaces (written into the scheduler file as ``restarts`` and ``restart_of``, so
    the login node can follow the chain of jobs).

A job in which no task finished while some ran until the drain gave up on them is not
restarted: a task longer than a job would only loop. An idle job is restarted (its
client may come back with work), up to ``HPC_JOB_MAX_RESTARTS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from runtime.errors import HPCError
from runtime.rendezvous import closed_reason, successor_path, write_successor

__all__ = ["RESTART_POLICIES", "DrainGuard", "JobEnvironment", "JobEnvironmentError"]

logger = logging.getLogger(__name__)

#: What a drained job does next.
RESTART_POLICIES = ("requeue", "resubmit", "none")

_DEFAULT_SIGNAL = "USR2"
_DEFAULT_MAX_RESTARTS = 10
# Signals a drain may not be tied to: hydra's lost-rank notice, and the uncatchable.
_RESERVED_SIGNALS = frozenset({"USR1", "KILL", "STOP"})


class JobEnvironmentError(HPCError, ValueError):
    """A job variable (``HPC_JOB_*``) has a value that cannot be used."""


def _signal(name: str) -> signal.Signals:
    bare = name.strip().upper().removeprefix("SIG")
    if bare in _RESERVED_SIGNALS:
        raise JobEnvironmentError(
            f"HPC_JOB_DRAIN_SIGNAL={name}: SIG{bare} cannot start a drain "
            "(USR1 is the MPI launcher's, KILL and STOP cannot be caught); use USR2"
        )
    try:
        return signal.Signals[f"SIG{bare}"]
    except KeyError:
        raise JobEnvironmentError(
            f"HPC_JOB_DRAIN_SIGNAL={name} is not a signal name; write e.g. USR2"
        ) from None


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise JobEnvironmentError(f"{name}={text!r} is not a whole number") from None
    if value < 0:
        raise JobEnvironmentError(f"{name}={value} must not be negative")
    return value


@dataclasses.dataclass(frozen=True)
class JobEnvironment:
    """What the job script asked for (see the module docstring), read from the environment."""

    system: str | None = None
    job_id: str | None = None
    drain_at: float | None = None
    drain_signal: signal.Signals | None = None
    restart: str = "none"
    script: str | None = None
    max_restarts: int = _DEFAULT_MAX_RESTARTS
    restarts: int = 0
    restart_of: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> JobEnvironment:
        """Read the ``HPC_JOB_*`` variables and the batch system's own job id.

        Raises
        ------
        JobEnvironmentError
            A variable is malformed (the message names it and the fix).
        """
        env = os.environ if environ is None else environ
        if env.get("SLURM_JOB_ID"):
            system, job_id = "slurm", env["SLURM_JOB_ID"]
        elif env.get("PBS_JOBID"):
            system, job_id = "pbs", env["PBS_JOBID"]
        else:
            system, job_id = None, None
        drain_at = None
        text = env.get("HPC_JOB_DRAIN_AT", "").strip()
        if text:
            try:
                drain_at = float(text)
            except ValueError:
                raise JobEnvironmentError(
                    f"HPC_JOB_DRAIN_AT={text!r} is not a time in epoch seconds"
                ) from None
        restart = env.get("HPC_JOB_RESTART", "none").strip().lower() or "none"
        if restart not in RESTART_POLICIES:
            raise JobEnvironmentError(
                f"HPC_JOB_RESTART={restart!r} is not one of {', '.join(RESTART_POLICIES)}"
            )
        in_job = drain_at is not None or restart != "none"
        sig_name = env.get("HPC_JOB_DRAIN_SIGNAL", "").strip()
        drain_signal = _signal(sig_name or _DEFAULT_SIGNAL) if (sig_name or in_job) else None
        restarts = _int(env, "HPC_JOB_RESTARTS", 0)
        if system == "slurm":  # a requeued SLURM job counts its own restarts
            restarts = max(restarts, _int(env, "SLURM_RESTART_COUNT", 0))
        return cls(
            system=system,
            job_id=job_id,
            drain_at=drain_at,
            drain_signal=drain_signal,
            restart=restart,
            script=env.get("HPC_JOB_SCRIPT") or None,
            max_restarts=_int(env, "HPC_JOB_MAX_RESTARTS", _DEFAULT_MAX_RESTARTS),
            restarts=restarts,
            restart_of=env.get("HPC_JOB_RESTART_OF") or None,
        )

    @property
    def drains(self) -> bool:
        """Whether this job drains before its end (a deadline or a drain signal is set)."""
        return self.drain_at is not None or self.drain_signal is not None

    def restart_refusal(self, scheduler_file: str | os.PathLike[str] | None = None) -> str | None:
        """Why this job would not restart after a drain; ``None`` if it would.

        With ``scheduler_file``, a cluster that was closed (see
        :func:`runtime.rendezvous.mark_closed`) is a reason too.
        """
        if self.restart == "none":
            return "HPC_JOB_RESTART is none (launchers.job.restart)"
        if self.system is None or self.job_id is None:
            return "not inside a SLURM or PBS job"
        if scheduler_file is not None:
            closed = closed_reason(scheduler_file)
            if closed is not None:
                return f"the cluster that started it was closed ({closed})"
        if self.restarts >= self.max_restarts:
            return (
                f"it restarted {self.restarts} times already (launchers.job.max-restarts "
                f"is {self.max_restarts})"
            )
        if self.restart == "resubmit" and not self.script:
            return "HPC_JOB_SCRIPT names no script to resubmit"
        return None

    def restart_command(self) -> list[str]:
        """The command that requeues this job or submits its successor."""
        assert self.job_id is not None
        if self.restart == "requeue":
            if self.system == "slurm":
                return ["scontrol", "requeue", self.job_id]
            return ["qrerun", self.job_id]
        assert self.script is not None
        count = self.restarts + 1
        if self.system == "slurm":
            env = f"ALL,HPC_JOB_RESTARTS={count},HPC_JOB_RESTART_OF={self.job_id}"
            return ["sbatch", "--parsable", f"--export={env}", self.script]
        variables = f"HPC_JOB_RESTARTS={count},HPC_JOB_RESTART_OF={self.job_id}"
        # -V: the successor keeps this job's environment (some qsub front ends read a
        # lone -v as "only these variables").
        return ["qsub", "-V", "-v", variables, self.script]

    def restart_job(
        self,
        scheduler_file: str | os.PathLike[str] | None,
        *,
        run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    ) -> str | None:
        """Requeue this job or submit its successor; return the successor's job id.

        The id is also written to :func:`successor_path` beside the scheduler file, so
        the login node adopts the successor instead of submitting one itself. A
        requeue that is refused (an operator's privilege on some PBS sites) falls back
        to submitting the script again. Returns ``None`` (and logs why) when the job
        is not to restart or the commands failed.
        """
        refusal = self.restart_refusal(scheduler_file)
        if refusal is not None:
            logger.warning("job %s is not restarted: %s", self.job_id, refusal)
            return None
        command = self.restart_command()
        marker = successor_path(scheduler_file) if scheduler_file is not None else None
        if self.restart == "requeue":
            # The requeue ends this process at once: record the successor, and say so,
            # first (a line logged after the command may never be written).
            if scheduler_file is not None:
                write_successor(scheduler_file, str(self.job_id))
            logger.warning(
                "job %s requeues itself (%s): its successor is the same job",
                self.job_id, " ".join(command),
            )  # fmt: skip
        try:
            done = run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            done = subprocess.CompletedProcess(command, 127, "", str(exc))
        if done.returncode != 0:
            if marker is not None and self.restart == "requeue":
                with contextlib.suppress(OSError):
                    os.unlink(marker)
            logger.error(
                "job %s could not %s itself: %s exited %d: %s",
                self.job_id, self.restart, " ".join(command), done.returncode,
                (done.stderr or done.stdout).strip(),
            )  # fmt: skip
            if self.restart == "requeue" and self.script:
                # Requeueing may be an operator's privilege (PBS Pro's qrerun) or off
                # at the site; a successor job does the same work.
                logger.warning("job %s submits its successor instead", self.job_id)
                resubmit = dataclasses.replace(self, restart="resubmit")
                return resubmit.restart_job(scheduler_file, run=run)
            return None
        if self.restart == "requeue":
            return str(self.job_id)
        successor = done.stdout.strip().split(";")[0].split()[-1]
        if scheduler_file is not None:
            write_successor(scheduler_file, successor)
        logger.warning("job %s resubmitted: its successor is job %s", self.job_id, successor)
        return successor


#: How long before ``HPC_JOB_DRAIN_AT`` a drain signal is taken for SLURM's warning of
#: that same time: sbatch(1) says the signal "may be sent up to 60 seconds earlier
#: than specified", its time-limit checks being that coarse.
EARLY_SIGNAL_WINDOW = 65.0
# Drain signals that may also mean "killed in a moment": never left to wait.
_KILL_WARNINGS = (signal.SIGTERM, signal.SIGINT)


class DrainGuard:
    """Drain a scheduler at the job's deadline or drain signal, then restart the job.

    Parameters
    ----------
    scheduler
        A started :class:`runtime.scheduler.Scheduler`.
    env
        The job's environment; default read from ``os.environ``.
    timeout
        How long running tasks may finish; default
        ``distributed.scheduler.drain-timeout``.
    on_done
        Called with the successor's job id (or ``None``) once the scheduler is closed.
    """

    def __init__(
        self,
        scheduler: Any,
        env: JobEnvironment | None = None,
        *,
        timeout: float | None = None,
        on_done: Callable[[str | None], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.env = JobEnvironment.from_environ() if env is None else env
        if timeout is None:
            from runtime import config
            from runtime.units import parse_timedelta

            value = config.get("distributed.scheduler.drain-timeout", None)
            timeout = parse_timedelta(value) if value is not None else None
        self.timeout = timeout
        self.on_done = on_done
        self.successor: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the deadline timer and the signal handler (call from the main thread)."""
        env = self.env
        if not env.drains:
            return
        self._loop = loop
        if env.drain_at is not None:
            delay = max(0.0, env.drain_at - time.time())
            logger.info("job %s drains in %.0f s (HPC_JOB_DRAIN_AT)", env.job_id, delay)
            loop.call_soon_threadsafe(self._arm_timer, delay)
        if env.drain_signal is not None:
            sig = env.drain_signal

            def on_signal(signum: int, frame: Any) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: too late
                    loop.call_soon_threadsafe(self.on_drain_signal, f"received SIG{sig.name[3:]}")

            signal.signal(sig, on_signal)

    @property
    def started(self) -> bool:
        """Whether a drain has started."""
        return self._task is not None

    async def finished(self) -> None:
        """Wait for a drain that started (and the restart after it) to end."""
        if self._task is not None:
            await self._task

    def on_drain_signal(self, reason: str) -> None:
        """Drain for the drain signal - unless it is SLURM's early warning of the deadline.

        SLURM sends ``--signal`` at a time-limit check of its own, up to a minute before
        the time asked for. A signal that comes within :data:`EARLY_SIGNAL_WINDOW`
        seconds before ``HPC_JOB_DRAIN_AT`` (whose timer is armed) is taken for that
        warning: the drain waits for the deadline, ``drain_lead`` before the walltime
        as asked. A signal earlier than that (sent by hand, or the walltime was
        shortened) drains at once, and so does TERM or INT used as the drain signal:
        those also come just before a kill (``scancel``, a preemption's grace time),
        which leaves no time to wait. Call on the scheduler's loop.
        """
        drain_at = self.env.drain_at
        deferrable = self.env.drain_signal not in _KILL_WARNINGS
        if deferrable and drain_at is not None and self._timer is not None and self._task is None:
            ahead = drain_at - time.time()
            if 0 < ahead <= EARLY_SIGNAL_WINDOW:
                logger.info(
                    "%s %.0f s before the job's drain time (HPC_JOB_DRAIN_AT): taken for the "
                    "batch system's early warning; draining at that time",
                    reason, ahead,
                )  # fmt: skip
                return
        self.trigger(reason)

    def _arm_timer(self, delay: float) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(delay, self.trigger, "the job's walltime is near")

    def trigger(self, reason: str) -> None:
        """Start draining (once; later calls do nothing). Call on the scheduler's loop."""
        if self._task is not None or self.scheduler.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._task = asyncio.ensure_future(self._drain(reason))

    async def _drain(self, reason: str) -> None:
        env = self.env
        refusal = env.restart_refusal(self.scheduler.scheduler_file)
        summary = await self.scheduler.drain(
            reason, timeout=self.timeout, restart=None if refusal else env.restart
        )
        if refusal is None and summary["finished"] == 0 and summary["abandoned"] > 0:
            refusal = (
                f"no task finished in this job and {summary['abandoned']} were still running "
                "at the drain: a task needs longer than a job runs, so another job would make "
                "no progress (raise the walltime, or split the task)"
            )
        # The workers of other jobs (a cluster's worker jobs) stay for the successor.
        await self.scheduler.close(f"drained: {reason}", successor=refusal is None)
        successor = None
        if refusal is None:
            loop = asyncio.get_running_loop()
            successor = await loop.run_in_executor(
                None, env.restart_job, self.scheduler.scheduler_file
            )
        else:
            logger.warning("job %s drained and is not restarted: %s", env.job_id, refusal)
        self.successor = successor
        if self.on_done is not None:
            self.on_done(successor)
