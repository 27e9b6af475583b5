"""The messages exchanged by scheduler, workers and clients.

A message is a plain dict with an ``"op"`` key naming its kind (an :class:`Op`) and
the fields listed on that op. Messages travel in batches: ``Comm.write`` takes a list
of them and ``Comm.read`` returns one (see ``runtime.comm``). Keys of the task graph
are ``str`` or tuples.

Task payloads are opaque to the scheduler: the client serializes each task once with
``runtime.serialize.dumps`` and the scheduler only forwards those frames to a worker.
The scheduler never unpickles user code.

This module keeps no state. It also holds the version report peers exchange when they
connect (:func:`versions`) and its comparison (:func:`check_versions`), because both
sides of a connection must agree on what is compared.

Data flow::

    client --update-graph--> scheduler --compute-task--> worker
    client <-key-in-memory-- scheduler <-task-finished-- worker
    client ------------get-data--------------------------> worker  (gather)
                                         worker <-get-data-- worker (dependencies)
"""

from __future__ import annotations

import enum
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Literal

from runtime.errors import VersionMismatchError

__all__ = [
    "Op",
    "Role",
    "VersionMismatchMode",
    "check_versions",
    "version_differences",
    "versions",
]

logger = logging.getLogger(__name__)


class Op(str, enum.Enum):
    """The kind of a message: the value of its ``"op"`` key.

    Members compare equal to their string value (``Op.COMPUTE_TASK == "compute-task"``),
    so handlers may be looked up by either. Fields of each message are listed below;
    ``frames`` means a list of bytes-like objects from ``runtime.serialize.dumps``.
    """

    # client -> scheduler
    REGISTER_CLIENT = "register-client"
    """{client: id, versions}"""
    UPDATE_GRAPH = "update-graph"
    """{tasks: {key: frames}, dependencies: {key: [keys]}, keys: [wanted keys],
    priority: {key: tuple}, retries: {key: n}, workers: {key: [address or name]}, client}"""
    RELEASE_KEYS = "release-keys"
    """{keys, client}: the client holds no Future for these keys any more."""
    CANCEL_KEYS = "cancel-keys"
    """{keys, client}"""
    WHO_HAS = "who-has"
    """request {keys}; reply {who_has: {key: [worker addresses]}}"""
    UPDATE_DATA = "update-data"
    """client -> scheduler after a scatter: {who_has: {key: [addr]}, nbytes: {key: n},
    client}; client -> worker (the scatter itself): {data: {key: value}}, reply ``ok``."""
    SCHEDULER_INFO = "scheduler-info"
    """request {}; reply {workers: {address: {name, nthreads, memory_limit, pid, host}}}"""
    RETIRE_WORKERS = "retire-workers"
    """{workers: [address or name]}"""
    SHUTDOWN = "shutdown"
    """{}: stop the scheduler and every worker."""
    CLOSE_CLIENT = "close-client"
    """{client}: the client is done; its keys are released at once (a client that
    merely disconnects keeps them for ``distributed.scheduler.client-grace``)."""

    # scheduler -> client
    KEY_IN_MEMORY = "key-in-memory"
    """{key, nbytes, type}"""
    TASK_ERRED = "task-erred"
    """worker -> scheduler: {key, exception: frames, traceback: str, exc_type:
    "module.Qualname", retryable: bool, start, stop}; scheduler -> client: {key,
    exception: frames, traceback: str, worker, host, pid}"""
    TASK_CANCELLED = "task-cancelled"
    """{key}"""
    LOST_DATA = "lost-data"
    """{key}: the only copy of a result was lost with its worker."""
    SCHEDULER_DRAINING = "scheduler-draining"
    """{reason, restart: "requeue" | "resubmit" | None}: the scheduler starts no more
    tasks and will close (its job nears its walltime); with ``restart`` a successor
    scheduler will take over from the checkpoints, and the client may wait for it."""

    # worker -> scheduler
    REGISTER_WORKER = "register-worker"
    """{address, name, nthreads, memory_limit, pid, host, versions, job_id}"""
    TASK_FINISHED = "task-finished"
    """{key, nbytes, type, start, stop}"""
    MISSING_DATA = "missing-data"
    """{key, worker}: a peer did not have a dependency it was said to hold."""
    HEARTBEAT = "heartbeat"
    """{metrics}"""
    RELEASE_WORKER_DATA = "release-worker-data"
    """{keys}"""

    # scheduler -> worker
    COMPUTE_TASK = "compute-task"
    """{key, task: frames, who_has: {dependency: [addr]}, priority}"""
    FREE_KEYS = "free-keys"
    """{keys}"""
    CLOSE = "close"
    """{}"""

    # worker <-> worker, client -> worker
    GET_DATA = "get-data"
    """request {keys}; reply ``data``."""
    DATA = "data"
    """{data: {key: value}}: values travel as objects, buffers out-of-band."""
    RUN = "run"
    """request {function: frames}; reply {result} or {exception, traceback}."""

    # replies and registration outcomes
    OK = "ok"
    """{}"""
    ERROR = "error"
    """{message: str}: a request was refused (e.g. a version mismatch on register)."""

    def __str__(self) -> str:
        return self.value


class Role(str, enum.Enum):
    """What a process is to its peers; sent in the hello of every connection."""

    SCHEDULER = "scheduler"
    WORKER = "worker"
    CLIENT = "client"

    def __str__(self) -> str:
        return self.value


VersionMismatchMode = Literal["error", "warn"]
"""Values of the ``distributed.version-mismatch`` config key."""

