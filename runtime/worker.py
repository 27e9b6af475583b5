"""The worker: runs the tasks the scheduler assigns it and keeps their results.

A worker is one asyncio server. It holds a connection to the scheduler, listens on its
own port for peers (other workers fetching data, clients scattering data or calling
``run``), and runs task code on a ``ThreadPoolExecutor(nthreads)``. Results stay in
``Worker.data`` until the scheduler frees them; they leave the process only when a peer
or a client asks for them.

How a task flows through the state kept here (everything is owned by the event-loop
thread, except the two hand-over structures marked *shared*)::

    scheduler --compute-task--> _tasks[key]
                                  |  dependencies missing here?
                                  +--yes--> _dep_waiters[dep], _fetch_queue[peer]
                                  |            | one get-data per peer for many keys
                                  |            v
                                  |         data[dep] (a replica; dropped after use)
                                  v
                               _ready  (*shared* heap, under _ready_lock)
                                  |  an executor job drains it: deserialize the payload,
                                  |  runtime.graph.execute_task(task, {its deps' values})
                                  v
                               _done   (*shared* deque; one call_soon_threadsafe per
                                  |     batch of completions, not per task)
                                  v
    scheduler <--task-finished / task-erred (BatchedSend)--  data[key] = result

Why this shape. The per-task cost on the worker must stay at a few microseconds (two
single-threaded workers must sustain >= 10,000 tiny tasks/s), so there is no thread,
coroutine or future per task: an executor job keeps taking ready tasks until none is
left, and completions are handed back to the loop through a deque with a "wake-up
pending" flag, so however many tasks finish while the loop is busy, it is woken once
and reports them all in one message. A lone completion still wakes the loop at once:
chains of dependent tasks are latency bound.

Dependencies held elsewhere are fetched from the peers that hold them, batched per
peer (one ``get-data`` carries every key wanted from that peer), retried on another
holder when a peer fails or lacks a key (which is reported to the scheduler as
``missing-data``). When no holder is left, the tasks needing the key are dropped: the
scheduler recomputes it and sends them again. Fetched copies are *replicas*: the
scheduler does not know about them, so the worker drops them as soon as no local task
needs them any more. A value that cannot be pickled is not silently lost in transit:
the holder names it in its reply (``errors``) and the tasks needing it fail with a
``SerializationError``, instead of being recomputed forever.

Checkpoints (:mod:`runtime.checkpoint`): a ``compute-task`` may name where its result
is checkpointed (``checkpoint``: directory and identity token); the pool thread that
computed it writes the file before reporting (a failed write is logged, the result
still counts). With ``load`` the task is not computed: its checkpoint is loaded
instead. Inputs listed in ``stored`` that no peer holds (or no peer could send) are
loaded from their checkpoints, off the event loop, and kept as replicas like fetched
copies; an input whose checkpoint cannot be loaded is reported as ``missing-data``
with ``checkpoint``, and the scheduler has it computed.

Failures: a task exception is sent back pickled (or, if it will not survive pickling,
as an instance of its nearest built-in base class carrying the original type name and
message), with the remote traceback, the exception type name, whether
``distributed.retry-exceptions`` calls it retryable, and this worker's address, host
and pid. When the scheduler connection drops, the worker drops its state and tries to
register again until ``distributed.worker.death-timeout`` has passed; then it exits.
With a scheduler file it reads the file again about every second, so it joins a
restarted scheduler (new address and secret; it then serves peers with the new secret).
Started with ``parent_pid`` (as :class:`runtime.cluster.LocalCluster` does), it also
exits as soon as that process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import contextlib
import enum
import functools
import heapq
import importlib
import inspect
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from runtime.errors import (
    CommClosedError,
    ConfigError,
    HandshakeError,
    SchedulerError,
    SerializationError,
)
from runtime.protocol import Op, Role
from runtime.units import parse_bytes, parse_timedelta

if TYPE_CHECKING:
    from runtime.checkpoint import CheckpointWriter

__all__ = [
    "Worker",
    "WorkerStatus",
    "add_arguments",
    "main",
    "make_parser",
    "parse_memory_limit",
    "read_secret_file",
    "run_from_args",
]

logger = logging.getLogger(__name__)

Key = Hashable

_CONNECT_TIMEOUT = 10.0
_RECONNECT_ATTEMPT = 1.0
_CLOSE_TIMEOUT = 2.0
_CHECKPOINT_CLOSE_TIMEOUT = 30.0  # finished results are worth waiting for

# Plain strings on the wire: an Op member would pickle as a reference to the class.
_TASK_FINISHED = Op.TASK_FINISHED.value
_TASK_ERRED = Op.TASK_ERRED.value
_MISSING_DATA = Op.MISSING_DATA.value
_HEARTBEAT = Op.HEARTBEAT.value
_GET_DATA = Op.GET_DATA.value
_DATA = Op.DATA.value
_UPDATE_DATA = Op.UPDATE_DATA.value
_RUN = Op.RUN.value
# The dependency values of a task without dependencies (never mutated).
_NO_DEPS: dict[Key, Any] = {}


class WorkerStatus(enum.Enum):
    """Life cycle of a :class:`Worker`."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    CLOSING = "closing"
    CLOSED = "closed"


class _TaskStatus(enum.Enum):
    FETCHING = "fetching"  # waiting for dependencies from peers
    READY = "ready"  # in the ready heap or running in a pool thread
    CANCELLED = "cancelled"  # freed by the scheduler before it finished


_FETCHING = _TaskStatus.FETCHING
_READY = _TaskStatus.READY
_CANCELLED = _TaskStatus.CANCELLED


class _Task:
    """One task accepted from the scheduler and not yet reported back."""

    __slots__ = (
        "checkpoint",
        "deps",
        "error",
        "key",
        "load",
        "missing",
        "nbytes",
        "payload",
        "priority",
        "result",
        "start",
        "status",
        "stop",
        "typename",
    )
    # Set by the pool thread that runs the task.
    start: float
    stop: float
    result: Any
    nbytes: int
    typename: str

    def __init__(self, key: Key, payload: Any, priority: Any) -> None:
        self.key = key
        self.payload = payload
        self.priority = priority
        self.status = _READY
        self.deps: Sequence[Key] = ()
        self.missing = 0
        self.error: dict[str, Any] | None = None
        self.checkpoint: Sequence[str] | None = None  # (directory, token)
        self.load = False  # load the checkpoint instead of computing


# --------------------------------------------------------------------------------------
# Helpers that run on the task path (pool threads): small and allocation-light.


_TYPENAMES: dict[type, str] = {}


def _typename(cls: type) -> str:
    name = _TYPENAMES.get(cls)
    if name is None:
        module = cls.__module__
        name = cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
        _TYPENAMES[cls] = name
    return name


_SIZEOF_SAMPLE = 10


def _sizeof(obj: Any) -> int:
    """Estimate the bytes held by ``obj``: exact for buffers, sampled for containers."""
    try:
        return _sizeof_unchecked(obj)
    except Exception:  # an object whose nbytes/len/getsizeof misbehaves
        return 64


