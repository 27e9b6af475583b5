"""The public surface of ``launchers`` is explicit and does not drift unnoticed."""

from __future__ import annotations

import launchers
from runtime.errors import HPCError

# Update this list deliberately when the public API changes (and add a CHANGELOG entry).
EXPECTED = [
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


def test_public_names_are_exactly_the_documented_ones_and_sorted():
    assert launchers.__all__ == sorted(EXPECTED)


def test_every_public_name_resolves():
    for name in launchers.__all__:
        assert getattr(launchers, name) is not None, name


def test_launcher_errors_share_the_one_root():
    for name in ("ClusterStartError", "JobConfigError", "JobQueueError", "SubmissionError"):
        assert issubclass(getattr(launchers, name), HPCError)
    assert issubclass(launchers.SubmissionError, launchers.JobQueueError)


def test_job_states_are_the_ones_the_issue_names():
    assert [s.name for s in launchers.JobState] == [
        "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED",
        "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "UNKNOWN",
    ]  # fmt: skip
