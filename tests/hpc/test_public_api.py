"""The public surface of ``hpc`` is explicit and does not drift unnoticed."""

from __future__ import annotations

import hpc

# Update this list deliberately when the public API changes (and add a CHANGELOG entry).
EXPECTED = [
    "ALL_COMPLETED",
    "Client",
    "ConfigError",
    "CycleError",
    "Delayed",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Future",
    "GraphError",
    "HPCError",
    "JobConfigError",
    "JobState",
    "KilledWorker",
    "LocalCluster",
    "LocalMPICluster",
    "PBSCluster",
    "ProgressBar",
    "SchedulerError",
    "SerializationError",
    "SlurmCluster",
    "SubmissionError",
    "__version__",
    "as_completed",
    "checkpoint",
    "compute",
    "config",
    "delayed",
    "get",
    "persist",
    "tokenize",
    "visualize",
    "wait",
]


def test_public_names_are_exactly_the_documented_ones():
    assert sorted(hpc.__all__) == sorted(EXPECTED)
    assert sorted(hpc.__all__, key=str.casefold) == sorted(EXPECTED, key=str.casefold)


def test_every_public_name_resolves():
    for name in hpc.__all__:
        assert getattr(hpc, name) is not None, name


def test_errors_share_one_root():
    for name in ("ConfigError", "CycleError", "GraphError", "SchedulerError", "SerializationError"):
        assert issubclass(getattr(hpc, name), hpc.HPCError)