def _sizeof_unchecked(obj: Any) -> int:
    cls = type(obj)
    if cls is int or cls is float or obj is None or cls is bool:
        return 28
    if cls is bytes or cls is str or cls is bytearray:
        return sys.getsizeof(obj)
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes + 100
    try:
        size = sys.getsizeof(obj)
    except TypeError:
        return 64
    if cls is list or cls is tuple or cls is set or cls is frozenset:
        n = len(obj)
        if n:
            sample = list(obj)[:_SIZEOF_SAMPLE] if n > _SIZEOF_SAMPLE else obj
            size += int(sum(_sizeof_unchecked(x) for x in sample) * n / len(sample))
    elif cls is dict:
        n = len(obj)
        if n:
            items = list(obj.items())[:_SIZEOF_SAMPLE]
            size += int(
                sum(_sizeof_unchecked(k) + _sizeof_unchecked(v) for k, v in items) * n / len(items)
            )
    return size


_INTERNAL_FILES = frozenset({__file__})


def _user_traceback(exc: BaseException) -> str:
    """Format ``exc`` with its traceback, leaving out this module's and graph's frames."""
    start = exc.__traceback__
    while start is not None and (
        start.tb_frame.f_code.co_filename in _INTERNAL_FILES
        or start.tb_frame.f_globals.get("__name__") == "runtime.graph"
    ):
        start = start.tb_next
    # All frames internal: the error came from a built-in callable (or from loading
    # the payload); its type and message say everything.
    return "".join(traceback.format_exception(type(exc), exc, start))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose str() failed>"


def _fallback_exception(exc: BaseException, reason: BaseException) -> BaseException:
    """An exception of ``exc``'s nearest built-in base class carrying its type and text.

    Used when ``exc`` itself cannot be pickled (or unpickled), so the caller can still
    catch it by its built-in base (``except ValueError``) and read what happened.
    """
    message = (
        f"{_typename(type(exc))}: {_safe_str(exc)} "
        f"[the original exception could not be sent: {type(reason).__name__}: "
        f"{_safe_str(reason)}]"
    )
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins" and issubclass(cls, BaseException):
            try:
                return cls(message)
            except Exception:
                continue
    return Exception(message)


