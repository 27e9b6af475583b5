"""Job states common to every batch system, and the status record of one job.

Each system translates its native states (SLURM's ``PENDING``/``COMPLETING``/...,
PBS's one-letter codes) into :class:`JobState` through a table kept beside its
parser. This module keeps no state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["JobKind", "JobState", "JobStatus"]


class JobKind(enum.Enum):
    """The two kinds of job a cluster submits."""

    #: Scheduler on MPI rank 0, workers on the other ranks (and, in batch mode, the
    #: user's script as the client on rank 1).
    CLUSTER = "cluster"
    #: Workers only, joining an existing scheduler through its scheduler file.
    WORKER = "worker"


class JobState(enum.Enum):
    """Where a job is in its life, the same for every batch system."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    #: The batch system does not (or no longer) know the job, or reported a state
    #: we have no translation for.
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended and will not run again by itself.

        ``UNKNOWN`` is not terminal: it may be a passing failure to find the job.
        """
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        """Whether the job is queued or running."""
        return self in (JobState.PENDING, JobState.RUNNING)

    @property
    def is_interrupted(self) -> bool:
        """Whether the job was stopped from outside before its work was done.

        Its walltime ran out, a higher-priority job preempted it, or a node failed:
        running it again may well succeed, unlike after ``FAILED`` or ``CANCELLED``.
        """
        return self in (JobState.TIMEOUT, JobState.PREEMPTED, JobState.NODE_FAIL)


_TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.OUT_OF_MEMORY,
    }
)


@dataclass(frozen=True)
class JobStatus:
    """What the batch system said about one job.

    Attributes
    ----------
    job_id
        The id as returned by the submit command.
    state
        The translated state.
    native_state
        The batch system's own word for it (``"COMPLETING"``, ``"Q"``, ...).
    reason
        Why a pending job waits (``"Priority"``, ``"Resources"``, a PBS comment), or why
        a job ended when the system says; ``None`` when it gives none.
    exit_code
        The job's exit status when it has ended and the system reports it.
    signal
        The signal that ended the job, when the system reports one.
    source
        The command the information came from (``"squeue"``, ``"sacct"``,
        ``"scontrol"``, ``"qstat"``, ``"local"``), or ``"none"`` when nothing knew the job.
    """

    job_id: str
    state: JobState
    native_state: str = ""
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    source: str = "none"
