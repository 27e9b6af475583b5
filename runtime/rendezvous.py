"""The scheduler file: how workers and clients find a scheduler and learn its secret.

The scheduler writes a small JSON file to a path on the shared filesystem; workers
(in other batch jobs, on other nodes) and the client (on the login node) read it::

    {"address": "tcp://10.0.0.5:8786", "secret": "<64 hex digits>", "pid": 4242,
     "started": 1718000000.0, "job_id": "123456", "dashboard": null,
     "version": "0.1.0"}

It holds the cluster secret, so it is written with mode 0600 and a reader refuses a
file that others may read. It is written atomically - a temporary file in the same
directory, flushed, fsynced, then renamed over the target - so a reader polling for
it never sees half a file, even on NFS/Lustre where rename within a directory is
atomic.

This module keeps no state.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.errors import SchedulerError
from runtime.protocol import versions
from runtime.units import parse_timedelta

__all__ = [
    "closed_path",
    "closed_reason",
    "current_job_id",
    "mark_closed",
    "read_scheduler_file",
    "remove_scheduler_file",
    "same_scheduler",
    "successor_path",
    "write_scheduler_file",
    "write_successor",
]

_JOB_ID_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID")
_REQUIRED = ("address", "secret")
_MAX_FILE_BYTES = 64 * 1024
_sleep = time.sleep  # the poll's pause; tests replace it to observe the wait


def current_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """Return the batch job id this process runs in, or None outside a batch job.

    Parameters
    ----------
    environ
        The environment to look in; defaults to ``os.environ``.

    Examples
    --------
    >>> current_job_id({"SLURM_JOB_ID": "4242"})
    '4242'
    >>> current_job_id({}) is None
    True
    """
    env = os.environ if environ is None else environ
    for name in _JOB_ID_VARIABLES:
        value = env.get(name)
        if value:
            return value
    return None


def write_scheduler_file(
    path: str | os.PathLike[str],
    address: str,
    secret: bytes,
    *,
    dashboard: str | None = None,
    job_id: str | None = None,
    pid: int | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Write the scheduler file atomically, readable by its owner only (mode 0600).

    Parameters
    ----------
    path
        Where to write; its directory must exist (typically on a shared filesystem).
    address
        The scheduler's contact address, ``tcp://host:port``.
    secret
        The cluster secret (stored as hex).
    dashboard
        The dashboard URL, if any.
    job_id
        The batch job id; None takes it from ``SLURM_JOB_ID`` / ``PBS_JOBID``.
    pid, started
        Defaults: this process's pid and the current time.

    Returns
    -------
    dict
        The JSON document written (with the secret as hex).

    Raises
    ------
    SchedulerError
        When the file cannot be written; the message names the path.
    """
    target = Path(os.fspath(path))
    document = {
        "address": address,
        "secret": bytes(secret).hex(),
        "pid": os.getpid() if pid is None else pid,
        "started": time.time() if started is None else started,
        "job_id": current_job_id() if job_id is None else job_id,
        "dashboard": dashboard,
        "version": versions()["hpc-toolkit"],
    }
    # A job that took over from a drained one (runtime.jobenv) says so, so that the
    # login node can follow the chain of jobs: the job it replaces, and its count.
    restart_of = os.environ.get("HPC_JOB_RESTART_OF")
    if restart_of:
        document["restart_of"] = restart_of
    restarts = os.environ.get("HPC_JOB_RESTARTS") or os.environ.get("SLURM_RESTART_COUNT")
    if restarts and restarts.strip().isdigit():
        document["restarts"] = int(restarts)
    _write_atomically(target, json.dumps(document, indent=1).encode() + b"\n", "scheduler file")
    return document


