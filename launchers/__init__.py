"""Job-queue integration: job scripts, submission, job states, clusters.

Write SLURM and PBS job scripts that start an MPI-ranked scheduler and workers, submit
and cancel them, follow their states, and grow or shrink a cluster of such jobs::

    from launchers import SlurmCluster

    with SlurmCluster(profile="slurm", queue="debug", walltime="00:30:00") as cluster:
        cluster.scale(jobs=4)          # four worker jobs join the cluster job
        ...                            # Client(cluster) connects from here

Site profiles (``configs/*.yaml`` in the repository, shipped in the package) give
per-site defaults; see :mod:`launchers._settings` for the order settings apply in.
"""

from launchers._adapt import Adaptive, AdaptivePolicy, ClusterLoad
from launchers._cluster import (
    ClusterStatus,
    JobQueueCluster,
    LocalMPICluster,
    PBSCluster,
    SlurmCluster,
)
from launchers._commands import CommandResult, Retry, run_command
from launchers._errors import ClusterStartError, JobConfigError, JobQueueError, SubmissionError
from launchers._local import LocalSystem
from launchers._pbs import PBS_STATES, PBSSystem
from launchers._poller import JobStatusPoller
from launchers._settings import (
    SYSTEMS,
    LauncherSettings,
    available_profiles,
    load_profile,
    make_system,
    resolve_settings,
)
from launchers._slurm import SLURM_STATES, SlurmSystem
from launchers._spec import (
    JobSpec,
    MPIImplementation,
    RestartMode,
    format_walltime,
    parse_walltime,
)
from launchers._states import JobKind, JobState, JobStatus
from launchers._system import JobSystem, SubmittedJob

__all__ = [
    "Adaptive",
    "AdaptivePolicy",
    "ClusterLoad",
    "ClusterStartError",
    "ClusterStatus",
    "CommandResult",
    "JobConfigError",
    "JobKind",
    "JobQueueCluster",
    "JobQueueError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobStatusPoller",
    "JobSystem",
    "LauncherSettings",
    "LocalMPICluster",
    "LocalSystem",
    "MPIImplementation",
    "PBSCluster",
    "PBSSystem",
    "PBS_STATES",
    "RestartMode",
    "Retry",
    "SLURM_STATES",
    "SYSTEMS",
    "SlurmCluster",
    "SlurmSystem",
    "SubmissionError",
    "SubmittedJob",
    "available_profiles",
    "format_walltime",
    "load_profile",
    "make_system",
    "parse_walltime",
    "resolve_settings",
    "run_command",
]