def _resolve_exception_types(names: Iterable[Any]) -> tuple[tuple[type, ...], frozenset[str]]:
    """Turn the ``distributed.retry-exceptions`` entries into classes, or names to match.

    Entries are classes, built-in names (``"OSError"``, ``"IOError"``) or dotted
    ``"module.Qualname"`` paths; a path whose module cannot be imported here is kept as
    a name and matched against the qualified names in the exception's MRO.
    """
    classes: list[type] = []
    unresolved: set[str] = set()
    for entry in names:
        if isinstance(entry, type) and issubclass(entry, BaseException):
            classes.append(entry)
            continue
        if not isinstance(entry, str) or not entry:
            raise ConfigError(
                f"distributed.retry-exceptions: {entry!r} is not an exception type name; "
                "write e.g. 'OSError' or 'mypackage.errors.TransientError'"
            )
        found = getattr(builtins, entry, None)
        if found is None and "." in entry:
            module_name, _, qualname = entry.rpartition(".")
            with contextlib.suppress(ImportError):
                found = importlib.import_module(module_name)
                for part in qualname.split("."):
                    found = getattr(found, part, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            classes.append(found)
        else:
            unresolved.add(entry)
    return tuple(classes), frozenset(unresolved)


def _config_get(key: str, default: Any) -> Any:
    """``runtime.config.get(key)``, or ``default`` when the key or module is missing."""
    try:
        from runtime import config
    except ImportError:
        return default
    try:
        value = config.get(key, default)
    except (KeyError, ConfigError):
        return default
    return default if value is None and default is not None else value


# --------------------------------------------------------------------------------------
# Memory limit


def _total_memory() -> int:
    """Memory available to this process: physical memory, lowered by a cgroup limit."""
    try:
        # No psutil import on the start-up path (it costs more than the rest of this).
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        import psutil

        total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_memory_limit(
    limit: int | float | str | None,
    nthreads: int = 1,
    *,
    total_memory: int | None = None,
    total_cores: int | None = None,
) -> int | None:
    """Return a worker's memory limit in bytes, or None for no limit.

    Parameters
    ----------
    limit
        ``None``, ``0``, ``"0"`` or ``"none"``: no limit. ``"auto"``: this worker's
        share of the machine, ``total * min(1, nthreads / cores)``. A float in
        ``(0, 1]`` or a string ``"80%"``: that fraction of the machine's memory. An int,
        or a string with a unit (``"4GB"``, ``"3.5GiB"``): that many bytes.
        The result never exceeds the memory available to the process (physical memory,
        lowered by a cgroup limit such as SLURM sets).
    nthreads
        Threads of this worker; used by ``"auto"``.
    total_memory, total_cores
        The machine's memory and cores; read from the system when not given.

    Examples
    --------
    >>> parse_memory_limit("2GB", total_memory=8 * 10**9)
    2000000000
    >>> parse_memory_limit(0.5, total_memory=8 * 10**9)
    4000000000
    >>> parse_memory_limit("auto", 1, total_memory=8 * 10**9, total_cores=4)
    2000000000
    >>> parse_memory_limit("none") is None
    True
    """
    if limit is None or (isinstance(limit, str) and limit.strip().lower() in ("none", "0", "")):
        return None
    if isinstance(limit, bool):
        raise ConfigError(f"memory limit {limit!r} is not a size; write e.g. '4GB', 0.5 or 'auto'")
    if total_memory is None:
        total_memory = _total_memory()
    if isinstance(limit, str):
        text = limit.strip().lower()
        if text == "auto":
            cores = total_cores if total_cores is not None else _cpu_count()
            return int(total_memory * min(1.0, nthreads / max(cores, 1)))
        if text.endswith("%"):
            try:
                fraction = float(text[:-1]) / 100
            except ValueError:
                raise ConfigError(
                    f"memory limit {limit!r} is not a percentage; write e.g. '80%'"
                ) from None
            limit = fraction
        else:
            try:
                limit = parse_bytes(text)
            except ConfigError as err:
                raise ConfigError(f"memory limit: {err}; or write 'auto', 'none' or 0.5") from None
    if isinstance(limit, float) and limit <= 1:
        if limit < 0:
            raise ConfigError(f"memory limit {limit!r} is negative")
        limit = total_memory * limit
    if limit < 0:
        raise ConfigError(f"memory limit {limit!r} is negative")
    if limit == 0:
        return None
    return min(int(limit), total_memory)


# --------------------------------------------------------------------------------------
# Secrets and scheduler files


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster secret from ``path``.

    The file holds the secret as hex text (as in a scheduler file), or is itself a
    scheduler file (JSON with a ``"secret"`` entry). It must not be readable by group or
    others, like the scheduler file.

    Raises
    ------
    SchedulerError
        The file is missing, readable by others, or holds no secret.
    """
    import json
    import stat

    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            content = f.read()
    except OSError as err:
        raise SchedulerError(
            f"cannot read the secret file {path!r}: {err.strerror}; pass the scheduler "
            "file with --scheduler-file, or a file holding the secret with --secret-file"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SchedulerError(
            f"the secret file {path!r} is readable by other users (mode "
            f"{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
        )
    text = content.decode("ascii", "replace").strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text)["secret"])
        except (ValueError, KeyError, TypeError):
            raise SchedulerError(
                f"the secret file {path!r} looks like JSON but has no 'secret' entry"
            ) from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SchedulerError(
            f"the secret file {path!r} does not hold a hex-encoded secret"
        ) from None
    if not secret:
        raise SchedulerError(f"the secret file {path!r} is empty")
    return secret


def _read_scheduler_file(path: str, timeout: float | None) -> tuple[str, bytes]:
    from runtime import rendezvous

    info = rendezvous.read_scheduler_file(path, timeout=timeout)
    if isinstance(info, dict):
        address, secret = info["address"], info["secret"]
    else:
        address, secret = info.address, info.secret
    if isinstance(secret, str):
        secret = bytes.fromhex(secret)
    return address, secret


def _local_host_for(scheduler_address: str) -> str:
    """The local IP this machine uses to reach the scheduler (no packet is sent)."""
    from runtime import comm

    host = comm.parse_address(scheduler_address)[0]
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        return "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 1))
            return str(s.getsockname()[0])
    except OSError:
        return str(comm.get_ip())


# --------------------------------------------------------------------------------------
# The worker


class Worker:
    """A worker process's server: runs tasks, keeps results, serves them to peers.

    Parameters
    ----------
    scheduler_address
        ``tcp://host:port`` of the scheduler. Give this (with ``secret``) or
        ``scheduler_file``.
    scheduler_file
        Path of the scheduler file to read the address and secret from; waited for up
        to ``death_timeout`` when it does not exist yet.
    secret
        The cluster secret, when ``scheduler_address`` is given.
    nthreads
        Threads running tasks.
    memory_limit
        See :func:`parse_memory_limit`; reported to the scheduler.
    name
        A name for logs and for ``workers=`` restrictions; defaults to the address.
    host, port
        Where to listen for peers. ``host`` defaults to the local address that reaches
        the scheduler (``127.0.0.1`` when the scheduler is local); ``port`` 0 means any.
    interface
        A network interface name (e.g. ``ib0``) to listen on instead of ``host``.
    death_timeout
        Seconds (or a duration string) after which a worker that cannot reach its
        scheduler exits. Default: ``distributed.worker.death-timeout``.
    heartbeat_interval
        Seconds between heartbeats. Default: ``distributed.worker.heartbeat-interval``.
    parent_pid
        When given, the worker closes as soon as that process is gone (used by
        :class:`runtime.cluster.LocalCluster`, so its workers die with it).

    Examples
    --------
    >>> async def run(address, secret):  # doctest: +SKIP
    ...     async with Worker(address, secret=secret, nthreads=2) as worker:
    ...         await worker.finished()
    """

    def __init__(
        self,
        scheduler_address: str | None = None,
        *,
        scheduler_file: str | os.PathLike[str] | None = None,
        secret: bytes | None = None,
        nthreads: int = 1,
        memory_limit: int | float | str | None = "auto",
        name: str | None = None,
        host: str | None = None,
        port: int = 0,
        interface: str | None = None,
        death_timeout: float | str | None = None,
        heartbeat_interval: float | str | None = None,
        parent_pid: int | None = None,
    ) -> None:
        if (scheduler_address is None) == (scheduler_file is None):
            raise SchedulerError(
                "give the worker either a scheduler address ('tcp://host:port', with the "
                "secret) or a scheduler file, not both or neither"
            )
        if scheduler_address is not None and not secret:
            raise SchedulerError(
                f"no secret for scheduler {scheduler_address}: connections are "
                "authenticated; pass secret=, or use the scheduler file"
            )
        if not isinstance(nthreads, int) or isinstance(nthreads, bool) or nthreads < 1:
            raise ConfigError(f"nthreads must be a positive integer, not {nthreads!r}")
        self.scheduler_address = scheduler_address
        self.scheduler_file = os.fspath(scheduler_file) if scheduler_file is not None else None
        self.secret = secret
        self.nthreads = nthreads
        self.memory_limit = parse_memory_limit(memory_limit, nthreads)
        self.name = name
        self.host = host
        self.port = port
        self.interface = interface
        self.death_timeout = parse_timedelta(
            death_timeout
            if death_timeout is not None
            else _config_get("distributed.worker.death-timeout", "60s")
        )
        self.heartbeat_interval = parse_timedelta(
            heartbeat_interval
            if heartbeat_interval is not None
            else _config_get("distributed.worker.heartbeat-interval", "1s")
        )
        self.parent_pid = parent_pid
        #: Seconds to reach a peer holding a dependency before trying another holder.
        self.peer_timeout = (
            parse_timedelta(_config_get("distributed.worker.peer-timeout", "5s"))
            or _CONNECT_TIMEOUT
        )
        self.address: str | None = None
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.status = WorkerStatus.CREATED
        #: Why the worker closed: ``"scheduler-close"``, ``"death-timeout"``, ...
        self.close_reason: str | None = None

        #: Results held by this worker (computed here, scattered here, or replicas).
        self.data: dict[Key, Any] = {}
        #: Estimated size of each value in ``data``.
        self.nbytes: dict[Key, int] = {}
        self._tasks: dict[Key, _Task] = {}
        self._refs: dict[Key, int] = {}  # dep -> local unfinished tasks needing it
        self._replicas: set[Key] = set()  # keys in data the scheduler doesn't place here
        self._dep_waiters: dict[Key, list[_Task]] = {}
        self._dep_holders: dict[Key, list[str]] = {}
        self._dep_stored: dict[Key, Sequence[str]] = {}  # dep -> its checkpoint
        self._fetch_queue: dict[str, dict[Key, None]] = {}
        self._fetching_from: set[str] = set()
        self._peer_comms: dict[str, Any] = {}

        self._new_ready: list[_Task] = []
        self._ready: list[tuple[Any, int, _Task]] = []
        self._ready_lock = threading.Lock()
        self._seq = 0
        self._jobs = 0  # executor jobs running (under _ready_lock)
        self._done: deque[_Task] = deque()
        self._done_wakeup = False
        #: Times the pool woke the loop to report completions (a batch each).
        self.completion_wakeups = 0

        retry = _config_get("distributed.retry-exceptions", ["OSError"])
        self._retry_classes, self._retry_names = _resolve_exception_types(retry or [])

        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._checkpoint_writer: CheckpointWriter | None = None
        self._checkpoint_writer_tried = False
        self._listener: Any = None
        self._scheduler_comm: Any = None
        self._listener_secret: bytes | None = None  # the secret peers must prove
        self._batched: Any = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed_event: asyncio.Event | None = None
        self._close_requested = False

    # ---------------------------------------------------------------- life cycle

    def __repr__(self) -> str:
        return (
            f"<Worker {self.name or ''!s} {self.address or 'not started'} "
            f"status={self.status.value} nthreads={self.nthreads} "
            f"tasks={len(self._tasks)} data={len(self.data)}>"
        )

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close("context-exit")

    async def start(self) -> Worker:
        """Listen for peers, connect to the scheduler and register.

        Raises
        ------
        SchedulerError
            The scheduler could not be reached within ``death_timeout``, or it refused
            the registration (for instance because of a version mismatch).
        """
        from runtime import comm

        if self.status is not WorkerStatus.CREATED:
            return self
        self.status = WorkerStatus.STARTING
        self._loop = asyncio.get_running_loop()
        self._closed_event = asyncio.Event()
        deadline = self._death_deadline()
        try:
            if self.scheduler_file is not None:
                address, secret = await asyncio.to_thread(
                    _read_scheduler_file, self.scheduler_file, self.death_timeout
                )
                self.scheduler_address, self.secret = address, secret
            assert self.scheduler_address is not None and self.secret is not None
            if self.interface is not None:
                host = comm.get_ip(self.interface)
            else:
                host = self.host or _local_host_for(self.scheduler_address)
            self._listener = await comm.listen(
                comm.format_address(host, self.port),
                self._handle_peer,
                self.secret,
                role=Role.WORKER,
            )
            self._listener_secret = self.secret
            self.address = self._listener.address
            if self.name is None:
                self.name = self.address
            self._executor = ThreadPoolExecutor(
                self.nthreads, thread_name_prefix=f"hpc-worker-{self.name}"
            )
            await self._connect_and_register(deadline)
        except BaseException:
            await self._teardown()
            self.status = WorkerStatus.CLOSED
            self._closed_event.set()
            raise
        self.status = WorkerStatus.RUNNING
        self._spawn(self._heartbeat_loop())
        logger.info(
            "worker %s at %s: %d threads, memory limit %s, scheduler %s",
            self.name,
            self.address,
            self.nthreads,
            self.memory_limit,
            self.scheduler_address,
        )
        return self

    async def finished(self) -> None:
        """Wait until the worker has closed (asked to, or its scheduler went away)."""
        assert self._closed_event is not None, "start() the worker first"
        await self._closed_event.wait()

    async def close(self, reason: str = "closed") -> None:
        """Stop serving, drop all data and shut the task pool down.

        Tasks already running in a pool thread cannot be interrupted: they finish in the
        background and their results are discarded. Closing twice is harmless.
        """
        if self.status in (WorkerStatus.CLOSING, WorkerStatus.CLOSED):
            if self._closed_event is not None:
                await self._closed_event.wait()
            return
        self.status = WorkerStatus.CLOSING
        self.close_reason = reason
        logger.info("worker %s closing: %s", self.address, reason)
        await self._teardown()
        self.status = WorkerStatus.CLOSED
        if self._closed_event is not None:
            self._closed_event.set()

    def request_close(self, reason: str) -> None:
        """Start closing in the background (from a callback on the worker's loop).

        Requests after the first are ignored: two close tasks would each wait for the
        other to end.
        """
        if self._close_requested or self.status in (WorkerStatus.CLOSING, WorkerStatus.CLOSED):
            return
        self._close_requested = True
        self._spawn(self.close(reason))

    async def _teardown(self) -> None:
        current = asyncio.current_task()
        for task in list(self._background):
            if task is not current:
                task.cancel()
        if self._batched is not None:
            with contextlib.suppress(Exception):
                self._batched.close()  # sends what is pending
            self._batched = None
        for comm in self._peer_comms.values():
            comm.abort()  # idle connections: nothing to flush
        self._peer_comms.clear()
        if self._scheduler_comm is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._scheduler_comm.close(), _CLOSE_TIMEOUT)
            self._scheduler_comm = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
                await self._listener.wait_closed()
        self._reset_state()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        writer = self._checkpoint_writer
        if writer is not None:
            # Results that finished are worth keeping: let their files be written.
            left = await asyncio.to_thread(writer.close, _CHECKPOINT_CLOSE_TIMEOUT)
            if left:
                logger.warning(
                    "worker %s closed with %d checkpoint(s) still being written", self.address, left
                )
        pending = [t for t in self._background if t is not current and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT)

    def _death_deadline(self) -> float:
        assert self._loop is not None
        if self.death_timeout is None:
            return math.inf
        return self._loop.time() + self.death_timeout

    @property
    def executing(self) -> int:
        """Executor jobs currently running task code (each drains many tasks)."""
        return self._jobs

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _reset_state(self) -> None:
        """Forget every task and all data (the scheduler no longer knows about them)."""
        with self._ready_lock:
            for _, _, ts in self._ready:
                ts.status = _CANCELLED
            self._ready.clear()
        for ts in self._tasks.values():
            ts.status = _CANCELLED
        self._tasks.clear()
        self._new_ready.clear()
        self._done.clear()
        self._refs.clear()
        self._replicas.clear()
        self._dep_waiters.clear()
        self._dep_holders.clear()
        self._dep_stored.clear()
        self._fetch_queue.clear()
        self.data.clear()
        self.nbytes.clear()

    # ---------------------------------------------------------------- scheduler link

    def _registration(self) -> dict[str, Any]:
        from runtime import protocol

        return {
            "op": Op.REGISTER_WORKER.value,
            "address": self.address,
            "name": self.name,
            "nthreads": self.nthreads,
            "memory_limit": self.memory_limit,
            "pid": self.pid,
            "host": self.hostname,
            "versions": protocol.versions(),
            "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID"),
        }

    async def _connect_and_register(self, deadline: float) -> None:
        """Connect to the scheduler and register, retrying until ``deadline``."""
        from runtime import comm

        assert self._loop is not None
        delay = 0.05
        while True:
            if self.scheduler_file is not None and self.status is WorkerStatus.RECONNECTING:
                # A restarted scheduler writes a new address and secret.
                with contextlib.suppress(Exception):
                    self.scheduler_address, self.secret = await asyncio.to_thread(
                        _read_scheduler_file, self.scheduler_file, 0
                    )
                if self.secret != self._listener_secret:
                    await self._listen_again()
            assert self.scheduler_address is not None and self.secret is not None
            remaining = deadline - self._loop.time()
            attempt = _CONNECT_TIMEOUT
            if self.scheduler_file is not None and self.status is WorkerStatus.RECONNECTING:
                # Try the address briefly, then read the file again: a restarted
                # scheduler is found within about a second of writing it.
                attempt = _RECONNECT_ATTEMPT
            try:
                sched = await comm.connect(
                    self.scheduler_address,
                    self.secret,
                    timeout=max(0.1, min(remaining, attempt)),
                    role=Role.WORKER,
                    hello={"address": self.address, "name": self.name},
                )
            except HandshakeError as err:
                raise SchedulerError(
                    f"worker {self.name}: the scheduler at {self.scheduler_address} "
                    f"refused the connection: {err}; is the secret (scheduler file) the "
                    "one of this cluster?"
                ) from err
            except (OSError, asyncio.TimeoutError) as err:
                if self._loop.time() + delay >= deadline:
                    raise SchedulerError(
                        f"worker {self.name} could not reach the scheduler at "
                        f"{self.scheduler_address} within the death timeout "
                        f"({self.death_timeout}s): {err}; "
                        "check the address, the scheduler file, and that the scheduler runs"
                    ) from err
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            try:
                await sched.write([self._registration()])
                replies = await asyncio.wait_for(
                    sched.read(), max(1.0, deadline - self._loop.time())
                )
            except (OSError, asyncio.TimeoutError) as err:
                sched.abort()
                if self._loop.time() >= deadline:
                    raise SchedulerError(
                        f"worker {self.name}: the scheduler at {self.scheduler_address} "
                        f"did not answer the registration: {err}"
                    ) from err
                continue
            reply = replies[0] if replies else {}
            if reply.get("status", "OK") != "OK" or "error" in str(reply.get("op", "")):
                sched.abort()
                message = reply.get("message") or reply.get("error") or reply
                raise SchedulerError(
                    f"the scheduler at {self.scheduler_address} refused worker "
                    f"{self.name}: {message}"
                )
            break
        self._scheduler_comm = sched
        self._batched = comm.BatchedSend(sched)
        self._spawn(self._read_scheduler(sched))
        # Messages that came with the registration reply (the scheduler may batch).
        if len(replies) > 1:
            self._handle_scheduler_messages(replies[1:])

    async def _listen_again(self) -> None:
        """Serve peers with the new cluster secret of a restarted scheduler.

        Peers and clients of the new cluster prove the new secret; the listener opened
        with the old one would refuse them. The port is kept when it can be.
        """
        from runtime import comm

        old = self._listener
        bind = old.listen_address if old is not None else comm.format_address("127.0.0.1", 0)
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
                await old.wait_closed()
        for peer in self._peer_comms.values():
            peer.abort()  # authenticated with the old secret
        self._peer_comms.clear()
        assert self.secret is not None
        try:
            self._listener = await comm.listen(
                bind, self._handle_peer, self.secret, role=Role.WORKER
            )
        except OSError:
            host = comm.parse_address(bind)[0]
            self._listener = await comm.listen(
                comm.format_address(host, 0), self._handle_peer, self.secret, role=Role.WORKER
            )
        self._listener_secret = self.secret
        if self._listener.address != self.address:
            logger.info("worker %s now listens at %s", self.name, self._listener.address)
            self.address = self._listener.address

    async def _read_scheduler(self, sched: Any) -> None:
        try:
            while True:
                msgs = await sched.read()
                self._handle_scheduler_messages(msgs)
                if self.status in (WorkerStatus.CLOSING, WorkerStatus.CLOSED):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self.status in (WorkerStatus.CLOSING, WorkerStatus.CLOSED):
                return
            if not isinstance(err, OSError):
                logger.exception("worker %s: error handling scheduler messages", self.address)
            await self._scheduler_lost(err)

    async def _scheduler_lost(self, err: BaseException) -> None:
        """Try to register again until death-timeout; then close."""
        assert self._loop is not None
        logger.warning(
            "worker %s lost the scheduler at %s (%s); reconnecting for up to %ss",
            self.address,
            self.scheduler_address,
            err,
            "inf" if self.death_timeout is None else self.death_timeout,
        )
        self.status = WorkerStatus.RECONNECTING
        self._batched = None
        if self._scheduler_comm is not None:
            self._scheduler_comm.abort()
        self._scheduler_comm = None
        # The scheduler has written off everything it placed here.
        self._reset_state()
        deadline = self._death_deadline()
        try:
            await self._connect_and_register(deadline)
        except SchedulerError as exc:
            logger.error("worker %s: %s; exiting", self.address, exc)
            self.request_close("death-timeout")
            return
        if self.status is WorkerStatus.RECONNECTING:
            self.status = WorkerStatus.RUNNING
            logger.info("worker %s registered again with %s", self.address, self.scheduler_address)

    async def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_interval or 1.0
        proc: Any = None
        while True:
            await asyncio.sleep(interval)
            if self.parent_pid is not None and not _pid_alive(self.parent_pid):
                logger.warning(
                    "worker %s: parent process %d is gone", self.address, self.parent_pid
                )
                self.request_close("parent-gone")
                return
            if self._batched is None or self.status is not WorkerStatus.RUNNING:
                continue
            # Imported here rather than at start-up, where it would take longer than
            # running a first task. (psutil's first cpu_percent() is 0.0 either way.)
            import psutil

            try:
                if proc is None:
                    proc = psutil.Process()
                rss = proc.memory_info().rss
                cpu = proc.cpu_percent()
            except psutil.Error:
                rss, cpu = 0, 0.0
            self._send(
                {
                    "op": _HEARTBEAT,
                    "metrics": {
                        "time": time.time(),
                        "memory": rss,
                        "memory_limit": self.memory_limit,
                        "cpu": cpu,
                        "executing": self._jobs,
                        "ready": len(self._ready),
                        "tasks": len(self._tasks),
                        "in_memory": len(self.data),
                        "nbytes": sum(self.nbytes.values()),
                    },
                }
            )

    def _send(self, msg: dict[str, Any]) -> None:
        batched = self._batched
        if batched is not None:
            try:
                batched.send(msg)
            except CommClosedError:
                # The scheduler reader sees the loss and starts reconnecting; the
                # new registration starts from a clean slate.
                self._batched = None

    # ---------------------------------------------------------------- scheduler ops

    def _handle_scheduler_messages(self, msgs: Iterable[dict[str, Any]]) -> None:
        handlers = self._scheduler_handlers
        for msg in msgs:
            op = msg.get("op")
            handler = handlers.get(op)  # type: ignore[arg-type]
            if handler is None:
                logger.warning("worker %s: ignoring unknown scheduler op %r", self.address, op)
                continue
            try:
                handler(self, msg)
            except Exception:
                # One malformed message must not cost the connection and all state.
                logger.exception("worker %s: cannot handle %r from the scheduler", self.address, op)
        self._flush()

    def _on_compute_task(self, msg: dict[str, Any]) -> None:
        key = msg["key"]
        ts = self._tasks.get(key)
        if ts is not None:
            # Sent again (e.g. after missing-data): learn about new holders.
            for dep, holders in (msg.get("who_has") or {}).items():
                known = self._dep_holders.get(dep)
                if known is not None:
                    known.extend(h for h in holders if h not in known)
            for dep, where in (msg.get("stored") or {}).items():
                if dep in self._dep_holders:
                    self._dep_stored.setdefault(dep, where)
            return
        if key in self.data:
            self._replicas.discard(key)
            self._send(
                {
                    "op": _TASK_FINISHED,
                    "key": key,
                    "nbytes": self.nbytes.get(key, 0),
                    "type": _typename(type(self.data[key])),
                    "start": 0.0,
                    "stop": 0.0,
                }
            )
            return
        ts = _Task(key, msg["task"], msg.get("priority") or ())
        self._tasks[key] = ts
        checkpoint = msg.get("checkpoint")
        if checkpoint is not None:
            ts.checkpoint = checkpoint
            if not self._checkpoint_writer_tried:
                self._start_checkpoint_writer()
            ts.load = bool(msg.get("load"))
        who_has = msg.get("who_has")
        if who_has:
            ts.deps = deps = list(who_has)
            refs = self._refs
            data = self.data
            stored = msg.get("stored")
            for dep in deps:
                refs[dep] = refs.get(dep, 0) + 1
                if dep not in data:
                    ts.missing += 1
                    if stored and dep in stored:
                        self._dep_stored.setdefault(dep, stored[dep])
                    self._want(dep, who_has[dep], ts)
            if ts.missing:
                ts.status = _FETCHING
                return
        self._new_ready.append(ts)

    def _on_free_keys(self, msg: dict[str, Any]) -> None:
        tasks = self._tasks
        refs = self._refs
        for key in msg["keys"]:
            ts = tasks.pop(key, None)
            if ts is not None:
                ts.status = _CANCELLED
                self._release_deps(ts)
            if key in self.data:
                if refs.get(key):
                    # A local task still reads it; drop it after that task finished.
                    self._replicas.add(key)
                else:
                    del self.data[key]
                    self.nbytes.pop(key, None)
                    self._replicas.discard(key)

    def _on_close(self, msg: dict[str, Any]) -> None:
        self.request_close(msg.get("reason") or "scheduler-close")

    _scheduler_handlers: dict[str, Callable[[Worker, dict[str, Any]], None]] = {
        Op.COMPUTE_TASK.value: _on_compute_task,
        Op.FREE_KEYS.value: _on_free_keys,
        Op.CLOSE.value: _on_close,
    }

    def _release_deps(self, ts: _Task) -> None:
        refs = self._refs
        for dep in ts.deps:
            n = refs.get(dep, 0) - 1
            if n > 0:
                refs[dep] = n
                continue
            refs.pop(dep, None)
            if dep in self._replicas:
                self._replicas.discard(dep)
                self.data.pop(dep, None)
                self.nbytes.pop(dep, None)

    # ---------------------------------------------------------------- running tasks

    def _flush(self) -> None:
        """Hand newly ready tasks to the pool and start fetches queued this round."""
        if self._fetch_queue:
            self._start_fetches()
        new = self._new_ready
        if not new or self._executor is None:
            return
        self._new_ready = []
        ready = self._ready
        seq = self._seq
        with self._ready_lock:
            for ts in new:
                seq += 1
                heapq.heappush(ready, (ts.priority, seq, ts))
            start = min(self.nthreads - self._jobs, len(ready))
            if start > 0:
                self._jobs += start
        self._seq = seq
        submit = self._executor.submit
        for _ in range(max(start, 0)):
            try:
                submit(self._run_ready)
            except RuntimeError:  # pool shut down: we are closing
                with self._ready_lock:
                    self._jobs -= 1

    def _run_ready(self) -> None:
        """Executor job: run ready tasks until none is left (runs in a pool thread)."""
        lock = self._ready_lock
        ready = self._ready
        data = self.data
        from runtime.graph import execute_task
        from runtime.serialize import loads

        pop = heapq.heappop
        clock = time.time
        while True:
            with lock:
                if not ready:
                    self._jobs -= 1
                    return
                ts = pop(ready)[2]
            if ts.status is _CANCELLED:
                continue
            deps = ts.deps
            ts.start = clock()
            save_to = None
            try:
                checkpoint = ts.checkpoint
                if checkpoint is not None and ts.load:
                    from runtime.checkpoint import load as load_checkpoint

                    result = load_checkpoint(checkpoint[0], checkpoint[1])
                else:
                    # Only the declared dependencies: a literal argument that happens
                    # to equal some other key held here must stay a literal.
                    result = execute_task(
                        loads(ts.payload), {d: data[d] for d in deps} if deps else _NO_DEPS
                    )
                    save_to = checkpoint
            except BaseException as exc:
                ts.stop = clock()
                ts.error = self._pack_error(exc)
                del exc
            else:
                ts.stop = clock()
                ts.result = result
                ts.nbytes = _sizeof(result)
                ts.typename = _typename(type(result))
                del result
            if save_to is not None:
                # Reported only once written: a task reported finished has its
                # checkpoint on disk (unless writing failed, which is logged). The
                # writer thread writes it while this thread goes on to the next task;
                # with its backlog full, this thread writes it itself.
                writer = self._checkpoint_writer
                if writer is not None and writer.submit(
                    save_to[0], save_to[1], ts.result, ts.key, functools.partial(self._report, ts)
                ):
                    continue
                from runtime.checkpoint import save_quietly

                save_quietly(save_to[0], save_to[1], ts.result, ts.key)
            if not self._report(ts):  # the loop is closed: nobody to report to
                with lock:
                    self._jobs -= 1
                return

    def _start_checkpoint_writer(self) -> None:
        """Start the checkpoint writer, at the first task to checkpoint (not at start-up:
        importing ``runtime.checkpoint`` would slow every worker's start)."""
        if self.status is not WorkerStatus.RUNNING:
            return
        self._checkpoint_writer_tried = True
        if not _config_get("checkpoint.background-writes", True):
            return
        from runtime.checkpoint import CheckpointWriter

        self._checkpoint_writer = CheckpointWriter(
            max(2, self.nthreads), name=f"hpc-checkpoint-writer-{self.name}"
        )

    def _report(self, ts: _Task) -> bool:
        """Queue a finished task for the loop (from a pool or writer thread).

        Returns ``False`` when the loop is closed.
        """
        self._done.append(ts)
        if not self._done_wakeup:
            self._done_wakeup = True
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(self._collect_done)
            except RuntimeError:
                return False
        return True

    def _collect_done(self) -> None:
        """Report a batch of finished tasks (on the loop, woken once per batch)."""
        self._done_wakeup = False
        self.completion_wakeups += 1
        done = self._done
        tasks = self._tasks
        data = self.data
        nbytes = self.nbytes
        replicas = self._replicas
        send = self._send
        while done:
            ts = done.popleft()
            key = ts.key
            if tasks.get(key) is not ts:
                continue  # freed or forgotten while it ran
            del tasks[key]
            if ts.deps:
                self._release_deps(ts)
            error = ts.error
            if error is None:
                data[key] = ts.result
                nbytes[key] = ts.nbytes
                if replicas:
                    replicas.discard(key)  # fetched meanwhile, now the scheduler's copy
                ts.result = None
                send(
                    {
                        "op": _TASK_FINISHED,
                        "key": key,
                        "nbytes": ts.nbytes,
                        "type": ts.typename,
                        "start": ts.start,
                        "stop": ts.stop,
                    }
                )
            else:
                error["key"] = key
                error["start"] = ts.start
                error["stop"] = ts.stop
                send(error)

    def _pack_error(self, exc: BaseException) -> dict[str, Any]:
        """Describe a task's exception for the scheduler (runs in a pool thread)."""
        from runtime.serialize import dumps, loads

        try:
            text = _user_traceback(exc)
        except Exception:
            text = f"{_typename(type(exc))}: {_safe_str(exc)} (traceback unavailable)\n"
        try:
            frames = dumps(exc)
            loads(frames)  # a pickle that cannot be loaded is of no use to the client
        except Exception as reason:
            try:
                frames = dumps(_fallback_exception(exc, reason))
            except Exception:
                frames = dumps(RuntimeError(f"{_typename(type(exc))}: {_safe_str(exc)}"))
        cls = type(exc)
        retryable = isinstance(exc, self._retry_classes) or any(
            c.__qualname__ in self._retry_names or _typename(c) in self._retry_names
            for c in cls.__mro__
        )
        return {
            "op": _TASK_ERRED,
            "exception": frames,
            "traceback": text,
            "exc_type": f"{cls.__module__}.{cls.__qualname__}",
            "retryable": bool(retryable),
            "worker": self.address,
            "host": self.hostname,
            "pid": self.pid,
        }

    # ---------------------------------------------------------------- fetching deps

    def _want(self, dep: Key, holders: Iterable[str], ts: _Task) -> None:
        waiters = self._dep_waiters.get(dep)
        if waiters is not None:
            waiters.append(ts)
            known = self._dep_holders[dep]
            known.extend(h for h in holders if h not in known)
            return
        self._dep_waiters[dep] = [ts]
        self._dep_holders[dep] = [h for h in holders if h != self.address]
        self._queue_fetch(dep)

    def _queue_fetch(self, dep: Key) -> None:
        holders = self._dep_holders[dep]
        if not holders:
            where = self._dep_stored.pop(dep, None)
            if where is not None:
                self._spawn(self._load_stored(dep, where))
                return
            self._give_up(dep)
            return
        # Prefer a peer already asked for something this round: fewer round trips.
        queue = self._fetch_queue
        peer = next((h for h in holders if h in queue), None)
        if peer is None:
            peer = next((h for h in holders if h not in self._fetching_from), holders[0])
        queue.setdefault(peer, {})[dep] = None

    def _start_fetches(self) -> None:
        queue = self._fetch_queue
        for peer in [p for p in queue if p not in self._fetching_from]:
            keys = list(queue.pop(peer))
            self._fetching_from.add(peer)
            self._spawn(self._fetch_from(peer, keys))

    async def _fetch_from(self, peer: str, keys: list[Key]) -> None:
        """One ``get-data`` round trip to ``peer`` for every key wanted from it."""
        got: dict[Key, Any] = {}
        errors: dict[Key, str] = {}
        try:
            got, errors = await self._get_data(peer, keys)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            logger.info(
                "worker %s: fetching %d keys from %s failed: %s", self.address, len(keys), peer, err
            )
        finally:
            self._fetching_from.discard(peer)
        if self.status not in (WorkerStatus.RUNNING, WorkerStatus.STARTING):
            return
        for key in keys:
            if key in got:
                self._dep_arrived(key, got[key])
            elif key in errors:
                self._fail_dependents(key, peer, errors[key])
            else:
                self._dep_failed(key, peer)
        self._flush()

    async def _get_data(self, peer: str, keys: list[Key]) -> tuple[dict[Key, Any], dict[Key, str]]:
        """Ask ``peer`` for ``keys`` on a pooled connection (a fresh one if it is stale).

        Returns the values it sent, and why it could not send others that it holds.
        """
        from runtime import comm as comm_mod

        assert self.secret is not None
        pooled = self._peer_comms.pop(peer, None)
        for attempt in (pooled, None):
            if attempt is not None and attempt.closed:
                continue
            comm = attempt or await comm_mod.connect(
                peer, self.secret, timeout=self.peer_timeout, role=Role.WORKER
            )
            try:
                await comm.write([{"op": _GET_DATA, "keys": keys}])
                replies = await comm.read()
            except CommClosedError:
                comm.abort()
                if attempt is None:
                    raise
                continue  # the peer had closed the idle connection: reconnect once
            except BaseException:
                comm.abort()
                raise
            if self.status in (WorkerStatus.RUNNING, WorkerStatus.STARTING):
                self._peer_comms[peer] = comm
            else:
                comm.abort()
            reply = replies[0]
            return dict(reply.get("data") or {}), dict(reply.get("errors") or {})
        raise AssertionError("unreachable")  # pragma: no cover

    async def _load_stored(self, dep: Key, where: Sequence[str]) -> None:
        """Load input ``dep`` from its checkpoint (no peer holds it), off the loop."""
        from runtime import checkpoint

        assert self._loop is not None
        try:
            value = await self._loop.run_in_executor(None, checkpoint.load, where[0], where[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.status not in (WorkerStatus.RUNNING, WorkerStatus.STARTING):
                return
            logger.warning(
                "worker %s: cannot load %r from its checkpoint (%s); the scheduler will "
                "have it computed",
                self.address,
                dep,
                exc,
            )
            self._send({"op": _MISSING_DATA, "key": dep, "worker": None, "checkpoint": True})
            self._give_up(dep)
            self._flush()
            return
        if self.status not in (WorkerStatus.RUNNING, WorkerStatus.STARTING):
            return
        self._dep_arrived(dep, value)
        self._flush()

    def _dep_arrived(self, key: Key, value: Any) -> None:
        waiters = self._dep_waiters.pop(key, None)
        self._dep_holders.pop(key, None)
        self._dep_stored.pop(key, None)
        if waiters is None:
            return
        if key not in self.data and self._refs.get(key):
            self.data[key] = value
            self.nbytes[key] = _sizeof(value)
            self._replicas.add(key)
        for ts in waiters:
            if ts.status is _FETCHING:
                ts.missing -= 1
                if not ts.missing:
                    ts.status = _READY
                    self._new_ready.append(ts)

    def _dep_failed(self, key: Key, peer: str) -> None:
        holders = self._dep_holders.get(key)
        if holders is None:
            return
        if peer in holders:
            holders.remove(peer)
        self._send({"op": _MISSING_DATA, "key": key, "worker": peer})
        if not any(ts.status is _FETCHING for ts in self._dep_waiters.get(key, ())):
            self._dep_waiters.pop(key, None)
            self._dep_holders.pop(key, None)
            self._dep_stored.pop(key, None)
            return
        self._queue_fetch(key)

    def _give_up(self, dep: Key) -> None:
        """No holder left for ``dep``: drop the tasks needing it; the scheduler reassigns.

        The scheduler has been told with ``missing-data`` which holders failed; it
        recomputes the key where needed and sends the dependent tasks again.
        """
        self._dep_holders.pop(dep, None)
        self._dep_stored.pop(dep, None)
        for ts in self._dep_waiters.pop(dep, ()):
            if ts.status is _FETCHING and self._tasks.get(ts.key) is ts:
                del self._tasks[ts.key]
                ts.status = _CANCELLED
                self._release_deps(ts)
                logger.info(
                    "worker %s: no peer holds %r, needed by %r; left to the scheduler",
                    self.address,
                    dep,
                    ts.key,
                )

    # ---------------------------------------------------------------- peer server

    async def _handle_peer(self, comm: Any) -> None:
        """Serve one peer connection: get-data, update-data, run."""
        try:
            while True:
                msgs = await comm.read()
                replies = []
                for msg in msgs:
                    op = msg.get("op")
                    if op == _GET_DATA:
                        data = self.data
                        replies.append(
                            {"op": _DATA, "data": {k: data[k] for k in msg["keys"] if k in data}}
                        )
                    elif op == _UPDATE_DATA:
                        replies.append(self._update_data(msg["data"]))
                    elif op == _RUN:
                        replies.append(await self._run_function(msg))
                    else:
                        replies.append(
                            {
                                "op": Op.ERROR.value,
                                "status": "error",
                                "message": f"unknown op {op!r}",
                            }
                        )
                try:
                    await comm.write(replies)
                except SerializationError:
                    # Nothing was sent: say which values cannot travel instead.
                    await comm.write([_sendable(reply) for reply in replies])
        except (OSError, asyncio.IncompleteReadError, EOFError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "worker %s: error serving %s", self.address, getattr(comm, "peer", "?")
            )
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(comm.close(), _CLOSE_TIMEOUT)

    def _fail_dependents(self, key: Key, peer: str, reason: str) -> None:
        """``key`` exists on ``peer`` but cannot be sent: fail the tasks needing it."""
        from runtime.serialize import dumps

        self._dep_holders.pop(key, None)
        self._dep_stored.pop(key, None)
        exc = SerializationError(
            f"the result {key!r} on worker {peer} cannot be sent to another worker: "
            f"{reason}; return a picklable object from that task (or register a "
            "serializer for its type)"
        )
        frames = dumps(exc)
        for ts in self._dep_waiters.pop(key, ()):
            if ts.status is not _FETCHING or self._tasks.get(ts.key) is not ts:
                continue
            del self._tasks[ts.key]
            ts.status = _CANCELLED
            self._release_deps(ts)
            now = time.time()
            self._send(
                {
                    "op": _TASK_ERRED,
                    "key": ts.key,
                    "exception": frames,
                    "traceback": "",
                    "exc_type": "runtime.errors.SerializationError",
                    "retryable": False,
                    "worker": self.address,
                    "host": self.hostname,
                    "pid": self.pid,
                    "start": now,
                    "stop": now,
                }
            )

    def _update_data(self, data: dict[Key, Any]) -> dict[str, Any]:
        nbytes = {}
        for key, value in data.items():
            self.data[key] = value
            nbytes[key] = self.nbytes[key] = _sizeof(value)
            self._replicas.discard(key)
        return {"op": Op.OK.value, "status": "OK", "keys": list(data), "nbytes": nbytes}

    async def _run_function(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Call a client's function here: ``function`` is frames of a callable or of
        ``(callable, args, kwargs)``; extra ``args``/``kwargs`` entries are used too."""
        from runtime.serialize import loads

        try:
            spec = loads(msg["function"])
            args = tuple(msg.get("args") or ())
            kwargs = dict(msg.get("kwargs") or {})
            if isinstance(spec, tuple):
                spec, more_args, more_kwargs = (list(spec) + [(), {}])[:3]
                args = tuple(more_args) + args
                kwargs = {**dict(more_kwargs), **kwargs}
            func = spec
            with contextlib.suppress(TypeError, ValueError):
                if "dask_worker" in inspect.signature(func).parameters:
                    kwargs["dask_worker"] = self
            if inspect.iscoroutinefunction(func):
                result = await func(*args, **kwargs)
            else:
                result = await asyncio.to_thread(func, *args, **kwargs)
        except Exception as exc:
            packed = self._pack_error(exc)
            packed.update(op=Op.ERROR.value, status="error", message=_safe_str(exc))
            return packed
        return {"op": Op.OK.value, "status": "OK", "result": result, "worker": self.address}


def _sendable(reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` without the values that cannot be serialized, saying why in their place.

    ``data`` replies keep what can be sent and list the rest under ``errors``
    (``{key: reason}``); any other reply becomes an ``error`` reply.
    """
    from runtime.serialize import dumps

    if reply.get("op") == _DATA:
        data, errors = {}, {}
        for key, value in reply["data"].items():
            try:
                dumps(value)
            except SerializationError as err:
                errors[key] = str(err)
            else:
                data[key] = value
        return {"op": _DATA, "data": data, "errors": errors}
    try:
        dumps(reply)
    except SerializationError as err:
        return {
            "op": Op.ERROR.value,
            "status": "error",
            "message": str(err),
            "exception": dumps(err),
            "traceback": "",
        }
    return reply


def _pid_alive(pid: int) -> bool:
    if os.getppid() != pid:
        # Our parent changed: the original one exited and we were re-parented.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


# --------------------------------------------------------------------------------------
# Command line: python -m runtime.worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the worker's options to ``parser`` (``hpc worker`` uses it for its subcommand)."""
    parser.add_argument(
        "scheduler",
        nargs="?",
        help="scheduler address tcp://host:port (the secret then comes from "
        "--secret-file or $HPC_SECRET_FILE)",
    )
    parser.add_argument("--scheduler-file", help="read address and secret from this file")
    parser.add_argument("--secret-file", help="file holding the cluster secret (hex)")
    parser.add_argument("--nthreads", type=int, default=None, help="task threads (default: cores)")
    parser.add_argument(
        "--memory-limit",
        default=None,
        help="bytes ('4GB'), a fraction (0.5), 'auto' or 'none' "
        "(default: distributed.worker.memory-limit)",
    )
    parser.add_argument("--name", default=None, help="worker name (default: its address)")
    parser.add_argument("--host", default=None, help="address to listen on")
    parser.add_argument(
        "--interface", default=None, help="network interface to listen on, e.g. ib0"
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    parser.add_argument(
        "--death-timeout",
        default=None,
        help="exit after the scheduler is unreachable this long "
        "(default: distributed.worker.death-timeout)",
    )
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)


def make_parser() -> argparse.ArgumentParser:
    """The ``python -m runtime.worker`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.worker",
        description="Start a worker and connect it to a scheduler.",
    )
    add_arguments(parser)
    return parser


async def _serve(worker: Worker) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        logger.info("worker %s received %s", worker.address, sig.name)
        worker.request_close(f"signal {sig.name}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    await worker.start()
    await worker.finished()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime.worker``: parse ``argv`` and run a worker (see :func:`run_from_args`)."""
    return run_from_args(make_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run a worker until the scheduler closes it, it is signalled, or the scheduler is gone.

    Parameters
    ----------
    args
        Options parsed by a parser set up with :func:`add_arguments`.

    Returns
    -------
    int
        0 after a requested close (scheduler ``close``, SIGTERM/SIGINT), 1 when the
        worker could not reach its scheduler or lost it for longer than the death
        timeout, 2 for a usage error. If task code is still running in a pool thread
        when the worker has closed, the process exits at once with that status (the
        interpreter would otherwise wait for the task).
    """
    if (args.scheduler is None) == (args.scheduler_file is None):
        print("worker: error: give a scheduler address or --scheduler-file", file=sys.stderr)
        return 2
    secret_file = args.secret_file or os.environ.get("HPC_SECRET_FILE")
    if args.scheduler is not None and not secret_file:
        print(
            "worker: error: connecting by address needs the cluster secret: pass "
            "--secret-file F or set HPC_SECRET_FILE (or use --scheduler-file instead)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        secret = read_secret_file(secret_file) if secret_file and args.scheduler else None
        worker = Worker(
            args.scheduler,
            scheduler_file=args.scheduler_file,
            secret=secret,
            nthreads=args.nthreads or _cpu_count(),
            memory_limit=(
                args.memory_limit
                if args.memory_limit is not None
                else _config_get("distributed.worker.memory-limit", "auto")
            ),
            name=args.name,
            host=args.host,
            port=args.port,
            interface=args.interface,
            death_timeout=args.death_timeout,
            parent_pid=args.parent_pid,
        )
        asyncio.run(_serve(worker))
    except (SchedulerError, ConfigError) as err:
        print(f"worker: {err}", file=sys.stderr)
        return 1
    code = 1 if worker.close_reason in ("death-timeout", "parent-gone") else 0
    if worker.executing:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    from runtime.worker import main as _main  # the importable module, not __main__

    sys.exit(_main())