def _write_atomically(target: Path, data: bytes, what: str) -> None:
    """Write ``data`` to ``target`` (mode 0600) so a reader sees all of it or nothing.

    Temporary file, fsync, rename, fsync of the directory. Errors name ``what``.
    """
    directory = target.parent
    try:
        # mkstemp creates the file with mode 0600 already; the fchmod below makes that
        # explicit and independent of the platform.
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except FileNotFoundError:
        raise SchedulerError(
            f"cannot write {what} {target}: directory {directory} does not exist; "
            "create it, or choose a path on a filesystem shared by all nodes"
        ) from None
    except OSError as exc:
        raise SchedulerError(f"cannot write {what} {target}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), 0o600)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise SchedulerError(f"cannot write {what} {target}: {exc}") from exc
        raise
    _fsync_directory(directory)


def successor_path(scheduler_file: str | os.PathLike[str]) -> str:
    """Where a job that drained records the id of the job taking over from it."""
    return os.fspath(scheduler_file) + ".successor"


def write_successor(scheduler_file: str | os.PathLike[str], job_id: str) -> None:
    """Record, beside the scheduler file, that job ``job_id`` takes over (atomically)."""
    _write_atomically(Path(successor_path(scheduler_file)), f"{job_id}\n".encode(), "record")


def closed_path(scheduler_file: str | os.PathLike[str]) -> str:
    """Where a cluster records that it was closed: the jobs it started do not restart."""
    return os.fspath(scheduler_file) + ".closed"


def mark_closed(scheduler_file: str | os.PathLike[str], reason: str) -> None:
    """Record, beside the scheduler file, that its cluster was closed (atomically).

    A cluster job that drains after this does not restart, and a restart already
    submitted ends as it starts (see :func:`closed_reason`).
    """
    _write_atomically(Path(closed_path(scheduler_file)), f"{reason}\n".encode(), "record")


def closed_reason(scheduler_file: str | os.PathLike[str]) -> str | None:
    """Why the cluster of ``scheduler_file`` was closed; ``None`` while it is not."""
    try:
        text = Path(closed_path(scheduler_file)).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text.strip() or "closed"


def same_scheduler(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two scheduler files' contents describe the same running scheduler.

    A restarted scheduler may reuse the host and even the port: its start time and pid
    tell it apart.
    """
    return all(a.get(k) == b.get(k) for k in ("address", "started", "pid"))


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable; not every filesystem allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_scheduler_file(
    path: str | os.PathLike[str], timeout: float | str | None = None
) -> dict[str, Any]:
    """Read a scheduler file, waiting for it to appear if asked.

    Parameters
    ----------
    path
        The scheduler file.
    timeout
        How long to wait for the file to appear (seconds or ``"60s"``); None or 0
        does not wait.

    Returns
    -------
    dict
        ``address`` (str), ``secret`` (bytes, decoded from hex), ``pid``,
        ``started``, ``job_id``, ``dashboard``, ``version``.

    Raises
    ------
    SchedulerError
        When the file does not exist (after waiting), may be read by other users,
        or is not a valid scheduler file. The message names the path and the fix.
    """
    target = Path(os.fspath(path))
    wait = parse_timedelta(timeout) or 0.0
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        try:
            fd = os.open(target, os.O_RDONLY)
            break
        except FileNotFoundError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = f" within {wait:g} s" if wait else ""
                raise SchedulerError(
                    f"scheduler file {target} does not exist{waited}; start a scheduler "
                    f"with `hpc scheduler --scheduler-file {target}` (or wait longer), and "
                    "check the path is on a filesystem this host shares with the scheduler"
                ) from None
            # Polling a (possibly network) filesystem: no event to wait on.
            _sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
        except OSError as exc:
            raise SchedulerError(f"cannot open scheduler file {target}: {exc}") from exc
    try:
        mode = os.fstat(fd).st_mode & 0o777
        data = os.read(fd, _MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if mode & 0o077:
        raise SchedulerError(
            f"scheduler file {target} has mode {mode:04o}: other users may read the "
            f"cluster secret in it. Run `chmod 600 {target}` if you trust it, or restart "
            "the scheduler (it writes the file with mode 0600)"
        )
    return _parse(target, data)


def _parse(target: Path, data: bytes) -> dict[str, Any]:
    def corrupt(why: str) -> SchedulerError:
        return SchedulerError(
            f"scheduler file {target} is not a valid scheduler file ({why}); delete it "
            "and restart the scheduler"
        )

    if len(data) > _MAX_FILE_BYTES:
        raise corrupt(f"larger than {_MAX_FILE_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise corrupt(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise corrupt("not a JSON object")
    missing = [name for name in _REQUIRED if not isinstance(document.get(name), str)]
    if missing:
        raise corrupt(f"missing {', '.join(missing)}")
    if not document["address"].startswith("tcp://"):
        raise corrupt(f"address {document['address']!r} is not tcp://host:port")
    try:
        secret = bytes.fromhex(document["secret"])
    except ValueError:
        raise corrupt("the secret is not hex") from None
    if not secret:
        raise corrupt("the secret is empty")
    result = {
        "address": document["address"],
        "secret": secret,
        "pid": document.get("pid"),
        "started": document.get("started"),
        "job_id": document.get("job_id"),
        "dashboard": document.get("dashboard"),
        "version": document.get("version"),
        "restart_of": document.get("restart_of"),
        "restarts": document.get("restarts"),
    }
    return result


def remove_scheduler_file(path: str | os.PathLike[str], address: str | None = None) -> bool:
    """Delete the scheduler file, if it is still ours.

    Parameters
    ----------
    path
        The scheduler file.
    address
        When given, delete only if the file still names this address, so a scheduler
        shutting down never deletes the file of a newer scheduler that replaced it.

    Returns
    -------
    bool
        True when a file was deleted.
    """
    target = Path(os.fspath(path))
    if address is not None:
        try:
            current = read_scheduler_file(target)
        except SchedulerError:
            return False
        if current["address"] != address:
            return False
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    return True
