"""hpc-toolkit: run Python task graphs on a laptop, an MPI job, or SLURM and PBS clusters.

The front door. Everything users need is importable from here::

    import hpc

    @hpc.delayed
    def inc(x):
        return x + 1

    total = hpc.delayed(sum)([inc(i) for i in range(10)])
    total.compute()                                    # threads, on this machine
    hpc.compute(total, scheduler="processes")          # a process pool

The distributed runtime (``Client``, ``LocalCluster``, futures) is imported on first
use, so ``import hpc`` stays cheap for local work.
"""

from __future__ import annotations

import importlib
from typing import Any

from hpc import config
from runtime.compute import compute, persist
from runtime.delayed import Delayed, delayed
from runtime.errors import (
    ConfigError,
    CycleError,
    GraphError,
    HPCError,
    SchedulerError,
    SerializationError,
)
from runtime.local import get
from runtime.progress import ProgressBar
from runtime.tokenize import tokenize
from runtime.visualize import visualize

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Client",
    "ConfigError",
    "CycleError",
    "Delayed",
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

# Names served lazily: importing them starts nothing, but pulls in the network stack.
_LAZY = {
    "ALL_COMPLETED": "runtime.client",
    "FIRST_COMPLETED": "runtime.client",
    "FIRST_EXCEPTION": "runtime.client",
    "Client": "runtime.client",
    "Future": "runtime.client",
    "as_completed": "runtime.client",
    "wait": "runtime.client",
    "LocalCluster": "runtime.cluster",
    "KilledWorker": "runtime.errors",
    "checkpoint": "runtime.checkpoint",
    "JobConfigError": "launchers",
    "JobState": "launchers",
    "LocalMPICluster": "launchers",
    "PBSCluster": "launchers",
    "SlurmCluster": "launchers",
    "SubmissionError": "launchers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