# Packages whose versions must agree across a cluster: pickles made by one version
# may not load, or load differently, under another. Absent packages report None.
_CHECKED_PACKAGES = ("hpc-toolkit", "cloudpickle", "numpy", "pandas")


class _Unsure(Exception):
    """The fast lookup cannot tell: ask :mod:`importlib.metadata`."""


def _normalize(name: str) -> str:
    """A distribution name as :mod:`importlib.metadata` compares them (PEP 503, ``_``)."""
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _metadata_version(info: str) -> str:
    """The ``Version`` header of a ``.dist-info``/``.egg-info`` directory's metadata."""
    if not os.path.isdir(info):
        raise _Unsure(info)
    for filename in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(info, filename), encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        break  # end of the headers
                    header, sep, value = line.partition(":")
                    if sep and header.strip().lower() == "version":
                        return value.strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise _Unsure(info) from exc
        break
    raise _Unsure(info)


def _version_from_path(name: str) -> str | None:
    """The version :func:`importlib.metadata.version` would report, found directly.

    Importing :mod:`importlib.metadata` (email, zipfile, csv, ...) costs a worker more
    than the rest of its start-up imports together, so plain installs are read here:
    the first ``<name>-*.dist-info`` or ``<name>*.egg-info`` directory along
    ``sys.path``, in the same order and with the same name matching. Anything else
    (zip archives, eggs, other distribution finders, unusual metadata) raises
    :class:`_Unsure`.
    """
    from importlib.machinery import PathFinder

    for finder in sys.meta_path:
        if finder is not PathFinder and hasattr(finder, "find_distributions"):
            raise _Unsure(name)
    wanted = _normalize(name)
    for entry in sys.path:
        root = entry or "."
        try:
            children = os.listdir(root)
        except NotADirectoryError as exc:
            raise _Unsure(root) from exc  # a zip archive
        except OSError:
            continue
        for child in children:
            base, ext = os.path.splitext(child.lower())
            if ext not in (".dist-info", ".egg-info", ".egg"):
                continue
            if _normalize(base.partition("-")[0]) != wanted:
                continue
            if ext == ".egg":
                raise _Unsure(child)
            return _metadata_version(os.path.join(root, child))
    return None


def _package_version(name: str) -> str | None:
    try:
        return _version_from_path(name)
    except _Unsure:
        pass
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_versions_cache: dict[str, str | None] | None = None


def versions() -> dict[str, str | None]:
    """Return the versions this process reports to its peers when it connects.

    Returns
    -------
    dict
        ``{"python": "3.11.7", "hpc-toolkit": ..., "cloudpickle": ..., "numpy": ...,
        "pandas": ...}``; a package that is not installed maps to None. JSON-ready.
    """
    global _versions_cache
    if _versions_cache is None:
        import platform

        found: dict[str, str | None] = {"python": platform.python_version()}
        for name in _CHECKED_PACKAGES:
            found[name] = _package_version(name)
        _versions_cache = found
    return dict(_versions_cache)


def version_differences(
    local: Mapping[str, str | None], remote: Mapping[str, str | None]
) -> list[str]:
    """List the packages whose versions differ, one readable line each.

    A package checked on one side only counts when the other side has it installed
    and this side does not: numpy on the worker but not on the client is a difference
    (results of numpy type could not be loaded), whereas unknown names are ignored.

    Parameters
    ----------
    local, remote
        Results of :func:`versions` from the two peers.

    Returns
    -------
    list of str
        E.g. ``["numpy: 1.26.4 here, 2.0.1 on the peer"]``; empty when they agree.

    Examples
    --------
    >>> version_differences({"python": "3.11.7"}, {"python": "3.12.1"})
    ['python: 3.11.7 here, 3.12.1 on the peer']
    """
    lines = []
    for name in sorted(set(local) | set(remote)):
        mine, theirs = local.get(name), remote.get(name)
        if mine != theirs:
            lines.append(
                f"{name}: {mine or 'not installed'} here, {theirs or 'not installed'} on the peer"
            )
    return lines


def check_versions(
    local: Mapping[str, str | None],
    remote: Mapping[str, str | None],
    *,
    peer: str,
    mode: VersionMismatchMode | None = None,
) -> list[str]:
    """Compare two version reports; raise or warn when they differ.

    Parameters
    ----------
    local, remote
        Results of :func:`versions` here and on the peer.
    peer
        Who the peer is, for the message (e.g. ``"worker tcp://10.0.0.3:40123"``).
    mode
        ``"error"`` raises, ``"warn"`` logs a warning; None reads the
        ``distributed.version-mismatch`` config key (default ``"error"``).

    Returns
    -------
    list of str
        The differences (empty when the versions agree).

    Raises
    ------
    VersionMismatchError
        When they differ and ``mode`` is ``"error"``; the message lists every
        difference and how to silence the check.
    """
    differences = version_differences(local, remote)
    if not differences:
        return differences
    if mode is None:
        mode = _configured_mismatch_mode()
    message = (
        f"{peer} runs different versions than this process:\n  "
        + "\n  ".join(differences)
        + "\nInstall the same versions everywhere (one environment on the shared "
        "filesystem), or set distributed.version-mismatch: warn to proceed anyway."
    )
    if mode == "error":
        raise VersionMismatchError(message)
    logger.warning("%s", message)
    return differences


def _configured_mismatch_mode() -> VersionMismatchMode:
    from runtime import config

    return "warn" if config.get("distributed.version-mismatch") == "warn" else "error"
