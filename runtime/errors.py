"""The exception tree shared by every package.

::

    HPCError                      root: catch this to catch anything we raise
    ├── ConfigError               malformed or invalid configuration (user's config)
    ├── GraphError                a task graph that cannot run
    │   └── CycleError            the graph has a cycle (the message shows the path)
    ├── SerializationError        an object that cannot cross a process boundary
    ├── TokenizationError         an object without a deterministic token (when required)
    ├── SchedulerError            a scheduler cannot be reached or used
    ├── WorkerDiedError           a worker process died while running tasks
    ├── KilledWorker              a task was running on too many workers that died
    ├── CheckpointError           a checkpoint is missing, truncated or corrupted
    ├── VersionMismatchError      peers run different Python/package versions
    └── CommError                 a network connection failed (also a ConnectionError)
        ├── CommClosedError       the connection is closed (peer gone, or closed here)
        └── HandshakeError        the peer failed authentication or speaks another protocol

Messages name the thing at fault and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CommClosedError",
    "CommError",
    "ConfigError",
    "CycleError",
    "GraphError",
    "HPCError",
    "HandshakeError",
    "KilledWorker",
    "SchedulerError",
    "SerializationError",
    "TokenizationError",
    "VersionMismatchError",
    "WorkerDiedError",
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


class TokenizationError(HPCError, TypeError):
    """An object cannot be hashed deterministically and a deterministic token is required.

    Raised only when the ``tokenize.ensure-deterministic`` config value is true; otherwise
    such objects get a random token (their keys then differ on every call).
    """


class SchedulerError(HPCError, RuntimeError):
    """A scheduler cannot be reached, or was asked for something it cannot do."""


class WorkerDiedError(HPCError, RuntimeError):
    """A worker process died (crash, ``os._exit``, killed) while running tasks.

    ``keys`` holds the tasks it may have been running: the one that killed it is
    among them.
    """

    def __init__(self, message: str, keys: list | None = None) -> None:
        super().__init__(message)
        self.keys = list(keys or [])


class KilledWorker(HPCError, RuntimeError):
    """A task was running on workers that died, too many times to try it again.

    The task probably kills its worker (``os._exit``, a crash in native code, running
    out of memory). ``key`` is the task; ``workers`` the addresses of the workers lost
    while it ran, oldest first. The limit is ``distributed.scheduler.allowed-failures``.
    """

    def __init__(self, message: str, key: object = None, workers: list | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.workers = list(workers or [])

    def __reduce__(self) -> tuple:
        # Exception pickles only ``args`` by default; keep the task and the workers.
        return (type(self), (str(self), self.key, self.workers))


class CheckpointError(HPCError, LookupError):
    """A checkpoint cannot be used: it is missing, truncated, corrupted or unreadable here.

    Whoever needed it treats it as absent and recomputes the task. ``token`` is the
    checkpoint's identity token and ``path`` its file, when known.
    """

    def __init__(self, message: str, token: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.token = token
        self.path = path

    def __reduce__(self) -> tuple:
        # Keep the token and the path across processes (the processes scheduler).
        return (type(self), (str(self), self.token, self.path))


class VersionMismatchError(HPCError, RuntimeError):
    """Two peers of one cluster run different versions of Python or key packages."""


class CommError(HPCError, ConnectionError):
    """A network connection between cluster processes failed."""


class CommClosedError(CommError):
    """The connection is closed: the peer went away, or it was closed on this side."""


class HandshakeError(CommError):
    """The peer did not prove the cluster secret, or speaks another wire protocol."""
