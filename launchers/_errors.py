"""Errors raised by the launchers: bad job settings, failed batch-system commands.

They hang off the one tree rooted at :class:`runtime.errors.HPCError`::

    HPCError
    ├── ConfigError
    │   └── JobConfigError        a job setting that cannot be used (the caller's fix)
    ├── JobQueueError             a batch-system command (squeue, qstat, scancel, ...) failed
    │   └── SubmissionError       sbatch/qsub refused or failed to take a job
    └── ClusterStartError         the cluster job ended or timed out before its scheduler
                                  wrote the scheduler file

``JobQueueError.transient`` says whose problem it is: transient failures (a busy
controller, a socket timeout) were already retried with back-off before being raised;
permanent ones (an unknown partition, a bad account) were not retried, because
retrying cannot fix them.

This module keeps no state.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.errors import ConfigError, HPCError

__all__ = ["ClusterStartError", "JobConfigError", "JobQueueError", "SubmissionError"]


class JobConfigError(ConfigError):
    """A job setting is unknown or impossible (negative cores, malformed walltime, ...).

    Raised when the setting is made, before anything is submitted.
    """


class JobQueueError(HPCError, RuntimeError):
    """A batch-system command failed.

    Parameters
    ----------
    message
        What failed and what to do about it.
    command
        The command line that was run, as a list of arguments.
    stderr
        What the command printed (stderr, and stdout when that is where it reports
        errors, as the Torque-compatible ``qsub`` does).
    returncode
        The command's exit status, or ``None`` when it could not be run or timed out.
    transient
        ``True`` when the failure is of a kind that goes away by itself (a socket
        timeout, a busy controller); such failures are retried before being raised.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        stderr: str = "",
        returncode: int | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.command = list(command)
        self.stderr = stderr
        self.returncode = returncode
        self.transient = transient


class SubmissionError(JobQueueError):
    """``sbatch``/``qsub`` did not accept a job script.

    ``script_path`` is the script that was submitted; it is kept on disk so that the
    submission can be reproduced by hand.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        stderr: str = "",
        returncode: int | None = None,
        transient: bool = False,
        script_path: str | None = None,
    ) -> None:
        super().__init__(
            message, command=command, stderr=stderr, returncode=returncode, transient=transient
        )
        self.script_path = script_path


class ClusterStartError(HPCError, RuntimeError):
    """The cluster job did not produce a scheduler file.

    Either the job ended first (``state`` says how; its log usually says why) or
    ``start_timeout`` passed while it was still queued or starting.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        state: object = None,
        log_path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.log_path = log_path
