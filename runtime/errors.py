"""The exception tree shared by every package.

::

    HPCError                      root: catch this to catch anything we raise
    ├── ConfigError               malformed or invalid configuration (user's config)
    ├── GraphError                a task graph that cannot run
    │   └── CycleError            the graph has a cycle (the message shows the path)
    ├── SerializationError        an object that cannot cross a process boundary
    └── SchedulerError            a scheduler cannot be reached or used

Messages name the thing at fault and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CycleError",
    "GraphError",
    "HPCError",
    "SchedulerError",
    "SerializationError",
]


class HPCError(Exception):
    """Root of every error raised by hpc-toolkit."""


class ConfigError(HPCError, ValueError):
    """Configuration is malformed: unknown key, wrong type, bad YAML."""


class GraphError(HPCError, ValueError):
    """A task graph that cannot be run as given."""


class CycleError(GraphError):
    """The task graph contains a cycle; ``cycle`` holds the keys along it."""

    def __init__(self, message: str, cycle: list | None = None) -> None:
        super().__init__(message)
        self.cycle = list(cycle or [])


class SerializationError(HPCError, TypeError):
    """An object cannot be serialized to reach another process or machine."""


class SchedulerError(HPCError, RuntimeError):
    """A scheduler cannot be reached, or was asked for something it cannot do."""
